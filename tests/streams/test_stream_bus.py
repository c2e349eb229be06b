"""The bus against the real local Redis: sink batching and shedding, consumer at-least-once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import pytest
import redis.asyncio as aioredis
from _streams_helpers import T0, fast_failing_redis, reading, unused_port, wait_for
from redis.exceptions import ResponseError

from scada.model import Availability, AvailabilityEvent, DeviceId, PointId, Quality, Reading, StreamName
from scada.runtime import Backoff
from streams.bus import RedisReadingSink, RejectedReadings, read_deadletter, run_consumer, stream_key
from streams.codec import decode_event, decode_readings, encode_readings

_FAST = {"initial_s": 0.01, "max_s": 0.05}


def _batch(n: int, start: int = 0, point: str = "m1.power_kw") -> list[Reading]:
    return [reading(point, T0 + timedelta(seconds=start + i), float(start + i)) for i in range(n)]


async def _stream_readings(redis: aioredis.Redis, key: str) -> list[Reading]:
    return [r for _id, fields in await redis.xrange(key) for r in decode_readings(fields)]


# --------------------------------------------------------------------------------------------------
# Sink


def _sink(redis: aioredis.Redis, prefix: str, **kwargs: object) -> RedisReadingSink:
    return RedisReadingSink(
        redis,
        readings_key=stream_key(prefix, StreamName.READINGS),
        events_key=stream_key(prefix, StreamName.EVENTS),
        maxlen=10_000,
        backoff=Backoff(**_FAST),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


async def test_sink_batches_readings_into_entries(redis_client: aioredis.Redis, stream_prefix: str) -> None:
    sink = _sink(redis_client, stream_prefix, entry_readings=500)
    batch = _batch(1_200)
    for part in (batch[:400], batch[400:900], batch[900:]):
        await sink.publish(part)  # before start: all three calls share entries
    await sink.start()
    key = stream_key(stream_prefix, StreamName.READINGS)
    await wait_for(lambda: sink.sent_total == 1_200)
    await sink.close()
    assert await redis_client.xlen(key) == 3
    assert await _stream_readings(redis_client, key) == batch
    assert sink.shed_total == 0
    assert sink.available is True


async def test_sink_sheds_oldest_when_buffer_full(redis_client: aioredis.Redis, stream_prefix: str) -> None:
    sink = _sink(redis_client, stream_prefix, max_buffered=5)
    batch = _batch(8)
    await sink.publish(batch[:3])
    await sink.publish(batch[3:])
    assert sink.shed_total == 3
    assert sink.buffered == 5
    await sink.start()
    await sink.close()
    assert await _stream_readings(redis_client, stream_key(stream_prefix, StreamName.READINGS)) == batch[3:]


async def test_sink_rejects_unencodable_readings_and_keeps_the_rest(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    sink = _sink(redis_client, stream_prefix)
    good = _batch(2)
    await sink.publish([good[0], Reading(point=PointId("Not A Point"), ts=T0, value=1.0), good[1]])
    await sink.start()
    await sink.close()
    assert sink.rejected_total == 1
    assert await _stream_readings(redis_client, stream_key(stream_prefix, StreamName.READINGS)) == good


async def test_sink_publishes_availability_events(redis_client: aioredis.Redis, stream_prefix: str) -> None:
    sink = _sink(redis_client, stream_prefix)
    await sink.start()
    event = AvailabilityEvent(device=DeviceId("m1"), ts=T0, availability=Availability.OFFLINE, reason="down")
    await sink.publish_event(event)
    await sink.close()
    [(_id, fields)] = await redis_client.xrange(stream_key(stream_prefix, StreamName.EVENTS))
    assert decode_event(fields) == event


@contextlib.asynccontextmanager
async def _proxy_to_redis(port: int) -> AsyncIterator[None]:
    """A TCP proxy on ``port`` to the local Redis: makes an unreachable Redis appear on demand."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65_536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", 6379)
        for coro in (pipe(client_r, server_w), pipe(server_r, client_w)):
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_sink_survives_unreachable_redis_and_delivers_once_reachable(
    redis_client: aioredis.Redis, stream_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streams.bus")
    port = unused_port()
    unreachable = fast_failing_redis(port)
    sink = _sink(unreachable, stream_prefix, timeout_s=1.0)
    await sink.start()
    batch = _batch(10)
    await sink.publish(batch[:5])  # returns at once although Redis is down
    await wait_for(lambda: sink.available is False)
    await asyncio.sleep(0.2)  # several failed attempts with backoff
    await sink.publish(batch[5:])
    assert sink.buffered == 10
    async with _proxy_to_redis(port):
        await wait_for(lambda: sink.sent_total == 10)
        await sink.close()
    await unreachable.aclose()
    assert await _stream_readings(redis_client, stream_key(stream_prefix, StreamName.READINGS)) == batch
    assert caplog.text.count("Redis unavailable") == 1  # transitions, not every failure
    assert caplog.text.count("Redis restored") == 1


async def test_sink_close_gives_up_after_its_timeout(
    stream_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = fast_failing_redis(unused_port())
    sink = _sink(unreachable, stream_prefix)
    await sink.start()
    await sink.publish(_batch(3))
    async with asyncio.timeout(2):
        await sink.close(timeout_s=0.2)
    await unreachable.aclose()
    assert "3 readings and 0 events undelivered" in caplog.text


# --------------------------------------------------------------------------------------------------
# Consumer


class Recorder:
    """A handler that records what it stored and can be told to fail."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.stored: list[Reading] = []

    async def __call__(self, readings: Sequence[Reading]) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("database down")
        self.stored.extend(readings)


@contextlib.asynccontextmanager
async def _consuming(
    redis: aioredis.Redis, prefix: str, handler: Recorder, *, consumer: str = "c1", **kwargs: object
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(
        run_consumer(
            redis,
            stream=stream_key(prefix, StreamName.READINGS),
            group="historian",
            consumer=consumer,
            handler=handler,
            deadletter_stream=stream_key(prefix, StreamName.DEADLETTER),
            block_ms=50,
            backoff=Backoff(**_FAST),  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )
    )
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # cancellation propagates out of the loop


async def _pending(redis: aioredis.Redis, prefix: str) -> int:
    try:
        info = await redis.xpending(stream_key(prefix, StreamName.READINGS), "historian")
    except ResponseError:  # NOGROUP: the consumer has not created its group yet
        return -1
    return int(info["pending"])


async def test_consumer_redelivers_after_handler_failure(
    redis_client: aioredis.Redis, stream_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streams.bus")
    key = stream_key(stream_prefix, StreamName.READINGS)
    batch = _batch(6)
    await redis_client.xadd(key, encode_readings(batch[:3]))  # type: ignore[arg-type]
    await redis_client.xadd(key, encode_readings(batch[3:]))  # type: ignore[arg-type]
    handler = Recorder(failures=2)
    async with _consuming(redis_client, stream_prefix, handler):
        await wait_for(lambda: len(handler.stored) == 6)
        await wait_for(lambda: _pending_is_zero(redis_client, stream_prefix))
    assert handler.stored == batch  # nothing lost, in order
    assert handler.calls == 3
    assert caplog.text.count("handler failed") == 1  # one outage, logged once
    assert "handler recovered" in caplog.text


async def _pending_is_zero(redis: aioredis.Redis, prefix: str) -> bool:
    return await _pending(redis, prefix) == 0


async def test_poison_entry_goes_to_deadletter_and_the_rest_is_handled(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    key = stream_key(stream_prefix, StreamName.READINGS)
    batch = _batch(4)
    await redis_client.xadd(key, encode_readings(batch[:2]))  # type: ignore[arg-type]
    poison_id = await redis_client.xadd(key, {b"v": b"9", b"r": b"[]"})
    await redis_client.xadd(key, encode_readings(batch[2:]))  # type: ignore[arg-type]
    handler = Recorder()
    async with _consuming(redis_client, stream_prefix, handler):
        await wait_for(lambda: len(handler.stored) == 4)
        await wait_for(lambda: _pending_is_zero(redis_client, stream_prefix))
    assert handler.stored == batch
    [dead] = await read_deadletter(redis_client, stream_key(stream_prefix, StreamName.DEADLETTER), 10)
    assert "unsupported format version '9'" in dead["reason"]
    assert dead["origin"] == key
    assert dead["entry_id"] == poison_id.decode()
    assert dead["group"] == "historian"
    assert dead["raw"] == {"v": "9", "r": "[]"}


async def test_rejected_readings_are_deadlettered_replayably(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    key = stream_key(stream_prefix, StreamName.READINGS)
    batch = [*_batch(2), reading("zz.unknown", T0, None, Quality.bad("comm"))]
    entry_id = await redis_client.xadd(key, encode_readings(batch))  # type: ignore[arg-type]
    stored: list[Reading] = []

    async def handler(readings: Sequence[Reading]) -> None:
        known = [r for r in readings if r.point != "zz.unknown"]
        stored.extend(known)
        raise RejectedReadings("unknown point ids: zz.unknown", [r for r in readings if r not in known])

    dead_key = stream_key(stream_prefix, StreamName.DEADLETTER)
    task = asyncio.create_task(
        run_consumer(
            redis_client,
            stream=key,
            group="historian",
            consumer="c1",
            handler=handler,
            deadletter_stream=dead_key,
            block_ms=50,
        )
    )
    try:
        await wait_for(lambda: _pending_is_zero(redis_client, stream_prefix))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert stored == batch[:2]
    [(_id, fields)] = await redis_client.xrange(dead_key)
    assert fields[b"reason"] == b"unknown point ids: zz.unknown"
    assert fields[b"entry_id"] == entry_id
    raw = {name.removeprefix(b"raw."): value for name, value in fields.items() if name.startswith(b"raw.")}
    assert decode_readings(raw) == batch[2:]  # can be XADDed back once the point exists


async def test_autoclaim_takes_over_a_dead_consumers_entries(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    key = stream_key(stream_prefix, StreamName.READINGS)
    batch = _batch(3)
    await redis_client.xgroup_create(key, "historian", id="0", mkstream=True)
    await redis_client.xadd(key, encode_readings(batch))  # type: ignore[arg-type]
    # A consumer that read the entry and died before acknowledging it.
    assert await redis_client.xreadgroup("historian", "dead", {key: ">"}, count=10)
    handler = Recorder()
    async with _consuming(redis_client, stream_prefix, handler, consumer="alive", claim_idle_ms=100):
        await wait_for(lambda: handler.stored == batch)
        await wait_for(lambda: _pending_is_zero(redis_client, stream_prefix))
    consumers = {c["name"]: c["pending"] for c in await redis_client.xinfo_consumers(key, "historian")}
    assert consumers == {b"dead": 0, b"alive": 0}


async def test_restarted_consumer_handles_its_own_pending_entries_first(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    key = stream_key(stream_prefix, StreamName.READINGS)
    batch = _batch(4)
    await redis_client.xgroup_create(key, "historian", id="0", mkstream=True)
    await redis_client.xadd(key, encode_readings(batch[:2]))  # type: ignore[arg-type]
    assert await redis_client.xreadgroup("historian", "c1", {key: ">"}, count=10)  # then c1 crashed
    await redis_client.xadd(key, encode_readings(batch[2:]))  # type: ignore[arg-type]
    handler = Recorder()
    async with _consuming(redis_client, stream_prefix, handler, consumer="c1"):  # claim_idle_ms is 30 s
        await wait_for(lambda: len(handler.stored) == 4)
    assert handler.stored == batch


async def test_trimmed_pending_entry_is_deadlettered(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    key = stream_key(stream_prefix, StreamName.READINGS)
    await redis_client.xgroup_create(key, "historian", id="0", mkstream=True)
    await redis_client.xadd(key, encode_readings(_batch(1)))  # type: ignore[arg-type]
    assert await redis_client.xreadgroup("historian", "c1", {key: ">"}, count=10)
    await redis_client.xadd(key, encode_readings(_batch(1, start=1)), maxlen=1, approximate=False)  # type: ignore[arg-type]
    handler = Recorder()
    async with _consuming(redis_client, stream_prefix, handler, consumer="c1"):
        await wait_for(lambda: len(handler.stored) == 1)
        await wait_for(lambda: _pending_is_zero(redis_client, stream_prefix))
    [dead] = await read_deadletter(redis_client, stream_key(stream_prefix, StreamName.DEADLETTER), 10)
    assert "trimmed" in dead["reason"]


async def test_consumer_keeps_running_while_redis_is_unreachable(
    stream_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = fast_failing_redis(unused_port())
    handler = Recorder()
    try:
        async with _consuming(unreachable, stream_prefix, handler) as task:
            await asyncio.sleep(0.3)  # many attempts, each failing fast
            assert not task.done()
    finally:
        await unreachable.aclose()
    assert caplog.text.count("Redis unavailable") == 1
    assert handler.calls == 0


async def test_sink_accounts_for_every_reading_while_redis_is_down(stream_prefix: str) -> None:
    """published == sent + shed + still buffered, even across failed flushes and a forced close."""
    unreachable = fast_failing_redis(unused_port())
    sink = _sink(unreachable, stream_prefix, max_buffered=4, linger_s=0.0)
    await sink.start()
    for i in range(5):
        await sink.publish(_batch(2, start=2 * i))
        await asyncio.sleep(0.02)  # let flush attempts fail in between
    await sink.close(timeout_s=0.1)
    await unreachable.aclose()
    assert sink.available is False
    assert sink.sent_total == 0
    assert sink.buffered == 4
    assert sink.shed_total == 6
