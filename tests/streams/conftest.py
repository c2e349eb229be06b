"""Fixtures of the streams tests: a migrated database holding a few points."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from _streams_helpers import POINTS, add_points

from scada.db import create_pool, migrate


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a freshly migrated database holding the points in POINTS."""
    pool = await create_pool(pg_url, timeout_s=5, max_size=4)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            await add_points(conn, *POINTS)
        yield pool
    finally:
        await pool.close()
