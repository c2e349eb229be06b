"""The retention job over the real local PostgreSQL: exactly what goes, exactly what stays."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest
from _streams_helpers import reading
from test_store_query import ROLLUP_DDL, load

from scada.catalog import sync_catalog
from scada.config import parse_site
from scada.db import create_pool, migrate
from scada.model import Quality
from scada.runtime import FakeClock
from streams.retention import RetentionClass, RetentionJob
from streams.store import backfill_rollups

NOW = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)
DAYS = 40  # one reading per point at 12:00 UTC of each of the 40 days before NOW's day
CLASSES = {
    "default": RetentionClass(raw_days=30, rollup_1m_days=20, rollup_15m_days=35, rollup_1h_days=None),
    "short": RetentionClass(raw_days=7, rollup_1m_days=3, rollup_15m_days=10, rollup_1h_days=38),
}


@pytest.fixture
async def aged(pg_url: str) -> asyncpg.Pool:
    pool = await create_pool(pg_url, timeout_s=5, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
        await conn.execute(ROLLUP_DDL)
        await conn.execute("INSERT INTO nodes (id, name, level) VALUES ('g', 'G', 'group')")
        await conn.execute(
            "INSERT INTO devices (id, node_id, name, kind, protocol) VALUES ('m', 'g', 'm', 'x', 'y')"
        )
        for key, cls in [("keep", "default"), ("brief", "short"), ("orphan", "gone")]:
            await conn.execute(
                "INSERT INTO points (point_id, device_id, key, name, kind, unit, retention)"
                " VALUES ($1, 'm', $2, $2, 'power', 'kW', $3)",
                f"m.{key}",
                key,
                cls,
            )
    readings = []
    for d in range(1, DAYS + 1):
        day = NOW.date() - timedelta(days=d)
        ts = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
        for key in ("keep", "brief", "orphan"):
            readings += [reading(f"m.{key}", ts + timedelta(minutes=m), 1.0) for m in range(5)]
        readings.append(reading("m.keep", ts + timedelta(hours=1), None, Quality.bad("offline")))
    await load(pool, readings)
    async with pool.acquire() as conn:
        await backfill_rollups(conn, NOW - timedelta(days=DAYS + 1), NOW)
    yield pool
    await pool.close()


async def _partitions(conn: asyncpg.Connection) -> set[date]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'readings'::regclass"
    )
    return {datetime.strptime(r["relname"][-8:], "%Y%m%d").replace(tzinfo=UTC).date() for r in rows}


async def _oldest(conn: asyncpg.Connection, table: str, column: str) -> dict[str, date]:
    rows = await conn.fetch(
        f"SELECT p.key, min({column}) AS t FROM {table} r JOIN points p ON p.id = r.point GROUP BY p.key"
    )
    return {r["key"]: r["t"].astimezone(UTC).date() for r in rows}


def _day(days_ago: int) -> date:
    return NOW.date() - timedelta(days=days_ago)


async def test_retention_drops_and_deletes_exactly_what_is_due(aged: asyncpg.Pool) -> None:
    job = RetentionJob(aged, CLASSES, batch_rows=3, clock=FakeClock(NOW))
    report = await job.run()

    # Raw: partitions ending at or before NOW - 30 days go; the day NOW - 30 d straddles the cutoff.
    async with aged.acquire() as conn:
        days = await _partitions(conn)
        assert min(days) == _day(30)
        assert sorted(report.dropped_partitions) == [f"readings_p{_day(d):%Y%m%d}" for d in range(40, 30, -1)]
        oldest = await _oldest(conn, "readings", "ts")
        # 'short' keeps 7 days: rows of day -7 (12:00) are after NOW - 7 d (06:00), so they stay.
        assert oldest == {"keep": _day(30), "orphan": _day(30), "brief": _day(7)}
        # Of the 30 partitions left, 'brief' lost 5 rows in each of the 23 days older than 7 days.
        assert report.deleted_raw_rows == 23 * 5
        assert await conn.fetchval("SELECT count(*) FROM readings WHERE quality = 0") == 30  # days -30..-1

        # Rollups likewise: each day's buckets lie at 12:00, after the 06:00 cutoffs of their day.
        assert await _oldest(conn, "readings_1m", "bucket") == {
            "keep": _day(20),
            "orphan": _day(20),
            "brief": _day(3),
        }
        assert await _oldest(conn, "readings_15m", "bucket") == {
            "keep": _day(35),
            "orphan": _day(35),
            "brief": _day(10),
        }
        # 1h: default keeps for ever; 'short' 38 days.
        assert await _oldest(conn, "readings_1h", "bucket") == {
            "keep": _day(40),
            "orphan": _day(40),
            "brief": _day(38),
        }

    # A second run finds nothing left to do.
    again = await job.run()
    assert again.dropped_partitions == []
    assert again.deleted_raw_rows == 0
    assert not any(again.deleted_rollup_rows.values())


async def test_a_class_keeping_raw_for_ever_keeps_every_partition(aged: asyncpg.Pool) -> None:
    classes = {**CLASSES, "forever": RetentionClass(raw_days=None)}
    report = await RetentionJob(aged, classes, clock=FakeClock(NOW)).run()
    assert report.dropped_partitions == []
    async with aged.acquire() as conn:
        assert len(await _partitions(conn)) == DAYS
        oldest = await _oldest(conn, "readings", "ts")
    assert oldest == {"keep": _day(30), "orphan": _day(30), "brief": _day(7)}  # deletes still apply


async def test_classes_must_include_default(aged: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="default"):
        RetentionJob(aged, {"short": CLASSES["short"]})


SITE = """
site: {id: s, name: S}
hierarchy: [{id: g, name: G, level: group}]
retention:
  audit: {raw_days: 365, rollup_1m_days: null}
devices:
  - id: m1
    node: g
    kind: power_meter
    protocol: modbus_tcp
    modbus: {host: 127.0.0.1}
    points:
      - {key: p, kind: power, unit: kW, modbus: {address: 0, type: float32}}
      - {key: e, kind: energy_counter, unit: kWh, carrier: electricity, scale: 0.01, retention: audit,
         modbus: {address: 2, type: uint32}}
      - {key: f, kind: energy_counter, unit: kWh, carrier: electricity, modbus: {address: 4, type: float32}}
"""


async def test_catalog_sync_stores_class_and_counter_range(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate(conn)
        await sync_catalog(conn, parse_site(SITE))
        rows = {
            r["key"]: (r["retention"], r["counter_wrap"]) for r in await conn.fetch("SELECT * FROM points")
        }
    finally:
        await conn.close()
    assert rows == {
        "p": ("default", None),
        "e": ("audit", pytest.approx(2**32 * 0.01)),
        "f": ("default", None),
    }


async def test_the_app_builds_the_job_from_the_site_file(pg_url: str) -> None:
    """scada.app turns the site's classes into the job's: 'audit' keeps raw rows 365 days."""
    from scada.app import _retention_job  # noqa: PLC0415 -- the composition root's private wiring

    pool = await create_pool(pg_url, timeout_s=5, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            site = parse_site(SITE)
            await sync_catalog(conn, site)
            ids = {r["key"]: r["id"] for r in await conn.fetch("SELECT id, key FROM points")}
            for day in (40, 100, 400):
                ts = NOW - timedelta(days=day)
                await conn.execute(
                    f"CREATE TABLE readings_p{ts:%Y%m%d} PARTITION OF readings FOR VALUES FROM "
                    f"('{ts.date().isoformat()}') TO ('{(ts.date() + timedelta(days=1)).isoformat()}')"
                )
                await conn.executemany(
                    "INSERT INTO readings (point, ts, value, quality) VALUES ($1, $2, 1.0, 2)",
                    [(ids["p"], ts), (ids["e"], ts)],
                )
        report = await _retention_job(pool, site, FakeClock(NOW)).run()
        async with pool.acquire() as conn:
            left = await conn.fetch(
                "SELECT p.key, r.ts FROM readings r JOIN points p ON p.id = r.point ORDER BY 1, 2"
            )
    finally:
        await pool.close()
    assert report.dropped_partitions == [f"readings_p{NOW - timedelta(days=400):%Y%m%d}"]
    assert [(r["key"], (NOW - r["ts"]).days) for r in left] == [("e", 100), ("e", 40)]
