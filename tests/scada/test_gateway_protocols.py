"""One gateway, three protocols: a simulated plant serving Modbus TCP, OPC UA and MQTT devices.

Everything runs for real: the simulators listen on loopback sockets (the MQTT devices publish
through the local Mosquitto), the gateway builds its drivers from the site file, and the test
watches what its sessions publish and what its command path answers.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from _session_helpers import wait_until

from scada.config import SiteConfig, parse_site
from scada.gateway import Gateway
from scada.model import (
    Availability,
    AvailabilityEvent,
    Command,
    CommandStatus,
    PointId,
    Priority,
    QualityCode,
    Reading,
)
from scada.runtime import SystemClock, TaskSupervisor
from simulators.plant import SimulatedPlant

MQTT_URL = "mqtt://127.0.0.1:1883"

SITE = """
site: {{id: t, name: Test}}
hierarchy: [{{id: g, name: G, level: group}}]
devices:
  - id: meter
    node: g
    kind: power_meter
    protocol: modbus_tcp
    poll_period_s: 0.2
    modbus: {{host: 127.0.0.1, port: {modbus_port}}}
    simulation: {{profile: flat, base_kw: 50, seed: 1}}
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity, modbus: {{address: 0, type: float32}}}}
  - id: chiller
    node: g
    kind: chiller
    protocol: opcua
    poll_period_s: 0.5
    stale_after_s: 5
    opcua: {{endpoint: "opc.tcp://127.0.0.1:{opcua_port}/t", publishing_interval_ms: 100, timeout_s: 2}}
    simulation: {{profile: flat, base_kw: 80, peak_kw: 80, seed: 2}}
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity,
          opcua: {{node_id: "ns=2;s=chiller.active_power_kw"}}}}
      - {{key: supply_temp_setpoint_degc, kind: setpoint, unit: degC, writable: true,
          opcua: {{node_id: "ns=2;s=chiller.sp",
                  method: {{object_id: "ns=2;s=chiller", method_id: "ns=2;s=chiller.set_sp"}}}}}}
  - id: pv
    node: g
    kind: pv_inverter
    protocol: mqtt
    poll_period_s: 0.2
    stale_after_s: 1.5
    mqtt:
      telemetry_topic: "{prefix}/{{device}}/telemetry"
      command_topic: "{prefix}/{{device}}/command"
      response_topic: "{prefix}/{{device}}/response"
      version: "5"
    simulation: {{profile: pv, peak_kw: 60, seed: 3}}
    points:
      - {{key: irradiance_w_m2, kind: irradiance, unit: W/m2, mqtt: {{field: G}}}}
      - {{key: power_limit_pct, kind: setpoint, unit: "%", writable: true, mqtt: {{field: limit}}}}
"""


class Sink:
    """Records readings, events and dead letters the gateway publishes."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.events: list[AvailabilityEvent] = []
        self.rejects: list[tuple[str, bytes, str]] = []

    async def publish(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)

    async def publish_event(self, event: AvailabilityEvent) -> None:
        self.events.append(event)

    def reject(self, *, origin: str, payload: bytes, reason: str) -> None:
        self.rejects.append((origin, payload, reason))

    def good(self, point: str) -> list[Reading]:
        return [r for r in self.readings if r.point == point and r.quality.is_good]


@pytest.fixture
def site(unused_tcp_port_factory: pytest.TempPathFactory) -> SiteConfig:
    ports = {"modbus_port": unused_tcp_port_factory(), "opcua_port": unused_tcp_port_factory()}  # type: ignore[operator]
    return parse_site(SITE.format(prefix=f"scada-test/{uuid.uuid4().hex[:8]}", **ports))


@contextlib.asynccontextmanager
async def running(site: SiteConfig, sink: Sink) -> AsyncIterator[tuple[SimulatedPlant, Gateway]]:
    plant = SimulatedPlant.from_document(site.model_dump(mode="json"), mqtt_url=MQTT_URL, tick_s=0.05)
    gateway = Gateway(
        site, sink=sink, clock=SystemClock(), mqtt_url=MQTT_URL, client_id=f"t-{uuid.uuid4().hex[:6]}"
    )
    supervisor = TaskSupervisor("test")
    await plant.start()
    try:
        await gateway.start(supervisor)
        yield plant, gateway
    finally:
        await supervisor.close()
        await gateway.close()
        await plant.stop()


def command(point: str, value: float) -> Command:
    return Command(
        point=PointId(point),
        value=value,
        priority=Priority.OPERATOR,
        source="test",
        reason="protocols test",
        correlation_id=f"c-{uuid.uuid4().hex[:8]}",
    )


async def test_every_protocol_delivers_readings_and_verified_writes(site: SiteConfig) -> None:
    sink = Sink()
    async with running(site, sink) as (plant, gateway):
        await wait_until(
            lambda: all(
                sink.good(p)
                for p in ("meter.active_power_kw", "chiller.active_power_kw", "pv.irradiance_w_m2")
            ),
            timeout_s=15,
        )
        assert {d: s.availability for d, s in gateway.sessions.items()} == dict.fromkeys(
            ("meter", "chiller", "pv"), Availability.ONLINE
        )
        chiller = await gateway.execute(command("chiller.supply_temp_setpoint_degc", 9.5))  # a method call
        clamped = await gateway.execute(command("chiller.supply_temp_setpoint_degc", 30))  # range 5..15
        pv = await gateway.execute(command("pv.power_limit_pct", 60))  # MQTT command + response
        assert plant.device("chiller").value("supply_temp_setpoint_degc") == 15
        assert plant.device("pv").value("power_limit_pct") == 60
    assert chiller.status is CommandStatus.VERIFIED, chiller.reason
    assert clamped.status is CommandStatus.MISMATCH
    assert clamped.readback == 15
    assert pv.status is CommandStatus.VERIFIED, pv.reason
    assert sink.good("meter.active_power_kw")[-1].value == pytest.approx(50, rel=0.1)
    assert sink.good("chiller.active_power_kw")[-1].value == pytest.approx(80, rel=0.2)


async def test_a_silent_mqtt_device_goes_stale_and_a_stopped_opcua_server_offline(site: SiteConfig) -> None:
    sink = Sink()
    async with running(site, sink) as (plant, gateway):
        await wait_until(
            lambda: all(s.availability is Availability.ONLINE for s in gateway.sessions.values()), 15
        )
        await wait_until(lambda: bool(sink.good("pv.irradiance_w_m2")), 10)
        (fleet,) = plant.mqtt_fleets
        fleet.silence("pv")
        await wait_until(lambda: gateway.sessions["pv"].availability is Availability.STALE, 10)
        stale = [r for r in sink.readings if r.point == "pv.irradiance_w_m2"][-1]
        assert stale.quality.code is QualityCode.UNCERTAIN
        assert stale.quality.reason.startswith("stale: no update for 1.5 s")
        fleet.silence("pv", silent=False)
        await wait_until(lambda: gateway.sessions["pv"].availability is Availability.ONLINE, 10)

        (endpoint_url,) = {d.opcua.endpoint for d in site.devices if d.opcua is not None}
        await plant.opcua_endpoint(endpoint_url).stop()
        await wait_until(lambda: gateway.sessions["chiller"].availability is Availability.OFFLINE, 15)
        offline = [r for r in sink.readings if r.point == "chiller.active_power_kw"][-1]
        assert offline.quality.code is QualityCode.BAD
        assert offline.quality.reason.startswith("device offline")
        assert gateway.sessions["meter"].availability is Availability.ONLINE  # the others carry on


async def test_old_pushed_samples_and_bad_payloads_never_pass_for_fresh_data(site: SiteConfig) -> None:
    sink = Sink()
    async with running(site, sink) as (plant, gateway):
        await wait_until(lambda: bool(sink.good("pv.irradiance_w_m2")), 15)
        (fleet,) = plant.mqtt_fleets
        fleet.silence("pv")  # only our hand-made messages from now on
        old = datetime.now(UTC) - timedelta(minutes=5)
        fleet.publish_raw("pv", json.dumps({"ts": old.isoformat(), "values": {"G": 123.0}}).encode())
        fleet.publish_raw("pv", b'{"ts": "2026-01-0')  # truncated
        fleet.publish_raw("pv", json.dumps({"values": {"G": "bright"}}).encode())  # not a number
        await wait_until(lambda: any(r.value == 123.0 for r in sink.readings), 10)
        await wait_until(lambda: len(sink.rejects) >= 1, 10)
        await wait_until(
            lambda: any(
                "expected a number, got a string" in r.quality.reason
                for r in sink.readings
                if r.point == "pv.irradiance_w_m2"
            ),
            10,
        )
        assert gateway.sessions["pv"].stats.old_samples >= 1
    replayed = next(r for r in sink.readings if r.value == 123.0)
    assert replayed.ts == old  # the device's own timestamp is kept
    assert replayed.quality.code is QualityCode.UNCERTAIN
    assert replayed.quality.reason.startswith("stale: measured 300 s before it arrived")
    origin, payload, reason = sink.rejects[0]
    assert payload == b'{"ts": "2026-01-0'
    assert "pv" in origin
    assert reason
    not_a_number = next(r for r in sink.readings if "got a string" in r.quality.reason)
    assert not_a_number.quality.code is QualityCode.BAD
    assert not_a_number.value is None
