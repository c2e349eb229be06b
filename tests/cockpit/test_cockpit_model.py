"""The cockpit's derived figures and formats, on hand-built snapshots (no server, no browser)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import pytest

from cockpit.bigscreen import Layout, banner_order, dispatch_effect, gauge_svg
from cockpit.data import (
    AlarmView,
    Device,
    DispatchView,
    Forecast,
    Node,
    PointInfo,
    QuotaView,
    Sample,
    Snapshot,
    _dispatch,
    dispatch_order,
    feeder_points,
    node_power_kw,
    point_label,
    screen_points,
    storage_status,
    top_emitters,
)
from cockpit.i18n import TEXT, Lang, format_date, format_number, t

NOW = datetime(2026, 11, 21, 4, 30, tzinfo=UTC)


def _point(pid: str, kind: str = "power", unit: str = "kW", carrier: str = "electricity") -> PointInfo:
    device, key = pid.split(".")
    return PointInfo(
        id=pid, device=device, key=key, name=key, kind=kind, unit=unit, carrier=carrier, writable=False
    )


def _snapshot(values: dict[str, float | None]) -> Snapshot:
    nodes = {
        "g": Node(id="g", name="G", level="group", parent=None, children=("ent-a", "ent-b")),
        "ent-a": Node(id="ent-a", name="A", level="enterprise", parent="g", children=("ws-a1", "ws-a2")),
        "ws-a1": Node(id="ws-a1", name="A1", level="workshop", parent="ent-a", children=()),
        "ws-a2": Node(id="ws-a2", name="A2", level="workshop", parent="ent-a", children=()),
        "ent-b": Node(id="ent-b", name="B", level="enterprise", parent="g", children=("ws-b1",)),
        "ws-b1": Node(id="ws-b1", name="B1", level="workshop", parent="ent-b", children=()),
    }
    points = [
        _point("a-main.active_power_kw"),
        _point("a-main.reactive_power_kvar", unit="kvar", carrier="none"),
        _point("a-cnc.active_power_kw"),
        _point("b-line.active_power_kw"),
        _point("b-fan.active_power_kw"),
        _point("pv.active_power_kw", carrier="pv"),
        _point("bat.active_power_kw", carrier="storage"),
        _point("bat.soc_pct", kind="state_of_charge", unit="%", carrier="none"),
    ]
    devices = {
        "a-main": ("ent-a", "power_meter"),
        "a-cnc": ("ws-a1", "production_line"),
        "b-line": ("ws-b1", "production_line"),
        "b-fan": ("ws-b1", "hvac"),
        "pv": ("ws-a2", "pv_inverter"),
        "bat": ("ws-a2", "battery"),
    }
    return Snapshot(
        ready=True,
        roots=("g",),
        nodes=MappingProxyType(nodes),
        devices=MappingProxyType(
            {
                d: Device(
                    id=d,
                    name=d,
                    node=node,
                    kind=kind,
                    availability="online",
                    availability_reason="",
                    points=tuple(p.id for p in points if p.device == d),
                )
                for d, (node, kind) in devices.items()
            }
        ),
        points=MappingProxyType({p.id: p for p in points}),
        latest=MappingProxyType(
            {
                pid: Sample(ts=NOW, value=v, quality="good" if v is not None else "bad")
                for pid, v in values.items()
            }
        ),
    )


def test_a_node_with_its_own_meter_is_measured_by_it_and_not_by_its_sub_loads() -> None:
    snap = _snapshot({"a-main.active_power_kw": 300.0, "a-cnc.active_power_kw": 120.0})
    assert feeder_points(snap, "ent-a") == ["a-main.active_power_kw"]  # kvar and sub-meters left out
    assert node_power_kw(snap, "ent-a") == 300.0


def test_a_node_without_a_meter_adds_up_its_loads_and_children() -> None:
    snap = _snapshot(
        {"a-main.active_power_kw": 300.0, "b-line.active_power_kw": 40.0, "b-fan.active_power_kw": 2.5}
    )
    assert node_power_kw(snap, "ent-b") == 42.5
    assert node_power_kw(snap, "g") == 342.5  # feeder of A plus the loads of B, nothing twice


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, None),  # nothing read yet
        ({"b-line.active_power_kw": None, "b-fan.active_power_kw": None}, None),  # bad quality only
        ({"b-line.active_power_kw": None, "b-fan.active_power_kw": 3.0}, 3.0),  # what is known
    ],
)
def test_power_without_good_values(values: dict[str, float | None], expected: float | None) -> None:
    assert node_power_kw(_snapshot(values), "ent-b") == expected


def test_pv_and_battery_status_and_the_points_the_screen_follows() -> None:
    snap = _snapshot({"pv.active_power_kw": 88.0, "bat.active_power_kw": -25.0, "bat.soc_pct": 64.0})
    status = storage_status(snap)
    assert (status.pv_kw, status.pv_devices, status.battery_kw, status.soc_pct, status.batteries) == (
        88.0,
        1,
        -25.0,
        64.0,
        1,
    )
    assert screen_points(snap) == {
        "a-main.active_power_kw",
        "a-cnc.active_power_kw",
        "b-line.active_power_kw",
        "b-fan.active_power_kw",
        "pv.active_power_kw",
        "bat.active_power_kw",
        "bat.soc_pct",
    }


def test_top_emitters_rank_workshops_by_month_to_date() -> None:
    forecasts = {
        n: Forecast(
            node=n, actual_t=a, forecast_t=a * 2, low_t=a, high_t=a * 3, method="profile", computed_at=NOW
        )
        for n, a in (("ws-a1", 3.0), ("ws-b1", 9.5), ("ws-a2", 0.4), ("ent-a", 3.4))
    }
    snap = _snapshot({})
    ranked = top_emitters(Snapshot(**{**_fields(snap), "forecasts": MappingProxyType(forecasts)}), count=2)
    assert [(n.id, v) for n, v in ranked] == [("ws-b1", 9.5), ("ws-a1", 3.0)]


def _fields(snap: Snapshot) -> dict[str, object]:
    return {name: getattr(snap, name) for name in Snapshot.__dataclass_fields__}


def _alarm(alarm: str, state: str, priority: int, minutes_ago: int) -> AlarmView:
    return AlarmView(
        alarm=alarm,
        state=state,
        since=NOW - timedelta(minutes=minutes_ago),
        priority=priority,
        console="c",
        node="n",
        device=None,
        point=None,
        message=alarm,
        value=None,
    )


def test_the_banner_puts_urgent_standing_alarms_first_and_leaves_out_shelved_ones() -> None:
    alarms = [
        _alarm("returned", "rtn_unack", 3, 1),
        _alarm("standing", "active_unack", 3, 30),
        _alarm("acked", "active_ack", 3, 2),
        _alarm("critical", "active_ack", 1, 50),
        _alarm("shelved", "shelved", 1, 0),
    ]
    assert [a.alarm for a in banner_order(alarms)] == ["critical", "standing", "acked", "returned"]


def test_the_gauge_shows_actual_and_forecast_shares() -> None:
    quota = QuotaView(
        node="g",
        month="2026-11",
        quota_t=200.0,
        actual_t=120.0,
        forecast_t=230.0,
        forecast_low_t=210.0,
        forecast_high_t=250.0,
        actual_pct=60.0,
        forecast_pct=115.0,
    )
    svg = gauge_svg(quota, Lang.ZH, size_px=500)
    assert 'data-gauge="60"' in svg
    assert "预测 115%" in svg
    assert "200 t" in svg


def test_layouts_and_formats() -> None:
    assert Layout.parse("1080") == Layout(1920, 1080)
    assert Layout.parse("2160").scale == 2.0
    assert format_number(1234.5) == "1,234.5"
    assert format_number(float("nan")) == "\u2013"
    assert format_date(NOW, Lang.ZH) == "2026年11月21日"
    assert format_date(NOW, Lang.EN) == "21 Nov 2026"
    late = datetime(2026, 11, 21, 17, 0, tzinfo=UTC)  # already the 22nd in Shanghai
    from zoneinfo import ZoneInfo  # noqa: PLC0415

    assert format_date(late, Lang.EN, ZoneInfo("Asia/Shanghai")) == "22 Nov 2026"
    assert t("cut_co2", Lang.EN, value="1.5") == "cut 1.5 t CO2"


def test_every_text_has_both_languages() -> None:
    missing = [key for key, (zh, en) in TEXT.items() if not zh.strip() or not en.strip()]
    assert missing == []


def _dispatch_json(dispatch_id: int, state: str, **extra: object) -> dict[str, object]:
    """A dispatch as ``Dispatch.to_json`` of control_engine/dispatcher.py writes it."""
    return {
        "id": dispatch_id,
        "created_at": "2026-11-21T04:30:00+00:00",
        "node": "ws-a2",
        "point": "pv.power_limit_pct",
        "value": 35.0,
        "reason": "stage 4: curtail PV export",
        "rule_id": "curtail-pv",
        "stage": 4,
        "priority": 30,
        "mode": "approve",
        "state": state,
        "hold_until": None,
        "previous_value": None,
        "correlation_id": None,
        "result": None,
        "decided_by": None,
        "decision_comment": "",
        "expected_kw": 40.0,
        **extra,
    }


def test_the_dispatch_queue_puts_waiting_ones_first_oldest_first() -> None:
    dispatches = [
        _dispatch(_dispatch_json(1, "verified", result={"status": "verified", "readback": 35.0})),
        _dispatch(_dispatch_json(2, "awaiting_approval")),
        _dispatch(_dispatch_json(3, "rejected", decided_by="op", decision_comment="not now")),
        _dispatch(_dispatch_json(4, "awaiting_approval", hold_until="2026-11-21T05:30:00+00:00")),
        _dispatch(_dispatch_json(5, "failed")),
    ]
    assert [d.id for d in dispatch_order(dispatches)] == [2, 4, 5, 3, 1]
    first = dispatches[0]
    assert first.result is not None
    assert (first.result["readback"], first.created_at, first.expected_kw) == (35.0, NOW, 40.0)
    assert dispatches[3].hold_until == NOW + timedelta(hours=1)
    assert [d.waiting for d in dispatches] == [False, True, False, True, False]


def test_a_wall_claims_a_cut_only_when_the_effect_was_measured() -> None:
    expected = _dispatch(_dispatch_json(1, "verified"))
    unknown = _dispatch(_dispatch_json(2, "verified", expected_kw=None))
    measured = _dispatch(_dispatch_json(3, "verified", co2e_avoided_kg=1250.0))
    assert isinstance(measured, DispatchView)
    assert measured.co2e_avoided_t == 1.25
    assert dispatch_effect(expected, Lang.EN) == "expected 40.0 kW · effect to be verified"
    assert dispatch_effect(expected, Lang.ZH) == "预期削减 40.0 kW · 效果待核验"
    assert dispatch_effect(unknown, Lang.EN) == "effect to be verified"
    assert dispatch_effect(measured, Lang.EN) == "cut 1.25 t CO2"


def test_point_labels_name_device_and_point() -> None:
    snap = _snapshot({})
    assert point_label(snap, "bat.soc_pct") == "bat · soc_pct"
    assert point_label(snap, "gone.power") == "gone.power"
