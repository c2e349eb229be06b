"""The command path of a device session: write, acknowledgement, read-back, against real simulators.

Each outcome an operator can meet is produced for real: a value the device holds (verified), a value
the device clamps (mismatch), a register the device refuses (rejected), a device that swallows writes
(timeout, through a real TCP proxy that drops write frames), and requests that are never sent (failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _session_helpers import RecordingSink, wait_until

from scada.config import SiteConfig, parse_site
from scada.gateway import build_driver
from scada.model import Command, CommandStatus, PointId, Priority
from scada.runtime import SystemClock
from scada.sessions import DeviceSession
from simulators.plant import SimulatedPlant

SITE = """
site: {{id: t, name: Test}}
hierarchy: [{{id: g, name: G, level: group}}]
devices:
  - id: pv
    node: g
    kind: pv_inverter
    protocol: modbus_tcp
    poll_period_s: 0.2
    modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1, timeout_s: 0.5}}
    simulation: {{profile: pv, peak_kw: 100, seed: 1}}
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: pv, modbus: {{address: 0, type: float32}}}}
      - {{key: power_limit_pct, kind: setpoint, unit: "%", writable: true, modbus: {{address: 100, type: uint16}}}}
      - {{key: reserve_pct, kind: setpoint, unit: "%", writable: true, modbus: {{address: 101, type: uint16}}}}
"""


def site_on(port: int) -> SiteConfig:
    return parse_site(SITE.format(port=port))


def command(point: str, value: float, correlation_id: str = "c-1") -> Command:
    return Command(
        point=PointId(point),
        value=value,
        priority=Priority.OPERATOR,
        source="test",
        reason="test write",
        correlation_id=correlation_id,
    )


@contextlib.asynccontextmanager
async def simulated(port: int, *, refuse: str | None = None) -> AsyncIterator[SimulatedPlant]:
    """Run the site's simulator; ``refuse`` names a point the device side does not accept writes to."""
    doc: dict[str, Any] = copy.deepcopy(site_on(port).model_dump(mode="json"))
    for point in doc["devices"][0]["points"]:
        if point["key"] == refuse:
            point["writable"] = False
    plant = SimulatedPlant.from_document(doc)
    await plant.start()
    try:
        yield plant
    finally:
        await plant.stop()


@contextlib.asynccontextmanager
async def running_session(site: SiteConfig, port: int | None = None) -> AsyncIterator[DeviceSession]:
    device = site.device("pv")
    if port is not None:
        device = device.model_copy(update={"modbus": device.modbus.model_copy(update={"port": port})})  # type: ignore[union-attr]
    clock, sink = SystemClock(), RecordingSink()
    by_key = {device.point_id(p.key): p for p in device.points}
    session = DeviceSession(
        build_driver(device, clock),
        points=list(by_key),
        sink=sink,
        events=sink,
        period_s=device.poll_period_s,
        clock=clock,
        write_tolerance=lambda point, value: by_key[point].verify_tolerance(value),
        write_timeout_s=0.6,
    )
    task = asyncio.create_task(session.run())
    try:
        await wait_until(lambda: session.available is True)
        yield session
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_value_the_device_holds_is_verified_by_read_back(unused_tcp_port: int) -> None:
    async with simulated(unused_tcp_port) as plant, running_session(site_on(unused_tcp_port)) as session:
        result = await session.execute(command("pv.power_limit_pct", 40, "c-verified"))
        assert result.status is CommandStatus.VERIFIED, result.reason
        assert result.readback == 40
        assert result.correlation_id == "c-verified"
        assert result.elapsed_ms > 0
        assert plant.device("pv").value("power_limit_pct") == 40


async def test_a_value_the_device_clamps_is_a_mismatch_with_what_it_holds(unused_tcp_port: int) -> None:
    async with simulated(unused_tcp_port) as plant, running_session(site_on(unused_tcp_port)) as session:
        result = await session.execute(command("pv.power_limit_pct", 150))
        assert result.status is CommandStatus.MISMATCH
        assert result.readback == 100  # the inverter caps its limit at 100 %
        assert "holds 100" in result.reason
        assert not result.status.applied
        assert plant.device("pv").value("power_limit_pct") == 100


async def test_a_write_the_device_refuses_is_rejected_with_its_exception(unused_tcp_port: int) -> None:
    async with (
        simulated(unused_tcp_port, refuse="reserve_pct"),
        running_session(site_on(unused_tcp_port)) as session,
    ):
        result = await session.execute(command("pv.reserve_pct", 10))
        assert result.status is CommandStatus.REJECTED
        assert "exception 2: illegal data address" in result.reason
        assert session.available is True  # a refused write is not a communication failure


async def test_requests_that_cannot_be_sent_fail_without_touching_the_device(unused_tcp_port: int) -> None:
    async with simulated(unused_tcp_port) as plant, running_session(site_on(unused_tcp_port)) as session:
        unknown = await session.execute(command("pv.nonexistent", 1))
        read_only = await session.execute(command("pv.active_power_kw", 1))
        too_big = await session.execute(command("pv.power_limit_pct", 70_000))  # beyond uint16
        not_a_number = await session.execute(command("pv.power_limit_pct", float("nan")))
        assert plant.device("pv").value("power_limit_pct") == 100  # nothing was written
    assert [r.status for r in (unknown, read_only, too_big, not_a_number)] == [CommandStatus.FAILED] * 4
    assert "not a point of device pv" in unknown.reason
    assert "not writable" in read_only.reason
    assert "cannot write" in too_big.reason


async def test_a_device_that_is_not_connected_gets_no_write(unused_tcp_port: int) -> None:
    site = site_on(unused_tcp_port)  # nothing listens
    device = site.device("pv")
    clock, sink = SystemClock(), RecordingSink()
    session = DeviceSession(
        build_driver(device, clock),
        points=[device.point_id(p.key) for p in device.points],
        sink=sink,
        events=sink,
        period_s=0.2,
        clock=clock,
    )
    task = asyncio.create_task(session.run())
    try:
        await wait_until(lambda: session.available is False)
        result = await session.execute(command("pv.power_limit_pct", 40))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert result.status is CommandStatus.FAILED
    assert result.reason.startswith("device not connected")


@contextlib.asynccontextmanager
async def drop_writes_proxy(target_port: int, dropped: list[int]) -> AsyncIterator[int]:
    """Forward Modbus TCP frames to the simulator but swallow every write (FC 5, 6, 15, 16)."""
    tasks: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, filter_writes: bool
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header = await reader.readexactly(7)
                body = await reader.readexactly(int.from_bytes(header[4:6], "big") - 1)
                if filter_writes and body[0] in (5, 6, 15, 16):
                    dropped.append(body[0])
                    continue
                writer.write(header + body)
                await writer.drain()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        writers.extend((client_w, server_w))
        for coro in (
            pump(client_r, server_w, filter_writes=True),
            pump(server_r, client_w, filter_writes=False),
        ):
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()


async def test_a_write_without_acknowledgement_times_out_and_says_it_may_have_applied(
    unused_tcp_port: int,
) -> None:
    dropped: list[int] = []
    async with simulated(unused_tcp_port) as plant, drop_writes_proxy(unused_tcp_port, dropped) as proxy_port:
        async with running_session(site_on(unused_tcp_port), port=proxy_port) as session:
            result = await session.execute(command("pv.power_limit_pct", 40))
        assert plant.device("pv").value("power_limit_pct") == 100
    assert dropped == [6]
    assert result.status is CommandStatus.TIMEOUT
    assert "may or may not have been applied" in result.reason
    assert 500 <= result.elapsed_ms < 5_000


@pytest.mark.parametrize("value", [0, 100])
async def test_limits_of_the_range_verify(unused_tcp_port: int, value: int) -> None:
    async with simulated(unused_tcp_port), running_session(site_on(unused_tcp_port)) as session:
        result = await session.execute(command("pv.power_limit_pct", value))
    assert result.status is CommandStatus.VERIFIED
