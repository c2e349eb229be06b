"""Staged rules: escalation with dwell and hysteresis, each stage's proposals, stale inputs, isolation,
modes, and config validation naming the field."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import random
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_engine.control_config import ControlConfig, parse_control
from control_engine.rules import (
    EVALUATORS,
    ControllerState,
    ControlSnapshot,
    Hold,
    NodeBudget,
    PointState,
    RuleContext,
    SizingState,
    StageState,
    Target,
    decide,
    hourly_signals,
)
from scada.config import load_site
from scada.model import ConfigError, NodeId, PointId, QualityCode

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 3, 8, 22, 0, tzinfo=UTC)  # 06:00 on 9 March in Shanghai
DIM = "a-assembly-lighting.dim_level_pct"
CHILLER = "a-chiller-2.supply_temp_setpoint_degc"
BATTERY = "a-battery-1.power_setpoint_kw"
BATTERY_MODE = "a-battery-1.mode"
DELAY = "a-paint-line.job_start_delay_min"
NEXT_START = "a-paint-line.next_job_start_hour"
RUNNING = "a-paint-line.job_running"
BOILER = "b-steam-boiler.heat_setpoint_pct"
PV_LIMIT = "b-carport-pv-1.power_limit_pct"

RAW: dict[str, Any] = {
    "stages": {"enter_pct": 100, "exit_pct": 97, "min_dwell_s": 600},
    "nodes": {"ent-a": {"mode": "auto"}, "ent-b": {"mode": "approve"}},
    "rules": [
        {
            "id": "dim-assembly",
            "stage": 1,
            "node": "ent-a",
            "kind": "setpoint",
            "targets": [DIM],
            "parameters": {"value": 60},
            "expected_reduction_kw": 6,
        },
        {
            "id": "chiller-up",
            "stage": 1,
            "node": "ent-a",
            "kind": "setpoint",
            "targets": [CHILLER],
            "parameters": {"offset": 1.5},
            "expected_reduction_kw": 15,
        },
        {
            "id": "battery",
            "stage": 2,
            "node": "ent-a",
            "kind": "storage",
            "targets": [BATTERY],
            "parameters": {
                "discharge_kw": 200,
                "charge_kw": 150,
                "discharge_above_kg_per_kwh": 0.6,
                "charge_below_kg_per_kwh": 0.3,
                "mode_point": BATTERY_MODE,
            },
        },
        {
            "id": "paint-shift",
            "stage": 3,
            "node": "ent-a",
            "kind": "shift",
            "targets": [DELAY],
            "parameters": {"start_point": NEXT_START, "running_point": RUNNING, "duration_h": 2},
        },
        {
            "id": "boiler-cap",
            "stage": 4,
            "node": "ent-a",
            "kind": "curtail",
            "targets": [BOILER],
            "parameters": {"value": 70},
            "priority": "schedule",
        },
        {
            "id": "pv-full",
            "stage": 1,
            "node": "ent-b",
            "kind": "setpoint",
            "targets": [PV_LIMIT],
            "parameters": {"value": 100},
        },
    ],
    "interlocks": {
        DIM: {"min": 30, "max": 100, "max_ramp_per_min": 20},
        CHILLER: {"min": 6, "max": 12, "max_ramp_per_min": 0.5},
        BATTERY: {
            "min": -250,
            "max": 250,
            "max_ramp_per_min": 100,
            "soc": {"point": "a-battery-1.soc_pct", "min_pct": 15, "max_pct": 90},
        },
        BATTERY_MODE: {"min": 0, "max": 1},
        DELAY: {"min": 0, "max": 480},
        BOILER: {"min": 40, "max": 100, "max_ramp_per_min": 10},
        PV_LIMIT: {"min": 0, "max": 100},
    },
}
CONFIG = parse_control(RAW)

# 06:00 local onwards: night, morning, the PV peak at 11-14 h, evening
HOURLY = (0.7, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.3, 0.5, 0.7, 0.8, 0.8, 0.8)


def points(**overrides: float | None) -> dict[str, PointState]:
    values: dict[str, float | None] = {
        DIM: 100.0,
        CHILLER: 7.0,
        BATTERY: 0.0,
        BATTERY_MODE: 1.0,
        "a-battery-1.soc_pct": 60.0,
        DELAY: 0.0,
        NEXT_START: 8.5,
        RUNNING: 0.0,
        BOILER: 100.0,
        PV_LIMIT: 80.0,
    }
    for key, value in overrides.items():
        values[key.replace("__", ".")] = value
    return {
        point: PointState(
            point=PointId(point),
            value=value,
            quality=QualityCode.GOOD,
            ts=NOW - timedelta(seconds=2),
            writable=point.split(".")[1] not in {"soc_pct", "next_job_start_hour", "job_running"},
        )
        for point, value in values.items()
    }


def budget(node: str, forecast_t: float, *, age_s: float = 30.0) -> NodeBudget:
    return NodeBudget(
        node=NodeId(node),
        month="2026-03",
        quota_t=200.0,
        actual_t=60.0,
        forecast_t=forecast_t,
        forecast_high_t=forecast_t * 1.1,
        computed_at=NOW - timedelta(seconds=age_s),
    )


def snapshot(
    *,
    now: datetime = NOW,
    share_a: float = 110.0,
    share_b: float | None = None,
    pts: dict[str, PointState] | None = None,
    intensity: float | None = 0.7,
) -> ControlSnapshot:
    budgets = {"ent-a": budget("ent-a", 2.0 * share_a)}
    if share_b is not None:
        budgets["ent-b"] = budget("ent-b", 2.0 * share_b)
    return ControlSnapshot(
        now=now,
        budgets=budgets,
        points=points() if pts is None else pts,
        intensity_kg_per_kwh=intensity,
        intensity_hourly_kg_per_kwh=HOURLY,
    )


def at_stage(stage: int, *, ago_s: float = 3600.0, node: str = "ent-a") -> ControllerState:
    return ControllerState(stages={node: StageState(stage=stage, since=NOW - timedelta(seconds=ago_s))})


def by_point(decision: Any) -> dict[str, float]:
    return {p.point: p.value for p in decision.proposals}


# ------------------------------------------------------------------------------------------------
# Stages


@pytest.mark.parametrize(
    ("stage", "ago_s", "share_pct", "expected"),
    [
        (0, None, 99.9, 0),  # below the enter threshold: nothing
        (0, None, 100.0, 1),  # at the threshold: first stage, no dwell owed
        (1, 60, 130.0, 1),  # over, but only 60 s in stage 1 (dwell 600 s)
        (1, 600, 130.0, 2),  # dwell done: one stage up, not two
        (3, 600, 130.0, 4),
        (4, 600, 200.0, 4),  # top stage
        (2, 600, 98.0, 2),  # inside the hysteresis band: stay
        (2, 600, 96.9, 1),  # below exit: one stage down
        (2, 60, 50.0, 2),  # far below, but dwell not done
        (1, 600, 50.0, 0),
    ],
)
def test_stage_escalation_and_de_escalation(
    stage: int, ago_s: float | None, share_pct: float, expected: int
) -> None:
    since = None if ago_s is None else NOW - timedelta(seconds=ago_s)
    state = ControllerState(stages={"ent-a": StageState(stage=stage, since=since)})
    decision = decide(snapshot(share_a=share_pct), CONFIG, state)
    assert decision.state.stage_of("ent-a").stage == expected
    assert [(t.from_stage, t.to_stage) for t in decision.transitions] == (
        [] if expected == stage else [(stage, expected)]
    )


def test_escalation_skips_stages_without_rules() -> None:
    raw = copy.deepcopy(RAW)
    raw["rules"] = [r for r in raw["rules"] if r["stage"] in (1, 4)]
    config = parse_control(raw)
    up = decide(snapshot(share_a=150), config, at_stage(1, ago_s=600))
    assert up.state.stage_of("ent-a").stage == 4
    down = decide(snapshot(share_a=10), config, at_stage(4, ago_s=600))
    assert down.state.stage_of("ent-a").stage == 1


@pytest.mark.parametrize("low", [96.0, 99.0])
def test_no_oscillation_when_the_forecast_hovers_at_the_threshold(low: float) -> None:
    rng = random.Random(7)
    state, changes = ControllerState(), []
    for minute in range(600):
        now = NOW + timedelta(minutes=minute)
        share = rng.uniform(low, 101.0)
        decision = decide(snapshot(now=now, share_a=share), CONFIG, state)
        changes += [(now, t.to_stage - t.from_stage, share) for t in decision.transitions]
        state = decision.state
    assert changes
    for (t1, _, _), (t2, _, _) in itertools.pairwise(changes):
        assert (t2 - t1).total_seconds() >= CONFIG.stages.min_dwell_s
    for _, step, share in changes:
        assert abs(step) == 1
        assert (step > 0 and share >= 100.0) or (step < 0 and share < 97.0)
    if low >= 97.0:  # never below the exit threshold: the stage only climbs
        assert all(step == 1 for _, step, _ in changes)


@pytest.mark.parametrize(
    ("budgets", "why"), [({}, "no budget"), ({"ent-a": budget("ent-a", 300, age_s=3600)}, "stale")]
)
def test_a_node_without_a_usable_budget_keeps_its_stage(budgets: dict[str, NodeBudget], why: str) -> None:
    snap = ControlSnapshot(now=NOW, budgets=budgets, points=points(), intensity_kg_per_kwh=0.7)
    decision = decide(snap, CONFIG, at_stage(2, ago_s=7200))
    assert decision.state.stage_of("ent-a").stage == 2
    assert not decision.transitions
    assert any(s.node == "ent-a" and why in s.reason for s in decision.skipped)


# ------------------------------------------------------------------------------------------------
# Proposals of each stage


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (1, {DIM: 60.0, CHILLER: 8.5}),
        (2, {DIM: 60.0, CHILLER: 8.5, BATTERY: 200.0, BATTERY_MODE: 1.0}),
        (3, {DIM: 60.0, CHILLER: 8.5, BATTERY: 200.0, BATTERY_MODE: 1.0, DELAY: 150.0}),
        (4, {DIM: 60.0, CHILLER: 8.5, BATTERY: 200.0, BATTERY_MODE: 1.0, DELAY: 150.0, BOILER: 70.0}),
    ],
)
def test_each_stage_adds_its_rules(stage: int, expected: dict[str, float]) -> None:
    decision = decide(snapshot(share_a=99.0), CONFIG, at_stage(stage, ago_s=60))  # hold the stage
    assert by_point(decision) == expected
    assert not decision.rule_errors
    boiler = [p for p in decision.proposals if p.point == BOILER]
    assert all(p.needs_approval and p.stage == 4 for p in boiler)  # stage 4: always approve-first
    assert all(not p.needs_approval for p in decision.proposals if p.stage < 4)  # ent-a is auto
    assert all(p.hold_until == NOW + timedelta(seconds=900) for p in decision.proposals)
    assert decision.planned_reduction_kw["ent-a"] == pytest.approx(21.0)  # dim 6 + chiller 15


def test_offsets_apply_to_the_displaced_value_not_to_our_own_command() -> None:
    hold = Hold(
        point=PointId(CHILLER),
        value=8.5,
        rule_id="chiller-up",
        until=NOW + timedelta(minutes=5),
        revert_to=7.0,
    )
    state = ControllerState(stages=at_stage(1).stages, holds={CHILLER: hold})
    decision = decide(snapshot(pts=points(**{CHILLER.replace(".", "__"): 8.5})), CONFIG, state)
    assert by_point(decision)[CHILLER] == 8.5  # 7.0 + 1.5, not 8.5 + 1.5


@pytest.mark.parametrize(
    ("intensity", "power_kw"),
    [(0.75, 200.0), (0.6, 200.0), (0.45, 0.0), (0.3, -150.0), (0.1, -150.0)],
)
def test_storage_follows_carbon_intensity(intensity: float, power_kw: float) -> None:
    decision = decide(snapshot(intensity=intensity), CONFIG, at_stage(2, ago_s=60))
    assert by_point(decision)[BATTERY] == power_kw


def test_storage_without_intensity_proposes_nothing() -> None:
    decision = decide(snapshot(intensity=None), CONFIG, at_stage(2, ago_s=60))
    assert BATTERY not in by_point(decision)
    assert any(s.rule_id == "battery" and "intensity unknown" in s.reason for s in decision.skipped)


@pytest.mark.parametrize(
    ("overrides", "hourly", "expected", "why"),
    [
        # planned 08:30-10:30 at 0.5 kg/kWh; 11:00-13:00 at 0.3 is the cleanest (12:00 ties: earlier wins)
        ({}, HOURLY, 150.0, None),
        # the plan already carries a 30 min delay: the same window is 120 min more
        ({"DELAY": 30.0, "NEXT_START": 9.0}, HOURLY, 150.0, None),
        # a flat forecast: no gain, keep the plan
        ({}, (0.5,) * 13, 0.0, None),
        # 2 % cleaner is below min_gain_pct (5 %): keep the plan
        ({}, (0.5, 0.5, 0.5, 0.5, 0.5, 0.49, 0.49, 0.49, 0.5, 0.5, 0.5, 0.5, 0.5), 0.0, None),
        ({"RUNNING": 1.0}, HOURLY, None, "job is running"),
        ({"NEXT_START": -1.0}, HOURLY, None, "no job pending"),
        ({}, HOURLY[:3], None, "does not cover"),
    ],
)
def test_shift_moves_the_job_to_the_cleanest_window(
    overrides: dict[str, float], hourly: tuple[float, ...], expected: float | None, why: str | None
) -> None:
    names = {"DELAY": DELAY, "NEXT_START": NEXT_START, "RUNNING": RUNNING}
    pts = points(**{names[k].replace(".", "__"): v for k, v in overrides.items()})
    snap = ControlSnapshot(
        now=NOW,
        budgets={"ent-a": budget("ent-a", 220)},
        points=pts,
        intensity_kg_per_kwh=0.7,
        intensity_hourly_kg_per_kwh=hourly,
    )
    decision = decide(snap, CONFIG, at_stage(3, ago_s=60))
    assert by_point(decision).get(DELAY) == expected
    if why is not None:
        assert any(s.rule_id == "paint-shift" and why in s.reason for s in decision.skipped)


def test_shift_breaks_intensity_ties_by_tariff() -> None:
    tariffs = (0.6,) * 5 + (1.2, 1.2, 0.4, 0.4) + (0.8,) * 4  # 11-13 h dear, 13-15 h cheap
    hourly = (0.7, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.7, 0.8, 0.8, 0.8)  # 11-15 h all clean
    snap = ControlSnapshot(
        now=NOW,
        budgets={"ent-a": budget("ent-a", 220)},
        points=points(),
        intensity_kg_per_kwh=0.7,
        intensity_hourly_kg_per_kwh=hourly,
        tariff_hourly_cny_per_kwh=tariffs,
    )
    decision = decide(snap, CONFIG, at_stage(3, ago_s=60))
    assert by_point(decision)[DELAY] == 270.0  # starts at 13:00, 0.3 kg/kWh and 0.4 CNY/kWh


# ------------------------------------------------------------------------------------------------
# Unusable inputs, failing and slow rules


def _state(
    point: str,
    *,
    value: float | None = 100.0,
    quality: QualityCode = QualityCode.GOOD,
    age_s: float = 2.0,
    max_age_s: float | None = None,
) -> PointState:
    return PointState(
        point=PointId(point),
        value=value,
        quality=quality,
        ts=NOW - timedelta(seconds=age_s),
        writable=True,
        max_age_s=max_age_s,
    )


@pytest.mark.parametrize(
    ("state", "why"),
    [
        (_state(DIM, age_s=61.0), "stale (61 s old, limit 60 s)"),
        (_state(DIM, age_s=20.0, max_age_s=10.0), "stale (20 s old, limit 10 s)"),
        (_state(DIM, value=None, quality=QualityCode.BAD), "bad quality"),
        (_state(DIM, quality=QualityCode.UNCERTAIN), "uncertain quality"),
        (None, "no value"),
    ],
)
def test_stale_or_bad_inputs_are_never_acted_on(state: PointState | None, why: str) -> None:
    pts = points()
    if state is None:
        del pts[DIM]
    else:
        pts[DIM] = state
    decision = decide(snapshot(pts=pts), CONFIG, at_stage(1, ago_s=60))
    assert DIM not in by_point(decision)
    assert CHILLER in by_point(decision)  # the other rule goes on
    [skip] = [s for s in decision.skipped if s.rule_id == "dim-assembly"]
    assert why in skip.reason


def test_a_raising_rule_is_isolated() -> None:
    def broken(rule: Any, ctx: RuleContext) -> list[Target]:
        if rule.id == "dim-assembly":
            raise ZeroDivisionError("division by zero")
        return list(EVALUATORS["setpoint"](rule, ctx))

    decision = decide(
        snapshot(), CONFIG, at_stage(2, ago_s=60), evaluators={**EVALUATORS, "setpoint": broken}
    )
    assert [(e.rule_id, e.error) for e in decision.rule_errors] == [
        ("dim-assembly", "ZeroDivisionError: division by zero")
    ]
    assert set(by_point(decision)) == {CHILLER, BATTERY, BATTERY_MODE}


def test_a_non_finite_output_is_a_rule_error() -> None:
    def nan(rule: Any, ctx: RuleContext) -> list[Target]:
        return [Target(point=PointId(rule.targets[0]), value=float("nan"), what="nan")]

    decision = decide(snapshot(), CONFIG, at_stage(1, ago_s=60), evaluators={**EVALUATORS, "setpoint": nan})
    assert {e.rule_id for e in decision.rule_errors} == {"dim-assembly", "chiller-up"}
    assert not decision.proposals


def test_a_slow_rule_is_isolated_on_a_fake_timer() -> None:
    clock = [0.0]

    def slow(rule: Any, ctx: RuleContext) -> list[Target]:
        clock[0] += 0.080 if rule.id == "chiller-up" else 0.001  # 80 ms: over the 50 ms budget
        return list(EVALUATORS["setpoint"](rule, ctx))

    decision = decide(
        snapshot(),
        CONFIG,
        at_stage(1, ago_s=60),
        evaluators={**EVALUATORS, "setpoint": slow},
        timer=lambda: clock[0],
    )
    [error] = decision.rule_errors
    assert error.rule_id == "chiller-up"
    assert error.elapsed_ms == pytest.approx(80.0)
    assert "over the budget of 50 ms" in error.error
    assert by_point(decision) == {DIM: 60.0}


def test_a_slow_rule_is_isolated_on_the_real_timer() -> None:
    config = parse_control({**RAW, "rule_time_budget_ms": 5})

    def slow(rule: Any, ctx: RuleContext) -> list[Target]:
        if rule.id == "dim-assembly":
            time.sleep(0.02)
        return list(EVALUATORS["setpoint"](rule, ctx))

    decision = decide(snapshot(), config, at_stage(1, ago_s=60), evaluators={**EVALUATORS, "setpoint": slow})
    assert [e.rule_id for e in decision.rule_errors] == ["dim-assembly"]
    assert decision.rule_errors[0].elapsed_ms >= 20.0
    assert set(by_point(decision)) == {CHILLER}


# ------------------------------------------------------------------------------------------------
# Modes


@pytest.mark.parametrize(
    ("mode", "needs_approval", "advisory"),
    [("auto", False, False), ("approve", True, False), ("advisory", False, True)],
)
def test_node_modes(mode: str, needs_approval: bool, advisory: bool) -> None:
    config = parse_control({**RAW, "nodes": {"ent-a": {"mode": mode}}})
    decision = decide(snapshot(), config, at_stage(1, ago_s=60))
    assert decision.proposals
    assert {(p.needs_approval, p.advisory) for p in decision.proposals} == {(needs_approval, advisory)}


def test_unlisted_nodes_are_advisory_and_approve_nodes_wait() -> None:
    decision = decide(snapshot(share_b=120.0), CONFIG, ControllerState())
    [pv] = [p for p in decision.proposals if p.point == PV_LIMIT]
    assert pv.needs_approval
    assert not pv.advisory
    config = parse_control({**RAW, "nodes": {}})
    decision = decide(snapshot(share_b=120.0), config, ControllerState())
    assert decision.proposals
    assert all(p.advisory for p in decision.proposals)


def test_decide_is_deterministic() -> None:
    first = decide(snapshot(), CONFIG, at_stage(3, ago_s=60))
    again = decide(snapshot(), CONFIG, at_stage(3, ago_s=60))
    assert first == again


# ------------------------------------------------------------------------------------------------
# Config validation


TARIFF_NIGHT = {"start_hour": 0, "end_hour": 8, "cny_per_kwh": 0.3}
TARIFF_DAY = {"start_hour": 8, "end_hour": 24, "cny_per_kwh": 0.9}
TARIFF_ALL = {"start_hour": 0, "end_hour": 24, "cny_per_kwh": 0.5}


def _rule(index: int, **changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(RAW)
    raw["rules"][index].update(changes)
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            _rule(0, targets=["a-assembly-lighting.dim_pct"]),
            "control.rules[0] (dim-assembly).targets[0]: unknown point 'a-assembly-lighting.dim_pct'",
        ),
        (
            _rule(1, targets=["a-chiller-2.supply_temp_degc"]),
            "control.rules[1] (chiller-up).targets[0]: point 'a-chiller-2.supply_temp_degc' is not writable",
        ),
        (_rule(0, node="ent-z"), "control.rules[0] (dim-assembly).node: unknown node 'ent-z'"),
        (_rule(1, id="dim-assembly"), "control.rules[1] (dim-assembly).id: duplicate rule id 'dim-assembly'"),
        (_rule(4, stage=2), "control.rules[4] (boiler-cap).stage: curtail rules belong to stage 4"),
        (_rule(0, stage=5), "control.rules[0] (dim-assembly).stage: Input should be less than or equal to 4"),
        (
            _rule(0, parameters={"value": 60, "offset": 1}),
            "control.rules[0] (dim-assembly).parameters: give exactly one of value (absolute), offset (relative)"
            " or steps (gap-sized)",
        ),
        (_rule(0, priority="urgent"), "control.rules[0] (dim-assembly).priority: unknown priority 'urgent'"),
        (_rule(0, kind="dim"), "control.rules[0] (dim-assembly): Input tag 'dim' found using 'kind'"),
        (
            _rule(3, targets=[DELAY, DIM]),
            "control.rules[3] (paint-shift).targets: a shift rule moves one job",
        ),
        (
            _rule(3, parameters={"start_point": "a-paint-line.start", "duration_h": 2}),
            "control.rules[3] (paint-shift).parameters.start_point: unknown point 'a-paint-line.start'",
        ),
        (
            _rule(
                2,
                parameters={
                    "discharge_kw": 1,
                    "charge_kw": 1,
                    "discharge_above_kg_per_kwh": 0.3,
                    "charge_below_kg_per_kwh": 0.6,
                },
            ),
            "control.rules[2] (battery).parameters: charge_below_kg_per_kwh must be below",
        ),
        (
            _rule(5, targets=["b-carport-pv-2.power_limit_pct"]),
            "control.rules[5] (pv-full).targets[0]: point 'b-carport-pv-2.power_limit_pct' has no interlocks",
        ),
        (
            {**RAW, "critical": ["a-battery-1"]},
            "control.rules[2] (battery).targets[0]: point 'a-battery-1.power_setpoint_kw' is a critical load",
        ),
        ({**RAW, "critical": ["a-nowhere"]}, "control.critical[0]: unknown device 'a-nowhere'"),
        (
            {**RAW, "stages": {"enter_pct": 100, "exit_pct": 100}},
            "control.stages: exit_pct (100) must be below",
        ),
        ({**RAW, "nodes": {"ent-q": {"mode": "auto"}}}, "control.nodes.ent-q: unknown node 'ent-q'"),
        ({**RAW, "nodes": {"ent-a": {"mode": "yolo"}}}, "control.nodes.ent-a.mode: Input should be 'auto'"),
        (
            {**RAW, "interlocks": {**RAW["interlocks"], DIM: {"min": 90, "max": 30}}},
            f"control.interlocks.{DIM}: min (90) must not exceed max (30)",
        ),
        (
            {**RAW, "interlocks": {**RAW["interlocks"], BATTERY: {"soc": {"point": "a-battery-1.soc"}}}},
            f"control.interlocks.{BATTERY}.soc.point: unknown point 'a-battery-1.soc'",
        ),
        ({**RAW, "timezone": "Mars/Olympus"}, "control.timezone: unknown time zone 'Mars/Olympus'"),
        (
            {**RAW, "heartbeat": {"points": ["a-nowhere.watchdog"]}},
            "control.heartbeat.points[0]: unknown point 'a-nowhere.watchdog'",
        ),
        (
            {**RAW, "heartbeat": {"points": ["a-chiller-2.supply_temp_degc"]}},
            "control.heartbeat.points[0]: point 'a-chiller-2.supply_temp_degc' is not writable",
        ),
        ({**RAW, "heartbeat": {"points": []}}, "control.heartbeat.points: List should have at least 1 item"),
        (
            {**RAW, "tariffs": {"periods": [TARIFF_NIGHT, {**TARIFF_DAY, "start_hour": 9}]}},
            "control.tariffs.periods: hours 8-9 have no price: the periods must cover 0-24",
        ),
        (
            {**RAW, "tariffs": {"periods": [TARIFF_NIGHT, {**TARIFF_DAY, "start_hour": 6}]}},
            "control.tariffs.periods: periods [0] and [1] overlap at hour 6",
        ),
        (
            {**RAW, "tariffs": {"periods": [TARIFF_NIGHT, {**TARIFF_DAY, "cny_per_kwh": -1}]}},
            "control.tariffs.periods[1].cny_per_kwh: Input should be greater than or equal to 0",
        ),
        (
            {**RAW, "tariffs": {"periods": [TARIFF_NIGHT, TARIFF_DAY], "nodes": {"ent-q": [TARIFF_ALL]}}},
            "control.tariffs.nodes.ent-q: unknown node 'ent-q'",
        ),
        (
            {**RAW, "tariffs": {"periods": [TARIFF_NIGHT, TARIFF_DAY], "nodes": {"ent-a": [TARIFF_NIGHT]}}},
            "control.tariffs.nodes.ent-a: hours 8-24 have no price",
        ),
        (
            {**RAW, "intensity": {"hourly_kg_per_kwh": [0.5] * 23}},
            "control.intensity.hourly_kg_per_kwh: List should have at least 24 items",
        ),
        (
            {**RAW, "intensity": {"monthly_kg_per_kwh": {"13": [0.5] * 24}}},
            "control.intensity.monthly_kg_per_kwh.13.[key]: Input should be less than or equal to 12",
        ),
        (
            _rule(0, parameters={"steps": [{"value": 60}]}),
            "control.rules[0] (dim-assembly).parameters.steps[0]: a step must avoid something",
        ),
        (
            _rule(
                0, parameters={"steps": [{"value": 60, "reduction_kw": 1}, {"offset": -5, "reduction_kw": 1}]}
            ),
            "control.rules[0] (dim-assembly).parameters: steps must be all absolute (value) or all",
        ),
        (
            _rule(
                2,
                parameters={
                    "discharge_kw": 1,
                    "charge_kw": 1,
                    "discharge_above_kg_per_kwh": 0.6,
                    "charge_below_kg_per_kwh": 0.4,
                    "hysteresis_kg_per_kwh": 0.1,
                },
            ),
            "control.rules[2] (battery).parameters: hysteresis_kg_per_kwh (0.1) must be below half",
        ),
        (
            {**RAW, "sizing": {"target_pct": 120}},
            "control.sizing.target_pct: Input should be less than or equal to 100",
        ),
        ({**RAW, "surprise": 1}, "control.surprise: Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_the_field(
    raw: dict[str, Any], message: str, plant_ids: dict[str, set[str]]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_for_plant(raw, plant_ids, source="plant.yaml")
    assert str(caught.value).startswith(f"plant.yaml: {message}")


def parse_for_plant(raw: Any, ids: dict[str, set[str]], *, source: str = "site file") -> ControlConfig:
    return parse_control(
        raw,
        source=source,
        known_points=ids["known_points"],
        writable_points=ids["writable_points"],
        known_nodes=ids["known_nodes"],
        known_devices=ids["known_devices"],
    )


@pytest.fixture(scope="module")
def plant_ids() -> dict[str, set[str]]:
    site = load_site(ROOT / "examples" / "plant.yaml")
    points = {f"{d.id}.{p.key}": p for d in site.devices for p in d.points}
    return {
        "known_points": set(points),
        "writable_points": {pid for pid, p in points.items() if p.writable},
        "known_nodes": {node.id for node, _parent in site.iter_nodes()},
        "known_devices": {d.id for d in site.devices},
    }


def test_the_test_config_and_the_documented_example_fit_the_example_plant(
    plant_ids: dict[str, set[str]],
) -> None:
    parse_for_plant(RAW, plant_ids)
    text = (ROOT / "docs" / "control.md").read_text(encoding="utf-8")
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL) if b.startswith("control:")]
    config = parse_for_plant(yaml.safe_load(block)["control"], plant_ids, source="docs/control.md")
    assert isinstance(config, ControlConfig)
    assert {r.stage for r in config.rules} == {1, 2, 3, 4}


# ------------------------------------------------------------------------------------------------
# Gap sizing: cheapest tCO2e first, in proportion to the forecast gap

LIGHT, CAP, FAN = (
    "a-assembly-lighting.dim_level_pct",
    "b-steam-boiler.heat_setpoint_pct",
    "a-chiller-2.fan_pct",
)
HOURS_LEFT = 546.0  # from 06:00 on 9 March to the end of March, Shanghai
SIZED_RAW: dict[str, Any] = {
    "timezone": "Asia/Shanghai",
    "stages": {"enter_pct": 100, "exit_pct": 97, "min_dwell_s": 600},
    "sizing": {"target_pct": 99, "forecast_lag_h": 72, "deadband_pct": 5},
    "nodes": {"ent-a": {"mode": "auto"}},
    "rules": [
        {  # 2 kW x 0.5 kg/kWh = 1 kg/h for 1 CNY/h: 1000 CNY/t
            "id": "dim",
            "stage": 1,
            "node": "ent-a",
            "kind": "setpoint",
            "targets": [LIGHT],
            "parameters": {"resolution": 1, "steps": [{"value": 60, "reduction_kw": 2, "cost_cny_per_h": 1}]},
        },
        {  # 2250 CNY/t, then 4500 CNY/t
            "id": "cap",
            "stage": 1,
            "node": "ent-a",
            "kind": "setpoint",
            "targets": [CAP],
            "parameters": {
                "resolution": 1,
                "steps": [
                    {"value": 70, "reduction_kg_per_h": 40, "cost_cny_per_h": 90},
                    {"value": 40, "reduction_kg_per_h": 60, "cost_cny_per_h": 270},
                ],
            },
        },
        {
            "id": "more",
            "stage": 2,
            "node": "ent-a",
            "kind": "setpoint",
            "targets": [FAN],
            "parameters": {"value": 50},
        },
    ],
    "interlocks": {LIGHT: {"min": 30, "max": 100}, CAP: {"min": 40, "max": 100}, FAN: {"min": 0, "max": 100}},
}
SIZED = parse_control(SIZED_RAW)


def sized_snapshot(
    need_kg_per_h: float, *, now: datetime = NOW, tariffs: tuple[float, ...] = ()
) -> ControlSnapshot:
    """A snapshot whose forecast gap asks for ``need_kg_per_h`` over the hours left in March."""
    forecast_t = 198.0 + need_kg_per_h * HOURS_LEFT / 1000.0
    pts = {
        p: PointState(point=PointId(p), value=100.0, quality=QualityCode.GOOD, ts=now, writable=True)
        for p in (LIGHT, CAP, FAN)
    }
    return ControlSnapshot(
        now=now,
        budgets={
            "ent-a": NodeBudget(
                node=NodeId("ent-a"),
                month="2026-03",
                quota_t=200.0,
                actual_t=60.0,
                forecast_t=forecast_t,
                computed_at=now,
            )
        },
        points=pts,
        intensity_kg_per_kwh=0.5,
        intensity_hourly_kg_per_kwh=(0.5,) * 24,
        tariff_hourly_cny_per_kwh=tariffs,
    )


@pytest.mark.parametrize(
    ("need_kg_per_h", "fills", "values"),
    [
        (0.0, {}, {}),  # on target: nothing to do, the rules stand aside (their holds lapse)
        (0.5, {"dim": 0.5}, {LIGHT: 80.0}),  # half the cheapest step: halfway to 60 %
        (1.0, {"dim": 1.0}, {LIGHT: 60.0}),
        (21.0, {"dim": 1.0, "cap": 0.5}, {LIGHT: 60.0, CAP: 85.0}),  # then the boiler's first step
        (71.0, {"dim": 1.0, "cap": 1.5}, {LIGHT: 60.0, CAP: 55.0}),  # and half of its dearer second
        (500.0, {"dim": 1.0, "cap": 2.0}, {LIGHT: 60.0, CAP: 40.0}),  # beyond capacity: everything
    ],
)
def test_gap_sized_rules_fill_the_cheapest_steps_first(
    need_kg_per_h: float, fills: dict[str, float], values: dict[str, float]
) -> None:
    state = ControllerState(stages={"ent-a": StageState(stage=1, since=NOW - timedelta(seconds=60))})
    decision = decide(sized_snapshot(need_kg_per_h), SIZED, state)
    sizing = decision.state.sizing["ent-a"]
    assert sizing.need_kg_per_h == pytest.approx(need_kg_per_h, abs=1e-6)
    assert sizing.fills == pytest.approx(fills)
    assert sizing.committed_kg_per_h == pytest.approx(min(need_kg_per_h, 101.0), abs=1e-6)
    assert by_point(decision) == values
    if not values:
        assert {s.rule_id for s in decision.skipped} >= {"dim", "cap"}


@pytest.mark.parametrize(
    ("tariffs", "first"),
    [
        ((), "cap"),  # 10 kW x 0.5 = 5 kg/h for 30 CNY/h: 6000 CNY/t, dearer than the boiler's 5000
        ((1.0,) * 24, "fan"),  # 10 kWh/h not bought at 1 CNY: 20 CNY/h net, 4000 CNY/t
    ],
)
def test_tariffs_enter_the_cost_per_tonne(tariffs: tuple[float, ...], first: str) -> None:
    raw = copy.deepcopy(SIZED_RAW)
    raw["rules"] = [
        {
            "id": "fan",
            "stage": 1,
            "node": "ent-a",
            "kind": "setpoint",
            "targets": [FAN],
            "parameters": {"steps": [{"value": 50, "reduction_kw": 10, "cost_cny_per_h": 30}]},
        },
        {
            "id": "cap",
            "stage": 1,
            "node": "ent-a",
            "kind": "setpoint",
            "targets": [CAP],
            "parameters": {"steps": [{"value": 70, "reduction_kg_per_h": 40, "cost_cny_per_h": 200}]},
        },
    ]
    state = ControllerState(stages={"ent-a": StageState(stage=1, since=NOW - timedelta(seconds=60))})
    decision = decide(sized_snapshot(2.0, tariffs=tariffs), parse_control(raw), state)
    assert list(decision.state.sizing["ent-a"].fills) == [first]


def test_sizing_holds_through_the_dwell_and_the_deadband() -> None:
    state = ControllerState(stages={"ent-a": StageState(stage=1, since=NOW - timedelta(hours=2))})
    first = decide(sized_snapshot(21.0), SIZED, state)
    assert first.state.sizing["ent-a"].fills == pytest.approx({"dim": 1.0, "cap": 0.5})
    soon = NOW + timedelta(seconds=300)  # within the 600 s dwell: a larger gap waits
    held = decide(sized_snapshot(41.0, now=soon), SIZED, first.state)
    assert held.state.sizing["ent-a"].fills == first.state.sizing["ent-a"].fills
    assert by_point(held)[CAP] == 85.0
    later = NOW + timedelta(seconds=900)  # dwell done, but within 5 % of the sized need: hold
    near = decide(sized_snapshot(21.5, now=later), SIZED, held.state)
    assert near.state.sizing["ent-a"].sized_at == NOW
    moved = decide(sized_snapshot(41.0, now=later), SIZED, held.state)
    assert moved.state.sizing["ent-a"].sized_at == later
    assert by_point(moved)[CAP] == 70.0


def test_the_forecast_is_credited_with_the_reduction_it_already_reflects() -> None:
    state = ControllerState(stages={"ent-a": StageState(stage=1, since=NOW - timedelta(hours=2))})
    first = decide(sized_snapshot(41.0), SIZED, state).state
    # Three days on the forecast shows most of the 41 kg/h (1 - e^-1 of it): the gap is smaller now,
    # but the need stays at what is in force plus what is still missing.
    later = NOW + timedelta(hours=72)
    forecast_gap = 41.0 * math.exp(-1.0)
    decision = decide(sized_snapshot(forecast_gap, now=later), SIZED, first)
    sizing = decision.state.sizing["ent-a"]
    assert sizing.reflected_kg_per_h == pytest.approx(41.0 * (1 - math.exp(-1.0)))
    hours_left = HOURS_LEFT - 72.0
    expected = forecast_gap * HOURS_LEFT / hours_left + 41.0 * (1 - math.exp(-1.0))
    assert sizing.need_kg_per_h == pytest.approx(expected)


@pytest.mark.parametrize(
    ("need_kg_per_h", "stage"),
    [
        (50.0, 1),  # stage 1's sized rules avoid up to 101 kg/h: no need for the dearer stage 2
        (150.0, 2),  # beyond what stage 1 can do: escalate
    ],
)
def test_a_node_escalates_only_when_its_sized_rules_cannot_cover_the_gap(
    need_kg_per_h: float, stage: int
) -> None:
    state = ControllerState(stages={"ent-a": StageState(stage=1, since=NOW - timedelta(hours=2))})
    decision = decide(sized_snapshot(need_kg_per_h), SIZED, state)
    assert decision.state.stage_of("ent-a").stage == stage


# ------------------------------------------------------------------------------------------------
# Storage deadband

DEADBAND = {"hysteresis_kg_per_kwh": 0.05, "min_spread_kg_per_kwh": 0.1, "spread_horizon_h": 6}


def _battery_config(**parameters: Any) -> ControlConfig:
    raw = copy.deepcopy(RAW)
    raw["rules"][2]["parameters"].update(parameters)
    return parse_control(raw)


@pytest.mark.parametrize(
    ("current_kw", "intensity", "hourly", "extra", "expected_kw"),
    [
        (0.0, 0.65, (0.65, 0.6, 0.4), {}, 200.0),  # dirty now, 0.25 cleaner ahead: discharge
        (0.0, 0.65, (0.65, 0.62, 0.6), {}, 0.0),  # nothing cleaner ahead: a cycle would not pay
        (200.0, 0.57, (0.57,), {}, 200.0),  # discharging: on down to 0.6 - 0.05
        (200.0, 0.54, (0.54,), {}, 0.0),
        (0.0, 0.25, (0.25, 0.5), {}, -150.0),  # clean now, dirtier ahead: charge
        (0.0, 0.25, (0.25, 0.3), {}, 0.0),
        (-150.0, 0.34, (0.34,), {}, -150.0),  # charging: on up to 0.3 + 0.05
        (-150.0, 0.36, (0.36,), {}, 0.0),
        (0.0, 0.65, (), {}, 0.0),  # no forecast: the spread cannot be judged
        # The price spread suffices on its own: 1.1 now against 0.3 later.
        (0.0, 0.65, (0.65, 0.62), {"min_spread_cny_per_kwh": 0.5}, 200.0),
    ],
)
def test_storage_deadband(
    current_kw: float,
    intensity: float,
    hourly: tuple[float, ...],
    extra: dict[str, Any],
    expected_kw: float,
) -> None:
    config = _battery_config(**DEADBAND, **extra)
    snap = ControlSnapshot(
        now=NOW,
        budgets={"ent-a": budget("ent-a", 220)},
        points=points(**{BATTERY.replace(".", "__"): current_kw}),
        intensity_kg_per_kwh=intensity,
        intensity_hourly_kg_per_kwh=hourly,
        tariff_hourly_cny_per_kwh=(1.1, 1.1, 0.3),
    )
    decision = decide(snap, config, at_stage(2, ago_s=60))
    assert by_point(decision)[BATTERY] == expected_kw


@pytest.mark.parametrize(("deadband", "max_flips"), [({}, None), (DEADBAND, 0)])
def test_the_deadband_stops_flip_flopping_around_a_threshold(
    deadband: dict[str, Any], max_flips: int | None
) -> None:
    config = _battery_config(**deadband)
    rng = random.Random(3)
    current, changes = 0.0, 0
    for minute in range(0, 600, 15):
        now = NOW + timedelta(minutes=minute)
        intensity = 0.6 + rng.uniform(-0.03, 0.03)  # clouds over the PV: the signal hovers at 0.6
        snap = ControlSnapshot(
            now=now,
            budgets={"ent-a": budget("ent-a", 220)},
            points={
                point: dataclasses.replace(state, ts=now)  # fresh at every cycle
                for point, state in points(**{BATTERY.replace(".", "__"): current}).items()
            },
            intensity_kg_per_kwh=intensity,
            intensity_hourly_kg_per_kwh=(intensity, 0.3),
        )
        proposed = by_point(decide(snap, config, at_stage(2, ago_s=60)))[BATTERY]
        changes += proposed != current
        current = proposed
    if max_flips is None:
        assert changes > 5  # without a deadband the battery follows every cloud
    else:
        assert changes <= 1 + max_flips  # one start, then it holds


# ------------------------------------------------------------------------------------------------
# Hourly signals from the config


@pytest.mark.parametrize(
    ("intensity", "factor", "expected"),
    [
        (None, 0.5366, (0.5366,) * 3),  # no profile: the grid factor in force, every hour
        ({"hourly_kg_per_kwh": [0.6] * 12 + [0.3] * 12}, 0.5366, (0.3, 0.3, 0.3)),  # 13-15 h Shanghai
        (
            {"hourly_kg_per_kwh": [0.6] * 24, "monthly_kg_per_kwh": {"3": [0.4] * 14 + [0.2] * 10}},
            0.5366,
            (0.4, 0.2, 0.2),  # March's own profile first
        ),
        (None, None, ()),  # nothing known: no vector at all
    ],
)
def test_hourly_signals(
    intensity: dict[str, Any] | None, factor: float | None, expected: tuple[float, ...]
) -> None:
    raw: dict[str, Any] = {
        "tariffs": {
            "periods": [TARIFF_NIGHT, TARIFF_DAY],
            "nodes": {"ent-b": [TARIFF_ALL]},
        }
    }
    if intensity is not None:
        raw["intensity"] = intensity
    config = parse_control(raw)
    now = datetime(2026, 3, 9, 5, 40, tzinfo=UTC)  # 13:40 in Shanghai
    signals = hourly_signals(config, now, factor, hours=3)
    assert signals.intensity_hourly_kg_per_kwh == expected
    assert signals.intensity_kg_per_kwh == (expected[0] if expected else factor)
    assert signals.tariff_hourly_cny_per_kwh == (0.9, 0.9, 0.9)
    assert signals.node_tariff_hourly_cny_per_kwh == {"ent-b": (0.5, 0.5, 0.5)}
    snap = ControlSnapshot(
        now=now,
        tariff_hourly_cny_per_kwh=signals.tariff_hourly_cny_per_kwh,
        node_tariff_hourly_cny_per_kwh=signals.node_tariff_hourly_cny_per_kwh,
    )
    assert snap.tariffs_for("ent-b") == (0.5, 0.5, 0.5)
    assert snap.tariffs_for("ent-a") == (0.9, 0.9, 0.9)


def test_tariffs_follow_the_local_day() -> None:
    config = parse_control({"tariffs": {"periods": [TARIFF_NIGHT, TARIFF_DAY]}})
    # 23:00 UTC is 07:00 in Shanghai: one valley hour, then the day price.
    signals = hourly_signals(config, datetime(2026, 3, 8, 23, 10, tzinfo=UTC), 0.5, hours=3)
    assert signals.tariff_hourly_cny_per_kwh == (0.3, 0.9, 0.9)


@pytest.mark.parametrize(
    ("reflected_kg_per_h", "stage"),
    [
        (41.0, 1),  # the forecast at 96 % shows 41 kg/h avoided: dropping them would break the budget
        (5.0, 0),  # little of it is ours: below the exit threshold, step down
    ],
)
def test_a_stage_whose_sized_rules_are_still_needed_is_kept(reflected_kg_per_h: float, stage: int) -> None:
    now = NOW
    sizing = SizingState(
        need_kg_per_h=reflected_kg_per_h,
        committed_kg_per_h=reflected_kg_per_h,
        reflected_kg_per_h=reflected_kg_per_h,
        fills={"dim": 1.0, "cap": 1.0},
        sized_at=now - timedelta(hours=1),
        updated_at=now,
    )
    state = ControllerState(
        stages={"ent-a": StageState(stage=1, since=now - timedelta(hours=2))}, sizing={"ent-a": sizing}
    )
    snap = sized_snapshot((192.0 - 198.0) * 1000.0 / HOURS_LEFT)  # forecast 192 t: 96 % of the quota
    decision = decide(snap, SIZED, state)
    assert decision.state.stage_of("ent-a").stage == stage


@pytest.mark.parametrize(
    ("hours_before_end", "resized"),
    [
        (6.0, False),  # 19 kg/h more for 6 h moves the month by 114 kg, under 0.1 % of 200 t: hold
        (48.0, True),  # for 48 h it is 912 kg: re-size
    ],
)
def test_late_in_the_month_small_effects_do_not_resize(hours_before_end: float, resized: bool) -> None:
    month_end = datetime(2026, 3, 31, 16, 0, tzinfo=UTC)  # 1 April 00:00 in Shanghai
    now = month_end - timedelta(hours=hours_before_end)
    previous = SizingState(
        need_kg_per_h=41.0,
        committed_kg_per_h=41.0,
        reflected_kg_per_h=41.0,
        fills={"dim": 1.0, "cap": 1.0},
        sized_at=now - timedelta(hours=1),
        updated_at=now,
    )
    state = ControllerState(
        stages={"ent-a": StageState(stage=1, since=now - timedelta(days=5))}, sizing={"ent-a": previous}
    )
    snap = sized_snapshot(0.0, now=now)
    gap_kg_per_h = 60.0 - 41.0  # with the 41 kg/h reflected, the need is 60 kg/h
    budget = dataclasses.replace(
        snap.budgets["ent-a"], forecast_t=198.0 + gap_kg_per_h * hours_before_end / 1000.0
    )
    snap = dataclasses.replace(snap, budgets={"ent-a": budget})
    sizing = decide(snap, SIZED, state).state.sizing["ent-a"]
    assert (sizing.sized_at == now) is resized
    assert sizing.need_kg_per_h == (pytest.approx(60.0) if resized else 41.0)
