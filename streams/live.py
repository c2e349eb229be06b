"""Live fan-out: the latest value of every point, pushed to websocket subscribers.

Every API process keeps its own hub fed by a plain ``XREAD`` of the readings and events streams (not a
consumer group: each process must see every entry, and missing a live frame is harmless because the
historian holds the record). Each subscriber owns a bounded queue that drops its *oldest* frame when
full, so one slow browser never stalls the others or grows memory (STYLE.md: fan-out never blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scada.model import Availability, AvailabilityEvent, DecodeError, DeviceId, PointId, Reading
from scada.runtime import Backoff, raise_if_cancelling
from streams.bus import as_text
from streams.codec import decode_event, decode_json_event, decode_readings

__all__ = [
    "AlarmFrame",
    "AvailabilityHandler",
    "Frame",
    "LiveHub",
    "Subscription",
    "follow_availability",
    "run_live_feed",
]

_XReadReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AlarmFrame:
    """Alarm state transitions for one client (the ``alarms`` stream's event dicts)."""

    events: list[Mapping[str, Any]]


Frame = list[Reading] | AlarmFrame


@dataclass(eq=False, slots=True)
class Subscription:
    """One client's interest (points, alarm consoles) and its bounded outbox of frames."""

    queue: asyncio.Queue[Frame]
    points: set[PointId] = field(default_factory=set)
    alarm_consoles: set[str] | None = None
    """Consoles whose alarms the client follows; empty: every console; None: no alarms."""
    alarm_nodes: set[str] | None = None
    """Nodes whose alarms the client may see (its tenant and grants); None: no restriction."""
    dropped_frames: int = 0
    """Frames dropped because the client fell behind; reported to the client, then reset."""

    def wants_alarm(self, event: Mapping[str, Any]) -> bool:
        """Return True if the client follows the console of this alarm event."""
        consoles, nodes = self.alarm_consoles, self.alarm_nodes
        if consoles is None or (nodes is not None and event.get("node") not in nodes):
            return False
        return not consoles or event.get("console") in consoles

    def offer(self, frame: Frame) -> None:
        """Queue a frame, dropping the oldest queued frame if the client is behind."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped_frames += 1
        self.queue.put_nowait(frame)


class LiveHub:
    """Latest values per point and device availability, with latest-wins fan-out."""

    def __init__(self, *, frames_per_client: int = 256) -> None:
        if frames_per_client < 1:
            raise ValueError("frames_per_client must be >= 1")
        self._frames_per_client = frames_per_client
        self._latest: dict[PointId, Reading] = {}
        self._availability: dict[DeviceId, AvailabilityEvent] = {}
        self._subscriptions: set[Subscription] = set()
        self.readings_seen = 0
        self.alarm_events_seen = 0

    @property
    def subscriber_count(self) -> int:
        """Return how many clients are subscribed."""
        return len(self._subscriptions)

    @property
    def availability(self) -> Mapping[DeviceId, AvailabilityEvent]:
        """Return the last availability event of each device seen since start."""
        return self._availability

    def latest(self, point: PointId) -> Reading | None:
        """Return the newest reading of a point seen since start, if any."""
        return self._latest.get(point)

    def snapshot(self, points: Iterable[PointId]) -> list[Reading]:
        """Return the latest reading of each of ``points`` that has one."""
        return [r for p in points if (r := self._latest.get(p)) is not None]

    def publish(self, readings: Sequence[Reading]) -> None:
        """Record a batch as the latest values and offer each subscriber the part it asked for."""
        fresh: list[Reading] = []
        for reading in readings:
            current = self._latest.get(reading.point)
            if current is None or reading.ts >= current.ts:  # a redelivered old reading is not news
                self._latest[reading.point] = reading
                fresh.append(reading)
        self.readings_seen += len(readings)
        if not fresh:
            return
        for sub in self._subscriptions:
            if sub.points:
                frame = [r for r in fresh if r.point in sub.points]
                if frame:
                    sub.offer(frame)

    def publish_event(self, event: AvailabilityEvent) -> None:
        """Record a device availability change."""
        current = self._availability.get(event.device)
        if current is None or event.ts >= current.ts:
            self._availability[event.device] = event

    def publish_alarms(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Offer alarm state transitions to the clients that follow their consoles."""
        self.alarm_events_seen += len(events)
        for sub in self._subscriptions:
            if sub.alarm_consoles is not None:
                frame = [e for e in events if sub.wants_alarm(e)]
                if frame:
                    sub.offer(AlarmFrame(frame))

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """Register a client for the duration of the ``with`` block."""
        sub = Subscription(queue=asyncio.Queue(maxsize=self._frames_per_client))
        self._subscriptions.add(sub)
        try:
            yield sub
        finally:
            self._subscriptions.discard(sub)


async def run_live_feed(
    redis: aioredis.Redis,
    hub: LiveHub,
    *,
    readings_key: str,
    events_key: str,
    alarms_key: str | None = None,
    block_ms: int = 1_000,
    count: int = 1_000,
    timeout_s: float = 5.0,
) -> None:
    """Feed ``hub`` from the readings, events (and alarms) streams until cancelled.

    Starts at the streams' current ends: a live view wants what happens from now on. Entries
    that cannot be decoded are skipped here; the historian's consumer group dead-letters them.
    """
    last_ids: dict[str, str] = {}
    backoff = Backoff(initial_s=0.2, max_s=10.0)
    healthy = True
    while True:
        raise_if_cancelling()
        try:
            if not last_ids:  # explicit ids, not "$": "$" between two XREADs would miss entries
                keys = (readings_key, events_key) + ((alarms_key,) if alarms_key is not None else ())
                last_ids = {key: await _last_id(redis, key, timeout_s) for key in keys}
            async with asyncio.timeout(block_ms / 1000 + timeout_s):
                reply = cast(_XReadReply, await redis.xread(last_ids, count=count, block=block_ms))  # type: ignore[arg-type]
        except (RedisError, OSError, TimeoutError) as err:
            if healthy:
                _LOGGER.warning("live feed: Redis unavailable: %s", err)
                healthy = False
            await asyncio.sleep(backoff.next_delay())
            continue
        if not healthy:
            _LOGGER.info("live feed: Redis available again")
            healthy = True
            backoff.reset()
        for raw_key, entries in reply or []:
            key = as_text(raw_key)
            for entry_id, fields in entries:
                last_ids[key] = as_text(entry_id)
                try:
                    if key == readings_key:
                        hub.publish(decode_readings(fields))
                    elif key == alarms_key:
                        hub.publish_alarms([decode_json_event(fields, b"alarm")])
                    else:
                        hub.publish_event(decode_event(fields))
                except DecodeError as err:
                    _LOGGER.debug("live feed: skipping undecodable entry %s: %s", entry_id, err)


AvailabilityHandler = Callable[[DeviceId, bool, datetime, str], Awaitable[None]]
"""``handler(device, online, ts, reason)``."""


async def follow_availability(
    redis: aioredis.Redis,
    events_key: str,
    handler: AvailabilityHandler,
    *,
    block_ms: int = 1_000,
    timeout_s: float = 5.0,
) -> None:
    """Call ``handler`` for every device availability change on the events stream until cancelled.

    Starts at the stream's current end (state carried over a restart lives in the handler's own
    saved state); ``stale`` counts as not online. Other event types on the stream are skipped.
    """
    last_id: str | None = None
    backoff = Backoff(initial_s=0.2, max_s=10.0)
    while True:
        raise_if_cancelling()
        try:
            if last_id is None:
                last_id = await _last_id(redis, events_key, timeout_s)
            async with asyncio.timeout(block_ms / 1000 + timeout_s):
                reply = cast(_XReadReply, await redis.xread({events_key: last_id}, count=500, block=block_ms))
        except (RedisError, OSError, TimeoutError) as err:
            _LOGGER.debug("availability follower: Redis unavailable: %s", err)
            await asyncio.sleep(backoff.next_delay())
            continue
        backoff.reset()
        for _key, entries in reply or []:
            for entry_id, fields in entries:
                last_id = as_text(entry_id)
                try:
                    event = decode_event(fields)
                except DecodeError:
                    continue  # ledger updates, quota alerts...: not availability
                online = event.availability is Availability.ONLINE
                await handler(event.device, online, event.ts, event.reason)


async def _last_id(redis: aioredis.Redis, key: str, timeout_s: float) -> str:
    """Return the id of the newest entry of a stream, or ``0-0`` if it is empty or absent."""
    async with asyncio.timeout(timeout_s):
        newest = await redis.xrevrange(key, count=1)
    if not newest:
        return "0-0"
    return as_text(newest[0][0])
