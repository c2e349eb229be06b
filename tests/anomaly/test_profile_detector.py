"""The ``profile`` detector: a two-shift load learned over three days, then level shifts, night loads,
shift changes on time and a little late, stuck readings, permanent changes, weekends, daylight
saving, state round trips and config errors."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from anomaly.detectors import PointMonitor, build_detector, detector_from_state
from anomaly.profile import ProfileDetector
from anomaly.scoring import STATE_VERSION

ROW_S = 60.0
ZONE = "Asia/Shanghai"
MONDAY_S = datetime(2026, 3, 2, tzinfo=ZoneInfo(ZONE)).timestamp()  # local midnight
DAY_S = 86400.0
NIGHT_KW, SHIFT_KW = 40.0, 200.0


def two_shift_kw(ts_s: float, rng: random.Random, *, start_h: float = 6.0, end_h: float = 22.0) -> float:
    """A production line: 40 kW at night, 200 kW from 06:00 to 22:00 local, 10-min ramps, 1.5 % noise."""
    hour = (ts_s - MONDAY_S) % DAY_S / 3600.0
    up = min(1.0, max(0.0, (hour - start_h) * 6.0))
    down = min(1.0, max(0.0, (end_h - hour) * 6.0))
    level = NIGHT_KW + (SHIFT_KW - NIGHT_KW) * min(up, down)
    return level * (1.0 + rng.gauss(0.0, 0.015))


def at(day: int, hour: float) -> float:
    return MONDAY_S + day * DAY_S + hour * 3600.0


def rows(first_s: float, last_s: float) -> list[float]:
    n = int((last_s - first_s) // ROW_S)
    return [first_s + i * ROW_S for i in range(n)]


def learned(days: int = 3, *, seed: int = 1, **params: Any) -> tuple[ProfileDetector, random.Random]:
    det = ProfileDetector(timezone=ZONE, **params)
    rng = random.Random(seed)
    for ts in rows(MONDAY_S, at(days, 0.0)):
        det.update(ts, two_shift_kw(ts, rng))
    return det, rng


def alarms(det: ProfileDetector, stamps: list[float], value: Callable[[float], float]) -> list[float]:
    return [ts for ts in stamps if det.update(ts, value(ts)) >= det.threshold]


def test_shift_changes_on_time_or_a_little_late_are_normal_an_hour_early_is_not() -> None:
    det, rng = learned()  # Monday to Wednesday
    # Thursday: the morning shift starts 8 minutes late and the evening one ends 8 minutes early.
    late = alarms(
        det,
        rows(at(3, 0.0), at(4, 0.0)),
        lambda ts: two_shift_kw(ts, rng, start_h=6.0 + 8 / 60, end_h=22.0 - 8 / 60),
    )
    assert late == []
    # Friday: the shift starts an hour early.
    early = alarms(det, rows(at(4, 0.0), at(4, 6.5)), lambda ts: two_shift_kw(ts, rng, start_h=5.0))
    assert early
    assert at(4, 5.0) <= early[0] <= at(4, 5.2)


def test_level_shift_in_shift_hours_is_detected_with_its_excess_energy() -> None:
    det, rng = learned()
    monitor = PointMonitor(det, power_kw=True)
    extra_kw, onset, end = 60.0, at(3, 10.0), at(3, 12.0)
    verdicts = [
        (ts, monitor.update(ts, two_shift_kw(ts, rng) + (extra_kw if onset <= ts < end else 0.0)))
        for ts in rows(at(3, 0.0), at(4, 0.0))
    ]
    active = [ts for ts, v in verdicts if v.active]
    assert active[0] == onset
    assert all(v.active for ts, v in verdicts if onset <= ts < end)
    assert [ts for ts in active if not onset <= ts < end] == []
    last = next(v for ts, v in verdicts if ts == end - ROW_S)
    truth_kwh = extra_kw * (end - ROW_S - onset) / 3600.0  # between the first and last active rows
    assert last.excess_kwh == pytest.approx(truth_kwh, rel=0.10)
    assert last.expected == pytest.approx(SHIFT_KW, rel=0.02)  # the baseline held still


def test_night_load_is_detected_and_not_learned_as_normal() -> None:
    det, rng = learned()
    extra_kw = 15.0  # 37 % of the night level, 7.5 % of the day's
    night = (at(3, 23.0), at(4, 5.0))
    flagged = alarms(
        det,
        rows(at(3, 0.0), at(4, 6.0)),
        lambda ts: two_shift_kw(ts, rng) + (extra_kw if night[0] <= ts < night[1] else 0.0),
    )
    assert flagged
    assert flagged[0] == night[0]
    assert all(night[0] <= ts < night[1] for ts in flagged)
    assert len(flagged) > 0.95 * (night[1] - night[0]) / ROW_S
    # The rest of Friday is normal (its late evening too), and the workday profile has not learned
    # the extra load (Friday is folded in when Saturday begins).
    assert alarms(det, rows(at(4, 6.0), at(5, 0.0) + ROW_S), lambda ts: two_shift_kw(ts, rng)) == []
    for hour in (23.5, 2.0):
        assert det.expected_one(at(7, hour)) == pytest.approx(NIGHT_KW, rel=0.02)


def test_stuck_reading_while_the_load_moves() -> None:
    det, rng = learned(stuck_s=1200.0)
    frozen_kw = two_shift_kw(at(3, 9.0), rng)
    stamps = rows(at(3, 8.0), at(3, 10.0))
    scores = [det.update(ts, frozen_kw if ts >= at(3, 9.0) else two_shift_kw(ts, rng)) for ts in stamps]
    first = next(ts for ts, s in zip(stamps, scores, strict=True) if s >= det.threshold)
    assert first == at(3, 9.0) + 1200.0  # 0.5 exactly when frozen for stuck_s
    assert scores[-1] == 1.0  # frozen for twice stuck_s and more


def test_a_flat_load_may_repeat_itself() -> None:
    det = ProfileDetector(timezone=ZONE, stuck_s=600.0)
    stamps = rows(MONDAY_S, at(3, 0.0))
    assert [ts for ts in stamps if det.update(ts, 12.5) >= det.threshold] == []


def test_permanent_change_is_accepted_after_relearn_after_days() -> None:
    det, rng = learned(relearn_after_days=2)
    new_line_kw = 80.0  # from Thursday on, a new machine runs in the day shift

    def load(ts: float) -> float:
        hour = (ts - MONDAY_S) % DAY_S / 3600.0
        return two_shift_kw(ts, rng) + (new_line_kw if 8.0 <= hour < 18.0 else 0.0)

    per_day = [len(alarms(det, rows(at(day, 0.0), at(day + 1, 0.0)), load)) for day in (3, 4, 5)]
    assert per_day[0] > 500  # Thursday: ten hours of alarm
    assert per_day[1] > 500  # Friday: still unusual
    assert per_day[2] < 10  # Saturday's profile is its own: not seen yet, so quiet
    assert len(alarms(det, rows(at(7, 0.0), at(8, 0.0)), load)) < 10  # Monday: the new normal


def test_weekend_profiles_are_separate_and_wait_for_their_first_day() -> None:
    det = ProfileDetector(timezone=ZONE)
    rng = random.Random(3)

    def week_load(ts: float) -> float:
        weekday = int((ts - MONDAY_S) // DAY_S) % 7
        if weekday == 6:
            return NIGHT_KW * (1.0 + rng.gauss(0.0, 0.015))  # Sunday: off all day
        if weekday == 5:  # Saturday: the morning shift only
            return two_shift_kw(ts, rng, end_h=14.0)
        return two_shift_kw(ts, rng)

    first_week = alarms(det, rows(MONDAY_S, at(7, 0.0)), week_load)
    assert [ts for ts in first_week if ts >= at(1, 0.0)] == []  # each profile waits for its first day
    second_week = alarms(det, rows(at(7, 0.0), at(14, 0.0)), week_load)
    assert second_week == []
    assert det.score_one(at(13, 10.0), SHIFT_KW) == 1.0  # a Sunday shift is not a Sunday


def test_daylight_saving_day_follows_the_wall_clock() -> None:
    zone = ZoneInfo("Europe/Berlin")  # 2026-03-29: 02:00 becomes 03:00
    det = ProfileDetector(timezone="Europe/Berlin", weekday_profiles=[0] * 7)
    rng = random.Random(4)
    first = datetime(2026, 3, 25, tzinfo=zone).timestamp()

    def office_kw(ts: float) -> float:
        local = datetime.fromtimestamp(ts, zone)
        return (120.0 if 8 <= local.hour < 18 else 30.0) * (1.0 + rng.gauss(0.0, 0.01))

    stamps = [first + i * 300.0 for i in range(int(7 * DAY_S / 300.0))]
    flagged = [ts for ts in stamps if det.update(ts, office_kw(ts)) >= det.threshold]
    assert [ts for ts in flagged if ts >= first + DAY_S] == []


def test_score_one_changes_nothing_and_update_scores_before_learning() -> None:
    det, rng = learned(days=1)
    stamps = rows(at(0, 23.0), at(1, 7.0))  # across midnight: the day's fold happens in between
    for i, ts in enumerate(stamps):
        value = two_shift_kw(ts, rng) + (500.0 if i == 200 else 0.0)
        before = json.dumps(det.to_state(), sort_keys=True)
        predicted = det.score_one(ts, value)
        expected = det.expected_one(ts)
        assert json.dumps(det.to_state(), sort_keys=True) == before
        assert det.update(ts, value) == predicted
        assert (math.isnan(expected) and ts < at(1, 0.0)) or det.expected_one(ts) == expected


def test_state_round_trip_gives_identical_scores() -> None:
    det, rng = learned()
    stamps = rows(at(3, 0.0), at(3, 15.0))
    for ts in stamps:
        det.update(ts, two_shift_kw(ts, rng))
    state = json.loads(json.dumps(det.to_state()))
    assert state["version"] == STATE_VERSION
    restored = detector_from_state(state)
    assert restored.to_state() == det.to_state()
    rest = rows(at(3, 15.0), at(4, 12.0))
    values = [two_shift_kw(ts, rng) + (30.0 if at(3, 20.0) <= ts < at(3, 21.0) else 0.0) for ts in rest]
    original = [det.update(ts, v) for ts, v in zip(rest, values, strict=True)]
    again = [restored.update(ts, v) for ts, v in zip(rest, values, strict=True)]
    assert again == original
    assert max(original) == 1.0


def test_built_from_a_spec() -> None:
    det = build_detector({"kind": "profile", "slot_s": 1800, "weekday_profiles": [0, 0, 0, 0, 0, 1, 1]})
    assert isinstance(det, ProfileDetector)
    assert det.params["slot_s"] == 1800
    assert det.threshold == 0.5


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"slot_s": 7}, "slot_s"),
        ({"slot_s": 1000}, "slot_s"),
        ({"slot_s": 900.5}, "slot_s"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"timezone": 8}, "timezone"),
        ({"weekday_profiles": [0, 0, 0, 0, 0, 1]}, "weekday_profiles"),
        ({"weekday_profiles": [0, 0, 0, 0, 0, 1, 7]}, "weekday_profiles"),
        ({"alpha": 0.0}, "alpha"),
        ({"warmup_days": 0}, "warmup_days"),
        ({"z_limit": -1}, "z_limit"),
        ({"min_rel_spread": math.nan}, "min_rel_spread"),
        ({"min_spread": 0}, "min_spread"),
        ({"shift_tolerance_s": 86400}, "shift_tolerance_s"),
        ({"relearn_after_days": True}, "relearn_after_days"),
        ({"stuck_s": 0}, "stuck_s"),
        ({"stuck_tolerance": -0.1}, "stuck_tolerance"),
        ({"threshold": 1.5}, "threshold"),
        ({"utc_offset_h": 8}, "utc_offset_h"),
    ],
)
def test_config_errors_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"field '{re.escape(field)}'"):
        build_detector({"kind": "profile", **spec})
