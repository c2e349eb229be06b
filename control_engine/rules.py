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
  A node without a budget, or with one older than ``budget_max_age_s``, keeps its stage.
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
    SetpointRule,
    ShiftRule,
    StageBasis,
    StorageRule,
)
from control_engine.forecast import MonthForecast
from scada.model import DeviceId, NodeId, PointId, Priority, QualityCode

__all__ = [
    "EVALUATORS",
    "ControlSnapshot",
    "ControllerState",
    "Decision",
    "Evaluator",
    "Hold",
    "NodeBudget",
    "OperatorHold",
    "OperatorHoldKind",
    "PointState",
    "Proposal",
    "RuleContext",
    "RuleError",
    "RuleSkipped",
    "Skip",
    "StageChange",
    "StageState",
    "Target",
    "decide",
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
    """Energy price per hour, same slots as the intensity."""
    operator_holds: Mapping[str, OperatorHold] = field(default_factory=dict)
    """Manual overrides and lockouts, by device id."""

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise ValueError("snapshot now must be timezone-aware")

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
class ControllerState:
    """What the controller remembers between cycles; :func:`decide` returns the next one."""

    stages: Mapping[str, StageState] = field(default_factory=dict)
    holds: Mapping[str, Hold] = field(default_factory=dict)
    """By point id; kept by the dispatcher, read here for the value an offset applies to."""

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


def _storage(rule: RuleConfig, ctx: RuleContext) -> list[Target]:
    assert isinstance(rule, StorageRule)
    params = rule.parameters
    intensity = ctx.snapshot.intensity_kg_per_kwh
    if intensity is None or not math.isfinite(intensity):
        raise RuleSkipped("grid carbon intensity unknown")
    if intensity >= params.discharge_above_kg_per_kwh:
        power_kw = params.discharge_kw
        what = f"discharge {power_kw:g} kW at {intensity:.3f} kg/kWh"
    elif intensity <= params.charge_below_kg_per_kwh:
        power_kw = -params.charge_kw
        what = f"charge {params.charge_kw:g} kW at {intensity:.3f} kg/kWh"
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
    stages = dict(state.stages)
    transitions: list[StageChange] = []
    skipped: list[Skip] = []
    for node in _nodes(config, state):
        change, note = _step_stage(node, snapshot, config, state.stage_of(node))
        if change is not None:
            transitions.append(change)
            stages[node] = StageState(stage=change.to_stage, since=snapshot.now)
        if note is not None:
            skipped.append(Skip(rule_id="", node=NodeId(node), reason=note))
    next_state = replace(state, stages=stages)
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


def _check_finite(targets: Iterable[Target]) -> None:
    for target in targets:
        if not math.isfinite(target.value):
            raise ValueError(f"{target.point}: computed value is not finite ({target.value})")


def _nodes(config: ControlConfig, state: ControllerState) -> list[str]:
    """Return every node with rules or a stage, sorted (the order of transitions)."""
    return sorted({rule.node for rule in config.rules} | {n for n, s in state.stages.items() if s.stage})


def _configured_stages(config: ControlConfig, node: str) -> list[int]:
    return sorted({rule.stage for rule in config.rules if rule.node == node})


def _step_stage(
    node: str, snapshot: ControlSnapshot, config: ControlConfig, current: StageState
) -> tuple[StageChange | None, str | None]:
    """Return the node's stage change this cycle (if any) and a note when it cannot be judged."""
    budget = snapshot.budgets.get(node)
    if budget is None:
        return None, f"no budget for {node}: stage {current.stage} kept"
    age_s = (snapshot.now - budget.computed_at).total_seconds()
    if age_s > config.budget_max_age_s:
        return None, (
            f"budget of {node} is stale ({age_s:.0f} s old, limit {config.budget_max_age_s:g} s): "
            f"stage {current.stage} kept"
        )
    stages_cfg = config.stages
    share = budget.share_pct(stages_cfg.basis)
    dwelt = current.since is None or (snapshot.now - current.since).total_seconds() >= stages_cfg.min_dwell_s
    configured = _configured_stages(config, node)
    if share >= stages_cfg.enter_pct:
        higher = [s for s in configured if s > current.stage]
        if higher and dwelt:
            return StageChange(
                node=NodeId(node),
                from_stage=current.stage,
                to_stage=higher[0],
                share_pct=share,
                reason=f"forecast {share:.1f} % of quota >= {stages_cfg.enter_pct:g} %",
            ), None
    elif share < stages_cfg.exit_pct and current.stage > 0 and dwelt:
        lower = [s for s in configured if s < current.stage]
        return StageChange(
            node=NodeId(node),
            from_stage=current.stage,
            to_stage=lower[-1] if lower else 0,
            share_pct=share,
            reason=f"forecast {share:.1f} % of quota < {stages_cfg.exit_pct:g} %",
        ), None
    return None, None


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
