"""The carbon ledger against reference cases computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from control_engine.factors import FactorLibrary
from control_engine.ledger import CarbonLedger, LedgerPoint, LedgerRow, RowSource
from scada.model import Carrier, ConfigError, LedgerRole, NodeId, NodeLevel, PointId, Quality, Reading

TZ = ZoneInfo("Asia/Shanghai")
GRID_2022 = 0.5366  # kgCO2/kWh, national average 2022 (MEE/NBS), in force from 2022-01-01
REL = 1e-9

PARENTS = {
    NodeId("grp"): None,
    NodeId("park"): NodeId("grp"),
    NodeId("ent"): NodeId("park"),
    NodeId("ws1"): NodeId("ent"),
    NodeId("ws2"): NodeId("ent"),
}
LEVELS = {
    NodeId("grp"): NodeLevel.GROUP,
    NodeId("park"): NodeLevel.PARK,
    NodeId("ent"): NodeLevel.ENTERPRISE,
    NodeId("ws1"): NodeLevel.WORKSHOP,
    NodeId("ws2"): NodeLevel.WORKSHOP,
}


def point(
    pid: str, node: str, carrier: Carrier, role: LedgerRole, unit: str = "kWh", *, rate: bool = False
) -> LedgerPoint:
    return LedgerPoint(PointId(pid), NodeId(node), carrier, role, unit, rate=rate)


def ledger(points: Sequence[LedgerPoint], factors: FactorLibrary | None = None) -> CarbonLedger:
    return CarbonLedger(points, PARENTS, LEVELS, factors or FactorLibrary.load(), timezone="Asia/Shanghai")


def at(day: int, hour: int, minute: int = 0, second: int = 0, month: int = 3) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=TZ)


def r(pid: str, ts: datetime, value: float) -> Reading:
    return Reading(point=PointId(pid), ts=ts, value=value)


def run(book: CarbonLedger, readings: Sequence[Reading], now: datetime) -> list[LedgerRow]:
    book.ingest(readings, now=now.timestamp())
    return book.compute(now=now.timestamp()).rows


def cell(book: CarbonLedger, node: str, hour: datetime, carrier: Carrier, source: RowSource) -> LedgerRow:
    found = [
        row
        for row in book.rows()
        if row.node == node and row.hour == hour and row.carrier is carrier and row.source is source
    ]
    assert len(found) == 1, found
    return found[0]


def test_electricity_counter_per_local_hour() -> None:
    book = ledger([point("m.e", "ws1", Carrier.ELECTRICITY, LedgerRole.CONSUMPTION)])
    run(
        book,
        [r("m.e", at(2, 10), 1000.0), r("m.e", at(2, 10, 30), 1050.0), r("m.e", at(2, 11), 1100.0),
         r("m.e", at(2, 11, 59, 59), 1180.0)],
        now=at(2, 12),
    )  # fmt: skip
    ten = cell(book, "ws1", at(2, 10), Carrier.ELECTRICITY, RowSource.METERED)
    eleven = cell(book, "ws1", at(2, 11), Carrier.ELECTRICITY, RowSource.METERED)
    # 10:00-11:00: 1050 - 1000 = 50 kWh; 11:00-12:00: 1180 - 1050 = 130 kWh (from the last value
    # of the hour before); both x 0.5366 kgCO2/kWh.
    assert ten.activity == pytest.approx(50.0, rel=REL)
    assert ten.co2e_kg == pytest.approx(50.0 * 0.5366, rel=REL)  # 26.83
    assert eleven.co2e_kg == pytest.approx(130.0 * 0.5366, rel=REL)  # 69.758
    assert ten.factor_id == "cn-grid-national-average-2022"
    assert (ten.scope, ten.unit) == (2, "kWh")
    # No boundary meter: the enterprise buys what its meters use, nothing is left unmetered.
    assert cell(book, "ent", at(2, 10), Carrier.ELECTRICITY, RowSource.UNMETERED).co2e_kg == 0.0
    totals = book.node_hours()
    assert totals[NodeId("grp")][at(2, 11)] == pytest.approx([0.0, 69.758], rel=REL)


def test_natural_gas_diesel_and_heat() -> None:
    book = ledger(
        [
            point("boiler.gas", "ws1", Carrier.NATURAL_GAS, LedgerRole.CONSUMPTION, "Nm3"),
            point("genset.diesel", "ws1", Carrier.DIESEL, LedgerRole.CONSUMPTION, "t"),
            point("steam.heat", "ws2", Carrier.HEAT, LedgerRole.CONSUMPTION, "GJ"),
        ]
    )
    run(
        book,
        [r("boiler.gas", at(2, 8), 5000.0), r("boiler.gas", at(2, 8, 59), 5100.0),
         r("genset.diesel", at(2, 8), 12.0), r("genset.diesel", at(2, 8, 59), 12.5),
         r("steam.heat", at(2, 8), 300.0), r("steam.heat", at(2, 8, 59), 310.0)],
        now=at(2, 9),
    )  # fmt: skip
    hour = at(2, 8)
    # Natural gas (GB/T 32150): NCV 389.31 GJ/10^4 Nm3 x 15.3 tC/TJ x 0.99 x 44/12
    #   = 0.038931 GJ/Nm3 x 15.3 kgC/GJ x 0.99 x 44/12 = 2.16218882... kgCO2/Nm3; 100 Nm3 burned.
    gas = cell(book, "ws1", hour, Carrier.NATURAL_GAS, RowSource.METERED)
    assert gas.scope == 1
    assert gas.co2e_kg == pytest.approx(100.0 * 0.038931 * 15.3 * 0.99 * 44 / 12, rel=REL)
    # Diesel: 42.652 GJ/t x 20.2 kgC/GJ x 0.98 x 44/12 = 3095.909637... kgCO2/t; 0.5 t burned.
    diesel = cell(book, "ws1", hour, Carrier.DIESEL, RowSource.METERED)
    assert diesel.co2e_kg == pytest.approx(0.5 * 42.652 * 20.2 * 0.98 * 44 / 12, rel=REL)
    # Purchased heat: 10 GJ x 110 kgCO2/GJ = 1100 kg, Scope 2.
    heat = cell(book, "ws2", hour, Carrier.HEAT, RowSource.METERED)
    assert (heat.scope, heat.co2e_kg) == (2, pytest.approx(1100.0, rel=REL))
    scope1, scope2 = book.node_hours()[NodeId("ent")][hour]
    assert scope1 == pytest.approx(gas.co2e_kg + diesel.co2e_kg, rel=REL)
    assert scope2 == pytest.approx(1100.0, rel=REL)


def test_power_is_integrated_over_the_time_it_covers() -> None:
    book = ledger([point("aux.p", "ws1", Carrier.ELECTRICITY, LedgerRole.CONSUMPTION, "kW", rate=True)])
    start = at(2, 14)
    # 120 kW sampled every 10 s for the whole hour: 360 samples spanning 3590 s + one period = 1 h.
    run(book, [r("aux.p", start + timedelta(seconds=10 * i), 120.0) for i in range(360)], now=at(2, 15))
    row = cell(book, "ws1", start, Carrier.ELECTRICITY, RowSource.METERED)
    assert row.activity == pytest.approx(120.0, rel=REL)
    assert row.co2e_kg == pytest.approx(120.0 * GRID_2022, rel=REL)


def test_pv_and_battery_carry_their_intensity() -> None:
    points = [
        point("feeder.e", "ent", Carrier.ELECTRICITY, LedgerRole.SUPPLY),
        point("line.e", "ws1", Carrier.ELECTRICITY, LedgerRole.CONSUMPTION),
        point("pv.e", "ws2", Carrier.PV, LedgerRole.GENERATION),
        point("bat.in", "ws2", Carrier.STORAGE, LedgerRole.CHARGE),
        point("bat.out", "ws2", Carrier.STORAGE, LedgerRole.DISCHARGE),
    ]
    book = ledger(points)
    h1, h2 = at(3, 11), at(3, 12)

    def hour(
        start: datetime, feeder: float, line: float, pv: float, into: float, out: float
    ) -> list[Reading]:
        end = start + timedelta(minutes=59)
        return [r("feeder.e", end, feeder), r("line.e", end, line), r("pv.e", end, pv),
                r("bat.in", end, into), r("bat.out", end, out)]  # fmt: skip

    # Opening values at 10:59, then hour 1 buys S = 100 kWh, PV makes G = 50, the line uses C = 120
    # and the battery charges Q = 30; hour 2 buys 60, the battery gives back D = 30, the line uses 90.
    run(book, hour(at(3, 10), 1000, 2000, 500, 100, 100), now=at(3, 11))
    run(book, hour(h1, 1100, 2120, 550, 130, 100) + hour(h2, 1160, 2210, 550, 130, 130), now=at(3, 13))
    f = GRID_2022
    # Hour 1: mix intensity I1 = S f / (S + G) = 100 x 0.5366 / 150 = 0.357733... kgCO2/kWh.
    i1 = 100 * f / 150
    assert cell(book, "ws1", h1, Carrier.ELECTRICITY, RowSource.METERED).co2e_kg == pytest.approx(
        120 * i1, rel=REL
    )
    stored = cell(book, "ws2", h1, Carrier.STORAGE, RowSource.STORAGE)
    assert (stored.activity, stored.co2e_kg) == (30.0, pytest.approx(30 * i1, rel=REL))  # 10.732 kg in
    assert cell(book, "ws2", h1, Carrier.PV, RowSource.METERED).co2e_kg == 0.0
    assert cell(book, "ent", h1, Carrier.ELECTRICITY, RowSource.UNMETERED).activity == pytest.approx(
        0.0, abs=1e-9
    )
    # Hour 2: the battery carries I1; I2 = (60 f + 30 I1) / (60 + 30) = (32.196 + 10.732) / 90.
    i2 = (60 * f + 30 * i1) / 90
    assert cell(book, "ws1", h2, Carrier.ELECTRICITY, RowSource.METERED).co2e_kg == pytest.approx(
        90 * i2, rel=REL
    )
    assert cell(book, "ws2", h2, Carrier.STORAGE, RowSource.STORAGE).co2e_kg == pytest.approx(
        -30 * i1, rel=REL
    )
    # Every hour the rows add up to what was bought x the grid factor.
    totals = book.node_hours()[NodeId("ent")]
    assert totals[h1][1] == pytest.approx(100 * f, rel=REL)  # 53.66
    assert totals[h2][1] == pytest.approx(60 * f, rel=REL)  # 32.196


def test_month_spanning_a_factor_change() -> None:
    # A site override ends the 2022 factor on 15 March 2026 and a 2026 factor of 0.5 takes over.
    factors = FactorLibrary.load().with_overrides(
        [
            {"id": "cn-grid-national-average-2022", "valid_to": "2026-03-15"},
            {"id": "site-grid-2026", "carrier": "electricity", "scope": 2, "value": 0.5,
             "unit": "kgCO2/kWh", "year": 2026, "region": "national", "variant": "average",
             "valid_from": "2026-03-15", "source": "utility contract"},
        ]
    )  # fmt: skip
    book = ledger([point("m.e", "ws1", Carrier.ELECTRICITY, LedgerRole.CONSUMPTION)], factors)
    run(
        book,
        [r("m.e", at(14, 23), 0.0), r("m.e", at(14, 23, 59, 59), 10.0), r("m.e", at(15, 0, 59, 59), 20.0)],
        now=at(15, 2),
    )
    before = cell(book, "ws1", at(14, 23), Carrier.ELECTRICITY, RowSource.METERED)
    after = cell(book, "ws1", at(15, 0), Carrier.ELECTRICITY, RowSource.METERED)
    # 23:00-24:00 on the 14th (local): 10 kWh x 0.5366; 00:00-01:00 on the 15th: 10 kWh x 0.5.
    assert (before.factor_id, after.factor_id) == ("cn-grid-national-average-2022", "site-grid-2026")
    assert before.co2e_kg + after.co2e_kg == pytest.approx(10 * 0.5366 + 10 * 0.5, rel=REL)  # 10.366


def test_late_reading_restates_a_closed_hour() -> None:
    book = ledger([point("m.e", "ws1", Carrier.ELECTRICITY, LedgerRole.CONSUMPTION)])
    first = [r("m.e", at(2, 10), 1000.0), r("m.e", at(2, 10, 20), 1020.0), r("m.e", at(2, 12, 10), 1200.0)]
    run(book, first, now=at(2, 12, 30))
    # The gap 10:20-12:10 is booked where the counter is read next: 10:00 20 kWh, 12:00 180 kWh.
    assert cell(book, "ws1", at(2, 10), Carrier.ELECTRICITY, RowSource.METERED).activity == 20.0
    assert cell(book, "ws1", at(2, 12), Carrier.ELECTRICITY, RowSource.METERED).activity == 180.0
    # At 13:30 the 10:00 hour is closed (it ended 2.5 h ago); a gateway delivers two late values.
    book.ingest(
        [r("m.e", at(2, 10, 50), 1040.0), r("m.e", at(2, 11, 30), 1100.0)], now=at(2, 13, 30).timestamp()
    )
    update = book.compute(now=at(2, 13, 30).timestamp())
    by_hour = {row.hour: row for row in update.rows if row.source is RowSource.METERED}
    # Now 10:00 = 1040 - 1000 = 40; 11:00 = 1100 - 1040 = 60; 12:00 = 1200 - 1100 = 100 kWh.
    assert by_hour[at(2, 10)].co2e_kg == pytest.approx(40 * GRID_2022, rel=REL)
    assert by_hour[at(2, 11)].co2e_kg == pytest.approx(60 * GRID_2022, rel=REL)
    assert by_hour[at(2, 12)].co2e_kg == pytest.approx(100 * GRID_2022, rel=REL)
    restated = {(s.hour, s.source): s for s in update.restatements}
    ten = restated[at(2, 10), RowSource.METERED]
    assert (ten.old_activity, ten.new_activity) == (20.0, 40.0)
    assert ten.old_co2e_kg == pytest.approx(20 * GRID_2022, rel=REL)
    assert "late or corrected readings of m.e" in ten.reason
    assert (at(2, 11), RowSource.METERED) not in restated  # new, not restated
    # The 12:00 hour closed at 13:15 (its end + 15 min), so its change is a restatement too.
    assert restated[at(2, 12), RowSource.METERED].new_activity == 100.0
    # The same readings delivered again change nothing.
    book.ingest(first, now=at(2, 13, 31).timestamp())
    again = book.compute(now=at(2, 13, 31).timestamp())
    assert again.rows == []
    assert again.restatements == []


def test_nested_balance_nodes_do_not_double_count() -> None:
    # The park's substation feeds the enterprise, whose own feeder feeds its workshops.
    book = ledger(
        [
            point("sub.e", "park", Carrier.ELECTRICITY, LedgerRole.SUPPLY),
            point("feeder.e", "ent", Carrier.ELECTRICITY, LedgerRole.SUPPLY),
            point("line.e", "ws1", Carrier.ELECTRICITY, LedgerRole.CONSUMPTION),
        ]
    )
    run(
        book,
        [r("sub.e", at(2, 9), 0.0), r("feeder.e", at(2, 9), 0.0), r("line.e", at(2, 9), 0.0),
         r("sub.e", at(2, 9, 59), 500.0), r("feeder.e", at(2, 9, 59), 400.0), r("line.e", at(2, 9, 59), 300.0)],
        now=at(2, 11),
    )  # fmt: skip
    hour = at(2, 9)
    totals = book.node_hours()
    # Workshop 300 kWh; the enterprise bought 400 (100 unmetered); the park 500 (100 its own).
    assert totals[NodeId("ws1")][hour][1] == pytest.approx(300 * GRID_2022, rel=REL)
    assert totals[NodeId("ent")][hour][1] == pytest.approx(400 * GRID_2022, rel=REL)
    assert totals[NodeId("park")][hour][1] == pytest.approx(500 * GRID_2022, rel=REL)
    assert totals[NodeId("grp")][hour][1] == pytest.approx(500 * GRID_2022, rel=REL)


def test_bad_readings_and_unknown_points_are_not_booked() -> None:
    book = ledger([point("m.e", "ws1", Carrier.ELECTRICITY, LedgerRole.CONSUMPTION)])
    taken = book.ingest(
        [
            r("m.e", at(2, 10), 100.0),
            Reading(point=PointId("m.e"), ts=at(2, 10, 30), value=999.0, quality=Quality.bad("timeout")),
            r("other.e", at(2, 10, 40), 5.0),
            r("m.e", at(2, 10, 50), 110.0),
        ],
        now=at(2, 11).timestamp(),
    )
    assert (taken, book.ignored) == (2, 1)
    book.compute(now=at(2, 11).timestamp())
    assert cell(book, "ws1", at(2, 10), Carrier.ELECTRICITY, RowSource.METERED).activity == 10.0


def test_a_unit_without_factors_fails_at_construction() -> None:
    with pytest.raises(ConfigError, match=r"b\.steam: heat factors are per GJ, the point measures t"):
        ledger([point("b.steam", "ws1", Carrier.HEAT, LedgerRole.CONSUMPTION, "t/h", rate=True)])
