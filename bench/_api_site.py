"""The site and the data of the API bench: one enterprise per tenant, each with one meter.

Imported by ``bench/api.py`` as ``_api_site`` (the benches run as scripts). The shape: one group,
``PARKS`` parks, ``tenants`` enterprises spread evenly over them, each enterprise with one workshop
and one Modbus meter (``p_kw`` power, ``e_kwh`` energy counter), and one tenant owning each enterprise.
Nothing polls the meters (the bench runs only the API role): their data is written straight into
PostgreSQL by :func:`seed`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from streams.codec import ReadingRows, WireRow
from streams.historian import HistorianStage

PARKS = 10
READINGS_SPAN = timedelta(hours=6)
READINGS_PERIOD_S = 60
LEDGER_SPAN = timedelta(days=30)
GRID_FACTOR_KG_PER_KWH = 0.5703
"""Scope-2 factor used for the seeded ledger rows (the national grid average of 2022, MEE 2024)."""
HISTORIAN_BATCH_ROWS = 20_000
_GOOD = 2  # QualityCode.GOOD


@dataclass(frozen=True, slots=True)
class TenantIds:
    """The ids of one tenant's enterprise, workshop, meter and power point."""

    tenant: str
    enterprise: str
    workshop: str
    device: str

    @property
    def power_point(self) -> str:
        """Return the id of the meter's power point."""
        return f"{self.device}.p_kw"

    @property
    def energy_point(self) -> str:
        """Return the id of the meter's energy counter."""
        return f"{self.device}.e_kwh"


def tenant_ids(tenants: int) -> list[TenantIds]:
    """Return the ids of tenants ``1..tenants`` (``t0001`` owns ``ent-0001``, ``ws-0001``, ``dev-0001``).

    >>> tenant_ids(2)[1]
    TenantIds(tenant='t0002', enterprise='ent-0002', workshop='ws-0002', device='dev-0002')
    """
    if tenants < 1:
        raise ValueError("--tenants: at least 1")
    width = max(4, len(str(tenants)))
    return [
        TenantIds(f"t{i:0{width}d}", f"ent-{i:0{width}d}", f"ws-{i:0{width}d}", f"dev-{i:0{width}d}")
        for i in range(1, tenants + 1)
    ]


def site_yaml(ids: list[TenantIds]) -> str:
    """Return the site file: hierarchy, a meter template, one device and one tenant per enterprise."""
    per_park = math.ceil(len(ids) / PARKS)
    lines = [
        "site: {id: bench-api, name: API bench, timezone: Asia/Shanghai}",
        "hierarchy:",
        "  - id: grp",
        "    name: Bench group",
        "    level: group",
        "    children:",
    ]
    for park in range(PARKS):
        members = ids[park * per_park : (park + 1) * per_park]
        if not members:
            break
        lines += [
            f"      - id: park-{park + 1:02d}",
            f"        name: Park {park + 1:02d}",
            "        level: park",
            "        children:",
        ]
        lines += [
            f"          - {{id: {t.enterprise}, name: Enterprise {t.enterprise}, level: enterprise, "
            f"children: [{{id: {t.workshop}, name: Workshop {t.workshop}, level: workshop}}]}}"
            for t in members
        ]
    lines += [
        "templates:",
        "  meter:",
        "    points:",
        "      - {key: p_kw, kind: power, unit: kW, carrier: electricity,"
        " modbus: {address: 0, type: float32}}",
        "      - {key: e_kwh, kind: energy_counter, unit: kWh, carrier: electricity,"
        " modbus: {address: 2, type: uint32}}",
        "devices:",
    ]
    lines += [
        f"  - {{id: {t.device}, node: {t.workshop}, kind: power_meter, protocol: modbus_tcp, "
        f"template: meter, poll_period_s: {READINGS_PERIOD_S}, "
        "modbus: {host: 127.0.0.1, port: 9, unit_id: 1}}"
        for t in ids
    ]
    lines.append("tenants:")
    lines += [f"  - {{id: {t.tenant}, name: Tenant {t.tenant}, nodes: [{t.enterprise}]}}" for t in ids]
    return "\n".join(lines) + "\n"


def _reading_rows(ids: list[TenantIds], end: datetime, rng: random.Random) -> list[WireRow]:
    """Return every point's readings of the last ``READINGS_SPAN`` at ``READINGS_PERIOD_S``, as wire rows."""
    steps = int(READINGS_SPAN.total_seconds()) // READINGS_PERIOD_S
    end_us = int(end.timestamp()) * 1_000_000
    stamps = [end_us - (steps - 1 - k) * READINGS_PERIOD_S * 1_000_000 for k in range(steps)]
    rows: list[WireRow] = []
    for t in ids:
        level_kw = rng.uniform(20.0, 200.0)
        counter_kwh = rng.uniform(1e4, 1e6)
        power, energy = t.power_point, t.energy_point
        for ts_us in stamps:
            kw = max(0.0, level_kw * (1 + 0.2 * math.sin(ts_us / 3.6e9)) + rng.gauss(0.0, 2.0))
            counter_kwh += kw * READINGS_PERIOD_S / 3600
            rows.append((power, ts_us, round(kw, 3), _GOOD, None))
            rows.append((energy, ts_us, round(counter_kwh, 1), _GOOD, None))
    return rows


def _ledger_records(ids: list[TenantIds], end_hour: datetime, rng: random.Random) -> list[tuple[Any, ...]]:
    """Return ``ledger_hourly`` rows: each workshop's metered grid electricity per hour of ``LEDGER_SPAN``."""
    hours = int(LEDGER_SPAN.total_seconds()) // 3600
    stamps = [end_hour - timedelta(hours=hours - 1 - k) for k in range(hours)]
    records: list[tuple[Any, ...]] = []
    for t in ids:
        level_kwh = rng.uniform(20.0, 200.0)
        for hour in stamps:
            kwh = level_kwh * (0.6 + 0.4 * math.sin(hour.hour / 24 * 2 * math.pi))
            records.append(
                (
                    t.workshop,
                    hour,
                    "electricity",
                    "metered",
                    2,
                    kwh,
                    "kWh",
                    kwh * GRID_FACTOR_KG_PER_KWH,
                    None,
                    1,
                )
            )
    return records


_LEDGER_COLUMNS = (
    "node_id",
    "hour",
    "carrier",
    "source",
    "scope",
    "activity",
    "unit",
    "co2e_kg",
    "factor_id",
    "points",
)


async def seed(url: str, ids: list[TenantIds], *, now: datetime, seed: int = 1) -> dict[str, Any]:
    """Write the readings (through the historian, which also fills the rollups) and the hourly ledger.

    Run after the server has migrated the database and synced the catalog (the points must exist).
    """
    rng = random.Random(seed)
    t0 = time.perf_counter()
    pool = await asyncpg.create_pool(url, min_size=2, max_size=2, command_timeout=600)
    try:
        end = now.replace(second=0, microsecond=0)
        rows = _reading_rows(ids, end, rng)
        historian = HistorianStage(pool, timeout_s=600, clock=None)
        for start in range(0, len(rows), HISTORIAN_BATCH_ROWS):
            await historian.handle(ReadingRows(rows[start : start + HISTORIAN_BATCH_ROWS]))
        t_readings = time.perf_counter()
        records = _ledger_records(ids, now.astimezone(UTC).replace(minute=0, second=0, microsecond=0), rng)
        async with pool.acquire() as conn:
            await conn.copy_records_to_table("ledger_hourly", records=records, columns=_LEDGER_COLUMNS)
            await conn.execute("ANALYZE readings; ANALYZE readings_1m; ANALYZE ledger_hourly; ANALYZE nodes")
    finally:
        await pool.close()
    return {
        "readings_rows": historian.inserted_total,
        "ledger_rows": len(records),
        "seed_readings_s": round(t_readings - t0, 1),
        "seed_s": round(time.perf_counter() - t0, 1),
    }
