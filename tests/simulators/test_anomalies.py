"""Anomaly injection: each type shows in the values, counters stay consistent, labels tell the truth."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pymodbus.client import AsyncModbusTcpClient

from scada.config import parse_site
from scada.model import ConfigError
from simulators.anomalies import (
    AnomalyInjector,
    AnomalySpec,
    AnomalyType,
    LabelFile,
    RandomAnomalies,
)
from simulators.physics import ElectricalLoadPhysics, SimulationParams
from simulators.plant import DocumentError, SimulatedPlant

SHANGHAI = ZoneInfo("Asia/Shanghai")
WEDNESDAY = datetime(2026, 3, 4, tzinfo=SHANGHAI)


def at(hour: float) -> datetime:
    return (WEDNESDAY + timedelta(hours=hour)).astimezone(UTC)


def meter(start: datetime, profile: str = "flat") -> ElectricalLoadPhysics:
    params = SimulationParams(profile=profile, base_kw=20.0, peak_kw=100.0, noise_pct=0.0)
    return ElectricalLoadPhysics(params, tz=SHANGHAI, start=start, seed=3)


def spec(kind: AnomalyType, start: datetime, duration_s: float, **kwargs: Any) -> AnomalySpec:
    return AnomalySpec(
        device="m", point="active_power_kw", type=kind, start=start, duration_s=duration_s, **kwargs
    )


def pair(*specs: AnomalySpec, start: datetime, profile: str = "flat") -> tuple[ElectricalLoadPhysics, ...]:
    """Return (faulty, twin): the same physics, one with the anomalies attached."""
    faulty, twin = meter(start, profile), meter(start, profile)
    faulty.attach(AnomalyInjector("m", specs, tz=SHANGHAI))
    return faulty, twin


def step_both(devices: tuple[ElectricalLoadPhysics, ...], now: datetime) -> None:
    for device in devices:
        device.step(now)


def labels_of(device: ElectricalLoadPhysics) -> list[dict[str, Any]]:
    assert isinstance(device.layer, AnomalyInjector)
    return [label.to_json() for label in device.layer.drain_labels()]


def test_spike_adds_its_magnitude_for_its_duration_and_leaves_the_counter_alone() -> None:
    faulty, twin = pair(spec(AnomalyType.SPIKE, at(10), 120.0, magnitude=500.0), start=at(9))
    for second in range(0, 2 * 3600, 30):
        now = at(9) + timedelta(seconds=second)
        step_both((faulty, twin), now)
        inside = at(10) <= now < at(10) + timedelta(seconds=120)
        assert faulty.value("active_power_kw") == twin.value("active_power_kw") + (500.0 if inside else 0.0)
        assert faulty.value("energy_import_kwh") == twin.value("energy_import_kwh")  # a glitch, not a load
        assert faulty.physical_value("active_power_kw") == twin.value("active_power_kw")
    [label] = labels_of(faulty)
    assert label == {
        "device": "m",
        "point": "active_power_kw",
        "type": "spike",
        "start": "2026-03-04T02:00:00+00:00",
        "end": "2026-03-04T02:02:00+00:00",
        "magnitude": 500.0,
        "value_at_start": 100.0,
        "counter": None,
        "source": "configured",
    }


def test_stuck_freezes_the_value_it_had_when_it_started() -> None:
    faulty, twin = pair(spec(AnomalyType.STUCK, at(7.5), 3600.0), start=at(7), profile="office")
    frozen = None
    for minute in range(1, 150):
        now = at(7) + timedelta(minutes=minute)
        step_both((faulty, twin), now)
        if at(7.5) <= now < at(8.5):
            frozen = twin.value("active_power_kw") if frozen is None else frozen
            assert faulty.value("active_power_kw") == frozen
        else:
            assert faulty.value("active_power_kw") == twin.value("active_power_kw")
    assert frozen is not None
    assert twin.value("active_power_kw") > frozen + 20  # the morning ramp went on underneath
    [label] = labels_of(faulty)
    assert label["type"] == "stuck"
    assert label["magnitude"] is None
    assert label["value_at_start"] == frozen


def test_drift_ramps_to_its_magnitude_then_snaps_back() -> None:
    faulty, twin = pair(spec(AnomalyType.DRIFT, at(10), 7200.0, magnitude=-30.0), start=at(10))
    step_both((faulty, twin), at(11))
    assert faulty.value("active_power_kw") - twin.value("active_power_kw") == pytest.approx(-15.0)
    step_both((faulty, twin), at(11.5))
    assert faulty.value("active_power_kw") - twin.value("active_power_kw") == pytest.approx(-22.5)
    step_both((faulty, twin), at(12))
    assert faulty.value("active_power_kw") == twin.value("active_power_kw")


def test_level_shift_is_a_real_load_and_its_counter_grows() -> None:
    shift = spec(AnomalyType.LEVEL_SHIFT, at(10), 7200.0, magnitude_pct=25.0, counter="energy_import_kwh")
    faulty, twin = pair(shift, start=at(9))
    for minute in range(1, 4 * 60):
        step_both((faulty, twin), at(9) + timedelta(minutes=minute))
        if minute == 90:
            assert faulty.value("active_power_kw") == pytest.approx(125.0)  # 25 % of 100 kW
    extra_kwh = faulty.value("energy_import_kwh") - twin.value("energy_import_kwh")
    assert extra_kwh == pytest.approx(25.0 * 2)
    assert labels_of(faulty)[0]["magnitude"] == 25.0


def test_night_load_acts_at_night_only_with_one_label_per_night_and_raises_the_kwh_counter() -> None:
    extra = spec(AnomalyType.NIGHT_LOAD, at(12), 2 * 86400.0, magnitude=40.0, counter="energy_import_kwh")
    faulty, twin = pair(extra, start=at(12))
    for minute in range(1, 2 * 24 * 60 + 1):
        now = at(12) + timedelta(minutes=minute)
        step_both((faulty, twin), now)
        local_hour = now.astimezone(SHANGHAI).hour
        night = local_hour >= 22 or local_hour < 6
        assert faulty.value("active_power_kw") == twin.value("active_power_kw") + (40.0 if night else 0.0)
    assert faulty.value("energy_import_kwh") - twin.value("energy_import_kwh") == pytest.approx(40.0 * 16)
    labels = labels_of(faulty)
    assert [(label["start"], label["end"]) for label in labels] == [
        ("2026-03-04T14:00:00+00:00", "2026-03-04T22:00:00+00:00"),  # Wednesday 22:00 to Thursday 06:00
        ("2026-03-05T14:00:00+00:00", "2026-03-05T22:00:00+00:00"),
    ]
    assert {label["counter"] for label in labels} == {"energy_import_kwh"}


def test_random_schedule_is_a_function_of_the_seed() -> None:
    def month(seed: int) -> list[dict[str, Any]]:
        device = meter(at(0))
        device.attach(AnomalyInjector("m", tz=SHANGHAI, random=RandomAnomalies(per_day=2.0, seed=seed)))
        for hour in range(1, 30 * 24):
            device.step(at(hour))
        return labels_of(device)

    first, again, other = month(1), month(1), month(2)
    assert first == again
    assert first != other
    assert 30 <= len(first) <= 95  # Poisson, mean 2 a day over 30 days (each start seen at 1 h ticks)
    assert {label["source"] for label in first} == {"random"}
    assert {label["type"] for label in first} <= {t.value for t in AnomalyType}


def test_label_file_writes_json_lines(tmp_path: Path) -> None:
    device = meter(at(9))
    device.attach(AnomalyInjector("m", [spec(AnomalyType.SPIKE, at(9), 60.0, magnitude=1.0)], tz=SHANGHAI))
    assert isinstance(device.layer, AnomalyInjector)
    path = tmp_path / "labels.jsonl"
    path.write_text("stale line\n", encoding="utf-8")
    file = LabelFile(path)
    file.write(device.layer.drain_labels())
    file.write([])
    [line] = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["type"] == "spike"
    assert file.written == 1


# --------------------------------------------------------------------------------------------------
# From the site document, through the plant, onto the wire


SITE = """
site: {{id: t, name: Test site, timezone: Asia/Shanghai}}
hierarchy: [{{id: g, name: Group, level: group}}]
devices:
  - id: m1
    node: g
    kind: power_meter
    protocol: modbus_tcp
    modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1}}
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity, modbus: {{address: 0, type: float32}}}}
      - {{key: energy_import_kwh, kind: energy_counter, unit: kWh, carrier: electricity,
          modbus: {{address: 2, type: float32}}}}
    simulation:
      profile: flat
      base_kw: 50
      peak_kw: 50
      noise_pct: 0
      anomalies:
        - {{type: spike, start: 0, duration_min: 600, magnitude: 1000}}
        - {{type: night_load, start: "2026-03-04T20:00", duration_s: 86400, magnitude: 10}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def document(port: int) -> dict[str, Any]:
    return parse_site(SITE.format(port=port)).model_dump(mode="json")


async def test_a_configured_anomaly_shows_on_the_wire_and_in_the_labels_file(tmp_path: Path) -> None:
    port, labels = free_port(), tmp_path / "labels.jsonl"
    plant = SimulatedPlant.from_document(
        document(port), start=at(12), speed=600.0, tick_s=0.02, labels=labels
    )
    client = AsyncModbusTcpClient("127.0.0.1", port=port, reconnect_delay=0, timeout=2, retries=0)
    async with plant:
        assert await client.connect()
        try:
            response = await client.read_holding_registers(0, count=2, device_id=1)
            assert not response.isError()
            power_kw = struct.unpack(">f", struct.pack(">HH", *response.registers))[0]
            assert power_kw == pytest.approx(1050.0)  # 50 kW + the spike
        finally:
            client.close()
        async with asyncio.timeout(10):
            while not labels.exists() or not labels.read_text(encoding="utf-8"):
                await asyncio.sleep(0.02)
    lines = [json.loads(line) for line in labels.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["device"] == "m1"
    assert lines[0]["type"] == "spike"
    assert lines[0]["start"] == "2026-03-04T04:00:00+00:00"
    assert lines[0]["magnitude"] == 1000.0
    assert [label.type for label in plant.labels][:1] == [AnomalyType.SPIKE]


def test_a_night_load_from_the_document_integrates_into_the_counter() -> None:
    plant = SimulatedPlant.from_document(document(free_port()), start=at(12))
    faulty = plant.device("m1")
    energy = faulty.value("energy_import_kwh")
    for minute in range(1, 24 * 60 + 1):
        faulty.step(at(12) + timedelta(minutes=minute))
    # 50 kW all day, the night load 10 kW from 22:00 to 06:00 (the spike is a glitch: no energy)
    assert faulty.value("energy_import_kwh") - energy == pytest.approx(50.0 * 24 + 10.0 * 8)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s["anomalies"][0].update(type="disco"),
            "devices[0] (m1).simulation.anomalies[0].type: unknown anomaly type 'disco'",
        ),
        (
            lambda s: s["anomalies"][0].update(start="someday"),
            "devices[0] (m1).simulation.anomalies[0].start: expected seconds",
        ),
        (
            lambda s: s["anomalies"][1].update(magnitude=None),
            "devices[0] (m1).simulation.anomalies[1]: a night_load anomaly needs exactly one",
        ),
        (
            lambda s: s.update(random_anomalies={"per_day": 0}),
            "devices[0] (m1).simulation.random_anomalies: per_day must be in (0, 1000]",
        ),
        (lambda s: s.update(sums=["nope"]), "devices[0] (m1).simulation.sums[0]: unknown device 'nope'"),
        (lambda s: s.update(sums=["m1"]), "simulation.sums: devices sum each other in a circle"),
    ],
)
def test_bad_anomaly_and_sums_entries_name_the_field(edit: Any, message: str) -> None:
    doc = document(free_port())
    edit(doc["devices"][0]["simulation"])
    with pytest.raises(DocumentError) as caught:
        SimulatedPlant.from_document(doc)
    assert str(caught.value).startswith(message)


def test_the_site_loader_checks_anomalies_too() -> None:
    bad = SITE.format(port=15000).replace("magnitude: 1000", "magnitude: 1000, magnitude_pct: 5")
    with pytest.raises(ConfigError, match="anomalies"):
        parse_site(bad)
