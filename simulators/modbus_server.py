"""Modbus TCP servers for simulated devices: one listening socket per (host, port), units by id.

A :class:`ModbusEndpoint` serves every :class:`SimulatedUnit` configured on its host and port, the
way an RS-485 gateway puts several meters behind one IP port. Each unit keeps a register image of
its configured points, encoded from its physics with the point's type, word/byte order and
scale/offset. The plant refreshes the images on every tick; a read also refreshes a unit whose
physics changed since (an override or a write), so a test sees its change on the very next read.

Like a real meter, a unit answers exception 2 (illegal data address) for any register or bit that
is not part of a configured point, and for writes to points that are not writable. A request for a
unit id nobody serves gets exception 11 (gateway target device failed to respond), as from a
gateway.

The small codec here duplicates :mod:`protocols.modbus.codec` on purpose: simulators stand in for
hardware and must not share code with the server they test (import-linter enforces it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.server import ModbusBaseServer, ModbusTcpServer

from simulators.physics import DevicePhysics

__all__ = [
    "DATA_TYPES",
    "TABLES",
    "ModbusEndpoint",
    "SimulatedPoint",
    "SimulatedUnit",
    "SimulatorError",
    "decode_value",
    "encode_value",
]

_LOGGER = logging.getLogger(__name__)

TABLES: Final = ("holding", "input", "coil", "discrete_input")
"""Modbus tables, named as in the site file."""

DATA_TYPES: Final[Mapping[str, tuple[str, int]]] = {
    "bool": ("?", 1),
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "int64": ("q", 4),
    "uint64": ("Q", 4),
    "float32": ("f", 2),
    "float64": ("d", 4),
}
"""struct format and register count of each site-file data type."""

_INT_RANGE: Final[Mapping[str, tuple[int, int]]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
_FLOAT32_MAX: Final = 3.4028234663852886e38

_TABLE_OF_FUNCTION: Final[Mapping[int, str]] = {
    1: "coil",
    5: "coil",
    15: "coil",
    2: "discrete_input",
    3: "holding",
    6: "holding",
    16: "holding",
    22: "holding",
    23: "holding",
    4: "input",
}


class SimulatorError(Exception):
    """A simulator cannot start (the port is taken, the host is not local...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatedPoint:
    """One configured point of a simulated device: its variable and register layout."""

    key: str
    table: str = "holding"
    address: int
    type: str = "uint16"
    word_order: str = "big"
    byte_order: str = "big"
    scale: float = 1.0
    offset: float = 0.0
    writable: bool = False

    def __post_init__(self) -> None:
        if self.table not in TABLES:
            raise ValueError(f"unknown table {self.table!r} (use {', '.join(TABLES)})")
        if self.type not in DATA_TYPES:
            raise ValueError(f"unknown type {self.type!r} (use {', '.join(DATA_TYPES)})")
        if (self.type == "bool") != (self.table in ("coil", "discrete_input")):
            raise ValueError(f"type {self.type!r} does not fit the table {self.table!r}")
        if self.word_order not in ("big", "little") or self.byte_order not in ("big", "little"):
            raise ValueError("word_order and byte_order must be 'big' or 'little'")
        if not 0 <= self.address <= 65535 - self.count + 1:
            raise ValueError(f"address {self.address} out of range")
        if self.scale == 0:
            raise ValueError("scale must not be 0")

    @property
    def count(self) -> int:
        """Return how many registers (or bits) the point occupies."""
        return DATA_TYPES[self.type][1]


# --------------------------------------------------------------------------------------------------
# The device side of the codec


def _reorder(words: list[int], point: SimulatedPoint) -> list[int]:
    if point.byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    if point.word_order == "little":
        words.reverse()
    return words


def encode_value(value: float, point: SimulatedPoint) -> list[int]:
    """Encode an engineering value into the point's registers, saturating like a meter does.

    Integer types round to the nearest step and stick at their limits (NaN becomes 0); floats
    pass NaN and inf through, as a faulty meter would send them.

    >>> encode_value(230.1, SimulatedPoint(key="v", address=0, type="uint16", scale=0.1))
    [2301]
    >>> encode_value(-1.0, SimulatedPoint(key="e", address=0, type="uint32"))
    [0, 0]
    >>> [hex(w) for w in encode_value(123.456, SimulatedPoint(key="p", address=0, type="float32"))]
    ['0x42f6', '0xe979']
    """
    raw = (value - point.offset) / point.scale
    if point.type == "bool":
        return [0 if math.isnan(raw) or raw == 0 else 1]
    fmt, _count = DATA_TYPES[point.type]
    packed: int | float
    if point.type in _INT_RANGE:
        low, high = _INT_RANGE[point.type]
        if math.isnan(raw):
            packed = 0
        elif math.isinf(raw):
            packed = high if raw > 0 else low
        else:
            # Half away from zero; integral values as they are (from 2**52 on, +0.5 changes them).
            rounded = int(raw) if raw.is_integer() else int(math.copysign(math.floor(abs(raw) + 0.5), raw))
            packed = min(high, max(low, rounded))
    elif point.type == "float32" and math.isfinite(raw) and abs(raw) > _FLOAT32_MAX:
        packed = math.copysign(math.inf, raw)
    else:
        packed = raw
    payload = struct.pack(f">{fmt}", packed)
    return _reorder([int.from_bytes(payload[i : i + 2], "big") for i in range(0, len(payload), 2)], point)


def decode_value(words: Sequence[int], point: SimulatedPoint) -> float:
    """Decode a point's registers (as written by a master) into its engineering value.

    >>> decode_value([2301], SimulatedPoint(key="v", address=0, type="uint16", scale=0.1))
    230.1
    """
    if point.type == "bool":
        raw: int | float = 1 if words[0] else 0
    else:
        fmt, _count = DATA_TYPES[point.type]
        payload = b"".join(w.to_bytes(2, "big") for w in _reorder(list(words), point))
        raw = struct.unpack(f">{fmt}", payload)[0]
    divisor = 1.0 / point.scale
    if abs(point.scale) < 1 and divisor == round(divisor):  # 2301 x 0.1 reads 230.1, not 230.10000000000002
        return float(raw) / round(divisor) + point.offset
    return float(raw) * point.scale + point.offset


# --------------------------------------------------------------------------------------------------
# Units and endpoints


class SimulatedUnit:
    """One simulated device behind an endpoint: its register image, refreshed from its physics."""

    def __init__(
        self, device_id: str, unit_id: int, physics: DevicePhysics, points: Sequence[SimulatedPoint]
    ) -> None:
        self.device_id = device_id
        self.unit_id = unit_id
        self.physics = physics
        self.points = tuple(points)
        self._owner: dict[tuple[str, int], SimulatedPoint] = {}
        for point in self.points:
            for address in range(point.address, point.address + point.count):
                other = self._owner.get((point.table, address))
                if other is not None:
                    raise ValueError(f"registers of {other.key!r} and {point.key!r} overlap in {point.table}")
                self._owner[point.table, address] = point
        self._image: dict[tuple[str, int], int] = {}
        self._revision = -1
        self.refresh()

    def refresh(self) -> None:
        """Encode every point's current value into the register image."""
        for point in self.points:
            words = encode_value(self.physics.value(point.key), point)
            for i, word in enumerate(words):
                self._image[point.table, point.address + i] = word
        self._revision = self.physics.revision

    def read(self, table: str, address: int, count: int) -> list[int] | ExcCodes:
        """Return ``count`` words (0/1 for bits) from ``address``, or exception 2 if any is unmapped."""
        if self._revision != self.physics.revision:
            self.refresh()
        words: list[int] = []
        for addr in range(address, address + count):
            word = self._image.get((table, addr))
            if word is None:
                return ExcCodes.ILLEGAL_ADDRESS
            words.append(word)
        return words

    def write(self, table: str, address: int, values: Sequence[int]) -> ExcCodes | None:
        """Apply a master's write and feed each touched point to the physics.

        Every register must belong to a writable point, else exception 2 and nothing changes.
        """
        touched: dict[str, SimulatedPoint] = {}
        for addr in range(address, address + len(values)):
            point = self._owner.get((table, addr))
            if point is None or not point.writable:
                return ExcCodes.ILLEGAL_ADDRESS
            touched[point.key] = point
        if self._revision != self.physics.revision:
            self.refresh()
        for i, word in enumerate(values):
            self._image[table, address + i] = int(word)
        for point in touched.values():
            words = [self._image[point.table, point.address + i] for i in range(point.count)]
            value = decode_value(words, point)
            _LOGGER.info("%s: %s written: %g", self.device_id, point.key, value)
            self.physics.write(point.key, value)
        return None


class _PlantDatastore(ModbusServerContext):
    """pymodbus datastore over our units: exact unit ids, per-table addressing, physics on write.

    pymodbus 3.16 routes a ``ModbusServerContext`` flagged ``old_simulator`` straight to its
    ``async_getValues``/``async_setValues``; we skip the base initialiser, which only builds the
    deprecated register blocks we replace (and logs a deprecation warning).
    """

    def __init__(self, units: Mapping[int, SimulatedUnit]) -> None:  # base __init__ skipped on purpose
        self.old_simulator = True
        self.simdevices = []
        self._units = dict(units)
        self._strangers: set[int] = set()

    def _unit(self, device_id: int) -> SimulatedUnit | None:
        unit = self._units.get(device_id)
        if unit is None and device_id not in self._strangers:
            self._strangers.add(device_id)  # log once per unit id, not once per poll
            _LOGGER.warning("request for unit id %d, which no simulated device has", device_id)
        return unit

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        """Serve a read (and the echo of a write) from the unit's register image."""
        table = _TABLE_OF_FUNCTION.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        unit = self._unit(device_id)
        if unit is None:
            return ExcCodes.GATEWAY_NO_RESPONSE  # what a gateway answers for a silent device
        words = unit.read(table, address, count)
        if isinstance(words, ExcCodes) or table not in ("coil", "discrete_input"):
            return words
        return [bool(w) for w in words]

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        """Apply a write to the unit (FC 5, 6, 15, 16)."""
        table = _TABLE_OF_FUNCTION.get(func_code)
        if table not in ("coil", "holding"):
            return ExcCodes.ILLEGAL_FUNCTION
        unit = self._unit(device_id)
        if unit is None:
            return ExcCodes.GATEWAY_NO_RESPONSE
        return unit.write(table, address, [int(v) for v in values])

    def device_ids(self) -> list[int]:
        """Return the unit ids served."""
        return list(self._units)


class ModbusEndpoint:
    """One listening socket serving several simulated units by unit id."""

    def __init__(self, host: str, port: int, units: Sequence[SimulatedUnit]) -> None:
        self.host = host
        self.port = port
        self.units: dict[int, SimulatedUnit] = {}
        for unit in units:
            if unit.unit_id in self.units:
                other = self.units[unit.unit_id].device_id
                raise ValueError(
                    f"{host}:{port}: unit id {unit.unit_id} used by both {other} and {unit.device_id}"
                )
            self.units[unit.unit_id] = unit
        self._server: ModbusTcpServer | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def listening(self) -> bool:
        """Return True while the socket accepts connections."""
        return self._server is not None

    def refresh(self) -> None:
        """Re-encode every unit's registers from its physics."""
        for unit in self.units.values():
            unit.refresh()

    async def start(self) -> None:
        """Listen; raise :class:`SimulatorError` if the address cannot be bound."""
        if self._server is not None:
            return
        server = ModbusTcpServer(_PlantDatastore(self.units), address=(self.host, self.port))
        try:
            await server.serve_forever(background=True)
        except RuntimeError as err:  # pymodbus logs the OSError and raises this instead
            await self._shutdown(server)
            raise SimulatorError(f"cannot listen on {self}: address in use or not local?") from err
        self._server = server
        _LOGGER.info("listening on %s for units %s", self, sorted(self.units))

    async def stop(self) -> None:
        """Close the listening socket and every client connection; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            await self._shutdown(server)
            _LOGGER.info("stopped listening on %s", self)

    @staticmethod
    async def _shutdown(server: ModbusTcpServer) -> None:
        await server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it unannotated
        if ModbusBaseServer.active_server is server:  # a class-level global in pymodbus: don't pin us
            ModbusBaseServer.active_server = None
        await asyncio.sleep(0)  # let the closed transports deliver connection_lost before we return
