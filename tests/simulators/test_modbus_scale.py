"""The scale-mode Modbus simulator over real sockets: the real client transport, raw malformed
frames, many devices behind gateway ports, and the command line."""

from __future__ import annotations

import asyncio
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from protocols.modbus.transport import ExceptionResponse, ModbusConnection, open_connection
from simulators.modbus_scale import ScaleSimulator

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def fleet() -> AsyncIterator[ScaleSimulator]:
    simulator = ScaleSimulator(450, 11, units_per_port=200, seed=7)  # 3 ports; an odd register count
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


async def connect(simulator: ScaleSimulator, port_index: int = 0) -> ModbusConnection:
    host, port = simulator.endpoints[port_index]
    return await open_connection(host, port, timeout_s=1.0)


async def raw_exchange(simulator: ScaleSimulator, frame: bytes, *, port_index: int = 0) -> bytes:
    """Send raw bytes; return what the server sends until it hangs up or is quiet for 0.3 s (an
    exception response is 9 bytes: stop there)."""
    host, port = simulator.endpoints[port_index]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(frame)
        await writer.drain()
        received = b""
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(4096), 0.3)
            except TimeoutError:
                return received
            if not chunk:
                return received + b"<closed>"
            received += chunk
            if len(received) >= 9:
                return received
    finally:
        writer.close()


def request(tid: int, unit: int, pdu: bytes, *, protocol_id: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">HHHB", tid, protocol_id, len(pdu) + 1 if length is None else length, unit) + pdu


async def test_devices_sit_behind_gateway_ports_by_unit_id(fleet: ScaleSimulator) -> None:
    assert len(fleet.endpoints) == 3
    assert fleet.device_index(2, 50) == 449
    assert fleet.device_index(2, 51) is None  # past the last device
    first, last = await connect(fleet, 0), await connect(fleet, 2)
    try:
        raw = await first.read_raw(1, 3, 0, 10)
        voltage_v, current_a, power_kw, frequency_hz, reactive_kvar = struct.unpack(">5f", raw)
        assert 225 < voltage_v < 235
        assert 49.9 < frequency_hz < 50.1
        assert power_kw > 0
        assert current_a == pytest.approx(power_kw * 1000 / (3 * voltage_v * 0.95), rel=1e-5)
        assert reactive_kvar == pytest.approx(0.33 * power_kw, rel=1e-5)
        assert await first.read(1, 3, 0, 11) == fleet.words(0)
        assert await last.read(50, 4, 0, 11) == fleet.words(449)  # FC 4 serves the same image
        assert fleet.words(0) != fleet.words(1)  # every meter has its own base and phase
        with pytest.raises(ExceptionResponse) as gateway:
            await last.read(51, 3, 0, 1)
        assert gateway.value.code == 11
        assert last.connected
    finally:
        first.close()
        last.close()


async def test_physics_refreshes_the_image_but_keeps_written_registers(fleet: ScaleSimulator) -> None:
    connection = await connect(fleet)
    try:
        await connection.write_register(3, 4, 0x1234)  # FC 6
        await connection.write_registers(3, 6, [0xABCD, 0x0001])  # FC 16
        before = fleet.words(2)
        fleet.refresh_all(137.0)
        after = await connection.read(3, 3, 0, 11)
        assert after[4] == 0x1234
        assert after[6:8] == (0xABCD, 0x0001)
        assert after[0:4] != before[0:4]  # voltage and current moved with time
        assert after[10] == 137  # the odd last register counts seconds
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("pdu", "code"),
    [
        (b"\x01\x00\x00\x00\x01", 1),  # coils are not simulated
        (b"\x2b\x0e\x01\x00", 1),  # read device identification: unknown here
        (b"\x03\x00\x00\x00\x00", 3),  # quantity 0
        (b"\x03\x00\x00\x00\x7e", 3),  # quantity 126
        (b"\x03\x00\x0a\x00\x02", 2),  # runs past the image (11 registers)
        (b"\x03\x00\x00\x00", 3),  # PDU one byte short
        (b"\x06\x00\x0b\x00\x01", 2),  # write past the image
        (b"\x10\x00\x00\x00\x02\x02\x00\x01", 3),  # byte count says 2, quantity needs 4
        (b"\x10\x00\x00\x00\x01\x02\x00", 3),  # data shorter than the byte count
    ],
    ids=[
        "coils",
        "unknown-function",
        "quantity-0",
        "quantity-126",
        "past-the-image",
        "short-pdu",
        "write-past-the-image",
        "byte-count",
        "short-data",
    ],
)
async def test_bad_requests_get_exception_responses(fleet: ScaleSimulator, pdu: bytes, code: int) -> None:
    received = await raw_exchange(fleet, request(9, 1, pdu))
    assert received == request(9, 1, bytes([pdu[0] | 0x80, code]))
    assert fleet.exceptions == 1


@pytest.mark.parametrize(
    "frame",
    [
        request(1, 1, b"\x03\x00\x00\x00\x01", protocol_id=7),
        request(1, 1, b"\x03\x00\x00\x00\x01", length=1),
        request(1, 1, b"\x03\x00\x00\x00\x01", length=0),
        request(1, 1, b"\x03\x00\x00\x00\x01", length=300),
    ],
    ids=["protocol-id", "length-1", "length-0", "length-300"],
)
async def test_bad_mbap_header_closes_only_that_connection(fleet: ScaleSimulator, frame: bytes) -> None:
    bystander = await connect(fleet)
    try:
        assert await raw_exchange(fleet, frame) == b"<closed>"
        assert fleet.dropped_connections == 1
        assert await bystander.read(1, 3, 0, 1) == fleet.words(0)[:1]  # the server is fine
    finally:
        bystander.close()


async def test_requests_split_and_merged_are_answered_in_order(fleet: ScaleSimulator) -> None:
    first = request(1, 1, b"\x03\x00\x00\x00\x02")
    second = request(2, 2, b"\x04\x00\x02\x00\x01")
    host, port = fleet.endpoints[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        merged = first + second
        writer.write(merged[:3])  # a header in pieces...
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(merged[3:])  # ...then the rest of it merged with a whole second request
        await writer.drain()
        answers = await asyncio.wait_for(reader.readexactly(13 + 11), 2.0)
    finally:
        writer.close()
    w0, w1 = fleet.words(0), fleet.words(1)
    assert answers[:13] == struct.pack(">HHHBBBHH", 1, 0, 7, 1, 3, 4, w0[0], w0[1])
    assert answers[13:] == struct.pack(">HHHBBBH", 2, 0, 5, 2, 4, 2, w1[2])


async def test_many_connections_at_once(fleet: ScaleSimulator) -> None:
    connections = [await connect(fleet, i // 200) for i in range(450)]
    try:
        # The physics refreshes each device once a second in slices, so a device may move while
        # the reads are in flight: each answer is its own device's registers, before or after.
        before = [list(fleet.words(i)[:2]) for i in range(450)]
        answers = await asyncio.gather(*(c.read(1 + i % 200, 3, 0, 2) for i, c in enumerate(connections)))
        after = [list(fleet.words(i)[:2]) for i in range(450)]
        assert all(list(a) in (b, f) for a, b, f in zip(answers, before, after, strict=True))
    finally:
        for connection in connections:
            connection.close()


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="devices"):
        ScaleSimulator(0)
    with pytest.raises(ValueError, match="registers"):
        ScaleSimulator(1, 126)
    with pytest.raises(ValueError, match="units_per_port"):
        ScaleSimulator(1, units_per_port=248)


async def test_command_line_prints_ready_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.modbus_scale",
        "--devices",
        "250",
        "--registers",
        "10",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("SIMULATORS READY 250 devices on 127.0.0.1:")
        addresses = line.split(" on ", 1)[1].split()
        assert len(addresses) == 2
        host, port = addresses[1].rsplit(":", 1)
        connection = await open_connection(host, int(port), timeout_s=2.0)
        try:
            assert len(await connection.read(50, 3, 0, 10)) == 10  # device 249
        finally:
            connection.close()
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_command_line_refuses_bad_arguments() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.modbus_scale",
        "--devices",
        "0",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"devices must be at least 1" in err
