"""Event-based detection quality of the anomaly detectors on the simulated example plant, offline.

The example plant (``examples/plant.yaml``) is simulated with the real device physics, stepped every
``--step-s`` seconds for ``--days`` days from 2026-03-02 00:00 site time, no services needed. Every
electrical load with an ``active_power_kw`` point (production lines, compressors, chillers, HVAC,
lighting, boilers' auxiliaries; not PV, not the battery, not the meters that sum other devices) gets a
seeded random anomaly schedule in its ``simulation`` section: ``random_anomalies`` with ``per_day``
(``--per-day``) anomalies of the five kinds (spike, stuck, drift, level_shift, night_load), each device
with its own seed and its own size, drawn once per device from ``--magnitude-pct`` (20-60 % of the
value at the anomaly's start by default). Every other anomaly of the document is removed, so the
plant's labels (:attr:`SimulatedPlant.labels`) are the complete ground truth.

Each load's ``active_power_kw`` feeds one :class:`PointMonitor` (``power_kw=True``) per detector with
every step's reported value:

- the detector under test: ``build_detector({"kind": "ensemble"})`` unless ``--detector`` gives a
  spec (``--threshold`` overrides its threshold);
- alternatives, unless ``--no-alternatives``: ``robust_z``, ``forecast`` (Holt-Winters, level
  only) and ``profile`` (time of day) with their default settings; river's SNARIMAX (the
  ``forecast`` default) is left out for its cost, milliseconds a row (``--detector
  '{"kind": "forecast"}'`` runs it; the per-detector seconds printed show what it costs);
- the reference, measured in the same run: a plain rolling z-score (mean and standard deviation of
  the previous 60 rows, active when ``|z| >= 4``, learning every row), through the same monitor.

Every monitor gets ``relearn_after_s`` (``--relearn-after-s``, 3600 s): with the monitor's default
(never), a flat-baseline detector (``robust_z``, ``forecast``) that sees the first shift change never
learns the new level and stays active for the rest of the shift or longer (run with
``--relearn-after-s inf`` and read their ``active_fraction``), which makes episodes few, long and
meaningless. The price: excess energy is only counted for the first ``relearn_after_s`` of a
longer anomaly. The ensemble (which learns again after its refractory rows) and the reference
(which always learns) are not affected by it.

Scoring, event-based as operators see it, after a warm-up (``--warmup-days``, 2 by default: labels
that start and episodes that begin in it are not scored; the detectors start fresh at the start):

- an *episode* is a maximal run of active rows on a point; runs less than 5 min apart are merged;
- a label is *detected* when its point's monitor goes active (a run of active rows begins) in
  ``[start, end + grace]`` (``--grace-s``, 600 s); the detection delay is the first such onset
  minus ``start``. A monitor that was already active when the anomaly began has not detected it;
- an episode is a true positive when it overlaps the window ``[start, end + grace]`` of any label
  on its point (warm-up labels included), otherwise a false positive;
- precision = true-positive episodes / episodes; recall = detected labels / labels (also per type),
  ``recall_within_1h`` the share detected within an hour of the start (a night_load window is 8 h
  long and holds the morning shift change, which a detector may flag without seeing the load);
  ``active_fraction`` is the share of scored rows that were active (a detector that is always
  active overlaps every label: few episodes, good precision, no use to an operator);
- excess energy (``level_shift`` and ``night_load``, the kinds that are a real extra load of
  ``magnitude`` kW over known hours): the truth is ``magnitude x hours`` of the label's interval
  (a night_load label is one night) within the simulated span; the estimate is the sum of the
  monitor's ``excess_kwh`` (the value at the last active row of each run) over the runs that begin
  while the extra load is on (a run that begins in the grace after the end is the return to
  normal: its excess is negative). Median absolute percentage error over the labels with such a
  run whose window overlaps no other label on the point (``excess_kwh_mape``).
  ``excess_kwh_mape_in_episode`` compares the same estimate with ``magnitude x`` the hours those
  runs overlap the label, i.e. how good the baseline is while the monitor is active, whatever the
  episode's length.

Usage::

    .venv/bin/python bench/anomaly_plant.py [--days 14] [--step-s 60] [--detector JSON]
        [--threshold T] [--warmup-days 2] [--grace-s 600] [--per-day 0.4]
        [--magnitude-pct 20 60] [--seed 1] [--relearn-after-s 3600] [--no-alternatives]

Last line: ``RESULT {json}`` (figures of the detector under test, ``reference`` the z-score, and
``alternatives`` the other detectors).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import random
import statistics
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anomaly.detectors import Detector, PointMonitor, build_detector
from scada.config import load_site
from simulators.anomalies import AnomalyLabel, AnomalyType
from simulators.plant import MAX_LABELS_KEPT, SimulatedPlant

SITE_FILE = Path(__file__).resolve().parent.parent / "examples" / "plant.yaml"
MQTT_URL = "mqtt://127.0.0.1:1883"  # the plant needs a broker URL for its MQTT devices; nothing connects
POINT = "active_power_kw"
FIRST_DAY = (2026, 3, 2)
"""Local date the simulation starts on (a Monday)."""
NOT_LOADS = frozenset({"pv_inverter", "battery"})
"""Device kinds whose power is generation or storage, not an electrical load."""
MERGE_GAP_S = 300.0
"""Active runs of one point less than this apart form one episode."""
ENERGY_TYPES = (AnomalyType.LEVEL_SHIFT, AnomalyType.NIGHT_LOAD)
DEFAULT_SPEC: dict[str, Any] = {"kind": "ensemble"}
ALTERNATIVES: dict[str, dict[str, Any]] = {
    "robust_z": {"kind": "robust_z"},
    "forecast_hw": {"kind": "forecast", "model": "holt_winters"},
    "profile": {"kind": "profile"},
}
REFERENCE_NAME = "zscore_ref"


# -- the reference detector -----------------------------------------------------------------------


class RollingZScore:
    """Plain rolling z-score: |value - mean| / std over the previous ``window`` rows.

    Scores ``0.5 * |z| / z_limit`` (capped at 1), so the threshold 0.5 means ``|z| >= z_limit``; it
    learns every row, anomalous or not, as the textbook rolling z-score does. The mean is also its
    baseline, so :class:`PointMonitor` can account its excess energy like any detector's.

    >>> det = RollingZScore(window=4, z_limit=4.0)
    >>> [round(det.update(float(i), v), 3) for i, v in enumerate([1.0, 2.0, 1.0, 2.0, 1.5, 9.0])]
    [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    """

    kind: ClassVar[str] = "rolling_zscore"

    def __init__(self, *, window: int = 60, z_limit: float = 4.0, min_std: float = 1e-6) -> None:
        self.window, self.z_limit, self.min_std = window, z_limit, min_std
        self.threshold = 0.5
        self._values: deque[float] = deque()
        self._sum = 0.0
        self._sum_sq = 0.0

    def _z(self, value: float) -> float:
        n = len(self._values)
        mean = self._sum / n
        var = max(self._sum_sq / n - mean * mean, 0.0)
        return abs(value - mean) / max(math.sqrt(var), self.min_std)

    def score_one(self, ts_s: float, value: float) -> float:
        """Score the row against the window; 0 until the window is full."""
        if len(self._values) < self.window:
            return 0.0
        return min(1.0, 0.5 * self._z(value) / self.z_limit)

    def learn_one(self, ts_s: float, value: float) -> None:
        """Slide the window."""
        if len(self._values) == self.window:
            old = self._values.popleft()
            self._sum -= old
            self._sum_sq -= old * old
        self._values.append(value)
        self._sum += value
        self._sum_sq += value * value

    def update(self, ts_s: float, value: float) -> float:
        """Score, then learn the row whatever its score."""
        score = self.score_one(ts_s, value)
        self.learn_one(ts_s, value)
        return score

    def expected_one(self, ts_s: float) -> float:
        """Return the window's mean (``nan`` before the first row)."""
        return self._sum / len(self._values) if self._values else math.nan

    def to_state(self) -> dict[str, Any]:
        """Parameters and the window (the protocol asks for it; the bench does not restore)."""
        return {
            "kind": self.kind,
            "params": {"window": self.window, "z_limit": self.z_limit, "min_std": self.min_std},
            "values": list(self._values),
        }


# -- the plant document ---------------------------------------------------------------------------


def monitored_loads(doc: Mapping[str, Any]) -> list[str]:
    """Return the electrical loads with an ``active_power_kw`` point that sum no other device."""
    loads = []
    for device in doc["devices"]:
        keys = {point["key"] for point in device.get("points") or ()}
        simulation = device.get("simulation") or {}
        if POINT in keys and device["kind"] not in NOT_LOADS and not simulation.get("sums"):
            loads.append(str(device["id"]))
    return loads


def with_random_anomalies(
    doc: Mapping[str, Any],
    loads: Sequence[str],
    *,
    per_day: float,
    magnitude_pct: tuple[float, float],
    seed: int,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Return a copy of ``doc`` where only ``loads`` carry anomalies: a seeded random schedule each.

    A schedule is a pure function of (seed, day), so every device gets its own seed; its size (%
    of the value at each anomaly's start) is drawn once per device from ``magnitude_pct``.
    """
    out = copy.deepcopy(dict(doc))
    rng = random.Random(seed)
    sizes: dict[str, float] = {}
    wanted = set(loads)
    for device in out["devices"]:
        simulation = device.get("simulation")
        if not isinstance(simulation, dict):
            if device["id"] in wanted:
                raise ValueError(f"device {device['id']!r}: no simulation section to add anomalies to")
            continue
        simulation["anomalies"] = []
        simulation["random_anomalies"] = None
        if device["id"] not in wanted:
            continue
        pct = round(rng.uniform(*magnitude_pct), 1)
        sizes[device["id"]] = pct
        simulation["random_anomalies"] = {
            "per_day": per_day,
            "types": [t.value for t in AnomalyType],
            "points": [POINT],
            "magnitude_pct": pct,
            "seed": zlib.crc32(f"{seed}:{device['id']}".encode()) & 0x7FFF_FFFF,
        }
    return out, sizes


# -- simulation and episode bookkeeping -----------------------------------------------------------


@dataclass(slots=True)
class Run:
    """A maximal run of active rows: first and last active time, the monitor's excess at the end."""

    start_s: float
    end_s: float
    excess_kwh: float


@dataclass(slots=True)
class Track:
    """One monitor on one point, and the active runs it produced."""

    monitor: PointMonitor
    runs: list[Run] = field(default_factory=list)
    open_run: Run | None = None

    def feed(self, ts_s: float, value: float) -> None:
        verdict = self.monitor.update(ts_s, value)
        if verdict.active:
            if self.open_run is None:
                self.open_run = Run(ts_s, ts_s, verdict.excess_kwh)
            else:
                self.open_run.end_s = ts_s
                self.open_run.excess_kwh = verdict.excess_kwh
        elif self.open_run is not None:
            self.runs.append(self.open_run)
            self.open_run = None

    def close(self) -> None:
        if self.open_run is not None:
            self.runs.append(self.open_run)
            self.open_run = None


@dataclass(slots=True)
class Simulation:
    labels: list[AnomalyLabel]
    runs: dict[str, dict[str, list[Run]]]
    """detector name -> device -> runs."""
    steps: int
    simulate_s: float
    detector_s: dict[str, float]
    first_s: float
    last_s: float
    step_s: int


def simulate(
    doc: Mapping[str, Any],
    loads: Sequence[str],
    factories: Mapping[str, Callable[[], Detector]],
    *,
    start: datetime,
    days: float,
    step_s: int,
    relearn_after_s: float,
) -> Simulation:
    """Step the plant and feed every load's power to one fresh monitor per detector."""
    plant = SimulatedPlant.from_document(doc, mqtt_url=MQTT_URL, start=start)
    sources = [(device, plant.device(device)) for device in loads]
    tracks = {
        name: {
            device: Track(PointMonitor(factory(), power_kw=True, relearn_after_s=relearn_after_s))
            for device in loads
        }
        for name, factory in factories.items()
    }
    detector_s = dict.fromkeys(factories, 0.0)
    steps = int(days * 86400 // step_s) + 1
    step = timedelta(seconds=step_s)
    t0 = time.perf_counter()
    now = start
    for _ in range(steps):
        plant.step_physics(now)
        ts_s = now.timestamp()
        values = [(device, physics.value(POINT)) for device, physics in sources]
        for name, by_device in tracks.items():
            t1 = time.perf_counter()
            for device, value in values:
                by_device[device].feed(ts_s, value)
            detector_s[name] += time.perf_counter() - t1
        now += step
    labels = list(plant.labels)
    if len(labels) >= MAX_LABELS_KEPT:
        raise RuntimeError(f"{len(labels)} labels: the plant may have dropped some; simulate fewer days")
    runs: dict[str, dict[str, list[Run]]] = {}
    for name, by_device in tracks.items():
        runs[name] = {}
        for device, track in by_device.items():
            track.close()
            runs[name][device] = track.runs
    return Simulation(
        labels=labels,
        runs=runs,
        steps=steps,
        simulate_s=time.perf_counter() - t0,
        detector_s=detector_s,
        first_s=start.timestamp(),
        last_s=(now - step).timestamp(),
        step_s=step_s,
    )


# -- scoring --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Episode:
    """Merged runs of one point."""

    start_s: float
    end_s: float
    runs: list[Run]


def episodes_of(runs: Iterable[Run], merge_gap_s: float) -> list[Episode]:
    """Merge runs less than ``merge_gap_s`` apart into episodes.

    >>> [(e.start_s, e.end_s) for e in episodes_of([Run(0, 60, 0), Run(120, 120, 0), Run(900, 960, 0)], 300)]
    [(0, 120), (900, 960)]
    """
    out: list[Episode] = []
    for run in runs:
        if out and run.start_s - out[-1].end_s < merge_gap_s:
            out[-1].end_s = run.end_s
            out[-1].runs.append(run)
        else:
            out.append(Episode(run.start_s, run.end_s, [run]))
    return out


def _overlap_s(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _mape(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Median absolute percentage error of (estimate, truth) pairs (None when there are none)."""
    if not pairs:
        return None
    return statistics.median(abs(est - truth) / truth * 100.0 for est, truth in pairs)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


@dataclass(slots=True)
class LabelOutcome:
    label: AnomalyLabel
    delay_s: float | None
    excess_pair: tuple[float, float] | None
    """(estimate kWh, truth kWh) over the whole label."""
    in_episode_pair: tuple[float, float] | None
    """(estimate kWh, truth kWh while active)."""


def score(
    sim: Simulation,
    name: str,
    loads: Sequence[str],
    *,
    score_from_s: float,
    grace_s: float,
) -> dict[str, Any]:
    """Return the event-based figures of one detector."""
    by_point: dict[str, list[AnomalyLabel]] = {device: [] for device in loads}
    for label in sim.labels:
        if label.point == POINT and label.device in by_point:
            by_point[label.device].append(label)
    outcomes: list[LabelOutcome] = []
    episodes = true_positive = 0
    active_rows = 0.0
    for device in loads:
        labels = by_point[device]
        windows = [(lab.start.timestamp(), lab.end.timestamp() + grace_s) for lab in labels]
        device_episodes = episodes_of(sim.runs[name][device], MERGE_GAP_S)
        for ep in device_episodes:
            if ep.start_s < score_from_s:
                continue
            episodes += 1
            active_rows += sum((run.end_s - run.start_s) / sim.step_s + 1.0 for run in ep.runs)
            if any(ep.start_s <= w1 and ep.end_s >= w0 for w0, w1 in windows):
                true_positive += 1
        for index, label in enumerate(labels):
            w0, w1 = windows[index]
            if w0 < score_from_s:
                continue
            hits = [ep for ep in device_episodes if ep.start_s <= w1 and ep.end_s >= w0]
            first = [run.start_s for ep in hits for run in ep.runs if w0 <= run.start_s <= w1]
            delay_s = min(first) - w0 if first else None
            excess_pair = in_episode_pair = None
            isolated = all(not (o0 <= w1 and o1 >= w0) for j, (o0, o1) in enumerate(windows) if j != index)
            if delay_s is not None and isolated and label.type in ENERGY_TYPES and label.magnitude:
                end_s = min(label.end.timestamp(), sim.last_s)
                # Runs that begin while the extra load is on claim it; a run beginning in the grace
                # after the end is the return to normal (its excess is negative), not the estimate.
                claimed = [run for ep in hits for run in ep.runs if w0 <= run.start_s < end_s]
                truth_kwh = label.magnitude * max(0.0, end_s - w0) / 3600.0
                estimate_kwh = sum(run.excess_kwh for run in claimed)
                if claimed and truth_kwh > 0.0:
                    excess_pair = (estimate_kwh, truth_kwh)
                active_s = sum(_overlap_s(run.start_s, run.end_s, w0, end_s) for run in claimed)
                if active_s > 0.0:
                    in_episode_pair = (estimate_kwh, label.magnitude * active_s / 3600.0)
            outcomes.append(LabelOutcome(label, delay_s, excess_pair, in_episode_pair))
    figures = summarise(outcomes, episodes, true_positive, len(loads), sim, score_from_s)
    scored_rows = len(loads) * ((sim.last_s - score_from_s) / sim.step_s + 1.0)
    figures["active_fraction"] = _r(active_rows / scored_rows, 4) if scored_rows > 0 else None
    return figures


def _figures(outcomes: Sequence[LabelOutcome]) -> dict[str, Any]:
    detected = [o for o in outcomes if o.delay_s is not None]
    excess = [o.excess_pair for o in outcomes if o.excess_pair is not None]
    in_episode = [o.in_episode_pair for o in outcomes if o.in_episode_pair is not None]
    return {
        "labels": len(outcomes),
        "detected": len(detected),
        "recall": _r(len(detected) / len(outcomes)) if outcomes else None,
        "recall_within_1h": _r(
            sum(1 for o in detected if o.delay_s is not None and o.delay_s <= 3600.0) / len(outcomes)
        )
        if outcomes
        else None,
        "median_detection_delay_s": _r(_median([o.delay_s for o in detected if o.delay_s is not None]), 1),
        "excess_kwh_mape": _r(_mape(excess), 1),
        "excess_kwh_n": len(excess),
        "excess_kwh_mape_in_episode": _r(_mape(in_episode), 1),
        "excess_kwh_in_episode_n": len(in_episode),
    }


def summarise(
    outcomes: Sequence[LabelOutcome],
    episodes: int,
    true_positive: int,
    points: int,
    sim: Simulation,
    score_from_s: float,
) -> dict[str, Any]:
    scored_days = (sim.last_s - score_from_s) / 86400.0
    overall = _figures(outcomes)
    false_positive = episodes - true_positive
    return {
        "labels": overall["labels"],
        "precision": _r(true_positive / episodes) if episodes else None,
        "recall": overall["recall"],
        "recall_within_1h": overall["recall_within_1h"],
        "median_detection_delay_s": overall["median_detection_delay_s"],
        "excess_kwh_mape": overall["excess_kwh_mape"],
        "excess_kwh_n": overall["excess_kwh_n"],
        "excess_kwh_mape_in_episode": overall["excess_kwh_mape_in_episode"],
        "detected": overall["detected"],
        "episodes": episodes,
        "true_positive_episodes": true_positive,
        "false_positive_episodes": false_positive,
        "false_positives_per_point_day": _r(false_positive / (points * scored_days))
        if scored_days > 0
        else None,
        "per_type": {t.value: _figures([o for o in outcomes if o.label.type is t]) for t in AnomalyType},
    }


# -- output ---------------------------------------------------------------------------------------


def _cell(x: Any, width: int) -> str:
    if x is None:
        return f"{'-':>{width}}"
    if isinstance(x, float):
        return f"{x:>{width}.{3 if abs(x) < 10 else 1}f}"
    return f"{x!s:>{width}}"


def print_table(name: str, figures: Mapping[str, Any]) -> None:
    print(
        f"{name}: {figures['episodes']} episodes, {figures['true_positive_episodes']} true positive, "
        f"{figures['false_positive_episodes']} false positive "
        f"({_cell(figures['false_positives_per_point_day'], 0).strip()}/point-day); "
        f"precision {_cell(figures['precision'], 0).strip()}; active on "
        f"{100.0 * (figures['active_fraction'] or 0.0):.1f} % of the scored rows"
    )
    head = (
        "type",
        "labels",
        "detected",
        "recall",
        "in 1 h",
        "delay s",
        "kWh MAPE %",
        "n",
        "in-ep MAPE %",
        "n",
    )
    widths = (12, 7, 9, 7, 7, 9, 11, 4, 13, 4)
    print("  " + " ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    rows = [*figures["per_type"].items(), ("all", _figures_row(figures))]
    for label, f in rows:
        cells = (
            label,
            f["labels"],
            f["detected"],
            f["recall"],
            f["recall_within_1h"],
            f["median_detection_delay_s"],
            f["excess_kwh_mape"],
            f["excess_kwh_n"],
            f["excess_kwh_mape_in_episode"],
            f.get("excess_kwh_in_episode_n"),
        )
        print("  " + " ".join(_cell(c, w) for c, w in zip(cells, widths, strict=True)))


def _figures_row(figures: Mapping[str, Any]) -> dict[str, Any]:
    in_episode_n = sum(f["excess_kwh_in_episode_n"] for f in figures["per_type"].values())
    return {**figures, "excess_kwh_in_episode_n": in_episode_n}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--days", type=float, default=14.0, help="simulated days (default 14)")
    parser.add_argument("--step-s", type=int, default=60, help="simulation step and sampling, seconds")
    parser.add_argument("--detector", type=json.loads, default=None, help="detector spec as JSON")
    parser.add_argument("--threshold", type=float, default=None, help="override the detector's threshold")
    parser.add_argument("--warmup-days", type=float, default=2.0, help="days not scored (default 2)")
    parser.add_argument("--grace-s", type=float, default=600.0, help="detection grace after a label's end")
    parser.add_argument("--per-day", type=float, default=0.4, help="random anomalies per device and day")
    parser.add_argument(
        "--magnitude-pct", type=float, nargs=2, default=(20.0, 60.0), metavar=("MIN", "MAX"),
        help="range of anomaly sizes, %% of the value at the start (one size per device)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1, help="seed of the anomaly schedules and sizes")
    parser.add_argument(
        "--relearn-after-s", type=float, default=3600.0,
        help="PointMonitor relearn_after_s of every monitor (default 3600; 'inf': never)",
    )  # fmt: skip
    parser.add_argument("--no-alternatives", action="store_true", help="skip robust_z, forecast and profile")
    args = parser.parse_args(argv)
    if not args.days > args.warmup_days >= 0:
        parser.error("--days must be larger than --warmup-days >= 0")
    if not 1 <= args.step_s <= 3600:
        parser.error("--step-s must be in 1..3600")
    low_pct, high_pct = args.magnitude_pct
    if not 0 < low_pct <= high_pct:
        parser.error("--magnitude-pct needs 0 < MIN <= MAX")
    if args.detector is not None and not isinstance(args.detector, dict):
        parser.error('--detector must be a JSON object, e.g. \'{"kind": "robust_z"}\'')
    spec = dict(DEFAULT_SPEC if args.detector is None else args.detector)
    if args.threshold is not None:
        spec["threshold"] = args.threshold
    try:
        build_detector(spec)
    except ValueError as err:
        parser.error(f"--detector: {err}")
    name = str(spec.get("kind", "detector"))

    site = load_site(SITE_FILE)
    zone = ZoneInfo(site.site.timezone)
    loads = monitored_loads(site.model_dump(mode="json"))
    doc, sizes = with_random_anomalies(
        site.model_dump(mode="json"),
        loads,
        per_day=args.per_day,
        magnitude_pct=(low_pct, high_pct),
        seed=args.seed,
    )
    start = datetime(*FIRST_DAY, tzinfo=zone).astimezone(UTC)
    factories: dict[str, Callable[[], Detector]] = {name: functools.partial(build_detector, spec)}
    if not args.no_alternatives:
        for alt_name, alt_spec in ALTERNATIVES.items():
            if alt_name == name:
                continue
            factories[alt_name] = functools.partial(build_detector, alt_spec)
    factories[REFERENCE_NAME] = RollingZScore
    print(
        f"plant {SITE_FILE.name}: {len(loads)} loads monitored ({POINT}), {args.days:g} days from "
        f"{start.astimezone(zone):%Y-%m-%d %H:%M} {zone.key}, step {args.step_s} s; random anomalies "
        f"{args.per_day:g}/device-day, sizes {min(sizes.values()):.0f}-{max(sizes.values()):.0f} % "
        f"(seed {args.seed})"
    )
    print(f"detector under test: {json.dumps(spec)}; detectors: {', '.join(factories)}")
    sim = simulate(
        doc, loads, factories, start=start, days=args.days, step_s=args.step_s,
        relearn_after_s=args.relearn_after_s,
    )  # fmt: skip
    score_from_s = sim.first_s + args.warmup_days * 86400.0
    print(
        f"  {sim.steps:,} steps in {sim.simulate_s:.0f} s ("
        + ", ".join(f"{n} {s:.1f} s" for n, s in sim.detector_s.items())
        + f"); {len(sim.labels)} labels in all"
    )
    print(
        f"warm-up: the first {args.warmup_days:g} days are not scored (labels starting and episodes "
        f"beginning before {datetime.fromtimestamp(score_from_s, zone):%Y-%m-%d %H:%M}); grace "
        f"{args.grace_s:g} s, episodes merge runs < {MERGE_GAP_S:g} s apart"
    )
    results = {n: score(sim, n, loads, score_from_s=score_from_s, grace_s=args.grace_s) for n in factories}
    for n, figures in results.items():
        print_table(n, figures)

    keys = (
        "labels",
        "precision",
        "recall",
        "median_detection_delay_s",
        "excess_kwh_mape",
        "recall_within_1h",
    )
    extra = ("excess_kwh_mape_in_episode", "false_positives_per_point_day", "episodes", "active_fraction")

    def brief(figures: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **{k: figures[k] for k in (*keys, *extra)},
            "per_type": {
                t: {
                    k: f[k]
                    for k in (
                        "labels",
                        "recall",
                        "recall_within_1h",
                        "median_detection_delay_s",
                        "excess_kwh_mape",
                    )
                }
                for t, f in figures["per_type"].items()
            },
        }

    main_figures = results[name]
    result: dict[str, Any] = {
        **{k: main_figures[k] for k in (*keys, *extra)},
        "per_type": brief(main_figures)["per_type"],
        "reference": brief(results[REFERENCE_NAME]),
        "alternatives": {n: brief(results[n]) for n in factories if n not in (name, REFERENCE_NAME)},
        "detector": spec,
        "days": args.days,
        "step_s": args.step_s,
        "warmup_days": args.warmup_days,
        "grace_s": args.grace_s,
        "points": len(loads),
        "per_day": args.per_day,
        "seed": args.seed,
        "relearn_after_s": None if math.isinf(args.relearn_after_s) else args.relearn_after_s,
        "simulate_s": round(sim.simulate_s, 1),
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
