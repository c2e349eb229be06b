"""Role scaling: ingest throughput with 1 and 2 gateway processes, and with 1 and 2 historian processes.

A generated fleet of ``--devices`` Modbus TCP meters (5 float32 points each, every ``--period-s``)
served by ``python -m simulators.modbus_scale`` in its own process, and ``scada run`` processes with
one role each on a scratch database and a Redis key prefix of their own (loopback only). Four
phases, in this order:

1. ``gateway_1``: one gateway (``SCADA_GATEWAY_SHARD=0/1``) polls the whole fleet. No historian
   runs, so the gateways have the cores to themselves. After the sessions are online and
   ``--warmup-s`` has passed, the readings entering the ``readings`` stream are counted over
   ``--window-s`` (the gateways' ``scada_sink_sent_readings_total``; the fleet's demand is
   devices x 5 / period; also counted: readings polled, and shed by the gateway's bounded buffer).
   What they publish stays in the stream: the backlog of phase 2. The gateways keep publishing
   after the window until ``--backlog-readings`` are in the stream (at most ``--max-fill-s``).
2. ``historian_1``: the gateway stopped, one historian process (``SCADA_HISTORIAN_CONSUMERS``
   consumers in the group ``historian``) drains that backlog. Readings/s stored are counted in the
   ``readings`` table (``count(*)`` at both ends of the window), over ``--window-s`` or until the
   backlog is nearly gone, after ``--drain-warmup-s``. A backlog keeps the historian busy all the
   time, which a live fleet on these cores (that also needs them) cannot promise.
3. ``gateway_2``: the stream and the tables emptied, two gateways (``0/2`` and ``1/2``).
4. ``historian_2``: two historian processes in the same consumer group drain the new backlog.

Each phase reports the CPU of every process (100 = one core): the role processes, the simulator,
Redis, the PostgreSQL backends of the scratch database and PostgreSQL as a whole (other work on the
machine shows there too). The reference in the same run is phase 1 (for 3) and phase 2 (for 4):
``gateway_scale_ratio`` = ``gateway_2_rps / gateway_1_rps``, ``historian_scale_ratio`` likewise. On
a 2-core machine a ratio near 1 says the cores are full, not that the role does not scale: the CPU
figures show where the time went.

Usage::

    .venv/bin/python bench/scale.py [--devices 10000] [--period-s 1.0] [--window-s 20]
                                    [--backlog-readings 2500000] [--historian-consumers 2]

Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from _fleet import (
    BENCH_REDIS_URL,
    HIERARCHY_YAML,
    UNITS_PER_PORT,
    count_stream_readings,
    meter_devices_yaml,
)
from _procs import (
    Cluster,
    CpuMeter,
    RoleProcess,
    Samples,
    install_sigterm,
    log_levels,
    log_lines,
    metric_sum,
    postgres_backends,
    processes_named,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scada.settings import Settings

POINTS_PER_METER = 5
REGISTERS = 2 * POINTS_PER_METER
ONLINE_WAIT_S = 180.0
SHARED_PROCESSES = ("simulator", "redis", "postgres_db", "postgres_all")
DRAIN_DONE_FRACTION = 0.03
"""A historian window ends early once the backlog is down to this share of what it was at the start."""


def site_yaml(devices: int, period_s: float, ports: list[int]) -> str:
    """Return the site: ``devices`` meters with the scale simulator's first five float32 channels."""
    return f"""{HIERARCHY_YAML}
templates:
  meter:
    points:
      - {{key: voltage_v, kind: voltage, unit: V, modbus: {{address: 0, type: float32}}}}
      - {{key: current_a, kind: current, unit: A, modbus: {{address: 2, type: float32}}}}
      - {{key: active_power_kw, kind: power, unit: kW, carrier: electricity,
          modbus: {{address: 4, type: float32}}}}
      - {{key: frequency_hz, kind: frequency, unit: Hz, modbus: {{address: 6, type: float32}}}}
      - {{key: reactive_power_kvar, kind: power, unit: kvar, modbus: {{address: 8, type: float32}}}}
devices:
{meter_devices_yaml(devices, period_s, ports)}
"""


def pct(cpu_s: float, seconds: float) -> float:
    return round(100.0 * cpu_s / seconds, 1)


class Bench:
    """The phases of one run, sharing one cluster, one simulator and one CPU meter."""

    def __init__(self, args: argparse.Namespace, cluster: Cluster) -> None:
        self.args = args
        self.cluster = cluster
        self.cpu = CpuMeter()
        self.readings_key = f"{cluster.prefix}readings"
        self.redis = aioredis.Redis.from_url(BENCH_REDIS_URL, socket_timeout=30, socket_connect_timeout=10)

    async def reset(self) -> None:
        """Empty the readings stream (its consumer groups go with it) and the readings tables."""
        await self.redis.delete(self.readings_key)
        conn = await asyncpg.connect(self.cluster.db_url, timeout=10)
        try:
            await conn.execute("TRUNCATE readings, readings_1m, readings_15m, readings_1h")
        finally:
            await conn.close()

    async def count_rows(self) -> tuple[float, int]:
        """Return (monotonic time the count's snapshot was taken, rows in ``readings``)."""
        conn = await asyncpg.connect(self.cluster.db_url, timeout=10)
        try:
            await conn.execute("SET max_parallel_workers_per_gather = 0")  # leave the cores to the historian
            taken = time.monotonic()
            rows = await conn.fetchval("SELECT count(*) FROM readings", timeout=120)
        finally:
            await conn.close()
        return taken, int(rows)

    async def backlog_entries(self) -> int | None:
        """Entries of the readings stream the historian group has not acknowledged (lag + pending).

        None when Redis cannot tell the lag.
        """
        for group in await self.redis.xinfo_groups(self.readings_key):
            if group["name"] in ("historian", b"historian"):
                lag = group.get("lag")
                return None if lag is None else int(lag) + int(group["pending"])
        return None

    async def stream_readings(self) -> int:
        """Readings held in the readings stream now (entries' row counts, read with XRANGE)."""
        return await count_stream_readings(self.redis, self.readings_key)

    def cpu_of(
        self, before: dict[str, float], after: dict[str, float], seconds: float, roles: list[RoleProcess]
    ) -> dict[str, float]:
        """CPU % of this phase's role processes and of the shared processes (simulator, Redis, PostgreSQL)."""
        names = [r.name for r in roles] + [n for n in SHARED_PROCESSES if n in after]
        return {name: pct(after[name] - before.get(name, 0.0), seconds) for name in names}

    async def scrape_all(self, roles: list[RoleProcess]) -> list[Samples]:
        return list(await asyncio.gather(*(self.cluster.scrape(r) for r in roles)))

    async def gateway_phase(self, count: int) -> dict[str, Any]:
        args, cluster = self.args, self.cluster
        await self.reset()
        gateways = []
        for index in range(count):
            role = await cluster.start(
                f"gateway-{index}", ["gateway"], {"SCADA_GATEWAY_SHARD": f"{index}/{count}"}
            )
            gateways.append(role)
            self.cpu.track(role.name, [role.ps])
        deadline = time.monotonic() + ONLINE_WAIT_S
        online = 0
        while time.monotonic() < deadline:
            samples = await self.scrape_all(gateways)
            online = int(sum(metric_sum(s, "scada_devices", state="online") for s in samples))
            if online >= args.devices:
                break
            await asyncio.sleep(2.0)
        print(
            f"  gateway x{count}: {online:,} of {args.devices:,} sessions online; warm-up {args.warmup_s} s"
        )
        await asyncio.sleep(args.warmup_s)
        before, cpu0, t0 = await self.scrape_all(gateways), self.cpu.cpu_s(), time.monotonic()
        load0 = os.getloadavg()[0]
        await asyncio.sleep(args.window_s)
        after, cpu1, t1 = await self.scrape_all(gateways), self.cpu.cpu_s(), time.monotonic()
        load1 = os.getloadavg()[0]
        seconds = t1 - t0

        def delta(name: str, **labels: str) -> float:
            return sum(
                metric_sum(a, name, **labels) - metric_sum(b, name, **labels)
                for a, b in zip(after, before, strict=True)
            )

        sent = delta("scada_sink_sent_readings_total")
        polls_ok = delta("scada_device_polls_total", result="ok")
        per_gateway = [
            round(
                (
                    metric_sum(a, "scada_sink_sent_readings_total")
                    - metric_sum(b, "scada_sink_sent_readings_total")
                )
                / seconds
            )
            for a, b in zip(after, before, strict=True)
        ]
        # Keep the fleet publishing until the stream holds the historian phase's backlog.
        fill_deadline = time.monotonic() + args.max_fill_s
        while time.monotonic() < fill_deadline:
            total = sum(
                metric_sum(a, "scada_sink_sent_readings_total") for a in await self.scrape_all(gateways)
            )
            if total >= args.backlog_readings:
                break
            await asyncio.sleep(5.0)
        for role in gateways:
            await cluster.stop(role.name)
        info = await self.redis.info("memory")
        result = {
            "rps": round(sent / seconds),
            "demand_rps": round(args.devices * POINTS_PER_METER / args.period_s),
            "per_gateway_rps": per_gateway,
            "polled_rps": round(polls_ok * POINTS_PER_METER / seconds),
            "shed_rps": round(delta("scada_sink_shed_readings_total") / seconds),
            "polls_per_s": round(polls_ok / seconds),
            "polls_failed": int(delta("scada_device_polls_total", result="failed")),
            "overruns": int(delta("scada_device_overruns_total")),
            "online": online,
            "cpu_percent": self.cpu_of(cpu0, cpu1, seconds, gateways),
            "loadavg_1m": [round(load0, 2), round(load1, 2)],
            "window_s": round(seconds, 1),
            "redis_used_mb": round(int(info["used_memory"]) / 2**20),
        }
        print(f"  gateway x{count}: {json.dumps(result)}")
        return result

    async def historian_phase(self, count: int) -> dict[str, Any]:
        args, cluster = self.args, self.cluster
        backlog_entries = int(await self.redis.xlen(self.readings_key))
        backlog_readings = await self.stream_readings()
        # The historians create their group at the stream's end ("$") and wait idle until every one
        # is up; then the group is moved to the start, so all of them drain the backlog together.
        await self.redis.xgroup_create(self.readings_key, "historian", id="$")
        historians = []
        for index in range(count):
            role = await cluster.start(f"historian-{index}", ["historian"])
            historians.append(role)
            self.cpu.track(role.name, [role.ps])
        await self.redis.xgroup_setid(self.readings_key, "historian", "0", entries_read=0)
        await asyncio.sleep(args.drain_warmup_s)
        self.cpu.track("postgres_db", await postgres_backends(cluster.db_url))
        start_backlog = await self.backlog_entries()
        cpu0 = self.cpu.cpu_s()
        t0, rows0 = await self.count_rows()
        load0 = os.getloadavg()[0]
        ended_by = "window"
        while time.monotonic() - t0 < args.window_s:
            await asyncio.sleep(1.0)
            left = await self.backlog_entries()
            if start_backlog is not None and left is not None and left <= DRAIN_DONE_FRACTION * start_backlog:
                ended_by = "backlog drained"
                break
        cpu1 = self.cpu.cpu_s()
        t1, rows1 = await self.count_rows()
        load1 = os.getloadavg()[0]
        seconds = t1 - t0
        samples = await self.scrape_all(historians)
        for role in historians:
            await cluster.stop(role.name)
        result = {
            "rps": round((rows1 - rows0) / seconds),
            "rows_in_window": rows1 - rows0,
            "backlog_readings": backlog_readings,
            "backlog_entries": backlog_entries,
            "backlog_entries_at_window": start_backlog,
            "window_ended_by": ended_by,
            "inserted_total": int(
                sum(metric_sum(s, "scada_historian_inserted_readings_total") for s in samples)
            ),
            "batch_failures": int(
                sum(metric_sum(s, "scada_historian_batch_failures_total") for s in samples)
            ),
            "cpu_percent": self.cpu_of(cpu0, cpu1, seconds, historians),
            "loadavg_1m": [round(load0, 2), round(load1, 2)],
            "window_s": round(seconds, 1),
        }
        if result["window_s"] < args.window_s / 2:
            print(f"  note: the backlog lasted only {seconds:.1f} s; raise --window-s of the gateway phases")
        print(f"  historian x{count}: {json.dumps(result)}")
        return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    placeholder = site_yaml(1, args.period_s, [1])  # the real site needs the simulator's ports first
    async with Cluster("scale", placeholder, tenant="bench", env=args.env) as cluster:
        sim = await cluster.start_helper(
            "simulator",
            [
                sys.executable,
                *("-m", "simulators.modbus_scale", "--devices", str(args.devices)),
                *("--registers", str(REGISTERS), "--units-per-port", str(UNITS_PER_PORT)),
            ],
        )
        ports = [int(a.rsplit(":", 1)[1]) for a in sim.ready_line.split(" on ", 1)[1].split()]
        cluster.site_path.write_text(site_yaml(args.devices, args.period_s, ports), "utf-8")
        bench = Bench(args, cluster)
        bench.cpu.track("simulator", [sim.ps])
        bench.cpu.track("redis", processes_named("redis-server"))
        bench.cpu.track("postgres_all", processes_named("postgres"))
        try:
            # One API process first: migrations and the catalog sync of the fleet, once.
            await cluster.start("setup", ["api"])
            await cluster.stop("setup")
            phases = {}
            for count in (1, 2):
                print(f"phase gateway_{count}", flush=True)
                phases[f"gateway_{count}"] = await bench.gateway_phase(count)
                print(f"phase historian_{count}", flush=True)
                phases[f"historian_{count}"] = await bench.historian_phase(count)
            logs = dict(cluster.exited)
        finally:
            await bench.redis.aclose()
        errors = {name: log_levels(path) for name, path in logs.items()}
        for name, path in logs.items():
            for line in log_lines(path, "ERROR") + log_lines(path, "WARNING", limit=3):
                print(f"  {name}: {line}")
    return {"phases": phases, "log_levels": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000, help="Modbus meters (5 points each)")
    parser.add_argument("--period-s", type=float, default=1.0, help="poll period of every meter")
    parser.add_argument(
        "--warmup-s", type=float, default=10.0, help="gateway phases: settle before the window"
    )
    parser.add_argument("--window-s", type=float, default=20.0, help="measured window of each phase")
    parser.add_argument(
        "--backlog-readings", type=int, default=2_500_000, help="gateway phases: publish at least this many"
    )
    parser.add_argument(
        "--max-fill-s", type=float, default=120.0, help="longest extra publishing for the backlog"
    )
    parser.add_argument("--drain-warmup-s", type=float, default=5.0, help="historian phases: settle first")
    parser.add_argument(
        "--historian-consumers",
        type=int,
        default=None,
        help="SCADA_HISTORIAN_CONSUMERS (default: the server's)",
    )
    args = parser.parse_args()
    # Every process upserts the whole catalog at start-up (10,000 devices, 50,000 points); with the
    # default 5 s per-call service timeout a gateway of the first run failed to start on this machine.
    args.env = {"SCADA_SERVICE_TIMEOUT_S": "30"}
    if args.historian_consumers is not None:
        args.env["SCADA_HISTORIAN_CONSUMERS"] = str(args.historian_consumers)
    out = asyncio.run(_main(args))
    print("RESULT " + json.dumps(out))


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    install_sigterm()
    found = await run(args)
    phases = found["phases"]
    g1, g2, h1, h2 = (phases[k] for k in ("gateway_1", "gateway_2", "historian_1", "historian_2"))
    print(
        f"gateway    1 process {g1['rps']:>9,} readings/s   2 processes {g2['rps']:>9,}"
        f"   (demand {g1['demand_rps']:,}/s)"
    )
    print(f"historian  1 process {h1['rps']:>9,} readings/s   2 processes {h2['rps']:>9,}")
    return {
        "devices": args.devices,
        "points": args.devices * POINTS_PER_METER,
        "poll_period_s": args.period_s,
        "demand_rps": g1["demand_rps"],
        "historian_1_rps": h1["rps"],
        "historian_2_rps": h2["rps"],
        "historian_scale_ratio": round(h2["rps"] / h1["rps"], 2) if h1["rps"] else None,
        "gateway_1_rps": g1["rps"],
        "gateway_2_rps": g2["rps"],
        "gateway_scale_ratio": round(g2["rps"] / g1["rps"], 2) if g1["rps"] else None,
        "gateway_1_cpu_percent": g1["cpu_percent"],
        "gateway_2_cpu_percent": g2["cpu_percent"],
        "historian_1_cpu_percent": h1["cpu_percent"],
        "historian_2_cpu_percent": h2["cpu_percent"],
        "gateway_polled_scale_ratio": round(g2["polled_rps"] / g1["polled_rps"], 2)
        if g1["polled_rps"]
        else None,
        "gateway_1_polled_rps": g1["polled_rps"],
        "gateway_2_polled_rps": g2["polled_rps"],
        "gateway_shed_rps": [g1["shed_rps"], g2["shed_rps"]],
        "gateway_overruns": [g1["overruns"], g2["overruns"]],
        "gateway_polls_failed": [g1["polls_failed"], g2["polls_failed"]],
        "historian_window_ended_by": [h1["window_ended_by"], h2["window_ended_by"]],
        "historian_consumers_per_process": int(
            args.env.get("SCADA_HISTORIAN_CONSUMERS", Settings.model_fields["historian_consumers"].default)
        ),
        "loadavg_1m": {k: v["loadavg_1m"] for k, v in phases.items()},
        "log_levels": found["log_levels"],
        "cores": os.cpu_count(),
        "window_s": args.window_s,
    }


if __name__ == "__main__":
    main()
