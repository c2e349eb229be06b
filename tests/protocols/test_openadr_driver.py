"""OpenAdrDriver under a real DeviceSession, with the simulated EMS (an openleadr VEN) over real sockets.

The VTN state lives in the local PostgreSQL (the tables of migration 011). The VEN polls every 0.5 s,
so each exchange takes a poll or two; the whole module runs in well under 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from protocols.openadr.config import OpenAdrDeviceConfig, OpenAdrPointConfig, OpenAdrSignal, OpenAdrStatus
from protocols.openadr.driver import OpenAdrDriver, OpenAdrPointSpec
from protocols.openadr.store import (
    EventRecord,
    EventStatus,
    OptType,
    PostgresVtnStateStore,
    Registration,
    VtnState,
)
from scada.config import Protocol, parse_site
from scada.gateway import Gateway, build_driver
from scada.model import (
    AvailabilityEvent,
    Command,
    CommandResult,
    CommandStatus,
    ConfigError,
    DeviceUnavailable,
    PointId,
    Priority,
    QualityCode,
    Reading,
    ServiceError,
    make_point_id,
)
from scada.runtime import SystemClock, TaskSupervisor
from scada.sessions import DeviceSession
from simulators.openadr_ven import SimulatedVen

pytestmark = pytest.mark.timeout(60)

DEVICE = "ems1"
SHED = make_point_id(DEVICE, "shed_request_kw")
LEVEL = make_point_id(DEVICE, "dr_level")
EVENT_STATUS = make_point_id(DEVICE, "event_status")
OPT_STATUS = make_point_id(DEVICE, "opt_status")
LOAD = make_point_id(DEVICE, "load_kw")
REDUCTION = make_point_id(DEVICE, "reduction_kw")
MIGRATION = Path(__file__).resolve().parents[2] / "scada" / "migrations" / "011_openadr.sql"
BASE_LOAD_KW = 800.0


def specs() -> list[OpenAdrPointSpec]:
    return [
        OpenAdrPointSpec(
            point=SHED,
            config=OpenAdrPointConfig(signal=OpenAdrSignal.LOAD_DISPATCH),
            unit="kW",
            writable=True,
        ),
        OpenAdrPointSpec(
            point=LEVEL, config=OpenAdrPointConfig(signal=OpenAdrSignal.SIMPLE), unit="1", writable=True
        ),
        OpenAdrPointSpec(point=EVENT_STATUS, config=OpenAdrPointConfig(status=OpenAdrStatus.EVENT), unit="1"),
        OpenAdrPointSpec(point=OPT_STATUS, config=OpenAdrPointConfig(status=OpenAdrStatus.OPT), unit="1"),
        OpenAdrPointSpec(
            point=LOAD, config=OpenAdrPointConfig(resource_id="load", measurement="powerReal"), unit="kW"
        ),
        OpenAdrPointSpec(point=REDUCTION, config=OpenAdrPointConfig(resource_id="reduction"), unit="kW"),
    ]


def device_config(port: int = 0, **overrides: object) -> OpenAdrDeviceConfig:
    values: dict[str, object] = {
        "ven_name": "site-ems",
        "ven_id": "ven-ems1",
        "listen_port": port,
        "poll_interval_s": 0.5,
        "timeout_s": 3.0,
        "market_context": "oadr://test/carbon-budget",
    }
    values.update(overrides)
    return OpenAdrDeviceConfig.model_validate(values)


@dataclass
class Sink:
    """ReadingSink, EventSink and DeadLetterSink that keep everything."""

    readings: list[Reading] = field(default_factory=list)
    events: list[AvailabilityEvent] = field(default_factory=list)
    dead: list[tuple[str, bytes, str]] = field(default_factory=list)

    async def publish(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)

    async def publish_event(self, event: AvailabilityEvent) -> None:
        self.events.append(event)

    def reject(self, *, origin: str, payload: bytes, reason: str) -> None:
        self.dead.append((origin, payload, reason))

    async def wait_for(self, predicate: Callable[[Reading], bool], timeout_s: float = 10.0) -> Reading:
        async with asyncio.timeout(timeout_s):
            while True:
                for reading in reversed(self.readings):
                    if predicate(reading):
                        return reading
                await asyncio.sleep(0.05)


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresVtnStateStore]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4, timeout=10)
    try:
        async with pool.acquire() as conn:
            await conn.execute(MIGRATION.read_text(encoding="utf-8"))
        yield PostgresVtnStateStore(pool, timeout_s=5.0)
    finally:
        await pool.close()


@dataclass
class Plant:
    """One VTN (driver under its session) and its sinks."""

    driver: OpenAdrDriver
    session: DeviceSession
    sink: Sink
    task: asyncio.Task[None]

    @property
    def vtn_url(self) -> str:
        return f"http://127.0.0.1:{self.driver.bound_port}/OpenADR2/Simple/2.0b"

    async def execute(self, point: PointId, value: float, correlation_id: str) -> CommandResult:
        return await self.session.execute(
            Command(
                point=point,
                value=value,
                priority=Priority.OPTIMISER,
                source="test",
                reason="carbon budget",
                correlation_id=correlation_id,
            )
        )

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def start_plant(
    store: PostgresVtnStateStore, config: OpenAdrDeviceConfig, sink: Sink | None = None
) -> Plant:
    sink = sink or Sink()
    clock = SystemClock()
    driver = OpenAdrDriver(DEVICE, config, specs(), store=store, clock=clock, dead_letters=sink)
    session = DeviceSession(
        driver,
        points=[s.point for s in specs()],
        sink=sink,
        events=sink,
        period_s=config.poll_interval_s,
        clock=clock,
        stale_after_s=5.0,
        write_timeout_s=3 * config.timeout_s,
    )
    task = asyncio.create_task(session.run())
    async with asyncio.timeout(5):
        while driver.bound_port is None or session.available is not True:
            await asyncio.sleep(0.02)
    return Plant(driver, session, sink, task)


@pytest.fixture
async def plant(store: PostgresVtnStateStore) -> AsyncIterator[Plant]:
    running = await start_plant(store, device_config())
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def ven(plant: Plant) -> AsyncIterator[SimulatedVen]:
    simulated = SimulatedVen(ven_name="site-ems", vtn_url=plant.vtn_url, base_load_kw=BASE_LOAD_KW)
    await simulated.start()
    try:
        yield simulated
    finally:
        await simulated.stop()


def good(point: PointId, check: Callable[[float], bool] = lambda _v: True) -> Callable[[Reading], bool]:
    return lambda r: (
        r.point == point and r.quality.code is QualityCode.GOOD and r.value is not None and check(r.value)
    )


async def test_dispatch_becomes_an_event_the_ven_accepts(plant: Plant, ven: SimulatedVen) -> None:
    assert ven.ven_id == "ven-ems1"
    load = await plant.sink.wait_for(good(LOAD))
    assert load.value == pytest.approx(BASE_LOAD_KW, abs=6)

    result = await plant.execute(SHED, 120.0, "c-shed-1")

    assert result.status is CommandStatus.VERIFIED, result.reason
    assert result.readback == 120.0
    [event] = plant.driver.events
    assert event.correlation_id == "c-shed-1"
    assert event.payload == -120.0  # LOAD_DISPATCH delta: shed 120 kW
    assert event.opt is OptType.OPT_IN
    assert event.duration_s == plant.driver._config.default_duration_s
    [held] = ven.events.values()
    assert (held.event_id, held.signal_name, held.payload) == (event.event_id, "LOAD_DISPATCH", -120.0)
    assert ven.shed_kw() == 120.0
    # The EMS curtails and says so in its TELEMETRY_USAGE report.
    await plant.sink.wait_for(good(REDUCTION, lambda v: v == 120.0))
    await plant.sink.wait_for(good(LOAD, lambda v: abs(v - (BASE_LOAD_KW - 120.0)) < 6))
    await plant.sink.wait_for(good(EVENT_STATUS, lambda v: v == EventStatus.ACTIVE))
    await plant.sink.wait_for(good(OPT_STATUS, lambda v: v == 1.0))
    # The signal point reads as the accepted value, 0 before (what the dispatcher restores).
    shed_values = [r.value for r in plant.sink.readings if r.point == SHED]
    assert shed_values == [0.0, 120.0]

    # Writing 0 (the dispatcher's revert) cancels the event; the EMS acknowledges and stops shedding.
    revert = await plant.execute(SHED, 0.0, "c-shed-1-revert")

    assert revert.status is CommandStatus.VERIFIED, revert.reason
    assert revert.readback == 0.0
    assert ven.events[event.event_id].cancelled
    assert ven.shed_kw() == 0.0
    await plant.sink.wait_for(good(EVENT_STATUS, lambda v: v == EventStatus.CANCELLED))
    await plant.sink.wait_for(good(SHED, lambda v: v == 0.0))


async def test_hold_until_sets_the_interval_and_a_new_dispatch_supersedes(
    plant: Plant, ven: SimulatedVen
) -> None:
    now = plant.driver._clock.now()
    await plant.driver.write(SHED, 50.0, correlation_id="c-a", hold_until=now + timedelta(minutes=15))
    await plant.driver.write(LEVEL, 2.0, correlation_id="c-level")
    await plant.driver.write(SHED, 80.0, correlation_id="c-b", hold_until=now + timedelta(minutes=30))

    first, level, second = plant.driver.events
    assert first.cancelled
    assert not second.cancelled
    assert abs(first.duration_s - 900) < 5
    assert abs(second.duration_s - 1800) < 5
    assert (level.signal.value, level.payload, level.opt) == ("simple", 2.0, OptType.OPT_IN)
    assert await plant.driver.read_back(SHED) == 80.0
    assert await plant.driver.read_back(LEVEL) == 2.0
    assert ven.shed_kw() == 80.0 + 2 * ven.kw_per_level


async def test_opt_out_fails_the_command_with_the_reason(plant: Plant, ven: SimulatedVen) -> None:
    ven.policy = "optOut"

    result = await plant.execute(SHED, 200.0, "c-out")

    assert result.status is CommandStatus.REJECTED
    assert "opted out" in result.reason
    assert ven.shed_kw() == 0.0
    assert await plant.driver.read_back(SHED) == 0.0
    await plant.sink.wait_for(good(OPT_STATUS, lambda v: v == -1.0))


async def test_no_answer_within_the_timeout_fails_and_cancels_the_event(
    plant: Plant, ven: SimulatedVen, store: PostgresVtnStateStore
) -> None:
    await ven.stop()  # the EMS goes away: no polls, no answers

    result = await plant.execute(SHED, 100.0, "c-silent")

    assert result.status is CommandStatus.TIMEOUT
    assert "no opt-in or opt-out from VEN ven-ems1" in result.reason
    assert "within 3 s" in result.reason
    assert "the event was cancelled" in result.reason
    state = await store.load(DEVICE, since=plant.driver._clock.now() - timedelta(hours=1))
    [event] = state.events
    assert event.cancelled
    assert event.opt is OptType.NONE


async def test_refusals_before_sending(plant: Plant) -> None:
    negative = await plant.execute(SHED, -5.0, "c-neg")
    level = await plant.execute(LEVEL, 7.0, "c-level")
    readonly = await plant.execute(LOAD, 1.0, "c-ro")

    assert [r.status for r in (negative, level, readonly)] == [CommandStatus.FAILED] * 3
    assert "cannot be negative" in negative.reason
    assert "0, 1, 2 or 3" in level.reason
    assert "not writable" in readonly.reason
    assert plant.driver.events == ()


async def test_malformed_reports_become_dead_letters_or_bad_readings(plant: Plant, ven: SimulatedVen) -> None:
    await plant.sink.wait_for(good(LOAD))
    ven.report_nan = True
    # NaN is not an xs:float: the VTN refuses the whole oadrUpdateReport and keeps it with the reason.
    async with asyncio.timeout(10):
        while not any("EiReport" in origin and b"nan" in payload for origin, payload, _ in plant.sink.dead):
            await asyncio.sleep(0.05)
    origin, payload, reason = next(d for d in plant.sink.dead if b"nan" in d[1])
    assert origin == f"openadr:{DEVICE}:EiReport"
    assert b"<ei:rID>site-ems-load</ei:rID>" in payload
    assert reason.startswith("HTTP 400: XML failed validation")
    assert "xs:float" in reason
    ven.report_nan = False
    count = len(plant.sink.readings)
    await plant.sink.wait_for(lambda r: plant.sink.readings.index(r) >= count and good(LOAD)(r))

    # A message that is not OpenADR XML is refused by the VTN and kept with the reason.
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{plant.vtn_url}/EiReport",
            data=b"<oadrPayload><broken",
            headers={"content-type": "application/xml"},
            timeout=aiohttp.ClientTimeout(total=5),
        ) as response,
    ):
        assert response.status == 400
    origin, payload, reason = plant.sink.dead[-1]
    assert origin == f"openadr:{DEVICE}:EiReport"
    assert payload == b"<oadrPayload><broken"
    assert reason.startswith("HTTP 400: XML failed validation")


async def test_report_in_a_unit_that_does_not_convert_is_bad_quality(plant: Plant) -> None:
    ven = SimulatedVen(ven_name="site-ems", vtn_url=plant.vtn_url, reduction_as_energy=True)
    await ven.start()
    try:
        bad = await plant.sink.wait_for(lambda r: r.point == REDUCTION and r.quality.code is QualityCode.BAD)
        await plant.sink.wait_for(good(LOAD))  # the other data point of the same report is fine
    finally:
        await ven.stop()
    assert bad.value is None
    assert bad.quality.reason == "VEN reports in kWh, which cannot be converted to kW"


async def test_restart_keeps_events_registration_and_reports(
    store: PostgresVtnStateStore, plant: Plant, ven: SimulatedVen
) -> None:
    result = await plant.execute(SHED, 150.0, "c-before-restart")
    assert result.status is CommandStatus.VERIFIED
    [event] = plant.driver.events
    port = plant.driver.bound_port
    assert port is not None
    await plant.stop()  # the gateway goes down; the EMS keeps its event and keeps polling in vain

    restarted = await start_plant(store, device_config(port))
    try:
        [reloaded] = restarted.driver.events
        assert reloaded == event  # same id, version and answer
        assert restarted.driver.registration is not None
        assert restarted.driver.registration.ven_id == "ven-ems1"
        assert await restarted.driver.read_back(SHED) == 150.0
        # The VEN is still registered (no re-registration) and its reports still map to points.
        await restarted.sink.wait_for(good(REDUCTION, lambda v: v == 150.0))
        await restarted.sink.wait_for(good(EVENT_STATUS, lambda v: v == EventStatus.ACTIVE))
        assert ven.events[event.event_id].opt == "optIn"
        assert ven.shed_kw() == 150.0
        # And the restarted VTN still cancels it through the same event.
        revert = await restarted.execute(SHED, 0.0, "c-after-restart")
        assert revert.status is CommandStatus.VERIFIED, revert.reason
        assert ven.events[event.event_id].cancelled
    finally:
        await restarted.stop()


async def test_unreachable_store_is_a_device_error() -> None:
    class DownStore:
        async def load(self, device: str, *, since: datetime) -> VtnState:
            raise ServiceError("OpenADR state store: connection refused")

        async def save_registration(self, device: str, registration: Registration | None) -> None:
            raise ServiceError("down")

        async def save_event(self, device: str, event: EventRecord) -> None:
            raise ServiceError("down")

    driver = OpenAdrDriver(
        DEVICE + "x",
        device_config(ven_id="other"),
        [],
        store=DownStore(),
        clock=SystemClock(),
        dead_letters=Sink(),
    )
    with pytest.raises(
        DeviceUnavailable, match="cannot load the VTN state: OpenADR state store: connection refused"
    ):
        await driver.connect()


# --------------------------------------------------------------------------------------------------
# The site file: an EMS device, and errors that name the field

EMS_SITE = """
site: {id: s, name: S}
hierarchy:
  - {id: g, name: G, level: group}
devices:
  - id: ems1
    node: g
    kind: power_meter
    protocol: openadr
    openadr: {ven_name: site-ems, ven_id: ven-ems1, listen_port: 8650, poll_interval_s: 10, timeout_s: 30}
    points:
      - {key: shed_request_kw, kind: setpoint, unit: kW, writable: true, openadr: {signal: load_dispatch}}
      - {key: event_status, kind: status, unit: "1", openadr: {status: event}}
      - {key: load_kw, kind: power, unit: kW, openadr: {resource_id: load, measurement: powerReal}}
"""


def test_site_file_with_an_ems_builds_an_openadr_driver() -> None:
    site = parse_site(EMS_SITE, source="plant.yaml")
    [device] = site.devices
    assert device.protocol is Protocol.OPENADR
    assert device.openadr is not None
    assert device.openadr.listen_port == 8650

    class NoStore:
        async def load(self, device: str, *, since: datetime) -> VtnState:
            raise ServiceError("unused")

        async def save_registration(self, device: str, registration: Registration | None) -> None:
            raise ServiceError("unused")

        async def save_event(self, device: str, event: EventRecord) -> None:
            raise ServiceError("unused")

    driver = build_driver(device, SystemClock(), dead_letters=Sink(), openadr_store=NoStore())
    assert isinstance(driver, OpenAdrDriver)
    with pytest.raises(ValueError, match="needs the VTN state store"):
        build_driver(device, SystemClock(), dead_letters=Sink())


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "    openadr: {ven_name: site-ems, ven_id: ven-ems1, listen_port: 8650, poll_interval_s: 10, timeout_s: 30}\n",
            "",
            "plant.yaml: devices[0] (ems1): protocol openadr needs an 'openadr' section",
        ),
        (
            "timeout_s: 30}",
            "timeout_s: 5}",
            "plant.yaml: devices[0] (ems1).openadr: timeout_s (5) must exceed poll_interval_s (10)",
        ),
        (
            "openadr: {status: event}}",
            "openadr: {status: event, signal: simple}}",
            "plant.yaml: devices[0] (ems1).points[1] (event_status).openadr: an openadr point needs exactly one",
        ),
        (
            "unit: kW, openadr: {resource_id: load, measurement: powerReal}}",
            "unit: kW, writable: true, openadr: {resource_id: load}}",
            "plant.yaml: devices[0].points[2] (load_kw).writable: only a point with an OpenADR 'signal'",
        ),
        (
            "openadr: {status: event}}",
            "}",
            "plant.yaml: devices[0].points[1] (event_status): a point of an openadr device needs an 'openadr'",
        ),
    ],
)
def test_site_file_errors_name_the_field(old: str, new: str, message: str) -> None:
    assert old in EMS_SITE
    with pytest.raises(ConfigError) as caught:
        parse_site(EMS_SITE.replace(old, new), source="plant.yaml")
    assert str(caught.value).startswith(message), str(caught.value)


def test_two_ems_on_one_port_is_a_config_error() -> None:
    second = (
        EMS_SITE.split("devices:\n", 1)[1].replace("id: ems1", "id: ems2").replace("ven-ems1", "ven-ems2")
    )
    with pytest.raises(
        ConfigError, match=r"devices\[1\] \(ems2\)\.openadr\.listen_port: port 8650 is used by device 'ems1'"
    ):
        parse_site(EMS_SITE + second, source="plant.yaml")


async def test_gateway_runs_an_ems_from_the_site_file(
    store: PostgresVtnStateStore, unused_tcp_port: int
) -> None:
    site = parse_site(
        EMS_SITE.replace(
            "listen_port: 8650, poll_interval_s: 10, timeout_s: 30",
            f"listen_port: {unused_tcp_port}, poll_interval_s: 0.5, timeout_s: 3",
        ),
        source="plant.yaml",
    )
    sink = Sink()
    gateway = Gateway(
        site, sink=sink, clock=SystemClock(), mqtt_url="mqtt://127.0.0.1:1", openadr_store=store
    )
    supervisor = TaskSupervisor("test")
    await gateway.start(supervisor)
    ven = SimulatedVen(
        ven_name="site-ems", vtn_url=f"http://127.0.0.1:{unused_tcp_port}/OpenADR2/Simple/2.0b"
    )
    try:
        async with asyncio.timeout(5):
            while gateway.sessions["ems1"].available is not True:  # the VTN is listening
                await asyncio.sleep(0.02)
        await ven.start()
        await sink.wait_for(good(make_point_id("ems1", "load_kw")))
        result = await gateway.execute(
            Command(
                point=make_point_id("ems1", "shed_request_kw"),
                value=60.0,
                priority=Priority.OPERATOR,
                source="operator",
                reason="manual shed",
                correlation_id="c-gw",
            )
        )
        assert result.status is CommandStatus.VERIFIED, result.reason
        assert result.readback == 60.0
        assert ven.shed_kw() == 60.0
    finally:
        await ven.stop()
        await supervisor.close()
        await gateway.close()


async def test_a_ven_with_another_name_is_not_registered(plant: Plant) -> None:
    stranger = SimulatedVen(ven_name="someone-else", vtn_url=plant.vtn_url)
    with pytest.raises(ConnectionError, match="did not register us"):
        await stranger.start()
    assert plant.driver.registration is None
    origin, _payload, reason = plant.sink.dead[-1]
    assert origin == f"openadr:{DEVICE}:EiRegisterParty"
    assert reason == "unknown venName 'someone-else'"
