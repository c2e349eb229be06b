"""schemathesis against the running server with a small budget (bench/api_fuzz.py runs a large one).

The server is the real application (PostgreSQL, Redis, authentication) on a real port; the fuzzer
runs in a worker thread and calls every documented operation with generated valid and invalid
inputs, checking that nothing answers 5xx and every answer conforms to the OpenAPI document.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from _api_fuzz import run_schemathesis, with_known_values
from _auth_helpers import start_api_server
from aiohttp import web

from scada import __version__
from scada.api.openapi import openapi_spec

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
      - {key: e_kwh, kind: energy_counter, unit: kWh, carrier: electricity, modbus: {address: 2, type: uint32}}
"""


async def test_no_server_errors_and_answers_match_the_spec(
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    aiohttp_server: Callable[[web.Application], Any],
) -> None:
    server, headers = await start_api_server(
        SITE,
        aiohttp_server,
        pg_url=pg_url,
        redis_url=redis_url,
        mqtt_url=mqtt_url,
        stream_prefix=stream_prefix,
    )
    spec = with_known_values(
        openapi_spec(__version__),
        {
            "point_id": ["m1.p_kw", "m1.e_kwh"],
            "node_id": ["ent", "ws"],
            "node": ["ent"],
            "console": ["ent"],
            "month": ["2026-12"],
            "alarm_id": ["m1:offline"],
        },
    )
    report = await asyncio.to_thread(
        run_schemathesis,
        str(server.make_url("")).rstrip("/"),
        headers,
        max_examples=4,
        spec=spec,
    )
    assert report.cases > 150
    assert report.server_errors == 0, report.summary()
    assert report.schema_failures == 0, report.summary()
