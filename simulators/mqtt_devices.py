"""Simulated MQTT devices: a fleet that publishes JSON telemetry and answers commands.

A real MQTT device holds its own broker connection; 10,000 simulated ones share a few (``connections``,
devices spread round-robin), which is what the broker cares about least and the simulator process
most. Each device publishes one telemetry message per ``publish_period_s``; device *i* of *N*
publishes at offset ``i / N`` of the period, so the broker sees a steady stream, not a burst per
period. A publisher task per connection wakes every few milliseconds and sends what is due.

Commands arrive on each device's command topic as ``{"correlation_id", "point": <field>, "value"}``.
The fleet applies them with ``physics.write(key, value)`` and answers on the response topic with
``{"correlation_id", "status": "ok", "value": <what the physics holds>}`` or ``"rejected"`` with a
reason, echoing the MQTT 5 correlation data. Payload values are device units:
payload = (physics value - offset) / scale, the inverse of the server's point scaling.

The simulators must not import the server's protocol packages (import-linter), so topics come as
plain strings through :class:`MqttDeviceConfigLike` (the server's ``MqttDeviceConfig`` fits it, so
does :class:`MqttSimTopics`).

Fault hooks for tests: :meth:`MqttDeviceFleet.publish_raw` (any payload, optionally retained, on a
device's telemetry topic), :meth:`~MqttDeviceFleet.silence` (a device stops publishing),
:meth:`~MqttDeviceFleet.ignore_commands` (a device stops answering),
:meth:`~MqttDeviceFleet.heartbeat`.

Like real devices, the fleet's connections reconnect on their own (gmqtt's reconnect, 1 s apart)
and subscribe to their command topics again on every CONNACK. Unlike careful devices, they do not
resend QoS 1 messages that were unacknowledged when a connection dropped (see ``_NoResend``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.storage import BasePersistentStorage

from simulators.physics import DevicePhysics

__all__ = ["MqttDeviceConfigLike", "MqttDeviceFleet", "MqttFleetStats", "MqttSimPoint", "MqttSimTopics"]

_LOGGER = logging.getLogger(__name__)

_TICK_S: Final = 0.005
"""How often a publisher task wakes to send what is due."""
_SUBSCRIPTIONS_PER_PACKET: Final = 500
_VERSIONS: Final = {"5": MQTTv50, "3.1.1": MQTTv311}


class MqttDeviceConfigLike(Protocol):
    """What the fleet needs of a device's MQTT settings: QoS and its three topics."""

    @property
    def qos(self) -> int:
        """Return the QoS of telemetry and responses."""

    def topics_for(self, device: str) -> tuple[str, str, str]:
        """Return the device's (telemetry, command, response) topics."""


@dataclass(frozen=True, slots=True)
class MqttSimTopics:
    """Topic templates as plain strings; ``{device}`` is replaced by the device id."""

    telemetry_topic: str = "carbonos/{device}/telemetry"
    command_topic: str = "carbonos/{device}/command"
    response_topic: str = "carbonos/{device}/command/response"
    qos: int = 1

    def topics_for(self, device: str) -> tuple[str, str, str]:
        """Return (telemetry, command, response) with ``{device}`` filled in."""
        return (
            self.telemetry_topic.replace("{device}", device),
            self.command_topic.replace("{device}", device),
            self.response_topic.replace("{device}", device),
        )


@dataclass(frozen=True, slots=True)
class MqttSimPoint:
    """One published value: physics variable ``key`` as payload field ``field``."""

    key: str
    field: str
    writable: bool = False
    scale: float = 1.0
    """Engineering value = payload value x scale + offset (as the server's point says)."""
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.scale == 0:
            raise ValueError(f"{self.key}: scale must not be 0")


@dataclass(slots=True)
class MqttFleetStats:
    """What the fleet has done, for tests and the bench."""

    published: int = 0
    skipped: int = 0
    """Telemetry not sent because the device's connection was down."""
    commands: int = 0
    responses: int = 0
    rejected_commands: int = 0


@dataclass(slots=True)
class _SimDevice:
    device_id: str
    physics: DevicePhysics
    points: tuple[MqttSimPoint, ...]
    telemetry_topic: str
    command_topic: str
    response_topic: str
    qos: int
    slot: float
    """Offset of this device's publish within the period, as a fraction (0 <= slot < 1)."""
    link: _Link | None = None
    silent: bool = False
    deaf: bool = False
    by_field: dict[str, MqttSimPoint] = field(default_factory=dict)


class _NoResend(BasePersistentStorage):  # type: ignore[misc]  # gmqtt ships no type hints
    """gmqtt storage of unacknowledged QoS 1 messages that stores nothing.

    gmqtt's default storage costs two tasks per message and a linear scan per PUBACK: at 10,000
    messages per second that is most of the simulator's time. Simulated telemetry is periodic, so
    a message lost in a reconnect is simply followed by the next one; nothing is resent.
    """

    def push_message_nowait(self, mid: int, raw_package: bytes) -> None:
        """Store nothing (and make no task)."""
        del mid, raw_package

    async def push_message(self, mid: int, raw_package: bytes) -> None:
        """Store nothing."""
        del mid, raw_package

    async def pop_message(self) -> tuple[int, bytes]:
        """Never called: the store is always empty."""
        raise IndexError("empty")

    async def remove_message_by_mid(self, mid: int) -> None:
        """Nothing to remove."""
        del mid

    @property
    async def is_empty(self) -> bool:
        """Return True: nothing is ever stored."""
        return True

    async def wait_empty(self) -> None:
        """Return at once."""

    async def clear(self) -> None:
        """Nothing to clear."""

    async def get_all(self) -> list[tuple[float, int, bytes]]:
        """Return nothing."""
        return []


class _Client(gmqtt.Client):  # type: ignore[misc]  # gmqtt ships no type hints
    """gmqtt client with its MQTT version pinned per connection (gmqtt keeps it in a class attribute)."""

    def __init__(self, client_id: str, *, version: int) -> None:
        super().__init__(client_id, persistent_storage=_NoResend())
        self.pinned_version = version

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
        connection = await super()._create_connection(*args, **kwargs)
        connection._protocol.proto_ver = self.pinned_version
        return connection

    def _remove_message_from_query(self, mid: int) -> None:
        """Skip gmqtt's task per PUBACK: :class:`_NoResend` holds nothing to remove."""
        del mid


class _Link:
    """One broker connection of the fleet and the devices it carries."""

    def __init__(self, fleet: MqttDeviceFleet, name: str, devices: list[_SimDevice], version: int) -> None:
        self.fleet = fleet
        self.name = name
        self.devices = devices
        self.by_command_topic = {d.command_topic: d for d in devices}
        self.client = _Client(name, version=version)
        self.client.reconnect_delay = 1
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.pending_subacks: set[int] = set()
        self.subscribed = asyncio.Event()

    def _on_connect(self, client: _Client, _flags: object, _rc: object, _props: object) -> None:
        """Subscribe to every command topic on each CONNACK (the broker forgot them on a loss)."""
        self.subscribed.clear()
        topics = list(self.by_command_topic)
        for start in range(0, len(topics), _SUBSCRIPTIONS_PER_PACKET):
            chunk = topics[start : start + _SUBSCRIPTIONS_PER_PACKET]
            qos = max(self.by_command_topic[t].qos for t in chunk)
            self.pending_subacks.add(client.subscribe([gmqtt.Subscription(t, qos=qos) for t in chunk]))
        if not topics:
            self.subscribed.set()

    def _on_subscribe(self, _client: object, mid: int, _granted: object, _props: object) -> None:
        self.pending_subacks.discard(mid)
        if not self.pending_subacks:
            self.subscribed.set()

    def _on_message(
        self, client: _Client, topic: str, payload: bytes, _qos: int, properties: dict[str, Any]
    ) -> None:
        device = self.by_command_topic.get(topic)
        if device is None or device.deaf:
            return
        self.fleet.stats.commands += 1
        correlation = properties.get("correlation_data")
        correlation_data: bytes | None = correlation[0] if correlation else None
        answer = self.fleet.apply_command(device, payload, correlation_data)
        reply_to = properties.get("response_topic")
        topic_out = reply_to[0] if reply_to else device.response_topic
        extra = {"correlation_data": correlation_data} if correlation_data is not None else {}
        if client.is_connected:
            client.publish(gmqtt.Message(topic_out, answer, qos=device.qos, **extra))
            self.fleet.stats.responses += 1

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> bool:
        """Publish if connected; return False when the message could not be handed to the socket."""
        if not self.client.is_connected:
            return False
        try:
            self.client.publish(gmqtt.Message(topic, payload, qos=qos, retain=retain))
        except (OSError, OverflowError) as err:  # OverflowError: every QoS 1 packet id is in flight
            _LOGGER.debug("%s: publish to %s failed: %s", self.name, topic, err)
            return False
        return True


class MqttDeviceFleet:
    """Many simulated MQTT devices over a few broker connections."""

    def __init__(
        self,
        broker_url: str,
        devices: Sequence[tuple[str, DevicePhysics, MqttDeviceConfigLike, Sequence[MqttSimPoint]]],
        *,
        publish_period_s: float,
        connections: int = 1,
        version: str = "5",
        client_id_prefix: str = "carbonos-sim",
        clock: Callable[[], datetime] | None = None,
        timestamps: bool = True,
        timeout_s: float = 10.0,
    ) -> None:
        if publish_period_s <= 0:
            raise ValueError("publish_period_s must be positive")
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if version not in _VERSIONS:
            raise ValueError(f"version must be one of {', '.join(_VERSIONS)}, got {version!r}")
        parts = urlsplit(broker_url)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ValueError(f"expected mqtt://host[:port], got {broker_url!r}")
        self._host, self._port = parts.hostname, parts.port or 1883
        self._period_s = publish_period_s
        self._version = version
        self._clock = clock or (lambda: datetime.now(UTC))
        self._timestamps = timestamps
        self._timeout_s = timeout_s
        self._devices: dict[str, _SimDevice] = {}
        count = len(devices)
        for index, (device_id, physics, config, points) in enumerate(devices):
            if device_id in self._devices:
                raise ValueError(f"device {device_id!r} is listed twice")
            telemetry, command, response = config.topics_for(device_id)
            for topic in (telemetry, command, response):
                if "+" in topic or "#" in topic:
                    raise ValueError(
                        f"{device_id}: a simulated device cannot use the wildcard topic {topic!r}"
                    )
            sim = _SimDevice(
                device_id=device_id,
                physics=physics,
                points=tuple(points),
                telemetry_topic=telemetry,
                command_topic=command,
                response_topic=response,
                qos=config.qos,
                slot=index / count,
            )
            sim.by_field = {p.field: p for p in sim.points}
            self._devices[device_id] = sim
        sims = list(self._devices.values())
        links = min(connections, max(1, len(sims)))
        self._links = [
            _Link(self, f"{client_id_prefix}-{i}", sims[i::links], _VERSIONS[version]) for i in range(links)
        ]
        for link in self._links:
            for sim in link.devices:
                sim.link = link
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = MqttFleetStats()

    def __str__(self) -> str:
        return (
            f"MQTT {self._version} fleet of {len(self._devices)} devices on {self._host}:{self._port} "
            f"({len(self._links)} connections, every {self._period_s:g} s)"
        )

    @property
    def devices(self) -> tuple[str, ...]:
        """Return the ids of every simulated device."""
        return tuple(self._devices)

    @property
    def running(self) -> bool:
        """Return True between :meth:`start` and :meth:`stop`."""
        return bool(self._tasks)

    async def start(self) -> None:
        """Connect every link, subscribe to the command topics and start publishing.

        Raise ``OSError`` or ``TimeoutError`` if the broker cannot be reached within ``timeout_s``;
        nothing stays open then.
        """
        if self._tasks:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                for link in self._links:
                    await link.client.connect(self._host, self._port, version=link.client.pinned_version)
                for link in self._links:
                    await link.subscribed.wait()
        except BaseException:
            await self._disconnect_all()
            raise
        t0 = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._publish_loop(link, t0), name=f"mqtt-sim:{link.name}")
            for link in self._links
        ]
        _LOGGER.info("%s: started", self)

    async def stop(self) -> None:
        """Stop publishing and disconnect every link; safe to call twice."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._disconnect_all()

    def refresh(self) -> None:
        """Do nothing: values are read from the physics when each message is built."""

    # ----------------------------------------------------------------------------------------------
    # Fault hooks

    def publish_raw(
        self, device: str, payload: bytes, *, retain: bool = False, topic: str | None = None
    ) -> None:
        """Publish ``payload`` as is on the device's telemetry topic (or on ``topic``)."""
        sim = self._device(device)
        assert sim.link is not None
        if not sim.link.publish(topic or sim.telemetry_topic, payload, qos=sim.qos, retain=retain):
            raise ConnectionError(f"{device}: the simulator's broker connection is down")

    def heartbeat(self, device: str) -> None:
        """Publish ``{"heartbeat": true}`` for one device."""
        self.publish_raw(device, b'{"heartbeat": true}')

    def silence(self, device: str, silent: bool = True) -> None:
        """Stop (or resume) one device's periodic telemetry."""
        self._device(device).silent = silent

    def ignore_commands(self, device: str, ignore: bool = True) -> None:
        """Make one device drop (or answer again) every command, as a hung device would."""
        self._device(device).deaf = ignore

    def telemetry(self, device: str) -> bytes:
        """Return the telemetry message the device would publish now."""
        return self._telemetry(self._device(device))

    # ----------------------------------------------------------------------------------------------
    # Internals

    def _device(self, device: str) -> _SimDevice:
        try:
            return self._devices[device]
        except KeyError:
            raise KeyError(f"no simulated MQTT device {device!r}") from None

    def _telemetry(self, sim: _SimDevice) -> bytes:
        values = {}
        for point in sim.points:
            value = (sim.physics.value(point.key) - point.offset) / point.scale
            values[point.field] = round(value, 6) if math.isfinite(value) else None
        doc: dict[str, Any] = {"values": values}
        if self._timestamps:
            doc["ts"] = round(self._clock().timestamp() * 1000, 3)
        return json.dumps(doc, separators=(",", ":")).encode()

    def apply_command(self, sim: _SimDevice, payload: bytes, correlation_data: bytes | None) -> bytes:
        """Apply one command to the physics; return the response body."""
        correlation_id = correlation_data.decode(errors="replace") if correlation_data else ""
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return self._reject(correlation_id, "command is not JSON")
        if not isinstance(doc, dict):
            return self._reject(correlation_id, "command is not a JSON object")
        correlation_id = str(doc.get("correlation_id") or correlation_id)
        point = sim.by_field.get(str(doc.get("point")))
        value = doc.get("value")
        if point is None:
            return self._reject(correlation_id, f"unknown point {doc.get('point')!r}")
        if not point.writable:
            return self._reject(correlation_id, f"point {point.field!r} is not writable")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return self._reject(correlation_id, f"value {value!r} is not a number")
        sim.physics.write(point.key, value * point.scale + point.offset)
        held = (sim.physics.value(point.key) - point.offset) / point.scale
        body = {"correlation_id": correlation_id, "status": "ok", "value": held}
        return json.dumps(body, separators=(",", ":")).encode()

    def _reject(self, correlation_id: str, reason: str) -> bytes:
        self.stats.rejected_commands += 1
        body = {"correlation_id": correlation_id, "status": "rejected", "reason": reason}
        return json.dumps(body, separators=(",", ":")).encode()

    async def _publish_loop(self, link: _Link, t0: float) -> None:
        """Publish each device of the link at its slot of every period, waking every few ms."""
        devices = sorted(link.devices, key=lambda d: d.slot)
        if not devices:
            return
        period_s, cycle, index = self._period_s, 0, 0
        while True:
            due_s = t0 + (cycle + devices[index].slot) * period_s
            delay_s = due_s - time.monotonic()
            if delay_s > 0:
                await asyncio.sleep(max(delay_s, _TICK_S))
            now_s = time.monotonic()
            while due_s <= now_s:
                sim = devices[index]
                if not sim.silent:
                    if link.publish(sim.telemetry_topic, self._telemetry(sim), qos=sim.qos):
                        self.stats.published += 1
                    else:
                        self.stats.skipped += 1
                index += 1
                if index == len(devices):
                    index, cycle = 0, cycle + 1
                due_s = t0 + (cycle + devices[index].slot) * period_s

    async def _disconnect_all(self) -> None:
        for link in self._links:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout_s):
                    if link.client._connection is not None:
                        await link.client.disconnect()
