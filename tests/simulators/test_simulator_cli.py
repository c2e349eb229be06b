"""``python -m simulators``: the READY line, serving, clean stop; document checks; plant time."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from scada.config import parse_site
from simulators.modbus_server import SimulatorError
from simulators.plant import DocumentError, SimulatedPlant

ROOT = Path(__file__).resolve().parents[2]

SITE = """
site: {{id: t, name: Test site, timezone: Asia/Shanghai}}
hierarchy: [{{id: g, name: Group, level: group}}]
templates:
  meter:
    points:
      - {{key: voltage_v, kind: voltage, unit: V, scale: 0.1, modbus: {{address: 0, type: uint16}}}}
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity,
          modbus: {{address: 1, type: float32}}}}
devices:
  - {{id: m1, node: g, kind: power_meter, protocol: modbus_tcp, template: meter,
      modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1}},
      simulation: {{profile: flat, base_kw: 10, peak_kw: 10, noise_pct: 0}}}}
  - {{id: m2, node: g, kind: power_meter, protocol: modbus_tcp, template: meter,
      modbus: {{host: 127.0.0.1, port: {port}, unit_id: 2}}}}
  - {{id: pv, node: g, kind: pv_inverter, protocol: modbus_tcp, modbus: {{host: 127.0.0.1, port: {port2}}},
      simulation: {{profile: pv, peak_kw: 50}},
      points: [{{key: power_limit_pct, kind: setpoint, unit: "%", writable: true, modbus: {{address: 0}}}}]}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


def document(port: int, port2: int) -> dict[str, Any]:
    return parse_site(SITE.format(port=port, port2=port2)).model_dump(mode="json")


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()


async def spawn(site_file: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators",
        "--site",
        str(site_file),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.fixture
async def simulators(
    tmp_path: Path, ports: tuple[int, int]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    site_file = tmp_path / "site.json"
    site_file.write_text(json.dumps(document(*ports)), encoding="utf-8")
    proc = await spawn(site_file, "--speed", "10")
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            ready = (await proc.stdout.readline()).decode()
        yield proc, ready
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.slow
async def test_cli_serves_until_sigint_then_exits_zero(
    simulators: tuple[asyncio.subprocess.Process, str], ports: tuple[int, int]
) -> None:
    proc, ready = simulators
    port, port2 = ports
    assert ready == f"SIMULATORS READY 3 devices on 127.0.0.1:{port} 127.0.0.1:{port2}\n"

    client = AsyncModbusTcpClient("127.0.0.1", port=port, reconnect_delay=0, timeout=2, retries=0)
    try:
        assert await client.connect()
        response = await client.read_holding_registers(0, count=1, device_id=1)
        assert not response.isError()
        assert 220 < response.registers[0] / 10 < 240  # voltage_v, scale 0.1
        refused = await client.read_holding_registers(50, count=1, device_id=2)
        assert refused.isError()
        assert refused.exception_code == 2  # not a configured register
    finally:
        client.close()

    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(10):
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert stdout == b""  # nothing but the READY line ever goes to stdout
    assert b"Traceback" not in stderr


@pytest.mark.slow
async def test_cli_stops_on_sigterm(simulators: tuple[asyncio.subprocess.Process, str]) -> None:
    proc, ready = simulators
    assert proc.stderr is not None
    assert ready.startswith("SIMULATORS READY"), (await proc.stderr.read()).decode()
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        await proc.wait()
    assert proc.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["devices"][1].update(template="meter", points=[]), "devices[1] (m2).template"),
        (
            lambda d: d["devices"][0]["points"][1]["modbus"].update(type="float128"),
            "points[1] (active_power_kw).modbus",
        ),
        (
            lambda d: d["devices"][2]["simulation"].update(profile="disco"),
            "devices[2] (pv).simulation.profile",
        ),
    ],
)
async def test_cli_bad_document_exits_2_naming_the_field(
    tmp_path: Path, ports: tuple[int, int], edit: Any, field: str
) -> None:
    doc = document(*ports)
    edit(doc)
    site_file = tmp_path / "site.json"
    site_file.write_text(json.dumps(doc), encoding="utf-8")
    proc = await spawn(site_file)
    async with asyncio.timeout(20):
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 2
    assert field in stderr.decode()
    assert stdout == b""


@pytest.mark.slow
async def test_cli_unreadable_or_invalid_json_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    for path, message in (
        (broken, "broken.json:1:2: not valid JSON"),
        (tmp_path / "missing.json", "cannot read"),
    ):
        proc = await spawn(path)
        async with asyncio.timeout(20):
            _, stderr = await proc.communicate()
        assert proc.returncode == 2
        assert message in stderr.decode()


@pytest.mark.slow
async def test_cli_writes_anomaly_labels_from_the_chosen_start(
    tmp_path: Path, ports: tuple[int, int]
) -> None:
    doc = document(*ports)
    doc["devices"][0]["simulation"]["anomalies"] = [
        {"type": "spike", "point": "active_power_kw", "start": "30min", "duration_s": 600, "magnitude": 5.0}
    ]
    site_file, labels = tmp_path / "site.json", tmp_path / "labels.jsonl"
    site_file.write_text(json.dumps(doc), encoding="utf-8")
    start = "2026-03-04T12:00:00+08:00"
    proc = await spawn(site_file, "--speed", "3600", "--start", start, "--labels", str(labels))
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            assert (await proc.stdout.readline()).startswith(b"SIMULATORS READY")
            while not labels.read_text(encoding="utf-8"):  # 30 simulated minutes: 0.5 s
                await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    [label] = [json.loads(line) for line in labels.read_text(encoding="utf-8").splitlines()]
    assert label["device"] == "m1"
    assert label["start"] == "2026-03-04T04:30:00+00:00"
    assert label["end"] == "2026-03-04T04:40:00+00:00"
    assert label["value_at_start"] == 10.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--start", "2026-03-04T12:00"), "give a UTC offset"),
        (("--start", "noon"), "not an ISO 8601 time"),
        (("--labels", "/nonexistent/dir/labels.jsonl"), "cannot write labels"),
    ],
)
async def test_cli_bad_start_or_labels_exits_2(
    tmp_path: Path, ports: tuple[int, int], args: tuple[str, ...], message: str
) -> None:
    site_file = tmp_path / "site.json"
    site_file.write_text(json.dumps(document(*ports)), encoding="utf-8")
    proc = await spawn(site_file, *args)
    async with asyncio.timeout(20):
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 2
    assert message in stderr.decode()
    assert stdout == b""


# --------------------------------------------------------------------------------------------------
# The same checks in-process, and the plant's clock


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["devices"][1].update(template="meter"),
            "devices[1] (m2).template: templates are not expanded: give the simulators the normalized "
            "document that `scada simulate` writes",
        ),
        (lambda d: d["devices"][1].update(points=[]), "devices[1] (m2).points: no points"),
        (
            lambda d: d["devices"][1]["modbus"].update(unit_id=1),
            "devices[1] (m2).modbus.unit_id: unit 1 on 127.0.0.1:",
        ),
        (
            lambda d: d["devices"][0].update(kind="toaster"),
            "devices[0] (m1).kind: unknown device kind 'toaster'",
        ),
        (lambda d: d["devices"][0]["modbus"].update(port="x"), "devices[0] (m1).modbus.port: expected int"),
        (
            lambda d: d["devices"][0]["points"][0]["modbus"].update(table="coil"),
            "devices[0] (m1).points[0] (voltage_v).modbus: type 'uint16' does not fit the table 'coil'",
        ),
        (
            lambda d: d["devices"][0]["points"][1]["modbus"].update(address=0),
            "devices[0] (m1).points: registers of 'voltage_v' and 'active_power_kw' overlap",
        ),
        (
            lambda d: d["devices"][2]["simulation"].update(peak_kw=-1),
            "devices[2] (pv).simulation.peak_kw: must be >= 0",
        ),
        (lambda d: d["site"].update(timezone="Mars/Olympus"), "site.timezone: unknown time zone"),
        (lambda d: d.update(devices=[]), "devices: expected a non-empty list"),
    ],
)
def test_document_errors_name_the_field(ports: tuple[int, int], edit: Any, message: str) -> None:
    doc = document(*ports)
    edit(doc)
    with pytest.raises(DocumentError) as caught:
        SimulatedPlant.from_document(doc)
    assert str(caught.value).startswith(message)


async def test_plant_runs_on_accelerated_time_and_stops_cleanly(ports: tuple[int, int]) -> None:
    start = datetime(2026, 3, 4, 4, tzinfo=UTC)  # noon in Shanghai
    plant = SimulatedPlant.from_document(document(*ports), speed=3600.0, start=start, tick_s=0.02)
    assert plant.speed == 3600.0
    assert plant.endpoints == (("127.0.0.1", ports[0]), ("127.0.0.1", ports[1]))
    meter = plant.device("m1")
    energy_kwh = meter.value("energy_import_kwh")
    assert not plant.running
    async with plant:
        await wait_until(lambda: meter.now >= start + timedelta(minutes=30))  # half an hour simulated
        assert plant.now() >= meter.now
    assert not plant.running
    assert meter.value("energy_import_kwh") > energy_kwh  # 10 kW for half an hour or more
    with pytest.raises(KeyError, match="no simulated device 'nope'"):
        plant.device("nope")
    for port in ports:  # the sockets are closed: the ports can be bound again
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


async def test_a_taken_port_fails_start_and_leaves_nothing_open(ports: tuple[int, int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", ports[1]))
        squatter.listen()
        plant = SimulatedPlant.from_document(document(*ports))
        with pytest.raises(SimulatorError, match=f"cannot listen on 127.0.0.1:{ports[1]}"):
            await plant.start()
        assert not plant.running
    async with plant:  # the first endpoint was closed again: a retry can bind both
        assert plant.running


async def test_a_main_meter_listed_first_sums_the_same_instant(ports: tuple[int, int]) -> None:
    doc = document(*ports)
    doc["devices"][0]["simulation"]["sums"] = ["m2", "pv"]  # m1 sums devices listed after it
    doc["devices"][1]["simulation"] = {"profile": "office", "base_kw": 5, "peak_kw": 80}
    start = datetime(2026, 3, 4, 0, tzinfo=UTC)  # 08:00 in Shanghai: office ramp and sunrise
    plant = SimulatedPlant.from_document(doc, speed=7200.0, start=start, tick_s=0.02)
    main, load, pv = plant.device("m1"), plant.device("m2"), plant.device("pv")
    async with plant:
        await wait_until(lambda: main.now >= start + timedelta(hours=2))
    assert main.now == load.now == pv.now
    expected_kw = 10.0 + load.value("active_power_kw") - pv.value("active_power_kw")
    assert main.value("active_power_kw") == pytest.approx(expected_kw)
    assert pv.value("active_power_kw") > 0


async def test_a_write_the_device_cannot_honour_reads_back_what_it_holds(ports: tuple[int, int]) -> None:
    async with SimulatedPlant.from_document(document(*ports)) as plant:
        client = AsyncModbusTcpClient("127.0.0.1", port=ports[1], reconnect_delay=0, timeout=2, retries=0)
        try:
            assert await client.connect()
            assert not (await client.write_register(0, 150, device_id=1)).isError()  # power_limit_pct
            response = await client.read_holding_registers(0, count=1, device_id=1)
        finally:
            client.close()
    assert response.registers == [100]  # the inverter caps at 100 %: the read-back shows the mismatch
    assert plant.device("pv").value("power_limit_pct") == 100.0
