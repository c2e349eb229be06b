"""The Redis Streams bus: a never-blocking readings sink and the at-least-once consumer loop.

Producer side
-------------
:class:`RedisReadingSink` is what device sessions publish to. ``publish`` only encodes and appends
to a bounded local buffer; one flusher task moves the buffer to Redis in pipelined XADDs of up to
``entry_readings`` readings per entry, trimming the stream with ``MAXLEN ~``. When Redis is down the
buffer is kept and retried with backoff; when the buffer is full the *oldest* readings are shed and
counted in :attr:`RedisReadingSink.shed_total` (fresh data matters more to a control room).

Consumer side
-------------
:func:`run_consumer` runs one stage's handler over a consumer group::

    XAUTOCLAIM (stale entries of dead consumers)  ->  XREADGROUP "0" (own pending) / ">" (new)
      -> decode  -> poison entries: XADD dead-letter + XACK (atomically)
      -> handler(readings)  -> XACK only after the handler returned

A handler that raises leaves its entries pending; they are re-read with id ``"0"`` after a backoff,
so nothing is lost (at-least-once) and every handler must be idempotent. A handler that can apply
all but some readings raises :class:`RejectedReadings` once the rest is committed: those readings
go to the dead-letter stream and the batch is acked.

Dead-letter entry fields
------------------------
``reason``, ``origin`` (stream key), ``entry_id`` (comma-separated ids), ``group``, ``consumer``,
and the original fields prefixed ``raw.`` (``raw.v``, ``raw.r``), so an operator can replay them
byte for byte with XADD.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypedDict

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT, FieldT

from scada.model import AvailabilityEvent, Clock, DecodeError, Reading, StreamName
from scada.runtime import Backoff, SystemClock, raise_if_cancelling
from streams.codec import (
    EntryFields,
    ReadingRows,
    decode_readings,
    encode_event,
    encode_readings,
    encode_row,
    fields_from_rows,
)

__all__ = [
    "DeadLetterEntry",
    "RedisReadingSink",
    "RejectedReadings",
    "as_text",
    "deadletter_fields",
    "entries_of",
    "read_deadletter",
    "run_consumer",
    "stream_key",
    "xfields",
]

_LOGGER = logging.getLogger(__name__)

_REDIS_ERRORS: Final = (RedisError, OSError, TimeoutError)
"""What a Redis outage looks like: refused/reset sockets, timeouts, and server errors."""
_RAW_PREFIX: Final = b"raw."
_MAX_AUTOCLAIM_ROUNDS: Final = 10
_MAX_LOGGED_REJECTS: Final = 1_024
_MAX_DEADLETTER_PAYLOAD_BYTES: Final = 65_536
"""Longest payload kept in a dead-letter entry; longer ones are cut (the reason says why it failed)."""


def stream_key(prefix: str, stream: StreamName) -> str:
    """Return the Redis key of a stream under a site's key prefix.

    >>> stream_key("scada:", StreamName.READINGS)
    'scada:readings'
    """
    return f"{prefix}{stream.value}"


class RejectedReadings(DecodeError):
    """A handler committed its batch except these readings, which it can never apply.

    Raise it only after the rest of the batch is committed: the consumer moves ``readings`` to the
    dead-letter stream with ``reason`` and acknowledges the whole batch.
    """

    def __init__(self, reason: str, readings: Sequence[Reading]) -> None:
        super().__init__(f"{reason} ({len(readings)} readings)")
        self.reason = reason
        self.readings = tuple(readings)


# --------------------------------------------------------------------------------------------------
# Producer


class RedisReadingSink:
    """Publish readings and availability events to Redis without ever blocking the caller.

    Implements :class:`scada.model.ReadingSink` and :class:`scada.model.EventSink`. Call
    :meth:`start` before publishing and :meth:`close` at shutdown; until started, readings only
    accumulate in the bounded buffer.

    Attributes
    ----------
    shed_total
        Readings dropped because the buffer was full (oldest first).
    events_shed_total
        Availability events dropped because their buffer was full.
    rejected_total
        Readings refused at publish because they cannot be encoded (malformed id, absurd time).
    sent_total
        Readings written to Redis.
    available
        Whether the last flush reached Redis (None before the first attempt).
    """

    def __init__(
        self,
        redis: Redis,
        *,
        readings_key: str,
        events_key: str,
        maxlen: int,
        max_buffered: int = 100_000,
        entry_readings: int = 500,
        entries_per_flush: int = 20,
        events_maxlen: int = 100_000,
        max_buffered_events: int = 1_000,
        deadletter_key: str | None = None,
        deadletter_maxlen: int = 100_000,
        max_buffered_rejects: int = 1_000,
        timeout_s: float = 5.0,
        linger_s: float = 0.01,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
    ) -> None:
        if min(maxlen, max_buffered, entry_readings, entries_per_flush, max_buffered_events) < 1:
            raise ValueError("redis sink: sizes must be >= 1")
        self._redis = redis
        self._readings_key, self._events_key = readings_key, events_key
        self._maxlen, self._events_maxlen = maxlen, events_maxlen
        self._entry_readings, self._entries_per_flush = entry_readings, entries_per_flush
        self._timeout_s, self._linger_s = timeout_s, linger_s
        self._backoff = backoff or Backoff()
        self._clock: Clock = clock or SystemClock()
        self._rows: deque[str] = deque(maxlen=max_buffered)  # encoded rows, oldest on the left
        self._in_flight = 0
        """Readings taken by a flush that has not finished (put back if it fails)."""
        self._events: deque[dict[bytes, bytes]] = deque(maxlen=max_buffered_events)
        self._deadletter_key, self._deadletter_maxlen = deadletter_key, deadletter_maxlen
        self._dead: deque[dict[bytes, bytes]] = deque(maxlen=max_buffered_rejects)
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._shedding = False
        self._logged_rejects: set[str] = set()
        self.shed_total = 0
        self.events_shed_total = 0
        self.rejected_total = 0
        self.deadletters_total = 0
        self.deadletters_shed_total = 0
        self.sent_total = 0
        self.available: bool | None = None

    @property
    def buffered(self) -> int:
        """Return how many readings wait for Redis (those of a flush in progress included)."""
        return len(self._rows) + self._in_flight

    async def publish(self, readings: Sequence[Reading]) -> None:
        """Buffer a batch for the flusher; never waits for Redis."""
        rows: list[str] = []
        for reading in readings:
            try:
                rows.append(encode_row(reading))
            except ValueError as err:
                self._reject(reading, err)
        if not rows:
            return
        capacity = self._rows.maxlen or 0
        overflow = len(self._rows) + len(rows) - capacity
        if overflow > 0:
            self._count_shed(overflow)
        self._rows.extend(rows)  # a bounded deque drops from the left: the oldest go first
        self._wake.set()

    async def publish_event(self, event: AvailabilityEvent) -> None:
        """Buffer an availability change for the flusher; never waits for Redis."""
        try:
            fields = encode_event(event)
        except ValueError as err:
            self.rejected_total += 1
            _LOGGER.warning("dropping availability event of %r: %s", event.device, err)
            return
        if len(self._events) == self._events.maxlen:
            self.events_shed_total += 1
        self._events.append(fields)
        self._wake.set()

    def reject(self, *, origin: str, payload: bytes, reason: str) -> None:
        """Queue an unusable input (a bad MQTT payload...) for the dead-letter stream; never blocks.

        Implements :class:`scada.model.DeadLetterSink`. The payload is kept up to 64 KiB.
        """
        self.deadletters_total += 1
        if self._deadletter_key is None:
            _LOGGER.warning("rejected input from %s (no dead-letter stream configured): %s", origin, reason)
            return
        if len(self._dead) == self._dead.maxlen:
            self.deadletters_shed_total += 1
        self._dead.append(
            {
                b"reason": reason.encode(errors="replace"),
                b"origin": origin.encode(errors="replace"),
                b"ts": self._clock.now().isoformat().encode(),
                _RAW_PREFIX + b"payload": payload[:_MAX_DEADLETTER_PAYLOAD_BYTES],
            }
        )
        self._wake.set()

    async def start(self) -> None:
        """Start the flusher task (idempotent)."""
        if self._task is None or self._task.done():
            self._closing = False
            self._task = asyncio.create_task(self._run(), name="redis-sink-flusher")

    async def close(self, timeout_s: float | None = None) -> None:
        """Flush what Redis accepts within ``timeout_s`` (default: the call timeout), then stop."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._wake.set()
        try:
            done, _ = await asyncio.wait([task], timeout=self._timeout_s if timeout_s is None else timeout_s)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
        if not done and (self._rows or self._events):
            _LOGGER.warning(
                "redis sink closed with %d readings and %d events undelivered",
                len(self._rows),
                len(self._events),
            )

    async def _run(self) -> None:
        while True:
            raise_if_cancelling()
            if not self._rows and not self._events and not self._dead:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if self._linger_s > 0 and not self._closing:
                    await self._clock.sleep(self._linger_s)  # let a few sessions' batches share entries
                continue
            try:
                await self._flush_once()
            except _REDIS_ERRORS as err:
                self._set_available(False, err)
                await self._clock.sleep(self._backoff.next_delay())
            except Exception:  # a bug must not silently stop all publishing: log it, keep retrying
                _LOGGER.exception("redis sink: flush failed unexpectedly; retrying")
                await self._clock.sleep(self._backoff.next_delay())
            else:
                self._set_available(True, None)
                self._backoff.reset()

    async def _flush_once(self) -> None:
        events = [self._events.popleft() for _ in range(min(len(self._events), self._entries_per_flush))]
        # One flush per turn of the event loop: with a backlog (a loop turn that took long, many
        # sessions overrunning), send half of it at once rather than a fixed batch, so that the
        # flusher keeps up with what the sessions polled instead of shedding it.
        cap = self._entry_readings * self._entries_per_flush
        count = min(len(self._rows), max(cap, len(self._rows) // 2))
        rows = [self._rows.popleft() for _ in range(count)]
        dead = [self._dead.popleft() for _ in range(min(len(self._dead), self._entries_per_flush))]
        self._in_flight = count
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for fields in dead:
                    assert self._deadletter_key is not None  # reject() queues nothing without a key
                    key, maxlen = self._deadletter_key, self._deadletter_maxlen
                    pipe.xadd(key, xfields(fields), maxlen=maxlen, approximate=True)
                for fields in events:
                    pipe.xadd(self._events_key, xfields(fields), maxlen=self._events_maxlen, approximate=True)
                for start in range(0, count, self._entry_readings):
                    chunk = rows[start : start + self._entry_readings]
                    pipe.xadd(
                        self._readings_key,
                        xfields(fields_from_rows(chunk)),
                        maxlen=self._maxlen,
                        approximate=True,
                    )
                async with asyncio.timeout(self._timeout_s):
                    await pipe.execute()
        except BaseException:
            # Put the batch back in front (a partly applied pipeline may deliver some entries
            # twice, which at-least-once consumers tolerate); on cancel, close() counts them.
            self._in_flight = 0
            self._requeue(events, rows)
            self._dead.extendleft(reversed(dead[: (self._dead.maxlen or 0) - len(self._dead)]))
            raise
        self._in_flight = 0
        self.sent_total += count
        if self._shedding and len(self._rows) <= (self._rows.maxlen or 0) // 2:
            self._shedding = False
            _LOGGER.info("readings buffer drained; %d readings shed so far", self.shed_total)

    def _requeue(self, events: list[dict[bytes, bytes]], rows: list[str]) -> None:
        room = (self._rows.maxlen or 0) - len(self._rows)
        if len(rows) > room:
            self._count_shed(len(rows) - room)
            rows = rows[len(rows) - room :]
        self._rows.extendleft(reversed(rows))
        room = (self._events.maxlen or 0) - len(self._events)
        if len(events) > room:
            self.events_shed_total += len(events) - room
            events = events[len(events) - room :]
        self._events.extendleft(reversed(events))

    def _count_shed(self, count: int) -> None:
        self.shed_total += count
        if not self._shedding:
            self._shedding = True
            _LOGGER.warning(
                "readings buffer full (%d): shedding the oldest readings until Redis catches up",
                self._rows.maxlen,
            )

    def _reject(self, reading: Reading, err: ValueError) -> None:
        self.rejected_total += 1
        if reading.point not in self._logged_rejects and len(self._logged_rejects) < _MAX_LOGGED_REJECTS:
            self._logged_rejects.add(reading.point)  # log once per point: drivers repeat every poll
            _LOGGER.warning("dropping unpublishable reading: %s", err)

    def _set_available(self, ok: bool, err: BaseException | None) -> None:
        if ok is self.available:
            return
        previous, self.available = self.available, ok
        if ok:
            if previous is False:
                _LOGGER.info("redis sink: Redis restored; %d readings buffered", len(self._rows))
        else:
            _LOGGER.warning(
                "redis sink: Redis unavailable (%s); buffering up to %d readings", err, self._rows.maxlen
            )


# --------------------------------------------------------------------------------------------------
# Consumer


async def run_consumer(
    redis: Redis,
    *,
    stream: str,
    group: str,
    consumer: str,
    handler: Callable[[Sequence[Reading]], Awaitable[None]],
    deadletter_stream: str,
    decode: Callable[[EntryFields], Sequence[Reading]] = decode_readings,
    batch: int = 500,
    block_ms: int = 1_000,
    claim_idle_ms: int = 30_000,
    claim_interval_s: float | None = None,
    timeout_s: float = 5.0,
    deadletter_maxlen: int = 100_000,
    clock: Clock | None = None,
    backoff: Backoff | None = None,
) -> None:
    """Run ``handler`` over a consumer group until cancelled; at-least-once, never crashes on Redis.

    Parameters
    ----------
    stream, group, consumer
        Stream key, consumer group (one per stage) and this process's consumer name (stable across
        restarts, so its own pending entries are picked up again).
    handler
        The stage; must be idempotent. Raise :class:`RejectedReadings` for readings it can never
        apply, anything else to have the batch retried.
    deadletter_stream
        Key of the dead-letter stream.
    decode
        Entry decoder: :func:`streams.codec.decode_readings`, or
        :func:`streams.codec.decode_reading_rows` for a stage that takes rows (the historian); the
        entries of one read then reach the handler as one :class:`~streams.codec.ReadingRows`.
    batch, block_ms
        XREADGROUP ``COUNT`` and ``BLOCK``.
    claim_idle_ms, claim_interval_s
        Entries pending longer than ``claim_idle_ms`` on any consumer are claimed (XAUTOCLAIM) at
        start and then every ``claim_interval_s`` (default: half of ``claim_idle_ms``).
    timeout_s
        Timeout of each Redis call (on top of ``block_ms`` for blocking reads).
    """
    loop = _ConsumerLoop(
        redis=redis,
        stream=stream,
        group=group,
        consumer=consumer,
        handler=handler,
        deadletter=deadletter_stream,
        decode=decode,
        batch=batch,
        block_ms=block_ms,
        claim_idle_ms=claim_idle_ms,
        claim_interval_s=claim_idle_ms / 2_000 if claim_interval_s is None else claim_interval_s,
        timeout_s=timeout_s,
        deadletter_maxlen=deadletter_maxlen,
        clock=clock or SystemClock(),
        backoff=backoff or Backoff(),
    )
    await loop.run()


class _HandlerFailedError(Exception):
    """The handler raised: the batch stays pending and is retried."""


@dataclass(kw_only=True)
class _ConsumerLoop:
    """State of one :func:`run_consumer` call (kept private so the public API stays a function)."""

    redis: Redis
    stream: str
    group: str
    consumer: str
    handler: Callable[[Sequence[Reading]], Awaitable[None]]
    deadletter: str
    decode: Callable[[EntryFields], Sequence[Reading]]
    batch: int
    block_ms: int
    claim_idle_ms: int
    claim_interval_s: float
    timeout_s: float
    deadletter_maxlen: int
    clock: Clock
    backoff: Backoff
    pending_mode: bool = True  # start with our own pending entries (a previous run's)
    redis_ok: bool | None = None
    handler_ok: bool | None = None

    @property
    def name(self) -> str:
        """Return ``stream/group/consumer`` for log lines."""
        return f"{self.stream}/{self.group}/{self.consumer}"

    async def run(self) -> None:
        group_ready = False
        next_claim_s = -math.inf
        while True:
            raise_if_cancelling()
            try:
                if not group_ready:
                    await self._create_group()
                    group_ready = True
                if self.clock.monotonic() >= next_claim_s:
                    await self._autoclaim()
                    next_claim_s = self.clock.monotonic() + self.claim_interval_s
                entries = await self._read()
                if entries:
                    await self._process(entries)
                self._set_redis_ok(True, None)
                self.backoff.reset()
            except _HandlerFailedError as failed:
                self._set_handler_ok(False, failed.__cause__)
                self.pending_mode = True
                await self.clock.sleep(self.backoff.next_delay())
            except _REDIS_ERRORS as err:
                if isinstance(err, ResponseError) and "NOGROUP" in str(err):
                    group_ready = False  # stream or group deleted under us: recreate it
                self._set_redis_ok(False, err)
                self.pending_mode = True  # whatever was read but not acked is in our pending list
                await self.clock.sleep(self.backoff.next_delay())

    async def _create_group(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def _autoclaim(self) -> None:
        """Take over entries idle on any consumer (a dead one's) so they are handled here."""
        start: Any = "0-0"
        claimed = 0
        for _ in range(_MAX_AUTOCLAIM_ROUNDS):  # bounded: the next round continues later
            async with asyncio.timeout(self.timeout_s):
                response = await self.redis.xautoclaim(
                    self.stream,
                    self.group,
                    self.consumer,
                    self.claim_idle_ms,
                    start_id=start,
                    count=self.batch,
                )
            start, entries = response[0], response[1]
            claimed += len(entries)
            # Redis drops pending entries that MAXLEN trimmed away and reports their ids here
            # (Redis >= 7); record the loss where operators look.
            gone = response[2] if len(response) > 2 else []
            if gone:
                reason = "entry was trimmed from the stream (MAXLEN) before it was handled"
                await self._deadletter_and_ack(
                    [(self._deadletter_fields(reason, [i], {}), None) for i in gone]
                )
                _LOGGER.warning(
                    "%s: %d pending entries were trimmed before being handled", self.name, len(gone)
                )
            if start in (b"0-0", "0-0"):
                break
        if claimed:
            _LOGGER.info(
                "%s: claimed %d entries idle for more than %d ms", self.name, claimed, self.claim_idle_ms
            )
            self.pending_mode = True

    async def _read(self) -> list[tuple[Any, Any]]:
        pending = self.pending_mode
        async with asyncio.timeout(self.timeout_s + (0 if pending else self.block_ms / 1_000)):
            response = await self.redis.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: "0" if pending else ">"},
                count=self.batch,
                block=None if pending else self.block_ms,
            )
        entries = entries_of(response)
        if pending and not entries:
            self.pending_mode = False  # our pending list is drained: move on to new entries
        return entries

    async def _process(self, entries: list[tuple[Any, Any]]) -> None:
        good_ids: list[Any] = []
        parts: list[Sequence[Reading]] = []
        poison: list[tuple[Any, Mapping[Any, Any], str]] = []
        for entry_id, fields in entries:
            if not fields:
                poison.append(
                    (entry_id, {}, "entry was trimmed from the stream (MAXLEN) before it was handled")
                )
                continue
            try:
                parts.append(self.decode(fields))
            except DecodeError as err:
                poison.append((entry_id, fields, str(err)))
                continue
            good_ids.append(entry_id)
        readings = _concat(parts)
        if poison:
            await self._deadletter_and_ack(
                [
                    (self._deadletter_fields(reason, [entry_id], fields), entry_id)
                    for entry_id, fields, reason in poison
                ]
            )
            _LOGGER.warning("%s: %d poison entries moved to %s", self.name, len(poison), self.deadletter)
        if readings:
            try:
                await self.handler(readings)
            except RejectedReadings as rejected:
                dead = self._deadletter_fields(rejected.reason, good_ids, encode_readings(rejected.readings))
                await self._deadletter_and_ack([(dead, None)], extra_ack=good_ids)
                _LOGGER.warning(
                    "%s: %d readings moved to %s: %s",
                    self.name,
                    len(rejected.readings),
                    self.deadletter,
                    rejected.reason,
                )
                self._set_handler_ok(True, None)
                return
            except Exception as err:  # any stage failure: keep the entries pending and retry
                raise _HandlerFailedError from err
            self._set_handler_ok(True, None)
        if good_ids:
            async with asyncio.timeout(self.timeout_s):
                await self.redis.xack(self.stream, self.group, *good_ids)

    def _deadletter_fields(
        self, reason: str, entry_ids: Sequence[Any], raw: Mapping[Any, Any]
    ) -> dict[bytes, bytes]:
        return deadletter_fields(
            reason, origin=self.stream, entry_ids=entry_ids, group=self.group, consumer=self.consumer, raw=raw
        )

    async def _deadletter_and_ack(
        self, items: Sequence[tuple[dict[bytes, bytes], Any]], extra_ack: Sequence[Any] = ()
    ) -> None:
        """XADD dead-letter entries and XACK their origins in one MULTI, so neither happens alone."""
        ids = [entry_id for _, entry_id in items if entry_id is not None] + list(extra_ack)
        async with self.redis.pipeline(transaction=True) as pipe:
            for fields, _ in items:
                pipe.xadd(self.deadletter, xfields(fields), maxlen=self.deadletter_maxlen, approximate=True)
            if ids:
                pipe.xack(self.stream, self.group, *ids)
            async with asyncio.timeout(self.timeout_s):
                await pipe.execute()

    def _set_redis_ok(self, ok: bool, err: BaseException | None) -> None:
        if ok is self.redis_ok:
            return
        previous, self.redis_ok = self.redis_ok, ok
        if not ok:
            _LOGGER.warning("%s: Redis unavailable: %s; retrying with backoff", self.name, err)
        elif previous is not None:
            _LOGGER.info("%s: Redis restored", self.name)

    def _set_handler_ok(self, ok: bool, err: BaseException | None) -> None:
        if ok is self.handler_ok:
            return
        previous, self.handler_ok = self.handler_ok, ok
        if not ok:
            _LOGGER.warning(
                "%s: handler failed (%r); entries stay pending and are retried with backoff",
                self.name,
                err,
                exc_info=err,
            )
        elif previous is not None:
            _LOGGER.info("%s: handler recovered", self.name)


def _concat(parts: list[Sequence[Reading]]) -> Sequence[Reading]:
    """Join the decoded entries of one read, keeping rows as rows (no Reading objects built)."""
    if parts and all(isinstance(part, ReadingRows) for part in parts):
        return ReadingRows.concat(part for part in parts if isinstance(part, ReadingRows))
    return [reading for part in parts for reading in part]


def deadletter_fields(
    reason: str,
    *,
    origin: str,
    entry_ids: Sequence[Any],
    group: str,
    consumer: str,
    raw: Mapping[Any, Any],
) -> dict[bytes, bytes]:
    """Return a dead-letter entry: why, where from (stream, entry ids, group, consumer), the raw fields.

    Every stage that sets an entry aside writes this one layout, so :func:`read_deadletter` and the
    operators' API read them all alike.
    """
    fields: dict[bytes, bytes] = {
        b"reason": reason.encode(errors="replace"),
        b"origin": origin.encode(),
        b"entry_id": b",".join(_as_bytes(i) for i in entry_ids),
        b"group": group.encode(),
        b"consumer": consumer.encode(),
    }
    for name, value in raw.items():
        fields[_RAW_PREFIX + _as_bytes(name)] = _as_bytes(value)
    return fields


def entries_of(response: Any) -> list[tuple[Any, Any]]:
    """Flatten an XREAD or XREADGROUP reply for one stream, in RESP2 (list) or RESP3 (dict) shape."""
    if not response:
        return []
    if isinstance(response, dict):
        entries: list[tuple[Any, Any]] = []
        for value in response.values():
            # redis-py wraps the RESP3 entry list in one more list
            entries.extend(value[0] if value and isinstance(value[0], list) else value)
        return entries
    return [entry for _name, stream_entries in response for entry in stream_entries]


def xfields(fields: dict[bytes, bytes]) -> dict[FieldT, EncodableT]:
    """Widen our bytes-only fields to what redis-py's (invariant) dict parameter is typed as."""
    wide: dict[FieldT, EncodableT] = {name: value for name, value in fields.items()}
    return wide


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


# --------------------------------------------------------------------------------------------------
# Dead-letter inspection


class DeadLetterEntry(TypedDict):
    """One dead-letter entry as the API shows it (text fields; raw values decoded leniently)."""

    id: str
    reason: str
    origin: str
    entry_id: str
    group: str
    consumer: str
    raw: dict[str, str]


async def read_deadletter(
    redis: Redis, key: str, count: int, *, timeout_s: float = 5.0
) -> list[DeadLetterEntry]:
    """Return the newest ``count`` dead-letter entries, newest first."""
    async with asyncio.timeout(timeout_s):
        rows = await redis.xrevrange(key, count=count)
    out: list[DeadLetterEntry] = []
    for entry_id, fields in rows or []:
        text = {as_text(k): as_text(v) for k, v in (fields or {}).items()}
        raw_prefix = _RAW_PREFIX.decode()
        out.append(
            DeadLetterEntry(
                id=as_text(entry_id),
                reason=text.get("reason", ""),
                origin=text.get("origin", ""),
                entry_id=text.get("entry_id", ""),
                group=text.get("group", ""),
                consumer=text.get("consumer", ""),
                raw={k.removeprefix(raw_prefix): v for k, v in text.items() if k.startswith(raw_prefix)},
            )
        )
    return out


def as_text(value: Any) -> str:
    """Return a Redis reply value (bytes, or already text) as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
