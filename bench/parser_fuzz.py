"""Fuzz every parser with many more examples than the test suite runs, and count cases and failures.

Runs the properties of the fuzz tests (tests/protocols/test_fuzz_modbus.py, test_fuzz_mqtt.py,
tests/scada/test_fuzz_site_yaml.py, test_fuzz_api_bodies.py, tests/streams/test_fuzz_stream_codec.py)
with ``--examples`` generated cases each: the Modbus codec, raw frames to the simulator's Modbus
server, corrupted answers to the Modbus driver, MQTT telemetry and command responses (codec and
driver), site YAML text and mutations of examples/plant.yaml, the stream entry decoders, and JSON
bodies to every body route of a real server (in-process, on a fresh PostgreSQL database and a
unique Redis prefix). A failing case is counted and its first example kept; the run goes on.

Reference, measured in the same run: the cases per second of a trivial property (the length of
random bytes), so each parser's rate reads as "hypothesis overhead" versus "parser and I/O cost".

Usage: ``.venv/bin/python bench/parser_fuzz.py [--examples 2000] [--seed 1] [--only mqtt,stream]``
Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for sub in ("tests/protocols", "tests/scada", "tests/streams", "tests", ""):
    sys.path.insert(0, str(ROOT / sub))

import hypothesis  # noqa: E402
import test_fuzz_api_bodies as api_fuzz  # noqa: E402
import test_fuzz_modbus as modbus_fuzz  # noqa: E402
import test_fuzz_mqtt as mqtt_fuzz  # noqa: E402
import test_fuzz_site_yaml as yaml_fuzz  # noqa: E402
import test_fuzz_stream_codec as stream_fuzz  # noqa: E402
from _auth_helpers import TEST_SECRET_KEY, admin_headers  # noqa: E402
from hypothesis import HealthCheck, Phase, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from protocols.modbus.config import DataType  # noqa: E402

ADMIN_DB_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
MQTT_URL = "mqtt://127.0.0.1:1883"
KEPT_FAILURES = 3


@dataclass
class ParserRun:
    """Cases and failures of one property."""

    cases: int = 0
    failures: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "failures": self.failures,
            "seconds": round(self.seconds, 2),
            "cases_per_s": round(self.cases / self.seconds, 1) if self.seconds else None,
            "failing_examples": self.examples,
        }


def run_property(
    strategy: st.SearchStrategy[Any], check: Callable[[Any], None], *, examples: int, seed: int
) -> ParserRun:
    """Run ``check`` on ``examples`` generated inputs; count every failure instead of stopping."""
    run = ParserRun()
    fuzz_settings = hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )

    @hypothesis.seed(seed)
    @fuzz_settings
    @given(strategy)
    def one(value: Any) -> None:
        run.cases += 1
        try:
            check(value)
        except Exception as err:  # noqa: BLE001 -- every failure is counted and the run goes on
            run.failures += 1
            if len(run.examples) < KEPT_FAILURES:
                run.examples.append(f"{type(err).__name__}: {str(err)[:300]} <- {repr(value)[:300]}")

    start = time.perf_counter()
    one()
    run.seconds = time.perf_counter() - start
    return run


# --------------------------------------------------------------------------------------------------
# Rigs for the properties that talk over sockets


@contextmanager
def modbus_rigs() -> Iterator[tuple[modbus_fuzz.SimulatorRig, modbus_fuzz.DriverRig]]:
    """The simulator's Modbus server with a connected driver, and the scripted device; one loop thread.

    The rigs are the ones the fuzz test module's fixtures use, so the bench fuzzes exactly what the
    tests set up.
    """
    simulator_rig, scripted_rig = modbus_fuzz.simulator_rig, modbus_fuzz.scripted_rig
    loop = modbus_fuzz.LoopThread()
    try:
        with simulator_rig(loop) as simulator, scripted_rig(loop) as scripted:
            yield simulator, scripted
    finally:
        loop.close()


@contextmanager
def api_server() -> Iterator[tuple[str, dict[str, str], int]]:
    """The API role on a free port, on a fresh database; yield its URL, admin headers and a dispatch id."""
    import asyncpg  # noqa: PLC0415
    from aiohttp import web  # noqa: PLC0415

    from control_engine.dispatcher import DispatchMode, DispatchRequest, DispatchState  # noqa: PLC0415
    from scada.api.dispatches import DISPATCH_STORE  # noqa: PLC0415
    from scada.app import Role, create_app  # noqa: PLC0415
    from scada.config import parse_site  # noqa: PLC0415
    from scada.model import NodeId, PointId  # noqa: PLC0415
    from scada.services import Endpoints  # noqa: PLC0415
    from scada.settings import Settings  # noqa: PLC0415

    name = f"scada_fuzz_{uuid.uuid4().hex[:10]}"
    loop = modbus_fuzz.LoopThread()

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(ADMIN_DB_URL, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    loop.run(admin(f'CREATE DATABASE "{name}"'))
    base, _, _ = ADMIN_DB_URL.rpartition("/")
    site = parse_site(api_fuzz.SITE)
    settings = Settings(
        stream_prefix=f"bench-fuzz:{uuid.uuid4().hex[:8]}:",
        secret_key=TEST_SECRET_KEY,
        bootstrap_admin="fuzz:admin:fuzz-password",
    )
    endpoints = Endpoints(db_url=f"{base}/{name}", redis_url=REDIS_URL, mqtt_url=MQTT_URL, origins={})
    app = create_app(site, settings, endpoints, roles=frozenset({Role.API}))
    runner = web.AppRunner(app)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        dispatch = await app[DISPATCH_STORE].create(
            DispatchRequest(node=NodeId("ent"), point=PointId("m1.p_kw"), value=1.0, reason="fuzz"),
            DispatchMode.ADVISORY,
            DispatchState.ADVISORY,
        )
        return dispatch.id

    try:
        dispatch_id = loop.run(start(), timeout_s=60)
        yield f"http://127.0.0.1:{port}", admin_headers(site), dispatch_id
    finally:
        loop.run(runner.cleanup(), timeout_s=60)
        loop.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        loop.close()


# --------------------------------------------------------------------------------------------------


def trivial_property(data: bytes) -> None:
    """The reference: as cheap as a property gets, so its rate is hypothesis' own overhead."""
    assert len(data) >= 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # garbage frames are the point here
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--examples", type=int, default=2000, help="generated cases per parser")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated name prefixes (e.g. mqtt,stream)")
    args = parser.parse_args()
    n, seed = args.examples, args.seed
    only = [p for p in args.only.split(",") if p]

    def wanted(name: str) -> bool:
        return not only or any(name.startswith(p) for p in only)

    results: dict[str, ParserRun] = {}

    def run(
        name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], None], examples: int = n
    ) -> None:
        if wanted(name):
            results[name] = run_property(strategy, check, examples=examples, seed=seed)
            print(f"{name}: {json.dumps(results[name].as_json())}", flush=True)

    run_property(st.binary(max_size=80), trivial_property, examples=min(n, 100), seed=seed)  # warm-up
    reference = run_property(st.binary(max_size=80), trivial_property, examples=n, seed=seed)
    print(f"reference (trivial property): {json.dumps(reference.as_json())}", flush=True)

    m = modbus_fuzz
    run(
        "modbus_codec_decode",
        st.tuples(m.LAYOUTS, st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4), m.SCALES, m.OFFSETS),
        lambda a: m.check_register_decoding(*a),
    )
    run(
        "modbus_codec_bad_registers",
        st.tuples(st.sampled_from(list(DataType)), st.lists(st.integers(-(2**20), 2**20), max_size=6)),
        lambda a: m.check_bad_registers(*a),
    )
    run(
        "modbus_codec_encode",
        st.tuples(m.LAYOUTS, st.floats(), m.SCALES, m.OFFSETS),
        lambda a: m.check_encoding(*a),
    )
    if wanted("modbus_simulator") or wanted("modbus_driver"):
        with modbus_rigs() as (simulator, scripted):
            run(
                "modbus_simulator_frames",
                m.garbage_requests(),
                lambda g: m.check_simulator_survives(simulator, g),
            )
            run("modbus_driver_answers", m.CORRUPTIONS, lambda c: m.check_driver_corruption(scripted, c))

    q = mqtt_fuzz
    run("mqtt_telemetry", q.PAYLOADS, q.check_telemetry)
    run("mqtt_response", q.PAYLOADS, q.check_response)

    def driver_message(args: tuple[bytes, bool]) -> None:
        dead = q.DeadLetters()
        q.check_driver_message(
            q.make_driver(q.offline_connection(dead), dead), dead, args[0], retained=args[1]
        )

    run("mqtt_driver", st.tuples(q.PAYLOADS, st.booleans()), driver_message)

    y = yaml_fuzz
    run("site_yaml_text", y.YAML_TEXT, y.check_yaml_text)
    run("site_yaml_plant_mutation", y.plant_mutations(), y.check_plant_mutation, examples=max(1, n // 10))

    s = stream_fuzz
    run("stream_readings", s.readings_fields(), s.check_readings_entry)
    run("stream_events", s.event_fields(), s.check_event_entry)
    run("stream_commands", s.command_fields(b"c"), s.check_command_entry)
    run("stream_results", s.command_fields(b"r"), s.check_result_entry)

    if wanted("api_bodies"):
        import requests  # noqa: PLC0415, TID251 -- blocking client in this script's own thread

        with api_server() as (base_url, headers, dispatch_id), requests.Session() as session:
            tally = api_fuzz.Tally()
            run(
                "api_bodies",
                api_fuzz.requests_to_send(),
                lambda r: api_fuzz.check_api_request(
                    session, base_url, headers, r, dispatch_id=dispatch_id, tally=tally
                ),
            )

    result = {
        "examples_per_parser": n,
        "seed": seed,
        "reference_trivial_cases_per_s": reference.as_json()["cases_per_s"],
        "parsers": {name: r.as_json() for name, r in results.items()},
        "total_cases": sum(r.cases for r in results.values()),
        "total_failures": sum(r.failures for r in results.values()),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
