"""Dispatch round trip over the real path: decision to verified read-back, through gateway and Modbus.

``bench/control_month.py`` measures the controller's decisions on an offline plant; this bench
measures what a decision costs to carry out. The server (every role, in this process: the
dispatcher is reached as the control leader's, the way the controller reaches it) writes the power
limit of simulated PV inverters that run in another process (``python -m simulators``) over Modbus
TCP. Each dispatch is timed from ``Dispatcher.submit`` to its ``verified`` state, which covers
recording it in PostgreSQL, the command on the Redis stream, the gateway's write and acknowledgement,
the read-back, the result on the results stream and the state change.

Two loads: ``sequential`` (one dispatch at a time, as the controller submits them) and ``burst``
(``--burst`` dispatches to different inverters at once, a stage applying several targets). The
reference, measured in the same run, is a Modbus write plus read of the same register straight to
the simulator with pymodbus: the device round trip with no server in the way.

Last line: ``RESULT {json}`` with ``command_roundtrip_p50_ms``, ``command_roundtrip_p99_ms`` (the
issue's decision → verified) and the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _fleet import (
    BENCH_REDIS_URL,
    create_scratch_database,
    drop_scratch,
    free_port,
    percentile,
    start_ready_process,
    stop_process,
)
from pymodbus.client import AsyncModbusTcpClient

from control_engine.dispatcher import Dispatcher, DispatchRequest, DispatchState
from scada.api.routes import HUB
from scada.app import PLANT, Role, create_app
from scada.config import parse_site
from scada.model import NodeId, PointId
from scada.services import Endpoints
from scada.settings import Settings

MQTT_URL = "mqtt://127.0.0.1:1883"
LIMIT_ADDRESS = 100

DEVICE = """
  - id: pv-{i}
    node: g
    kind: pv_inverter
    protocol: modbus_tcp
    poll_period_s: 1.0
    modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1}}
    simulation: {{profile: pv, peak_kw: 100, seed: {i}}}
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: pv, modbus: {{address: 0, type: float32}}}}
      - {{key: power_limit_pct, kind: setpoint, unit: "%", writable: true,
          modbus: {{address: {address}, type: uint16}}}}
"""


def site_yaml(ports: list[int]) -> str:
    """Return a site of one PV inverter per port."""
    devices = "".join(DEVICE.format(i=i, port=port, address=LIMIT_ADDRESS) for i, port in enumerate(ports))
    return (
        "site: {id: bench, name: Dispatch round trip}\n"
        "hierarchy: [{id: g, name: G, level: group}]\n"
        f"devices:{devices}"
    )


async def leader(app: web.Application, timeout_s: float = 30.0) -> Dispatcher:
    """Return the sending dispatcher once this process holds the control lease."""
    async with asyncio.timeout(timeout_s):
        while (found := app[PLANT].leader_dispatcher) is None:  # noqa: ASYNC110 (polling another task's state)
            await asyncio.sleep(0.05)
    return found


def in_force(app: web.Application, point: PointId) -> bool:
    """Return True once the live hub holds a good-quality value of ``point`` (its session is online)."""
    reading = app[HUB].latest(point)
    return reading is not None and reading.quality.is_good


async def dispatch_once(dispatcher: Dispatcher, device: int, value: float) -> float:
    """Submit one dispatch and return milliseconds until it is verified (raise if it is not)."""
    started = time.perf_counter()
    done = await dispatcher.submit(
        DispatchRequest(
            node=NodeId("g"),
            point=PointId(f"pv-{device}.power_limit_pct"),
            value=value,
            reason="bench: dispatch round trip",
            rule_id="bench",
        )
    )
    elapsed_ms = (time.perf_counter() - started) * 1000
    if done.state is not DispatchState.VERIFIED:
        raise RuntimeError(f"dispatch {done.id} ended {done.state.value}: {done.result}")
    return elapsed_ms


async def modbus_reference(port: int, rounds: int) -> list[float]:
    """Return milliseconds of a write + read-back of the limit register straight to the simulator."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5)
    await client.connect()
    out: list[float] = []
    try:
        for n in range(rounds):
            started = time.perf_counter()
            await client.write_register(LIMIT_ADDRESS, 40 + n % 50, device_id=1)
            await client.read_holding_registers(LIMIT_ADDRESS, count=1, device_id=1)
            out.append((time.perf_counter() - started) * 1000)
    finally:
        client.close()
    return out


def summary(values: list[float]) -> dict[str, float]:
    """Return p50, p99 and max of a sample, rounded."""
    return {
        "p50": round(percentile(values, 50), 2),
        "p99": round(percentile(values, 99), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    ports = [free_port() for _ in range(args.devices)]
    site_text = site_yaml(ports)
    db_name, db_url = await create_scratch_database("bench_dispatch")
    prefix = f"bench-dispatch:{db_name}:"
    site = parse_site(site_text)
    with tempfile.TemporaryDirectory() as tmp:
        site_file = Path(tmp) / "site.json"  # the simulators take the normalised document
        site_file.write_text(json.dumps(site.model_dump(mode="json")), encoding="utf-8")
        sims, _ = await start_ready_process(
            "simulators",
            [sys.executable, "-m", "simulators", "--site", str(site_file), "--mqtt-url", MQTT_URL],
            ready=b"SIMULATORS READY",
            timeout_s=60,
        )
        runner: web.AppRunner | None = None
        try:
            settings = Settings(stream_prefix=prefix, secret_key="bench-" + "k" * 40, http_port=0)
            endpoints = Endpoints(db_url=db_url, redis_url=BENCH_REDIS_URL, mqtt_url=MQTT_URL, origins={})
            app = create_app(site, settings, endpoints, roles=frozenset({Role.ALL}))
            runner = web.AppRunner(app)
            await runner.setup()
            dispatcher = await leader(app)
            for i in range(args.devices):  # every session online and the value in force known
                async with asyncio.timeout(60):
                    while not in_force(app, PointId(f"pv-{i}.power_limit_pct")):  # noqa: ASYNC110
                        await asyncio.sleep(0.1)
            reference = await modbus_reference(ports[0], args.rounds)
            sequential = [
                await dispatch_once(dispatcher, n % args.devices, 40 + n % 50) for n in range(args.rounds)
            ]
            burst: list[float] = []
            for n in range(max(1, args.rounds // args.burst)):
                burst += await asyncio.gather(
                    *(
                        dispatch_once(dispatcher, d, 30 + (n + d) % 60)
                        for d in range(min(args.burst, args.devices))
                    )
                )
        finally:
            if runner is not None:
                await runner.cleanup()
            await stop_process(sims)
            await drop_scratch(db_name, prefix)
    seq, bur, ref = summary(sequential), summary(burst), summary(reference)
    return {
        "command_roundtrip_p50_ms": seq["p50"],
        "command_roundtrip_p99_ms": seq["p99"],
        "sequential_ms": seq,
        f"burst_{min(args.burst, args.devices)}_ms": bur,
        "reference_modbus_write_read_ms": ref,
        "ratio_p50_vs_reference": round(seq["p50"] / ref["p50"], 1) if ref["p50"] else None,
        "devices": args.devices,
        "target_p99_ms": 2000,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10, help="simulated PV inverters")
    parser.add_argument(
        "--rounds", type=int, default=300, help="sequential dispatches (and reference rounds)"
    )
    parser.add_argument("--burst", type=int, default=10, help="dispatches sent at once in the burst load")
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(main(parser.parse_args()))
    print("RESULT " + json.dumps(result))
