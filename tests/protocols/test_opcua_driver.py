"""OpcUaDriver against the OPC UA simulator endpoint over real sockets (127.0.0.1, free ports)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from _opcua_certs import CertPair, make_cert_pair

from protocols.opcua.config import (
    DeadbandType,
    OpcUaDeviceConfig,
    OpcUaMethodConfig,
    OpcUaPointConfig,
    SecurityMode,
    SecurityPolicy,
)
from protocols.opcua.driver import OpcUaDriver, OpcUaPointSpec, PointRejected
from scada.model import (
    Acquisition,
    Availability,
    AvailabilityEvent,
    DeviceProtocolError,
    DeviceUnavailable,
    PointId,
    QualityCode,
    Reading,
    SubscriptionDriver,
)
from scada.runtime import Backoff, FakeClock, SystemClock
from scada.sessions import DeviceSession
from simulators.opcua_server import OpcUaEndpoint, OpcUaSimPoint
from simulators.physics import DevicePhysics, SimulationParams, make_physics

pytestmark = pytest.mark.asyncio(loop_scope="module")

START = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)
DEVICE = "m1"

SIM_POINTS = (
    OpcUaSimPoint(key="active_power_kw", node_id="ns=2;s=m1.active_power_kw", eu_range=(0.0, 200.0)),
    OpcUaSimPoint(key="voltage_v", node_id="ns=2;s=m1.voltage_v", data_type="uint16", scale=0.1),
    OpcUaSimPoint(key="frequency_hz", node_id="ns=2;s=m1.frequency_hz", data_type="float"),
    OpcUaSimPoint(
        key="power_limit_pct", node_id="ns=2;s=m1.power_limit_pct", data_type="int16", writable=True
    ),
    OpcUaSimPoint(key="setpoint_kw", node_id="ns=2;i=1001", data_type="int32", writable=True, offset=-100.0),
    OpcUaSimPoint(key="target_kw", node_id="ns=2;s=m1.target_kw", data_type="double", writable=True),
    OpcUaSimPoint(key="relay_on", node_id="ns=2;s=m1.relay_on", data_type="boolean", writable=True),
    OpcUaSimPoint(key="counter", node_id="ns=2;s=m1.counter", data_type="uint16", writable=True),
    OpcUaSimPoint(
        key="power_limit_pct",
        node_id="ns=2;s=m1.limit_via_method",
        method=("ns=2;s=m1.control", "ns=2;s=m1.control.set_limit"),
        data_type="double",
    ),
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pid(key: str) -> PointId:
    return PointId(f"{DEVICE}.{key}")


def spec(key: str, node: str, **kwargs: Any) -> OpcUaPointSpec:
    config_keys = {"sampling_interval_ms", "deadband_type", "deadband", "method"}
    config = OpcUaPointConfig(node_id=node, **{k: v for k, v in kwargs.items() if k in config_keys})
    return OpcUaPointSpec(
        point=pid(key), config=config, **{k: v for k, v in kwargs.items() if k not in config_keys}
    )


def default_specs() -> list[OpcUaPointSpec]:
    return [
        spec("active_power_kw", "ns=2;s=m1.active_power_kw"),
        spec("voltage_v", "ns=2;s=m1.voltage_v", scale=0.1),
        spec("frequency_hz", "ns=2;s=m1.frequency_hz"),
        spec("power_limit_pct", "ns=2;s=m1.power_limit_pct", writable=True),
        spec("setpoint_kw", "ns=2;i=1001", writable=True, offset=-100.0),
        spec("target_kw", "ns=2;s=m1.target_kw", writable=True),
        spec("relay_on", "ns=2;s=m1.relay_on", writable=True),
    ]


def make_meter() -> DevicePhysics:
    params = SimulationParams(profile="flat", base_kw=100, peak_kw=100, noise_pct=0, seed=1)
    return make_physics("power_meter", params, tz=ZoneInfo("Asia/Shanghai"), start=START, seed=1)


def config(port: int, **kwargs: Any) -> OpcUaDeviceConfig:
    base: dict[str, Any] = {
        "endpoint": f"opc.tcp://127.0.0.1:{port}",
        "timeout_s": 2.0,
        "publishing_interval_ms": 50,
        "keepalive_count": 4,
    }
    return OpcUaDeviceConfig(**(base | kwargs))


@asynccontextmanager
async def serving(port: int, physics: DevicePhysics, **kwargs: Any) -> AsyncIterator[OpcUaEndpoint]:
    endpoint = OpcUaEndpoint(f"opc.tcp://127.0.0.1:{port}", [(DEVICE, physics, SIM_POINTS)], **kwargs)
    await endpoint.start()
    try:
        yield endpoint
    finally:
        await endpoint.stop()


@asynccontextmanager
async def connected(driver: OpcUaDriver) -> AsyncIterator[OpcUaDriver]:
    await driver.connect()
    try:
        yield driver
    finally:
        await driver.close()


async def changed(endpoint: OpcUaEndpoint) -> None:
    endpoint.refresh()
    await endpoint.flush()


async def receive_until(
    driver: OpcUaDriver, match: Callable[[Reading], bool], *, timeout_s: float = 3.0
) -> tuple[Reading, list[Reading]]:
    """Receive batches until a reading matches; return it and everything received before."""
    seen: list[Reading] = []
    async with asyncio.timeout(timeout_s):
        while True:
            for reading in await driver.receive():
                if match(reading):
                    return reading, seen
                seen.append(reading)


async def receive_forever(driver: OpcUaDriver) -> None:
    async with asyncio.timeout(5):
        while True:
            await driver.receive()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared() -> AsyncIterator[tuple[OpcUaEndpoint, DevicePhysics]]:
    """One simulator for the tests that leave it running (a server takes a second or two to boot)."""
    physics = make_meter()
    async with serving(free_port(), physics) as served:
        yield served, physics


@pytest.fixture
async def endpoint(shared: tuple[OpcUaEndpoint, DevicePhysics]) -> OpcUaEndpoint:
    """The shared simulator, with every override, pinned status and setpoint of earlier tests undone."""
    served, physics = shared
    for point in SIM_POINTS:
        physics.clear_override(point.key)
        served.set_status(point.node_id, None)
    physics.write("power_limit_pct", 100.0)
    await changed(served)
    return served


@pytest.fixture
def meter(shared: tuple[OpcUaEndpoint, DevicePhysics]) -> DevicePhysics:
    return shared[1]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


# --------------------------------------------------------------------------------------------------
# Read


async def test_read_returns_every_point_scaled_with_the_source_timestamp(
    endpoint: OpcUaEndpoint, meter: DevicePhysics, clock: FakeClock
) -> None:
    meter.override("active_power_kw", 123.25)
    meter.override("voltage_v", 230.1)
    await changed(endpoint)
    driver = OpcUaDriver(DEVICE, config(endpoint.port, subscribe=False), default_specs(), clock=clock)
    assert isinstance(driver, SubscriptionDriver)
    assert driver.acquisition is Acquisition.POLL
    async with connected(driver):
        readings = {r.point: r for r in await driver.read()}
    assert list(readings) == list(driver.points)
    assert readings[pid("active_power_kw")].value == 123.25
    assert readings[pid("voltage_v")].value == pytest.approx(230.1)
    assert readings[pid("frequency_hz")].value == pytest.approx(50.0, abs=0.1)
    assert readings[pid("setpoint_kw")].quality.is_good
    ts = readings[pid("active_power_kw")].ts
    assert abs(ts - datetime.now(UTC)) < timedelta(seconds=30)  # the server's clock, not the fake one
    assert ts != clock.now()


async def test_an_unknown_node_is_a_bad_reading_and_the_others_still_read(
    endpoint: OpcUaEndpoint, clock: FakeClock
) -> None:
    specs = [*default_specs()[:1], spec("ghost_kw", "ns=2;s=m1.does_not_exist")]
    driver = OpcUaDriver(DEVICE, config(endpoint.port, subscribe=False), specs, clock=clock)
    async with connected(driver):
        good, ghost = await driver.read()
        with pytest.raises(DeviceProtocolError, match="BadNodeIdUnknown"):
            await driver.read_back(pid("ghost_kw"))
    assert good.quality.is_good
    assert ghost.value is None
    assert ghost.quality.code is QualityCode.BAD
    assert ghost.quality.reason == "BadNodeIdUnknown"
    assert ghost.ts == clock.now()  # no timestamp from the server: the driver's clock


@pytest.mark.parametrize(
    ("status", "code", "keeps_value"),
    [
        ("UncertainLastUsableValue", QualityCode.UNCERTAIN, True),
        ("UncertainSensorNotAccurate", QualityCode.UNCERTAIN, True),
        ("BadSensorFailure", QualityCode.BAD, False),
        ("BadOutOfService", QualityCode.BAD, False),
    ],
)
async def test_status_codes_map_to_quality_with_the_status_name(
    endpoint: OpcUaEndpoint,
    meter: DevicePhysics,
    clock: FakeClock,
    status: str,
    code: QualityCode,
    keeps_value: bool,
) -> None:
    meter.override("active_power_kw", 77.0)
    endpoint.set_status("ns=2;s=m1.active_power_kw", status)
    await changed(endpoint)
    driver = OpcUaDriver(DEVICE, config(endpoint.port, subscribe=False), default_specs(), clock=clock)
    async with connected(driver):
        reading = (await driver.read())[0]
    assert reading.quality.code is code
    assert reading.quality.reason == status
    assert reading.value == (77.0 if keeps_value else None)


async def test_a_value_that_is_not_a_number_is_a_bad_reading(
    endpoint: OpcUaEndpoint, meter: DevicePhysics, clock: FakeClock
) -> None:
    meter.override("frequency_hz", float("nan"))
    await changed(endpoint)
    driver = OpcUaDriver(DEVICE, config(endpoint.port, subscribe=False), default_specs(), clock=clock)
    async with connected(driver):
        reading = next(r for r in await driver.read() if r.point == pid("frequency_hz"))
    assert reading.value is None
    assert reading.quality.reason == "not a number: nan"


# --------------------------------------------------------------------------------------------------
# Subscriptions


async def test_subscription_delivers_initial_values_then_changes(
    endpoint: OpcUaEndpoint, meter: DevicePhysics, clock: FakeClock
) -> None:
    driver = OpcUaDriver(DEVICE, config(endpoint.port), default_specs(), clock=clock)
    assert driver.acquisition is Acquisition.SUBSCRIBE
    async with connected(driver):
        first = await driver.receive()
        assert {r.point for r in first} == set(driver.points)  # every item reports its initial value
        meter.override("active_power_kw", 150.5)
        await changed(endpoint)
        reading, _ = await receive_until(driver, lambda r: r.point == pid("active_power_kw"))
    assert reading.value == 150.5
    assert reading.quality.is_good


async def test_a_quiet_subscription_returns_empty_keepalive_batches(
    endpoint: OpcUaEndpoint, clock: FakeClock
) -> None:
    driver = OpcUaDriver(DEVICE, config(endpoint.port, keepalive_count=2), default_specs(), clock=clock)
    async with connected(driver):
        await driver.receive()  # initial values
        started = time.monotonic()
        async with asyncio.timeout(2):
            batch = await driver.receive()
    assert batch == []
    assert time.monotonic() - started < 1.0  # keep-alive every 2 x 50 ms


async def test_an_unknown_node_is_a_bad_reading_on_a_subscription_too(
    endpoint: OpcUaEndpoint, clock: FakeClock
) -> None:
    specs = [*default_specs()[:1], spec("ghost_kw", "ns=2;s=m1.does_not_exist")]
    driver = OpcUaDriver(DEVICE, config(endpoint.port), specs, clock=clock)
    latest: dict[PointId, Reading] = {}
    async with connected(driver), asyncio.timeout(3):
        while len(latest) < 2:
            latest.update((r.point, r) for r in await driver.receive())
    assert latest[pid("ghost_kw")].quality.reason == "BadNodeIdUnknown"
    assert latest[pid("active_power_kw")].quality.is_good


async def test_status_changes_arrive_on_the_subscription(
    endpoint: OpcUaEndpoint, meter: DevicePhysics, clock: FakeClock
) -> None:
    driver = OpcUaDriver(DEVICE, config(endpoint.port), default_specs(), clock=clock)
    async with connected(driver):
        await driver.receive()
        endpoint.set_status("ns=2;s=m1.active_power_kw", "BadSensorFailure")
        await changed(endpoint)
        bad, _ = await receive_until(driver, lambda r: r.point == pid("active_power_kw"))
        endpoint.set_status("ns=2;s=m1.active_power_kw", None)
        await changed(endpoint)
        good, _ = await receive_until(driver, lambda r: r.point == pid("active_power_kw"))
    assert bad.value is None
    assert bad.quality.reason == "BadSensorFailure"
    assert good.value == pytest.approx(meter.value("active_power_kw"))


@pytest.mark.parametrize(
    ("deadband_type", "deadband", "small", "large"),
    [
        (DeadbandType.ABSOLUTE, 1.0, 100.6, 101.5),  # absolute: 1 kW
        (DeadbandType.PERCENT, 5.0, 109.0, 111.0),  # 5 % of EURange 0..200 = 10 kW
    ],
)
async def test_deadband_suppresses_small_changes(
    endpoint: OpcUaEndpoint,
    meter: DevicePhysics,
    clock: FakeClock,
    deadband_type: DeadbandType,
    deadband: float,
    small: float,
    large: float,
) -> None:
    meter.override("active_power_kw", 100.0)
    await changed(endpoint)
    specs = [
        spec("active_power_kw", "ns=2;s=m1.active_power_kw", deadband_type=deadband_type, deadband=deadband)
    ]
    driver = OpcUaDriver(DEVICE, config(endpoint.port), specs, clock=clock)
    async with connected(driver):
        initial, _ = await receive_until(driver, lambda r: r.value is not None)
        assert initial.value == 100.0
        meter.override("active_power_kw", small)
        await changed(endpoint)
        await asyncio.sleep(0.3)  # several publishing intervals: it would have been sent by now
        meter.override("active_power_kw", large)
        await changed(endpoint)
        reading, before = await receive_until(driver, lambda r: r.value is not None)
    assert reading.value == large
    assert [r.value for r in before] == []


async def test_receive_raises_when_the_server_stops_then_reconnects_after_restart(clock: FakeClock) -> None:
    port = free_port()
    meter = make_meter()
    driver = OpcUaDriver(DEVICE, config(port), default_specs(), clock=clock)
    async with serving(port, meter) as endpoint:
        await driver.connect()
        await driver.receive()
        await endpoint.stop()
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable):
            await receive_forever(driver)
        assert time.monotonic() - started < 2.0  # timeout_s
        assert not driver.connected
        with pytest.raises(DeviceUnavailable):
            await driver.read()
        await driver.close()
        with pytest.raises(DeviceUnavailable):
            await driver.connect()  # nobody listens
        await endpoint.start()  # the device boots again
        meter.override("active_power_kw", 42.0)
        await changed(endpoint)
        try:
            await driver.connect()
            reading, _ = await receive_until(driver, lambda r: r.point == pid("active_power_kw"))
            assert reading.value == 42.0
        finally:
            await driver.close()


async def test_receive_on_a_polled_device_is_an_error(endpoint: OpcUaEndpoint, clock: FakeClock) -> None:
    driver = OpcUaDriver(DEVICE, config(endpoint.port, subscribe=False), default_specs(), clock=clock)
    async with connected(driver):
        with pytest.raises(DeviceProtocolError, match="polled"):
            await driver.receive()


# --------------------------------------------------------------------------------------------------
# Writes


@pytest.mark.parametrize(
    ("key", "value", "held"),
    [
        ("power_limit_pct", 55.0, 55.0),  # Int16
        ("power_limit_pct", 150.0, 100.0),  # the device clamps to 0..100: read-back shows it
        ("setpoint_kw", -40.0, -40.0),  # Int32 with an offset
        ("target_kw", 12.75, 12.75),  # Double
        ("relay_on", 1.0, 1.0),  # Boolean
    ],
)
async def test_write_uses_the_node_data_type_and_read_back_shows_what_the_device_holds(
    endpoint: OpcUaEndpoint, meter: DevicePhysics, clock: FakeClock, key: str, value: float, held: float
) -> None:
    driver = OpcUaDriver(DEVICE, config(endpoint.port, subscribe=False), default_specs(), clock=clock)
    async with connected(driver):
        await driver.write(pid(key), value, correlation_id="c-1")
        assert await driver.read_back(pid(key)) == pytest.approx(held)
    assert meter.value(key) == pytest.approx(held)


async def test_write_through_a_method_call(
    endpoint: OpcUaEndpoint, meter: DevicePhysics, clock: FakeClock
) -> None:
    method = OpcUaMethodConfig(object_id="ns=2;s=m1.control", method_id="ns=2;s=m1.control.set_limit")
    specs = [spec("power_limit_pct", "ns=2;s=m1.limit_via_method", writable=True, method=method)]
    driver = OpcUaDriver(DEVICE, config(endpoint.port, subscribe=False), specs, clock=clock)
    async with connected(driver):
        await driver.write(pid("power_limit_pct"), 35.0)
        assert await driver.read_back(pid("power_limit_pct")) == 35.0
        assert await driver.call("ns=2;s=m1.control", "ns=2;s=m1.control.set_limit", 20.0) == []
        with pytest.raises(DeviceProtocolError, match=r"BadNodeIdInvalid|BadNodeIdUnknown|BadMethodInvalid"):
            await driver.call("ns=2;s=m1.control", "ns=2;s=m1.control.nope", 1.0)
    assert meter.value("power_limit_pct") == 20.0


async def test_writes_the_device_or_the_type_refuses(endpoint: OpcUaEndpoint, clock: FakeClock) -> None:
    specs = [
        *default_specs(),
        spec("writable_here_only", "ns=2;s=m1.active_power_kw", writable=True),  # read-only on the server
        spec("counter", "ns=2;s=m1.counter", writable=True),
    ]
    driver = OpcUaDriver(DEVICE, config(endpoint.port, subscribe=False), specs, clock=clock)
    async with connected(driver):
        with pytest.raises(PointRejected, match="not writable"):
            await driver.write(pid("active_power_kw"), 1.0)
        with pytest.raises(PointRejected, match="not a point"):
            await driver.write(pid("nope"), 1.0)
        with pytest.raises(PointRejected, match="UInt16"):
            await driver.write(pid("counter"), -1.0)
        with pytest.raises(PointRejected, match="Boolean"):
            await driver.write(pid("relay_on"), 0.5)
        with pytest.raises(DeviceProtocolError, match="refused: Bad"):
            await driver.write(pid("writable_here_only"), 1.0)
        await driver.write(pid("counter"), 65535.0)  # still connected after the refusals
        assert await driver.read_back(pid("counter")) == 65535.0


# --------------------------------------------------------------------------------------------------
# Browse


async def test_browse_lists_children_with_class_and_data_type(
    endpoint: OpcUaEndpoint, clock: FakeClock
) -> None:
    driver = OpcUaDriver(DEVICE, config(endpoint.port, subscribe=False), default_specs(), clock=clock)
    async with connected(driver):
        children = {node.node_id: node for node in await driver.browse("ns=2;s=m1")}
        objects = {node.browse_name for node in await driver.browse("i=85")}
        with pytest.raises(DeviceProtocolError, match="BadNodeId"):
            await driver.browse("ns=2;s=nothing-here")
    power = children["ns=2;s=m1.active_power_kw"]
    assert (power.browse_name, power.node_class, power.data_type) == ("2:active_power_kw", "Variable", "i=11")
    assert children["ns=2;s=m1.voltage_v"].data_type == "i=5"  # UInt16
    assert children["ns=2;s=m1.control"].node_class == "Object"
    assert "2:m1" in objects


# --------------------------------------------------------------------------------------------------
# Security


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertPair]:
    directory: Path = tmp_path_factory.mktemp("opcua-certs")
    return {
        "server": make_cert_pair(directory, "server", "urn:carbonos:simulator:test"),
        "client": make_cert_pair(directory, "client", "urn:carbonos:scada:test"),
        "impostor": make_cert_pair(directory, "impostor", "urn:carbonos:simulator:impostor"),
    }


async def test_sign_and_encrypt_session_with_pinned_server_certificate(
    clock: FakeClock, certs: dict[str, CertPair]
) -> None:
    port = free_port()
    meter = make_meter()
    server, client = certs["server"], certs["client"]
    secure = config(
        port,
        security_policy=SecurityPolicy.BASIC256SHA256,
        security_mode=SecurityMode.SIGN_AND_ENCRYPT,
        certificate=client.certificate,
        private_key=client.private_key,
        server_certificate=server.certificate,
        username="operator",
        password="secret",
    )
    meter.override("active_power_kw", 64.0)
    async with serving(
        port,
        meter,
        security="basic256sha256",
        certificate=server.certificate,
        private_key=server.private_key,
        trusted_client_certificates=[client.certificate],
    ) as endpoint:
        await changed(endpoint)
        driver = OpcUaDriver(DEVICE, secure, default_specs(), clock=clock)
        async with connected(driver):
            reading, _ = await receive_until(driver, lambda r: r.point == pid("active_power_kw"))
            await driver.write(pid("target_kw"), 5.5)
            assert await driver.read_back(pid("target_kw")) == 5.5
        assert reading.value == 64.0

        # An unencrypted client finds no endpoint on this server.
        plain = OpcUaDriver(DEVICE, config(port), default_specs(), clock=clock)
        with pytest.raises((DeviceUnavailable, DeviceProtocolError)):
            await plain.connect()
        # A client certificate the server does not trust is refused by the server.
        stranger = OpcUaDriver(
            DEVICE,
            secure.model_copy(
                update={
                    "certificate": certs["impostor"].certificate,
                    "private_key": certs["impostor"].private_key,
                }
            ),
            default_specs(),
            clock=clock,
        )
        with pytest.raises((DeviceUnavailable, DeviceProtocolError)):
            await stranger.connect()


async def test_a_server_presenting_another_certificate_is_refused(
    clock: FakeClock, certs: dict[str, CertPair]
) -> None:
    port = free_port()
    meter = make_meter()
    impostor, client = certs["impostor"], certs["client"]
    secure = config(
        port,
        security_policy=SecurityPolicy.BASIC256SHA256,
        security_mode=SecurityMode.SIGN,
        certificate=client.certificate,
        private_key=client.private_key,
        server_certificate=certs["server"].certificate,
    )
    async with serving(
        port,
        meter,
        security="basic256sha256",
        certificate=impostor.certificate,
        private_key=impostor.private_key,
    ):
        driver = OpcUaDriver(DEVICE, secure, default_specs(), clock=clock)
        with pytest.raises(DeviceUnavailable, match="server certificate not trusted"):
            await driver.connect()
        assert not driver.connected
        # Without a pinned certificate the same server is accepted (trust on first use).
        trusting = OpcUaDriver(
            DEVICE, secure.model_copy(update={"server_certificate": None}), default_specs(), clock=clock
        )
        async with connected(trusting):
            assert len(await trusting.read()) == len(default_specs())


async def test_connect_to_a_closed_port_is_unavailable(clock: FakeClock) -> None:
    driver = OpcUaDriver(DEVICE, config(free_port()), default_specs(), clock=clock)
    with pytest.raises(DeviceUnavailable):
        await driver.connect()
    await driver.close()
    await driver.close()


async def test_point_specs_are_checked() -> None:
    with pytest.raises(ValueError, match="scale"):
        spec("x", "ns=2;s=x", scale=0.0)
    method = OpcUaMethodConfig(object_id="ns=2;s=o", method_id="ns=2;s=m")
    with pytest.raises(ValueError, match="writable"):
        spec("x", "ns=2;s=x", method=method)
    points: Sequence[OpcUaPointSpec] = [spec("x", "ns=2;s=x"), spec("x", "ns=2;s=y")]
    with pytest.raises(ValueError, match="twice"):
        OpcUaDriver(DEVICE, config(4840), points, clock=FakeClock())


# --------------------------------------------------------------------------------------------------
# With a DeviceSession


class EventLog:
    """ReadingSink and EventSink that keep everything."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.events: list[AvailabilityEvent] = []

    async def publish(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)

    async def publish_event(self, event: AvailabilityEvent) -> None:
        self.events.append(event)


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


async def test_a_session_stays_online_on_keepalives_goes_offline_and_comes_back() -> None:
    port = free_port()
    meter = make_meter()
    clock = SystemClock()
    driver = OpcUaDriver(DEVICE, config(port, keepalive_count=2, timeout_s=0.5), default_specs(), clock=clock)
    log = EventLog()
    session = DeviceSession(
        driver,
        points=driver.points,
        sink=log,
        events=log,
        period_s=1.0,
        clock=clock,
        backoff=Backoff(initial_s=0.2, max_s=0.5),
        stale_after_s=0.6,
    )
    async with serving(port, meter) as endpoint:
        task = asyncio.create_task(session.run())
        try:
            await wait_for(lambda: len(log.readings) >= len(driver.points))
            await asyncio.sleep(1.5)  # nothing changes: only keep-alives (every 100 ms) arrive
            assert [e.availability for e in log.events] == [Availability.ONLINE]
            await endpoint.stop()
            await wait_for(lambda: session.availability is Availability.OFFLINE, timeout_s=3)
            offline = [r for r in log.readings if r.value is None]
            assert {r.point for r in offline} == set(driver.points)
            await endpoint.start()
            await wait_for(lambda: session.availability is Availability.ONLINE)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert [e.availability for e in log.events] == [
        Availability.ONLINE,
        Availability.OFFLINE,
        Availability.ONLINE,
    ]
    assert not driver.connected
