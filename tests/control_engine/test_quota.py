"""Quota status arithmetic and threshold crossings: once per crossing, with hysteresis, per month."""

from __future__ import annotations

import pytest

from control_engine.quota import Basis, QuotaAlerts, QuotaStatus
from scada.model import NodeId

NODE = NodeId("ws-a-machining")


def status(actual_t: float, forecast_t: float, *, month: str = "2026-03", node: NodeId = NODE) -> QuotaStatus:
    return QuotaStatus(
        node=node, month=month, quota_t=200.0, actual_t=actual_t, forecast_t=forecast_t, price_cny_per_t=95.0
    )


def test_surplus_deficit_and_their_value() -> None:
    s = status(actual_t=120.0, forecast_t=230.0)
    assert s.share_pct(Basis.ACTUAL) == pytest.approx(60.0)  # 120 / 200
    assert s.share_pct(Basis.FORECAST) == pytest.approx(115.0)  # 230 / 200
    assert s.surplus_t == pytest.approx(80.0)  # 200 - 120
    assert s.forecast_surplus_t == pytest.approx(-30.0)  # 200 - 230: a deficit
    assert s.forecast_value_cny == pytest.approx(-2850.0)  # -30 t x 95 CNY/t: the penalty exposure


def test_each_threshold_fires_once_as_the_forecast_climbs() -> None:
    alerts = QuotaAlerts()
    fired = []
    for forecast in (150, 159, 160, 165, 170, 179, 181, 185, 199.9, 200, 210, 220):
        fired += [(c.basis, c.threshold_pct) for c in alerts.observe(status(50.0, forecast))]
    # 160 t is 80 %, 180 t 90 %, 200 t 100 % of the 200 t quota; the actuals (25 %) cross nothing
    assert fired == [(Basis.FORECAST, 80.0), (Basis.FORECAST, 90.0), (Basis.FORECAST, 100.0)]


def test_a_jump_past_several_thresholds_reports_each_of_them() -> None:
    crossings = QuotaAlerts().observe(status(190.0, 250.0))
    assert [(c.basis, c.threshold_pct) for c in crossings] == [
        (Basis.ACTUAL, 80.0),
        (Basis.ACTUAL, 90.0),
        (Basis.FORECAST, 80.0),
        (Basis.FORECAST, 90.0),
        (Basis.FORECAST, 100.0),
    ]
    assert crossings[0].key == "quota:ws-a-machining:2026-03:actual:80"


def test_hysteresis_stops_a_wobbling_forecast_from_firing_again() -> None:
    alerts = QuotaAlerts(hysteresis_pct=2.0)
    fired = 0
    # around 90 % (180 t): wobbles within 2 points of it do not re-arm the threshold
    for forecast in (181, 179, 181, 177, 181, 175.9, 181):
        fired += sum(c.threshold_pct == 90.0 for c in alerts.observe(status(10.0, forecast)))
    # fires at the first 181; 177 t is 88.5 % (not below 88 %), no re-arm; 175.9 t is 87.95 %: re-armed,
    # so the last 181 fires again
    assert fired == 2


def test_a_new_month_starts_armed_and_nodes_are_independent() -> None:
    alerts = QuotaAlerts()
    assert len(alerts.observe(status(170.0, 170.0))) == 2  # 85 %: 80 % on actual and on forecast
    assert alerts.observe(status(170.0, 170.0)) == []
    assert len(alerts.observe(status(170.0, 170.0, node=NodeId("ws-b-cold")))) == 2
    assert len(alerts.observe(status(170.0, 170.0, month="2026-04"))) == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [("quota_t", 0.0), ("quota_t", float("nan")), ("actual_t", -1.0), ("forecast_t", float("inf"))],
)
def test_impossible_statuses_are_refused(field: str, value: float) -> None:
    fields = {"node": NODE, "month": "2026-03", "quota_t": 200.0, "actual_t": 1.0, "forecast_t": 1.0}
    with pytest.raises(ValueError, match=field):
        QuotaStatus(**{**fields, field: value})  # type: ignore[arg-type]


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="thresholds_pct"):
        QuotaAlerts(thresholds_pct=())
    with pytest.raises(ValueError, match="hysteresis_pct"):
        QuotaAlerts(thresholds_pct=(80.0,), hysteresis_pct=90.0)
