"""Live websocket fan-out: device change to browser latency with 1,000 clients and 10,000 points at 1 Hz.

Starts ``scada run --role api`` as a separate process on a generated site (1,000 devices x 10 points),
then writes every point once a second into the Redis ``readings`` stream the way gateways do (one
entry per device poll, ``ts`` = now) while websocket clients, spread over client processes, each
follow 100 random points at ``max_rate_hz`` 2. Each client measures receive time minus the reading's
``ts`` for every reading it gets. The same run first measures a reference with 10 clients.

    .venv/bin/python bench/live.py [--clients 1000] [--seconds 60]

Prints a ``RESULT {json}`` line last: latency p50/p99 (ms) with many clients and with the reference,
dropped frames, the server's CPU (percent of one core) and the readings delivered per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import psutil
import redis.asyncio as aioredis
from _fleet import BENCH_REDIS_URL, scada_server

from scada.model import PointId, Reading
from scada.security import Grant, Principal, PrincipalKind, Role, TokenSigner
from streams.codec import encode_readings

SECRET_KEY = "bench-live-signing-key-" + "k" * 32
DEVICES, POINTS_PER_DEVICE = 1_000, 10
POINTS_PER_CLIENT = 100
RATE_HZ = 2.0
SLICES_PER_S = 10
"""Devices are written in 10 groups spread over each second, like gateways polling out of phase."""
MAX_LATENCY_MS = 30_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def site_yaml() -> str:
    lines = [
        "site: {id: bench, name: Live bench}",
        "hierarchy:",
        "  - id: grp",
        "    name: Group",
        "    level: group",
        "    children:",
        "      - id: park",
        "        name: Park",
        "        level: park",
        "        children:",
        "          - id: ent",
        "            name: Enterprise",
        "            level: enterprise",
        "            children: [{id: ws, name: Workshop, level: workshop}]",
        "templates:",
        "  meter:",
        "    points:",
    ]
    lines += [
        f"      - {{key: p{i}_kw, kind: power, unit: kW, carrier: electricity, "
        f"modbus: {{address: {2 * i}, type: float32}}}}"
        for i in range(POINTS_PER_DEVICE)
    ]
    lines.append("devices:")
    lines += [
        f"  - {{id: m{d:04d}, node: ws, kind: power_meter, protocol: modbus_tcp, template: meter, "
        f"modbus: {{host: 127.0.0.1, port: 9}}}}"
        for d in range(DEVICES)
    ]
    return "\n".join(lines) + "\n"


def all_points() -> list[str]:
    return [f"m{d:04d}.p{i}_kw" for d in range(DEVICES) for i in range(POINTS_PER_DEVICE)]


def mint_token() -> str:
    principal = Principal(
        tenant="bench",
        subject="bench",
        kind=PrincipalKind.USER,
        grants=(Grant("grp", Role.VIEWER),),
        tenant_nodes=frozenset({"grp"}),
    )
    return TokenSigner(SECRET_KEY.encode()).issue(principal)


# --------------------------------------------------------------------------------------------------
# Client processes


def client_process(
    base: str, token: str, clients: int, seconds: float, seed: int, ready: Any, go: Any, out: Any
) -> None:
    """Run ``clients`` websocket clients; put a latency histogram (1 ms bins) and counters on ``out``."""
    out.put(asyncio.run(_clients(base, token, clients, seconds, seed, ready, go)))


async def _clients(
    base: str, token: str, clients: int, seconds: float, seed: int, ready: Any, go: Any
) -> dict[str, Any]:
    rng = random.Random(seed)
    points = all_points()
    histogram = [0] * (MAX_LATENCY_MS + 1)
    counters = {"readings": 0, "dropped": 0, "messages": 0, "errors": 0}
    measuring = False
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = []
        for _ in range(clients):
            ws = await session.ws_connect(f"{base}/api/v1/ws", params={"token": token}, heartbeat=30)
            await ws.send_json(
                {"type": "subscribe", "points": rng.sample(points, POINTS_PER_CLIENT), "max_rate_hz": RATE_HZ}
            )
            sockets.append(ws)

        async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                now_us = (datetime.now(UTC) - EPOCH) // timedelta(microseconds=1)
                message = json.loads(msg.data)
                if not measuring:
                    continue
                counters["messages"] += 1
                kind = message["type"]
                if kind == "readings":
                    for r in message["readings"]:
                        ts_us = (datetime.fromisoformat(r["ts"]) - EPOCH) // timedelta(microseconds=1)
                        histogram[min(MAX_LATENCY_MS, max(0, (now_us - ts_us) // 1000))] += 1
                    counters["readings"] += len(message["readings"])
                elif kind == "dropped":
                    counters["dropped"] += message["frames"]
                elif kind == "error":
                    counters["errors"] += 1

        readers = [asyncio.create_task(read(ws)) for ws in sockets]
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        await asyncio.sleep(2.0)  # skip the first flushes (snapshots, the feed catching up)
        measuring = True
        await asyncio.sleep(seconds)
        measuring = False
        for ws in sockets:
            await ws.close()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return {"histogram": histogram, **counters}


# --------------------------------------------------------------------------------------------------
# The writer and one phase


async def write_readings(stop: asyncio.Event, key: str) -> float:
    """Write every point once a second, one stream entry per device, in 10 slices; return points/s."""
    redis = aioredis.Redis.from_url(BENCH_REDIS_URL, socket_timeout=10)
    devices = [f"m{d:04d}" for d in range(DEVICES)]
    per_slice = DEVICES // SLICES_PER_S
    written = 0
    loop = asyncio.get_running_loop()
    tick = started = loop.time()
    value = 0.0
    try:
        while not stop.is_set():
            for s in range(SLICES_PER_S):
                now = datetime.now(UTC)
                value += 1.0
                async with redis.pipeline(transaction=False) as pipe:
                    for device in devices[s * per_slice : (s + 1) * per_slice]:
                        readings = [
                            Reading(point=PointId(f"{device}.p{i}_kw"), ts=now, value=value)
                            for i in range(POINTS_PER_DEVICE)
                        ]
                        pipe.xadd(key, encode_readings(readings), maxlen=100_000, approximate=True)  # type: ignore[arg-type]
                    await pipe.execute()
                written += per_slice
                tick += 1.0 / SLICES_PER_S
                await asyncio.sleep(max(0.0, tick - loop.time()))
    finally:
        await redis.aclose()
    return written * POINTS_PER_DEVICE / (loop.time() - started)


def percentile(histogram: list[int], q: float) -> float | None:
    total = sum(histogram)
    if total == 0:
        return None
    target, seen = q * total, 0
    for ms, count in enumerate(histogram):
        seen += count
        if seen >= target:
            return float(ms)
    return float(MAX_LATENCY_MS)


def run_phase(
    base: str, token: str, server: psutil.Process, readings_key: str, clients: int, seconds: float
) -> dict[str, Any]:
    """Connect ``clients`` clients over up to two processes, write for ``seconds``, collect figures."""
    ctx = mp.get_context("spawn")
    procs_n = 1 if clients < 100 else 2
    go, out = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(procs_n)]
    shares = [clients // procs_n + (1 if i < clients % procs_n else 0) for i in range(procs_n)]
    procs = [
        ctx.Process(
            target=client_process, args=(base, token, n, seconds, 1000 + i, readies[i], go, out), daemon=True
        )
        for i, n in enumerate(shares)
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    for r in readies:
        if not r.wait(180):
            raise SystemExit("clients did not connect in time")
    connect_s = time.monotonic() - started

    async def write() -> tuple[float, float]:
        stop = asyncio.Event()
        task = asyncio.create_task(write_readings(stop, readings_key))
        go.set()
        await asyncio.sleep(2.0)
        server.cpu_percent(None)
        await asyncio.sleep(seconds)
        cpu = server.cpu_percent(None)
        stop.set()
        return await task, cpu

    points_per_s, server_cpu = asyncio.run(write())
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    histogram = [sum(col) for col in zip(*(r["histogram"] for r in results), strict=True)]
    readings = sum(r["readings"] for r in results)
    return {
        "clients": clients,
        "connect_s": round(connect_s, 1),
        "latency_p50_ms": percentile(histogram, 0.50),
        "latency_p99_ms": percentile(histogram, 0.99),
        "latency_max_ms": percentile(histogram, 1.0),
        "dropped_frames": sum(r["dropped"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "readings_delivered_per_s": round(readings / seconds),
        "messages_per_s": round(sum(r["messages"] for r in results) / seconds),
        "points_written_per_s": round(points_per_s),
        "server_cpu_percent": round(server_cpu, 1),
    }


# --------------------------------------------------------------------------------------------------
# Set-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=1_000)
    parser.add_argument("--reference-clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured span of the big phase")
    parser.add_argument("--reference-seconds", type=float, default=15.0)
    args = parser.parse_args()

    with scada_server("live", site_yaml(), {"SCADA_SECRET_KEY": SECRET_KEY}, role="api") as server:
        process = psutil.Process(server.proc.pid)
        token = mint_token()
        readings_key = f"{server.stream_prefix}readings"
        reference = run_phase(
            server.base, token, process, readings_key, args.reference_clients, args.reference_seconds
        )
        print("reference", json.dumps(reference), flush=True)
        loaded = run_phase(server.base, token, process, readings_key, args.clients, args.seconds)
        print("loaded", json.dumps(loaded), flush=True)
    if "Traceback" in server.log:
        print(server.log[-3000:], file=sys.stderr)
    result = {
        "clients": args.clients,
        "points": DEVICES * POINTS_PER_DEVICE,
        "points_per_client": POINTS_PER_CLIENT,
        "max_rate_hz": RATE_HZ,
        "latency_p50_ms": loaded["latency_p50_ms"],
        "latency_p99_ms": loaded["latency_p99_ms"],
        "latency_max_ms": loaded["latency_max_ms"],
        "dropped_frames": loaded["dropped_frames"],
        "server_cpu_percent": loaded["server_cpu_percent"],
        "readings_delivered_per_s": loaded["readings_delivered_per_s"],
        "points_written_per_s": loaded["points_written_per_s"],
        "reference": {
            "clients": args.reference_clients,
            "latency_p50_ms": reference["latency_p50_ms"],
            "latency_p99_ms": reference["latency_p99_ms"],
            "server_cpu_percent": reference["server_cpu_percent"],
        },
        "cpu_count": os.cpu_count(),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
