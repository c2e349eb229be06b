"""The historian against the real local PostgreSQL: idempotent writes, partitions, unknown points."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from _streams_helpers import T0, add_points, reading

from scada.model import Quality, Reading
from scada.runtime import FakeClock
from streams.bus import RejectedReadings
from streams.historian import HistorianStage, partition_name


def _days_batch() -> list[Reading]:
    """Readings over three UTC days for two points, one of them bad."""
    batch = [
        reading(point, T0 + timedelta(hours=hours), float(hours))
        for point in ("m1.power_kw", "m2.power_kw")
        for hours in range(0, 60, 6)
    ]
    batch.append(reading("m1.energy_kwh", T0, None, Quality.bad("timeout after 1.0 s")))
    return batch


async def _fingerprint(pool: asyncpg.Pool) -> tuple[int, str]:
    """Row count and a checksum over every stored column."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT count(*) AS n,
                      md5(string_agg(concat_ws('|', point, ts, value, quality, reason), ','
                                     ORDER BY point, ts)) AS digest
               FROM readings"""
        )
    return row["n"], row["digest"]


async def _partitions(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'readings'::regclass ORDER BY 1"
        )
    return [r["relname"] for r in rows]


async def test_redelivered_batch_does_not_duplicate(pool: asyncpg.Pool) -> None:
    stage = HistorianStage(pool)
    batch = _days_batch()
    await stage.handle(batch)
    first = await _fingerprint(pool)
    await stage.handle(batch)  # the consumer redelivers after a crash before XACK
    await stage.handle(batch[:5])
    assert await _fingerprint(pool) == first
    assert first[0] == len(batch)


async def test_partitions_are_created_for_each_day_of_a_batch(pool: asyncpg.Pool) -> None:
    await HistorianStage(pool).handle(_days_batch())
    days = [(T0 + timedelta(days=n)).date() for n in range(3)]  # 12:00 + up to 54 h
    assert await _partitions(pool) == [partition_name(d) for d in days]
    async with pool.acquire() as conn:
        # Each row sits in its own day's partition (the range bounds are UTC midnights).
        misplaced = await conn.fetchval(
            "SELECT count(*) FROM readings"
            " WHERE tableoid::regclass::text <> 'readings_p' || to_char(ts AT TIME ZONE 'UTC', 'YYYYMMDD')"
        )
    assert misplaced == 0


async def test_concurrent_historians_create_partitions_safely(pool: asyncpg.Pool) -> None:
    batch = _days_batch()
    stages = [HistorianStage(pool) for _ in range(3)]
    await asyncio.gather(*(stage.handle(batch) for stage in stages))
    assert (await _fingerprint(pool))[0] == len(batch)
    assert len(await _partitions(pool)) == 3


async def test_unknown_points_are_rejected_after_the_rest_is_written(pool: asyncpg.Pool) -> None:
    stage = HistorianStage(pool)
    known = reading("m1.power_kw", T0, 5.0)
    unknown = [reading("new.power_kw", T0, 1.0), reading("new.power_kw", T0 + timedelta(seconds=1), 2.0)]
    with pytest.raises(RejectedReadings) as info:
        await stage.handle([unknown[0], known, unknown[1]])
    assert info.value.readings == tuple(unknown)
    assert "new.power_kw" in info.value.reason
    assert (await _fingerprint(pool))[0] == 1
    # Once the catalog knows the point, replaying the dead-lettered readings stores them.
    async with pool.acquire() as conn:
        await add_points(conn, "new.power_kw")
    await stage.handle(info.value.readings)
    assert (await _fingerprint(pool))[0] == 3
    assert stage.rejected_total == 2


async def test_readings_far_in_the_future_are_rejected(pool: asyncpg.Pool) -> None:
    stage = HistorianStage(pool, max_future_s=3_600, clock=FakeClock(start=T0))
    ok, ahead = (
        reading("m1.power_kw", T0 + timedelta(minutes=30)),
        reading("m1.power_kw", T0 + timedelta(days=400)),
    )
    with pytest.raises(RejectedReadings) as info:
        await stage.handle([ok, ahead])
    assert info.value.readings == (ahead,)
    assert await _partitions(pool) == [partition_name(T0.date())]


async def test_ensure_partitions_ahead(pool: asyncpg.Pool) -> None:
    stage = HistorianStage(pool, clock=FakeClock(start=datetime(2026, 12, 30, 23, 0, tzinfo=UTC)))
    created = await stage.ensure_partitions_ahead(days=3)
    assert created == ["readings_p20261230", "readings_p20261231", "readings_p20270101", "readings_p20270102"]
    later = HistorianStage(pool, clock=FakeClock(start=datetime(2026, 12, 31, tzinfo=UTC)))
    assert await later.ensure_partitions_ahead(days=2) == []  # all three exist already
    assert await _partitions(pool) == created


async def test_dropped_partition_is_recreated(pool: asyncpg.Pool) -> None:
    """A partition dropped behind the stage's cache (retention) is made again on the next write."""
    stage = HistorianStage(pool)
    await stage.handle([reading("m1.power_kw", T0, 1.0)])
    async with pool.acquire() as conn:
        await conn.execute(f"DROP TABLE {partition_name(T0.date())}")
    await stage.handle([reading("m1.power_kw", T0 + timedelta(seconds=1), 2.0)])
    assert (await _fingerprint(pool))[0] == 1
