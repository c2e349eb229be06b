"""REST resources of dispatches: the queue the controller fills, and the operator's approve and reject.

Lists are read from the database by any API process; approving or rejecting needs the dispatcher, which
runs with the analytics role (503 elsewhere). The operator role on the dispatch's node is required;
a dispatch outside the caller's nodes answers 404.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from control_engine.dispatcher import Dispatch, Dispatcher, DispatchError, DispatchState, DispatchStore
from scada.api.auth import AUTH, principal_of, scope_of
from scada.api.problem import ApiProblem, json_object, parse_id, query_int
from scada.api.problem import invalid as _invalid
from scada.security import Role

__all__ = ["DISPATCHER", "DISPATCH_STORE", "add_dispatch_routes"]

DISPATCHER = web.AppKey("dispatcher", Dispatcher)
"""The running dispatcher (only in a process with the analytics role)."""
DISPATCH_STORE = web.AppKey("dispatch_store", DispatchStore)
LIST_DEFAULT: Final = 100
LIST_MAX: Final = 1000
"""Dispatches per ``GET /api/v1/dispatches`` (default and most)."""
COMMENT_MAX_CHARS: Final = 1000


def add_dispatch_routes(app: web.Application) -> None:
    """Register the dispatch resources."""
    app.router.add_get("/api/v1/dispatches", list_dispatches)
    app.router.add_get("/api/v1/dispatches/{dispatch_id}", get_dispatch)
    app.router.add_post("/api/v1/dispatches/{dispatch_id}/approve", approve)
    app.router.add_post("/api/v1/dispatches/{dispatch_id}/reject", reject)


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
    return web.json_response({"dispatches": [d.to_json() for d in found]})


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
    """Return one dispatch with its result."""
    return web.json_response((await _visible(request, Role.VIEWER)).to_json())


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
    return web.json_response(done.to_json())


async def approve(request: web.Request) -> web.Response:
    """Approve a waiting dispatch: it is sent, verified by read-back, and the outcome returned."""
    return await _decide(request, True)


async def reject(request: web.Request) -> web.Response:
    """Reject a waiting dispatch."""
    return await _decide(request, False)
