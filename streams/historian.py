"""The historian stage: write reading batches to PostgreSQL (plain partitions or TimescaleDB).

``handle`` is idempotent, so the consumer can redeliver a batch at will: rows are COPYed into a
per-connection temporary staging table and moved with ``INSERT ... ON CONFLICT DO NOTHING`` in
one transaction, on the ``(point, ts)`` primary key.

Unknown points
--------------
Readings carry text point ids; the table stores the compact ``points.id``. Ids are resolved through
a cache that is refreshed from ``points`` (for just the missing ids) whenever a batch brings an
unknown one. Readings whose point is still unknown cannot ever be stored (there is no foreign key
to fail on; they would be orphans), so the stage commits the rest of the batch and then raises
:class:`streams.bus.RejectedReadings` carrying them: the consumer moves exactly those readings to the
dead-letter stream, re-encoded so an operator can replay them after adding the point, and
acknowledges the batch. The same happens to readings stamped more than ``max_future_s`` ahead of
the clock (a device with a wrong clock would otherwise create partitions years ahead).

Partitions
----------
On plain PostgreSQL ``readings`` is range-partitioned by UTC day (``readings_pYYYYMMDD``) with no
default partition. The stage makes sure the partitions of a batch's days exist (cached; created
under an advisory lock so two historians don't race), and :meth:`HistorianStage.ensure_partitions_ahead`
creates the coming days' from a maintenance task, so ingest rarely takes the DDL lock. On
TimescaleDB (``readings`` is a hypertable, not a partitioned table) chunks are automatic and both
are no-ops.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import asyncpg

from scada.model import Clock, Reading, ServiceError
from scada.runtime import SystemClock
from streams.bus import RejectedReadings

__all__ = ["PARTITION_LOCK_KEY", "HistorianStage", "partition_name"]

_LOGGER = logging.getLogger(__name__)

PARTITION_LOCK_KEY: Final = 0x5CADA_0002
"""Advisory lock key held (per transaction) while creating a readings partition."""

_COLUMNS: Final = ("point", "ts", "value", "quality", "reason")
_STAGING: Final = "readings_staging"
_CREATE_STAGING: Final = """
CREATE TEMP TABLE IF NOT EXISTS readings_staging (
    point integer, ts timestamptz, value double precision, quality smallint, reason text
) ON COMMIT DELETE ROWS"""
_MOVE_STAGED: Final = """
INSERT INTO readings (point, ts, value, quality, reason)
SELECT point, ts, value, quality, reason FROM readings_staging
ON CONFLICT (point, ts) DO NOTHING"""
_MAX_UNKNOWN_LISTED: Final = 10


def partition_name(day: date) -> str:
    """Return the name of the readings partition holding ``day`` (UTC).

    >>> partition_name(date(2026, 1, 5))
    'readings_p20260105'
    """
    return f"readings_p{day:%Y%m%d}"


class HistorianStage:
    """Store reading batches; a redelivered batch changes nothing.

    Parameters
    ----------
    pool
        asyncpg pool on the migrated database.
    timeout_s
        Timeout of each database call (and of taking a pooled connection).
    max_future_s
        Readings stamped further than this ahead of ``clock`` are rejected; None accepts any.
    clock
        Source of "now" for the future check and :meth:`ensure_partitions_ahead`.

    Attributes
    ----------
    written_total
        Rows sent to the database (redelivered duplicates included; the table ignores them).
    rejected_total
        Readings handed back as :class:`RejectedReadings` (unknown point, far future).
    """

    name = "historian"

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        timeout_s: float = 5.0,
        max_future_s: float | None = 86_400.0,
        clock: Clock | None = None,
    ) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._max_future = None if max_future_s is None else timedelta(seconds=max_future_s)
        self._clock: Clock = clock or SystemClock()
        self._ids: dict[str, int] = {}
        self._days: set[date] = set()  # partitions known to exist
        self._partitioned: bool | None = None  # None until the table's kind is looked up
        self.written_total = 0
        self.rejected_total = 0

    def invalidate(self) -> None:
        """Forget cached point ids and partitions (after the catalog or retention changed them)."""
        self._ids.clear()
        self._days.clear()

    async def handle(self, readings: Sequence[Reading]) -> None:
        """Write a batch; raise :class:`RejectedReadings` for readings it can never store."""
        if not readings:
            return
        horizon = None if self._max_future is None else self._clock.now() + self._max_future
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            await self._resolve(conn, {r.point for r in readings})
            rows: list[tuple[int, datetime, float | None, int, str | None]] = []
            unknown: list[Reading] = []
            future: list[Reading] = []
            for reading in readings:
                point_key = self._ids.get(reading.point)
                if point_key is None:
                    unknown.append(reading)
                elif horizon is not None and reading.ts > horizon:
                    future.append(reading)
                else:
                    reason = reading.quality.reason or None
                    rows.append((point_key, reading.ts, reading.value, int(reading.quality.code), reason))
            if rows:
                await self._write(conn, rows)
                self.written_total += len(rows)
        if unknown or future:
            self.rejected_total += len(unknown) + len(future)
            raise RejectedReadings(_reject_reason(unknown, future, self._max_future), [*unknown, *future])

    async def ensure_partitions_ahead(self, days: int = 7) -> list[str]:
        """Create the partitions of today and the next ``days`` UTC days; return those created."""
        today = self._clock.now().astimezone(UTC).date()
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            return await self._ensure_days(conn, {today + timedelta(days=n) for n in range(days + 1)})

    # ----------------------------------------------------------------------------------------------

    async def _resolve(self, conn: Any, points: Iterable[str]) -> None:
        missing = [p for p in points if p not in self._ids]
        if not missing:
            return
        rows = await conn.fetch(
            "SELECT id, point_id FROM points WHERE point_id = ANY($1::text[])",
            missing,
            timeout=self._timeout_s,
        )
        for row in rows:
            self._ids[row["point_id"]] = row["id"]

    async def _write(
        self, conn: Any, rows: list[tuple[int, datetime, float | None, int, str | None]]
    ) -> None:
        days = {ts.astimezone(UTC).date() for _, ts, *_ in rows}
        await self._ensure_days(conn, days)
        try:
            await self._copy_and_move(conn, rows)
        except asyncpg.CheckViolationError as err:
            if "no partition" not in str(err):
                raise
            # A partition we cached was dropped (retention) or made elsewhere: look again, once.
            self._days.clear()
            await self._ensure_days(conn, days)
            await self._copy_and_move(conn, rows)

    async def _copy_and_move(
        self, conn: Any, rows: list[tuple[int, datetime, float | None, int, str | None]]
    ) -> None:
        async with conn.transaction():
            await conn.execute(_CREATE_STAGING, timeout=self._timeout_s)
            await conn.copy_records_to_table(
                _STAGING, records=rows, columns=_COLUMNS, timeout=self._timeout_s
            )
            await conn.execute(_MOVE_STAGED, timeout=self._timeout_s)

    async def _ensure_days(self, conn: Any, days: set[date]) -> list[str]:
        missing = days - self._days
        if not missing or not await self._is_partitioned(conn):
            return []
        created = [name for day in sorted(missing) if (name := await self._create_partition(conn, day))]
        self._days |= missing
        return created

    async def _is_partitioned(self, conn: Any) -> bool:
        if self._partitioned is None:
            kind = await conn.fetchval(
                "SELECT relkind::text FROM pg_class WHERE oid = to_regclass('readings')",
                timeout=self._timeout_s,
            )
            if kind is None:
                raise ServiceError("table 'readings' does not exist: run the migrations first")
            self._partitioned = kind == "p"  # 'r' on TimescaleDB: chunks are made for us
        return self._partitioned

    async def _create_partition(self, conn: Any, day: date) -> str | None:
        """Create one day's partition unless it exists; return its name if created here."""
        name = partition_name(day)
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name, timeout=self._timeout_s):
            return None  # the common case: no DDL lock taken
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        ddl = (
            f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF readings "
            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{(start + timedelta(days=1)).isoformat()}')"
        )
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK_KEY, timeout=self._timeout_s
            )
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name, timeout=self._timeout_s):
                return None  # another historian made it while we waited for the lock
            await conn.execute(ddl, timeout=self._timeout_s)  # built from a date, not from input text
        _LOGGER.info("created readings partition %s", name)
        return name


def _reject_reason(unknown: list[Reading], future: list[Reading], max_future: timedelta | None) -> str:
    parts = []
    if unknown:
        points = sorted({r.point for r in unknown})
        listed = ", ".join(points[:_MAX_UNKNOWN_LISTED]) + (
            " ..." if len(points) > _MAX_UNKNOWN_LISTED else ""
        )
        parts.append(f"unknown point ids (not in table points): {listed}")
    if future:
        parts.append(f"{len(future)} readings stamped more than {max_future} ahead of the clock")
    return "; ".join(parts)
