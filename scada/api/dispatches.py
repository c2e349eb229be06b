"""REST resources of dispatches: the controller's queue, approve and reject, and what each one saved.

Lists are read from the database by any API process; approving or rejecting needs the dispatcher, which
runs with the analytics role (503 elsewhere). The operator role on the dispatch's node is required;
a dispatch outside the caller's nodes answers 404.

Every dispatch's JSON carries ``verification`` (the stored effect without its per-interval detail, or
null until the verification service has measured it) and ``co2e_avoided_kg`` (the measured net
effect, null unless measured). ``GET /api/v1/dispatches/{id}/verification`` returns the effect with
its detail; ``GET /api/v1/verification/monthly`` adds a month's up (docs/dispatch-verification.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from control_engine.dispatcher import Dispatch, Dispatcher, DispatchError, DispatchState, DispatchStore
from control_engine.verify_service import Verification, VerificationStatus, VerificationStore
from scada.api.auth import AUTH, principal_of, scope_of
from scada.api.problem import ApiProblem, json_object, parse_id, query_int
from scada.api.problem import invalid as _invalid
from scada.security import Role

__all__ = ["DISPATCHER", "DISPATCH_STORE", "VERIFICATION_STORE", "add_dispatch_routes", "dispatch_json"]

DISPATCHER = web.AppKey("dispatcher", Dispatcher)
"""The running dispatcher (only in a process with the analytics role)."""
DISPATCH_STORE = web.AppKey("dispatch_store", DispatchStore)
VERIFICATION_STORE = web.AppKey("verification_store", VerificationStore)
"""The measured effects (migration 009); without it dispatches show no verification."""
LIST_DEFAULT: Final = 100
LIST_MAX: Final = 1000
"""Dispatches per ``GET /api/v1/dispatches`` (default and most)."""
COMMENT_MAX_CHARS: Final = 1000
_MONTH: Final = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def add_dispatch_routes(app: web.Application) -> None:
    """Register the dispatch resources."""
    app.router.add_get("/api/v1/dispatches", list_dispatches)
    app.router.add_get("/api/v1/dispatches/{dispatch_id}", get_dispatch)
    app.router.add_post("/api/v1/dispatches/{dispatch_id}/approve", approve)
    app.router.add_post("/api/v1/dispatches/{dispatch_id}/reject", reject)
    app.router.add_get("/api/v1/dispatches/{dispatch_id}/verification", get_verification)
    app.router.add_get("/api/v1/verification/monthly", monthly_verification)


def dispatch_json(dispatch: Dispatch, verification: Verification | None) -> dict[str, Any]:
    """Return a dispatch as the API shows it, with its measured effect (None: not measured yet)."""
    if verification is None:
        return {**dispatch.to_json(), "verification": None, "co2e_avoided_kg": None}
    measured = verification.status is VerificationStatus.MEASURED
    return {
        **dispatch.to_json(),
        "verification": verification.to_json(),
        "co2e_avoided_kg": verification.co2e_avoided_kg if measured else None,
    }


async def _effects(request: web.Request, dispatches: list[Dispatch]) -> Mapping[int, Verification]:
    store = request.app.get(VERIFICATION_STORE)
    if store is None:
        return {}
    return await store.of_dispatches([d.id for d in dispatches])


async def list_dispatches(request: web.Request) -> web.Response:
    """Return the newest dispatches the caller may see (``state`` filters, repeatable comma list)."""
    raw_states = request.query.get("state")
    states: list[DispatchState] | None = None
    if raw_states:
        try:
            states = [DispatchState(s) for s in raw_states.split(",")]
        except ValueError:
            known = ", ".join(s.value for s in DispatchState)
            raise _invalid(f"state: one or more of {known}") from None
    limit = query_int(request.query, "limit", default=LIST_DEFAULT, low=1, high=LIST_MAX)
    scope = scope_of(request)
    found = await request.app[DISPATCH_STORE].select(
        states=states, nodes=sorted(scope) if scope is not None else None, limit=limit
    )
    effects = await _effects(request, found)
    return web.json_response({"dispatches": [dispatch_json(d, effects.get(d.id)) for d in found]})


async def _visible(request: web.Request, role: Role) -> Dispatch:
    """Return the dispatch in the path if the caller holds ``role`` on its node (404 if it cannot see it)."""
    raw = request.match_info["dispatch_id"]
    dispatch_id = parse_id(raw)
    dispatch = None if dispatch_id is None else await request.app[DISPATCH_STORE].get(dispatch_id)
    scope = scope_of(request)
    if dispatch is None or (scope is not None and dispatch.node not in scope):
        raise ApiProblem(404, "Not found", f"no dispatch {raw!r}", slug="not-found")
    if AUTH in request.app and not principal_of(request).can(role, dispatch.node, request.app[AUTH].tree):
        raise ApiProblem(403, "Forbidden", f"needs the {role.value} role on {dispatch.node!r}")
    return dispatch


async def get_dispatch(request: web.Request) -> web.Response:
    """Return one dispatch with its result and its measured effect."""
    dispatch = await _visible(request, Role.VIEWER)
    effects = await _effects(request, [dispatch])
    return web.json_response(dispatch_json(dispatch, effects.get(dispatch.id)))


def _verification_store(request: web.Request) -> VerificationStore:
    store = request.app.get(VERIFICATION_STORE)
    if store is None:
        raise ApiProblem(503, "Service unavailable", "dispatch verification is not configured on this server")
    return store


async def get_verification(request: web.Request) -> web.Response:
    """Return what a dispatch measurably saved, with the per-interval baseline (404 until measured)."""
    dispatch = await _visible(request, Role.VIEWER)
    verification = await _verification_store(request).get(dispatch.id)
    if verification is None:
        raise ApiProblem(
            404,
            "Not found",
            f"dispatch {dispatch.id} has no verification yet: it is measured once its hold and the "
            "rebound window after it have passed",
            slug="not-verified",
        )
    return web.json_response(verification.to_json(with_detail=True))


async def monthly_verification(request: web.Request) -> web.Response:
    """Add up a month's measured effects under a node: tCO2e and kWh avoided ± combined uncertainty."""
    store = _verification_store(request)
    raw_month = request.query.get("month")
    if raw_month is None or not _MONTH.fullmatch(raw_month) or not 1990 <= int(raw_month[:4]) <= 2100:
        raise _invalid(f"month: required, YYYY-MM in the site's time zone, got {raw_month!r}")
    node = request.query.get("node")
    scope = scope_of(request)
    if node is not None and scope is not None and node not in scope:
        raise ApiProblem(404, "Not found", f"no node {node!r}", slug="not-found")
    sums = await store.monthly(raw_month, node=node, within=sorted(scope) if scope is not None else None)
    if sums is None:
        raise ApiProblem(404, "Not found", f"no node {node!r}", slug="not-found")
    return web.json_response({"node": node, **sums.to_json()})


async def _comment(request: web.Request) -> str:
    if not request.can_read_body:
        return ""
    comment = (await json_object(request, {"comment"})).get("comment", "")
    if not isinstance(comment, str) or len(comment) > COMMENT_MAX_CHARS:
        raise _invalid(f"comment: a text of at most {COMMENT_MAX_CHARS} characters")
    return comment


async def _decide(request: web.Request, approve_it: bool) -> web.Response:
    dispatch_id = (await _visible(request, Role.OPERATOR)).id
    comment = await _comment(request)
    dispatcher = request.app.get(DISPATCHER)
    if dispatcher is None:
        raise ApiProblem(
            503, "Service unavailable", "dispatches are decided by the process running the analytics role"
        )
    by = principal_of(request).subject if AUTH in request.app else "operator"
    try:
        if approve_it:
            done = await dispatcher.approve(dispatch_id, by=by, comment=comment)
        else:
            done = await dispatcher.reject(dispatch_id, by=by, comment=comment)
    except DispatchError as err:
        raise ApiProblem(409, "Conflict", str(err), slug="dispatch-state") from err
    return web.json_response(dispatch_json(done, None))


async def approve(request: web.Request) -> web.Response:
    """Approve a waiting dispatch: it is sent, verified by read-back, and the outcome returned."""
    return await _decide(request, True)


async def reject(request: web.Request) -> web.Response:
    """Reject a waiting dispatch."""
    return await _decide(request, False)
