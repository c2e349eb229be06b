"""The ``control:`` section of a site file: stages, sizing, tariffs, rules, interlocks (docs/control.md).

Validated once, at the edge, into frozen pydantic models that :func:`control_engine.rules.decide`
and :class:`control_engine.interlocks.Interlocks` read. Two layers of checks:

- **Shape** (pydantic): types, ranges, one rule kind's parameters, ``exit_pct < enter_pct``,
  curtailment only in stage 4, a rule's targets free of duplicates...
- **Cross references** (:func:`parse_control` with the site's known ids): every point a rule or an
  interlock names exists, targets are writable, carry interlocks and are not critical loads, rule
  nodes exist, rule ids are unique.

Every error names the field the way the user wrote it, list items by their ``id``::

    plant.yaml: control.rules[2] (dim-office).targets[0]: unknown point 'a-office.dim_pct'
"""

from __future__ import annotations

import enum
import zoneinfo
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scada.model import ID_PATTERN, ConfigError, Priority, split_point_id

__all__ = [
    "MAX_STAGE",
    "ComfortBand",
    "ControlConfig",
    "CurtailParameters",
    "CurtailRule",
    "HeartbeatConfig",
    "IntensityProfile",
    "NodeControl",
    "NodeMode",
    "OnOffTimes",
    "PointInterlock",
    "RuleConfig",
    "RuleKind",
    "SetpointParameters",
    "SetpointRule",
    "ShiftParameters",
    "ShiftRule",
    "SizingConfig",
    "SizingStep",
    "SocWindow",
    "StageBasis",
    "StagesConfig",
    "StorageParameters",
    "StorageRule",
    "TariffPeriod",
    "TariffsConfig",
    "parse_control",
]

MAX_STAGE = 4
"""Stages run 1 (non-critical loads) to 4 (production curtailment, always approve-first)."""

Id = Annotated[str, Field(pattern=rf"^{ID_PATTERN}$")]
PointRef = Annotated[str, Field(pattern=rf"^{ID_PATTERN}\.{ID_PATTERN}$")]
"""A point id, ``<device>.<key>``."""
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeMode(enum.StrEnum):
    """How far the controller may act on a node by itself."""

    AUTO = "auto"
    """Proposals of stages 1-3 are dispatched without asking; stage 4 still waits for approval."""
    APPROVE = "approve"
    """Every proposal waits for an operator's approval (approve-first)."""
    ADVISORY = "advisory"
    """Proposals are shown, never sent."""


class StageBasis(enum.StrEnum):
    """Which month-end figure is compared with the quota to escalate."""

    FORECAST = "forecast"
    """The central forecast."""
    FORECAST_HIGH = "forecast_high"
    """The upper bound of the prediction interval: acts earlier, on the risk of a breach."""


class RuleKind(enum.StrEnum):
    """What a rule does; each kind has its own parameters."""

    SETPOINT = "setpoint"
    STORAGE = "storage"
    SHIFT = "shift"
    CURTAIL = "curtail"


class NodeControl(_Frozen):
    """Control settings of one node of the hierarchy."""

    mode: NodeMode = NodeMode.ADVISORY


class StagesConfig(_Frozen):
    """Escalation thresholds, hysteresis and dwell (shared by every node)."""

    enter_pct: Annotated[float, Field(gt=0, le=1000)] = 100.0
    """Escalate one stage when the forecast reaches this share of the quota."""
    exit_pct: Annotated[float, Field(gt=0, le=1000)] = 97.0
    """De-escalate one stage when the forecast falls below this share (must be below enter_pct)."""
    min_dwell_s: Annotated[float, Field(ge=0, le=7 * 86_400)] = 1800.0
    """A node stays at least this long in a stage before moving again, up or down."""
    basis: StageBasis = StageBasis.FORECAST

    @model_validator(mode="after")
    def _hysteresis(self) -> Self:
        if self.exit_pct >= self.enter_pct:
            raise ValueError(
                f"exit_pct ({self.exit_pct:g}) must be below enter_pct ({self.enter_pct:g}): "
                "without hysteresis a forecast at the threshold would flip stages every cycle"
            )
        return self


def _priority(value: Any) -> Any:
    """Accept a priority by name (``optimiser``) as well as by number (30)."""
    if isinstance(value, str) and not value.isdigit():
        try:
            return Priority[value.upper()]
        except KeyError:
            names = ", ".join(p.name.lower() for p in Priority)
            raise ValueError(f"unknown priority {value!r} (known: {names})") from None
    return value


class SizingStep(_Frozen):
    """One step of a gap-sized measure: how deep, what it avoids and what it costs while in force.

    Steps are incremental: ``reduction_*`` and ``cost_cny_per_h`` are what this step adds to the
    steps before it. The controller fills steps cheapest first (cost per tCO2e avoided, across every
    sized rule of the node's active stages) until the forecast gap is covered; the last step it
    needs is filled in part and the value interpolated linearly between this step and the one before
    (the displaced value before the first step).
    """

    value: Finite | None = None
    offset: Finite | None = None
    reduction_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Grid power avoided (kW): CO2e by the intensity forecast, money saved by the tariff."""
    reduction_kg_per_h: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """CO2e avoided directly (kg/h), e.g. Scope 1 gas not burnt."""
    cost_cny_per_h: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """What the step costs while in force (comfort, production, wear), before tariff savings."""

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.value is None) == (self.offset is None):
            raise ValueError("give exactly one of value (absolute) or offset (relative)")
        if self.reduction_kw <= 0 and self.reduction_kg_per_h <= 0:
            raise ValueError("a step must avoid something: give reduction_kw or reduction_kg_per_h > 0")
        return self


class SetpointParameters(_Frozen):
    """Write ``value``, add ``offset`` to the displaced setpoint, or size the move along ``steps``."""

    value: Finite | None = None
    offset: Finite | None = None
    steps: tuple[SizingStep, ...] = ()
    """Gap-sized: from the mildest step to the deepest (all absolute or all offsets)."""
    resolution: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Round a gap-sized value to a multiple of this (a register's step); None: not rounded."""

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        given = sum(
            1 for present in (self.value is not None, self.offset is not None, bool(self.steps)) if present
        )
        if given != 1:
            raise ValueError("give exactly one of value (absolute), offset (relative) or steps (gap-sized)")
        if self.steps and len({step.value is None for step in self.steps}) > 1:
            raise ValueError("steps must be all absolute (value) or all relative (offset)")
        return self


class CurtailParameters(SetpointParameters):
    """Curtail production: a value or an offset on a limit (firing rate, line power limit)."""


class StorageParameters(_Frozen):
    """Battery power by grid carbon intensity: discharge when dirty, charge when clean, else idle.

    Signs follow the battery points: + discharge, - charge (kW).
    """

    discharge_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    charge_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    """Magnitude of the charging power; proposed as a negative setpoint."""
    discharge_above_kg_per_kwh: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    charge_below_kg_per_kwh: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    mode_point: PointRef | None = None
    """A battery mode point to set with the power (the example battery: 1 = follow setpoint)."""
    mode_value: Finite = 1.0
    hysteresis_kg_per_kwh: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Deadband: a discharge goes on until the intensity falls this far below
    ``discharge_above_kg_per_kwh``, a charge until it rises this far above ``charge_below_kg_per_kwh``."""
    min_spread_kg_per_kwh: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Start a discharge (charge) only when the intensity now is at least this much above (below) the
    cleanest (dirtiest) hour of the next ``spread_horizon_h`` hours: a cycle must pay for its losses."""
    min_spread_cny_per_kwh: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    """Alternatively (either spread suffices), the same on the tariff; None: the price is not used."""
    spread_horizon_h: Annotated[int, Field(ge=1, le=48)] = 12

    @model_validator(mode="after")
    def _thresholds(self) -> Self:
        if self.charge_below_kg_per_kwh >= self.discharge_above_kg_per_kwh:
            raise ValueError(
                "charge_below_kg_per_kwh must be below discharge_above_kg_per_kwh "
                "(the battery would charge and discharge at the same intensity)"
            )
        gap = self.discharge_above_kg_per_kwh - self.charge_below_kg_per_kwh
        if 2 * self.hysteresis_kg_per_kwh >= gap:
            raise ValueError(
                f"hysteresis_kg_per_kwh ({self.hysteresis_kg_per_kwh:g}) must be below half the gap "
                f"between the charge and discharge thresholds ({gap:g}): the deadbands would overlap"
            )
        return self


class ShiftParameters(_Frozen):
    """Delay a flexible job to the lowest-intensity window of the next ``horizon_h`` hours."""

    start_point: PointRef
    """The job's next planned start, local hour of day (the paint line's ``next_job_start_hour``),
    which already includes the delay in force; -1 when no job is pending."""
    running_point: PointRef | None = None
    """1 while a job runs: a running job is never moved."""
    duration_h: Annotated[float, Field(gt=0, le=24)]
    horizon_h: Annotated[float, Field(gt=0, le=48)] = 12.0
    max_delay_min: Annotated[float, Field(ge=0, le=1440)] = 480.0
    step_min: Annotated[float, Field(ge=1, le=240)] = 15.0
    """Candidate starts are this far apart."""
    min_gain_pct: Annotated[float, Field(ge=0, le=100)] = 5.0
    """Move the job only if the window's mean intensity is at least this much lower (else delay 0)."""


class _RuleBase(_Frozen):
    id: Id
    stage: Annotated[int, Field(ge=1, le=MAX_STAGE)]
    node: Id
    """The node whose budget escalates this rule's stage."""
    targets: Annotated[tuple[PointRef, ...], Field(min_length=1)]
    priority: Priority = Priority.OPTIMISER
    hold_s: Annotated[float, Field(gt=0, le=86_400)] = 900.0
    """How long a proposal holds before the dispatcher reverts it (renewed while the rule proposes)."""
    expected_reduction_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """What the rule is expected to save while active, for planning (not a measurement)."""

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_name(cls, value: Any) -> Any:
        return _priority(value)

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for target in targets:
            if target in seen:
                raise ValueError(f"point {target!r} listed twice")
            seen.add(target)
        return targets


class SetpointRule(_RuleBase):
    """Stage 1 style: dim lights, raise chilled-water setpoints, lift a PV limit..."""

    kind: Literal["setpoint"] = "setpoint"
    parameters: SetpointParameters


class StorageRule(_RuleBase):
    """Stage 2 style: battery power setpoints by carbon intensity."""

    kind: Literal["storage"] = "storage"
    parameters: StorageParameters


class ShiftRule(_RuleBase):
    """Stage 3 style: move a flexible job's start into low-carbon hours."""

    kind: Literal["shift"] = "shift"
    parameters: ShiftParameters

    @field_validator("targets")
    @classmethod
    def _one_job(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        if len(targets) != 1:
            raise ValueError("a shift rule moves one job: give exactly one target (its delay setpoint)")
        return targets


class CurtailRule(_RuleBase):
    """Stage 4: production curtailment, always approve-first."""

    kind: Literal["curtail"] = "curtail"
    parameters: CurtailParameters

    @field_validator("stage")
    @classmethod
    def _stage_four(cls, stage: int) -> int:
        if stage != MAX_STAGE:
            raise ValueError(f"curtail rules belong to stage {MAX_STAGE} (approve-first), not {stage}")
        return stage


RuleConfig = Annotated[SetpointRule | StorageRule | ShiftRule | CurtailRule, Field(discriminator="kind")]
"""Any rule, told apart by ``kind``."""


class SizingConfig(_Frozen):
    """How gap-sized rules (rules with ``steps``) size their action (docs/control.md)."""

    target_pct: Annotated[float, Field(gt=0, le=100)] = 99.0
    """Aim the month-end forecast at this share of the quota (a margin for forecast error)."""
    forecast_lag_h: Annotated[float, Field(gt=0, le=24 * 31)] = 72.0
    """Time constant with which the forecast comes to reflect a reduction in force (it learns the
    controlled hours): the part of the reduction not reflected yet is still counted as in force."""
    deadband_pct: Annotated[float, Field(ge=0, le=100)] = 5.0
    """Re-size (after ``stages.min_dwell_s``) only when the need moved by more than this share."""
    min_effect_pct: Annotated[float, Field(ge=0, le=100)] = 0.1
    """... and by enough to move the month-end total by this share of the quota: in the month's last
    hours a large change of rate changes little, and re-sizing on forecast noise only flips setpoints."""


HOURS_PER_DAY = 24


class TariffPeriod(_Frozen):
    """An energy price over local hours ``[start_hour, end_hour)``."""

    start_hour: Annotated[int, Field(ge=0, le=23)]
    end_hour: Annotated[int, Field(ge=1, le=24)]
    cny_per_kwh: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    name: str = ""

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.end_hour <= self.start_hour:
            raise ValueError(f"end_hour ({self.end_hour}) must be after start_hour ({self.start_hour})")
        return self


TariffPeriods = Annotated[tuple[TariffPeriod, ...], Field(min_length=1)]


def _check_day(periods: tuple[TariffPeriod, ...]) -> tuple[TariffPeriod, ...]:
    """Every local hour has exactly one price."""
    owner: list[int | None] = [None] * HOURS_PER_DAY
    for index, period in enumerate(periods):
        for hour in range(period.start_hour, period.end_hour):
            if owner[hour] is not None:
                raise ValueError(f"periods [{owner[hour]}] and [{index}] overlap at hour {hour}")
            owner[hour] = index
    missing = [hour for hour, who in enumerate(owner) if who is None]
    if missing:
        raise ValueError(f"hours {_ranges(missing)} have no price: the periods must cover 0-24")
    return periods


def _ranges(hours: list[int]) -> str:
    """Return ``[1, 2, 3, 7]`` as ``1-4, 7-8`` (end exclusive, like the periods)."""
    out: list[str] = []
    start = prev = hours[0]
    for hour in [*hours[1:], None]:
        if hour is not None and hour == prev + 1:
            prev = hour
            continue
        out.append(f"{start}-{prev + 1}")
        if hour is not None:
            start = prev = hour
    return ", ".join(out)


class TariffsConfig(_Frozen):
    """Time-of-use energy prices in the control time zone: site-wide, and per node where they differ."""

    periods: TariffPeriods
    nodes: Mapping[Id, TariffPeriods] = Field(default_factory=dict)

    @field_validator("periods")
    @classmethod
    def _site_day(cls, periods: tuple[TariffPeriod, ...]) -> tuple[TariffPeriod, ...]:
        return _check_day(periods)

    def price(self, local_hour: int, node: str | None = None) -> float:
        """Return the price of a local hour (a node's own table when it has one)."""
        periods = self.nodes.get(node, self.periods) if node is not None else self.periods
        for period in periods:
            if period.start_hour <= local_hour < period.end_hour:
                return period.cny_per_kwh
        raise ValueError(f"no price for hour {local_hour}")  # unreachable: validated to cover the day


Hourly = Annotated[
    tuple[Annotated[float, Field(ge=0, allow_inf_nan=False)], ...],
    Field(min_length=HOURS_PER_DAY, max_length=HOURS_PER_DAY),
]
"""24 values, one per local hour 0-23."""


class IntensityProfile(_Frozen):
    """Expected grid carbon intensity by local hour (kgCO2/kWh); hours without one use the factor."""

    hourly_kg_per_kwh: Hourly | None = None
    """One profile for every month."""
    monthly_kg_per_kwh: Mapping[Annotated[int, Field(ge=1, le=12)], Hourly] = Field(default_factory=dict)
    """Per calendar month (1-12), before ``hourly_kg_per_kwh``."""

    def at(self, local_month: int, local_hour: int) -> float | None:
        """Return the profile's intensity at a local month and hour, or None when it has none."""
        month = self.monthly_kg_per_kwh.get(local_month)
        if month is not None:
            return month[local_hour]
        if self.hourly_kg_per_kwh is not None:
            return self.hourly_kg_per_kwh[local_hour]
        return None


class OnOffTimes(_Frozen):
    """Minimum on and off times of an on/off point (value >= 0.5 is on)."""

    min_on_s: Annotated[float, Field(ge=0, le=86_400)] = 0.0
    min_off_s: Annotated[float, Field(ge=0, le=86_400)] = 0.0


class SocWindow(_Frozen):
    """A battery power setpoint (+ discharge) may not discharge below min_pct nor charge above max_pct."""

    point: PointRef
    """The battery's state-of-charge point (%)."""
    min_pct: Annotated[float, Field(ge=0, le=100)] = 10.0
    max_pct: Annotated[float, Field(ge=0, le=100)] = 95.0

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.min_pct >= self.max_pct:
            raise ValueError(f"min_pct ({self.min_pct:g}) must be below max_pct ({self.max_pct:g})")
        return self


class ComfortBand(_Frozen):
    """A measured comfort value the setpoint moves; outside its band, no move that makes it worse."""

    point: PointRef
    """The measured value (office temperature, chilled-water supply temperature)."""
    min: Finite
    max: Finite
    rises_with_setpoint: bool = True
    """True when raising the setpoint raises the measured value (a cooling supply temperature)."""

    @model_validator(mode="after")
    def _band(self) -> Self:
        if self.min >= self.max:
            raise ValueError(f"min ({self.min:g}) must be below max ({self.max:g})")
        return self


class PointInterlock(_Frozen):
    """What the dispatcher may write to one point, whoever asks."""

    min: Finite | None = None
    max: Finite | None = None
    max_ramp_per_min: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Largest change per minute, in the point's unit, from the last commanded value."""
    on_off: OnOffTimes | None = None
    soc: SocWindow | None = None
    comfort: tuple[ComfortBand, ...] = ()

    @model_validator(mode="after")
    def _limits(self) -> Self:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) must not exceed max ({self.max:g})")
        return self


class HeartbeatConfig(_Frozen):
    """A watchdog the leader writes an increasing counter to; a device that sees it stop falls back.

    PLC and EMS logic compares the value with the one ``period_s`` ago: when it stops changing (the
    server, the network or the leader is gone), the device returns to its local control.
    """

    points: Annotated[tuple[PointRef, ...], Field(min_length=1)]
    period_s: Annotated[float, Field(ge=1, le=3600)] = 10.0


class ControlConfig(_Frozen):
    """The validated ``control:`` section."""

    timezone: str = "Asia/Shanghai"
    """Zone of the local hours job points speak in."""
    default_mode: NodeMode = NodeMode.ADVISORY
    """Mode of nodes not listed under ``nodes``: advisory, so nothing is sent until someone says so."""
    max_age_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    """A point value older than this is stale (unless its state carries its own limit)."""
    budget_max_age_s: Annotated[float, Field(gt=0, le=86_400)] = 900.0
    """A node budget (forecast) older than this is not acted on."""
    rule_time_budget_ms: Annotated[float, Field(gt=0, le=10_000)] = 50.0
    """A rule taking longer than this per cycle is isolated: its output is dropped and reported."""
    stages: StagesConfig = StagesConfig()
    sizing: SizingConfig = SizingConfig()
    tariffs: TariffsConfig | None = None
    intensity: IntensityProfile | None = None
    nodes: Mapping[Id, NodeControl] = Field(default_factory=dict)
    rules: tuple[RuleConfig, ...] = ()
    interlocks: Mapping[PointRef, PointInterlock] = Field(default_factory=dict)
    critical: tuple[Annotated[str, Field(pattern=rf"^{ID_PATTERN}(\.{ID_PATTERN})?$")], ...] = ()
    """Critical loads: device ids or point ids never written by the dispatcher."""
    heartbeat: HeartbeatConfig | None = None
    """Watchdog points the control leader beats, so devices can fall back when it is gone."""

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    def mode(self, node: str) -> NodeMode:
        """Return a node's mode (``default_mode`` when it is not listed)."""
        entry = self.nodes.get(node)
        return self.default_mode if entry is None else entry.mode

    def is_critical(self, point: str) -> bool:
        """Return True when the point or its device is listed as critical."""
        device, _key = split_point_id(point)
        return point in self.critical or device in self.critical


def parse_control(
    raw: Any,
    *,
    source: str = "site file",
    known_points: Collection[str] | None = None,
    writable_points: Collection[str] | None = None,
    known_nodes: Collection[str] | None = None,
    known_devices: Collection[str] | None = None,
) -> ControlConfig:
    """Validate a ``control:`` section; raise :class:`ConfigError` naming the bad field.

    The ``known_*`` sets come from the site (its points, writable points, nodes, devices); a set
    left out is not checked.

    >>> parse_control({"rules": [{"id": "r", "stage": 1, "node": "n", "kind": "setpoint",
    ...     "targets": ["d.p"], "parameters": {"value": 5}}]}, known_points={"d.q"})
    Traceback (most recent call last):
    ...
    scada.model.ConfigError: site file: control.rules[0] (r).targets[0]: unknown point 'd.p'
    """
    raw = {} if raw is None else raw
    document = {"control": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: control: expected a mapping")
    try:
        config = ControlConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = _without_tags(tuple(first["loc"]))
        raise ConfigError.at(source, ("control", *loc), document, first["msg"]) from None
    known = _Known(known_points, writable_points, known_nodes, known_devices)
    for loc, message in _problems(config, known):
        raise ConfigError.at(source, ("control", *loc), document, message)
    return config


def _without_tags(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Drop the rule kind pydantic puts after a rule's index: users did not write it there."""
    kinds = {kind.value for kind in RuleKind}
    return tuple(
        item for index, item in enumerate(loc) if not (index == 2 and loc[0] == "rules" and item in kinds)
    )


_Problem = tuple[tuple[str | int, ...], str]


@dataclass(frozen=True, slots=True)
class _Known:
    """The site's ids to check references against; None: not checked."""

    points: Collection[str] | None
    writable: Collection[str] | None
    nodes: Collection[str] | None
    devices: Collection[str] | None


def _problems(config: ControlConfig, known: _Known) -> Iterator[_Problem]:
    """Yield every reference that does not resolve, as (location, message), in file order."""
    for node in config.nodes:
        if known.nodes is not None and node not in known.nodes:
            yield ("nodes", node), f"unknown node {node!r}"
    if config.tariffs is not None:
        yield from _tariff_problems(config.tariffs, known.nodes)
    for index, entry in enumerate(config.critical):
        if "." in entry:
            if known.points is not None and entry not in known.points:
                yield ("critical", index), f"unknown point {entry!r}"
        elif known.devices is not None and entry not in known.devices:
            yield ("critical", index), f"unknown device {entry!r}"
    for point, interlock in config.interlocks.items():
        yield from _interlock_problems(point, interlock, known.points)
    if config.heartbeat is not None:
        yield from _heartbeat_problems(config.heartbeat, known)
    seen: set[str] = set()
    for index, rule in enumerate(config.rules):
        if rule.id in seen:
            yield ("rules", index, "id"), f"duplicate rule id {rule.id!r}"
        seen.add(rule.id)
        yield from _rule_problems(config, ("rules", index), rule, known)


def _heartbeat_problems(heartbeat: HeartbeatConfig, known: _Known) -> Iterator[_Problem]:
    for index, point in enumerate(heartbeat.points):
        if known.points is not None and point not in known.points:
            yield ("heartbeat", "points", index), f"unknown point {point!r}"
        elif known.writable is not None and point not in known.writable:
            yield ("heartbeat", "points", index), f"point {point!r} is not writable"


def _tariff_problems(tariffs: TariffsConfig, known_nodes: Collection[str] | None) -> Iterator[_Problem]:
    for node, periods in tariffs.nodes.items():
        if known_nodes is not None and node not in known_nodes:
            yield ("tariffs", "nodes", node), f"unknown node {node!r}"
        try:
            _check_day(periods)
        except ValueError as err:
            yield ("tariffs", "nodes", node), str(err)


def _rule_problems(
    config: ControlConfig, where: tuple[str | int, ...], rule: RuleConfig, known: _Known
) -> Iterator[_Problem]:
    if known.nodes is not None and rule.node not in known.nodes:
        yield (*where, "node"), f"unknown node {rule.node!r}"
    for t_index, target in enumerate(rule.targets):
        problem = _check_target(config, target, known)
        if problem is not None:
            yield (*where, "targets", t_index), problem
    for name, point in _input_points(rule):
        if known.points is not None and point not in known.points:
            yield (*where, "parameters", name), f"unknown point {point!r}"
    if isinstance(rule, StorageRule) and rule.parameters.mode_point is not None:
        problem = _check_target(config, rule.parameters.mode_point, known)
        if problem is not None:
            yield (*where, "parameters", "mode_point"), problem


def _interlock_problems(
    point: str, interlock: PointInterlock, known_points: Collection[str] | None
) -> Iterator[_Problem]:
    if known_points is None:
        return
    if point not in known_points:
        yield ("interlocks", point), f"unknown point {point!r}"
    if interlock.soc is not None and interlock.soc.point not in known_points:
        yield ("interlocks", point, "soc", "point"), f"unknown point {interlock.soc.point!r}"
    for b_index, band in enumerate(interlock.comfort):
        if band.point not in known_points:
            yield ("interlocks", point, "comfort", b_index, "point"), f"unknown point {band.point!r}"


def _check_target(config: ControlConfig, target: str, known: _Known) -> str | None:
    if known.points is not None and target not in known.points:
        return f"unknown point {target!r}"
    if known.writable is not None and target not in known.writable:
        return f"point {target!r} is not writable"
    if config.is_critical(target):
        return f"point {target!r} is a critical load: the controller never writes it"
    if target not in config.interlocks:
        return f"point {target!r} has no interlocks: add control.interlocks.{target} (at least min/max)"
    return None


def _input_points(rule: RuleConfig) -> list[tuple[str, str]]:
    """Return (parameter name, point id) of the points a rule reads besides its targets."""
    if isinstance(rule, ShiftRule):
        params = rule.parameters
        found = [("start_point", params.start_point)]
        if params.running_point is not None:
            found.append(("running_point", params.running_point))
        return found
    return []
