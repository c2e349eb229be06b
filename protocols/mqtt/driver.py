"""MQTT device driver: JSON telemetry pushed by the device, commands answered with a correlation id.

The driver implements :class:`scada.model.SubscriptionDriver` (acquisition SUBSCRIBE). It owns no
socket: every driver of a broker shares one :class:`~protocols.mqtt.connection.MqttConnection`,
registers its telemetry and response topics there on :meth:`MqttDriver.connect` and unregisters
them on :meth:`MqttDriver.close`. It never reconnects; the session does, and the shared connection
owns the broker link (see that module).

Flow
----
- gmqtt's callback hands each message to :meth:`MqttDriver.handle_message`, which parses it at
  once (:mod:`protocols.mqtt.payload`, pure and cheap), updates the latest value of each point,
  wakes a pending :meth:`~MqttDriver.read_back`, and appends the batch of readings to a bounded
  queue. When the queue is full the oldest batch is dropped and counted (``stats.dropped``).
- :meth:`~MqttDriver.receive` returns the next batch. A heartbeat (``{"heartbeat": true}``) or a
  message with empty ``values`` gives ``[]``: the device is alive, nothing changed. A message that
  cannot be parsed goes to the dead-letter sink with the reason and is skipped.
- :meth:`~MqttDriver.read` returns the latest reading of every point received so far, and a bad
  reading "no value received yet" for the others: an MQTT device cannot be asked for a value.
- Retained messages (delivered by the broker on subscribe, possibly hours old) are used, but good
  values in them become uncertain, "retained message: may be old".

Commands
--------
:meth:`~MqttDriver.write` publishes ``{"correlation_id", "point": <field>, "value", "ts"}`` to the
command topic (MQTT 5: also as correlation data, with the response topic as a property) and waits
``timeout_s`` for ``{"correlation_id", "status": "ok"|"rejected", "reason"?, "value"?}`` on the
response topic. ``rejected`` raises :class:`DeviceProtocolError` with the device's reason; silence
raises :class:`DeviceUnavailable` ("no response ..."). :meth:`~MqttDriver.read_back` returns the
value the response carried, else waits (``timeout_s``) for the next telemetry value of the point.

Values: engineering value = payload value x scale + offset; a command carries
(value - offset) / scale, in the device's own units.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from protocols.common import BatchQueue, LatestReadings, PointRejected, index_points, lookup_point
from protocols.mqtt.config import MqttDeviceConfig
from protocols.mqtt.connection import MqttConnection, MqttMessage
from protocols.mqtt.payload import (
    CommandResponse,
    FieldValue,
    encode_command,
    parse_response,
    parse_telemetry,
)
from scada.model import (
    Acquisition,
    Clock,
    DeadLetterSink,
    DecodeError,
    DeviceError,
    DeviceId,
    DeviceProtocolError,
    DeviceUnavailable,
    PointId,
    Quality,
    Reading,
)

__all__ = ["MqttDriver", "MqttDriverStats", "MqttPointSpec", "PointRejected"]

_LOGGER = logging.getLogger(__name__)

DEFAULT_QUEUE_BATCHES: Final = 64
"""Batches a driver holds for its session; at 1 message/s that is a minute of slack."""
_RETAINED: Final = Quality.uncertain("retained message: may be old")
_NO_VALUE_YET: Final = Quality.bad("no value received yet")


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttPointSpec:
    """One point as the driver sees it: which payload field, how to scale it, whether it is writable."""

    point: PointId
    field: str
    scale: float = 1.0
    """Engineering value = payload value x scale + offset."""
    offset: float = 0.0
    writable: bool = False

    def __post_init__(self) -> None:
        if self.scale == 0:
            raise ValueError(f"{self.point}: scale must not be 0")
        if not self.field:
            raise ValueError(f"{self.point}: field must not be empty")


@dataclass(slots=True)
class MqttDriverStats:
    """Counters of one driver, for the session, /metrics and the benches."""

    messages: int = 0
    heartbeats: int = 0
    rejected: int = 0
    """Messages sent to the dead-letter sink (unparseable telemetry, unmatched responses)."""
    dropped: int = 0
    """Batches dropped because the session did not keep up (oldest first)."""
    unknown_fields: int = 0
    retained: int = 0


class MqttDriver:
    """Talk to one MQTT device over a shared broker connection."""

    def __init__(
        self,
        device: str,
        config: MqttDeviceConfig,
        points: Sequence[MqttPointSpec],
        *,
        connection: MqttConnection,
        clock: Clock,
        dead_letters: DeadLetterSink,
        queue_batches: int = DEFAULT_QUEUE_BATCHES,
    ) -> None:
        self.stats = MqttDriverStats()
        self._device = DeviceId(device)
        self._batches = BatchQueue(
            self._device, queue_batches=queue_batches, stats=self.stats, logger=_LOGGER
        )
        self._config = config
        self._connection = connection
        self._clock = clock
        self._dead_letters = dead_letters
        self._telemetry_topic, self._command_topic, self._response_topic = config.topics_for(device)
        if self._telemetry_topic == self._response_topic:
            raise ValueError(f"{device}: telemetry and response topics must differ")
        self._specs = index_points(device, points)
        self._by_field: dict[str, list[MqttPointSpec]] = {}
        for spec in self._specs.values():
            self._by_field.setdefault(spec.field, []).append(spec)
        self._latest = LatestReadings(missing=_NO_VALUE_YET)
        self._sample_waiters: dict[PointId, list[asyncio.Future[Reading]]] = {}
        self._responses: dict[str, asyncio.Future[CommandResponse]] = {}
        self._readback: dict[PointId, float] = {}
        self._registered = False
        self._lost: str | None = "not connected"

    @property
    def device(self) -> DeviceId:
        """Return the id of the device this driver talks to."""
        return self._device

    @property
    def acquisition(self) -> Acquisition:
        """Return SUBSCRIBE: the device pushes its telemetry."""
        return Acquisition.SUBSCRIBE

    @property
    def points(self) -> tuple[PointId, ...]:
        """Return the ids of every configured point, in configuration order."""
        return tuple(self._specs)

    @property
    def topics(self) -> tuple[str, str, str]:
        """Return the (telemetry, command, response) topics of this device."""
        return self._telemetry_topic, self._command_topic, self._response_topic

    def __repr__(self) -> str:
        return f"MqttDriver({self._device!r}, {self._telemetry_topic!r})"

    # ----------------------------------------------------------------------------------------------
    # Driver protocol

    async def connect(self) -> None:
        """Register the device's topics with the shared connection (waits for the broker's SUBACK).

        Raise :class:`DeviceUnavailable` while the broker is not connected.
        """
        if self._registered and self._lost is None:
            return
        await self.close()
        if not self._connection.connected:
            raise DeviceUnavailable(f"{self._device}: MQTT broker not connected")
        self._lost = None
        self._registered = True
        qos = self._config.qos
        try:
            await self._connection.register(self._telemetry_topic, self, qos=self._config.telemetry_qos)
            await self._connection.register(self._response_topic, self, qos=qos)
        except DeviceError as err:
            await self.close()
            raise type(err)(f"{self._device}: {err}") from err
        except BaseException:
            await self.close()
            raise

    async def receive(self) -> list[Reading]:
        """Return the next batch the device pushed ([] for a heartbeat); raise when the link is lost."""
        return await self._batches.get(self._check_link)

    async def read(self) -> list[Reading]:
        """Return the latest reading of every point, bad "no value received yet" for the others."""
        self._check_link()
        return self._latest.snapshot(self._specs, self._clock.now())

    async def write(
        self, point: PointId, value: float, *, correlation_id: str = "", hold_until: datetime | None = None
    ) -> None:
        """Publish a command and wait ``timeout_s`` for the device's response with the same id."""
        spec = self._spec(point)
        if not spec.writable:
            raise PointRejected(f"{point}: the point is not writable")
        self._check_link()
        correlation_id = correlation_id or uuid.uuid4().hex
        if correlation_id in self._responses:
            raise PointRejected(f"{point}: a command with correlation id {correlation_id!r} is pending")
        raw = (value - spec.offset) / spec.scale
        body = encode_command(
            correlation_id=correlation_id, field=spec.field, value=raw, ts=self._clock.now()
        )
        response: asyncio.Future[CommandResponse] = asyncio.get_running_loop().create_future()
        self._responses[correlation_id] = response
        self._readback.pop(point, None)
        timeout_s = self._config.timeout_s
        try:
            self._connection.publish(
                self._command_topic,
                body,
                qos=self._config.qos,
                response_topic=self._response_topic,
                correlation_data=correlation_id.encode(),
            )
            async with asyncio.timeout(timeout_s):
                answer = await response
        except TimeoutError:
            raise DeviceUnavailable(
                f"{self._device}: no response to the command on {point} within {timeout_s:g} s"
            ) from None
        finally:
            self._responses.pop(correlation_id, None)
        if not answer.ok:
            raise DeviceProtocolError(
                f"{self._device}: command on {point} rejected: {answer.reason or 'no reason given'}"
            )
        if answer.value is not None:
            self._readback[point] = answer.value * spec.scale + spec.offset

    async def read_back(self, point: PointId) -> float:
        """Return the value the last response reported, else the next telemetry value of the point.

        A response's value stands until newer telemetry of the point arrives, so a caller that
        reads back repeatedly (a session waiting for a ramp) gets the newest known value each time.
        """
        self._spec(point)
        if point in self._readback:
            return self._readback[point]
        self._check_link()
        waiter: asyncio.Future[Reading] = asyncio.get_running_loop().create_future()
        self._sample_waiters.setdefault(point, []).append(waiter)
        timeout_s = self._config.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                reading = await waiter
        except TimeoutError:
            raise DeviceUnavailable(
                f"{self._device}: no telemetry for {point} within {timeout_s:g} s to read back"
            ) from None
        finally:
            waiters = self._sample_waiters.get(point, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._sample_waiters.pop(point, None)
        if reading.value is None:
            raise DeviceProtocolError(f"{self._device}: read-back of {point}: {reading.quality}")
        return reading.value

    async def close(self) -> None:
        """Unregister the device's topics and fail pending waits; safe to call at any time."""
        if self._registered:
            self._registered = False
            self._connection.unregister(self._telemetry_topic, self)
            self._connection.unregister(self._response_topic, self)
        self._fail_waits("driver closed")
        self._batches.clear()

    # ----------------------------------------------------------------------------------------------
    # MessageHandler (called from gmqtt's receive callback: no awaiting, no blocking)

    def handle_message(self, message: MqttMessage) -> None:
        """Parse one message of this device's topics and deliver it."""
        self.stats.messages += 1
        if message.topic == self._response_topic:
            self._handle_response(message)
        else:
            self._handle_telemetry(message)

    def connection_lost(self, reason: str) -> None:
        """Fail every wait: the session sees :class:`DeviceUnavailable` and takes over."""
        self._fail_waits(f"MQTT broker {reason}")

    # ----------------------------------------------------------------------------------------------
    # Internals

    def _handle_telemetry(self, message: MqttMessage) -> None:
        received = self._clock.now()
        try:
            telemetry = parse_telemetry(message.payload, received=received, known=self._by_field)
        except DecodeError as err:
            self._reject(message, f"telemetry: {err}")
            return
        self.stats.unknown_fields += telemetry.unknown_fields
        if telemetry.heartbeat:
            self.stats.heartbeats += 1
        if message.retained:
            self.stats.retained += 1
        batch: list[Reading] = []
        latest, readback, sample_waiters = self._latest, self._readback, self._sample_waiters
        for item in telemetry.values:
            quality = item.quality
            if message.retained and quality.is_good:
                quality = _RETAINED
            for spec in self._by_field[item.field]:
                reading = _scaled(item, spec, quality)
                batch.append(reading)
                latest.keep(reading)
                if readback:
                    readback.pop(spec.point, None)  # telemetry is newer than any response value
                if sample_waiters:
                    for waiter in sample_waiters.pop(spec.point, ()):
                        if not waiter.done():
                            waiter.set_result(reading)
        self._batches.put(batch)

    def _handle_response(self, message: MqttMessage) -> None:
        try:
            response = parse_response(message.payload, correlation_data=message.correlation_data)
        except DecodeError as err:
            self._reject(message, f"command response: {err}")
            return
        waiter = self._responses.get(response.correlation_id)
        if waiter is None or waiter.done():
            if message.retained:
                return  # an old answer kept by the broker; nobody waits for it
            self._reject(message, f"command response: no pending command {response.correlation_id!r}")
            return
        waiter.set_result(response)

    def _reject(self, message: MqttMessage, reason: str) -> None:
        self.stats.rejected += 1
        self._dead_letters.reject(origin=f"mqtt:{message.topic}", payload=message.payload, reason=reason)

    def _fail_waits(self, reason: str) -> None:
        self._lost = reason
        self._batches.wake()
        error = DeviceUnavailable(f"{self._device}: {reason}")
        for future in self._responses.values():
            if not future.done():
                future.set_exception(error)
        for waiters in self._sample_waiters.values():
            for sample_waiter in waiters:
                if not sample_waiter.done():
                    sample_waiter.set_exception(error)
        self._sample_waiters.clear()

    def _check_link(self) -> None:
        if self._lost is not None:
            raise DeviceUnavailable(f"{self._device}: {self._lost}")

    def _spec(self, point: PointId) -> MqttPointSpec:
        return lookup_point(self._device, self._specs, point)


def _scaled(item: FieldValue, spec: MqttPointSpec, quality: Quality) -> Reading:
    """Return one point's reading of a field value; bad when scaling leaves the float range."""
    if item.value is None:
        return Reading(point=spec.point, ts=item.ts, value=None, quality=quality)
    value = item.value * spec.scale + spec.offset
    if not math.isfinite(value):  # e.g. 1e307 MW x 1000 kW/MW: there is no such figure in kW
        bad = Quality.bad(f"{item.value:g} x scale {spec.scale:g} is out of range")
        return Reading(point=spec.point, ts=item.ts, value=None, quality=bad)
    return Reading(point=spec.point, ts=item.ts, value=value, quality=quality)
