"""OPC UA device sessions at scale: N sessions x M monitored items against a simulator process.

The simulator runs **in a separate process** (``python bench/_sessions_opcua.py --server ...``):
one :class:`simulators.opcua_server.OpcUaEndpoint` serving N devices of M Double variables each.
Every variable changes once per second, on the whole second, all at once (a "flat" physics whose
value is the current second plus the item's index), so each monitored item reports once per second.

The bench process is the server side: one :class:`protocols.opcua.driver.OpcUaDriver` (its own
OPC UA session and one subscription of M monitored items, publishing interval
``publishing_interval_ms``) and one real :class:`scada.sessions.DeviceSession` per device,
publishing into a counting sink (Redis is not what is measured here). Figures, over a
``duration_s`` window after every session is online:

- ``sessions_open``: sessions online at the end of the window;
- ``monitored_items``: distinct points that delivered at least one good reading in the window;
- ``readings_per_s``: good readings the sink received per second (ideal: N x M per second);
- ``poll_jitter_p99_ms``: p99 of the **update latency**, the time from the simulator writing the
  new value into its address space (the source timestamp it stamps, same machine clock) to the
  session handing the batch to the sink: the server's publishing cycle (up to one publishing
  interval), the socket, asyncua's decoding, the driver's queue and the session loop. The
  inter-arrival jitter of each item (|time between two updates - 1 s|) is reported as
  ``interarrival_jitter_p99_ms`` for comparison;
- ``rss_bytes_per_session``: (RSS after the ramp - RSS before the drivers were made) / N;
- ``cpu_percent`` / ``simulator_cpu_percent``: the bench and the simulator process over the
  window (100 = one core);
- ``batches_dropped``: batches a driver dropped because its session fell behind (drop-oldest).

Reference in the same run, before the N sessions exist: ``single_session_latency_p50_ms`` /
``single_session_latency_p99_ms``, one session with M items alone against the same simulator.

Usage: ``.venv/bin/python bench/_sessions_opcua.py [--sessions 50] [--items 20] [--seconds 20]``.
Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import statistics
import sys
import time
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import psutil
from _fleet import free_port, percentile, running_sessions, start_ready_process, stop_process

from protocols.opcua.config import OpcUaDeviceConfig, OpcUaPointConfig
from protocols.opcua.driver import OpcUaDriver, OpcUaPointSpec
from scada.model import AvailabilityEvent, PointId, Reading, make_point_id
from scada.runtime import Backoff, SystemClock
from scada.sessions import DeviceSession

THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parent.parent
PUBLISHING_INTERVAL_MS = 100.0
UPDATE_PERIOD_S = 1.0
REFERENCE_S = 5.0


def device_ids(sessions: int) -> list[str]:
    return [f"u{i:04d}" for i in range(sessions)]


def item_keys(items: int) -> list[str]:
    return [f"value_{j:03d}" for j in range(items)]


def node_id(device: str, key: str) -> str:
    return f"ns=2;s={device}.{key}"


# --------------------------------------------------------------------------------------------------
# The simulator process


async def run_server(args: argparse.Namespace) -> None:
    from simulators.opcua_server import OpcUaEndpoint, OpcUaSimPoint  # noqa: PLC0415
    from simulators.physics import DevicePhysics, SimulationParams  # noqa: PLC0415

    keys = item_keys(args.items)

    class EverySecondPhysics(DevicePhysics):
        """Every variable is the current whole second plus its index: changes once per second."""

        VARIABLES: ClassVar[tuple[str, ...]] = tuple(keys)

        def _compute(self, now: datetime, dt_h: float) -> None:
            del dt_h
            second = float(int(now.timestamp()))
            for index, key in enumerate(keys):
                self._set(key, second + index)

    start = datetime.now(UTC)
    devices = []
    for i, device in enumerate(device_ids(args.sessions)):
        physics = EverySecondPhysics(SimulationParams(), tz=ZoneInfo("UTC"), start=start, seed=i, name=device)
        points = [OpcUaSimPoint(key=key, node_id=node_id(device, key)) for key in keys]
        devices.append((device, physics, points))
    endpoint = OpcUaEndpoint(f"opc.tcp://127.0.0.1:{args.port}", devices)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await endpoint.start()
    print(f"OPCUA READY {endpoint}", flush=True)
    all_physics = [physics for _, physics, _ in devices]
    tick_task: asyncio.Task[None] = asyncio.create_task(_tick(endpoint, all_physics), name="tick")
    await stop.wait()
    tick_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await tick_task
    await endpoint.stop()


async def _tick(endpoint: Any, physics: list[Any]) -> None:
    """On every whole second: step every device and push the changed variables."""
    while True:
        await asyncio.sleep(UPDATE_PERIOD_S - time.time() % UPDATE_PERIOD_S)
        now = datetime.now(UTC)
        for device in physics:
            device.step(now)
        endpoint.refresh()


class Simulator:
    """The simulator subprocess, seen from the bench."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url
        self.ps = psutil.Process(proc.pid)


async def start_simulator(sessions: int, items: int) -> Simulator:
    argv = [sys.executable, str(THIS_FILE), "--server", f"--sessions={sessions}", f"--items={items}"]
    proc, ready = await start_ready_process(
        "the OPC UA simulator",
        [*argv, f"--port={free_port()}"],
        ready=b"OPCUA READY",
        timeout_s=60 + sessions * items / 500,
        cwd=REPO,
    )
    return Simulator(proc, ready.split()[-1].decode())


# --------------------------------------------------------------------------------------------------
# The server side


class LatencySink:
    """ReadingSink and EventSink: counts good readings, records update latency and inter-arrival jitter."""

    def __init__(self) -> None:
        self.good = 0
        self.events = 0
        self.latency_ms = array("d")
        self.interarrival_ms = array("d")
        self.points_seen: set[PointId] = set()
        self.recording = False
        self._last_arrival: dict[PointId, float] = {}

    async def publish(self, readings: Sequence[Reading]) -> None:
        if not readings:
            return
        now_wall = time.time()
        now_mono = time.monotonic()
        for reading in readings:
            if reading.value is None:
                continue
            self.good += 1
            last = self._last_arrival.get(reading.point)
            self._last_arrival[reading.point] = now_mono
            if not self.recording:
                continue
            self.points_seen.add(reading.point)
            self.latency_ms.append((now_wall - reading.ts.timestamp()) * 1000)
            if last is not None:
                self.interarrival_ms.append(abs(now_mono - last - UPDATE_PERIOD_S) * 1000)

    async def publish_event(self, event: AvailabilityEvent) -> None:
        self.events += 1


def make_driver(url: str, device: str, items: int, clock: SystemClock) -> tuple[OpcUaDriver, list[PointId]]:
    config = OpcUaDeviceConfig(endpoint=url, publishing_interval_ms=PUBLISHING_INTERVAL_MS, timeout_s=10.0)
    specs = [
        OpcUaPointSpec(
            point=make_point_id(device, key), config=OpcUaPointConfig(node_id=node_id(device, key))
        )
        for key in item_keys(items)
    ]
    return OpcUaDriver(device, config, specs, clock=clock), [s.point for s in specs]


def make_session(
    driver: OpcUaDriver, points: list[PointId], sink: LatencySink, clock: SystemClock
) -> DeviceSession:
    return DeviceSession(
        driver,
        points=points,
        sink=sink,
        events=sink,
        period_s=UPDATE_PERIOD_S,
        clock=clock,
        backoff=Backoff(initial_s=1.0, max_s=10.0),
        connect_timeout_s=30.0,
    )


async def single_session_reference(url: str, items: int, clock: SystemClock) -> list[float]:
    """Return the update latencies (ms) of one session alone, over REFERENCE_S seconds."""
    sink = LatencySink()
    driver, points = make_driver(url, device_ids(1)[0], items, clock)
    session = make_session(driver, points, sink, clock)
    task = asyncio.create_task(session.run(), name="reference-session")
    try:
        for _ in range(150):
            if session.available:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)
        sink.recording = True
        await asyncio.sleep(REFERENCE_S)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return list(sink.latency_ms) or [math.nan]


async def measure(
    sessions: int = 50, items_per_session: int = 20, duration_s: float = 20.0
) -> dict[str, object]:
    """Run the simulator in a subprocess and N sessions here; return the figures described at the top."""
    simulator = await start_simulator(sessions, items_per_session)
    try:
        return await _measure(simulator, sessions, items_per_session, duration_s)
    finally:
        await stop_process(simulator.proc)


async def _measure(simulator: Simulator, sessions: int, items: int, duration_s: float) -> dict[str, object]:
    me = psutil.Process()
    clock = SystemClock()
    reference = await single_session_reference(simulator.url, items, clock)

    sink = LatencySink()
    baseline_rss = me.memory_info().rss
    drivers: list[OpcUaDriver] = []
    session_list: list[DeviceSession] = []
    for device in device_ids(sessions):
        driver, points = make_driver(simulator.url, device, items, clock)
        drivers.append(driver)
        session_list.append(make_session(driver, points, sink, clock))
    async with running_sessions(session_list, max_wait_s=60 + sessions / 10) as ramp:
        await asyncio.sleep(2 * UPDATE_PERIOD_S)  # settle: every session past its first batches
        rss_after_ramp = me.memory_info().rss

        dropped_before = sum(d.dropped_batches for d in drivers)
        connects_before = sum(s.stats.connects for s in session_list)
        good_before = sink.good
        sink.recording = True
        me.cpu_percent()
        simulator.ps.cpu_percent()
        window_start = time.monotonic()
        await asyncio.sleep(duration_s)
        elapsed = time.monotonic() - window_start
        cpu = me.cpu_percent()
        simulator_cpu = simulator.ps.cpu_percent()
        sink.recording = False
        good = sink.good - good_before
        dropped = sum(d.dropped_batches for d in drivers) - dropped_before
        reconnects = sum(s.stats.connects for s in session_list) - connects_before
        sessions_open = sum(1 for s in session_list if s.available)

    latency = list(sink.latency_ms) or [math.nan]
    interarrival = list(sink.interarrival_ms) or [math.nan]
    return {
        "protocol": "opcua",
        "sessions": sessions,
        "items_per_session": items,
        "publishing_interval_ms": PUBLISHING_INTERVAL_MS,
        "update_period_s": UPDATE_PERIOD_S,
        "seconds": duration_s,
        "ramp_s": round(ramp.seconds, 1),
        "online_after_ramp": ramp.online,
        "sessions_open": sessions_open,
        "monitored_items": len(sink.points_seen),
        "readings_per_s": round(good / elapsed, 1),
        "readings_per_s_ideal": round(sessions * items / UPDATE_PERIOD_S, 1),
        "poll_jitter_p99_ms": round(percentile(latency, 99), 1),
        "poll_jitter_measures": "update latency (source timestamp to sink), not inter-arrival jitter",
        "latency_p50_ms": round(statistics.median(latency), 1),
        "latency_max_ms": round(max(latency), 1),
        "interarrival_jitter_p99_ms": round(percentile(interarrival, 99), 1),
        "rss_bytes_per_session": round((rss_after_ramp - baseline_rss) / sessions),
        "cpu_percent": round(cpu, 1),
        "simulator_cpu_percent": round(simulator_cpu, 1),
        "batches_dropped": dropped,
        "reconnects_in_window": reconnects,
        "single_session_latency_p50_ms": round(statistics.median(reference), 1),
        "single_session_latency_p99_ms": round(percentile(reference, 99), 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--items", type=int, default=20, help="monitored items per session")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--server", action="store_true", help="run as the simulator process")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    if args.server:
        await run_server(args)
        return
    result = await measure(args.sessions, args.items, args.seconds)
    print(
        f"opcua: {result['sessions_open']}/{args.sessions} sessions open, "
        f"{result['monitored_items']} monitored items, "
        f"{result['readings_per_s']} readings/s (ideal {result['readings_per_s_ideal']}), "
        f"latency p50 {result['latency_p50_ms']} ms p99 {result['poll_jitter_p99_ms']} ms "
        f"(one session alone: p99 {result['single_session_latency_p99_ms']} ms), "
        f"{result['rss_bytes_per_session']} B RSS/session, cpu {result['cpu_percent']} %, "
        f"simulator cpu {result['simulator_cpu_percent']} %, dropped {result['batches_dropped']}"
    )
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
