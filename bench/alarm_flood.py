"""Alarm flood: 1,000 points trip within one minute on one console; does the console stay readable?

The site: one group, 2 parks, 4 enterprises, 20 workshops, 200 devices with 5 limit alarms each
(the flood points), plus ``--background`` alarms on 20 more devices that trip now and then (about
six per 10 minutes in all) and two that chatter. Every alarm annunciates on one control-room console.
Each point is sampled every ``--sample-s`` seconds (with its own phase) for ``--minutes`` of
simulated time; at minute 20 every flood point trips at a random instant within one minute and
clears 5 to 15 minutes later. An operator acknowledges each console line (with its group) once a
minute. Time is simulated; only the wall time of the ``evaluate()`` calls is measured (timed in
runs between the once-a-second ticks, so the timer itself costs next to nothing per call).

Figures (last line ``RESULT {json}``):

- ``console_alarms_per_10min_max``: most alarms annunciated on the console in any sliding
  10-minute window (target <= 10, the ISA-18.2 flood limit);
- ``reference_alarms_per_10min_without_grouping``: the same count over every activation, i.e. what
  the console would show without grouping (measured from the same events);
- ``alarms_grouped``: activations shown under a group head instead of on their own line;
- ``events_per_s``: ``AlarmEngine.evaluate()`` calls per second on one core over the whole run
  (quiet samples, trips, clears and grouping included; ticks and acknowledgements left out);
  ``reference_compare_per_s``: a bare Python loop making the same threshold comparisons over the
  same samples, as the floor of the cost;
- flood and KPI figures: ``flood_time_s``, ``flood_periods_pct``, ``alarms_per_hour_avg``,
  ``chattering_alarms``; ``snapshot_bytes``, ``snapshot_ms`` (``snapshot()`` and its JSON) and
  ``restore_ms`` (JSON back and ``AlarmEngine.restore``): the state a restart keeps.

Usage: ``.venv/bin/python bench/alarm_flood.py [--minutes 60] [--sample-s 5] [--seed 1]``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anomaly.alarm_kpi import compute_kpis
from anomaly.alarm_model import AlarmDefinition, AlarmEvent, AlarmState
from anomaly.alarms import AlarmEngine

CONSOLE = "cr-main"
T0 = 1_772_438_400.0  # 2026-03-02 08:00 UTC
SETPOINT = 100.0
NORMAL_VALUE = 60.0
TRIP_VALUE = 130.0


def hierarchy() -> tuple[dict[str, str | None], list[str]]:
    parents: dict[str, str | None] = {"grp": None}
    workshops: list[str] = []
    for p in range(2):
        parents[f"park-{p}"] = "grp"
        for e in range(2):
            ent = f"ent-{p}{e}"
            parents[ent] = f"park-{p}"
            for w in range(5):
                ws = f"ws-{p}{e}{w}"
                parents[ws] = ent
                workshops.append(ws)
    return parents, workshops


def definitions(background: int, workshops: list[str]) -> tuple[list[AlarmDefinition], list[AlarmDefinition]]:
    flood = [
        AlarmDefinition(
            id=f"dev-{d:03d}.p{k}:h",
            point=f"dev-{d:03d}.p{k}",
            node=workshops[d % len(workshops)],
            console=CONSOLE,
            kind="h",
            priority=("high", "medium", "low", "low", "low")[k],
            setpoint=SETPOINT,
            deadband=2.0,
            on_delay_s=2.0 if k == 0 else 0.0,
        )
        for d in range(200)
        for k in range(5)
    ]
    quiet = [
        AlarmDefinition(
            id=f"bg-{b // 5:02d}.p{b % 5}:h",
            point=f"bg-{b // 5:02d}.p{b % 5}",
            node=workshops[b % len(workshops)],
            console=CONSOLE,
            kind="h",
            priority="medium",
            setpoint=SETPOINT,
            deadband=0.0 if b < 2 else 2.0,  # the first two have no deadband: they chatter
        )
        for b in range(background)
    ]
    return flood, quiet


def samples(
    args: argparse.Namespace, flood: list[AlarmDefinition], quiet: list[AlarmDefinition], rng: random.Random
) -> list[tuple[str, float, float]]:
    """Return every (alarm id, value, time) the run evaluates, in time order."""
    end_s = T0 + args.minutes * 60.0
    trip_start = T0 + 20 * 60.0
    highs: dict[str, list[tuple[float, float]]] = {}
    for d in flood:
        at = trip_start + rng.uniform(0.0, 60.0)
        highs[d.id] = [(at, at + rng.uniform(300.0, 900.0))]
    rate_per_s = 6.0 / 600.0 / max(1, len(quiet) - 2)  # about six background trips per 10 minutes
    for i, d in enumerate(quiet):
        spans: list[tuple[float, float]] = []
        if i < 2:  # chatter: 5 s above, 5 s below, for 5 minutes from minute 40
            start = T0 + 40 * 60.0 + 7.0 * i
            spans = [(start + 10.0 * j, start + 10.0 * j + 5.0) for j in range(30)]
        else:
            t = T0 + rng.expovariate(rate_per_s)
            while t < end_s:
                spans.append((t, t + rng.uniform(30.0, 120.0)))
                t += rng.expovariate(rate_per_s)
        highs[d.id] = spans
    out: list[tuple[str, float, float]] = []
    period = args.sample_s
    for d in flood + quiet:
        phase = rng.uniform(0.0, period)
        spans = highs[d.id]
        t = T0 + phase
        while t < end_s:
            high = any(a <= t < b for a, b in spans)
            noise = rng.uniform(-1.0, 1.0)
            out.append((d.id, (TRIP_VALUE if high else NORMAL_VALUE) + noise, t))
            t += period
    out.sort(key=lambda s: s[2])
    return out


def max_in_sliding_window(times: list[float], window_s: float) -> int:
    best, inside = 0, deque[float]()
    for t in sorted(times):
        inside.append(t)
        while inside[0] <= t - window_s:
            inside.popleft()
        best = max(best, len(inside))
    return best


def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    parents, workshops = hierarchy()
    flood, quiet = definitions(args.background, workshops)
    defs = flood + quiet
    stream = samples(args, flood, quiet, rng)
    engine = AlarmEngine(defs, parents=parents)
    events: list[AlarmEvent] = []
    evaluate, tick, ack = engine.evaluate, engine.tick, engine.acknowledge
    next_tick = T0 + 1.0
    next_ack = T0 + 60.0
    busy_s = 0.0
    started = time.perf_counter()
    for alarm_id, value, at in stream:
        if at >= next_tick or at >= next_ack:  # the clock stops here, not around every sample
            busy_s += time.perf_counter() - started
            if at >= next_tick:
                events += tick(next_tick)
                next_tick += 1.0
            if at >= next_ack:  # the operator works the console once a minute
                for line in engine.console_view(CONSOLE, at=next_ack).lines:
                    if line.state.ackable:
                        events += ack(line.alarm_id, at=next_ack, by="op.bench", with_group=True)
                next_ack += 60.0
            started = time.perf_counter()
        events += evaluate(alarm_id, value, at)
    busy_s += time.perf_counter() - started

    # Reference: the bare comparisons the engine must make at least, over the same samples.
    setpoints = {d.id: d.setpoint for d in defs}
    started = time.perf_counter()
    over = 0
    for alarm_id, value, _ in stream:
        sp = setpoints[alarm_id]
        if sp is not None and value >= sp:
            over += 1
    reference_s = time.perf_counter() - started

    end_s = T0 + args.minutes * 60.0
    annunciated = [e.at.timestamp() for e in events if e.annunciated]
    activations = [e.at.timestamp() for e in events if e.is_activation]
    kpis = compute_kpis(events, console=CONSOLE, start=T0, end=end_s)
    started = time.perf_counter()
    saved = json.dumps(engine.snapshot())
    snapshot_ms = 1000.0 * (time.perf_counter() - started)
    started = time.perf_counter()
    restored = AlarmEngine.restore(json.loads(saved), defs, parents=parents)
    restore_ms = 1000.0 * (time.perf_counter() - started)
    assert restored.statuses() == engine.statuses()
    return {
        "alarms": len(defs),
        "flood_points": len(flood),
        "background_alarms": len(quiet),
        "simulated_minutes": args.minutes,
        "evaluate_calls": len(stream),
        "alarm_events": len(events),
        "activations": len(activations),
        "console_alarms_per_10min_max": max_in_sliding_window(annunciated, 600.0),
        "reference_alarms_per_10min_without_grouping": max_in_sliding_window(activations, 600.0),
        "alarms_grouped": sum(1 for e in events if e.is_activation and not e.annunciated),
        "events_per_s": round(len(stream) / busy_s),
        "reference_compare_per_s": round(len(stream) / reference_s),
        "evaluate_us": round(1e6 * busy_s / len(stream), 2),
        "samples_over_setpoint": over,
        "flood_time_s": round(engine.flood_time_s(CONSOLE, end_s), 1),
        "floods": len(engine.flood_intervals(CONSOLE)) + int(engine.in_flood(CONSOLE)),
        "flood_periods_pct": round(kpis.flood_periods_pct, 1),
        "alarms_per_hour_avg": round(kpis.alarms_per_hour_avg, 1),
        "annunciated_per_10min_peak_aligned": kpis.annunciated_per_10min_peak,
        "chattering_alarms": len(kpis.chattering),
        "still_visible": sum(
            1 for s in engine.statuses(CONSOLE) if s.state in (AlarmState.ACTIVE_UNACK, AlarmState.RTN_UNACK)
        ),
        "snapshot_bytes": len(saved),
        "snapshot_ms": round(snapshot_ms, 1),
        "restore_ms": round(restore_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=60, help="simulated minutes (default 60)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="sample period per point, s (default 5)")
    parser.add_argument("--background", type=int, default=100, help="background alarms (default 100)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.minutes < 22:
        parser.error("--minutes must be >= 22: the flood starts at minute 20")
    result = run(args)
    print(
        f"console: {result['console_alarms_per_10min_max']} alarms / 10 min annunciated "
        f"(without grouping {result['reference_alarms_per_10min_without_grouping']}), "
        f"{result['alarms_grouped']} grouped; evaluate() {result['events_per_s']}/s "
        f"(bare comparison {result['reference_compare_per_s']}/s)"
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
