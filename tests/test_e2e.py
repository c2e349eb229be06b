"""End to end over real sockets and real services.

A Modbus TCP meter simulator -> ModbusDriver polled by a DeviceSession -> Redis stream ``readings``
-> historian consumer group -> PostgreSQL, and -> live feed -> REST API and websocket clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from _auth_helpers import TEST_SECRET_KEY, admin_headers
from _plant_helpers import eventually, simulated_plant
from aiohttp import web
from aiohttp.test_utils import TestClient

from scada.app import PLANT, create_app
from scada.config import SiteConfig, parse_site
from scada.model import StreamName
from scada.services import Endpoints
from scada.settings import Settings
from simulators.plant import SimulatedPlant
from streams.bus import read_deadletter, stream_key

SITE = """
site: {{id: e2e, name: End to end}}
hierarchy:
  - id: g
    name: G
    level: group
    children: [{{id: p, name: P, level: park, children: [{{id: e, name: E, level: enterprise,
                 children: [{{id: w, name: W, level: workshop}}]}}]}}]
templates:
  meter:
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity, modbus: {{address: 4, type: float32}}}}
      - {{key: energy_import_kwh, kind: energy_counter, unit: kWh, carrier: electricity, scale: 0.1,
          modbus: {{address: 10, type: uint32}}}}
      - {{key: voltage_v, kind: voltage, unit: V, modbus: {{address: 0, type: float32}}}}
devices:
  - {{id: meter-1, node: w, kind: power_meter, protocol: modbus_tcp, template: meter, poll_period_s: 0.2,
     modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1, timeout_s: 0.5}},
     simulation: {{profile: flat, base_kw: 80, seed: 1}}}}
  - {{id: meter-2, node: w, kind: power_meter, protocol: modbus_tcp, template: meter, poll_period_s: 0.2,
     modbus: {{host: 127.0.0.1, port: {port}, unit_id: 2, timeout_s: 0.5}},
     simulation: {{profile: flat, base_kw: 20, seed: 2}}}}
  - {{id: meter-gone, node: w, kind: power_meter, protocol: modbus_tcp, template: meter, poll_period_s: 0.2,
     modbus: {{host: 127.0.0.1, port: {dead_port}, unit_id: 1, timeout_s: 0.5}}}}
"""

POWER = "meter-1.active_power_kw"


@pytest.fixture
def site(unused_tcp_port_factory: Callable[[], int]) -> SiteConfig:
    return parse_site(SITE.format(port=unused_tcp_port_factory(), dead_port=unused_tcp_port_factory()))


@pytest.fixture
async def simulators(site: SiteConfig) -> AsyncIterator[SimulatedPlant]:
    async with simulated_plant(site, without={"meter-gone"}) as plant:  # that one has no hardware
        yield plant


@pytest.fixture
async def server(
    site: SiteConfig,
    simulators: SimulatedPlant,
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    redis_client: aioredis.Redis,
    aiohttp_client: Callable[[web.Application], Any],
) -> TestClient[web.Request, web.Application]:
    del simulators, redis_client  # started first; the client fixture cleans this test's keys
    settings = Settings(stream_prefix=stream_prefix, secret_key=TEST_SECRET_KEY)
    endpoints = Endpoints(db_url=pg_url, redis_url=redis_url, mqtt_url=mqtt_url, origins={})
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        create_app(site, settings, endpoints), headers=admin_headers(site)
    )
    return client


async def test_a_value_changed_in_the_simulator_reaches_postgres_rest_and_websocket(
    server: TestClient[web.Request, web.Application],
    simulators: SimulatedPlant,
    pg_url: str,
) -> None:
    ws = await server.ws_connect("/api/v1/ws")
    await ws.send_json({"type": "subscribe", "points": [POWER, "meter-1.nonexistent"]})
    subscribed = await ws.receive_json(timeout=5)
    assert subscribed == {"type": "subscribed", "points": [POWER], "unknown": ["meter-1.nonexistent"]}
    assert (await ws.receive_json(timeout=5))["type"] == "snapshot"

    simulators.device("meter-1").override("active_power_kw", 1234.5)

    async def pushed() -> dict[str, Any] | None:
        message = await ws.receive_json(timeout=5)
        hits = [r for r in message.get("readings", []) if r["value"] == 1234.5]
        return hits[0] if hits else None

    frame = await eventually(pushed)
    assert frame["point"] == POWER
    assert frame["quality"] == "good"

    async def rest_latest() -> dict[str, Any] | None:
        response = await server.get(f"/api/v1/points/{POWER}/latest")
        body: dict[str, Any] = await response.json()
        return body if body.get("value") == 1234.5 else None

    latest = await eventually(rest_latest)
    assert latest["ts"].endswith("+00:00")

    conn = await asyncpg.connect(pg_url, timeout=10)
    try:

        async def stored() -> int:
            count: int = await conn.fetchval(
                """SELECT count(*) FROM readings r JOIN points p ON p.id = r.point
                   WHERE p.point_id = $1 AND r.value = 1234.5 AND r.quality = 2""",
                POWER,
            )
            return count

        assert await eventually(stored) >= 1
        duplicates = await conn.fetchval(
            "SELECT count(*) FROM (SELECT point, ts FROM readings GROUP BY 1, 2 HAVING count(*) > 1) d"
        )
        assert duplicates == 0
    finally:
        await conn.close()

    history = await (await server.get(f"/api/v1/points/{POWER}/history")).json()
    assert any(r["value"] == 1234.5 for r in history["readings"])
    await ws.close()


async def test_an_unreachable_device_is_marked_offline_with_bad_quality_and_nothing_crashes(
    server: TestClient[web.Request, web.Application],
) -> None:
    async def offline() -> dict[str, Any] | None:
        devices = (await (await server.get("/api/v1/devices")).json())["items"]
        gone = next(d for d in devices if d["id"] == "meter-gone")
        return gone if gone["availability"] == "offline" else None

    gone = await eventually(offline)
    assert "cannot connect" in gone["availability_reason"] or "refused" in gone["availability_reason"]

    latest = await (await server.get("/api/v1/points/meter-gone.active_power_kw/latest")).json()
    assert latest["value"] is None
    assert latest["quality"] == "bad"
    assert latest["reason"].startswith("device offline:")

    session = server.app[PLANT].sessions["meter-gone"]
    await eventually(lambda: session.stats.polls_failed >= 2)  # it keeps retrying...
    assert server.app[PLANT].sessions["meter-1"].available is True  # ...and the others keep working
    assert not server.app[PLANT].supervisor.failures


async def test_poison_entries_are_dead_lettered_and_ingest_goes_on(
    server: TestClient[web.Request, web.Application],
    redis_client: aioredis.Redis,
    stream_prefix: str,
) -> None:
    readings_key = stream_key(stream_prefix, StreamName.READINGS)
    await redis_client.xadd(readings_key, {b"v": b"1", b"r": b"[[not json"})
    deadletter_key = stream_key(stream_prefix, StreamName.DEADLETTER)
    entries = await eventually(lambda: read_deadletter(redis_client, deadletter_key, 10))
    assert "json" in entries[0]["reason"].lower()
    assert entries[0]["origin"] == readings_key
    over_api = (await (await server.get("/api/v1/deadletter")).json())["items"]
    assert over_api[0]["reason"] == entries[0]["reason"]
    assert over_api[0]["raw"]["r"] == "[[not json"
    before = server.app[PLANT].historian
    assert before is not None
    written = before.written_total
    await eventually(lambda: before.written_total > written)


@pytest.mark.parametrize(
    ("path", "status", "slug"),
    [
        ("/api/v1/points/nope.nothing/latest", 404, "not-found"),
        ("/api/v1/points/not-a-point-id/latest", 404, "not-found"),
        (f"/api/v1/points/{POWER}/history?start=yesterday", 400, "invalid-request"),
        (f"/api/v1/points/{POWER}/history?start=2026-01-01T00:00:00", 400, "invalid-request"),
        (
            f"/api/v1/points/{POWER}/history?start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z",
            400,
            "invalid-request",
        ),
        (f"/api/v1/points/{POWER}/history?limit=0", 400, "invalid-request"),
        (f"/api/v1/points/{POWER}/history?limit=ten", 400, "invalid-request"),
        ("/api/v1/points?device=nope", 404, "not-found"),
        ("/api/v1/nothing-here", 404, "not-found"),
    ],
)
async def test_bad_requests_get_problem_json(
    server: TestClient[web.Request, web.Application],
    path: str,
    status: int,
    slug: str,
) -> None:
    response = await server.get(path)
    assert response.status == status
    assert response.content_type == "application/problem+json"
    body = await response.json()
    assert body["status"] == status
    assert body["type"].endswith("/" + slug)
    assert body["detail"]
    assert "Traceback" not in await response.text()


async def test_catalog_and_health(server: TestClient[web.Request, web.Application], pg_url: str) -> None:
    health = await (await server.get("/api/v1/health")).json()
    assert health["status"] == "ok"
    points = (await (await server.get("/api/v1/points?device=meter-2")).json())["items"]
    assert [p["id"] for p in points] == [
        "meter-2.active_power_kw",
        "meter-2.energy_import_kwh",
        "meter-2.voltage_v",
    ]
    site = await (await server.get("/api/v1/site")).json()
    assert site["hierarchy"][0]["children"][0]["children"][0]["children"][0]["id"] == "w"
    conn = await asyncpg.connect(pg_url, timeout=10)
    try:
        assert await conn.fetchval("SELECT count(*) FROM points WHERE retired_at IS NULL") == 9
        assert await conn.fetchval("SELECT level FROM nodes WHERE id = 'w'") == "workshop"
    finally:
        await conn.close()


async def test_websocket_rejects_malformed_messages_without_closing(
    server: TestClient[web.Request, web.Application],
) -> None:
    ws = await server.ws_connect("/api/v1/ws")
    for bad in ("not json", '{"no": "type"}', '{"type": "dance"}', '{"type": "subscribe", "points": "x"}'):
        await ws.send_str(bad)
        message = await ws.receive_json(timeout=5)
        assert message["type"] == "error"
    await ws.send_json({"type": "ping"})
    assert (await ws.receive_json(timeout=5)) == {"type": "pong"}
    await ws.close()
