"""Detectors: each kind on synthetic anomalies, score-before-learn, no learning while active,
state round-trips, config validation, and excess energy on a level shift."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from typing import Any

import pytest

from anomaly.detectors import (
    DETECTOR_KINDS,
    Detector,
    EnsembleDetector,
    PointMonitor,
    build_detector,
    detector_from_state,
)

ROW_S = 60.0  # one reading per minute


def seasonal(n: int, *, seed: int = 7, base: float = 100.0) -> list[float]:
    """A daily-ish cycle (period 120 rows) plus noise: the normal behaviour of a load in kW."""
    rng = random.Random(seed)
    return [base + 20.0 * math.sin(2 * math.pi * i / 120) + rng.gauss(0.0, 1.0) for i in range(n)]


def with_spike(values: list[float], at: int, size: float) -> list[float]:
    out = list(values)
    out[at] += size
    return out


def with_shift(values: list[float], at: int, size: float) -> list[float]:
    return [v + size if i >= at else v for i, v in enumerate(values)]


def with_stuck(values: list[float], at: int) -> list[float]:
    return [values[at] if i >= at else v for i, v in enumerate(values)]


def with_drift(values: list[float], at: int, per_row: float) -> list[float]:
    return [v + per_row * (i - at) if i >= at else v for i, v in enumerate(values)]


def run(det: Detector, values: list[float]) -> list[float]:
    return [det.update(i * ROW_S, v) for i, v in enumerate(values)]


def first_alarm(det: Detector, scores: list[float], start: int) -> int:
    hits = [i for i, s in enumerate(scores) if i >= start and s >= det.threshold]
    return hits[0] if hits else -1


N = 1200
ONSET = 1000

# kind spec, anomaly, how many rows after the onset the first alarm may come
DETECTION_CASES: list[tuple[str, dict[str, Any], Callable[[list[float]], list[float]], int]] = [
    ("ensemble-spike", {"kind": "ensemble"}, lambda v: with_spike(v, ONSET, 60.0), 0),
    ("ensemble-shift", {"kind": "ensemble"}, lambda v: with_shift(v, ONSET, 40.0), 3),
    ("ensemble-drift", {"kind": "ensemble"}, lambda v: with_drift(v, ONSET, 0.5), 150),
    (
        "forecast-snarimax-spike",
        {"kind": "forecast", "p": 3, "d": 1, "q": 0},
        lambda v: with_spike(v, ONSET, 30.0),
        0,
    ),
    (
        "forecast-holtwinters-shift",
        {
            "kind": "forecast",
            "model": "holt_winters",
            "alpha": 0.3,
            "beta": 0.05,
            "gamma": 0.3,
            "seasonality": 120,
            "warmup": 400,
        },
        lambda v: with_shift(v, ONSET, 30.0),
        0,
    ),
    ("hst-spike", {"kind": "hst", "window_size": 200, "seed": 3}, lambda v: with_spike(v, ONSET, 80.0), 0),
    (
        "robust_z-shift",
        {"kind": "robust_z", "window": 240, "z_limit": 4.0},
        lambda v: with_shift(v, ONSET, 80.0),
        0,
    ),
    (
        "flatline-stuck",
        {"kind": "flatline", "stuck_s": 600.0, "tolerance": 0.01},
        lambda v: with_stuck(v, ONSET),
        10,
    ),
    ("limits-shift", {"kind": "limits", "hh": 170.0, "h": 140.0}, lambda v: with_shift(v, ONSET, 50.0), 60),
    (
        "rate-spike",
        {"kind": "rate_of_change", "max_rate_per_s": 0.2},
        lambda v: with_spike(v, ONSET, 30.0),
        0,
    ),
]


@pytest.mark.parametrize(
    ("spec", "inject", "max_delay"), [c[1:] for c in DETECTION_CASES], ids=[c[0] for c in DETECTION_CASES]
)
def test_detects_injected_anomaly_and_is_quiet_before(
    spec: dict[str, Any], inject: Callable[[list[float]], list[float]], max_delay: int
) -> None:
    det = build_detector(spec)
    scores = run(det, inject(seasonal(N)))
    quiet_from = 600  # after every detector's warm-up
    false_alarms = [i for i in range(quiet_from, ONSET) if scores[i] >= det.threshold]
    assert false_alarms == []
    hit = first_alarm(det, scores, ONSET)
    assert ONSET <= hit <= ONSET + max_delay, (hit, max(scores[ONSET:]))


def test_no_data_scores_the_gap() -> None:
    det = build_detector({"kind": "no_data", "max_gap_s": 120.0})
    stamps = [0.0, 60.0, 120.0, 600.0, 660.0]
    scores = [det.update(t, 1.0) for t in stamps]
    assert scores[:3] == [0.0, 0.25, 0.25]
    assert scores[3:] == [1.0, 0.25]
    assert det.silence_score(1000.0) == 1.0


def test_limits_levels_table() -> None:
    det = build_detector({"kind": "limits", "ll": 0.0, "l": 10.0, "h": 90.0, "hh": 100.0})
    table = [(-5.0, 1.0), (5.0, 0.75), (50.0, 0.0), (95.0, 0.75), (100.0, 1.0)]
    assert [det.update(0.0, v) for v, _ in table] == [s for _, s in table]


ALL_SPECS: list[dict[str, Any]] = [
    {"kind": "ensemble", "warmup": 200},
    {"kind": "forecast", "p": 2, "d": 1, "q": 1, "warmup": 100},
    {
        "kind": "forecast",
        "model": "holt_winters",
        "alpha": 0.3,
        "beta": 0.05,
        "gamma": 0.3,
        "seasonality": 120,
        "warmup": 300,
    },
    {"kind": "hst", "window_size": 100, "seed": 1},
    {"kind": "robust_z", "window": 200},
    {"kind": "profile", "slot_s": 600, "timezone": "UTC", "weekday_profiles": [0, 0, 0, 0, 0, 0, 0]},
    {"kind": "limits", "h": 115.0, "hh": 125.0},
    {"kind": "rate_of_change", "max_rate_per_s": 0.1},
    {"kind": "flatline", "stuck_s": 300.0},
    {"kind": "no_data", "max_gap_s": 90.0},
]


def test_every_kind_is_covered() -> None:
    assert {s["kind"] for s in ALL_SPECS} == set(DETECTOR_KINDS)


def _state_json(det: Detector) -> str:
    return json.dumps(det.to_state(), sort_keys=True)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=[s["kind"] + str(i) for i, s in enumerate(ALL_SPECS)])
def test_score_before_learn_and_state_round_trip(spec: dict[str, Any]) -> None:
    values = with_spike(with_stuck(seasonal(700), 650), 500, 50.0)
    det = build_detector(spec)
    for i, v in enumerate(values[:600]):
        before = _state_json(det)
        predicted = det.score_one(i * ROW_S, v)
        assert _state_json(det) == before  # scoring changes nothing
        assert det.update(i * ROW_S, v) == predicted  # update scores before it learns

    restored = detector_from_state(json.loads(json.dumps(det.to_state())))
    rest = values[600:]
    original_scores = [det.update((600 + i) * ROW_S, v) for i, v in enumerate(rest)]
    restored_scores = [restored.update((600 + i) * ROW_S, v) for i, v in enumerate(rest)]
    assert restored_scores == original_scores


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "robust_z", "window": 200},
        {"kind": "forecast", "p": 2, "d": 1, "q": 0, "warmup": 100},
        {"kind": "hst", "window_size": 100, "seed": 1},
    ],
    ids=["robust_z", "forecast", "hst"],
)
def test_no_learning_while_anomaly_active(spec: dict[str, Any]) -> None:
    det = build_detector(spec)
    run(det, seasonal(400))
    before = det.to_state()
    assert det.update(400 * ROW_S, 1e4) >= det.threshold
    after = det.to_state()
    before.pop("skipped", None)  # the forecaster counts the rows it skipped (its next horizon)
    after.pop("skipped", None)
    assert after == before
    assert det.update(401 * ROW_S, seasonal(402)[401]) < det.threshold
    assert det.to_state() != before  # a normal row is learned


def test_ensemble_learns_nothing_from_the_anomalous_row() -> None:
    det = EnsembleDetector(warmup=200)
    run(det, seasonal(600))
    before = det.to_state()
    assert det.update(600 * ROW_S, 1e4) == 1.0
    after = det.to_state()
    assert after["contexts"] == before["contexts"]
    assert after["hist"] == before["hist"]
    assert after["refractory"] == det.params["refractory_rows"]
    assert det.update(601 * ROW_S, 100.0) == 0.0  # one alarm per event


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"kind": "nope"}, "kind"),
        ({"kind": "ensemble", "warmup": 0}, "warmup"),
        ({"kind": "ensemble", "level_alpha": 1.5}, "level_alpha"),
        ({"kind": "ensemble", "context_lengths": []}, "context_lengths"),
        ({"kind": "ensemble", "context_lengths": [1, 0]}, "context_lengths[1]"),
        ({"kind": "ensemble", "threshold": 0.0}, "threshold"),
        ({"kind": "ensemble", "colour": "red"}, "colour"),
        ({"kind": "robust_z", "z_limit": "high"}, "z_limit"),
        ({"kind": "robust_z", "window": True}, "window"),
        ({"kind": "forecast", "model": "prophet"}, "model"),
        ({"kind": "forecast", "model": "holt_winters", "seasonality": 24}, "gamma"),
        (
            {"kind": "forecast", "model": "holt_winters", "seasonality": 24, "gamma": 0.2, "warmup": 48},
            "warmup",
        ),
        ({"kind": "limits"}, "hh"),
        ({"kind": "limits", "h": 90.0, "hh": 80.0}, "hh"),
        ({"kind": "limits", "l": 10.0, "h": math.nan}, "h"),
        ({"kind": "rate_of_change"}, "max_rate_per_s"),
        ({"kind": "flatline", "stuck_s": 60.0, "tolerance": -1.0}, "tolerance"),
        ({"kind": "no_data", "max_gap_s": 0}, "max_gap_s"),
    ],
)
def test_config_errors_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"field '{re.escape(field)}'"):
        build_detector(spec)


def test_default_kind_is_the_ensemble() -> None:
    assert build_detector({}).kind == "ensemble"


def test_excess_energy_on_a_level_shift() -> None:
    """A 40 kW step lasting 3 h on a 100 kW load with noise: 120 kWh extra, within 5 %."""
    rng = random.Random(5)
    onset, rows = 600, 180
    load_kw = [100.0 + rng.gauss(0.0, 2.0) + (40.0 if onset <= i < onset + rows else 0.0) for i in range(900)]
    monitor = PointMonitor(build_detector({"kind": "robust_z", "window": 240, "z_limit": 5.0}), power_kw=True)
    verdicts = [monitor.update(i * ROW_S, v) for i, v in enumerate(load_kw)]
    during = verdicts[onset : onset + rows]
    assert all(v.active for v in during)
    assert not any(v.active for v in verdicts[300:onset])
    assert not any(v.active for v in verdicts[onset + rows + 1 :])
    true_kwh = 40.0 * (rows - 1) / 60.0  # integrated between the first and last active rows
    assert during[-1].excess_kwh == pytest.approx(true_kwh, rel=0.05)
    assert during[-1].expected == pytest.approx(100.0, abs=1.0)  # the baseline held still
