"""REST resources of alarms: statuses, events, KPIs, and the operator actions (docs/alarms.md).

Statuses, events and KPIs are read from the database, so any API process serves them. Operator
actions (acknowledge, shelve, unshelve) change the alarm engine, which lives in the process that runs
the analytics role; another process answers 503 for them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from anomaly.alarm_kpi import compute_kpis
from anomaly.alarm_model import AlarmEvent, AlarmInputError, AlarmStateError
from anomaly.alarms import AlarmEngine
from anomaly.service import AlarmStore, AnomalyService
from scada.api.auth import audit_actions, scope_of
from scada.api.problem import ApiProblem, json_object, parse_id, query_int
from scada.api.problem import invalid as _invalid
from scada.api.problem import parse_time as _time
from scada.model import UTC, DecodeError

__all__ = ["ALARM_STORE", "ANOMALY", "add_alarm_routes", "alarm_status_json"]

ANOMALY = web.AppKey("anomaly", AnomalyService)
"""The running anomaly service (only in a process with the analytics role)."""
ALARM_STORE = web.AppKey("alarm_store", AlarmStore)

MAX_EVENTS = 10_000
MAX_SHELVE_S = 86_400.0


def add_alarm_routes(app: web.Application) -> None:
    """Register the alarm resources."""
    app.router.add_get("/api/v1/alarms", alarms)
    app.router.add_get("/api/v1/alarms/events", alarm_events)
    app.router.add_get("/api/v1/alarms/kpis", alarm_kpis)
    app.router.add_post("/api/v1/alarms/{alarm_id}/acknowledge", acknowledge)
    app.router.add_post("/api/v1/alarms/{alarm_id}/shelve", shelve)
    app.router.add_post("/api/v1/alarms/{alarm_id}/unshelve", unshelve)


def _span(query: Mapping[str, str], default: timedelta) -> tuple[datetime, datetime]:
    end = _time(query.get("end"), "end") or datetime.now(UTC)
    start = _time(query.get("start"), "start") or end - default
    if start >= end:
        raise _invalid("start must be before end")
    if end - start > timedelta(days=93):
        raise _invalid("at most 93 days per request")
    return start, end


def alarm_status_json(row: Any) -> dict[str, Any]:
    """Return one ``alarm_status`` row as the API shows it."""
    return {
        "alarm": row["alarm_id"],
        "state": row["state"],
        "since": row["since"].astimezone(UTC).isoformat(),
        "priority": row["priority"],
        "console": row["console"],
        "node": row["node_id"],
        "device": row["device_id"],
        "point": row["point_id"],
        "group": row["group_id"],
        "message": row["message"],
        "value": row["value"],
        "extra": json.loads(row["extra"]),
    }


async def alarms(request: web.Request) -> web.Response:
    """Return the alarms not in normal state (all with ``all=true``), most urgent first."""
    console = request.query.get("console") or None
    show_all = request.query.get("all", "false")
    if show_all not in ("true", "false"):
        raise _invalid("all: true or false")
    scope = scope_of(request)
    rows = await request.app[ALARM_STORE].statuses(
        console=console, active_only=show_all == "false", nodes=sorted(scope) if scope is not None else None
    )
    return web.json_response({"alarms": [alarm_status_json(r) for r in rows]})


async def alarm_events(request: web.Request) -> web.Response:
    """Return alarm state transitions of a time span (default: the last 24 h), oldest first, paged."""
    start, end = _span(request.query, timedelta(days=1))
    limit = query_int(request.query, "limit", default=1000, low=1, high=MAX_EVENTS)
    after = _cursor(request.query.get("cursor"))
    scope = scope_of(request)
    rows = await request.app[ALARM_STORE].events(
        alarm=request.query.get("alarm") or None,
        console=request.query.get("console") or None,
        start=start,
        end=end,
        limit=limit,
        nodes=sorted(scope) if scope is not None else None,
        after=after,
    )
    next_cursor = (
        f"{rows[-1]['at'].astimezone(UTC).isoformat()}|{rows[-1]['seq']}" if len(rows) == limit else None
    )
    return web.json_response(
        {
            "events": [{**json.loads(r["event"]), "extra": json.loads(r["extra"])} for r in rows],
            "next_cursor": next_cursor,
        }
    )


def _cursor(raw: str | None) -> tuple[datetime, int] | None:
    if not raw:
        return None
    at, _, raw_seq = raw.rpartition("|")
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        when = None
    seq = parse_id(raw_seq)
    if when is None or when.tzinfo is None or seq is None:
        raise _invalid("cursor: the next_cursor of the previous page")
    return when, seq


async def alarm_kpis(request: web.Request) -> web.Response:
    """Return a console's alarm KPIs over a span (default: the last 24 h): rates, floods, bad actors."""
    console = request.query.get("console")
    if not console:
        raise _invalid("console: required")
    start, end = _span(request.query, timedelta(days=1))
    # Events from a day before the span too: an alarm active since then is stale inside it.
    rows = await request.app[ALARM_STORE].events(
        alarm=None, console=console, start=start - timedelta(days=1), end=end, limit=1_000_000
    )
    try:
        events = [AlarmEvent.from_dict(json.loads(r["event"])) for r in rows]
        kpis = compute_kpis(events, console=console, start=start, end=end)
    except (DecodeError, AlarmInputError) as err:
        raise _invalid(str(err)) from err
    return web.json_response(
        {"console": console, "start": start.isoformat(), "end": end.isoformat(), **kpis.to_dict()}
    )


async def _body(request: web.Request, allowed: set[str], required: set[str]) -> dict[str, Any]:
    body = await json_object(request, allowed)
    for name in sorted(required):
        if not isinstance(body.get(name), str) or not body[name].strip():
            raise _invalid(f"{name}: required, a non-empty string")
    for name in allowed - {"duration_s", "with_group"}:
        if name in body and not isinstance(body[name], str):
            raise _invalid(f"{name}: must be a string")
    return body


async def _act(
    request: web.Request, action: Callable[[AlarmEngine, datetime], list[AlarmEvent]]
) -> web.Response:
    service = request.app.get(ANOMALY)
    if service is None:
        raise ApiProblem(
            503,
            "Service unavailable",
            "alarm actions are taken by the process running the analytics role; send them there",
        )
    try:
        at = service.now()
        events = await service.act(lambda engine: action(engine, at))
    except AlarmStateError as err:
        raise ApiProblem(409, "Conflict", str(err), slug="alarm-state") from err
    except AlarmInputError as err:
        raise _invalid(str(err)) from err
    await audit_actions(  # one transaction for a whole group's acknowledgement
        request,
        *(
            (
                f"alarm.{event.cause.value}",
                f"alarm:{event.alarm_id}",
                {"from": event.from_state.value, "to": event.to_state.value, "comment": event.comment},
            )
            for event in events
        ),
    )
    return web.json_response({"events": [e.to_dict() for e in events]})


async def acknowledge(request: web.Request) -> web.Response:
    """Acknowledge an alarm: ``{"by": "operator", "comment": "...", "with_group": false}``."""
    alarm_id = request.match_info["alarm_id"]
    body = await _body(request, {"by", "comment", "with_group"}, {"by"})
    with_group = body.get("with_group", False)
    if not isinstance(with_group, bool):
        raise _invalid("with_group: must be true or false")
    return await _act(
        request,
        lambda engine, at: engine.acknowledge(
            alarm_id, at=at, by=body["by"], comment=body.get("comment", ""), with_group=with_group
        ),
    )


async def shelve(request: web.Request) -> web.Response:
    """Shelve an alarm for a while: ``{"by": "...", "reason": "...", "duration_s": 3600}``."""
    alarm_id = request.match_info["alarm_id"]
    body = await _body(request, {"by", "reason", "duration_s"}, {"by", "reason"})
    duration = body.get("duration_s")
    if (
        isinstance(duration, bool)
        or not isinstance(duration, int | float)
        or not 0 < duration <= MAX_SHELVE_S
    ):
        raise _invalid(f"duration_s: a number of seconds in (0, {MAX_SHELVE_S:g}]")
    seconds = timedelta(seconds=float(duration))
    return await _act(
        request,
        lambda engine, at: engine.shelve(
            alarm_id, at=at, until=at + seconds, by=body["by"], reason=body["reason"]
        ),
    )


async def unshelve(request: web.Request) -> web.Response:
    """Return a shelved alarm to service: ``{"by": "...", "comment": "..."}``."""
    alarm_id = request.match_info["alarm_id"]
    body = await _body(request, {"by", "comment"}, {"by"})
    return await _act(
        request,
        lambda engine, at: engine.unshelve(alarm_id, at=at, by=body["by"], comment=body.get("comment", "")),
    )
