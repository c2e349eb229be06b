"""Staged carbon-budget control: pure rules over one frozen snapshot (docs/control.md).

:func:`decide` is the whole controller of one cycle. It reads a :class:`ControlSnapshot` (the time,
each node's month budget, point values with quality and age, carbon intensity and tariffs, operator
holds), the validated :class:`~control_engine.control_config.ControlConfig` and the controller's own
:class:`ControllerState` (each node's stage and since when, the holds in force), and returns a
:class:`Decision`: the next state, stage changes, proposals, and the rules that proposed nothing
(with the reason) or failed.

Contract
--------
- **Pure.** No I/O and no clock: time is ``snapshot.now``. The same inputs give the same decision;
  the one exception is the rule time budget, measured with ``time.perf_counter`` (or the ``timer``
  given), which can only drop a rule's output, never change it.
- **Stages.** A node escalates one stage (to the next stage that has rules for it) when its
  forecast share of the quota reaches ``stages.enter_pct`` and it has dwelt ``min_dwell_s`` in its
  stage; it steps down one stage when the share falls below ``exit_pct`` after the same dwell.
  Between the two thresholds it stays put: a forecast hovering at the threshold cannot oscillate.
  A node without a budget, or with one older than ``budget_max_age_s``, keeps its stage. A node
  whose gap-sized rules in force can cover its gap does not escalate, and one whose current stage's
  sized rules are still needed does not step down.
- **Gap sizing.** Rules with ``steps`` act in proportion to the forecast gap: the need (kgCO2e/h
  to the month's end, plus the reduction in force the forecast already reflects) is filled with
  the cheapest steps per tCO2e first (tariffs and intensity from the snapshot); the state keeps the
  fills (:class:`SizingState`), re-sized after a dwell when the need moved past a deadband.
- **Proposals.** Every rule of a node's stages ``1..current`` runs, lowest stage first. A rule acts
  only on inputs that are present, of good quality and fresh (``age <= max_age_s``): otherwise it
  proposes nothing and :attr:`Decision.skipped` says why. A rule that raises or exceeds
  ``rule_time_budget_ms`` is isolated in :attr:`Decision.rule_errors`; the others go on.
- **Modes.** ``auto`` proposals of stages 1-3 may be sent; stage 4 and every proposal of an
  ``approve`` node need an operator's approval; ``advisory`` proposals are never sent.

Nothing here writes to a device: the dispatcher merges proposals by priority, clamps them through
:mod:`control_engine.interlocks`, sends them and reverts them at ``hold_until``.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from control_engine.control_config import (
    MAX_STAGE,
    ControlConfig,
    CurtailRule,
    NodeMode,
    RuleConfig,
    RuleKind,
    SetpointParameters,
    SetpointRule,
    ShiftRule,
    StageBasis,
    StorageParameters,
    StorageRule,
)
from control_engine.forecast import MonthForecast, month_bounds
from scada.model import DeviceId, NodeId, PointId, Priority, QualityCode

__all__ = [
    "EVALUATORS",
    "ControlSnapshot",
    "ControllerState",
    "Decision",
    "Evaluator",
    "Hold",
    "HourlySignals",
    "NodeBudget",
    "OperatorHold",
    "OperatorHoldKind",
    "PointState",
    "Proposal",
    "RuleContext",
    "RuleError",
    "RuleSkipped",
    "SizingState",
    "Skip",
    "StageChange",
    "StageState",
    "Target",
    "decide",
    "hourly_signals",
    "window_mean",
]

HOUR = timedelta(hours=1)
ON_THRESHOLD = 0.5
"""An on/off point (a switch, a "job running" flag) is on at or above this value."""


# --------------------------------------------------------------------------------------------------
# The snapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeBudget:
    """One node's month against its carbon quota, as the forecast saw it at ``computed_at``."""

    node: NodeId
    month: str
    """``YYYY-MM`` in the site's time zone."""
    quota_t: float
    actual_t: float
    forecast_t: float
    """Month-end forecast, tCO2e."""
    forecast_high_t: float | None = None
    """Upper bound of the forecast's prediction interval, tCO2e."""
    computed_at: datetime

    def __post_init__(self) -> None:
        if not (math.isfinite(self.quota_t) and self.quota_t > 0):
            raise ValueError(
                f"{self.node} {self.month}: quota_t must be a positive number, got {self.quota_t}"
            )
        for name in ("actual_t", "forecast_t", "forecast_high_t"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{self.node} {self.month}: {name} must be a number >= 0, got {value}")
        if self.computed_at.tzinfo is None:
            raise ValueError(f"{self.node} {self.month}: computed_at must be timezone-aware")

    @classmethod
    def from_forecast(cls, forecast: MonthForecast, *, quota_t: float) -> NodeBudget:
        """Return the budget of a month forecast (kgCO2e) against a quota (tCO2e)."""
        return cls(
            node=NodeId(forecast.node),
            month=forecast.month,
            quota_t=quota_t,
            actual_t=forecast.actual_kg / 1000.0,
            forecast_t=forecast.forecast_kg / 1000.0,
            forecast_high_t=forecast.high_kg / 1000.0,
            computed_at=forecast.computed_at,
        )

    def share_pct(self, basis: StageBasis) -> float:
        """Return the forecast (or its upper bound) as a percentage of the quota.

        >>> from datetime import UTC, datetime
        >>> b = NodeBudget(node=NodeId("ent-a"), month="2026-03", quota_t=200, actual_t=90,
        ...                forecast_t=204, forecast_high_t=230, computed_at=datetime(2026, 3, 9, tzinfo=UTC))
        >>> b.share_pct(StageBasis.FORECAST), b.share_pct(StageBasis.FORECAST_HIGH)
        (102.0, 115.0)
        """
        high = self.forecast_high_t if self.forecast_high_t is not None else self.forecast_t
        emitted = high if basis is StageBasis.FORECAST_HIGH else self.forecast_t
        return 100.0 * emitted / self.quota_t


@dataclass(frozen=True, slots=True, kw_only=True)
class PointState:
    """The latest value of one point as the controller may use it."""

    point: PointId
    value: float | None
    quality: QualityCode
    ts: datetime
    """When the value was measured (not when it was received)."""
    writable: bool = False
    max_age_s: float | None = None
    """Staleness limit of this point (e.g. from its device's poll period); None: the config's."""
    changed_at: datetime | None = None
    """When the value last changed, when known: minimum on/off times count from it."""

    def __post_init__(self) -> None:
        if self.ts.tzinfo is None:
            raise ValueError(f"point state {self.point}: ts must be timezone-aware")


class OperatorHoldKind(enum.StrEnum):
    """What an operator did to a device."""

    OVERRIDE = "override"
    """Manual control: automatic writes (schedule, optimiser) are refused; operator and safety pass."""
    LOCKOUT = "lockout"
    """Locked out (maintenance, lock-out/tag-out): nothing is written, whoever asks."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatorHold:
    """A manual override or lockout of one device: who set it and until when (None: until cleared)."""

    device: DeviceId
    kind: OperatorHoldKind
    by: str
    until: datetime | None = None
    reason: str = ""

    def active(self, now: datetime) -> bool:
        """Return True while the hold is in force."""
        return self.until is None or now < self.until


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlSnapshot:
    """Everything one control cycle may look at, frozen at ``now``."""

    now: datetime
    budgets: Mapping[str, NodeBudget] = field(default_factory=dict)
    """By node id."""
    points: Mapping[str, PointState] = field(default_factory=dict)
    """By point id."""
    intensity_kg_per_kwh: float | None = None
    """Carbon intensity of grid electricity now (kgCO2/kWh); None when unknown."""
    intensity_hourly_kg_per_kwh: tuple[float, ...] = ()
    """Expected intensity per hour: item ``i`` covers ``[hour_start + i h, hour_start + (i+1) h)``."""
    tariff_hourly_cny_per_kwh: tuple[float, ...] = ()
    """Energy price per hour, same slots as the intensity (the site's table)."""
    node_tariff_hourly_cny_per_kwh: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    """Nodes with their own tariff table, by node id; the others pay the site's."""
    operator_holds: Mapping[str, OperatorHold] = field(default_factory=dict)
    """Manual overrides and lockouts, by device id."""

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise ValueError("snapshot now must be timezone-aware")

    def tariffs_for(self, node: str) -> tuple[float, ...]:
        """Return the hourly price a node pays (its own table, else the site's)."""
        return self.node_tariff_hourly_cny_per_kwh.get(node, self.tariff_hourly_cny_per_kwh)

    @property
    def hour_start(self) -> datetime:
        """Return the start of the hour containing ``now`` (slot 0 of the hourly signals)."""
        return self.now.replace(minute=0, second=0, microsecond=0)

    def unusable(self, point: str, default_max_age_s: float) -> str | None:
        """Return why a point's value may not be acted on (missing, bad, stale), or None if usable."""
        state = self.points.get(point)
        if state is None:
            return f"no value of {point}"
        if state.quality is not QualityCode.GOOD:
            return f"{point} has {state.quality.name.lower()} quality"
        if state.value is None:
            return f"{point} has no value"
        if not math.isfinite(state.value):
            return f"{point} is not a finite number"
        age_s = (self.now - state.ts).total_seconds()
        max_age_s = default_max_age_s if state.max_age_s is None else state.max_age_s
        if age_s > max_age_s:
            return f"{point} is stale ({age_s:.0f} s old, limit {max_age_s:g} s)"
        return None


# --------------------------------------------------------------------------------------------------
# The controller's own state


@dataclass(frozen=True, slots=True, kw_only=True)
class StageState:
    """A node's stage (0: no control) and when it entered it (None: since before we knew)."""

    stage: int = 0
    since: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Hold:
    """A command in force on a point (kept by the dispatcher): what it displaced and until when."""

    point: PointId
    value: float
    rule_id: str
    until: datetime
    revert_to: float | None
    """The value in force before control took the point, restored at ``until``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SizingState:
    """How much a node's gap-sized rules are asked to avoid, and how it is split among them."""

    need_kg_per_h: float = 0.0
    """The reduction the forecast gap asked for when last sized."""
    committed_kg_per_h: float = 0.0
    """What the filled steps are expected to avoid (the need, or less when capacity runs out)."""
    reflected_kg_per_h: float = 0.0
    """The part of past commitments the forecast already shows (it learns controlled hours)."""
    fills: Mapping[str, float] = field(default_factory=dict)
    """By rule id: steps filled, ``1.5`` = the first step and half of the second."""
    sized_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerState:
    """What the controller remembers between cycles; :func:`decide` returns the next one."""

    stages: Mapping[str, StageState] = field(default_factory=dict)
    holds: Mapping[str, Hold] = field(default_factory=dict)
    """By point id; kept by the dispatcher, read here for the value an offset applies to."""
    sizing: Mapping[str, SizingState] = field(default_factory=dict)
    """By node id: the gap sizing of its rules with ``steps``."""

    def stage_of(self, node: str) -> StageState:
        """Return a node's stage (stage 0 when unknown)."""
        return self.stages.get(node, StageState())


# --------------------------------------------------------------------------------------------------
# The decision


@dataclass(frozen=True, slots=True, kw_only=True)
class Proposal:
    """A value a rule wants on a point; the dispatcher merges, clamps, approves and sends it."""

    point: PointId
    value: float
    node: NodeId
    rule_id: str
    stage: int
    priority: Priority
    reason: str
    hold_until: datetime
    needs_approval: bool
    advisory: bool
    """Never sent, whatever ``needs_approval`` says: the node is in advisory mode."""
    expected_reduction_kw: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StageChange:
    """A node moved one stage up or down."""

    node: NodeId
    from_stage: int
    to_stage: int
    share_pct: float
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Skip:
    """A rule (or a node) that proposed nothing this cycle, and why."""

    rule_id: str
    node: NodeId
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleError:
    """A rule that raised or ran over its time budget; its output was dropped."""

    rule_id: str
    node: NodeId
    error: str
    elapsed_ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The outcome of one control cycle."""

    now: datetime
    state: ControllerState
    proposals: tuple[Proposal, ...] = ()
    transitions: tuple[StageChange, ...] = ()
    skipped: tuple[Skip, ...] = ()
    """Rules with unusable inputs or nothing to do, and nodes whose budget could not be judged."""
    rule_errors: tuple[RuleError, ...] = ()
    planned_reduction_kw: Mapping[str, float] = field(default_factory=dict)
    """By node: the expected reduction of the rules that proposed something (planning, not measured)."""


# --------------------------------------------------------------------------------------------------
# Rule evaluation


class RuleSkipped(Exception):
    """Raised by an evaluator whose inputs are unusable or that has nothing to propose."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One value an evaluator wants on one point, and what it does in words."""

    point: PointId
    value: float
    what: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleContext:
    """What an evaluator may read: the snapshot, the config and the controller state."""

    snapshot: ControlSnapshot
    config: ControlConfig
    state: ControllerState

    def value(self, point: str) -> float:
        """Return a usable (present, good, fresh) value; raise :class:`RuleSkipped` otherwise."""
        reason = self.snapshot.unusable(point, self.config.max_age_s)
        if reason is not None:
            raise RuleSkipped(reason)
        value = self.snapshot.points[point].value
        assert value is not None  # unusable() says so
        return value

    def base_value(self, point: str) -> float:
        """Return the value an offset applies to: the one control displaced, else the current one.

        Offsets never compound: while a hold is in force its ``revert_to`` is the base.
        """
        current = self.value(point)
        hold = self.state.holds.get(point)
        if hold is not None and hold.until > self.snapshot.now and hold.revert_to is not None:
            return hold.revert_to
        return current


Evaluator = Callable[[RuleConfig, RuleContext], Sequence[Target]]
"""Turn one rule and the cycle's context into target values (or raise :class:`RuleSkipped`)."""


def _setpoint(rule: RuleConfig, ctx: RuleContext) -> list[Target]:
    assert isinstance(rule, SetpointRule | CurtailRule)
    params = rule.parameters
    if params.steps:
        return _sized(rule, params, ctx)
    out: list[Target] = []
    for target in rule.targets:
        if params.value is not None:
            ctx.value(target)  # the device must be seen before it is written
            out.append(Target(point=PointId(target), value=params.value, what=f"set {params.value:g}"))
        else:
            assert params.offset is not None
            base = ctx.base_value(target)
            value = base + params.offset
            out.append(Target(point=PointId(target), value=value, what=f"{base:g} {params.offset:+g}"))
    return out


def _sized(rule: SetpointRule | CurtailRule, params: SetpointParameters, ctx: RuleContext) -> list[Target]:
    """Move each target as deep along the rule's steps as the node's sizing filled them."""
    sizing = ctx.state.sizing.get(rule.node)
    depth = sizing.fills.get(rule.id, 0.0) if sizing is not None else 0.0
    if depth <= _TIE:
        raise RuleSkipped("not needed: cheaper measures cover the forecast gap (or there is none)")
    out: list[Target] = []
    for target in rule.targets:
        base = ctx.base_value(target)
        value = _step_value(params, base, depth)
        out.append(
            Target(
                point=PointId(target),
                value=value,
                what=f"{depth:.2f} of {len(params.steps)} steps: {base:g} -> {value:g}",
            )
        )
    return out


def _step_value(params: SetpointParameters, base: float, depth: float) -> float:
    """Return the value ``depth`` steps deep from ``base``, interpolated within a step, rounded.

    >>> from control_engine.control_config import SetpointParameters
    >>> p = SetpointParameters(steps=({"value": 70, "reduction_kg_per_h": 50},
    ...                               {"value": 40, "reduction_kg_per_h": 60}), resolution=1)
    >>> _step_value(p, 100.0, 0.5), _step_value(p, 100.0, 1.5), _step_value(p, 100.0, 9)
    (85.0, 55.0, 40.0)
    """

    def level(index: int) -> float:
        if index == 0:
            return base
        step = params.steps[index - 1]
        return step.value if step.value is not None else base + (step.offset or 0.0)

    depth = min(max(depth, 0.0), float(len(params.steps)))
    whole = min(int(depth), len(params.steps) - 1)
    fraction = depth - whole
    value = level(whole) + fraction * (level(whole + 1) - level(whole))
    if params.resolution is not None:
        value = round(value / params.resolution) * params.resolution
        value = round(value, 9)  # 0.1 x 85 is not exactly 8.5 in binary
    return value


def _spread_ok(
    params: StorageParameters,
    intensity: float,
    hourly: Sequence[float],
    tariffs: Sequence[float],
    *,
    sign: float,
) -> tuple[bool, str]:
    """Return whether a cleaner (``sign`` +1) or dirtier (-1) hour lies ahead by enough, and why.

    Either configured spread suffices; with none configured any intensity past the threshold does.
    """
    checks: list[bool] = []
    notes: list[str] = []
    if params.min_spread_kg_per_kwh > 0:
        extreme = (min(hourly) if sign > 0 else max(hourly)) if hourly else None
        if extreme is None:
            checks.append(False)
            notes.append("no intensity forecast")
        else:
            spread = sign * (intensity - extreme)
            checks.append(spread >= params.min_spread_kg_per_kwh)
            notes.append(f"intensity spread {spread:.3f}")
    if params.min_spread_cny_per_kwh is not None:
        if tariffs:
            price_spread = sign * (tariffs[0] - (min(tariffs) if sign > 0 else max(tariffs)))
            checks.append(price_spread >= params.min_spread_cny_per_kwh)
            notes.append(f"price spread {price_spread:.3f}")
        else:
            checks.append(False)
            notes.append("no tariff")
    return (not checks or any(checks)), ", ".join(notes)


def _storage(rule: RuleConfig, ctx: RuleContext) -> list[Target]:
    """Battery by intensity, with a deadband: a cycle starts only on a spread and runs on hysteresis."""
    assert isinstance(rule, StorageRule)
    params = rule.parameters
    snapshot = ctx.snapshot
    intensity = snapshot.intensity_kg_per_kwh
    if intensity is None or not math.isfinite(intensity):
        raise RuleSkipped("grid carbon intensity unknown")
    current_kw = ctx.value(rule.targets[0])
    horizon = params.spread_horizon_h
    hourly = snapshot.intensity_hourly_kg_per_kwh[:horizon]
    tariffs = snapshot.tariffs_for(rule.node)[:horizon]
    hysteresis = params.hysteresis_kg_per_kwh

    if current_kw > 0 and intensity >= params.discharge_above_kg_per_kwh - hysteresis:
        power_kw, what = (
            params.discharge_kw,
            f"discharge {params.discharge_kw:g} kW on at {intensity:.3f} kg/kWh",
        )
    elif current_kw < 0 and intensity <= params.charge_below_kg_per_kwh + hysteresis:
        power_kw, what = -params.charge_kw, f"charge {params.charge_kw:g} kW on at {intensity:.3f} kg/kWh"
    elif intensity >= params.discharge_above_kg_per_kwh:
        ok, note = _spread_ok(params, intensity, hourly, tariffs, sign=+1.0)
        power_kw = params.discharge_kw if ok else 0.0
        verb = f"discharge {power_kw:g} kW" if ok else "idle: spread too small to discharge"
        what = f"{verb} at {intensity:.3f} kg/kWh" + (f" ({note})" if note else "")
    elif intensity <= params.charge_below_kg_per_kwh:
        ok, note = _spread_ok(params, intensity, hourly, tariffs, sign=-1.0)
        power_kw = -params.charge_kw if ok else 0.0
        verb = f"charge {params.charge_kw:g} kW" if ok else "idle: spread too small to charge"
        what = f"{verb} at {intensity:.3f} kg/kWh" + (f" ({note})" if note else "")
    else:
        power_kw = 0.0
        what = f"idle at {intensity:.3f} kg/kWh"
    out: list[Target] = []
    if params.mode_point is not None:
        ctx.value(params.mode_point)
        out.append(Target(point=PointId(params.mode_point), value=params.mode_value, what="follow setpoint"))
    for target in rule.targets:
        ctx.value(target)
        out.append(Target(point=PointId(target), value=power_kw, what=what))
    return out


def window_mean(
    hourly: Sequence[float], hour_start: datetime, start: datetime, duration: timedelta
) -> float | None:
    """Return the time-weighted mean of hourly values over ``[start, start + duration)``.

    None when the window is not covered by the hourly values.

    >>> from datetime import UTC, datetime, timedelta
    >>> t0 = datetime(2026, 3, 9, 8, tzinfo=UTC)
    >>> window_mean([0.8, 0.4, 0.2], t0, t0 + timedelta(minutes=30), timedelta(hours=1))
    0.6000000000000001
    >>> window_mean([0.8, 0.4], t0, t0 + timedelta(hours=1, minutes=30), timedelta(hours=1)) is None
    True
    """
    end = start + duration
    if start < hour_start or end > hour_start + len(hourly) * HOUR or duration <= timedelta(0):
        return None
    total = 0.0
    index = int((start - hour_start) // HOUR)
    while index < len(hourly):
        slot_start = hour_start + index * HOUR
        if slot_start >= end:
            break
        overlap = min(end, slot_start + HOUR) - max(start, slot_start)
        total += hourly[index] * (overlap / HOUR)
        index += 1
    return total / (duration / HOUR)


def _shift(rule: RuleConfig, ctx: RuleContext) -> list[Target]:
    assert isinstance(rule, ShiftRule)
    params = rule.parameters
    snapshot, now = ctx.snapshot, ctx.snapshot.now
    [target] = rule.targets
    if params.running_point is not None and ctx.value(params.running_point) >= ON_THRESHOLD:
        raise RuleSkipped("a job is running: a running job is never moved")
    next_hour = ctx.value(params.start_point)
    if next_hour < 0:
        raise RuleSkipped("no job pending")
    current_delay_min = ctx.value(target)
    planned = _next_local(now, next_hour, ZoneInfo(ctx.config.timezone))
    nominal = planned - timedelta(minutes=current_delay_min)
    duration = timedelta(hours=params.duration_h)
    hourly, tariffs = snapshot.intensity_hourly_kg_per_kwh, snapshot.tariff_hourly_cny_per_kwh
    horizon_end = now + timedelta(hours=params.horizon_h)

    def score(start: datetime) -> tuple[float, float] | None:
        if start + duration > horizon_end:
            return None
        intensity = window_mean(hourly, snapshot.hour_start, start, duration)
        if intensity is None:
            return None
        tariff = window_mean(tariffs, snapshot.hour_start, start, duration)
        return intensity, tariff if tariff is not None else 0.0

    plan_start = max(nominal, now)  # a job held past its plan starts at once when released
    plan = score(plan_start)
    if plan is None:
        raise RuleSkipped(
            f"intensity forecast ({len(hourly)} h) or horizon ({params.horizon_h:g} h) does not "
            f"cover the planned window from {plan_start.isoformat()}"
        )
    best_delay_min, best = 0.0, plan
    steps = int(params.max_delay_min // params.step_min)
    for step in range(1, steps + 1):
        delay_min = step * params.step_min
        start = nominal + timedelta(minutes=delay_min)
        if start < now:
            continue
        candidate = score(start)
        if candidate is not None and _cleaner(candidate, best):  # ties keep the earlier start
            best_delay_min, best = delay_min, candidate
    gain_pct = 100.0 * (plan[0] - best[0]) / plan[0] if plan[0] > 0 else 0.0
    if best_delay_min > 0 and gain_pct < params.min_gain_pct:
        best_delay_min, best = 0.0, plan
        what = f"keep the plan: best window only {gain_pct:.1f} % cleaner"
    elif best_delay_min == 0:
        what = f"keep the plan: {plan[0]:.3f} kg/kWh is the cleanest window"
    else:
        what = (
            f"delay {best_delay_min:g} min: {best[0]:.3f} kg/kWh instead of {plan[0]:.3f} "
            f"({gain_pct:.1f} % cleaner)"
        )
    return [Target(point=PointId(target), value=best_delay_min, what=what)]


_TIE = 1e-9
"""Window means closer than this are equal (sums of the same hourly values in another order)."""


def _cleaner(candidate: tuple[float, float], best: tuple[float, float]) -> bool:
    """Return True when (intensity, tariff) ``candidate`` beats ``best``: cleaner, else cheaper."""
    if candidate[0] < best[0] - _TIE:
        return True
    return abs(candidate[0] - best[0]) <= _TIE and candidate[1] < best[1] - _TIE


def _next_local(now: datetime, local_hour: float, zone: ZoneInfo) -> datetime:
    """Return the next instant at ``local_hour`` o'clock (a few minutes of rounding tolerated)."""
    local_now = now.astimezone(zone)
    midnight = local_now.replace(hour=0, minute=0, second=0, microsecond=0)
    at = midnight + timedelta(minutes=round(local_hour * 60.0))
    if at < local_now - timedelta(minutes=5):
        at += timedelta(days=1)
    return at.astimezone(now.tzinfo)


EVALUATORS: Mapping[str, Evaluator] = {
    RuleKind.SETPOINT: _setpoint,
    RuleKind.STORAGE: _storage,
    RuleKind.SHIFT: _shift,
    RuleKind.CURTAIL: _setpoint,
}
"""The evaluator of each rule kind."""


# --------------------------------------------------------------------------------------------------
# The cycle


def decide(
    snapshot: ControlSnapshot,
    config: ControlConfig,
    state: ControllerState | None = None,
    *,
    evaluators: Mapping[str, Evaluator] = EVALUATORS,
    timer: Callable[[], float] = time.perf_counter,
) -> Decision:
    """Run one control cycle: move stages, then collect the proposals of every active rule."""
    state = ControllerState() if state is None else state
    next_state, transitions, skipped = _advance(snapshot, config, state)
    stages = next_state.stages
    ctx = RuleContext(snapshot=snapshot, config=config, state=next_state)
    proposals: list[Proposal] = []
    errors: list[RuleError] = []
    planned: dict[str, float] = {}
    budget_s = config.rule_time_budget_ms / 1000.0
    for rule in sorted(config.rules, key=lambda r: (r.node, r.stage, r.id)):
        stage = stages.get(rule.node, StageState()).stage
        if rule.stage > stage:
            continue
        node = NodeId(rule.node)
        started = timer()
        try:
            targets = list(evaluators[rule.kind](rule, ctx))
            _check_finite(targets)
        except RuleSkipped as skip:
            skipped.append(Skip(rule_id=rule.id, node=node, reason=str(skip)))
            continue
        except Exception as err:  # noqa: BLE001 - isolation: one broken rule must not stop the others
            elapsed_ms = (timer() - started) * 1000.0
            errors.append(
                RuleError(
                    rule_id=rule.id, node=node, error=f"{type(err).__name__}: {err}", elapsed_ms=elapsed_ms
                )
            )
            continue
        elapsed_s = timer() - started
        if elapsed_s > budget_s:
            errors.append(
                RuleError(
                    rule_id=rule.id,
                    node=node,
                    error=(
                        f"took {elapsed_s * 1000:.1f} ms, over the budget of "
                        f"{config.rule_time_budget_ms:g} ms: output dropped"
                    ),
                    elapsed_ms=elapsed_s * 1000.0,
                )
            )
            continue
        proposals.extend(
            _proposals(rule, targets=targets, node=node, node_stage=stage, snapshot=snapshot, config=config)
        )
        if targets:
            planned[rule.node] = planned.get(rule.node, 0.0) + rule.expected_reduction_kw
    return Decision(
        now=snapshot.now,
        state=next_state,
        proposals=tuple(proposals),
        transitions=tuple(transitions),
        skipped=tuple(skipped),
        rule_errors=tuple(errors),
        planned_reduction_kw=planned,
    )


def _advance(
    snapshot: ControlSnapshot, config: ControlConfig, state: ControllerState
) -> tuple[ControllerState, list[StageChange], list[Skip]]:
    """Move every node's stage and sizing one cycle on."""
    stages = dict(state.stages)
    sizing = dict(state.sizing)
    transitions: list[StageChange] = []
    skipped: list[Skip] = []
    for node in _nodes(config, state):
        current = state.stage_of(node)
        budget, note = _usable_budget(node, snapshot, config, current)
        previous = state.sizing.get(node)
        need = _need_kg_per_h(budget, snapshot, config, previous) if budget is not None else None
        change = None
        if budget is not None and need is not None:
            capacity = _capacity_kg_per_h(node, current.stage, snapshot, config)
            lower = [s for s in _configured_stages(config, node) if s < current.stage]
            below = _capacity_kg_per_h(node, lower[-1], snapshot, config) if lower else 0.0
            change = _step_stage(
                node,
                budget,
                snapshot,
                config,
                current,
                covered=capacity >= need > 0,
                needed=need > below and capacity > below,
            )
        if change is not None:
            transitions.append(change)
            stages[node] = StageState(stage=change.to_stage, since=snapshot.now)
        if note is not None:
            skipped.append(Skip(rule_id="", node=NodeId(node), reason=note))
        sized = _size(
            node,
            stage=stages.get(node, StageState()).stage,
            need=need,
            snapshot=snapshot,
            config=config,
            previous=previous,
            restage=change is not None,
            hours_left=_hours_left(budget, config, snapshot.now) if budget is not None else None,
            quota_kg=budget.quota_t * 1000.0 if budget is not None else None,
        )
        if sized is not None:
            sizing[node] = sized
    next_state = replace(state, stages=stages, sizing=sizing)
    return next_state, transitions, skipped


def _check_finite(targets: Iterable[Target]) -> None:
    for target in targets:
        if not math.isfinite(target.value):
            raise ValueError(f"{target.point}: computed value is not finite ({target.value})")


def _nodes(config: ControlConfig, state: ControllerState) -> list[str]:
    """Return every node with rules or a stage, sorted (the order of transitions)."""
    return sorted({rule.node for rule in config.rules} | {n for n, s in state.stages.items() if s.stage})


def _configured_stages(config: ControlConfig, node: str) -> list[int]:
    return sorted({rule.stage for rule in config.rules if rule.node == node})


def _usable_budget(
    node: str, snapshot: ControlSnapshot, config: ControlConfig, current: StageState
) -> tuple[NodeBudget | None, str | None]:
    """Return the node's budget if it may be acted on, else None and why."""
    budget = snapshot.budgets.get(node)
    if budget is None:
        return None, f"no budget for {node}: stage {current.stage} kept"
    age_s = (snapshot.now - budget.computed_at).total_seconds()
    if age_s > config.budget_max_age_s:
        return None, (
            f"budget of {node} is stale ({age_s:.0f} s old, limit {config.budget_max_age_s:g} s): "
            f"stage {current.stage} kept"
        )
    return budget, None


def _step_stage(
    node: str,
    budget: NodeBudget,
    snapshot: ControlSnapshot,
    config: ControlConfig,
    current: StageState,
    *,
    covered: bool = False,
    needed: bool = False,
) -> StageChange | None:
    """Return the node's stage change this cycle, if any.

    ``covered``: the gap-sized rules of the stages in force can avoid what the gap needs, so the
    node does not escalate to dearer measures. ``needed``: the current stage's sized rules are still
    part of what the sizing asks for (the forecast shows their effect), so a forecast below the exit
    threshold does not drop them; the sizing itself lets go as the need falls.
    """
    stages_cfg = config.stages
    share = budget.share_pct(stages_cfg.basis)
    dwelt = current.since is None or (snapshot.now - current.since).total_seconds() >= stages_cfg.min_dwell_s
    configured = _configured_stages(config, node)
    if share >= stages_cfg.enter_pct:
        higher = [s for s in configured if s > current.stage]
        if higher and dwelt and not covered:
            return StageChange(
                node=NodeId(node),
                from_stage=current.stage,
                to_stage=higher[0],
                share_pct=share,
                reason=f"forecast {share:.1f} % of quota >= {stages_cfg.enter_pct:g} %",
            )
    elif share < stages_cfg.exit_pct and current.stage > 0 and dwelt and not needed:
        lower = [s for s in configured if s < current.stage]
        return StageChange(
            node=NodeId(node),
            from_stage=current.stage,
            to_stage=lower[-1] if lower else 0,
            share_pct=share,
            reason=f"forecast {share:.1f} % of quota < {stages_cfg.exit_pct:g} %",
        )
    return None


# --------------------------------------------------------------------------------------------------
# Gap sizing


def _hours_left(budget: NodeBudget, config: ControlConfig, now: datetime) -> float:
    """Return the hours from ``now`` to the end of the budget's month (at least one)."""
    _start, end = month_bounds(budget.month, ZoneInfo(config.timezone))
    return max(1.0, (end - now).total_seconds() / 3600.0)


def _relaxed(previous: SizingState | None, now: datetime, lag_h: float) -> float:
    """Return how much of the commitments so far the forecast reflects by ``now`` (first order)."""
    if previous is None or previous.updated_at is None:
        return 0.0
    elapsed_h = max(0.0, (now - previous.updated_at).total_seconds() / 3600.0)
    keep = math.exp(-elapsed_h / lag_h)
    return previous.committed_kg_per_h + (previous.reflected_kg_per_h - previous.committed_kg_per_h) * keep


def _need_kg_per_h(
    budget: NodeBudget, snapshot: ControlSnapshot, config: ControlConfig, previous: SizingState | None
) -> float:
    """Return the reduction rate that brings the month-end forecast to the sizing target.

    The forecast learns the controlled hours, so part of what is already avoided is in it (the
    reflected part) and must be kept on top of what the gap asks for.
    """
    emitted_t = budget.share_pct(config.stages.basis) * budget.quota_t / 100.0
    target_t = budget.quota_t * config.sizing.target_pct / 100.0
    gap_kg = (emitted_t - target_t) * 1000.0
    reflected = _relaxed(previous, snapshot.now, config.sizing.forecast_lag_h)
    return max(0.0, gap_kg / _hours_left(budget, config, snapshot.now) + reflected)


@dataclass(frozen=True, slots=True)
class _Segment:
    """One step of one sized rule, priced: what it avoids per hour and at what cost per tCO2e."""

    cost_cny_per_t: float
    stage: int
    rule_id: str
    index: int
    kg_per_h: float


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _segments(node: str, stage: int, snapshot: ControlSnapshot, config: ControlConfig) -> list[_Segment]:
    """Return the steps of the node's sized rules of stages ``1..stage``, cheapest per tCO2e first."""
    hourly = snapshot.intensity_hourly_kg_per_kwh[:24]
    intensity = _mean(hourly) if hourly else snapshot.intensity_kg_per_kwh
    if intensity is not None and not math.isfinite(intensity):
        intensity = None
    tariff = _mean(snapshot.tariffs_for(node)[:24]) or 0.0
    out: list[_Segment] = []
    for rule in config.rules:
        if rule.node != node or rule.stage > stage or not isinstance(rule, SetpointRule | CurtailRule):
            continue
        running = -math.inf
        for index, step in enumerate(rule.parameters.steps):
            kg_per_h = step.reduction_kg_per_h + step.reduction_kw * (intensity or 0.0)
            if kg_per_h <= 0:
                break  # what this step avoids is unknown: no deeper step either
            net_cny_per_h = step.cost_cny_per_h - step.reduction_kw * tariff
            # A deeper step never goes before a shallower one of the same rule.
            running = max(running, 1000.0 * net_cny_per_h / kg_per_h)
            out.append(_Segment(running, rule.stage, rule.id, index, kg_per_h))
    out.sort(key=lambda seg: (seg.cost_cny_per_t, seg.stage, seg.rule_id, seg.index))
    return out


def _capacity_kg_per_h(node: str, stage: int, snapshot: ControlSnapshot, config: ControlConfig) -> float:
    """Return what the node's sized rules of stages ``1..stage`` can avoid at most (kg/h)."""
    return sum(seg.kg_per_h for seg in _segments(node, stage, snapshot, config))


def _size(
    node: str,
    *,
    stage: int,
    need: float | None,
    snapshot: ControlSnapshot,
    config: ControlConfig,
    previous: SizingState | None,
    restage: bool,
    hours_left: float | None = None,
    quota_kg: float | None = None,
) -> SizingState | None:
    """Return the node's next sizing: re-filled after a stage change, a dwell and a need that moved."""
    now = snapshot.now
    if need is None:
        return previous  # no usable budget: hold what was decided
    reflected = _relaxed(previous, now, config.sizing.forecast_lag_h)
    if previous is not None and not restage and previous.sized_at is not None:
        dwelt = (now - previous.sized_at).total_seconds() >= config.stages.min_dwell_s
        moved_kg_per_h = abs(need - previous.need_kg_per_h)
        band = config.sizing.deadband_pct / 100.0 * max(previous.need_kg_per_h, need)
        effect_kg = moved_kg_per_h * (hours_left if hours_left is not None else math.inf)
        small = effect_kg <= config.sizing.min_effect_pct / 100.0 * (quota_kg or 0.0)
        if not dwelt or moved_kg_per_h <= band or small:
            return replace(previous, reflected_kg_per_h=reflected, updated_at=now)
    segments = _segments(node, stage, snapshot, config)
    if not segments and (previous is None or not previous.fills):
        return None if previous is None else replace(previous, reflected_kg_per_h=reflected, updated_at=now)
    fills: dict[str, float] = {}
    left = need
    for seg in segments:
        if left <= 0:
            break
        take = min(seg.kg_per_h, left)
        fills[seg.rule_id] = seg.index + take / seg.kg_per_h
        left -= take
    return SizingState(
        need_kg_per_h=need,
        committed_kg_per_h=need - max(0.0, left),
        reflected_kg_per_h=reflected,
        fills=fills,
        sized_at=now,
        updated_at=now,
    )


def _proposals(
    rule: RuleConfig,
    *,
    targets: Iterable[Target],
    node: NodeId,
    node_stage: int,
    snapshot: ControlSnapshot,
    config: ControlConfig,
) -> list[Proposal]:
    mode = config.mode(rule.node)
    needs_approval = rule.stage == MAX_STAGE or mode is NodeMode.APPROVE
    hold_until = snapshot.now + timedelta(seconds=rule.hold_s)
    return [
        Proposal(
            point=target.point,
            value=target.value,
            node=node,
            rule_id=rule.id,
            stage=rule.stage,
            priority=rule.priority,
            reason=f"{rule.id} (stage {rule.stage}, {node} at stage {node_stage}): {target.what}",
            hold_until=hold_until,
            needs_approval=needs_approval,
            advisory=mode is NodeMode.ADVISORY,
            expected_reduction_kw=rule.expected_reduction_kw,
        )
        for target in targets
    ]


# --------------------------------------------------------------------------------------------------
# Hourly signals


@dataclass(frozen=True, slots=True, kw_only=True)
class HourlySignals:
    """Intensity and tariffs for the snapshot, from ``now``'s hour on (slot 0 holds ``now``)."""

    intensity_kg_per_kwh: float | None
    intensity_hourly_kg_per_kwh: tuple[float, ...]
    tariff_hourly_cny_per_kwh: tuple[float, ...]
    node_tariff_hourly_cny_per_kwh: Mapping[str, tuple[float, ...]]


def hourly_signals(
    config: ControlConfig, now: datetime, factor_kg_per_kwh: float | None, *, hours: int = 24
) -> HourlySignals:
    """Return the intensity and tariff vectors of the next ``hours`` hours from the config.

    Intensity: the config's profile for the local month and hour, else the grid factor in force
    (``factor_kg_per_kwh``; None when unknown: then the hours without a profile are left out and
    the vector ends there). Tariffs: the config's periods (site and per node); empty without any.

    >>> from datetime import UTC, datetime
    >>> from control_engine.control_config import parse_control
    >>> cfg = parse_control({"timezone": "UTC", "intensity": {"hourly_kg_per_kwh": [0.6] * 12 + [0.3] * 12},
    ...     "tariffs": {"periods": [{"start_hour": 0, "end_hour": 8, "cny_per_kwh": 0.3},
    ...                             {"start_hour": 8, "end_hour": 24, "cny_per_kwh": 0.9}]}})
    >>> sig = hourly_signals(cfg, datetime(2026, 7, 1, 11, 30, tzinfo=UTC), 0.5366, hours=3)
    >>> sig.intensity_kg_per_kwh, sig.intensity_hourly_kg_per_kwh, sig.tariff_hourly_cny_per_kwh
    (0.6, (0.6, 0.3, 0.3), (0.9, 0.9, 0.9))
    >>> flat = hourly_signals(parse_control({}), datetime(2026, 7, 1, tzinfo=UTC), 0.5366, hours=2)
    >>> flat.intensity_hourly_kg_per_kwh, flat.tariff_hourly_cny_per_kwh
    ((0.5366, 0.5366), ())
    """
    zone = ZoneInfo(config.timezone)
    start = now.replace(minute=0, second=0, microsecond=0)
    local_hours = [(start + i * HOUR).astimezone(zone) for i in range(hours)]
    intensity: list[float] = []
    for local in local_hours:
        profiled = config.intensity.at(local.month, local.hour) if config.intensity is not None else None
        value = profiled if profiled is not None else factor_kg_per_kwh
        if value is None:
            break
        intensity.append(value)
    tariffs = config.tariffs
    site: tuple[float, ...] = ()
    by_node: dict[str, tuple[float, ...]] = {}
    if tariffs is not None:
        site = tuple(tariffs.price(local.hour) for local in local_hours)
        by_node = {
            node: tuple(tariffs.price(local.hour, node) for local in local_hours) for node in tariffs.nodes
        }
    return HourlySignals(
        intensity_kg_per_kwh=intensity[0] if intensity else factor_kg_per_kwh,
        intensity_hourly_kg_per_kwh=tuple(intensity),
        tariff_hourly_cny_per_kwh=site,
        node_tariff_hourly_cny_per_kwh=by_node,
    )
