"""The live websocket over a real API server, through the Python client in ``cockpit.client``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from _auth_helpers import TEST_SECRET_KEY, access_token, two_tenant_site
from aiohttp import web
from aiohttp.test_utils import TestServer

import scada.api.ws
from cockpit.client import ApiClient, ApiError, LiveClient
from scada.app import Role as ProcessRole
from scada.app import create_app
from scada.config import parse_site
from scada.model import PointId, Reading, StreamName
from scada.runtime import Backoff
from scada.security import Grant, Principal, PrincipalKind, Role
from scada.services import Endpoints
from scada.settings import Settings
from streams.bus import stream_key
from streams.codec import encode_readings

SITE = two_tenant_site(
    "Live site",
    extra_points=[
        "{key: q_kvar, kind: power, unit: kW, carrier: electricity, modbus: {address: 2, type: float32}}"
    ],
)


def token(tenant: str, node: str, role: Role = Role.VIEWER) -> str:
    principal = Principal(
        tenant=tenant,
        subject=f"{tenant}-user",
        kind=PrincipalKind.USER,
        grants=(Grant(node, role),),
        tenant_nodes=frozenset({node}),
    )
    return access_token(principal)


@pytest.fixture
async def server(
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    aiohttp_server: Callable[[web.Application], Any],
) -> TestServer:
    settings = Settings(stream_prefix=stream_prefix, secret_key=TEST_SECRET_KEY)
    endpoints = Endpoints(db_url=pg_url, redis_url=redis_url, mqtt_url=mqtt_url, origins={})
    app = create_app(parse_site(SITE), settings, endpoints, roles=frozenset({ProcessRole.API}))
    started: TestServer = await aiohttp_server(app)
    return started


async def publish(redis: aioredis.Redis, prefix: str, values: dict[str, float]) -> None:
    now = datetime.now(UTC)
    readings = [Reading(point=PointId(p), ts=now, value=v) for p, v in values.items()]
    await redis.xadd(stream_key(prefix, StreamName.READINGS), encode_readings(readings))


async def next_of(live: LiveClient, kind: str, timeout_s: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            message = await live.next_message(timeout_s)
            if message["type"] == kind:
                return message


async def test_node_subscription_snapshot_then_coalesced_deltas_within_the_tenant(
    server: TestServer, redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    base = str(server.make_url("")).rstrip("/")
    async with LiveClient(base, token("east", "grp-e")) as live:
        await live.wait_connected()
        await live.subscribe(nodes=["grp-e", "grp-w"], devices=["m-w"], topics=["ledger"], max_rate_hz=2)
        subscribed = await next_of(live, "subscribed")
        assert sorted(subscribed["points"]) == ["m-e1.p_kw", "m-e1.q_kvar", "m-e2.p_kw", "m-e2.q_kvar"]
        assert sorted(subscribed["unknown"]) == ["grp-w", "m-w"]  # another tenant's: as if absent
        assert subscribed["max_rate_hz"] == 2
        snapshot = await next_of(live, "snapshot")
        assert snapshot["readings"] == []
        await asyncio.sleep(0.3)  # let the feed reach the stream's end
        for value in (1.0, 2.0, 3.0):
            await publish(redis_client, stream_prefix, {"m-e1.p_kw": value, "m-w.p_kw": value})
        seen: dict[str, float] = {}
        async with asyncio.timeout(5):
            while seen.get("m-e1.p_kw") != 3.0:
                frame = await next_of(live, "readings")
                seen.update({r["point"]: r["value"] for r in frame["readings"]})
        assert "m-w.p_kw" not in seen


async def test_protocol_errors_name_the_field_and_old_messages_still_work(
    server: TestServer, redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    base = str(server.make_url("")).rstrip("/")
    async with LiveClient(base, token("east", "grp-e")) as live:
        await live.wait_connected()
        ws = live._ws
        assert ws is not None
        for bad, field in (
            ({"type": "subscribe", "max_rate_hz": 50}, "max_rate_hz"),
            ({"type": "subscribe", "topics": ["weather"]}, "topics"),
            ({"type": "subscribe", "nodes": "grp-e"}, "nodes"),
        ):
            await ws.send_json(bad)
            assert field in (await next_of(live, "error"))["detail"]
        await ws.send_json({"type": "subscribe", "points": ["m-e2.p_kw"]})
        assert await next_of(live, "subscribed") == {
            "type": "subscribed",
            "points": ["m-e2.p_kw"],
            "unknown": [],
        }
        await ws.send_json({"type": "unsubscribe", "points": ["m-e2.p_kw"]})
        assert await next_of(live, "unsubscribed") == {"type": "unsubscribed", "points": ["m-e2.p_kw"]}
        await ws.send_json({"type": "ping"})
        assert await next_of(live, "pong") == {"type": "pong"}


async def test_heartbeat_and_reconnect_with_resubscription(
    server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scada.api.ws, "HEARTBEAT_S", 0.2)
    base = str(server.make_url("")).rstrip("/")
    async with LiveClient(base, token("east", "grp-e")) as live:
        await live.subscribe(points=["m-e1.p_kw"])
        heartbeat = await next_of(live, "heartbeat")
        assert datetime.fromisoformat(heartbeat["ts"]).tzinfo is not None
    quiet = LiveClient(
        base, token("east", "grp-e"), silence_limit_s=0.1, backoff=Backoff(initial_s=0.05, max_s=0.1)
    )
    monkeypatch.setattr(scada.api.ws, "HEARTBEAT_S", 10.0)  # silence outlasts the client's limit
    async with quiet:
        await quiet.subscribe(points=["m-e1.p_kw"])
        for _ in range(2):
            assert (await next_of(quiet, "subscribed"))["points"] == ["m-e1.p_kw"]
        assert quiet.connections >= 2


async def test_rest_client_raises_the_problem_detail(server: TestServer) -> None:
    base = str(server.make_url("")).rstrip("/")
    async with ApiClient(base, token("east", "grp-e")) as api:
        points = await api.get("/api/v1/points", device="m-e1")
        assert {p["id"] for p in points["items"]} == {"m-e1.p_kw", "m-e1.q_kvar"}
        with pytest.raises(ApiError) as raised:
            await api.get("/api/v1/points/m-w.p_kw")
        assert raised.value.status == 404
        assert "m-w.p_kw" in raised.value.detail
        with pytest.raises(ApiError) as refused:
            await api.post("/api/v1/api-keys", {"name": "x", "node": "grp-e", "role": "viewer"})
        assert refused.value.status == 403
