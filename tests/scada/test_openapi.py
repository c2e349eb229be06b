"""The OpenAPI document: valid OpenAPI 3.1, in step with the route table, and true to the handlers.

The shapes are checked against what the handlers really emit (the same rendering functions on real
values), so a field renamed in a handler fails here rather than in a client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import jsonschema_rs
import pytest
from aiohttp import web

from anomaly.alarm_model import AlarmEvent, AlarmPriority, AlarmState, EventCause
from control_engine.carbon import Quota
from control_engine.factors import FactorLibrary
from scada import __version__
from scada.api import alarms, auth, carbon, commands, dispatches, routes
from scada.api.openapi import docs_page, openapi_json, openapi_spec, render_docs
from scada.api.problem import ApiProblem, problem_middleware, problem_response
from scada.model import PointId, Quality, Reading

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR  # noqa: E402

SPEC = openapi_spec("test")
METHODS = {"get", "put", "post", "delete", "patch"}

UNDOCUMENTED = {("GET", "/api/v1/ws"), ("GET", "/metrics")}
"""The websocket (described in x-websocket) and the Prometheus text endpoint."""

NOT_YET_ROUTED: set[tuple[str, str]] = set()
"""Documented operations whose handler is not registered yet (none today)."""
PUBLIC = {
    ("GET", "/api/v1/health"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/refresh"),
    ("POST", "/api/v1/auth/logout"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/docs"),
}


def _operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield method.upper(), path, op


def _routed() -> set[tuple[str, str]]:
    app = web.Application()
    routes.add_routes(app)
    carbon.add_carbon_routes(app)
    alarms.add_alarm_routes(app)
    auth.add_auth_routes(app)
    commands.add_command_routes(app)
    dispatches.add_dispatch_routes(app)
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"  # aiohttp adds HEAD to each GET
    }


def _validator(name: str) -> jsonschema_rs.Validator:
    """Return a validator for components/schemas/<name>, resolving $refs inside the document."""
    root = {"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]}
    return jsonschema_rs.validator_for(root, validate_formats=True)


def _assert_valid(name: str, instance: Any) -> None:
    errors = [f"{e.instance_path}: {e.message}" for e in _validator(name).iter_errors(instance)]
    assert not errors, f"{name}: {errors}"


# --------------------------------------------------------------------------------------------------
# The document itself


def test_spec_is_valid_openapi_3_1() -> None:
    assert SPEC["openapi"].startswith("3.1.")
    OPENAPI_31_VALIDATOR.validate(SPEC)


def _schemas_in(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema" and isinstance(value, dict):
                yield value
            else:
                yield from _schemas_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from _schemas_in(value)


def test_every_schema_is_valid_json_schema_2020_12() -> None:
    schemas = [*SPEC["components"]["schemas"].values(), *_schemas_in(SPEC["paths"])]
    schemas += list(_schemas_in(SPEC["components"]["responses"]))
    assert len(schemas) > 100
    for schema in schemas:
        jsonschema_rs.meta.validate(schema)


def test_every_ref_resolves() -> None:
    refs = re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(SPEC))
    assert refs
    for ref in refs:
        node: Any = SPEC
        for part in ref.split("/"):
            assert part in node, f"dangling $ref #/{ref}"
            node = node[part]


def test_schemathesis_loads_every_operation() -> None:
    schema = schemathesis.openapi.from_dict(SPEC)
    loaded = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in loaded} == {(m, p) for m, p, _ in _operations()}


def test_operation_ids_are_unique_and_problems_shared() -> None:
    ids = [op["operationId"] for _m, _p, op in _operations()]
    assert len(ids) == len(set(ids))
    for method, path, op in _operations():
        for status, response in op["responses"].items():
            if int(status) >= 400:
                assert response["$ref"].startswith("#/components/responses/"), (method, path, status)
    for response in SPEC["components"]["responses"].values():
        assert response["content"]["application/problem+json"]["schema"] == {
            "$ref": "#/components/schemas/Problem"
        }


def test_public_routes_override_security_and_the_rest_answer_401() -> None:
    assert SPEC["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}]
    schemes = SPEC["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyAuth"]["in"] == "header"
    assert schemes["apiKeyAuth"]["name"] == "X-API-Key"
    public = {(m, p) for m, p, op in _operations() if op.get("security") == []}
    assert public == PUBLIC
    for method, path, op in _operations():
        if (method, path) in PUBLIC:
            assert "403" not in op["responses"], (method, path)
        else:
            assert {"401", "403"} <= set(op["responses"]), (method, path)


def test_websocket_is_described_outside_paths() -> None:
    assert "/api/v1/ws" not in SPEC["paths"]
    ws = SPEC["x-websocket"]
    assert ws["path"] == "/api/v1/ws"
    assert {"subscribe", "unsubscribe", "subscribe_alarms", "unsubscribe_alarms", "ping"} == set(
        ws["client_messages"]
    )
    assert ws["limits"]["max_points_per_connection"] == routes.WS_MAX_POINTS_PER_CLIENT


# --------------------------------------------------------------------------------------------------
# In step with the route table


def test_every_route_is_documented_and_every_operation_routed() -> None:
    routed = _routed()
    documented = {(m, p) for m, p, _op in _operations()}
    assert routed - UNDOCUMENTED - documented == set(), "routes missing from the spec"
    assert documented - routed - NOT_YET_ROUTED == set(), "operations without a route"
    still_pending = NOT_YET_ROUTED & routed
    assert not still_pending, f"now routed: remove from NOT_YET_ROUTED: {sorted(still_pending)}"


def test_public_operations_are_the_public_policies() -> None:
    public_policies = {key for key, policy in auth.POLICIES.items() if policy.public}
    assert public_policies == PUBLIC
    documented = {(m, p) for m, p, _op in _operations()}
    assert documented - set(auth.POLICIES) == set(), "operations without an access policy"


def test_path_parameters_match_the_templates() -> None:
    for method, path, op in _operations():
        in_template = set(re.findall(r"{([^}]+)}", path))
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert in_template == declared, (method, path)


@pytest.mark.parametrize(
    ("schema_name", "good", "bad"),
    [
        ("POINT_ID", ["a-main-meter.active_power_kw", "m.e_kwh", "0.0"], ["m", "M.e", "m.e.f", "m._e", ".e"]),
        ("MONTH", ["2026-05", "1990-01", "2100-12"], ["2026-13", "2026-00", "1989-12", "2101-01", "26-05"]),
        ("ID", ["park-sip", "w", "a" * 63], ["", "-a", "A", "a" * 64, "a.b"]),
    ],
)
def test_path_patterns_accept_what_the_handlers_accept(
    schema_name: str, good: list[str], bad: list[str]
) -> None:
    from scada.api import openapi  # noqa: PLC0415 -- the module constants under test

    validator = jsonschema_rs.validator_for(getattr(openapi, schema_name))
    assert [v for v in good if not validator.is_valid(v)] == []
    assert [v for v in bad if validator.is_valid(v)] == []


def test_limits_follow_the_handlers() -> None:
    history = {p["name"]: p for p in SPEC["paths"]["/api/v1/points/{point_id}/history"]["get"]["parameters"]}
    assert history["limit"]["schema"]["maximum"] == routes.HISTORY_MAX_ROWS
    assert history["points"]["schema"]["maximum"] == routes.HISTORY_MAX_POINTS
    shelve = SPEC["components"]["schemas"]["ShelveInput"]["properties"]["duration_s"]
    assert shelve["maximum"] == alarms.MAX_SHELVE_S
    periods = SPEC["components"]["schemas"]["Emissions"]["properties"]["period"]["enum"]
    assert periods == list(carbon.MAX_INTERVALS)


# --------------------------------------------------------------------------------------------------
# True to what the handlers emit

AT = datetime(2026, 5, 1, 8, 30, tzinfo=UTC)


def test_readings_conform() -> None:
    good = Reading(point=PointId("m.e_kwh"), ts=AT, value=12.5)
    bad = Reading(point=PointId("m.e_kwh"), ts=AT, value=None, quality=Quality.bad("device offline"))
    _assert_valid("Reading", routes.reading_json(good))
    _assert_valid("Reading", routes.reading_json(bad))
    errors = list(_validator("Reading").iter_errors({**routes.reading_json(good), "quality": "ok"}))
    assert errors, "an unknown quality must not conform"


def test_emission_factors_conform() -> None:
    library = FactorLibrary.load()
    body = json.loads(library.to_json())
    assert len(body["factors"]) > 5
    _assert_valid("EmissionFactorList", body)


def _row(**values: Any) -> dict[str, Any]:
    return values


def test_alarm_shapes_conform() -> None:
    event = AlarmEvent(
        seq=7,
        alarm_id="m.p:high",
        from_state=AlarmState.NORMAL,
        to_state=AlarmState.ACTIVE_UNACK,
        at=AT,
        cause=EventCause.ACTIVATE,
        by="system",
        comment="",
        value=True,
        message="too hot",
        priority=AlarmPriority.HIGH,
        console="ent-a",
        node="w",
        device="m",
        point="m.p",
        group=None,
        annunciated=True,
        chattering=False,
        shelved_until=None,
    )
    _assert_valid("AlarmEvent", event.to_dict())
    _assert_valid("AlarmEventList", {"events": [{**event.to_dict(), "extra": {"excess_kwh": 3.5}}]})
    status = alarms.alarm_status_json(
        _row(
            alarm_id="m.p:high",
            state="active_unack",
            since=AT,
            priority=2,
            console="ent-a",
            node_id="w",
            device_id=None,
            point_id=None,
            group_id=None,
            message="too hot",
            value=None,
            extra="{}",
        )
    )
    _assert_valid("AlarmList", {"alarms": [status]})


def test_quota_conforms_with_and_without_status() -> None:
    quota = Quota("w", "2026-05", 1200.0, 95.0)  # type: ignore[arg-type]
    _assert_valid("Quota", carbon._quota_json(quota, None))
    forecast = {"actual_t": 400.0, "forecast_t": 1300.0, "low_t": 1100.0, "high_t": 1500.0, "computed_at": AT}
    _assert_valid("Quota", carbon._quota_json(quota, forecast))


def test_problem_conforms() -> None:
    response = problem_response(
        ApiProblem(404, "Not found", "no point 'x.y'", slug="not-found"),
        instance="/api/v1/points/x.y",
        request_id="r1",
    )
    assert response.content_type == "application/problem+json"
    assert response.text is not None
    _assert_valid("Problem", json.loads(response.text))


# --------------------------------------------------------------------------------------------------
# Served


@pytest.fixture
async def client(aiohttp_client: Callable[[web.Application], Any]) -> Any:
    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/api/v1/openapi.json", openapi_json)
    app.router.add_get("/api/v1/docs", docs_page)
    return await aiohttp_client(app)


async def test_serves_the_spec(client: Any) -> None:
    response = await client.get("/api/v1/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert response.headers["X-Request-Id"]
    assert await response.json() == openapi_spec(__version__)


async def test_docs_page_is_self_contained_and_lists_every_operation(client: Any) -> None:
    response = await client.get("/api/v1/docs")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "no external assets"
    for method, path, op in _operations():
        assert f'id="{op["operationId"]}"' in page, (method, path)
    for name in SPEC["components"]["schemas"]:
        assert f'id="schema-{name}"' in page
    assert page == render_docs(openapi_spec(__version__))
