"""Read stored readings back: :class:`scada.model.ReadingStore` over PostgreSQL / TimescaleDB.

The same SQL serves both engines: both keep a ``(point, ts)`` index, so ``latest`` (``ORDER BY ts
DESC LIMIT 1``) walks one point's newest rows backwards and, on the partitioned table, stops in the
newest partition that has data instead of scanning them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg

from scada.model import NotFound, PointId, Quality, QualityCode, Reading, split_point_id

__all__ = ["PostgresReadingStore"]

_LATEST: Final = """
SELECT ts, value, quality, reason FROM readings WHERE point = $1 ORDER BY ts DESC LIMIT 1"""
_HISTORY: Final = """
SELECT ts, value, quality, reason FROM readings
WHERE point = $1 AND ts >= $2 AND ts < $3 ORDER BY ts LIMIT $4"""


class PostgresReadingStore:
    """Latest value and history of a point, with quality rebuilt from the stored code and reason.

    An unknown (or malformed) point id raises :class:`scada.model.NotFound`; a known point without
    data has ``latest() is None`` and an empty history.
    """

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._ids: dict[str, int] = {}  # points are never renumbered, so positive hits stay valid

    async def latest(self, point: PointId) -> Reading | None:
        """Return the newest stored reading of ``point``, or None if it has none yet."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            point_key = await self._point_key(conn, point)
            row = await conn.fetchrow(_LATEST, point_key, timeout=self._timeout_s)
        return None if row is None else _reading(point, row)

    async def history(
        self, point: PointId, start: datetime, end: datetime, *, limit: int
    ) -> Sequence[Reading]:
        """Return readings with ``start <= ts < end``, oldest first, at most ``limit``."""
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("history: start and end must be timezone-aware")
        if limit < 1:
            raise ValueError("history: limit must be >= 1")
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            point_key = await self._point_key(conn, point)
            if start >= end:
                return []
            rows = await conn.fetch(_HISTORY, point_key, start, end, limit, timeout=self._timeout_s)
        return [_reading(point, row) for row in rows]

    async def _point_key(self, conn: Any, point: PointId) -> int:
        cached = self._ids.get(point)
        if cached is not None:
            return cached
        split_point_id(point)  # raises NotFound for a malformed id before we query
        point_key = await conn.fetchval(
            "SELECT id FROM points WHERE point_id = $1", point, timeout=self._timeout_s
        )
        if point_key is None:
            raise NotFound(f"unknown point {point!r}")
        self._ids[point] = int(point_key)
        return int(point_key)


def _reading(point: PointId, row: Any) -> Reading:
    quality = Quality(QualityCode(row["quality"]), row["reason"] or "")
    return Reading(point=point, ts=row["ts"], value=row["value"], quality=quality)
