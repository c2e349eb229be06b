"""Dispatches through the real server: the gateway writes a simulated inverter, reads it back, reverts.

The server runs the API, gateway, analytics and control roles; dispatch requests are submitted to the
control leader's dispatcher (the controller's rules submit them the same way), operators decide over
REST (the API process records the decision, the leader sends it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from _auth_helpers import TEST_SECRET_KEY, admin_headers
from _plant_helpers import eventually, simulated_plant
from aiohttp import web
from aiohttp.test_utils import TestClient

from control_engine.control_config import parse_control
from control_engine.controller import ControlService
from control_engine.dispatcher import Dispatch, Dispatcher, DispatchRequest, DispatchState
from control_engine.rules import NodeBudget, PointState
from scada.app import PLANT, Role, create_app
from scada.config import parse_site
from scada.model import NodeId, PointId, QualityCode
from scada.services import Endpoints
from scada.settings import Settings
from simulators.plant import SimulatedPlant

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
      - {{key: watchdog, kind: status, unit: "1", writable: true, modbus: {{address: 110, type: uint16}}}}
  - id: pv-gone
    node: g
    kind: pv_inverter
    protocol: modbus_tcp
    poll_period_s: 0.2
    modbus: {{host: 127.0.0.1, port: {gone}, unit_id: 1}}
    points:
      - {{key: power_limit_pct, kind: setpoint, unit: "%", writable: true, modbus: {{address: 100, type: uint16}}}}
control:
  default_mode: auto
  rules:
    - {{id: curtail-gone, stage: 1, node: g, kind: setpoint, targets: [pv-gone.power_limit_pct],
       parameters: {{value: 50}}}}
  interlocks:
    pv-gone.power_limit_pct: {{min: 0, max: 100}}
  heartbeat: {{points: [pv-1.watchdog], period_s: 1}}
"""
LIMIT = PointId("pv-1.power_limit_pct")


@pytest.fixture
async def server(
    unused_tcp_port_factory: Callable[[], int],
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    aiohttp_client: Callable[[web.Application], Any],
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], SimulatedPlant, Dispatcher]]:
    site = parse_site(SITE.format(port=unused_tcp_port_factory(), gone=unused_tcp_port_factory()))
    async with simulated_plant(site, without={"pv-gone"}) as plant:  # nothing answers for pv-gone
        settings = Settings(stream_prefix=stream_prefix, secret_key=TEST_SECRET_KEY)
        endpoints = Endpoints(db_url=pg_url, redis_url=redis_url, mqtt_url=mqtt_url, origins={})
        app = create_app(
            site, settings, endpoints, roles=frozenset({Role.API, Role.GATEWAY, Role.ANALYTICS, Role.CONTROL})
        )
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            app, headers=admin_headers(site)
        )
        running = client.server.app[PLANT]

        async def leading() -> bool:
            return running.leader_dispatcher is not None

        await eventually(leading)  # this process holds the control lease
        yield client, plant, running.leader_dispatcher


async def _hold(dispatcher: Dispatcher, value: float, reason: str, hold_s: float) -> Dispatch:
    """Submit a write of pv-1's limit that the dispatcher reverts ``hold_s`` from now."""
    return await dispatcher.submit(
        DispatchRequest(
            node=NodeId("g"),
            point=LIMIT,
            value=value,
            reason=reason,
            hold_until=dispatcher._clock.now() + timedelta(seconds=hold_s),
        )
    )


async def test_operator_approves_a_dispatch_over_the_api(server: Any, pg_url: str) -> None:
    client, plant, dispatcher = server
    waiting = await dispatcher.submit(
        DispatchRequest(
            node=NodeId("g"),
            point=LIMIT,
            value=35,
            reason="stage 4: curtail PV export",
            rule_id="curtail-pv",
            stage=4,
            needs_approval=True,
        )
    )
    assert waiting.state is DispatchState.AWAITING_APPROVAL
    queue = await (await client.get("/api/v1/dispatches", params={"state": "awaiting_approval"})).json()
    assert [d["id"] for d in queue["dispatches"]] == [waiting.id]
    approved = await client.post(
        f"/api/v1/dispatches/{waiting.id}/approve", json={"comment": "ok for an hour"}
    )
    assert approved.status == 200, await approved.text()
    body = await approved.json()
    assert (body["state"], body["result"]["status"], body["decided_by"]) == (
        "verified",
        "verified",
        "test-admin",
    )
    assert plant.device("pv-1").value("power_limit_pct") == 35
    again = await client.post(f"/api/v1/dispatches/{waiting.id}/approve")
    assert again.status == 409
    conn = await asyncpg.connect(pg_url)
    try:
        actions = [
            r["action"]
            for r in await conn.fetch(
                "SELECT action FROM audit_log WHERE target = $1 ORDER BY seq", f"dispatch:{waiting.id}"
            )
        ]
    finally:
        await conn.close()
    assert actions == ["dispatch.propose", "dispatch.approve", "dispatch.verified"]


async def test_reject_and_unknown(server: Any) -> None:
    client, _plant, dispatcher = server
    waiting = await dispatcher.submit(
        DispatchRequest(node=NodeId("g"), point=LIMIT, value=20, reason="r", needs_approval=True)
    )
    rejected = await client.post(f"/api/v1/dispatches/{waiting.id}/reject", json={"comment": "not now"})
    assert (await rejected.json())["state"] == "rejected"
    assert (await client.post("/api/v1/dispatches/999999/approve")).status == 404
    assert (await client.post(f"/api/v1/dispatches/{waiting.id}/approve", json={"colour": 1})).status == 400


async def test_a_hold_is_reverted_to_the_value_before(server: Any) -> None:
    _client, plant, dispatcher = server
    before = plant.device("pv-1").value("power_limit_pct")

    async def latest_known() -> bool:
        return await dispatcher._latest(LIMIT) is not None

    await eventually(latest_known)
    held = await _hold(dispatcher, 50, "stage 2: hold for a second", hold_s=1)
    assert held.state is DispatchState.VERIFIED
    assert held.previous_value == before
    assert plant.device("pv-1").value("power_limit_pct") == 50

    async def reverted() -> bool:
        return plant.device("pv-1").value("power_limit_pct") == before

    await eventually(reverted)  # the dispatcher's own loop reverts it at hold_until


async def test_an_unreachable_device_fails_after_retries_and_raises_its_dispatch_alarm(server: Any) -> None:
    client, _plant, dispatcher = server
    failed = await dispatcher.submit(
        DispatchRequest(node=NodeId("g"), point=PointId("pv-gone.power_limit_pct"), value=10, reason="r")
    )
    assert failed.state is DispatchState.FAILED
    assert failed.result is not None
    assert failed.result["attempts"] == 3
    assert failed.result["status"] in ("failed", "timeout", "no result")

    async def alarm_raised() -> bool:
        body = await (await client.get("/api/v1/alarms")).json()
        return any(a["alarm"] == "pv-gone.power_limit_pct:dispatch" for a in body["alarms"])

    # The leader publishes the outcome on the events stream; the analytics role raises the alarm.
    await eventually(alarm_raised)


CONTROL = {
    "default_mode": "auto",
    "stages": {"enter_pct": 100, "exit_pct": 97, "min_dwell_s": 0},
    "nodes": {"g": {"mode": "auto"}},
    "rules": [
        {
            "id": "pv-limit",
            "stage": 1,
            "node": "g",
            "kind": "setpoint",
            "targets": ["pv-1.power_limit_pct"],
            "parameters": {"value": 60},
            "hold_s": 3600,
            "expected_reduction_kw": 5,
        },
    ],
    "interlocks": {"pv-1.power_limit_pct": {"min": 0, "max": 80}},
}


async def test_the_controller_escalates_and_dispatches_once_through_the_gateway(server: Any) -> None:
    _client, plant, dispatcher = server
    config = parse_control(CONTROL, known_points={"pv-1.power_limit_pct", "pv-1.active_power_kw"})
    now = dispatcher._clock.now

    async def budgets() -> dict[str, NodeBudget]:
        # The month is forecast at 120 % of its quota: stage 1 is due.
        return {
            "g": NodeBudget(
                node=NodeId("g"),
                month="2026-11",
                quota_t=100.0,
                actual_t=50.0,
                forecast_t=120.0,
                computed_at=now(),
            )
        }

    async def points(watched: Any) -> dict[str, PointState]:
        value = await dispatcher._latest(LIMIT)
        return {
            LIMIT: PointState(point=LIMIT, value=value, quality=QualityCode.GOOD, ts=now(), writable=True)
        }

    async def known() -> bool:
        return await dispatcher._latest(LIMIT) is not None

    await eventually(known)  # the live feed has the setpoint's current value
    controller = ControlService(
        config,
        dispatcher,
        budgets=budgets,
        points=points,
        intensity=lambda: (0.5366, (0.5366,) * 24),
        watched=[LIMIT],
        clock=dispatcher._clock,
    )
    first = await controller.cycle()
    assert first is not None
    assert [(t.from_stage, t.to_stage) for t in first.transitions] == [(0, 1)]
    assert first.proposals, (first.skipped, first.rule_errors)
    assert plant.device("pv-1").value("power_limit_pct") == 60
    verified = await dispatcher.store.select(states=[DispatchState.VERIFIED])
    assert [(d.rule_id, d.value) for d in verified] == [("pv-limit", 60.0)]
    await controller.cycle()  # the same write is in force: not asked again
    assert len(await dispatcher.store.select()) == 1


async def test_health_says_this_process_leads_with_its_fence(server: Any) -> None:
    client, _plant, _dispatcher = server
    health = await (await client.get("/api/v1/health")).json()
    assert health["control"]["leader"] is True
    assert health["control"]["fence"] >= 1


async def _leader(client: TestClient[web.Request, web.Application]) -> Dispatcher:
    running = client.server.app[PLANT]  # type: ignore[union-attr]

    async def leading() -> Dispatcher | None:
        return running.leader_dispatcher

    found: Dispatcher = await eventually(leading)
    return found


async def test_a_hold_survives_a_server_restart_and_the_new_leader_reverts_it(
    unused_tcp_port_factory: Callable[[], int],
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    aiohttp_client: Callable[[web.Application], Any],
) -> None:
    """The hold is in PostgreSQL, not in the process: whoever leads next reverts it on time."""
    site = parse_site(SITE.format(port=unused_tcp_port_factory(), gone=unused_tcp_port_factory()))
    settings = Settings(stream_prefix=stream_prefix, secret_key=TEST_SECRET_KEY)
    endpoints = Endpoints(db_url=pg_url, redis_url=redis_url, mqtt_url=mqtt_url, origins={})
    roles = frozenset({Role.API, Role.GATEWAY, Role.ANALYTICS, Role.CONTROL})
    async with simulated_plant(site, without={"pv-gone"}) as plant:
        first = await aiohttp_client(create_app(site, settings, endpoints, roles=roles))
        dispatcher = await _leader(first)
        await eventually(lambda: dispatcher._latest(LIMIT))
        before = plant.device("pv-1").value("power_limit_pct")
        held = await _hold(dispatcher, 45, "hold across a restart", hold_s=5)
        assert held.state is DispatchState.VERIFIED
        await first.close()  # the server stops during the hold
        assert plant.device("pv-1").value("power_limit_pct") == 45  # nothing reverted it on the way out

        second = await aiohttp_client(create_app(site, settings, endpoints, roles=roles))
        successor = await _leader(second)

        async def reverted() -> bool:
            return plant.device("pv-1").value("power_limit_pct") == before

        await eventually(reverted, timeout_s=30)  # start-up, election, then the hold's end
        stored = await successor.store.get(held.id)
        assert stored is not None
        assert stored.state is DispatchState.REVERTED


async def test_a_device_lost_mid_hold_ends_revert_failed_after_retries(server: Any) -> None:
    _client, plant, dispatcher = server
    await eventually(lambda: dispatcher._latest(LIMIT))
    held = await _hold(dispatcher, 55, "hold, then the inverter drops off the network", hold_s=2)
    assert held.state is DispatchState.VERIFIED
    await plant.stop()  # the device goes offline while the hold runs

    async def revert_failed() -> bool:
        stored = await dispatcher.store.get(held.id)
        return stored is not None and stored.state is DispatchState.REVERT_FAILED

    await eventually(revert_failed, timeout_s=60)
    stored = await dispatcher.store.get(held.id)
    assert stored.result["revert"]["attempts"] == 3


async def test_a_read_back_mismatch_is_retried_then_failed_with_what_the_device_holds(server: Any) -> None:
    """The inverter clamps 150 % to 100 %: acknowledged, but not what was asked, so not verified."""
    _client, plant, dispatcher = server
    mismatch = await dispatcher.submit(
        DispatchRequest(node=NodeId("g"), point=LIMIT, value=150, reason="over the device's own range")
    )
    assert mismatch.state is DispatchState.FAILED
    assert mismatch.result is not None
    assert (mismatch.result["status"], mismatch.result["readback"], mismatch.result["attempts"]) == (
        "mismatch",
        100,
        3,
    )
    assert plant.device("pv-1").value("power_limit_pct") == 100


async def test_the_leader_beats_the_watchdog_so_the_device_can_tell_it_is_there(server: Any) -> None:
    """The heartbeat counter keeps changing at the device while a leader holds the lease."""
    _client, plant, _dispatcher = server
    seen: set[float] = set()

    async def changing() -> bool:
        seen.add(plant.device("pv-1").value("watchdog"))
        return len(seen) >= 3

    await eventually(changing, timeout_s=15)
