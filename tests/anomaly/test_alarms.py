"""Alarm state machine, deadband and delays, shelving, suppression, chattering, codecs and snapshots."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly.alarm_model import (
    AlarmDefinition,
    AlarmEvent,
    AlarmInputError,
    AlarmPriority,
    AlarmState,
    AlarmStateError,
    AlarmStatus,
    ChatterPolicy,
    ConditionKind,
    EventCause,
)
from anomaly.alarms import AlarmEngine
from scada.model import ConfigError, DecodeError, NotFound

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC).timestamp()
ALARM = "boiler-1.temp_degc:h"
S = AlarmState


def high(**overrides: object) -> AlarmDefinition:
    fields: dict[str, object] = {
        "id": ALARM,
        "point": "boiler-1.temp_degc",
        "node": "ws-boiler",
        "kind": ConditionKind.HIGH,
        "priority": AlarmPriority.HIGH,
        "setpoint": 100.0,
        "deadband": 5.0,
    }
    fields.update(overrides)
    return AlarmDefinition(**fields)  # type: ignore[arg-type]


def state(engine: AlarmEngine, alarm_id: str = ALARM) -> AlarmState:
    return engine.status(alarm_id).state


# ------------------------------------------------------------------------------------------------
# Definitions


def test_definition_defaults_and_parsing() -> None:
    d = AlarmDefinition.from_dict(
        {"id": "m1.p:ll", "point": "m1.p", "node": "ws-a", "kind": "ll", "priority": "2", "setpoint": 3}
    )
    assert (d.device, d.console, d.priority, d.kind, d.setpoint) == (
        "m1",
        "ws-a",
        AlarmPriority.HIGH,
        ConditionKind.LOLO,
        3.0,
    )
    assert AlarmDefinition.from_dict(d.to_dict()) == d
    assert high(console="control-room-1").console == "control-room-1"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"priority": "urgent"}, "priority"),
        ({"priority": 5}, "priority"),
        ({"kind": "hhh"}, "kind"),
        ({"deadband": -1.0}, "deadband"),
        ({"on_delay_s": float("nan")}, "on_delay_s"),
        ({"setpoint": float("inf")}, "setpoint"),
        ({"point": "no-dot"}, "point"),
        ({"message": "{id} {colour}"}, "message"),
        ({"kind": "roc", "setpoint": -1.0}, "setpoint"),
        ({"setpoint": None, "deadband_unit": "pct"}, "deadband_unit"),
        ({"id": ""}, "id"),
    ],
)
def test_bad_definition_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        high(**overrides)


def test_duplicate_ids_and_unknown_ids() -> None:
    with pytest.raises(ConfigError, match="defined twice"):
        AlarmEngine([high(), high()])
    with pytest.raises(NotFound):
        AlarmEngine([high()]).evaluate("nope", 1.0, T0)


# ------------------------------------------------------------------------------------------------
# State machine, table-driven


def _hi(e: AlarmEngine, t: float) -> object:
    return e.evaluate(ALARM, 120.0, t)


def _lo(e: AlarmEngine, t: float) -> object:
    return e.evaluate(ALARM, 50.0, t)


def _ack(e: AlarmEngine, t: float) -> object:
    return e.acknowledge(ALARM, at=t, by="op.zhang", comment="checked")


def _shelve(e: AlarmEngine, t: float) -> object:
    return e.shelve(ALARM, at=t, until=t + 600, by="op.zhang", reason="sensor fouled")


def _unshelve(e: AlarmEngine, t: float) -> object:
    return e.unshelve(ALARM, at=t, by="op.zhang")


def _suppress(e: AlarmEngine, t: float) -> object:
    return e.suppress(ALARM, at=t, reason="line stopped")


def _unsuppress(e: AlarmEngine, t: float) -> object:
    return e.unsuppress(ALARM, at=t)


def _oos(e: AlarmEngine, t: float) -> object:
    return e.remove_from_service(ALARM, at=t, by="eng.li", reason="transmitter replaced")


def _rts(e: AlarmEngine, t: float) -> object:
    return e.return_to_service(ALARM, at=t, by="eng.li")


SETUPS: dict[str, list[Callable[[AlarmEngine, float], object]]] = {
    "normal": [],
    "active_unack": [_hi],
    "active_ack": [_hi, _ack],
    "rtn_unack": [_hi, _lo],
    "shelved": [_shelve],
    "shelved_active_ack": [_hi, _ack, _shelve],
    "suppressed": [_suppress],
    "suppressed_then_active": [_suppress, _hi],
    "oos": [_oos],
    "oos_active": [_hi, _oos],
}

TRANSITIONS = [
    ("normal", _hi, S.ACTIVE_UNACK),
    ("normal", _lo, S.NORMAL),
    ("normal", _ack, "acknowledge alarm 'boiler-1.temp_degc:h' in state NORMAL"),
    ("normal", _unshelve, "unshelve"),
    ("normal", _rts, "return to service"),
    ("active_unack", _ack, S.ACTIVE_ACK),
    ("active_unack", _lo, S.RTN_UNACK),
    ("active_unack", _hi, S.ACTIVE_UNACK),
    ("active_unack", _shelve, S.SHELVED),
    ("active_ack", _lo, S.NORMAL),
    ("active_ack", _ack, "in state ACTIVE_ACK"),
    ("rtn_unack", _ack, S.NORMAL),
    ("rtn_unack", _hi, S.ACTIVE_UNACK),
    ("shelved", _ack, "in state SHELVED"),
    ("shelved", _hi, S.SHELVED),
    ("shelved", _unshelve, S.NORMAL),
    ("shelved", _shelve, S.SHELVED),
    ("shelved", _suppress, S.SUPPRESSED_BY_DESIGN),
    ("shelved_active_ack", _unshelve, S.ACTIVE_UNACK),  # re-annunciated: the condition still holds
    ("suppressed", _ack, "in state SUPPRESSED_BY_DESIGN"),
    ("suppressed", _shelve, "shelve alarm"),
    ("suppressed", _hi, S.SUPPRESSED_BY_DESIGN),
    ("suppressed", _unsuppress, S.NORMAL),
    ("suppressed", _oos, S.OUT_OF_SERVICE),
    ("suppressed_then_active", _unsuppress, S.ACTIVE_UNACK),
    ("oos", _ack, "in state OUT_OF_SERVICE"),
    ("oos", _oos, "remove from service"),
    ("oos", _shelve, "shelve alarm"),
    ("oos", _rts, S.NORMAL),
    ("oos_active", _rts, S.ACTIVE_UNACK),
    ("oos_active", _lo, S.OUT_OF_SERVICE),
]


@pytest.mark.parametrize(("setup", "op", "expected"), TRANSITIONS)
def test_transition_table(
    setup: str, op: Callable[[AlarmEngine, float], object], expected: AlarmState | str
) -> None:
    engine = AlarmEngine([high()])
    events: list[AlarmEvent] = []
    for i, step in enumerate(SETUPS[setup]):
        events += step(engine, T0 + i)  # type: ignore[operator]
    before = state(engine)
    if not isinstance(expected, AlarmState):  # a StrEnum is a str too: test the enum first
        with pytest.raises(AlarmStateError, match=expected) as info:
            op(engine, T0 + 10)
        assert info.value.state is before
        assert state(engine) is before  # a refused action changes nothing
        return
    new = op(engine, T0 + 10)
    assert isinstance(new, list)
    events += new
    assert state(engine) is expected
    for prev, nxt in itertools.pairwise(events):  # the events chain without gaps
        assert nxt.from_state is prev.to_state
        assert nxt.seq == prev.seq + 1
    if events:
        assert events[-1].to_state is expected


def test_ack_event_carries_user_comment_and_rendered_message() -> None:
    engine = AlarmEngine([high(message="{id}: {value:.1f} degC above {setpoint:g} ({priority})")])
    [active] = engine.evaluate(ALARM, 123.45, T0)
    assert active.message == "boiler-1.temp_degc:h: 123.5 degC above 100 (high)"
    assert (active.cause, active.by, active.annunciated, active.console) == (
        EventCause.ACTIVATE,
        "system",
        True,
        "ws-boiler",
    )
    [ack] = engine.acknowledge(ALARM, at=T0 + 5, by="op.zhang", comment="burner trimmed")
    assert (ack.from_state, ack.to_state, ack.by, ack.comment) == (
        S.ACTIVE_UNACK,
        S.ACTIVE_ACK,
        "op.zhang",
        "burner trimmed",
    )
    assert ack.at == datetime.fromtimestamp(T0 + 5, UTC)


def test_operator_actions_need_a_user_and_aware_times() -> None:
    engine = AlarmEngine([high()])
    engine.evaluate(ALARM, 120.0, T0)
    with pytest.raises(AlarmInputError, match="by"):
        engine.acknowledge(ALARM, at=T0, by=" ")
    with pytest.raises(AlarmInputError, match="at: datetime must be timezone-aware"):
        engine.acknowledge(ALARM, at=datetime(2026, 3, 2, 8, 0), by="op")  # noqa: DTZ001 -- the bad input
    with pytest.raises(AlarmInputError, match="value"):
        engine.evaluate(ALARM, float("nan"), T0 + 1)


# ------------------------------------------------------------------------------------------------
# Deadband and delays


@pytest.mark.parametrize(
    ("definition", "values", "active"),
    [
        # high 100, deadband 5 EU: on at >= 100, off only below 95
        (high(), [99.9, 100.0, 96.0, 95.0, 94.9, 99.0, 101.0], [0, 1, 1, 1, 0, 0, 1]),
        # 10 % of the setpoint = 10 EU
        (high(deadband=10.0, deadband_unit="pct"), [100.0, 91.0, 90.0, 89.9], [1, 1, 1, 0]),
        # low 10, deadband 1: on at <= 10, off only above 11
        (high(kind="l", setpoint=10.0, deadband=1.0), [10.5, 10.0, 10.9, 11.0, 11.1], [0, 1, 1, 1, 0]),
        # no deadband
        (high(deadband=0.0), [100.0, 99.99, 100.0], [1, 0, 1]),
        # a flag drives the condition whatever the kind
        (high(kind="deviation", setpoint=None, deadband=0.0), [True, False, True], [1, 0, 1]),
        # rate of change: |dv/dt| >= 2 per second with 1 s samples; 0.5/s deadband
        (high(kind="roc", setpoint=2.0, deadband=0.5), [0.0, 1.0, 5.0, 6.6, 8.0, 9.0], [0, 0, 1, 1, 0, 0]),
    ],
)
def test_deadband(definition: AlarmDefinition, values: list[float], active: list[int]) -> None:
    engine = AlarmEngine([definition])
    seen = []
    for i, v in enumerate(values):
        engine.evaluate(definition.id, v, T0 + i)
        seen.append(int(engine.status(definition.id).condition_active))
    assert seen == active


def test_on_and_off_delays_with_samples_and_ticks() -> None:
    engine = AlarmEngine([high(on_delay_s=10.0, off_delay_s=5.0)])
    assert engine.evaluate(ALARM, 120.0, T0) == []
    assert engine.evaluate(ALARM, 120.0, T0 + 5) == []
    assert engine.evaluate(ALARM, 50.0, T0 + 6) == []  # a blip shorter than the on-delay never alarms
    assert engine.evaluate(ALARM, 120.0, T0 + 7) == []
    assert engine.tick(T0 + 16.9) == []
    [event] = engine.tick(T0 + 17)  # held for 10 s: activates on the timer, no new sample needed
    assert event.to_state is S.ACTIVE_UNACK
    assert engine.evaluate(ALARM, 50.0, T0 + 20) == []
    assert engine.evaluate(ALARM, 120.0, T0 + 22) == []  # back before the off-delay: stays active
    assert engine.evaluate(ALARM, 50.0, T0 + 23) == []
    assert engine.tick(T0 + 27.9) == []
    [event] = engine.tick(T0 + 28)
    assert event.to_state is S.RTN_UNACK


def test_late_samples_are_ignored_and_counted() -> None:
    engine = AlarmEngine([high()])
    engine.evaluate(ALARM, 50.0, T0 + 10)
    assert engine.evaluate(ALARM, 120.0, T0 + 5) == []
    assert (engine.late_samples, state(engine)) == (1, S.NORMAL)


def test_flag_only_kind_refuses_numbers_and_numbers_need_a_setpoint() -> None:
    offline = AlarmDefinition(
        id="m1:offline", device="m1", node="ws-a", kind="device_offline", priority="medium"
    )
    score = AlarmDefinition(id="m1:score", device="m1", node="ws-a", kind="deviation", priority="low")
    engine = AlarmEngine([offline, score])
    with pytest.raises(AlarmInputError, match="condition flag"):
        engine.evaluate("m1:offline", 1.0, T0)
    with pytest.raises(AlarmInputError, match="no setpoint"):
        engine.evaluate("m1:score", 3.2, T0)


# ------------------------------------------------------------------------------------------------
# Shelving and suppression


def test_shelving_expires_to_the_state_the_condition_implies() -> None:
    engine = AlarmEngine([high()])
    engine.evaluate(ALARM, 120.0, T0)
    [shelve] = engine.shelve(
        ALARM, at=T0 + 1, until=datetime.fromtimestamp(T0 + 61, UTC), by="op", reason="known leak"
    )
    assert (shelve.to_state, shelve.comment, shelve.shelved_until) == (
        S.SHELVED,
        "known leak",
        datetime.fromtimestamp(T0 + 61, UTC),
    )
    status = engine.status(ALARM)
    assert (status.shelved_by, status.shelve_reason) == ("op", "known leak")
    assert engine.evaluate(ALARM, 125.0, T0 + 30) == []  # still evaluated, not annunciated
    assert engine.tick(T0 + 60.9) == []
    [expired] = engine.tick(T0 + 75)
    assert (expired.cause, expired.to_state, expired.at) == (
        EventCause.SHELVE_EXPIRED,
        S.ACTIVE_UNACK,
        datetime.fromtimestamp(T0 + 61, UTC),  # at the expiry, not at the late tick
    )
    engine.acknowledge(ALARM, at=T0 + 80, by="op")
    engine.shelve(ALARM, at=T0 + 90, until=T0 + 100, by="op", reason="again")
    engine.evaluate(ALARM, 50.0, T0 + 95)  # clears while shelved
    [expired] = engine.evaluate(ALARM, 50.0, T0 + 101)  # expiry is also applied on the next sample
    assert expired.to_state is S.NORMAL


def test_ack_after_a_due_expiry_is_accepted() -> None:
    engine = AlarmEngine([high()])
    engine.evaluate(ALARM, 120.0, T0)
    engine.shelve(ALARM, at=T0, until=T0 + 10, by="op", reason="r")
    events = engine.acknowledge(ALARM, at=T0 + 20, by="op")
    assert [(e.cause, e.to_state) for e in events] == [
        (EventCause.SHELVE_EXPIRED, S.ACTIVE_UNACK),
        (EventCause.ACKNOWLEDGE, S.ACTIVE_ACK),
    ]


def test_shelving_limits() -> None:
    engine = AlarmEngine([high()], max_shelve_s=3600)
    with pytest.raises(AlarmInputError, match="limited to 3600 s"):
        engine.shelve(ALARM, at=T0, until=T0 + 3601, by="op", reason="r")
    with pytest.raises(AlarmInputError, match="until: must be after at"):
        engine.shelve(ALARM, at=T0, until=T0, by="op", reason="r")
    with pytest.raises(AlarmInputError, match="reason"):
        engine.shelve(ALARM, at=T0, until=T0 + 5, by="op", reason="")


def test_device_offline_suppresses_the_devices_other_alarms() -> None:
    offline = AlarmDefinition(
        id="boiler-1:offline", device="boiler-1", node="ws-boiler", kind="device_offline", priority="high"
    )
    other = high(id="boiler-2.temp_degc:h", point="boiler-2.temp_degc")
    engine = AlarmEngine([high(), offline, other])
    engine.evaluate(ALARM, 50.0, T0)
    events = engine.set_device_online("boiler-1", False, at=T0 + 1, reason="connection refused")
    assert {(e.alarm_id, e.to_state) for e in events} == {
        (ALARM, S.SUPPRESSED_BY_DESIGN),
        ("boiler-1:offline", S.ACTIVE_UNACK),
    }
    assert engine.status(ALARM).suppressed_reason == "device boiler-1 offline: connection refused"
    assert engine.evaluate(ALARM, 120.0, T0 + 2) == []  # stale news while the device is offline
    assert state(engine, "boiler-2.temp_degc:h") is S.NORMAL
    events = engine.set_device_online("boiler-1", True, at=T0 + 3)
    assert {(e.alarm_id, e.to_state) for e in events} == {
        (ALARM, S.ACTIVE_UNACK),
        ("boiler-1:offline", S.RTN_UNACK),
    }
    assert engine.set_device_online("boiler-1", True, at=T0 + 4) == []  # idempotent


def test_suppression_sources_stack() -> None:
    engine = AlarmEngine([high()], parents={"ws-boiler": "ent-a", "ent-a": None})
    engine.suppress_node("ent-a", at=T0, reason="annual shutdown", by="eng.li")
    engine.suppress(ALARM, at=T0 + 1, reason="interlock bypass")
    engine.unsuppress_node("ent-a", at=T0 + 2, by="eng.li")
    assert state(engine) is S.SUPPRESSED_BY_DESIGN  # the design suppression still holds
    assert engine.status(ALARM).suppressed_reason == "interlock bypass"
    engine.unsuppress(ALARM, at=T0 + 3)
    assert state(engine) is S.NORMAL


# ------------------------------------------------------------------------------------------------
# Chattering


def _chatter(engine: AlarmEngine, start: float, times: int, period_s: float = 10.0) -> list[AlarmEvent]:
    events: list[AlarmEvent] = []
    for i in range(times):
        events += engine.evaluate(ALARM, 120.0, start + i * period_s)
        events += engine.evaluate(ALARM, 50.0, start + i * period_s + period_s / 2)
    return events


def test_chattering_is_flagged_then_decays() -> None:
    engine = AlarmEngine([high()])
    events = _chatter(engine, T0, 3)  # 3 activations within 60 s
    activations = [e for e in events if e.cause is EventCause.ACTIVATE]
    assert [e.chattering for e in activations] == [False, False, True]
    assert engine.status(ALARM).chattering
    engine.tick(T0 + 59)
    assert engine.status(ALARM).chattering
    engine.tick(T0 + 60)  # the first activation leaves the 60 s window
    assert not engine.status(ALARM).chattering


def test_slow_repeats_do_not_chatter() -> None:
    engine = AlarmEngine([high()])
    _chatter(engine, T0, 5, period_s=31.0)
    assert not engine.status(ALARM).chattering


def test_chattering_auto_shelve_policy() -> None:
    engine = AlarmEngine([high()], chatter=ChatterPolicy(activations=3, window_s=60, auto_shelve_s=900))
    events = _chatter(engine, T0, 3)
    # the third activation is annunciated, then shelved at once; the clear that follows is silent
    assert [e.cause for e in events[-2:]] == [EventCause.ACTIVATE, EventCause.SHELVE]
    assert (events[-1].by, events[-1].to_state) == ("system", S.SHELVED)
    assert "chattering: 3 activations within 60 s" in events[-1].comment
    assert engine.status(ALARM).shelved_until == datetime.fromtimestamp(T0 + 20 + 900, UTC)


# ------------------------------------------------------------------------------------------------
# Codecs and snapshots


def test_event_round_trips_through_json() -> None:
    engine = AlarmEngine([high()])
    events = engine.evaluate(ALARM, 120.0, T0) + engine.shelve(
        ALARM, at=T0 + 1, until=T0 + 60, by="op", reason="r"
    )
    for event in events:
        assert AlarmEvent.from_dict(json.loads(json.dumps(event.to_dict()))) == event
    data = events[0].to_dict()
    del data["priority"]
    with pytest.raises(DecodeError, match="priority"):
        AlarmEvent.from_dict(data)
    with pytest.raises(DecodeError, match="at"):
        AlarmEvent.from_dict({**events[0].to_dict(), "at": "2026-03-02T08:00:00"})


def _drive(engine: AlarmEngine, start: float) -> list[AlarmEvent]:
    events = engine.evaluate(ALARM, 120.0, start)
    events += engine.evaluate("b2:roc", 1.0, start)
    events += engine.shelve("b2:roc", at=start + 1, until=start + 100, by="op", reason="r")
    events += engine.evaluate(ALARM, 50.0, start + 2)
    events += engine.tick(start + 200)
    events += engine.acknowledge(ALARM, at=start + 201, by="op")
    events += engine.evaluate("b2:roc", 500.0, start + 202)
    return events


def test_snapshot_restore_keeps_states_and_behaviour() -> None:
    defs = [high(on_delay_s=3.0), high(id="b2:roc", kind="roc", setpoint=1.0, point="b2.level_m")]
    engine = AlarmEngine(defs)
    engine.evaluate(ALARM, 120.0, T0)  # pending on-delay
    engine.evaluate("b2:roc", 0.0, T0)
    engine.suppress("b2:roc", at=T0, reason="r", source="maintenance")
    engine.unsuppress("b2:roc", at=T0 + 1, source="maintenance")
    saved = json.loads(json.dumps(engine.snapshot()))
    restored = AlarmEngine.restore(saved, defs)
    assert restored.statuses() == engine.statuses()
    a = [e.to_dict() for e in _drive(engine, T0 + 5)]
    b = [e.to_dict() for e in _drive(restored, T0 + 5)]
    assert a == b
    assert a[0]["seq"] == 3  # numbering continues after a restart (2 events before the snapshot)


def test_restore_skips_removed_alarms_and_rejects_bad_snapshots() -> None:
    engine = AlarmEngine([high(), high(id="gone", point="x.y")])
    engine.evaluate("gone", 120.0, T0)
    restored = AlarmEngine.restore(engine.snapshot(), [high()])
    assert restored.restore_skipped == ("gone",)
    with pytest.raises(DecodeError, match="version"):
        AlarmEngine.restore({"version": 99}, [high()])
    broken = engine.snapshot()
    broken["alarms"][ALARM]["state"] = "active_ack"
    with pytest.raises(DecodeError, match="does not match"):
        AlarmEngine.restore(broken, [high()])


# ------------------------------------------------------------------------------------------------
# Property: no sequence of operations leads to an invalid state or an accepted ack of a NORMAL alarm

OPS = st.one_of(
    st.tuples(st.just("value"), st.sampled_from([0.0, 94.0, 97.0, 100.0, 103.0, 140.0])),
    st.tuples(st.just("flag"), st.booleans()),
    st.tuples(st.just("ack"), st.just(0.0)),
    st.tuples(st.just("shelve"), st.sampled_from([5.0, 60.0, 600.0])),
    st.tuples(st.just("unshelve"), st.just(0.0)),
    st.tuples(st.just("suppress"), st.just(0.0)),
    st.tuples(st.just("unsuppress"), st.just(0.0)),
    st.tuples(st.just("oos"), st.just(0.0)),
    st.tuples(st.just("rts"), st.just(0.0)),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 2.0, 7.0, 30.0, 700.0])),
)


def _check_invariants(status: AlarmStatus) -> None:
    s = status.state
    assert s in set(AlarmState)
    if s is S.NORMAL:
        assert status.acknowledged
        assert not status.condition_active
    elif s is S.RTN_UNACK:
        assert not status.acknowledged
        assert not status.condition_active
    elif s in (S.ACTIVE_UNACK, S.ACTIVE_ACK):
        assert status.condition_active
        assert status.acknowledged is (s is S.ACTIVE_ACK)
    elif s is S.SHELVED:
        assert status.shelved_until is not None
        assert status.suppressed_reason is None
    elif s is S.SUPPRESSED_BY_DESIGN:
        assert status.suppressed_reason
        assert status.out_of_service_reason is None
    else:
        assert status.out_of_service_reason


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(OPS, max_size=40), on_delay=st.sampled_from([0.0, 3.0]), auto_shelve=st.booleans())
def test_no_operation_sequence_breaks_the_state_model(
    ops: list[tuple[str, object]], on_delay: float, auto_shelve: bool
) -> None:
    chatter = ChatterPolicy(auto_shelve_s=120.0 if auto_shelve else None)
    engine = AlarmEngine([high(on_delay_s=on_delay, off_delay_s=2.0)], chatter=chatter)
    now = T0
    events: list[AlarmEvent] = []
    for op, arg in ops:
        now += 1.0
        events += engine.tick(now)
        before = state(engine)
        try:
            if op == "value":
                events += engine.evaluate(ALARM, float(arg), now)  # type: ignore[arg-type]
            elif op == "flag":
                events += engine.evaluate(ALARM, bool(arg), now)
            elif op == "ack":
                events += engine.acknowledge(ALARM, at=now, by="op")
                assert before.ackable, f"ack accepted in {before}"
            elif op == "shelve":
                events += engine.shelve(ALARM, at=now, until=now + float(arg), by="op", reason="r")  # type: ignore[arg-type]
            elif op == "unshelve":
                events += engine.unshelve(ALARM, at=now, by="op")
            elif op == "suppress":
                events += engine.suppress(ALARM, at=now, reason="r")
            elif op == "unsuppress":
                events += engine.unsuppress(ALARM, at=now)
            elif op == "oos":
                events += engine.remove_from_service(ALARM, at=now, by="op", reason="r")
            elif op == "rts":
                events += engine.return_to_service(ALARM, at=now, by="op")
            else:
                now += float(arg)  # type: ignore[arg-type]
        except AlarmStateError as err:
            refused = err.state
            assert refused is before
            assert state(engine) is before
            if op == "ack":
                assert not before.ackable
        _check_invariants(engine.status(ALARM))
    previous, previous_at = S.NORMAL, datetime.fromtimestamp(T0, UTC)
    for seq, event in enumerate(events, start=1):
        assert (event.seq, event.from_state) == (seq, previous)
        assert event.at >= previous_at  # events are in time order, expiries included
        previous, previous_at = event.to_state, event.at
    assert previous is state(engine)
    restored = AlarmEngine.restore(
        json.loads(json.dumps(engine.snapshot())), engine.definitions, chatter=chatter
    )
    assert restored.statuses() == engine.statuses()
