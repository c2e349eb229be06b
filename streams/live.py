"""Live fan-out: the latest value of every point, pushed to websocket subscribers.

Every API process keeps its own hub fed by a plain ``XREAD`` of the readings, events, alarms and
command results streams (not a consumer group: each process must see every entry, and missing a live
frame is harmless because the historian holds the record).

Fan-out cost
------------
Subscribers are indexed by point (point -> set of subscriptions), so a reading touches only the
clients that asked for its point, and for each of them costs one dict store: readings are
*coalesced* per client (latest wins per point) and flushed at most ``max_rate_hz`` times a second.
A reading's JSON text is made once, when the first client flushes it, and shared by every client,
so a flush is a string join.

Events (alarm transitions, dispatch results, ledger updates, quota alerts, availability changes) are
not coalesced: each goes into the client's bounded queue, which drops its *oldest* frame when full
and counts the drop, so one slow browser never stalls the others or grows memory (STYLE.md: fan-out
never blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableSet,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scada.model import (
    Availability,
    AvailabilityEvent,
    DecodeError,
    DeviceId,
    PointId,
    QualityCode,
    Reading,
    split_point_id,
)
from scada.runtime import Backoff, raise_if_cancelling
from streams.bus import as_text
from streams.codec import (
    FIELD_TYPE,
    ReadingRows,
    WireRow,
    decode_event,
    decode_json_event,
    decode_reading_rows,
    reading_from_row,
    row_from_reading,
)
from streams.commands import decode_result

__all__ = [
    "DEFAULT_MAX_RATE_HZ",
    "MAX_RATE_HZ",
    "MIN_RATE_HZ",
    "AlarmFrame",
    "AvailabilityHandler",
    "EventFrame",
    "Frame",
    "LiveHub",
    "ReadingsFrame",
    "Subscription",
    "Topic",
    "availability_json",
    "follow_availability",
    "follow_events",
    "reading_text",
    "run_live_feed",
]

_XReadReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None

_LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_RATE_HZ: Final = 4.0
MIN_RATE_HZ: Final = 0.2
MAX_RATE_HZ: Final = 20.0
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_QUALITY_NAMES: Final = {int(c): c.name.lower() for c in QualityCode}


class Topic(enum.StrEnum):
    """Event streams a client can follow besides points."""

    ALARMS = "alarms"
    DISPATCHES = "dispatches"
    LEDGER = "ledger"
    QUOTA_ALERT = "quota_alert"
    AVAILABILITY = "availability"


@dataclass(frozen=True, slots=True)
class AlarmFrame:
    """Alarm state transitions for one client (the ``alarms`` stream's event dicts)."""

    events: list[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class EventFrame:
    """One event of a topic other than alarms, already cut to what the client may see."""

    topic: Topic
    event: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ReadingsFrame:
    """The coalesced readings of one flush: the newest row of each point that changed."""

    rows: list[WireRow]

    def readings(self) -> list[Reading]:
        """Return the rows as readings (for tests and Python consumers)."""
        return [reading_from_row(r) for r in self.rows]


Frame = ReadingsFrame | AlarmFrame | EventFrame


def reading_text(row: WireRow) -> str:
    """Return the JSON text of a reading as clients see it (as ``GET /points/{id}/latest``).

    >>> reading_text(("m1.p_kw", 1767571200000000, 2.5, 2, None))
    '{"point": "m1.p_kw", "ts": "2026-01-05T00:00:00+00:00", "value": 2.5, "quality": "good"}'
    """
    point, ts_us, value, code, reason = row
    body: dict[str, Any] = {
        "point": point,
        "ts": (_EPOCH + timedelta(microseconds=ts_us)).isoformat(),
        "value": value,
        "quality": _QUALITY_NAMES[code],
    }
    if reason:
        body["reason"] = reason
    return json.dumps(body, allow_nan=True)


class _PointSet(MutableSet[PointId]):
    """A subscription's points; every change also updates the hub's point index."""

    __slots__ = ("_hub", "_items", "_sub")

    def __init__(self, hub: LiveHub, sub: Subscription) -> None:
        self._hub, self._sub, self._items = hub, sub, set[PointId]()

    @classmethod
    def _from_iterable(cls, it: Iterable[Any]) -> set[Any]:
        return set(it)  # ``points | other`` is a plain set, not a second index owner

    def __contains__(self, point: object) -> bool:
        return point in self._items

    def __iter__(self) -> Iterator[PointId]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, value: PointId) -> None:
        """Follow a point."""
        if value not in self._items:
            self._items.add(value)
            self._hub._index_add(value, self._sub)

    def discard(self, value: PointId) -> None:
        """Stop following a point (and forget its coalesced reading)."""
        if value in self._items:
            self._items.discard(value)
            self._hub._index_remove(value, self._sub)
            self._sub.pending.pop(value, None)

    def update(self, values: Iterable[PointId]) -> None:
        """Follow several points."""
        for value in values:
            self.add(value)

    def difference_update(self, values: Iterable[PointId]) -> None:
        """Stop following several points."""
        for value in values:
            self.discard(value)


@dataclass(eq=False, slots=True)
class Subscription:
    """One client's interest and its outbox: coalesced readings plus a bounded queue of events."""

    queue: asyncio.Queue[Frame]
    points: _PointSet = field(init=False)
    """Points followed (updating this set updates the hub's index); set by :meth:`LiveHub.subscribe`."""
    devices: set[DeviceId] = field(default_factory=set)
    """Devices whose availability changes the client follows (besides the ``availability`` topic)."""
    topics: set[Topic] = field(default_factory=set)
    alarm_consoles: set[str] | None = None
    """Consoles whose alarms the client follows; empty: every console; None: no alarms."""
    visible_nodes: frozenset[str] | None = None
    """Nodes the client may see (its tenant and grants); None: no restriction."""
    visible_devices: frozenset[DeviceId] | None = None
    """Devices under ``visible_nodes``; None: no restriction."""
    max_rate_hz: float = DEFAULT_MAX_RATE_HZ
    pending: dict[str, WireRow] = field(default_factory=dict)
    """Readings waiting for the next flush, newest per point."""
    dropped_frames: int = 0
    """Frames dropped because the client fell behind; reported to the client, then reset."""
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _next_flush: float = 0.0

    def wants_alarm(self, event: Mapping[str, Any]) -> bool:
        """Return True if the client follows the console of this alarm event and may see its node."""
        consoles, nodes = self.alarm_consoles, self.visible_nodes
        if consoles is None or (nodes is not None and event.get("node") not in nodes):
            return False
        return not consoles or event.get("console") in consoles

    def may_see_device(self, device: str) -> bool:
        """Return True if the device lies within the client's nodes."""
        return self.visible_devices is None or device in self.visible_devices

    def offer(self, frame: Frame) -> None:
        """Queue a frame, dropping the oldest queued frame if the client is behind."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped_frames += 1
        self.queue.put_nowait(frame)
        self._wake.set()

    async def next_frame(self) -> Frame:
        """Wait for the next frame: a queued event first, else coalesced readings when the rate allows."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue.empty():
                return self.queue.get_nowait()
            if self.pending:
                now = loop.time()
                wait_s = self._next_flush - now
                if wait_s <= 0:
                    self._next_flush = now + 1.0 / self.max_rate_hz
                    rows = list(self.pending.values())
                    self.pending.clear()
                    return ReadingsFrame(rows)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()
            else:
                self._wake.clear()
                await self._wake.wait()


class LiveHub:
    """Latest values per point and device availability, with indexed, coalescing fan-out."""

    def __init__(self, *, frames_per_client: int = 256) -> None:
        if frames_per_client < 1:
            raise ValueError("frames_per_client must be >= 1")
        self._frames_per_client = frames_per_client
        self._latest: dict[str, WireRow] = {}
        self._texts: dict[str, tuple[WireRow, str]] = {}
        self._availability: dict[DeviceId, AvailabilityEvent] = {}
        self._subscriptions: set[Subscription] = set()
        self._by_point: dict[str, set[Subscription]] = {}
        self.readings_seen = 0
        self.alarm_events_seen = 0
        self.events_seen = 0

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
        row = self._latest.get(point)
        return None if row is None else reading_from_row(row)

    def snapshot(self, points: Iterable[PointId]) -> list[Reading]:
        """Return the latest reading of each of ``points`` that has one."""
        return [reading_from_row(r) for p in points if (r := self._latest.get(p)) is not None]

    def snapshot_rows(self, points: Iterable[PointId]) -> list[WireRow]:
        """Return the latest row of each of ``points`` that has one."""
        return [r for p in points if (r := self._latest.get(p)) is not None]

    def readings_json(self, rows: Iterable[WireRow]) -> str:
        """Return the JSON array of rows, reusing each reading's text made for earlier clients."""
        texts = self._texts
        parts: list[str] = []
        for row in rows:
            cached = texts.get(row[0])
            if cached is None or cached[0] is not row:
                cached = (row, reading_text(row))
                texts[row[0]] = cached
            parts.append(cached[1])
        return "[" + ",".join(parts) + "]"

    def publish(self, readings: Sequence[Reading]) -> None:
        """Record a batch as the latest values and hand each reading to the clients that follow it."""
        rows = readings.rows if isinstance(readings, ReadingRows) else [row_from_reading(r) for r in readings]
        self.publish_rows(rows)

    def publish_rows(self, rows: Iterable[WireRow]) -> None:
        """Like :meth:`publish`, for decoded rows (the feed's fast path)."""
        latest, index = self._latest, self._by_point
        seen = 0
        for row in rows:
            seen += 1
            point = row[0]
            current = latest.get(point)
            if current is not None and row[1] < current[1]:
                continue  # a redelivered old reading is not news
            latest[point] = row
            subs = index.get(point)
            if subs:
                for sub in subs:
                    pending = sub.pending
                    if not pending:
                        sub._wake.set()
                    pending[point] = row
        self.readings_seen += seen

    def publish_event(self, event: AvailabilityEvent) -> None:
        """Record a device availability change and tell the clients that follow it."""
        current = self._availability.get(event.device)
        if current is not None and event.ts < current.ts:
            return
        self._availability[event.device] = event
        self.events_seen += 1
        body = availability_json(event)
        for sub in self._subscriptions:
            if (Topic.AVAILABILITY in sub.topics or event.device in sub.devices) and sub.may_see_device(
                event.device
            ):
                sub.offer(EventFrame(Topic.AVAILABILITY, body))

    def publish_alarms(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Offer alarm state transitions to the clients that follow their consoles."""
        self.alarm_events_seen += len(events)
        for sub in self._subscriptions:
            if sub.alarm_consoles is not None:
                frame = [e for e in events if sub.wants_alarm(e)]
                if frame:
                    sub.offer(AlarmFrame(frame))

    def publish_dispatch(self, result: Mapping[str, Any]) -> None:
        """Offer a command result (``point``, ``status``…) to clients that follow dispatches."""
        self.events_seen += 1
        device = split_point_id(str(result["point"]))[0]
        for sub in self._subscriptions:
            if Topic.DISPATCHES in sub.topics and sub.may_see_device(device):
                sub.offer(EventFrame(Topic.DISPATCHES, result))

    def publish_ledger(self, event: Mapping[str, Any]) -> None:
        """Offer a ledger update (``{"month", "nodes": {node: [scope 1, scope 2]}}``), cut to each scope."""
        self.events_seen += 1
        nodes = event.get("nodes")
        for sub in self._subscriptions:
            if Topic.LEDGER not in sub.topics:
                continue
            visible = sub.visible_nodes
            if visible is None or not isinstance(nodes, Mapping):
                sub.offer(EventFrame(Topic.LEDGER, event))
                continue
            mine = {n: v for n, v in nodes.items() if n in visible}
            if mine:
                sub.offer(EventFrame(Topic.LEDGER, {**event, "nodes": mine}))

    def publish_quota_alert(self, event: Mapping[str, Any]) -> None:
        """Offer a quota alert to the clients that follow them and may see its node."""
        self.events_seen += 1
        node = event.get("node")
        for sub in self._subscriptions:
            if Topic.QUOTA_ALERT in sub.topics and (sub.visible_nodes is None or node in sub.visible_nodes):
                sub.offer(EventFrame(Topic.QUOTA_ALERT, event))

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """Register a client for the duration of the ``with`` block."""
        sub = Subscription(queue=asyncio.Queue(maxsize=self._frames_per_client))
        sub.points = _PointSet(self, sub)
        self._subscriptions.add(sub)
        try:
            yield sub
        finally:
            sub.points.difference_update(list(sub.points))
            self._subscriptions.discard(sub)

    def _index_add(self, point: PointId, sub: Subscription) -> None:
        self._by_point.setdefault(point, set()).add(sub)

    def _index_remove(self, point: PointId, sub: Subscription) -> None:
        subs = self._by_point.get(point)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_point[point]


def availability_json(event: AvailabilityEvent) -> dict[str, Any]:
    """Render an availability change for clients."""
    return {
        "device": event.device,
        "availability": event.availability.value,
        "since": event.ts.astimezone(UTC).isoformat(),
        "reason": event.reason,
    }


def _dispatch_json(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    result = decode_result(fields)
    return {
        "correlation_id": result.correlation_id,
        "point": result.point,
        "requested": result.requested,
        "status": result.status.value,
        "ts": result.ts.astimezone(UTC).isoformat(),
        "readback": result.readback,
        "reason": result.reason,
        "elapsed_ms": result.elapsed_ms,
    }


async def run_live_feed(
    redis: aioredis.Redis,
    hub: LiveHub,
    *,
    readings_key: str,
    events_key: str,
    alarms_key: str | None = None,
    results_key: str | None = None,
    block_ms: int = 1_000,
    count: int = 1_000,
    timeout_s: float = 5.0,
) -> None:
    """Feed ``hub`` from the readings, events (and alarms, command results) streams until cancelled.

    Starts at the streams' current ends: a live view wants what happens from now on. Entries
    that cannot be decoded are skipped here; the historian's consumer group dead-letters them.
    """
    last_ids: dict[str, str] = {}
    backoff = Backoff(initial_s=0.2, max_s=10.0)
    healthy = True
    keys = [readings_key, events_key]
    keys += [k for k in (alarms_key, results_key) if k is not None]
    while True:
        raise_if_cancelling()
        try:
            if not last_ids:  # explicit ids, not "$": "$" between two XREADs would miss entries
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
                        hub.publish_rows(decode_reading_rows(fields).rows)
                    elif key == alarms_key:
                        hub.publish_alarms([decode_json_event(fields, b"alarm")])
                    elif key == results_key:
                        _publish_result(hub, fields)
                    else:
                        _publish_event(hub, fields)
                except DecodeError as err:
                    _LOGGER.debug("live feed: skipping undecodable entry %s: %s", entry_id, err)


def _publish_result(hub: LiveHub, fields: Mapping[bytes, bytes]) -> None:
    if fields.get(FIELD_TYPE) == b"verification":  # a dispatch's measured effect (verify_service)
        hub.publish_dispatch({"kind": "verification", **decode_json_event(fields, b"verification")})
    else:
        hub.publish_dispatch(_dispatch_json(fields))


def _publish_event(hub: LiveHub, fields: Mapping[bytes, bytes]) -> None:
    kind = fields.get(FIELD_TYPE)
    if kind == b"ledger":
        hub.publish_ledger(decode_json_event(fields, b"ledger"))
    elif kind == b"quota_alert":
        hub.publish_quota_alert(decode_json_event(fields, b"quota_alert"))
    elif kind == b"dispatch":  # a dispatch's outcome (verified, failed, reverted...): the dispatches topic
        hub.publish_dispatch({"kind": "dispatch", **decode_json_event(fields, b"dispatch")})
    else:
        hub.publish_event(decode_event(fields))


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
    await follow_events(redis, events_key, availability=handler, block_ms=block_ms, timeout_s=timeout_s)


JsonEventHandler = Callable[[dict[str, Any]], Awaitable[None]]
"""``handler(body)`` of a JSON event (see :func:`streams.codec.decode_json_event`)."""


async def follow_events(
    redis: aioredis.Redis,
    events_key: str,
    *,
    availability: AvailabilityHandler | None = None,
    json_events: Mapping[bytes, JsonEventHandler] | None = None,
    block_ms: int = 1_000,
    timeout_s: float = 5.0,
) -> None:
    """Follow the events stream from its current end until cancelled, one read for every handler.

    Availability changes go to ``availability`` (as in :func:`follow_availability`); a JSON event
    of a type in ``json_events`` goes to that type's handler with its body. Other entries, and
    entries that do not decode, are skipped. Redis outages are ridden out with backoff.
    """
    by_type = dict(json_events or {})
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
            _LOGGER.debug("event follower: Redis unavailable: %s", err)
            await asyncio.sleep(backoff.next_delay())
            continue
        backoff.reset()
        for _key, entries in reply or []:
            for entry_id, fields in entries:
                last_id = as_text(entry_id)
                await _follow_entry(fields, availability, by_type.get(fields.get(FIELD_TYPE, b"")))


async def _follow_entry(
    fields: Any, availability: AvailabilityHandler | None, json_handler: JsonEventHandler | None
) -> None:
    """Hand one events-stream entry to its handler; an entry nobody follows, or damaged, is skipped."""
    try:
        if json_handler is not None:
            body = decode_json_event(fields, fields[FIELD_TYPE])
        elif availability is not None:
            event = decode_event(fields)
        else:
            return
    except DecodeError:
        return  # ledger updates, quota alerts...: not followed
    if json_handler is not None:
        await json_handler(body)
    elif availability is not None:
        await availability(event.device, event.availability is Availability.ONLINE, event.ts, event.reason)


async def _last_id(redis: aioredis.Redis, key: str, timeout_s: float) -> str:
    """Return the id of the newest entry of a stream, or ``0-0`` if it is empty or absent."""
    async with asyncio.timeout(timeout_s):
        newest = await redis.xrevrange(key, count=1)
    if not newest:
        return "0-0"
    return as_text(newest[0][0])
