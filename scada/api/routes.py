"""REST resources of /api/v1 and the live websocket.

Handlers receive their collaborators (catalog, store, hub) through typed app keys set by
:mod:`scada.app`; they never construct services themselves. Timestamps are ISO 8601 in UTC.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from control_engine.factors import FactorLibrary
from scada import __version__
from scada.api.auth import scope_of
from scada.api.metrics import metrics
from scada.api.openapi import docs_page, openapi_json
from scada.api.problem import ApiProblem, invalid, parse_time, query_cursor, query_int
from scada.catalog import COUNTER_KINDS, PointEntry, SiteCatalog
from scada.config import NodeConfig
from scada.leader import LeaderLease
from scada.model import UTC, Carrier, DeviceId, NotFound, Reading, ReadingStore, ServiceError
from streams.bus import read_deadletter
from streams.live import LiveHub
from streams.query import DownsampleMode
from streams.store import INTERVALS, PostgresReadingStore

__all__ = [
    "CATALOG",
    "DEADLETTER",
    "FACTORS",
    "HUB",
    "QUERIES",
    "SERVICE_ORIGINS",
    "STORE",
    "DeadLetterView",
    "add_routes",
    "reading_json",
]

_LOGGER = logging.getLogger(__name__)

CATALOG = web.AppKey("catalog", SiteCatalog)
STORE = web.AppKey("store", ReadingStore)
QUERIES = web.AppKey("queries", PostgresReadingStore)
"""Downsampled history and energy queries (the PostgreSQL store itself)."""
HUB = web.AppKey("hub", LiveHub)
SERVICE_ORIGINS = web.AppKey("service_origins", dict[str, str])
FACTORS = web.AppKey("factors", FactorLibrary)
LEASE = web.AppKey("control_lease", LeaderLease)
"""The control lease, in a process with the control role (its status is part of the health answer)."""
"""The emission factor library with the site's overrides."""


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """Where the dead-letter stream lives, so operators can see what was set aside and why."""

    redis: aioredis.Redis
    key: str
    timeout_s: float


DEADLETTER = web.AppKey("deadletter", DeadLetterView)

HISTORY_MAX_ROWS = 100_000
HISTORY_DEFAULT_SPAN = timedelta(hours=1)
HISTORY_DEFAULT_POINTS = 1_000
HISTORY_MAX_POINTS = 20_000
ENERGY_DEFAULT_SPAN = timedelta(days=1)
ENERGY_MAX_INTERVALS = 50_000
WS_HEARTBEAT_S = 15.0
WS_MAX_POINTS_PER_CLIENT = 10_000


def add_routes(app: web.Application) -> None:
    """Register every /api/v1 route on ``app``."""
    app.router.add_get("/api/v1/health", health)
    app.router.add_get("/api/v1/site", site)
    app.router.add_get("/api/v1/devices", devices)
    app.router.add_get("/api/v1/points", points)
    app.router.add_get("/api/v1/points/{point_id}", point)
    app.router.add_get("/api/v1/points/{point_id}/latest", latest)
    app.router.add_get("/api/v1/points/{point_id}/history", history)
    app.router.add_get("/api/v1/points/{point_id}/energy", point_energy)
    app.router.add_get("/api/v1/nodes/{node_id}/energy", node_energy)
    app.router.add_get("/api/v1/deadletter", deadletter)
    app.router.add_get("/api/v1/emission-factors", emission_factors)
    app.router.add_get("/api/v1/emission-factors/{factor_id}", emission_factor)
    from scada.api.ws import websocket  # noqa: PLC0415 -- ws.py builds on this module's app keys

    app.router.add_get("/api/v1/ws", websocket)
    app.router.add_get("/api/v1/openapi.json", openapi_json)
    app.router.add_get("/api/v1/docs", docs_page)
    app.router.add_get("/metrics", metrics)


def reading_json(reading: Reading) -> dict[str, Any]:
    """Render a reading for clients."""
    body: dict[str, Any] = {
        "point": reading.point,
        "ts": reading.ts.astimezone(UTC).isoformat(),
        "value": reading.value,
        "quality": reading.quality.code.name.lower(),
    }
    if reading.quality.reason:
        body["reason"] = reading.quality.reason
    return body


def _point_json(entry: PointEntry) -> dict[str, Any]:
    cfg = entry.config
    return {
        "id": entry.id,
        "device": entry.device.id,
        "key": cfg.key,
        "name": cfg.name or cfg.key,
        "kind": cfg.kind.value,
        "unit": cfg.unit.value,
        "carrier": cfg.carrier.value,
        "writable": cfg.writable,
    }


def _node_json(node: NodeConfig) -> dict[str, Any]:
    return {
        "id": node.id,
        "name": node.name,
        "level": node.level.value,
        "children": [_node_json(c) for c in node.children],
    }


async def health(request: web.Request) -> web.Response:
    """Liveness plus which services this process uses and how they were chosen."""
    hub = request.app[HUB]
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "services": request.app[SERVICE_ORIGINS],
            "live": {"readings_seen": hub.readings_seen, "subscribers": hub.subscriber_count},
            **({"control": lease.status.to_json()} if (lease := request.app.get(LEASE)) else {}),
        }
    )


async def site(request: web.Request) -> web.Response:
    """Return the site and the parts of its hierarchy tree the caller may see."""
    cfg = request.app[CATALOG].site
    scope = scope_of(request)
    return web.json_response(
        {
            "id": cfg.site.id,
            "name": cfg.site.name,
            "timezone": cfg.site.timezone,
            "hierarchy": [tree for n in cfg.hierarchy for tree in _visible_tree(n, scope)],
        }
    )


def _visible_tree(node: NodeConfig, scope: frozenset[str] | None) -> list[dict[str, Any]]:
    """Return the node's JSON if visible, else the visible subtrees below it."""
    if scope is None or node.id in scope:
        return [_node_json(node)]
    return [tree for child in node.children for tree in _visible_tree(child, scope)]


def _page(request: web.Request, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Return one page of ``items`` (``limit``, default 100, at most 1000; ``cursor`` from the last page)."""
    limit = query_int(request.query, "limit", default=100, low=1, high=1000)
    start = query_cursor(request.query, max_digits=9)
    page = items[start : start + limit]
    return {"items": page, "next_cursor": str(start + limit) if start + limit < len(items) else None}


async def devices(request: web.Request) -> web.Response:
    """Every device the caller may see, with its place in the hierarchy and its availability."""
    catalog, hub = request.app[CATALOG], request.app[HUB]
    scope = scope_of(request)
    items = []
    for device in catalog.site.devices:
        if scope is not None and device.node not in scope:
            continue
        event = hub.availability.get(DeviceId(device.id))
        items.append(
            {
                "id": device.id,
                "name": device.name or device.id,
                "node": device.node,
                "kind": device.kind.value,
                "protocol": device.protocol.value,
                "enabled": device.enabled,
                "poll_period_s": device.poll_period_s,
                "availability": event.availability.value if event else "unknown",
                "availability_since": event.ts.isoformat() if event else None,
                "availability_reason": event.reason if event else "",
                "points": [device.point_id(p.key) for p in device.points],
            }
        )
    return web.json_response(_page(request, items))


async def points(request: web.Request) -> web.Response:
    """Every point the caller may see, optionally only those of one device (``?device=``)."""
    catalog = request.app[CATALOG]
    scope = scope_of(request)
    device = request.query.get("device")
    if device is not None:
        node = catalog.device(device).node  # 404 for an unknown device rather than an empty list
        if scope is not None and node not in scope:
            raise NotFound(f"no device {device!r} in site {catalog.site.site.id!r}")
    items = [
        _point_json(e)
        for e in catalog.points()
        if (device is None or e.device.id == device) and (scope is None or e.device.node in scope)
    ]
    return web.json_response(_page(request, items))


async def point(request: web.Request) -> web.Response:
    """One point's configuration."""
    return web.json_response(_point_json(request.app[CATALOG].point(request.match_info["point_id"])))


async def latest(request: web.Request) -> web.Response:
    """Return the newest reading of a point: from the live hub, else from the historian."""
    entry = request.app[CATALOG].point(request.match_info["point_id"])
    reading = request.app[HUB].latest(entry.id)
    if reading is None:
        reading = await request.app[STORE].latest(entry.id)
    if reading is None:
        raise ApiProblem(404, "No data", f"point {entry.id!r} has no reading yet", slug="no-data")
    return web.json_response(reading_json(reading))


async def history(request: web.Request) -> web.Response:
    """Return a point's history in ``[start, end)``: raw rows, or reduced on the server to ``points``.

    Without ``points`` and ``mode`` (or with ``mode=raw``): stored readings, oldest first, at most
    ``limit``. With ``points=N`` and/or ``mode=lttb|minmax``: about N samples read from raw rows or
    the coarsest rollup that still has N buckets (``source``); see docs/queries.md.
    """
    entry = request.app[CATALOG].point(request.match_info["point_id"])
    query = request.query
    end = parse_time(query.get("end"), "end") or datetime.now(UTC)
    start = parse_time(query.get("start"), "start") or end - HISTORY_DEFAULT_SPAN
    if start >= end:
        raise invalid("start must be before end")
    mode = _parse_mode(query, default=DownsampleMode.LTTB if "points" in query else DownsampleMode.RAW)
    body: dict[str, Any] = {
        "point": entry.id,
        "unit": entry.config.unit.value,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "mode": mode.value,
    }
    if mode is DownsampleMode.RAW:
        limit = query_int(query, "limit", default=10_000, low=1, high=HISTORY_MAX_ROWS)
        rows = await request.app[STORE].history(entry.id, start, end, limit=limit)
        body.update(source="raw", readings=[reading_json(r) for r in rows], truncated=len(rows) >= limit)
        return web.json_response(body)
    wanted = query_int(query, "points", default=HISTORY_DEFAULT_POINTS, low=2, high=HISTORY_MAX_POINTS)
    result = await request.app[QUERIES].downsampled(
        entry.id, start, end, points=wanted, mode=mode, raw_period_s=entry.device.poll_period_s
    )
    body.update(
        source=result.source.value,
        readings=[reading_json(r) for r in result.readings],
        truncated=result.truncated,
    )
    return web.json_response(body)


async def point_energy(request: web.Request) -> web.Response:
    """Return a counter's consumption per interval in ``[start, end)`` (wraps and resets handled)."""
    catalog = request.app[CATALOG]
    entry = catalog.point(request.match_info["point_id"])
    if entry.config.kind not in COUNTER_KINDS:
        raise invalid(f"point {entry.id!r} is a {entry.config.kind.value}, not a counter")
    start, end, interval = _energy_range(request.query)
    timezone = catalog.site.site.timezone
    try:
        rows = await request.app[QUERIES].counter_deltas(
            entry.id, start, end, interval=interval, timezone=timezone
        )
    except ValueError as err:
        raise invalid(str(err)) from err
    return web.json_response(
        {
            "point": entry.id,
            "unit": entry.config.unit.value,
            "interval": interval,
            "timezone": timezone,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "intervals": [
                {"start": r.start.astimezone(UTC).isoformat(), "delta": r.delta, "step": r.kind.value}
                for r in rows
            ],
            "total": sum(r.delta for r in rows),
        }
    )


async def node_energy(request: web.Request) -> web.Response:
    """Sum the consumption of every counter under a hierarchy node, per interval and unit."""
    catalog = request.app[CATALOG]
    node_id = request.match_info["node_id"]
    if not catalog.has_node(node_id):
        raise ApiProblem(404, "Not found", f"no node {node_id!r}", slug="not-found")
    start, end, interval = _energy_range(request.query)
    raw_carrier = request.query.get("carrier", Carrier.ELECTRICITY.value)
    if raw_carrier != "all" and raw_carrier not in {c.value for c in Carrier}:
        raise invalid(f"carrier: unknown carrier {raw_carrier!r}")
    carrier = None if raw_carrier == "all" else raw_carrier
    timezone = catalog.site.site.timezone
    try:
        rows = await request.app[QUERIES].node_energy(
            node_id, start, end, interval=interval, carrier=carrier, timezone=timezone
        )
    except ValueError as err:
        raise invalid(str(err)) from err
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(row.unit, []).append(
            {"start": row.start.astimezone(UTC).isoformat(), "energy": row.energy, "points": row.points}
        )
    return web.json_response(
        {
            "node": node_id,
            "carrier": raw_carrier,
            "interval": interval,
            "timezone": timezone,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "series": [
                {"unit": unit, "intervals": items, "total": sum(i["energy"] for i in items)}
                for unit, items in sorted(series.items())
            ],
        }
    )


def _parse_mode(query: Mapping[str, str], *, default: DownsampleMode) -> DownsampleMode:
    raw = query.get("mode")
    if raw is None:
        return default
    try:
        return DownsampleMode(raw)
    except ValueError:
        modes = ", ".join(m.value for m in DownsampleMode)
        raise invalid(f"mode: must be one of {modes}, not {raw!r}") from None


def _energy_range(query: Mapping[str, str]) -> tuple[datetime, datetime, str]:
    end = parse_time(query.get("end"), "end") or datetime.now(UTC)
    start = parse_time(query.get("start"), "start") or end - ENERGY_DEFAULT_SPAN
    if start >= end:
        raise invalid("start must be before end")
    interval = query.get("interval", "1h")
    if interval not in INTERVALS:
        raise invalid(f"interval: must be one of {', '.join(INTERVALS)}, not {interval!r}")
    if (end - start) / INTERVALS[interval][1] > ENERGY_MAX_INTERVALS:
        raise invalid(f"at most {ENERGY_MAX_INTERVALS} intervals per request: use a longer interval")
    return start, end, interval


async def deadletter(request: web.Request) -> web.Response:
    """Return the newest dead-letter entries (``?limit=``, default 100): poison input with its reason."""
    view = request.app[DEADLETTER]
    limit = query_int(request.query, "limit", default=100, low=1, high=10_000)
    try:
        entries = await read_deadletter(view.redis, view.key, limit, timeout_s=view.timeout_s)
    except RedisError as err:
        raise ServiceError(f"Redis: {err}") from err
    return web.json_response({"items": entries})


async def emission_factors(request: web.Request) -> web.Response:
    """Query the emission factor library; ``?format=csv`` exports the selection as CSV.

    Filters (all optional): ``carrier`` (energy type), ``year``, ``region``, ``scope`` (1 or 2),
    ``variant``. The answer carries the library's version.
    """
    library = request.app[FACTORS]
    query = request.query
    carrier = query.get("carrier") or None
    if carrier is not None and carrier not in {c.value for c in Carrier}:
        known = ", ".join(c.value for c in Carrier)
        raise invalid(f"carrier: unknown energy type {carrier!r} (use {known})")
    year = query_int(query, "year", default=0, low=1990, high=2100) if query.get("year") else None
    scope = query_int(query, "scope", default=0, low=1, high=2) if query.get("scope") else None
    fmt = query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise invalid(f"format: {fmt!r} is not json or csv")
    selected = library.query(
        carrier=carrier,
        year=year,
        region=query.get("region") or None,
        scope=scope,
        variant=query.get("variant") or None,
    )
    if fmt == "csv":
        return web.Response(
            text=library.to_csv(selected),
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="emission-factors-{library.version}.csv"'},
        )
    return web.Response(text=library.to_json(selected), content_type="application/json")


async def emission_factor(request: web.Request) -> web.Response:
    """Return one emission factor by id (404 problem when there is none)."""
    factor = request.app[FACTORS].get(request.match_info["factor_id"])
    return web.json_response(factor.record())
