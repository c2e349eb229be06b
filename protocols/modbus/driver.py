"""Modbus TCP driver: translate block reads and single writes into readings; supervise nothing.

The driver implements :class:`scada.model.Driver`. It never retries and never reconnects: pymodbus'
own reconnect and retry machinery is switched off, and every failure is raised as a kernel error so
the device's session decides when to try again (STYLE.md: drivers translate, sessions supervise).

Error and quality mapping
-------------------------
::

    cannot connect, connection lost, no answer within timeout_s      -> DeviceUnavailable
    gateway exception 10 or 11 (target device does not answer)      -> DeviceUnavailable
    answer with the wrong function code or register count           -> DeviceProtocolError
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
import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from protocols.modbus.codec import EncodeError, ReadBlock, compile_blocks, decode_point, encode_point
from protocols.modbus.config import ModbusDeviceConfig, ModbusPointConfig, RegisterTable
from scada.model import (
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
_READERS: Final[Mapping[RegisterTable, tuple[int, Callable[..., Awaitable[ModbusPDU]]]]] = {
    RegisterTable.COIL: (1, AsyncModbusTcpClient.read_coils),
    RegisterTable.DISCRETE_INPUT: (2, AsyncModbusTcpClient.read_discrete_inputs),
    RegisterTable.HOLDING: (3, AsyncModbusTcpClient.read_holding_registers),
    RegisterTable.INPUT: (4, AsyncModbusTcpClient.read_input_registers),
}
"""Function code and client method of the block read for each table."""
_LIBRARY_TIMEOUT_MARGIN_S: Final = 1.0
"""pymodbus' own timeout is set this much longer than ours, so ``asyncio.timeout`` always decides."""

_Call = Callable[[AsyncModbusTcpClient], Awaitable[ModbusPDU]]


def describe_exception(code: int) -> str:
    """Return how an operator reads a Modbus exception code.

    >>> describe_exception(2)
    'exception 2: illegal data address'
    >>> describe_exception(99)
    'exception 99: unknown exception code'
    """
    return f"exception {code}: {_EXCEPTION_NAMES.get(code, 'unknown exception code')}"


class PointRejected(DeviceError):
    """The request names a point this driver does not serve or a value the point cannot take.

    Raised before anything is sent, so the device is not to blame and stays online.
    """


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
        self._specs: dict[PointId, ModbusPointSpec] = {}
        for spec in points:
            if spec.point in self._specs:
                raise ValueError(f"{device}: point {spec.point} is configured twice")
            self._specs[spec.point] = spec
        self._blocks: list[ReadBlock[PointId]] = compile_blocks(
            ((s.point, s.config) for s in points),
            max_block_registers=config.max_block_registers,
            max_gap_registers=config.max_gap_registers,
        )
        self._client: AsyncModbusTcpClient | None = None
        self._lock = asyncio.Lock()  # one request at a time: pacing and the drop-on-timeout rule need it
        self._last_request_end_s = -math.inf

    @property
    def device(self) -> DeviceId:
        """Return the id of the device this driver talks to."""
        return self._device

    @property
    def points(self) -> tuple[PointId, ...]:
        """Return the ids of every configured point, in configuration order."""
        return tuple(self._specs)

    @property
    def blocks(self) -> tuple[ReadBlock[PointId], ...]:
        """Return the block reads one :meth:`read` issues (after any splits)."""
        return tuple(self._blocks)

    @property
    def connected(self) -> bool:
        """Return True while a connection is open."""
        return self._client is not None and self._client.connected

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
        client = AsyncModbusTcpClient(
            cfg.host,
            port=cfg.port,
            name=f"modbus:{self._device}",
            reconnect_delay=0,  # 0 disables pymodbus' reconnect task: the session owns reconnects
            reconnect_delay_max=0,
            timeout=cfg.timeout_s + _LIBRARY_TIMEOUT_MARGIN_S,
            retries=0,  # the session owns retries too; two retry loops are a bug
        )
        self._client = client
        async with self._exchange(f"connect to {cfg.host}:{cfg.port}"):
            opened = await client.connect()
        if not opened:
            self._drop()
            raise DeviceUnavailable(f"{self._device}: cannot connect to {cfg.host}:{cfg.port}")
        _LOGGER.debug("%s: connected to %s:%s", self._device, cfg.host, cfg.port)

    async def read(self) -> list[Reading]:
        """Read every configured point once, one request per block; return one reading per point.

        All readings of one call carry the clock's time at the start of the call, so one poll is
        one instant downstream.
        """
        ts = self._clock.now()
        results: dict[PointId, Reading] = {}
        pending = deque(self._blocks)
        while pending:
            block = pending.popleft()
            answer = await self._read_block(block)
            if isinstance(answer, int):
                if answer == _ILLEGAL_DATA_ADDRESS and len(block.members) > 1:
                    pending.extendleft(reversed(self._split(block)))
                    continue
                quality = Quality.bad(describe_exception(answer))
                for point, _ in block.members:
                    results[point] = Reading(point=point, ts=ts, value=None, quality=quality)
                continue
            for point, config in block.members:
                results[point] = self._decode(point, block.words_of(config, answer), ts)
        return [results[point] for point in self._specs]

    async def write(self, point: PointId, value: float) -> None:
        """Encode ``value`` and write it: FC 5 for a coil, FC 6 for one register, FC 16 for more."""
        spec = self._spec(point)
        if not spec.writable:
            raise PointRejected(f"{point}: the point is not writable")
        config = spec.config
        try:
            words = encode_point(value, config, scale=spec.scale, offset=spec.offset)
        except EncodeError as err:
            raise PointRejected(f"{point}: cannot write {value!r}: {err}") from err
        unit, address, what = self._config.unit_id, config.address, f"write of {point}"
        if config.table is RegisterTable.COIL:
            response = await self._request(
                what, 5, lambda c: c.write_coil(address, bool(words[0]), device_id=unit)
            )
        elif len(words) == 1:
            response = await self._request(
                what, 6, lambda c: c.write_register(address, words[0], device_id=unit)
            )
        else:
            response = await self._request(
                what, 16, lambda c: c.write_registers(address, words, device_id=unit)
            )
        if response.isError():
            raise DeviceProtocolError(
                f"{self._device}: write of {point} refused: {describe_exception(response.exception_code)}"
            )

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
        try:
            return self._specs[point]
        except KeyError:
            raise PointRejected(f"{point}: not a point of device {self._device}") from None

    def _drop(self) -> None:
        """Forget the connection (pymodbus' close is synchronous and idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    @contextlib.asynccontextmanager
    async def _exchange(self, what: str) -> AsyncIterator[None]:
        """Bound one exchange by ``timeout_s`` and map library and socket errors to the kernel's.

        It also restores a cancellation that pymodbus swallowed. pymodbus awaits
        ``asyncio.wait_for``, which on Python 3.11 returns the result when the answer arrives in the
        same loop turn as a ``cancel()`` (CPython gh-86296). The cancelled session would then poll
        on forever. The task's ``cancelling()`` count still shows the lost request, so we raise it
        again.
        """
        device, timeout_s = self._device, self._config.timeout_s
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(timeout_s):
                yield
        except TimeoutError as err:
            self._drop()
            raise DeviceUnavailable(f"{device}: no answer to {what} within {timeout_s:g} s") from err
        except ConnectionException as err:
            self._drop()
            raise DeviceUnavailable(f"{device}: connection lost during {what}") from err
        except ModbusIOException as err:
            self._drop()  # the stream is out of step with our requests: start again on a new one
            raise DeviceProtocolError(f"{device}: bad answer to {what}: {err}") from err
        except ModbusException as err:
            raise DeviceProtocolError(f"{device}: {what} failed: {err}") from err
        except OSError as err:
            self._drop()
            raise DeviceUnavailable(f"{device}: {what} failed: {err.strerror or err}") from err
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError

    async def _request(self, what: str, function: int, call: _Call) -> ModbusPDU:
        """Send one request after the configured gap; return the answer or its exception response."""
        async with self._lock:
            client = self._client
            if client is None or not client.connected:
                self._drop()
                raise DeviceUnavailable(f"{self._device}: not connected")
            loop = asyncio.get_running_loop()
            wait_s = self._last_request_end_s + self._config.inter_request_gap_s - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            try:
                async with self._exchange(what):
                    response = await call(client)
            finally:
                self._last_request_end_s = loop.time()
        if (response.function_code & 0x7F) != function:
            raise DeviceProtocolError(
                f"{self._device}: {what}: expected function {function}, got {response.function_code}"
            )
        if response.isError() and response.exception_code in _GATEWAY_EXCEPTIONS:
            raise DeviceUnavailable(f"{self._device}: {what}: {describe_exception(response.exception_code)}")
        return response

    async def _read_block(self, block: ReadBlock[PointId]) -> Sequence[int] | int:
        """Return the block's registers (bits as 0/1), or the exception code the device answered."""
        unit, address, count = self._config.unit_id, block.address, block.count
        function, reader = _READERS[block.table]
        response = await self._request(
            f"read of {block}", function, lambda c: reader(c, address, count=count, device_id=unit)
        )
        if response.isError():
            return response.exception_code
        if block.table.is_bit:
            if len(response.bits) < count:  # bits come padded to whole bytes
                raise DeviceProtocolError(f"{self._device}: read of {block}: got {len(response.bits)} bits")
            return [1 if bit else 0 for bit in response.bits[:count]]
        if len(response.registers) != count:
            raise DeviceProtocolError(
                f"{self._device}: read of {block}: got {len(response.registers)} registers, expected {count}"
            )
        return response.registers

    def _split(self, block: ReadBlock[PointId]) -> list[ReadBlock[PointId]]:
        """Replace a refused block by one read per point, for this and every later poll."""
        parts = [
            ReadBlock(table=c.table, address=c.address, count=c.type.register_count, members=((p, c),))
            for p, c in block.members
        ]
        if block in self._blocks:  # a concurrent read may have split it already
            index = self._blocks.index(block)
            self._blocks[index : index + 1] = parts
        _LOGGER.info(
            "%s: device refused the block read %s (exception 2); reading its %d points one by one",
            self._device,
            block,
            len(parts),
        )
        return parts

    def _decode(self, point: PointId, words: Sequence[int], ts: datetime) -> Reading:
        spec = self._specs[point]
        value = decode_point(words, spec.config, scale=spec.scale, offset=spec.offset)
        if math.isfinite(value):
            return Reading(point=point, ts=ts, value=value)
        return Reading(
            point=point, ts=ts, value=None, quality=Quality.bad(f"device sent {value} (not a number)")
        )
