"""Modbus TCP part of bench/sessions.py: N real device sessions polling simulated meters.

The simulators run in their own process (``python -m simulators.modbus_scale``: one register image,
meters behind gateway ports of 200 unit ids each). This process runs N real
:class:`scada.sessions.DeviceSession` objects, each with a real :class:`ModbusDriver` built the way
``scada.app.build_driver`` builds it (one connection per session), publishing into a counting sink
(Redis is not what is measured here). Sessions start over a ramp, then are measured for
``duration_s``:

- ``sessions_open``: sessions online at the end of the window;
- ``readings_per_s``: good readings the sink received per second (ideal: points * N / period);
- ``poll_jitter_*_ms``: how late each poll starts against its session's fixed-rate schedule. A thin
  driver wrapper records ``time.monotonic()`` when ``read()`` is called and when it returns; the
  schedule is replayed as the session computes it (anchored at the first read, ticks skipped after
  an overrun), so lateness is measured against the tick the poll was due at;
- ``rss_bytes_per_session``: (RSS after the ramp - RSS before the sessions were created) / N, the
  wrapper's two small arrays included; ``heap_bytes_per_session`` is the Python heap the drivers and
  sessions take before they connect (``tracemalloc``, on during their creation only: during the
  ramp it would slow every allocation of 10,000 polls a second into overload);
- ``cpu_percent`` / ``simulator_cpu_percent``: both processes over the window (100 = one core), and
  ``cpu_us_per_poll``: this process's CPU time in the window per poll;
- what stalls the loop: ``gc_*`` (every collection timed), ``loop_lag_*_ms`` (how late a 10 ms
  sleep wakes) and ``involuntary_context_switches`` (the kernel gave the core to another process:
  on a shared machine that, not the code, is often the p99).

References measured in the same run, before the fleet starts, one meter alone on one connection:

- ``single_poll_p50_ms`` / ``single_poll_p99_ms``: one ``driver.read()`` round trip;
- ``reference_cpu_us_per_poll``: CPU per request and per poll, back to back, of pymodbus'
  ``AsyncModbusTcpClient`` reading the same block (``library_client``), our transport alone
  (``transport``), ``ModbusDriver.read()`` with decoding (``driver``) and a ``DeviceSession``
  polling as fast as it can (``session``, so ``session - driver`` is the session's own cost).

The collector is tuned (``gc_mode``) right after the ramp, then the fleet settles for 3 periods
before the window opens: the first second after ``gc.freeze()`` shows loop stalls of 60-180 ms (a
one-time transient a server pays once, at start-up, not a steady-state cost), and measuring it
would put a start-up effect into the steady-state p99.

Run it through ``bench/sessions.py --protocol modbus``; a machine shared with other work shows in
the absolute figures, so compare the ratios against the same-run references.

``gateways=G`` (``--gateways G``) runs the sessions in G worker processes instead of this one, each
supervising the devices of its shard (``scada.sharding``, ``SCADA_GATEWAY_SHARD=i/G`` in the server),
as a deployment with one gateway process per core does. The result then adds up sessions, readings,
CPU and RSS over the workers, and takes the jitter percentiles over every worker's polls together;
``per_gateway`` keeps each worker's own summary.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import resource
import statistics
import sys
import time
import tracemalloc
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from _fleet import UNITS_PER_PORT, percentile, stop_process

from protocols.modbus.config import DataType, ModbusDeviceConfig, ModbusPointConfig
from protocols.modbus.driver import ModbusDriver, ModbusPointSpec
from protocols.modbus.transport import open_connection
from scada.model import Acquisition, AvailabilityEvent, DeviceId, PointId, Reading, make_point_id
from scada.runtime import SERVER_GC_THRESHOLDS, SystemClock
from scada.sessions import DeviceSession
from scada.sharding import Shard

REPO = Path(__file__).resolve().parent.parent
CHANNELS = ("voltage_v", "current_a", "active_power_kw", "frequency_hz", "reactive_power_kvar")
REFERENCE_POLLS = 1000
RAMP_STEP_S = 0.05
GC_TUNED_THRESHOLDS = SERVER_GC_THRESHOLDS  # what scada.runtime.tune_gc_for_server sets
"""Collect the young generation every 50,000 allocations instead of 700, the middle one every 50 of
those: each sleeping session keeps a few objects (task, coroutines, sleep future, timer) alive
across collections, and with the default thresholds they are promoted and walked by a full
collection twice a second (100-200 ms each at 10,000 sessions)."""
FD_MARGIN = 200
"""File descriptors this process needs besides one socket per session."""


class GcPauses:
    """Time every cyclic-GC run (gc.callbacks): a full collection over 10k sessions stalls the loop."""

    def __init__(self) -> None:
        self.pauses_ms: list[tuple[int, float]] = []
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses_ms.append((info["generation"], (time.perf_counter() - self._started) * 1000))

    def summary(self) -> dict[str, Any]:
        full = [ms for generation, ms in self.pauses_ms if generation == 2]
        return {
            "gc_collections": len(self.pauses_ms),
            "gc_full_collections": len(full),
            "gc_max_pause_ms": round(max((ms for _, ms in self.pauses_ms), default=0.0), 1),
        }


class LoopLag:
    """Sample how late a 10 ms sleep wakes up: stalls of the loop itself, whatever their cause."""

    STALL_MS = 50.0

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self.stalls: list[tuple[float, float]] = []
        """(seconds into the window, lag in ms) of every wake-up later than STALL_MS."""
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _sample(self) -> None:
        origin = time.monotonic()
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.01)
            lag_ms = (time.monotonic() - started - 0.01) * 1000
            self.lags_ms.append(lag_ms)
            if lag_ms > self.STALL_MS:
                self.stalls.append((round(started - origin, 2), round(lag_ms, 1)))

    def summary(self) -> dict[str, Any]:
        lags = self.lags_ms or [math.nan]
        return {
            "loop_lag_p99_ms": round(percentile(lags, 99), 1),
            "loop_lag_max_ms": round(max(lags), 1),
            "loop_stalls": self.stalls[:20],
        }


class CountingSink:
    """ReadingSink and EventSink that only count (Redis is not what is measured here)."""

    def __init__(self) -> None:
        self.readings = 0
        self.good = 0
        self.events = 0

    async def publish(self, readings: Sequence[Reading]) -> None:
        self.readings += len(readings)
        self.good += sum(1 for r in readings if r.value is not None)

    async def publish_event(self, event: AvailabilityEvent) -> None:
        del event
        self.events += 1


class TimedDriver:
    """A Driver that records when each read() starts and returns, delegating to the real driver.

    A NaN start marks a (re)connect: the session re-anchors its schedule there.
    """

    __slots__ = ("_inner", "ends", "starts")

    def __init__(self, inner: ModbusDriver) -> None:
        self._inner = inner
        self.starts = array("d")
        self.ends = array("d")

    @property
    def device(self) -> DeviceId:
        return self._inner.device

    @property
    def acquisition(self) -> Acquisition:
        return self._inner.acquisition

    async def connect(self) -> None:
        await self._inner.connect()
        self.starts.append(math.nan)
        self.ends.append(math.nan)

    async def read(self) -> Sequence[Reading]:
        self.starts.append(time.monotonic())
        readings = await self._inner.read()
        self.ends.append(time.monotonic())
        return readings

    async def write(self, point: PointId, value: float, *, correlation_id: str = "") -> None:
        await self._inner.write(point, value, correlation_id=correlation_id)

    async def read_back(self, point: PointId) -> float:
        return await self._inner.read_back(point)

    async def close(self) -> None:
        await self._inner.close()


def lateness_ms(driver: TimedDriver, period_s: float, window: tuple[float, float]) -> list[float]:
    """Replay the session's fixed-rate schedule; return how late each in-window poll started."""
    late: list[float] = []
    next_tick = math.nan
    for start, end in zip(driver.starts, driver.ends, strict=False):
        if math.isnan(start):  # connected: the next read anchors the schedule
            next_tick = math.nan
            continue
        if math.isnan(next_tick):
            next_tick = start
        if window[0] <= start < window[1]:
            late.append((start - next_tick) * 1000)
        if math.isnan(end):  # read still running or failed
            break
        next_tick += period_s
        if end > next_tick:  # the session skips the ticks it missed
            next_tick += (int((end - next_tick) // period_s) + 1) * period_s
    return late


def progress(message: str) -> None:
    """Say what the bench is doing, on stderr (stdout carries only the results)."""
    sys.stderr.write(f"modbus: {message}\n")
    sys.stderr.flush()


def raise_fd_limit(sessions: int) -> int:
    """Raise the soft fd limit to what the sessions need (up to the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = sessions + FD_MARGIN
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < needed:
        raise SystemExit(f"modbus: {sessions} sessions need {needed} file descriptors, the limit is {soft}")
    return soft


def device_configs(
    sessions: int, endpoints: Sequence[tuple[str, int]], points: int
) -> list[tuple[str, ModbusDeviceConfig, list[ModbusPointSpec]]]:
    """Return each meter's id, device config and point specs, as build_driver makes them."""
    out = []
    for i in range(sessions):
        host, port = endpoints[i // UNITS_PER_PORT]
        device = f"m{i:05d}"
        config = ModbusDeviceConfig(host=host, port=port, unit_id=1 + i % UNITS_PER_PORT, timeout_s=1.0)
        specs = [
            ModbusPointSpec(
                point=make_point_id(device, CHANNELS[k] if k < len(CHANNELS) else f"temperature_{k}_c"),
                config=ModbusPointConfig(address=2 * k, type=DataType.FLOAT32),
            )
            for k in range(points)
        ]
        out.append((device, config, specs))
    return out


async def reference(
    configs: Sequence[tuple[str, ModbusDeviceConfig, list[ModbusPointSpec]]], registers: int
) -> dict[str, Any]:
    """One meter alone: round trip, and CPU per poll of each layer, back to back."""
    from pymodbus.client import AsyncModbusTcpClient  # noqa: PLC0415 -- only for the reference

    device, config, specs = configs[0]
    clock = SystemClock()
    cpu_us: dict[str, float] = {}

    async def cpu_of(name: str, poll: Any) -> None:
        for _ in range(REFERENCE_POLLS // 10):  # warm up
            await poll()
        started = time.process_time()
        for _ in range(REFERENCE_POLLS):
            await poll()
        cpu_us[name] = round((time.process_time() - started) / REFERENCE_POLLS * 1e6, 1)

    client = AsyncModbusTcpClient(config.host, port=config.port, timeout=2.0, retries=0, reconnect_delay=0)
    await client.connect()
    try:
        await cpu_of(
            "library_client",
            lambda: client.read_holding_registers(0, count=registers, device_id=config.unit_id),
        )
    finally:
        client.close()
    connection = await open_connection(config.host, config.port, timeout_s=2.0)
    try:
        await cpu_of("transport", lambda: connection.read_raw(config.unit_id, 3, 0, registers))
    finally:
        connection.close()
    driver = ModbusDriver(device, config, specs, clock=clock)
    await driver.connect()
    round_trips_ms: list[float] = []
    try:
        await cpu_of("driver", driver.read)
        for _ in range(REFERENCE_POLLS):
            started = time.perf_counter()
            await driver.read()
            round_trips_ms.append((time.perf_counter() - started) * 1000)
    finally:
        await driver.close()
    cpu_us["session"] = await session_cpu_per_poll(device, config, specs, clock)
    return {
        "single_poll_p50_ms": round(statistics.median(round_trips_ms), 3),
        "single_poll_p99_ms": round(percentile(round_trips_ms, 99), 3),
        "reference_cpu_us_per_poll": cpu_us,
    }


async def session_cpu_per_poll(
    device: str, config: ModbusDeviceConfig, specs: list[ModbusPointSpec], clock: SystemClock
) -> float:
    """CPU per poll of one DeviceSession polling as fast as it can (period 1 us: always overrun)."""
    sink = CountingSink()
    session = DeviceSession(
        ModbusDriver(device, config, specs, clock=clock),
        points=[s.point for s in specs],
        sink=sink,
        events=sink,
        period_s=1e-6,
        clock=clock,
    )
    task = asyncio.create_task(session.run())
    try:
        await asyncio.sleep(0.2)  # warm up
        polls, started = session.stats.polls_ok, time.process_time()
        await asyncio.sleep(1.0)
        cpu_s, polls = time.process_time() - started, session.stats.polls_ok - polls
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return round(cpu_s / max(1, polls) * 1e6, 1)


async def start_simulator(
    sessions: int, registers: int, loop: str
) -> tuple[asyncio.subprocess.Process, list[tuple[str, int]]]:
    """Start the scale simulator in its own process; return it and its gateway endpoints."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.modbus_scale",
        "--devices",
        str(sessions),
        "--registers",
        str(registers),
        "--units-per-port",
        str(UNITS_PER_PORT),
        "--loop",
        loop,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        ready = (await proc.stdout.readline()).decode()
    if not ready.startswith("SIMULATORS READY"):
        await stop_process(proc)
        raise SystemExit(f"modbus: the simulator did not start: {ready!r}")
    endpoints = []
    for address in ready.split(" on ", 1)[1].split():
        host, port = address.rsplit(":", 1)
        endpoints.append((host, int(port)))
    return proc, endpoints


async def measure(
    sessions: int = 10_000,
    duration_s: float = 20.0,
    *,
    period_s: float = 1.0,
    registers: int = 10,
    ramp_s: float | None = None,
    loop: str = "asyncio",
    gc_mode: str = "tuned",
    gateways: int = 1,
) -> dict[str, Any]:
    """Run the simulators and N sessions; return the RESULT dict of the Modbus part."""
    fd_limit = raise_fd_limit(sessions)
    points = registers // 2
    ramp_s = ramp_s if ramp_s is not None else max(2 * period_s, sessions / 500)
    proc, endpoints = await start_simulator(sessions, registers, loop)
    try:
        configs = device_configs(sessions, endpoints, points)
        ref = await reference(configs, registers)
        progress(f"reference: {ref}")
        if gateways == 1:
            fleet = await run_fleet(
                configs, period_s, ramp_s, duration_s, psutil.Process(proc.pid), gc_mode=gc_mode
            )
        else:
            fleet = await run_gateways(
                gateways,
                sessions=sessions,
                endpoints=endpoints,
                points=points,
                period_s=period_s,
                ramp_s=ramp_s,
                duration_s=duration_s,
                simulator_pid=proc.pid,
                gc_mode=gc_mode,
            )
    finally:
        await stop_process(proc)
    return {
        "protocol": "modbus",
        "sessions": sessions,
        "points_per_session": points,
        "registers_per_poll": registers,
        "poll_period_s": period_s,
        "seconds": duration_s,
        "loop": loop,
        "gc_mode": gc_mode,
        "gateways": gateways,
        "fd_limit": fd_limit,
        **fleet,
        "readings_per_s_ideal": round(sessions * points / period_s, 1),
        **ref,
    }


async def run_fleet(
    configs: Sequence[tuple[str, ModbusDeviceConfig, list[ModbusPointSpec]]],
    period_s: float,
    ramp_s: float,
    duration_s: float,
    simulator: psutil.Process,
    *,
    gc_mode: str,
    keep_lateness: bool = False,
) -> dict[str, Any]:
    me = psutil.Process()
    clock = SystemClock()
    n = len(configs)
    baseline_rss = me.memory_info().rss
    tracemalloc.start()  # the objects' share of the RSS delta

    sink = CountingSink()
    drivers: list[TimedDriver] = []
    sessions: list[DeviceSession] = []
    for device, config, specs in configs:
        driver = TimedDriver(ModbusDriver(device, config, specs, clock=clock))
        drivers.append(driver)
        sessions.append(
            DeviceSession(
                driver,
                points=[s.point for s in specs],
                sink=sink,
                events=sink,
                period_s=period_s,
                clock=clock,
            )
        )
    heap_objects = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    tasks: list[asyncio.Task[None]] = []
    try:
        ramp_started = time.monotonic()
        while len(tasks) < n:  # start every session whose turn has come, then yield for a while
            due = min(n, math.floor((time.monotonic() - ramp_started) / ramp_s * n) + 1)
            tasks.extend(
                asyncio.create_task(session.run(), name=f"session-{session.device}")
                for session in sessions[len(tasks) : due]
            )
            await asyncio.sleep(RAMP_STEP_S)
        for _ in range(int((30 + n / 100) / 0.2)):  # bounded wait for all online
            if all(s.available for s in sessions):
                break
            await asyncio.sleep(0.2)
        ramp_done_s = time.monotonic() - ramp_started
        progress(f"ramp done in {ramp_done_s:.1f} s: {sum(1 for s in sessions if s.available)}/{n} online")
        online_after_ramp = sum(1 for s in sessions if s.available)
        thresholds = gc.get_threshold()
        if gc_mode in ("freeze", "tuned"):  # as a server does once its sessions are up
            gc.freeze()  # full collections skip every object alive now
        if gc_mode == "tuned":
            gc.set_threshold(*GC_TUNED_THRESHOLDS)
        await asyncio.sleep(3 * period_s)  # settle: every session past its first polls, GC settled
        rss_after_ramp = me.memory_info().rss

        overruns_before = sum(s.stats.overruns for s in sessions)
        failed_before = sum(s.stats.polls_failed for s in sessions)
        polls_before = sum(s.stats.polls_ok for s in sessions)
        good_before = sink.good
        me.cpu_percent()
        simulator.cpu_percent()
        cpu_before = time.process_time()
        window_start = time.monotonic()
        progress(f"measuring for {duration_s:g} s")
        switches_before = me.num_ctx_switches().involuntary
        async with LoopLag() as loop_lag:
            with GcPauses() as gc_pauses:
                await asyncio.sleep(duration_s)
        preempted = me.num_ctx_switches().involuntary - switches_before
        window_end = time.monotonic()
        cpu_s = time.process_time() - cpu_before
        cpu = me.cpu_percent()
        simulator_cpu = simulator.cpu_percent()
        good = sink.good - good_before
        polls = sum(s.stats.polls_ok for s in sessions) - polls_before
        overruns = sum(s.stats.overruns for s in sessions) - overruns_before
        failed = sum(s.stats.polls_failed for s in sessions) - failed_before
        sessions_open = sum(1 for s in sessions if s.available)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        gc.unfreeze()
        gc.set_threshold(*thresholds)

    late = [ms for d in drivers for ms in lateness_ms(d, period_s, (window_start, window_end))] or [math.nan]
    elapsed = window_end - window_start
    return {
        "ramp_s": round(ramp_done_s, 1),
        "online_after_ramp": online_after_ramp,
        "sessions_open": sessions_open,
        "readings_per_s": round(good / elapsed, 1),
        "polls_in_window": len(late),
        "poll_jitter_p50_ms": round(statistics.median(late), 1),
        "poll_jitter_p99_ms": round(percentile(late, 99), 1),
        "poll_jitter_max_ms": round(max(late), 1),
        "overruns": overruns,
        "polls_failed": failed,
        "rss_bytes_per_session": round((rss_after_ramp - baseline_rss) / n),
        "heap_bytes_per_session": round(heap_objects / n),
        "cpu_percent": round(cpu, 1),
        "cpu_us_per_poll": round(cpu_s / max(1, polls) * 1e6, 1),
        "simulator_cpu_percent": round(simulator_cpu, 1),
        "baseline_rss_mb": round(baseline_rss / 2**20, 1),
        **gc_pauses.summary(),
        **loop_lag.summary(),
        "involuntary_context_switches": preempted,
        **({"lateness_ms": [round(ms, 2) for ms in late]} if keep_lateness else {}),
    }


async def run_gateways(
    gateways: int,
    *,
    sessions: int,
    endpoints: Sequence[tuple[str, int]],
    points: int,
    period_s: float,
    ramp_s: float,
    duration_s: float,
    simulator_pid: int,
    gc_mode: str,
) -> dict[str, Any]:
    """Run the fleet in ``gateways`` worker processes, one shard each; merge their results."""
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            *("--shard", f"{index}/{gateways}", "--sessions", str(sessions), "--points", str(points)),
            *("--endpoints", ",".join(f"{h}:{p}" for h, p in endpoints), "--period", str(period_s)),
            *("--ramp", str(ramp_s), "--seconds", str(duration_s), "--simulator-pid", str(simulator_pid)),
            *("--gc", gc_mode),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        for index in range(gateways)
    ]
    parts: list[dict[str, Any]] = []
    for worker in workers:
        stdout, _ = await worker.communicate()
        if worker.returncode != 0:
            raise SystemExit(f"modbus: a gateway worker failed with exit code {worker.returncode}")
        parts.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    late = [ms for part in parts for ms in part.pop("lateness_ms")] or [math.nan]
    counts = [part.pop("sessions_in_shard") for part in parts]
    return {
        "ramp_s": max(p["ramp_s"] for p in parts),
        "online_after_ramp": sum(p["online_after_ramp"] for p in parts),
        "sessions_open": sum(p["sessions_open"] for p in parts),
        "readings_per_s": round(sum(p["readings_per_s"] for p in parts), 1),
        "polls_in_window": len(late),
        "poll_jitter_p50_ms": round(statistics.median(late), 1),
        "poll_jitter_p99_ms": round(percentile(late, 99), 1),
        "poll_jitter_max_ms": round(max(late), 1),
        "overruns": sum(p["overruns"] for p in parts),
        "polls_failed": sum(p["polls_failed"] for p in parts),
        "rss_bytes_per_session": round(
            sum(p["rss_bytes_per_session"] * n for p, n in zip(parts, counts, strict=True)) / sessions
        ),
        "cpu_percent": round(sum(p["cpu_percent"] for p in parts), 1),
        "cpu_us_per_poll": round(statistics.mean(p["cpu_us_per_poll"] for p in parts), 1),
        "simulator_cpu_percent": max(p["simulator_cpu_percent"] for p in parts),
        "per_gateway": parts,
    }


async def gateway_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One gateway process of ``run_gateways``: the sessions of one shard, measured like run_fleet."""
    shard = Shard.parse(args.shard)
    endpoints = [(h, int(p)) for h, _, p in (e.rpartition(":") for e in args.endpoints.split(","))]
    configs = [c for c in device_configs(args.sessions, endpoints, args.points) if shard.owns(c[0])]
    raise_fd_limit(len(configs))
    fleet = await run_fleet(
        configs,
        args.period,
        args.ramp * len(configs) / args.sessions,
        args.seconds,
        psutil.Process(args.simulator_pid),
        gc_mode=args.gc,
        keep_lateness=True,
    )
    return {"shard": str(shard), "sessions_in_shard": len(configs), **fleet}


def main() -> None:
    """Entry of a gateway worker process (started by ``run_gateways``); prints one JSON line."""
    parser = argparse.ArgumentParser(description="one gateway worker of the Modbus sessions bench")
    parser.add_argument("--shard", required=True)
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--points", type=int, required=True)
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--period", type=float, required=True)
    parser.add_argument("--ramp", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--simulator-pid", type=int, required=True)
    parser.add_argument("--gc", default="tuned")
    result = asyncio.run(gateway_worker(parser.parse_args()))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
