"""Measured dispatch effects over REST: in the dispatch JSON, one by one, and added up per month.

The server runs the API role on the real PostgreSQL; dispatches and their verifications are written
with the real stores (the verification service writes them the same way; its own test measures a
seeded load). Two tenants share the site: each sees only its own dispatches and sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from _auth_helpers import TEST_SECRET_KEY, access_token, two_tenant_site
from aiohttp import web
from aiohttp.test_utils import TestClient

from control_engine.dispatcher import DispatchMode, DispatchRequest, DispatchState, DispatchStore
from control_engine.verify_service import MeterBasis, Verification, VerificationStatus, VerificationStore
from scada.app import Role, create_app
from scada.config import parse_site
from scada.model import NodeId, PointId
from scada.security import Grant, Principal, PrincipalKind
from scada.security import Role as AccessRole
from scada.services import Endpoints
from scada.settings import Settings

SITE = parse_site(two_tenant_site("Verification"))
OCTOBER = datetime(2026, 10, 14, 6, 0, tzinfo=UTC)


def headers(
    tenant: str, *grants: tuple[str, AccessRole], kind: PrincipalKind = PrincipalKind.USER
) -> dict[str, str]:
    roots = {"east": "grp-e", "west": "grp-w"}
    principal = Principal(
        tenant=tenant,
        subject=f"{tenant}-user",
        kind=kind,
        grants=tuple(Grant(node, role) for node, role in grants),
        tenant_nodes=frozenset({roots[tenant]}),
    )
    return {"Authorization": f"Bearer {access_token(principal)}"}


EAST = headers("east", ("grp-e", AccessRole.VIEWER))
EAST_WS2 = headers("east", ("ws-e2", AccessRole.VIEWER))
WEST = headers("west", ("grp-w", AccessRole.ADMIN))


def measured(
    dispatch_id: int, node: str, kwh: float, u_kwh: float, kg: float, u_kg: float, *, month: str = "2026-10"
) -> Verification:
    start = OCTOBER if month == "2026-10" else OCTOBER - timedelta(days=30)
    return Verification(
        dispatch_id=dispatch_id,
        node=NodeId(node),
        status=VerificationStatus.MEASURED,
        reason="",
        month=month,
        event_start=start,
        event_end=start + timedelta(hours=2),
        post_end=start + timedelta(hours=3),
        interval_s=900,
        meters=(f"m-{node.removeprefix('ws-')}.p_kw",),
        meter_basis=MeterBasis.NODE_CONSUMPTION,
        energy_avoided_kwh=kwh,
        uncertainty_kwh=u_kwh,
        co2e_avoided_kg=kg,
        co2e_uncertainty_kg=u_kg,
        confidence=0.9,
        baseline_kwh=kwh + 100,
        actual_kwh=100,
        rebound_kwh=0.0,
        rebound_co2e_kg=0.0,
        flags=("adjustment_capped",) if kwh > 40 else (),
        baseline_method="baseline: mean of 10 of 10 similar workday days",
        days_used=10,
        factor_ids=("cn-grid-2022",),
        detail={"intervals": [{"start": start.isoformat(), "phase": "event"}]},
        verified_at=start + timedelta(hours=4),
    )


@pytest.fixture
async def client(
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    aiohttp_client: Callable[[web.Application], Any],
) -> TestClient[web.Request, web.Application]:
    settings = Settings(stream_prefix=stream_prefix, secret_key=TEST_SECRET_KEY)
    endpoints = Endpoints(db_url=pg_url, redis_url=redis_url, mqtt_url=mqtt_url, origins={})
    app = create_app(SITE, settings, endpoints, roles=frozenset({Role.API}))
    made: TestClient[web.Request, web.Application] = await aiohttp_client(app)
    return made


async def dispatch(pg_url: str, node: str) -> int:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    try:
        made = await DispatchStore(pool).create(
            DispatchRequest(
                node=NodeId(node),
                point=PointId(f"m-{node.removeprefix('ws-')}.p_kw"),
                value=1,
                reason="r",
                hold_until=OCTOBER + timedelta(hours=2),
            ),
            DispatchMode.AUTO,
            DispatchState.REVERTED,
        )
    finally:
        await pool.close()
    return made.id


async def save(pg_url: str, *verifications: Verification) -> None:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    try:
        store = VerificationStore(pool)
        for v in verifications:
            assert await store.save(v)
        assert not await store.save(verifications[0])  # once per dispatch
    finally:
        await pool.close()


@pytest.fixture
async def seeded(client: TestClient[web.Request, web.Application], pg_url: str) -> dict[str, int]:
    ids = {
        "e1": await dispatch(pg_url, "ws-e1"),
        "e2": await dispatch(pg_url, "ws-e2"),
        "e1_unmeasurable": await dispatch(pg_url, "ws-e1"),
        "e1_september": await dispatch(pg_url, "ws-e1"),
        "e1_pending": await dispatch(pg_url, "ws-e1"),
        "w": await dispatch(pg_url, "ws-w"),
    }
    await save(
        pg_url,
        measured(ids["e1"], "ws-e1", 50.0, 6.0, 28.5, 3.4),
        measured(ids["e2"], "ws-e2", 30.0, 8.0, 17.0, 4.6),
        Verification(
            dispatch_id=ids["e1_unmeasurable"],
            node=NodeId("ws-e1"),
            status=VerificationStatus.UNMEASURABLE,
            reason="history: 1 usable workday day(s) in the 45 days before 2026-10-14",
            month="2026-10",
            event_start=OCTOBER,
            event_end=OCTOBER + timedelta(hours=2),
            post_end=None,
            interval_s=900,
            verified_at=OCTOBER + timedelta(hours=4),
        ),
        measured(ids["e1_september"], "ws-e1", 11.0, 1.0, 6.0, 0.5, month="2026-09"),
        measured(ids["w"], "ws-w", 100.0, 10.0, 57.0, 5.7),
    )
    return ids


async def test_dispatch_json_carries_the_effect(client: Any, seeded: dict[str, int]) -> None:
    listed = await client.get("/api/v1/dispatches", headers=EAST)
    assert listed.status == 200, await listed.text()
    by_id = {d["id"]: d for d in (await listed.json())["dispatches"]}
    assert set(by_id) == {seeded[k] for k in ("e1", "e2", "e1_unmeasurable", "e1_september", "e1_pending")}
    one = by_id[seeded["e1"]]
    assert one["co2e_avoided_kg"] == 28.5
    assert (one["verification"]["status"], one["verification"]["energy_avoided_kwh"]) == ("measured", 50.0)
    assert one["verification"]["uncertainty_kwh"] == 6.0
    assert "detail" not in one["verification"]
    assert by_id[seeded["e1_unmeasurable"]]["co2e_avoided_kg"] is None
    assert by_id[seeded["e1_unmeasurable"]]["verification"]["reason"].startswith("history:")
    assert by_id[seeded["e1_pending"]]["verification"] is None

    single = await client.get(f"/api/v1/dispatches/{seeded['e2']}", headers=EAST)
    assert (await single.json())["co2e_avoided_kg"] == 17.0


async def test_one_verification_with_its_detail(client: Any, seeded: dict[str, int]) -> None:
    found = await client.get(f"/api/v1/dispatches/{seeded['e1']}/verification", headers=EAST)
    assert found.status == 200, await found.text()
    body = await found.json()
    assert (body["dispatch_id"], body["meters"], body["flags"]) == (
        seeded["e1"],
        ["m-e1.p_kw"],
        ["adjustment_capped"],
    )
    assert body["detail"]["intervals"][0]["phase"] == "event"

    pending = await client.get(f"/api/v1/dispatches/{seeded['e1_pending']}/verification", headers=EAST)
    assert pending.status == 404
    assert "no verification yet" in (await pending.json())["detail"]
    # Another tenant's dispatch, a dispatch outside the caller's node, and nonsense: not found.
    assert (await client.get(f"/api/v1/dispatches/{seeded['w']}/verification", headers=EAST)).status == 404
    assert (
        await client.get(f"/api/v1/dispatches/{seeded['e1']}/verification", headers=EAST_WS2)
    ).status == 404
    assert (await client.get("/api/v1/dispatches/x1/verification", headers=EAST)).status == 404
    assert (await client.get(f"/api/v1/dispatches/{seeded['e1']}/verification")).status == 401


async def test_monthly_sums_within_the_callers_nodes(client: Any, seeded: dict[str, int]) -> None:
    async def month(hdrs: dict[str, str], **params: str) -> Any:
        response = await client.get("/api/v1/verification/monthly", params=params, headers=hdrs)
        assert response.status == 200, await response.text()
        return await response.json()

    east = await month(EAST, node="grp-e", month="2026-10")
    assert (east["dispatches"], east["measured"], east["unmeasurable"]) == (3, 2, 1)
    assert east["energy_avoided_kwh"] == pytest.approx(80.0)
    assert east["uncertainty_kwh"] == pytest.approx(10.0)  # sqrt(6^2 + 8^2): independent errors
    assert east["co2e_avoided_t"] == pytest.approx(0.0455)
    assert east["co2e_uncertainty_t"] == pytest.approx(math.hypot(3.4, 4.6) / 1000)
    assert (east["confidence"], east["flag_counts"], east["node"]) == (0.9, {"adjustment_capped": 1}, "grp-e")

    assert await month(EAST, month="2026-10") == {**east, "node": None}  # no node: all the caller sees
    assert (await month(EAST, node="ws-e2", month="2026-10"))["energy_avoided_kwh"] == pytest.approx(30.0)
    assert (await month(EAST, node="ws-e1", month="2026-09"))["dispatches"] == 1
    only_ws2 = await month(EAST_WS2, month="2026-10")
    assert (only_ws2["dispatches"], only_ws2["energy_avoided_kwh"]) == (1, 30.0)
    west = await month(WEST, node="grp-w", month="2026-10")
    assert (west["dispatches"], west["co2e_avoided_t"]) == (1, pytest.approx(0.057))
    empty = await month(WEST, month="2026-08")
    assert (empty["dispatches"], empty["energy_avoided_kwh"], empty["confidence"]) == (0, 0.0, None)


@pytest.mark.parametrize(
    ("hdrs", "params", "status"),
    [
        (EAST, {"node": "grp-w", "month": "2026-10"}, 404),  # another tenant's node
        (EAST_WS2, {"node": "grp-e", "month": "2026-10"}, 404),  # above the caller's grant
        (EAST, {"node": "nowhere", "month": "2026-10"}, 404),
        (EAST, {"node": "grp-e"}, 400),  # the month is required
        (EAST, {"month": "2026-13"}, 400),
        (EAST, {"month": "October"}, 400),
        ({}, {"month": "2026-10"}, 401),
    ],
)
async def test_monthly_refusals(
    client: Any, seeded: dict[str, int], hdrs: dict[str, str], params: dict[str, str], status: int
) -> None:
    response = await client.get("/api/v1/verification/monthly", params=params, headers=hdrs)
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
