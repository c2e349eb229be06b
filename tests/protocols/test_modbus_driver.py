"""ModbusDriver against a real SimulatedPlant over real sockets (in-process, free ports)."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import pytest

from protocols.modbus.config import DataType, ModbusPointConfig, RegisterTable
from protocols.modbus.driver import ModbusDriver, ModbusPointSpec, PointRejected
from scada.config import DeviceConfig, SiteConfig, parse_site
from scada.model import DeviceProtocolError, DeviceUnavailable, PointId, QualityCode, make_point_id
from scada.runtime import FakeClock
from simulators.plant import SimulatedPlant

START = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)  # Wednesday 10:00 in Shanghai

SITE = """
site: {{id: t, name: Test site, timezone: Asia/Shanghai}}
hierarchy: [{{id: g, name: Group, level: group}}]
devices:
  - id: meter
    node: g
    kind: power_meter
    protocol: modbus_tcp
    modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1, timeout_s: 0.5}}
    simulation: {{profile: flat, base_kw: 100, peak_kw: 100, noise_pct: 0, seed: 1}}
    points:
      - {{key: voltage_l1_v, kind: voltage, unit: V, modbus: {{address: 0, type: float32}}}}
      - {{key: voltage_l2_v, kind: voltage, unit: V,
          modbus: {{address: 2, type: float32, word_order: little}}}}
      - {{key: voltage_l3_v, kind: voltage, unit: V, scale: 0.1, modbus: {{address: 4, type: uint16}}}}
      - {{key: current_a, kind: current, unit: A, scale: 0.01,
          modbus: {{address: 5, type: int32, word_order: little, byte_order: little}}}}
      # registers 7..9 are not configured
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity,
          modbus: {{address: 10, type: float64}}}}
      - {{key: reactive_power_kvar, kind: power, unit: kvar, modbus: {{address: 14, type: float32}}}}
      - {{key: power_factor, kind: power_factor, unit: "1", scale: 0.001,
          modbus: {{address: 16, type: int16}}}}
      - {{key: frequency_hz, kind: frequency, unit: Hz, scale: 0.01,
          modbus: {{table: input, address: 0, type: uint16}}}}
      - {{key: energy_import_kwh, kind: energy_counter, unit: kWh, carrier: electricity, scale: 0.1,
          modbus: {{table: input, address: 1, type: uint64}}}}
      - {{key: breaker_closed, kind: status, unit: "1",
          modbus: {{table: discrete_input, address: 3, type: bool}}}}
      - {{key: power_limit_pct, kind: setpoint, unit: "%", writable: true,
          modbus: {{address: 100, type: uint16}}}}
      - {{key: setpoint_kw, kind: setpoint, unit: kW, writable: true,
          modbus: {{address: 102, type: float32}}}}
      - {{key: relay_on, kind: status, unit: "1", writable: true,
          modbus: {{table: coil, address: 0, type: bool}}}}
  - id: line-2
    node: g
    kind: production_line
    protocol: modbus_tcp
    modbus: {{host: 127.0.0.1, port: {port}, unit_id: 2, timeout_s: 0.5}}
    simulation: {{profile: flat, base_kw: 42, peak_kw: 42, noise_pct: 0, seed: 2}}
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity,
          modbus: {{address: 10, type: float64}}}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_driver(
    device: DeviceConfig, clock: FakeClock, *, extra: Sequence[ModbusPointSpec] = (), **modbus: object
) -> ModbusDriver:
    """Build a driver the way scada.app.build_driver does, optionally with points the device lacks."""
    assert device.modbus is not None
    specs = [
        ModbusPointSpec(
            point=device.point_id(p.key), config=p.modbus, scale=p.scale, offset=p.offset, writable=p.writable
        )
        for p in device.points
        if p.modbus is not None
    ]
    return ModbusDriver(device.id, device.modbus.model_copy(update=modbus), [*specs, *extra], clock=clock)


def pid(key: str, device: str = "meter") -> PointId:
    return make_point_id(device, key)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def site(port: int) -> SiteConfig:
    return parse_site(SITE.format(port=port))


@pytest.fixture
async def plant(site: SiteConfig) -> AsyncIterator[SimulatedPlant]:
    async with SimulatedPlant.from_document(site.model_dump(mode="json"), start=START) as plant:
        yield plant


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def meter(site: SiteConfig, plant: SimulatedPlant, clock: FakeClock) -> AsyncIterator[ModbusDriver]:
    driver = make_driver(site.device("meter"), clock)
    await driver.connect()
    try:
        yield driver
    finally:
        await driver.close()


async def test_reads_every_point_of_a_three_phase_meter(meter: ModbusDriver, plant: SimulatedPlant) -> None:
    readings = {r.point: r for r in await meter.read()}

    assert list(readings) == list(meter.points)
    assert all(r.quality.is_good for r in readings.values()), [str(r.quality) for r in readings.values()]
    assert {r.ts for r in readings.values()} == {START}
    values = {point.split(".")[1]: r.value or 0.0 for point, r in readings.items()}
    physics = plant.device("meter")
    assert values["voltage_l1_v"] == pytest.approx(physics.value("voltage_l1_v"), abs=1e-4)  # float32
    assert values["voltage_l2_v"] == pytest.approx(
        physics.value("voltage_l2_v"), abs=1e-4
    )  # little-endian words
    assert values["voltage_l3_v"] == pytest.approx(physics.value("voltage_l3_v"), abs=0.051)  # uint16 x 0.1
    for key in ("voltage_l1_v", "voltage_l2_v", "voltage_l3_v"):
        assert 220 < values[key] < 240
    assert values["active_power_kw"] == 100.0  # flat profile, no noise, float64
    apparent_kva = math.hypot(100.0, values["reactive_power_kvar"])
    assert values["current_a"] == pytest.approx(
        apparent_kva * 1000 / (3 * physics.value("voltage_v")), abs=0.01
    )
    assert 0.9 < values["power_factor"] <= 1.0
    assert values["frequency_hz"] == pytest.approx(50.0, abs=0.05)
    assert values["energy_import_kwh"] > 0
    assert values["breaker_closed"] == 0.0  # not modelled: served as 0
    assert values["power_limit_pct"] == 100.0


async def test_override_shows_on_the_next_read(meter: ModbusDriver, plant: SimulatedPlant) -> None:
    physics = plant.device("meter")
    physics.override("active_power_kw", 123.5)
    physics.override("voltage_l1_v", 231.25)
    values = {r.point: r.value for r in await meter.read()}
    assert values[pid("active_power_kw")] == 123.5
    assert values[pid("voltage_l1_v")] == 231.25

    physics.clear_override("active_power_kw")
    values = {r.point: r.value for r in await meter.read()}
    assert values[pid("active_power_kw")] == 100.0


async def test_exception_response_makes_that_block_bad_and_keeps_the_rest(
    site: SiteConfig, plant: SimulatedPlant, clock: FakeClock
) -> None:
    ghost = ModbusPointSpec(point=pid("ghost"), config=ModbusPointConfig(address=900))
    driver = make_driver(site.device("meter"), clock, extra=[ghost])
    await driver.connect()
    try:
        readings = {r.point: r for r in await driver.read()}
    finally:
        await driver.close()
    bad = readings.pop(pid("ghost"))
    assert bad.value is None
    assert bad.quality.code is QualityCode.BAD
    assert bad.quality.reason == "exception 2: illegal data address"
    assert all(r.quality.is_good for r in readings.values())


async def test_refused_merged_block_is_split_into_point_reads_once(
    site: SiteConfig, plant: SimulatedPlant, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Registers 7..9 are not configured in the simulator; a merged read spanning them is refused.
    ghost = ModbusPointSpec(point=pid("ghost"), config=ModbusPointConfig(address=8))
    driver = make_driver(site.device("meter"), clock, extra=[ghost], max_gap_registers=10)
    assert [str(b) for b in driver.blocks][:2] == ["holding 0..16", "holding 100..103"]
    await driver.connect()
    try:
        with caplog.at_level(logging.INFO, logger="protocols.modbus.driver"):
            first = {r.point: r for r in await driver.read()}
            second = {r.point: r for r in await driver.read()}
    finally:
        await driver.close()
    for readings in (first, second):
        assert readings.pop(pid("ghost")).quality.reason == "exception 2: illegal data address"
        assert all(r.quality.is_good for r in readings.values())
    assert caplog.text.count("reading its 8 points one by one") == 1
    assert "holding 0..16" not in [str(b) for b in driver.blocks]


async def test_nan_from_a_float_register_is_a_bad_reading(meter: ModbusDriver, plant: SimulatedPlant) -> None:
    plant.device("meter").override("active_power_kw", math.nan)
    readings = {r.point: r for r in await meter.read()}
    bad = readings.pop(pid("active_power_kw"))
    assert bad.value is None
    assert "not a number" in bad.quality.reason
    assert all(r.quality.is_good for r in readings.values())


async def test_write_then_read_back(meter: ModbusDriver, plant: SimulatedPlant) -> None:
    await meter.write(pid("power_limit_pct"), 40.0)  # FC 6
    assert await meter.read_back(pid("power_limit_pct")) == 40.0
    assert plant.device("meter").value("power_limit_pct") == 40.0
    values = {r.point: r.value for r in await meter.read()}
    assert values[pid("active_power_kw")] == 40.0  # the limit feeds the physics: 40 % of 100 kW

    await meter.write(pid("setpoint_kw"), 12.5)  # FC 16
    assert await meter.read_back(pid("setpoint_kw")) == 12.5

    await meter.write(pid("relay_on"), 1.0)  # FC 5
    assert await meter.read_back(pid("relay_on")) == 1.0
    await meter.write(pid("relay_on"), 0.0)
    assert await meter.read_back(pid("relay_on")) == 0.0


@pytest.mark.parametrize(
    ("point", "value", "message"),
    [
        (pid("active_power_kw"), 1.0, "not writable"),
        (pid("nope"), 1.0, "not a point of device meter"),
        (pid("power_limit_pct"), 70_000.0, "out of range for uint16"),
        (pid("power_limit_pct"), math.nan, "not a finite number"),
    ],
)
async def test_write_refused_before_anything_is_sent(
    meter: ModbusDriver, point: PointId, value: float, message: str
) -> None:
    with pytest.raises(PointRejected, match=message):
        await meter.write(point, value)
    assert meter.connected
    assert all(r.quality.is_good for r in await meter.read())


async def test_write_refused_by_the_device_is_a_protocol_error(
    site: SiteConfig, plant: SimulatedPlant, clock: FakeClock
) -> None:
    # The driver believes voltage_l3_v is writable; the meter does not.
    device = site.device("meter")
    l3 = next(p for p in device.points if p.key == "voltage_l3_v")
    assert l3.modbus is not None
    spec = ModbusPointSpec(point=pid("l3_as_setpoint"), config=l3.modbus, scale=0.1, writable=True)
    driver = make_driver(device, clock, extra=[spec], max_gap_registers=0)
    await driver.connect()
    try:
        with pytest.raises(DeviceProtocolError, match="exception 2: illegal data address"):
            await driver.write(pid("l3_as_setpoint"), 231.0)
        assert driver.connected  # a refusal is an answer: the connection is fine
    finally:
        await driver.close()


async def test_unit_ids_behind_one_port(site: SiteConfig, plant: SimulatedPlant, clock: FakeClock) -> None:
    meter, line = make_driver(site.device("meter"), clock), make_driver(site.device("line-2"), clock)
    stranger = make_driver(site.device("line-2"), clock, unit_id=7)
    for driver in (meter, line, stranger):
        await driver.connect()
    try:
        assert {r.point: r.value for r in await meter.read()}[pid("active_power_kw")] == 100.0
        assert [r.value for r in await line.read()] == [42.0]
        with pytest.raises(DeviceUnavailable, match="exception 11: gateway target device failed to respond"):
            await stranger.read()
    finally:
        for driver in (meter, line, stranger):
            await driver.close()


async def test_nothing_listening_is_unavailable_within_the_timeout(
    site: SiteConfig, clock: FakeClock
) -> None:
    driver = make_driver(site.device("meter"), clock, port=free_port(), timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(DeviceUnavailable, match="cannot connect"):
        await driver.connect()
    assert time.monotonic() - started < 0.5 + 0.3
    assert not driver.connected
    await driver.close()


async def test_silent_device_times_out_and_drops_the_connection(site: SiteConfig, clock: FakeClock) -> None:
    hung_up = asyncio.Event()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(1024):
                pass  # accept requests, never answer
        finally:
            writer.close()
            hung_up.set()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    silent_port = server.sockets[0].getsockname()[1]
    driver = make_driver(site.device("meter"), clock, port=silent_port, timeout_s=0.3)
    try:
        await driver.connect()
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable, match=r"no answer to read of holding 0\.\.\d+ within 0.3 s"):
            await driver.read()
        assert 0.25 < time.monotonic() - started < 0.3 + 0.3
        assert not driver.connected
        with pytest.raises(DeviceUnavailable, match="not connected"):
            await driver.read()
        await asyncio.wait_for(hung_up.wait(), 2.0)  # the driver really closed its socket
    finally:
        await driver.close()
        server.close()
        await server.wait_closed()


async def test_simulator_restarted_on_the_same_port(meter: ModbusDriver, plant: SimulatedPlant) -> None:
    assert all(r.quality.is_good for r in await meter.read())
    await plant.stop()
    with pytest.raises(DeviceUnavailable):
        await meter.read()
    await meter.close()

    await plant.start()
    await meter.connect()
    assert all(r.quality.is_good for r in await meter.read())


async def test_inter_request_gap_paces_the_block_reads(
    site: SiteConfig, plant: SimulatedPlant, clock: FakeClock
) -> None:
    driver = make_driver(site.device("meter"), clock, inter_request_gap_s=0.05, max_gap_registers=0)
    gaps = len(driver.blocks) - 1
    assert gaps >= 5
    await driver.connect()
    try:
        started = time.monotonic()
        assert all(r.quality.is_good for r in await driver.read())
        assert time.monotonic() - started >= gaps * 0.05
    finally:
        await driver.close()


async def test_cancel_as_the_answer_arrives_is_not_swallowed(
    site: SiteConfig, plant: SimulatedPlant, clock: FakeClock
) -> None:
    """A cancel that lands in the same loop turn as the answer must still cancel the read (on
    Python 3.11 ``asyncio.wait_for`` would return the result and drop it, CPython gh-86296), or a
    cancelled session would poll on forever."""
    driver = make_driver(site.device("line-2"), clock)  # one block: one request per read
    await driver.connect()
    try:
        connection = driver._connection  # reaching in to time the race exactly
        assert connection is not None
        assert connection._transport is not None
        transport = connection._transport
        task = asyncio.create_task(driver.read())
        transport.set_protocol(_CancelOnAnswer(connection, task))
        with pytest.raises(asyncio.CancelledError):
            await task
        transport.set_protocol(connection)
        assert driver.connected  # the answer was consumed: the connection stays usable
        assert [r.value for r in await driver.read()] == [42.0]
    finally:
        await driver.close()


class _CancelOnAnswer(asyncio.Protocol):
    """Hand the answer to the connection, then cancel the reading task in the same loop turn."""

    def __init__(self, inner: asyncio.Protocol, task: asyncio.Task[object]) -> None:
        self._inner, self._task = inner, task

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)
        self._task.cancel()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)


async def test_read_before_connect_and_repeated_close(site: SiteConfig, clock: FakeClock) -> None:
    driver = make_driver(site.device("meter"), clock)
    with pytest.raises(DeviceUnavailable, match="not connected"):
        await driver.read()
    await driver.close()
    await driver.close()


def test_point_spec_checks_itself() -> None:
    with pytest.raises(ValueError, match="scale must not be 0"):
        ModbusPointSpec(point=pid("x"), config=ModbusPointConfig(address=0), scale=0.0)
    with pytest.raises(ValueError, match="cannot be written"):
        ModbusPointSpec(
            point=pid("x"),
            config=ModbusPointConfig(table=RegisterTable.INPUT, address=0, type=DataType.UINT16),
            writable=True,
        )
