"""Device connectivity at scale: N real device sessions polling simulated Modbus TCP meters.

The simulators run in their own process (``python -m simulators --site doc.json``) on a generated
site of N power meters, each with 10 holding registers (5 float32 points at addresses 0..9), spread
over several simulated gateway ports with unit ids 1..200 per port. The bench process runs N real
:class:`scada.sessions.DeviceSession` objects, each with the real ``ModbusDriver`` built by
``scada.app.build_driver`` on the ``SystemClock``, publishing into a counting sink (Redis is not what
is measured here). Sessions are started over a ramp, then measured for ``--seconds``:

- ``sessions_open``: sessions online at the end of the window;
- ``readings_per_s``: good readings the sink received per second (ideal: 5 * N / period);
- ``poll_jitter_*_ms``: how late each poll starts against its session's fixed-rate schedule. A thin
  driver wrapper records ``time.monotonic()`` when ``read()`` is called and when it returns; the
  schedule is replayed as the session computes it (anchored at the first read, ticks skipped after
  an overrun), so lateness is measured against the tick the poll was due at; skipped ticks are
  counted in ``overruns``;
- ``rss_bytes_per_session``: (RSS after the ramp - RSS before the sessions were created) / N;
  ``heap_bytes_per_session`` cross-checks it with the Python heap still allocated after the ramp
  (``tracemalloc``, on during creation and ramp only), since the RSS delta is lowered by memory the
  site parse freed and the sessions reuse;
- ``cpu_percent`` and ``simulator_cpu_percent``: the two processes over the window (100 = one core).

References in the same run: ``baseline_rss_mb`` (the bench process before any session) and
``single_poll_p50_ms`` / ``single_poll_p99_ms``, one session's driver polling one meter alone before
the ramp (the device access time with nothing else running).

Only Modbus TCP for now: the OPC UA and MQTT drivers do not exist yet, so no line is printed for
them.

Usage: ``.venv/bin/python bench/sessions.py [--sessions 1000] [--seconds 30] [--period 1.0]``
Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import shutil
import signal
import statistics
import sys
import tempfile
import time
import tracemalloc
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from _fleet import HIERARCHY_YAML, meter_devices_yaml, percentile, ports_for

from scada.app import build_driver
from scada.config import SiteConfig, parse_site
from scada.model import AvailabilityEvent, DeviceId, Driver, PointId, Reading
from scada.runtime import SystemClock
from scada.sessions import DeviceSession

REPO = Path(__file__).resolve().parent.parent
POINTS_PER_METER = 5
SINGLE_POLLS = 100  # reference polls of one meter before the ramp


def site_yaml(meters: int, period_s: float, ports: list[int]) -> str:
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
{meter_devices_yaml(meters, period_s, ports)}
"""


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
        self.events += 1


class TimedDriver:
    """A Driver that records when each read() starts and returns, delegating to the real driver.

    A NaN start marks a (re)connect: the session re-anchors its schedule there.
    """

    def __init__(self, inner: Driver) -> None:
        self._inner = inner
        self.starts = array("d")
        self.ends = array("d")

    @property
    def device(self) -> DeviceId:
        return self._inner.device

    async def connect(self) -> None:
        await self._inner.connect()
        self.starts.append(math.nan)
        self.ends.append(math.nan)

    async def read(self) -> Sequence[Reading]:
        self.starts.append(time.monotonic())
        readings = await self._inner.read()
        self.ends.append(time.monotonic())
        return readings

    async def write(self, point: PointId, value: float) -> None:
        await self._inner.write(point, value)

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


async def single_session_reference(site: SiteConfig, clock: SystemClock) -> list[float]:
    driver = build_driver(site.devices[0], clock)
    await driver.connect()
    times: list[float] = []
    try:
        for _ in range(SINGLE_POLLS):
            t0 = time.perf_counter()
            await driver.read()
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        await driver.close()
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000, help="meters, one session each (5 points)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the measure window, s")
    parser.add_argument("--period", type=float, default=1.0, help="poll period of every session, s")
    parser.add_argument("--ramp", type=float, default=None, help="start sessions over this many s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    ramp_s = args.ramp if args.ramp is not None else max(2 * args.period, args.sessions / 500)

    workdir = Path(tempfile.mkdtemp(prefix="scada-bench-sessions-"))
    ports = ports_for(args.sessions)
    site = parse_site(site_yaml(args.sessions, args.period, ports), source="bench")
    doc_path = workdir / "doc.json"
    doc_path.write_text(json.dumps(site.model_dump(mode="json")), encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators",
        "--site",
        str(doc_path),
        "--log-level",
        "WARNING",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60 + args.sessions / 50):
            ready = await proc.stdout.readline()
        if not ready.startswith(b"SIMULATORS READY"):
            raise SystemExit(f"simulators did not start: {ready!r}")
        result = await measure(args, site, ramp_s, psutil.Process(proc.pid))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"modbus: {result['sessions_open']}/{args.sessions} sessions open, "
        f"{result['readings_per_s']} readings/s (ideal {result['readings_per_s_ideal']}), "
        f"poll jitter p50 {result['poll_jitter_p50_ms']} ms p99 {result['poll_jitter_p99_ms']} ms, "
        f"{result['rss_bytes_per_session']} B RSS/session, cpu {result['cpu_percent']} %, "
        f"simulators cpu {result['simulator_cpu_percent']} %"
    )
    print("RESULT " + json.dumps(result))


async def measure(
    args: argparse.Namespace, site: SiteConfig, ramp_s: float, simulator: psutil.Process
) -> dict[str, Any]:
    me = psutil.Process()
    clock = SystemClock()
    single_ms = await single_session_reference(site, clock)
    baseline_rss = me.memory_info().rss
    tracemalloc.start()  # cross-check of the RSS delta (RSS reuses memory the site parse freed)

    sink = CountingSink()
    drivers: list[TimedDriver] = []
    sessions: list[DeviceSession] = []
    for device in site.devices:
        driver = TimedDriver(build_driver(device, clock))
        drivers.append(driver)
        sessions.append(
            DeviceSession(
                driver,
                points=[device.point_id(p.key) for p in device.points],
                sink=sink,
                events=sink,
                period_s=args.period,
                clock=clock,
            )
        )
    tasks: list[asyncio.Task[None]] = []
    try:
        # Ramp: start the sessions evenly over ramp_s, then wait (bounded) until all are online.
        ramp_started = time.monotonic()
        for i, session in enumerate(sessions):
            delay = ramp_started + ramp_s * i / len(sessions) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(session.run(), name=f"session-{session.device}"))
        for _ in range(int((30 + args.sessions / 100) / 0.2)):  # bounded wait for all online
            if all(s.available for s in sessions):
                break
            await asyncio.sleep(0.2)
        ramp_done_s = time.monotonic() - ramp_started
        online_after_ramp = sum(1 for s in sessions if s.available)
        await asyncio.sleep(2 * args.period)  # settle: every session past its first polls
        # tracemalloc's own tables are in the RSS too: leave them out.
        rss_after_ramp = me.memory_info().rss - tracemalloc.get_tracemalloc_memory()
        heap_after_ramp = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()  # not during the window: it would slow every allocation

        # Measure window.
        overruns_before = sum(s.stats.overruns for s in sessions)
        failed_before = sum(s.stats.polls_failed for s in sessions)
        good_before = sink.good
        me.cpu_percent()
        simulator.cpu_percent()
        window_start = time.monotonic()
        await asyncio.sleep(args.seconds)
        window_end = time.monotonic()
        cpu = me.cpu_percent()
        simulator_cpu = simulator.cpu_percent()
        good = sink.good - good_before
        overruns = sum(s.stats.overruns for s in sessions) - overruns_before
        failed = sum(s.stats.polls_failed for s in sessions) - failed_before
        sessions_open = sum(1 for s in sessions if s.available)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)

    late = [ms for d in drivers for ms in lateness_ms(d, args.period, (window_start, window_end))]
    if not late:
        late = [math.nan]
    elapsed = window_end - window_start
    return {
        "protocol": "modbus",
        "sessions": args.sessions,
        "points_per_session": POINTS_PER_METER,
        "poll_period_s": args.period,
        "seconds": args.seconds,
        "ramp_s": round(ramp_done_s, 1),
        "online_after_ramp": online_after_ramp,
        "sessions_open": sessions_open,
        "readings_per_s": round(good / elapsed, 1),
        "readings_per_s_ideal": round(args.sessions * POINTS_PER_METER / args.period, 1),
        "polls_in_window": len(late),
        "poll_jitter_p50_ms": round(statistics.median(late), 1),
        "poll_jitter_p99_ms": round(percentile(late, 99), 1),
        "poll_jitter_max_ms": round(max(late), 1),
        "overruns": overruns,
        "polls_failed": failed,
        "rss_bytes_per_session": round((rss_after_ramp - baseline_rss) / args.sessions),
        "heap_bytes_per_session": round(heap_after_ramp / args.sessions),
        "cpu_percent": round(cpu, 1),
        "simulator_cpu_percent": round(simulator_cpu, 1),
        "baseline_rss_mb": round(baseline_rss / 2**20, 1),
        "single_poll_p50_ms": round(statistics.median(single_ms), 2),
        "single_poll_p99_ms": round(percentile(single_ms, 99), 2),
    }


if __name__ == "__main__":
    asyncio.run(main())
