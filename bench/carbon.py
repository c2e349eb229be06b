"""Carbon ledger throughput and month-end forecast accuracy on the example plant, offline.

Two measurements, one run, no services needed:

1. **Ledger ingest** (``ledger_readings_per_s``): :meth:`CarbonLedger.ingest` over prebuilt
   :class:`Reading` objects of every ledger point of ``examples/plant.yaml`` at 1 Hz (counters rising
   at a steady rate, the one integrated power point varying), timed on one thread; then the time of
   the :meth:`CarbonLedger.compute` that turns them into hourly rows. Reference in the same run
   (``reference_loop_per_s``): a bare loop over the same readings that only looks the point up in a
   dict and adds the value to a float, the least any per-reading Python code costs. Each is the
   median of ``--repeats`` runs (a fresh ledger each time). The prebuilt readings are frozen out of
   the garbage collector first, so the timing is of the ledger, not of collecting a million
   objects the benchmark made.
2. **Forecast accuracy** (``forecast_mape_day10/20``): ``--months`` consecutive months of the example
   plant (from 2026-01-01, site time zone) are simulated offline with the real device physics,
   stepped every ``--step-s`` seconds. Each step every ledger point's reported value becomes a
   reading for a ledger (the step time is ``now``); once per simulated hour the ledger computes and
   its :meth:`CarbonLedger.node_hours` (scope 1 + scope 2) are kept; every closed hour (ended
   ``close_after_s`` ago) is fed, in hour order, to one :class:`MonthForecaster` that lives across
   all months. At the end of local day 10 and day 20 (local midnight starting day 11 and day 21)
   the month-end forecast of the top node and of each enterprise is recorded; at month end it is
   compared with the month's actual total. The first month only teaches the forecaster (it has no
   history then), so errors are over months 2..N. Interval coverage is the share of actual totals
   inside [low, high] over all those forecasts. Reference in the same run: the naive run rate,
   actual to date divided by the elapsed share of the month.

   Each month is a new plant whose devices' ``simulation.seed`` is shifted by
   ``seed_offset + 1000 x month`` (month 1 with ``--seed-offset 0`` keeps the document's seeds), so
   random load, weather and injected anomalies differ between months. A new plant has new counter
   registers, so each month has its own ledger too: the plant and ledger start one step before the
   month (that sample only anchors the counters) and run until the month's last hour is closed;
   rows of hours outside the month are not taken from that ledger. The forecaster sees one
   continuous series of hours. What a battery carries restarts from the grid factor each month.

Usage::

    .venv/bin/python bench/carbon.py [--readings 1000000] [--repeats 3]
                                     [--months 6] [--step-s 300] [--seed-offset 0]

Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from control_engine.factors import FactorLibrary
from control_engine.forecast import MonthForecaster, month_bounds, month_key
from control_engine.ledger import CarbonLedger, LedgerPoint
from scada.catalog import ledger_points, node_tree
from scada.config import load_site
from scada.model import NodeId, NodeLevel, PointId, Reading
from simulators.plant import SimulatedPlant

SITE_FILE = Path(__file__).resolve().parent.parent / "examples" / "plant.yaml"
MQTT_URL = "mqtt://127.0.0.1:1883"  # the plant needs a broker URL for its MQTT devices; nothing connects
CLOSE_AFTER_S = 900.0
HOUR_S = 3600
FIRST_MONTH = (2026, 1)
CHECK_DAYS = (10, 20)
"""Forecasts are taken at the end of these local days of the month."""
SEED_STEP_PER_MONTH = 1000


# -- 1. ledger ingest throughput ------------------------------------------------------------------


def build_readings(points: Sequence[LedgerPoint], count: int, start: datetime) -> list[Reading]:
    """Return at least ``count`` readings of ``points`` at 1 Hz: rising counters, a varying rate."""
    steps = math.ceil(count / len(points))
    readings: list[Reading] = []
    for second in range(steps):
        ts = start + timedelta(seconds=second)
        for i, p in enumerate(points):
            if p.rate:
                value = 50.0 + 20.0 * math.sin(second / 600.0 + i)  # kW
            else:
                # 40..250 kW (or Nm3/h) of steady use, on a register that starts somewhere.
                value = 10_000.0 * (i + 1) + (40.0 + 5.0 * i) * second / HOUR_S
            readings.append(Reading(point=PointId(p.point), ts=ts, value=value))
    return readings


def reference_loop(readings: Sequence[Reading], table: dict[PointId, int]) -> float:
    """Do the least any per-reading code does: one dict lookup and one float add per reading."""
    total = 0.0
    for reading in readings:
        if table.get(reading.point) is not None:
            total += reading.value or 0.0
    return total


@dataclass(slots=True)
class IngestFigures:
    readings: int
    points: int
    ingest_s: list[float]
    compute_s: list[float]
    reference_s: list[float]
    rows: int
    taken: int


def measure_ingest(
    points: Sequence[LedgerPoint],
    parents: dict[NodeId, NodeId | None],
    levels: dict[NodeId, NodeLevel],
    factors: FactorLibrary,
    *,
    count: int,
    repeats: int,
    timezone: str,
) -> IngestFigures:
    start = datetime(2026, 3, 2, tzinfo=ZoneInfo(timezone)).astimezone(UTC)
    readings = build_readings(points, count, start)
    now = readings[-1].ts.timestamp() + 1.0
    table = {PointId(p.point): i for i, p in enumerate(points)}
    gc.collect()
    gc.freeze()  # the prebuilt readings live to the end; do not time the collector scanning them
    ingest_s: list[float] = []
    compute_s: list[float] = []
    reference_s: list[float] = []
    rows = taken = 0
    for _ in range(repeats):
        ledger = CarbonLedger(points, parents, levels, factors, timezone=timezone)
        t0 = time.perf_counter()
        taken = ledger.ingest(readings, now=now)
        t1 = time.perf_counter()
        update = ledger.compute(now=now)
        t2 = time.perf_counter()
        ingest_s.append(t1 - t0)
        compute_s.append(t2 - t1)
        rows = len(update.rows)
        t3 = time.perf_counter()
        reference_loop(readings, table)
        reference_s.append(time.perf_counter() - t3)
    gc.unfreeze()
    return IngestFigures(len(readings), len(points), ingest_s, compute_s, reference_s, rows, taken)


# -- 2. month-end forecast accuracy ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    month: str
    day: int
    node: str
    actual_to_date_kg: float
    forecast_kg: float
    low_kg: float
    high_kg: float
    method: str
    run_rate_kg: float


@dataclass(slots=True)
class ForecastRun:
    checkpoints: list[Checkpoint] = field(default_factory=list)
    month_totals_kg: dict[tuple[str, str], float] = field(default_factory=dict)
    """(month, node) -> the month's total."""
    seeded_devices: int = 0
    unseeded_devices: int = 0
    steps: int = 0
    hours_learned: int = 0
    simulate_s: float = 0.0


def month_starts(first: tuple[int, int], months: int, zone: ZoneInfo) -> list[tuple[datetime, datetime]]:
    """Return the local start and end of ``months`` consecutive months from ``first``."""
    out = []
    year, number = first
    for _ in range(months):
        out.append(month_bounds(f"{year:04d}-{number:02d}", zone))
        year, number = (year + 1, 1) if number == 12 else (year, number + 1)
    return out


def reseed(doc: dict[str, Any], shift: int) -> tuple[dict[str, Any], int, int]:
    """Return a copy of the plant document with every simulated device's seed shifted by ``shift``."""
    out = copy.deepcopy(doc)
    seeded = unseeded = 0
    for device in out["devices"]:
        simulation = device.get("simulation")
        if not isinstance(simulation, dict):
            unseeded += 1
            continue
        base = simulation.get("seed")
        if base is None:
            base = zlib.crc32(str(device["id"]).encode())  # what the simulator would use
        simulation["seed"] = int(base) + shift
        seeded += 1
    return out, seeded, unseeded


def forecast_months(
    doc: dict[str, Any],
    points: Sequence[LedgerPoint],
    parents: dict[NodeId, NodeId | None],
    levels: dict[NodeId, NodeLevel],
    factors: FactorLibrary,
    nodes: Sequence[str],
    *,
    months: int,
    step_s: int,
    seed_offset: int,
    timezone: str,
    progress: Callable[[str], None],
) -> ForecastRun:
    zone = ZoneInfo(timezone)
    forecaster = MonthForecaster(timezone)
    run = ForecastRun()
    learned_up_to: dict[str, datetime] = {}
    step = timedelta(seconds=step_s)
    t_start = time.perf_counter()
    for index, (month_start, month_end) in enumerate(month_starts(FIRST_MONTH, months, zone)):
        month = month_key(month_start)
        month_doc, seeded, unseeded = reseed(doc, seed_offset + SEED_STEP_PER_MONTH * index)
        run.seeded_devices, run.unseeded_devices = seeded, unseeded
        first = month_start.astimezone(UTC) - step  # one sample before the month anchors the counters
        last = month_end.astimezone(UTC) + timedelta(seconds=CLOSE_AFTER_S) + step
        plant = SimulatedPlant.from_document(month_doc, mqtt_url=MQTT_URL, start=first)
        ledger = CarbonLedger(
            points, parents, levels, factors, timezone=timezone, close_after_s=CLOSE_AFTER_S
        )
        sources = [
            (PointId(p.point), plant.device(p.point.split(".", 1)[0]), p.point.split(".", 1)[1])
            for p in points
        ]
        month_start_utc, month_end_utc = month_start.astimezone(UTC), month_end.astimezone(UTC)
        hours: dict[str, dict[datetime, float]] = {node: {} for node in nodes}
        checks = [
            (day, datetime(month_start.year, month_start.month, day + 1, tzinfo=zone).astimezone(UTC))
            for day in CHECK_DAYS
        ]
        current_hour = -1
        now = first
        while now <= last:
            plant.step_physics(now)
            ts = now.timestamp()
            ledger.ingest(
                [Reading(point=pid, ts=now, value=dev.value(key)) for pid, dev, key in sources], now=ts
            )
            run.steps += 1
            hour = ledger.hour_of(ts)
            if hour != current_hour:
                current_hour = hour
                ledger.compute(now=ts)
                for ledger_node, by_hour in ledger.node_hours().items():
                    kept = hours.get(ledger_node)
                    if kept is None:
                        continue
                    for at, (scope1, scope2) in by_hour.items():
                        if month_start_utc <= at < month_end_utc:
                            kept[at] = scope1 + scope2
                run.hours_learned += learn_closed(forecaster, hours, learned_up_to, now)
            while index >= 1 and checks and now >= checks[0][1]:
                day, _at = checks.pop(0)
                elapsed_share = (now - month_start_utc) / (month_end_utc - month_start_utc)
                for node in nodes:
                    actual = sum(kg for at, kg in hours[node].items() if at < now)
                    f = forecaster.forecast(node, now, actual)
                    run.checkpoints.append(
                        Checkpoint(
                            month=month,
                            day=day,
                            node=node,
                            actual_to_date_kg=actual,
                            forecast_kg=f.forecast_kg,
                            low_kg=f.low_kg,
                            high_kg=f.high_kg,
                            method=f.method,
                            run_rate_kg=actual / elapsed_share,
                        )
                    )
            now += step
        # The month's last hour closed after the last hourly pass: learn it before the next month.
        run.hours_learned += learn_closed(forecaster, hours, learned_up_to, now - step)
        for node in nodes:
            missing = _missing_hours(hours[node], month_start_utc, month_end_utc)
            if missing:
                raise RuntimeError(f"{month} {node}: no ledger total for {missing} hours")
            run.month_totals_kg[month, node] = sum(hours[node].values())
        progress(
            f"  {month}: simulated in {time.perf_counter() - t_start:.0f} s so far; "
            + ", ".join(f"{node} {run.month_totals_kg[month, node] / 1000:.1f} t" for node in nodes)
        )
    run.simulate_s = time.perf_counter() - t_start
    return run


def learn_closed(
    forecaster: MonthForecaster,
    hours: dict[str, dict[datetime, float]],
    learned_up_to: dict[str, datetime],
    now: datetime,
) -> int:
    """Feed every closed hour not learned yet to the forecaster, in hour order; return how many."""
    closed_before = now - timedelta(seconds=HOUR_S + CLOSE_AFTER_S)
    learned = 0
    for node, by_hour in hours.items():
        floor = learned_up_to.get(node)
        for at in sorted(h for h in by_hour if (floor is None or floor < h) and h <= closed_before):
            forecaster.learn_hour(node, at, by_hour[at])
            learned_up_to[node] = at
            learned += 1
    return learned


def _missing_hours(by_hour: dict[datetime, float], start: datetime, end: datetime) -> int:
    expected = int((end - start).total_seconds() // HOUR_S)
    return expected - sum(1 for at in by_hour if start <= at < end)


def ape(forecast: float, actual: float) -> float:
    """Return the absolute percentage error of ``forecast`` against ``actual``."""
    return abs(forecast - actual) / abs(actual) * 100.0


def top_node(parents: dict[NodeId, NodeId | None]) -> str:
    roots = [node for node, parent in parents.items() if parent is None]
    if len(roots) != 1:
        raise ValueError(f"expected one top node, found {roots}")
    return roots[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--site", type=Path, default=SITE_FILE, help="site file (default: the example plant)")
    parser.add_argument("--readings", type=int, default=1_000_000, help="readings for the ingest timing")
    parser.add_argument("--repeats", type=int, default=3, help="ingest timings (median reported)")
    parser.add_argument("--months", type=int, default=6, help="months simulated (the first only teaches)")
    parser.add_argument("--step-s", type=int, default=300, help="simulation step, seconds")
    parser.add_argument("--seed-offset", type=int, default=0, help="added to every device seed")
    args = parser.parse_args(argv)
    if args.readings < 1 or args.repeats < 1:
        parser.error("--readings and --repeats must be positive")
    if args.months < 2:
        parser.error("--months must be at least 2: the first month only teaches the forecaster")
    if not 1 <= args.step_s <= HOUR_S:
        parser.error("--step-s must be in 1..3600")

    site = load_site(args.site)
    factors = site.factor_library()
    points = ledger_points(site, factors)
    parents, levels = node_tree(site)
    timezone = site.site.timezone
    nodes = [top_node(parents), *(n for n, level in levels.items() if level is NodeLevel.ENTERPRISE)]

    print(f"ledger ingest: {args.readings:,} readings of {len(points)} points at 1 Hz, {args.repeats} runs")
    ingest = measure_ingest(
        points, parents, levels, factors, count=args.readings, repeats=args.repeats, timezone=timezone
    )
    ingest_s = statistics.median(ingest.ingest_s)
    reference_s = statistics.median(ingest.reference_s)
    compute_s = statistics.median(ingest.compute_s)
    ledger_rate = ingest.readings / ingest_s
    reference_rate = ingest.readings / reference_s
    print(f"  {'':28} {'median':>12} {'min':>12} {'max':>12}")
    for name, seconds in (("ledger ingest /s", ingest.ingest_s), ("reference loop /s", ingest.reference_s)):
        rates = [ingest.readings / s for s in seconds]
        print(f"  {name:28} {statistics.median(rates):12,.0f} {min(rates):12,.0f} {max(rates):12,.0f}")
    print(
        f"  compute(): {compute_s * 1000:.1f} ms for {ingest.rows} rows "
        f"({ingest.readings / ingest.points / HOUR_S:.1f} h of data); ledger/reference = "
        f"{ledger_rate / reference_rate:.3f}; taken {ingest.taken:,}"
    )

    print(
        f"forecast: {args.months} months from {FIRST_MONTH[0]}-{FIRST_MONTH[1]:02d} ({timezone}), "
        f"step {args.step_s} s, nodes {', '.join(nodes)}; months 2..{args.months} are scored"
    )
    doc = site.model_dump(mode="json")
    run = forecast_months(
        doc, points, parents, levels, factors, nodes,
        months=args.months, step_s=args.step_s, seed_offset=args.seed_offset, timezone=timezone,
        progress=print,
    )  # fmt: skip
    print(
        f"  {run.steps:,} steps, {run.hours_learned:,} node-hours learned, {run.simulate_s:.0f} s; seeds "
        f"shifted by {args.seed_offset} + {SEED_STEP_PER_MONTH} x month on {run.seeded_devices} devices "
        f"({run.unseeded_devices} without a simulation section kept theirs)"
    )
    print(
        f"  {'month':8} {'day':>3} {'node':10} {'actual t':>9} {'forecast t':>10} {'low t':>8} "
        f"{'high t':>8} {'err %':>6} {'in':>3} {'run-rate t':>10} {'err %':>6}"
    )
    errors: dict[int, list[float]] = {day: [] for day in CHECK_DAYS}
    run_rate_errors: dict[int, list[float]] = {day: [] for day in CHECK_DAYS}
    inside: dict[int, list[bool]] = {day: [] for day in CHECK_DAYS}
    for c in run.checkpoints:
        total = run.month_totals_kg[c.month, c.node]
        err, rr_err = ape(c.forecast_kg, total), ape(c.run_rate_kg, total)
        hit = c.low_kg <= total <= c.high_kg
        errors[c.day].append(err)
        run_rate_errors[c.day].append(rr_err)
        inside[c.day].append(hit)
        print(
            f"  {c.month:8} {c.day:3d} {c.node:10} {total / 1000:9.2f} {c.forecast_kg / 1000:10.2f} "
            f"{c.low_kg / 1000:8.2f} {c.high_kg / 1000:8.2f} {err:6.2f} {'y' if hit else 'n':>3} "
            f"{c.run_rate_kg / 1000:10.2f} {rr_err:6.2f}"
        )
    methods = sorted({c.method for c in run.checkpoints})
    all_inside = [hit for day in CHECK_DAYS for hit in inside[day]]
    summary = {
        day: (
            statistics.fmean(errors[day]),
            statistics.fmean(run_rate_errors[day]),
            statistics.fmean(inside[day]),
        )
        for day in CHECK_DAYS
    }
    print(
        f"  {'':14} {'MAPE %':>8} {'run-rate MAPE %':>16} {'coverage':>9}   (methods: {', '.join(methods)})"
    )
    for day, (mape, rr_mape, cover) in summary.items():
        print(f"  at end of day {day:<2} {mape:8.2f} {rr_mape:16.2f} {cover:9.2f}")

    scored_months = len({c.month for c in run.checkpoints})
    result = {
        "ledger_readings_per_s": round(ledger_rate),
        "reference_loop_per_s": round(reference_rate),
        "ledger_to_reference_ratio": round(ledger_rate / reference_rate, 4),
        "ledger_compute_s": round(compute_s, 4),
        "ledger_rows": ingest.rows,
        "readings": ingest.readings,
        "forecast_mape_day10": round(summary[10][0], 3),
        "forecast_mape_day20": round(summary[20][0], 3),
        "runrate_mape_day10": round(summary[10][1], 3),
        "runrate_mape_day20": round(summary[20][1], 3),
        "interval_coverage": round(statistics.fmean(all_inside), 3),
        "interval_coverage_day10": round(summary[10][2], 3),
        "interval_coverage_day20": round(summary[20][2], 3),
        "months": scored_months,
        "months_simulated": args.months,
        "nodes": len(nodes),
        "node_ids": nodes,
        "step_s": args.step_s,
        "seed_offset": args.seed_offset,
        "simulate_s": round(run.simulate_s, 1),
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
