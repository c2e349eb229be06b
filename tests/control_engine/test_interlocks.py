"""Interlocks: limits, ramps, on/off times, SOC, comfort, critical loads, overrides and lockouts,
priority merge; and a property: no sequence of proposals and operator actions breaks them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_engine.control_config import parse_control
from control_engine.interlocks import CommandHistory, Interlocks
from control_engine.rules import (
    ControlSnapshot,
    OperatorHold,
    OperatorHoldKind,
    PointState,
    Proposal,
)
from scada.model import DeviceId, NodeId, PointId, Priority, QualityCode

NOW = datetime(2026, 3, 9, 2, 0, tzinfo=UTC)
DIM = "a-assembly-lighting.dim_level_pct"
CHILLER = "a-chiller-2.supply_temp_setpoint_degc"
OFFICE = "a-office-meter.room_temp_degc"
BATTERY = "a-battery-1.power_setpoint_kw"
SOC = "a-battery-1.soc_pct"
BURNER = "b-steam-boiler.enabled"
CRITICAL = "a-compressor-4.pressure_setpoint_bar"
FREE = "b-carport-pv-1.power_limit_pct"  # writable, but no interlocks configured

CONFIG = parse_control(
    {
        "critical": ["a-compressor-4"],
        "interlocks": {
            DIM: {"min": 30, "max": 100, "max_ramp_per_min": 20},
            CHILLER: {
                "min": 6,
                "max": 12,
                "max_ramp_per_min": 0.5,
                "comfort": [{"point": OFFICE, "min": 20, "max": 26, "rises_with_setpoint": True}],
            },
            BATTERY: {
                "min": -250,
                "max": 250,
                "max_ramp_per_min": 100,
                "soc": {"point": SOC, "min_pct": 15, "max_pct": 90},
            },
            BURNER: {"min": 0, "max": 1, "on_off": {"min_on_s": 600, "min_off_s": 300}},
            CRITICAL: {"min": 4, "max": 10},
        },
    }
)
INTERLOCKS = Interlocks(CONFIG)
WRITABLE = {DIM, CHILLER, BATTERY, BURNER, CRITICAL, FREE}


def state(
    point: str,
    value: float | None,
    *,
    age_s: float = 1.0,
    quality: QualityCode = QualityCode.GOOD,
    now: datetime = NOW,
    changed_at: datetime | None = None,
) -> PointState:
    return PointState(
        point=PointId(point),
        value=value,
        quality=quality,
        ts=now - timedelta(seconds=age_s),
        writable=point in WRITABLE,
        changed_at=changed_at,
    )


def world(now: datetime = NOW, **values: Any) -> dict[str, PointState]:
    base: dict[str, Any] = {
        DIM: 100.0,
        CHILLER: 7.0,
        OFFICE: 24.0,
        BATTERY: 0.0,
        SOC: 60.0,
        BURNER: 1.0,
        CRITICAL: 7.0,
        FREE: 80.0,
    }
    base.update({k.replace("__", "."): v for k, v in values.items()})
    return {
        p: v if isinstance(v, PointState) else state(p, v, now=now, changed_at=now - timedelta(hours=1))
        for p, v in base.items()
    }


def snap(
    pts: dict[str, PointState] | None = None,
    *,
    holds: dict[str, OperatorHold] | None = None,
    now: datetime = NOW,
) -> ControlSnapshot:
    return ControlSnapshot(now=now, points=world(now) if pts is None else pts, operator_holds=holds or {})


def proposal(
    point: str, value: float, *, priority: Priority = Priority.OPTIMISER, stage: int = 1, rule_id: str = "r"
) -> Proposal:
    return Proposal(
        point=PointId(point),
        value=value,
        node=NodeId("ent-a"),
        rule_id=rule_id,
        stage=stage,
        priority=priority,
        reason="test",
        hold_until=NOW + timedelta(minutes=15),
        needs_approval=False,
        advisory=False,
    )


HISTORY = CommandHistory().record(DIM, 90.0, NOW - timedelta(seconds=30))  # 30 s ago: 10 %/min of room


@pytest.mark.parametrize(
    ("point", "value", "pts", "history", "expected", "why"),
    [
        # limits (no history: the current value is the reference, one minute of ramp)
        (CHILLER, 7.3, {}, CommandHistory(), 7.3, None),
        (CHILLER, 5.0, {CHILLER: 6.2}, CommandHistory(), 6.0, "limited to min 6"),
        (CHILLER, 13.0, {CHILLER: 11.8}, CommandHistory(), 12.0, "limited to max 12"),
        # ramp: from the current value, or from the last command and its age
        (DIM, 50.0, {}, CommandHistory(), 80.0, "ramp 20/min from 100"),
        (DIM, 50.0, {}, HISTORY, 80.0, "ramp 20/min from 90"),
        (DIM, 50.0, {}, CommandHistory().record(DIM, 90.0, NOW - timedelta(minutes=5)), 50.0, None),
        # a reference outside the limits (set by hand) is pulled inside at once
        (DIM, 20.0, {DIM: 25.0}, CommandHistory(), 30.0, "limited to min 30"),
        # SOC window, + discharge
        (BATTERY, 80.0, {SOC: 15.0}, CommandHistory(), None, "no discharge"),
        (BATTERY, -80.0, {SOC: 15.0}, CommandHistory(), -80.0, None),
        (BATTERY, -80.0, {SOC: 91.0}, CommandHistory(), None, "no charge"),
        (BATTERY, 80.0, {SOC: 91.0}, CommandHistory(), 80.0, None),
        (
            BATTERY,
            80.0,
            {SOC: state(SOC, 60.0, age_s=120)},
            CommandHistory(),
            None,
            "state of charge unknown",
        ),
        (
            BATTERY,
            80.0,
            {SOC: state(SOC, None, quality=QualityCode.BAD)},
            CommandHistory(),
            None,
            "bad quality",
        ),
        # SOC beats the ramp: stopping a discharge at the floor is immediate
        (
            BATTERY,
            150.0,
            {SOC: 14.0},
            CommandHistory().record(BATTERY, 150.0, NOW - timedelta(seconds=10)),
            None,
            "no discharge",
        ),
        # comfort: the office is too warm, so the chilled-water setpoint may not rise (it may fall)
        (CHILLER, 7.5, {OFFICE: 26.5}, CommandHistory(), None, "above 26"),
        (CHILLER, 6.5, {OFFICE: 26.5}, CommandHistory(), 6.5, None),
        (CHILLER, 6.5, {OFFICE: 19.0}, CommandHistory(), None, "below 20"),
        (CHILLER, 7.5, {OFFICE: state(OFFICE, 24.0, age_s=600)}, CommandHistory(), None, "comfort"),
        # minimum on/off times
        (
            BURNER,
            0.0,
            {BURNER: state(BURNER, 1.0, changed_at=NOW - timedelta(seconds=100))},
            CommandHistory(),
            "refused",
            "minimum on time 600",
        ),
        (
            BURNER,
            0.0,
            {BURNER: state(BURNER, 1.0, changed_at=NOW - timedelta(seconds=700))},
            CommandHistory(),
            0.0,
            None,
        ),
        (
            BURNER,
            1.0,
            {BURNER: state(BURNER, 0.0, changed_at=NOW - timedelta(seconds=200))},
            CommandHistory(),
            "refused",
            "minimum off time 300",
        ),
        (
            BURNER,
            0.7,
            {BURNER: state(BURNER, 1.0, changed_at=NOW - timedelta(seconds=10))},
            CommandHistory(),
            1.0,
            None,
        ),
        (
            BURNER,
            0.0,
            {BURNER: state(BURNER, 1.0)},
            CommandHistory(),
            "refused",
            "time in the current state unknown",
        ),
        (
            BURNER,
            0.0,
            {BURNER: state(BURNER, 1.0)},
            CommandHistory().record(BURNER, 1.0, NOW - timedelta(seconds=60)),
            "refused",
            "on for 60 s",
        ),
        # never written
        (CRITICAL, 8.0, {}, CommandHistory(), "refused", "critical load"),
        (FREE, 100.0, {}, CommandHistory(), "refused", "no interlocks configured"),
        (CHILLER, float("inf"), {}, CommandHistory(), "refused", "not a finite number"),
        (
            CHILLER,
            7.5,
            {CHILLER: state(CHILLER, 7.0, age_s=300)},
            CommandHistory(),
            "refused",
            "no reference value",
        ),
    ],
)
def test_clamp(
    point: str,
    value: float,
    pts: dict[str, Any],
    history: CommandHistory,
    expected: float | str | None,
    why: str | None,
) -> None:
    points = world(**{k.replace(".", "__"): v for k, v in pts.items()})
    clamped = INTERLOCKS.clamp(proposal(point, value), snap(points), history)
    if expected == "refused":
        assert clamped.refused
        assert clamped.value is None
    elif expected is None:  # held where it is (comfort) or stopped (SOC: the battery stands at 0 kW)
        assert not clamped.refused
        assert clamped.value == pytest.approx(points[point].value)
    else:
        assert not clamped.refused
        assert clamped.value == pytest.approx(expected)
    if why is None:
        assert all("limited" not in r and "ramp" not in r for r in clamped.reasons)
    else:
        assert any(why in r for r in clamped.reasons), clamped.reasons


@pytest.mark.parametrize(
    ("kind", "priority", "refused", "why"),
    [
        (OperatorHoldKind.LOCKOUT, Priority.SAFETY, True, "locked out by wang.li"),
        (OperatorHoldKind.LOCKOUT, Priority.OPERATOR, True, "locked out"),
        (OperatorHoldKind.OVERRIDE, Priority.OPTIMISER, True, "manual override by wang.li"),
        (OperatorHoldKind.OVERRIDE, Priority.SCHEDULE, True, "manual override"),
        (OperatorHoldKind.OVERRIDE, Priority.OPERATOR, False, None),
        (OperatorHoldKind.OVERRIDE, Priority.SAFETY, False, None),
    ],
)
def test_overrides_and_lockouts(
    kind: OperatorHoldKind, priority: Priority, refused: bool, why: str | None
) -> None:
    hold = OperatorHold(
        device=DeviceId("a-chiller-2"), kind=kind, by="wang.li", until=NOW + timedelta(hours=2)
    )
    clamped = INTERLOCKS.clamp(
        proposal(CHILLER, 7.2, priority=priority), snap(holds={"a-chiller-2": hold}), CommandHistory()
    )
    assert clamped.refused is refused
    if why is not None:
        assert any(why in r for r in clamped.reasons)
    expired = replace(hold, until=NOW - timedelta(seconds=1))
    assert not INTERLOCKS.clamp(
        proposal(CHILLER, 7.2, priority=priority), snap(holds={"a-chiller-2": expired}), CommandHistory()
    ).refused


def test_merge_lowest_priority_number_wins_then_stage_then_rule_id() -> None:
    proposals = [
        proposal(CHILLER, 8.0, priority=Priority.OPTIMISER, stage=1, rule_id="a"),
        proposal(CHILLER, 6.8, priority=Priority.OPERATOR, stage=4, rule_id="z"),
        proposal(DIM, 60.0, priority=Priority.OPTIMISER, stage=2, rule_id="a"),
        proposal(DIM, 90.0, priority=Priority.OPTIMISER, stage=1, rule_id="b"),
        proposal(BATTERY, 50.0, priority=Priority.SCHEDULE, stage=2, rule_id="b"),
        proposal(BATTERY, 20.0, priority=Priority.SCHEDULE, stage=2, rule_id="a"),
    ]
    dispatches = INTERLOCKS.merge_and_clamp(proposals, snap(), CommandHistory())
    assert [(d.point, d.proposal.rule_id, d.clamped.value, len(d.superseded)) for d in dispatches] == [
        (DIM, "b", 90.0, 1),  # same priority: stage 1 beats stage 2
        (BATTERY, "a", 20.0, 1),  # same priority and stage: rule id
        (CHILLER, "z", 6.8, 1),  # OPERATOR beats OPTIMISER whatever the stage
    ]


# ------------------------------------------------------------------------------------------------
# The property: whatever is proposed and whatever operators do, sent values respect the interlocks


@dataclass
class _Device:
    value: float
    changed_at: datetime


POINTS = [DIM, CHILLER, BATTERY, BURNER, CRITICAL, FREE]
DEVICES = ["a-assembly-lighting", "a-chiller-2", "a-battery-1", "b-steam-boiler"]

step_strategy = st.fixed_dictionaries(
    {
        "dt_s": st.floats(min_value=0.5, max_value=900.0),
        "proposals": st.lists(
            st.tuples(
                st.sampled_from(POINTS),
                st.one_of(
                    st.floats(min_value=-1000, max_value=1000),
                    st.sampled_from([0.0, 1.0, math.nan, math.inf]),
                ),
                st.sampled_from(list(Priority)),
                st.integers(min_value=1, max_value=4),
            ),
            max_size=6,
        ),
        "operator": st.one_of(
            st.none(),
            st.tuples(
                st.sampled_from(DEVICES),
                st.sampled_from([*OperatorHoldKind, "clear"]),
                st.floats(min_value=10, max_value=3600),
            ),
        ),
        "approve_all": st.booleans(),
        "soc_pct": st.one_of(st.none(), st.floats(min_value=0, max_value=100)),
        "office_degc": st.one_of(st.none(), st.floats(min_value=15, max_value=32)),
    }
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step_strategy, min_size=1, max_size=25))
def test_no_sequence_drives_a_device_beyond_its_interlocks(steps: list[dict[str, Any]]) -> None:
    now = NOW
    devices = {
        p: _Device(v, NOW - timedelta(hours=1))
        for p, v in {DIM: 100.0, CHILLER: 7.0, BATTERY: 0.0, BURNER: 1.0, CRITICAL: 7.0, FREE: 80.0}.items()
    }
    holds: dict[str, OperatorHold] = {}
    history = CommandHistory()
    for step in steps:
        now += timedelta(seconds=step["dt_s"])
        if step["operator"] is not None:
            device, kind, duration_s = step["operator"]
            if kind == "clear":
                holds.pop(device, None)
            else:
                holds[device] = OperatorHold(
                    device=DeviceId(device),
                    kind=OperatorHoldKind(kind),
                    by="op",
                    until=now + timedelta(seconds=duration_s),
                )
        pts = {p: state(p, d.value, now=now, changed_at=d.changed_at) for p, d in devices.items()}
        pts[SOC] = (
            state(SOC, step["soc_pct"], now=now)
            if step["soc_pct"] is not None
            else state(SOC, None, quality=QualityCode.BAD, now=now)
        )
        pts[OFFICE] = (
            state(OFFICE, step["office_degc"], now=now)
            if step["office_degc"] is not None
            else state(OFFICE, 24.0, age_s=3600, now=now)
        )
        snapshot = ControlSnapshot(now=now, points=pts, operator_holds=holds)
        proposals = [
            Proposal(
                point=PointId(p),
                value=v,
                node=NodeId("ent-a"),
                rule_id=f"r{i}",
                stage=stage,
                priority=prio,
                reason="",
                hold_until=now + timedelta(minutes=15),
                needs_approval=stage == 4,
                advisory=False,
            )
            for i, (p, v, prio, stage) in enumerate(step["proposals"])
        ]
        sendable = [p for p in proposals if not p.needs_approval or step["approve_all"]]
        for dispatch in INTERLOCKS.merge_and_clamp(sendable, snapshot, history):
            if dispatch.clamped.refused:
                assert dispatch.clamped.value is None
                continue
            value = dispatch.clamped.value
            point = dispatch.point
            assert value is not None
            assert math.isfinite(value)
            _check_invariants(
                point, value, dispatch.proposal.priority, snapshot, history, devices[point], holds, now
            )
            history = history.record(point, value, now)
            if value != devices[point].value:
                devices[point] = _Device(value, now)


def _check_invariants(
    point: str,
    value: float,
    priority: Priority,
    snapshot: ControlSnapshot,
    history: CommandHistory,
    device: _Device,
    holds: dict[str, OperatorHold],
    now: datetime,
) -> None:
    assert point not in (CRITICAL, FREE)  # critical loads and points without interlocks: never written
    hold = holds.get(point.split(".", maxsplit=1)[0])
    if hold is not None and hold.active(now):
        assert hold.kind is OperatorHoldKind.OVERRIDE
        assert priority <= Priority.OPERATOR
    spec = CONFIG.interlocks[point]
    assert spec.min is not None
    assert spec.max is not None
    assert spec.min <= value <= spec.max
    previous = history.get(point)
    reference = previous.value if previous is not None else device.value
    if spec.max_ramp_per_min is not None:
        minutes = (now - previous.ts).total_seconds() / 60.0 if previous is not None else 1.0
        within_ramp = abs(value - reference) <= spec.max_ramp_per_min * minutes + 1e-9
        assert within_ramp or (point == BATTERY and value == 0.0)  # SOC stops a discharge at once
    if point == BATTERY:
        soc = snapshot.points[SOC]
        if soc.quality is not QualityCode.GOOD:
            assert value == 0.0
        else:
            assert soc.value is not None
            if soc.value <= 15.0:
                assert value <= 0.0
            if soc.value >= 90.0:
                assert value >= 0.0
    if point == CHILLER:
        office = snapshot.points[OFFICE]
        fresh = (now - office.ts).total_seconds() <= CONFIG.max_age_s
        if not fresh:
            assert value == reference
        else:
            assert office.value is not None
            if office.value > 26.0:
                assert value <= reference
            if office.value < 20.0:
                assert value >= reference
    if point == BURNER:
        assert value in (0.0, 1.0)
        if value != device.value:
            in_state_s = (now - device.changed_at).total_seconds()
            assert in_state_s >= (600.0 if device.value == 1.0 else 300.0)
