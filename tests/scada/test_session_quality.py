"""Quality a session puts on polled values: stuck values become uncertain, a frozen device is stale.

A Modbus gateway that lost its meter often keeps answering with the last register image: the
values arrive on time but have stopped moving. These tests freeze real simulator variables and
watch the session say so, then recover when the values move again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from _session_helpers import RecordingSink, wait_until

from scada.config import SiteConfig, parse_site
from scada.gateway import build_driver
from scada.model import Availability, QualityCode
from scada.runtime import SystemClock
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
    poll_period_s: 0.05
    modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1, timeout_s: 0.5}}
    simulation: {{profile: flat, base_kw: 50, noise_pct: 5, seed: 1}}
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity, stuck_after_s: 0.3,
          modbus: {{address: 0, type: float32}}}}
      - {{key: voltage_v, kind: voltage, unit: V, modbus: {{address: 2, type: float32}}}}
"""

POWER = "meter.active_power_kw"


def site_on(port: int) -> SiteConfig:
    return parse_site(SITE.format(port=port))


@pytest.fixture
async def plant(unused_tcp_port: int) -> AsyncIterator[SimulatedPlant]:
    sim = SimulatedPlant.from_document(site_on(unused_tcp_port).model_dump(mode="json"), tick_s=0.02)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def session_for(site: SiteConfig, sink: RecordingSink) -> AsyncIterator[DeviceSession]:
    device = site.device("meter")
    clock = SystemClock()
    session = DeviceSession(
        build_driver(device, clock),
        points=[device.point_id(p.key) for p in device.points],
        sink=sink,
        events=sink,
        period_s=device.poll_period_s,
        clock=clock,
        stuck_after_s={device.point_id(p.key): p.stuck_after_s for p in device.points if p.stuck_after_s},
    )
    task = asyncio.create_task(session.run())
    try:
        yield session
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_value_that_stops_moving_is_uncertain_and_the_device_stale_until_it_moves(
    plant: SimulatedPlant,
) -> None:
    sink = RecordingSink()
    async with session_for(site_on(plant.endpoints[0][1]), sink) as session:
        await wait_until(lambda: len(sink.of(POWER)) >= 5)
        assert all(r.quality.is_good for r in sink.of(POWER))  # a noisy power moves every poll

        plant.device("meter").override("active_power_kw", 42.0)  # the register image freezes
        await wait_until(lambda: session.availability is Availability.STALE)
        stuck = [r for r in sink.of(POWER) if r.quality.code is QualityCode.UNCERTAIN]
        assert stuck
        assert stuck[-1].value == pytest.approx(42.0)
        assert stuck[-1].quality.reason.startswith("stuck: unchanged for")
        assert session.stats.stuck_readings >= 1

        plant.device("meter").clear_override("active_power_kw")
        await wait_until(lambda: session.availability is Availability.ONLINE)
        count = len(sink.of(POWER))
        await wait_until(lambda: len(sink.of(POWER)) >= count + 3)
        assert sink.of(POWER)[-1].quality.is_good
    assert [e.availability for e in sink.events] == [
        Availability.ONLINE,
        Availability.STALE,
        Availability.ONLINE,
    ]
    assert "every monitored value is stuck" in sink.events[1].reason
    # voltage has no stuck check: it stays good even while the power is frozen
    assert all(r.quality.is_good for r in sink.of("meter.voltage_v"))
