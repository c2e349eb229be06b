"""Month-end forecasts of a synthetic node whose weekly pattern is known, so the truth is known too.

The node emits 10 kgCO2e an hour on workdays (Monday to Friday) from 08:00 to 18:00 and 2 kg an
hour otherwise, weekends 2 kg all day:

- a workday is 10 h x 10 kg + 14 h x 2 kg = 128 kg;
- a weekend day is 24 h x 2 kg = 48 kg.

March 2026 (Asia/Shanghai) begins on a Sunday and has 31 days: workdays 2-6, 9-13, 16-20, 23-27,
30-31 (22 days) and weekend days 1, 7-8, 14-15, 21-22, 28-29 (9 days), so its total is
22 x 128 + 9 x 48 = 2816 + 432 = 3248 kg. The first ten days hold 7 workdays (2-6, 9-10) and 3
weekend days (1, 7, 8): 7 x 128 + 3 x 48 = 896 + 144 = 1040 kg. February 2026 (Sunday the 1st to
Saturday the 28th) is exactly four weeks of history.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from control_engine.forecast import MonthForecaster, month_bounds, month_key

TZ = ZoneInfo("Asia/Shanghai")
NODE = "ent-a"
MARCH_TOTAL_KG = 3248.0  # 22 workdays x 128 kg + 9 weekend days x 48 kg
MARCH_FIRST_10_DAYS_KG = 1040.0  # 7 workdays x 128 kg + 3 weekend days x 48 kg
HOUR = timedelta(hours=1)


def pattern_kg(local: datetime) -> float:
    """Return the synthetic node's kgCO2e in the local hour starting at ``local``."""
    return 10.0 if local.weekday() < 5 and 8 <= local.hour < 18 else 2.0


def march(day: int) -> datetime:
    """Return local midnight at the start of ``day`` of March 2026 (day 32 is April 1st)."""
    return datetime(2026, 3, 1, tzinfo=TZ) + timedelta(days=day - 1)


def hours(start: datetime, end: datetime) -> list[datetime]:
    """Return the starts (UTC) of the hours in ``[start, end)``."""
    out, at = [], start.astimezone(UTC)
    while at < end.astimezone(UTC):
        out.append(at)
        at += HOUR
    return out


def learn(forecaster: MonthForecaster, start: datetime, end: datetime) -> float:
    """Teach the pattern over ``[start, end)``; return the kg taught."""
    total = 0.0
    for at in hours(start, end):
        kg = pattern_kg(at.astimezone(TZ))
        forecaster.learn_hour(NODE, at, kg)
        total += kg
    return total


def test_pattern_arithmetic_matches_the_comments() -> None:
    march_kg = sum(pattern_kg(at.astimezone(TZ)) for at in hours(march(1), march(32)))
    first_10_kg = sum(pattern_kg(at.astimezone(TZ)) for at in hours(march(1), march(11)))
    assert (march_kg, first_10_kg) == (MARCH_TOTAL_KG, MARCH_FIRST_10_DAYS_KG)


def test_forecast_at_day_10_is_within_2_percent_after_four_weeks() -> None:
    forecaster = MonthForecaster("Asia/Shanghai")
    learn(forecaster, datetime(2026, 2, 1, tzinfo=TZ), march(1))  # four weeks of history
    actual = learn(forecaster, march(1), march(11))  # the month so far: days 1-10
    assert actual == MARCH_FIRST_10_DAYS_KG

    result = forecaster.forecast(NODE, march(11), actual)

    assert result.method == "profile"
    assert result.month == "2026-03"
    assert result.actual_kg == actual
    assert abs(result.forecast_kg - MARCH_TOTAL_KG) / MARCH_TOTAL_KG < 0.02


def test_interval_contains_the_truth_and_narrows_as_the_month_goes_on() -> None:
    forecaster = MonthForecaster("Asia/Shanghai")
    learn(forecaster, datetime(2026, 2, 1, tzinfo=TZ), march(1))
    actual, widths = 0.0, []
    previous_day = 1
    for day in (11, 21, 31):  # at the end of days 10, 20 and 30
        actual += learn(forecaster, march(previous_day), march(day))
        previous_day = day
        result = forecaster.forecast(NODE, march(day), actual)
        assert result.low_kg <= MARCH_TOTAL_KG <= result.high_kg, (day, result)
        assert result.low_kg >= actual  # what is spent already cannot be unspent
        widths.append(result.high_kg - result.low_kg)
    assert widths[0] > widths[1] > widths[2] > 0


def test_run_rate_without_history() -> None:
    forecaster = MonthForecaster("Asia/Shanghai")

    result = forecaster.forecast(NODE, march(11), MARCH_FIRST_10_DAYS_KG)

    # 1040 kg in 10 of 31 days: 1040 x 31 / 10 = 3224 kg; the interval is +-half the rest to come,
    # (3224 - 1040) / 2 = 1092 kg: [2132, 4316].
    assert result.method == "run_rate"
    assert result.forecast_kg == pytest.approx(3224.0, rel=1e-12)
    assert result.low_kg == pytest.approx(2132.0, rel=1e-12)
    assert result.high_kg == pytest.approx(4316.0, rel=1e-12)


def test_run_rate_in_the_first_hour_is_the_actual() -> None:
    forecaster = MonthForecaster("Asia/Shanghai")
    result = forecaster.forecast(NODE, march(1) + timedelta(minutes=30), 5.0)
    # Half an hour is too little to extrapolate from.
    assert (result.method, result.forecast_kg, result.low_kg, result.high_kg) == ("run_rate", 5.0, 5.0, 5.0)


def test_a_node_without_history_runs_on_its_rate_while_others_use_profiles() -> None:
    forecaster = MonthForecaster("Asia/Shanghai")
    learn(forecaster, datetime(2026, 2, 1, tzinfo=TZ), march(1))
    assert forecaster.forecast("ent-new", march(11), 310.0).method == "run_rate"
    assert forecaster.nodes() == [NODE]


@pytest.mark.parametrize(
    ("month", "zone", "start", "end", "hours_long"),
    [
        # December to January: the year rolls over.
        ("2025-12", "Asia/Shanghai", "2025-12-01T00:00:00+08:00", "2026-01-01T00:00:00+08:00", 31 * 24),
        ("2026-01", "Asia/Shanghai", "2026-01-01T00:00:00+08:00", "2026-02-01T00:00:00+08:00", 31 * 24),
        # Berlin springs forward on 29 March 2026: March has 31 x 24 - 1 = 743 hours.
        ("2026-03", "Europe/Berlin", "2026-03-01T00:00:00+01:00", "2026-04-01T00:00:00+02:00", 743),
        # ... and falls back on 25 October 2026: 31 x 24 + 1 = 745 hours.
        ("2026-10", "Europe/Berlin", "2026-10-01T00:00:00+02:00", "2026-11-01T00:00:00+01:00", 745),
    ],
)
def test_month_bounds(month: str, zone: str, start: str, end: str, hours_long: int) -> None:
    got_start, got_end = month_bounds(month, ZoneInfo(zone))
    assert got_start.isoformat() == start
    assert got_end.isoformat() == end
    assert got_end.timestamp() - got_start.timestamp() == hours_long * 3600
    assert month_key(got_start) == month


@pytest.mark.parametrize("name", ["weekly_alpha", "daily_alpha", "error_alpha"])
@pytest.mark.parametrize("value", [0.0, -0.2, 1.5, math.nan])
def test_invalid_alpha_is_named(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        MonthForecaster("Asia/Shanghai", **{name: value})


def test_alpha_of_one_is_allowed() -> None:
    MonthForecaster("Asia/Shanghai", weekly_alpha=1.0, daily_alpha=1.0, error_alpha=1.0)


def test_non_positive_z_is_named() -> None:
    with pytest.raises(ValueError, match="z must be positive"):
        MonthForecaster("Asia/Shanghai", z=0.0)


def test_non_finite_kg_is_rejected() -> None:
    with pytest.raises(ValueError, match="kg must be finite"):
        MonthForecaster("Asia/Shanghai").learn_hour(NODE, march(1), math.inf)


def test_an_hour_learned_twice_is_ignored() -> None:
    once, twice = MonthForecaster("Asia/Shanghai"), MonthForecaster("Asia/Shanghai")
    learned = hours(datetime(2026, 2, 1, tzinfo=TZ), march(11))
    for i, at in enumerate(learned):
        kg = pattern_kg(at.astimezone(TZ))
        once.learn_hour(NODE, at, kg)
        twice.learn_hour(NODE, at, kg)
        twice.learn_hour(NODE, at, 1000.0)  # redelivered, with a different value
        if i >= 24:
            twice.learn_hour(NODE, learned[i - 24], 1000.0)  # an older hour replayed out of order

    assert twice.forecast(NODE, march(11), 1040.0) == once.forecast(NODE, march(11), 1040.0)
    # The equality above can fail: a new hour of 1000 kg, taken once, moves the forecast a lot.
    once.learn_hour(NODE, march(11), 1000.0)
    twice.learn_hour(NODE, march(11), pattern_kg(march(11)))
    moved = once.forecast(NODE, march(11) + HOUR, 1040.0).forecast_kg
    assert moved > twice.forecast(NODE, march(11) + HOUR, 1040.0).forecast_kg + 100.0
