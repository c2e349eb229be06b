"""Manual commands over REST: the server's gateway writes a simulated inverter and reads it back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from _auth_helpers import TEST_SECRET_KEY, access_token, admin_headers
from _plant_helpers import simulated_plant
from aiohttp import web
from aiohttp.test_utils import TestClient

from scada.app import Role, create_app
from scada.config import parse_site
from scada.security import Grant, Principal, PrincipalKind
from scada.security import Role as AccessRole
from scada.services import Endpoints
from scada.settings import Settings

SITE = """
site: {{id: t, name: Test}}
hierarchy: [{{id: g, name: G, level: group}}]
devices:
  - id: pv-1
    node: g
    kind: pv_inverter
    protocol: modbus_tcp
    poll_period_s: 0.2
    modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1}}
    simulation: {{profile: pv, peak_kw: 100, seed: 1}}
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: pv, modbus: {{address: 0, type: float32}}}}
      - {{key: power_limit_pct, kind: setpoint, unit: "%", writable: true, modbus: {{address: 100, type: uint16}}}}
"""


@pytest.fixture
async def server(
    unused_tcp_port: int,
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    aiohttp_client: Callable[[web.Application], Any],
) -> Any:
    site = parse_site(SITE.format(port=unused_tcp_port))
    async with simulated_plant(site) as plant:
        settings = Settings(stream_prefix=stream_prefix, secret_key=TEST_SECRET_KEY)
        endpoints = Endpoints(db_url=pg_url, redis_url=redis_url, mqtt_url=mqtt_url, origins={})
        app = create_app(site, settings, endpoints, roles=frozenset({Role.API, Role.GATEWAY}))
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            app, headers=admin_headers(site)
        )
        yield client, plant


async def test_a_manual_command_is_verified_and_audited(server: Any, pg_url: str) -> None:
    client, plant = server
    response = await client.post(
        "/api/v1/points/pv-1.power_limit_pct/commands", json={"value": 40, "reason": "grid limit test"}
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert (body["status"], body["readback"], body["requested"]) == ("verified", 40, 40.0)
    assert plant.device("pv-1").value("power_limit_pct") == 40
    conn = await asyncpg.connect(pg_url)
    try:
        actions = [r["action"] for r in await conn.fetch("SELECT action FROM audit_log ORDER BY seq")]
    finally:
        await conn.close()
    assert actions[-2:] == ["command.send", "command.result"]


@pytest.mark.parametrize(
    ("path", "body", "status", "detail"),
    [
        ("/api/v1/points/pv-1.active_power_kw/commands", {"value": 1}, 409, "not writable"),
        ("/api/v1/points/pv-1.power_limit_pct/commands", {"value": "high"}, 400, "value"),
        ("/api/v1/points/pv-1.power_limit_pct/commands", {"value": 1, "colour": 2}, 400, "colour"),
        ("/api/v1/points/nope.x/commands", {"value": 1}, 404, "nope"),
    ],
)
async def test_bad_commands_are_refused(
    server: Any, path: str, body: dict[str, Any], status: int, detail: str
) -> None:
    client, _plant = server
    response = await client.post(path, json=body)
    assert response.status == status
    assert detail in (await response.json())["detail"]


async def test_a_viewer_cannot_command(server: Any) -> None:
    client, _plant = server
    viewer = Principal("t", "v", PrincipalKind.USER, (Grant("g", AccessRole.VIEWER),), frozenset({"g"}))
    token = access_token(viewer)
    response = await client.post(
        "/api/v1/points/pv-1.power_limit_pct/commands",
        json={"value": 10},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status == 403
