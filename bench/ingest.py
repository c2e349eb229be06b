"""Ingest throughput: readings through Redis Streams into PostgreSQL, against a raw COPY reference.

One run, in a scratch database on the local PostgreSQL (dropped at the end):

1. **Raw limit** (``raw_copy_rows_per_s``): ``copy_records_to_table`` of synthetic rows straight into
   a table shaped like ``readings`` (day-partitioned, primary key, BRIN), from one connection with
   prebuilt records: what this PostgreSQL accepts with no pipeline in front of it.
2. **Pipeline** (``pipeline_rows_per_s``): a producer *process* publishes readings at ``--rate``
   through the real :class:`streams.bus.RedisReadingSink` (the real codec, pipelined XADDs with
   ``MAXLEN ~``) for ``--seconds``, while a consumer *process* runs ``--consumers``
   :func:`streams.bus.run_consumer` tasks in one consumer group, sharing one
   :class:`streams.historian.HistorianStage` (rows decoded with ``decode_reading_rows``, binary
   COPY, rollups merged), exactly as ``scada/app.py`` wires them. It ends when every reading the
   producer sent is committed. The rate is committed rows over the time from the first reading
   to the last commit.

Also measured: commit latency reading -> committed (the reading's timestamp, taken by the producer
when it made it, to the end of the historian transaction that stored it; every 50th row sampled),
p50/p99/max; the consumer process's RSS (peak, and at each quarter of the run to show it stays
flat); CPU seconds used by producer, consumer, all PostgreSQL and all Redis processes (the split of
the 2 cores); the machine's load average (other work on the machine shows there).

Usage::

    .venv/bin/python bench/ingest.py [--seconds 60] [--rate 120000] [--points 10000]
                                     [--consumers 1] [--batch 200] [--raw-rows 2000000]

Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scada.db import create_pool, migrate
from scada.model import PointId, Reading
from streams.bus import RedisReadingSink, run_consumer
from streams.codec import ReadingRows, decode_reading_rows
from streams.historian import HistorianStage

ADMIN_DB_URL = os.environ.get("SCADA_BENCH_DB_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SCADA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POINTS_PER_DEVICE = 10
LATENCY_SAMPLE_EVERY = 50
TICK_S = 0.01


def db_url(name: str) -> str:
    return f"{ADMIN_DB_URL.rpartition('/')[0]}/{name}"


def point_id(i: int) -> str:
    return f"d{i // POINTS_PER_DEVICE}.p{i % POINTS_PER_DEVICE}"


def redis_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, socket_timeout=10, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0)
    )


# --------------------------------------------------------------------------------------------------
# Setup


async def setup_database(url: str, points: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        devices = (points + POINTS_PER_DEVICE - 1) // POINTS_PER_DEVICE
        await conn.execute("INSERT INTO nodes (id, name, level) VALUES ('plant', 'Plant', 'group')")
        await conn.execute(
            "INSERT INTO devices (id, node_id, name, kind, protocol)"
            " SELECT 'd' || i, 'plant', 'd' || i, 'meter', 'modbus' FROM generate_series(0, $1 - 1) i",
            devices,
        )
        await conn.execute(
            "INSERT INTO points (point_id, device_id, key, name, kind, unit)"
            " SELECT 'd' || (i / $2) || '.p' || (i % $2), 'd' || (i / $2), 'p' || (i % $2),"
            " 'p' || (i % $2), 'power', 'kW' FROM generate_series(0, $1 - 1) i",
            points,
            POINTS_PER_DEVICE,
        )
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------------
# 1. Raw COPY reference


async def raw_copy(url: str, points: int, rows: int) -> float:
    """COPY ``rows`` prebuilt records into a readings-shaped table; return rows per second."""
    conn = await asyncpg.connect(url)
    try:
        start = datetime(2026, 1, 5, tzinfo=UTC)
        await conn.execute(
            "CREATE TABLE raw_readings (LIKE readings INCLUDING ALL) PARTITION BY RANGE (ts);"
            "CREATE INDEX ON raw_readings USING brin (ts);"
            "CREATE TABLE raw_readings_p PARTITION OF raw_readings"
            " FOR VALUES FROM ('2026-01-05 00:00+00') TO ('2026-01-06 00:00+00')"
        )
        chunk = 50_000
        chunks: list[list[tuple[int, datetime, float, int, None]]] = []
        n = 0
        while n < rows:
            size = min(chunk, rows - n)
            chunks.append(
                [
                    (1 + (k % points), start + timedelta(milliseconds=10 * (k // points)), float(k), 2, None)
                    for k in range(n, n + size)
                ]
            )
            n += size
        t0 = time.perf_counter()
        for records in chunks:
            await conn.copy_records_to_table("raw_readings", records=records)
        elapsed = time.perf_counter() - t0
        await conn.execute("DROP TABLE raw_readings")
        return rows / elapsed
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------------
# 2. Pipeline: producer process


def producer_main(
    redis_url: str, key: str, points: int, rate: float, seconds: float, go: Any, out: Connection
) -> None:
    out.send(asyncio.run(produce(redis_url, key, points, rate, seconds, go)))


async def produce(
    redis_url: str, key: str, points: int, rate: float, seconds: float, go: Any
) -> dict[str, Any]:
    redis = redis_client(redis_url)
    sink = RedisReadingSink(
        redis,
        readings_key=key,
        events_key=key + ":events",
        maxlen=10_000_000,
        max_buffered=max(200_000, int(rate * 2)),
        entry_readings=500,
        entries_per_flush=20,
    )
    ids = [PointId(point_id(i)) for i in range(points)]
    await sink.start()
    while not go.is_set():  # noqa: ASYNC110 -- a multiprocessing event, set by another process
        await asyncio.sleep(0.001)
    t0 = time.monotonic()
    made = 0
    cursor = 0
    while (now := time.monotonic()) < t0 + seconds:
        due = int((now - t0) * rate) - made
        if due > 0:
            now_dt = datetime.now(UTC)
            batch = []
            for i in range(due):
                # Distinct microseconds, so a point never repeats a timestamp (a late tick makes more
                # readings than there are points); in the past, so latency is never understated.
                ts = now_dt - timedelta(microseconds=due - i)
                batch.append(Reading(point=ids[cursor], ts=ts, value=float(made)))
                cursor = (cursor + 1) % points
                made += 1
            await sink.publish(batch)
        await asyncio.sleep(TICK_S)
    produce_s = time.monotonic() - t0
    while sink.buffered:  # noqa: ASYNC110 -- the sink offers no drained event
        await asyncio.sleep(0.01)
    await sink.close(timeout_s=30)
    await redis.aclose()
    return {
        "made": made,
        "sent": sink.sent_total,
        "shed": sink.shed_total,
        "produce_s": produce_s,
        "t0_wall": time.time() - (time.monotonic() - t0),
    }


# --------------------------------------------------------------------------------------------------
# Pipeline: consumer process


def consumer_main(
    db: str, redis_url: str, key: str, consumers: int, batch: int, expect: Any, progress: Any, out: Connection
) -> None:
    out.send(asyncio.run(consume(db, redis_url, key, consumers, batch, expect, progress)))


async def consume(
    db: str, redis_url: str, key: str, consumers: int, batch: int, expect: Any, progress: Any
) -> dict[str, Any]:
    pool = await create_pool(db, timeout_s=30, min_size=consumers, max_size=consumers + 1)
    redis = redis_client(redis_url)
    historian = HistorianStage(pool, timeout_s=30)
    await historian.ensure_partitions_ahead(days=1)
    latencies_ms: list[float] = []
    batches: list[int] = []
    last_commit = 0.0

    async def handle(readings: Sequence[Reading]) -> None:
        nonlocal last_commit
        await historian.handle(readings)
        now_us = time.time() * 1e6
        last_commit = time.time()
        batches.append(len(readings))
        progress.value = historian.inserted_total
        if isinstance(readings, ReadingRows):
            latencies_ms.extend((now_us - row[1]) / 1e3 for row in readings.rows[::LATENCY_SAMPLE_EVERY])

    tasks = [
        asyncio.create_task(
            run_consumer(
                redis,
                stream=key,
                group="historian",
                consumer=f"bench-{i}",
                handler=handle,
                deadletter_stream=key + ":deadletter",
                decode=decode_reading_rows,
                batch=batch,
                block_ms=100,
                timeout_s=30,
            )
        )
        for i in range(consumers)
    ]
    try:
        while expect.value < 0 or historian.inserted_total < expect.value:  # noqa: ASYNC110 -- shared value
            await asyncio.sleep(0.005)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await redis.aclose()
        await pool.close()
    return {
        "inserted": historian.inserted_total,
        "written": historian.written_total,
        "last_commit_wall": last_commit,
        "latencies_ms": latencies_ms,
        "batches": len(batches),
        "batch_rows_mean": statistics.fmean(batches) if batches else 0,
        "batch_rows_max": max(batches, default=0),
    }


# --------------------------------------------------------------------------------------------------
# Measurement helpers


class CpuTracker:
    """CPU seconds used since start by processes with a given name, including ones that exit.

    PostgreSQL backends end with their connections, so they are sampled while they run.
    """

    def __init__(self, *names: str) -> None:
        self._names = names
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._start = self._sample()
        self._last = dict(self._start)

    def _sample(self) -> dict[int, float]:
        seen: dict[int, float] = {}
        for proc in psutil.process_iter(["name", "cpu_times"]):
            name, times = proc.info["name"] or "", proc.info["cpu_times"]
            if times is not None and any(n in name for n in self._names):
                seen[proc.pid] = times.user + times.system
        return seen

    def sample(self) -> None:
        self._last.update(self._sample())

    @property
    def used_s(self) -> float:
        return sum(t - self._start.get(pid, 0.0) for pid, t in self._last.items())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_pipeline(args: argparse.Namespace, db: str) -> dict[str, Any]:
    key = f"bench-ingest:{uuid.uuid4().hex[:8]}:readings"
    ctx = mp.get_context("spawn")
    go, expect, progress = ctx.Event(), ctx.Value("q", -1), ctx.Value("q", 0)
    prod_rx, prod_tx = ctx.Pipe(duplex=False)
    cons_rx, cons_tx = ctx.Pipe(duplex=False)
    consumer = ctx.Process(
        target=consumer_main,
        args=(db, args.redis_url, key, args.consumers, args.batch, expect, progress, cons_tx),
    )
    producer = ctx.Process(
        target=producer_main, args=(args.redis_url, key, args.points, args.rate, args.seconds, go, prod_tx)
    )
    consumer.start()
    producer.start()
    await asyncio.sleep(2.0)  # both processes imported and connected
    procs = {"consumer": psutil.Process(consumer.pid), "producer": psutil.Process(producer.pid)}
    cpu0 = {name: p.cpu_times() for name, p in procs.items()}
    pg_cpu, redis_cpu = CpuTracker("postgres"), CpuTracker("redis-server")
    load0 = os.getloadavg()
    rss: list[tuple[float, float]] = []
    cpu_end: dict[str, Any] = {}
    t0 = time.monotonic()
    go.set()
    produced: dict[str, Any] | None = None
    next_report = 1.0
    while consumer.is_alive():
        if time.monotonic() - t0 >= next_report:
            print(f"  t={next_report:4.0f} s  committed {progress.value:>12,}", flush=True)
            next_report += 1.0
        with contextlib.suppress(psutil.Error):
            rss.append((time.monotonic() - t0, procs["consumer"].memory_info().rss / 2**20))
            pg_cpu.sample()
            redis_cpu.sample()
            cpu_end["consumer"] = procs["consumer"].cpu_times()
            if produced is None:
                cpu_end["producer"] = procs["producer"].cpu_times()
        if produced is None and prod_rx.poll():
            produced = prod_rx.recv()
            expect.value = produced["sent"]
            print(f"  producer done: {produced['made']:,} made, {produced['shed']:,} shed", flush=True)
        if cons_rx.poll():
            break
        await asyncio.sleep(0.25)
    consumed = cons_rx.recv()
    load1 = os.getloadavg()
    consumer.join(10)
    producer.join(10)
    assert produced is not None
    redis = redis_client(args.redis_url)
    await redis.delete(key, key + ":events", key + ":deadletter")
    await redis.aclose()

    elapsed = consumed["last_commit_wall"] - produced["t0_wall"]
    lat = consumed["latencies_ms"]
    quarters = [max((r for t, r in rss if t <= elapsed * q / 4), default=float("nan")) for q in (1, 2, 3, 4)]

    def used(name: str) -> float:
        a, b = cpu0[name], cpu_end[name]
        return round((b.user - a.user) + (b.system - a.system), 1)

    return {
        "pipeline_rows_per_s": round(consumed["inserted"] / elapsed),
        "target_rate": args.rate,
        "produced_rows_per_s": round(produced["made"] / produced["produce_s"]),
        "rows": consumed["inserted"],
        "shed": produced["shed"],
        "elapsed_s": round(elapsed, 1),
        "drain_s": round(elapsed - produced["produce_s"], 2),
        "commit_latency_p50_ms": round(percentile(lat, 0.50), 1),
        "commit_latency_p99_ms": round(percentile(lat, 0.99), 1),
        "commit_latency_max_ms": round(max(lat, default=float("nan")), 1),
        "peak_rss_mb": round(max(r for _, r in rss), 1),
        "rss_by_quarter_mb": [round(q, 1) for q in quarters],
        "batches": consumed["batches"],
        "batch_rows_mean": round(consumed["batch_rows_mean"]),
        "batch_rows_max": consumed["batch_rows_max"],
        "cpu_s": {
            "consumer": used("consumer"),
            "producer": used("producer"),
            "postgres_all": round(pg_cpu.used_s, 1),
            "redis": round(redis_cpu.used_s, 1),
        },
        "loadavg_1m": [round(load0[0], 2), round(load1[0], 2)],
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the producer publishes")
    parser.add_argument("--rate", type=float, default=120_000, help="target readings per second")
    parser.add_argument("--points", type=int, default=10_000, help="distinct points (round robin)")
    parser.add_argument("--consumers", type=int, default=1, help="historian consumer tasks (one group)")
    parser.add_argument("--batch", type=int, default=200, help="XREADGROUP COUNT (entries of 500 readings)")
    parser.add_argument("--raw-rows", type=int, default=2_000_000, help="rows for the raw COPY reference")
    parser.add_argument("--redis-url", default=REDIS_URL)
    args = parser.parse_args()

    name = f"scada_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DB_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        await setup_database(db_url(name), args.points)
        raw = await raw_copy(db_url(name), args.points, args.raw_rows)
        print(f"raw COPY            {raw:12,.0f} rows/s  ({args.raw_rows:,} rows)")
        result = await run_pipeline(args, db_url(name))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    pipeline = result["pipeline_rows_per_s"]
    print(
        f"pipeline            {pipeline:12,.0f} rows/s  ({result['rows']:,} rows, {args.points:,} points,"
        f" {args.consumers} consumers, target {args.rate:,.0f}/s)"
    )
    print(
        f"commit latency      p50 {result['commit_latency_p50_ms']} ms"
        f"  p99 {result['commit_latency_p99_ms']} ms  max {result['commit_latency_max_ms']} ms"
    )
    print(f"consumer RSS        peak {result['peak_rss_mb']} MB, by quarter {result['rss_by_quarter_mb']}")
    print(f"CPU seconds         {result['cpu_s']}  load {result['loadavg_1m']}")
    out = {
        "raw_copy_rows_per_s": round(raw),
        **result,
        "ratio": round(pipeline / raw, 3),
        "points": args.points,
        "consumers": args.consumers,
        "batch_entries": args.batch,
        "seconds": args.seconds,
        "cores": os.cpu_count(),
    }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
