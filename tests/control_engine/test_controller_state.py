"""The controller's stages and sizing survive a restart: stored in PostgreSQL (migration 010), loaded
before the first cycle, and a restarted ControlService neither climbs again from stage 0 nor skips
its dwell. Runs against the real local PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from control_engine.control_config import ControlConfig, parse_control
from control_engine.controller import (
    ControllerStateStore,
    ControlService,
    StoredStateError,
    dispatch_modes,
    state_from_json,
    state_to_json,
)
from control_engine.dispatcher import Dispatcher, DispatchStore
from control_engine.rules import ControllerState, NodeBudget, PointState, SizingState, StageState
from scada.db import migrate
from scada.model import Command, CommandResult, NodeId, PointId, QualityCode
from scada.runtime import FakeClock

T0 = datetime(2026, 7, 10, 2, 0, tzinfo=UTC)
DIM = PointId("d-light.dim_pct")
BOILER = PointId("d-boiler.cap_pct")

CONTROL: dict[str, Any] = {
    "timezone": "Asia/Shanghai",
    "default_mode": "advisory",  # recorded, never sent: the test needs no device
    "stages": {"enter_pct": 100, "exit_pct": 97, "min_dwell_s": 1800},
    "rules": [
        {
            "id": "dim",
            "stage": 1,
            "node": "ent-a",
            "kind": "setpoint",
            "targets": [DIM],
            "parameters": {"value": 60},
        },
        {
            "id": "boiler-cap",
            "stage": 2,
            "node": "ent-a",
            "kind": "setpoint",
            "targets": [BOILER],
            "parameters": {
                "resolution": 1,
                "steps": [
                    {"value": 70, "reduction_kg_per_h": 40, "cost_cny_per_h": 90},
                    {"value": 40, "reduction_kg_per_h": 60, "cost_cny_per_h": 270},
                ],
            },
        },
    ],
    "interlocks": {DIM: {"min": 30, "max": 100}, BOILER: {"min": 40, "max": 100}},
}


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
        await conn.execute(
            "INSERT INTO nodes (id, name, level) VALUES ('ent-a', 'Enterprise A', 'enterprise')"
        )
    yield pool
    await pool.close()


def config() -> ControlConfig:
    return parse_control(CONTROL)


def service(
    pool: asyncpg.Pool,
    clock: FakeClock,
    *,
    store: ControllerStateStore | None,
    notes: list[tuple[str, dict[str, Any]]] | None = None,
    cfg: ControlConfig | None = None,
) -> ControlService:
    cfg = config() if cfg is None else cfg

    async def send(command: Command, wait_s: float) -> CommandResult | None:
        raise AssertionError("advisory: nothing is sent")

    async def latest(point: PointId) -> float | None:
        return 100.0

    dispatcher = Dispatcher(
        DispatchStore(pool), send, latest, clock=clock, modes=dispatch_modes(cfg, ["ent-a"])
    )

    async def budgets() -> dict[str, NodeBudget]:
        # 120 % of the quota, forecast a minute ago: escalation is due whenever the dwell allows.
        return {
            "ent-a": NodeBudget(
                node=NodeId("ent-a"),
                month="2026-07",
                quota_t=100.0,
                actual_t=40.0,
                forecast_t=120.0,
                computed_at=clock.now() - timedelta(seconds=60),
            )
        }

    async def points(watched: Sequence[PointId]) -> dict[str, PointState]:
        return {
            p: PointState(point=p, value=100.0, quality=QualityCode.GOOD, ts=clock.now(), writable=True)
            for p in watched
        }

    async def audit(actor: str, action: str, target: str, detail: Any) -> None:
        if notes is not None:
            notes.append((action, dict(detail)))

    return ControlService(
        cfg,
        dispatcher,
        budgets=budgets,
        points=points,
        intensity=lambda: (0.5366, (0.5366,) * 24),
        watched=[DIM, BOILER],
        clock=clock,
        audit=audit,
        state_store=store,
    )


async def test_a_restarted_controller_resumes_its_stage_and_dwell(pool: asyncpg.Pool) -> None:
    clock = FakeClock(T0)
    first = service(pool, clock, store=ControllerStateStore(pool))
    decision = await first.cycle()
    assert decision is not None
    assert [(t.from_stage, t.to_stage) for t in decision.transitions] == [(0, 1)]

    await clock.advance(900)  # the process dies 15 min into stage 1 (dwell 30 min)
    restarted = service(pool, clock, store=ControllerStateStore(pool))
    again = await restarted.cycle()
    assert again is not None
    assert again.transitions == ()  # neither 0 -> 1 again nor 1 -> 2 before the dwell
    assert again.state.stage_of("ent-a") == StageState(stage=1, since=T0)
    assert {p.point for p in again.proposals} == {DIM}

    await clock.advance(900)  # 30 min in stage 1, counted from before the restart
    later = await restarted.cycle()
    assert later is not None
    assert [(t.from_stage, t.to_stage) for t in later.transitions] == [(1, 2)]
    # Gap-sized: 120 t forecast against 99 % of 100 t, spread over the hours left in July (local).
    hours_left = (datetime(2026, 8, 1, tzinfo=ZoneInfo("Asia/Shanghai")) - clock.now()).total_seconds() / 3600
    need_kg_per_h = 21_000.0 / hours_left  # about 40.6: the first step (40) and a little of the second
    assert later.state.sizing["ent-a"].fills == {
        "boiler-cap": pytest.approx(1.0 + (need_kg_per_h - 40.0) / 60.0)
    }
    [cap] = [p for p in later.proposals if p.point == BOILER]
    assert cap.value == 70.0  # 1.01 steps: 70 - 0.3, rounded to the register's resolution

    # What a controller without the store does after the same restart: climbs again from stage 0.
    forgetful = await service(pool, clock, store=None).cycle()
    assert forgetful is not None
    assert [(t.from_stage, t.to_stage) for t in forgetful.transitions] == [(0, 1)]

    stored = await ControllerStateStore(pool).load()
    assert stored.stage_of("ent-a") == StageState(stage=2, since=T0 + timedelta(seconds=1800))
    assert stored.sizing == later.state.sizing


async def test_state_is_saved_only_when_a_cycle_changes_it(pool: asyncpg.Pool) -> None:
    clock = FakeClock(T0)
    unsized = parse_control(dict(CONTROL, rules=[CONTROL["rules"][0]]))  # nothing to size between cycles
    svc = service(pool, clock, store=ControllerStateStore(pool), cfg=unsized)
    await svc.cycle()
    saved_at = await pool.fetchval("SELECT saved_at FROM controller_state WHERE scope = 'default'")
    assert saved_at == T0
    await clock.advance(300)
    await svc.cycle()  # stage 1 kept, dwell running: the state is the same, no write
    assert await pool.fetchval("SELECT saved_at FROM controller_state WHERE scope = 'default'") == T0


async def test_a_deposed_leader_cannot_overwrite_the_state(pool: asyncpg.Pool) -> None:
    store = ControllerStateStore(pool)
    leader = ControllerState(stages={"ent-a": StageState(stage=3, since=T0)})
    deposed = ControllerState(stages={"ent-a": StageState(stage=1, since=T0)})
    assert await store.save(leader, at=T0, fencing_token=7)
    assert not await store.save(deposed, at=T0 + timedelta(seconds=5), fencing_token=6)
    assert (await store.load()).stage_of("ent-a").stage == 3
    assert await store.save(deposed, at=T0 + timedelta(seconds=9), fencing_token=8)
    assert (await store.load()).stage_of("ent-a").stage == 1


async def test_a_damaged_stored_state_is_dropped_and_reported(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "INSERT INTO controller_state (scope, state, saved_at) VALUES ('default', $1::jsonb, $2)",
        json.dumps({"format": 1, "stages": {"ent-a": {"stage": "two"}}}),
        T0,
    )
    notes: list[tuple[str, dict[str, Any]]] = []
    clock = FakeClock(T0)
    decision = await service(pool, clock, store=ControllerStateStore(pool), notes=notes).cycle()
    assert decision is not None
    assert [(t.from_stage, t.to_stage) for t in decision.transitions] == [(0, 1)]
    [(_action, detail)] = [n for n in notes if n[0] == "control.state_dropped"]
    assert "stages.ent-a.stage: expected an integer" in detail["error"]
    assert (await ControllerStateStore(pool).load()).stage_of("ent-a").stage == 1  # overwritten by a good one


def test_state_round_trips_through_json() -> None:
    state = ControllerState(
        stages={"ent-a": StageState(stage=4, since=T0), "ent-b": StageState(stage=0, since=None)},
        sizing={
            "ent-a": SizingState(
                need_kg_per_h=84.5,
                committed_kg_per_h=80.0,
                reflected_kg_per_h=12.25,
                fills={"boiler-cap": 3.4, "dim": 1.0},
                sized_at=T0,
                updated_at=T0 + timedelta(minutes=15),
            )
        },
    )
    assert state_from_json(json.loads(json.dumps(state_to_json(state)))) == state


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "controller state: expected an object"),
        ({"format": 99}, "format 99, expected 1"),
        ({"format": 1, "stages": {"ent-a": {"stage": 1, "since": "yesterday"}}}, "stages.ent-a.since"),
        (
            {"format": 1, "stages": {"ent-a": {"stage": 1, "since": "2026-07-01T00:00:00"}}},
            "time without a zone",
        ),
        ({"format": 1, "sizing": {"ent-a": {"need_kg_per_h": "lots"}}}, "sizing.ent-a.need_kg_per_h"),
        (
            {
                "format": 1,
                "sizing": {
                    "ent-a": {
                        "need_kg_per_h": 1,
                        "committed_kg_per_h": 1,
                        "reflected_kg_per_h": 0,
                        "fills": {"dim": None},
                    }
                },
            },
            "sizing.ent-a.fills.dim: expected a number",
        ),
    ],
)
def test_a_damaged_state_names_the_field(document: Any, message: str) -> None:
    with pytest.raises(StoredStateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        state_from_json(document)
