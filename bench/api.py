"""REST API under load: 200 concurrent clients of 1,000 tenants on the typical reads.

Runs ``scada run --role api`` as a separate process on a generated site (one group, 10 parks,
``--tenants`` enterprises, each with one workshop, one Modbus meter and one tenant owning it; see
``bench/_api_site.py``) against a scratch database on the local PostgreSQL (created and dropped by the
bench) and the local Redis. After the server has migrated and synced its catalog, the bench writes
6 hours of 1-minute readings for every point (through the historian stage, which fills the rollups
too) and 30 days of hourly ledger rows for every workshop, then mints one access token per tenant
(viewer on its enterprise) with the server's signing key.

Phases, all with the same ``--clients`` tasks sharing one aiohttp session (connection limit =
clients), each task sending its next request as soon as the last one answered (a closed loop; with
``--think-ms`` each task pauses a random 0..2x that long between requests, like a person reading a
chart, and the load is what the clients offer rather than what the server can take):

1. cross-tenant check: every kind of request with one tenant's token on another tenant's ids must
   answer 404 (``cross_tenant_leaks`` counts those that did not; must be 0), and with the owner's
   token 200 with data;
2. unloaded: one client, ``--serial-seconds``: the latency of each kind with no queueing
   (``unloaded_*_p50_ms``), i.e. what one request costs end to end;
3. warm-up (5 s, discarded), then ``--seconds`` of the mix: a random tenant and, with equal odds,
   ``GET /points/{meter}.p_kw/latest``, ``GET /points/{meter}.p_kw/history?points=300`` (last hour),
   ``GET /emissions?node={enterprise}&period=day`` (last 7 days);
4. reference, measured in the same run: ``GET /api/v1/health`` (no authentication, no database)
   with the same clients for ``--health-seconds``.

``server_cpu_percent`` is the server process's CPU over the measured mix (100 = one core),
``db_cpu_percent`` that of its PostgreSQL backends, ``client_cpu_percent`` the bench's own (client
and server share the machine), ``machine_cpu_percent`` the whole machine's (anything above the sum
of the three is other work competing for the same cores). With a closed loop and no think time,
latency is concurrency / throughput (Little's law): a p95 under 50 ms at 200 clients asks for well
over 4,000 requests/s, which is why the same clients on ``/health`` are the reference.

Usage: ``.venv/bin/python bench/api.py [--tenants 1000] [--clients 200] [--seconds 30] [--think-ms 0]``
Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _api_site import TenantIds, seed, site_yaml, tenant_ids
from _fleet import BENCH_REDIS_URL, create_scratch_database, drop_scratch, free_port, percentile, stop_process

from scada.security import Grant, Principal, PrincipalKind, Role, TokenSigner

TARGET_P95_MS = 50.0
WARMUP_S = 5.0
STARTUP_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 30.0
KINDS = ("latest", "history", "emissions")
CROSS_TENANT_CHECKS_PER_KIND = 10


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def request_path(kind: str, ids: TenantIds) -> str:
    """Return the path and query of one request of ``kind`` about ``ids``' data."""
    now = datetime.now(UTC)
    if kind == "latest":
        return f"/api/v1/points/{ids.power_point}/latest"
    if kind == "history":
        return (
            f"/api/v1/points/{ids.power_point}/history?points=300"
            f"&start={_iso(now - timedelta(hours=1))}&end={_iso(now)}"
        )
    if kind == "emissions":
        return (
            f"/api/v1/emissions?node={ids.enterprise}&period=day"
            f"&start={_iso(now - timedelta(days=7))}&end={_iso(now)}"
        )
    raise ValueError(f"unknown request kind {kind!r}")


@dataclass
class Samples:
    """Latencies of the answered requests per kind, and the failures."""

    ms: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)

    def add(self, kind: str, ms: float) -> None:
        self.ms.setdefault(kind, []).append(ms)

    def fail(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(what)

    def all_ms(self) -> list[float]:
        return [v for values in self.ms.values() for v in values]

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.ms.values()) + self.errors


Pick = Callable[[random.Random], tuple[str, str, dict[str, str]]]


async def run_clients(
    http: aiohttp.ClientSession,
    base: str,
    pick: Pick,
    *,
    clients: int,
    seconds: float,
    seed: int,
    think_s: float = 0.0,
) -> tuple[Samples, float]:
    """Run ``clients`` closed-loop tasks for ``seconds``; return the samples and the elapsed time.

    Each task waits a random ``0..2 x think_s`` (mean ``think_s``) after each answer, like a user
    reading a chart; with 0 it asks again at once.
    """
    samples = Samples()
    deadline = time.perf_counter() + seconds

    async def client(rng: random.Random) -> None:
        while time.perf_counter() < deadline:
            kind, path, headers = pick(rng)
            t0 = time.perf_counter()
            try:
                async with http.get(base + path, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as err:
                samples.fail(f"{kind}: {type(err).__name__}: {err}")
                continue
            elapsed_ms = (time.perf_counter() - t0) * 1000
            if 200 <= status < 300:
                samples.add(kind, elapsed_ms)
            else:
                samples.fail(f"{kind}: HTTP {status} for {path}")
            if think_s:
                await asyncio.sleep(rng.uniform(0, 2 * think_s))

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for index in range(clients):
            group.create_task(client(random.Random(seed * 100_003 + index)))
    return samples, time.perf_counter() - started


class CpuMeter:
    """CPU time of some processes between :meth:`start` and :meth:`stop`, in percent of one core."""

    def __init__(self, processes: list[psutil.Process]) -> None:
        self._processes = processes
        self._t0 = 0.0
        self._cpu0 = 0.0

    def _cpu_s(self) -> float:
        total = 0.0
        for proc in self._processes:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue  # a backend that went away: its time is lost, the others still count
            total += times.user + times.system
        return total

    def start(self) -> None:
        self._t0, self._cpu0 = time.perf_counter(), self._cpu_s()

    def stop(self) -> float:
        return round(100 * (self._cpu_s() - self._cpu0) / (time.perf_counter() - self._t0), 1)


async def wait_healthy(base: str, proc: asyncio.subprocess.Process, log: Path) -> float:
    """Wait until the server answers ``/api/v1/health`` with 200; return how long it took."""
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.perf_counter() - t0 < STARTUP_TIMEOUT_S:
            if proc.returncode is not None:
                text = await asyncio.to_thread(log.read_text, encoding="utf-8", errors="replace")
                tail = text[-3000:]
                raise SystemExit(f"scada run exited with code {proc.returncode}:\n{tail}")
            try:
                async with http.get(f"{base}/api/v1/health") as response:
                    if response.status == 200:
                        return time.perf_counter() - t0
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.25)
    raise SystemExit(f"scada run did not answer /api/v1/health within {STARTUP_TIMEOUT_S:.0f} s")


async def check_tenancy(
    http: aiohttp.ClientSession,
    base: str,
    ids: list[TenantIds],
    headers: list[dict[str, str]],
    rng: random.Random,
) -> tuple[int, int]:
    """Return (checks, leaks): another tenant's ids must answer 404, the owner's 200 with data."""
    checks = leaks = 0
    for kind in KINDS:
        for _ in range(CROSS_TENANT_CHECKS_PER_KIND if len(ids) > 1 else 0):
            caller, owner = rng.sample(range(len(ids)), 2)
            async with http.get(base + request_path(kind, ids[owner]), headers=headers[caller]) as response:
                await response.read()
                checks += 1
                leaks += response.status != 404
        async with http.get(base + request_path(kind, ids[0]), headers=headers[0]) as response:
            body = await response.json()
            if response.status != 200:
                raise SystemExit(f"{kind} for its own tenant answered {response.status}: {body}")
            empty = (
                (kind == "latest" and body.get("value") is None)
                or (kind == "history" and not body.get("readings"))
                or (kind == "emissions" and not body.get("total", {}).get("total_t"))
            )
            if empty:
                raise SystemExit(f"{kind} for its own tenant answered without data: {body}")
    return checks, leaks


def summary(samples: Samples, elapsed_s: float) -> dict[str, Any]:
    """Return the count, errors, rate and percentiles of one phase."""
    values = samples.all_ms()
    if not values:
        raise SystemExit(f"no request answered; errors: {samples.error_examples}")
    return {
        "requests": samples.count,
        "errors": samples.errors,
        "requests_per_s": round(samples.count / elapsed_s, 1),
        "p50_ms": round(percentile(values, 50), 2),
        "p95_ms": round(percentile(values, 95), 2),
        "p99_ms": round(percentile(values, 99), 2),
    }


async def measure(
    args: argparse.Namespace,
    base: str,
    ids: list[TenantIds],
    secret: str,
    server: psutil.Process,
    db_url: str,
) -> dict[str, Any]:
    """Mint the tenants' tokens and run the phases (see the module docstring); return the figures."""
    signer = TokenSigner(secret.encode())
    headers = [
        {
            "Authorization": "Bearer "
            + signer.issue(
                Principal(
                    tenant=t.tenant,
                    subject="bench",
                    kind=PrincipalKind.USER,
                    grants=(Grant(t.enterprise, Role.VIEWER),),
                    tenant_nodes=frozenset({t.enterprise}),
                )
            )
        }
        for t in ids
    ]

    def mix(rng: random.Random) -> tuple[str, str, dict[str, str]]:
        index = rng.randrange(len(ids))
        kind = rng.choice(KINDS)
        return kind, request_path(kind, ids[index]), headers[index]

    def only(kind: str) -> Pick:
        def pick(rng: random.Random) -> tuple[str, str, dict[str, str]]:
            index = rng.randrange(len(ids))
            return kind, request_path(kind, ids[index]), headers[index]

        return pick

    def health(_rng: random.Random) -> tuple[str, str, dict[str, str]]:
        return "health", "/api/v1/health", {}

    think_s = args.think_ms / 1000
    connector = aiohttp.TCPConnector(limit=args.clients)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    figures: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        checks, leaks = await check_tenancy(http, base, ids, headers, random.Random(args.seed))
        figures.update(cross_tenant_checks=checks, cross_tenant_leaks=leaks)
        for kind in KINDS:
            alone, _ = await run_clients(
                http, base, only(kind), clients=1, seconds=args.serial_seconds, seed=args.seed
            )
            figures[f"unloaded_{kind}_p50_ms"] = round(statistics.median(alone.all_ms()), 2)
        await run_clients(
            http, base, mix, clients=args.clients, seconds=WARMUP_S, seed=args.seed + 1, think_s=think_s
        )
        conn = await asyncpg.connect(db_url, timeout=10)
        try:
            backends = await conn.fetch(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        meters = {
            "server": CpuMeter([server, *server.children(recursive=True)]),
            "db": CpuMeter([psutil.Process(r["pid"]) for r in backends]),
            "client": CpuMeter([psutil.Process()]),
        }
        for meter in meters.values():
            meter.start()
        psutil.cpu_percent(None)  # machine-wide, from here: other work on the machine shows up in it
        load, elapsed_s = await run_clients(
            http, base, mix, clients=args.clients, seconds=args.seconds, seed=args.seed + 2, think_s=think_s
        )
        cpu = {name: meter.stop() for name, meter in meters.items()}
        machine_cpu = psutil.cpu_percent(None) * (psutil.cpu_count() or 1)
        for meter in meters.values():
            meter.start()
        reference, health_elapsed_s = await run_clients(
            http,
            base,
            health,
            clients=args.clients,
            seconds=args.health_seconds,
            seed=args.seed + 3,
            think_s=think_s,
        )
        health_cpu = meters["server"].stop()
    figures |= summary(load, elapsed_s)
    for kind in KINDS:
        values = load.ms.get(kind, [])
        figures[f"{kind}_requests"] = len(values)
        figures[f"{kind}_p50_ms"] = round(percentile(values, 50), 2) if values else None
        figures[f"{kind}_p95_ms"] = round(percentile(values, 95), 2) if values else None
    figures |= {
        "server_cpu_percent": cpu["server"],
        "db_cpu_percent": cpu["db"],
        "db_backends": len(backends),
        "client_cpu_percent": cpu["client"],
        "machine_cpu_percent": round(machine_cpu, 1),
        "machine_cores": psutil.cpu_count(),
        "error_examples": load.error_examples,
    }
    ref = summary(reference, health_elapsed_s)
    figures |= {
        "health_requests": ref["requests"],
        "health_errors": ref["errors"],
        "health_requests_per_s": ref["requests_per_s"],
        "health_p50_ms": ref["p50_ms"],
        "health_p95_ms": ref["p95_ms"],
        "health_server_cpu_percent": health_cpu,
        "p95_over_health": round(figures["p95_ms"] / ref["p95_ms"], 2),
    }
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=1000, help="tenants (one enterprise and meter each)")
    parser.add_argument("--clients", type=int, default=200, help="concurrent closed-loop clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of the measured mix")
    parser.add_argument("--health-seconds", type=float, default=10.0, help="duration of the health reference")
    parser.add_argument("--serial-seconds", type=float, default=2.0, help="one-client phase per request kind")
    parser.add_argument(
        "--think-ms", type=float, default=0.0, help="mean pause of each client between requests (0: none)"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if min(args.clients, args.seconds, args.health_seconds, args.serial_seconds) <= 0 or args.think_ms < 0:
        parser.error("--clients and the durations must be positive, --think-ms at least 0")
    ids = tenant_ids(args.tenants)
    t_start = time.perf_counter()
    secret = secrets.token_hex(32)
    workdir = Path(tempfile.mkdtemp(prefix="scada-bench-api-"))
    site = workdir / "site.yaml"
    site.write_text(site_yaml(ids), encoding="utf-8")
    scada = str(Path(sys.executable).with_name("scada"))
    check = await asyncio.create_subprocess_exec(
        scada, "check-config", str(site), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await check.communicate()
    if check.returncode != 0:
        raise SystemExit(f"scada check-config failed: {out.decode()}")
    print(out.decode().strip().replace(str(site), "site.yaml"))
    db_name, db_url = await create_scratch_database("bench_api")
    prefix = f"{db_name.replace('_', '-')}:"
    http_port = free_port()
    env = {
        **os.environ,
        "SCADA_DB_URL": db_url,
        "SCADA_REDIS_URL": BENCH_REDIS_URL,
        "SCADA_STREAM_PREFIX": prefix,
        "SCADA_HTTP_HOST": "127.0.0.1",
        "SCADA_HTTP_PORT": str(http_port),
        "SCADA_SECRET_KEY": secret,
        "SCADA_DATA_DIR": str(workdir / "data"),
        "SCADA_LOG_LEVEL": "WARNING",
    }
    base = f"http://127.0.0.1:{http_port}"
    log = workdir / "server.log"
    proc: asyncio.subprocess.Process | None = None
    try:
        with log.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                scada, "run", "-c", str(site), "--role", "api", env=env, stdout=log_file, stderr=log_file
            )
        startup_s = await wait_healthy(base, proc, log)
        seeded = await seed(db_url, ids, now=datetime.now(UTC), seed=args.seed)
        print(
            f"server up in {startup_s:.1f} s; seeded {seeded['readings_rows']:,} readings and "
            f"{seeded['ledger_rows']:,} ledger rows in {seeded['seed_s']} s"
        )
        figures = await measure(args, base, ids, secret, psutil.Process(proc.pid), db_url)
    finally:
        if proc is not None:
            await stop_process(proc, timeout_s=20)
        await drop_scratch(db_name, prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    pause = f", {args.think_ms:g} ms mean think time" if args.think_ms else ", no think time"
    print(f"{args.clients} clients, {args.tenants} tenants, {args.seconds:g} s closed loop{pause}")
    print(f"{'request':10s} {'count':>8s} {'p50 ms':>9s} {'p95 ms':>9s} {'alone ms':>9s}")
    for kind in KINDS:
        row = (figures[f"{kind}_{k}"] for k in ("requests", "p50_ms", "p95_ms"))
        print("{:10s} {:8d} {:9.1f} {:9.1f}".format(kind, *row), f"{figures[f'unloaded_{kind}_p50_ms']:9.2f}")
    for name, key in (("all", ""), ("health", "health_")):
        row = (figures[f"{key}{k}"] for k in ("requests", "p50_ms", "p95_ms"))
        print("{:10s} {:8d} {:9.1f} {:9.1f}".format(name, *row))
    verdict = "met" if figures["p95_ms"] < TARGET_P95_MS else "missed"
    print(
        f"{figures['requests_per_s']} requests/s ({figures['errors']} errors), health "
        f"{figures['health_requests_per_s']} requests/s; CPU: server {figures['server_cpu_percent']} %, "
        f"PostgreSQL {figures['db_cpu_percent']} %, client {figures['client_cpu_percent']} %, "
        f"machine {figures['machine_cpu_percent']} % of {figures['machine_cores'] * 100} %; "
        f"p95 target {TARGET_P95_MS:g} ms {verdict}"
    )
    result = {
        "tenants": args.tenants,
        "clients": args.clients,
        "seconds": args.seconds,
        "think_ms": args.think_ms,
        **{k: v for k, v in figures.items() if k != "error_examples"},
        "target_p95_ms": TARGET_P95_MS,
        "startup_s": round(startup_s, 1),
        **seeded,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    if figures["error_examples"]:
        print("errors, e.g.: " + "; ".join(figures["error_examples"]))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
