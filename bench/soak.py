"""Soak: the example plant at N x scale for a long run, every role in its own process; memory and lag.

The site is generated from ``examples/plant.yaml``: the park with its enterprises, workshops and
devices is cloned ``--scale`` times (copy 1 keeps the example's ids; copy k gets ids ending in
``-xkk``, every device its own free Modbus port or unit, an OPC UA endpoint per copy, MQTT topics
under a prefix of this run, seeds shifted), so ``--scale 10`` is 410 devices. The control section
stays on copy 1. Processes, on a scratch database and a Redis key prefix of their own, loopback only:
``scada simulate`` (the plant's simulators), and ``scada run --role`` ``api``, ``historian``,
``analytics`` and ``gateway``, one process each.

Every ``--sample-s`` (10 s) the bench records each process's RSS and CPU, the readings stream's
length and the lag and pending entries of every consumer group (``XINFO GROUPS``), and the
gateway's and historian's counters (``/metrics``). After ``--duration-s`` the gateway stops first
(its sink flushes), the historian drains, and the bench counts:

- ``rss_growth_mb_per_h`` per role: the slope of a least-squares line through the RSS samples,
  the first 20 % of the run (start-up, caches, detector warm-up) left out; the RESULT's
  ``rss_growth_mb_per_h`` is the largest over the roles. The simulator's is the reference of the
  same run (a process whose memory should be flat too).
- ``stream_lag_max``: the largest ``lag`` (entries not yet delivered) of any readings consumer
  group over the samples; pending (delivered, not acknowledged) separately.
- ``errors``: WARNING / ERROR / CRITICAL log lines and tracebacks per process, dead-letter entries,
  polls failed, readings shed, and the share of stored readings of bad and of uncertain quality.
- readings produced (every reading of every entry in the stream, counted with ``XRANGE``) against
  stored (``count(*)`` of ``readings``).

Usage::

    .venv/bin/python bench/soak.py [--scale 10] [--duration-s 3600] [--sample-s 10]

Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import re
import secrets
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import yaml
from _fleet import BENCH_REDIS_URL, count_stream_readings, free_port
from _procs import (
    SCADA,
    Cluster,
    CpuMeter,
    RoleProcess,
    install_sigterm,
    log_levels,
    log_lines,
    metric_sum,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scada.config import load_site

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plant.yaml"
ROLES = ("api", "historian", "analytics", "gateway")
"""Start order: the API first (migrations, catalog), the gateway last (its readings find every consumer)."""
WARMUP_FRACTION = 0.2
DRAIN_WAIT_S = 120.0
GROUPS = ("historian", "ledger", "anomaly")


# --------------------------------------------------------------------------------------------------
# The site


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _rename_refs(text: str, renames: Mapping[str, str]) -> str:
    """Rename device ids inside OPC UA node ids (``ns=2;s=<device>.<key>`` or ``ns=2;s=<device>``)."""
    return re.sub(r"(?<=s=)([^.;]+)(?=\.|$)", lambda m: renames.get(m.group(1), m.group(1)), text)


def _clone_node(node: Mapping[str, Any], suffix: str, label: str, renamed: dict[str, str]) -> dict[str, Any]:
    """Copy a hierarchy node and its children with ``suffix`` on every id; record the renames."""
    out = dict(node)
    renamed[node["id"]] = out["id"] = node["id"] + suffix
    out["name"] = node["name"] + label
    if "children" in node:
        out["children"] = [_clone_node(child, suffix, label, renamed) for child in node["children"]]
    return out


def scaled_site(document: Mapping[str, Any], scale: int, topic_prefix: str) -> dict[str, Any]:
    """Return the example site with its park cloned ``scale`` times (see the module docstring)."""
    doc = copy.deepcopy(dict(document))
    (group,) = doc["hierarchy"]
    (park,) = group["children"]
    base_devices = doc["devices"]
    parks, devices = [], []
    taken: set[int] = set()

    def new_port() -> int:
        # free_port() may hand the same port out twice before anything binds it: keep them distinct.
        while (port := free_port()) in taken:
            pass
        taken.add(port)
        return port

    for k in range(scale):
        suffix = "" if k == 0 else f"-x{k + 1:02d}"
        label = "" if k == 0 else f" #{k + 1}"
        node_ids: dict[str, str] = {}

        parks.append(_clone_node(park, suffix, label, node_ids))
        device_ids = {d["id"]: d["id"] + suffix for d in base_devices}
        modbus_ports: dict[int, int] = {}
        opcua_port = new_port()
        for base in base_devices:
            device = copy.deepcopy(base)
            device["id"] = device_ids[base["id"]]
            device["name"] = base["name"] + label
            device["node"] = node_ids.get(base["node"], base["node"])
            if "modbus" in device:
                port = device["modbus"]["port"]
                if port not in modbus_ports:
                    modbus_ports[port] = new_port()
                device["modbus"]["port"] = modbus_ports[port]
            if "opcua" in device:
                endpoint = device["opcua"]["endpoint"]
                device["opcua"]["endpoint"] = re.sub(r":\d+/", f":{opcua_port}/", endpoint)
                for point in device["points"]:
                    spec = point["opcua"]
                    spec["node_id"] = _rename_refs(spec["node_id"], device_ids)
                    if "method" in spec:
                        spec["method"] = {
                            key: _rename_refs(v, device_ids) for key, v in spec["method"].items()
                        }
            if device.get("protocol") == "mqtt":
                device["mqtt"] = {
                    **device.get("mqtt", {}),
                    "telemetry_topic": f"{topic_prefix}/{{device}}/telemetry",
                    "command_topic": f"{topic_prefix}/{{device}}/command",
                    "response_topic": f"{topic_prefix}/{{device}}/command/response",
                }
            sim = device.get("simulation")
            if sim is not None:
                if "seed" in sim:
                    sim["seed"] = sim["seed"] + 1000 * k
                if "sums" in sim:
                    sim["sums"] = [device_ids.get(d, d) for d in sim["sums"]]
            devices.append(device)
    group["children"] = parks
    doc["devices"] = devices
    return doc


def site_yaml(scale: int, topic_prefix: str) -> str:
    """Return the scaled example plant as YAML (the server validates it when it loads it)."""
    document = yaml.safe_load(EXAMPLE.read_text("utf-8"))
    text = yaml.dump(
        scaled_site(document, scale, topic_prefix), Dumper=_NoAliasDumper, allow_unicode=True, sort_keys=False
    )
    return text


# --------------------------------------------------------------------------------------------------
# Sampling


class Soak:
    """One run: the cluster, its processes and the samples taken."""

    def __init__(self, args: argparse.Namespace, cluster: Cluster) -> None:
        self.args, self.cluster = args, cluster
        self.redis = aioredis.Redis.from_url(BENCH_REDIS_URL, socket_timeout=30, socket_connect_timeout=10)
        self.readings_key = f"{cluster.prefix}readings"
        self.deadletter_key = f"{cluster.prefix}deadletter"
        self.cpu = CpuMeter()
        self.rss: dict[str, list[tuple[float, float]]] = {}
        self.lag_max: dict[str, int] = dict.fromkeys(GROUPS, 0)
        self.pending_max: dict[str, int] = dict.fromkeys(GROUPS, 0)
        self.stream_length_max = 0
        self.timeline: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.bad_by_minute: list[dict[str, Any]] = []

    async def group_state(self) -> dict[str, tuple[int, int]]:
        """Return ``{group: (lag, pending)}`` of the readings stream's consumer groups."""
        out = {}
        for group in await self.redis.xinfo_groups(self.readings_key):
            name = group["name"].decode() if isinstance(group["name"], bytes) else str(group["name"])
            out[name] = (int(group.get("lag") or 0), int(group["pending"]))
        return out

    async def sample(self, procs: Mapping[str, Any]) -> None:
        """Record RSS, stream lag and the gateway's and historian's counters once."""
        now = time.monotonic() - self.t0
        for name, ps in procs.items():
            rss = CpuMeter.rss_mb(ps)
            if rss is not None:
                self.rss.setdefault(name, []).append((now, rss))
        groups = await self.group_state()
        for name, (lag, pending) in groups.items():
            self.lag_max[name] = max(self.lag_max.get(name, 0), lag)
            self.pending_max[name] = max(self.pending_max.get(name, 0), pending)
        self.stream_length_max = max(self.stream_length_max, int(await self.redis.xlen(self.readings_key)))
        gateway, historian = self.cluster.roles["gateway"], self.cluster.roles["historian"]
        g, h = await asyncio.gather(self.cluster.scrape(gateway), self.cluster.scrape(historian))
        self.timeline.append(
            {
                "t_s": round(now),
                "sent": int(metric_sum(g, "scada_sink_sent_readings_total")),
                "inserted": int(metric_sum(h, "scada_historian_inserted_readings_total")),
                "online": int(metric_sum(g, "scada_devices", state="online")),
                "lag": {k: v[0] for k, v in groups.items()},
            }
        )

    def growth_mb_per_h(self, duration_s: float) -> dict[str, float]:
        """Slope of RSS over time after the warm-up, in MB per hour, per process."""
        out = {}
        for name, points in self.rss.items():
            kept = [(t, r) for t, r in points if t >= WARMUP_FRACTION * duration_s]
            if len(kept) >= 3:
                slope, _ = statistics.linear_regression([t for t, _ in kept], [r for _, r in kept])
                out[name] = round(slope * 3600, 2)
        return out

    async def stream_readings(self) -> int:
        """Readings held in the readings stream (every entry's rows, read with XRANGE)."""
        return await count_stream_readings(self.redis, self.readings_key)

    async def stored(self) -> dict[str, int]:
        conn = await asyncpg.connect(self.cluster.db_url, timeout=10)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS total, count(*) FILTER (WHERE quality = 0) AS bad,"
                " count(*) FILTER (WHERE quality = 1) AS uncertain FROM readings",
                timeout=300,
            )
            # When the bad readings happened: one outage of many devices, or a steady trickle.
            by_minute = await conn.fetch(
                "SELECT date_trunc('minute', ts) AS minute, count(*) AS bad,"
                " count(DISTINCT p.device_id) AS devices"
                " FROM readings r JOIN points p ON p.id = r.point WHERE r.quality = 0"
                " GROUP BY 1 ORDER BY 1",
                timeout=300,
            )
        finally:
            await conn.close()
        assert row is not None
        self.bad_by_minute = [
            {"minute": r["minute"].strftime("%H:%M"), "bad": int(r["bad"]), "devices": int(r["devices"])}
            for r in by_minute
        ]
        return {"total": int(row["total"]), "bad": int(row["bad"]), "uncertain": int(row["uncertain"])}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    topic_prefix = f"bench-soak-{secrets.token_hex(4)}"
    text = site_yaml(args.scale, topic_prefix)
    async with Cluster("soak", text, tenant="suzhou-demo") as cluster:
        site = load_site(cluster.site_path)
        devices = len(site.devices)
        points = sum(len(d.points) for d in site.devices)
        tenant = site.tenants[0].id if site.tenants else site.site.id
        cluster.tenant = tenant
        print(
            f"site: {devices} devices, {points} points ({args.scale} x the example plant)"
            f" in {cluster.site_path}"
        )
        soak = Soak(args, cluster)
        try:
            return await soak_run(args, cluster, soak, devices, points)
        finally:
            await soak.redis.aclose()


async def soak_run(
    args: argparse.Namespace, cluster: Cluster, soak: Soak, devices: int, points: int
) -> dict[str, Any]:
    sim_env = {
        "SCADA_DATA_DIR": str(cluster.workdir / "data" / "simulator"),
        "SCADA_MQTT_URL": cluster.env(0, cluster.workdir, {})["SCADA_MQTT_URL"],
        "SCADA_LOG_LEVEL": "WARNING",
    }
    sim = await cluster.start_helper(
        "simulator", [SCADA, "simulate", "-c", str(cluster.site_path)], env=sim_env
    )
    roles: dict[str, RoleProcess] = {}
    for role in ROLES:
        roles[role] = await cluster.start(role, [role])
    procs = {**{name: r.ps for name, r in roles.items()}, "simulator": sim.ps}
    for name, ps in procs.items():
        soak.cpu.track(name, [ps])
    cpu0 = soak.cpu.cpu_s()
    soak.t0 = time.monotonic()
    print(
        f"all roles up; soaking for {args.duration_s:.0f} s, a sample every {args.sample_s:.0f} s", flush=True
    )
    next_report = soak.t0 + 60
    while (elapsed := time.monotonic() - soak.t0) < args.duration_s:
        await soak.sample(procs)
        if time.monotonic() >= next_report:
            last = soak.timeline[-1]
            rss = {k: round(v[-1][1]) for k, v in soak.rss.items()}
            print(
                f"  t={elapsed:5.0f} s  online {last['online']}  sent {last['sent']:,}"
                f"  stored {last['inserted']:,}"
                f"  lag {last['lag']}  rss MB {rss}",
                flush=True,
            )
            next_report += 60
        await asyncio.sleep(max(0.0, args.sample_s - (time.monotonic() - soak.t0 - elapsed)))
    duration = time.monotonic() - soak.t0
    cpu1 = soak.cpu.cpu_s()
    final_gateway = await cluster.scrape(roles["gateway"])
    rss_end = {name: round(v[-1][1], 1) for name, v in soak.rss.items()}
    # Stop the producer, let the historian drain, then count both sides.
    await cluster.stop("gateway")
    drained_in = None
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_WAIT_S:
        state = await soak.group_state()
        if state.get("historian", (1, 1)) == (0, 0):
            drained_in = round(time.monotonic() - started, 1)
            break
        await asyncio.sleep(1.0)
    produced = await soak.stream_readings()
    info: Any = await soak.redis.xinfo_stream(soak.readings_key)
    trimmed = int(info.get("entries-added", info["length"])) - int(info["length"])
    stored = await soak.stored()
    historian_metrics = await cluster.scrape(roles["historian"])
    deadletter = int(await soak.redis.xlen(soak.deadletter_key))
    for role in ("analytics", "historian", "api"):
        await cluster.stop(role)
    await cluster.stop_helper("simulator")
    logs = {path.stem.rsplit(".", 1)[0]: path for path in cluster.exited.values()}
    levels = {name: log_levels(path) for name, path in logs.items()}
    levels["simulator"] = log_levels(sim.log_path)
    first_messages = {
        name: log_lines(path, "ERROR") + log_lines(path, "WARNING")
        for name, path in {**logs, "simulator": sim.log_path}.items()
    }
    growth = soak.growth_mb_per_h(duration)
    role_growth = {k: v for k, v in growth.items() if k in ROLES}
    bad_share = stored["bad"] / stored["total"] if stored["total"] else None
    uncertain_share = stored["uncertain"] / stored["total"] if stored["total"] else None
    errors = {
        "log_levels": levels,
        "warning_lines": sum(v["WARNING"] for v in levels.values()),
        "error_lines": sum(v["ERROR"] + v["CRITICAL"] for v in levels.values()),
        "tracebacks": sum(v["tracebacks"] for v in levels.values()),
        "deadletter_entries": deadletter,
        "polls_failed": int(metric_sum(final_gateway, "scada_device_polls_total", result="failed")),
        "overruns": int(metric_sum(final_gateway, "scada_device_overruns_total")),
        "readings_shed": int(metric_sum(final_gateway, "scada_sink_shed_readings_total")),
        "historian_batch_failures": int(
            metric_sum(historian_metrics, "scada_historian_batch_failures_total")
        ),
        "bad_quality_share": round(bad_share, 5) if bad_share is not None else None,
        "bad_quality_by_minute_utc": soak.bad_by_minute,
        "uncertain_quality_share": round(uncertain_share, 5) if uncertain_share is not None else None,
    }
    return {
        "scale": args.scale,
        "devices": devices,
        "points": points,
        "duration_s": round(duration),
        "samples": len(soak.timeline),
        "rss_growth_mb_per_h": max(role_growth.values()) if role_growth else None,
        "rss_growth_mb_per_h_by_role": role_growth,
        "rss_growth_mb_per_h_simulator": growth.get("simulator"),
        "rss_mb_start": {name: round(v[0][1], 1) for name, v in soak.rss.items()},
        "rss_mb_end": rss_end,
        "cpu_percent": {k: round(100 * (cpu1[k] - cpu0.get(k, 0.0)) / duration, 1) for k in cpu1},
        "stream_lag_max": max(soak.lag_max.values()),
        "stream_lag_max_by_group": soak.lag_max,
        "stream_pending_max_by_group": soak.pending_max,
        "stream_length_max": soak.stream_length_max,
        "readings_produced": produced,
        "readings_stored": stored["total"],
        "stored_over_produced": round(stored["total"] / produced, 5) if produced else None,
        "stream_entries_trimmed": trimmed,
        "historian_drained_in_s": drained_in,
        "readings_per_s": round(produced / duration, 1),
        "errors": errors,
        "first_messages": first_messages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=10, help="copies of the example plant's park")
    parser.add_argument("--duration-s", type=float, default=3600.0, help="how long to soak")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    args = parser.parse_args()
    if args.scale < 1 or args.duration_s < 5 * args.sample_s:
        parser.error("need --scale >= 1 and --duration-s of at least 5 samples")
    result = asyncio.run(_main(args))
    messages = result.pop("first_messages")
    for name, lines in messages.items():
        for line in lines:
            print(f"  {name}: {line}")
    print(
        f"rss growth MB/h {result['rss_growth_mb_per_h_by_role']}"
        f" (simulator {result['rss_growth_mb_per_h_simulator']})"
    )
    print(f"rss MB at end   {result['rss_mb_end']}")
    print(
        f"readings        produced {result['readings_produced']:,}  stored {result['readings_stored']:,}"
        f"  lag max {result['stream_lag_max_by_group']}"
    )
    print("RESULT " + json.dumps(result))


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    install_sigterm()
    return await run(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
