"""Pure Modbus register codec and read-block compiler: no I/O, so it is tested exhaustively.

Values travel as 16-bit registers (or single bits for the coil and discrete-input tables). A value
of a wider type spans consecutive registers; the device decides the order of the words and of the
two bytes inside each word (:class:`WordOrder`, :class:`ByteOrder`). Everything here goes through
:mod:`struct` on a big-endian byte string, after putting the words and bytes back in that order.

Scaling follows the site file: ``engineering = raw * scale + offset``. Encoding inverts it, rounds
to the nearest integer for integer types and refuses values that do not fit, because silently
clamping a setpoint is a control decision that belongs to the dispatcher, not to a codec.

The hot path of a poll decodes straight from the answer's bytes with :func:`compile_decoder`: one
precompiled ``struct`` per point layout (shared by every device with that layout), the same values
as :func:`decode_point` at a fraction of the cost, which matters at ten thousand polls a second.

Block compilation turns a register map into as few requests as the device allows: points of one
table are sorted by address and merged while the block stays within ``max_block_registers`` (at
most 2000 bits for bit tables) and each hole it spans is at most ``max_gap_registers`` long.
"""

from __future__ import annotations

import functools
import math
import struct
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from protocols.modbus.config import ByteOrder, DataType, ModbusPointConfig, RegisterTable, WordOrder

__all__ = [
    "MAX_BITS_PER_READ",
    "MAX_REGISTERS_PER_READ",
    "EncodeError",
    "ReadBlock",
    "compile_blocks",
    "compile_decoder",
    "decode_point",
    "decode_raw",
    "encode_point",
    "encode_raw",
    "from_engineering",
    "to_engineering",
]

MAX_REGISTERS_PER_READ = 125
"""Protocol limit of registers per read (FC 3 and 4)."""
MAX_BITS_PER_READ = 2000
"""Protocol limit of bits per read (FC 1 and 2)."""

K = TypeVar("K", bound=Hashable)

_STRUCT_FORMAT: Mapping[DataType, str] = {
    DataType.INT16: "h",
    DataType.UINT16: "H",
    DataType.INT32: "i",
    DataType.UINT32: "I",
    DataType.INT64: "q",
    DataType.UINT64: "Q",
    DataType.FLOAT32: "f",
    DataType.FLOAT64: "d",
}

_INT_RANGE: Mapping[DataType, tuple[int, int]] = {
    DataType.BOOL: (0, 1),
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}

_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT_RANGE: Mapping[DataType, tuple[float, float]] = {
    DataType.FLOAT32: (-_FLOAT32_MAX, _FLOAT32_MAX),
    DataType.FLOAT64: (-sys.float_info.max, sys.float_info.max),
}


class EncodeError(ValueError):
    """A value cannot be written as the point's register type (out of range, not finite)."""


# --------------------------------------------------------------------------------------------------
# Raw values <-> registers


def _to_wire_order(words: list[int], word_order: WordOrder, byte_order: ByteOrder) -> list[int]:
    """Reorder big-endian words into the device's order; the operation is its own inverse."""
    if byte_order is ByteOrder.LITTLE:
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    if word_order is WordOrder.LITTLE:
        words.reverse()
    return words


def decode_raw(
    registers: Sequence[int],
    data_type: DataType,
    *,
    word_order: WordOrder = WordOrder.BIG,
    byte_order: ByteOrder = ByteOrder.BIG,
) -> int | float:
    """Decode the registers (or bits) of one value into its raw, unscaled number.

    Parameters
    ----------
    registers
        Exactly ``data_type.register_count`` 16-bit words (0/1 bits for ``BOOL``), as received.
    data_type, word_order, byte_order
        The layout from the point's ``modbus`` section.

    Examples
    --------
    >>> decode_raw([0x42F6, 0xE979], DataType.FLOAT32)
    123.45600128173828
    >>> decode_raw([0xE979, 0x42F6], DataType.FLOAT32, word_order=WordOrder.LITTLE)
    123.45600128173828
    >>> decode_raw([0xFFFF], DataType.INT16)
    -1
    >>> decode_raw([0x3412, 0x7856], DataType.UINT32, byte_order=ByteOrder.LITTLE)
    305419896
    """
    count = data_type.register_count
    if len(registers) != count:
        raise ValueError(f"{data_type.value} needs {count} registers, got {len(registers)}")
    if data_type is DataType.BOOL:
        return 1 if registers[0] else 0
    if any(not 0 <= w <= 0xFFFF for w in registers):
        raise ValueError(f"register values must be 16-bit unsigned, got {list(registers)}")
    words = _to_wire_order(list(registers), word_order, byte_order)
    payload = b"".join(w.to_bytes(2, "big") for w in words)
    value: int | float = struct.unpack(f">{_STRUCT_FORMAT[data_type]}", payload)[0]
    return value


def encode_raw(
    raw: int | float,
    data_type: DataType,
    *,
    word_order: WordOrder = WordOrder.BIG,
    byte_order: ByteOrder = ByteOrder.BIG,
) -> list[int]:
    """Encode a raw number into the registers (or one bit) of one value; the inverse of decode.

    Integer types need an ``int`` within range; float types take any float (NaN and inf included,
    a simulator may want to send them). Raises :class:`EncodeError` when the value does not fit.

    Examples
    --------
    >>> [hex(w) for w in encode_raw(123.456, DataType.FLOAT32)]
    ['0x42f6', '0xe979']
    >>> encode_raw(-2, DataType.INT32, word_order=WordOrder.LITTLE)
    [65534, 65535]
    >>> encode_raw(70000, DataType.UINT16)
    Traceback (most recent call last):
    ...
    protocols.modbus.codec.EncodeError: 70000 does not fit uint16 (0..65535)
    """
    if data_type in _INT_RANGE:
        if isinstance(raw, float):
            if not raw.is_integer():
                raise EncodeError(f"{raw} is not an integer, as {data_type.value} needs")
            raw = int(raw)
        low, high = _INT_RANGE[data_type]
        if not low <= raw <= high:
            raise EncodeError(f"{raw} does not fit {data_type.value} ({low}..{high})")
        if data_type is DataType.BOOL:
            return [raw]
    elif data_type is DataType.FLOAT32 and math.isfinite(raw) and abs(raw) > _FLOAT32_MAX:
        raise EncodeError(f"{raw} does not fit float32")
    payload = struct.pack(f">{_STRUCT_FORMAT[data_type]}", raw)
    words = [int.from_bytes(payload[i : i + 2], "big") for i in range(0, len(payload), 2)]
    return _to_wire_order(words, word_order, byte_order)


# --------------------------------------------------------------------------------------------------
# Scaling


def to_engineering(raw: int | float, *, scale: float = 1.0, offset: float = 0.0) -> float:
    """Return ``raw * scale + offset``: the value in the point's unit.

    A decimal scale such as 0.1 or 0.001 divides by 10 or 1000 instead of multiplying, so 939 with
    scale 0.001 reads 0.939 and not 0.9390000000000001.

    >>> to_engineering(2345, scale=0.1, offset=-10.0)
    224.5
    >>> to_engineering(939, scale=0.001)
    0.939
    """
    divisor = 1.0 / scale
    if _is_decimal_step(scale, divisor):
        return float(raw) / round(divisor) + offset
    return float(raw) * scale + offset


def _is_decimal_step(scale: float, divisor: float) -> bool:
    """Return True for a scale such as 0.1 or 0.001 whose inverse is a whole number.

    A scale below about 5.6e-309 has an infinite inverse, which ``round`` cannot take.
    """
    return abs(scale) < 1 and math.isfinite(divisor) and divisor == round(divisor)


def from_engineering(
    value: float, data_type: DataType, *, scale: float = 1.0, offset: float = 0.0
) -> int | float:
    """Invert the scaling for a write: round to the nearest integer for integer types.

    Raises :class:`EncodeError` for non-finite values and values outside the type's range, naming
    the engineering range the point can take.

    Examples
    --------
    >>> from_engineering(224.5, DataType.UINT16, scale=0.1, offset=-10.0)
    2345
    >>> from_engineering(True, DataType.BOOL)
    1
    >>> from_engineering(7000.0, DataType.UINT16, scale=0.1)
    Traceback (most recent call last):
    ...
    protocols.modbus.codec.EncodeError: 7000.0 is out of range for uint16 with scale 0.1: 0..6553.5
    """
    if scale == 0:
        raise ValueError("scale must not be 0")
    if not math.isfinite(value):
        raise EncodeError(f"{value} is not a finite number")
    raw = (value - offset) / scale
    low, high = _INT_RANGE.get(data_type) or _FLOAT_RANGE[data_type]
    if not math.isfinite(raw):  # a finite value over a tiny scale: out of any type's range
        raise _out_of_range(value, data_type, scale=scale, offset=offset, low=low, high=high)
    if data_type not in _INT_RANGE:
        return raw
    # Half away from zero, as people round; an integral value is taken as it is, because from 2**52
    # on adding 0.5 rounds to the next even integer and would change it.
    rounded = int(raw) if raw.is_integer() else int(math.copysign(math.floor(abs(raw) + 0.5), raw))
    if not low <= rounded <= high:
        raise _out_of_range(value, data_type, scale=scale, offset=offset, low=low, high=high)
    return rounded


def _out_of_range(
    value: float, data_type: DataType, *, scale: float, offset: float, low: float, high: float
) -> EncodeError:
    """Return the error of a value outside the type's range, naming the range in engineering units."""
    ends = sorted(to_engineering(end, scale=scale, offset=offset) for end in (low, high))
    return EncodeError(
        f"{value} is out of range for {data_type.value} with scale {scale:g}"
        + (f" and offset {offset:g}" if offset else "")
        + f": {ends[0]:g}..{ends[1]:g}"
    )


def decode_point(
    registers: Sequence[int], config: ModbusPointConfig, *, scale: float = 1.0, offset: float = 0.0
) -> float:
    """Decode one point's registers into its engineering value (may be NaN or inf for floats).

    >>> cfg = ModbusPointConfig(address=0, type=DataType.INT16)
    >>> decode_point([0xFF38], cfg, scale=0.001)
    -0.2
    """
    raw = decode_raw(registers, config.type, word_order=config.word_order, byte_order=config.byte_order)
    return to_engineering(raw, scale=scale, offset=offset)


def encode_point(
    value: float, config: ModbusPointConfig, *, scale: float = 1.0, offset: float = 0.0
) -> list[int]:
    """Encode one engineering value into the point's registers (or its single bit).

    >>> cfg = ModbusPointConfig(address=0, type=DataType.UINT32, word_order=WordOrder.LITTLE)
    >>> encode_point(123456.7, cfg, scale=0.1)
    [54919, 18]
    """
    raw = from_engineering(value, config.type, scale=scale, offset=offset)
    return encode_raw(raw, config.type, word_order=config.word_order, byte_order=config.byte_order)


PointDecoder = Callable[[bytes, int], float]
"""``decoder(data, start)``: the engineering value of the point whose first register is at byte
``start`` of ``data`` (the registers of a read answer, as they came off the wire)."""


@functools.lru_cache(maxsize=1024)
def compile_decoder(
    data_type: DataType,
    word_order: WordOrder = WordOrder.BIG,
    byte_order: ByteOrder = ByteOrder.BIG,
    scale: float = 1.0,
    offset: float = 0.0,
) -> PointDecoder:
    """Return a fast decoder for one register layout and scaling; equal to :func:`decode_point`.

    Decoders are cached by layout, so ten thousand meters of one model share five decoders.
    Register tables only (bits are decoded by :func:`decode_point`).

    Examples
    --------
    >>> decode = compile_decoder(DataType.FLOAT32)
    >>> decode(bytes.fromhex("0000 42f6e979"), 2)
    123.45600128173828
    >>> compile_decoder(DataType.UINT32, WordOrder.LITTLE, ByteOrder.LITTLE)(bytes.fromhex("78563412"), 0)
    305419896.0
    >>> compile_decoder(DataType.UINT16, scale=0.1, offset=-10.0)(bytes.fromhex("0929"), 0)
    224.5
    """
    if data_type is DataType.BOOL:
        raise ValueError("bits are not decoded from register bytes")
    size = 2 * data_type.register_count
    layout = struct.Struct(f">{_STRUCT_FORMAT[data_type]}")
    unpack_from, unpack = layout.unpack_from, layout.unpack
    # Byte i of the big-endian value is byte order[i] of the value's registers as sent.
    order = list(range(size))
    if byte_order is ByteOrder.LITTLE:
        order = [i ^ 1 for i in order]
    if word_order is WordOrder.LITTLE:
        order = [2 * (size // 2 - 1 - i // 2) + i % 2 for i in order]
    divisor = 1.0 / scale
    decimal = _is_decimal_step(scale, divisor)  # as to_engineering: 939 x 0.001 = 0.939

    def raw_in_order(data: bytes, start: int) -> float:
        return float(unpack_from(data, start)[0])

    def raw_reordered(data: bytes, start: int) -> float:
        return float(unpack(bytes([data[start + i] for i in order]))[0])

    raw_of = raw_in_order if order == sorted(order) else raw_reordered

    if scale == 1.0 and offset == 0.0:
        return raw_of
    if decimal:
        steps = round(divisor)
        return lambda data, start: raw_of(data, start) / steps + offset
    return lambda data, start: raw_of(data, start) * scale + offset


# --------------------------------------------------------------------------------------------------
# Read blocks


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadBlock(Generic[K]):
    """One read request and the points it serves.

    ``count`` registers (or bits) of ``table`` from ``address``; ``members`` are the ``(key, config)``
    pairs of the points inside it, in address order.
    """

    table: RegisterTable
    address: int
    count: int
    members: tuple[tuple[K, ModbusPointConfig], ...]

    @property
    def end(self) -> int:
        """Return the address one past the last register (or bit) of the block."""
        return self.address + self.count

    def words_of(self, config: ModbusPointConfig, values: Sequence[int]) -> Sequence[int]:
        """Return the slice of a block response that holds one member's value."""
        start = config.address - self.address
        return values[start : start + config.type.register_count]

    def __str__(self) -> str:
        return f"{self.table.value} {self.address}..{self.end - 1}"


def compile_blocks(
    points: Mapping[K, ModbusPointConfig] | Iterable[tuple[K, ModbusPointConfig]],
    *,
    max_block_registers: int,
    max_gap_registers: int,
) -> list[ReadBlock[K]]:
    """Group points into as few block reads as the limits allow.

    Points are grouped by table, sorted by address and merged into the current block while the
    merged block stays within ``max_block_registers`` (``MAX_BITS_PER_READ`` bits for the bit
    tables) and the hole before the next point is at most ``max_gap_registers`` registers (bits).
    Blocks come out ordered by table, then address.

    Examples
    --------
    >>> pts = {
    ...     "p": ModbusPointConfig(address=0, type=DataType.FLOAT32),
    ...     "q": ModbusPointConfig(address=2, type=DataType.FLOAT32),
    ...     "f": ModbusPointConfig(address=20, type=DataType.UINT16),
    ...     "on": ModbusPointConfig(table=RegisterTable.COIL, address=5, type=DataType.BOOL),
    ... }
    >>> [str(b) for b in compile_blocks(pts, max_block_registers=125, max_gap_registers=10)]
    ['holding 0..3', 'holding 20..20', 'coil 5..5']
    >>> [str(b) for b in compile_blocks(pts, max_block_registers=125, max_gap_registers=16)]
    ['holding 0..20', 'coil 5..5']
    """
    if max_block_registers < 1:
        raise ValueError("max_block_registers must be at least 1")
    if max_gap_registers < 0:
        raise ValueError("max_gap_registers must not be negative")
    items = list(points.items()) if isinstance(points, Mapping) else list(points)
    order = list(RegisterTable)
    items.sort(key=lambda kv: (order.index(kv[1].table), kv[1].address, kv[1].end))
    blocks: list[ReadBlock[K]] = []
    current: list[tuple[K, ModbusPointConfig]] = []
    start = end = 0
    for key, config in items:
        limit = MAX_BITS_PER_READ if config.table.is_bit else max_block_registers
        if config.type.register_count > limit:
            raise ValueError(
                f"point {key!r} needs {config.type.register_count} registers "
                f"but max_block_registers is {max_block_registers}"
            )
        same_table = bool(current) and current[0][1].table is config.table
        new_end = max(end, config.end)
        if same_table and config.address - end <= max_gap_registers and new_end - start <= limit:
            current.append((key, config))
            end = new_end
            continue
        if current:
            blocks.append(_block(current, start, end))
        current, start, end = [(key, config)], config.address, config.end
    if current:
        blocks.append(_block(current, start, end))
    return blocks


def _block(members: list[tuple[K, ModbusPointConfig]], start: int, end: int) -> ReadBlock[K]:
    return ReadBlock(table=members[0][1].table, address=start, count=end - start, members=tuple(members))
