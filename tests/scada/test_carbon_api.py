"""The carbon REST resources over aiohttp's test client, on a ledger written to the real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from aiohttp import web

from control_engine.carbon import CarbonQueries, CarbonService, CarbonStore
from control_engine.ledger import CarbonLedger
from scada.api.carbon import CARBON_QUERIES, CARBON_STORE, add_carbon_routes
from scada.api.problem import problem_middleware
from scada.api.routes import CATALOG
from scada.catalog import SiteCatalog, ledger_points, node_tree, sync_catalog
from scada.config import parse_site
from scada.db import migrate
from scada.model import PointId, Reading
from scada.runtime import FakeClock

TZ = ZoneInfo("Asia/Shanghai")
GRID_2022 = 0.5366
SITE = """
site: {id: s, name: S, timezone: Asia/Shanghai}
hierarchy:
  - id: g
    name: G
    level: group
    children: [{id: p, name: P, level: park, children: [{id: e, name: E, level: enterprise,
                 children: [{id: w, name: W, level: workshop}]}]}]
devices:
  - id: m
    node: w
    kind: power_meter
    protocol: modbus_tcp
    modbus: {host: 127.0.0.1}
    points:
      - {key: e_kwh, kind: energy_counter, unit: kWh, carrier: electricity, modbus: {address: 0, type: uint32}}
      - {key: gas_nm3, kind: gas_counter, unit: Nm3, carrier: natural_gas, modbus: {address: 2, type: uint32}}
"""
START = datetime(2026, 5, 1, tzinfo=TZ)
POINT = PointId("m.e_kwh")


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def setup(
    pool: asyncpg.Pool, aiohttp_client: Callable[[web.Application], Any]
) -> tuple[Any, CarbonService]:
    site = parse_site(SITE)
    async with pool.acquire() as conn:
        await migrate(conn)
        await sync_catalog(conn, site)
    factors = site.factor_library()
    parents, levels = node_tree(site)
    clock = FakeClock(START)
    service = CarbonService(
        CarbonLedger(ledger_points(site, factors), parents, levels, factors, timezone="Asia/Shanghai"),
        CarbonStore(pool),
        parents,
        {},
        clock=clock,
        timezone="Asia/Shanghai",
        forecast_period_s=0,
    )
    # Two days at 10 kWh and 1 Nm3 an hour: opening values at midnight, then one at each hour's end.
    gas = PointId("m.gas_nm3")
    await service.handle([Reading(point=POINT, ts=START, value=0.0), Reading(point=gas, ts=START, value=0.0)])
    for hour in range(48):
        ts = START + timedelta(hours=hour, minutes=59, seconds=59)
        await service.handle(
            [
                Reading(point=POINT, ts=ts, value=10.0 * (hour + 1)),
                Reading(point=gas, ts=ts, value=hour + 1.0),
            ]
        )
    await clock.advance(49 * 3600.0 + 1800.0)
    await service.tick()
    app = web.Application(middlewares=[problem_middleware])
    app[CATALOG] = SiteCatalog(site)
    app[CARBON_STORE] = CarbonStore(pool)
    app[CARBON_QUERIES] = CarbonQueries(pool)
    add_carbon_routes(app)
    return await aiohttp_client(app), service


def _q(**params: Any) -> dict[str, str]:
    return {k: str(v) for k, v in params.items()}


async def test_emissions_by_day_and_scope(setup: tuple[Any, CarbonService]) -> None:
    client, _ = setup
    end = (START + timedelta(days=2)).astimezone(UTC).isoformat()
    response = await client.get(
        "/api/v1/emissions", params=_q(node="g", period="day", start=START.isoformat(), end=end)
    )
    assert response.status == 200
    body = await response.json()
    # Each local day: 24 x 10 kWh x 0.5366 = 128.784 kg (Scope 2) and 24 Nm3 of gas (Scope 1).
    gas_kg = 24 * 0.038931 * 15.3 * 0.99 * 44 / 12
    assert [i["start"] for i in body["intervals"]] == [
        START.astimezone(UTC).isoformat(),
        (START + timedelta(days=1)).astimezone(UTC).isoformat(),
    ]
    for interval in body["intervals"]:
        assert interval["scope2_t"] == pytest.approx(24 * 10 * GRID_2022 / 1000, rel=1e-9)
        assert interval["scope1_t"] == pytest.approx(gas_kg / 1000, rel=1e-9)
    carriers = {(c["carrier"], c["source"]): c for c in body["by_carrier"]}
    assert carriers["electricity", "metered"]["activity"] == pytest.approx(480.0)
    assert carriers["natural_gas", "metered"]["unit"] == "Nm3"
    month = await client.get(
        "/api/v1/emissions", params=_q(node="w", period="month", start=START.isoformat(), end=end)
    )
    (only,) = (await month.json())["intervals"]
    assert only["total_t"] == pytest.approx(body["total"]["total_t"], rel=1e-9)


async def test_quota_lifecycle_and_status(setup: tuple[Any, CarbonService]) -> None:
    client, service = setup
    created = await client.put("/api/v1/quotas/e/2026-05", json={"quota_t": 5.0, "price_cny_per_t": 90})
    assert created.status == 201
    updated = await client.put("/api/v1/quotas/e/2026-05", json={"quota_t": 4.0})
    assert updated.status == 200
    await service.evaluate()
    got = await (await client.get("/api/v1/quotas/e/2026-05")).json()
    status = got["status"]
    assert got["quota_t"] == 4.0
    assert got["price_cny_per_t"] == 0.0  # the site's default price: the update named none
    assert status["actual_t"] > 0
    assert status["forecast_t"] >= status["actual_t"]
    assert status["actual_pct"] == pytest.approx(100 * status["actual_t"] / 4.0)
    listed = await (await client.get("/api/v1/quotas", params={"month": "2026-05"})).json()
    assert [q["node"] for q in listed["quotas"]] == ["e"]
    forecasts = await (await client.get("/api/v1/forecasts", params={"month": "2026-05", "node": "e"})).json()
    assert forecasts["forecasts"][0]["forecast_t"] == pytest.approx(status["forecast_t"])
    assert (await client.delete("/api/v1/quotas/e/2026-05")).status == 204
    assert (await client.delete("/api/v1/quotas/e/2026-05")).status == 404


async def test_late_reading_shows_in_restatements(setup: tuple[Any, CarbonService]) -> None:
    client, service = setup
    # Hour 3 of the 1st closed long ago; a corrected value arrives for its last reading (03:59:59).
    await service.handle(
        [Reading(point=POINT, ts=START + timedelta(hours=3, minutes=59, seconds=59), value=35.0)]
    )
    update = await service.tick()
    assert update.restatements
    body = await (await client.get("/api/v1/ledger/restatements", params={"node": "g"})).json()
    rows = {(r["hour"], r["source"]): r for r in body["restatements"]}
    hour3 = rows[(START + timedelta(hours=3)).astimezone(UTC).isoformat(), "metered"]
    # 03:00-04:00 was 30 -> 40 kWh, now 30 -> 35 (5 kWh); 04:00-05:00 was 10, now 35 -> 50 (15 kWh).
    assert (hour3["old_activity"], hour3["new_activity"]) == (pytest.approx(10.0), pytest.approx(5.0))
    hour4 = rows[(START + timedelta(hours=4)).astimezone(UTC).isoformat(), "metered"]
    assert hour4["new_activity"] == pytest.approx(15.0)
    assert "late or corrected readings of m.e_kwh" in hour3["reason"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "detail"),
    [
        ("get", "/api/v1/emissions", {"params": {"node": "nope"}}, 404, "no node 'nope'"),
        ("get", "/api/v1/emissions", {"params": {"period": "week"}}, 400, "period"),
        ("get", "/api/v1/emissions", {"params": {"start": "yesterday"}}, 400, "start"),
        ("get", "/api/v1/quotas/e/2026-13", {}, 400, "month"),
        ("put", "/api/v1/quotas/e/2026-05", {"json": {"quota_t": -1}}, 400, "quota_t"),
        ("put", "/api/v1/quotas/e/2026-05", {"json": {"quota_t": 1, "colour": "red"}}, 400, "colour"),
        ("put", "/api/v1/quotas/e/2026-05", {"data": b"{not json"}, 400, "not JSON"),
        ("put", "/api/v1/quotas/e/2026-05", {"json": [1]}, 400, "object"),
        ("put", "/api/v1/quotas/x/2026-05", {"json": {"quota_t": 1}}, 404, "no node"),
        ("get", "/api/v1/quotas/e/2026-06", {}, 404, "no quota"),
        ("get", "/api/v1/forecasts", {"params": {"node": "w", "month": "2031-01"}}, 404, "no forecast"),
        ("get", "/api/v1/ledger/restatements", {"params": {"limit": "0"}}, 400, "limit"),
    ],
)
async def test_bad_requests_get_problem_details(
    setup: tuple[Any, CarbonService], method: str, path: str, kwargs: dict[str, Any], status: int, detail: str
) -> None:
    client, _ = setup
    response = await getattr(client, method)(path, **kwargs)
    assert response.status == status
    assert response.content_type == "application/problem+json"
    assert detail in (await response.json())["detail"]
