"""The live websocket ``GET /api/v1/ws``: subscriptions, snapshots, coalesced deltas, heartbeats.

The message protocol is documented in docs/websocket.md. A connection owns one
:class:`streams.live.Subscription`; the receive loop here changes what it follows, and one sender task
pulls frames from it (coalesced readings at most ``max_rate_hz`` times a second, queued events as they
come) and sends an application heartbeat every :data:`HEARTBEAT_S` so a browser can tell a quiet
plant from a dead connection. Everything a client asks for is cut to the caller's nodes
(:func:`scada.api.auth.scope_of`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Mapping, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
from aiohttp import WSMsgType, web

from scada.api.alarms import ALARM_STORE, alarm_status_json
from scada.api.auth import AUTH, scope_of
from scada.api.routes import CATALOG, HUB, WS_HEARTBEAT_S, WS_MAX_POINTS_PER_CLIENT
from scada.catalog import SiteCatalog
from scada.model import DeviceId, NotFound, PointId
from scada.security import NodeTree
from streams.live import (
    MAX_RATE_HZ,
    MIN_RATE_HZ,
    AlarmFrame,
    EventFrame,
    LiveHub,
    ReadingsFrame,
    Subscription,
    Topic,
    availability_json,
)

__all__ = ["HEARTBEAT_S", "websocket"]

_LOGGER = logging.getLogger(__name__)

HEARTBEAT_S: Final = 10.0
"""Period of the application-level ``heartbeat`` message (websocket pings run every 15 s besides)."""
MAX_MESSAGE_BYTES: Final = 1 << 20
_LIST_FIELDS: Final = ("points", "devices", "nodes", "topics")


class _BadMessage(ValueError):
    """A client message the server cannot act on; its text goes back as an ``error`` message."""


@dataclass(frozen=True, slots=True)
class _Scope:
    """What a connection may reach: its nodes, and the devices and points under them."""

    nodes: frozenset[str] | None
    devices: frozenset[DeviceId] | None
    tree: NodeTree
    """The site's hierarchy (it keeps each node's descendants once computed)."""


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Push what a client subscribes to: a snapshot first, then coalesced deltas and events."""
    ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    app = request.app
    scope = _scope(app, scope_of(request))
    with app[HUB].subscribe() as sub:
        sub.visible_nodes, sub.visible_devices = scope.nodes, scope.devices
        sender = asyncio.create_task(_send_frames(ws, sub, app[HUB]), name="ws-sender")
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await _handle_client_message(ws, sub, app, msg.data, scope)
                elif msg.type is WSMsgType.ERROR:
                    _LOGGER.debug("websocket closed with error: %s", ws.exception())
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    return ws


def _scope(app: web.Application, nodes: Set[str] | None) -> _Scope:
    catalog = app[CATALOG]
    auth = app.get(AUTH)
    tree = auth.tree if auth is not None else NodeTree({str(k): v for k, v in catalog.parents.items()})
    if nodes is None:
        return _Scope(nodes=None, devices=None, tree=tree)
    devices = frozenset(DeviceId(d.id) for d in catalog.site.devices if d.node in nodes)
    return _Scope(nodes=frozenset(nodes), devices=devices, tree=tree)


async def _handle_client_message(
    ws: web.WebSocketResponse, sub: Subscription, app: web.Application, data: str, scope: _Scope
) -> None:
    try:
        message = json.loads(data)
        kind = message["type"]
    except (ValueError, KeyError, TypeError):
        await ws.send_json({"type": "error", "detail": "expected a JSON object with a 'type'"})
        return
    try:
        if kind == "ping":
            await ws.send_json({"type": "pong"})
        elif kind in ("subscribe_alarms", "unsubscribe_alarms"):
            await _alarm_subscription(ws, sub, kind == "subscribe_alarms", message, app=app, scope=scope)
        elif kind == "subscribe":
            await _subscribe(ws, sub, message, app=app, scope=scope)
        elif kind == "unsubscribe":
            await _unsubscribe(ws, sub, message, catalog=app[CATALOG], scope=scope)
        else:
            await ws.send_json({"type": "error", "detail": f"unknown message type {kind!r}"})
    except _BadMessage as err:
        await ws.send_json({"type": "error", "detail": str(err)})


def _string_list(message: Mapping[str, Any], name: str) -> list[str]:
    value = message.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _BadMessage(f"'{name}' must be a list of strings")
    return value


@dataclass(frozen=True, slots=True)
class _Request:
    """A subscribe or unsubscribe message resolved against the catalog and the caller's scope."""

    points: list[PointId]
    devices: list[DeviceId]
    nodes: list[str]
    topics: list[Topic]
    unknown: list[str]


def _resolve(message: Mapping[str, Any], catalog: SiteCatalog, scope: _Scope) -> _Request:
    """Turn points, devices and nodes (with descendants) into point ids the caller may see."""
    lists = {name: _string_list(message, name) for name in _LIST_FIELDS}
    topics = [_topic(name) for name in lists["topics"]]
    unknown: list[str] = []
    points: dict[PointId, None] = {}
    for point_id in lists["points"]:
        if catalog.has_point(point_id) and scope_allows(scope, catalog.point(point_id).device.id):
            points[PointId(point_id)] = None
        else:
            unknown.append(point_id)
    devices: dict[DeviceId, None] = {}
    for device_id in lists["devices"]:
        if _has_device(catalog, device_id) and scope_allows(scope, device_id):
            devices[DeviceId(device_id)] = None
        else:
            unknown.append(device_id)
    nodes = _resolve_nodes(lists["nodes"], catalog, scope, devices, unknown)
    for device_id in devices:
        for p in catalog.device(device_id).points:
            points[PointId(f"{device_id}.{p.key}")] = None
    return _Request(list(points), list(devices), nodes, topics, unknown)


def _resolve_nodes(
    requested: list[str],
    catalog: SiteCatalog,
    scope: _Scope,
    devices: dict[DeviceId, None],
    unknown: list[str],
) -> list[str]:
    """Add the visible devices under each requested node to ``devices``; return the nodes found."""
    nodes: list[str] = []
    for node_id in requested:
        if node_id in scope.tree and (scope.nodes is None or node_id in scope.nodes):
            nodes.append(node_id)
            under = scope.tree.descendants(node_id)
            for d in catalog.site.devices:
                if d.node in under and scope_allows(scope, d.id):
                    devices[DeviceId(d.id)] = None
        else:
            unknown.append(node_id)
    return nodes


def _topic(name: str) -> Topic:
    try:
        return Topic(name)
    except ValueError:
        expected = ", ".join(t.value for t in Topic)
        raise _BadMessage(f"topics: unknown topic {name!r} (expected one of {expected})") from None


def _echo(message: Mapping[str, Any], request: _Request) -> dict[str, Any]:
    """Return the resolved devices, nodes and topics of the lists the message named."""
    resolved = {"devices": request.devices, "nodes": request.nodes, "topics": request.topics}
    return {name: value for name, value in resolved.items() if name in message}


def scope_allows(scope: _Scope, device_id: str) -> bool:
    """Return True if the device lies within the caller's nodes."""
    return scope.devices is None or device_id in scope.devices


def _has_device(catalog: SiteCatalog, device_id: str) -> bool:
    try:
        catalog.device(device_id)
    except NotFound:
        return False
    return True


def _parse_rate(message: Mapping[str, Any]) -> float | None:
    if "max_rate_hz" not in message:
        return None
    rate = message["max_rate_hz"]
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or not MIN_RATE_HZ <= rate <= MAX_RATE_HZ
    ):
        raise _BadMessage(f"max_rate_hz: must be a number within [{MIN_RATE_HZ:g}, {MAX_RATE_HZ:g}]")
    return float(rate)


async def _subscribe(
    ws: web.WebSocketResponse,
    sub: Subscription,
    message: Mapping[str, Any],
    *,
    app: web.Application,
    scope: _Scope,
) -> None:
    """Follow points, devices, nodes and topics: answer ``subscribed``, then a ``snapshot``."""
    hub: LiveHub = app[HUB]
    request = _resolve(message, app[CATALOG], scope)
    rate = _parse_rate(message)
    if len(sub.points | set(request.points)) > WS_MAX_POINTS_PER_CLIENT:
        raise _BadMessage(f"at most {WS_MAX_POINTS_PER_CLIENT} points per connection")
    if rate is not None:
        sub.max_rate_hz = rate
    sub.points.update(request.points)
    sub.devices.update(request.devices)
    sub.topics.update(request.topics)
    reply: dict[str, Any] = {"type": "subscribed", "points": request.points, "unknown": request.unknown}
    reply.update(_echo(message, request))
    if "max_rate_hz" in message or request.topics or request.devices or request.nodes:
        reply["max_rate_hz"] = sub.max_rate_hz
    await ws.send_json(reply)
    readings = hub.readings_json(hub.snapshot_rows(request.points))
    availability = [
        availability_json(e) for d in request.devices if (e := hub.availability.get(d)) is not None
    ]
    await ws.send_str(
        f'{{"type": "snapshot", "readings": {readings}, "availability": {json.dumps(availability)}}}'
    )
    if Topic.ALARMS in request.topics:
        await _alarm_subscription(ws, sub, True, message, app=app, scope=scope)


async def _unsubscribe(
    ws: web.WebSocketResponse,
    sub: Subscription,
    message: Mapping[str, Any],
    *,
    catalog: SiteCatalog,
    scope: _Scope,
) -> None:
    """Stop following points (named, or of the devices and nodes named) and topics."""
    request = _resolve(message, catalog, scope)
    sub.points.difference_update(request.points)
    sub.devices.difference_update(request.devices)
    sub.topics.difference_update(request.topics)
    if Topic.ALARMS in request.topics:
        sub.alarm_consoles = None
    reply: dict[str, Any] = {"type": "unsubscribed", "points": request.points}
    reply.update(_echo(message, request))
    await ws.send_json(reply)


async def _alarm_subscription(
    ws: web.WebSocketResponse,
    sub: Subscription,
    follow: bool,
    message: Mapping[str, Any],
    *,
    app: web.Application,
    scope: _Scope,
) -> None:
    """Follow (or stop following) the alarms of some consoles, or of all without ``consoles``."""
    if not follow:
        sub.alarm_consoles = None
        sub.topics.discard(Topic.ALARMS)
        await ws.send_json({"type": "unsubscribed_alarms"})
        return
    consoles = message.get("consoles", [])
    if not isinstance(consoles, list) or not all(isinstance(c, str) for c in consoles):
        raise _BadMessage("'consoles' must be a list of console ids")
    sub.alarm_consoles = set(consoles)
    sub.topics.add(Topic.ALARMS)
    await ws.send_json({"type": "subscribed_alarms", "consoles": sorted(consoles)})
    store = app.get(ALARM_STORE)
    current: list[dict[str, Any]] = []
    if store is not None:
        try:
            rows = await store.statuses(console=None, active_only=True)
        except (OSError, TimeoutError, asyncpg.PostgresError) as err:
            raise _BadMessage(f"alarm snapshot unavailable: {err}") from None
        current = [
            a
            for a in (alarm_status_json(r) for r in rows)
            if (not consoles or a["console"] in consoles)
            and (scope.nodes is None or a.get("node") in scope.nodes)
        ]
    await ws.send_json({"type": "alarm_snapshot", "alarms": current})


async def _send_frames(ws: web.WebSocketResponse, sub: Subscription, hub: LiveHub) -> None:
    """Send the subscription's frames as they become due, and a heartbeat every HEARTBEAT_S."""
    loop = asyncio.get_running_loop()
    next_heartbeat = loop.time() + HEARTBEAT_S
    while not ws.closed:
        try:
            async with asyncio.timeout_at(next_heartbeat):
                frame = await sub.next_frame()
        except TimeoutError:
            next_heartbeat = loop.time() + HEARTBEAT_S
            await ws.send_json({"type": "heartbeat", "ts": datetime.now(UTC).isoformat()})
            continue
        if sub.dropped_frames:
            await ws.send_json({"type": "dropped", "frames": sub.dropped_frames})
            sub.dropped_frames = 0
        if isinstance(frame, ReadingsFrame):
            await ws.send_str('{"type": "readings", "readings": ' + hub.readings_json(frame.rows) + "}")
        elif isinstance(frame, AlarmFrame):
            await ws.send_json({"type": "alarms", "events": frame.events})
        elif isinstance(frame, EventFrame):
            await ws.send_json({"type": "event", "topic": frame.topic.value, "event": frame.event})
