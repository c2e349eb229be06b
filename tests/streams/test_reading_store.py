"""The reading store over the real local PostgreSQL, and the whole path from sink to store."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis
from _streams_helpers import T0, reading, wait_for

from scada.model import NotFound, PointId, Quality, Reading, StreamName
from streams.bus import RedisReadingSink, read_deadletter, run_consumer, stream_key
from streams.historian import HistorianStage
from streams.store import PostgresReadingStore

P1 = PointId("m1.power_kw")


async def test_latest_is_none_for_a_known_point_without_data(pool: asyncpg.Pool) -> None:
    assert await PostgresReadingStore(pool).latest(P1) is None
    assert await PostgresReadingStore(pool).history(P1, T0, T0 + timedelta(days=1), limit=10) == []


@pytest.mark.parametrize("point", ["zz.unknown", "not a point id", "M1.POWER_KW"])
async def test_unknown_or_malformed_point_is_not_found(pool: asyncpg.Pool, point: str) -> None:
    store = PostgresReadingStore(pool)
    with pytest.raises(NotFound):
        await store.latest(PointId(point))
    with pytest.raises(NotFound):
        await store.history(PointId(point), T0, T0 + timedelta(hours=1), limit=10)


async def test_latest_and_history_rebuild_readings(pool: asyncpg.Pool) -> None:
    batch = [
        reading(P1, T0 + timedelta(days=d, minutes=m), float(10 * d + m)) for d in range(3) for m in range(3)
    ]
    bad = reading(P1, T0 + timedelta(days=3), None, Quality.bad("timeout after 1.0 s"))
    doubtful = reading(P1, T0 + timedelta(days=3, seconds=1), 7.5, Quality.uncertain("over range"))
    await HistorianStage(pool).handle(
        [*batch, bad, doubtful, reading("m2.power_kw", T0 + timedelta(days=9), 1.0)]
    )
    store = PostgresReadingStore(pool)

    assert await store.latest(P1) == doubtful
    history = await store.history(P1, T0 + timedelta(days=1), T0 + timedelta(days=3, seconds=1), limit=100)
    assert history == [*batch[3:], bad]  # [start, end): the end instant is excluded
    assert history[-1].quality == Quality.bad("timeout after 1.0 s")
    assert await store.history(P1, T0, T0 + timedelta(days=9), limit=2) == batch[:2]  # oldest first
    assert await store.history(P1, T0 + timedelta(days=1), T0, limit=5) == []


async def test_history_refuses_naive_times_and_bad_limits(pool: asyncpg.Pool) -> None:
    store = PostgresReadingStore(pool)
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.history(P1, T0.replace(tzinfo=None), T0 + timedelta(hours=1), limit=1)
    with pytest.raises(ValueError, match="limit"):
        await store.history(P1, T0, T0 + timedelta(hours=1), limit=0)


async def test_end_to_end_sink_to_store(
    pool: asyncpg.Pool, redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    """Sessions publish; the historian consumer stores; the API reads; strays are dead-lettered."""
    readings_key = stream_key(stream_prefix, StreamName.READINGS)
    deadletter_key = stream_key(stream_prefix, StreamName.DEADLETTER)
    sink = RedisReadingSink(
        redis_client,
        readings_key=readings_key,
        events_key=stream_key(stream_prefix, StreamName.EVENTS),
        maxlen=10_000,
    )
    historian = HistorianStage(pool)
    consumer = asyncio.create_task(
        run_consumer(
            redis_client,
            stream=readings_key,
            group="historian",
            consumer="c1",
            handler=historian.handle,
            deadletter_stream=deadletter_key,
            block_ms=50,
        )
    )
    store = PostgresReadingStore(pool)
    try:
        await sink.start()
        batch: list[Reading] = [reading(P1, T0 + timedelta(seconds=s), float(s)) for s in range(100)]
        await sink.publish(batch[:50])
        await sink.publish([*batch[50:], reading("ghost.power_kw", T0, 1.0)])
        await wait_for(lambda: historian.written_total == 100)
        assert await store.latest(P1) == batch[-1]
        assert await store.history(P1, T0, T0 + timedelta(hours=1), limit=1_000) == batch
        await wait_for(lambda: _has_deadletter(redis_client, deadletter_key))
        [dead] = await read_deadletter(redis_client, deadletter_key, 10)
        assert "ghost.power_kw" in dead["reason"]
    finally:
        await sink.close()
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer


async def _has_deadletter(redis: aioredis.Redis, key: str) -> bool:
    return bool(await redis.xlen(key))
