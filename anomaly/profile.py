"""Time-of-day profile detector for energy loads: the ``profile`` kind of :mod:`anomaly.detectors`.

A factory's load is not a level but a daily shape: lines start at 06:00, lighting goes off at 19:00,
a second shift ends at 22:00. A detector that does not know the clock sees every shift change as a
step and every night as a drop. This one learns, for every ``slot_s`` slot of the *local* day (the
site's zone), an expected value and its usual spread, with separate profiles for the kinds of day
(by default Monday-Friday share one, Saturday and Sunday one each: many plants run a lighter
Saturday shift and stop on Sunday), and scores how far a reading is from what is usual *at that
time of that kind of day*.

How it scores a row ``(ts_s, value)``:

- the baseline is interpolated linearly between the centres of the adjacent slots, so a ramp
  inside a slot is followed instead of looking like a step;
- a shift change a few minutes early or late is normal, so the residual is the distance from the
  band spanned by the baselines at ``ts_s - shift_tolerance_s``, ``ts_s`` and
  ``ts_s + shift_tolerance_s`` (0 inside the band; on a flat part of the day the band is a point);
- the spread is the slot's exponentially weighted mean absolute residual, as a Gaussian sigma,
  floored at ``min_rel_spread`` of the baseline and at ``min_spread`` (point units), so a smooth or
  flat load does not alarm on noise;
- ``z = |residual| / spread`` is mapped through its two-sided Gaussian tail probability ``q(z)``:
  ``score = 0.5 * log q(z) / log q(z_limit)``, capped at 1, i.e. 0.5 exactly at ``z_limit``;
- a stuck (frozen) reading is scored as well: a value unchanged within ``stuck_tolerance`` for
  ``stuck_s`` while the slot's spread says the load normally moves scores 0.5, rising to 1 at twice
  that, as :class:`~anomaly.detectors.FlatlineCheck` does.

How it learns:

- rows of the current local day are collected per slot and folded into the profile when the day
  ends, with weight ``alpha`` per day (an exponentially weighted mean of the daily slot means, and of
  the mean absolute residuals), so nothing learned today moves today's baseline: an anomaly's
  excess energy is integrated against a baseline that holds still however long the episode lasts;
- a learned row's residual is clipped at ``z_limit`` spreads (Huber-style), so a row forced in as
  normal (``PointMonitor.relearn_after_s``) or an anomaly that slipped through moves the profile by a
  bounded amount;
- a permanent change is still accepted: a slot whose rows were mostly anomalous on
  ``relearn_after_days`` visits in a row takes the last visit's mean as its new level (one-off events,
  a night's extra load, a two-hour step, do not repeat at the same slot on consecutive days);
- a slot scores 0 (and has no baseline) until it has been seen on ``warmup_days`` days of its kind:
  the first Saturday and Sunday of a new point are not monitored; seed the detector from history
  with ``learn_one`` to skip that.

``score_one`` changes no state; when time has moved to a new day it scores against the profile as
the pending day's fold would leave it, exactly as ``update`` (which does the fold) will.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .scoring import STATE_VERSION, StuckRun, is_finite_number, spec_error

__all__ = [
    "ProfileDetector",
    "validate_shift_tolerance_s",
    "validate_slot_s",
    "validate_timezone",
    "validate_weekday_profiles",
]

_DAY_S = 86400
_MAD_TO_SIGMA = math.sqrt(math.pi / 2.0)
"""Gaussian sigma per mean absolute deviation."""
_STD_TO_MAD = 1.0 / _MAD_TO_SIGMA
_SQRT1_2 = math.sqrt(0.5)
_MOVING_REL = 1e-3
"""A slot whose spread is below this share of its level is flat: a frozen value there is normal."""
_LAST_SCORED_Z = 37.0
"""Beyond this z the Gaussian tail underflows; the score is 1 long before."""


def validate_slot_s(name: str, value: Any) -> int:
    """Return ``value`` as whole seconds that divide a day into slots; ValueError names the field.

    >>> validate_slot_s("slot_s", 900)
    900
    >>> validate_slot_s("slot_s", 7)
    Traceback (most recent call last):
    ...
    ValueError: detector spec field 'slot_s': must be whole seconds in 60..21600 that divide 86400, got 7
    """
    if not is_finite_number(value) or value != int(value) or not 60 <= value <= 21600 or _DAY_S % int(value):
        raise spec_error(name, "whole seconds in 60..21600 that divide 86400", value)
    return int(value)


def validate_timezone(name: str, value: Any) -> str:
    """Return ``value`` if it is an IANA time zone name (the site's zone); ValueError names the field.

    >>> validate_timezone("timezone", "Asia/Shanghai")
    'Asia/Shanghai'
    >>> validate_timezone("timezone", "Mars/Olympus")
    Traceback (most recent call last):
    ...
    ValueError: detector spec field 'timezone': must be an IANA time zone name, got 'Mars/Olympus'
    """
    if not isinstance(value, str) or not value:
        raise spec_error(name, "an IANA time zone name", value)
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise spec_error(name, "an IANA time zone name", value) from err
    return value


def validate_shift_tolerance_s(name: str, value: Any) -> float:
    """Return how early or late a shift change may come, in seconds (under half a day).

    >>> validate_shift_tolerance_s("shift_tolerance_s", 600)
    600.0
    >>> validate_shift_tolerance_s("shift_tolerance_s", -1)
    Traceback (most recent call last):
    ...
    ValueError: detector spec field 'shift_tolerance_s': must be seconds in 0..43200 (exclusive), got -1
    """
    if not is_finite_number(value) or not 0 <= value < _DAY_S / 2:
        raise spec_error(name, "seconds in 0..43200 (exclusive)", value)
    return float(value)


def validate_weekday_profiles(name: str, value: Any) -> tuple[int, ...]:
    """Return the profile number of Monday..Sunday (7 integers in 0..6); ValueError names the field.

    >>> validate_weekday_profiles("weekday_profiles", [0, 0, 0, 0, 0, 1, 1])
    (0, 0, 0, 0, 0, 1, 1)
    >>> validate_weekday_profiles("weekday_profiles", [0, 1])
    Traceback (most recent call last):
    ...
    ValueError: detector spec field 'weekday_profiles': must be 7 integers in 0..6 (Mon..Sun), got [0, 1]
    """
    if not isinstance(value, list | tuple) or len(value) != 7:
        raise spec_error(name, "7 integers in 0..6 (Mon..Sun)", value)
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 6:
            raise spec_error(name, "7 integers in 0..6 (Mon..Sun)", value)
    return tuple(value)


_Evaluation = tuple[float, float, float, float, int, int]
"""(score, residual, baseline, spread, visits, slot) of one row."""


def _log_tail(z: float) -> float:
    """Return ``log`` of the two-sided Gaussian tail probability of ``z`` (``-inf`` on underflow)."""
    q = math.erfc(z * _SQRT1_2)
    return math.log(q) if q > 0.0 else -math.inf


class ProfileDetector:
    """Deviation from a learned time-of-day profile (per kind of day), for energy loads.

    See the module docstring for the method; parameters (all keyword-only):

    ``slot_s`` (900) slot length, dividing the day; ``timezone`` ("Asia/Shanghai") the site's zone,
    whose wall clock defines the day; ``weekday_profiles`` ((0, 0, 0, 0, 0, 1, 2)) the profile of
    Monday..Sunday; ``alpha`` (0.2) weight of a new day in a slot's mean and spread (a working week's
    memory for the workday profile); ``warmup_days`` (1) days of a slot's kind seen before it scores;
    ``z_limit`` (5) the z that scores 0.5; ``min_rel_spread`` (0.02) and ``min_spread`` (0.01)
    floors of the spread (share of the baseline, point units); ``shift_tolerance_s`` (600) how early
    or late a shift change may come; ``relearn_after_days`` (3) consecutive anomalous visits after
    which a slot accepts a new level; ``stuck_s`` (1200) and ``stuck_tolerance`` (0) the frozen-value
    check; ``threshold`` (0.5).

    Examples
    --------
    A load at 20 kW at night and 100 kW from 08:00 to 18:00 (UTC here), learned for two days:

    >>> det = ProfileDetector(timezone="UTC", weekday_profiles=[0] * 7)
    >>> def load_kw(ts_s):
    ...     hour = ts_s % 86400 / 3600
    ...     return (100.0 if 8 <= hour < 18 else 20.0) + (ts_s // 60 % 3 - 1) * 0.5
    >>> for minute in range(2 * 1440):
    ...     _ = det.update(minute * 60.0, load_kw(minute * 60.0))
    >>> day3 = 2 * 86400.0
    >>> det.score_one(day3 + 8.1 * 3600, 100.0) < 0.5  # the morning start, as usual
    True
    >>> det.score_one(day3 + 3 * 3600, 60.0)  # 40 kW extra at 03:00
    1.0
    >>> round(det.expected_one(day3 + 3 * 3600), 1)
    20.0
    """

    kind: ClassVar[str] = "profile"

    def __init__(
        self,
        *,
        slot_s: int = 900,
        timezone: str = "Asia/Shanghai",
        weekday_profiles: Sequence[int] = (0, 0, 0, 0, 0, 1, 2),
        alpha: float = 0.2,
        warmup_days: int = 1,
        z_limit: float = 5.0,
        min_rel_spread: float = 0.02,
        min_spread: float = 0.01,
        shift_tolerance_s: float = 600.0,
        relearn_after_days: int = 3,
        stuck_s: float = 1200.0,
        stuck_tolerance: float = 0.0,
        threshold: float = 0.5,
    ) -> None:
        slot_s = validate_slot_s("slot_s", slot_s)
        validate_timezone("timezone", timezone)
        profiles = validate_weekday_profiles("weekday_profiles", weekday_profiles)
        shift_tolerance_s = validate_shift_tolerance_s("shift_tolerance_s", shift_tolerance_s)
        self.params: dict[str, Any] = {
            "slot_s": slot_s,
            "timezone": timezone,
            "weekday_profiles": list(profiles),
            "alpha": alpha,
            "warmup_days": warmup_days,
            "z_limit": z_limit,
            "min_rel_spread": min_rel_spread,
            "min_spread": min_spread,
            "shift_tolerance_s": shift_tolerance_s,
            "relearn_after_days": relearn_after_days,
            "stuck_s": stuck_s,
            "stuck_tolerance": stuck_tolerance,
            "threshold": threshold,
        }
        self.threshold = threshold
        self._slot_s = float(slot_s)
        self._n = _DAY_S // slot_s
        self._zone = ZoneInfo(timezone)
        self._profiles = profiles
        self._alpha = alpha
        self._warmup_days = warmup_days
        self._z_limit = z_limit
        self._log_tail_limit = _log_tail(z_limit)
        self._min_rel = min_rel_spread
        self._min_abs = min_spread
        self._tol_s = float(shift_tolerance_s)
        self._relearn_after_days = relearn_after_days
        # The learned profiles, flat: index = profile * slots_per_day + slot.
        size = (max(profiles) + 1) * self._n
        self._mean = [0.0] * size
        self._mad = [0.0] * size
        self._visits = [0] * size
        self._streak = [0] * size
        # The day being collected (folded into the profile when the local day changes).
        self._p_day = -1  # local date ordinal; -1: nothing pending
        self._p_profile = 0
        n = self._n
        self._p_n = [0] * n  # rows learned
        self._p_sum = [0.0] * n  # their (clipped) values
        self._p_sq = [0.0] * n  # their squares (the first visit's spread)
        self._p_res_n = [0] * n  # rows learned against an existing baseline
        self._p_res = [0.0] * n  # their (clipped) absolute residuals
        self._p_all_n = [0] * n  # every row, learned or not
        self._p_all_sum = [0.0] * n
        self._p_anom = [0] * n  # rows that scored at or above the threshold
        # The frozen-value run (followed on every row: a stuck value is a fact, not something learned).
        self._run = StuckRun(stuck_s=stuck_s, tolerance=stuck_tolerance)
        # Local-day cache (not state): the UTC span of the last local day seen.
        self._c_lo = math.inf
        self._c_hi = -math.inf
        self._c_weekday = 0
        self._c_ordinal = 0
        self._c_uniform = True

    # -- the local clock -------------------------------------------------------------------------

    def _local(self, ts_s: float) -> tuple[float, int, int]:
        """Return (seconds since local midnight, weekday Monday=0, local date ordinal)."""
        if self._c_lo <= ts_s < self._c_hi and self._c_uniform:
            return ts_s - self._c_lo, self._c_weekday, self._c_ordinal
        local = datetime.fromtimestamp(ts_s, self._zone)
        day = local.date()
        if not self._c_lo <= ts_s < self._c_hi:
            lo = datetime(day.year, day.month, day.day, tzinfo=self._zone).timestamp()
            nxt = day + timedelta(days=1)
            hi = datetime(nxt.year, nxt.month, nxt.day, tzinfo=self._zone).timestamp()
            self._c_lo, self._c_hi = lo, hi
            self._c_weekday, self._c_ordinal = day.weekday(), day.toordinal()
            self._c_uniform = hi - lo == _DAY_S
            if self._c_uniform:
                return ts_s - lo, self._c_weekday, self._c_ordinal
        # A daylight-saving day: the wall clock, not the elapsed time, names the slot.
        sec = local.hour * 3600.0 + local.minute * 60.0 + local.second + local.microsecond * 1e-6
        return sec, self._c_weekday, self._c_ordinal

    # -- the profile as the scorer sees it ------------------------------------------------------

    def _slot(self, idx: int, stale: bool) -> tuple[float, float, int]:
        """Return (mean, mean absolute residual, visits) of a slot, with the pending day folded if stale."""
        if stale and idx // self._n == self._p_profile:
            k = idx - self._p_profile * self._n
            if self._p_all_n[k]:
                mean, mad, visits, _ = self._folded(idx, k)
                return mean, mad, visits
        return self._mean[idx], self._mad[idx], self._visits[idx]

    def _folded(self, idx: int, k: int) -> tuple[float, float, int, int]:
        """Return the slot's (mean, mad, visits, streak) after folding in the pending day's slot ``k``."""
        mean, mad, visits, streak = self._mean[idx], self._mad[idx], self._visits[idx], self._streak[idx]
        all_n = self._p_all_n[k]
        n = self._p_n[k]
        if n:
            day_mean = self._p_sum[k] / n
            if visits == 0:
                var = self._p_sq[k] / n - day_mean * day_mean
                mean, mad = day_mean, _STD_TO_MAD * math.sqrt(var) if var > 0.0 else 0.0
            else:
                a = max(self._alpha, 1.0 / (visits + 1))
                mean += a * (day_mean - mean)
                if self._p_res_n[k]:
                    mad += a * (self._p_res[k] / self._p_res_n[k] - mad)
            visits += 1
        if all_n:
            if 2 * self._p_anom[k] > all_n:
                streak += 1
                if streak >= self._relearn_after_days:  # the same slot, off again and again: accept
                    mean = self._p_all_sum[k] / all_n
                    visits = max(visits, 1)
                    streak = 0
            else:
                streak = 0
        return mean, mad, visits, streak

    def _interp(self, weekday: int, sec: float, stale: bool) -> tuple[float, float, int]:
        """Return the (baseline, mean absolute residual, visits) at ``sec`` of the day.

        The slot holding ``sec`` is interpolated linearly towards the centre of the adjacent slot on
        the nearer side, if that one has been seen. ``sec`` may fall outside 0..86400: the slots then
        belong to the previous or next day's profile. ``visits`` are those of the slot holding
        ``sec`` (a neighbour of another kind of day must not stand in for it); (nan, nan, 0) while
        that slot has not been seen.
        """
        n = self._n
        pos = sec / self._slot_s
        g = math.floor(pos)
        offset = pos - g - 0.5  # -0.5..0.5 from the slot's centre
        d, k = divmod(g, n)
        profiles = self._profiles
        mean, mad, visits = self._slot(profiles[(weekday + d) % 7] * n + k, stale)
        if not visits:
            return math.nan, math.nan, 0
        if offset >= 0.0:
            d, k = divmod(g + 1, n)
        else:
            d, k = divmod(g - 1, n)
            offset = -offset
        m1, r1, v1 = self._slot(profiles[(weekday + d) % 7] * n + k, stale)
        if v1:
            return mean + offset * (m1 - mean), mad + offset * (r1 - mad), visits
        return mean, mad, visits

    def _residual(self, weekday: int, sec: float, stale: bool, value: float, base: float) -> float:
        """Return the distance of ``value`` from the band of baselines within the shift tolerance."""
        lo = hi = base
        if self._tol_s > 0.0:
            for shifted_s in (sec - self._tol_s, sec + self._tol_s):
                other, _, seen = self._interp(weekday, shifted_s, stale)
                if seen:
                    lo, hi = min(lo, other), max(hi, other)
        return value - hi if value > hi else (value - lo if value < lo else 0.0)

    def _stuck_score(self, ts_s: float, value: float, base: float, mad: float) -> float:
        """Score a frozen value: 0.5 after ``stuck_s`` unchanged, if the slot normally moves."""
        run = self._run
        if not run.holds(value):
            return 0.0
        moving = _MAD_TO_SIGMA * mad
        if moving <= _MOVING_REL * abs(base) or moving <= 2.0 * run.tolerance:
            return 0.0
        return run.score(ts_s, value)

    def _evaluate(self, ts_s: float, value: float) -> _Evaluation:
        """Return (score, residual, baseline, spread, visits, slot) of a row; no state change."""
        sec, weekday, ordinal = self._local(ts_s)
        slot = min(int(sec // self._slot_s), self._n - 1)  # n: the last instant of a 25-hour day
        stale = ordinal != self._p_day
        base, mad, visits = self._interp(weekday, sec, stale)
        if not visits:
            return 0.0, 0.0, math.nan, math.nan, 0, slot
        residual = self._residual(weekday, sec, stale, value, base)
        spread = max(_MAD_TO_SIGMA * mad, self._min_rel * abs(base), self._min_abs)
        if visits < self._warmup_days:
            return 0.0, residual, base, spread, visits, slot
        z = abs(residual) / spread
        if z >= _LAST_SCORED_Z:
            return 1.0, residual, base, spread, visits, slot
        score = min(0.5 * _log_tail(z) / self._log_tail_limit, 1.0) if z > 0.0 else 0.0
        if score < 1.0:
            score = max(score, self._stuck_score(ts_s, value, base, mad))
        return score, residual, base, spread, visits, slot

    # -- learning --------------------------------------------------------------------------------

    def _fold(self) -> None:
        """Fold the pending day into its profile and clear it."""
        base = self._p_profile * self._n
        for k in range(self._n):
            if self._p_all_n[k]:
                idx = base + k
                self._mean[idx], self._mad[idx], self._visits[idx], self._streak[idx] = self._folded(idx, k)
        n = self._n
        self._p_n, self._p_sum, self._p_sq = [0] * n, [0.0] * n, [0.0] * n
        self._p_res_n, self._p_res = [0] * n, [0.0] * n
        self._p_all_n, self._p_all_sum, self._p_anom = [0] * n, [0.0] * n, [0] * n

    def _take(self, ts_s: float, value: float, evaluation: _Evaluation, *, learn: bool) -> None:
        """Collect the row into the pending day (as normal when ``learn``), and follow the stuck run."""
        score, residual, _, spread, visits, slot = evaluation
        _, weekday, ordinal = self._local(ts_s)
        if ordinal != self._p_day:
            if self._p_day >= 0:
                self._fold()
            self._p_day, self._p_profile = ordinal, self._profiles[weekday]
        self._p_all_n[slot] += 1
        self._p_all_sum[slot] += value
        if score >= self.threshold:
            self._p_anom[slot] += 1
        if learn:
            learned = value
            if visits:
                limit = self._z_limit * spread
                clipped = limit if residual > limit else (-limit if residual < -limit else residual)
                learned = value - residual + clipped
                self._p_res_n[slot] += 1
                self._p_res[slot] += abs(clipped)
            self._p_n[slot] += 1
            self._p_sum[slot] += learned
            self._p_sq[slot] += learned * learned
        self._run.follow(ts_s, value)

    # -- the Detector interface ------------------------------------------------------------------

    def score_one(self, ts_s: float, value: float) -> float:
        """Score the row against the profile (and the stuck check); no state change."""
        return self._evaluate(ts_s, value)[0]

    def learn_one(self, ts_s: float, value: float) -> None:
        """Take the row in as normal (its residual clipped at ``z_limit`` spreads)."""
        self._take(ts_s, value, self._evaluate(ts_s, value), learn=True)

    def update(self, ts_s: float, value: float) -> float:
        """Score, then learn unless the row is anomalous (it still counts towards accepting a new level)."""
        _, _, ordinal = self._local(ts_s)
        if ordinal != self._p_day and self._p_day >= 0:
            self._fold()
            self._p_day = -1
        evaluation = self._evaluate(ts_s, value)
        score = evaluation[0]
        self._take(ts_s, value, evaluation, learn=score < self.threshold)
        return score

    def expected_one(self, ts_s: float) -> float:
        """Return the profile's baseline at ``ts_s`` (``nan`` while the slot has not been seen)."""
        sec, weekday, ordinal = self._local(ts_s)
        base, _, visits = self._interp(weekday, sec, ordinal != self._p_day)
        return base if visits >= self._warmup_days else math.nan

    # -- persistence -----------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Parameters, the learned profiles, the pending day and the stuck run, JSON-able."""
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "params": dict(self.params),
            "mean": list(self._mean),
            "mad": list(self._mad),
            "visits": list(self._visits),
            "streak": list(self._streak),
            "pending": {
                "day": self._p_day,
                "profile": self._p_profile,
                "n": list(self._p_n),
                "sum": list(self._p_sum),
                "sq": list(self._p_sq),
                "res_n": list(self._p_res_n),
                "res": list(self._p_res),
                "all_n": list(self._p_all_n),
                "all_sum": list(self._p_all_sum),
                "anom": list(self._p_anom),
            },
            "run": self._run.to_state(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ProfileDetector:
        """Rebuild from :meth:`to_state` output."""
        det = cls(**state["params"])
        size = len(det._mean)
        if len(state["mean"]) != size:
            raise ValueError(f"detector state field 'mean': expected {size} slots, got {len(state['mean'])}")
        det._mean = [float(v) for v in state["mean"]]
        det._mad = [float(v) for v in state["mad"]]
        det._visits = [int(v) for v in state["visits"]]
        det._streak = [int(v) for v in state["streak"]]
        pending = state["pending"]
        det._p_day, det._p_profile = int(pending["day"]), int(pending["profile"])
        det._p_n = [int(v) for v in pending["n"]]
        det._p_sum = [float(v) for v in pending["sum"]]
        det._p_sq = [float(v) for v in pending["sq"]]
        det._p_res_n = [int(v) for v in pending["res_n"]]
        det._p_res = [float(v) for v in pending["res"]]
        det._p_all_n = [int(v) for v in pending["all_n"]]
        det._p_all_sum = [float(v) for v in pending["all_sum"]]
        det._p_anom = [int(v) for v in pending["anom"]]
        det._run.load(state["run"])
        return det
