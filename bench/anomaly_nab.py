"""NAB score and throughput of the default anomaly detector (``anomaly.detectors.EnsembleDetector``).

Runs the default detector configuration (``build_detector({"kind": "ensemble"})``, one
configuration for every file, a fresh detector per file fed only ``(timestamp, value)`` rows in
order) through the independent NAB v1.1 scorer ``nab_score.py`` on the NAB data subset, and scores
it twice: at NAB's optimised threshold and at ``SHIPPED_THRESHOLD``, the threshold the detector
alarms at in production. References measured in the same run and scored the same way:

- ``rolling_zscore``: |z| of each value against the mean and standard deviation of the previous
  300 values (score ``min(1, |z| / 10)``);
- ``river_hst``: river's documented HalfSpaceTrees pipeline (``MinMaxScaler | HalfSpaceTrees``,
  seed 42) on the value alone (``--no-hst`` skips it: it is the slow one).

Throughput (``updates_per_s``): ``EnsembleDetector.update`` over every NAB row in this process
(one core), a fresh detector per file; ``monitor_updates_per_s`` the same through
``PointMonitor`` (score, learn, excess-energy bookkeeping); ``reference_zscore_updates_per_s``
the rolling z-score reference over the same rows.

The scorer needs pandas (not a project dependency): run this with a Python that has the project
and pandas importable. ``nab_score.py`` can also score the factory directly::

    python /work/shared/tools/nab_score.py --detector bench/anomaly_nab.py:make_detector

Usage: ``python bench/anomaly_nab.py [--tools DIR] [--data DIR] [--jobs 2] [--no-hst]``.
Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anomaly.detectors import EnsembleDetector, PointMonitor, build_detector

DEFAULT_TOOLS = Path(os.environ.get("NAB_TOOLS", "/work/shared/tools"))
DEFAULT_DATA = Path(os.environ.get("NAB_DATA", "/work/shared/nab-data"))
DEFAULT_SPEC: dict[str, Any] = {"kind": "ensemble"}
SHIPPED_THRESHOLD = EnsembleDetector().threshold


class _NabAdapter:
    """nab_score feeds ``score_one(datetime, value)`` once per row: that row's ``update``."""

    def __init__(self, detector: Any) -> None:
        self._detector = detector

    def score_one(self, timestamp: datetime, value: float) -> float:
        return float(self._detector.update(timestamp.timestamp(), value))


def make_detector() -> _NabAdapter:
    """The scored factory: the default detector configuration, fresh."""
    return _NabAdapter(build_detector(DEFAULT_SPEC))


class RollingZScore:
    """Reference: |z| against the previous ``window`` values (running sums, O(1) per row)."""

    def __init__(self, window: int = 300, min_rows: int = 30) -> None:
        self._values: deque[float] = deque(maxlen=window)
        self._sum = self._sum_sq = 0.0
        self._min_rows = min_rows

    def update(self, ts_s: float, value: float) -> float:
        n = len(self._values)
        score = 0.0
        if n >= self._min_rows:
            mean = self._sum / n
            var = max(self._sum_sq / n - mean * mean, 0.0)
            score = min(1.0, abs(value - mean) / (math.sqrt(var) or 1e-9) / 10.0)
        if n == self._values.maxlen:
            old = self._values[0]
            self._sum -= old
            self._sum_sq -= old * old
        self._values.append(value)
        self._sum += value
        self._sum_sq += value * value
        return score


def make_rolling_zscore() -> _NabAdapter:
    return _NabAdapter(RollingZScore())


class RiverHst:
    """Reference: river's documented HalfSpaceTrees pipeline on the value (score, then learn)."""

    def __init__(self) -> None:
        from river import anomaly, compose, preprocessing  # noqa: PLC0415 -- only this reference needs it

        self._model = compose.Pipeline(preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=42))

    def update(self, ts_s: float, value: float) -> float:
        x = {"value": value}
        score = float(self._model.score_one(x))
        self._model.learn_one(x)
        return score


def make_river_hst() -> _NabAdapter:
    return _NabAdapter(RiverHst())


def _score(
    ns: Any, name: str, files: list[Any], data: Path, jobs: int, profiles: dict[str, Any]
) -> dict[str, Any]:
    spec = f"{Path(__file__).resolve()}:{name}"
    t0 = time.perf_counter()
    scores, _timing = ns.run_detector(spec, files, data, jobs, verbose=False)
    wall_s = time.perf_counter() - t0
    optimised = ns.evaluate(files, scores, profiles)
    out: dict[str, Any] = {"wall_s": round(wall_s, 1)}
    for profile, res in optimised["profiles"].items():
        out[profile] = round(res["score"], 2)
    std = optimised["profiles"]["standard"]
    out["threshold"] = round(std["threshold"], 4)
    out["windows_detected"] = f"{std['windows_detected']}/{std['windows']}"
    out["fp_rows"] = std["fp_rows"]
    out["_scores"] = scores
    return out


def _throughput(rows_per_file: list[list[tuple[float, float]]], make: Any) -> float:
    total = sum(len(rows) for rows in rows_per_file)
    t0 = time.perf_counter()
    for rows in rows_per_file:
        update = make().update
        for ts_s, value in rows:
            update(ts_s, value)
    return total / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tools", type=Path, default=DEFAULT_TOOLS, help="directory holding nab_score.py")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="NAB data directory")
    ap.add_argument("--jobs", type=int, default=2, help="scoring processes (default 2)")
    ap.add_argument("--no-hst", action="store_true", help="skip the river HalfSpaceTrees reference")
    args = ap.parse_args()

    sys.path.insert(0, str(args.tools))
    ns = importlib.import_module("nab_score")
    files = ns.load_corpus(args.data)
    profiles = ns.load_profiles(args.data)

    default = _score(ns, "make_detector", files, args.data, args.jobs, profiles)
    shipped = ns.evaluate(files, default.pop("_scores"), profiles, {"standard": SHIPPED_THRESHOLD})
    shipped_std = shipped["profiles"]["standard"]
    zscore = _score(ns, "make_rolling_zscore", files, args.data, args.jobs, profiles)
    zscore.pop("_scores")
    hst: dict[str, Any] = {}
    if not args.no_hst:
        hst = _score(ns, "make_river_hst", files, args.data, args.jobs, profiles)
        hst.pop("_scores")

    import pandas as pd  # noqa: PLC0415 -- the scorer's dependency; only needed past this point

    rows_per_file = []
    for f in files:
        df = pd.read_csv(args.data / "data" / f.rel)
        stamps = pd.to_datetime(df["timestamp"]).astype("int64") / 1e9
        rows_per_file.append(list(zip(stamps.tolist(), df["value"].astype(float).tolist(), strict=True)))
    n_rows = sum(len(r) for r in rows_per_file)
    updates_per_s = _throughput(rows_per_file, lambda: build_detector(DEFAULT_SPEC))
    monitor_per_s = _throughput(
        rows_per_file, lambda: PointMonitor(build_detector(DEFAULT_SPEC), power_kw=True)
    )
    zscore_per_s = _throughput(rows_per_file, RollingZScore)

    print(f"default ensemble: {default}")
    print(
        f"  at shipped threshold {SHIPPED_THRESHOLD}: standard {shipped_std['score']:.2f}, "
        f"{shipped_std['windows_detected']}/{shipped_std['windows']} windows, "
        f"{shipped_std['fp_rows']} FP rows"
    )
    print(f"rolling z-score reference: {zscore}")
    if hst:
        print(f"river HalfSpaceTrees reference: {hst}")
    print(
        f"throughput over {n_rows} rows on one core: ensemble {updates_per_s:,.0f}/s, "
        f"PointMonitor {monitor_per_s:,.0f}/s, rolling z-score {zscore_per_s:,.0f}/s"
    )
    result = {
        "nab_standard_optimised": default["standard"],
        "nab_standard_shipped": round(shipped_std["score"], 2),
        "shipped_threshold": SHIPPED_THRESHOLD,
        "optimised_threshold": default["threshold"],
        "nab_low_fp_optimised": default["reward_low_FP_rate"],
        "nab_low_fn_optimised": default["reward_low_FN_rate"],
        "windows_detected_optimised": default["windows_detected"],
        "fp_rows_optimised": default["fp_rows"],
        "windows_detected_shipped": f"{shipped_std['windows_detected']}/{shipped_std['windows']}",
        "fp_rows_shipped": shipped_std["fp_rows"],
        "reference_rolling_zscore_standard": zscore["standard"],
        "reference_river_hst_standard": hst.get("standard"),
        "updates_per_s": round(updates_per_s),
        "monitor_updates_per_s": round(monitor_per_s),
        "reference_zscore_updates_per_s": round(zscore_per_s),
        "rows": n_rows,
        "files": len(files),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
