"""REST resources of the carbon ledger: emissions, quotas, forecasts and restatements.

Emissions and forecasts are read from the database, so any API process serves them whichever
process runs the analytics role. Figures are tCO2e; interval starts are UTC instants of the site's
local hours, days and months.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from control_engine.carbon import CarbonQueries, CarbonService, CarbonStore, Quota
from control_engine.forecast import month_bounds, month_key
from control_engine.quota import Basis, QuotaStatus
from scada.api.auth import audit_actions, default_node, scope_of
from scada.api.problem import ApiProblem, json_object, query_int
from scada.api.problem import invalid as _invalid
from scada.api.problem import parse_time as _time
from scada.api.routes import CATALOG
from scada.model import UTC, NodeId

__all__ = ["CARBON", "CARBON_QUERIES", "CARBON_STORE", "add_carbon_routes"]

CARBON = web.AppKey("carbon", CarbonService)
"""The running carbon service (only in a process with the analytics role)."""
CARBON_STORE = web.AppKey("carbon_store", CarbonStore)
CARBON_QUERIES = web.AppKey("carbon_queries", CarbonQueries)

MAX_INTERVALS = {"hour": 24 * 400, "day": 3660, "month": 1200}
KG_PER_T = 1000.0
_MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def add_carbon_routes(app: web.Application) -> None:
    """Register the carbon resources."""
    app.router.add_get("/api/v1/emissions", emissions)
    app.router.add_get("/api/v1/quotas", quotas)
    app.router.add_get("/api/v1/quotas/{node_id}/{month}", quota)
    app.router.add_put("/api/v1/quotas/{node_id}/{month}", put_quota)
    app.router.add_delete("/api/v1/quotas/{node_id}/{month}", delete_quota)
    app.router.add_get("/api/v1/forecasts", forecasts)
    app.router.add_get("/api/v1/ledger/restatements", restatements)


def _node(request: web.Request, raw: str | None) -> NodeId:
    catalog = request.app[CATALOG]
    if raw is None:
        if scope_of(request) is not None:
            return NodeId(default_node(request))  # the top of what the caller sees
        return NodeId(catalog.site.hierarchy[0].id)
    if not catalog.has_node(raw):
        raise ApiProblem(404, "Not found", f"no node {raw!r}", slug="not-found")
    return NodeId(raw)


def _month(raw: str | None, zone: ZoneInfo) -> str:
    if raw is None:
        return month_key(datetime.now(UTC).astimezone(zone))
    if not _MONTH.fullmatch(raw) or not 1990 <= int(raw[:4]) <= 2100:
        raise _invalid(f"month: expected YYYY-MM, got {raw!r}")
    return raw


def _t(kg: float) -> float:
    return kg / KG_PER_T


async def emissions(request: web.Request) -> web.Response:
    """Return a node's (and its descendants') tCO2e per hour, day or month, by scope and by carrier."""
    site = request.app[CATALOG].site
    zone = ZoneInfo(site.site.timezone)
    node = _node(request, request.query.get("node"))
    period = request.query.get("period", "day")
    if period not in MAX_INTERVALS:
        raise _invalid(f"period: must be one of {', '.join(MAX_INTERVALS)}, not {period!r}")
    now = datetime.now(UTC)
    end = _time(request.query.get("end"), "end") or now
    start = _time(request.query.get("start"), "start")
    if start is None:
        start = month_bounds(month_key(end.astimezone(zone)), zone)[0].astimezone(UTC)
    if start >= end:
        raise _invalid("start must be before end")
    span = {"hour": timedelta(hours=1), "day": timedelta(days=1), "month": timedelta(days=28)}[period]
    if (end - start) / span > MAX_INTERVALS[period]:
        raise _invalid(f"at most {MAX_INTERVALS[period]} {period}s per request: use a longer period")
    intervals, carriers = await request.app[CARBON_QUERIES].emissions(
        node, start, end, period=period, timezone=site.site.timezone
    )
    by_start: dict[datetime, list[float]] = {}
    for row in intervals:
        by_start.setdefault(row["start"], [0.0, 0.0])[row["scope"] - 1] += row["kg"]
    scope1 = sum(v[0] for v in by_start.values())
    scope2 = sum(v[1] for v in by_start.values())
    return web.json_response(
        {
            "node": node,
            "period": period,
            "timezone": site.site.timezone,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "unit": "tCO2e",
            "intervals": [
                {
                    "start": t.astimezone(UTC).isoformat(),
                    "scope1_t": _t(v[0]),
                    "scope2_t": _t(v[1]),
                    "total_t": _t(v[0] + v[1]),
                }
                for t, v in sorted(by_start.items())
            ],
            "total": {"scope1_t": _t(scope1), "scope2_t": _t(scope2), "total_t": _t(scope1 + scope2)},
            "by_carrier": [
                {
                    "carrier": r["carrier"],
                    "source": r["source"],
                    "scope": r["scope"],
                    "unit": r["unit"],
                    "activity": r["activity"],
                    "co2e_t": _t(r["kg"]),
                }
                for r in carriers
            ],
        }
    )


def _quota_json(q: Quota, forecast: Any | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "node": q.node,
        "month": q.month,
        "quota_t": q.quota_t,
        "price_cny_per_t": q.price_cny_per_t,
        "status": None,
    }
    if forecast is not None:
        status = QuotaStatus(
            node=q.node,
            month=q.month,
            quota_t=q.quota_t,
            actual_t=max(0.0, forecast["actual_t"]),
            forecast_t=max(0.0, forecast["forecast_t"]),
            forecast_low_t=forecast["low_t"],
            forecast_high_t=forecast["high_t"],
            price_cny_per_t=q.price_cny_per_t,
        )
        body["status"] = {
            "computed_at": forecast["computed_at"].astimezone(UTC).isoformat(),
            "actual_t": status.actual_t,
            "forecast_t": status.forecast_t,
            "forecast_low_t": status.forecast_low_t,
            "forecast_high_t": status.forecast_high_t,
            "actual_pct": status.share_pct(Basis.ACTUAL),
            "forecast_pct": status.share_pct(Basis.FORECAST),
            "surplus_t": status.surplus_t,
            "forecast_surplus_t": status.forecast_surplus_t,
            "forecast_value_cny": status.forecast_value_cny,
        }
    return body


async def quotas(request: web.Request) -> web.Response:
    """Every quota (of one month and/or node if asked) with where the node stands against it."""
    zone = ZoneInfo(request.app[CATALOG].site.site.timezone)
    month = _month(request.query["month"], zone) if "month" in request.query else None
    node = _node(request, request.query["node"]) if "node" in request.query else None
    scope = scope_of(request)
    found = [
        q
        for q in await request.app[CARBON_STORE].quotas(month=month, node=node)
        if scope is None or q.node in scope
    ]
    forecast: dict[tuple[str, str], Any] = {}
    for wanted in sorted({q.month for q in found}):  # one query per month, not per quota
        for row in await request.app[CARBON_QUERIES].forecasts(wanted, node):
            forecast[wanted, row["node_id"]] = row
    return web.json_response({"quotas": [_quota_json(q, forecast.get((q.month, q.node))) for q in found]})


async def quota(request: web.Request) -> web.Response:
    """One node's quota for one month, with its status."""
    zone = ZoneInfo(request.app[CATALOG].site.site.timezone)
    node = _node(request, request.match_info["node_id"])
    month = _month(request.match_info["month"], zone)
    found = await request.app[CARBON_STORE].quotas(month=month, node=node)
    if not found:
        raise ApiProblem(404, "Not found", f"no quota for {node} in {month}", slug="not-found")
    forecast = await request.app[CARBON_QUERIES].forecasts(month, node)
    return web.json_response(_quota_json(found[0], forecast[0] if forecast else None))


async def put_quota(request: web.Request) -> web.Response:
    """Create or replace a quota: ``{"quota_t": 1200, "price_cny_per_t": 95}`` (price optional)."""
    site = request.app[CATALOG].site
    zone = ZoneInfo(site.site.timezone)
    node = _node(request, request.match_info["node_id"])
    month = _month(request.match_info["month"], zone)
    body = await json_object(request, {"quota_t", "price_cny_per_t"})
    quota_t = body.get("quota_t")
    price = body.get("price_cny_per_t", site.carbon.price_cny_per_t)
    if (
        isinstance(quota_t, bool)
        or not isinstance(quota_t, int | float)
        or not math.isfinite(quota_t)
        or quota_t <= 0
    ):
        raise _invalid("quota_t: must be a positive number of tCO2e")
    if isinstance(price, bool) or not isinstance(price, int | float) or not math.isfinite(price) or price < 0:
        raise _invalid("price_cny_per_t: must be a number >= 0")
    if quota_t >= 1e12 or price >= 1e9:
        raise _invalid("quota_t or price_cny_per_t: implausibly large")
    saved = Quota(node, month, float(quota_t), float(price))
    created = await request.app[CARBON_STORE].put_quota(saved)
    await audit_actions(
        request,
        (
            "quota.put",
            f"quota:{node}:{month}",
            {"quota_t": saved.quota_t, "price_cny_per_t": saved.price_cny_per_t, "created": created},
        ),
    )
    return web.json_response(_quota_json(saved, None), status=201 if created else 200)


async def delete_quota(request: web.Request) -> web.Response:
    """Delete a quota."""
    zone = ZoneInfo(request.app[CATALOG].site.site.timezone)
    node = _node(request, request.match_info["node_id"])
    month = _month(request.match_info["month"], zone)
    if not await request.app[CARBON_STORE].delete_quota(node, month):
        raise ApiProblem(404, "Not found", f"no quota for {node} in {month}", slug="not-found")
    await audit_actions(request, ("quota.delete", f"quota:{node}:{month}", {}))
    return web.Response(status=204)


async def forecasts(request: web.Request) -> web.Response:
    """Return the latest month-end forecasts (of one node if asked), recomputed every minute."""
    zone = ZoneInfo(request.app[CATALOG].site.site.timezone)
    month = _month(request.query.get("month"), zone)
    node = _node(request, request.query["node"]) if "node" in request.query else None
    scope = scope_of(request)
    rows = [
        r
        for r in await request.app[CARBON_QUERIES].forecasts(month, node)
        if scope is None or r["node_id"] in scope
    ]
    if node is not None and not rows:
        raise ApiProblem(404, "Not found", f"no forecast for {node} in {month} yet", slug="not-found")
    return web.json_response(
        {
            "month": month,
            "unit": "tCO2e",
            "forecasts": [
                {
                    "node": r["node_id"],
                    "computed_at": r["computed_at"].astimezone(UTC).isoformat(),
                    "actual_t": r["actual_t"],
                    "forecast_t": r["forecast_t"],
                    "low_t": r["low_t"],
                    "high_t": r["high_t"],
                    "method": r["method"],
                }
                for r in rows
            ],
        }
    )


async def restatements(request: web.Request) -> web.Response:
    """Return the newest restatements of closed hours under a node: the audit trail of late data."""
    node = _node(request, request.query.get("node"))
    limit = query_int(request.query, "limit", default=100, low=1, high=10_000)
    rows = await request.app[CARBON_QUERIES].restatements(node, limit)
    return web.json_response(
        {
            "node": node,
            "restatements": [
                {
                    "id": r["id"],
                    "node": r["node_id"],
                    "hour": r["hour"].astimezone(UTC).isoformat(),
                    "carrier": r["carrier"],
                    "source": r["source"],
                    "old_co2e_kg": r["old_co2e_kg"],
                    "new_co2e_kg": r["new_co2e_kg"],
                    "old_activity": r["old_activity"],
                    "new_activity": r["new_activity"],
                    "reason": r["reason"],
                    "restated_at": r["restated_at"].astimezone(UTC).isoformat(),
                }
                for r in rows
            ],
        }
    )
