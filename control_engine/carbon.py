"""The carbon service: ledger, forecasts and quota alerts, running on the analytics role.

Data flows one way: readings (stream consumer) -> :class:`~control_engine.ledger.CarbonLedger`
-> ``ledger_hourly`` rows (and restatements) -> month actuals -> :class:`MonthForecaster` ->
:class:`QuotaStatus` per node with a quota -> :class:`QuotaAlerts` crossings -> notifications and
events. :meth:`CarbonService.tick` does one turn; :meth:`CarbonService.run` turns every
``compute_period_s`` and re-forecasts every ``forecast_period_s`` (one minute by default).

After a restart the service rebuilds its state from the database: the ledger's recent hours from
the 1-minute rollups the historian keeps, the forecaster from the stored hourly ledger, and the
fired quota thresholds from ``quota_alert_state``, so an alert is not sent twice for one crossing.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import asyncpg

from control_engine.forecast import MonthForecast, MonthForecaster, month_bounds, month_key
from control_engine.ledger import CarbonLedger, LedgerUpdate, Restatement, ancestry
from control_engine.notify import Notification, Notifier, Severity
from control_engine.quota import Basis, QuotaAlerts, QuotaCrossing, QuotaStatus
from scada.model import UTC, Clock, NodeId, PointId, Reading
from scada.runtime import raise_if_cancelling

__all__ = [
    "CarbonQueries",
    "CarbonService",
    "CarbonStore",
    "EventPublisher",
    "Quota",
]

_LOGGER = logging.getLogger(__name__)

HISTORY_WEEKS: Final = 8
"""Weeks of stored hourly ledger replayed into the forecaster at start-up."""
KG_PER_T: Final = 1000.0

EventPublisher = Callable[[str, Mapping[str, Any]], Awaitable[None]]
"""``publish(kind, body)``: put an event on the ``events`` stream (best effort, never raises)."""


@dataclass(frozen=True, slots=True)
class Quota:
    """A node's allowance for one month and the carbon price that values it."""

    node: NodeId
    month: str
    quota_t: float
    price_cny_per_t: float


class CarbonStore:
    """The carbon tables in PostgreSQL (migration 005)."""

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def write(self, update: LedgerUpdate) -> None:
        """Replace the rows of the update and append its restatements, in one transaction."""
        if not update.rows and not update.restatements:
            return
        async with self._pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
            await conn.executemany(
                """INSERT INTO ledger_hourly AS l (node_id, hour, carrier, source, scope, activity, unit,
                                                   co2e_kg, factor_id, points)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                   ON CONFLICT (node_id, hour, carrier, source) DO UPDATE
                   SET scope = excluded.scope, activity = excluded.activity, unit = excluded.unit,
                       co2e_kg = excluded.co2e_kg, factor_id = excluded.factor_id,
                       points = excluded.points, updated_at = now()""",
                [
                    (
                        r.node,
                        r.hour,
                        r.carrier.value,
                        r.source.value,
                        r.scope,
                        r.activity,
                        r.unit,
                        r.co2e_kg,
                        r.factor_id,
                        r.points,
                    )
                    for r in update.rows
                ],
                timeout=self._timeout_s,
            )
            if update.restatements:
                await conn.executemany(
                    """INSERT INTO ledger_restatements (node_id, hour, carrier, source, old_co2e_kg,
                                                        new_co2e_kg, old_activity, new_activity, reason)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
                    [
                        (
                            s.node,
                            s.hour,
                            s.carrier.value,
                            s.source.value,
                            s.old_co2e_kg,
                            s.new_co2e_kg,
                            s.old_activity,
                            s.new_activity,
                            s.reason,
                        )
                        for s in update.restatements
                    ],
                    timeout=self._timeout_s,
                )

    async def own_totals(self, start: datetime, end: datetime) -> dict[NodeId, list[float]]:
        """Return each node's own rows summed over ``[start, end)`` as ``[scope 1, scope 2]`` kg."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT node_id, scope, sum(co2e_kg) AS kg FROM ledger_hourly
                   WHERE hour >= $1 AND hour < $2 GROUP BY node_id, scope""",
                start,
                end,
                timeout=self._timeout_s,
            )
        out: dict[NodeId, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for row in rows:
            out[NodeId(row["node_id"])][row["scope"] - 1] += row["kg"]
        return dict(out)

    async def own_hours(self, start: datetime, end: datetime) -> list[tuple[NodeId, datetime, float]]:
        """Return (node, hour, kg of both scopes) of each node's own rows, oldest hour first."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT node_id, hour, sum(co2e_kg) AS kg FROM ledger_hourly
                   WHERE hour >= $1 AND hour < $2 GROUP BY node_id, hour ORDER BY hour""",
                start,
                end,
                timeout=self._timeout_s,
            )
        return [(NodeId(row["node_id"]), row["hour"], row["kg"]) for row in rows]

    async def recent_rollups(self, points: Sequence[PointId], since: datetime) -> list[asyncpg.Record]:
        """Return the 1-minute rollups of ``points`` since ``since`` merged per point and UTC hour."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            return list(
                await conn.fetch(
                    """SELECT p.point_id, min(r.first_ts) AS first_ts, max(r.last_ts) AS last_ts,
                              sum(r.count)::int AS count, sum(r.sum) AS total,
                              (array_agg(r.first ORDER BY r.first_ts))[1] AS first,
                              (array_agg(r.last ORDER BY r.last_ts DESC))[1] AS last,
                              date_trunc('hour', r.bucket) AS hour_utc
                       FROM readings_1m r JOIN points p ON p.id = r.point
                       WHERE p.point_id = ANY($1::text[]) AND r.bucket >= $2 AND r.count > 0
                       GROUP BY p.point_id, date_trunc('hour', r.bucket)""",
                    list(points),
                    since,
                    timeout=self._timeout_s,
                )
            )

    async def quotas(self, month: str | None = None, node: str | None = None) -> list[Quota]:
        """Return the quotas, of one month and/or node if given."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT node_id, month, quota_t, price_cny_per_t FROM quotas
                   WHERE ($1::text IS NULL OR month = $1) AND ($2::text IS NULL OR node_id = $2)
                   ORDER BY month, node_id""",
                month,
                node,
                timeout=self._timeout_s,
            )
        return [Quota(NodeId(r["node_id"]), r["month"], r["quota_t"], r["price_cny_per_t"]) for r in rows]

    async def put_quota(self, quota: Quota) -> bool:
        """Create or replace a quota; return True if it was created."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            created = await conn.fetchval(
                """INSERT INTO quotas AS q (node_id, month, quota_t, price_cny_per_t) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (node_id, month) DO UPDATE
                   SET quota_t = excluded.quota_t, price_cny_per_t = excluded.price_cny_per_t,
                       updated_at = now()
                   RETURNING (xmax = 0)""",
                quota.node,
                quota.month,
                quota.quota_t,
                quota.price_cny_per_t,
                timeout=self._timeout_s,
            )
        return bool(created)

    async def delete_quota(self, node: str, month: str) -> bool:
        """Delete a quota; return False if there was none."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            status = await conn.execute(
                "DELETE FROM quotas WHERE node_id = $1 AND month = $2", node, month, timeout=self._timeout_s
            )
        return bool(status.endswith(" 1"))

    async def alert_state(self) -> list[tuple[NodeId, Basis, str, list[float]]]:
        """Return the fired thresholds per node, basis and month."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            rows = await conn.fetch(
                "SELECT node_id, basis, month, fired_pct FROM quota_alert_state", timeout=self._timeout_s
            )
        return [(NodeId(r["node_id"]), Basis(r["basis"]), r["month"], list(r["fired_pct"])) for r in rows]

    async def save_alert_state(self, node: NodeId, basis: Basis, month: str, fired: Sequence[float]) -> None:
        """Record the fired thresholds of a node and basis for a month."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            await conn.execute(
                """INSERT INTO quota_alert_state (node_id, month, basis, fired_pct) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (node_id, month, basis) DO UPDATE
                   SET fired_pct = excluded.fired_pct, updated_at = now()""",
                node,
                month,
                basis.value,
                sorted(fired),
                timeout=self._timeout_s,
            )

    async def save_forecasts(self, forecasts: Sequence[MonthForecast]) -> None:
        """Replace the latest forecast of each node and month."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            await conn.executemany(
                """INSERT INTO carbon_forecasts (node_id, month, computed_at, actual_t, forecast_t, low_t,
                                                 high_t, method)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                   ON CONFLICT (node_id, month) DO UPDATE
                   SET computed_at = excluded.computed_at, actual_t = excluded.actual_t,
                       forecast_t = excluded.forecast_t, low_t = excluded.low_t, high_t = excluded.high_t,
                       method = excluded.method""",
                [
                    (
                        f.node,
                        f.month,
                        f.computed_at,
                        f.actual_kg / KG_PER_T,
                        f.forecast_kg / KG_PER_T,
                        f.low_kg / KG_PER_T,
                        f.high_kg / KG_PER_T,
                        f.method,
                    )
                    for f in forecasts
                ],
                timeout=self._timeout_s,
            )


_SUBTREE: Final = """
WITH RECURSIVE sub AS (
    SELECT id FROM nodes WHERE id = $1
    UNION ALL
    SELECT n.id FROM nodes n JOIN sub ON n.parent = sub.id
)"""


_INTERVALS_SQL: Final = """
SELECT date_trunc('{period}', hour AT TIME ZONE $4) AT TIME ZONE $4 AS start, scope, sum(co2e_kg) AS kg
FROM ledger_hourly WHERE node_id IN (SELECT id FROM sub) AND hour >= $2 AND hour < $3
GROUP BY 1, scope ORDER BY 1, scope"""


class CarbonQueries:
    """Read side of the carbon tables, for the API: emissions, forecasts and restatements."""

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def emissions(
        self, node: str, start: datetime, end: datetime, *, period: str, timezone: str
    ) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
        """Return a subtree's kgCO2e per local period and scope, and per carrier and scope.

        ``period`` is ``hour``, ``day`` or ``month`` (of ``timezone``); interval starts come back
        as UTC instants.
        """
        if period not in ("hour", "day", "month"):  # the only text put into the SQL below
            raise ValueError(f"period must be hour, day or month, not {period!r}")
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            # period is one of three literals, checked above: the only text put into the SQL.
            sql = _SUBTREE + _INTERVALS_SQL.replace("{period}", period)
            intervals = await conn.fetch(
                sql,
                node,
                start,
                end,
                timezone,
                timeout=self._timeout_s,
            )
            carriers = await conn.fetch(
                _SUBTREE  # noqa: S608 - constant text
                + """
                SELECT carrier, source, scope, unit, sum(activity) AS activity, sum(co2e_kg) AS kg
                FROM ledger_hourly WHERE node_id IN (SELECT id FROM sub) AND hour >= $2 AND hour < $3
                GROUP BY carrier, source, scope, unit ORDER BY scope, carrier, source""",
                node,
                start,
                end,
                timeout=self._timeout_s,
            )
        return list(intervals), list(carriers)

    async def forecasts(self, month: str, node: str | None = None) -> list[asyncpg.Record]:
        """Return the latest stored forecasts of a month (of one node if given)."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            return list(
                await conn.fetch(
                    """SELECT node_id, month, computed_at, actual_t, forecast_t, low_t, high_t, method
                       FROM carbon_forecasts WHERE month = $1 AND ($2::text IS NULL OR node_id = $2)
                       ORDER BY node_id""",
                    month,
                    node,
                    timeout=self._timeout_s,
                )
            )

    async def restatements(self, node: str, limit: int) -> list[asyncpg.Record]:
        """Return the newest restatements of a subtree's rows."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            return list(
                await conn.fetch(
                    _SUBTREE  # noqa: S608 - constant text
                    + """
                    SELECT id, node_id, hour, carrier, source, old_co2e_kg, new_co2e_kg, old_activity,
                           new_activity, reason, restated_at
                    FROM ledger_restatements WHERE node_id IN (SELECT id FROM sub)
                    ORDER BY id DESC LIMIT $2""",
                    node,
                    limit,
                    timeout=self._timeout_s,
                )
            )


class CarbonService:
    """Runs the ledger, the forecasts and the quota alerts (see the module docstring)."""

    def __init__(
        self,
        ledger: CarbonLedger,
        store: CarbonStore,
        parents: Mapping[NodeId, NodeId | None],
        names: Mapping[NodeId, str],
        *,
        clock: Clock,
        timezone: str,
        forecaster: MonthForecaster | None = None,
        alerts: QuotaAlerts | None = None,
        notifier: Notifier | None = None,
        publish: EventPublisher | None = None,
        compute_period_s: float = 10.0,
        forecast_period_s: float = 60.0,
        close_after_s: float = 900.0,
        audit: Callable[[Sequence[Restatement]], Awaitable[None]] | None = None,
    ) -> None:
        self._ledger = ledger
        self._audit = audit
        self._store = store
        self._parents = dict(parents)
        self._names = dict(names)
        self._clock = clock
        self._zone = ZoneInfo(timezone)
        self._forecaster = forecaster or MonthForecaster(timezone)
        self._alerts = alerts or QuotaAlerts()
        self._notifier = notifier
        self._publish = publish
        self._compute_period_s = compute_period_s
        self._forecast_period_s = forecast_period_s
        self._close_after_s = close_after_s
        self._learned_until: datetime | None = None
        self._last_forecast_s = -float("inf")
        self.forecasts: dict[NodeId, MonthForecast] = {}
        """The latest forecast per node (this month)."""
        self.quotas: list[Quota] = []
        """The quotas of the month as last evaluated (the controller's budgets read them here)."""
        self.crossings: list[QuotaCrossing] = []
        """Every crossing this process raised (most recent last; capped)."""

    # -- start-up --------------------------------------------------------------------------------

    async def warm_start(self, *, window_h: int = 48) -> None:
        """Rebuild the ledger's recent hours, the forecaster and the fired alerts from the database."""
        now = self._clock.now()
        since = (now - timedelta(hours=window_h)).replace(minute=0, second=0, microsecond=0)
        for row in await self._store.recent_rollups(self._ledger.points, since):
            self._ledger.load_summary(
                PointId(row["point_id"]),
                row["hour_utc"],
                count=row["count"],
                total=row["total"] or 0.0,
                first_ts=row["first_ts"],
                first=row["first"],
                last_ts=row["last_ts"],
                last=row["last"],
            )
        self._ledger.compute(now=now.timestamp())  # the baseline: equal to what is stored
        closed = self._closed_before(now)
        start = closed - timedelta(weeks=HISTORY_WEEKS)
        self._learn(await self._store.own_hours(start, closed))
        self._learned_until = closed
        for node, basis, month, fired in await self._store.alert_state():
            self._alerts.restore(node, basis, month, fired)

    # -- the loop --------------------------------------------------------------------------------

    async def handle(self, readings: Sequence[Reading]) -> None:
        """Book a batch of readings (the stream consumer's handler; CPU only, microseconds each)."""
        self._ledger.ingest(readings, now=self._clock.now().timestamp())

    async def run(self) -> None:
        """Compute, store, forecast and alert until cancelled; a failed turn is logged and retried."""
        while True:
            try:
                await self.tick()
            except (OSError, TimeoutError, asyncpg.PostgresError) as err:
                raise_if_cancelling()
                _LOGGER.warning("carbon service: turn failed (will retry): %s", err)
            await self._clock.sleep(self._compute_period_s)

    async def tick(self) -> LedgerUpdate:
        """One turn: recompute touched hours, store them, learn closed hours, forecast if due."""
        now = self._clock.now()
        update = self._ledger.compute(now=now.timestamp())
        await self._store.write(update)
        if update.restatements and self._audit is not None:
            await self._audit(update.restatements)  # data corrections leave a trace in the audit log
        for restated in update.restatements:
            _LOGGER.info(
                "ledger: %s %s %s restated %.3f -> %.3f kg (%s)",
                restated.node,
                restated.hour.isoformat(),
                restated.carrier.value,
                restated.old_co2e_kg,
                restated.new_co2e_kg,
                restated.reason,
            )
        closed = self._closed_before(now)
        if self._learned_until is None or closed > self._learned_until:
            start = self._learned_until or closed - timedelta(weeks=HISTORY_WEEKS)
            self._learn(await self._store.own_hours(start, closed))
            self._learned_until = closed
        if self._clock.monotonic() - self._last_forecast_s >= self._forecast_period_s or update.restatements:
            self._last_forecast_s = self._clock.monotonic()
            await self.evaluate(now)
        return update

    def _closed_before(self, now: datetime) -> datetime:
        """Return the end of the last closed local hour (hours are whole in every real time zone)."""
        edge = now - timedelta(seconds=self._close_after_s)
        return edge.replace(minute=0, second=0, microsecond=0)

    def _learn(self, hours: Sequence[tuple[NodeId, datetime, float]]) -> None:
        per_hour: dict[datetime, dict[NodeId, float]] = defaultdict(lambda: defaultdict(float))
        for node, hour, kg in hours:
            for ancestor in ancestry(self._parents, node):
                per_hour[hour][ancestor] += kg
        for hour in sorted(per_hour):
            for node, kg in per_hour[hour].items():
                self._forecaster.learn_hour(node, hour, kg)

    async def month_actuals(self, now: datetime) -> dict[NodeId, list[float]]:
        """Return this month's kgCO2e so far per node, rolled up, as ``[scope 1, scope 2]``."""
        start, _end = month_bounds(month_key(now.astimezone(self._zone)), self._zone)
        own = await self._store.own_totals(start.astimezone(UTC), now + timedelta(hours=1))
        totals: dict[NodeId, list[float]] = {node: [0.0, 0.0] for node in self._parents}
        for node, (scope1, scope2) in own.items():
            for ancestor in ancestry(self._parents, node):
                cell = totals.setdefault(ancestor, [0.0, 0.0])
                cell[0] += scope1
                cell[1] += scope2
        return totals

    async def evaluate(self, now: datetime | None = None) -> list[QuotaCrossing]:
        """Forecast every node's month, check the quotas and send the alerts they cross."""
        now = now or self._clock.now()
        month = month_key(now.astimezone(self._zone))
        actuals = await self.month_actuals(now)
        forecasts = [self._forecaster.forecast(node, now, sum(kg)) for node, kg in actuals.items()]
        self.forecasts = {NodeId(f.node): f for f in forecasts}
        await self._store.save_forecasts(forecasts)
        await self._emit(
            "ledger", {"month": month, "nodes": {n: [round(v, 3) for v in kg] for n, kg in actuals.items()}}
        )
        crossings: list[QuotaCrossing] = []
        self.quotas = await self._store.quotas(month=month)
        for quota in self.quotas:
            forecast = self.forecasts.get(quota.node)
            if forecast is None:
                continue
            status = QuotaStatus(
                node=quota.node,
                month=month,
                quota_t=quota.quota_t,
                actual_t=forecast.actual_kg / KG_PER_T,
                forecast_t=forecast.forecast_kg / KG_PER_T,
                forecast_low_t=forecast.low_kg / KG_PER_T,
                forecast_high_t=forecast.high_kg / KG_PER_T,
                price_cny_per_t=quota.price_cny_per_t,
            )
            before = {basis: self._alerts.fired(quota.node, basis) for basis in Basis}
            found = self._alerts.observe(status)
            for basis in Basis:
                after = self._alerts.fired(quota.node, basis)
                if after is not None and after != before[basis]:
                    await self._store.save_alert_state(quota.node, basis, after[0], sorted(after[1]))
            for crossing in found:
                await self._alert(crossing, now)
            crossings.extend(found)
        self.crossings = (self.crossings + crossings)[-1000:]
        return crossings

    async def _alert(self, crossing: QuotaCrossing, now: datetime) -> None:
        status = crossing.status
        name = self._names.get(crossing.node, crossing.node)
        basis = "实际排放 actual" if crossing.basis is Basis.ACTUAL else "月末预测 forecast"
        severity = Severity.CRITICAL if crossing.threshold_pct >= 100 else Severity.WARNING
        text = (
            f"{name}: {basis} {crossing.share_pct:.1f} % of the {status.month} quota "
            f"({status.actual_t:.2f} t so far, month-end forecast {status.forecast_t:.2f} t, "
            f"quota {status.quota_t:.2f} t)."
        )
        if status.price_cny_per_t > 0:
            text += f" Forecast surplus/deficit value: {status.forecast_value_cny:,.0f} CNY."
        body = {
            "node": crossing.node,
            "month": status.month,
            "basis": crossing.basis.value,
            "threshold_pct": crossing.threshold_pct,
            "share_pct": round(crossing.share_pct, 3),
            "actual_t": status.actual_t,
            "forecast_t": status.forecast_t,
            "quota_t": status.quota_t,
            "severity": severity.value,
            "ts": now.astimezone(UTC).isoformat(),
            "id": crossing.key,
        }
        _LOGGER.warning("quota alert: %s", text)
        await self._emit("quota_alert", body)
        if self._notifier is None:
            return
        notification = Notification(
            id=crossing.key,
            node=crossing.node,
            node_name=name,
            severity=severity,
            title=f"碳配额告警 Carbon quota {crossing.threshold_pct:g} % ({basis}): {name}",
            text=text,
            ts=now,
            fields={
                "quota_t": round(status.quota_t, 3),
                "actual_t": round(status.actual_t, 3),
                "forecast_t": round(status.forecast_t, 3),
                "percent": round(crossing.share_pct, 2),
                "threshold": crossing.threshold_pct,
            },
        )
        await self._notifier.send(notification, ancestry(self._parents, crossing.node)[1:])

    async def _emit(self, kind: str, body: Mapping[str, Any]) -> None:
        if self._publish is None:
            return
        try:
            await self._publish(kind, body)
        except Exception as err:  # noqa: BLE001 - events are best effort; the ledger goes on
            raise_if_cancelling()
            _LOGGER.warning("carbon service: cannot publish %s event: %s", kind, err)
