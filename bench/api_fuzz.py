"""Fuzz the REST API of a running server against its OpenAPI document, with a large budget.

Starts ``scada run`` as a separate process on a small generated site (one workshop, a power meter and
a gas meter whose devices are unreachable, so readings are bad-quality and devices go offline),
against a fresh database on the local PostgreSQL and a unique key prefix on the local Redis. Then it
logs in (``SCADA_BOOTSTRAP_ADMIN`` creates the admin at start-up; without the auth routes, login
answers 404 and the run goes on without credentials), reads the document the server serves at
/api/v1/openapi.json (or builds it in-process if the server does not serve it yet), and runs
tests/scada/_api_fuzz.py: for every operation, ``--examples`` valid and as many invalid requests,
each checked for 5xx, undocumented status or content type, and a body that violates the schema.
Real ids (points, nodes, devices, factors, alarms) are mixed into the generated ones so the
fuzzer reaches beyond 404s.

Reference, measured in the same run: the number of operations the document describes, against
the number that received cases.

Usage: ``.venv/bin/python bench/api_fuzz.py [--examples 100] [--positive-only] [--seed N]``
Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _fleet import HIERARCHY_YAML, free_port, scada_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scada"))
sys.path.insert(0, str(ROOT))
from _api_fuzz import FuzzReport, run_schemathesis, with_known_values  # noqa: E402

from scada import __version__  # noqa: E402
from scada.api.openapi import openapi_spec  # noqa: E402

ADMIN = ("bench", "admin", "fuzz-bench-password-1")  # tenant, username, password
AUTH_PATH_PREFIXES = (
    "/api/v1/auth/",
    "/api/v1/users",
    "/api/v1/api-keys",
    "/api/v1/kiosk-tokens",
    "/api/v1/audit",
)

SITE_YAML = f"""{HIERARCHY_YAML}
devices:
  - id: meter
    node: w
    kind: power_meter
    protocol: modbus_tcp
    poll_period_s: 1.0
    modbus: {{host: 127.0.0.1, port: {{meter_port}}, unit_id: 1}}
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity,
          modbus: {{address: 4, type: float32}},
          alarms: [{{kind: h, setpoint: 100, priority: medium, deadband: 1}}]}}
      - {{key: energy_import_kwh, kind: energy_counter, unit: kWh, carrier: electricity,
          modbus: {{address: 10, type: uint32}}}}
  - id: gas
    node: w
    kind: gas_meter
    protocol: modbus_tcp
    poll_period_s: 1.0
    modbus: {{host: 127.0.0.1, port: {{gas_port}}, unit_id: 1}}
    points:
      - {{key: volume_nm3, kind: gas_counter, unit: Nm3, carrier: natural_gas,
          modbus: {{address: 0, type: uint32}}}}
"""


def http_json(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """Send one request; return the status and the decoded JSON body (None when not JSON)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={**(headers or {})})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def login(base: str) -> tuple[dict[str, str], str]:
    """Return request headers with credentials and how they were obtained."""
    tenant, username, password = ADMIN
    status, body = http_json(
        "POST", f"{base}/api/v1/auth/login", {"tenant": tenant, "username": username, "password": password}
    )
    if status == 404:
        return {}, "none (POST /api/v1/auth/login answered 404: auth routes not registered)"
    if status != 200:
        raise SystemExit(f"login failed: {status} {body}")
    return {"Authorization": f"Bearer {body['access_token']}"}, "bearer token from /api/v1/auth/login"


def load_spec(base: str, headers: dict[str, str], authenticated: bool) -> tuple[dict[str, Any], str]:
    status, served = http_json("GET", f"{base}/api/v1/openapi.json", headers=headers)
    if status == 200 and isinstance(served, dict):
        spec, origin = served, "served by the server"
    else:
        spec, origin = openapi_spec(__version__), f"built in-process (server answered {status})"
        for path in ("/api/v1/openapi.json", "/api/v1/docs"):
            spec["paths"].pop(path)
    if not authenticated:
        for path in [p for p in spec["paths"] if p.startswith(AUTH_PATH_PREFIXES)]:
            spec["paths"].pop(path)
    return spec, origin


def known_values(base: str, headers: dict[str, str]) -> dict[str, list[str]]:
    """Return real ids of the running site, by parameter name."""

    def items(path: str, key: str) -> list[Any]:
        status, body = http_json("GET", f"{base}{path}", headers=headers)
        return list(body.get(key, [])) if status == 200 and isinstance(body, dict) else []

    points = [p["id"] for p in items("/api/v1/points", "items")]
    devices = [d["id"] for d in items("/api/v1/devices", "items")]
    factors = [f["id"] for f in items("/api/v1/emission-factors", "factors")][:20]
    alarms = [a["alarm"] for a in items("/api/v1/alarms?all=true", "alarms")]
    consoles = sorted({a["console"] for a in items("/api/v1/alarms?all=true", "alarms")})
    nodes: list[str] = []
    stack = items("/api/v1/site", "hierarchy")
    while stack:
        node = stack.pop()
        nodes.append(node["id"])
        stack.extend(node["children"])
    now = datetime.now(UTC)
    months = [f"{now.year}-{now.month:02d}", f"{now.year - 1}-{now.month:02d}"]
    return {
        "point_id": points,
        "device": devices,
        "node_id": nodes,
        "node": nodes,
        "factor_id": factors,
        "alarm_id": alarms,
        "alarm": alarms,
        "console": consoles,
        "month": months,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--examples", type=int, default=100, help="cases per operation and mode")
    parser.add_argument("--positive-only", action="store_true", help="skip invalid inputs")
    parser.add_argument("--seed", type=int, default=20_260_501)
    args = parser.parse_args()

    site = SITE_YAML.replace("{meter_port}", str(free_port())).replace("{gas_port}", str(free_port()))
    with scada_server("fuzz", site, {"SCADA_BOOTSTRAP_ADMIN": ":".join(ADMIN)}) as server:
        base = server.base
        headers, auth = login(base)
        spec, spec_origin = load_spec(base, headers, authenticated=bool(headers))
        values = known_values(base, headers)
        documented = sum(len(item) for item in spec["paths"].values())
        started = time.monotonic()
        report = run_schemathesis(
            base,
            headers,
            max_examples=args.examples,
            spec=with_known_values(spec, values),
            negative=not args.positive_only,
            seed=args.seed,
        )
        elapsed_s = time.monotonic() - started
    print_report(report, auth=auth, spec_origin=spec_origin, server_log=server.log)
    result = {
        "cases": report.cases,
        "failing_cases": report.failing_cases,
        "server_errors": report.server_errors,
        "schema_failures": report.schema_failures,
        "generation_errors": len(report.errors),
        "operations": report.operations,
        "documented_operations": documented,
        "examples_per_operation_and_mode": args.examples,
        "negative": not args.positive_only,
        "authenticated": bool(headers),
        "statuses": {str(k): v for k, v in sorted(report.statuses.items())},
        "elapsed_s": round(elapsed_s, 1),
        "cases_per_s": round(report.cases / elapsed_s, 1) if elapsed_s else None,
    }
    print("RESULT " + json.dumps(result))


def print_report(report: FuzzReport, *, auth: str, spec_origin: str, server_log: str) -> None:
    print(f"credentials: {auth}")
    print(f"spec: {spec_origin}")
    print(report.summary())
    unhandled = [line for line in server_log.splitlines() if "unhandled error" in line]
    if unhandled:
        print(f"server log: {len(unhandled)} unhandled errors; first: {unhandled[0]}")


if __name__ == "__main__":
    main()
