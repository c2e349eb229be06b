"""MqttDriver and MqttConnection against real brokers: the local Mosquitto and a private one we can kill.

Devices are the simulator fleet (simulators/mqtt_devices.py) over the same broker. Every test uses
its own topic prefix, so runs (and a demo on the same broker) do not meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from amqtt.broker import Broker

from protocols.mqtt.config import MqttDeviceConfig, MqttVersion
from protocols.mqtt.connection import MqttConnection
from protocols.mqtt.driver import MqttDriver, MqttPointSpec, PointRejected
from scada.model import (
    Acquisition,
    Availability,
    AvailabilityEvent,
    Command,
    CommandStatus,
    DeviceProtocolError,
    DeviceUnavailable,
    PointId,
    Priority,
    QualityCode,
    Reading,
    SubscriptionDriver,
    make_point_id,
)
from scada.runtime import Backoff, SystemClock
from scada.sessions import DeviceSession
from simulators.mqtt_devices import MqttDeviceFleet, MqttSimPoint
from simulators.physics import DevicePhysics, make_physics

MOSQUITTO = "/usr/sbin/mosquitto"
VERSIONS = [MqttVersion.V5, MqttVersion.V311]

POWER = make_point_id("m1", "active_power_kw")
VOLTAGE = make_point_id("m1", "voltage_v")
LIMIT = make_point_id("m1", "power_limit_pct")
LOCKED = make_point_id("m1", "locked_pct")
SIM_POINTS = [
    MqttSimPoint("active_power_kw", "p", scale=0.1),  # device sends tenths of kW
    MqttSimPoint("voltage_v", "u"),
    MqttSimPoint("power_limit_pct", "lim", writable=True),
    MqttSimPoint("locked_pct", "locked"),  # the device refuses writes to it
]
SPECS = [
    MqttPointSpec(point=POWER, field="p", scale=0.1),
    MqttPointSpec(point=VOLTAGE, field="u"),
    MqttPointSpec(point=LIMIT, field="lim", writable=True),
    MqttPointSpec(point=LOCKED, field="locked", writable=True),
]


@dataclass
class DeadLetters:
    """A DeadLetterSink that keeps what it is given."""

    items: list[tuple[str, bytes, str]] = field(default_factory=list)

    def reject(self, *, origin: str, payload: bytes, reason: str) -> None:
        self.items.append((origin, payload, reason))

    def reasons(self) -> list[str]:
        return [reason for _, _, reason in self.items]


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def device_config(prefix: str, **kwargs: object) -> MqttDeviceConfig:
    return MqttDeviceConfig(
        telemetry_topic=f"{prefix}/{{device}}/telemetry",
        command_topic=f"{prefix}/{{device}}/command",
        response_topic=f"{prefix}/{{device}}/response",
        **kwargs,  # type: ignore[arg-type]
    )


def physics() -> DevicePhysics:
    return make_physics("power_meter", None, tz=ZoneInfo("UTC"), start=datetime.now(UTC), seed=1)


@pytest.fixture
def prefix() -> str:
    return f"carbonos-test/{uuid.uuid4().hex[:10]}"


@pytest.fixture
def dead_letters() -> DeadLetters:
    return DeadLetters()


@pytest.fixture(params=VERSIONS, ids=["v5", "v311"])
def version(request: pytest.FixtureRequest) -> MqttVersion:
    return MqttVersion(request.param)


@pytest.fixture
async def connection(
    mqtt_url: str, version: MqttVersion, dead_letters: DeadLetters
) -> AsyncIterator[MqttConnection]:
    conn = MqttConnection(
        mqtt_url,
        client_id=f"scada-test-{uuid.uuid4().hex[:8]}",
        version=version,
        timeout_s=3.0,
        dead_letters=dead_letters,
    )
    await conn.start()
    assert conn.connected, conn.last_error
    try:
        yield conn
    finally:
        await conn.close()


@dataclass
class Rig:
    fleet: MqttDeviceFleet
    physics: DevicePhysics
    driver: MqttDriver
    config: MqttDeviceConfig


@pytest.fixture
async def rig(
    mqtt_url: str, prefix: str, version: MqttVersion, connection: MqttConnection, dead_letters: DeadLetters
) -> AsyncIterator[Rig]:
    config = device_config(prefix, timeout_s=1.0)
    meter = physics()
    fleet = MqttDeviceFleet(
        mqtt_url,
        [("m1", meter, config, SIM_POINTS)],
        publish_period_s=0.1,
        version=version.value,
        client_id_prefix=f"sim-{uuid.uuid4().hex[:8]}",
    )
    driver = MqttDriver(
        "m1", config, SPECS, connection=connection, clock=SystemClock(), dead_letters=dead_letters
    )
    await fleet.start()
    try:
        await driver.connect()
        yield Rig(fleet, meter, driver, config)
    finally:
        await driver.close()
        await fleet.stop()


async def next_batch_with(
    driver: MqttDriver, point: PointId, timeout_s: float = 3.0
) -> dict[PointId, object]:
    """Receive until a batch holds ``point``; return that batch by point."""
    async with asyncio.timeout(timeout_s):
        while True:
            batch = await driver.receive()
            if any(r.point == point for r in batch):
                return {r.point: r for r in batch}


# --------------------------------------------------------------------------------------------------
# Telemetry


async def test_is_a_subscription_driver(rig: Rig) -> None:
    assert isinstance(rig.driver, SubscriptionDriver)
    assert rig.driver.acquisition is Acquisition.SUBSCRIBE


async def test_telemetry_carries_device_timestamps_and_many_points(
    mqtt_url: str, prefix: str, version: MqttVersion, connection: MqttConnection, dead_letters: DeadLetters
) -> None:
    device_time = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    config = device_config(prefix)
    meter = physics()
    meter.override("active_power_kw", 123.4)
    meter.override("voltage_v", 231.5)
    fleet = MqttDeviceFleet(
        mqtt_url,
        [("m1", meter, config, SIM_POINTS)],
        publish_period_s=0.1,
        version=version.value,
        clock=lambda: device_time,
        client_id_prefix=f"sim-{uuid.uuid4().hex[:8]}",
    )
    driver = MqttDriver(
        "m1", config, SPECS, connection=connection, clock=SystemClock(), dead_letters=dead_letters
    )
    await fleet.start()
    try:
        await driver.connect()
        batch = await driver.receive()
        rejected = list(dead_letters.items)  # before close: messages in flight then have no owner
    finally:
        await driver.close()
        await fleet.stop()
    by_point = {r.point: r for r in batch}
    assert set(by_point) == {POWER, VOLTAGE, LIMIT, LOCKED}
    assert by_point[POWER].value == pytest.approx(123.4)  # 1234 tenths on the wire
    assert by_point[VOLTAGE].value == pytest.approx(231.5)
    assert {r.ts for r in batch} == {device_time}
    assert all(r.quality.code is QualityCode.GOOD for r in batch)
    assert rejected == []


async def test_read_returns_latest_values_and_flags_points_never_received(rig: Rig) -> None:
    await rig.driver.close()
    silent = MqttDriver(
        "m1",
        rig.config,
        [*SPECS, MqttPointSpec(point=make_point_id("m1", "missing"), field="nope")],
        connection=rig.driver._connection,  # same shared connection, as in production
        clock=SystemClock(),
        dead_letters=DeadLetters(),
    )
    rig.physics.override("voltage_v", 229.0)
    await silent.connect()
    try:
        first = {r.point: r for r in await silent.read()}
        assert first[VOLTAGE].quality.reason == "no value received yet"
        assert first[VOLTAGE].value is None
        await next_batch_with(silent, VOLTAGE)
        latest = {r.point: r for r in await silent.read()}
    finally:
        await silent.close()
    assert latest[VOLTAGE].value == pytest.approx(229.0)
    assert latest[VOLTAGE].quality.is_good
    assert latest[make_point_id("m1", "missing")].quality.reason == "no value received yet"


async def test_heartbeat_and_empty_values_are_empty_batches(rig: Rig) -> None:
    rig.fleet.silence("m1")
    await asyncio.sleep(0.2)
    while rig.driver._batches:  # drain what was published before the silence
        await rig.driver.receive()
    rig.fleet.heartbeat("m1")
    rig.fleet.publish_raw("m1", b'{"values": {}}')
    assert await asyncio.wait_for(rig.driver.receive(), 3) == []
    assert await asyncio.wait_for(rig.driver.receive(), 3) == []
    assert rig.driver.stats.heartbeats == 1


async def test_malformed_payloads_go_to_dead_letters_and_the_driver_keeps_going(
    rig: Rig, dead_letters: DeadLetters
) -> None:
    rig.fleet.silence("m1")
    await asyncio.sleep(0.2)
    while rig.driver._batches:
        await rig.driver.receive()
    for raw in (
        b'{"values": {"p": 1',
        b"not json",
        b"\xff\xfe",
        b'{"values": [1, 2]}',
        b'{"ts": 5, "values": {}}',
    ):
        rig.fleet.publish_raw("m1", raw)
    rig.fleet.publish_raw("m1", b'{"values": {"u": "230 V", "p": 50, "extra": 1}}')  # wrong type: bad quality
    batch = {r.point: r for r in await asyncio.wait_for(rig.driver.receive(), 3)}
    assert batch[VOLTAGE].value is None
    assert batch[VOLTAGE].quality.code is QualityCode.BAD
    assert batch[VOLTAGE].quality.reason == "expected a number, got a string"
    assert batch[POWER].value == pytest.approx(5.0)
    reasons = dead_letters.reasons()
    assert len(reasons) == 5
    assert "truncated JSON" in reasons[0]
    assert "not JSON" in reasons[1]
    assert "not UTF-8" in reasons[2]
    assert "values: expected an object, got a list" in reasons[3]
    assert "before 2000-01-01" in reasons[4]
    assert {origin for origin, _, _ in dead_letters.items} == {f"mqtt:{rig.driver.topics[0]}"}
    assert rig.driver.stats.unknown_fields == 1
    rig.fleet.silence("m1", silent=False)
    await next_batch_with(rig.driver, POWER)  # still receiving


async def test_message_on_a_topic_nobody_owns_is_dead_lettered(
    connection: MqttConnection, dead_letters: DeadLetters, prefix: str
) -> None:
    driver = MqttDriver(
        "m9",
        device_config(prefix),
        SPECS[:1],
        connection=connection,
        clock=SystemClock(),
        dead_letters=dead_letters,
    )
    await driver.connect()
    telemetry_topic = driver.topics[0]
    # Unregister, then publish in the same loop turn: the PUBLISH reaches the broker before the
    # UNSUBSCRIBE, so the broker still delivers it, to a connection where nobody owns the topic.
    await driver.close()
    connection.publish(telemetry_topic, b'{"values": {"p": 1}}', qos=1)
    await eventually(lambda: bool(dead_letters.items))
    assert dead_letters.items == [
        (f"mqtt:{telemetry_topic}", b'{"values": {"p": 1}}', "unknown topic: no device owns it")
    ]
    assert connection.stats.unknown_topic == 1


async def test_retained_message_is_flagged_uncertain(
    mqtt_url: str, prefix: str, version: MqttVersion, connection: MqttConnection, dead_letters: DeadLetters
) -> None:
    config = device_config(prefix)
    fleet = MqttDeviceFleet(
        mqtt_url,
        [("m1", physics(), config, SIM_POINTS)],
        publish_period_s=60,
        version=version.value,
        client_id_prefix=f"sim-{uuid.uuid4().hex[:8]}",
    )
    await fleet.start()
    fleet.silence("m1")
    fleet.publish_raw("m1", b'{"values": {"u": 228}}', retain=True)
    await asyncio.sleep(0.2)  # the broker stores it
    driver = MqttDriver(
        "m1", config, SPECS, connection=connection, clock=SystemClock(), dead_letters=dead_letters
    )
    try:
        await driver.connect()
        [reading] = await asyncio.wait_for(driver.receive(), 3)
    finally:
        await driver.close()
        fleet.publish_raw("m1", b"", retain=True)  # clear the broker's store
        await asyncio.sleep(0.1)
        await fleet.stop()
    assert reading.value == 228.0
    assert reading.quality.code is QualityCode.UNCERTAIN
    assert reading.quality.reason == "retained message: may be old"
    assert driver.stats.retained == 1


async def test_slow_session_drops_oldest_batches(
    connection: MqttConnection, dead_letters: DeadLetters, prefix: str, mqtt_url: str, version: MqttVersion
) -> None:
    config = device_config(prefix)
    fleet = MqttDeviceFleet(
        mqtt_url,
        [("m1", physics(), config, SIM_POINTS)],
        publish_period_s=60,
        version=version.value,
        client_id_prefix=f"sim-{uuid.uuid4().hex[:8]}",
    )
    driver = MqttDriver(
        "m1",
        config,
        SPECS,
        connection=connection,
        clock=SystemClock(),
        dead_letters=dead_letters,
        queue_batches=2,
    )
    await fleet.start()
    try:
        fleet.silence("m1")
        await driver.connect()
        await asyncio.sleep(0.1)
        base = driver.stats.messages
        for volts in (1, 2, 3, 4, 5):
            fleet.publish_raw("m1", json.dumps({"values": {"u": volts}}).encode())
        await eventually(lambda: driver.stats.messages == base + 5)
        kept = [(await driver.receive())[0].value for _ in range(2)]
    finally:
        await driver.close()
        await fleet.stop()
    assert kept == [4.0, 5.0]
    assert driver.stats.dropped >= 3


async def test_many_devices_share_one_connection(
    mqtt_url: str, prefix: str, version: MqttVersion, connection: MqttConnection, dead_letters: DeadLetters
) -> None:
    config = device_config(prefix)
    ids = [f"d{i:03d}" for i in range(200)]
    meters = {device: physics() for device in ids}
    for i, device in enumerate(ids):
        meters[device].override("voltage_v", 200.0 + i)
    fleet = MqttDeviceFleet(
        mqtt_url,
        [(device, meters[device], config, SIM_POINTS) for device in ids],
        publish_period_s=0.2,
        connections=2,
        version=version.value,
        client_id_prefix=f"sim-{uuid.uuid4().hex[:8]}",
    )
    drivers = [
        MqttDriver(
            device,
            config,
            [MqttPointSpec(point=make_point_id(device, "voltage_v"), field="u")],
            connection=connection,
            clock=SystemClock(),
            dead_letters=dead_letters,
        )
        for device in ids
    ]
    await fleet.start()
    try:
        await asyncio.gather(*(d.connect() for d in drivers))
        assert connection.routes == 2 * len(ids)
        batches = await asyncio.wait_for(asyncio.gather(*(d.receive() for d in drivers)), 5)
        rejected = list(dead_letters.items)  # before close: messages in flight then have no owner
    finally:
        await asyncio.gather(*(d.close() for d in drivers))
        await fleet.stop()
    assert [b[0].value for b in batches] == [200.0 + i for i in range(len(ids))]
    assert connection.routes == 0
    assert rejected == []


# --------------------------------------------------------------------------------------------------
# Commands


async def test_write_gets_the_response_and_read_back_its_value(rig: Rig, version: MqttVersion) -> None:
    await rig.driver.write(LIMIT, 55.0, correlation_id=f"cmd-{version.value}")
    assert rig.physics.value("power_limit_pct") == 55.0
    assert await rig.driver.read_back(LIMIT) == 55.0
    # The device clamps to 100 %: the response says what it holds, so the read-back shows it.
    await rig.driver.write(LIMIT, 150.0)
    assert await rig.driver.read_back(LIMIT) == 100.0
    assert rig.fleet.stats.responses == 2


async def test_read_back_without_a_response_value_waits_for_telemetry(rig: Rig) -> None:
    rig.physics.override("voltage_v", 233.0)
    assert await rig.driver.read_back(VOLTAGE) == 233.0


async def test_rejected_write_raises_with_the_device_reason(rig: Rig) -> None:
    with pytest.raises(DeviceProtocolError, match="rejected: point 'locked' is not writable"):
        await rig.driver.write(LOCKED, 10.0)


async def test_write_times_out_when_the_device_never_answers(rig: Rig) -> None:
    rig.fleet.ignore_commands("m1")
    started = time.monotonic()
    with pytest.raises(
        DeviceUnavailable, match=r"no response to the command on m1.power_limit_pct within 1 s"
    ):
        await rig.driver.write(LIMIT, 20.0)
    assert 0.9 <= time.monotonic() - started < 2.0
    rig.fleet.ignore_commands("m1", ignore=False)
    await rig.driver.write(LIMIT, 21.0)  # the driver is still usable


async def test_write_refuses_unknown_and_read_only_points_without_publishing(rig: Rig) -> None:
    with pytest.raises(PointRejected, match="not writable"):
        await rig.driver.write(VOLTAGE, 1.0)
    with pytest.raises(PointRejected, match="not a point of device m1"):
        await rig.driver.write(make_point_id("m1", "nope"), 1.0)
    await asyncio.sleep(0.1)
    assert rig.fleet.stats.commands == 0


async def test_response_nobody_waits_for_is_dead_lettered(rig: Rig, dead_letters: DeadLetters) -> None:
    rig.driver._connection.publish(
        rig.driver.topics[2], b'{"correlation_id": "stray", "status": "ok"}', qos=1
    )
    await eventually(lambda: bool(dead_letters.items))
    assert dead_letters.reasons() == ["command response: no pending command 'stray'"]


# --------------------------------------------------------------------------------------------------
# Broker loss (a private Mosquitto we can kill)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateBroker:
    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [MOSQUITTO, "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("private mosquitto did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None


@pytest.fixture
def private_broker() -> Iterator[PrivateBroker]:
    if shutil.which(MOSQUITTO) is None:
        pytest.skip("mosquitto is not installed")
    broker = PrivateBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.mark.parametrize("version", VERSIONS, ids=["v5", "v311"])
async def test_broker_loss_makes_the_device_unavailable_until_it_returns(
    private_broker: PrivateBroker, version: MqttVersion, dead_letters: DeadLetters, prefix: str
) -> None:
    url = f"mqtt://127.0.0.1:{private_broker.port}"
    connection = MqttConnection(
        url,
        client_id="scada-loss",
        version=version,
        timeout_s=1.0,
        dead_letters=dead_letters,
        backoff=Backoff(initial_s=0.05, max_s=0.2),
    )
    config = device_config(prefix, timeout_s=1.0)
    driver = MqttDriver(
        "m1", config, SPECS, connection=connection, clock=SystemClock(), dead_letters=dead_letters
    )
    await connection.start()
    try:
        await driver.connect()
        pending = asyncio.create_task(driver.receive())
        await asyncio.sleep(0.05)
        private_broker.kill()
        with pytest.raises(DeviceUnavailable, match="connection lost"):
            await asyncio.wait_for(pending, 3)
        assert not connection.connected
        with pytest.raises(DeviceUnavailable, match="broker not connected"):
            await driver.connect()
        with pytest.raises(DeviceUnavailable):
            await driver.write(LIMIT, 1.0)

        private_broker.start()  # same port: the connection's backoff brings it back
        await connection.wait_connected(5)
        await driver.connect()
        fleet = MqttDeviceFleet(
            url, [("m1", physics(), config, SIM_POINTS)], publish_period_s=0.1, version=version.value
        )
        await fleet.start()
        try:
            batch = await asyncio.wait_for(driver.receive(), 3)
        finally:
            await fleet.stop()
        assert {r.point for r in batch} == {POWER, VOLTAGE, LIMIT, LOCKED}
        assert connection.stats.losses == 1
        assert connection.stats.connects == 2
    finally:
        await driver.close()
        await connection.close()


async def test_start_without_broker_does_not_raise_and_drivers_are_unavailable(
    dead_letters: DeadLetters,
) -> None:
    connection = MqttConnection(
        f"mqtt://127.0.0.1:{free_port()}",
        client_id="scada-nobroker",
        version=MqttVersion.V5,
        timeout_s=0.5,
        dead_letters=dead_letters,
    )
    await connection.start()
    try:
        assert not connection.connected
        assert "cannot connect" in connection.last_error
        driver = MqttDriver(
            "m1",
            device_config("x"),
            SPECS,
            connection=connection,
            clock=SystemClock(),
            dead_letters=dead_letters,
        )
        with pytest.raises(DeviceUnavailable, match="broker not connected"):
            await driver.connect()
        with pytest.raises(DeviceUnavailable):
            await driver.receive()
    finally:
        await connection.close()


# --------------------------------------------------------------------------------------------------
# Under a DeviceSession (what the server runs)


@dataclass
class ListSink:
    """ReadingSink and EventSink that keep everything."""

    readings: list[Reading] = field(default_factory=list)
    events: list[AvailabilityEvent] = field(default_factory=list)

    async def publish(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)

    async def publish_event(self, event: AvailabilityEvent) -> None:
        self.events.append(event)


async def test_session_keeps_going_through_bad_payloads_and_verifies_a_write(
    rig: Rig, dead_letters: DeadLetters
) -> None:
    await rig.driver.close()  # the session connects it itself
    sink = ListSink()
    session = DeviceSession(
        rig.driver, points=[s.point for s in SPECS], sink=sink, events=sink, period_s=0.1, clock=SystemClock()
    )
    task = asyncio.create_task(session.run())
    try:
        await eventually(lambda: any(r.point == POWER for r in sink.readings))
        rig.fleet.publish_raw("m1", b'{"values": {"p": ')
        rig.fleet.publish_raw("m1", b"\x80\x81")
        count = len(sink.readings)
        await eventually(lambda: len(sink.readings) > count + 8)
        result = await session.execute(
            Command(
                point=LIMIT,
                value=42.0,
                priority=Priority.OPERATOR,
                source="test",
                reason="test",
                correlation_id="s-1",
            )
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert result.status is CommandStatus.VERIFIED, result.reason
    assert result.readback == 42.0
    # Telemetry in flight while the driver was between owners is "unknown topic"; nothing else.
    reasons = [r for r in dead_letters.reasons() if not r.startswith("unknown topic")]
    assert len(reasons) == 2
    assert "truncated JSON" in reasons[0]
    assert "not UTF-8" in reasons[1]
    assert [e.availability for e in sink.events] == [Availability.ONLINE]


async def test_mqtt5_against_a_311_only_broker_fails_with_the_reason(dead_letters: DeadLetters) -> None:
    """The demo's embedded broker (amqtt) speaks 3.1.1 only."""
    port = free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    await broker.start()
    try:
        outcomes = {}
        for version in VERSIONS:
            connection = MqttConnection(
                f"mqtt://127.0.0.1:{port}",
                client_id=f"scada-amqtt-{version.value}",
                version=version,
                timeout_s=1.0,
                dead_letters=dead_letters,
            )
            await connection.start()
            outcomes[version] = (connection.connected, connection.last_error)
            await connection.close()
    finally:
        await broker.shutdown()
    assert outcomes[MqttVersion.V311] == (True, "")
    assert outcomes[MqttVersion.V5][0] is False
    # amqtt refuses an MQTT 5 CONNECT with code 1, or (with properties in it) never answers.
    assert "cannot connect to 127.0.0.1" in outcomes[MqttVersion.V5][1]
    assert ("unacceptable protocol version" in outcomes[MqttVersion.V5][1]) or (
        "no CONNACK within 1 s" in outcomes[MqttVersion.V5][1]
    )


async def test_silent_device_goes_stale_and_a_heartbeat_keeps_it_alive(rig: Rig) -> None:
    await rig.driver.close()
    sink = ListSink()
    session = DeviceSession(
        rig.driver,
        points=[s.point for s in SPECS],
        sink=sink,
        events=sink,
        period_s=0.1,
        clock=SystemClock(),
        stale_after_s=0.4,
    )
    task = asyncio.create_task(session.run())
    try:
        await eventually(lambda: session.availability is Availability.ONLINE)
        rig.fleet.silence("m1")
        await eventually(lambda: session.availability is Availability.STALE)
        for _ in range(4):  # heartbeats only: alive, nothing new
            rig.fleet.heartbeat("m1")
            await asyncio.sleep(0.2)
            assert session.availability is Availability.ONLINE
        rig.fleet.silence("m1", silent=False)
        await eventually(lambda: len(sink.readings) > 20)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [e.availability for e in sink.events] == [
        Availability.ONLINE,
        Availability.STALE,
        Availability.ONLINE,
    ]
    assert sink.events[1].reason == "no update for 0.4 s"
