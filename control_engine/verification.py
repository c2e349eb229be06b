"""What a dispatch saved: metered energy against a counterfactual baseline (IPMVP Option B/C spirit).

A dispatch (dimmed lighting, a raised HVAC setpoint, a paused compressor) changes a meter's energy
for a window ``[event_start, event_end)``. What it *avoided* is the energy the load would have used
without it, the **baseline**, minus what it did use. The baseline is never metered; it is estimated
from the load's own history, the way demand-response programmes settle events ("10 of 10 with a
day-of adjustment"):

1. **Similar days.** The ``similar_days`` (10) most recent days before the event day of the same
   *kind* (workday, Saturday, Sunday; or any calendar passed as ``day_kind``), looking back at most
   ``lookback_days`` (45). A day is skipped when an excluded window (another event, a shutdown)
   touches it, or when any interval it must supply is missing.
2. **Mean per interval of the day.** Each event interval's baseline is the mean, over those days, of
   the interval at the same local wall-clock time (an event that crosses midnight maps onto the next
   day of each similar day).
3. **Day-of adjustment.** The event day may be busier or warmer than its similar days. The
   ``adjustment_window`` (3 h) that ends ``adjustment_lead`` (1 h) before the event, when the load
   was not yet touched by the dispatch or its notice, is compared on the event day and on the
   baseline: *multiplicative* ``factor = actual / baseline`` over that window, or *additive*
   ``offset = mean(actual - baseline)`` per interval. Either is capped at ``adjustment_cap`` (±20 %;
   the additive offset at 20 % of the baseline's mean interval in the window) so that an odd morning
   cannot run away with the result, and applied to every baseline interval of the event.
4. **Avoided = adjusted baseline - actual**, summed over the intervals of the window that were
   metered; missing ones count nothing and raise a flag. kgCO2e avoided weighs each interval with
   the grid intensity in force at its start.
5. **Rebound.** With a post-event window ``[event_end, post_end)``, the energy used above the
   baseline there (load shifted, not avoided: a pre-cooled hall warming up, a paused compressor
   refilling) is subtracted. Only an increase is subtracted: a post window below its baseline adds
   nothing, because that would credit the noise of the baseline to the dispatch.
6. **Uncertainty.** Each similar day in turn is treated as if it were the event day and predicted
   from the others with the same method (leave one out, adjustment included); the root mean square
   of those errors of the window's total is the baseline's prediction error, which carries the
   spread between days and the correlation between intervals of one day. The ± half-width is that
   times Student's t at ``confidence`` (90 %) with ``days - 1`` degrees of freedom.

Pure and synchronous, no I/O: the caller reads the meter series and the intensity from the
historian and the ledger and stores the :class:`DispatchEffect`; :func:`sum_effects` adds a month's.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from statistics import NormalDist, fmean
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "Adjustment",
    "BaselineMethod",
    "DispatchEffect",
    "EffectFlag",
    "IntervalEffect",
    "MonthlyEffect",
    "Phase",
    "default_day_kind",
    "measure_dispatch",
    "sum_effects",
    "t_quantile",
]

EnergySeries = Sequence[tuple[datetime, float]]
"""Interval energy of one meter: ``(interval start, kWh)`` pairs, aware datetimes."""
IntensitySeries = Sequence[tuple[datetime, float]]
"""Grid intensity: ``(from, kgCO2/kWh)`` pairs, each in force until the next one."""

MIN_DAYS: Final = 2
"""Fewest similar days that give a baseline and a spread to judge it by."""


class Adjustment(enum.StrEnum):
    """How the baseline is brought to the level of the event day."""

    MULTIPLICATIVE = "multiplicative"
    """Scale by actual / baseline over the pre-event window (loads that scale: HVAC, lines)."""
    ADDITIVE = "additive"
    """Shift by the mean actual - baseline per interval (a constant extra load)."""
    NONE = "none"
    """The similar days' mean as it is."""


class EffectFlag(enum.StrEnum):
    """Why a measured effect deserves a second look."""

    FEW_SIMILAR_DAYS = "few_similar_days"
    """Fewer similar days than ``min_similar_days``: the baseline rests on thin history."""
    EVENT_DATA_GAP = "event_data_gap"
    """Intervals of the event window were not metered; they count nothing."""
    POST_DATA_GAP = "post_data_gap"
    """Intervals of the post-event window were not metered; rebound there is not seen."""
    NO_ADJUSTMENT_DATA = "no_adjustment_data"
    """The pre-event window of the event day is missing (or excluded): no day-of adjustment."""
    ADJUSTMENT_CAPPED = "adjustment_capped"
    """The event day differed from its similar days by more than the cap allows."""
    NOT_SIGNIFICANT = "not_significant"
    """The effect is within its own uncertainty: it may be nothing at all."""


class Phase(enum.StrEnum):
    """Which window an interval belongs to."""

    EVENT = "event"
    POST = "post"


def default_day_kind(day: date) -> str:
    """Return ``workday`` (Monday to Friday), ``saturday`` or ``sunday``.

    >>> default_day_kind(date(2026, 3, 2)), default_day_kind(date(2026, 3, 7))
    ('workday', 'saturday')
    """
    weekday = day.weekday()
    return "workday" if weekday < 5 else ("saturday" if weekday == 5 else "sunday")


@dataclass(frozen=True, slots=True, kw_only=True)
class BaselineMethod:
    """How the baseline is built (see the module docstring); validated at construction."""

    timezone: str = "Asia/Shanghai"
    """The site's zone: days, kinds of day and intervals of the day are local."""
    day_kind: Callable[[date], str] = default_day_kind
    """Kind of a day; similar days have the event day's kind (a holiday calendar goes here)."""
    similar_days: int = 10
    min_similar_days: int = 5
    """Fewer days than this raise :attr:`EffectFlag.FEW_SIMILAR_DAYS` (fewer than 2 are an error)."""
    lookback_days: int = 45
    adjustment: Adjustment = Adjustment.MULTIPLICATIVE
    adjustment_window: timedelta = timedelta(hours=3)
    adjustment_lead: timedelta = timedelta(hours=1)
    """Gap between the adjustment window and the event: notice, pre-cooling, ramping."""
    adjustment_cap: float = 0.2
    """Largest relative adjustment, either way."""
    confidence: float = 0.90
    """Two-sided confidence of the ± uncertainty."""

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"timezone: unknown time zone {self.timezone!r}") from err
        if self.similar_days < MIN_DAYS:
            raise ValueError(f"similar_days must be at least {MIN_DAYS}, got {self.similar_days}")
        if not 1 <= self.min_similar_days <= self.similar_days:
            raise ValueError(
                f"min_similar_days must be in [1, similar_days={self.similar_days}], "
                f"got {self.min_similar_days}"
            )
        if self.lookback_days < 1:
            raise ValueError(f"lookback_days must be at least 1, got {self.lookback_days}")
        if self.adjustment_window <= timedelta(0):
            raise ValueError(f"adjustment_window must be positive, got {self.adjustment_window}")
        if self.adjustment_lead < timedelta(0):
            raise ValueError(f"adjustment_lead must be >= 0, got {self.adjustment_lead}")
        if not 0 <= self.adjustment_cap < 1:
            raise ValueError(f"adjustment_cap must be in [0, 1), got {self.adjustment_cap}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")


@dataclass(frozen=True, slots=True, kw_only=True)
class IntervalEffect:
    """One interval of the event or post-event window."""

    start: datetime
    phase: Phase
    baseline_kwh: float
    """Adjusted baseline."""
    actual_kwh: float | None
    """Metered energy; None when the interval is missing."""
    intensity_kg_per_kwh: float

    @property
    def avoided_kwh(self) -> float | None:
        """Return baseline - actual (negative: more used than the baseline), None if not metered."""
        return None if self.actual_kwh is None else self.baseline_kwh - self.actual_kwh

    @property
    def co2e_avoided_kg(self) -> float | None:
        """Return the avoided energy at the interval's grid intensity, None if not metered."""
        avoided = self.avoided_kwh
        return None if avoided is None else avoided * self.intensity_kg_per_kwh


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchEffect:
    """What one dispatch avoided, against its baseline, with how sure we are."""

    dispatch: str
    """The dispatch's id (command correlation id), as the caller passed it."""
    timezone: str
    event_start: datetime
    event_end: datetime
    post_end: datetime | None
    energy_avoided_kwh: float
    """Net: avoided in the event window minus the rebound after it."""
    co2e_avoided_kg: float
    """Net, at each interval's grid intensity."""
    baseline_kwh: float
    """Adjusted baseline over the metered intervals of the event window."""
    actual_kwh: float
    """Metered energy over the event window."""
    window_avoided_kwh: float
    rebound_kwh: float
    """Energy above the baseline in the post-event window (>= 0; 0 without one)."""
    rebound_co2e_kg: float
    uncertainty_kwh: float
    """± half-width of the net energy at :attr:`confidence`."""
    co2e_uncertainty_kg: float
    confidence: float
    intervals: tuple[IntervalEffect, ...]
    day_kind: str
    days_used: tuple[date, ...]
    """The similar days, most recent first."""
    adjustment: Adjustment
    adjustment_factor: float
    """Multiplicative factor applied to the baseline (1.0 unless multiplicative)."""
    adjustment_offset_kwh: float
    """Additive offset per interval (0.0 unless additive)."""
    missing_intervals: int
    """Intervals of the event and post windows without a metered value."""
    flags: frozenset[EffectFlag]
    method: str
    """The method in words, for the report."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MonthlyEffect:
    """A month's dispatch effects added up."""

    month: str
    """``YYYY-MM`` in the site's time zone."""
    dispatches: int
    energy_avoided_kwh: float
    co2e_avoided_t: float
    uncertainty_kwh: float
    """± half-width: the dispatches' uncertainties added in quadrature (independent errors)."""
    co2e_uncertainty_t: float
    confidence: float
    flag_counts: Mapping[EffectFlag, int] = field(default_factory=dict)
    """Dispatches raising each flag."""


# -- the measurement ---------------------------------------------------------------------------------


def measure_dispatch(
    energy_kwh: EnergySeries | Mapping[str, EnergySeries],
    *,
    event_start: datetime,
    event_end: datetime,
    intensity_kg_per_kwh: float | IntensitySeries,
    post_end: datetime | None = None,
    excluded: Sequence[tuple[datetime, datetime]] = (),
    method: BaselineMethod | None = None,
    interval: timedelta | None = None,
    dispatch: str = "",
) -> DispatchEffect:
    """Return the energy and kgCO2e a dispatch avoided, against a similar-day baseline.

    Parameters
    ----------
    energy_kwh
        Interval energy of the affected meter, or of several meters by id (summed; an interval
        counts only where every meter has it). It must hold the history (weeks) and the event day.
    event_start, event_end
        The event window ``[event_start, event_end)``, on interval boundaries.
    intensity_kg_per_kwh
        Grid intensity: a constant, or ``(from, kg/kWh)`` steps.
    post_end
        End of the post-event window ``[event_end, post_end)`` in which rebound is netted.
    excluded
        Windows ``[start, end)`` of other events; days they touch are no similar days.
    method
        The baseline method; :class:`BaselineMethod` defaults.
    interval
        Length of an interval; by default the most common step between the series' starts.
    dispatch
        The dispatch's id, carried into the result.

    Examples
    --------
    A flat 100 kWh/h load cut by 40 kWh for two hours of a Wednesday, after two weeks of history:

    >>> from datetime import datetime, timedelta
    >>> from zoneinfo import ZoneInfo
    >>> tz = ZoneInfo("Asia/Shanghai")
    >>> start = datetime(2026, 3, 4, 14, tzinfo=tz)
    >>> hours = [datetime(2026, 2, 18, tzinfo=tz) + timedelta(hours=h) for h in range(15 * 24)]
    >>> series = [(t, 60.0 if start <= t < start + timedelta(hours=2) else 100.0) for t in hours]
    >>> effect = measure_dispatch(
    ...     series, event_start=start, event_end=start + timedelta(hours=2), intensity_kg_per_kwh=0.58
    ... )
    >>> round(effect.energy_avoided_kwh, 6), round(effect.co2e_avoided_kg, 6), len(effect.days_used)
    (80.0, 46.4, 10)
    """
    how = method if method is not None else BaselineMethod()
    zone = ZoneInfo(how.timezone)
    series, step = _combine(energy_kwh, interval)
    first = min(series)
    _check_event(series, step, event_start, event_end, post_end)
    grid_origin = first
    windows = _check_windows(excluded)
    intensity = _Intensity(intensity_kg_per_kwh)

    event_times = _grid(event_start, event_end, grid_origin, step)
    post_times = _grid(event_end, post_end, grid_origin, step) if post_end is not None else []
    adjust_from = event_start - how.adjustment_lead - how.adjustment_window
    adjust_times = (
        _grid(adjust_from, event_start - how.adjustment_lead, grid_origin, step)
        if how.adjustment is not Adjustment.NONE
        else []
    )
    measured_times = event_times + post_times
    event_day = event_start.astimezone(zone).date()
    kind = how.day_kind(event_day)
    days = _similar_days(
        series=series,
        needed=measured_times + adjust_times,
        event_day=event_day,
        kind=kind,
        windows=windows,
        zone=zone,
        data_start=first,
        step=step,
        how=how,
    )
    if len(days) < MIN_DAYS:
        raise ValueError(
            f"history: {len(days)} usable {kind} day(s) in the {how.lookback_days} days before "
            f"{event_day.isoformat()}; at least {MIN_DAYS} are needed "
            "(too little history, gaps or excluded days)"
        )

    history = [[series[_on_day(t, event_day, day, zone)] for t in measured_times] for day in days]
    history_adjust = [[series[_on_day(t, event_day, day, zone)] for t in adjust_times] for day in days]
    # Pre-event intervals of the event day that are metered and not inside another event.
    usable = [
        j
        for j, t in enumerate(adjust_times)
        if t in series and not any(start <= t < end for start, end in windows)
    ]
    day_of = [series[adjust_times[j]] for j in usable]
    mean_measured = _column_means(history)
    mean_adjust = [_column_means(history_adjust)[j] for j in usable] if usable else []
    fit = _fit_adjustment(day_of, mean_adjust, how)
    baseline = [fit.apply(b) for b in mean_measured]

    intervals = tuple(
        IntervalEffect(
            start=t.astimezone(event_start.tzinfo),
            phase=Phase.EVENT if i < len(event_times) else Phase.POST,
            baseline_kwh=baseline[i],
            actual_kwh=series.get(t),
            intensity_kg_per_kwh=intensity.at(t),
        )
        for i, t in enumerate(measured_times)
    )
    event = [e for e in intervals if e.phase is Phase.EVENT and e.actual_kwh is not None]
    if not event:
        raise ValueError(
            f"energy_kwh: no interval of the event window {event_start.isoformat()} - "
            f"{event_end.isoformat()} is metered"
        )
    post = [e for e in intervals if e.phase is Phase.POST and e.actual_kwh is not None]
    baseline_kwh = math.fsum(e.baseline_kwh for e in event)
    actual_kwh = math.fsum(e.actual_kwh for e in event if e.actual_kwh is not None)
    window_co2e_kg = math.fsum(e.co2e_avoided_kg for e in event if e.co2e_avoided_kg is not None)
    post_extra_kwh = -math.fsum(e.avoided_kwh for e in post if e.avoided_kwh is not None)
    post_extra_kg = -math.fsum(e.co2e_avoided_kg for e in post if e.co2e_avoided_kg is not None)
    rebound_kwh, rebound_kg = max(0.0, post_extra_kwh), max(0.0, post_extra_kg)
    net_kwh = baseline_kwh - actual_kwh - rebound_kwh
    net_kg = window_co2e_kg - rebound_kg

    # Leave-one-out errors of the netted total: the baseline enters the event window and, when a
    # rebound is subtracted, the post window too (net = B_event + B_post - A_event - A_post).
    weights_kwh = [
        1.0 if e.actual_kwh is not None and (e.phase is Phase.EVENT or rebound_kwh > 0) else 0.0
        for e in intervals
    ]
    weights_kg = [
        e.intensity_kg_per_kwh
        if e.actual_kwh is not None and (e.phase is Phase.EVENT or rebound_kg > 0)
        else 0.0
        for e in intervals
    ]
    errors = _leave_one_out_errors(history, [[row[j] for j in usable] for row in history_adjust], how)
    quantile = t_quantile(0.5 + how.confidence / 2, len(days) - 1)
    uncertainty_kwh = quantile * _rms(_weighted_sums(errors, weights_kwh))
    uncertainty_kg = quantile * _rms(_weighted_sums(errors, weights_kg))

    flags = _flags(intervals, days=len(days), how=how, fit=fit, significant=abs(net_kwh) > uncertainty_kwh)
    return DispatchEffect(
        dispatch=dispatch,
        timezone=how.timezone,
        event_start=event_start,
        event_end=event_end,
        post_end=post_end,
        energy_avoided_kwh=net_kwh,
        co2e_avoided_kg=net_kg,
        baseline_kwh=baseline_kwh,
        actual_kwh=actual_kwh,
        window_avoided_kwh=baseline_kwh - actual_kwh,
        rebound_kwh=rebound_kwh,
        rebound_co2e_kg=rebound_kg,
        uncertainty_kwh=uncertainty_kwh,
        co2e_uncertainty_kg=uncertainty_kg,
        confidence=how.confidence,
        intervals=intervals,
        day_kind=kind,
        days_used=tuple(days),
        adjustment=how.adjustment,
        adjustment_factor=fit.factor,
        adjustment_offset_kwh=fit.offset_kwh,
        missing_intervals=sum(1 for e in intervals if e.actual_kwh is None),
        flags=flags,
        method=_describe(
            how=how,
            kind=kind,
            days=days,
            step=step,
            adjust_used=len(usable),
            adjust_total=len(adjust_times),
            fit=fit,
            quantile=quantile,
        ),
    )


def sum_effects(effects: Iterable[DispatchEffect], *, month: str | None = None) -> MonthlyEffect:
    """Add up one month's dispatch effects; uncertainties add in quadrature.

    The dispatches' baseline errors are taken as independent (different events, mostly different
    days); every effect must be of ``month`` (``YYYY-MM``, in its site's zone), which is taken from
    the effects when not given, and share one confidence level.
    """
    items = list(effects)
    months = {_month_of(e) for e in items}
    if month is None:
        if not items:
            raise ValueError("effects: empty; pass month= to sum a month without dispatches")
        if len(months) > 1:
            raise ValueError(f"effects: span months {', '.join(sorted(months))}; sum one month at a time")
        month = months.pop()
    elif months - {month}:
        raise ValueError(f"effects: {', '.join(sorted(months - {month}))} outside month {month}")
    confidences = {e.confidence for e in items}
    if len(confidences) > 1:
        raise ValueError(f"effects: mixed confidence levels {sorted(confidences)}")
    counts: Counter[EffectFlag] = Counter(flag for e in items for flag in e.flags)
    return MonthlyEffect(
        month=month,
        dispatches=len(items),
        energy_avoided_kwh=math.fsum(e.energy_avoided_kwh for e in items),
        co2e_avoided_t=math.fsum(e.co2e_avoided_kg for e in items) / 1000.0,
        uncertainty_kwh=math.sqrt(math.fsum(e.uncertainty_kwh**2 for e in items)),
        co2e_uncertainty_t=math.sqrt(math.fsum(e.co2e_uncertainty_kg**2 for e in items)) / 1000.0,
        confidence=confidences.pop() if confidences else BaselineMethod().confidence,
        flag_counts=dict(counts),
    )


def t_quantile(q: float, dof: int) -> float:
    """Return Student's t quantile ``q`` with ``dof`` degrees of freedom.

    Exact for 1 and 2 degrees of freedom; above, the Cornish-Fisher expansion (Abramowitz & Stegun
    26.7.5), within 0.05 % of the exact value at q = 0.95 from 3 degrees of freedom up.

    >>> round(t_quantile(0.95, 9), 3), round(t_quantile(0.95, 1), 3)
    (1.833, 6.314)
    """
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if dof < 1:
        raise ValueError(f"dof must be at least 1, got {dof}")
    if dof == 1:
        return math.tan(math.pi * (q - 0.5))
    if dof == 2:
        return (2 * q - 1) / math.sqrt(2 * q * (1 - q))
    z = NormalDist().inv_cdf(q)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3 + g4 / dof**4


def _flags(
    intervals: Sequence[IntervalEffect], *, days: int, how: BaselineMethod, fit: _Fit, significant: bool
) -> frozenset[EffectFlag]:
    """Return the quality flags of a measured effect."""
    flags: set[EffectFlag] = set()
    if days < how.min_similar_days:
        flags.add(EffectFlag.FEW_SIMILAR_DAYS)
    if any(e.actual_kwh is None for e in intervals if e.phase is Phase.EVENT):
        flags.add(EffectFlag.EVENT_DATA_GAP)
    if any(e.actual_kwh is None for e in intervals if e.phase is Phase.POST):
        flags.add(EffectFlag.POST_DATA_GAP)
    if how.adjustment is not Adjustment.NONE and not fit.applied:
        flags.add(EffectFlag.NO_ADJUSTMENT_DATA)
    if fit.capped:
        flags.add(EffectFlag.ADJUSTMENT_CAPPED)
    if not significant:
        flags.add(EffectFlag.NOT_SIGNIFICANT)
    return frozenset(flags)


def _check_event(
    series: Mapping[datetime, float],
    step: timedelta,
    event_start: datetime,
    event_end: datetime,
    post_end: datetime | None,
) -> None:
    """Check the event and post windows: aware, ordered, on the interval grid, inside the data."""
    _check_aware("event_start", event_start)
    _check_aware("event_end", event_end)
    if event_end <= event_start:
        raise ValueError(f"event_end ({event_end.isoformat()}) must be after event_start")
    first, last_end = min(series), max(series) + step
    grid_origin = first
    for name, at in (("event_start", event_start), ("event_end", event_end)):
        _check_on_grid(name, at, grid_origin, step)
    if event_start < first or event_end > last_end:
        raise ValueError(
            f"event window {event_start.isoformat()} - {event_end.isoformat()} is outside the data "
            f"({first.isoformat()} - {last_end.isoformat()})"
        )
    if post_end is not None:
        _check_aware("post_end", post_end)
        _check_on_grid("post_end", post_end, grid_origin, step)
        if post_end <= event_end:
            raise ValueError(f"post_end ({post_end.isoformat()}) must be after event_end")
        if post_end > last_end:
            raise ValueError(
                f"post_end ({post_end.isoformat()}) is after the data ends ({last_end.isoformat()})"
            )


# -- pieces ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fit:
    factor: float = 1.0
    offset_kwh: float = 0.0
    applied: bool = False
    capped: bool = False

    def apply(self, baseline_kwh: float) -> float:
        return baseline_kwh * self.factor + self.offset_kwh


def _fit_adjustment(day_of: Sequence[float], baseline: Sequence[float], how: BaselineMethod) -> _Fit:
    """Fit the day-of adjustment of the event day's pre-event intervals against their baseline."""
    if how.adjustment is Adjustment.NONE or not day_of:
        return _Fit()
    actual_kwh, baseline_kwh = math.fsum(day_of), math.fsum(baseline)
    if baseline_kwh <= 0:
        return _Fit()  # nothing to scale by: a load that was off before the event on every similar day
    cap = how.adjustment_cap
    if how.adjustment is Adjustment.MULTIPLICATIVE:
        raw = actual_kwh / baseline_kwh
        factor = min(max(raw, 1.0 - cap), 1.0 + cap)
        return _Fit(factor=factor, applied=True, capped=factor != raw)
    raw = (actual_kwh - baseline_kwh) / len(day_of)
    limit = cap * baseline_kwh / len(day_of)
    offset = min(max(raw, -limit), limit)
    return _Fit(offset_kwh=offset, applied=True, capped=offset != raw)


def _leave_one_out_errors(
    history: Sequence[Sequence[float]], adjust: Sequence[Sequence[float]], how: BaselineMethod
) -> list[list[float]]:
    """Return, per similar day, actual - prediction from the other days, per measured interval."""
    n = len(history)
    totals = [math.fsum(column) for column in zip(*history, strict=True)]
    adjust_totals = [math.fsum(column) for column in zip(*adjust, strict=True)] if adjust[0] else []
    errors = []
    for row, adjust_row in zip(history, adjust, strict=True):
        others = [(total - value) / (n - 1) for total, value in zip(totals, row, strict=True)]
        others_adjust = [
            (total - value) / (n - 1) for total, value in zip(adjust_totals, adjust_row, strict=True)
        ]
        fit = _fit_adjustment(adjust_row, others_adjust, how)
        errors.append([value - fit.apply(mean) for value, mean in zip(row, others, strict=True)])
    return errors


def _weighted_sums(errors: Sequence[Sequence[float]], weights: Sequence[float]) -> list[float]:
    return [math.fsum(e * w for e, w in zip(row, weights, strict=True)) for row in errors]


def _rms(values: Sequence[float]) -> float:
    return math.sqrt(math.fsum(v * v for v in values) / len(values))


def _column_means(rows: Sequence[Sequence[float]]) -> list[float]:
    return [fmean(column) for column in zip(*rows, strict=True)] if rows and rows[0] else []


def _similar_days(
    *,
    series: Mapping[datetime, float],
    needed: Sequence[datetime],
    event_day: date,
    kind: str,
    windows: Sequence[tuple[datetime, datetime]],
    zone: ZoneInfo,
    data_start: datetime,
    step: timedelta,
    how: BaselineMethod,
) -> list[date]:
    """Return up to ``similar_days`` earlier days of ``kind`` with every needed interval metered."""
    earliest_needed = min(needed)
    offsets = [(t.astimezone(zone).date() - event_day).days for t in needed]
    first_offset, last_offset = min(offsets), max(offsets)
    days: list[date] = []
    for back in range(1, how.lookback_days + 1):
        day = event_day - timedelta(days=back)
        span_start = datetime.combine(day + timedelta(days=first_offset), datetime.min.time(), zone)
        span_end = datetime.combine(day + timedelta(days=last_offset + 1), datetime.min.time(), zone)
        if span_end <= data_start:
            break
        if how.day_kind(day) != kind:
            continue
        if any(start < span_end and end > span_start for start, end in windows):
            continue
        mapped = [_on_day(t, event_day, day, zone) for t in needed]
        # A long event maps its later hours onto later days: they must still be history.
        if max(mapped) + step > earliest_needed or any(t not in series for t in mapped):
            continue
        days.append(day)
        if len(days) == how.similar_days:
            break
    return days


def _on_day(at: datetime, event_day: date, day: date, zone: ZoneInfo) -> datetime:
    """Return the instant on ``day`` at ``at``'s local wall-clock time (same offset in days), UTC."""
    local = at.astimezone(zone)
    shifted = day + timedelta(days=(local.date() - event_day).days)
    return datetime.combine(shifted, local.time(), zone).astimezone(UTC)


def _grid(start: datetime, end: datetime, origin: datetime, step: timedelta) -> list[datetime]:
    """Return the interval starts in ``[start, end)`` of the grid ``origin + k * step``, UTC."""
    k = math.ceil((start - origin) / step)
    out = []
    at = origin + k * step
    while at < end:
        out.append(at.astimezone(UTC))
        at += step
    return out


def _combine(
    energy: EnergySeries | Mapping[str, EnergySeries], interval: timedelta | None
) -> tuple[dict[datetime, float], timedelta]:
    """Validate the meter series and sum them per interval (an interval needs every meter)."""
    named = {str(k): v for k, v in energy.items()} if isinstance(energy, Mapping) else {"": energy}
    if not named:
        raise ValueError("energy_kwh: no meters")
    parsed = {name: _parse_series(name, series) for name, series in named.items()}
    if interval is None:
        steps: Counter[timedelta] = Counter(
            b - a for starts in parsed.values() for a, b in itertools.pairwise(sorted(starts))
        )
        if not steps:
            raise ValueError("energy_kwh: needs at least two intervals to infer the interval length")
        # The most common step: a gap makes a longer one, a stray sample a shorter one, both rare.
        interval = min(steps, key=lambda step: (-steps[step], step))
    elif interval <= timedelta(0):
        raise ValueError(f"interval must be positive, got {interval}")
    common = set.intersection(*(set(starts) for starts in parsed.values()))
    if not common:
        raise ValueError("energy_kwh: the meters have no interval in common")
    origin = min(common)
    for name, starts in parsed.items():
        for start in starts:
            if (start - origin) % interval:
                raise ValueError(
                    f"{_field(name)}: {start.isoformat()} is off the {interval} grid "
                    f"starting {origin.isoformat()}"
                )
    return {t: math.fsum(starts[t] for starts in parsed.values()) for t in sorted(common)}, interval


def _parse_series(name: str, series: EnergySeries) -> dict[datetime, float]:
    out: dict[datetime, float] = {}
    for i, item in enumerate(series):
        where = f"{_field(name)}[{i}]"
        try:
            start, kwh = item
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: expected a (start, kWh) pair") from err
        _check_aware(f"{where}.start", start)
        if isinstance(kwh, bool) or not isinstance(kwh, int | float) or not math.isfinite(kwh):
            raise ValueError(
                f"{where}.kwh must be a finite number (leave a missing interval out), got {kwh!r}"
            )
        key = start.astimezone(UTC)
        if key in out:
            raise ValueError(f"{where}.start {start.isoformat()} appears twice")
        out[key] = float(kwh)
    if not out:
        raise ValueError(f"{_field(name)}: no intervals")
    return out


def _field(name: str) -> str:
    return f"energy_kwh[{name!r}]" if name else "energy_kwh"


def _check_aware(name: str, at: object) -> None:
    if not isinstance(at, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(at).__name__}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {at.isoformat()}")


def _check_on_grid(name: str, at: datetime, origin: datetime, step: timedelta) -> None:
    if (at - origin) % step:
        raise ValueError(f"{name} ({at.isoformat()}) is not on an interval boundary (every {step})")


def _check_windows(excluded: Sequence[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    out = []
    for i, (start, end) in enumerate(excluded):
        _check_aware(f"excluded[{i}].start", start)
        _check_aware(f"excluded[{i}].end", end)
        if end <= start:
            raise ValueError(
                f"excluded[{i}]: end ({end.isoformat()}) must be after start ({start.isoformat()})"
            )
        out.append((start.astimezone(UTC), end.astimezone(UTC)))
    return out


class _Intensity:
    """Grid intensity in force at an instant: a constant or a step series."""

    def __init__(self, intensity: float | IntensitySeries) -> None:
        self._constant: float | None = None
        self._starts: list[datetime] = []
        self._values: list[float] = []
        if isinstance(intensity, int | float) and not isinstance(intensity, bool):
            self._constant = _check_intensity("intensity_kg_per_kwh", intensity)
            return
        if not isinstance(intensity, Sequence):
            raise TypeError("intensity_kg_per_kwh must be a number or a sequence of (from, kg/kWh) pairs")
        pairs = []
        for i, item in enumerate(intensity):
            try:
                start, value = item
            except (TypeError, ValueError) as err:
                raise ValueError(f"intensity_kg_per_kwh[{i}]: expected a (from, kg/kWh) pair") from err
            _check_aware(f"intensity_kg_per_kwh[{i}].start", start)
            pairs.append((start.astimezone(UTC), _check_intensity(f"intensity_kg_per_kwh[{i}].value", value)))
        if not pairs:
            raise ValueError("intensity_kg_per_kwh: empty series")
        pairs.sort(key=lambda pair: pair[0])
        self._starts = [start for start, _ in pairs]
        self._values = [value for _, value in pairs]

    def at(self, instant: datetime) -> float:
        if self._constant is not None:
            return self._constant
        index = bisect.bisect_right(self._starts, instant) - 1
        if index < 0:
            raise ValueError(
                f"intensity_kg_per_kwh: no value in force at {instant.isoformat()} "
                f"(the series starts {self._starts[0].isoformat()})"
            )
        return self._values[index]


def _check_intensity(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _month_of(effect: DispatchEffect) -> str:
    local = effect.event_start.astimezone(ZoneInfo(effect.timezone))
    return f"{local.year:04d}-{local.month:02d}"


def _describe(
    *,
    how: BaselineMethod,
    kind: str,
    days: Sequence[date],
    step: timedelta,
    adjust_used: int,
    adjust_total: int,
    fit: _Fit,
    quantile: float,
) -> str:
    minutes = step.total_seconds() / 60
    text = (
        f"baseline: mean of {len(days)} of {how.similar_days} similar {kind} days "
        f"({days[-1].isoformat()} to {days[0].isoformat()}) per {minutes:g}-min interval of the day"
    )
    if how.adjustment is Adjustment.NONE:
        text += "; no day-of adjustment"
    elif not fit.applied:
        text += f"; {how.adjustment.value} day-of adjustment not applied (no usable pre-event data)"
    else:
        window_h = how.adjustment_window.total_seconds() / 3600
        lead_h = how.adjustment_lead.total_seconds() / 3600
        value = (
            f"factor {fit.factor:.4f}"
            if how.adjustment is Adjustment.MULTIPLICATIVE
            else f"offset {fit.offset_kwh:+.3f} kWh per interval"
        )
        text += (
            f"; {how.adjustment.value} day-of adjustment over the {window_h:g} h ending {lead_h:g} h "
            f"before the event ({adjust_used} of {adjust_total} intervals), {value}"
            f"{' (capped)' if fit.capped else ''}, cap ±{how.adjustment_cap:.0%}"
        )
    return text + (
        f"; uncertainty ±{quantile:.3f} x leave-one-out RMS error over {len(days)} days "
        f"(Student t, {how.confidence:.0%})"
    )
