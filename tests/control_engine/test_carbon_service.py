"""The carbon service on the real PostgreSQL: a simulated month on a fake clock, alerts once per crossing.

Readings are fed straight to the service's handler (the stream consumer in production); the ledger's
rows, forecasts, quota alert state and restatements go to the real database, and the alerts to a
local HTTP receiver through the notifier.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from aiohttp import web

from control_engine.carbon import CarbonService, CarbonStore, EventPublisher, Quota
from control_engine.ledger import CarbonLedger
from control_engine.notify import Notifier
from control_engine.quota import QuotaAlerts
from scada.catalog import ledger_points, node_tree, sync_catalog
from scada.config import SiteConfig, parse_site
from scada.db import migrate
from scada.model import NodeId, PointId, Reading
from scada.runtime import FakeClock

TZ = ZoneInfo("Asia/Shanghai")
GRID_2022 = 0.5366

SITE = """
site: {id: s, name: S}
hierarchy:
  - id: grp
    name: Group
    level: group
    children:
      - id: park
        name: Park
        level: park
        children:
          - id: ent
            name: Enterprise
            level: enterprise
            children: [{id: ws, name: Workshop, level: workshop}]
devices:
  - id: meter
    node: ws
    kind: power_meter
    protocol: modbus_tcp
    modbus: {host: 127.0.0.1, port: 1502, unit_id: 1}
    points:
      - {key: e_kwh, kind: energy_counter, unit: kWh, carrier: electricity, modbus: {address: 0, type: uint32}}
notifications:
  max_attempts: 1
  channels:
    ops: {kind: webhook, url: "RECEIVER"}
  routes:
    - {nodes: ["*"], channels: [ops]}
"""


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[dict[str, object]]]]:
    seen: list[dict[str, object]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(json.loads(await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/hook", seen
    await runner.cleanup()


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


async def service(
    site: SiteConfig,
    pool: asyncpg.Pool,
    clock: FakeClock,
    notifier: Notifier,
    events: list[tuple[str, Mapping[str, Any]]] | None = None,
) -> CarbonService:
    async with pool.acquire() as conn:
        await migrate(conn)
        await sync_catalog(conn, site)
    factors = site.factor_library()
    parents, levels = node_tree(site)
    ledger = CarbonLedger(ledger_points(site, factors), parents, levels, factors, timezone="Asia/Shanghai")
    return CarbonService(
        ledger,
        CarbonStore(pool),
        parents,
        {
            NodeId("grp"): "Group",
            NodeId("park"): "Park",
            NodeId("ent"): "Enterprise",
            NodeId("ws"): "Workshop",
        },
        clock=clock,
        timezone="Asia/Shanghai",
        alerts=QuotaAlerts(),
        notifier=notifier,
        publish=_collect(events) if events is not None else None,
        forecast_period_s=0,
    )


def _collect(events: list[tuple[str, Mapping[str, Any]]]) -> EventPublisher:
    async def publish(kind: str, body: Mapping[str, Any]) -> None:
        events.append((kind, body))

    return publish


async def test_a_month_raises_each_alert_once_at_its_crossing(
    pool: asyncpg.Pool, receiver: tuple[str, list[dict[str, object]]]
) -> None:
    url, seen = receiver
    site = parse_site(SITE.replace("RECEIVER", url))
    assert site.notifications is not None
    start = datetime(2026, 3, 1, tzinfo=TZ)
    clock = FakeClock(start)
    async with Notifier.from_config(site.notifications, clock=clock) as notifier:
        events: list[tuple[str, Mapping[str, Any]]] = []
        svc = await service(site, pool, clock, notifier, events)
        await svc.warm_start()
        # 100 kWh every hour: 53.66 kg/h, 744 h in March = 39.92304 t. Quota 36 t: the actuals cross
        # 80 % (28.8 t) after ceil(28800 / 53.66) = 537 h, 90 % (32.4 t) after 604 h, 100 % after 671 h.
        await CarbonStore(pool).put_quota(Quota(NodeId("ent"), "2026-03", 36.0, 95.0))
        crossed_at: dict[tuple[str, float], int] = {}
        value = 0.0
        await svc.handle([Reading(point=PointId("meter.e_kwh"), ts=start, value=value)])
        for hour in range(1, 745):
            value += 100.0
            ts = start + timedelta(hours=hour) - timedelta(seconds=1)
            await svc.handle([Reading(point=PointId("meter.e_kwh"), ts=ts, value=value)])
            await clock.advance(3600.0)
            await svc.tick()
            for crossing in svc.crossings:
                crossed_at.setdefault((crossing.basis.value, crossing.threshold_pct), hour)
    actual = {threshold: at for (basis, threshold), at in crossed_at.items() if basis == "actual"}
    assert actual == {80.0: 537, 90.0: 604, 100.0: 671}
    forecast = {threshold for (basis, threshold) in crossed_at if basis == "forecast"}
    assert forecast == {80.0, 90.0, 100.0}
    # One notification per crossing, each delivered once, for the enterprise.
    ids = [str(n["id"]) for n in seen]
    assert sorted(ids) == sorted(
        {f"quota:ent:2026-03:{b}:{t:g}" for b in ("actual", "forecast") for t in (80, 90, 100)}
    )
    # The events stream got a ledger update every turn and one quota_alert per crossing.
    alerts = [body for kind, body in events if kind == "quota_alert"]
    assert sorted(str(a["id"]) for a in alerts) == sorted(ids)
    ledger = [body for kind, body in events if kind == "ledger"]
    assert len(ledger) == 744
    # The turn at 23:00 on 31 March: 743 hours booked; the last turn (1 April, 00:00) starts April.
    assert ledger[-2]["month"] == "2026-03"
    assert ledger[-2]["nodes"]["ent"][1] == pytest.approx(743 * 100 * GRID_2022, rel=1e-6)
    assert ledger[-1]["month"] == "2026-04"
    # The month's ledger in the database: 744 x 100 kWh x 0.5366 kg/kWh.
    async with pool.acquire() as conn:
        total = await conn.fetchval("SELECT sum(co2e_kg) FROM ledger_hourly WHERE node_id = 'ws'")
        state = await conn.fetch("SELECT basis, fired_pct FROM quota_alert_state WHERE node_id = 'ent'")
    assert total == pytest.approx(744 * 100 * GRID_2022, rel=1e-9)
    assert {r["basis"]: sorted(r["fired_pct"]) for r in state} == {
        "actual": [80.0, 90.0, 100.0],
        "forecast": [80.0, 90.0, 100.0],
    }


async def test_restart_keeps_fired_alerts_and_the_ledger(pool: asyncpg.Pool) -> None:
    site = parse_site(SITE.replace("RECEIVER", "http://127.0.0.1:9/hook"))
    start = datetime(2026, 4, 1, tzinfo=TZ)
    clock = FakeClock(start)
    assert site.notifications is not None
    async with Notifier.from_config(site.notifications, clock=clock) as notifier:
        first = await service(site, pool, clock, notifier)
        await first.warm_start()
        await CarbonStore(pool).put_quota(Quota(NodeId("ent"), "2026-04", 0.1, 0.0))
        await first.handle(
            [Reading(point=PointId("meter.e_kwh"), ts=start, value=0.0),
             Reading(point=PointId("meter.e_kwh"), ts=start + timedelta(minutes=59), value=500.0)]
        )  # fmt: skip
        await clock.advance(3600.0)
        await first.tick()
        fired = {(c.basis.value, c.threshold_pct) for c in first.crossings}
        assert ("actual", 100.0) in fired  # 500 kWh x 0.5366 = 268.3 kg > 100 kg
        # A new process: same database, nothing in memory.
        second = await service(site, pool, clock, notifier)
        await second.warm_start()
        await clock.advance(60.0)
        await second.tick()
        assert second.crossings == []
    async with pool.acquire() as conn:
        kg = await conn.fetchval("SELECT sum(co2e_kg) FROM ledger_hourly WHERE node_id = 'ws'")
    assert kg == pytest.approx(500 * GRID_2022, rel=1e-9)
