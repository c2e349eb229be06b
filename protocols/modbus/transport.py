"""Lean Modbus TCP client transport: MBAP framing on ``asyncio.Protocol``, one request in flight.

Why not a library client on the hot path: a gateway process polls thousands of devices once a
second, so the cost of one request is paid ten thousand times a second. pymodbus' client runs a
framer, a transaction manager, a response ``Task`` and ``asyncio.wait_for`` per request; this
transport does what a poll needs and no more:

- **One request in flight per connection.** Devices are serial at heart, and the driver serialises
  requests anyway (pacing, drop-on-timeout), so there is no transaction table: the connection
  remembers the one answer it waits for (transaction id, unit id, function code, answer length).
- **One waiter per request.** The only objects a request makes are its frame, one ``Future`` (the
  cheapest thing a coroutine can wait on in asyncio) and one timer handle; ``asyncio.wait_for`` and
  its task are not used, so a cancellation is never swallowed (CPython gh-86296).
- **Small state.** ``__slots__`` everywhere; the receive buffer is only used when a frame arrives in
  pieces; a frame that arrives whole is parsed straight from the bytes the loop hands over.

Strict validation. Anything that is not the exact answer to the outstanding request closes the
connection and fails the request with :class:`FrameError`, because after it the byte stream cannot
be trusted to line up with requests any more:

- MBAP protocol id other than 0, or a length field outside 2..254;
- a transaction id nobody waits for (except the late answer to a request whose caller was
  cancelled: that one is expected and dropped silently);
- a unit id or function code other than the request's;
- a read answer whose byte count or length does not match the quantity asked for, a write answer
  that does not echo the request's address (and quantity, for FC 15/16). The value a single
  write echoes is not checked: devices that clamp a setpoint echo what they took, and the
  command path's read-back is what judges it.

An exception response (function code | 0x80, one exception code) is a valid answer: it fails the
request with :class:`ExceptionResponse` and leaves the connection open. When ``timeout_s`` passes
without an answer the connection is closed (a late answer must never be taken for the next one's)
and the request fails with ``TimeoutError``. A lost connection fails it with
:class:`ConnectionClosed`. The driver maps these to the kernel's error tree in one place.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Final, cast

__all__ = [
    "FC_READ_COILS",
    "FC_READ_DISCRETE_INPUTS",
    "FC_READ_HOLDING_REGISTERS",
    "FC_READ_INPUT_REGISTERS",
    "FC_WRITE_MULTIPLE_COILS",
    "FC_WRITE_MULTIPLE_REGISTERS",
    "FC_WRITE_SINGLE_COIL",
    "FC_WRITE_SINGLE_REGISTER",
    "ConnectionClosed",
    "ExceptionResponse",
    "FrameError",
    "ModbusConnection",
    "ModbusTransportError",
    "open_connection",
]

FC_READ_COILS: Final = 1
FC_READ_DISCRETE_INPUTS: Final = 2
FC_READ_HOLDING_REGISTERS: Final = 3
FC_READ_INPUT_REGISTERS: Final = 4
FC_WRITE_SINGLE_COIL: Final = 5
FC_WRITE_SINGLE_REGISTER: Final = 6
FC_WRITE_MULTIPLE_COILS: Final = 15
FC_WRITE_MULTIPLE_REGISTERS: Final = 16

_MBAP: Final = struct.Struct(">HHHB")
"""Transaction id, protocol id (0), length (unit id + PDU), unit id."""
_MBAP_SIZE: Final = 7
_MIN_LENGTH: Final = 2  # unit id + function code
_MAX_LENGTH: Final = 254  # unit id + the largest PDU (253 bytes)
_REQUEST: Final = struct.Struct(">HHHBBHH")
"""MBAP + function code + address + quantity (or value): every request but FC 15 and 16 has this shape."""
_MAX_READ_REGISTERS: Final = 125
_MAX_READ_BITS: Final = 2000
_MAX_WRITE_REGISTERS: Final = 123
_MAX_WRITE_BITS: Final = 1968
_COIL_ON: Final = 0xFF00
_UNIT_IDS: Final = range(256)
_ADDRESSES: Final = range(65536)


class ModbusTransportError(Exception):
    """Base of the transport's errors; the driver translates them into kernel errors."""


class FrameError(ModbusTransportError):
    """The peer sent something that is not the answer to our request; the connection is closed."""


class ConnectionClosed(ModbusTransportError):
    """The connection is closed (by the peer, by a timeout, by a bad frame, or by us)."""


class ExceptionResponse(ModbusTransportError):
    """The device answered with a Modbus exception response; the connection stays open."""

    def __init__(self, function: int, code: int) -> None:
        super().__init__(f"function {function}: exception {code}")
        self.function = function
        self.code = code


class ModbusConnection(asyncio.Protocol):
    """One Modbus TCP client connection with at most one request in flight.

    Build it with :func:`open_connection`. Every request method raises :class:`ExceptionResponse`,
    :class:`FrameError`, :class:`ConnectionClosed`, ``TimeoutError`` or ``RuntimeError`` (a second
    request while one is in flight: a caller bug, the driver's lock prevents it).
    """

    __slots__ = (
        "_buffer",
        "_closed",
        "_expect_echo",
        "_expect_function",
        "_expect_length",
        "_expect_unit",
        "_late_tid",
        "_loop",
        "_next_tid",
        "_timeout_s",
        "_timer",
        "_transport",
        "_waiter",
        "_waiting_tid",
    )

    def __init__(self, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._closed: str | None = "not connected"
        """Why the connection is closed, or None while it is open."""
        self._buffer: bytearray | None = None  # only while a frame arrives in pieces
        self._next_tid = 0
        self._waiter: asyncio.Future[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_tid = -1
        self._late_tid = -1
        """Transaction id of a request whose caller was cancelled: its answer is dropped quietly."""
        self._expect_unit = 0
        self._expect_function = 0
        self._expect_length = 0
        """Length of the expected answer's PDU (function code included)."""
        self._expect_echo = b""
        """Bytes a write answer must echo: the address (FC 5/6; the value may come back as the
        device took it, e.g. clamped, which the driver's read-back reports), or address and
        quantity (FC 15/16)."""

    # ----------------------------------------------------------------------------------------------
    # Public API

    @property
    def connected(self) -> bool:
        """Return True while the connection is open."""
        return self._closed is None

    def close(self) -> None:
        """Close the connection; an outstanding request fails with :class:`ConnectionClosed`."""
        self._shut("closed by the client", ConnectionClosed)

    async def read(self, unit: int, function: int, address: int, count: int) -> tuple[int, ...]:
        """Read ``count`` registers (FC 3, 4) or bits as 0/1 (FC 1, 2) from ``address``."""
        if function in (FC_READ_COILS, FC_READ_DISCRETE_INPUTS):
            _check(unit, address, count, _MAX_READ_BITS)
            data = await self._read(unit, function, address, count, 2 + (count + 7) // 8)
            return tuple((byte >> i) & 1 for byte in data for i in range(8))[:count]
        data = await self.read_raw(unit, function, address, count)
        return struct.unpack(f">{count}H", data)

    async def read_raw(self, unit: int, function: int, address: int, count: int) -> bytes:
        """Read ``count`` registers (FC 3, 4); return their bytes as sent (big-endian words).

        The driver decodes points straight from these bytes (:func:`codec.compile_decoder`).
        """
        if function not in (FC_READ_HOLDING_REGISTERS, FC_READ_INPUT_REGISTERS):
            raise ValueError(f"function {function} is not a register read")
        _check(unit, address, count, _MAX_READ_REGISTERS)
        return await self._read(unit, function, address, count, 2 + 2 * count)

    async def _read(self, unit: int, function: int, address: int, count: int, answer_length: int) -> bytes:
        tid = self._take_tid()
        frame = _REQUEST.pack(tid, 0, 6, unit, function, address, count)
        return await self._exchange(
            frame, tid=tid, unit=unit, function=function, answer_length=answer_length, echo=b""
        )

    async def write_coil(self, unit: int, address: int, on: bool) -> None:
        """Write one coil (FC 5)."""
        _check(unit, address, 1, 1)
        tid = self._take_tid()
        frame = _REQUEST.pack(tid, 0, 6, unit, FC_WRITE_SINGLE_COIL, address, _COIL_ON if on else 0)
        await self._exchange(
            frame, tid=tid, unit=unit, function=FC_WRITE_SINGLE_COIL, answer_length=5, echo=frame[8:10]
        )

    async def write_register(self, unit: int, address: int, value: int) -> None:
        """Write one holding register (FC 6)."""
        _check(unit, address, 1, 1)
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"register value {value} is not 16-bit unsigned")
        tid = self._take_tid()
        frame = _REQUEST.pack(tid, 0, 6, unit, FC_WRITE_SINGLE_REGISTER, address, value)
        await self._exchange(
            frame, tid=tid, unit=unit, function=FC_WRITE_SINGLE_REGISTER, answer_length=5, echo=frame[8:10]
        )

    async def write_coils(self, unit: int, address: int, bits: Sequence[bool | int]) -> None:
        """Write consecutive coils (FC 15)."""
        count = len(bits)
        _check(unit, address, count, _MAX_WRITE_BITS)
        packed = bytearray((count + 7) // 8)
        for i, bit in enumerate(bits):
            if bit:
                packed[i >> 3] |= 1 << (i & 7)
        await self._write_multiple(unit, FC_WRITE_MULTIPLE_COILS, address, count, bytes(packed))

    async def write_registers(self, unit: int, address: int, values: Sequence[int]) -> None:
        """Write consecutive holding registers (FC 16)."""
        count = len(values)
        _check(unit, address, count, _MAX_WRITE_REGISTERS)
        try:
            payload = struct.pack(f">{count}H", *values)
        except struct.error as err:
            raise ValueError(f"register values must be 16-bit unsigned: {err}") from None
        await self._write_multiple(unit, FC_WRITE_MULTIPLE_REGISTERS, address, count, payload)

    # ----------------------------------------------------------------------------------------------
    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport; the connection is open."""
        # A stream transport (uvloop's is not registered as an asyncio.Transport subclass).
        self._transport = cast("asyncio.Transport", transport)
        self._closed = None

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the outstanding request: the peer or the network closed the connection."""
        reason = f"connection lost: {exc}" if exc is not None else "connection closed by the device"
        self._shut(reason, ConnectionClosed)

    def data_received(self, data: bytes) -> None:
        """Parse every complete frame; keep a partial one until the rest arrives."""
        if self._closed is not None:
            return
        buffer = self._buffer
        if buffer is None:
            # Fast path: most answers arrive whole, in one segment, and are parsed in place.
            if len(data) >= _MBAP_SIZE and len(data) == _MBAP_SIZE - 1 + _length_of(data):
                if self._header_ok(data):
                    self._frame(data)
                return
            buffer = self._buffer = bytearray(data)
        else:
            buffer += data
        while len(buffer) >= _MBAP_SIZE:
            if not self._header_ok(buffer):
                return
            end = _MBAP_SIZE - 1 + _length_of(buffer)
            if len(buffer) < end:
                return  # wait for the rest of the frame
            frame = bytes(buffer[:end])
            del buffer[:end]
            self._frame(frame)
            if not self.connected:  # the frame was bad: the buffer is gone with the connection
                return
        if not buffer:
            self._buffer = None

    def eof_received(self) -> bool:
        """Let the transport close: a device that half-closes will not answer any more."""
        return False

    # ----------------------------------------------------------------------------------------------
    # Internals

    def _take_tid(self) -> int:
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        if self._waiter is not None:
            raise RuntimeError("a request is already in flight on this connection")
        tid = self._next_tid = (self._next_tid + 1) & 0xFFFF
        return tid

    async def _write_multiple(self, unit: int, function: int, address: int, count: int, data: bytes) -> None:
        tid = self._take_tid()
        head = struct.pack(">HHHBBHHB", tid, 0, 7 + len(data), unit, function, address, count, len(data))
        await self._exchange(
            head + data, tid=tid, unit=unit, function=function, answer_length=5, echo=head[8:12]
        )

    async def _exchange(
        self, frame: bytes, *, tid: int, unit: int, function: int, answer_length: int, echo: bytes
    ) -> bytes:
        """Send one frame and wait for its answer, its exception response, a timeout or a close."""
        transport = self._transport
        assert transport is not None
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        self._waiter = waiter
        self._waiting_tid = tid
        self._expect_unit, self._expect_function = unit, function
        self._expect_length, self._expect_echo = answer_length, echo
        self._timer = self._loop.call_at(self._loop.time() + self._timeout_s, self._expire)
        transport.write(frame)
        try:
            return await waiter
        except asyncio.CancelledError:
            if self._waiter is waiter:  # the answer may still come: drop it when it does
                self._late_tid = tid
                self._settle()
            raise

    def _settle(self) -> None:
        """Forget the outstanding request (its waiter has its outcome, or nobody waits any more)."""
        self._waiter = None
        self._waiting_tid = -1
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _expire(self) -> None:
        self._timer = None
        self._shut(f"no answer within {self._timeout_s:g} s", TimeoutError)

    def _shut(self, reason: str, error: type[Exception]) -> None:
        """Close for good and fail the outstanding request with ``error(reason)``."""
        if self._closed is None:
            self._closed = reason
        self._buffer = None
        waiter = self._waiter
        self._settle()
        if waiter is not None and not waiter.done():
            waiter.set_exception(error(reason))
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()  # nothing of ours is worth flushing; free the socket now

    def _header_ok(self, frame: bytes | bytearray) -> bool:
        """Check the MBAP protocol id and length; on a bad one, shut the connection."""
        protocol_id, length = (frame[2] << 8) | frame[3], (frame[4] << 8) | frame[5]
        if protocol_id != 0:
            self._shut(f"bad MBAP protocol id {protocol_id}", FrameError)
            return False
        if not _MIN_LENGTH <= length <= _MAX_LENGTH:
            self._shut(f"bad MBAP length {length}", FrameError)
            return False
        return True

    def _frame(self, frame: bytes) -> None:
        """Handle one complete frame whose MBAP header is checked."""
        tid, _protocol_id, length, unit = _MBAP.unpack_from(frame)
        waiter = self._waiter
        if waiter is not None and waiter.done():
            # The caller was cancelled and has not resumed yet: its request is over. Treat this
            # frame as what it most likely is, that request's late answer.
            self._late_tid = self._waiting_tid
            self._settle()
            waiter = None
        if waiter is None or tid != self._waiting_tid:
            if tid == self._late_tid:
                self._late_tid = -1  # the answer to a cancelled request: expected, ignored
                return
            self._shut(f"answer with unknown transaction id {tid}", FrameError)
            return
        try:
            result = self._answer(frame, length, unit)
        except FrameError as err:
            self._shut(str(err), FrameError)
            return
        self._settle()
        if isinstance(result, ExceptionResponse):
            waiter.set_exception(result)
        else:
            waiter.set_result(result)

    def _answer(self, frame: bytes, length: int, unit: int) -> bytes | ExceptionResponse:
        """Check a frame against the outstanding request; return its data bytes or exception response."""
        function, expected = frame[7], self._expect_function
        if unit != self._expect_unit:
            raise FrameError(f"answer from unit {unit} to a request for unit {self._expect_unit}")
        if function == expected | 0x80:
            if length != 3:
                raise FrameError(f"exception response of {length - 1} bytes")
            return ExceptionResponse(expected, frame[8])
        if function != expected:
            raise FrameError(f"answer with function {function} to a request with function {expected}")
        if length - 1 != self._expect_length:
            raise FrameError(
                f"function {function} answer of {length - 1} bytes, expected {self._expect_length}"
            )
        if function <= FC_READ_INPUT_REGISTERS:
            if frame[8] != length - 3:
                raise FrameError(f"byte count {frame[8]} in an answer of {length - 3} data bytes")
            return frame[9:]
        if frame[8 : 8 + len(self._expect_echo)] != self._expect_echo:
            raise FrameError(f"function {function} answer does not echo the request")
        return b""


def _length_of(frame: bytes | bytearray) -> int:
    return (frame[4] << 8) | frame[5]


def _check(unit: int, address: int, count: int, limit: int) -> None:
    if unit not in _UNIT_IDS:
        raise ValueError(f"unit id {unit} is not 0..255")
    if not 1 <= count <= limit:
        raise ValueError(f"quantity {count} is not 1..{limit}")
    if address not in _ADDRESSES or address + count > 65536:
        raise ValueError(f"address {address} (+{count}) is outside 0..65535")


async def open_connection(host: str, port: int, *, timeout_s: float) -> ModbusConnection:
    """Connect to a Modbus TCP device; ``timeout_s`` bounds the connect and every later request.

    Raises ``OSError`` if the connection is refused or unreachable, ``TimeoutError`` if it does not
    open within ``timeout_s``.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        _transport, connection = await loop.create_connection(lambda: ModbusConnection(timeout_s), host, port)
    return connection
