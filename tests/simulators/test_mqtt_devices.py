"""The simulated MQTT fleet on the local Mosquitto, observed with a plain gmqtt client."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import gmqtt
import pytest
from gmqtt.mqtt.constants import MQTTv50

from simulators.mqtt_devices import MqttDeviceFleet, MqttSimPoint, MqttSimTopics
from simulators.physics import DevicePhysics, make_physics

POINTS = [
    MqttSimPoint("active_power_kw", "p", scale=0.1),
    MqttSimPoint("power_limit_pct", "lim", writable=True),
]


@dataclass
class Observer:
    """A plain MQTT 5 client that records what arrives."""

    client: Any
    messages: list[tuple[float, str, bytes, dict[str, Any]]] = field(default_factory=list)

    def on_message(
        self, _client: object, topic: str, payload: bytes, _qos: int, properties: dict[str, Any]
    ) -> int:
        self.messages.append((time.monotonic(), topic, payload, properties))
        return 0

    def on(self, topic_suffix: str) -> list[tuple[float, str, bytes, dict[str, Any]]]:
        return [m for m in self.messages if m[1].endswith(topic_suffix)]


@pytest.fixture
def topics() -> MqttSimTopics:
    prefix = f"carbonos-test/{uuid.uuid4().hex[:10]}"
    return MqttSimTopics(
        telemetry_topic=f"{prefix}/{{device}}/telemetry",
        command_topic=f"{prefix}/{{device}}/command",
        response_topic=f"{prefix}/{{device}}/response",
        qos=1,
    )


@pytest.fixture
async def observer(mqtt_url: str, topics: MqttSimTopics) -> AsyncIterator[Observer]:
    client = gmqtt.Client(f"observer-{uuid.uuid4().hex[:8]}")
    watcher = Observer(client)
    client.on_message = watcher.on_message
    parts = urlsplit(mqtt_url)
    await client.connect(parts.hostname, parts.port or 1883, version=MQTTv50)
    prefix = topics.telemetry_topic.split("/{device}")[0]
    client.subscribe(f"{prefix}/#", qos=1)
    await asyncio.sleep(0.1)
    try:
        yield watcher
    finally:
        await client.disconnect()


def meter(power_kw: float = 0.0) -> DevicePhysics:
    physics = make_physics("power_meter", None, tz=ZoneInfo("UTC"), start=datetime.now(UTC), seed=3)
    physics.override("active_power_kw", power_kw)
    return physics


async def wait_for(predicate: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_every_device_publishes_once_per_period_spread_over_the_period(
    mqtt_url: str, topics: MqttSimTopics, observer: Observer
) -> None:
    devices = [(f"d{i:02d}", meter(10.0 + i), topics, POINTS) for i in range(20)]
    fleet = MqttDeviceFleet(
        mqtt_url, devices, publish_period_s=0.5, connections=3, client_id_prefix=f"sim-{uuid.uuid4().hex[:6]}"
    )
    await fleet.start()
    try:
        await asyncio.sleep(1.25)
    finally:
        await fleet.stop()
    await wait_for(lambda: len(observer.on("/telemetry")) == fleet.stats.published)  # the last in flight
    telemetry = observer.on("/telemetry")
    per_device: dict[str, list[float]] = {}
    for at, topic, payload, _ in telemetry:
        per_device.setdefault(topic.split("/")[-2], []).append(at)
        doc = json.loads(payload)
        device_index = int(topic.split("/")[-2][1:])
        assert doc["values"]["p"] == pytest.approx((10.0 + device_index) / 0.1)  # device units: tenths of kW
        assert abs(doc["ts"] / 1000 - time.time()) < 5
    assert sorted(per_device) == [d[0] for d in devices]
    assert all(2 <= len(times) <= 4 for times in per_device.values())
    for times in per_device.values():  # one period apart
        assert all(0.4 < b - a < 0.6 for a, b in itertools.pairwise(times))
    first_cycle = sorted(times[0] for times in per_device.values())
    assert first_cycle[-1] - first_cycle[0] > 0.35  # 20 slots over 0.5 s, not one burst


async def test_command_is_applied_and_answered_with_the_correlation_id(
    mqtt_url: str, topics: MqttSimTopics, observer: Observer
) -> None:
    physics = meter()
    fleet = MqttDeviceFleet(
        mqtt_url,
        [("m1", physics, topics, POINTS)],
        publish_period_s=60,
        client_id_prefix=f"sim-{uuid.uuid4().hex[:6]}",
    )
    _, command_topic, response_topic = topics.topics_for("m1")
    await fleet.start()
    try:
        observer.client.publish(
            command_topic,
            json.dumps({"correlation_id": "c-42", "point": "lim", "value": 70}),
            qos=1,
            response_topic=response_topic,
            correlation_data=b"c-42",
        )
        observer.client.publish(
            command_topic, json.dumps({"correlation_id": "c-43", "point": "p", "value": 1}), qos=1
        )
        observer.client.publish(command_topic, b"{oops", qos=1, correlation_data=b"c-44")
        observer.client.publish(
            command_topic, json.dumps({"correlation_id": "c-45", "point": "lim", "value": "x"}), qos=1
        )
        await wait_for(lambda: len(observer.on("/response")) == 4)
    finally:
        await fleet.stop()
    responses = {
        json.loads(p)["correlation_id"]: (json.loads(p), props) for _, _, p, props in observer.on("/response")
    }
    assert responses["c-42"][0] == {"correlation_id": "c-42", "status": "ok", "value": 70.0}
    assert responses["c-42"][1]["correlation_data"] == [b"c-42"]
    assert physics.value("power_limit_pct") == 70.0
    assert responses["c-43"][0] == {
        "correlation_id": "c-43",
        "status": "rejected",
        "reason": "point 'p' is not writable",
    }
    assert responses["c-44"][0]["reason"] == "command is not JSON"
    assert responses["c-45"][0]["reason"] == "value 'x' is not a number"
    assert fleet.stats.commands == 4
    assert fleet.stats.rejected_commands == 3


async def test_fault_hooks(mqtt_url: str, topics: MqttSimTopics, observer: Observer) -> None:
    fleet = MqttDeviceFleet(
        mqtt_url,
        [("a", meter(), topics, POINTS), ("b", meter(), topics, POINTS)],
        publish_period_s=0.1,
        client_id_prefix=f"sim-{uuid.uuid4().hex[:6]}",
    )
    await fleet.start()
    try:
        fleet.silence("a")
        fleet.ignore_commands("b")
        await asyncio.sleep(0.15)
        observer.messages.clear()
        fleet.publish_raw("a", b"\x00garbage")
        fleet.heartbeat("a")
        observer.client.publish(
            topics.topics_for("b")[1], b'{"correlation_id": "c", "point": "lim", "value": 1}', qos=1
        )
        await asyncio.sleep(0.5)
    finally:
        await fleet.stop()
    from_a = [p for _, t, p, _ in observer.messages if t == topics.topics_for("a")[0]]
    assert from_a == [b"\x00garbage", b'{"heartbeat": true}']  # no periodic telemetry while silent
    assert len(observer.on("b/telemetry")) >= 3
    assert observer.on("/response") == []  # b ignored the command


async def test_retained_message_reaches_a_later_subscriber(mqtt_url: str, topics: MqttSimTopics) -> None:
    fleet = MqttDeviceFleet(
        mqtt_url,
        [("r1", meter(), topics, POINTS)],
        publish_period_s=60,
        client_id_prefix=f"sim-{uuid.uuid4().hex[:6]}",
    )
    await fleet.start()
    got: list[tuple[bytes, int]] = []
    late = gmqtt.Client(f"late-{uuid.uuid4().hex[:6]}")
    late.on_message = lambda _c, _t, payload, _q, props: got.append((payload, props["retain"]))
    try:
        fleet.publish_raw("r1", b'{"values": {"p": 1}}', retain=True)
        await asyncio.sleep(0.2)
        parts = urlsplit(mqtt_url)
        await late.connect(parts.hostname, parts.port or 1883, version=MQTTv50)
        late.subscribe(topics.topics_for("r1")[0], qos=1)
        await wait_for(lambda: bool(got))
    finally:
        fleet.publish_raw("r1", b"", retain=True)
        await asyncio.sleep(0.1)
        await late.disconnect()
        await fleet.stop()
    assert got[0] == (b'{"values": {"p": 1}}', 1)


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        MqttDeviceFleet(
            "mqtt://127.0.0.1",
            [("a", meter(), MqttSimTopics(telemetry_topic="x/+/t"), POINTS)],
            publish_period_s=1,
        )
    with pytest.raises(ValueError, match="listed twice"):
        MqttDeviceFleet("mqtt://127.0.0.1", [("a", meter(), MqttSimTopics(), POINTS)] * 2, publish_period_s=1)
    with pytest.raises(ValueError, match="version"):
        MqttDeviceFleet("mqtt://127.0.0.1", [], publish_period_s=1, version="4")
    fleet = MqttDeviceFleet(
        "mqtt://127.0.0.1:1883", [("a", meter(), MqttSimTopics(), POINTS)], publish_period_s=2
    )
    assert str(fleet) == "MQTT 5 fleet of 1 devices on 127.0.0.1:1883 (1 connections, every 2 s)"
