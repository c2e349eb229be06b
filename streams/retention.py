"""Retention: forget raw readings and rollup rows past each point's retention class.

Every point belongs to a class (``points.retention``, from the site file; a name the job does not
know counts as ``default``) that keeps raw rows for ``raw_days`` and each rollup for its own
number of days (None: for ever). One run of :meth:`RetentionJob.run`:

1. **Raw, whole days.** The longest ``raw_days`` of any class bounds what any point keeps: on plain
   PostgreSQL every daily partition ``readings_pYYYYMMDD`` that ends at or before ``now - longest``
   is dropped (``DROP TABLE``: instant, no bloat, no vacuum); on TimescaleDB,
   ``drop_chunks('readings', older_than => now - longest)``. Nothing is dropped while a class keeps
   raw rows for ever.
2. **Raw, shorter classes.** Points of a class keeping less have their older rows deleted, per
   partition (per chunk on TimescaleDB) and in batches of ``batch_rows``, so no statement holds
   locks or builds WAL for long.
3. **Rollups.** For each of ``readings_1m`` / ``_15m`` / ``_1h``: rows of each class's points older
   than that class's days are deleted (every point's rows past the longest period, then each
   shorter class's), in batches, through the ``(point, bucket)`` key. On TimescaleDB the rollups
   are continuous aggregates, which accept no ``DELETE``: ``drop_chunks`` applies the longest
   period of each and shorter classes are not applied there (logged once).

The job runs under a session advisory lock, so two historians never run it together. It takes
"now" from the clock, so tests can age data without waiting.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import asyncpg

from scada.model import Clock, ServiceError
from scada.runtime import SystemClock

__all__ = ["RETENTION_LOCK_KEY", "RetentionClass", "RetentionJob", "RetentionReport"]

_LOGGER = logging.getLogger(__name__)

RETENTION_LOCK_KEY: Final = 0x5CADA_0004
"""Session advisory lock key held while the retention job runs."""

ROLLUP_TABLES: Final = ("readings_1m", "readings_15m", "readings_1h")
_PARTITION_RE: Final = re.compile(r"^readings_p(\d{8})$")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionClass:
    """How long points of one class keep each resolution, in days; None keeps it for ever."""

    raw_days: int | None = 30
    rollup_1m_days: int | None = 365
    rollup_15m_days: int | None = 1095
    rollup_1h_days: int | None = None

    def rollup_days(self, table: str) -> int | None:
        """Return the days this class keeps rows of a rollup table.

        >>> RetentionClass().rollup_days("readings_15m")
        1095
        """
        return {
            "readings_1m": self.rollup_1m_days,
            "readings_15m": self.rollup_15m_days,
            "readings_1h": self.rollup_1h_days,
        }[table]


@dataclass(slots=True)
class RetentionReport:
    """What one run removed."""

    dropped_partitions: list[str] = field(default_factory=list)
    deleted_raw_rows: int = 0
    deleted_rollup_rows: dict[str, int] = field(default_factory=dict)


class RetentionJob:
    """Apply the retention classes to ``readings`` and its rollups (see the module doc).

    Parameters
    ----------
    pool
        asyncpg pool on the migrated database.
    classes
        Retention classes by name; must include ``default``.
    batch_rows
        Rows removed per ``DELETE`` statement.
    timeout_s
        Timeout of each statement; ``DROP TABLE`` also waits at most this long for its lock.
    clock
        Source of "now".
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        classes: Mapping[str, RetentionClass],
        *,
        batch_rows: int = 10_000,
        timeout_s: float = 60.0,
        clock: Clock | None = None,
    ) -> None:
        if "default" not in classes:
            raise ValueError("retention classes must include 'default'")
        self._pool = pool
        self._classes = dict(classes)
        self._batch_rows = batch_rows
        self._timeout_s = timeout_s
        self._clock: Clock = clock or SystemClock()
        self._warned_timescale_classes = False

    async def run(self) -> RetentionReport:
        """Run the job once; return what it removed."""
        report = RetentionReport()
        now = self._clock.now().astimezone(UTC)
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            if not await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_KEY, timeout=self._timeout_s
            ):
                _LOGGER.info("retention: another process is running the job; skipped")
                return report
            try:
                await self._run_locked(conn, now, report)
            finally:
                await conn.execute(
                    "SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY, timeout=self._timeout_s
                )
        if report.dropped_partitions or report.deleted_raw_rows or any(report.deleted_rollup_rows.values()):
            _LOGGER.info(
                "retention: dropped %d partitions, deleted %d raw rows, rollup rows %s",
                len(report.dropped_partitions),
                report.deleted_raw_rows,
                report.deleted_rollup_rows,
            )
        return report

    # ----------------------------------------------------------------------------------------------

    async def _run_locked(self, conn: Any, now: datetime, report: RetentionReport) -> None:
        kind = await conn.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = to_regclass('readings')", timeout=self._timeout_s
        )
        if kind is None:
            raise ServiceError("table 'readings' does not exist: run the migrations first")
        timescale = kind != "p"
        members = await self._members(conn)
        longest = _longest(c.raw_days for c in self._classes.values())
        if timescale:
            await self._raw_timescale(conn, now, longest, members, report)
        else:
            await self._raw_plain(conn, now, longest, members, report)
        for table in ROLLUP_TABLES:
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table, timeout=self._timeout_s):
                report.deleted_rollup_rows[table] = await self._rollup(conn, table, now, members, timescale)

    async def _members(self, conn: Any) -> dict[str, list[int]]:
        """Return the point keys of each class (unknown class names count as ``default``)."""
        members: dict[str, list[int]] = {name: [] for name in self._classes}
        for row in await conn.fetch("SELECT id, retention FROM points", timeout=self._timeout_s):
            name = row["retention"] if row["retention"] in self._classes else "default"
            members[name].append(row["id"])
        return members

    async def _raw_plain(
        self,
        conn: Any,
        now: datetime,
        longest: int | None,
        members: Mapping[str, list[int]],
        report: RetentionReport,
    ) -> None:
        partitions = await self._partitions(conn)
        if longest is not None:
            cutoff = now - timedelta(days=longest)
            for day, name in sorted(partitions.items()):
                if _day_start(day) + timedelta(days=1) <= cutoff:
                    await self._drop_partition(conn, name)
                    report.dropped_partitions.append(name)
                    del partitions[day]
        for name, cls in self._classes.items():
            if cls.raw_days is None or cls.raw_days == longest or not members[name]:
                continue
            cutoff = now - timedelta(days=cls.raw_days)
            for day, partition in sorted(partitions.items()):
                if _day_start(day) >= cutoff:
                    break
                report.deleted_raw_rows += await self._delete_batched(
                    conn, partition, "ts", members[name], cutoff
                )

    async def _raw_timescale(
        self,
        conn: Any,
        now: datetime,
        longest: int | None,
        members: Mapping[str, list[int]],
        report: RetentionReport,
    ) -> None:
        if longest is not None:
            # https://www.tigerdata.com/docs/api/latest/hypertable/drop_chunks/ (a continuous aggregate too)
            dropped = await conn.fetch(
                "SELECT drop_chunks('readings', older_than => $1::timestamptz) AS chunk",
                now - timedelta(days=longest),
                timeout=self._timeout_s,
            )
            report.dropped_partitions.extend(str(row["chunk"]) for row in dropped)
        for name, cls in self._classes.items():
            if cls.raw_days is None or cls.raw_days == longest or not members[name]:
                continue
            cutoff = now - timedelta(days=cls.raw_days)
            chunks = await conn.fetch(
                """SELECT range_start, range_end FROM timescaledb_information.chunks
                   WHERE hypertable_name = 'readings' AND range_start < $1 ORDER BY range_start""",
                cutoff,
                timeout=self._timeout_s,
            )
            for chunk in chunks:  # one chunk per statement: bounded work, chunk exclusion applies
                status = await conn.execute(
                    """DELETE FROM readings WHERE point = ANY($1::int[])
                       AND ts >= $2 AND ts < least($3::timestamptz, $4::timestamptz)""",
                    members[name],
                    chunk["range_start"],
                    chunk["range_end"],
                    cutoff,
                    timeout=self._timeout_s,
                )
                report.deleted_raw_rows += _count(status)

    async def _rollup(
        self, conn: Any, table: str, now: datetime, members: Mapping[str, list[int]], timescale: bool
    ) -> int:
        longest = _longest(c.rollup_days(table) for c in self._classes.values())
        deleted = 0
        if longest is not None:
            cutoff = now - timedelta(days=longest)
            if timescale:
                await conn.execute(
                    "SELECT drop_chunks($1::text::regclass, older_than => $2::timestamptz)",
                    table,
                    cutoff,
                    timeout=self._timeout_s,
                )
            else:  # by point, so each batch walks the (point, bucket) index instead of the heap
                everyone = [key for keys in members.values() for key in keys]
                deleted += await self._delete_batched(conn, table, "bucket", everyone, cutoff)
        for name, cls in self._classes.items():
            days = cls.rollup_days(table)
            if days is None or days == longest or not members[name]:
                continue
            if timescale:
                if not self._warned_timescale_classes:
                    _LOGGER.warning(
                        "retention: continuous aggregates take no DELETE; rollup periods shorter than "
                        "the longest class's are not applied on TimescaleDB"
                    )
                    self._warned_timescale_classes = True
                continue
            deleted += await self._delete_batched(
                conn, table, "bucket", members[name], now - timedelta(days=days)
            )
        return deleted

    async def _delete_batched(
        self, conn: Any, table: str, column: str, points: list[int], cutoff: datetime
    ) -> int:
        """Delete rows of ``points`` with ``column < cutoff`` from one plain table, in batches."""
        if not points:
            return 0
        # ctid identifies a row within one table: fine for a partition or a plain rollup table.
        sql = (
            f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("  # noqa: S608 -- names from code, never input
            f"SELECT ctid FROM {table} WHERE point = ANY($3::int[]) AND {column} < $1 LIMIT $2))"
        )
        total = 0
        while True:
            status = await conn.execute(sql, cutoff, self._batch_rows, points, timeout=self._timeout_s)
            count = _count(status)
            total += count
            if count < self._batch_rows:
                return total

    async def _partitions(self, conn: Any) -> dict[date, str]:
        rows = await conn.fetch(
            """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               WHERE i.inhparent = 'readings'::regclass""",
            timeout=self._timeout_s,
        )
        partitions: dict[date, str] = {}
        for row in rows:
            match = _PARTITION_RE.match(row["relname"])
            if match is not None:
                digits = match.group(1)
                partitions[date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))] = row["relname"]
        return partitions

    async def _drop_partition(self, conn: Any, name: str) -> None:
        # DROP TABLE of a partition locks the parent briefly; don't queue behind a long reader.
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{int(self._timeout_s * 1000)}ms'")
            await conn.execute(f"DROP TABLE IF EXISTS {name}", timeout=self._timeout_s)
        _LOGGER.info("retention: dropped partition %s", name)


def _longest(days: Iterable[int | None]) -> int | None:
    """Return the longest period, None if any is for ever.

    >>> _longest([30, 7, 90]), _longest([30, None])
    (90, None)
    """
    longest = 0
    for d in days:
        if d is None:
            return None
        longest = max(longest, d)
    return longest


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _count(status: str) -> int:
    """Return the row count of a command status.

    >>> _count("DELETE 42")
    42
    """
    return int(status.rsplit(" ", 1)[-1])
