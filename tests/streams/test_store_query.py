"""Downsampled history, counter deltas and node roll-ups over the real local PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from _streams_helpers import T0, reading

from scada.model import PointId, Quality, QualityCode
from streams.historian import HistorianStage
from streams.query import DownsampleMode, Source, StepKind, counter_delta
from streams.store import _DELTA_SQL, PostgresReadingStore, backfill_rollups

# The rollup tables as migration 003 defines them (a no-op once it has run; kept for databases
# migrated without it).
ROLLUP_DDL = "\n".join(
    f"""CREATE TABLE IF NOT EXISTS readings_{name} (
        point integer NOT NULL, bucket timestamptz NOT NULL, count integer NOT NULL,
        sum double precision, min double precision, max double precision,
        first_ts timestamptz, first double precision, last_ts timestamptz, last double precision,
        PRIMARY KEY (point, bucket));"""
    for name in ("1m", "15m", "1h")
)

P1 = PointId("m1.power_kw")


@pytest.fixture
async def rollups(pool: asyncpg.Pool) -> asyncpg.Pool:
    async with pool.acquire() as conn:
        await conn.execute(ROLLUP_DDL)
    return pool


async def load(pool: asyncpg.Pool, readings: list) -> None:
    """Write readings straight to the table (making daily partitions), independently of the historian."""
    async with pool.acquire() as conn:
        keys = {r["point_id"]: r["id"] for r in await conn.fetch("SELECT id, point_id FROM points")}
        for day in sorted({r.ts.astimezone(UTC).date() for r in readings}):
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS readings_p{day:%Y%m%d} PARTITION OF readings"
                f" FOR VALUES FROM ('{start.isoformat()}') TO ('{(start + timedelta(days=1)).isoformat()}')"
            )
        await conn.copy_records_to_table(
            "readings",
            records=[
                (keys[r.point], r.ts, r.value, int(r.quality.code), r.quality.reason or None)
                for r in readings
            ],
            columns=("point", "ts", "value", "quality", "reason"),
        )


def _two_hours_with_an_outage() -> list:
    """One reading a second for two hours; bad from 00:40 to 00:50; a spike at 01:30:07."""
    out = []
    for s in range(7200):
        ts = T0 + timedelta(seconds=s)
        if 2400 <= s < 3000:
            out.append(reading(P1, ts, None, Quality.bad("device offline: timeout")))
        else:
            out.append(reading(P1, ts, 100.0 if s == 5407 else float(s % 60)))
    return out


async def test_raw_source_keeps_the_outage_visible(pool: asyncpg.Pool) -> None:
    await load(pool, _two_hours_with_an_outage())
    store = PostgresReadingStore(pool)
    result = await store.downsampled(
        P1, T0, T0 + timedelta(hours=2), points=2000, mode=DownsampleMode.LTTB, raw_period_s=1.0
    )
    assert result.source is Source.RAW  # 7,200 rows <= 4 x 2,000
    assert not result.truncated
    assert 1900 <= len(result.readings) <= 2010
    bad = [r for r in result.readings if r.quality.code is QualityCode.BAD]
    assert [r.ts for r in bad] == [T0 + timedelta(seconds=2400)]  # one marker per outage
    assert bad[0].quality.reason == "device offline: timeout"
    # Nothing is drawn inside the outage.
    assert not [
        r for r in result.readings if T0 + timedelta(seconds=2400) < r.ts < T0 + timedelta(seconds=3000)
    ]
    assert [r.ts for r in result.readings] == sorted(r.ts for r in result.readings)


async def test_rollup_source_when_raw_is_too_much(rollups: asyncpg.Pool) -> None:
    await load(rollups, _two_hours_with_an_outage())
    async with rollups.acquire() as conn:
        await backfill_rollups(conn, T0, T0 + timedelta(hours=2))
    store = PostgresReadingStore(rollups)
    result = await store.downsampled(
        P1, T0, T0 + timedelta(hours=2), points=100, mode=DownsampleMode.LTTB, raw_period_s=1.0
    )
    assert result.source is Source.M1  # 120 minutes >= 100 > 8 quarter hours
    assert len(result.readings) <= 110
    bad = [r for r in result.readings if r.quality.code is QualityCode.BAD]
    assert [r.ts for r in bad] == [T0 + timedelta(minutes=40)]
    assert bad[0].quality.reason == "no good values"
    assert not [r for r in result.readings if T0 + timedelta(minutes=40) < r.ts < T0 + timedelta(minutes=50)]
    good = [r for r in result.readings if r.quality.is_good]
    assert all(r.ts.second == 0 for r in good)  # stamped with the bucket start
    assert good[0].value == pytest.approx(29.5)  # the mean of 0..59

    peaks = await store.downsampled(
        P1, T0, T0 + timedelta(hours=2), points=100, mode=DownsampleMode.MINMAX, raw_period_s=1.0
    )
    assert peaks.source is Source.M1
    assert len(peaks.readings) <= 110
    assert max(r.value or 0 for r in peaks.readings) == 100.0  # the spike survives
    assert [r.ts for r in peaks.readings if r.value == 100.0] == [T0 + timedelta(minutes=90)]


async def test_missing_buckets_become_one_gap(rollups: asyncpg.Pool) -> None:
    """No rows at all for a while (historian down): one marker, no line across it."""
    await load(
        rollups, [reading(P1, T0 + timedelta(minutes=m), 1.0) for m in range(600) if not 200 <= m < 300]
    )
    async with rollups.acquire() as conn:
        await backfill_rollups(conn, T0, T0 + timedelta(hours=10))
    result = await PostgresReadingStore(rollups).downsampled(
        P1, T0, T0 + timedelta(hours=10), points=100, mode=DownsampleMode.LTTB, raw_period_s=60.0
    )
    assert result.source is Source.M1
    gaps = [r for r in result.readings if not r.quality.is_good]
    assert [(r.ts, r.quality.reason) for r in gaps] == [(T0 + timedelta(minutes=200), "no good values")]


async def test_without_rollup_tables_raw_is_downsampled(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("DROP TABLE IF EXISTS readings_1m, readings_15m, readings_1h")
    await load(pool, _two_hours_with_an_outage())
    result = await PostgresReadingStore(pool).downsampled(
        P1, T0, T0 + timedelta(hours=2), points=100, mode=DownsampleMode.MINMAX, raw_period_s=1.0
    )
    assert result.source is Source.RAW
    assert len(result.readings) <= 110
    spike = [r for r in result.readings if r.value == 100.0]
    assert [r.ts for r in spike] == [T0 + timedelta(seconds=5407)]  # raw keeps the true instant


# --------------------------------------------------------------------------------------------------
# Counters

E1, E2, GAS, OTHER = "e1.energy_kwh", "e2.energy_kwh", "g1.gas_nm3", "x1.energy_kwh"


async def _counter_site(conn: asyncpg.Connection) -> dict[str, int]:
    """Park p > enterprise e > workshop w; e1 (uint16 x 0.1: wraps at 6553.6) on w, e2 on e, gas on w."""
    await conn.execute(
        """INSERT INTO nodes (id, name, level, parent) VALUES
           ('g', 'G', 'group', NULL), ('p', 'P', 'park', 'g'), ('e', 'E', 'enterprise', 'p'),
           ('w', 'W', 'workshop', 'e'), ('p2', 'P2', 'park', 'g')"""
    )
    ids = {}
    for point, node, kind, unit, carrier, wrap in [
        (E1, "w", "energy_counter", "kWh", "electricity", 6553.6),
        (E2, "e", "energy_counter", "kWh", "electricity", None),
        (GAS, "w", "gas_counter", "Nm3", "natural_gas", None),
        (OTHER, "p2", "energy_counter", "kWh", "electricity", None),
    ]:
        device, key = point.split(".")
        await conn.execute(
            "INSERT INTO devices (id, node_id, name, kind, protocol) VALUES ($1, $2, $1, 'power_meter', 'modbus')",
            device,
            node,
        )
        ids[point] = await conn.fetchval(
            """INSERT INTO points (point_id, device_id, key, name, kind, unit, carrier, counter_wrap)
               VALUES ($1, $2, $3, $3, $4, $5, $6, $7) RETURNING id""",
            point,
            device,
            key,
            kind,
            unit,
            carrier,
            wrap,
        )
    return ids


# Hourly counter readings (at :30 of each hour) from T0 - 1 h: the first one lies before the range.
E1_VALUES = [6000.0, 6200.0, 6400.0, 6540.0, 50.0, 250.0, None, 300.0, 280.0, 20.0, 60.0]
#             before   +200    +200    +140   wrap    +200   bad    +50  jitter reset  +40
E1_EXPECTED = [200.0, 200.0, 140.0, 63.6, 200.0, 50.0, 0.0, 20.0, 40.0]
E2_VALUES = [1000.0 + 10 * i for i in range(len(E1_VALUES))]


@pytest.fixture
async def counters(rollups: asyncpg.Pool) -> asyncpg.Pool:
    async with rollups.acquire() as conn:
        await _counter_site(conn)
    batch = []
    for i, (v1, v2) in enumerate(zip(E1_VALUES, E2_VALUES, strict=True)):
        ts = T0 - timedelta(hours=1) + timedelta(hours=i, minutes=30)
        q = Quality.good() if v1 is not None else Quality.bad("timeout")
        batch += [
            reading(E1, ts, v1, q),
            reading(E2, ts, v2),
            reading(GAS, ts, 5.0 * i),
            reading(OTHER, ts, 1e6 + i),
        ]
    await load(rollups, batch)
    async with rollups.acquire() as conn:
        await backfill_rollups(conn, T0 - timedelta(days=1), T0 + timedelta(days=1))
    return rollups


async def test_counter_deltas_across_wrap_reset_and_gaps(counters: asyncpg.Pool) -> None:
    store = PostgresReadingStore(counters)
    result = await store.counter_deltas(PointId(E1), T0, T0 + timedelta(hours=10), interval="1h")
    hours = [T0 + timedelta(hours=h) for h in range(10) if h != 5]  # hour 5 had only a bad reading
    assert [r.start for r in result] == hours
    assert [r.delta for r in result] == pytest.approx(E1_EXPECTED)
    assert [r.kind for r in result] == [
        StepKind.NORMAL,
        StepKind.NORMAL,
        StepKind.NORMAL,
        StepKind.WRAP,
        StepKind.NORMAL,
        StepKind.NORMAL,
        StepKind.JITTER,
        StepKind.RESET,
        StepKind.NORMAL,
    ]
    # A range starting mid-hour is aligned to the hour; 15-minute intervals agree in sum.
    quarter = await store.counter_deltas(
        PointId(E1), T0 + timedelta(minutes=20), T0 + timedelta(hours=10), interval="15m"
    )
    assert sum(r.delta for r in quarter) == pytest.approx(sum(E1_EXPECTED))


async def test_node_energy_sums_the_subtree(counters: asyncpg.Pool) -> None:
    store = PostgresReadingStore(counters)
    end = T0 + timedelta(hours=10)
    park = await store.node_energy("p", T0, end, interval="1h", carrier="electricity")
    e2 = await store.counter_deltas(PointId(E2), T0, end, interval="1h")
    e1 = {r.start: r.delta for r in await store.counter_deltas(PointId(E1), T0, end, interval="1h")}
    assert [r.start for r in park] == [r.start for r in e2]
    for row, two in zip(park, e2, strict=True):
        assert row.unit == "kWh"
        assert row.energy == pytest.approx(two.delta + e1.get(row.start, 0.0))
        assert row.points == (2 if row.start in e1 else 1)
    workshop = await store.node_energy("w", T0, end, interval="1h", carrier="electricity")
    assert [r.energy for r in workshop] == pytest.approx(E1_EXPECTED)  # e2 hangs on the enterprise
    gas = await store.node_energy("p", T0, end, interval="1h", carrier="natural_gas")
    assert {r.unit for r in gas} == {"Nm3"}
    assert sum(r.energy for r in gas) == pytest.approx(50.0)
    every = await store.node_energy("g", T0, end, interval="1h", carrier=None)
    assert {r.unit for r in every} == {"kWh", "Nm3"}


async def test_days_follow_the_time_zone(counters: asyncpg.Pool) -> None:
    store = PostgresReadingStore(counters)
    # T0 is 20:00 in Shanghai: hours 0-3 fall on 5 January there, the rest on the 6th. The range
    # starts at that local midnight, so it also holds the reading of T0 - 30 min: its first value
    # starts the count.
    days = await store.node_energy(
        "w", T0, T0 + timedelta(hours=10), interval="1d", carrier="electricity", timezone="Asia/Shanghai"
    )
    assert [r.start for r in days] == [
        datetime(2026, 1, 4, 16, tzinfo=UTC),
        datetime(2026, 1, 5, 16, tzinfo=UTC),
    ]
    assert days[0].energy == pytest.approx(sum(E1_EXPECTED[:4]))
    assert days[1].energy == pytest.approx(sum(E1_EXPECTED[4:]))  # the reset inside the day counts
    [one] = await store.counter_deltas(
        PointId(E1),
        T0 + timedelta(hours=5),
        T0 + timedelta(hours=10),
        interval="1d",
        timezone="Asia/Shanghai",
    )
    assert one.delta == pytest.approx(sum(E1_EXPECTED[4:]))
    assert one.kind is StepKind.RESET


async def test_unknown_interval_is_refused(counters: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="interval"):
        await PostgresReadingStore(counters).counter_deltas(
            PointId(E1), T0, T0 + timedelta(hours=1), interval="2h"
        )


@pytest.mark.parametrize(
    ("prev", "cur", "wrap"),
    [
        (100.0, 130.0, None),
        (6540.0, 50.0, 6553.6),
        (3000.0, 50.0, 6553.6),
        (300.0, 280.0, None),
        (280.0, 20.0, None),
        (6553.6, 0.0, 6553.6),
        (5.0, -1.0, 6553.6),
        (1.0, -1.0, 1.0),
    ],
)
async def test_sql_delta_rule_matches_python(
    pool: asyncpg.Pool, prev: float, cur: float, wrap: float | None
) -> None:
    sql = f"SELECT {_DELTA_SQL} FROM (SELECT $1::float8 AS prev, $2::float8 AS last_v, $3::float8 AS wrap) s"
    sql = sql.replace("$6", "$4").replace("$7", "$5")
    async with pool.acquire() as conn:
        got = await conn.fetchval(sql, prev, cur, wrap, 0.1, 0.1)
    assert got == pytest.approx(counter_delta(prev, cur, wrap=wrap).delta)


async def test_rollups_merged_by_the_historian_give_the_same_answers(rollups: asyncpg.Pool) -> None:
    """The queries read what the historian maintains exactly as what backfill_rollups builds."""
    async with rollups.acquire() as conn:
        await _counter_site(conn)
    historian = HistorianStage(rollups, max_future_s=None)
    batch = []
    for i, v1 in enumerate(E1_VALUES):
        ts = T0 - timedelta(hours=1) + timedelta(hours=i, minutes=30)
        batch.append(reading(E1, ts, v1, Quality.good() if v1 is not None else Quality.bad("timeout")))
    await historian.handle(batch[:5])
    await historian.handle(batch[5:])  # merged into existing buckets
    store = PostgresReadingStore(rollups)
    result = await store.counter_deltas(PointId(E1), T0, T0 + timedelta(hours=10), interval="1h")
    assert [r.delta for r in result] == pytest.approx(E1_EXPECTED)
    park = await store.node_energy("p", T0, T0 + timedelta(hours=10), interval="1h", carrier="electricity")
    assert [r.energy for r in park] == pytest.approx(E1_EXPECTED)
