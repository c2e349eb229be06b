"""The anomaly service and the alarm API on the real PostgreSQL, with a fake clock.

Readings go straight to the service's handler (the ``anomaly`` consumer group in production); alarm
events are stored, captured as the ``alarms`` stream would get them and as notifications.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from aiohttp import web

from anomaly.alarm_model import AlarmEvent
from anomaly.alarms import AlarmEngine
from anomaly.service import AlarmStore, AnomalyService
from scada.alarm_setup import alarm_definitions, monitored_points
from scada.api.alarms import ALARM_STORE, ANOMALY, add_alarm_routes
from scada.api.problem import problem_middleware
from scada.api.routes import CATALOG, HUB, add_routes
from scada.catalog import SiteCatalog, node_tree, sync_catalog
from scada.config import SiteConfig, parse_site
from scada.db import migrate
from scada.model import DeviceId, PointId, Reading
from scada.runtime import FakeClock
from streams.live import LiveHub

TZ = ZoneInfo("Asia/Shanghai")
GRID_2022 = 0.5366
SITE = """
site: {id: s, name: S}
hierarchy:
  - {id: g, name: G, level: group, children: [{id: p, name: P, level: park, children: [
      {id: e, name: E, level: enterprise, children: [{id: w, name: W, level: workshop}]}]}]}
devices:
  - id: comp
    name: B-03 空压机组 air-compressor group
    node: w
    kind: air_compressor
    protocol: modbus_tcp
    modbus: {host: 127.0.0.1}
    points:
      - {key: power_kw, kind: power, unit: kW, carrier: electricity, modbus: {address: 0, type: float32},
         anomaly: {detector: {kind: robust_z, window: 60, warmup: 30, z_limit: 4}, priority: high, off_delay_s: 0}}
      - {key: pressure_bar, kind: pressure, unit: bar, modbus: {address: 2, type: float32},
         alarms: [{kind: hh, setpoint: 9.0, priority: critical, deadband: 0.2}]}
"""
START = datetime(2026, 6, 1, 8, tzinfo=TZ)
POWER, PRESSURE = PointId("comp.power_kw"), PointId("comp.pressure_bar")


class Captured:
    def __init__(self) -> None:
        self.published: list[Mapping[str, Any]] = []
        self.notified: list[tuple[AlarmEvent, Mapping[str, Any]]] = []

    async def publish(self, events: Sequence[Mapping[str, Any]]) -> None:
        self.published.extend(events)

    async def notify(self, event: AlarmEvent, extra: Mapping[str, Any]) -> None:
        self.notified.append((event, extra))


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
        await sync_catalog(conn, parse_site(SITE))
    yield pool
    await pool.close()


def parents(site: SiteConfig) -> dict[str, str | None]:
    return {str(node): parent for node, parent in node_tree(site)[0].items()}


def build(site: SiteConfig, pool: asyncpg.Pool, clock: FakeClock, captured: Captured) -> AnomalyService:
    return AnomalyService(
        AlarmEngine(alarm_definitions(site), parents=parents(site)),
        monitored_points(site, site.factor_library()),
        AlarmStore(pool),
        clock=clock,
        publish=captured.publish,
        notify=captured.notify,
    )


def minutes(start: int, end: int, value: Callable[[int], float], point: PointId = POWER) -> list[Reading]:
    return [Reading(point=point, ts=START + timedelta(minutes=m), value=value(m)) for m in range(start, end)]


async def test_energy_anomaly_is_quantified_in_kwh_and_co2(pool: asyncpg.Pool) -> None:
    site, clock, captured = parse_site(SITE), FakeClock(START), Captured()
    service = build(site, pool, clock, captured)
    # An hour at 100-102 kW to learn, then an hour 50 kW higher, then back.
    await service.handle(minutes(0, 60, lambda m: 100.0 + m % 3))
    await service.handle(minutes(60, 120, lambda m: 151.0))
    await service.handle(minutes(120, 130, lambda m: 100.0 + m % 3))
    transitions = [(e.to_state.value, e.cause.value) for e, _ in captured.notified]
    assert transitions == [("active_unack", "activate"), ("rtn_unack", "clear")]
    end_event, extra = captured.notified[-1]
    # 60 minutes at 151 kW against a baseline of ~101 kW: ~50 kWh extra, x 0.5366 kgCO2/kWh.
    assert extra["excess_kwh"] == pytest.approx(50.0, rel=0.05)
    assert extra["excess_kgco2e"] == pytest.approx(extra["excess_kwh"] * GRID_2022, rel=1e-3)
    assert end_event.alarm_id == "comp.power_kw:anomaly"
    assert any(p["alarm_id"] == "comp.power_kw:anomaly" for p in captured.published)
    async with pool.acquire() as conn:
        stored = await conn.fetch("SELECT to_state, extra FROM alarm_events ORDER BY at, seq")
        status = await conn.fetchrow(
            "SELECT state FROM alarm_status WHERE alarm_id = 'comp.power_kw:anomaly'"
        )
    assert [r["to_state"] for r in stored] == ["active_unack", "rtn_unack"]
    assert status["state"] == "rtn_unack"


async def test_limit_alarm_offline_suppression_and_restart(pool: asyncpg.Pool) -> None:
    site, clock, captured = parse_site(SITE), FakeClock(START), Captured()
    service = build(site, pool, clock, captured)
    await service.handle(minutes(0, 5, lambda m: 8.0 + m * 0.5, PRESSURE))  # 8.0 ... 10.0 bar
    assert service.engine.status("comp.pressure_bar:hh").state.value == "active_unack"
    # The device drops off: its offline alarm activates and the pressure alarm is suppressed by design.
    await service.availability(DeviceId("comp"), False, START + timedelta(minutes=6), "timeout")
    assert service.engine.status("comp:offline").state.value == "active_unack"
    assert service.engine.status("comp.pressure_bar:hh").state.value == "suppressed_by_design"
    await service.save()
    # A new process: the saved engine and detectors come back.
    restarted = build(site, pool, clock, Captured())

    def make_engine(snapshot: Mapping[str, Any] | None) -> AlarmEngine:
        assert snapshot is not None
        return AlarmEngine.restore(snapshot, alarm_definitions(site), parents=parents(site))

    await restarted.restore(make_engine)
    assert restarted.engine.status("comp:offline").state.value == "active_unack"
    assert restarted.engine.status("comp.pressure_bar:hh").state.value == "suppressed_by_design"


@pytest.fixture
async def client(
    pool: asyncpg.Pool, aiohttp_client: Callable[[web.Application], Any]
) -> tuple[Any, AnomalyService]:
    site, clock = parse_site(SITE), FakeClock(START)
    service = build(site, pool, clock, Captured())
    await service.handle(minutes(0, 5, lambda m: 8.0 + m * 0.5, PRESSURE))
    await clock.advance(600.0)  # the operator acts after the readings
    app = web.Application(middlewares=[problem_middleware])
    app[ALARM_STORE] = AlarmStore(pool)
    app[ANOMALY] = service
    add_alarm_routes(app)
    return await aiohttp_client(app), service


async def test_operator_acknowledges_and_shelves_over_the_api(client: tuple[Any, AnomalyService]) -> None:
    http, service = client
    active = await (await http.get("/api/v1/alarms")).json()
    assert [a["alarm"] for a in active["alarms"]] == ["comp.pressure_bar:hh"]
    assert active["alarms"][0]["priority"] == 1
    acked = await http.post(
        "/api/v1/alarms/comp.pressure_bar:hh/acknowledge", json={"by": "li.wei", "comment": "valve checked"}
    )
    assert acked.status == 200
    (event,) = (await acked.json())["events"]
    assert (event["to_state"], event["by"], event["comment"]) == ("active_ack", "li.wei", "valve checked")
    again = await http.post("/api/v1/alarms/comp.pressure_bar:hh/acknowledge", json={"by": "li.wei"})
    assert again.status == 409
    assert "active_ack" in (await again.json())["detail"].lower()
    shelved = await http.post(
        "/api/v1/alarms/comp.pressure_bar:hh/shelve",
        json={"by": "li.wei", "reason": "sensor swap", "duration_s": 600},
    )
    assert shelved.status == 200
    assert service.engine.status("comp.pressure_bar:hh").state.value == "shelved"
    events = await (
        await http.get(
            "/api/v1/alarms/events",
            params={"start": START.isoformat(), "end": (START + timedelta(days=1)).isoformat()},
        )
    ).json()
    assert [e["to_state"] for e in events["events"]] == ["active_unack", "active_ack", "shelved"]
    kpis = await http.get(
        "/api/v1/alarms/kpis",
        params={"console": "e", "start": START.isoformat(), "end": (START + timedelta(days=1)).isoformat()},
    )
    assert kpis.status == 200
    assert (await kpis.json())["console"] == "e"


@pytest.mark.parametrize(
    ("path", "body", "status", "detail"),
    [
        ("/api/v1/alarms/nope/acknowledge", {"by": "x"}, 404, "nope"),
        ("/api/v1/alarms/comp.pressure_bar:hh/acknowledge", {}, 400, "by"),
        ("/api/v1/alarms/comp.pressure_bar:hh/acknowledge", {"by": "x", "colour": 1}, 400, "colour"),
        (
            "/api/v1/alarms/comp.pressure_bar:hh/shelve",
            {"by": "x", "reason": "r", "duration_s": -5},
            400,
            "duration_s",
        ),
        ("/api/v1/alarms/comp.pressure_bar:hh/shelve", {"by": "x", "duration_s": 60}, 400, "reason"),
        ("/api/v1/alarms/comp.pressure_bar:hh/unshelve", {"by": "x"}, 409, "unshelve"),
    ],
)
async def test_bad_alarm_actions_get_problem_details(
    client: tuple[Any, AnomalyService], path: str, body: dict[str, Any], status: int, detail: str
) -> None:
    http, _ = client
    response = await http.post(path, json=body)
    assert response.status == status
    assert response.content_type == "application/problem+json"
    assert detail in (await response.json())["detail"]


async def test_actions_need_the_analytics_process(
    pool: asyncpg.Pool, aiohttp_client: Callable[[web.Application], Any]
) -> None:
    app = web.Application(middlewares=[problem_middleware])
    app[ALARM_STORE] = AlarmStore(pool)
    add_alarm_routes(app)
    http = await aiohttp_client(app)
    response = await http.post("/api/v1/alarms/comp:offline/acknowledge", json={"by": "x"})
    assert response.status == 503
    assert (await (await http.get("/api/v1/alarms", params={"all": "maybe"})).json())[
        "detail"
    ] == "all: true or false"


async def test_websocket_alarm_subscription_snapshot_then_frames(
    pool: asyncpg.Pool, aiohttp_client: Callable[[web.Application], Any]
) -> None:
    site, clock = parse_site(SITE), FakeClock(START)
    service = build(site, pool, clock, Captured())
    await service.handle(minutes(0, 5, lambda m: 8.0 + m * 0.5, PRESSURE))  # the HH alarm is active
    hub = LiveHub()
    app = web.Application(middlewares=[problem_middleware])
    app[ALARM_STORE], app[HUB], app[CATALOG] = AlarmStore(pool), hub, SiteCatalog(site)
    add_routes(app)
    http = await aiohttp_client(app)
    async with http.ws_connect("/api/v1/ws") as ws:
        await ws.send_json({"type": "subscribe_alarms", "consoles": ["e"]})
        assert (await ws.receive_json())["type"] == "subscribed_alarms"
        snapshot = await ws.receive_json()
        assert [a["alarm"] for a in snapshot["alarms"]] == ["comp.pressure_bar:hh"]
        hub.publish_alarms(
            [{"alarm_id": "comp:offline", "console": "other"}, {"alarm_id": "comp:offline", "console": "e"}]
        )
        frame = await ws.receive_json()
        assert frame == {"type": "alarms", "events": [{"alarm_id": "comp:offline", "console": "e"}]}
        await ws.send_json({"type": "subscribe_alarms", "consoles": "e"})
        assert (await ws.receive_json())["type"] == "error"
