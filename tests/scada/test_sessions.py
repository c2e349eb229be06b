"""Device sessions against real simulators over real sockets, on a fake clock.

Time moves only when the test says so: each step waits until the session is asleep on the clock,
then advances exactly to its wake-up, so the backoff delays the session chose can be read off.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from _session_helpers import RecordingSink, wait_until

from protocols.modbus.driver import ModbusDriver
from scada.config import SiteConfig, parse_site
from scada.gateway import build_driver
from scada.model import Availability, QualityCode
from scada.runtime import Backoff, FakeClock
from scada.sessions import DeviceSession
from simulators.plant import SimulatedPlant

SITE = """
site: {{id: t, name: Test}}
hierarchy: [{{id: g, name: G, level: group}}]
devices:
  - id: meter
    node: g
    kind: power_meter
    protocol: modbus_tcp
    poll_period_s: 1.0
    modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1, timeout_s: 0.5}}
    simulation: {{profile: flat, base_kw: 50, seed: 1}}
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity, modbus: {{address: 0, type: float32}}}}
      - {{key: energy_import_kwh, kind: energy_counter, unit: kWh, carrier: electricity, scale: 0.1,
          modbus: {{address: 2, type: uint32}}}}
"""


async def step(clock: FakeClock) -> float:
    """Wait until the session sleeps on the clock, then wake it; return how long it slept."""
    await wait_until(lambda: clock.pending_sleepers > 0)
    deadline = clock.next_deadline_s
    assert deadline is not None
    delay = deadline - clock.monotonic()
    await clock.advance(delay)
    return delay


def site_on(port: int) -> SiteConfig:
    return parse_site(SITE.format(port=port))


@pytest.fixture
async def plant(unused_tcp_port: int) -> AsyncIterator[SimulatedPlant]:
    sim = SimulatedPlant.from_document(site_on(unused_tcp_port).model_dump(mode="json"))
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


async def test_unreachable_device_goes_offline_once_and_backs_off_capped_and_jittered(
    unused_tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    site = site_on(unused_tcp_port)  # nothing listens there
    clock, sink = FakeClock(), RecordingSink()
    device = site.device("meter")
    session = DeviceSession(
        build_driver(device, clock),
        points=[device.point_id(p.key) for p in device.points],
        sink=sink,
        events=sink,
        period_s=1.0,
        clock=clock,
        backoff=Backoff(initial_s=1.0, max_s=8.0, jitter=0.5, rng=random.Random(7)),
    )
    task = asyncio.create_task(session.run())
    try:
        delays = [await step(clock) for _ in range(12)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    ceilings = [min(8.0, 2.0**n) for n in range(12)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    assert max(delays) <= 8.0
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered, not a fixed ladder
    assert session.available is False
    assert 12 <= session.stats.polls_failed <= 13  # the 13th attempt may fail before the cancel lands
    assert [e.availability for e in sink.events] == [Availability.OFFLINE]
    assert caplog.text.count("meter: offline") == 1  # a transition is logged once, not every retry
    assert {r.point for r in sink.readings} == {"meter.active_power_kw", "meter.energy_import_kwh"}
    assert all(r.quality.code is QualityCode.BAD and r.value is None for r in sink.readings)
    assert all(r.quality.reason.startswith("device offline:") for r in sink.readings)
    assert len(sink.readings) == 2  # marked bad once, on the transition


async def test_session_polls_at_a_fixed_rate_and_recovers_after_the_device_restarts(
    plant: SimulatedPlant,
) -> None:
    site = site_on(plant.endpoints[0][1])
    clock, sink = FakeClock(), RecordingSink()
    device = site.device("meter")
    driver = build_driver(device, clock)
    assert isinstance(driver, ModbusDriver)
    session = DeviceSession(
        driver,
        points=[device.point_id(p.key) for p in device.points],
        sink=sink,
        events=sink,
        period_s=1.0,
        clock=clock,
        backoff=Backoff(initial_s=1.0, max_s=4.0, jitter=0.0),
    )
    task = asyncio.create_task(session.run())
    try:
        polls = [await step(clock) for _ in range(5)]
        assert polls == pytest.approx([1.0] * 5)  # fixed rate: each sleep ends on the next tick
        assert session.available is True
        assert session.stats.polls_ok >= 5
        good = [r for r in sink.readings if r.point == "meter.active_power_kw"]
        assert all(r.quality.code is QualityCode.GOOD for r in good)
        assert 40 < (good[-1].value or 0) < 60

        await plant.stop()  # the device goes away
        while session.available:
            await step(clock)
        await plant.start()  # and comes back on the same port
        while not session.available:
            await step(clock)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert [e.availability for e in sink.events] == [
        Availability.ONLINE,
        Availability.OFFLINE,
        Availability.ONLINE,
    ]
    assert session.stats.connects == 2
    last = [r for r in sink.readings if r.point == "meter.active_power_kw"][-1]
    assert last.quality.code is QualityCode.GOOD
