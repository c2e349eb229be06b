"""Shared fixtures: the real local PostgreSQL and Redis, isolated per test run.

Each test session gets its own PostgreSQL database (created from the server's default database and
dropped at the end) and its own Redis key prefix, so parallel runs and a running demo do not meet.
The test command (scripts/test.sh) starts the services if they are down; set SCADA_TEST_DB_ADMIN_URL
or SCADA_TEST_REDIS_URL to point the tests somewhere else.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import redis.asyncio as aioredis

ADMIN_DB_URL = os.environ.get("SCADA_TEST_DB_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SCADA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MQTT_URL = os.environ.get("SCADA_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")


def _db_url(name: str) -> str:
    base, _, _ = ADMIN_DB_URL.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """Create an empty database for this test session; yield its URL; drop it afterwards."""
    import asyncio  # noqa: PLC0415 -- session-scoped sync fixture drives its own short loop

    name = f"scada_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(ADMIN_DB_URL, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield _db_url(name)
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def pg_url(pg_database: str) -> str:
    """A database URL whose schema is emptied before each test (tables of earlier tests removed)."""
    conn = await asyncpg.connect(pg_database, timeout=10)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    finally:
        await conn.close()
    return pg_database


@pytest.fixture
def stream_prefix() -> str:
    """A Redis key prefix unique to this test."""
    return f"scada-test:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def redis_client(stream_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis client on the local server; every key under this test's prefix is deleted after."""
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{stream_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def redis_url() -> str:
    """URL of the local Redis used by tests."""
    return REDIS_URL


@pytest.fixture
def mqtt_url() -> str:
    """URL of the local MQTT broker used by tests."""
    return MQTT_URL
