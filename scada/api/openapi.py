"""The OpenAPI 3.1 description of /api/v1, served as JSON and as a self-contained HTML page.

The document is built from the same constants and enums the handlers validate against (limits,
carriers, units, alarm states), so a change in a handler's bounds shows up in the spec. Every route
registered by :mod:`scada.api.routes`, :mod:`scada.api.carbon`, :mod:`scada.api.alarms` and the auth
routes is described; the websocket (``GET /api/v1/ws``) is not an HTTP operation and is described in
``x-websocket`` instead, and ``/metrics`` (Prometheus text) stays outside /api/v1. The HTML page is
rendered on the server from the same dict: no script and no CDN, so it works on an offline plant
network. tests/scada/test_openapi.py checks the spec against the route table both ways.
"""

from __future__ import annotations

import functools
import html
import json
from typing import Any, Final, get_args

from aiohttp import web

from control_engine.dispatcher import DispatchState
from control_engine.verify_service import MeterBasis, VerificationStatus
from scada import __version__
from scada.api import dispatches
from scada.api.auth import AUDIT_PAGE_DEFAULT, AUDIT_PAGE_MAX
from scada.config import Protocol
from scada.model import (
    ID_PATTERN,
    Availability,
    Carrier,
    DeviceKind,
    NodeLevel,
    PointKind,
    QualityCode,
    Unit,
)

__all__ = ["OPENAPI_PATH", "docs_page", "openapi_json", "openapi_spec"]

OPENAPI_PATH: Final = "/api/v1/openapi.json"
DOCS_PATH: Final = "/api/v1/docs"

Schema = dict[str, Any]

ID_REGEX: Final = f"^{ID_PATTERN}$"
POINT_ID_REGEX: Final = f"^{ID_PATTERN}\\.{ID_PATTERN}$"
MONTH_REGEX: Final = "^(199[0-9]|20[0-9]{2}|2100)-(0[1-9]|1[0-2])$"
"""``YYYY-MM`` with the year range the handlers accept (1990 to 2100)."""
ROLES: Final = ("viewer", "operator", "engineer", "admin")


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    """Return ``schema`` also admitting null, the 3.1 way (a type array), or via oneOf for a $ref."""
    if "$ref" in schema:
        return {"oneOf": [schema, {"type": "null"}]}
    out = dict(schema)
    out["type"] = [schema["type"], "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def _obj(properties: dict[str, Schema], *, required: list[str] | None = None, **extra: Any) -> Schema:
    """Return an object schema; every property is required unless ``required`` says otherwise."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        **extra,
    }


def _array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


STRING: Final[Schema] = {"type": "string"}
NON_BLANK: Final[Schema] = {"type": "string", "pattern": r"\S"}
"""A string with at least one non-blank character (handlers strip before checking)."""
NUMBER: Final[Schema] = {"type": "number"}
INTEGER: Final[Schema] = {"type": "integer"}
BOOLEAN: Final[Schema] = {"type": "boolean"}
DATE_TIME: Final[Schema] = {"type": "string", "format": "date-time"}
ID: Final[Schema] = {"type": "string", "pattern": ID_REGEX}
POINT_ID: Final[Schema] = {"type": "string", "pattern": POINT_ID_REGEX}
MONTH: Final[Schema] = {"type": "string", "pattern": MONTH_REGEX, "examples": ["2026-05"]}


# --------------------------------------------------------------------------------------------------
# Parameters


def _query(name: str, schema: Schema, description: str, *, required: bool = False) -> Schema:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


def _path(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}


def _int_range(low: int, high: int, default: int | None = None) -> Schema:
    out: Schema = {"type": "integer", "minimum": low, "maximum": high}
    if default is not None:
        out["default"] = default
    return out


START_PARAM: Final = _query("start", DATE_TIME, "Start of the span, inclusive (ISO 8601 with a zone).")
END_PARAM: Final = _query("end", DATE_TIME, "End of the span, exclusive (ISO 8601 with a zone; default now).")
POINT_PARAM: Final = _path("point_id", POINT_ID, "Point id: `<device id>.<point key>`.")
NODE_PARAM: Final = _path("node_id", ID, "Hierarchy node id (group, park, enterprise or workshop).")
MONTH_PARAM: Final = _path("month", MONTH, "Month of the site's time zone, `YYYY-MM`.")
NODE_QUERY: Final = _query("node", ID, "Hierarchy node id; 404 for an unknown node.")
CURSOR_PARAM: Final = _query(
    "cursor",
    {"type": "string", "pattern": "^[0-9]{1,18}$"},
    "The `next_cursor` of the previous page (treat it as opaque).",
)
KEY_ID_PARAM: Final = _path("key_id", {"type": "string", "pattern": "^[0-9]{1,18}$"}, "Key or token id.")


# --------------------------------------------------------------------------------------------------
# Responses


_PROBLEMS: Final[dict[int, tuple[str, str]]] = {
    400: ("BadRequest", "Invalid request: the `detail` names the bad field."),
    401: ("Unauthorized", "No or bad credentials (carries `WWW-Authenticate: Bearer`)."),
    403: ("Forbidden", "The credentials do not carry the role this operation needs."),
    404: ("NotFound", "No such resource, or it lies outside the caller's tenant and grants."),
    409: ("Conflict", "The resource's current state does not allow the operation."),
    429: ("TooManyRequests", "Locked out or rate limited; retry after `Retry-After` seconds."),
    503: ("ServiceUnavailable", "A backing service (PostgreSQL, Redis, the analytics role) is unavailable."),
    504: ("GatewayTimeout", "No device gateway answered in time; the problem carries the command's id."),
}


def _problem_component(status: int) -> Schema:
    _name, description = _PROBLEMS[status]
    headers: dict[str, Schema] = {"X-Request-Id": {"$ref": "#/components/headers/XRequestId"}}
    if status == 401:
        headers["WWW-Authenticate"] = {
            "description": "The authentication scheme to use (`Bearer`).",
            "required": True,
            "schema": STRING,
        }
    if status == 429:
        headers["Retry-After"] = {
            "description": "Seconds to wait before trying again.",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
        }
    return {
        "description": description,
        "headers": headers,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _json(description: str, schema: Schema) -> Schema:
    return {
        "description": description,
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/XRequestId"}},
        "content": {"application/json": {"schema": schema}},
    }


def _no_content(description: str) -> Schema:
    return {
        "description": description,
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/XRequestId"}},
    }


def _body(schema: Schema, description: str) -> Schema:
    return {"required": True, "description": description, "content": {"application/json": {"schema": schema}}}


def _operation(
    operation_id: str,
    tag: str,
    summary: str,
    responses: dict[str, Schema],
    *,
    problems: tuple[int, ...] = (),
    public: bool = False,
    parameters: list[Schema] | None = None,
    request_body: Schema | None = None,
    description: str = "",
    role: str = "viewer",
) -> Schema:
    """Return one operation; authenticated ones add 401 and 403 and name the role they need."""
    statuses = set(problems) if public else {*problems, 401, 403}
    op: Schema = {"operationId": operation_id, "tags": [tag], "summary": summary}
    notes = [description] if description else []
    if not public:
        notes.append(f"Needs the `{role}` role on the node concerned.")
    if notes:
        op["description"] = " ".join(notes)
    if parameters:
        op["parameters"] = parameters
    if request_body is not None:
        op["requestBody"] = request_body
    op["responses"] = {
        **responses,
        **{str(s): {"$ref": f"#/components/responses/{_PROBLEMS[s][0]}"} for s in sorted(statuses)},
    }
    if public:
        op["security"] = []
    return op


def _admin(operation_id: str, summary: str, responses: dict[str, Schema], **kwargs: Any) -> Schema:
    """Return an operation of the ``admin`` tag that needs the admin role."""
    return _operation(operation_id, "admin", summary, responses, role="admin", **kwargs)


# --------------------------------------------------------------------------------------------------
# Schemas


def _schemas(limits: dict[str, Any]) -> dict[str, Schema]:
    """Return components/schemas; ``limits`` carries the handlers' bounds (see :func:`_limits`)."""
    carrier = {"type": "string", "enum": [c.value for c in Carrier]}
    node = {
        "type": "object",
        "properties": {
            "id": ID,
            "name": STRING,
            "level": {"type": "string", "enum": [v.value for v in NodeLevel]},
            "children": _array(_ref("Node")),
        },
        "required": ["id", "name", "level", "children"],
    }
    reading = _obj(
        {
            "point": POINT_ID,
            "ts": DATE_TIME,
            "value": {"type": ["number", "null"], "description": "null only when quality is bad"},
            "quality": {"type": "string", "enum": [q.name.lower() for q in QualityCode]},
            "reason": {"type": "string", "description": "why the quality is not good"},
        },
        required=["point", "ts", "value", "quality"],
    )
    alarm_state = {"type": "string", "enum": list(limits["alarm_states"])}
    priority = {"type": "integer", "minimum": 1, "maximum": 4, "description": "1 critical ... 4 low"}
    role = {"type": "string", "enum": list(ROLES)}
    grant = _obj({"node": ID, "role": role})
    page = {"next_cursor": {"type": ["string", "null"], "description": "pass as `cursor`; null: last page"}}
    return {
        "Problem": _obj(
            {
                "type": {"type": "string", "format": "uri", "description": "problem kind, a stable URI"},
                "title": STRING,
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": STRING,
                "instance": {"type": "string", "description": "the request path"},
                "request_id": {"type": "string", "description": "also in the `X-Request-Id` header"},
            },
            description="RFC 9457 problem details; some problems add fields.",
        ),
        "Health": _obj(
            {
                "status": {"type": "string", "enum": ["ok"]},
                "version": STRING,
                "services": {
                    "type": "object",
                    "additionalProperties": STRING,
                    "description": "service name -> how it was chosen (configured, local, embedded)",
                },
                "live": _obj({"readings_seen": INTEGER, "subscribers": INTEGER}),
            }
        ),
        "Node": node,
        "Site": _obj({"id": ID, "name": STRING, "timezone": STRING, "hierarchy": _array(_ref("Node"))}),
        "Device": _obj(
            {
                "id": ID,
                "name": STRING,
                "node": ID,
                "kind": {"type": "string", "enum": [k.value for k in DeviceKind]},
                "protocol": {"type": "string", "enum": [p.value for p in Protocol]},
                "enabled": BOOLEAN,
                "poll_period_s": NUMBER,
                "availability": {"type": "string", "enum": [*(a.value for a in Availability), "unknown"]},
                "availability_since": _nullable(DATE_TIME),
                "availability_reason": STRING,
                "points": _array(POINT_ID),
            }
        ),
        "DeviceList": _obj({"items": _array(_ref("Device"))}),
        "Point": _obj(
            {
                "id": POINT_ID,
                "device": ID,
                "key": ID,
                "name": STRING,
                "kind": {"type": "string", "enum": [k.value for k in PointKind]},
                "unit": {"type": "string", "enum": [u.value for u in Unit]},
                "carrier": carrier,
                "writable": BOOLEAN,
            }
        ),
        "PointList": _obj({"items": _array(_ref("Point"))}),
        "Reading": reading,
        "History": _obj(
            {
                "point": POINT_ID,
                "unit": STRING,
                "start": DATE_TIME,
                "end": DATE_TIME,
                "mode": {"type": "string", "enum": list(limits["modes"])},
                "source": {"type": "string", "enum": list(limits["sources"]), "description": "table read"},
                "readings": _array(_ref("Reading")),
                "truncated": BOOLEAN,
            }
        ),
        "PointEnergy": _obj(
            {
                "point": POINT_ID,
                "unit": STRING,
                "interval": {"type": "string", "enum": list(limits["intervals"])},
                "timezone": STRING,
                "start": DATE_TIME,
                "end": DATE_TIME,
                "intervals": _array(
                    _obj(
                        {
                            "start": DATE_TIME,
                            "delta": NUMBER,
                            "step": {"type": "string", "enum": list(limits["steps"])},
                        }
                    )
                ),
                "total": NUMBER,
            }
        ),
        "NodeEnergy": _obj(
            {
                "node": ID,
                "carrier": {"type": "string", "enum": [c.value for c in Carrier] + ["all"]},
                "interval": {"type": "string", "enum": list(limits["intervals"])},
                "timezone": STRING,
                "start": DATE_TIME,
                "end": DATE_TIME,
                "series": _array(
                    _obj(
                        {
                            "unit": STRING,
                            "intervals": _array(
                                _obj({"start": DATE_TIME, "energy": NUMBER, "points": INTEGER})
                            ),
                            "total": NUMBER,
                        }
                    )
                ),
            }
        ),
        "DeadLetterEntry": _obj(
            {
                "id": {"type": "string", "description": "entry id in the dead-letter stream"},
                "reason": STRING,
                "origin": {"type": "string", "description": "the stream the entry came from"},
                "entry_id": STRING,
                "group": STRING,
                "consumer": STRING,
                "raw": {"type": "object", "additionalProperties": STRING},
            }
        ),
        "DeadLetterList": _obj({"items": _array(_ref("DeadLetterEntry"))}),
        "EmissionFactor": _obj(
            {
                "id": ID,
                "carrier": carrier,
                "scope": {"type": "integer", "enum": [1, 2]},
                "value": {"type": "number", "minimum": 0},
                "unit": {"type": "string", "enum": list(limits["factor_units"])},
                "year": {"type": ["integer", "null"], "minimum": 1990, "maximum": 2100},
                "region": ID,
                "variant": ID,
                "valid_from": {"type": ["string", "null"], "format": "date"},
                "valid_to": {"type": ["string", "null"], "format": "date"},
                "source": STRING,
                "note": STRING,
                "ncv": {"type": ["number", "null"]},
                "ncv_unit": {"type": ["string", "null"], "enum": [*limits["ncv_units"], None]},
                "carbon_content_tc_per_tj": {"type": ["number", "null"]},
                "oxidation": {"type": ["number", "null"]},
                "derivation": STRING,
            },
            description="GB/T 32150 fuels carry ncv, ncv_unit, carbon content and oxidation; others null.",
        ),
        "EmissionFactorList": _obj({"version": STRING, "factors": _array(_ref("EmissionFactor"))}),
        "Emissions": _obj(
            {
                "node": ID,
                "period": {"type": "string", "enum": list(limits["periods"])},
                "timezone": STRING,
                "start": DATE_TIME,
                "end": DATE_TIME,
                "unit": {"type": "string", "enum": ["tCO2e"]},
                "intervals": _array(
                    _obj({"start": DATE_TIME, "scope1_t": NUMBER, "scope2_t": NUMBER, "total_t": NUMBER})
                ),
                "total": _obj({"scope1_t": NUMBER, "scope2_t": NUMBER, "total_t": NUMBER}),
                "by_carrier": _array(
                    _obj(
                        {
                            "carrier": STRING,
                            "source": {"type": "string", "enum": ["metered", "unmetered", "storage"]},
                            "scope": {"type": "integer", "enum": [1, 2]},
                            "unit": STRING,
                            "activity": NUMBER,
                            "co2e_t": NUMBER,
                        }
                    )
                ),
            }
        ),
        "QuotaStatus": _obj(
            {
                "computed_at": DATE_TIME,
                "actual_t": NUMBER,
                "forecast_t": NUMBER,
                "forecast_low_t": NUMBER,
                "forecast_high_t": NUMBER,
                "actual_pct": NUMBER,
                "forecast_pct": NUMBER,
                "surplus_t": {"type": "number", "description": "negative: already over the quota"},
                "forecast_surplus_t": {"type": "number", "description": "negative: a deficit at month end"},
                "forecast_value_cny": {"type": "number", "description": "> 0 a value, < 0 a penalty"},
            }
        ),
        "Quota": _obj(
            {
                "node": ID,
                "month": MONTH,
                "quota_t": {"type": "number", "exclusiveMinimum": 0},
                "price_cny_per_t": {"type": "number", "minimum": 0},
                "status": _nullable(_ref("QuotaStatus")),
            }
        ),
        "QuotaList": _obj({"quotas": _array(_ref("Quota"))}),
        "QuotaInput": _obj(
            {
                "quota_t": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1e12},
                "price_cny_per_t": {
                    "type": "number",
                    "minimum": 0,
                    "exclusiveMaximum": 1e9,
                    "description": "default: the site's carbon price",
                },
            },
            required=["quota_t"],
            additionalProperties=False,
        ),
        "ForecastList": _obj(
            {
                "month": MONTH,
                "unit": {"type": "string", "enum": ["tCO2e"]},
                "forecasts": _array(
                    _obj(
                        {
                            "node": ID,
                            "computed_at": DATE_TIME,
                            "actual_t": NUMBER,
                            "forecast_t": NUMBER,
                            "low_t": NUMBER,
                            "high_t": NUMBER,
                            "method": STRING,
                        }
                    )
                ),
            }
        ),
        "RestatementList": _obj(
            {
                "node": ID,
                "restatements": _array(
                    _obj(
                        {
                            "id": INTEGER,
                            "node": ID,
                            "hour": DATE_TIME,
                            "carrier": STRING,
                            "source": STRING,
                            "old_co2e_kg": NUMBER,
                            "new_co2e_kg": NUMBER,
                            "old_activity": NUMBER,
                            "new_activity": NUMBER,
                            "reason": STRING,
                            "restated_at": DATE_TIME,
                        }
                    )
                ),
            }
        ),
        "AlarmStatus": _obj(
            {
                "alarm": STRING,
                "state": alarm_state,
                "since": DATE_TIME,
                "priority": priority,
                "console": STRING,
                "node": STRING,
                "device": {"type": ["string", "null"]},
                "point": {"type": ["string", "null"]},
                "group": {"type": ["string", "null"], "description": "group head during a flood"},
                "message": STRING,
                "value": {"type": ["number", "null"]},
                "extra": {"type": "object"},
            }
        ),
        "AlarmList": _obj({"alarms": _array(_ref("AlarmStatus"))}),
        "AlarmEvent": _obj(
            {
                "seq": INTEGER,
                "alarm_id": STRING,
                "from_state": alarm_state,
                "to_state": alarm_state,
                "at": DATE_TIME,
                "cause": {"type": "string", "enum": list(limits["causes"])},
                "by": STRING,
                "comment": STRING,
                "value": {"type": ["number", "boolean", "null"]},
                "message": STRING,
                "priority": priority,
                "console": STRING,
                "node": STRING,
                "device": {"type": ["string", "null"]},
                "point": {"type": ["string", "null"]},
                "group": {"type": ["string", "null"]},
                "annunciated": BOOLEAN,
                "chattering": BOOLEAN,
                "shelved_until": _nullable(DATE_TIME),
                "extra": {"type": "object", "description": "stored events only (e.g. excess_kwh)"},
            },
            required=[
                *("seq", "alarm_id", "from_state", "to_state", "at", "cause", "by", "comment", "value"),
                *("message", "priority", "console", "node", "device", "point", "group", "annunciated"),
                *("chattering", "shelved_until"),
            ],
        ),
        "AlarmEventList": _obj({"events": _array(_ref("AlarmEvent"))}),
        "AlarmKpis": _obj(
            {
                "console": STRING,
                "start": DATE_TIME,
                "end": DATE_TIME,
                "period_s": NUMBER,
                "periods": INTEGER,
                "activations": INTEGER,
                "annunciated": INTEGER,
                "grouped": INTEGER,
                "alarms_per_hour_avg": NUMBER,
                "alarms_per_10min_peak": INTEGER,
                "annunciated_per_10min_peak": INTEGER,
                "flood_periods": INTEGER,
                "flood_periods_pct": NUMBER,
                "bad_actors": _array(_obj({"alarm_id": STRING, "activations": INTEGER, "share_pct": NUMBER})),
                "chattering": _array(STRING),
                "stale": _array(
                    _obj(
                        {
                            "alarm_id": STRING,
                            "active_since": DATE_TIME,
                            "active_for_s": NUMBER,
                            "state": alarm_state,
                        }
                    )
                ),
                "priority_distribution": {"type": "object", "additionalProperties": INTEGER},
                "priority_pct": {"type": "object", "additionalProperties": NUMBER},
            }
        ),
        "Dispatch": _obj(
            {
                "id": INTEGER,
                "created_at": DATE_TIME,
                "node": ID,
                "point": POINT_ID,
                "value": NUMBER,
                "reason": STRING,
                "rule_id": STRING,
                "stage": INTEGER,
                "priority": INTEGER,
                "mode": {"type": "string", "enum": ["auto", "approve", "advisory"]},
                "state": {"type": "string", "enum": [s.value for s in DispatchState]},
                "hold_until": {"type": ["string", "null"], "format": "date-time"},
                "previous_value": {"type": ["number", "null"]},
                "correlation_id": {"type": ["string", "null"]},
                "result": {"type": ["object", "null"]},
                "decided_by": {"type": ["string", "null"]},
                "decision_comment": STRING,
                "expected_kw": {"type": ["number", "null"]},
                "verification": _nullable(_ref("Verification")),
                "co2e_avoided_kg": {
                    "type": ["number", "null"],
                    "description": "The measured net effect; null until measured, or when unmeasurable.",
                },
            },
            required=["id", "created_at", "node", "point", "value", "reason", "mode", "state"],
        ),
        "Verification": _obj(
            {
                "dispatch_id": INTEGER,
                "node": ID,
                "status": {"type": "string", "enum": [s.value for s in VerificationStatus]},
                "reason": {"type": "string", "description": "Why it is unmeasurable; empty when measured."},
                "month": MONTH,
                "event_start": DATE_TIME,
                "event_end": {"type": ["string", "null"], "format": "date-time"},
                "post_end": {"type": ["string", "null"], "format": "date-time"},
                "interval_s": INTEGER,
                "meters": _array(POINT_ID),
                "meter_basis": {"type": "string", "enum": [b.value for b in MeterBasis]},
                "energy_avoided_kwh": {"type": ["number", "null"]},
                "uncertainty_kwh": {
                    "type": ["number", "null"],
                    "description": "± half-width at `confidence`.",
                },
                "co2e_avoided_kg": {"type": ["number", "null"]},
                "co2e_uncertainty_kg": {"type": ["number", "null"]},
                "confidence": {"type": ["number", "null"]},
                "baseline_kwh": {"type": ["number", "null"]},
                "actual_kwh": {"type": ["number", "null"]},
                "rebound_kwh": {"type": ["number", "null"]},
                "rebound_co2e_kg": {"type": ["number", "null"]},
                "flags": _array(STRING),
                "baseline_method": STRING,
                "days_used": INTEGER,
                "factor_ids": _array(STRING),
                "verified_at": DATE_TIME,
                "detail": {
                    "type": "object",
                    "description": "Per interval baseline, actual and intensity; similar days (one only).",
                },
            },
            required=["dispatch_id", "node", "status", "reason", "month", "event_start", "meters", "flags"],
        ),
        "MonthlyVerification": _obj(
            {
                "node": {"type": ["string", "null"]},
                "month": MONTH,
                "dispatches": INTEGER,
                "measured": INTEGER,
                "unmeasurable": INTEGER,
                "energy_avoided_kwh": NUMBER,
                "uncertainty_kwh": {"type": "number", "description": "Half-widths added in quadrature."},
                "co2e_avoided_t": NUMBER,
                "co2e_uncertainty_t": NUMBER,
                "confidence": {"type": ["number", "null"]},
                "flag_counts": {"type": "object", "additionalProperties": INTEGER},
            },
        ),
        "CommandInput": _obj(
            {
                "value": {"type": "number", "description": "engineering value"},
                "reason": {"type": "string", "pattern": r"\S", "maxLength": 500, "default": "manual command"},
                "wait_s": {"type": "number", "minimum": 0.5, "maximum": 30, "default": 15},
            },
            required=["value"],
            additionalProperties=False,
        ),
        "CommandOutcome": _obj(
            {
                "correlation_id": STRING,
                "point": POINT_ID,
                "requested": NUMBER,
                "status": {
                    "type": "string",
                    "enum": ["verified", "unverified", "mismatch", "rejected", "timeout", "failed"],
                },
                "readback": {"type": ["number", "null"]},
                "reason": STRING,
                "elapsed_ms": {"type": ["number", "null"]},
                "ts": DATE_TIME,
            },
            required=["correlation_id", "point", "requested", "status", "reason", "ts"],
        ),
        "AcknowledgeInput": _obj(
            {
                "by": {"type": "string", "pattern": r"\S", "description": "who acknowledges"},
                "comment": STRING,
                "with_group": {"type": "boolean", "default": False},
            },
            required=["by"],
            additionalProperties=False,
        ),
        "ShelveInput": _obj(
            {
                "by": {"type": "string", "pattern": r"\S"},
                "reason": {"type": "string", "pattern": r"\S"},
                "duration_s": {"type": "number", "exclusiveMinimum": 0, "maximum": limits["max_shelve_s"]},
            },
            additionalProperties=False,
        ),
        "UnshelveInput": _obj(
            {"by": {"type": "string", "pattern": r"\S"}, "comment": STRING},
            required=["by"],
            additionalProperties=False,
        ),
        # -- authentication (scada/api/auth.py) -------------------------------------------------
        "LoginInput": _obj(
            {"tenant": NON_BLANK, "username": NON_BLANK, "password": NON_BLANK},
            additionalProperties=False,
        ),
        "RefreshInput": _obj({"refresh_token": NON_BLANK}, additionalProperties=False),
        "Tokens": _obj(
            {
                "access_token": {"type": "string", "description": "HS256 JWT, valid 15 minutes"},
                "refresh_token": {"type": "string", "description": "single use: /refresh rotates it"},
                "token_type": {"type": "string", "enum": ["Bearer"]},
                "expires_in": {"type": "integer", "minimum": 1, "description": "seconds"},
            }
        ),
        "Grant": grant,
        "Me": _obj(
            {
                "tenant": STRING,
                "subject": STRING,
                "kind": {"type": "string", "enum": ["user", "api_key", "kiosk"]},
                "grants": _array(_ref("Grant")),
            }
        ),
        "User": _obj(
            {
                "id": INTEGER,
                "username": STRING,
                "disabled": BOOLEAN,
                "locked_until": _nullable(DATE_TIME),
                "created_at": DATE_TIME,
                "grants": _array(_ref("Grant")),
            }
        ),
        "UserList": _obj({"users": _array(_ref("User"))}),
        "UserInput": _obj(
            {
                "username": NON_BLANK,
                "password": NON_BLANK,
                "grants": _array(_ref("GrantInput"), minItems=1),
            },
            additionalProperties=False,
        ),
        "GrantInput": {**grant, "additionalProperties": False},
        "UserCreated": _obj({"id": INTEGER, "username": STRING}),
        "ApiKey": _obj(
            {
                "id": INTEGER,
                "kind": {"type": "string", "enum": ["key", "kiosk"]},
                "name": STRING,
                "created_by": STRING,
                "created_at": DATE_TIME,
                "revoked": BOOLEAN,
                "node": ID,
                "role": role,
            },
            description="An API key or a kiosk token (never its secret).",
        ),
        "ApiKeyList": _obj({"keys": _array(_ref("ApiKey"))}),
        "ApiKeyInput": _obj({"name": NON_BLANK, "node": ID, "role": role}, additionalProperties=False),
        "ApiKeyCreated": _obj(
            {"id": INTEGER, "key": {"type": "string", "description": "`ck_key_<id>_<secret>`, shown once"}}
        ),
        "KioskTokenInput": _obj({"name": NON_BLANK, "node": ID}, additionalProperties=False),
        "KioskTokenCreated": _obj(
            {"id": INTEGER, "token": {"type": "string", "description": "`ck_kiosk_...`, shown once"}}
        ),
        "AuditEntry": _obj(
            {
                "seq": INTEGER,
                "at": DATE_TIME,
                "tenant": {"type": ["string", "null"], "description": "null: a site-wide entry"},
                "actor": STRING,
                "action": {"type": "string", "examples": ["login", "user.create", "key.revoke"]},
                "target": STRING,
                "detail": {"type": "object"},
                "prev_hash": STRING,
                "hash": {"type": "string", "description": "hash of prev_hash and this entry"},
            },
            description="One append-only, hash-chained audit entry.",
        ),
        "AuditPage": _obj({"entries": _array(_ref("AuditEntry")), **page}),
        "AuditVerify": _obj(
            {
                "ok": {"type": "boolean", "description": "true when no entry was edited or removed"},
                "entries": INTEGER,
                "head_seq": INTEGER,
                "head_hash": STRING,
                "problems": _array(STRING),
            }
        ),
    }


def _limits() -> dict[str, Any]:
    """Return the handlers' bounds and vocabularies, read from their modules.

    Imported here rather than at module level: :mod:`scada.api.routes` registers this module's
    handlers, so a top-level import back into it would be circular.
    """
    from anomaly.alarm_model import AlarmState, EventCause  # noqa: PLC0415 -- see docstring
    from control_engine.factors import FactorUnit, NcvUnit  # noqa: PLC0415
    from scada.api import alarms, carbon, routes  # noqa: PLC0415
    from streams.query import DownsampleMode, Source, StepKind  # noqa: PLC0415
    from streams.store import INTERVALS  # noqa: PLC0415

    return {
        "alarm_states": [s.value for s in AlarmState],
        "causes": [c.value for c in EventCause],
        "factor_units": list(get_args(FactorUnit)),
        "ncv_units": list(get_args(NcvUnit)),
        "modes": [m.value for m in DownsampleMode],
        "sources": [s.value for s in Source],
        "steps": [s.value for s in StepKind],
        "intervals": list(INTERVALS),
        "periods": list(carbon.MAX_INTERVALS),
        "max_shelve_s": alarms.MAX_SHELVE_S,
        "max_events": alarms.MAX_EVENTS,
        "history_max_rows": routes.HISTORY_MAX_ROWS,
        "history_max_points": routes.HISTORY_MAX_POINTS,
        "history_default_points": routes.HISTORY_DEFAULT_POINTS,
        "energy_max_intervals": routes.ENERGY_MAX_INTERVALS,
    }


# --------------------------------------------------------------------------------------------------
# Paths


def _paths(limits: dict[str, Any]) -> dict[str, Schema]:
    """Return every HTTP operation of /api/v1, grouped by path."""
    history_params = [
        POINT_PARAM,
        START_PARAM,
        END_PARAM,
        _query(
            "limit",
            _int_range(1, limits["history_max_rows"], 10_000),
            "Raw rows at most (mode `raw` only).",
        ),
        _query(
            "points",
            _int_range(2, limits["history_max_points"], limits["history_default_points"]),
            "Reduce on the server to about this many readings (implies `lttb` unless `mode` says otherwise).",
        ),
        _query("mode", {"type": "string", "enum": limits["modes"]}, "`raw`, `lttb` or `minmax`."),
    ]
    interval = _query(
        "interval",
        {"type": "string", "enum": limits["intervals"], "default": "1h"},
        "Interval length; `1d` is a day of the site's time zone.",
    )
    energy_note = f"At most {limits['energy_max_intervals']} intervals per request (400 beyond)."
    month_query = _query("month", MONTH, "Month of the site's time zone, `YYYY-MM`.")
    console = _query("console", STRING, "Alarm console (a node id); 404 outside the caller's grants.")
    span_note = "The span is at most 93 days; default the last 24 h."
    alarm_id = _path("alarm_id", {"type": "string", "minLength": 1}, "Alarm id.")
    events_ok = _json("The transitions the action caused.", _ref("AlarmEventList"))
    alarm_action_problems = (400, 404, 409, 503)
    return {
        "/api/v1/health": {
            "get": _operation(
                "getHealth",
                "service",
                "Liveness and the services this process uses",
                {"200": _json("The process is up.", _ref("Health"))},
                public=True,
            )
        },
        OPENAPI_PATH: {
            "get": _operation(
                "getOpenApi",
                "service",
                "This OpenAPI 3.1 document",
                {"200": _json("The document.", {"type": "object"})},
                public=True,
            )
        },
        DOCS_PATH: {
            "get": _operation(
                "getDocs",
                "service",
                "This document as a readable HTML page (no scripts, no external assets)",
                {
                    "200": {
                        "description": "The page.",
                        "headers": {"X-Request-Id": {"$ref": "#/components/headers/XRequestId"}},
                        "content": {"text/html": {"schema": STRING}},
                    }
                },
                public=True,
            )
        },
        "/api/v1/site": {
            "get": _operation(
                "getSite", "site", "The site and its hierarchy tree", {"200": _json("", _ref("Site"))}
            )
        },
        "/api/v1/devices": {
            "get": _operation(
                "listDevices",
                "site",
                "Every device with its availability",
                {"200": _json("The devices.", _ref("DeviceList"))},
            )
        },
        "/api/v1/points": {
            "get": _operation(
                "listPoints",
                "site",
                "Every point, or those of one device",
                {"200": _json("The points.", _ref("PointList"))},
                problems=(404,),
                parameters=[_query("device", ID, "Only this device's points; 404 for an unknown device.")],
            )
        },
        "/api/v1/points/{point_id}": {
            "get": _operation(
                "getPoint",
                "points",
                "One point's configuration",
                {"200": _json("The point.", _ref("Point"))},
                problems=(404,),
                parameters=[POINT_PARAM],
            )
        },
        "/api/v1/points/{point_id}/latest": {
            "get": _operation(
                "getLatestReading",
                "points",
                "The newest reading of a point (live hub, else the historian)",
                {"200": _json("The reading.", _ref("Reading"))},
                problems=(404, 503),
                parameters=[POINT_PARAM],
                description="404 `no-data` before the first reading.",
            )
        },
        "/api/v1/points/{point_id}/history": {
            "get": _operation(
                "getHistory",
                "points",
                "A point's readings in [start, end), raw or reduced on the server",
                {"200": _json("The readings, oldest first.", _ref("History"))},
                problems=(400, 404, 503),
                parameters=history_params,
                description="Default span: the last hour. See docs/queries.md.",
            )
        },
        "/api/v1/points/{point_id}/energy": {
            "get": _operation(
                "getPointEnergy",
                "energy",
                "A counter's consumption per interval",
                {"200": _json("The deltas.", _ref("PointEnergy"))},
                problems=(400, 404, 503),
                parameters=[POINT_PARAM, START_PARAM, END_PARAM, interval],
                description=f"Counters only (400 for other kinds). Default span: the last day. {energy_note}",
            )
        },
        "/api/v1/points/{point_id}/commands": {
            "post": _operation(
                "sendCommand",
                "commands",
                "Write a value to a point, verified by read-back",
                {"200": _json("The gateway's verified outcome.", _ref("CommandOutcome"))},
                problems=(400, 404, 409, 503, 504),
                parameters=[POINT_PARAM],
                request_body=_body(_ref("CommandInput"), "The value and why."),
                description=(
                    "The gateway that owns the device writes, waits for the acknowledgement and reads back; "
                    "409 for a point that is not writable; 504 when no gateway answered within `wait_s`. "
                    "Audited."
                ),
                role="engineer",
            )
        },
        "/api/v1/nodes/{node_id}/energy": {
            "get": _operation(
                "getNodeEnergy",
                "energy",
                "The consumption of every counter under a node, per interval and unit",
                {"200": _json("The sums.", _ref("NodeEnergy"))},
                problems=(400, 404, 503),
                parameters=[
                    NODE_PARAM,
                    START_PARAM,
                    END_PARAM,
                    interval,
                    _query(
                        "carrier",
                        {
                            "type": "string",
                            "enum": [c.value for c in Carrier] + ["all"],
                            "default": "electricity",
                        },
                        "Energy carrier, or `all`.",
                    ),
                ],
                description=energy_note,
            )
        },
        "/api/v1/deadletter": {
            "get": _operation(
                "listDeadLetters",
                "operations",
                "The newest dead-letter entries, newest first",
                {"200": _json("The entries.", _ref("DeadLetterList"))},
                problems=(400, 503),
                parameters=[_query("limit", _int_range(1, 10_000, 100), "How many entries.")],
            )
        },
        "/api/v1/emission-factors": {
            "get": _operation(
                "listEmissionFactors",
                "carbon",
                "Query the emission factor library (JSON, or CSV with format=csv)",
                {
                    "200": {
                        "description": "The selected factors with the library's version.",
                        "headers": {"X-Request-Id": {"$ref": "#/components/headers/XRequestId"}},
                        "content": {
                            "application/json": {"schema": _ref("EmissionFactorList")},
                            "text/csv": {"schema": STRING},
                        },
                    }
                },
                problems=(400,),
                parameters=[
                    _query(
                        "carrier",
                        {"type": "string", "enum": [c.value for c in Carrier]},
                        "Energy carrier.",
                    ),
                    _query("year", _int_range(1990, 2100), "Reference year."),
                    _query("region", STRING, "Region id (`national` for the national factors)."),
                    _query("scope", {"type": "integer", "enum": [1, 2]}, "GHG Protocol scope."),
                    _query("variant", STRING, "Variant (e.g. `average`, `marginal`, `default`)."),
                    _query(
                        "format", {"type": "string", "enum": ["json", "csv"], "default": "json"}, "Format."
                    ),
                ],
            )
        },
        "/api/v1/emission-factors/{factor_id}": {
            "get": _operation(
                "getEmissionFactor",
                "carbon",
                "One emission factor",
                {"200": _json("The factor.", _ref("EmissionFactor"))},
                problems=(404,),
                parameters=[_path("factor_id", ID, "Factor id.")],
            )
        },
        "/api/v1/emissions": {
            "get": _operation(
                "getEmissions",
                "carbon",
                "A node's tCO2e per local hour, day or month, by scope and by carrier",
                {"200": _json("The emissions.", _ref("Emissions"))},
                problems=(400, 404, 503),
                parameters=[
                    _query("node", ID, "Hierarchy node (default: the top node); 404 for an unknown node."),
                    _query(
                        "period",
                        {"type": "string", "enum": limits["periods"], "default": "day"},
                        "Interval length.",
                    ),
                    START_PARAM,
                    END_PARAM,
                ],
                description="Default: this month of the site's time zone, by day.",
            )
        },
        "/api/v1/quotas": {
            "get": _operation(
                "listQuotas",
                "carbon",
                "Quotas with their status",
                {"200": _json("The quotas.", _ref("QuotaList"))},
                problems=(400, 404, 503),
                parameters=[month_query, NODE_QUERY],
            )
        },
        "/api/v1/quotas/{node_id}/{month}": {
            "get": _operation(
                "getQuota",
                "carbon",
                "One node's quota for one month",
                {"200": _json("The quota.", _ref("Quota"))},
                problems=(400, 404, 503),
                parameters=[NODE_PARAM, MONTH_PARAM],
            ),
            "put": _operation(
                "putQuota",
                "carbon",
                "Create or replace a quota",
                {
                    "200": _json("Replaced.", _ref("Quota")),
                    "201": _json("Created.", _ref("Quota")),
                },
                problems=(400, 404, 503),
                parameters=[NODE_PARAM, MONTH_PARAM],
                request_body=_body(_ref("QuotaInput"), "The allowance in tCO2e and its price."),
                role="engineer",
            ),
            "delete": _operation(
                "deleteQuota",
                "carbon",
                "Delete a quota",
                {"204": _no_content("Deleted.")},
                problems=(400, 404, 503),
                parameters=[NODE_PARAM, MONTH_PARAM],
                role="engineer",
            ),
        },
        "/api/v1/forecasts": {
            "get": _operation(
                "listForecasts",
                "carbon",
                "The latest month-end forecasts",
                {"200": _json("The forecasts.", _ref("ForecastList"))},
                problems=(400, 404, 503),
                parameters=[month_query, NODE_QUERY],
                description="404 for a node without a forecast yet.",
            )
        },
        "/api/v1/ledger/restatements": {
            "get": _operation(
                "listRestatements",
                "carbon",
                "The newest restatements of closed hours under a node",
                {"200": _json("The restatements.", _ref("RestatementList"))},
                problems=(400, 404, 503),
                parameters=[NODE_QUERY, _query("limit", _int_range(1, 10_000, 100), "How many.")],
            )
        },
        "/api/v1/alarms": {
            "get": _operation(
                "listAlarms",
                "alarms",
                "Alarms not in normal state (all with all=true), most urgent first",
                {"200": _json("The alarms.", _ref("AlarmList"))},
                problems=(400, 404, 503),
                parameters=[
                    console,
                    _query(
                        "all",
                        {"type": "string", "enum": ["true", "false"], "default": "false"},
                        "Also normal.",
                    ),
                ],
            )
        },
        "/api/v1/alarms/events": {
            "get": _operation(
                "listAlarmEvents",
                "alarms",
                "Alarm state transitions of a span, oldest first",
                {"200": _json("The events.", _ref("AlarmEventList"))},
                problems=(400, 404, 503),
                parameters=[
                    _query("alarm", STRING, "Only this alarm."),
                    console,
                    START_PARAM,
                    END_PARAM,
                    _query("limit", _int_range(1, limits["max_events"], 1000), "How many events."),
                ],
                description=span_note,
            )
        },
        "/api/v1/alarms/kpis": {
            "get": _operation(
                "getAlarmKpis",
                "alarms",
                "A console's alarm KPIs over a span",
                {"200": _json("The KPIs.", _ref("AlarmKpis"))},
                problems=(400, 404, 503),
                parameters=[
                    _query("console", {"type": "string", "minLength": 1}, "Alarm console id.", required=True),
                    START_PARAM,
                    END_PARAM,
                ],
                description=span_note,
            )
        },
        "/api/v1/alarms/{alarm_id}/acknowledge": {
            "post": _operation(
                "acknowledgeAlarm",
                "alarms",
                "Acknowledge an alarm",
                {"200": events_ok},
                problems=alarm_action_problems,
                parameters=[alarm_id],
                request_body=_body(_ref("AcknowledgeInput"), "Who acknowledges, and why."),
                description="409 in a state that takes no acknowledgement; 503 outside the analytics role.",
                role="operator",
            )
        },
        "/api/v1/alarms/{alarm_id}/shelve": {
            "post": _operation(
                "shelveAlarm",
                "alarms",
                "Shelve an alarm for a while",
                {"200": events_ok},
                problems=alarm_action_problems,
                parameters=[alarm_id],
                request_body=_body(_ref("ShelveInput"), "Who, why and for how long (at most 24 h)."),
                role="operator",
            )
        },
        "/api/v1/alarms/{alarm_id}/unshelve": {
            "post": _operation(
                "unshelveAlarm",
                "alarms",
                "Return a shelved alarm to service",
                {"200": events_ok},
                problems=alarm_action_problems,
                parameters=[alarm_id],
                request_body=_body(_ref("UnshelveInput"), "Who, and a comment."),
                role="operator",
            )
        },
        **_dispatch_paths(),
        **_auth_paths(),
    }


def _dispatch_paths() -> dict[str, Schema]:
    dispatch_id = _path("dispatch_id", {"type": "string", "pattern": "^[0-9]{1,18}$"}, "Dispatch id.")
    decision = {
        "required": False,
        "description": "An optional comment, kept with the decision and in the audit log.",
        "content": {
            "application/json": {
                "schema": _obj(
                    {"comment": {"type": "string", "maxLength": dispatches.COMMENT_MAX_CHARS}},
                    additionalProperties=False,
                )
            }
        },
    }
    one = {"200": _json("The dispatch as it now stands.", _ref("Dispatch"))}
    return {
        "/api/v1/dispatches": {
            "get": _operation(
                "listDispatches",
                "control",
                "The newest dispatches within the caller's nodes",
                {
                    "200": _json(
                        "Newest first.",
                        _obj({"dispatches": _array(_ref("Dispatch"))}, required=["dispatches"]),
                    )
                },
                problems=(400,),
                parameters=[
                    _query("state", {"type": "string"}, "Comma-separated states to keep."),
                    _query("limit", _int_range(1, dispatches.LIST_MAX, dispatches.LIST_DEFAULT), "How many."),
                ],
            )
        },
        "/api/v1/dispatches/{dispatch_id}": {
            "get": _operation(
                "getDispatch",
                "control",
                "One dispatch with its outcome",
                one,
                problems=(404,),
                parameters=[dispatch_id],
            )
        },
        **{
            f"/api/v1/dispatches/{{dispatch_id}}/{verb}": {
                "post": _operation(
                    operation_id,
                    "control",
                    summary,
                    one,
                    problems=(400, 404, 409, 503),
                    parameters=[dispatch_id],
                    request_body=decision,
                    description="409 unless it awaits approval; 503 outside the analytics role. Audited.",
                    role="operator",
                )
            }
            for verb, operation_id, summary in (
                (
                    "approve",
                    "approveDispatch",
                    "Approve a waiting dispatch: it is sent and verified by read-back",
                ),
                ("reject", "rejectDispatch", "Reject a waiting dispatch"),
            )
        },
        "/api/v1/dispatches/{dispatch_id}/verification": {
            "get": _operation(
                "getDispatchVerification",
                "control",
                "What a dispatch measurably saved, with its per-interval baseline",
                {"200": _json("The measured effect, or why it is unmeasurable.", _ref("Verification"))},
                problems=(404, 503),
                parameters=[dispatch_id],
                description="404 until the dispatch is measured (after its hold and rebound window).",
            )
        },
        "/api/v1/verification/monthly": {
            "get": _operation(
                "getMonthlyVerification",
                "control",
                "A month's measured dispatch effects under a node, added up",
                {"200": _json("kWh and tCO2e avoided ± combined uncertainty.", _ref("MonthlyVerification"))},
                problems=(400, 404, 503),
                parameters=[
                    _query(
                        "node", ID, "Hierarchy node (default: every node the caller sees); 404 if unknown."
                    ),
                    _query("month", MONTH, "Month of the site's time zone, `YYYY-MM`.", required=True),
                ],
            )
        },
    }


def _auth_paths() -> dict[str, Schema]:
    """Return the authentication and administration routes (scada/api/auth.py)."""
    tokens = _json("A fresh access token and a new refresh token.", _ref("Tokens"))
    deleted = {"204": _no_content("Revoked.")}
    return {
        "/api/v1/auth/login": {
            "post": _operation(
                "login",
                "auth",
                "Log in with a password",
                {"200": tokens},
                problems=(400, 401, 429),
                public=True,
                request_body=_body(_ref("LoginInput"), "Tenant, user name and password."),
                description="401 for bad credentials; 429 after repeated failures or too many attempts.",
            )
        },
        "/api/v1/auth/refresh": {
            "post": _operation(
                "refreshTokens",
                "auth",
                "Trade a refresh token for new tokens (rotates the refresh token)",
                {"200": tokens},
                problems=(400, 401),
                public=True,
                request_body=_body(_ref("RefreshInput"), "The refresh token."),
            )
        },
        "/api/v1/auth/logout": {
            "post": _operation(
                "logout",
                "auth",
                "Spend a refresh token so it cannot be used again",
                {"204": _no_content("Logged out (also for an unknown or spent token).")},
                problems=(400,),
                public=True,
                request_body=_body(_ref("RefreshInput"), "The refresh token to revoke."),
            )
        },
        "/api/v1/auth/me": {
            "get": _operation(
                "getMe",
                "auth",
                "Who the credentials belong to and what they may do",
                {"200": _json("The caller.", _ref("Me"))},
            )
        },
        "/api/v1/users": {
            "get": _admin(
                "listUsers",
                "The users of the caller's tenant",
                {"200": _json("The users.", _ref("UserList"))},
                problems=(503,),
            ),
            "post": _admin(
                "createUser",
                "Create a user with grants",
                {"201": _json("Created.", _ref("UserCreated"))},
                problems=(400, 409, 503),
                request_body=_body(_ref("UserInput"), "User name, password and grants."),
                description="409 when the user name is taken; 400 for a node the admin does not see.",
            ),
        },
        "/api/v1/api-keys": {
            "get": _admin(
                "listApiKeys",
                "The tenant's API keys and kiosk tokens (never their secrets)",
                {"200": _json("The keys.", _ref("ApiKeyList"))},
                problems=(503,),
            ),
            "post": _admin(
                "createApiKey",
                "Create an API key for an integration",
                {"201": _json("Created; the key is shown only now.", _ref("ApiKeyCreated"))},
                problems=(400, 503),
                request_body=_body(_ref("ApiKeyInput"), "Name, node and role of the key."),
            ),
        },
        "/api/v1/api-keys/{key_id}": {
            "delete": _admin(
                "deleteApiKey",
                "Revoke an API key",
                deleted,
                problems=(404, 503),
                parameters=[KEY_ID_PARAM],
            )
        },
        "/api/v1/kiosk-tokens": {
            "post": _admin(
                "createKioskToken",
                "Create a read-only token for a big screen",
                {"201": _json("Created; the token is shown only now.", _ref("KioskTokenCreated"))},
                problems=(400, 503),
                request_body=_body(_ref("KioskTokenInput"), "Name and node of the screen."),
            )
        },
        "/api/v1/kiosk-tokens/{key_id}": {
            "delete": _admin(
                "deleteKioskToken",
                "Revoke a kiosk token",
                deleted,
                problems=(404, 503),
                parameters=[KEY_ID_PARAM],
            )
        },
        "/api/v1/audit": {
            "get": _admin(
                "listAudit",
                "The audit trail (JSON pages, or CSV with format=csv)",
                {
                    "200": {
                        "description": "One page of entries, oldest first.",
                        "headers": {
                            "X-Request-Id": {"$ref": "#/components/headers/XRequestId"},
                            "X-Next-Cursor": {
                                "description": "CSV only: the cursor of the next page, absent on the last.",
                                "schema": STRING,
                            },
                        },
                        "content": {
                            "application/json": {"schema": _ref("AuditPage")},
                            "text/csv": {"schema": STRING},
                        },
                    }
                },
                problems=(400, 503),
                parameters=[
                    START_PARAM,
                    END_PARAM,
                    _query(
                        "format", {"type": "string", "enum": ["json", "csv"], "default": "json"}, "Format."
                    ),
                    _query(
                        "limit",
                        _int_range(1, AUDIT_PAGE_MAX, AUDIT_PAGE_DEFAULT),
                        f"Page size (default {AUDIT_PAGE_DEFAULT}, at most {AUDIT_PAGE_MAX}).",
                    ),
                    CURSOR_PARAM,
                ],
            )
        },
        "/api/v1/audit/verify": {
            "get": _admin(
                "verifyAudit",
                "Walk the audit chain: was any entry edited or removed?",
                {"200": _json("The verdict.", _ref("AuditVerify"))},
                problems=(503,),
                parameters=[_query("expect_head", STRING, "The head hash kept from an earlier check.")],
                description="Site-wide: only an admin of every root node.",
            )
        },
    }


# --------------------------------------------------------------------------------------------------
# The document


WEBSOCKET: Final[Schema] = {
    "path": "/api/v1/ws",
    "protocol": "docs/websocket.md",
    "authentication": "query parameter `token`: an access token, a kiosk token or an API key",
    "client_messages": {
        "subscribe": {
            "points": "list of point ids",
            "devices": "list of device ids (their points, and their availability)",
            "nodes": "list of node ids (the points of every device below)",
            "topics": "alarms, dispatches, ledger, quota_alert, availability",
            "consoles": "alarm consoles (with topic alarms; all without it)",
            "max_rate_hz": "reading flushes per second, 0.2 to 20 (default 4)",
        },
        "unsubscribe": {"points": "…", "devices": "…", "nodes": "…", "topics": "…"},
        "subscribe_alarms": {"consoles": "list of console ids (all without it)"},
        "unsubscribe_alarms": {},
        "ping": {},
    },
    "server_messages": {
        "subscribed": {"points": "ids now followed", "unknown": "ids unknown or out of reach"},
        "unsubscribed": {"points": "ids no longer followed"},
        "snapshot": {"readings": "latest Reading of each newly followed point", "availability": "of devices"},
        "readings": {"readings": "new Readings of followed points, coalesced to max_rate_hz"},
        "event": {"topic": "dispatches, ledger, quota_alert or availability", "event": "its body"},
        "subscribed_alarms": {"consoles": "consoles followed"},
        "unsubscribed_alarms": {},
        "alarm_snapshot": {"alarms": "AlarmStatus of the followed consoles not in normal state"},
        "alarms": {"events": "AlarmEvents as they happen"},
        "heartbeat": {"ts": "every 10 s"},
        "dropped": {"frames": "older frames dropped because the client fell behind"},
        "pong": {},
        "error": {"detail": "a message the server could not act on; the connection stays open"},
    },
    "limits": {"queue_frames": 256, "ping_interval_s": 15, "max_points_per_connection": 10_000},
}


DESCRIPTION: Final = """\
REST API of CarbonOS SCADA: site, devices, points, history, energy, emissions, quotas, forecasts,
alarms, and their administration.

* Every error is an RFC 9457 problem (`application/problem+json`, schema `Problem`) with `type`,
  `title`, `status`, `detail`, `instance` and `request_id`; a response never carries a traceback.
* Timestamps are ISO 8601 in UTC; `start` and `end` parameters must carry a zone (`...Z` or
  `...+08:00`). Months (`YYYY-MM`) and daily intervals follow the site's time zone.
* Ids are lower case `[a-z0-9][a-z0-9_-]{0,62}`; a point id is `<device id>.<point key>`.
* Paged lists (the audit trail) take `limit` and `cursor`: pass the previous page's `next_cursor`
  (null on the last page). Other lists take a `limit` of the newest entries.
* Authenticate with `Authorization: Bearer <access or kiosk token>` or `X-API-Key: <key>`. A node,
  point, device, alarm or quota outside the caller's grants answers 404, as if it did not exist.
* Send `X-Request-Id` to correlate a call with the server log; every response echoes it.
* Live data: the websocket `GET /api/v1/ws?token=...` (see `x-websocket`). Prometheus metrics:
  `GET /metrics` (outside /api/v1, text format).
"""


def openapi_spec(version: str) -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of /api/v1 for server ``version``."""
    limits = _limits()
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "CarbonOS SCADA API",
            "version": version,
            "summary": "Monitoring, carbon accounting and control of industrial energy.",
            "description": DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/", "description": "this server"}],
        "security": [{"bearerAuth": []}, {"apiKeyAuth": []}],
        "tags": [
            {"name": "service", "description": "Liveness and this description."},
            {"name": "auth", "description": "Log in, tokens and the caller."},
            {"name": "site", "description": "The site, its hierarchy, devices and points."},
            {"name": "points", "description": "Latest values and history."},
            {"name": "energy", "description": "Consumption from counters."},
            {"name": "carbon", "description": "Emission factors, emissions, quotas, forecasts."},
            {"name": "alarms", "description": "Alarm states, events, KPIs and operator actions."},
            {"name": "commands", "description": "Manual writes to devices, verified by read-back."},
            {"name": "control", "description": "The dispatch queue: approve, reject, outcomes."},
            {"name": "operations", "description": "What the pipeline set aside."},
            {"name": "admin", "description": "Users, API keys, kiosk tokens, audit."},
        ],
        "paths": _paths(limits),
        "components": {
            "schemas": _schemas(limits),
            "responses": {name: _problem_component(status) for status, (name, _d) in _PROBLEMS.items()},
            "headers": {
                "XRequestId": {
                    "description": "The request's id: the client's `X-Request-Id`, else a fresh one.",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1},
                }
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": (
                        "An access token from /api/v1/auth/login or /refresh (HS256 JWT, 15 minutes), "
                        "or a read-only kiosk token (`ck_kiosk_...`)."
                    ),
                },
                "apiKeyAuth": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-API-Key",
                    "description": "An integration key (`ck_key_<id>_<secret>`) from /api/v1/api-keys.",
                },
            },
        },
        "x-websocket": WEBSOCKET,
    }


@functools.cache
def _spec_json(version: str) -> str:
    return json.dumps(openapi_spec(version), ensure_ascii=False, separators=(",", ":"))


@functools.cache
def _docs_html(version: str) -> str:
    return render_docs(openapi_spec(version))


async def openapi_json(request: web.Request) -> web.Response:
    """Serve the OpenAPI document (built once per process)."""
    del request
    return web.Response(text=_spec_json(__version__), content_type="application/json")


async def docs_page(request: web.Request) -> web.Response:
    """Serve the API description as a self-contained HTML page."""
    del request
    return web.Response(text=_docs_html(__version__), content_type="text/html")


# --------------------------------------------------------------------------------------------------
# HTML rendering (server side: no script, no external asset)

_STYLE: Final = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:70rem;padding:1rem 2rem;color:#1d2329}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #ccd;margin-top:2.5rem} h3{margin:1.6rem 0 .3rem}
code,.m{font-family:ui-monospace,monospace} table{border-collapse:collapse;margin:.3rem 0 .8rem}
td,th{border:1px solid #dde;padding:.2rem .5rem;text-align:left;vertical-align:top}
.m{display:inline-block;min-width:4.5rem;font-weight:700;color:#fff;border-radius:3px;padding:0 .4rem}
.get{background:#2f7d32}.post{background:#1565c0}.put{background:#9a6700}.delete{background:#b3261e}
.pub{color:#2f7d32;font-size:.85em} .toc a{margin-right:.8rem} pre{background:#f4f5f7;padding:.6rem}
"""


def _type_html(schema: Schema) -> str:
    """Return a short HTML rendering of a schema's type (links for $refs)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f'<a href="#schema-{name}">{html.escape(name)}</a>'
    if "oneOf" in schema:
        return " | ".join(_type_html(s) for s in schema["oneOf"])
    kinds = schema.get("type", "any")
    text = " | ".join(kinds) if isinstance(kinds, list) else str(kinds)
    if kinds == "array" or (isinstance(kinds, list) and "array" in kinds):
        return f"array of {_type_html(schema.get('items', {}))}"
    out = html.escape(text)
    details = []
    if "format" in schema:
        details.append(schema["format"])
    if "enum" in schema:
        details.append("one of " + ", ".join(json.dumps(v) for v in schema["enum"]))
    if "pattern" in schema:
        details.append(f"pattern {schema['pattern']}")
    for key, label in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
    ):
        if key in schema:
            details.append(
                f"{label} {schema[key]:g}" if isinstance(schema[key], float) else f"{label} {schema[key]}"
            )
    if "default" in schema:
        details.append(f"default {json.dumps(schema['default'])}")
    if details:
        out += " <small>(" + html.escape("; ".join(details)) + ")</small>"
    return out


_OPTIONAL: Final = " <small>optional</small>"


def _properties_html(schema: Schema) -> str:
    props: dict[str, Schema] = schema.get("properties", {})
    required = set(schema.get("required", []))
    rows = "".join(
        f"<tr><td><code>{html.escape(name)}</code>{'' if name in required else _OPTIONAL}</td>"
        f"<td>{_type_html(sub)}</td><td>{html.escape(sub.get('description', ''))}</td></tr>"
        for name, sub in props.items()
    )
    extra = ""
    if isinstance(schema.get("additionalProperties"), dict):
        extra = f"<p>Any other key: {_type_html(schema['additionalProperties'])}</p>"
    elif schema.get("additionalProperties") is False:
        extra = "<p>No other keys.</p>"
    table = f"<table><tr><th>field</th><th>type</th><th>notes</th></tr>{rows}</table>" if rows else ""
    return table + extra


def _operation_html(path: str, method: str, op: Schema) -> str:
    parts = [
        f'<h3 id="{html.escape(op["operationId"])}"><span class="m {method}">{method.upper()}</span> '
        f"<code>{html.escape(path)}</code></h3>",
        f"<p>{html.escape(op['summary'])}"
        + (' <span class="pub">public</span>' if op.get("security") == [] else "")
        + "</p>",
    ]
    if "description" in op:
        parts.append(f"<p>{html.escape(op['description'])}</p>")
    if op.get("parameters"):
        rows = "".join(
            f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{p['in']}"
            f"{' (required)' if p.get('required') else ''}</td><td>{_type_html(p['schema'])}</td>"
            f"<td>{html.escape(p.get('description', ''))}</td></tr>"
            for p in op["parameters"]
        )
        parts.append(
            f"<table><tr><th>parameter</th><th>in</th><th>type</th><th>notes</th></tr>{rows}</table>"
        )
    if "requestBody" in op:
        for media, content in op["requestBody"]["content"].items():
            parts.append(f"<p>Body (<code>{html.escape(media)}</code>): {_type_html(content['schema'])}</p>")
    status_rows: list[str] = []
    for status, response in op["responses"].items():
        if "$ref" in response:
            meaning = html.escape(_PROBLEMS[int(status)][1])
            problem = f"application/problem+json: {_type_html(_ref('Problem'))}"
            status_rows.append(f"<tr><td>{status}</td><td>{meaning}</td><td>{problem}</td></tr>")
            continue
        content = response.get("content", {})
        kinds = ", ".join(f"{html.escape(m)}: {_type_html(c['schema'])}" for m, c in content.items())
        meaning = html.escape(response["description"])
        status_rows.append(f"<tr><td>{status}</td><td>{meaning}</td><td>{kinds or '-'}</td></tr>")
    header = "<tr><th>status</th><th>meaning</th><th>body</th></tr>"
    parts.append(f"<table>{header}{''.join(status_rows)}</table>")
    return "\n".join(parts)


def render_docs(spec: dict[str, Any]) -> str:
    """Return ``spec`` as one HTML page: operations by tag, then the schemas."""
    info = spec["info"]
    by_tag: dict[str, list[str]] = {t["name"]: [] for t in spec.get("tags", [])}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            by_tag.setdefault(op["tags"][0], []).append(_operation_html(path, method, op))
    sections = [
        f'<h2 id="tag-{html.escape(tag)}">{html.escape(tag)}</h2>\n' + "\n".join(ops)
        for tag, ops in by_tag.items()
        if ops
    ]
    schemas = [
        f'<h3 id="schema-{html.escape(name)}">{html.escape(name)}</h3>'
        + (f"<p>{html.escape(schema['description'])}</p>" if "description" in schema else "")
        + (_properties_html(schema) or f"<p>{_type_html(schema)}</p>")
        for name, schema in spec["components"]["schemas"].items()
    ]
    toc = " ".join(
        f'<a href="#tag-{html.escape(t)}">{html.escape(t)}</a>' for t, ops in by_tag.items() if ops
    )
    websocket = html.escape(json.dumps(spec.get("x-websocket", {}), indent=2, ensure_ascii=False))
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(info['title'])} {html.escape(info['version'])}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(info['title'])} <small>{html.escape(info['version'])}</small></h1>"
        f"<p>{html.escape(info.get('summary', ''))} Machine-readable: "
        f'<a href="{OPENAPI_PATH}"><code>{OPENAPI_PATH}</code></a> '
        f"(OpenAPI {html.escape(spec['openapi'])}).</p>"
        f"<pre>{html.escape(info.get('description', ''))}</pre>"
        f'<p class="toc">{toc} <a href="#schemas">schemas</a> <a href="#websocket">websocket</a></p>'
        + "\n".join(sections)
        + '<h2 id="websocket">websocket</h2>'
        + f"<pre>{websocket}</pre>"
        + '<h2 id="schemas">schemas</h2>\n'
        + "\n".join(schemas)
        + "</body></html>\n"
    )
