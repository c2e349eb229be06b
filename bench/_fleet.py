"""Helpers shared by the benches: ports, processes, sessions, scratch databases, a fleet of meters.

The benches run as scripts (``python bench/x.py``), so this module is imported as ``_fleet``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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


async def count_stream_readings(redis: aioredis.Redis, key: str) -> int:
    """Readings held in the stream ``key`` now (every entry's rows, read with XRANGE in pages)."""
    total, start = 0, "-"
    while True:
        page: Any = await redis.xrange(key, min=start, count=2000)
        for _id, fields in page:
            rows = fields.get(b"r")
            if rows is not None:
                total += len(json.loads(rows))
        if len(page) < 2000:
            return total
        start = "(" + page[-1][0].decode()


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


async def start_ready_process(
    what: str,
    argv: Sequence[str],
    *,
    ready: bytes,
    timeout_s: float,
    stdin: bool = False,
    cwd: Path | None = None,
) -> tuple[asyncio.subprocess.Process, bytes]:
    """Start a helper process (a simulator, a fleet) and wait for the line that says it is ready.

    Return the process and that line; kill the process and exit if the first line is another.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin else None,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(timeout_s):
        line = await proc.stdout.readline()
    if not line.startswith(ready):
        proc.kill()
        await proc.wait()
        raise SystemExit(f"{what} did not start: {line!r}")
    return proc, line


class _Session(Protocol):
    @property
    def device(self) -> str: ...
    @property
    def available(self) -> bool | None: ...
    async def run(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Ramp:
    """How the sessions came up: seconds until all were online (or the wait ran out), and how many were."""

    seconds: float
    online: int


@contextlib.asynccontextmanager
async def running_sessions(sessions: Sequence[_Session], *, max_wait_s: float) -> AsyncIterator[Ramp]:
    """Run every session as a task; wait (at most ``max_wait_s``) for all online; cancel them on exit."""
    tasks = [asyncio.create_task(s.run(), name=f"session-{s.device}") for s in sessions]
    try:
        started = time.monotonic()
        for _ in range(int(max_wait_s / 0.2)):
            if all(s.available for s in sessions):
                break
            await asyncio.sleep(0.2)
        yield Ramp(seconds=time.monotonic() - started, online=sum(1 for s in sessions if s.available))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


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


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Stop ``scada run`` with SIGINT (its clean shutdown), then SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(slots=True)
class ScadaServer:
    """A ``scada run`` started by :func:`scada_server`."""

    base: str
    """``http://127.0.0.1:<port>``."""
    proc: subprocess.Popen[bytes]
    stream_prefix: str
    log: str = ""
    """What the server logged, read once it stopped."""


@contextlib.contextmanager
def scada_server(
    name: str, site_yaml: str, env: Mapping[str, str], *, role: str | None = None
) -> Iterator[ScadaServer]:
    """Run ``scada run`` on a scratch database and stream prefix until the block ends, then clean up.

    The block starts once the server answers /api/v1/health; ``env`` adds to (or overrides) the
    settings made here. On exit the server is stopped, its log kept in :attr:`ScadaServer.log`,
    and the database, the Redis keys and the working directory are removed.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"scada-{name}-"))
    db_name, db_url = asyncio.run(create_scratch_database(f"scada_{name}"))
    prefix = f"{name}-{db_name}:"
    http_port = free_port()
    site = workdir / "site.yaml"
    site.write_text(site_yaml, "utf-8")
    full_env = {
        **os.environ,
        "SCADA_DB_URL": db_url,
        "SCADA_REDIS_URL": BENCH_REDIS_URL,
        "SCADA_HTTP_HOST": "127.0.0.1",
        "SCADA_HTTP_PORT": str(http_port),
        "SCADA_DATA_DIR": str(workdir / "data"),
        "SCADA_STREAM_PREFIX": prefix,
        "SCADA_LOG_LEVEL": "WARNING",
        **env,
    }
    argv = [str(Path(sys.executable).with_name("scada")), "run", "-c", str(site)]
    if role is not None:
        argv += ["--role", role]
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=log)
    server = ScadaServer(base=f"http://127.0.0.1:{http_port}", proc=proc, stream_prefix=prefix)
    try:
        wait_healthy(server.base, proc)
        yield server
    finally:
        stop_server(proc)
        server.log = log_path.read_text("utf-8", errors="replace")
        asyncio.run(drop_scratch(db_name, prefix))
        shutil.rmtree(workdir, ignore_errors=True)


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
