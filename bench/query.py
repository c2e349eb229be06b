"""History and roll-up queries over a year of data: p95 latency of the chart and energy queries.

Loads a scratch database (created and dropped by the bench) with a site of ``--points`` points
(half power points, half energy counters: ``--points / 2`` meters under ``--parks`` parks, each with
two enterprises of two workshops) and ``--days`` of data, then measures, through
:class:`streams.store.PostgresReadingStore` (the code path of the REST handlers without HTTP):

- ``history_p95_ms``: one power point over the whole span downsampled to 1,000 points with LTTB
  (target < 50 ms for a year); ``history_minmax_p95_ms`` the same with min/max buckets;
- ``rollup_p95_ms``: the energy roll-up of one park over 30 days in 1-hour intervals (all its counters,
  wraps and resets included; target < 200 ms); ``rollup_1d_p95_ms`` the same in days of the site's zone;
- ``week_history_p95_ms``: one point with raw data over 7 days downsampled to 1,000 points (read from
  the 1-minute rollup);
- references measured in the same run: ``select1_p95_ms`` (a ``SELECT 1`` round trip through the
  pool) and ``lookup_p95_ms`` (one rollup row by primary key).

What is generated, and why. A year of 1-minute data for 1,000 points is 525 million raw rows: days to
load on this machine and ~50 GB. The queries under test read the rollups (a year / N=1,000 and a
month of hourly energy both read ``readings_1h``), so the bench writes:

1. ``readings_1h`` for every point and hour of the span, directly with ``INSERT ... SELECT`` from
   ``generate_series`` (synthetic daily load shapes; counters rise at a per-point rate, one in ten
   starts near its uint32 range and wraps, one in ten is reset on day 200): 8.76 M rows for the default
   size;
2. raw 1-minute readings for ``--raw-points`` power points over the whole span (with a 2-hour
   bad-quality outage every week), and their ``readings_1m`` / ``readings_15m`` / ``readings_1h`` rows
   built from them with :func:`streams.store.backfill_rollups` (``INSERT ... SELECT ... GROUP BY
   point, date_bin(...)`` over the good values, the aggregates the historian merges on ingest).

``readings_1m`` and ``readings_15m`` therefore exist only for the raw points; no query measured here
reads them for the others.

Usage: ``.venv/bin/python bench/query.py [--points 1000] [--days 365] [--raw-points 4] [--samples 60]``
(``--points 100 --days 60`` runs in seconds). Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scada.db import create_pool, migrate
from scada.model import PointId
from streams.query import DownsampleMode
from streams.store import PostgresReadingStore, backfill_rollups

ADMIN_DB_URL = os.environ.get("SCADA_BENCH_DB_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
WRAP_KWH = 2**32 * 0.01  # uint32 register, scale 0.01 kWh


def db_url(name: str) -> str:
    base, _, _ = ADMIN_DB_URL.rpartition("/")
    return f"{base}/{name}"


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DB_URL, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def build_site(conn: asyncpg.Connection, points: int, parks: int) -> None:
    await conn.execute("INSERT INTO nodes (id, name, level) VALUES ('grp', 'Group', 'group')")
    workshops = []
    for p in range(parks):
        await conn.execute(
            "INSERT INTO nodes (id, name, level, parent) VALUES ($1, $1, 'park', 'grp')", f"park-{p}"
        )
        for e in range(2):
            ent = f"ent-{p}-{e}"
            await conn.execute(
                "INSERT INTO nodes (id, name, level, parent) VALUES ($1, $1, 'enterprise', $2)",
                ent,
                f"park-{p}",
            )
            for w in range(2):
                ws = f"ws-{p}-{e}-{w}"
                await conn.execute(
                    "INSERT INTO nodes (id, name, level, parent) VALUES ($1, $1, 'workshop', $2)", ws, ent
                )
                workshops.append(ws)
    meters = points // 2
    await conn.executemany(
        "INSERT INTO devices (id, node_id, name, kind, protocol)"
        " VALUES ($1, $2, $1, 'power_meter', 'modbus_tcp')",
        [(f"m{i:05d}", workshops[i % len(workshops)]) for i in range(meters)],
    )
    rows = []
    for i in range(meters):
        rows.append((f"m{i:05d}.power_kw", f"m{i:05d}", "power_kw", "power", "kW", None))
        rows.append((f"m{i:05d}.energy_kwh", f"m{i:05d}", "energy_kwh", "energy_counter", "kWh", WRAP_KWH))
    await conn.executemany(
        """INSERT INTO points (point_id, device_id, key, name, kind, unit, carrier, counter_wrap)
           VALUES ($1, $2, $3, $3, $4, $5, 'electricity', $6)""",
        rows,
    )


# Synthetic hourly rollups: power follows a daily sine around a per-point level; a counter rises at a
# per-point rate, wraps at WRAP_KWH (one in ten starts 100 days short of it), is reset on day 200
# (one in ten).
_POWER_1H = """
INSERT INTO readings_1h (point, bucket, count, sum, min, max, first_ts, first, last_ts, last)
SELECT p.id, b, 60, 60 * v, 0.8 * v, 1.2 * v, b, 0.9 * v, b + interval '59 minutes', 1.1 * v
FROM points p
CROSS JOIN generate_series($1::timestamptz, $2::timestamptz - interval '1 hour', interval '1 hour') AS b
CROSS JOIN LATERAL (SELECT 50 + (p.id % 17) + 30 * sin(extract(epoch FROM b) / 86400 * 2 * pi()) AS v) x
WHERE p.kind = 'power' AND p.id = ANY($3::int[])"""

_COUNTER_1H = """
INSERT INTO readings_1h (point, bucket, count, sum, min, max, first_ts, first, last_ts, last)
SELECT p.id, b, 60, 60 * v0, v0, v1, b, v0, b + interval '59 minutes', v1
FROM points p
CROSS JOIN generate_series($1::timestamptz, $2::timestamptz - interval '1 hour', interval '1 hour') AS b
CROSS JOIN LATERAL (SELECT extract(epoch FROM b - $1::timestamptz) / 3600 AS h, 10 + p.id % 50 AS rate) k
CROSS JOIN LATERAL (SELECT CASE WHEN p.id % 10 = 0 THEN $4::float8 - 2400 * k.rate ELSE 1000 END AS base) s
CROSS JOIN LATERAL (
    SELECT CASE WHEN p.id % 10 = 5 AND k.h >= 4800 THEN k.rate * (k.h - 4800)
                ELSE s.base + k.rate * k.h END AS c0,
           CASE WHEN p.id % 10 = 5 AND k.h >= 4800 THEN k.rate * (k.h - 4800 + 59.0 / 60)
                ELSE s.base + k.rate * (k.h + 59.0 / 60) END AS c1) c
CROSS JOIN LATERAL (
    SELECT c.c0 - $4::float8 * floor(c.c0 / $4::float8) AS v0,
           c.c1 - $4::float8 * floor(c.c1 / $4::float8) AS v1) w
WHERE p.kind = 'energy_counter' AND p.id = ANY($3::int[])"""

_RAW = """
INSERT INTO readings (point, ts, value, quality, reason)
SELECT $1::int, ts,
       CASE WHEN outage THEN NULL ELSE 50 + 30 * sin(extract(epoch FROM ts) / 86400 * 2 * pi())
                                       + 5 * random() END,
       CASE WHEN outage THEN 0 ELSE 2 END,
       CASE WHEN outage THEN 'device offline: timeout' END
FROM generate_series($2::timestamptz, $3::timestamptz - interval '1 minute', interval '1 minute') AS ts
CROSS JOIN LATERAL (SELECT extract(epoch FROM ts - $2::timestamptz) % (7 * 86400) < 7200 AS outage) o"""


async def load(url: str, args: argparse.Namespace, start: datetime, end: datetime) -> dict[str, Any]:
    t0 = time.perf_counter()
    pool = await create_pool(url, timeout_s=3600, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            await build_site(conn, args.points, args.parks)
            ids = await conn.fetch("SELECT id, kind FROM points ORDER BY id")
            power = [r["id"] for r in ids if r["kind"] == "power"]
            raw_points = power[: args.raw_points]
            day = start
            while day < end:  # daily partitions, as the historian makes them
                nxt = day + timedelta(days=1)
                await conn.execute(
                    f"CREATE TABLE readings_p{day:%Y%m%d} PARTITION OF readings "
                    f"FOR VALUES FROM ('{day.isoformat()}') TO ('{nxt.isoformat()}')"
                )
                day = nxt
        synthetic = [r["id"] for r in ids if r["id"] not in set(raw_points)]
        chunks = [synthetic[i : i + 50] for i in range(0, len(synthetic), 50)]

        async def fill(chunk: list[int]) -> None:
            async with pool.acquire() as conn:
                await conn.execute(_POWER_1H, start, end, chunk, timeout=3600)
                await conn.execute(_COUNTER_1H, start, end, chunk, WRAP_KWH, timeout=3600)

        await gather_limited([fill(c) for c in chunks], limit=2)
        t_rollups = time.perf_counter()

        async def raw(point: int) -> None:
            async with pool.acquire() as conn:
                await conn.execute(_RAW, point, start, end, timeout=3600)

        await gather_limited([raw(p) for p in raw_points], limit=2)
        async with pool.acquire() as conn:
            month = start
            while month < end:  # a month at a time keeps each GROUP BY's memory small
                await backfill_rollups(conn, month, min(month + timedelta(days=31), end), timeout_s=3600)
                month += timedelta(days=31)
            await conn.execute("VACUUM ANALYZE", timeout=3600)
            sizes = await conn.fetchrow(
                """SELECT (SELECT count(*) FROM readings_1h) AS h1,
                          (SELECT count(*) FROM readings_1m) AS m1,
                          (SELECT count(*) FROM readings) AS raw,
                          pg_database_size(current_database()) AS bytes"""
            )
    finally:
        await pool.close()
    return {
        "rows_1h": sizes["h1"],
        "rows_1m": sizes["m1"],
        "rows_raw": sizes["raw"],
        "db_mb": round(sizes["bytes"] / 2**20),
        "load_s": round(time.perf_counter() - t0, 1),
        "synthetic_rollups_s": round(t_rollups - t0, 1),
        "raw_point_ids": raw_points,
    }


async def gather_limited(coros: list[Awaitable[None]], limit: int) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[None]) -> None:
        async with sem:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


async def timed(samples: int, make: Callable[[], Awaitable[Any]]) -> list[float]:
    await make()  # warm the pool and caches once, outside the figures
    out = []
    for _ in range(samples):
        t = time.perf_counter()
        await make()
        out.append((time.perf_counter() - t) * 1000)
    return out


def p95(values: list[float]) -> float:
    return round(statistics.quantiles(values, n=20, method="inclusive")[18], 2)


async def measure(
    url: str, args: argparse.Namespace, start: datetime, end: datetime, loaded: dict[str, Any]
) -> dict[str, Any]:
    rng = random.Random(7)
    pool = await create_pool(url, timeout_s=60, max_size=2)
    try:
        store = PostgresReadingStore(pool)
        async with pool.acquire() as conn:
            names = await conn.fetch("SELECT id, point_id, kind FROM points ORDER BY id")
        power = [PointId(r["point_id"]) for r in names if r["kind"] == "power"]
        raw_ids = {r["point_id"] for r in names if r["id"] in set(loaded["raw_point_ids"])}
        synthetic_power = [p for p in power if p not in raw_ids] or power
        raw_power = [PointId(p) for p in sorted(raw_ids)]
        parks = [f"park-{p}" for p in range(args.parks)]
        month = timedelta(days=min(30, args.days - 1))

        def history(mode: DownsampleMode) -> Callable[[], Awaitable[Any]]:
            async def run() -> Any:
                result = await store.downsampled(
                    rng.choice(synthetic_power), start, end, points=1000, mode=mode, raw_period_s=60.0
                )
                assert result.source.value == ("1h" if args.days * 24 >= 1000 else result.source.value)
                return result

            return run

        def rollup(interval: str) -> Callable[[], Awaitable[Any]]:
            async def run() -> Any:
                first = start + timedelta(days=rng.randrange(0, max(1, args.days - month.days)))
                return await store.node_energy(
                    rng.choice(parks),
                    first,
                    first + month,
                    interval=interval,
                    carrier="electricity",
                    timezone="Asia/Shanghai",
                )

            return run

        async def week() -> Any:
            first = start + timedelta(days=rng.randrange(0, max(1, args.days - 7)))
            return await store.downsampled(
                rng.choice(raw_power),
                first,
                first + timedelta(days=7),
                points=1000,
                mode=DownsampleMode.LTTB,
                raw_period_s=60.0,
            )

        async def select1() -> Any:
            async with pool.acquire() as conn:
                return await conn.fetchval("SELECT 1")

        async def lookup() -> Any:
            async with pool.acquire() as conn:
                return await conn.fetchrow(
                    "SELECT * FROM readings_1h WHERE point = $1 AND bucket = $2",
                    rng.randrange(1, args.points),
                    start + timedelta(hours=rng.randrange(0, args.days * 24)),
                )

        sample = await history(DownsampleMode.LTTB)()
        figures = {
            "history_p95_ms": p95(await timed(args.samples, history(DownsampleMode.LTTB))),
            "history_minmax_p95_ms": p95(await timed(args.samples, history(DownsampleMode.MINMAX))),
            "rollup_p95_ms": p95(await timed(args.samples, rollup("1h"))),
            "rollup_1d_p95_ms": p95(await timed(args.samples, rollup("1d"))),
            "week_history_p95_ms": p95(await timed(args.samples, week)) if raw_power else None,
            "select1_p95_ms": p95(await timed(args.samples * 4, select1)),
            "lookup_p95_ms": p95(await timed(args.samples * 4, lookup)),
            "history_source": sample.source.value,
            "history_returned": len(sample.readings),
        }
        park = await rollup("1h")()
        figures["rollup_intervals"] = len(park)
        figures["rollup_counters"] = max((r.points for r in park), default=0)
    finally:
        await pool.close()
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1000, help="points in the site (half are counters)")
    parser.add_argument("--days", type=int, default=365, help="days of data")
    parser.add_argument("--raw-points", type=int, default=4, help="power points with raw 1-minute data")
    parser.add_argument("--parks", type=int, default=4)
    parser.add_argument("--samples", type=int, default=60, help="timed queries per figure")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database (prints its URL)")
    args = parser.parse_args()
    end = datetime(2026, 1, 1, tzinfo=UTC)
    start = end - timedelta(days=args.days)
    name = f"scada_bench_query_{uuid.uuid4().hex[:8]}"
    await admin(f'CREATE DATABASE "{name}"')
    try:
        loaded = await load(db_url(name), args, start, end)
        print(
            f"loaded {loaded['rows_1h']:,} hourly rollup rows, {loaded['rows_raw']:,} raw rows "
            f"({loaded['rows_1m']:,} 1-minute rollup rows) in {loaded['load_s']} s; "
            f"database {loaded['db_mb']} MB"
        )
        figures = await measure(db_url(name), args, start, end, loaded)
    finally:
        if args.keep:
            print(f"kept {db_url(name)}")
        else:
            await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    for key, value in figures.items():
        if key.endswith("_ms") and value is not None:
            print(f"{key:24s} {value:9.2f} ms")
    result = {
        "points": args.points,
        "days": args.days,
        "raw_points": args.raw_points,
        "samples": args.samples,
        **{k: v for k, v in loaded.items() if k != "raw_point_ids"},
        **figures,
        "history_over_lookup": round(figures["history_p95_ms"] / figures["lookup_p95_ms"], 1),
        "rollup_over_lookup": round(figures["rollup_p95_ms"] / figures["lookup_p95_ms"], 1),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
