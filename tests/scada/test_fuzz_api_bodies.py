"""Fuzz every JSON-body route of the running server: 2xx, or a problem+json 4xx with a detail.

The server is the real application (PostgreSQL, Redis, authentication) on a real port, as in
test_api_fuzz_smoke.py; schemathesis there follows the OpenAPI document, this test goes around it:
bodies of the wrong type, with fields missing or unknown, huge strings and numbers, NaN and Infinity,
lone surrogates, deep nesting, bytes that are not JSON or not UTF-8, and wrong or odd content types
and charsets. Hypothesis runs in a worker thread with a blocking HTTP client (the server's loop is
the test's), one request per example.

The one 5xx a well-formed request may get is the documented 503 of an action this process does not
run (alarm actions and dispatch decisions belong to the analytics role; this server runs only the
API role), and only once the body has passed validation.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests  # noqa: TID251 -- a blocking client in a worker thread, never on the event loop
from _auth_helpers import start_api_server
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from control_engine.dispatcher import DispatchMode, DispatchRequest, DispatchState
from scada.api.dispatches import DISPATCH_STORE
from scada.model import NodeId, PointId

SITE = """
site: {id: fuzz, name: Fuzz site}
hierarchy:
  - {id: grp, name: G, level: group, children: [{id: park, name: P, level: park, children: [
      {id: ent, name: E, level: enterprise, children: [{id: ws, name: W, level: workshop}]}]}]}
devices:
  - id: m1
    node: ws
    kind: power_meter
    protocol: modbus_tcp
    modbus: {host: 127.0.0.1, port: 9}
    points:
      - {key: p_kw, kind: power, unit: kW, carrier: electricity, modbus: {address: 0, type: float32}}
"""

FUZZ_SETTINGS = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # a failure names its request; shrinking would resend many
    suppress_health_check=list(HealthCheck),
)
REQUEST_TIMEOUT_S = 10.0
ROLE_ELSEWHERE = "the process running the analytics role"

# --------------------------------------------------------------------------------------------------
# What each route takes, and how to spoil it

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**330), max_value=10**330)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["", " ", "\x00", "\ud800", "admin", "operator", "ent", "ws", "grp", "x" * 600])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
PLAIN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
TEXT = (
    PLAIN
    | PLAIN
    | st.text(max_size=30)
    | st.sampled_from(["", "  ", "\x00x", "\ud800", "x" * 20_000, "grp", "ent", "admin"])
)
LONG_TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=12, max_size=24)
NUMBER = (
    st.floats(min_value=0.5, max_value=1e6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(10**6), 10**6)
)
GRANT = st.fixed_dictionaries(
    {
        "node": st.sampled_from(["grp", "ent", "nowhere"]) | TEXT,
        "role": st.sampled_from(["viewer", "admin", "god"]),
    }
)


@dataclass(frozen=True, repr=False)
class Route:
    """One JSON-body route: method, path, and a strategy per field of a plausible body."""

    method: str
    path: str
    fields: Mapping[str, st.SearchStrategy[Any]]
    service_elsewhere: bool = False
    """True when a valid body reaches an action of another role (a 503 that names it)."""

    def __repr__(self) -> str:
        return f"Route({self.method} {self.path})"


ROUTES = [
    Route(
        "POST", "/api/v1/auth/login", {"tenant": st.just("fuzz") | TEXT, "username": TEXT, "password": TEXT}
    ),
    Route("POST", "/api/v1/auth/refresh", {"refresh_token": TEXT}),
    Route("POST", "/api/v1/auth/logout", {"refresh_token": TEXT}),
    Route(
        "POST",
        "/api/v1/users",
        {"username": TEXT, "password": LONG_TEXT | TEXT, "grants": st.lists(GRANT, min_size=1, max_size=2)},
    ),
    Route(
        "POST",
        "/api/v1/api-keys",
        {"name": TEXT, "node": st.sampled_from(["grp", "ws"]) | TEXT, "role": TEXT},
    ),
    Route("POST", "/api/v1/kiosk-tokens", {"name": TEXT, "node": st.sampled_from(["grp", "ws"]) | TEXT}),
    Route("PUT", "/api/v1/quotas/ent/2026-12", {"quota_t": NUMBER, "price_cny_per_t": NUMBER}),
    Route("POST", "/api/v1/points/m1.p_kw/commands", {"value": NUMBER, "reason": TEXT, "wait_s": NUMBER}),
    Route("POST", "/api/v1/dispatches/{dispatch}/approve", {"comment": TEXT}, service_elsewhere=True),
    Route("POST", "/api/v1/dispatches/{dispatch}/reject", {"comment": TEXT}, service_elsewhere=True),
    Route(
        "POST",
        "/api/v1/alarms/m1:offline/acknowledge",
        {"by": TEXT, "comment": TEXT, "with_group": st.booleans()},
        service_elsewhere=True,
    ),
    Route(
        "POST",
        "/api/v1/alarms/m1:offline/shelve",
        {"by": TEXT, "reason": TEXT, "duration_s": NUMBER},
        service_elsewhere=True,
    ),
    Route(
        "POST", "/api/v1/alarms/m1:offline/unshelve", {"by": TEXT, "comment": TEXT}, service_elsewhere=True
    ),
]

CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "application/json; charset=no-such-charset",
        "application/problem+json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ]
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def bodies(draw: st.DrawFn, route: Route) -> bytes:
    """A body for ``route``: plausible fields of any type, extra fields, or bytes that are not JSON."""
    kind = draw(st.sampled_from(["valid", "valid", "fields", "fields", "json", "raw"]))
    if kind == "raw":
        return draw(
            st.binary(max_size=60)
            | st.sampled_from(
                [
                    b"",
                    b"{",
                    b'{"a": 1',
                    b"[" * 20_000,
                    b'{"value": 1' + b"0" * 5_000 + b"}",
                    b"\xff\xfe{}",
                    b"\xef\xbb\xbf{}",
                    b"null",
                    b'"text"',
                ]
            )
        )
    if kind == "json":
        return _dumps(draw(JSON_VALUES))
    if kind == "valid":  # every field of the right type: the request reaches the handler's own checks
        return _dumps({name: draw(valid) for name, valid in route.fields.items()})
    body: dict[str, Any] = {}
    for name, valid in route.fields.items():
        choice = draw(st.sampled_from(["valid", "valid", "wrong", "missing"]))
        if choice == "valid":
            body[name] = draw(valid)
        elif choice == "wrong":
            body[name] = draw(JSON_VALUES)
    if draw(st.booleans()):
        body.update(draw(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2)))  # unknown fields
    return _dumps(body)


@st.composite
def requests_to_send(draw: st.DrawFn) -> tuple[Route, bytes, str | None]:
    route = draw(st.sampled_from(ROUTES))
    return route, draw(bodies(route)), draw(CONTENT_TYPES)


# --------------------------------------------------------------------------------------------------
# The property


@dataclass
class Tally:
    """Statuses seen, per route, for the final sanity checks and the bench."""

    statuses: dict[str, dict[int, int]] = field(default_factory=dict)

    def add(self, route: Route, status: int) -> None:
        by_status = self.statuses.setdefault(route.path, {})
        by_status[status] = by_status.get(status, 0) + 1


def check_api_request(
    session: requests.Session,
    base_url: str,
    headers: Mapping[str, str],
    request: tuple[Route, bytes, str | None],
    *,
    dispatch_id: int,
    tally: Tally | None = None,
) -> None:
    """Send one request; the answer is 2xx, a problem+json 4xx with a detail, or the documented 503."""
    route, body, content_type = request
    sent = dict(headers)
    if content_type is not None:
        sent["Content-Type"] = content_type
    url = base_url + route.path.format(dispatch=dispatch_id)
    response = session.request(route.method, url, data=body, headers=sent, timeout=REQUEST_TIMEOUT_S)
    status = response.status_code
    if tally is not None:
        tally.add(route, status)
    shown = f"{route.method} {route.path} {content_type!r} {body[:200]!r} -> {status} {response.text[:300]}"
    if 200 <= status < 300:
        return
    assert response.headers.get("Content-Type", "").startswith("application/problem+json"), shown
    problem = response.json()
    assert isinstance(problem.get("detail"), str), shown
    assert problem["detail"], shown
    assert problem.get("status") == status, shown
    if status >= 500:
        assert route.service_elsewhere, shown
        assert status == 503, shown
        assert ROLE_ELSEWHERE in problem["detail"], shown
        return
    assert 400 <= status < 500, shown


def run_api_fuzz(
    base_url: str,
    headers: Mapping[str, str],
    *,
    dispatch_id: int,
    fuzz_settings: settings = FUZZ_SETTINGS,
    tally: Tally | None = None,
) -> None:
    """Run the property against a server; raises the first failing example's AssertionError."""
    with requests.Session() as session:

        @fuzz_settings
        @given(requests_to_send())
        @example(
            (ROUTES[0], b'{"tenant": "fuzz", "username": "\\ud800", "password": "x"}', "application/json")
        )
        @example((ROUTES[3], b'{"username": "u\\u0000", "password": "p", "grants": []}', "application/json"))
        @example((ROUTES[6], b'{"quota_t": 1' + b"0" * 400 + b"}", "application/json"))
        @example((ROUTES[6], b'{"quota_t": NaN}', "application/json"))
        @example((ROUTES[7], b'{"value": 1' + b"0" * 400 + b"}", "application/json"))
        @example((ROUTES[7], b'{"value": 1' + b"0" * 5000 + b"}", "application/json"))
        @example((ROUTES[7], b"[" * 20_000, "application/json"))
        @example((ROUTES[7], b'{"value": 1}', "application/json; charset=no-such-charset"))
        @example((ROUTES[7], b'{"value": 1}', "application/json; charset=utf-16"))
        @example((ROUTES[8], b'{"comment": "\\ud800"}', "application/json"))
        @example((ROUTES[12], b'{"by": "\\udfff"}', "application/json"))
        def one(request: tuple[Route, bytes, str | None]) -> None:
            check_api_request(session, base_url, headers, request, dispatch_id=dispatch_id, tally=tally)

        one()


async def start_fuzz_server(
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    aiohttp_server: Callable[[web.Application], Any],
) -> tuple[TestServer, dict[str, str], int]:
    """Start the API role on a real port; return it, an admin's headers and an advisory dispatch.

    An advisory dispatch cannot be approved or rejected (409) once the body is read: approving one
    that awaits approval would send it and wait for the device, which is not what is fuzzed here.
    """
    server, headers = await start_api_server(
        SITE,
        aiohttp_server,
        pg_url=pg_url,
        redis_url=redis_url,
        mqtt_url=mqtt_url,
        stream_prefix=stream_prefix,
    )
    dispatch = await server.app[DISPATCH_STORE].create(
        DispatchRequest(node=NodeId("ent"), point=PointId("m1.p_kw"), value=1.0, reason="fuzz"),
        DispatchMode.ADVISORY,
        DispatchState.ADVISORY,
    )
    return server, headers, dispatch.id


async def test_json_bodies_get_2xx_or_a_problem_4xx(
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    aiohttp_server: Callable[[web.Application], Any],
) -> None:
    server, headers, dispatch_id = await start_fuzz_server(
        pg_url, redis_url, mqtt_url, stream_prefix, aiohttp_server
    )
    tally = Tally()
    await asyncio.to_thread(
        run_api_fuzz, str(server.make_url("")).rstrip("/"), headers, dispatch_id=dispatch_id, tally=tally
    )
    assert set(tally.statuses) == {r.path for r in ROUTES}, "every route got requests"
    # Valid bodies got through validation somewhere (not every answer is a 400).
    assert any(status != 400 for by_status in tally.statuses.values() for status in by_status), tally
