"""The verification service on the real PostgreSQL and Redis: a known load, a known cut, measured.

Six weeks of 15-minute rollups are written the way the historian keeps them (a counter's ``last``
per bucket; a power's ``sum``/``count``): a workday profile whose level moves from day to day, and
on the event day a cut of 30 kW for two hours followed by a 10 kW rebound for one. The service must
find the ended dispatch, measure about 60 - 10 = 50 kWh net, store it, audit it, and publish an entry
on ``command_results`` that the existing result consumers skip.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
import redis.asyncio as aioredis

from control_engine.dispatcher import DispatchMode, DispatchRequest, DispatchState, DispatchStore
from control_engine.verify_service import (
    ENTRY_KIND,
    Verification,
    VerificationService,
    VerificationStatus,
    VerificationStore,
)
from scada.catalog import ledger_points, sync_catalog
from scada.config import SiteConfig, parse_site
from scada.db import migrate
from scada.model import Carrier, DecodeError, NodeId, PointId
from scada.runtime import FakeClock
from streams.codec import decode_json_event, encode_json_event
from streams.commands import decode_result

TZ = ZoneInfo("Asia/Shanghai")
STEP = timedelta(minutes=15)

SITE = """
site: {id: s, name: S}
hierarchy:
  - id: grp
    name: Group
    level: group
    children:
      - id: park
        name: Park
        level: park
        children:
          - id: ent
            name: Enterprise
            level: enterprise
            children:
              - {id: ws, name: Workshop, level: workshop}
              - {id: store, name: Store, level: workshop}
devices:
  - id: hvac
    node: ws
    kind: chiller
    protocol: modbus_tcp
    modbus: {host: 127.0.0.1, port: 1502, unit_id: 1}
    points:
      - {key: e_kwh, kind: energy_counter, unit: kWh, carrier: electricity, modbus: {address: 0, type: uint32}}
      - {key: setpoint_c, kind: setpoint, unit: degC, writable: true, modbus: {address: 10, type: uint16}}
  - id: lights
    node: ws
    kind: lighting
    protocol: modbus_tcp
    modbus: {host: 127.0.0.1, port: 1502, unit_id: 2}
    points:
      - {key: p_kw, kind: power, unit: kW, carrier: electricity, modbus: {address: 0, type: float32}}
      - {key: dim_pct, kind: setpoint, unit: "%", writable: true, modbus: {address: 10, type: uint16}}
  - id: fan
    node: store
    kind: chiller
    protocol: modbus_tcp
    modbus: {host: 127.0.0.1, port: 1502, unit_id: 3}
    points:
      - {key: speed_pct, kind: setpoint, unit: "%", writable: true, modbus: {address: 10, type: uint16}}
"""

EVENT_DAY = date(2026, 10, 14)  # a Wednesday
EVENT_START = datetime.combine(EVENT_DAY, time(14, 0), TZ)
EVENT_END = EVENT_START + timedelta(hours=2)
CUT_KW = 30.0
REBOUND_KW = 10.0
EXPECTED_NET_KWH = CUT_KW * 2 - REBOUND_KW * 1


def load_kw(at: datetime, *, cut: bool) -> float:
    """A workday load: 40 kW at night, 100 kW x a day level from 08:00 to 18:00; lower at weekends."""
    local = at.astimezone(TZ)
    day = local.date()
    level = 1.0 + 0.06 * math.sin(day.toordinal() * 1.7)  # the day-to-day level: busier, quieter days
    wiggle = 0.5 * math.sin(local.hour * 3.1 + local.minute / 15 + day.toordinal())  # < 1 % per interval
    kw = (100.0 if 8 <= local.hour < 18 else 40.0) * level + wiggle
    if day.weekday() >= 5:
        kw *= 0.5
    if cut and EVENT_START <= at < EVENT_END:
        kw -= CUT_KW
    if cut and EVENT_END <= at < EVENT_END + timedelta(hours=1):
        kw += REBOUND_KW
    return kw


async def seed_counter(
    conn: asyncpg.Connection,
    point: str,
    start: datetime,
    end: datetime,
    *,
    cut: bool,
    skip: frozenset[datetime] | set[datetime] = frozenset(),
) -> None:
    """Write a kWh counter's 15-minute rollups (``last`` per bucket), as the historian would."""
    key = await conn.fetchval("SELECT id FROM points WHERE point_id = $1", point)
    rows = []
    total = 10_000.0
    at = start
    while at < end:
        total += load_kw(at, cut=cut) * 0.25
        if at not in skip:
            last_ts = at + timedelta(minutes=14, seconds=59)
            rows.append((key, at, 15, total * 15, total, total, at, total, last_ts, total))
        at += STEP
    await conn.copy_records_to_table(
        "readings_15m",
        records=rows,
        columns=["point", "bucket", "count", "sum", "min", "max", "first_ts", "first", "last_ts", "last"],
    )


async def seed_power(conn: asyncpg.Connection, point: str, start: datetime, end: datetime, kw: float) -> None:
    """Write a constant power's 15-minute rollups (mean = ``kw``)."""
    key = await conn.fetchval("SELECT id FROM points WHERE point_id = $1", point)
    rows = []
    at = start
    while at < end:
        rows.append((key, at, 15, kw * 15, kw, kw, at, kw, at + timedelta(minutes=14), kw))
        at += STEP
    await conn.copy_records_to_table(
        "readings_15m",
        records=rows,
        columns=["point", "bucket", "count", "sum", "min", "max", "first_ts", "first", "last_ts", "last"],
    )


@pytest.fixture
async def site() -> SiteConfig:
    return parse_site(SITE)


@pytest.fixture
async def pool(pg_url: str, site: SiteConfig) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
        await sync_catalog(conn, site)
    yield pool
    await pool.close()


async def ended_dispatch(
    pool: asyncpg.Pool,
    point: str,
    node: str,
    start: datetime,
    end: datetime,
    *,
    reverted: bool = True,
) -> int:
    """Record a dispatch that was written at ``start`` and reverted at ``end`` (the dispatcher's states)."""
    store = DispatchStore(pool)
    created = await store.create(
        DispatchRequest(node=NodeId(node), point=PointId(point), value=26, reason="stage 1", hold_until=end),
        DispatchMode.AUTO,
        DispatchState.APPROVED,
    )
    await store.transition(created.id, [DispatchState.APPROVED], DispatchState.SENDING, previous_value=24)
    result = {"status": "verified", "ts": start.astimezone(UTC).isoformat(), "attempts": 1}
    await store.transition(created.id, [DispatchState.SENDING], DispatchState.VERIFIED, result=result)
    if reverted:
        await store.transition(created.id, [DispatchState.VERIFIED], DispatchState.REVERTING)
        revert = {"status": "verified", "ts": (end + timedelta(seconds=1)).astimezone(UTC).isoformat()}
        await store.transition(
            created.id, [DispatchState.REVERTING], DispatchState.REVERTED, result={**result, "revert": revert}
        )
    async with pool.acquire() as conn:  # made when it was sent, not when this test ran
        await conn.execute("UPDATE dispatches SET created_at = $2 WHERE id = $1", created.id, start)
    return created.id


class Recorder:
    """The audit callable and the publisher, recording what they were given."""

    def __init__(self, redis: aioredis.Redis | None = None, results_key: str = "") -> None:
        self.audits: list[tuple[str, str, str, Mapping[str, Any]]] = []
        self.published: list[Mapping[str, Any]] = []
        self._redis, self._key = redis, results_key

    async def audit(self, actor: str, action: str, target: str, detail: Mapping[str, Any]) -> None:
        self.audits.append((actor, action, target, detail))

    async def publish(self, body: Mapping[str, Any]) -> None:
        # What scada/app.py does: a JSON event of its own type on the command_results stream.
        self.published.append(body)
        if self._redis is not None:
            fields: Any = encode_json_event(ENTRY_KIND.encode(), body)
            await self._redis.xadd(self._key, fields, maxlen=10_000, approximate=True)


def make_service(
    site: SiteConfig, pool: asyncpg.Pool, clock: FakeClock, recorder: Recorder, **kwargs: Any
) -> VerificationService:
    factors = site.factor_library()
    return VerificationService(
        VerificationStore(pool),
        ledger_points(site, factors),
        factors,
        region=site.carbon.grid_region,
        timezone=site.site.timezone,
        clock=clock,
        audit=recorder.audit,
        publish=recorder.publish,
        **kwargs,
    )


HISTORY_START = datetime.combine(EVENT_DAY - timedelta(days=47), time(0), TZ).astimezone(UTC)
DATA_END = datetime.combine(EVENT_DAY + timedelta(days=1), time(0), TZ).astimezone(UTC)


async def test_the_injected_cut_is_measured_stored_audited_and_published(
    site: SiteConfig, pool: asyncpg.Pool, redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    async with pool.acquire() as conn:
        await seed_counter(conn, "hvac.e_kwh", HISTORY_START, DATA_END, cut=True)
    dispatch_id = await ended_dispatch(pool, "hvac.setpoint_c", "ws", EVENT_START, EVENT_END)
    results_key = f"{stream_prefix}command_results"
    recorder = Recorder(redis_client, results_key)
    clock = FakeClock(EVENT_END.astimezone(UTC) + timedelta(hours=2))
    service = make_service(site, pool, clock, recorder)

    [verification] = await service.turn()

    assert verification.status is VerificationStatus.MEASURED, verification.reason
    assert verification.meters == ("hvac.e_kwh",)
    assert verification.meter_basis.value == "device"
    assert verification.energy_avoided_kwh is not None
    assert verification.uncertainty_kwh is not None
    # The day-of adjustment takes out the day's level; what is left is the < 1 % wiggle.
    assert abs(verification.energy_avoided_kwh - EXPECTED_NET_KWH) < 1.0, verification
    assert verification.uncertainty_kwh < 10.0
    assert verification.rebound_kwh == pytest.approx(REBOUND_KW, abs=0.5)
    factor = site.factor_library().in_force(Carrier.ELECTRICITY, EVENT_START, site.carbon.grid_region)
    assert verification.factor_ids == (factor.id,)
    assert verification.co2e_avoided_kg == pytest.approx(verification.energy_avoided_kwh * factor.value)
    assert verification.days_used == 10
    assert verification.month == "2026-10"
    assert verification.event_start == EVENT_START
    assert verification.event_end == EVENT_END
    assert verification.post_end == EVENT_END + timedelta(hours=1)
    assert "not_significant" not in verification.flags

    stored = await service.store.get(dispatch_id)
    assert stored is not None
    assert stored.energy_avoided_kwh == pytest.approx(verification.energy_avoided_kwh)
    assert len(stored.detail["intervals"]) == 12  # 8 event + 4 post intervals
    assert [(a[0], a[1], a[2]) for a in recorder.audits] == [
        ("verifier", "dispatch.verify", f"dispatch:{dispatch_id}")
    ]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT audited_at IS NOT NULL FROM dispatch_verifications") is True

    # The entry on command_results: its own type, skipped by the command-result decoders.
    entries: Any = await redis_client.xrange(results_key)
    [(_entry_id, fields)] = entries
    with pytest.raises(DecodeError):
        decode_result(fields)
    body = decode_json_event(fields, ENTRY_KIND.encode())
    assert (body["kind"], body["dispatch_id"], body["status"]) == (ENTRY_KIND, dispatch_id, "measured")

    assert await service.turn() == []  # measured once
    assert len(recorder.audits) == 1


async def test_unmeasurable_dispatches_get_a_row_with_the_reason_once(
    site: SiteConfig, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as conn:
        # One day of history for the lights, and not its morning: no similar day at all.
        await seed_power(conn, "lights.p_kw", EVENT_START - timedelta(days=1), DATA_END, 20.0)
    no_meter = await ended_dispatch(pool, "fan.speed_pct", "store", EVENT_START, EVENT_END)
    short = await ended_dispatch(pool, "lights.dim_pct", "ws", EVENT_START, EVENT_END)
    recorder = Recorder()
    clock = FakeClock(EVENT_END.astimezone(UTC) + timedelta(hours=2))
    service = make_service(site, pool, clock, recorder)

    found = {v.dispatch_id: v for v in await service.turn()}

    assert {k: v.status for k, v in found.items()} == {
        no_meter: VerificationStatus.UNMEASURABLE,
        short: VerificationStatus.UNMEASURABLE,
    }
    assert found[no_meter].reason.startswith("no meter: device fan")
    assert found[no_meter].meters == ()
    assert found[short].reason.startswith("history: 0 usable workday day(s)"), found[short].reason
    assert found[short].meters == ("lights.p_kw",)
    assert len(recorder.audits) == 2
    await clock.advance(3600)
    assert await service.turn() == []  # not tried again
    assert len(recorder.audits) == 2


async def wait_for_row(pool: asyncpg.Pool, dispatch_id: int) -> Verification:
    store = VerificationStore(pool)
    for _ in range(200):
        found = await store.get(dispatch_id)
        if found is not None:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"dispatch {dispatch_id} was not verified")


async def test_late_data_is_waited_for_and_a_restart_catches_up(site: SiteConfig, pool: asyncpg.Pool) -> None:
    late = {EVENT_START + STEP * 2, EVENT_START + STEP * 3}
    async with pool.acquire() as conn:
        await seed_counter(conn, "hvac.e_kwh", HISTORY_START, DATA_END, cut=True, skip=late)
    dispatch_id = await ended_dispatch(pool, "hvac.setpoint_c", "ws", EVENT_START, EVENT_END)
    recorder = Recorder()
    too_early = FakeClock(EVENT_END.astimezone(UTC) + timedelta(minutes=30))  # the rebound hour is not over
    assert await make_service(site, pool, too_early, recorder).turn() == []
    gap = FakeClock(EVENT_END.astimezone(UTC) + timedelta(hours=2))
    assert await make_service(site, pool, gap, recorder).turn() == []  # data missing, within the grace
    assert recorder.audits == []

    # The gateway catches up: the two buckets arrive (and the bucket after them, whose step they end).
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM readings_15m")
        await seed_counter(conn, "hvac.e_kwh", HISTORY_START, DATA_END, cut=True)

    # A restarted service verifies what is due at once, before its first period has passed.
    clock = FakeClock(EVENT_END.astimezone(UTC) + timedelta(hours=3))
    service = make_service(site, pool, clock, recorder, period_s=3600)
    task = asyncio.create_task(service.run())
    try:
        verification = await wait_for_row(pool, dispatch_id)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert verification.status is VerificationStatus.MEASURED
    assert verification.energy_avoided_kwh == pytest.approx(EXPECTED_NET_KWH, abs=1.0)
    assert "event_data_gap" not in verification.flags


async def test_after_the_grace_a_gap_is_measured_with_a_flag(site: SiteConfig, pool: asyncpg.Pool) -> None:
    missing = {EVENT_START + STEP * 4}
    async with pool.acquire() as conn:
        await seed_counter(conn, "hvac.e_kwh", HISTORY_START, DATA_END, cut=True, skip=missing)
    dispatch_id = await ended_dispatch(pool, "hvac.setpoint_c", "ws", EVENT_START, EVENT_END, reverted=False)
    clock = FakeClock(EVENT_END.astimezone(UTC) + timedelta(hours=8))  # past the 6 h grace
    [verification] = await make_service(site, pool, clock, Recorder()).turn()
    assert verification.dispatch_id == dispatch_id
    assert verification.status is VerificationStatus.MEASURED
    # The missing bucket and the one after it (its counter step has no start) count nothing.
    assert {"event_data_gap", "not_reverted"} <= set(verification.flags)
    assert verification.detail["missing_intervals"] == 2
    assert json.dumps(verification.to_json(with_detail=True))  # JSON-safe for the API
