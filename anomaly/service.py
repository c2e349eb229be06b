"""The anomaly service: detectors and the alarm engine on the live readings (analytics role).

Data flows one way: readings (the ``anomaly`` consumer group) -> limit alarms evaluated on the
values, and per-point :class:`~anomaly.detectors.PointMonitor` scores (in a worker thread: the
models are CPU work) -> ``deviation`` alarms -> :class:`~anomaly.alarms.AlarmEngine` events ->
stored (``alarm_events``, ``alarm_status``), put on the ``alarms`` stream and routed to people.
Device availability events drive the ``device_offline`` alarms and suppress the device's other
alarms (suppression by design). Operator actions (acknowledge, shelve...) go through
:meth:`AnomalyService.act`, on the event loop like everything else that touches the engine.

An energy anomaly is quantified while it lasts: the monitor integrates the value above its
expected baseline, and the alarm event carries ``excess_kwh`` and ``excess_kgco2e`` (at the grid
factor in force), so the message reads "B-03 air-compressor group: energy abnormal, 320 kWh extra".

The engine's snapshot and every detector's learned state are saved every ``snapshot_period_s`` and
after a restart restored, so nothing is relearned from zero.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from anomaly.alarm_model import AlarmEvent, AlarmState
from anomaly.alarms import AlarmEngine
from anomaly.detectors import PointMonitor, PointVerdict, detector_from_state
from scada.model import Clock, DeviceId, PointId, QualityCode, Reading
from scada.runtime import raise_if_cancelling

__all__ = ["AlarmStore", "AnomalyService", "MonitoredPoint"]

_LOGGER = logging.getLogger(__name__)

DISPATCH_ALARM_SUFFIX: Final = ":dispatch"
"""Suffix of a point's ``dispatch_failed`` alarm id (``<point>:dispatch``)."""
SNAPSHOT_PERIOD_S: Final = 60.0
TICK_PERIOD_S: Final = 1.0

AlarmPublisher = Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]]
"""Put alarm event dicts on the ``alarms`` stream (best effort)."""
AlarmNotifier = Callable[[AlarmEvent, Mapping[str, Any]], Awaitable[None]]
"""Send one event to people (with its extra figures): annunciated activations, and the end of an
energy anomaly with its excess kWh and kgCO2e."""


@dataclass(slots=True)
class MonitoredPoint:
    """A point with a detector: its monitor and the deviation alarm the monitor drives."""

    point: PointId
    alarm_id: str
    monitor: PointMonitor
    kg_per_kwh: Callable[[datetime], float] | None = None
    """Emission factor for a kW point's excess energy; None for points that are not electric power."""


class AlarmStore:
    """Alarm events, statuses and the saved anomaly state in PostgreSQL (migration 006)."""

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def write(self, events: Sequence[tuple[AlarmEvent, Mapping[str, Any]]]) -> None:
        """Append events (idempotent by key) and update each alarm's status, in one transaction."""
        if not events:
            return
        async with self._pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
            await conn.executemany(
                """INSERT INTO alarm_events (key, alarm_id, seq, at, from_state, to_state, cause, by_whom,
                       comment, value, message, priority, console, node_id, device_id, point_id, group_id,
                       annunciated, chattering, extra, event)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
                           $19, $20::jsonb, $21::jsonb)
                   ON CONFLICT (key) DO NOTHING""",
                [
                    (
                        e.key, e.alarm_id, e.seq, e.at, e.from_state.value, e.to_state.value, e.cause.value,
                        e.by, e.comment, _number(e.value), e.message, int(e.priority), e.console, e.node,
                        e.device, e.point, e.group, e.annunciated, e.chattering, json.dumps(extra),
                        json.dumps(e.to_dict()),
                    )
                    for e, extra in events
                ],
                timeout=self._timeout_s,
            )  # fmt: skip
            await conn.executemany(
                """INSERT INTO alarm_status AS s (alarm_id, state, since, priority, console, node_id,
                       device_id, point_id, group_id, message, value, extra)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb)
                   ON CONFLICT (alarm_id) DO UPDATE
                   SET state = excluded.state, since = excluded.since, priority = excluded.priority,
                       console = excluded.console, group_id = excluded.group_id,
                       message = excluded.message, value = excluded.value, extra = excluded.extra,
                       updated_at = now()
                   WHERE s.since <= excluded.since""",
                [
                    (
                        e.alarm_id, e.to_state.value, e.at, int(e.priority), e.console, e.node, e.device,
                        e.point, e.group, e.message, _number(e.value), json.dumps(extra),
                    )
                    for e, extra in events
                ],
                timeout=self._timeout_s,
            )  # fmt: skip

    async def load_state(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Return the saved engine snapshot and detector states, or None."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            row = await conn.fetchrow(
                "SELECT engine, detectors FROM anomaly_state WHERE id = 1", timeout=self._timeout_s
            )
        if row is None:
            return None
        return json.loads(row["engine"]), json.loads(row["detectors"])

    async def save_state(self, engine_json: str, detectors_json: str) -> None:
        """Replace the saved engine snapshot and detector states (JSON text, encoded off the loop)."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            await conn.execute(
                """INSERT INTO anomaly_state (id, engine, detectors, saved_at)
                   VALUES (1, $1::jsonb, $2::jsonb, now())
                   ON CONFLICT (id) DO UPDATE
                   SET engine = excluded.engine, detectors = excluded.detectors, saved_at = now()""",
                engine_json,
                detectors_json,
                timeout=self._timeout_s,
            )

    async def statuses(
        self, *, console: str | None, active_only: bool, nodes: list[str] | None = None
    ) -> list[asyncpg.Record]:
        """Return alarm statuses, most urgent first: not normal ones if ``active_only``; of ``nodes``."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            return list(
                await conn.fetch(
                    """SELECT * FROM alarm_status
                       WHERE ($1::text IS NULL OR console = $1) AND (NOT $2 OR state <> 'normal')
                             AND ($3::text[] IS NULL OR node_id = ANY($3::text[]))
                       ORDER BY priority, since DESC LIMIT 10000""",
                    console,
                    active_only,
                    nodes,
                    timeout=self._timeout_s,
                )
            )

    async def events(
        self,
        *,
        alarm: str | None,
        console: str | None,
        start: datetime,
        end: datetime,
        limit: int,
        nodes: list[str] | None = None,
        after: tuple[datetime, int] | None = None,
    ) -> list[asyncpg.Record]:
        """Return events of ``[start, end)``, oldest first: of one alarm, console or ``nodes``."""
        after_at, after_seq = after if after is not None else (None, 0)
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            return list(
                await conn.fetch(
                    """SELECT at, seq, event, extra FROM alarm_events
                       WHERE at >= $1 AND at < $2 AND ($3::text IS NULL OR alarm_id = $3)
                             AND ($4::text IS NULL OR console = $4)
                             AND ($6::text[] IS NULL OR node_id = ANY($6::text[]))
                             AND ($7::timestamptz IS NULL OR (at, seq) > ($7, $8))
                       ORDER BY at, seq LIMIT $5""",
                    start,
                    end,
                    alarm,
                    console,
                    limit,
                    nodes,
                    after_at,
                    after_seq,
                    timeout=self._timeout_s,
                )
            )


class AnomalyService:
    """Runs the detectors and the alarm engine (see the module docstring)."""

    def __init__(
        self,
        engine: AlarmEngine,
        monitored: Sequence[MonitoredPoint],
        store: AlarmStore,
        *,
        clock: Clock,
        publish: AlarmPublisher | None = None,
        notify: AlarmNotifier | None = None,
        snapshot_period_s: float = SNAPSHOT_PERIOD_S,
        tick_period_s: float = TICK_PERIOD_S,
    ) -> None:
        self.engine = engine
        self._monitored = {m.point: m for m in monitored}
        self._store = store
        self._clock = clock
        self._publish = publish
        self._notify = notify
        self._snapshot_period_s = snapshot_period_s
        self._tick_period_s = tick_period_s
        self._last_snapshot_s = clock.monotonic()
        self._lock = asyncio.Lock()
        """Serialises the engine between the consumer, the ticker and operator actions."""
        self._detectors_lock = asyncio.Lock()
        """Serialises the monitors between scoring and saving their states (each in a worker thread)."""
        self.scored = 0
        """Readings scored by a detector since start."""

    # -- start-up --------------------------------------------------------------------------------

    async def restore(self, make_engine: Callable[[Mapping[str, Any] | None], AlarmEngine]) -> None:
        """Reload the saved engine state and detector states, if any (after a restart)."""
        saved = await self._store.load_state()
        if saved is None:
            return
        engine_state, detector_states = saved
        try:
            self.engine = make_engine(engine_state)
        except ValueError as err:  # DecodeError is a ValueError: a snapshot of another version
            _LOGGER.warning("anomaly service: saved alarm state not restored: %s", err)
        restored = 0
        for point, state in detector_states.items():
            monitored = self._monitored.get(PointId(point))
            if monitored is None:
                continue
            try:
                monitored.monitor.detector = detector_from_state(state)
                restored += 1
            except (ValueError, KeyError, TypeError) as err:
                _LOGGER.warning("anomaly service: detector of %s starts afresh: %s", point, err)
        _LOGGER.info("anomaly service: restored the alarm engine and %d detectors", restored)

    # -- the flow --------------------------------------------------------------------------------

    async def handle(self, readings: Sequence[Reading]) -> None:
        """Evaluate a batch: limit alarms on values, detectors off the loop, then deviation alarms."""
        usable = [
            (r, value)
            for r in readings
            if (value := r.value) is not None
            and r.quality.code is not QualityCode.BAD
            and math.isfinite(value)
        ]
        points = self._monitored
        scoring = [(points[r.point], r.ts, value) for r, value in usable if r.point in points]
        verdicts: list[tuple[MonitoredPoint, datetime, PointVerdict]] = []
        if scoring:
            async with self._detectors_lock:
                verdicts = await asyncio.to_thread(self._score, scoring)
        async with self._lock:
            produced: list[tuple[AlarmEvent, Mapping[str, Any]]] = []
            for reading, value in usable:
                produced.extend((e, {}) for e in self.engine.evaluate_point(reading.point, value, reading.ts))
            for monitored, at, verdict in verdicts:
                events = self.engine.evaluate(monitored.alarm_id, verdict.active, at)
                if events:  # most rows change nothing: build the extra figures only for an event
                    extra = self._extra(monitored, verdict, at)
                    produced.extend((e, extra) for e in events)
            await self._emit(produced)
        await self._maybe_snapshot()

    def _score(
        self, rows: Sequence[tuple[MonitoredPoint, datetime, float]]
    ) -> list[tuple[MonitoredPoint, datetime, PointVerdict]]:
        """Score rows in a worker thread (the caller holds the detectors' lock)."""
        out = [(m, at, m.monitor.update(at.timestamp(), value)) for m, at, value in rows]
        self.scored += len(out)
        return out

    @staticmethod
    def _extra(monitored: MonitoredPoint, verdict: PointVerdict, at: datetime) -> dict[str, Any]:
        extra: dict[str, Any] = {"score": round(verdict.score, 4)}
        if not math.isnan(verdict.expected):
            extra["expected"] = round(verdict.expected, 3)
        if monitored.kg_per_kwh is not None:
            extra["excess_kwh"] = round(verdict.excess_kwh, 3)
            extra["excess_kgco2e"] = round(verdict.excess_kwh * monitored.kg_per_kwh(at), 3)
        return extra

    async def availability(self, device: DeviceId, online: bool, at: datetime, reason: str) -> None:
        """Apply a device availability change: its offline alarm and the suppression of the rest."""
        async with self._lock:
            events = self.engine.set_device_online(device, online, at=at, reason=reason)
            await self._emit([(e, {}) for e in events])

    async def dispatch_outcome(self, body: Mapping[str, Any]) -> None:
        """Raise a point's ``dispatch_failed`` alarm when a dispatch to it failed; clear it on success.

        ``body`` is a ``dispatch`` event of the events stream (``point``, ``state``, ``ts``); points
        without such an alarm (not written by the control section) are ignored.
        """
        point, state = body.get("point"), body.get("state")
        alarm_id = f"{point}{DISPATCH_ALARM_SUFFIX}"
        failed = {"failed": True, "revert_failed": True, "verified": False, "reverted": False}.get(str(state))
        if failed is None or not self.engine.has(alarm_id):
            return
        try:
            at = datetime.fromisoformat(str(body.get("ts")))
        except ValueError:
            at = self._clock.now()
        async with self._lock:
            events = self.engine.evaluate(alarm_id, failed, at)
            await self._emit(
                [(e, {"dispatch": body.get("id"), "reason": body.get("reason", "")}) for e in events]
            )

    def now(self) -> datetime:
        """Return the service clock's time (operator actions are stamped with it)."""
        return self._clock.now()

    async def act(self, action: Callable[[AlarmEngine], list[AlarmEvent]]) -> list[AlarmEvent]:
        """Apply an operator action (a call on the engine) and emit what it produced."""
        async with self._lock:
            events = action(self.engine)
            await self._emit([(e, {}) for e in events])
        return events

    async def run(self) -> None:
        """Tick the engine (delays, shelve expiry, floods) and save its state until cancelled."""
        while True:
            await self._clock.sleep(self._tick_period_s)
            try:
                async with self._lock:
                    await self._emit([(e, {}) for e in self.engine.tick(self._clock.now())])
                await self._maybe_snapshot()
            except (OSError, TimeoutError, asyncpg.PostgresError) as err:
                raise_if_cancelling()
                _LOGGER.warning("anomaly service: tick failed (will retry): %s", err)

    async def _maybe_snapshot(self, *, force: bool = False) -> None:
        if not force and self._clock.monotonic() - self._last_snapshot_s < self._snapshot_period_s:
            return
        self._last_snapshot_s = self._clock.monotonic()
        async with self._lock:
            engine = self.engine.snapshot()  # a fresh structure: encoding it needs no lock
        async with self._detectors_lock:
            detectors_json = await asyncio.to_thread(self._detector_states_json)
        engine_json = await asyncio.to_thread(json.dumps, engine)
        await self._store.save_state(engine_json, detectors_json)

    def _detector_states_json(self) -> str:
        """Encode every detector's state in a worker thread (the caller holds the detectors' lock)."""
        return json.dumps({str(point): m.monitor.detector.to_state() for point, m in self._monitored.items()})

    async def save(self) -> None:
        """Save the engine and detector states now (at shutdown)."""
        await self._maybe_snapshot(force=True)

    async def _emit(self, events: Sequence[tuple[AlarmEvent, Mapping[str, Any]]]) -> None:
        if not events:
            return
        await self._store.write(events)
        if self._publish is not None:
            try:
                await self._publish([{**e.to_dict(), "extra": dict(extra)} for e, extra in events])
            except Exception as err:  # noqa: BLE001 - the stream is for live views; the store holds the record
                raise_if_cancelling()
                _LOGGER.warning("anomaly service: cannot publish %d alarm events: %s", len(events), err)
        if self._notify is not None:
            for event, extra in events:
                if _worth_telling(event, extra):
                    await self._notify(event, extra)


def energy_message(name: str, extra: Mapping[str, Any]) -> str:
    """Return the operator text of an energy anomaly, e.g. "B-03: energy abnormal, 320 kWh extra"."""
    kwh = float(extra.get("excess_kwh", 0.0))
    kg = float(extra.get("excess_kgco2e", 0.0))
    return f"{name}: 能耗异常 energy abnormal, {kwh:,.0f} kWh extra ({kg:,.0f} kgCO2e) so far"


_ENDED: Final = frozenset({AlarmState.NORMAL, AlarmState.RTN_UNACK})


def _worth_telling(event: AlarmEvent, extra: Mapping[str, Any]) -> bool:
    """Tell people of an annunciated activation, and of the end of an energy anomaly (its total)."""
    if event.is_activation:
        return event.annunciated
    return "excess_kwh" in extra and event.to_state in _ENDED and event.from_state not in _ENDED


def _number(value: float | bool | None) -> float | None:
    if value is None:
        return None
    return float(value)
