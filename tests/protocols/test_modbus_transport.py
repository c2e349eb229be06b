"""The lean Modbus TCP client transport over real sockets: a real device server, and scripted peers
that split, merge, corrupt or withhold answers byte by byte."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest

from protocols.modbus.transport import (
    ConnectionClosed,
    ExceptionResponse,
    FrameError,
    ModbusConnection,
    open_connection,
)
from scada.config import parse_site
from simulators.plant import SimulatedPlant

# A scripted peer gets each request frame and returns the chunks to send back (each chunk is one
# write to the socket, with a short pause between chunks so they arrive as separate segments).
Script = Callable[[bytes], Awaitable[list[bytes]]]


class ScriptedDevice:
    """A TCP server on a free port that answers every request frame as its script says."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.hung_up = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> ScriptedDevice:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for writer in self._writers:
            writer.close()  # the handlers see EOF and end on their own
        self._server.close()
        await self._server.wait_closed()
        for _ in range(10):
            await asyncio.sleep(0)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                header = await reader.readexactly(6)
                frame = header + await reader.readexactly(struct.unpack(">H", header[4:])[0])
                self.requests.append(frame)
                for i, chunk in enumerate(await self.script(frame)):
                    if i:
                        await asyncio.sleep(0.01)
                    writer.write(chunk)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)
            self.hung_up.set()


def answer(request: bytes, pdu: bytes, *, tid: int | None = None, protocol_id: int = 0) -> bytes:
    """Frame ``pdu`` as the answer to ``request`` (same transaction and unit id unless told)."""
    req_tid, _, _, unit = struct.unpack(">HHHB", request[:7])
    return struct.pack(">HHHB", req_tid if tid is None else tid, protocol_id, len(pdu) + 1, unit) + pdu


def registers_pdu(request: bytes, values: list[int]) -> bytes:
    return bytes([request[7], 2 * len(values)]) + struct.pack(f">{len(values)}H", *values)


async def echo_registers(request: bytes) -> list[bytes]:
    """A well-behaved device: register n holds 100 + n; writes are echoed."""
    function, address, count = request[7], *struct.unpack(">HH", request[8:12])
    if function in (3, 4):
        return [answer(request, registers_pdu(request, [100 + address + i for i in range(count)]))]
    return [answer(request, request[7:12])]


@pytest.fixture
async def device() -> AsyncIterator[ScriptedDevice]:
    async with ScriptedDevice(echo_registers) as server:
        yield server


async def connect(port: int, timeout_s: float = 1.0) -> ModbusConnection:
    return await open_connection("127.0.0.1", port, timeout_s=timeout_s)


async def test_read_sends_an_exact_mbap_frame_and_decodes_the_answer(device: ScriptedDevice) -> None:
    connection = await connect(device.port)
    try:
        assert await connection.read(7, 3, 10, 3) == (110, 111, 112)
        assert await connection.read(7, 4, 0, 1) == (100,)
        assert device.requests == [
            bytes.fromhex("0001 0000 0006 07 03 000a 0003"),
            bytes.fromhex("0002 0000 0006 07 04 0000 0001"),
        ]
    finally:
        connection.close()


async def test_write_requests_are_encoded_as_the_specification_says(device: ScriptedDevice) -> None:
    connection = await connect(device.port)
    try:
        await connection.write_coil(1, 19, on=True)
        await connection.write_register(1, 1, 0x0003)
        await connection.write_coils(1, 19, [1, 0, 1, 1, 0, 0, 1, 1, 1, 0])
        await connection.write_registers(1, 1, [0x000A, 0x0102])
    finally:
        connection.close()
    assert device.requests == [
        bytes.fromhex("0001 0000 0006 01 05 0013 ff00"),
        bytes.fromhex("0002 0000 0006 01 06 0001 0003"),
        bytes.fromhex("0003 0000 0009 01 0f 0013 000a 02 cd01"),  # the spec's FC 15 example
        bytes.fromhex("0004 0000 000b 01 10 0001 0002 04 000a 0102"),  # the spec's FC 16 example
    ]


async def test_every_function_against_a_real_device_server(unused_tcp_port: int) -> None:
    site = parse_site(f"""
site: {{id: t, name: T}}
hierarchy: [{{id: g, name: G, level: group}}]
devices:
  - id: box
    node: g
    kind: power_meter
    protocol: modbus_tcp
    modbus: {{host: 127.0.0.1, port: {unused_tcp_port}, unit_id: 3}}
    simulation: {{profile: flat, base_kw: 10, peak_kw: 10, noise_pct: 0, seed: 1}}
    points:
      - {{key: setpoint_kw, kind: setpoint, unit: kW, writable: true, modbus: {{address: 20, type: float32}}}}
      - {{key: power_limit_pct, kind: setpoint, unit: "%", writable: true, modbus: {{address: 22}}}}
      - {{key: frequency_hz, kind: frequency, unit: Hz, scale: 0.01, modbus: {{table: input, address: 5}}}}
      - {{key: relay_on, kind: status, unit: "1", writable: true,
          modbus: {{table: coil, address: 4, type: bool}}}}
      - {{key: breaker_closed, kind: status, unit: "1",
          modbus: {{table: discrete_input, address: 9, type: bool}}}}
""")
    start = datetime(2026, 3, 4, tzinfo=UTC)
    async with SimulatedPlant.from_document(site.model_dump(mode="json"), start=start):
        connection = await connect(unused_tcp_port)
        try:
            await connection.write_registers(3, 20, [0x4148, 0x0000])  # FC 16: 12.5 as float32
            assert await connection.read(3, 3, 20, 2) == (0x4148, 0x0000)  # FC 3
            await connection.write_register(3, 22, 40)  # FC 6
            assert await connection.read(3, 3, 22, 1) == (40,)
            [centihertz] = await connection.read(3, 4, 5, 1)  # FC 4: about 50.00 Hz
            assert 4900 < centihertz < 5100
            await connection.write_coil(3, 4, on=True)  # FC 5
            assert await connection.read(3, 1, 4, 1) == (1,)  # FC 1, sliced from a padded byte
            await connection.write_coils(3, 4, [0])  # FC 15
            assert await connection.read(3, 1, 4, 1) == (0,)
            assert await connection.read(3, 2, 9, 1) == (0,)  # FC 2
            with pytest.raises(ExceptionResponse) as refused:
                await connection.read(3, 3, 900, 2)
            assert (refused.value.function, refused.value.code) == (3, 2)
            assert connection.connected  # an exception response is an answer
            assert await connection.read(3, 3, 22, 1) == (40,)
        finally:
            connection.close()


async def test_frame_split_into_single_bytes_is_reassembled() -> None:
    async def dribble(request: bytes) -> list[bytes]:
        frame = answer(request, registers_pdu(request, [1, 2, 3]))
        return [frame[i : i + 1] for i in range(len(frame))]

    async with ScriptedDevice(dribble) as server:
        connection = await connect(server.port)
        try:
            assert await connection.read(1, 3, 0, 3) == (1, 2, 3)
            assert await connection.read(1, 3, 0, 3) == (1, 2, 3)
        finally:
            connection.close()


async def test_header_and_body_in_separate_segments() -> None:
    async def two_parts(request: bytes) -> list[bytes]:
        frame = answer(request, registers_pdu(request, [7]))
        return [frame[:7], frame[7:]]

    async with ScriptedDevice(two_parts) as server:
        connection = await connect(server.port)
        try:
            assert await connection.read(1, 4, 0, 1) == (7,)
        finally:
            connection.close()


async def test_answer_merged_with_an_unsolicited_frame_closes_the_connection() -> None:
    async def chatty(request: bytes) -> list[bytes]:
        good = answer(request, registers_pdu(request, [5]))
        return [good + answer(request, registers_pdu(request, [6]), tid=999)]

    async with ScriptedDevice(chatty) as server:
        connection = await connect(server.port)
        try:
            assert await connection.read(1, 3, 0, 1) == (5,)  # the answer itself is good
            assert not connection.connected  # ...but the stream is out of step now
            with pytest.raises(ConnectionClosed, match="unknown transaction id 999"):
                await connection.read(1, 3, 0, 1)
            await asyncio.wait_for(server.hung_up.wait(), 2.0)
        finally:
            connection.close()


async def _first_answer_is(pdu_or_frame: Callable[[bytes], bytes], match: str) -> None:
    """Connect to a device whose answer is ``pdu_or_frame(request)``; expect FrameError(match)."""

    async def bad(request: bytes) -> list[bytes]:
        return [pdu_or_frame(request)]

    async with ScriptedDevice(bad) as server:
        connection = await connect(server.port)
        try:
            with pytest.raises(FrameError, match=match):
                await connection.read(1, 3, 0, 2)
            assert not connection.connected
            await asyncio.wait_for(server.hung_up.wait(), 2.0)  # the socket really is closed
        finally:
            connection.close()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda r: answer(r, registers_pdu(r, [1, 2]), protocol_id=1), "bad MBAP protocol id 1"),
        (lambda r: r[:4] + b"\x00\x01" + b"\x01\x03", "bad MBAP length 1"),
        (lambda r: r[:4] + b"\x01\x2c" + bytes(300), "bad MBAP length 300"),
        (lambda r: answer(r, registers_pdu(r, [1, 2]), tid=77), "unknown transaction id 77"),
        (lambda r: answer(r[:6] + b"\x09" + r[7:], registers_pdu(r, [1, 2])), "from unit 9"),
        (lambda r: answer(r, b"\x04\x04\x00\x01\x00\x02"), "function 4 to a request with function 3"),
        (lambda r: answer(r, b"\x03\x02\x00\x01"), "answer of 4 bytes, expected 6"),
        (lambda r: answer(r, b"\x03\x06\x00\x01\x00\x02"), "byte count 6 in an answer of 4 data bytes"),
        (lambda r: answer(r, b"\x83\x02\x00"), "exception response of 3 bytes"),
    ],
    ids=[
        "protocol-id",
        "length-too-short",
        "length-too-long",
        "unknown-transaction",
        "wrong-unit",
        "wrong-function",
        "short-answer",
        "wrong-byte-count",
        "long-exception",
    ],
)
async def test_malformed_answer_is_a_frame_error_and_closes(
    make: Callable[[bytes], bytes], match: str
) -> None:
    await _first_answer_is(make, match)


@pytest.mark.parametrize(
    ("write", "echo", "error"),
    [
        (lambda c: c.write_register(1, 1, 3), lambda r: r[7:8] + b"\x00\x02" + r[10:12], "does not echo"),
        (lambda c: c.write_registers(1, 1, [1, 2]), lambda r: r[7:10] + b"\x00\x03", "does not echo"),
        (lambda c: c.write_coils(1, 1, [1]), lambda r: r[7:8] + b"\x00\x09" + r[10:12], "does not echo"),
        # A device that clamps a setpoint echoes the value it took: an acknowledgement all the same
        # (the command path's read-back reports the mismatch).
        (lambda c: c.write_register(1, 1, 150), lambda r: r[7:10] + b"\x00\x64", None),
    ],
    ids=["fc6-address", "fc16-quantity", "fc15-address", "fc6-clamped-value"],
)
async def test_write_answer_must_echo_address_and_quantity(
    write: Callable[[ModbusConnection], Awaitable[None]], echo: Callable[[bytes], bytes], error: str | None
) -> None:
    async def reply(request: bytes) -> list[bytes]:
        return [answer(request, echo(request))]

    async with ScriptedDevice(reply) as server:
        connection = await connect(server.port)
        try:
            if error is None:
                await write(connection)
                assert connection.connected
            else:
                with pytest.raises(FrameError, match=error):
                    await write(connection)
                assert not connection.connected
        finally:
            connection.close()


async def test_silence_times_out_and_closes() -> None:
    async def silent(request: bytes) -> list[bytes]:
        del request
        return []

    async with ScriptedDevice(silent) as server:
        connection = await connect(server.port, timeout_s=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError, match=r"no answer within 0.2 s"):
            await connection.read(1, 3, 0, 1)
        assert 0.15 < loop.time() - started < 0.6
        assert not connection.connected
        await asyncio.wait_for(server.hung_up.wait(), 2.0)
        with pytest.raises(ConnectionClosed, match="no answer within"):
            await connection.read(1, 3, 0, 1)


async def test_device_hanging_up_fails_the_request() -> None:
    async def hang_up(request: bytes) -> list[bytes]:
        del request
        raise ConnectionResetError

    async with ScriptedDevice(hang_up) as server:
        connection = await connect(server.port)
        with pytest.raises(ConnectionClosed, match="connection closed by the device"):
            await connection.read(1, 3, 0, 1)
        assert not connection.connected


async def test_late_answer_to_a_cancelled_request_is_skipped() -> None:
    async def slow(request: bytes) -> list[bytes]:
        await asyncio.sleep(0.05)  # a serial device: it answers every request, late
        return [answer(request, registers_pdu(request, [request[1]]))]  # value = transaction id

    async with ScriptedDevice(slow) as server:
        connection = await connect(server.port)
        try:
            first = asyncio.create_task(connection.read(1, 3, 0, 1))
            await asyncio.sleep(0.01)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert await connection.read(1, 3, 0, 1) == (2,)  # not the first request's answer
            assert connection.connected
        finally:
            connection.close()


async def test_one_request_at_a_time(device: ScriptedDevice) -> None:
    connection = await connect(device.port)
    try:
        first = asyncio.create_task(connection.read(1, 3, 0, 1))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already in flight"):
            await connection.read(1, 3, 0, 1)
        assert await first == (100,)
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c: c.read(1, 3, 0, 0), "quantity 0 is not 1..125"),
        (lambda c: c.read(1, 3, 0, 126), "quantity 126 is not 1..125"),
        (lambda c: c.read(1, 1, 0, 2001), "quantity 2001 is not 1..2000"),
        (lambda c: c.read(256, 3, 0, 1), "unit id 256"),
        (lambda c: c.read(1, 3, 65535, 2), "outside 0..65535"),
        (lambda c: c.read(1, 6, 0, 1), "not a register read"),
        (lambda c: c.write_register(1, 0, 70000), "not 16-bit unsigned"),
        (lambda c: c.write_registers(1, 0, [1, -1]), "16-bit unsigned"),
    ],
)
async def test_bad_arguments_are_refused_before_sending(
    device: ScriptedDevice, call: Callable[[ModbusConnection], Awaitable[object]], match: str
) -> None:
    connection = await connect(device.port)
    try:
        with pytest.raises(ValueError, match=match):
            await call(connection)
        assert device.requests == []
        assert await connection.read(1, 3, 0, 1) == (100,)
    finally:
        connection.close()


async def test_connect_refused_and_closed_connection(unused_tcp_port: int) -> None:
    with pytest.raises(OSError, match="Connect call failed"):
        await connect(unused_tcp_port)
    async with ScriptedDevice(echo_registers) as server:
        connection = await connect(server.port)
        connection.close()
        connection.close()
        with pytest.raises(ConnectionClosed, match="closed by the client"):
            await connection.read(1, 3, 0, 1)


def test_connection_state_is_slotted() -> None:
    """Thousands of connections per process: no per-instance __dict__."""
    assert not hasattr(ModbusConnection, "__dict__") or "__dict__" not in ModbusConnection.__dict__
    assert "__slots__" in ModbusConnection.__dict__


class _CancelThenAnswer(asyncio.Protocol):
    """Cancel the waiting task, then hand the answer over, before the task can resume."""

    def __init__(self, inner: asyncio.Protocol, task: asyncio.Task[object]) -> None:
        self._inner, self._task = inner, task

    def data_received(self, data: bytes) -> None:
        self._task.cancel()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)


async def test_answer_arriving_after_a_cancel_but_before_the_caller_resumes(device: ScriptedDevice) -> None:
    connection = await connect(device.port)
    try:
        assert connection._transport is not None
        transport = connection._transport
        task: asyncio.Task[object] = asyncio.create_task(connection.read(1, 3, 0, 1))
        transport.set_protocol(_CancelThenAnswer(connection, task))
        with pytest.raises(asyncio.CancelledError):
            await task
        transport.set_protocol(connection)
        assert connection.connected  # the answer was taken as the cancelled request's: no harm done
        assert await connection.read(1, 3, 5, 1) == (105,)
    finally:
        connection.close()
