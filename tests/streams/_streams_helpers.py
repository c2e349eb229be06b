"""Helpers shared by the streams tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from scada.model import PointId, Quality, Reading

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
"""A fixed instant in the past of the test machines' clock (the historian rejects the far future)."""

POINTS = ("m1.power_kw", "m1.energy_kwh", "m2.power_kw")


def reading(point: str, ts: datetime, value: float | None = 1.0, quality: Quality | None = None) -> Reading:
    """Build a reading tersely."""
    return Reading(point=PointId(point), ts=ts, value=value, quality=quality or Quality.good())


async def wait_for(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Wait until ``condition`` holds (polling the event loop), or fail the test."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = condition()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)


def unused_port() -> int:
    """Return a local TCP port nobody listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fast_failing_redis(port: int) -> aioredis.Redis:
    """A client that fails fast: short timeouts and no library retries (our loops do the retrying)."""
    return aioredis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=1,
        socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )


async def add_points(conn: asyncpg.Connection, *point_ids: str) -> None:
    """Insert a node, the devices and the points of ``point_ids`` (idempotently)."""
    await conn.execute(
        "INSERT INTO nodes (id, name, level) VALUES ('plant', 'Plant', 'group') ON CONFLICT DO NOTHING"
    )
    for point_id in point_ids:
        device, key = point_id.split(".")
        await conn.execute(
            "INSERT INTO devices (id, node_id, name, kind, protocol)"
            " VALUES ($1, 'plant', $1, 'meter', 'modbus') ON CONFLICT DO NOTHING",
            device,
        )
        await conn.execute(
            "INSERT INTO points (point_id, device_id, key, name, kind, unit)"
            " VALUES ($1, $2, $3, $3, 'power', 'kW') ON CONFLICT DO NOTHING",
            point_id,
            device,
            key,
        )
