"""Dispatch effects against a similar-day baseline, on synthetic loads whose truth is known.

Dates (Asia/Shanghai, 2026): Wednesday 4 March is the usual event day. The ten workdays before it
are 3, 2 March and 27, 26, 25, 24, 23, 20, 19, 18 February. Loads are given in kW; an interval's
energy is kW x its length in hours (15 min: x 0.25).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from control_engine.verification import (
    Adjustment,
    BaselineMethod,
    DispatchEffect,
    EffectFlag,
    Phase,
    measure_dispatch,
    sum_effects,
    t_quantile,
)

TZ = ZoneInfo("Asia/Shanghai")
QUARTER = timedelta(minutes=15)
HOUR = timedelta(hours=1)
EVENT_START = datetime(2026, 3, 4, 14, tzinfo=TZ)
EVENT_END = datetime(2026, 3, 4, 16, tzinfo=TZ)
HISTORY_FROM = datetime(2026, 2, 9, tzinfo=TZ)  # a Monday: 3 weeks and 2 days before the event day
DATA_TO = datetime(2026, 3, 5, tzinfo=TZ)
WORKDAYS_BEFORE_EVENT = (
    date(2026, 3, 3), date(2026, 3, 2), date(2026, 2, 27), date(2026, 2, 26), date(2026, 2, 25),
    date(2026, 2, 24), date(2026, 2, 23), date(2026, 2, 20), date(2026, 2, 19), date(2026, 2, 18),
)  # fmt: skip


def load(
    power_kw: Callable[[datetime], float],
    *,
    step: timedelta = QUARTER,
    start: datetime = HISTORY_FROM,
    end: datetime = DATA_TO,
) -> list[tuple[datetime, float]]:
    """Return ``(start, kWh)`` intervals of a load given as kW at each interval's local start."""
    hours = step / HOUR
    out, at = [], start
    while at < end:
        out.append((at, power_kw(at) * hours))
        at += step
    return out


def in_event(at: datetime, start: datetime = EVENT_START, end: datetime = EVENT_END) -> bool:
    return start <= at < end


def measure(series: list[tuple[datetime, float]], **kwargs: object) -> DispatchEffect:
    args: dict[str, object] = {
        "event_start": EVENT_START,
        "event_end": EVENT_END,
        "intensity_kg_per_kwh": 0.5703,
    }
    args.update(kwargs)
    return measure_dispatch(series, **args)  # type: ignore[arg-type]


# -- the flat load -----------------------------------------------------------------------------------


def flat_cut(at: datetime) -> float:
    """200 kW all the time; 150 kW (a 50 kW cut) during the event."""
    return 150.0 if in_event(at) else 200.0


def test_flat_load_cut_by_50_kw_for_2_h_avoids_100_kwh() -> None:
    effect = measure(load(flat_cut))

    # Baseline: 8 quarter hours x 200 kW x 0.25 h = 400 kWh; actual 8 x 150 x 0.25 = 300 kWh.
    assert effect.baseline_kwh == pytest.approx(400.0)
    assert effect.actual_kwh == pytest.approx(300.0)
    assert effect.energy_avoided_kwh == pytest.approx(100.0, rel=0.01)
    assert effect.co2e_avoided_kg == pytest.approx(100.0 * 0.5703)  # 57.03 kg
    assert effect.days_used == WORKDAYS_BEFORE_EVENT
    assert effect.day_kind == "workday"
    assert effect.adjustment_factor == pytest.approx(1.0)  # the morning was as usual
    assert effect.uncertainty_kwh == pytest.approx(0.0, abs=1e-9)  # identical days: no spread
    assert effect.flags == frozenset()
    assert len(effect.intervals) == 8
    assert all(i.avoided_kwh == pytest.approx(12.5) for i in effect.intervals)  # 50 kW x 0.25 h
    assert effect.rebound_kwh == 0.0
    assert "10 of 10 similar workday days" in effect.method
    assert "multiplicative day-of adjustment" in effect.method


def test_flat_load_with_small_meter_noise_stays_within_1_percent() -> None:
    # A repeatable +-1 kW ripple (period 7 quarter hours): sums over 8 intervals barely move.
    def ripple(at: datetime) -> float:
        return flat_cut(at) + (at.hour * 4 + at.minute // 15) % 7 - 3.0

    effect = measure(load(ripple))

    assert effect.energy_avoided_kwh == pytest.approx(100.0, rel=0.01)
    assert abs(effect.energy_avoided_kwh - 100.0) <= effect.uncertainty_kwh + 1e-9


def test_event_crossing_midnight_maps_onto_the_next_day_of_each_similar_day() -> None:
    # 50 kW in the 23:00 hour, 40 kW otherwise; the event (23:00 to 01:00) cuts 20 kW off each hour.
    start, end = datetime(2026, 3, 4, 23, tzinfo=TZ), datetime(2026, 3, 5, 1, tzinfo=TZ)

    def power(at: datetime) -> float:
        return (50.0 if at.hour == 23 else 40.0) - (20.0 if in_event(at, start, end) else 0.0)

    series = load(power, step=HOUR, end=datetime(2026, 3, 6, tzinfo=TZ))
    effect = measure(
        series, event_start=start, event_end=end, method=BaselineMethod(adjustment=Adjustment.NONE)
    )

    # Baseline 50 + 40 = 90 kWh, actual 30 + 20 = 50 kWh: 40 kWh avoided.
    assert [i.baseline_kwh for i in effect.intervals] == pytest.approx([50.0, 40.0])
    assert effect.energy_avoided_kwh == pytest.approx(40.0)


# -- choosing similar days ---------------------------------------------------------------------------


def week_shape(at: datetime) -> float:
    """100 kW on workdays, 30 kW on Saturdays, 20 kW on Sundays."""
    return {5: 30.0, 6: 20.0}.get(at.weekday(), 100.0)


def test_workday_event_uses_only_workdays() -> None:
    monday = datetime(2026, 3, 9, 10, tzinfo=TZ)

    def power(at: datetime) -> float:
        return 60.0 if in_event(at, monday, monday + 2 * HOUR) else week_shape(at)

    series = load(power, step=HOUR, end=datetime(2026, 3, 10, tzinfo=TZ))
    effect = measure(series, event_start=monday, event_end=monday + 2 * HOUR)

    # Had a weekend day slipped in, the baseline would fall below 100 kWh an hour.
    assert all(day.weekday() < 5 for day in effect.days_used)
    assert effect.days_used[0] == date(2026, 3, 6)  # the Friday before, the most recent workday
    assert len(effect.days_used) == 10
    assert effect.baseline_kwh == pytest.approx(200.0)  # 2 h x 100 kWh
    assert effect.energy_avoided_kwh == pytest.approx(80.0)  # 2 x (100 - 60)


def test_saturday_event_uses_only_saturdays() -> None:
    saturday = datetime(2026, 3, 7, 10, tzinfo=TZ)

    def power(at: datetime) -> float:
        return 10.0 if in_event(at, saturday, saturday + 2 * HOUR) else week_shape(at)

    series = load(
        power, step=HOUR, start=datetime(2026, 1, 24, tzinfo=TZ), end=datetime(2026, 3, 8, tzinfo=TZ)
    )
    effect = measure(series, event_start=saturday, event_end=saturday + 2 * HOUR)

    # 45 days of lookback from 7 March reach back to 21 January; the data start on Saturday 24
    # January: 28, 21, 14, 7 February, 31 and 24 January are the 6 Saturdays in reach.
    assert effect.day_kind == "saturday"
    assert effect.days_used == tuple(date(2026, 2, 28) - timedelta(weeks=w) for w in range(6))
    assert effect.energy_avoided_kwh == pytest.approx(40.0)  # 2 x (30 - 10)
    assert EffectFlag.FEW_SIMILAR_DAYS not in effect.flags  # 6 days, the default minimum is 5


def test_calendar_function_decides_the_kind_of_day() -> None:
    # A site that runs differently on Wednesdays: only Wednesdays are similar to a Wednesday.
    def kind(day: date) -> str:
        return "wednesday" if day.weekday() == 2 else "other"

    def power(at: datetime) -> float:
        base = 80.0 if at.weekday() == 2 else 100.0
        return base - 30.0 if in_event(at) else base

    method = BaselineMethod(day_kind=kind, min_similar_days=3)
    effect = measure(load(power, step=HOUR), method=method)

    assert effect.days_used == (date(2026, 2, 25), date(2026, 2, 18), date(2026, 2, 11))
    assert effect.energy_avoided_kwh == pytest.approx(60.0)  # 2 h x 30 kW


def test_excluded_event_days_are_skipped() -> None:
    # Another dispatch on 3 March and a shutdown on 26 February: neither day is a similar day.
    excluded = [
        (datetime(2026, 3, 3, 9, tzinfo=TZ), datetime(2026, 3, 3, 11, tzinfo=TZ)),
        (datetime(2026, 2, 26, tzinfo=TZ), datetime(2026, 2, 27, tzinfo=TZ)),
    ]
    effect = measure(load(flat_cut), excluded=excluded)

    assert date(2026, 3, 3) not in effect.days_used
    assert date(2026, 2, 26) not in effect.days_used
    assert effect.days_used[-2:] == (date(2026, 2, 17), date(2026, 2, 16))  # reached further back
    assert len(effect.days_used) == 10


def test_few_similar_days_are_flagged() -> None:
    series = load(flat_cut, start=datetime(2026, 2, 26, tzinfo=TZ))  # only 26, 27 Feb, 2, 3 Mar before

    effect = measure(series)

    assert len(effect.days_used) == 4
    assert EffectFlag.FEW_SIMILAR_DAYS in effect.flags
    assert effect.energy_avoided_kwh == pytest.approx(100.0)


# -- the day-of adjustment ---------------------------------------------------------------------------


def busier_event_day(factor: float, cut_kw: float) -> Callable[[datetime], float]:
    """100 kW every day, ``factor`` x 100 kW all of 4 March, less ``cut_kw`` during the event."""

    def power(at: datetime) -> float:
        base = 100.0 * factor if at.date() == EVENT_START.date() else 100.0
        return base - cut_kw if in_event(at) else base

    return power


@pytest.mark.parametrize(
    ("adjustment", "expected_kwh", "factor", "offset_kwh"),
    [
        # Pre-event window 10:00-13:00: actual 3 x 110 = 330 kWh, baseline 3 x 100 = 300 kWh.
        # Multiplicative: factor 330 / 300 = 1.1, baseline 110 kWh/h, avoided 2 x (110 - 60) = 100.
        (Adjustment.MULTIPLICATIVE, 100.0, 1.1, 0.0),
        # Additive: offset (330 - 300) / 3 = +10 kWh per hour, the same 110 kWh/h baseline.
        (Adjustment.ADDITIVE, 100.0, 1.0, 10.0),
        # None: the warm day is missed and the cut looks smaller, 2 x (100 - 60) = 80.
        (Adjustment.NONE, 80.0, 1.0, 0.0),
    ],
)
def test_day_of_adjustment_on_a_10_percent_busier_day(
    adjustment: Adjustment, expected_kwh: float, factor: float, offset_kwh: float
) -> None:
    series = load(busier_event_day(1.1, 50.0), step=HOUR)

    effect = measure(series, method=BaselineMethod(adjustment=adjustment))

    assert effect.energy_avoided_kwh == pytest.approx(expected_kwh)
    assert effect.adjustment_factor == pytest.approx(factor)
    assert effect.adjustment_offset_kwh == pytest.approx(offset_kwh)
    assert EffectFlag.ADJUSTMENT_CAPPED not in effect.flags


@pytest.mark.parametrize("adjustment", [Adjustment.MULTIPLICATIVE, Adjustment.ADDITIVE])
def test_day_of_adjustment_is_capped(adjustment: Adjustment) -> None:
    # A day 30 % busier: the raw factor 1.3 is capped at 1.2 (offset +30 capped at 0.2 x 100 = +20),
    # so the baseline is 120 kWh/h, the actual 130 - 50 = 80: avoided 2 x (120 - 80) = 80 kWh.
    series = load(busier_event_day(1.3, 50.0), step=HOUR)

    effect = measure(series, method=BaselineMethod(adjustment=adjustment))

    assert effect.energy_avoided_kwh == pytest.approx(80.0)
    assert EffectFlag.ADJUSTMENT_CAPPED in effect.flags
    assert "(capped)" in effect.method


def test_missing_pre_event_data_skips_the_adjustment() -> None:
    series = [
        (at, kwh)
        for at, kwh in load(busier_event_day(1.1, 50.0), step=HOUR)
        if not (at.date() == EVENT_START.date() and 10 <= at.hour < 13)
    ]

    effect = measure(series)

    assert EffectFlag.NO_ADJUSTMENT_DATA in effect.flags
    assert effect.adjustment_factor == 1.0
    assert effect.energy_avoided_kwh == pytest.approx(80.0)  # unadjusted: 2 x (100 - 60)


# -- gaps --------------------------------------------------------------------------------------------


def test_gaps_in_the_event_window_are_flagged_and_count_nothing() -> None:
    gaps = {EVENT_START + QUARTER, EVENT_START + 5 * QUARTER}
    series = [(at, kwh) for at, kwh in load(flat_cut) if at not in gaps]

    effect = measure(series)

    # 6 metered quarter hours x 12.5 kWh = 75 kWh; baseline and actual cover the same 6.
    assert effect.energy_avoided_kwh == pytest.approx(75.0)
    assert effect.baseline_kwh == pytest.approx(300.0)
    assert effect.missing_intervals == 2
    assert EffectFlag.EVENT_DATA_GAP in effect.flags
    assert [i.start for i in effect.intervals if i.actual_kwh is None] == sorted(gaps)


def test_a_similar_day_with_a_gap_is_skipped() -> None:
    hole = datetime(2026, 2, 25, 14, 30, tzinfo=TZ)
    series = [(at, kwh) for at, kwh in load(flat_cut) if at != hole]

    effect = measure(series)

    assert date(2026, 2, 25) not in effect.days_used
    assert effect.days_used[-1] == date(2026, 2, 17)
    assert effect.energy_avoided_kwh == pytest.approx(100.0)


def test_meters_are_summed_and_a_gap_in_one_is_a_gap() -> None:
    a = load(lambda at: 120.0 if in_event(at) else 150.0)
    b = load(lambda at: 30.0 if in_event(at) else 50.0)
    b = [(at, kwh) for at, kwh in b if at != EVENT_START]

    effect = measure_dispatch(
        {"m1": a, "m2": b}, event_start=EVENT_START, event_end=EVENT_END, intensity_kg_per_kwh=0.5
    )

    # Together 200 kW cut to 150 kW; the first quarter hour lacks m2: 7 x 12.5 = 87.5 kWh.
    assert effect.energy_avoided_kwh == pytest.approx(87.5)
    assert EffectFlag.EVENT_DATA_GAP in effect.flags


# -- rebound -----------------------------------------------------------------------------------------


def test_rebound_after_the_event_is_netted() -> None:
    post_end = EVENT_END + 2 * HOUR

    def power(at: datetime) -> float:
        if in_event(at, EVENT_END, post_end):
            return 225.0  # 25 kW above the usual 200 for 2 h: 50 kWh pulled back
        return flat_cut(at)

    effect = measure(load(power), post_end=post_end)

    # 100 kWh avoided in the event window, 8 x 25 x 0.25 = 50 kWh extra after it: 50 kWh net.
    assert effect.window_avoided_kwh == pytest.approx(100.0)
    assert effect.rebound_kwh == pytest.approx(50.0)
    assert effect.energy_avoided_kwh == pytest.approx(50.0)
    assert sum(1 for i in effect.intervals if i.phase is Phase.POST) == 8


def test_a_post_window_below_baseline_is_not_credited() -> None:
    post_end = EVENT_END + HOUR

    def power(at: datetime) -> float:
        return 190.0 if in_event(at, EVENT_END, post_end) else flat_cut(at)

    effect = measure(load(power), post_end=post_end)

    assert effect.rebound_kwh == 0.0
    assert effect.energy_avoided_kwh == pytest.approx(100.0)


def test_load_shifted_to_cleaner_hours_still_saves_co2() -> None:
    # Same 100 kWh avoided and 50 kWh rebound, but the event runs at 0.8 kg/kWh and the rebound
    # at 0.4: 100 x 0.8 - 50 x 0.4 = 80 - 20 = 60 kg, while the energy nets to 50 kWh.
    post_end = EVENT_END + 2 * HOUR

    def power(at: datetime) -> float:
        return 225.0 if in_event(at, EVENT_END, post_end) else flat_cut(at)

    intensity = [(HISTORY_FROM, 0.6), (EVENT_START, 0.8), (EVENT_END, 0.4), (post_end, 0.6)]
    effect = measure(load(power), post_end=post_end, intensity_kg_per_kwh=intensity)

    assert effect.energy_avoided_kwh == pytest.approx(50.0)
    assert effect.rebound_co2e_kg == pytest.approx(20.0)
    assert effect.co2e_avoided_kg == pytest.approx(60.0)


# -- uncertainty -------------------------------------------------------------------------------------


def alternating_days(spread_kw: float, *, whole_day: bool) -> Callable[[datetime], float]:
    """100 kW +- spread, the sign alternating by date; only in the event hours unless ``whole_day``."""

    def power(at: datetime) -> float:
        sign = 1.0 if at.toordinal() % 2 else -1.0
        shifted = whole_day or 14 <= at.hour < 16
        base = 100.0 + (sign * spread_kw if shifted and at.date() != EVENT_START.date() else 0.0)
        return base - 40.0 if in_event(at) else base

    return power


def test_uncertainty_from_the_spread_of_similar_days_by_hand() -> None:
    # The ten workdays alternate 105 / 95 kW (5 of each), so the window's 2 h total is 210 or 190.
    # Leaving out a 210 day, the other nine average (4 x 210 + 5 x 190) / 9 = 198.89: error +11.11;
    # leaving out a 190 day: (5 x 210 + 4 x 190) / 9 = 201.11, error -11.11. RMS 100 / 9 = 11.11 kWh,
    # times t(0.95, 9 dof) = 1.8331: +-20.37 kWh.
    effect = measure(load(alternating_days(5.0, whole_day=False), step=HOUR))

    assert sum(day.toordinal() % 2 for day in effect.days_used) == 5  # the premise: 5 and 5
    assert effect.energy_avoided_kwh == pytest.approx(80.0)  # baseline still 2 x 100
    assert effect.uncertainty_kwh == pytest.approx(100.0 / 9.0 * 1.8331, rel=1e-3)
    assert effect.co2e_uncertainty_kg == pytest.approx(effect.uncertainty_kwh * 0.5703)


def test_uncertainty_grows_with_noisier_history() -> None:
    quiet = measure(load(alternating_days(2.0, whole_day=False), step=HOUR))
    noisy = measure(load(alternating_days(10.0, whole_day=False), step=HOUR))

    assert 0 < quiet.uncertainty_kwh < noisy.uncertainty_kwh
    assert noisy.uncertainty_kwh == pytest.approx(5 * quiet.uncertainty_kwh)  # the spread is 5x
    assert EffectFlag.NOT_SIGNIFICANT not in noisy.flags  # 80 kWh against +-40.7 kWh


def test_adjustment_removes_the_spread_it_explains() -> None:
    # Whole days at 105 or 95 kW: the pre-event hours reveal each day's level, so the multiplicative
    # adjustment predicts every left-out day exactly; without adjustment the spread remains.
    power = alternating_days(5.0, whole_day=True)
    adjusted = measure(load(power, step=HOUR))
    plain = measure(load(power, step=HOUR), method=BaselineMethod(adjustment=Adjustment.NONE))

    assert adjusted.uncertainty_kwh == pytest.approx(0.0, abs=1e-9)
    assert plain.uncertainty_kwh == pytest.approx(100.0 / 9.0 * 1.8331, rel=1e-3)


def test_an_effect_within_its_uncertainty_is_flagged() -> None:
    def power(at: datetime) -> float:
        return alternating_days(20.0, whole_day=False)(at) + (38.0 if in_event(at) else 0.0)  # a 2 kW cut

    effect = measure(load(power, step=HOUR), method=BaselineMethod(adjustment=Adjustment.NONE))

    assert effect.energy_avoided_kwh == pytest.approx(4.0)
    assert EffectFlag.NOT_SIGNIFICANT in effect.flags


# -- the month ---------------------------------------------------------------------------------------


def test_monthly_sum_adds_effects_and_combines_uncertainty_in_quadrature() -> None:
    first = measure(load(alternating_days(5.0, whole_day=False), step=HOUR))
    second = measure(load(flat_cut), dispatch="cmd-2")

    month = sum_effects([first, second])

    # 80 + 100 = 180 kWh; 80 x 0.5703 + 100 x 0.5703 = 102.654 kg = 0.102654 t.
    assert month.month == "2026-03"
    assert month.dispatches == 2
    assert month.energy_avoided_kwh == pytest.approx(180.0)
    assert month.co2e_avoided_t == pytest.approx(0.102654)
    assert month.uncertainty_kwh == pytest.approx(math.hypot(first.uncertainty_kwh, second.uncertainty_kwh))
    assert month.co2e_uncertainty_t == pytest.approx(first.co2e_uncertainty_kg / 1000.0)
    assert month.confidence == 0.9


def test_monthly_sum_refuses_mixed_months_and_counts_flags() -> None:
    march = measure(load(flat_cut, start=datetime(2026, 2, 26, tzinfo=TZ)))
    february_day = datetime(2026, 2, 25, 14, tzinfo=TZ)
    february = measure(
        load(lambda at: 150.0 if in_event(at, february_day, february_day + HOUR) else 200.0),
        event_start=february_day,
        event_end=february_day + HOUR,
    )

    with pytest.raises(ValueError, match="span months 2026-02, 2026-03"):
        sum_effects([march, february])
    with pytest.raises(ValueError, match="outside month 2026-03"):
        sum_effects([february], month="2026-03")
    with pytest.raises(ValueError, match="effects: empty"):
        sum_effects([])
    assert sum_effects([], month="2026-04").dispatches == 0
    assert sum_effects([march]).flag_counts == {EffectFlag.FEW_SIMILAR_DAYS: 1}


# -- bad input ---------------------------------------------------------------------------------------


def naive_at(index: int) -> list[tuple[datetime, float]]:
    series = load(flat_cut)
    at, kwh = series[index]
    series[index] = (at.replace(tzinfo=None), kwh)
    return series


@pytest.mark.parametrize(
    ("series", "kwargs", "message"),
    [
        (naive_at(3), {}, r"energy_kwh\[3\]\.start must be timezone-aware"),
        (
            load(flat_cut),
            {"event_start": EVENT_START.replace(tzinfo=None)},
            "event_start must be timezone-aware",
        ),
        (load(flat_cut), {"post_end": EVENT_END.replace(tzinfo=None)}, "post_end must be timezone-aware"),
        (load(flat_cut), {"event_end": EVENT_START}, "event_end .* must be after event_start"),
        (
            load(flat_cut),
            {"event_start": DATA_TO, "event_end": DATA_TO + HOUR},
            "event window .* is outside the data",
        ),
        (
            load(flat_cut),
            {"event_start": EVENT_START + timedelta(minutes=5)},
            "event_start .* interval boundary",
        ),
        (load(flat_cut), {"post_end": DATA_TO + HOUR}, "post_end .* after the data ends"),
        ([*load(flat_cut)[:-1], (DATA_TO, math.nan)], {}, r"energy_kwh\[\d+\]\.kwh must be a finite number"),
        ([*load(flat_cut), load(flat_cut)[0]], {}, r"energy_kwh\[\d+\]\.start .* appears twice"),
        (load(flat_cut), {"intensity_kg_per_kwh": -0.1}, "intensity_kg_per_kwh must be a finite number >= 0"),
        (
            load(flat_cut),
            {"intensity_kg_per_kwh": [(EVENT_END, 0.5)]},
            "intensity_kg_per_kwh: no value in force at",
        ),
        (
            load(flat_cut),
            {"excluded": [(EVENT_END, EVENT_START)]},
            r"excluded\[0\]: end .* must be after start",
        ),
        (
            load(flat_cut, start=datetime(2026, 3, 3, tzinfo=TZ)),
            {},
            "history: 1 usable workday day",
        ),
        (
            [(at, kwh) for at, kwh in load(flat_cut) if not in_event(at)],
            {},
            "energy_kwh: no interval of the event window",
        ),
        (
            [
                (at + timedelta(minutes=5), kwh) if i == 7 else (at, kwh)
                for i, (at, kwh) in enumerate(load(flat_cut))
            ],
            {},
            r"energy_kwh: .* is off the 0:15:00 grid",
        ),
    ],
)
def test_bad_input_names_the_field(
    series: list[tuple[datetime, float]], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        measure(series, **kwargs)


def test_meter_names_appear_in_errors() -> None:
    with pytest.raises(ValueError, match=r"energy_kwh\['m2'\]\[3\]\.start must be timezone-aware"):
        measure_dispatch(
            {"m1": load(flat_cut), "m2": naive_at(3)},
            event_start=EVENT_START,
            event_end=EVENT_END,
            intensity_kg_per_kwh=0.5,
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"similar_days": 1}, "similar_days must be at least 2"),
        ({"min_similar_days": 11}, "min_similar_days must be in"),
        ({"adjustment_cap": 1.5}, "adjustment_cap must be in"),
        ({"confidence": 1.0}, "confidence must be in"),
        ({"adjustment_window": timedelta(0)}, "adjustment_window must be positive"),
        ({"timezone": "Mars/Olympus"}, "timezone: unknown time zone"),
    ],
)
def test_bad_method_names_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BaselineMethod(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("q", "dof", "table"),
    [
        (0.95, 1, 6.314),
        (0.95, 2, 2.920),
        (0.95, 3, 2.353),
        (0.95, 9, 1.833),
        (0.975, 5, 2.571),
        (0.95, 10_000, 1.645),
    ],
)
def test_t_quantile_matches_the_printed_table(q: float, dof: int, table: float) -> None:
    assert t_quantile(q, dof) == pytest.approx(table, abs=1.5e-3)
