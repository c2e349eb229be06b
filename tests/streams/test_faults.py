"""Faults against real processes: kill the historian, restart Redis and PostgreSQL, feed it poison.

Every test here runs its own ``redis-server`` (append-only, so a restart keeps the streams) and its
own PostgreSQL cluster on free ports, and ``scada run --role ...`` as real processes: the shared local
services other tests use are never stopped. The invariants checked are the ones docs/streams.md
promises: nothing acknowledged before it is committed, every reading stored exactly once however
often it is delivered, ingestion resuming by itself once a service is back, poison set aside with
its reason. Recovery times are printed (``-s``) and bounded; docs/operations.md quotes them.

The ``/metrics`` endpoint is tested here too, on the real app, including while Redis is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from _auth_helpers import TEST_SECRET_KEY, admin_headers
from _fault_helpers import (
    PrivatePostgres,
    PrivateRedis,
    ScadaProcess,
    free_port,
    init_postgres_template,
    private_dir,
    wait_until,
)
from aiohttp import web
from aiohttp.test_utils import TestClient

from scada.api.metrics import CONTENT_TYPE
from scada.app import SERVICE_RETRY_MAX_S, SETTINGS, create_app
from scada.config import parse_site
from scada.model import PointId, Quality, Reading, StreamName
from scada.runtime import Backoff
from scada.services import Endpoints
from scada.settings import Settings
from streams.bus import RedisReadingSink, stream_key
from streams.codec import encode_readings

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
POINTS = 20
RESUME_BOUND_S = 10.0
OUTAGE_S = 8.0
"""Long enough for the backoffs to reach their cap (SERVICE_RETRY_MAX_S)."""
PREFIX = "faults:"
READINGS_KEY = stream_key(PREFIX, StreamName.READINGS)
DEADLETTER_KEY = stream_key(PREFIX, StreamName.DEADLETTER)

SITE = """
site: {{id: faults, name: Faults}}
hierarchy: [{{id: g, name: G, level: group}}]
devices:
  - id: m
    node: g
    kind: power_meter
    protocol: modbus_tcp
    poll_period_s: 0.2
    modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1, timeout_s: 0.2}}
    points:
{points}
"""


def site_text(modbus_port: int) -> str:
    """A site whose one (absent) device has POINTS points: the catalog the historian resolves."""
    points = "\n".join(
        f"      - {{key: p{i:02d}, kind: power, unit: kW, carrier: electricity,"
        f" modbus: {{address: {2 * i}, type: float32}}}}"
        for i in range(POINTS)
    )
    return SITE.format(port=modbus_port, points=points)


def point_id(i: int) -> PointId:
    """Return the id of the i-th point of the site."""
    return PointId(f"m.p{i % POINTS:02d}")


def reading_no(n: int) -> Reading:
    """The n-th reading of a test: distinct (point, ts) for every n, and value n (sums are exact)."""
    ts = T0 + timedelta(milliseconds=10 * (n // POINTS))
    return Reading(point=point_id(n), ts=ts, value=float(n), quality=Quality.good())


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def pg_template() -> Iterator[Path]:
    """An initdb'd cluster, made once per module and copied by each test (saves ~1 s a test)."""
    parent = private_dir("scada-faults-pgtemplate-")
    try:
        yield init_postgres_template(parent)
    finally:
        import shutil  # noqa: PLC0415 -- teardown only

        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
async def private_pg(pg_template: Path) -> AsyncIterator[PrivatePostgres]:
    """This test's own PostgreSQL, started."""
    pg = PrivatePostgres(pg_template, private_dir("scada-faults-pg-"))
    try:
        await pg.create()
        await pg.start()
        yield pg
    finally:
        await pg.destroy()


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    """This test's own redis-server, started."""
    server = PrivateRedis(private_dir("scada-faults-redis-"))
    try:
        await server.start()
        yield server
    finally:
        await server.destroy()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Site file, process logs and data directory of this test."""
    path = private_dir("scada-faults-")
    try:
        yield path
    finally:
        import shutil  # noqa: PLC0415 -- teardown only

        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def scada_factory(
    workdir: Path, private_pg: PrivatePostgres, private_redis: PrivateRedis, mqtt_url: str
) -> Iterator[Callable[..., ScadaProcess]]:
    """Make ``scada run`` processes on this test's services; kill any still running at the end."""
    site = workdir / "site.yaml"
    site.write_text(site_text(free_port()), encoding="utf-8")
    made: list[ScadaProcess] = []

    def make(*roles: str) -> ScadaProcess:
        env = {
            "SCADA_DB_URL": private_pg.url,
            "SCADA_REDIS_URL": private_redis.url,
            "SCADA_MQTT_URL": mqtt_url,
            "SCADA_STREAM_PREFIX": PREFIX,
            "SCADA_HTTP_PORT": str(free_port()),
            "SCADA_DATA_DIR": str(workdir / "data"),
        }
        proc = ScadaProcess(site, env, list(roles), workdir / f"scada-{'-'.join(roles)}-{len(made)}.log")
        made.append(proc)
        return proc

    yield make
    for proc in made:
        if proc.proc is not None and proc.proc.returncode is None:
            proc.proc.kill()


@pytest.fixture
async def redis(private_redis: PrivateRedis) -> AsyncIterator[aioredis.Redis]:
    """A fast-failing client on this test's Redis."""
    client = private_redis.client()
    try:
        yield client
    finally:
        await client.aclose()


# --------------------------------------------------------------------------------------------------
# Observations


async def stored(pg: PrivatePostgres) -> tuple[int, int, float]:
    """Return (rows, distinct (point, ts), sum of values) of the readings table."""
    row = await pg.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT (point, ts)) AS d, coalesce(sum(value), 0) AS s FROM readings"
    )
    return int(row["n"]), int(row["d"]), float(row["s"])


async def row_count(pg: PrivatePostgres) -> int:
    """Return how many rows the readings table holds (0 before the historian created it)."""
    row = await pg.fetchrow("SELECT CASE WHEN to_regclass('readings') IS NULL THEN -1 ELSE 0 END AS t")
    if row["t"] < 0:
        return 0
    return int((await pg.fetchrow("SELECT count(*) AS n FROM readings"))["n"])


async def group_state(redis: aioredis.Redis, group: str = "historian") -> tuple[int, int | None]:
    """Return (pending, lag) of a consumer group on the readings stream."""
    for info in await redis.xinfo_groups(READINGS_KEY):
        if info["name"] in (group, group.encode()):
            return int(info["pending"]), info["lag"]
    raise AssertionError(f"no group {group!r} on {READINGS_KEY}")


def parse_metrics(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """Parse Prometheus text format strictly enough to catch malformed output: (types, samples)."""
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: list[tuple[str, dict[str, str], float]] = []
    sample_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split(" ", 3)[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name in helps, f"TYPE before HELP: {line}"
            assert name not in types, f"family declared twice: {name}"
            types[name] = kind
        else:
            match = sample_re.match(line)
            assert match, f"not a sample line: {line!r}"
            name, labels_text, value = match.groups()
            labels = dict(label_re.findall(labels_text or ""))
            family = name
            if name not in types:
                family = re.sub(r"_(bucket|sum|count)$", "", name)
                assert types.get(family) == "histogram", f"sample of an undeclared family: {line}"
            if types[family] == "counter":
                assert name.endswith("_total"), f"counter without _total: {name}"
            samples.append((name, labels, float(value)))
    return types, samples


def value_of(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Return the value of the one sample with this name and these labels."""
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def make_sink(redis: aioredis.Redis, **kwargs: Any) -> RedisReadingSink:
    """A readings sink on this test's Redis under the test prefix."""
    return RedisReadingSink(
        redis,
        readings_key=READINGS_KEY,
        events_key=stream_key(PREFIX, StreamName.EVENTS),
        maxlen=1_000_000,
        max_buffered=500_000,
        backoff=Backoff(max_s=SERVICE_RETRY_MAX_S),  # as the gateway's (scada.app)
        **kwargs,
    )


class Producer:
    """Publish readings 0, 1, 2, ... at a steady rate through a sink, until stopped."""

    def __init__(self, sink: RedisReadingSink, per_tick: int = 40, period_s: float = 0.01) -> None:
        self.sink, self.per_tick, self.period_s = sink, per_tick, period_s
        self.produced = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Producer:
        await self.sink.start()
        self._task = asyncio.create_task(self._run(), name="test-producer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop producing (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            batch = [reading_no(n) for n in range(self.produced, self.produced + self.per_tick)]
            await self.sink.publish(batch)
            self.produced += len(batch)
            await asyncio.sleep(self.period_s)


async def assert_exactly_once(pg: PrivatePostgres, produced: int) -> None:
    """Every reading 0..produced-1 is stored exactly once."""
    rows, distinct, total = await stored(pg)
    assert (rows, distinct) == (produced, produced)
    assert total == produced * (produced - 1) / 2  # values are 0..n-1: none lost, none doubled


async def written_total(proc: ScadaProcess) -> float:
    """Return the historian's written-readings counter, from its /metrics."""
    _, samples = parse_metrics(await proc.get_text("/metrics"))
    return value_of(samples, "scada_historian_written_readings_total")


# --------------------------------------------------------------------------------------------------
# /metrics on the real app


async def test_metrics_exposition_and_redis_down(
    private_redis: PrivateRedis,
    pg_url: str,
    mqtt_url: str,
    unused_tcp_port_factory: Callable[[], int],
    aiohttp_client: Callable[[web.Application], Any],
) -> None:
    site = parse_site(site_text(unused_tcp_port_factory()))
    settings = Settings(stream_prefix=PREFIX, secret_key=TEST_SECRET_KEY)
    endpoints = Endpoints(db_url=pg_url, redis_url=private_redis.url, mqtt_url=mqtt_url, origins={})
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        create_app(site, settings, endpoints), headers=admin_headers(site)
    )

    async def scraped() -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        return parse_metrics(await response.text())

    async def historian_wrote() -> bool:  # the absent device's offline readings reach the database
        _, samples = await scraped()
        return value_of(samples, "scada_historian_batch_readings_count") > 0 and any(
            n == "scada_stream_group_pending" for n, _, _ in samples
        )

    await wait_until(historian_wrote, 15, "the historian's first batch")
    types, samples = await scraped()
    expected = {
        "scada_build_info": "gauge",
        "scada_redis_up": "gauge",
        "scada_stream_length": "gauge",
        "scada_stream_entries_added_total": "counter",
        "scada_stream_group_lag": "gauge",
        "scada_stream_group_pending": "gauge",
        "scada_stream_group_consumers": "gauge",
        "scada_sink_buffered_readings": "gauge",
        "scada_sink_sent_readings_total": "counter",
        "scada_sink_shed_readings_total": "counter",
        "scada_sink_rejected_readings_total": "counter",
        "scada_sink_shed_events_total": "counter",
        "scada_sink_available": "gauge",
        "scada_historian_written_readings_total": "counter",
        "scada_historian_inserted_readings_total": "counter",
        "scada_historian_rejected_readings_total": "counter",
        "scada_historian_batch_failures_total": "counter",
        "scada_historian_batch_readings": "histogram",
        "scada_historian_batch_duration_seconds": "histogram",
        "scada_devices": "gauge",
        "scada_device_polls_total": "counter",
        "scada_device_connects_total": "counter",
        "scada_device_overruns_total": "counter",
        "scada_live_subscribers": "gauge",
        "scada_live_readings_seen_total": "counter",
    }
    assert {name: types.get(name) for name in expected} == expected
    assert value_of(samples, "scada_redis_up") == 1
    assert value_of(samples, "scada_stream_length", stream="readings") >= 1
    consumers = client.app[SETTINGS].historian_consumers
    assert (
        value_of(samples, "scada_stream_group_consumers", stream="readings", group="historian") == consumers
    )
    assert value_of(samples, "scada_devices", state="offline") == 1  # nothing listens on its port
    assert value_of(samples, "scada_device_polls_total", device="m", result="failed") >= 1
    assert value_of(samples, "scada_historian_written_readings_total") >= POINTS
    buckets = [(lab["le"], v) for n, lab, v in samples if n == "scada_historian_batch_readings_bucket"]
    assert buckets[-1][0] == "+Inf"
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert buckets[-1][1] == value_of(samples, "scada_historian_batch_readings_count")

    await private_redis.stop()
    start_s = time.monotonic()
    types, samples = await scraped()
    assert time.monotonic() - start_s < 5  # bounded by the scrape's Redis timeout, not the client's
    assert value_of(samples, "scada_redis_up") == 0
    assert not [n for n, _, _ in samples if n.startswith("scada_stream_")]  # absent, not stale
    assert value_of(samples, "scada_historian_written_readings_total") >= POINTS  # memory still served
    assert types["scada_devices"] == "gauge"


# --------------------------------------------------------------------------------------------------
# Faults


@pytest.mark.slow
async def test_historian_killed_mid_batch_stores_every_reading_exactly_once(
    scada_factory: Callable[..., ScadaProcess], private_pg: PrivatePostgres, redis: aioredis.Redis
) -> None:
    total = 200_000
    sink = make_sink(redis, entry_readings=100, entries_per_flush=50)  # 500-entry batches: 50k readings
    await sink.start()
    await sink.publish([reading_no(n) for n in range(total)])
    await sink.close(timeout_s=30)
    assert sink.sent_total == total

    historian = scada_factory("historian")
    await historian.start()

    async def writing() -> bool:
        historian.assert_alive()
        return await row_count(private_pg) > 0

    await wait_until(writing, 30, "the first committed batch", interval_s=0.01)
    await historian.kill()
    at_kill = await row_count(private_pg)
    pending, _lag = await group_state(redis)
    print(f"\nkilled the historian at {at_kill} of {total} rows; {pending} entries pending")
    assert 0 < at_kill < total, "the kill must land mid-stream"
    # Usually the batch being written when killed stays pending and is redelivered after the restart.
    # A kill that lands between one batch's XACK and the next read leaves nothing pending; the
    # invariant below (every reading exactly once) must hold either way, so it is not asserted.

    restart_s = time.monotonic()
    await historian.start()

    async def drained() -> bool:
        historian.assert_alive()
        return await group_state(redis) == (0, 0)

    await wait_until(drained, 60, "the historian group to drain", detail=historian.tail)
    print(f"drained {time.monotonic() - restart_s:.1f} s after the restart")
    await assert_exactly_once(private_pg, total)
    assert await redis.xlen(DEADLETTER_KEY) == 0
    assert await historian.stop() == 0


@pytest.mark.slow
async def test_redis_restart_loses_nothing_and_ingestion_resumes(
    scada_factory: Callable[..., ScadaProcess],
    private_pg: PrivatePostgres,
    private_redis: PrivateRedis,
    redis: aioredis.Redis,
) -> None:
    historian = scada_factory("historian")
    await historian.start()
    sink = make_sink(redis)  # stands in for a gateway
    async with Producer(sink) as producer:
        await wait_until(lambda: _gt(row_count(private_pg), 0), 20, "ingestion to start")

        await private_redis.stop()
        await wait_until(lambda: _is(sink.available, False), 10, "the sink to notice")
        await asyncio.sleep(OUTAGE_S)  # the fault's length (the backoffs grow meanwhile), not a wait
        historian.assert_alive()
        assert sink.buffered > 0
        before = await written_total(historian)  # nothing can be read while Redis is down

        await private_redis.start()
        up_s = time.monotonic()
        await wait_until(lambda: _gt(written_total(historian), before), 30, "ingestion to resume")
        resumed_s = time.monotonic() - up_s
        await wait_until(lambda: _is(sink.available, True), 30, "the sink to reconnect")
        print(f"\nRedis restart: ingestion resumed {resumed_s:.2f} s after Redis was back")
        await producer.stop()
    await sink.close(timeout_s=30)
    assert sink.shed_total == 0
    assert sink.buffered == 0
    produced = producer.produced

    async def caught_up() -> bool:
        historian.assert_alive()
        return await row_count(private_pg) >= produced and await group_state(redis) == (0, 0)

    await wait_until(caught_up, 30, "the historian to catch up", detail=historian.tail)
    await assert_exactly_once(private_pg, produced)
    assert resumed_s < RESUME_BOUND_S
    assert await historian.stop() == 0


@pytest.mark.slow
async def test_postgres_restart_keeps_batches_pending_and_ingestion_resumes(
    scada_factory: Callable[..., ScadaProcess],
    private_pg: PrivatePostgres,
    redis: aioredis.Redis,
) -> None:
    historian = scada_factory("historian")
    await historian.start()
    sink = make_sink(redis)
    async with Producer(sink) as producer:
        await wait_until(lambda: _gt(row_count(private_pg), 0), 20, "ingestion to start")

        await private_pg.stop("immediate")  # like a crash: WAL recovery at the next start

        async def stuck() -> bool:
            historian.assert_alive()
            _, samples = parse_metrics(await historian.get_text("/metrics"))
            return value_of(samples, "scada_historian_batch_failures_total") > 0

        await wait_until(stuck, 20, "the historian to fail a batch")
        await asyncio.sleep(OUTAGE_S)  # the fault's length (the backoffs grow meanwhile), not a wait
        pending, _ = await group_state(redis)
        assert pending > 0, "a failed batch stays pending"
        before = await written_total(historian)

        await private_pg.start()
        up_s = time.monotonic()
        await wait_until(lambda: _gt(written_total(historian), before), 30, "ingestion to resume")
        resumed_s = time.monotonic() - up_s
        print(f"\nPostgreSQL restart: ingestion resumed {resumed_s:.2f} s after it was back")
        await producer.stop()
    await sink.close(timeout_s=30)
    assert sink.shed_total == 0
    produced = producer.produced

    async def caught_up() -> bool:
        historian.assert_alive()
        return await group_state(redis) == (0, 0) and await row_count(private_pg) >= produced

    await wait_until(caught_up, 30, "the historian to catch up", detail=historian.tail)
    await assert_exactly_once(private_pg, produced)
    assert resumed_s < RESUME_BOUND_S
    assert await historian.stop() == 0


@pytest.mark.slow
async def test_poison_goes_to_deadletter_with_its_reason_and_shows_in_another_process(
    scada_factory: Callable[..., ScadaProcess], private_pg: PrivatePostgres, redis: aioredis.Redis
) -> None:
    historian, api = scada_factory("historian"), scada_factory("api")
    await asyncio.gather(historian.start(), api.start())
    good = [reading_no(n) for n in range(100)]
    unknown = [Reading(point=PointId("m.nope"), ts=T0, value=1.0, quality=Quality.good())]
    await redis.xadd(READINGS_KEY, {"v": "9", "r": "[]"})  # a version nobody knows
    await redis.xadd(READINGS_KEY, {"v": "1", "r": "not json"})
    await redis.xadd(READINGS_KEY, encode_readings([*good[:50], *unknown]))  # type: ignore[arg-type]
    await redis.xadd(READINGS_KEY, encode_readings(good[50:]))  # type: ignore[arg-type]

    async def settled() -> bool:
        historian.assert_alive()
        return await group_state(redis) == (0, 0) and await redis.xlen(DEADLETTER_KEY) == 3

    await wait_until(
        settled, 20, "three dead-letter entries and an empty pending list", detail=historian.tail
    )
    body = await api.get_json("/api/v1/deadletter")
    assert isinstance(body, dict)
    items = body["items"]
    reasons = [item["reason"] for item in items]
    print("\n" + json.dumps(reasons, indent=1))
    assert len(items) == 3
    assert all(item["origin"] == READINGS_KEY and item["group"] == "historian" for item in items)
    assert any("version" in r for r in reasons)
    assert any("m.nope" in r for r in reasons)  # the historian's unknown point, named
    [rejected] = [i for i in items if "m.nope" in i["reason"]]
    assert json.loads(rejected["raw"]["r"])[0][0] == "m.nope"  # re-encoded: replayable after a fix
    await assert_exactly_once(private_pg, 100)  # the good part of the mixed entry was kept

    _, samples = parse_metrics(await api.get_text("/metrics"))
    assert value_of(samples, "scada_stream_length", stream="deadletter") == 3
    assert value_of(samples, "scada_stream_group_pending", stream="readings", group="historian") == 0
    assert value_of(samples, "scada_redis_up") == 1
    assert await asyncio.gather(historian.stop(), api.stop()) == [0, 0]


async def _gt(value: Any, bound: float) -> bool:
    return bool(await value > bound)


async def _is(value: object, expected: object) -> bool:
    return value is expected
