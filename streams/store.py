"""Read stored readings back: :class:`scada.model.ReadingStore` over PostgreSQL / TimescaleDB.

The same SQL serves both engines: both keep a ``(point, ts)`` index, so ``latest`` (``ORDER BY ts
DESC LIMIT 1``) walks one point's newest rows backwards and, on the partitioned table, stops in the
newest partition that has data instead of scanning them all.

Beyond the protocol, the store answers the chart and energy queries (docs/queries.md):

- :meth:`PostgresReadingStore.downsampled`: one point's history reduced to about N points, read from
  raw rows or from the rollup tables ``readings_1m`` / ``readings_15m`` / ``readings_1h`` (chosen by
  :func:`streams.query.choose_source`), with bad-quality gaps kept;
- :meth:`PostgresReadingStore.counter_deltas`: a counter's consumption per interval, from the rollups'
  ``first``/``last`` with ``LAG``, across wraps and resets (:func:`streams.query.counter_delta`);
- :meth:`PostgresReadingStore.node_energy`: the same summed over every counter under a hierarchy node
  (recursive CTE over ``nodes.parent``), in one statement.

The rollup tables (``point, bucket, count, sum, min, max, first_ts, first, last_ts, last``; ``count``
counts good values, the others are over good values) are maintained by the historian (or are
TimescaleDB continuous aggregates); :func:`backfill_rollups` builds them from raw rows for the bench,
tests and backfills.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg

from scada.model import NotFound, PointId, Quality, QualityCode, Reading, ServiceError, split_point_id
from streams.query import (
    RESET_FRACTION,
    WRAP_BAND,
    DownsampleMode,
    Source,
    StepKind,
    choose_source,
    counter_delta,
    downsample,
)

__all__ = [
    "COUNTER_KINDS",
    "INTERVALS",
    "RAW_ROWS_CAP",
    "DownsampledHistory",
    "EnergyInterval",
    "NodeEnergy",
    "PostgresReadingStore",
    "backfill_rollups",
]

ORIGIN: Final = datetime(2000, 1, 1, tzinfo=UTC)
"""Origin of every rollup bucket: ``date_bin(width, ts, '2000-01-01 00:00:00+00')``."""

RAW_ROWS_CAP: Final = 200_000
"""At most this many raw rows are read to downsample one history; more sets ``truncated``."""

COUNTER_KINDS: Final = ("energy_counter", "gas_counter", "fuel_counter")
"""``points.kind`` values summed by :meth:`PostgresReadingStore.node_energy`."""

INTERVALS: Final[dict[str, tuple[Source, timedelta]]] = {
    "1m": (Source.M1, timedelta(minutes=1)),
    "15m": (Source.M15, timedelta(minutes=15)),
    "1h": (Source.H1, timedelta(hours=1)),
    "1d": (Source.H1, timedelta(days=1)),  # days of the caller's time zone, from the hourly rollup
}
"""Energy intervals and the rollup each is computed from."""

_LATEST: Final = """
SELECT ts, value, quality, reason FROM readings WHERE point = $1 ORDER BY ts DESC LIMIT 1"""
_HISTORY: Final = """
SELECT ts, value, quality, reason FROM readings
WHERE point = $1 AND ts >= $2 AND ts < $3 ORDER BY ts LIMIT $4"""


class PostgresReadingStore:
    """Latest value and history of a point, with quality rebuilt from the stored code and reason.

    An unknown (or malformed) point id raises :class:`scada.model.NotFound`; a known point without
    data has ``latest() is None`` and an empty history.
    """

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._ids: dict[str, int] = {}  # points are never renumbered, so positive hits stay valid
        self._rollups: frozenset[Source] | None = None  # sources whose table exists

    async def latest(self, point: PointId) -> Reading | None:
        """Return the newest stored reading of ``point``, or None if it has none yet."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            point_key = await self._point_key(conn, point)
            row = await conn.fetchrow(_LATEST, point_key, timeout=self._timeout_s)
        return None if row is None else _reading(point, row)

    async def history(
        self, point: PointId, start: datetime, end: datetime, *, limit: int
    ) -> Sequence[Reading]:
        """Return readings with ``start <= ts < end``, oldest first, at most ``limit``."""
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("history: start and end must be timezone-aware")
        if limit < 1:
            raise ValueError("history: limit must be >= 1")
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            point_key = await self._point_key(conn, point)
            if start >= end:
                return []
            rows = await conn.fetch(_HISTORY, point_key, start, end, limit, timeout=self._timeout_s)
        return [_reading(point, row) for row in rows]

    async def downsampled(
        self,
        point: PointId,
        start: datetime,
        end: datetime,
        *,
        points: int,
        mode: DownsampleMode,
        raw_period_s: float,
    ) -> DownsampledHistory:
        """Return ``[start, end)`` of a point reduced to about ``points`` samples (see docs/queries.md).

        ``raw_period_s`` (the device's poll period) estimates how many raw rows the span holds.
        Samples read from a rollup are stamped with their bucket's start; a run of buckets without
        good values (no row, or ``count = 0``) becomes one bad reading ``no good values`` at its
        start, so charts show the hole.
        """
        _check_span(start, end)
        if points < 2:
            raise ValueError("downsampled: points must be >= 2")
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            point_key = await self._point_key(conn, point)
            available = await self._available(conn)
            source = choose_source(
                (end - start).total_seconds(), points, raw_period_s=raw_period_s, available=available
            )
            if source is Source.RAW:
                rows = await conn.fetch(
                    _HISTORY, point_key, start, end, RAW_ROWS_CAP + 1, timeout=self._timeout_s
                )
            else:
                rows = await conn.fetch(
                    _ROLLUP_HISTORY.format(table=source.table),
                    point_key,
                    _align(start, source),
                    end,
                    timeout=self._timeout_s,
                )
        if source is Source.RAW:
            truncated = len(rows) > RAW_ROWS_CAP
            rows = rows[:RAW_ROWS_CAP]
            samples = [(row["ts"].timestamp(), None if row["quality"] == 0 else row["value"]) for row in rows]
            keep = downsample(samples, points, mode, start=start.timestamp(), end=end.timestamp())
            return DownsampledHistory(source, mode, [_reading(point, rows[i]) for i in keep], truncated)
        entries, samples = _rollup_samples(rows, source, mode)
        keep = downsample(samples, points, mode, start=start.timestamp(), end=end.timestamp())
        readings = [
            Reading(point=point, ts=ts, value=value)
            if value is not None
            else Reading(point=point, ts=ts, value=None, quality=_NO_GOOD_VALUES)
            for ts, value in (entries[i] for i in keep)
        ]
        return DownsampledHistory(source, mode, readings, truncated=False)

    async def counter_deltas(
        self, point: PointId, start: datetime, end: datetime, *, interval: str, timezone: str = "UTC"
    ) -> list[EnergyInterval]:
        """Return a counter's consumption per interval (``15m``, ``1h``, ``1d``...) in ``[start, end)``.

        Steps are taken between the ``last`` values of successive rollup buckets (``LAG``; before the
        first bucket, the last good value before ``start``, else the bucket's own ``first``), judged
        by :func:`streams.query.counter_delta` with the register range in ``points.counter_wrap``,
        and summed per interval; ``kind`` is the most notable step (reset, wrap, jitter, normal).
        Intervals without good values are left out: what a counter gains across a gap is booked in
        the interval where it is read next. ``1d`` intervals are days of ``timezone``.
        """
        _check_span(start, end)
        source, _step = _interval(interval)
        start = _align_interval(start, interval, timezone)
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            point_key = await self._point_key(conn, point)
            await self._require(conn, source)
            wrap = await conn.fetchval(
                "SELECT counter_wrap FROM points WHERE id = $1", point_key, timeout=self._timeout_s
            )
            rows = await conn.fetch(
                _POINT_INTERVALS.format(table=source.table, bin=_bin_sql(interval, tz_param=4)),
                point_key,
                start,
                end,
                *_tz_arg(interval, timezone),
                timeout=self._timeout_s,
            )
        result: dict[datetime, EnergyInterval] = {}
        for row in rows:
            prev = row["prev"] if row["prev"] is not None else row["first_v"]
            step = counter_delta(prev, row["last_v"], wrap=wrap)
            seen = result.get(row["t"])
            if seen is None:
                result[row["t"]] = EnergyInterval(row["t"], step.delta, step.kind)
            else:
                kind = max(seen.kind, step.kind, key=_NOTABLE.index)
                result[row["t"]] = EnergyInterval(row["t"], seen.delta + step.delta, kind)
        return list(result.values())

    async def node_energy(
        self,
        node: str,
        start: datetime,
        end: datetime,
        *,
        interval: str,
        carrier: str | None,
        timezone: str = "UTC",
    ) -> list[NodeEnergy]:
        """Sum the per-interval consumption of every counter of the devices under ``node``.

        Descendants are found with a recursive CTE over ``nodes.parent``; counters are points of
        kind energy/gas/fuel counter (of ``carrier``, if given), retired ones included so history
        stays whole. Per point, intervals follow :meth:`counter_deltas` (same rule, in SQL); the
        sums are grouped by unit, since kWh and GJ do not add up.
        """
        _check_span(start, end)
        source, _step = _interval(interval)
        start = _align_interval(start, interval, timezone)
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            await self._require(conn, source)
            async with conn.transaction():
                # Tens of thousands of rollup rows: JIT compiling costs more than it saves, and the
                # window sort spills to disk with the default 4 MB work_mem.
                await conn.execute(_ROLLUP_SETTINGS, timeout=self._timeout_s)
                rows = await conn.fetch(
                    _NODE_INTERVALS.format(
                        table=source.table, bin=_bin_sql(interval, tz_param=8), delta=_DELTA_SQL
                    ),
                    node,
                    start,
                    end,
                    carrier,
                    list(COUNTER_KINDS),
                    RESET_FRACTION,
                    WRAP_BAND,
                    *_tz_arg(interval, timezone),
                    timeout=self._timeout_s,
                )
        return [NodeEnergy(row["t"], row["unit"], row["energy"], row["points"]) for row in rows]

    async def _available(self, conn: Any) -> frozenset[Source]:
        if self._rollups is None:
            found = await conn.fetch(
                "SELECT t FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NOT NULL",
                [s.table for s in Source if s is not Source.RAW],
                timeout=self._timeout_s,
            )
            names = {row["t"] for row in found}
            self._rollups = frozenset({Source.RAW} | {s for s in Source if s.table in names})
        return self._rollups

    async def _require(self, conn: Any, source: Source) -> None:
        if source not in await self._available(conn):
            self._rollups = None  # look again next time: migrations may have run since
            raise ServiceError(f"table {source.table} does not exist: run the migrations first")

    async def _point_key(self, conn: Any, point: PointId) -> int:
        cached = self._ids.get(point)
        if cached is not None:
            return cached
        split_point_id(point)  # raises NotFound for a malformed id before we query
        point_key = await conn.fetchval(
            "SELECT id FROM points WHERE point_id = $1", point, timeout=self._timeout_s
        )
        if point_key is None:
            raise NotFound(f"unknown point {point!r}")
        self._ids[point] = int(point_key)
        return int(point_key)


def _reading(point: PointId, row: Any) -> Reading:
    quality = Quality(QualityCode(row["quality"]), row["reason"] or "")
    return Reading(point=point, ts=row["ts"], value=row["value"], quality=quality)


@dataclass(frozen=True, slots=True)
class DownsampledHistory:
    """A reduced history: which table it came from, how it was reduced, and the samples."""

    source: Source
    mode: DownsampleMode
    readings: list[Reading]
    truncated: bool
    """The raw rows read hit :data:`RAW_ROWS_CAP`; the end of the span is missing."""


_NOTABLE: Final = (StepKind.NORMAL, StepKind.JITTER, StepKind.WRAP, StepKind.RESET)


@dataclass(frozen=True, slots=True)
class EnergyInterval:
    """A counter's consumption in the interval starting at ``start`` and how its step was judged."""

    start: datetime
    delta: float
    kind: StepKind


@dataclass(frozen=True, slots=True)
class NodeEnergy:
    """The consumption of a node's counters of one unit in the interval starting at ``start``."""

    start: datetime
    unit: str
    energy: float
    points: int
    """How many counters had good values in the interval."""


_ROLLUP_SETTINGS: Final = "SET LOCAL jit = off; SET LOCAL work_mem = '32MB'"

_ROLLUP_HISTORY: Final = """
SELECT bucket, count, sum, min, max FROM {table}
WHERE point = $1 AND bucket >= $2 AND bucket < $3 ORDER BY bucket"""

# One row per rollup bucket with good values, with the interval it belongs to (t) and the last value
# of the bucket before (LAG), or, for the first one, the last good value before start.
_POINT_INTERVALS: Final = """
SELECT {bin} AS t, first AS first_v, last AS last_v,
       coalesce(lag(last) OVER (ORDER BY bucket),
                (SELECT last FROM {table}
                 WHERE point = $1 AND bucket < $2 AND count > 0 ORDER BY bucket DESC LIMIT 1)) AS prev
FROM {table}
WHERE point = $1 AND bucket >= $2 AND bucket < $3 AND count > 0
ORDER BY bucket"""

# streams.query.counter_delta in SQL ($6 reset fraction, $7 wrap band); keep the two in step.
_DELTA_SQL: Final = """CASE
    WHEN last_v >= prev THEN last_v - prev
    WHEN wrap IS NOT NULL AND prev BETWEEN wrap * (1 - $7::float8) AND wrap
         AND last_v BETWEEN 0 AND wrap * $7::float8 THEN wrap - prev + last_v
    WHEN prev - last_v > $6::float8 * abs(prev) THEN greatest(last_v, 0)
    ELSE 0 END"""

_NODE_INTERVALS: Final = """
WITH RECURSIVE sub AS (
    SELECT id FROM nodes WHERE id = $1
    UNION ALL
    SELECT n.id FROM nodes n JOIN sub ON n.parent = sub.id
), pts AS (
    SELECT p.id, p.unit, p.counter_wrap
    FROM points p JOIN devices d ON d.id = p.device_id
    WHERE d.node_id IN (SELECT id FROM sub) AND p.kind = ANY($5::text[])
      AND ($4::text IS NULL OR p.carrier = $4::text)
), s AS (
    SELECT r.t, pts.unit, r.last AS last_v, pts.counter_wrap AS wrap, r.first_in_t,
           coalesce(r.prev,
                    (SELECT last FROM {table}
                     WHERE point = pts.id AND bucket < $2 AND count > 0 ORDER BY bucket DESC LIMIT 1),
                    r.first) AS prev
    FROM pts
    CROSS JOIN LATERAL (
        -- Per counter: one (point, bucket) index range, already in bucket order, so LAG needs no
        -- sort; OFFSET 0 keeps the planner from flattening this into a join over every point.
        SELECT {bin} AS t, first, last,
               lag(last) OVER w AS prev,
               {bin} IS DISTINCT FROM lag({bin}) OVER w AS first_in_t
        FROM {table}
        WHERE point = pts.id AND bucket >= $2 AND bucket < $3 AND count > 0
        WINDOW w AS (ORDER BY bucket)
        OFFSET 0) r
)
SELECT t, unit, sum({delta}) AS energy, (count(*) FILTER (WHERE first_in_t))::int AS points
FROM s GROUP BY t, unit ORDER BY t, unit"""


def _check_span(start: datetime, end: datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    if start >= end:
        raise ValueError("start must be before end")


def _interval(interval: str) -> tuple[Source, timedelta]:
    try:
        return INTERVALS[interval]
    except KeyError:
        raise ValueError(f"interval must be one of {', '.join(INTERVALS)}, not {interval!r}") from None


def _bin_sql(interval: str, *, tz_param: int) -> str:
    # The rollup's own buckets are the intervals, except days: midnights of the zone in $tz_param.
    if interval == "1d":
        return f"date_trunc('day', bucket, ${tz_param}::text)"
    return "bucket"


def _tz_arg(interval: str, timezone: str) -> tuple[str, ...]:
    return (timezone,) if interval == "1d" else ()


def _align(ts: datetime, source: Source) -> datetime:
    """Return the start of the ``source`` bucket holding ``ts``.

    >>> _align(datetime(2026, 1, 5, 12, 7, 30, tzinfo=UTC), Source.M15).isoformat()
    '2026-01-05T12:00:00+00:00'
    """
    width = timedelta(seconds=source.width_s)
    return ts - (ts - ORIGIN) % width


def _align_interval(ts: datetime, interval: str, timezone: str) -> datetime:
    """Return the start of the interval holding ``ts`` (days start at midnight in ``timezone``).

    >>> _align_interval(datetime(2026, 1, 5, 20, 0, tzinfo=UTC), "1d", "Asia/Shanghai").isoformat()
    '2026-01-05T16:00:00+00:00'
    """
    if interval == "1d":
        local = ts.astimezone(zoneinfo.ZoneInfo(timezone))
        return local.replace(hour=0, minute=0, second=0, microsecond=0).astimezone(UTC)
    return _align(ts, INTERVALS[interval][0])


def _rollup_samples(
    rows: Sequence[Any], source: Source, mode: DownsampleMode
) -> tuple[list[tuple[datetime, float | None]], list[tuple[float, float | None]]]:
    """Turn rollup rows into (bucket, value) entries and samples; None where no good values.

    A value is the bucket's mean, or, for ``minmax``, its minimum and its maximum, both stamped with
    the bucket's start (the rollup knows each extreme to within its bucket). Readings are made later,
    for the kept samples only.
    """
    entries: list[tuple[datetime, float | None]] = []
    width = timedelta(seconds=source.width_s)
    expected: datetime | None = None
    minmax = mode is DownsampleMode.MINMAX
    for bucket, count, total, low, high in rows:
        if expected is not None and bucket > expected:
            entries.append((expected, None))
        expected = bucket + width
        if not count:
            entries.append((bucket, None))
        elif minmax:
            entries.append((bucket, low))
            entries.append((bucket, high))
        else:
            entries.append((bucket, total / count))
    samples = [(ts.timestamp(), value) for ts, value in entries]
    return entries, samples


_NO_GOOD_VALUES: Final = Quality.bad("no good values")


async def backfill_rollups(
    conn: asyncpg.Connection, start: datetime, end: datetime, *, timeout_s: float = 600.0
) -> None:
    """Rebuild the three rollup tables for ``[start, end)`` (whole buckets) from raw readings.

    ``INSERT ... SELECT ... GROUP BY point, date_bin(...) ON CONFLICT DO UPDATE`` over the
    good-quality values, like the historian's merge: a bucket without good values has no row. For
    the bench, tests and backfills; the historian maintains the tables as data arrives.
    """
    for source in (Source.M1, Source.M15, Source.H1):
        await conn.execute(
            _BACKFILL.format(table=source.table),
            timedelta(seconds=source.width_s),
            _align(start, source),
            end,
            timeout=timeout_s,
        )


_BACKFILL: Final = """
INSERT INTO {table} (point, bucket, count, sum, min, max, first_ts, first, last_ts, last)
SELECT point, date_bin($1::interval, ts, '2000-01-01 00:00:00+00') AS b,
       count(*), sum(value), min(value), max(value),
       min(ts), (array_agg(value ORDER BY ts))[1], max(ts), (array_agg(value ORDER BY ts DESC))[1]
FROM readings WHERE ts >= $2 AND ts < $3 AND quality = 2 AND value IS NOT NULL
GROUP BY point, b
ON CONFLICT (point, bucket) DO UPDATE SET
    count = EXCLUDED.count, sum = EXCLUDED.sum, min = EXCLUDED.min, max = EXCLUDED.max,
    first_ts = EXCLUDED.first_ts, first = EXCLUDED.first, last_ts = EXCLUDED.last_ts,
    last = EXCLUDED.last"""
