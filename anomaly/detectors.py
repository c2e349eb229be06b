"""Online anomaly detectors, one per point, chosen in config.

Every detector takes rows ``(ts_s, value)`` in time order (``ts_s`` in epoch seconds) and follows
river's shape:

- ``score_one(ts_s, value) -> float`` scores the row in 0..1 *without* changing any state;
- ``learn_one(ts_s, value)`` takes the row in as normal behaviour;
- ``update(ts_s, value) -> float`` scores first, then learns only when the score stays below the
  detector's ``threshold``: a detector never learns an anomaly while it is active;
- ``expected_one(ts_s) -> float`` is the value the detector expected (its baseline), ``nan`` for the
  plain checks that have none; :class:`PointMonitor` uses it for excess energy;
- ``to_state()`` returns a JSON-able dict and ``detector_from_state()`` rebuilds the detector, so a
  restart continues from what was learned instead of from zero.

Kinds (``build_detector({"kind": ..., ...})``):

==================  ============================================================================
``ensemble``        the default: contextual novelty, z-score, step and distribution-shift views,
                    each through an anomaly likelihood, plus new-extreme detection; fast, pure
                    Python; 72 on the NAB subset in docs/anomaly-detection.md
``forecast``        residual of a river SNARIMAX or HoltWinters one-step forecast against an
                    adaptive (exponentially weighted) residual spread
``profile``         time-of-day profile per kind of day (workday, Saturday, Sunday): deviation from
                    the slot's learned baseline in its learned spread, plus a frozen-value check;
                    for energy loads with shifts (:mod:`anomaly.profile`)
``hst``             river HalfSpaceTrees on engineered features (value, step, deviation from an
                    exponentially weighted mean), min-max scaled
``robust_z``        distance from the rolling median in rolling MADs
``limits``          HH/H/L/LL limits
``rate_of_change``  absolute rate of change against a limit per second
``flatline``        the value stayed within a tolerance for too long (stuck sensor)
``no_data``         the gap since the previous reading is too long
==================  ============================================================================

The plain checks score 0.5 exactly at their limit and up to 1 beyond it, so the default threshold
of 0.5 means "the limit is violated". All detectors are synchronous and do no I/O; the heavy ones
(``forecast``, ``hst``) belong in a worker thread (``asyncio.to_thread``) in the wiring.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import math
import pickle
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from .profile import (
    ProfileDetector,
    validate_shift_tolerance_s,
    validate_slot_s,
    validate_timezone,
    validate_weekday_profiles,
)
from .scoring import (
    STATE_VERSION,
    AnomalyLikelihood,
    ExcessEnergy,
    StuckRun,
    is_finite_number,
    nan_if_none,
    none_if_nan,
    spec_error,
)

__all__ = [
    "DETECTOR_KINDS",
    "Detector",
    "DetectorSpec",
    "EnsembleDetector",
    "FlatlineCheck",
    "ForecastResidual",
    "HalfSpaceTreesDetector",
    "LimitCheck",
    "NoDataCheck",
    "PointMonitor",
    "PointVerdict",
    "RateOfChangeCheck",
    "RobustZScore",
    "build_detector",
    "detector_from_state",
]


@runtime_checkable
class Detector(Protocol):
    """What the anomaly stage needs from a detector (see the module docstring)."""

    kind: ClassVar[str]
    threshold: float

    def score_one(self, ts_s: float, value: float) -> float:
        """Anomaly score of the row in 0..1; no state change."""
        ...

    def learn_one(self, ts_s: float, value: float) -> None:
        """Take the row in as normal behaviour."""
        ...

    def update(self, ts_s: float, value: float) -> float:
        """Score, then learn unless the score reaches ``threshold``."""
        ...

    def expected_one(self, ts_s: float) -> float:
        """Return the baseline value the detector expects now; ``nan`` when it has none."""
        ...

    def to_state(self) -> dict[str, Any]:
        """JSON-able state for :func:`detector_from_state`."""
        ...


def _clip01(x: float) -> float:
    return 0.0 if x <= 0.0 else (x if x < 1.0 else 1.0)


def _state_header(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "version": STATE_VERSION, "params": dict(params)}


def _pickle_b64(obj: object) -> str:
    return base64.b64encode(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")


def _unpickle_b64(text: str) -> Any:
    # Only the detector's own persisted state is ever loaded here (from our database), never
    # data from a client, so unpickling is safe in this position.
    return pickle.loads(base64.b64decode(text))  # noqa: S301 -- own state, see above


class _Base:
    """``update`` for detectors whose score and learning are separate steps."""

    kind: ClassVar[str]
    threshold: float

    def score_one(self, ts_s: float, value: float) -> float:
        raise NotImplementedError

    def learn_one(self, ts_s: float, value: float) -> None:
        raise NotImplementedError

    def update(self, ts_s: float, value: float) -> float:
        """Score first; learn only while no anomaly is active."""
        score = self.score_one(ts_s, value)
        if score < self.threshold:
            self.learn_one(ts_s, value)
        return score

    def expected_one(self, ts_s: float) -> float:
        """No baseline by default."""
        return math.nan


class _Check(_Base):
    """A plain check: it follows every row (learning is bookkeeping, not a model of normal)."""

    def update(self, ts_s: float, value: float) -> float:
        """Score, then always take the row in."""
        score = self.score_one(ts_s, value)
        self.learn_one(ts_s, value)
        return score


# ------------------------------------------------------------------------------------------------
# Plain checks
# ------------------------------------------------------------------------------------------------


class LimitCheck(_Check):
    """HH/H/L/LL limits: 1.0 beyond HH or LL, 0.75 beyond H or L, else 0.

    Examples
    --------
    >>> check = LimitCheck(hh=100.0, h=90.0, l=10.0)
    >>> [check.update(0.0, v) for v in (50.0, 95.0, 120.0, 5.0)]
    [0.0, 0.75, 1.0, 0.75]
    >>> check.level(120.0)
    'HH'
    """

    kind: ClassVar[str] = "limits"

    def __init__(
        self,
        *,
        hh: float | None = None,
        h: float | None = None,
        l: float | None = None,  # noqa: E741 -- the ISA name of the low limit
        ll: float | None = None,
        threshold: float = 0.5,
    ) -> None:
        self.hh, self.h, self.l, self.ll = hh, h, l, ll
        self.threshold = threshold

    def level(self, value: float) -> str:
        """Return the violated limit ("HH", "H", "L", "LL"), or "" when within limits."""
        if self.hh is not None and value >= self.hh:
            return "HH"
        if self.ll is not None and value <= self.ll:
            return "LL"
        if self.h is not None and value >= self.h:
            return "H"
        if self.l is not None and value <= self.l:
            return "L"
        return ""

    def score_one(self, ts_s: float, value: float) -> float:
        """Score by the limit violated."""
        return _LIMIT_SCORES[self.level(value)]

    def learn_one(self, ts_s: float, value: float) -> None:
        """Limits do not learn."""

    def to_state(self) -> dict[str, Any]:
        """Parameters only."""
        return _state_header(
            self.kind, {"hh": self.hh, "h": self.h, "l": self.l, "ll": self.ll, "threshold": self.threshold}
        )

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LimitCheck:
        """Rebuild from :meth:`to_state` output."""
        return cls(**state["params"])


_LIMIT_SCORES = {"": 0.0, "H": 0.75, "L": 0.75, "HH": 1.0, "LL": 1.0}


class RateOfChangeCheck(_Check):
    """Absolute rate of change against ``max_rate_per_s``: 0.5 at the limit, 1.0 at twice the limit.

    It always tracks the previous reading (a rate needs two consecutive rows), also while violated.

    Examples
    --------
    >>> roc = RateOfChangeCheck(max_rate_per_s=1.0)
    >>> [roc.update(t, v) for t, v in [(0.0, 10.0), (10.0, 15.0), (20.0, 45.0)]]
    [0.0, 0.25, 1.0]
    """

    kind: ClassVar[str] = "rate_of_change"

    def __init__(self, *, max_rate_per_s: float, threshold: float = 0.5) -> None:
        self.max_rate_per_s = max_rate_per_s
        self.threshold = threshold
        self._last_ts_s = math.nan
        self._last_value = math.nan

    def score_one(self, ts_s: float, value: float) -> float:
        """Score the rate since the previous row (0 for the first row or a non-increasing time)."""
        dt_s = ts_s - self._last_ts_s
        if not dt_s > 0.0:
            return 0.0
        rate = abs(value - self._last_value) / dt_s
        return _clip01(0.5 * rate / self.max_rate_per_s)

    def learn_one(self, ts_s: float, value: float) -> None:
        """Remember the row as the previous one."""
        self._last_ts_s, self._last_value = ts_s, value

    def to_state(self) -> dict[str, Any]:
        """Parameters and the previous row."""
        state = _state_header(self.kind, {"max_rate_per_s": self.max_rate_per_s, "threshold": self.threshold})
        state["last"] = none_if_nan(self._last_ts_s), none_if_nan(self._last_value)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RateOfChangeCheck:
        """Rebuild from :meth:`to_state` output."""
        det = cls(**state["params"])
        det._last_ts_s, det._last_value = (nan_if_none(v) for v in state["last"])
        return det


class FlatlineCheck(_Check):
    """Stuck sensor: the value stayed within ``tolerance`` of where a run began for ``stuck_s``.

    Scores ``0.5 * run_s / stuck_s`` (so 0.5 when stuck for exactly ``stuck_s``), capped at 1.

    Examples
    --------
    >>> flat = FlatlineCheck(stuck_s=600.0, tolerance=0.01)
    >>> scores = [flat.update(60.0 * i, 20.0) for i in range(15)]
    >>> scores[5], scores[10], scores[14]
    (0.25, 0.5, 0.7)
    >>> flat.update(900.0, 21.0)
    0.0
    """

    kind: ClassVar[str] = "flatline"

    def __init__(self, *, stuck_s: float, tolerance: float = 0.0, threshold: float = 0.5) -> None:
        self.stuck_s, self.tolerance, self.threshold = stuck_s, tolerance, threshold
        self._run = StuckRun(stuck_s=stuck_s, tolerance=tolerance)

    def score_one(self, ts_s: float, value: float) -> float:
        """Score the length of the current run including this row."""
        return self._run.score(ts_s, value)

    def learn_one(self, ts_s: float, value: float) -> None:
        """Extend the run or start a new one (a stuck value is a fact, not something learned)."""
        self._run.follow(ts_s, value)

    def to_state(self) -> dict[str, Any]:
        """Parameters and the current run."""
        state = _state_header(
            self.kind, {"stuck_s": self.stuck_s, "tolerance": self.tolerance, "threshold": self.threshold}
        )
        state["run"] = self._run.to_state()
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> FlatlineCheck:
        """Rebuild from :meth:`to_state` output."""
        det = cls(**state["params"])
        det._run.load(state["run"])
        return det


class NoDataCheck(_Check):
    """Too long without a reading: ``0.5 * gap_s / max_gap_s``, capped at 1.

    Per row it scores the gap that just ended; a timer in the wiring calls :meth:`silence_score`
    to see a gap that is still going on. A NaN value counts as no reading.

    Examples
    --------
    >>> nodata = NoDataCheck(max_gap_s=60.0)
    >>> nodata.update(0.0, 1.0), nodata.update(30.0, 1.0), nodata.update(150.0, 1.0)
    (0.0, 0.25, 1.0)
    >>> nodata.silence_score(210.0)
    0.5
    """

    kind: ClassVar[str] = "no_data"

    def __init__(self, *, max_gap_s: float, threshold: float = 0.5) -> None:
        self.max_gap_s, self.threshold = max_gap_s, threshold
        self._last_ts_s = math.nan

    def silence_score(self, now_s: float) -> float:
        """Score the time since the last reading at ``now_s`` (0 before the first reading)."""
        gap_s = now_s - self._last_ts_s
        return _clip01(0.5 * gap_s / self.max_gap_s) if gap_s > 0.0 else 0.0

    def score_one(self, ts_s: float, value: float) -> float:
        """Score the gap that this row ends (a NaN row does not end it)."""
        return self.silence_score(ts_s)

    def learn_one(self, ts_s: float, value: float) -> None:
        """Remember when the last real reading came."""
        if not math.isnan(value):
            self._last_ts_s = ts_s

    def to_state(self) -> dict[str, Any]:
        """Parameters and the last reading time."""
        state = _state_header(self.kind, {"max_gap_s": self.max_gap_s, "threshold": self.threshold})
        state["last_ts_s"] = none_if_nan(self._last_ts_s)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> NoDataCheck:
        """Rebuild from :meth:`to_state` output."""
        det = cls(**state["params"])
        det._last_ts_s = nan_if_none(state["last_ts_s"])
        return det


# ------------------------------------------------------------------------------------------------
# Robust statistics
# ------------------------------------------------------------------------------------------------


class RobustZScore(_Base):
    """Distance from the rolling median in units of the rolling MAD (scaled to a Gaussian sigma).

    Scores ``0.5 * z / z_limit`` (0.5 at ``z_limit``), capped at 1; 0 until ``warmup`` rows are
    learned. A MAD of zero (a flat window) is floored at ``min_scale`` so a flat signal that moves
    is anomalous rather than infinitely so.

    Examples
    --------
    >>> rz = RobustZScore(window=50, warmup=20, z_limit=4.0)
    >>> for i in range(50):
    ...     _ = rz.update(float(i), 10.0 + (i % 5) * 0.1)
    >>> rz.score_one(50.0, 10.2) < 0.2
    True
    >>> rz.score_one(50.0, 15.0)
    1.0
    >>> round(rz.expected_one(50.0), 2)
    10.2
    """

    kind: ClassVar[str] = "robust_z"
    _MAD_TO_SIGMA = 1.4826

    def __init__(
        self,
        *,
        window: int = 288,
        warmup: int = 30,
        z_limit: float = 5.0,
        min_scale: float = 1e-6,
        threshold: float = 0.5,
    ) -> None:
        self.window, self.warmup, self.z_limit = window, warmup, z_limit
        self.min_scale, self.threshold = min_scale, threshold
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self._scale_cache = math.nan

    def _median(self) -> float:
        s, n = self._sorted, len(self._sorted)
        mid = n // 2
        return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])

    def _scale(self, median: float) -> float:
        if math.isnan(self._scale_cache):
            deviations = sorted(abs(v - median) for v in self._sorted)
            n, mid = len(deviations), len(deviations) // 2
            mad = deviations[mid] if n % 2 else 0.5 * (deviations[mid - 1] + deviations[mid])
            self._scale_cache = max(self._MAD_TO_SIGMA * mad, self.min_scale)
        return self._scale_cache

    def score_one(self, ts_s: float, value: float) -> float:
        """Score the robust z of ``value`` against the learned window."""
        if len(self._sorted) < self.warmup:
            return 0.0
        median = self._median()
        return _clip01(0.5 * abs(value - median) / self._scale(median) / self.z_limit)

    def learn_one(self, ts_s: float, value: float) -> None:
        """Slide the window."""
        if len(self._recent) == self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._recent.append(value)
        bisect.insort(self._sorted, value)
        self._scale_cache = math.nan

    def expected_one(self, ts_s: float) -> float:
        """Return the rolling median (``nan`` before the first row)."""
        return self._median() if self._sorted else math.nan

    def to_state(self) -> dict[str, Any]:
        """Parameters and the window."""
        state = _state_header(
            self.kind,
            {
                "window": self.window,
                "warmup": self.warmup,
                "z_limit": self.z_limit,
                "min_scale": self.min_scale,
                "threshold": self.threshold,
            },
        )
        state["recent"] = list(self._recent)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RobustZScore:
        """Rebuild from :meth:`to_state` output."""
        det = cls(**state["params"])
        for v in state["recent"]:
            det.learn_one(0.0, float(v))
        return det


# ------------------------------------------------------------------------------------------------
# river models
# ------------------------------------------------------------------------------------------------


class _ResidualSpread:
    """Exponentially weighted mean and variance of a residual: the adaptive threshold."""

    __slots__ = ("alpha", "mean", "n", "var")

    def __init__(self, alpha: float) -> None:
        self.alpha, self.mean, self.var, self.n = alpha, 0.0, 0.0, 0

    def z(self, residual: float, floor: float) -> float:
        sd = math.sqrt(self.var)
        return abs(residual - self.mean) / max(sd, floor)

    def learn(self, residual: float) -> None:
        self.n += 1
        a = max(self.alpha, 1.0 / self.n)
        d = residual - self.mean
        self.mean += a * d
        self.var = (1.0 - a) * (self.var + a * d * d)


class ForecastResidual(_Base):
    """Residual of a river one-step forecaster (SNARIMAX or HoltWinters) with an adaptive threshold.

    Each row is compared with the forecast made before it was seen; the residual's z value against
    an exponentially weighted spread of past residuals scores ``0.5 * z / z_limit``, capped at 1.
    The forecast is also the baseline for excess energy. 0 until ``warmup`` rows are learned.

    Examples
    --------
    >>> det = ForecastResidual(model="snarimax", p=2, d=1, q=0, warmup=30)
    >>> for i in range(200):
    ...     _ = det.update(i * 60.0, 50.0 + 5.0 * math.sin(i / 5.0))
    >>> det.score_one(200 * 60.0, 50.0 + 5.0 * math.sin(40.0)) < 0.5
    True
    >>> det.score_one(200 * 60.0, 90.0)
    1.0
    """

    kind: ClassVar[str] = "forecast"

    def __init__(
        self,
        *,
        model: str = "snarimax",
        p: int = 2,
        d: int = 1,
        q: int = 1,
        m: int = 1,
        sp: int = 0,
        sd: int = 0,
        sq: int = 0,
        alpha: float = 0.3,
        beta: float | None = None,
        gamma: float | None = None,
        seasonality: int = 0,
        residual_alpha: float = 0.01,
        z_limit: float = 5.0,
        min_scale: float = 1e-6,
        warmup: int = 50,
        threshold: float = 0.5,
    ) -> None:
        from river import time_series  # noqa: PLC0415 -- river is heavy; only this kind needs it

        self.params: dict[str, Any] = {
            "model": model,
            "p": p,
            "d": d,
            "q": q,
            "m": m,
            "sp": sp,
            "sd": sd,
            "sq": sq,
            "alpha": alpha,
            "beta": beta,
            "gamma": gamma,
            "seasonality": seasonality,
            "residual_alpha": residual_alpha,
            "z_limit": z_limit,
            "min_scale": min_scale,
            "warmup": warmup,
            "threshold": threshold,
        }
        self.threshold = threshold
        self._model: Any
        if model == "snarimax":
            self._model = time_series.SNARIMAX(p=p, d=d, q=q, m=m, sp=sp, sd=sd, sq=sq)
        else:
            self._model = time_series.HoltWinters(  # type: ignore[no-untyped-call]
                alpha=alpha, beta=beta, gamma=gamma, seasonality=seasonality
            )
        self._spread = _ResidualSpread(residual_alpha)
        self._n = 0
        self._skipped = 0  # anomalous rows since the last learned one: the forecast horizon - 1
        self._last_value = math.nan
        self._forecast_cache = math.nan

    def _forecast(self) -> float:
        if math.isnan(self._forecast_cache):
            try:
                horizon = self._skipped + 1
                self._forecast_cache = float(self._model.forecast(horizon=horizon)[horizon - 1])
            except (IndexError, ValueError, ZeroDivisionError):
                # river's HoltWinters cannot forecast before its first season is learned.
                self._forecast_cache = self._last_value
        return self._forecast_cache

    def score_one(self, ts_s: float, value: float) -> float:
        """Score the residual of ``value`` against the forecast."""
        if self._n < self.params["warmup"]:
            return 0.0
        z = self._spread.z(value - self._forecast(), self.params["min_scale"])
        return _clip01(0.5 * z / self.params["z_limit"])

    def learn_one(self, ts_s: float, value: float) -> None:
        """Learn the residual spread and the forecaster (rows skipped since are left out)."""
        if self._n > 0 and self._skipped == 0:
            self._spread.learn(value - self._forecast())
        self._model.learn_one(value)
        self._n += 1
        self._skipped = 0
        self._last_value = value
        self._forecast_cache = math.nan

    def update(self, ts_s: float, value: float) -> float:
        """Score; learn a normal row, or skip an anomalous one and forecast one step further next."""
        score = self.score_one(ts_s, value)
        if score < self.threshold:
            self.learn_one(ts_s, value)
        else:
            self._skipped += 1
            self._forecast_cache = math.nan
        return score

    def expected_one(self, ts_s: float) -> float:
        """Return the forecast for this row (further ahead while anomalous rows are skipped)."""
        return self._forecast() if self._n else math.nan

    def to_state(self) -> dict[str, Any]:
        """Parameters, the pickled river model (base64) and the residual spread."""
        state = _state_header(self.kind, self.params)
        state["model_pickle_b64"] = _pickle_b64(self._model)
        state["spread"] = [self._spread.mean, self._spread.var, self._spread.n]
        state["n"], state["last_value"] = self._n, none_if_nan(self._last_value)
        state["skipped"] = self._skipped
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ForecastResidual:
        """Rebuild from :meth:`to_state` output."""
        det = cls(**state["params"])
        det._model = _unpickle_b64(state["model_pickle_b64"])
        det._spread.mean, det._spread.var, det._spread.n = state["spread"]
        det._n, det._last_value = int(state["n"]), nan_if_none(state["last_value"])
        det._skipped = int(state["skipped"])
        return det


class HalfSpaceTreesDetector(_Base):
    """river HalfSpaceTrees over engineered features, min-max scaled.

    Features per row: the value, its step from the previous row, and its deviation from an
    exponentially weighted mean (``ewm_alpha``). Scores are HalfSpaceTrees' own 0..1 mass-based
    scores; 0 until ``window_size`` rows are learned (the trees' first reference window).

    Examples
    --------
    >>> det = HalfSpaceTreesDetector(window_size=50, seed=1)
    >>> for i in range(300):
    ...     _ = det.update(float(i), 20.0 + (i % 10) * 0.1)
    >>> det.score_one(300.0, 20.5) < 0.9 <= det.score_one(300.0, 80.0)
    True
    """

    kind: ClassVar[str] = "hst"

    def __init__(
        self,
        *,
        n_trees: int = 10,
        height: int = 6,
        window_size: int = 250,
        ewm_alpha: float = 0.05,
        seed: int = 42,
        threshold: float = 0.9,
    ) -> None:
        from river import anomaly, preprocessing  # noqa: PLC0415 -- heavy import, this kind only

        self.params: dict[str, Any] = {
            "n_trees": n_trees,
            "height": height,
            "window_size": window_size,
            "ewm_alpha": ewm_alpha,
            "seed": seed,
            "threshold": threshold,
        }
        self.threshold = threshold
        # Scaled features may leave 0..1 once the signal leaves its learned range: the trees span
        # -1..2 so that such rows land in sparse leaves instead of being folded onto the edges.
        self._scaler: Any = preprocessing.MinMaxScaler()
        self._model: Any = anomaly.HalfSpaceTrees(
            n_trees=n_trees,
            height=height,
            window_size=window_size,
            seed=seed,
            limits={name: (-1.0, 2.0) for name in ("value", "step", "deviation")},
        )
        self._n = 0
        self._last_value = math.nan
        self._ewm = math.nan

    def _features(self, value: float) -> dict[str, float]:
        if self._n == 0:
            return {"value": value, "step": 0.0, "deviation": 0.0}
        return {"value": value, "step": value - self._last_value, "deviation": value - self._ewm}

    def _scaled(self, features: dict[str, float]) -> dict[str, float]:
        scaled: dict[str, float] = self._scaler.transform_one(features)
        return {k: min(max(v, -1.0), 2.0) for k, v in scaled.items()}

    def score_one(self, ts_s: float, value: float) -> float:
        """HalfSpaceTrees score of the row's features."""
        if self._n < self.params["window_size"]:
            return 0.0
        return _clip01(float(self._model.score_one(self._scaled(self._features(value)))))

    def learn_one(self, ts_s: float, value: float) -> None:
        """Learn the features, then move the feature trackers."""
        features = self._features(value)
        self._scaler.learn_one(features)
        self._model.learn_one(self._scaled(features))
        a = self.params["ewm_alpha"]
        self._ewm = value if self._n == 0 else self._ewm + a * (value - self._ewm)
        self._last_value = value
        self._n += 1

    def expected_one(self, ts_s: float) -> float:
        """Return the exponentially weighted mean."""
        return self._ewm

    def to_state(self) -> dict[str, Any]:
        """Parameters, the pickled river scaler and trees (base64) and the feature trackers."""
        state = _state_header(self.kind, self.params)
        state["model_pickle_b64"] = _pickle_b64((self._scaler, self._model))
        state["n"] = self._n
        state["trackers"] = none_if_nan(self._last_value), none_if_nan(self._ewm)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> HalfSpaceTreesDetector:
        """Rebuild from :meth:`to_state` output."""
        det = cls(**state["params"])
        det._scaler, det._model = _unpickle_b64(state["model_pickle_b64"])
        det._n = int(state["n"])
        det._last_value, det._ewm = (nan_if_none(v) for v in state["trackers"])
        return det


# ------------------------------------------------------------------------------------------------
# The default: an ensemble of cheap views with anomaly likelihood
# ------------------------------------------------------------------------------------------------

_VIEWS = ("context", "zscore", "step", "shift")


class EnsembleDetector:
    """The default detector: several cheap views, each turned into a likelihood, and the max taken.

    After ``warmup`` rows (which fix the quantisation step from their range) each row gets four
    raw scores:

    - *context*: is the sequence of the last 2, 3 and 4 quantised values new (never learned)?
      (contextual novelty, in the spirit of CAD OSE);
    - *zscore*: distance from an exponentially weighted mean in its standard deviations;
    - *step*: size of the step from the previous value against the mean absolute step;
    - *shift*: relative entropy of the quantised values of the last ``short_rows`` rows against all
      learned rows (a change of distribution);

    each passes through its own :class:`~anomaly.scoring.AnomalyLikelihood`, and the score is the
    largest. A value beyond the range seen so far by more than ``extreme_tolerance`` of that range
    scores 1 directly (from row ``extreme_min_rows`` on, also during warm-up). After a score reaches
    ``threshold`` the next ``refractory_rows`` rows score 0: one alarm per event, not one per row.
    While a row scores at or above ``threshold`` nothing is learned from it; in the refractory rows
    the detector keeps learning, so a lasting change becomes the new normal.

    Time stamps are not used: the detector counts rows, so it suits points sampled at a steady rate.

    Examples
    --------
    >>> det = EnsembleDetector(warmup=100)
    >>> normal = [50.0 + 10.0 * math.sin(i / 10.0) for i in range(400)]
    >>> max(det.update(float(i), v) for i, v in enumerate(normal)) < 0.5
    True
    >>> det.update(400.0, 95.0)  # far beyond anything seen
    1.0
    >>> det.update(401.0, 50.0)  # refractory: the event is already reported
    0.0
    """

    kind: ClassVar[str] = "ensemble"

    def __init__(
        self,
        *,
        warmup: int = 300,
        bins: int = 16,
        context_lengths: tuple[int, ...] = (1, 2, 3),
        level_alpha: float = 0.005,
        short_rows: int = 20,
        average_rows: int = 10,
        history_alpha: float = 0.002,
        likelihood_min_rows: int = 50,
        extreme_tolerance: float = 0.05,
        extreme_min_rows: int = 100,
        refractory_rows: int = 100,
        threshold: float = 0.52,
    ) -> None:
        self.params: dict[str, Any] = {
            "warmup": warmup,
            "bins": bins,
            "context_lengths": list(context_lengths),
            "level_alpha": level_alpha,
            "short_rows": short_rows,
            "average_rows": average_rows,
            "history_alpha": history_alpha,
            "likelihood_min_rows": likelihood_min_rows,
            "extreme_tolerance": extreme_tolerance,
            "extreme_min_rows": extreme_min_rows,
            "refractory_rows": refractory_rows,
            "threshold": threshold,
        }
        self.threshold = threshold
        self._warmup = warmup
        self._bins = bins
        self._context_lengths = tuple(context_lengths)
        self._alpha = level_alpha
        self._tol = extreme_tolerance
        self._extreme_min_rows = extreme_min_rows
        self._refractory_rows = refractory_rows
        self._warm: list[float] | None = []
        self._lo = 0.0
        self._step = 1.0
        self._recent_bins: deque[int] = deque(maxlen=max(self._context_lengths) + 1)
        self._contexts: dict[tuple[int, ...], int] = {}
        self._short: deque[int] = deque(maxlen=short_rows)
        self._hist: dict[int, int] = {}
        self._hist_total = 0
        self._level = 0.0
        self._level_var = 0.0
        self._mean_step = 0.0
        self._prev = math.nan
        self._max = -math.inf
        self._min = math.inf
        self._refractory = 0
        self._likelihoods = [
            AnomalyLikelihood(
                average_rows=average_rows, history_alpha=history_alpha, min_rows=likelihood_min_rows
            )
            for _ in _VIEWS
        ]

    # -- one code path for score_one, learn_one and update ---------------------------------------

    def _extreme(self, value: float) -> bool:
        hi, lo = self._max, self._min
        if not hi > lo:
            return False
        tol = (hi - lo) * self._tol
        return value > hi + tol or value < lo - tol

    def _raw_scores(self, value: float, b: int) -> tuple[float, float, float, float]:
        seq = (*self._recent_bins, b)
        contexts = self._contexts
        novel = 0
        for k in self._context_lengths:
            if len(seq) > k and seq[-k - 1 :] not in contexts:
                novel += 1
        context = novel / len(self._context_lengths)

        sd = math.sqrt(self._level_var)
        zscore = min(abs(value - self._level) / (sd or 1e-9) / 6.0, 1.0)
        step = min(abs(value - self._prev) / (self._mean_step or 1e-9) / 10.0, 1.0)

        counts: dict[int, int] = {}
        short = self._short
        for i in range(1 if len(short) == short.maxlen else 0, len(short)):
            sb = short[i]
            counts[sb] = counts.get(sb, 0) + 1
        counts[b] = counts.get(b, 0) + 1
        n_short = sum(counts.values())
        hist = self._hist
        denominator = self._hist_total + 0.5 * (len(hist) + 1)
        kl = 0.0
        for sb, c in counts.items():
            p = c / n_short
            kl += p * math.log(p * denominator / (hist.get(sb, 0) + 0.5))
        shift = min(kl / 3.0, 1.0)
        return context, zscore, step, shift

    def _bin(self, value: float) -> int:
        return math.floor((value - self._lo) / self._step)

    def _learn_models(self, value: float, b: int, *, learn: bool) -> None:
        a = self._alpha
        if self._prev == self._prev:  # not NaN
            gap = abs(value - self._prev)
            self._mean_step = self._mean_step + a * (gap - self._mean_step) if self._mean_step else gap
        self._prev = value
        d = value - self._level
        self._level += a * d
        self._level_var = (1.0 - a) * (self._level_var + a * d * d)
        self._recent_bins.append(b)
        self._short.append(b)
        if not learn:
            return
        seq = tuple(self._recent_bins)
        for k in self._context_lengths:
            if len(seq) > k:
                key = seq[-k - 1 :]
                self._contexts[key] = self._contexts.get(key, 0) + 1
        self._hist[b] = self._hist.get(b, 0) + 1
        self._hist_total += 1

    def _end_warmup(self, warm: list[float]) -> None:
        lo, hi = min(warm), max(warm)
        self._lo = lo
        self._step = (hi - lo) / self._bins or max(abs(hi) * 0.01, 1e-6)
        self._level = warm[0]
        for v in warm:
            self._learn_models(v, self._bin(v), learn=True)
        self._warm = None

    def _step_row(self, value: float, *, commit: bool, force_learn: bool) -> float:
        warm = self._warm
        if warm is not None:
            score = 1.0 if len(warm) >= self._extreme_min_rows and self._extreme(value) else 0.0
            if commit:
                warm.append(value)
                self._max, self._min = max(self._max, value), min(self._min, value)
                if len(warm) >= self._warmup:
                    self._end_warmup(warm)
            return score

        b = self._bin(value)
        raws = self._raw_scores(value, b)
        extreme = self._extreme(value)
        if commit:
            outs = [lik.push(r, learn=True) for lik, r in zip(self._likelihoods, raws, strict=True)]
        else:
            outs = [lik.peek(r) for lik, r in zip(self._likelihoods, raws, strict=True)]
        score = 1.0 if extreme else max(outs)
        if not commit:
            return 0.0 if self._refractory > 0 else score
        self._max, self._min = max(self._max, value), min(self._min, value)
        self._learn_models(value, b, learn=force_learn or score < self.threshold)
        if self._refractory > 0:
            self._refractory -= 1
            return 0.0
        if score >= self.threshold and not force_learn:
            self._refractory = self._refractory_rows
        return score

    # -- the Detector interface ---------------------------------------------------------------------

    def score_one(self, ts_s: float, value: float) -> float:
        """Score the row as :meth:`update` would, without changing any state."""
        return self._step_row(value, commit=False, force_learn=False)

    def learn_one(self, ts_s: float, value: float) -> None:
        """Take the row in as normal (whatever it scores)."""
        self._step_row(value, commit=True, force_learn=True)

    def update(self, ts_s: float, value: float) -> float:
        """Score, then learn unless the row is anomalous; start the refractory period on a detection."""
        return self._step_row(value, commit=True, force_learn=False)

    def expected_one(self, ts_s: float) -> float:
        """Return the exponentially weighted level (``nan`` during warm-up)."""
        return math.nan if self._warm is not None else self._level

    def to_state(self) -> dict[str, Any]:
        """Parameters and every learned structure, JSON-able."""
        state = _state_header(self.kind, self.params)
        state.update(
            warm=self._warm,
            lo=self._lo,
            step=self._step,
            recent_bins=list(self._recent_bins),
            contexts=[[list(k), c] for k, c in self._contexts.items()],
            short=list(self._short),
            hist=[[b, c] for b, c in self._hist.items()],
            level=self._level,
            level_var=self._level_var,
            mean_step=self._mean_step,
            prev=none_if_nan(self._prev),
            extremes=[
                None if math.isinf(self._max) else self._max,
                None if math.isinf(self._min) else self._min,
            ],
            refractory=self._refractory,
            likelihoods=[lik.to_state() for lik in self._likelihoods],
        )
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> EnsembleDetector:
        """Rebuild from :meth:`to_state` output."""
        params = dict(state["params"])
        params["context_lengths"] = tuple(params["context_lengths"])
        det = cls(**params)
        det._warm = None if state["warm"] is None else [float(v) for v in state["warm"]]
        det._lo, det._step = float(state["lo"]), float(state["step"])
        det._recent_bins.extend(int(b) for b in state["recent_bins"])
        det._contexts = {tuple(int(b) for b in k): int(c) for k, c in state["contexts"]}
        det._short.extend(int(b) for b in state["short"])
        det._hist = {int(b): int(c) for b, c in state["hist"]}
        det._hist_total = sum(det._hist.values())
        det._level, det._level_var = float(state["level"]), float(state["level_var"])
        det._mean_step = float(state["mean_step"])
        det._prev = nan_if_none(state["prev"])
        hi, lo = state["extremes"]
        det._max = -math.inf if hi is None else float(hi)
        det._min = math.inf if lo is None else float(lo)
        det._refractory = int(state["refractory"])
        det._likelihoods = [AnomalyLikelihood.from_state(s) for s in state["likelihoods"]]
        return det


# ------------------------------------------------------------------------------------------------
# Config: spec, validation, factory, restore
# ------------------------------------------------------------------------------------------------

_Validator = Callable[[str, Any], Any]


def _pos_float(name: str, value: Any) -> float:
    if not is_finite_number(value) or value <= 0:
        raise spec_error(name, "a finite number > 0", value)
    return float(value)


def _nonneg_float(name: str, value: Any) -> float:
    if not is_finite_number(value) or value < 0:
        raise spec_error(name, "a finite number >= 0", value)
    return float(value)


def _unit_float(name: str, value: Any) -> float:
    if not is_finite_number(value) or not 0 < value <= 1:
        raise spec_error(name, "a number in (0, 1]", value)
    return float(value)


def _opt_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not is_finite_number(value):
        raise spec_error(name, "a finite number or null", value)
    return float(value)


def _opt_unit_float(name: str, value: Any) -> float | None:
    return None if value is None else _unit_float(name, value)


def _pos_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise spec_error(name, "an integer >= 1", value)
    return value


def _nonneg_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise spec_error(name, "an integer >= 0", value)
    return value


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise spec_error(name, "a non-empty list of integers >= 1", value)
    return tuple(_pos_int(f"{name}[{i}]", v) for i, v in enumerate(value))


def _forecast_model(name: str, value: Any) -> str:
    if value not in ("snarimax", "holt_winters"):
        raise spec_error(name, "'snarimax' or 'holt_winters'", value)
    return str(value)


_KINDS: dict[str, tuple[Callable[..., Detector], dict[str, _Validator]]] = {
    "ensemble": (
        EnsembleDetector,
        {
            "warmup": _pos_int,
            "bins": _pos_int,
            "context_lengths": _int_tuple,
            "level_alpha": _unit_float,
            "short_rows": _pos_int,
            "average_rows": _pos_int,
            "history_alpha": _unit_float,
            "likelihood_min_rows": _nonneg_int,
            "extreme_tolerance": _nonneg_float,
            "extreme_min_rows": _pos_int,
            "refractory_rows": _nonneg_int,
        },
    ),
    "forecast": (
        ForecastResidual,
        {
            "model": _forecast_model,
            "p": _nonneg_int,
            "d": _nonneg_int,
            "q": _nonneg_int,
            "m": _pos_int,
            "sp": _nonneg_int,
            "sd": _nonneg_int,
            "sq": _nonneg_int,
            "alpha": _unit_float,
            "beta": _opt_unit_float,
            "gamma": _opt_unit_float,
            "seasonality": _nonneg_int,
            "residual_alpha": _unit_float,
            "z_limit": _pos_float,
            "min_scale": _pos_float,
            "warmup": _pos_int,
        },
    ),
    "profile": (
        ProfileDetector,
        {
            "slot_s": validate_slot_s,
            "timezone": validate_timezone,
            "weekday_profiles": validate_weekday_profiles,
            "alpha": _unit_float,
            "warmup_days": _pos_int,
            "z_limit": _pos_float,
            "min_rel_spread": _nonneg_float,
            "min_spread": _pos_float,
            "shift_tolerance_s": validate_shift_tolerance_s,
            "relearn_after_days": _pos_int,
            "stuck_s": _pos_float,
            "stuck_tolerance": _nonneg_float,
        },
    ),
    "hst": (
        HalfSpaceTreesDetector,
        {
            "n_trees": _pos_int,
            "height": _pos_int,
            "window_size": _pos_int,
            "ewm_alpha": _unit_float,
            "seed": _nonneg_int,
        },
    ),
    "robust_z": (
        RobustZScore,
        {"window": _pos_int, "warmup": _pos_int, "z_limit": _pos_float, "min_scale": _pos_float},
    ),
    "limits": (LimitCheck, {"hh": _opt_float, "h": _opt_float, "l": _opt_float, "ll": _opt_float}),
    "rate_of_change": (RateOfChangeCheck, {"max_rate_per_s": _pos_float}),
    "flatline": (FlatlineCheck, {"stuck_s": _pos_float, "tolerance": _nonneg_float}),
    "no_data": (NoDataCheck, {"max_gap_s": _pos_float}),
}

_REQUIRED: dict[str, tuple[str, ...]] = {
    "rate_of_change": ("max_rate_per_s",),
    "flatline": ("stuck_s",),
    "no_data": ("max_gap_s",),
}

DETECTOR_KINDS: tuple[str, ...] = tuple(_KINDS)

_STATE_CLASSES: dict[str, Any] = {kind: factory for kind, (factory, _) in _KINDS.items()}
"""Every kind's class, for its ``from_state``."""


def _check_cross_fields(kind: str, params: Mapping[str, Any]) -> None:
    if kind == "limits":
        order = [(name, params[name]) for name in ("ll", "l", "h", "hh") if params.get(name) is not None]
        if not order:
            raise ValueError("detector spec field 'hh': at least one of hh, h, l, ll must be set")
        for (lo_name, lo), (hi_name, hi) in itertools.pairwise(order):
            if not lo < hi:
                raise ValueError(f"detector spec field {hi_name!r}: must be above {lo_name} ({lo}), got {hi}")
    if kind == "forecast" and params.get("model") == "holt_winters":
        season = params.get("seasonality", 0)
        if season and params.get("gamma") is None:
            raise ValueError("detector spec field 'gamma': required when seasonality is set")
        if params.get("warmup", 50) <= 2 * season:
            raise ValueError("detector spec field 'warmup': must exceed twice the seasonality")


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    """A validated detector configuration: ``kind``, alarm ``threshold`` and kind-specific params.

    Examples
    --------
    >>> spec = DetectorSpec.from_mapping({"kind": "flatline", "stuck_s": 600})
    >>> spec.kind, spec.params
    ('flatline', {'stuck_s': 600.0})
    >>> DetectorSpec.from_mapping({"kind": "flatline", "stuck_s": -1})
    Traceback (most recent call last):
    ...
    ValueError: detector spec field 'stuck_s': must be a finite number > 0, got -1
    """

    kind: str
    threshold: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> DetectorSpec:
        """Validate a config mapping; ValueError names the bad field."""
        if not isinstance(spec, Mapping):
            raise TypeError(f"detector spec must be a mapping, got {type(spec).__name__}")
        kind = spec.get("kind", "ensemble")
        if kind not in _KINDS:
            raise spec_error("kind", f"one of {', '.join(DETECTOR_KINDS)}", kind)
        _, validators = _KINDS[kind]
        params: dict[str, Any] = {}
        threshold: float | None = None
        for name, value in spec.items():
            if name == "kind":
                continue
            if name == "threshold":
                threshold = _unit_float(name, value)
            elif name in validators:
                params[name] = validators[name](name, value)
            else:
                raise ValueError(f"detector spec field {name!r}: unknown for kind {kind!r}")
        for name in _REQUIRED.get(kind, ()):
            if name not in params:
                raise ValueError(f"detector spec field {name!r}: required for kind {kind!r}")
        _check_cross_fields(kind, params)
        return cls(kind=kind, threshold=threshold, params=params)

    def build(self) -> Detector:
        """Build a fresh detector for this spec."""
        factory, _ = _KINDS[self.kind]
        kwargs = dict(self.params)
        if self.threshold is not None:
            kwargs["threshold"] = self.threshold
        return factory(**kwargs)


def build_detector(spec: Mapping[str, Any] | DetectorSpec) -> Detector:
    """Build a detector from config (``kind`` defaults to ``ensemble``); ValueError names the bad field.

    Examples
    --------
    >>> build_detector({"kind": "limits", "hh": 95.0, "h": 90.0}).kind
    'limits'
    >>> build_detector({"kind": "robust_z", "window": 0})
    Traceback (most recent call last):
    ...
    ValueError: detector spec field 'window': must be an integer >= 1, got 0
    """
    if not isinstance(spec, DetectorSpec):
        spec = DetectorSpec.from_mapping(spec)
    return spec.build()


def detector_from_state(state: Mapping[str, Any]) -> Detector:
    """Rebuild any detector from its ``to_state()`` dict.

    Examples
    --------
    >>> det = build_detector({"kind": "flatline", "stuck_s": 60.0})
    >>> _ = det.update(0.0, 1.0)
    >>> detector_from_state(det.to_state()).score_one(90.0, 1.0)
    0.75
    """
    kind = state.get("kind")
    if kind not in _STATE_CLASSES:
        raise ValueError(f"detector state field 'kind': unknown kind {kind!r}")
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"detector state field 'version': expected {STATE_VERSION}, got {state.get('version')!r}"
        )
    restored: Detector = _STATE_CLASSES[kind].from_state(state)
    return restored


# ------------------------------------------------------------------------------------------------
# One point: detector + active flag + excess energy
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointVerdict:
    """What one reading produced: the score, whether an anomaly is active, the baseline, the energy."""

    score: float
    active: bool
    expected: float
    excess_kwh: float


class PointMonitor:
    """One point's detector, with the anomaly's active flag and (for kW points) its excess energy.

    The score is taken before learning and the baseline (``expected``) before the row is learned;
    while the score stays at or above the threshold the detector learns nothing, so the baseline
    holds still and ``excess_kwh`` integrates ``value - expected`` over the episode. After
    ``relearn_after_s`` of continuous anomaly the detector learns again (the change is accepted as
    the new normal; the episode keeps counting until the score drops).

    Examples
    --------
    >>> mon = PointMonitor(RobustZScore(window=60, warmup=30, z_limit=4.0), power_kw=True)
    >>> for minute in range(60):
    ...     _ = mon.update(minute * 60.0, 100.0 + (minute % 3))
    >>> for minute in range(60, 121):  # one hour about 50 kW above its baseline
    ...     verdict = mon.update(minute * 60.0, 151.0)
    >>> verdict.active, round(verdict.expected), round(verdict.excess_kwh)
    (True, 101, 50)
    """

    __slots__ = ("_active_since_s", "_energy", "detector", "power_kw", "relearn_after_s")

    def __init__(
        self, detector: Detector, *, power_kw: bool = False, relearn_after_s: float = math.inf
    ) -> None:
        self.detector = detector
        self.power_kw = power_kw
        self.relearn_after_s = relearn_after_s
        self._energy = ExcessEnergy()
        self._active_since_s = math.nan

    def update(self, ts_s: float, value: float) -> PointVerdict:
        """Score the reading, learn it unless anomalous, and account the excess energy."""
        det = self.detector
        expected = det.expected_one(ts_s)
        if ts_s - self._active_since_s >= self.relearn_after_s:  # False while no anomaly (NaN)
            score = det.score_one(ts_s, value)
            det.learn_one(ts_s, value)
        else:
            score = det.update(ts_s, value)
        active = score >= det.threshold
        if not active:
            self._active_since_s = math.nan
        elif math.isnan(self._active_since_s):
            self._active_since_s = ts_s
        excess_kwh = 0.0
        if self.power_kw and not math.isnan(expected):
            excess_kwh = self._energy.step(ts_s, value, expected, active=active)
        return PointVerdict(score=score, active=active, expected=expected, excess_kwh=excess_kwh)
