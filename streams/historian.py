"""The historian stage: write reading batches to PostgreSQL (plain partitions or TimescaleDB).

``handle`` is idempotent, so the consumer can redeliver a batch at will: rows are COPYed (binary
format) into a per-connection temporary staging table and moved with ``INSERT ... ON CONFLICT DO
NOTHING`` in one transaction, on the ``(point, ts)`` primary key.

Rollups
-------
On plain PostgreSQL the same statement maintains ``readings_1m``, ``readings_15m`` and
``readings_1h`` (count, sum, min, max, first and last of the good-quality values per point and
bucket, buckets from ``date_bin(width, ts, '2000-01-01')``) in the same transaction: the move
``RETURNING`` the rows it actually inserted keeps their good ones in a temporary table, which feeds
three ``INSERT ... GROUP BY ... ON CONFLICT DO UPDATE`` merges. A redelivered batch inserts nothing
and so changes no rollup; a late reading merges into its bucket. On TimescaleDB the rollups are continuous
aggregates with the same columns and the stage only writes ``readings``. Which one applies is read
once from the catalog: ``readings`` partitioned (plain) or not (hypertable), ``readings_1m`` a table
(ours to maintain) or a view (a continuous aggregate).

Hot path
--------
:meth:`HistorianStage.handle` takes any ``Sequence[Reading]``; given a
:class:`streams.codec.ReadingRows` (what ``run_consumer(decode=decode_reading_rows)`` hands over)
it packs the wire rows straight into the binary COPY stream, one ``struct`` call per row, without
building a ``Reading`` or a ``datetime``.

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
import struct
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import asyncpg

from scada.model import Clock, Reading, ServiceError
from scada.runtime import SystemClock
from streams.bus import RejectedReadings
from streams.codec import ReadingRows, WireRow, reading_from_row, row_from_reading

__all__ = ["PARTITION_LOCK_KEY", "ROLLUP_TABLES", "HistorianStage", "partition_name"]

_LOGGER = logging.getLogger(__name__)

PARTITION_LOCK_KEY: Final = 0x5CADA_0002
"""Advisory lock key held (per transaction) while creating a readings partition."""

ROLLUP_TABLES: Final = {"readings_1m": "1 minute", "readings_15m": "15 minutes", "readings_1h": "1 hour"}
"""Rollup tables (plain PostgreSQL) or continuous aggregates (TimescaleDB) and their bucket widths."""

_COLUMNS: Final = ("point", "ts", "value", "quality", "reason")
_STAGING: Final = "readings_staging"
_CREATE_STAGING: Final = """
CREATE TEMP TABLE IF NOT EXISTS readings_staging (
    point integer, ts timestamptz, value double precision, quality smallint, reason text
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS readings_fresh (
    point integer, ts timestamptz, value double precision
) ON COMMIT DELETE ROWS"""
"""Per-connection scratch tables: the batch as COPYed, and its good rows that were really new."""
_INSERT_STAGED: Final = """
INSERT INTO readings (point, ts, value, quality, reason)
SELECT point, ts, value, quality, reason FROM readings_staging
ON CONFLICT (point, ts) DO NOTHING"""
_ORIGIN: Final = "timestamptz '2000-01-01 00:00:00+00'"
_GOOD_CODE: Final = 2  # QualityCode.GOOD

_INSERT_STAGED_KEEPING_FRESH: Final = f"""
WITH inserted AS ({_INSERT_STAGED} RETURNING point, ts, value, quality),
fresh AS (
    INSERT INTO readings_fresh (point, ts, value)
    SELECT point, ts, value FROM inserted WHERE quality = {_GOOD_CODE} AND value IS NOT NULL
)
SELECT count(*) FROM inserted"""  # noqa: S608 -- constants only
"""Move staged rows; keep the good ones actually inserted (not the duplicates) for the rollups."""


def _merge(table: str, width: str, source: str) -> str:
    """Merge the good rows of ``source`` into one rollup table, per (point, bucket of ``width``).

    Sums and counts add up, extremes combine, and first/last go by timestamp. In the delta,
    ``min(ARRAY[epoch, value])`` picks the value at the earliest timestamp (the epoch as a double is
    exact to the microsecond until the year 2255, and unique per point): much cheaper than an
    ordered aggregate per group. Rows are merged in key order, and the tables one after the other,
    so concurrent historians lock shared rollup rows in the same order and wait instead of
    deadlocking.
    """
    return f"""
INSERT INTO {table} AS r (point, bucket, count, sum, min, max, first_ts, first, last_ts, last)
SELECT point, date_bin('{width}', ts, {_ORIGIN}) AS bucket, count(*)::integer, sum(value),
       min(value), max(value),
       min(ts), (min(ARRAY[date_part('epoch', ts), value]))[2],
       max(ts), (max(ARRAY[date_part('epoch', ts), value]))[2]
FROM {source} GROUP BY 1, 2 ORDER BY 1, 2
ON CONFLICT (point, bucket) DO UPDATE SET
    count = r.count + EXCLUDED.count,
    sum = r.sum + EXCLUDED.sum,
    min = least(r.min, EXCLUDED.min),
    max = greatest(r.max, EXCLUDED.max),
    first_ts = least(r.first_ts, EXCLUDED.first_ts),
    first = CASE WHEN EXCLUDED.first_ts < r.first_ts THEN EXCLUDED.first ELSE r.first END,
    last_ts = greatest(r.last_ts, EXCLUDED.last_ts),
    last = CASE WHEN EXCLUDED.last_ts > r.last_ts THEN EXCLUDED.last ELSE r.last END"""  # noqa: S608


def _merges(source: str) -> str:
    """Return the three merges as one round trip (simple query protocol: in order, one transaction)."""
    return ";".join(_merge(table, width, source) for table, width in ROLLUP_TABLES.items())


_MERGE_FROM_STAGING: Final = _merges(f"readings_staging WHERE quality = {_GOOD_CODE} AND value IS NOT NULL")
"""Rollups of a batch COPYed whole into readings: every staged row is new."""
_MERGE_FROM_FRESH: Final = _merges("readings_fresh")
"""Rollups of a batch moved with ON CONFLICT DO NOTHING: only the rows it inserted."""

_MAX_UNKNOWN_LISTED: Final = 10
_LAYOUT: Final = """
SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('readings')) AS readings,
       (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('readings_1m')) AS rollup"""

# Binary COPY (https://www.postgresql.org/docs/15/sql-copy.html#id-1.9.3.55.9.4): a header, per row
# the field count and each field as (length, big-endian bytes) with length -1 for NULL, a trailer.
_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER: Final = struct.pack(">h", -1)
_PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01 in Unix microseconds: PostgreSQL's epoch
_DAY_US: Final = 86_400_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ROW_PLAIN: Final = struct.Struct(">hiiiqidihi")  # value, no reason: the common row
_ROW_HEAD: Final = struct.Struct(">hiiiq")  # field count, point, ts; then value, quality, reason
_NULL: Final = struct.pack(">i", -1)
_FLOAT8: Final = struct.Struct(">id")
_INT2: Final = struct.Struct(">ih")


def partition_name(day: date) -> str:
    """Return the name of the readings partition holding ``day`` (UTC).

    >>> partition_name(date(2026, 1, 5))
    'readings_p20260105'
    """
    return f"readings_p{day:%Y%m%d}"


class HistorianStage:
    """Store reading batches and, on plain PostgreSQL, their rollups; a redelivered batch changes nothing.

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
    inserted_total
        Rows actually inserted (duplicates excluded).
    conflict_batches_total
        Batches that held rows stored already (redeliveries), written the slower, skipping way.
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
        self._days: set[int] = set()  # partitions known to exist, as days since the Unix epoch
        self._partitioned: bool | None = None  # None until the catalog is read (_layout)
        self._rollups = False  # whether this stage maintains the rollup tables
        self.written_total = 0
        self.inserted_total = 0
        self.conflict_batches_total = 0
        self.rejected_total = 0

    @property
    def maintains_rollups(self) -> bool | None:
        """Whether the stage merges rollups (plain PostgreSQL); None until the first write."""
        return None if self._partitioned is None else self._rollups

    def invalidate(self) -> None:
        """Forget cached point ids and partitions (after the catalog or retention changed them)."""
        self._ids.clear()
        self._days.clear()

    async def handle(self, readings: Sequence[Reading]) -> None:
        """Write a batch; raise :class:`RejectedReadings` for readings it can never store."""
        if not readings:
            return
        if isinstance(readings, ReadingRows):
            rows: Sequence[WireRow] = readings.rows
            originals: Sequence[Reading] | None = None
        else:
            rows, originals = [row_from_reading(r) for r in readings], readings
        horizon_us = (
            _MAX_US
            if self._max_future is None
            else (self._clock.now() + self._max_future - _EPOCH) // timedelta(microseconds=1)
        )
        try:
            async with self._pool.acquire(timeout=self._timeout_s) as conn:
                await self._resolve(conn, {row[0] for row in rows})
                data, days, count, unknown, future = self._pack(rows, horizon_us)
                if count:
                    await self._write(conn, data, days, count)
                    self.written_total += count
        except asyncpg.ReadOnlySQLTransactionError:
            # A session opened while the database was read-only (a fail-over, a disk-full guard)
            # stays read-only after the database is writable again: the retry gets fresh sessions.
            await self._pool.expire_connections()
            raise
        if unknown or future:
            self.rejected_total += len(unknown) + len(future)

            def pick(indexes: list[int]) -> list[Reading]:
                if originals is not None:
                    return [originals[i] for i in indexes]
                return [reading_from_row(rows[i]) for i in indexes]

            unknown_readings, future_readings = pick(unknown), pick(future)
            raise RejectedReadings(
                _reject_reason(unknown_readings, future_readings, self._max_future),
                [*unknown_readings, *future_readings],
            )

    async def ensure_partitions_ahead(self, days: int = 7) -> list[str]:
        """Create the partitions of today and the next ``days`` UTC days; return those created."""
        today = (self._clock.now() - _EPOCH).days
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            return await self._ensure_days(conn, {today + n for n in range(days + 1)})

    # ----------------------------------------------------------------------------------------------

    def _pack(
        self, rows: Sequence[WireRow], horizon_us: int
    ) -> tuple[bytes, set[int], int, list[int], list[int]]:
        """Encode storable rows as one binary COPY payload; return it, their days and the refused."""
        ids = self._ids
        parts = [_COPY_HEADER]
        append = parts.append
        plain = _ROW_PLAIN.pack
        days: set[int] = set()
        add_day = days.add
        unknown: list[int] = []
        future: list[int] = []
        for index, (point, ts_us, value, code, reason) in enumerate(rows):
            key = ids.get(point)
            if key is None:
                unknown.append(index)
                continue
            if ts_us > horizon_us:
                future.append(index)
                continue
            add_day(ts_us // _DAY_US)
            if value is not None and reason is None:
                append(plain(5, 4, key, 8, ts_us - _PG_EPOCH_US, 8, value, 2, code, -1))
            else:
                append(_pack_row(key, ts_us, value, code, reason))
        count = len(parts) - 1
        append(_COPY_TRAILER)
        return b"".join(parts), days, count, unknown, future

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

    async def _write(self, conn: Any, data: bytes, days: set[int], count: int) -> None:
        await self._ensure_days(conn, days)
        try:
            await self._copy_and_move(conn, data, count)
        except asyncpg.CheckViolationError as err:
            if "no partition" not in str(err):
                raise
            # A partition we cached was dropped (retention) or made elsewhere: look again, once.
            self._days.clear()
            await self._ensure_days(conn, days)
            await self._copy_and_move(conn, data, count)

    async def _copy_and_move(self, conn: Any, data: bytes, count: int) -> None:
        """Store a batch in one transaction: COPY it straight in, or skip what is stored already.

        The fast path COPYs into ``readings`` (inside a savepoint): a fresh batch, the normal case,
        never pays for ``ON CONFLICT`` (about twice the server's CPU per row). If any row is stored
        already (a redelivery, a duplicate in the batch, another historian's overlapping batch), the
        COPY fails on the primary key, the savepoint is rolled back and the batch goes through
        the staging table and ``INSERT ... ON CONFLICT DO NOTHING`` instead.
        """
        source = memoryview(data)
        timeout = self._timeout_s
        async with conn.transaction():
            await conn.execute(_CREATE_STAGING, timeout=timeout)
            try:
                async with conn.transaction():  # a savepoint
                    await conn.copy_to_table(
                        "readings", source=source, columns=_COLUMNS, format="binary", timeout=timeout
                    )
            except asyncpg.UniqueViolationError:
                self.conflict_batches_total += 1
                await conn.copy_to_table(
                    _STAGING, source=source, columns=_COLUMNS, format="binary", timeout=timeout
                )
                if self._rollups:
                    inserted = await conn.fetchval(_INSERT_STAGED_KEEPING_FRESH, timeout=timeout)
                    if inserted:
                        await conn.execute(_MERGE_FROM_FRESH, timeout=timeout)
                else:
                    status = await conn.execute(_INSERT_STAGED, timeout=timeout)
                    inserted = int(status.rsplit(" ", 1)[-1])
            else:
                inserted = count
                if self._rollups:
                    await conn.copy_to_table(
                        _STAGING, source=source, columns=_COLUMNS, format="binary", timeout=timeout
                    )
                    await conn.execute(_MERGE_FROM_STAGING, timeout=timeout)
        self.inserted_total += inserted

    async def _ensure_days(self, conn: Any, days: set[int]) -> list[str]:
        await self._layout(conn)
        missing = days - self._days
        if not missing or not self._partitioned:
            return []
        created = [
            name
            for day in sorted(missing)
            if (name := await self._create_partition(conn, (_EPOCH + timedelta(days=day)).date()))
        ]
        self._days |= missing
        return created

    async def _layout(self, conn: Any) -> None:
        """Read once which engine the schema was migrated for: partitions and rollups, or neither."""
        if self._partitioned is not None:
            return
        row = await conn.fetchrow(_LAYOUT, timeout=self._timeout_s)
        if row["readings"] is None or row["rollup"] is None:
            raise ServiceError("tables 'readings' / 'readings_1m' do not exist: run the migrations first")
        # Plain PostgreSQL: a partitioned table and rollup tables ('p', 'r'). TimescaleDB: a
        # hypertable (an ordinary table to the catalog, chunks made for us) and continuous
        # aggregates (views, refreshed by their policies).
        self._rollups = row["rollup"] == "r"
        self._partitioned = row["readings"] == "p"
        _LOGGER.info(
            "historian: readings %s; rollups %s",
            "partitioned by day" if self._partitioned else "a hypertable",
            "merged by the historian" if self._rollups else "continuous aggregates",
        )

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


_MAX_US: Final = 1 << 62


def _pack_row(key: int, ts_us: int, value: float | None, code: int, reason: str | None) -> bytes:
    """Encode one row with a NULL value or a reason (the uncommon case)."""
    value_field = _NULL if value is None else _FLOAT8.pack(8, value)
    if reason is None:
        reason_field = _NULL
    else:
        text = reason.encode()
        reason_field = struct.pack(">i", len(text)) + text
    return (
        _ROW_HEAD.pack(5, 4, key, 8, ts_us - _PG_EPOCH_US) + value_field + _INT2.pack(2, code) + reason_field
    )


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
