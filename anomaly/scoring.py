"""What the detectors share: likelihood, frozen-value run, excess energy, spec and state helpers.

Everything here is pure and synchronous. :mod:`anomaly.detectors` and :mod:`anomaly.profile` both
import it (the profile detector cannot import :mod:`anomaly.detectors`, which builds it), so what
they have in common lives here once.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "STATE_VERSION",
    "AnomalyLikelihood",
    "ExcessEnergy",
    "StuckRun",
    "is_finite_number",
    "nan_if_none",
    "none_if_nan",
    "spec_error",
    "tail_log_score",
]

STATE_VERSION = 1
"""Version of every detector's ``to_state()`` layout; :func:`anomaly.detectors.detector_from_state`
refuses any other."""

_LN_1E_10 = math.log(1e-10)
_SQRT2 = math.sqrt(2.0)
_SECONDS_PER_HOUR = 3600.0


def spec_error(name: str, must: str, value: Any) -> ValueError:
    """Return the error of a bad detector spec field, naming it.

    >>> spec_error("window", "an integer >= 1", 0)
    ValueError("detector spec field 'window': must be an integer >= 1, got 0")
    """
    return ValueError(f"detector spec field {name!r}: must be {must}, got {value!r}")


def is_finite_number(value: Any) -> bool:
    """Return True for a finite int or float (a bool is not a number here).

    >>> is_finite_number(3), is_finite_number(True), is_finite_number(float("nan"))
    (True, False, False)
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def none_if_nan(x: float) -> float | None:
    """Return ``x``, or None for NaN (JSON has no NaN)."""
    return None if math.isnan(x) else x


def nan_if_none(x: float | None) -> float:
    """Return :func:`none_if_nan`'s input back: None becomes NaN."""
    return math.nan if x is None else float(x)


def tail_log_score(z: float) -> float:
    """Map a z value to 0..1 by the log of its Gaussian upper-tail probability (HTM's log-likelihood).

    A tail probability of 1e-10 or less scores 1; 0.5 scores 0.0301; z <= 0 scores 0.

    Examples
    --------
    >>> tail_log_score(0.0) < 0.05
    True
    >>> round(tail_log_score(4.265), 2)  # tail probability 1e-5
    0.5
    >>> tail_log_score(40.0)
    1.0
    """
    if z <= 0.0:
        return 0.0
    q = 0.5 * math.erfc(z / _SQRT2)
    if q <= 1e-10:
        return 1.0
    return math.log(q) / _LN_1E_10


class AnomalyLikelihood:
    """How unusual the recent average of a raw score is, against that average's own history.

    As in HTM's anomaly likelihood: the raw score is averaged over the last ``average_rows`` rows; an
    exponentially weighted mean and variance of that average (memory about ``1 / history_alpha`` rows)
    describe what is usual; the output is :func:`tail_log_score` of the average's z value. A raw score
    that is often high (a noisy signal) therefore stops alarming, while a rare run of high raw scores
    on a quiet signal does. Nothing is reported until ``min_rows`` averages have been learned.

    Examples
    --------
    >>> lik = AnomalyLikelihood(average_rows=3, min_rows=5)
    >>> for raw in [0.0, 0.1, 0.0, 0.05] * 10:
    ...     _ = lik.push(raw, learn=True)
    >>> lik.peek(0.02) < 0.1
    True
    >>> lik.peek(1.0) > 0.9
    True
    """

    __slots__ = ("_average_rows", "_buffer", "_history_alpha", "_mean", "_min_rows", "_n", "_sum", "_var")

    def __init__(self, *, average_rows: int = 10, history_alpha: float = 0.002, min_rows: int = 50) -> None:
        self._average_rows = average_rows
        self._history_alpha = history_alpha
        self._min_rows = min_rows
        self._buffer: deque[float] = deque(maxlen=average_rows)
        self._sum = 0.0
        self._mean = 0.0
        self._var = 0.0
        self._n = 0

    def _average_with(self, raw: float) -> float:
        buf = self._buffer
        if len(buf) == self._average_rows:
            return (self._sum - buf[0] + raw) / self._average_rows
        return (self._sum + raw) / (len(buf) + 1)

    def _score(self, average: float) -> float:
        if self._n < self._min_rows:
            return 0.0
        sd = math.sqrt(self._var)
        return tail_log_score((average - self._mean) / (sd if sd > 1e-6 else 1e-6))

    def peek(self, raw: float) -> float:
        """Score ``raw`` as the next row without changing any state."""
        return self._score(self._average_with(raw))

    def push(self, raw: float, *, learn: bool) -> float:
        """Score ``raw`` as the next row, then take it in; ``learn`` also updates the history."""
        average = self._average_with(raw)
        out = self._score(average)
        buf = self._buffer
        if len(buf) == self._average_rows:
            self._sum -= buf[0]
        buf.append(raw)
        self._sum += raw
        if learn:
            self._n += 1
            alpha = max(self._history_alpha, 1.0 / self._n)
            d = average - self._mean
            self._mean += alpha * d
            self._var = (1.0 - alpha) * (self._var + alpha * d * d)
        return out

    def to_state(self) -> dict[str, Any]:
        """JSON-able state (parameters included)."""
        return {
            "average_rows": self._average_rows,
            "history_alpha": self._history_alpha,
            "min_rows": self._min_rows,
            "buffer": list(self._buffer),
            "sum": self._sum,
            "mean": self._mean,
            "var": self._var,
            "n": self._n,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> AnomalyLikelihood:
        """Rebuild from :meth:`to_state` output."""
        lik = cls(
            average_rows=int(state["average_rows"]),
            history_alpha=float(state["history_alpha"]),
            min_rows=int(state["min_rows"]),
        )
        lik._buffer.extend(float(v) for v in state["buffer"])
        lik._sum = float(state["sum"])  # the running sum itself: a recomputed one may differ in the last bit
        lik._mean, lik._var, lik._n = float(state["mean"]), float(state["var"]), int(state["n"])
        return lik


class StuckRun:
    """A frozen value: how long the value has stayed within ``tolerance`` of where its run began.

    ``score`` is ``0.5 * run_s / stuck_s`` including the row (0.5 when frozen for exactly
    ``stuck_s``), capped at 1, and 0 when the row leaves the run; ``follow`` moves the run on. A
    stuck value is a fact, not something learned: detectors follow it on every row.

    Examples
    --------
    >>> run = StuckRun(stuck_s=600.0, tolerance=0.01)
    >>> run.follow(0.0, 20.0)
    >>> run.score(600.0, 20.005), run.score(600.0, 21.0)
    (0.5, 0.0)
    """

    __slots__ = ("start_s", "stuck_s", "tolerance", "value")

    def __init__(self, *, stuck_s: float, tolerance: float) -> None:
        self.stuck_s, self.tolerance = stuck_s, tolerance
        self.start_s = math.nan
        self.value = math.nan

    def holds(self, value: float) -> bool:
        """Return True when ``value`` continues the run (never before the first row)."""
        return abs(value - self.value) <= self.tolerance

    def score(self, ts_s: float, value: float) -> float:
        """Score the run's length including this row; 0 when the row ends the run."""
        if not self.holds(value):
            return 0.0
        run = 0.5 * (ts_s - self.start_s) / self.stuck_s
        return 0.0 if run <= 0.0 else (run if run < 1.0 else 1.0)

    def follow(self, ts_s: float, value: float) -> None:
        """Extend the run, or start a new one at this row."""
        if not self.holds(value):
            self.start_s, self.value = ts_s, value

    def to_state(self) -> list[float | None]:
        """Return ``[start_s, value]``, JSON-able."""
        return [none_if_nan(self.start_s), none_if_nan(self.value)]

    def load(self, state: Sequence[float | None]) -> None:
        """Take back :meth:`to_state` output."""
        self.start_s, self.value = (nan_if_none(v) for v in state)


class ExcessEnergy:
    """Energy a power point used beyond its expected baseline while an anomaly was active, in kWh.

    ``step(ts_s, power_kw, expected_kw, active)`` integrates ``power_kw - expected_kw`` over time
    (trapezoid rule between consecutive rows) for as long as ``active`` holds; a new episode starts
    from zero at the next onset. The caller turns kWh into kgCO2e with its emission factor. A gap
    longer than ``max_gap_s`` between rows is not integrated (no data, no claim).

    Examples
    --------
    >>> meter = ExcessEnergy()
    >>> for minute in range(61):  # one hour at 100 kW over a 60 kW baseline
    ...     _ = meter.step(minute * 60.0, 100.0, 60.0, active=True)
    >>> round(meter.episode_kwh, 3)
    40.0
    """

    __slots__ = ("_active", "_last_excess_kw", "_last_ts_s", "episode_kwh", "max_gap_s")

    def __init__(self, *, max_gap_s: float = 900.0) -> None:
        self.max_gap_s = max_gap_s
        self.episode_kwh = 0.0
        self._active = False
        self._last_ts_s = math.nan
        self._last_excess_kw = 0.0

    def step(self, ts_s: float, power_kw: float, expected_kw: float, *, active: bool) -> float:
        """Take one row; return the excess energy of the current (or last) episode in kWh."""
        excess_kw = power_kw - expected_kw
        if active:
            if not self._active:
                self.episode_kwh = 0.0
            elif 0.0 < ts_s - self._last_ts_s <= self.max_gap_s:
                dt_h = (ts_s - self._last_ts_s) / _SECONDS_PER_HOUR
                self.episode_kwh += 0.5 * (excess_kw + self._last_excess_kw) * dt_h
        self._active = active
        self._last_ts_s = ts_s
        self._last_excess_kw = excess_kw
        return self.episode_kwh
