"""The history and energy endpoints over aiohttp's test client and the real local PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, timedelta
from typing import Any

import asyncpg
import pytest
from _streams_helpers import T0, reading
from aiohttp import web
from test_store_query import load

from scada.api.problem import problem_middleware
from scada.api.routes import CATALOG, HUB, QUERIES, STORE, add_routes
from scada.catalog import SiteCatalog, sync_catalog
from scada.config import parse_site
from scada.model import Quality
from streams.live import LiveHub
from streams.store import PostgresReadingStore, backfill_rollups

SITE = """
site: {id: s, name: S, timezone: Asia/Shanghai}
hierarchy:
  - id: g
    name: G
    level: group
    children: [{id: p, name: P, level: park, children: [{id: e, name: E, level: enterprise,
                 children: [{id: w, name: W, level: workshop}]}]}]
templates:
  meter:
    points:
      - {key: power_kw, kind: power, unit: kW, carrier: electricity, modbus: {address: 0, type: float32}}
      - {key: energy_kwh, kind: energy_counter, unit: kWh, carrier: electricity, scale: 0.1,
         modbus: {address: 2, type: uint16}}
devices:
  - {id: m1, node: w, kind: power_meter, protocol: modbus_tcp, template: meter, poll_period_s: 1,
     modbus: {host: 127.0.0.1}}
  - {id: m2, node: e, kind: power_meter, protocol: modbus_tcp, template: meter, poll_period_s: 1,
     modbus: {host: 127.0.0.1}}
"""

SPAN = timedelta(hours=3)


@pytest.fixture
async def client(pool: asyncpg.Pool, aiohttp_client: Callable[[web.Application], Any]) -> Any:
    site = parse_site(SITE)
    async with pool.acquire() as conn:
        await sync_catalog(conn, site)
    readings = []
    for s in range(0, int(SPAN.total_seconds()), 5):  # one reading every 5 s
        ts = T0 + timedelta(seconds=s)
        bad = 3600 <= s < 4200
        readings.append(
            reading("m1.power_kw", ts, None, Quality.bad("timeout"))
            if bad
            else reading("m1.power_kw", ts, 50.0 + s % 7)
        )
        # m1's counter (uint16 x 0.1: wraps at 6553.6 kWh) gains 0.1 kWh every 5 s and wraps at 2 h.
        readings.append(reading("m1.energy_kwh", ts, round((6553.6 - 144 + s / 50) % 6553.6, 3)))
        readings.append(reading("m2.energy_kwh", ts, 100.0 + s / 100))
    await load(pool, readings)
    async with pool.acquire() as conn:
        await backfill_rollups(conn, T0, T0 + SPAN)
    app = web.Application(middlewares=[problem_middleware])
    app[CATALOG] = SiteCatalog(site)
    app[HUB] = LiveHub()
    app[STORE] = app[QUERIES] = PostgresReadingStore(pool)
    add_routes(app)
    return await aiohttp_client(app)


def _q(**params: Any) -> dict[str, str]:
    base = {"start": T0.isoformat(), "end": (T0 + SPAN).isoformat()}
    return {**base, **{k: str(v) for k, v in params.items()}}


async def test_raw_history_is_unchanged_without_points(client: Any) -> None:
    resp = await client.get("/api/v1/points/m1.power_kw/history", params=_q(limit=10))
    body = await resp.json()
    assert resp.status == 200
    assert (body["source"], body["mode"], body["truncated"], len(body["readings"])) == (
        "raw",
        "raw",
        True,
        10,
    )


@pytest.mark.parametrize(
    ("points", "mode", "source"),
    [(2000, "lttb", "raw"), (150, "lttb", "1m"), (150, "minmax", "1m"), (2500, "minmax", "raw")],
)
async def test_downsampled_history(client: Any, points: int, mode: str, source: str) -> None:
    resp = await client.get("/api/v1/points/m1.power_kw/history", params=_q(points=points, mode=mode))
    body = await resp.json()
    assert resp.status == 200, body
    assert (body["source"], body["mode"], body["unit"]) == (source, mode, "kW")
    assert len(body["readings"]) <= points + 10
    gaps = [r for r in body["readings"] if r["value"] is None]
    assert len(gaps) == 1
    assert gaps[0]["quality"] == "bad"


async def test_bad_history_parameters(client: Any) -> None:
    for params in (_q(points=1), _q(mode="average"), _q(points="many")):
        resp = await client.get("/api/v1/points/m1.power_kw/history", params=params)
        assert resp.status == 400
        assert resp.content_type == "application/problem+json"


async def test_point_energy_handles_the_wrap(client: Any) -> None:
    resp = await client.get("/api/v1/points/m1.energy_kwh/energy", params=_q(interval="1h"))
    body = await resp.json()
    assert resp.status == 200, body
    assert [i["step"] for i in body["intervals"]] == ["normal", "normal", "wrap"]
    assert body["total"] == pytest.approx(SPAN.total_seconds() / 50 - 0.1, abs=1e-6)  # 2,159 steps of 0.1
    assert body["unit"] == "kWh"
    assert body["timezone"] == "Asia/Shanghai"


async def test_point_energy_refuses_non_counters(client: Any) -> None:
    resp = await client.get("/api/v1/points/m1.power_kw/energy", params=_q())
    assert resp.status == 400
    resp = await client.get("/api/v1/points/m1.energy_kwh/energy", params=_q(interval="2h"))
    assert resp.status == 400


async def test_node_energy(client: Any) -> None:
    park = await (await client.get("/api/v1/nodes/p/energy", params=_q(interval="1h"))).json()
    [series] = park["series"]
    assert series["unit"] == "kWh"
    assert [i["points"] for i in series["intervals"]] == [2, 2, 2]
    m2_total = (SPAN.total_seconds() - 5) / 100
    assert series["total"] == pytest.approx(SPAN.total_seconds() / 50 - 0.1 + m2_total)
    workshop = await (await client.get("/api/v1/nodes/w/energy", params=_q(interval="1h"))).json()
    assert workshop["series"][0]["total"] == pytest.approx(SPAN.total_seconds() / 50 - 0.1)
    day = await (await client.get("/api/v1/nodes/p/energy", params=_q(interval="1d"))).json()
    [only] = day["series"][0]["intervals"]
    assert only["start"] == T0.replace(hour=16).astimezone(UTC).replace(day=4).isoformat()
    pv = await (await client.get("/api/v1/nodes/p/energy", params=_q(carrier="pv"))).json()
    assert pv["series"] == []
    assert (await client.get("/api/v1/nodes/nowhere/energy", params=_q())).status == 404
    assert (await client.get("/api/v1/nodes/p/energy", params=_q(carrier="plasma"))).status == 400
