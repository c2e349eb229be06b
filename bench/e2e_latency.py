"""End-to-end latency: a value changed on a (simulated) device -> websocket client and database.

Runs ``scada demo`` as a separate process on a generated site (N meters polled at a fixed period plus
one probe inverter), exactly as a user would, against the local PostgreSQL and Redis. The bench acts as
an outside actor: it writes a new value into the probe device's holding register over Modbus TCP, then
times how long until

- a websocket client subscribed to that point receives it (``ws_latency_*``), and
- the row is committed in PostgreSQL (``db_latency_*``, polled every 10 ms).

Each change is made at a random phase of the poll cycle, so it waits on average half a period for
the next poll. ``pipeline_*`` excludes that wait: from the reading's own timestamp (taken when the
session polled the device) to the websocket client, i.e. Modbus read + Redis + live hub + websocket.

Reference, measured in the same run: the Modbus write+read round trip straight to the simulator
(``modbus_roundtrip_*``), i.e. the device access time with no server in the way. The expected
latency is that plus, on average, half the poll period (the change waits for the next poll).

Usage: ``.venv/bin/python bench/e2e_latency.py [--devices 100] [--period 1.0] [--samples 100]``
Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from _fleet import HIERARCHY_YAML, free_port, meter_devices_yaml, percentile, ports_for
from pymodbus.client import AsyncModbusTcpClient

ADMIN_DB_URL = os.environ.get("SCADA_BENCH_DB_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SCADA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PROBE_REGISTER = 100  # power_limit_pct of the probe inverter (holding, uint16, writable)


def site_yaml(devices: int, period_s: float, meter_ports: list[int], probe_port: int) -> str:
    return f"""{HIERARCHY_YAML}
templates:
  meter:
    points:
      - {{key: voltage_v, kind: voltage, unit: V, modbus: {{address: 0, type: float32}}}}
      - {{key: current_a, kind: current, unit: A, modbus: {{address: 2, type: float32}}}}
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity,
          modbus: {{address: 4, type: float32}}}}
      - {{key: energy_import_kwh, kind: energy_counter, unit: kWh, carrier: electricity, scale: 0.1,
          modbus: {{address: 10, type: uint32}}}}
devices:
  - id: probe
    node: w
    kind: pv_inverter
    protocol: modbus_tcp
    poll_period_s: {period_s}
    modbus: {{host: 127.0.0.1, port: {probe_port}, unit_id: 1}}
    simulation: {{profile: pv, peak_kw: 100, seed: 1}}
    points:
      - {{key: power_limit_pct, kind: setpoint, unit: "%", writable: true,
          modbus: {{address: {PROBE_REGISTER}, type: uint16}}}}
{meter_devices_yaml(devices, period_s, meter_ports)}
"""


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100, help="background meters (4 points each)")
    parser.add_argument("--period", type=float, default=1.0, help="poll period of every device, s")
    parser.add_argument("--samples", type=int, default=100, help="value changes to time")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="scada-bench-"))
    db_name = f"scada_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DB_URL, timeout=10)
    await admin.execute(f'CREATE DATABASE "{db_name}"')
    db_url = ADMIN_DB_URL.rpartition("/")[0] + "/" + db_name
    meter_ports = ports_for(args.devices)
    probe_port, http_port = free_port(), free_port()
    (workdir / "site.yaml").write_text(site_yaml(args.devices, args.period, meter_ports, probe_port), "utf-8")
    env = {
        **os.environ,
        "SCADA_DB_URL": db_url,
        "SCADA_REDIS_URL": REDIS_URL,
        "SCADA_HTTP_PORT": str(http_port),
        "SCADA_DATA_DIR": str(workdir / "data"),
        "SCADA_STREAM_PREFIX": f"bench-{db_name}:",
        "SCADA_LOG_LEVEL": "WARNING",
    }
    scada = str(Path(sys.executable).with_name("scada"))
    proc = await asyncio.create_subprocess_exec(
        scada, "demo", "-c", str(workdir / "site.yaml"), env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(120):
            while b"Press Ctrl-C" not in (line := await proc.stdout.readline()):
                if not line:
                    raise SystemExit("demo exited before it was ready")
        result = await measure(args, http_port, probe_port, db_url)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 30)
        await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        redis = aioredis.Redis.from_url(REDIS_URL, socket_timeout=10)
        keys = [key async for key in redis.scan_iter(match=f"{env['SCADA_STREAM_PREFIX']}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        await admin.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"devices {args.devices + 1}, points {4 * args.devices + 1}, poll period {args.period} s")
    for key in ("ws_latency", "db_latency", "pipeline", "modbus_roundtrip"):
        print(f"{key:18s} p50 {result[key + '_p50_ms']:8.1f} ms   p99 {result[key + '_p99_ms']:8.1f} ms")
    print("RESULT " + json.dumps(result))


async def measure(args: argparse.Namespace, http_port: int, probe_port: int, db_url: str) -> dict[str, Any]:
    base = f"http://127.0.0.1:{http_port}/api/v1"
    modbus = AsyncModbusTcpClient("127.0.0.1", port=probe_port, timeout=2, retries=0, reconnect_delay=0)
    await modbus.connect()
    db = await asyncpg.connect(db_url, timeout=10)
    point_row = await db.fetchval("SELECT id FROM points WHERE point_id = 'probe.power_limit_pct'")
    rng = random.Random(42)
    pipeline_ms: list[float] = []
    ws_ms: list[float] = []
    db_ms: list[float] = []
    ref_ms: list[float] = []
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/health") as response:
            seen_before = (await response.json())["live"]["readings_seen"]
        started = time.perf_counter()
        ws = await http.ws_connect(f"{base}/ws")
        await ws.send_json({"type": "subscribe", "points": ["probe.power_limit_pct"]})
        for i in range(args.samples):
            value = 1 + i % 99
            # Reference: the device itself, no server in the way (write, then read it back).
            t0 = time.perf_counter()
            await modbus.write_register(PROBE_REGISTER, value + 100, device_id=1)
            await modbus.read_holding_registers(PROBE_REGISTER, count=1, device_id=1)
            ref_ms.append((time.perf_counter() - t0) * 1000)
            # Measured: the change travels device -> session -> Redis -> live hub -> websocket / historian.
            await asyncio.sleep(rng.uniform(0, args.period))  # a random phase of the poll cycle
            t0 = time.perf_counter()
            await modbus.write_register(PROBE_REGISTER, value, device_id=1)
            ws_done = db_done = None
            async with asyncio.timeout(30):
                while ws_done is None:
                    message = await ws.receive_json()
                    hits = [r for r in message.get("readings", []) if r["value"] == value]
                    if hits:
                        ws_done = time.perf_counter()
                        polled = datetime.fromisoformat(hits[0]["ts"]).timestamp()
                        pipeline_ms.append((time.time() - polled) * 1000)
                while db_done is None:
                    hit = await db.fetchval(
                        "SELECT 1 FROM readings"
                        " WHERE point = $1 AND value = $2 AND ts > now() - interval '1 min' LIMIT 1",
                        point_row,
                        float(value),
                    )
                    if hit:
                        db_done = time.perf_counter()
                    else:
                        await asyncio.sleep(0.01)
            ws_ms.append((ws_done - t0) * 1000)
            db_ms.append((db_done - t0) * 1000)
        elapsed_s = time.perf_counter() - started
        async with http.get(f"{base}/health") as response:
            seen_after = (await response.json())["live"]["readings_seen"]
        await ws.close()
    await db.close()
    modbus.close()
    return {
        "devices": args.devices + 1,
        "points": 4 * args.devices + 1,
        "poll_period_s": args.period,
        "samples": args.samples,
        "ws_latency_p50_ms": round(statistics.median(ws_ms), 1),
        "ws_latency_p99_ms": round(percentile(ws_ms, 99), 1),
        "db_latency_p50_ms": round(statistics.median(db_ms), 1),
        "db_latency_p99_ms": round(percentile(db_ms, 99), 1),
        "modbus_roundtrip_p50_ms": round(statistics.median(ref_ms), 2),
        "modbus_roundtrip_p99_ms": round(percentile(ref_ms, 99), 2),
        "pipeline_p50_ms": round(statistics.median(pipeline_ms), 1),
        "pipeline_p99_ms": round(percentile(pipeline_ms, 99), 1),
        "ws_p50_over_half_period": round(statistics.median(ws_ms) / (args.period * 500), 2),
        "readings_per_s": round((seen_after - seen_before) / elapsed_s, 1),
    }


if __name__ == "__main__":
    asyncio.run(main())
