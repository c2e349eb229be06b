"""The row decoder: the same verdict as ``decode_readings`` on every entry, and the consumer path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from _streams_helpers import T0, reading, wait_for
from hypothesis import given
from hypothesis import strategies as st
from test_stream_codec import _bits, readings

from scada.model import DecodeError, Reading, StreamName
from streams.bus import RedisReadingSink, run_consumer, stream_key
from streams.codec import ReadingRows, decode_reading_rows, decode_readings, encode_readings
from streams.historian import HistorianStage


def _verdict(decode: Any, fields: dict[bytes, bytes]) -> tuple[str, Any]:
    try:
        decoded = decode(fields)
    except DecodeError as err:
        return "error", str(err)
    return "ok", [(r.point, r.ts, r.quality, _bits(r.value)) for r in decoded]


@given(st.lists(readings(), max_size=20))
def test_rows_decode_like_readings(batch: list[Reading]) -> None:
    fields = encode_readings(batch)
    assert _verdict(decode_reading_rows, fields) == _verdict(decode_readings, fields)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=6),
    max_leaves=12,
)
_ROW = st.tuples(
    st.sampled_from(["m1.power_kw", "Bad Id", "m1", 7, None]),
    st.sampled_from([1767571200000000, 1767571200, 1.5e15, True, "x", 10**20]),
    st.sampled_from([1.5, 2, None, "NaN", "Infinity", "nan", True, 10**400, [1]]),
    st.sampled_from([0, 1, 2, 3, -1, True, 2.0, None]),
    st.sampled_from([None, "", "timeout", 5]),
).map(list)


@given(st.lists(_ROW | _JSON, max_size=6))
def test_rows_refuse_what_readings_refuse(rows: list[Any]) -> None:
    """Malformed rows of every kind get the same verdict and the same message from both decoders."""
    fields = {b"v": b"1", b"r": json.dumps(rows).encode()}
    assert _verdict(decode_reading_rows, fields) == _verdict(decode_readings, fields)


def test_reading_rows_is_a_sequence_of_readings() -> None:
    batch = [reading("m1.power_kw", T0 + timedelta(seconds=i), float(i)) for i in range(3)]
    rows = decode_reading_rows(encode_readings(batch))
    assert list(rows) == batch
    assert rows[1] == batch[1]
    assert list(rows[1:]) == batch[1:]
    assert ReadingRows.concat([rows, rows[:1]]).rows == [*rows.rows, rows.rows[0]]


async def test_consumer_hands_the_historian_rows(
    pool: asyncpg.Pool, redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    """decode=decode_reading_rows: several entries reach the handler as one ReadingRows batch."""
    key = stream_key(stream_prefix, StreamName.READINGS)
    sink = RedisReadingSink(
        redis_client,
        readings_key=key,
        events_key=stream_key(stream_prefix, StreamName.EVENTS),
        maxlen=10_000,
        entry_readings=10,
    )
    batch = [reading("m1.power_kw", T0 + timedelta(seconds=i), float(i)) for i in range(95)]
    await sink.publish(batch)
    await sink.start()
    await wait_for(lambda: sink.sent_total == len(batch))
    await sink.close()
    historian = HistorianStage(pool)
    seen: list[Sequence[Reading]] = []

    async def handler(readings: Sequence[Reading]) -> None:
        seen.append(readings)
        await historian.handle(readings)

    task = asyncio.create_task(
        run_consumer(
            redis_client,
            stream=key,
            group="historian",
            consumer="c1",
            handler=handler,
            deadletter_stream=stream_key(stream_prefix, StreamName.DEADLETTER),
            decode=decode_reading_rows,
            batch=100,
        )
    )
    try:
        await wait_for(lambda: historian.inserted_total == len(batch))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert all(isinstance(part, ReadingRows) for part in seen)
    assert max(len(part) for part in seen) > 10  # entries of one read are joined
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM readings") == len(batch)
        assert await conn.fetchval("SELECT sum(count) FROM readings_1m") == len(batch)
