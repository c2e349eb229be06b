"""Rollups kept by the historian equal a GROUP BY over the raw table, whatever the delivery order."""

from __future__ import annotations

import math
import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from _streams_helpers import POINTS, reading

from scada.db import load_migrations
from scada.model import Quality, Reading
from streams.codec import decode_reading_rows, encode_readings
from streams.historian import ROLLUP_TABLES, HistorianStage

_ORIGIN = "timestamptz '2000-01-01 00:00:00+00'"
_COLUMNS = ("count", "sum", "min", "max", "first_ts", "first", "last_ts", "last")
# 23:40 UTC: batches span minute, quarter-hour, hour and day (partition) boundaries.
_START = datetime(2026, 1, 5, 23, 40, tzinfo=UTC)


def _random_batch(rng: random.Random, size: int) -> list[Reading]:
    """Readings within 45 min of _START: mostly good, some uncertain, some bad (with or without value)."""
    batch = []
    for _ in range(size):
        ts = _START + timedelta(milliseconds=rng.randrange(45 * 60_000))
        roll = rng.random()
        if roll < 0.75:
            batch.append(reading(rng.choice(POINTS), ts, round(rng.uniform(-100, 100), 3)))
        elif roll < 0.85:
            batch.append(reading(rng.choice(POINTS), ts, rng.uniform(0, 1), Quality.uncertain("stale")))
        else:
            value = None if rng.random() < 0.5 else 7.0
            batch.append(reading(rng.choice(POINTS), ts, value, Quality.bad("timeout")))
    return batch


async def _expected(conn: asyncpg.Connection, width: str) -> dict[tuple[int, datetime], tuple[Any, ...]]:
    rows = await conn.fetch(
        f"""SELECT point, date_bin('{width}', ts, {_ORIGIN}) AS bucket, count(*) AS count,
                   sum(value) AS sum, min(value) AS min, max(value) AS max,
                   min(ts) AS first_ts, (array_agg(value ORDER BY ts))[1] AS first,
                   max(ts) AS last_ts, (array_agg(value ORDER BY ts DESC))[1] AS last
            FROM readings WHERE quality = 2 AND value IS NOT NULL GROUP BY 1, 2"""
    )
    return {(r["point"], r["bucket"]): tuple(r[c] for c in _COLUMNS) for r in rows}


async def _rollup(conn: asyncpg.Connection, table: str) -> dict[tuple[int, datetime], tuple[Any, ...]]:
    rows = await conn.fetch(f"SELECT * FROM {table}")
    return {(r["point"], r["bucket"]): tuple(r[c] for c in _COLUMNS) for r in rows}


def _same(got: tuple[Any, ...], want: tuple[Any, ...]) -> bool:
    """Equal, with sums compared up to rounding (they were added in a different order)."""
    return all(
        math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) if isinstance(a, float) else a == b
        for a, b in zip(got, want, strict=True)
    )


async def _assert_rollups_match(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        for table, width in ROLLUP_TABLES.items():
            want, got = await _expected(conn, width), await _rollup(conn, table)
            assert got.keys() == want.keys(), table
            wrong = {key: (got[key], want[key]) for key in want if not _same(got[key], want[key])}
            assert not wrong, f"{table}: {wrong}"


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_rollups_equal_group_by_after_redeliveries_and_late_data(pool: asyncpg.Pool, seed: int) -> None:
    rng = random.Random(seed)
    stage = HistorianStage(pool)
    delivered: list[list[Reading]] = []
    for _ in range(12):
        batch = _random_batch(rng, rng.randrange(1, 120))
        if delivered and rng.random() < 0.5:  # a redelivery: a whole earlier batch or a piece of it
            old = rng.choice(delivered)
            batch += old[: rng.randrange(1, len(old) + 1)]
        if rng.random() < 0.3:  # duplicates inside one batch
            batch += rng.sample(batch, k=min(5, len(batch)))
        rng.shuffle(batch)  # late data: batches are not in time order, nor are their readings
        delivered.append(batch)
        # Both input shapes: Reading objects, and the rows the consumer decodes for the historian.
        await stage.handle(decode_reading_rows(encode_readings(batch)) if rng.random() < 0.5 else batch)
    await _assert_rollups_match(pool)
    assert stage.maintains_rollups is True
    for batch in delivered[:4]:  # redelivering everything again changes no rollup
        await stage.handle(batch)
    await _assert_rollups_match(pool)


async def test_first_and_last_follow_timestamps_not_arrival(pool: asyncpg.Pool) -> None:
    stage = HistorianStage(pool)
    t = _START + timedelta(minutes=1)
    await stage.handle([reading("m1.power_kw", t + timedelta(seconds=30), 5.0)])
    await stage.handle([reading("m1.power_kw", t + timedelta(seconds=50), 9.0)])
    await stage.handle([reading("m1.power_kw", t + timedelta(seconds=10), 1.0)])  # late: new first
    await stage.handle([reading("m1.power_kw", t + timedelta(seconds=40), 100.0)])  # late: middle
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM readings_1m")
    assert row["bucket"] == t
    assert (row["count"], row["sum"], row["min"], row["max"]) == (4, 115.0, 1.0, 100.0)
    assert (row["first_ts"], row["first"]) == (t + timedelta(seconds=10), 1.0)
    assert (row["last_ts"], row["last"]) == (t + timedelta(seconds=50), 9.0)


async def test_bad_and_uncertain_readings_make_no_rollup(pool: asyncpg.Pool) -> None:
    await HistorianStage(pool).handle(
        [
            reading("m1.power_kw", _START, None, Quality.bad("timeout")),
            reading("m1.power_kw", _START + timedelta(seconds=1), 3.0, Quality.uncertain("stale")),
        ]
    )
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM readings") == 2
        for table in ROLLUP_TABLES:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0


def test_timescale_rollups_are_continuous_aggregates_with_the_plain_columns() -> None:
    """Checked structurally: TimescaleDB cannot be installed on the development machines."""
    [rollups] = [m for m in load_migrations() if m.name == "rollups"]
    plain, timescale = rollups.sql_by_variant["plain"], rollups.sql_by_variant["timescale"]
    columns = re.search(r"CREATE TABLE readings_1m \((.*?)\n\);", plain, re.DOTALL)
    assert columns is not None
    plain_columns = re.findall(r"^\s+(\w+)\s+(?:integer|timestamptz|double)", columns.group(1), re.MULTILINE)
    assert plain_columns == ["point", "bucket", *_COLUMNS]
    for table, width in ROLLUP_TABLES.items():
        if table != "readings_1m":
            assert f"CREATE TABLE {table} (LIKE readings_1m INCLUDING ALL)" in plain
        view = re.search(
            rf"CREATE MATERIALIZED VIEW {table}\nWITH \(timescaledb.continuous.*?\) AS\n(.*?)WITH NO DATA;",
            timescale,
            re.DOTALL,
        )
        assert view is not None, table
        body = view.group(1)
        assert re.findall(r" AS (\w+)", body) == ["bucket", *_COLUMNS]
        assert f"time_bucket(INTERVAL '{width}', ts)" in body
        assert "first(value, ts)" in body
        assert "last(value, ts)" in body
        assert "WHERE quality = 2 AND value IS NOT NULL" in body
        assert f"add_continuous_aggregate_policy('{table}'" in timescale
