"""Modbus TCP driver: translate block reads and single writes into readings; supervise nothing.

The driver implements :class:`scada.model.Driver`. It never retries and never reconnects: every
failure is raised as a kernel error so the device's session decides when to try again (STYLE.md:
drivers translate, sessions supervise). The wire is :mod:`protocols.modbus.transport`, a lean
client on ``asyncio.Protocol``: a gateway polls thousands of devices a second, and a library client
costs several times more CPU and memory per request (docs/protocols.md has the figures).

Error and quality mapping
-------------------------
::

    cannot connect, connection lost, no answer within timeout_s      -> DeviceUnavailable
    gateway exception 10 or 11 (target device does not answer)      -> DeviceUnavailable
    answer with the wrong function code, unit id, transaction id,
    byte count or length, or a bad MBAP header                       -> DeviceProtocolError (dropped)
    exception response to a block read                              -> bad quality for the block's
                                                                       points, e.g. "exception 2:
                                                                       illegal data address"
    float register holding NaN or inf                               -> bad quality for that point
    exception response to a write or a read-back                    -> DeviceProtocolError
    unknown point, read-only point, value the type cannot hold      -> PointRejected (nothing sent)

After a timeout the connection is dropped: a late answer would otherwise be taken for the answer to
the next request. Every later call raises :class:`DeviceUnavailable` until :meth:`connect`.

Block reads follow :func:`protocols.modbus.codec.compile_blocks`. Many devices refuse a read that
spans registers they do not define; when a merged block is refused with exception 2 the driver
splits it into one read per point, for good, and logs that once.

Timeouts and ``inter_request_gap_s`` run on real (event-loop) time, as the device does; the
injected clock only stamps readings, so a simulation or a test can run on its own time.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, TypeVar

from protocols.common import PointRejected, index_points, lookup_point
from protocols.modbus.codec import (
    EncodeError,
    PointDecoder,
    ReadBlock,
    compile_blocks,
    compile_decoder,
    decode_point,
    encode_point,
)
from protocols.modbus.config import ModbusDeviceConfig, ModbusPointConfig, RegisterTable
from protocols.modbus.transport import (
    FC_READ_COILS,
    FC_READ_DISCRETE_INPUTS,
    FC_READ_HOLDING_REGISTERS,
    FC_READ_INPUT_REGISTERS,
    FC_WRITE_MULTIPLE_REGISTERS,
    FC_WRITE_SINGLE_COIL,
    FC_WRITE_SINGLE_REGISTER,
    ConnectionClosed,
    ExceptionResponse,
    FrameError,
    ModbusConnection,
    open_connection,
)
from scada.model import (
    Acquisition,
    Clock,
    DeviceError,
    DeviceId,
    DeviceProtocolError,
    DeviceUnavailable,
    PointId,
    Quality,
    Reading,
)

__all__ = ["ModbusDriver", "ModbusPointSpec", "PointRejected", "describe_exception"]

_LOGGER = logging.getLogger(__name__)

_EXCEPTION_NAMES: Final = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
_ILLEGAL_DATA_ADDRESS: Final = 2
_GATEWAY_EXCEPTIONS: Final = frozenset({10, 11})
_READ_FUNCTION: Final[Mapping[RegisterTable, int]] = {
    RegisterTable.COIL: FC_READ_COILS,
    RegisterTable.DISCRETE_INPUT: FC_READ_DISCRETE_INPUTS,
    RegisterTable.HOLDING: FC_READ_HOLDING_REGISTERS,
    RegisterTable.INPUT: FC_READ_INPUT_REGISTERS,
}
"""Function code of the block read of each table."""

_T = TypeVar("_T")


def describe_exception(code: int) -> str:
    """Return how an operator reads a Modbus exception code.

    >>> describe_exception(2)
    'exception 2: illegal data address'
    >>> describe_exception(99)
    'exception 99: unknown exception code'
    """
    return f"exception {code}: {_EXCEPTION_NAMES.get(code, 'unknown exception code')}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusPointSpec:
    """One point as the driver sees it: where it lives, how to scale it, whether it may be written."""

    point: PointId
    config: ModbusPointConfig
    scale: float = 1.0
    """Engineering value = raw value x scale + offset."""
    offset: float = 0.0
    writable: bool = False

    def __post_init__(self) -> None:
        if self.scale == 0:
            raise ValueError(f"{self.point}: scale must not be 0")
        if self.writable and not self.config.table.is_writable:
            raise ValueError(f"{self.point}: the {self.config.table.value} table cannot be written")


class ModbusDriver:
    """Talk to one Modbus TCP device (one unit id): block reads, single writes, read-back."""

    __slots__ = (
        "_clock",
        "_config",
        "_connection",
        "_device",
        "_last_request_end_s",
        "_lock",
        "_plans",
        "_specs",
    )

    def __init__(
        self,
        device: str,
        config: ModbusDeviceConfig,
        points: Sequence[ModbusPointSpec],
        *,
        clock: Clock,
    ) -> None:
        self._device = DeviceId(device)
        self._config = config
        self._clock = clock
        self._specs = index_points(device, points)
        blocks = compile_blocks(
            ((s.point, s.config) for s in points),
            max_block_registers=config.max_block_registers,
            max_gap_registers=config.max_gap_registers,
        )
        self._plans = [_BlockPlan(block, self._specs) for block in blocks]
        self._connection: ModbusConnection | None = None
        self._lock = asyncio.Lock()  # one request at a time: pacing and the drop-on-timeout rule need it
        self._last_request_end_s = -math.inf

    @property
    def device(self) -> DeviceId:
        """Return the id of the device this driver talks to."""
        return self._device

    @property
    def acquisition(self) -> Acquisition:
        """Return POLL: Modbus devices answer requests and never push."""
        return Acquisition.POLL

    @property
    def points(self) -> tuple[PointId, ...]:
        """Return the ids of every configured point, in configuration order."""
        return tuple(self._specs)

    @property
    def blocks(self) -> tuple[ReadBlock[PointId], ...]:
        """Return the block reads one :meth:`read` issues (after any splits)."""
        return tuple(plan.block for plan in self._plans)

    @property
    def connected(self) -> bool:
        """Return True while a connection is open."""
        return self._connection is not None and self._connection.connected

    def __repr__(self) -> str:
        cfg = self._config
        return f"ModbusDriver({self._device!r}, {cfg.host}:{cfg.port} unit {cfg.unit_id})"

    # ----------------------------------------------------------------------------------------------
    # Driver protocol

    async def connect(self) -> None:
        """Open the TCP connection; raise :class:`DeviceUnavailable` if it cannot be opened in time."""
        if self.connected:
            return
        self._drop()
        cfg = self._config
        try:
            self._connection = await open_connection(cfg.host, cfg.port, timeout_s=cfg.timeout_s)
        except TimeoutError as err:
            raise DeviceUnavailable(
                f"{self._device}: cannot connect to {cfg.host}:{cfg.port} within {cfg.timeout_s:g} s"
            ) from err
        except OSError as err:
            raise DeviceUnavailable(
                f"{self._device}: cannot connect to {cfg.host}:{cfg.port}: {err.strerror or err}"
            ) from err
        _LOGGER.debug("%s: connected to %s:%s", self._device, cfg.host, cfg.port)

    async def read(self) -> list[Reading]:
        """Read every configured point once, one request per block; return one reading per point.

        All readings of one call carry the clock's time at the start of the call, so one poll is
        one instant downstream.
        """
        ts = self._clock.now()
        results: dict[PointId, Reading] = {}
        pending = self._plans
        index = 0
        while index < len(pending):
            plan = pending[index]
            block = plan.block
            if plan.fields:  # register table: decode straight from the answer's bytes
                answer: bytes | tuple[int, ...] | int = await self._read_registers(plan)
            else:
                answer = await self._read_block(block)
            if isinstance(answer, int):
                if answer == _ILLEGAL_DATA_ADDRESS and len(block.members) > 1:
                    parts = self._split(plan)
                    pending = [*pending[:index], *parts, *pending[index + 1 :]]
                    continue
                quality = Quality.bad(describe_exception(answer))
                for point, _ in block.members:
                    results[point] = Reading(point=point, ts=ts, value=None, quality=quality)
            elif isinstance(answer, bytes):
                for point, decode, start in plan.fields:
                    results[point] = _reading(point, decode(answer, start), ts)
            else:
                for point, config in block.members:
                    spec = self._specs[point]
                    value = decode_point(
                        block.words_of(config, answer), config, scale=spec.scale, offset=spec.offset
                    )
                    results[point] = _reading(point, value, ts)
            index += 1
        return [results[point] for point in self._specs]

    async def write(
        self, point: PointId, value: float, *, correlation_id: str = "", hold_until: datetime | None = None
    ) -> None:
        """Encode ``value`` and write it: FC 5 for a coil, FC 6 for one register, FC 16 for more.

        The device's echo of the request is its acknowledgement; Modbus carries no correlation id,
        so ``correlation_id`` is ignored.
        """
        del correlation_id
        spec = self._spec(point)
        if not spec.writable:
            raise PointRejected(f"{point}: the point is not writable")
        config = spec.config
        try:
            words = encode_point(value, config, scale=spec.scale, offset=spec.offset)
        except EncodeError as err:
            raise PointRejected(f"{point}: cannot write {value!r}: {err}") from err
        if config.table is RegisterTable.COIL:
            function = FC_WRITE_SINGLE_COIL
        elif len(words) == 1:
            function = FC_WRITE_SINGLE_REGISTER
        else:
            function = FC_WRITE_MULTIPLE_REGISTERS
        unit, address = self._config.unit_id, config.address
        call: Callable[[ModbusConnection], Awaitable[None]]
        if function == FC_WRITE_SINGLE_COIL:
            call = lambda c: c.write_coil(unit, address, on=bool(words[0]))  # noqa: E731
        elif function == FC_WRITE_SINGLE_REGISTER:
            call = lambda c: c.write_register(unit, address, words[0])  # noqa: E731
        else:
            call = lambda c: c.write_registers(unit, address, words)  # noqa: E731
        try:
            await self._request(f"write of {point}", call)
        except ExceptionResponse as err:
            raise DeviceProtocolError(
                f"{self._device}: write of {point} refused: {describe_exception(err.code)}"
            ) from err

    async def read_back(self, point: PointId) -> float:
        """Read just one point and return its engineering value, to verify a write.

        Raises :class:`DeviceProtocolError` if the device refuses the read or sends NaN/inf.
        """
        spec = self._spec(point)
        config = spec.config
        block = ReadBlock(
            table=config.table,
            address=config.address,
            count=config.type.register_count,
            members=((point, config),),
        )
        answer = await self._read_block(block)
        if isinstance(answer, int):
            raise DeviceProtocolError(
                f"{self._device}: read-back of {point} refused: {describe_exception(answer)}"
            )
        value = decode_point(block.words_of(config, answer), config, scale=spec.scale, offset=spec.offset)
        if not math.isfinite(value):
            raise DeviceProtocolError(f"{self._device}: read-back of {point} gave {value}")
        return value

    async def close(self) -> None:
        """Close the connection; safe to call at any time, any number of times."""
        self._drop()

    # ----------------------------------------------------------------------------------------------
    # Internals

    def _spec(self, point: PointId) -> ModbusPointSpec:
        return lookup_point(self._device, self._specs, point)

    def _drop(self) -> None:
        """Forget the connection (closing is synchronous and idempotent)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    async def _request(
        self, what: str | ReadBlock[PointId], call: Callable[[ModbusConnection], Awaitable[_T]]
    ) -> _T:
        """Run one request after the configured gap; return what the connection returned.

        This is the one place where transport and socket errors become kernel errors (with
        ``from``). An exception response is raised as :class:`ExceptionResponse` once the gateway
        codes are mapped; the caller decides what it means. A cancellation is never swallowed: the
        transport awaits a bare future, not ``asyncio.wait_for`` (which on Python 3.11 drops a
        cancel that lands in the same loop turn as the answer, CPython gh-86296).
        """
        async with self._lock:
            connection = self._connection
            if connection is None or not connection.connected:
                self._drop()
                raise DeviceUnavailable(f"{self._device}: not connected")
            gap_s = self._config.inter_request_gap_s
            if gap_s > 0:
                wait_s = self._last_request_end_s + gap_s - asyncio.get_running_loop().time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
            try:
                answer = await call(connection)
            except ExceptionResponse as err:
                if err.code in _GATEWAY_EXCEPTIONS:
                    raise DeviceUnavailable(
                        f"{self._device}: {_describe(what)}: {describe_exception(err.code)}"
                    ) from err
                raise
            except (TimeoutError, ConnectionClosed, FrameError, OSError) as err:
                raise self._translate(err, what) from err
            finally:
                if gap_s > 0:
                    self._last_request_end_s = asyncio.get_running_loop().time()
        return answer

    def _translate(self, err: Exception, what: str | ReadBlock[PointId]) -> DeviceError:
        """Map a transport or socket error to the kernel's tree; drop the connection it broke."""
        self._drop()
        device, action = self._device, _describe(what)
        if isinstance(err, TimeoutError):
            return DeviceUnavailable(f"{device}: no answer to {action} within {self._config.timeout_s:g} s")
        if isinstance(err, FrameError):  # the stream is out of step with our requests: start again
            return DeviceProtocolError(f"{device}: bad answer to {action}: {err}")
        if isinstance(err, ConnectionClosed):
            return DeviceUnavailable(f"{device}: connection lost during {action}: {err}")
        strerror = err.strerror if isinstance(err, OSError) else None
        return DeviceUnavailable(f"{device}: {action} failed: {strerror or err}")

    async def _read_block(self, block: ReadBlock[PointId]) -> tuple[int, ...] | int:
        """Return the block's registers (bits as 0/1), or the exception code the device answered."""
        unit, function, address, count = (
            self._config.unit_id,
            _READ_FUNCTION[block.table],
            block.address,
            block.count,
        )
        try:
            return await self._request(block, lambda c: c.read(unit, function, address, count))
        except ExceptionResponse as err:
            return err.code

    async def _read_registers(self, plan: _BlockPlan) -> bytes | int:
        """Return a register block's bytes as sent, or the exception code the device answered."""
        block, unit = plan.block, self._config.unit_id
        try:
            return await self._request(
                block, lambda c: c.read_raw(unit, plan.function, block.address, block.count)
            )
        except ExceptionResponse as err:
            return err.code

    def _split(self, plan: _BlockPlan) -> list[_BlockPlan]:
        """Replace a refused block by one read per point, for this and every later poll."""
        block = plan.block
        parts = [
            _BlockPlan(
                ReadBlock(table=c.table, address=c.address, count=c.type.register_count, members=((p, c),)),
                self._specs,
            )
            for p, c in block.members
        ]
        if plan in self._plans:  # a concurrent read may have split it already
            index = self._plans.index(plan)
            self._plans[index : index + 1] = parts
        _LOGGER.info(
            "%s: device refused the block read %s (exception 2); reading its %d points one by one",
            self._device,
            block,
            len(parts),
        )
        return parts


class _BlockPlan:
    """One block read and, for register tables, how to decode each point from the answer's bytes."""

    __slots__ = ("block", "fields", "function")

    def __init__(self, block: ReadBlock[PointId], specs: Mapping[PointId, ModbusPointSpec]) -> None:
        self.block = block
        self.function = _READ_FUNCTION[block.table]
        self.fields: tuple[tuple[PointId, PointDecoder, int], ...] = ()
        """(point, shared decoder, byte offset in the answer); empty for bit tables."""
        if not block.table.is_bit:
            self.fields = tuple(
                (
                    point,
                    compile_decoder(
                        config.type,
                        config.word_order,
                        config.byte_order,
                        specs[point].scale,
                        specs[point].offset,
                    ),
                    2 * (config.address - block.address),
                )
                for point, config in block.members
            )


def _reading(point: PointId, value: float, ts: datetime) -> Reading:
    """Return a good reading, or a bad one when a float register holds NaN or inf."""
    if math.isfinite(value):
        return Reading(point=point, ts=ts, value=value)
    return Reading(point=point, ts=ts, value=None, quality=Quality.bad(f"device sent {value} (not a number)"))


def _describe(what: str | ReadBlock[PointId]) -> str:
    """Name a request in an error message; built only when there is an error to report."""
    return what if isinstance(what, str) else f"read of {what}"
