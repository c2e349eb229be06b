"""Helpers shared by the benches: free ports, percentiles, and a fleet of simulated meters.

The benches run as scripts (``python bench/x.py``), so this module is imported as ``_fleet``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Sequence

import asyncpg
import redis.asyncio as aioredis

UNITS_PER_PORT = 200
"""Meters behind one simulated gateway port (unit ids 1..200), as RS-485 gateways serve them."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ports_for(meters: int) -> list[int]:
    """Return one free port per gateway needed for ``meters`` meters."""
    return [free_port() for _ in range(-(-meters // UNITS_PER_PORT))]


async def stop_process(proc: asyncio.subprocess.Process, timeout_s: float = 30.0) -> None:
    """Stop a simulator process with SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(timeout_s):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


def percentile(values: Sequence[float], q: float) -> float:
    """Return the nearest-rank ``q``-th percentile (0..100) of ``values``.

    >>> percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50)
    3.0
    """
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def meter_devices_yaml(meters: int, period_s: float, ports: Sequence[int], *, template: str = "meter") -> str:
    """Return the ``devices:`` entries of ``meters`` power meters spread over gateway ``ports``."""
    return "\n".join(
        f"  - {{id: m{i:05d}, node: w, kind: power_meter, protocol: modbus_tcp, template: {template}, "
        f"poll_period_s: {period_s}, modbus: {{host: 127.0.0.1, port: {ports[i // UNITS_PER_PORT]}, "
        f"unit_id: {1 + i % UNITS_PER_PORT}}}, "
        f"simulation: {{profile: production_2shift, base_kw: 40, peak_kw: 120, seed: {i}}}}}"
        for i in range(meters)
    )


HIERARCHY_YAML = """site: {id: bench, name: Bench}
hierarchy: [{id: g, name: G, level: group, children: [{id: p, name: P, level: park, children: [
  {id: e, name: E, level: enterprise, children: [{id: w, name: W, level: workshop}]}]}]}]
"""
"""One of each level; every bench meter hangs on workshop ``w``."""


BENCH_ADMIN_DB_URL = os.environ.get(
    "SCADA_BENCH_DB_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BENCH_REDIS_URL = os.environ.get("SCADA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


async def create_scratch_database(prefix: str) -> tuple[str, str]:
    """Create an empty database ``<prefix>_<random>`` on the local PostgreSQL; return (name, URL)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(BENCH_ADMIN_DB_URL, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name, BENCH_ADMIN_DB_URL.rpartition("/")[0] + "/" + name


async def drop_scratch(name: str, stream_prefix: str) -> None:
    """Drop a scratch database and every Redis key of a stream prefix."""
    admin = await asyncpg.connect(BENCH_ADMIN_DB_URL, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    redis = aioredis.Redis.from_url(BENCH_REDIS_URL, socket_timeout=10)
    keys = [key async for key in redis.scan_iter(match=f"{stream_prefix}*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 180.0) -> None:
    """Wait until ``scada run`` answers /api/v1/health; exit if it dies or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"scada run exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base}/api/v1/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit("scada run did not answer /api/v1/health in time")
