"""Flood detection and grouping per console, time in flood, and the KPIs computed from events."""

from __future__ import annotations

import random
from collections import deque
from datetime import UTC, datetime

import pytest

from anomaly.alarm_kpi import compute_kpis, compute_kpis_by_console
from anomaly.alarm_model import (
    AlarmDefinition,
    AlarmEvent,
    AlarmInputError,
    AlarmPriority,
    AlarmState,
    EventCause,
)
from anomaly.alarms import AlarmEngine
from anomaly.flood import FloodPolicy

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC).timestamp()
CONSOLE = "cr-main"
PARENTS: dict[str, str | None] = {"grp": None, "ent-a": "grp", "ent-b": "grp"}
PARENTS.update({f"ws-a{i}": "ent-a" for i in range(3)})
PARENTS.update({f"ws-b{i}": "ent-b" for i in range(3)})


def limit(device: str, key: str, node: str, priority: str = "medium") -> AlarmDefinition:
    return AlarmDefinition(
        id=f"{device}.{key}:h",
        point=f"{device}.{key}",
        node=node,
        console=CONSOLE,
        kind="h",
        priority=priority,
        setpoint=100.0,
        deadband=2.0,
    )


def plant(devices: int = 12, points: int = 5) -> list[AlarmDefinition]:
    nodes = sorted(n for n in PARENTS if n.startswith("ws-"))
    return [
        limit(f"dev-{d:02d}", f"p{p}", nodes[d % len(nodes)]) for d in range(devices) for p in range(points)
    ]


def max_in_sliding_window(times: list[float], window_s: float) -> int:
    best, inside = 0, deque[float]()
    for t in sorted(times):
        inside.append(t)
        while inside[0] <= t - window_s:
            inside.popleft()
        best = max(best, len(inside))
    return best


def test_a_trip_of_sixty_points_annunciates_ten_and_groups_the_rest() -> None:
    defs = plant()
    engine = AlarmEngine(defs, parents=PARENTS)
    rng = random.Random(7)
    events: list[AlarmEvent] = []
    for d, at in sorted(((d, T0 + rng.uniform(0, 60)) for d in defs), key=lambda x: x[1]):
        events += engine.evaluate(d.id, 130.0, at)
    activations = [e for e in events if e.is_activation]
    annunciated = [e for e in activations if e.annunciated]
    assert (len(activations), len(annunciated)) == (60, 10)
    assert annunciated == activations[:10]  # first come, first shown
    assert engine.in_flood(CONSOLE)
    heads = {e.alarm_id for e in annunciated}
    by_id = {d.id: d for d in defs}
    for event in activations[10:]:
        assert event.group in heads
        mine, parent = by_id[event.alarm_id], by_id[event.group]
        if any(by_id[h].device == mine.device for h in heads):
            assert parent.device == mine.device  # same device first
        elif any(by_id[h].node == mine.node for h in heads):
            assert parent.node == mine.node  # then the same workshop
    view = engine.console_view(CONSOLE, at=T0 + 60)
    assert len(view.lines) == 10
    assert view.grouped == 50 == sum(len(line.members) for line in view.lines)
    assert (view.activations_in_window, view.annunciated_in_window) == (60, 10)


def test_group_falls_back_to_the_subtree_then_the_first_out() -> None:
    defs = [limit("dev-a", "p0", "ws-a0"), limit("dev-b", "p0", "ws-a1"), limit("dev-c", "p0", "ws-b0")]
    engine = AlarmEngine(defs, parents=PARENTS, flood=FloodPolicy(flood_threshold=1, max_annunciated=1))
    engine.evaluate("dev-a.p0:h", 130.0, T0)
    [b] = engine.evaluate("dev-b.p0:h", 130.0, T0 + 1)
    assert (b.annunciated, b.group) == (False, "dev-a.p0:h")  # same enterprise subtree (ent-a)
    engine.evaluate("dev-a.p0:h", 50.0, T0 + 2)
    engine.acknowledge("dev-a.p0:h", at=T0 + 3, by="op")  # the head leaves the console
    [c] = engine.evaluate("dev-c.p0:h", 130.0, T0 + 4)
    assert (c.annunciated, c.group) == (False, "dev-a.p0:h")  # no open head: the flood's first-out


def test_annunciation_bound_holds_in_every_sliding_window_over_hours() -> None:
    defs = plant(devices=40, points=5)
    engine = AlarmEngine(defs, parents=PARENTS)
    rng = random.Random(11)
    events: list[AlarmEvent] = []
    high_until: dict[str, float] = {}
    t = T0
    for _ in range(6000):
        t += rng.expovariate(1 / 3.0)  # a busy plant: ~20 trips a minute at random
        d = rng.choice(defs)
        if high_until.get(d.id, 0.0) < t:
            events += engine.evaluate(d.id, 130.0, t)
            high_until[d.id] = t + rng.uniform(5, 300)
        for alarm_id, until in list(high_until.items()):
            if until < t:
                events += engine.evaluate(alarm_id, 50.0, t)
                del high_until[alarm_id]
        if rng.random() < 0.2:
            for status in engine.statuses(CONSOLE):
                if status.state is AlarmState.RTN_UNACK and status.group is None:
                    events += engine.acknowledge(status.alarm_id, at=t, by="op", with_group=True)
    annunciated = [e.at.timestamp() for e in events if e.annunciated]
    raw = [e.at.timestamp() for e in events if e.is_activation]
    assert max_in_sliding_window(annunciated, 600.0) <= 10
    assert max_in_sliding_window(raw, 600.0) > 50  # without grouping the console would drown


def test_time_in_flood_is_exact() -> None:
    defs = plant(devices=3, points=4)
    engine = AlarmEngine(defs)
    for i, d in enumerate(defs):  # 12 activations, one every 10 s: the 11th (t=100 s) starts the flood
        engine.evaluate(d.id, 130.0, T0 + 10 * i)
    assert engine.in_flood(CONSOLE)
    engine.tick(T0 + 1000)
    # the flood ends when only 10 remain in the window: the 2nd activation (t=10) ages out at t=610
    [flood] = engine.flood_intervals(CONSOLE)
    assert (flood.start_s - T0, flood.end_s - T0, flood.first_out) == (100.0, 610.0, defs[0].id)
    assert engine.flood_time_s(CONSOLE, T0 + 2000) == pytest.approx(510.0)
    assert not engine.in_flood(CONSOLE)


def test_critical_alarms_can_bypass_grouping() -> None:
    defs = plant(devices=2, points=6)
    defs.append(limit("dev-x", "p0", "ws-a0", priority="critical"))
    engine = AlarmEngine(defs, flood=FloodPolicy(always_annunciate=AlarmPriority.CRITICAL))
    for i, d in enumerate(defs):
        events = engine.evaluate(d.id, 130.0, T0 + i)
    assert events[0].annunciated
    assert events[0].group is None


def test_ack_with_group_acknowledges_the_members() -> None:
    defs = plant(devices=1, points=4)
    engine = AlarmEngine(defs, flood=FloodPolicy(flood_threshold=1, max_annunciated=1))
    for i, d in enumerate(defs):
        engine.evaluate(d.id, 130.0, T0 + i)
    events = engine.acknowledge(defs[0].id, at=T0 + 10, by="op", comment="trip of dev-00", with_group=True)
    assert [(e.alarm_id, e.to_state) for e in events] == [(d.id, AlarmState.ACTIVE_ACK) for d in defs]
    assert all(e.comment == "trip of dev-00" for e in events)


# ------------------------------------------------------------------------------------------------
# KPIs


def test_kpis_from_a_known_history() -> None:
    defs = [*plant(devices=3, points=4), limit("dev-c", "p9", "ws-b0", priority="critical")]
    engine = AlarmEngine(defs)
    events: list[AlarmEvent] = []
    stale = defs[-1].id
    events += engine.evaluate(stale, 150.0, T0 - 90_000)  # active since 25 h before the window ends
    events += engine.acknowledge(stale, at=T0 - 89_000, by="op")
    for i, d in enumerate(defs[:12]):  # period 0 (first 10 min of the window): 12 activations, a flood
        events += engine.evaluate(d.id, 130.0, T0 + 10 * i)
        events += engine.evaluate(d.id, 50.0, T0 + 10 * i + 5)
    chatterer = defs[0].id
    for k in range(3):  # period 2: one alarm activates 3 times within 60 s
        events += engine.evaluate(chatterer, 130.0, T0 + 1300 + 20 * k)
        events += engine.evaluate(chatterer, 50.0, T0 + 1310 + 20 * k)
    kpis = compute_kpis(events, console=CONSOLE, start=T0, end=T0 + 3600)
    assert kpis.periods == 6
    assert kpis.activations == 15
    assert kpis.alarms_per_hour_avg == pytest.approx(15.0)
    assert kpis.alarms_per_10min_peak == 12
    assert (kpis.annunciated_per_10min_peak, kpis.grouped) == (10, 2)
    assert (kpis.flood_periods, kpis.flood_periods_pct) == (1, pytest.approx(100 / 6))
    assert kpis.bad_actors[0].alarm_id == chatterer
    assert (kpis.bad_actors[0].activations, kpis.bad_actors[0].share_pct) == (4, pytest.approx(400 / 15))
    assert kpis.chattering == (chatterer,)
    assert [(s.alarm_id, s.state) for s in kpis.stale] == [(stale, AlarmState.ACTIVE_ACK)]
    assert kpis.stale[0].active_for_s == pytest.approx(93_600.0)
    assert dict(kpis.priority_distribution) == {"critical": 0, "high": 0, "medium": 15, "low": 0}
    assert kpis.priority_pct()["medium"] == 100.0
    as_dict = kpis.to_dict()
    assert as_dict["bad_actors"][0]["alarm_id"] == chatterer
    assert set(compute_kpis_by_console(events, start=T0, end=T0 + 3600)) == {CONSOLE}


def test_kpis_count_only_the_window_and_the_console() -> None:
    d_other = AlarmDefinition(id="o:h", node="ws-x", console="cr-2", kind="h", priority="low", setpoint=1.0)
    engine = AlarmEngine([*plant(devices=1, points=2), d_other])
    events = engine.evaluate("dev-00.p0:h", 130.0, T0 - 10)  # before the window
    events += engine.evaluate("dev-00.p1:h", 130.0, T0 + 10)
    events += engine.evaluate("o:h", 5.0, T0 + 20)
    kpis = compute_kpis(events, console=CONSOLE, start=T0, end=T0 + 600)
    assert (kpis.activations, kpis.stale) == (1, ())
    assert [e.cause for e in events] == [EventCause.ACTIVATE] * 3
    with pytest.raises(AlarmInputError, match="end: must be after start"):
        compute_kpis(events, console=CONSOLE, start=T0, end=T0)
