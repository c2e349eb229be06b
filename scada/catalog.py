"""The catalog: the site's nodes, devices and points, indexed in memory and mirrored in PostgreSQL.

The site file is the source of truth. At start-up :func:`sync_catalog` upserts it into the
``nodes``, ``devices`` and ``points`` tables (so SQL roll-ups can join readings to the hierarchy) and
marks what the file no longer lists as retired rather than deleting it: its history stays queryable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg

from control_engine.factors import FactorLibrary
from control_engine.ledger import LedgerPoint
from protocols.modbus.config import DataType
from scada.config import DeviceConfig, PointConfig, SiteConfig
from scada.model import (
    Carrier,
    DeviceId,
    LedgerRole,
    NodeId,
    NodeLevel,
    NotFound,
    PointId,
    PointKind,
    Unit,
    make_point_id,
)

__all__ = [
    "COUNTER_KINDS",
    "CatalogSyncReport",
    "PointEntry",
    "SiteCatalog",
    "counter_wrap",
    "ledger_points",
    "node_tree",
    "sync_catalog",
]

COUNTER_KINDS = frozenset({PointKind.ENERGY_COUNTER, PointKind.GAS_COUNTER, PointKind.FUEL_COUNTER})
"""Point kinds holding a cumulative counter: history of them is asked for as per-interval deltas."""

_UNSIGNED_BITS = {DataType.UINT16: 16, DataType.UINT32: 32, DataType.UINT64: 64}


def counter_wrap(point: PointConfig) -> float | None:
    """Return the engineering value at which a counter's register rolls over, or None if unknown.

    Only unsigned integer registers have a known range (``2**bits x scale``); signed and float
    registers, and points that are not counters, give None.

    >>> from protocols.modbus.config import ModbusPointConfig
    >>> meter = PointConfig(key="e", kind="energy_counter", unit="kWh", carrier="electricity",
    ...                     scale=0.1, modbus=ModbusPointConfig(address=0, type="uint32"))
    >>> counter_wrap(meter)
    429496729.6
    """
    if point.kind not in COUNTER_KINDS or point.modbus is None:
        return None
    bits = _UNSIGNED_BITS.get(point.modbus.type)
    return None if bits is None else float(2**bits) * abs(point.scale)


_RATE_KINDS = frozenset({PointKind.POWER, PointKind.GAS_FLOW, PointKind.HEAT_FLOW})
_REACTIVE_UNITS = frozenset({Unit.KVAR, Unit.KVA})
_DEVICE_ROLE_CARRIERS = frozenset(Carrier) - {Carrier.PV, Carrier.STORAGE, Carrier.NONE}


def ledger_points(site: SiteConfig, factors: FactorLibrary) -> list[LedgerPoint]:
    """Return every point the carbon ledger books, with its role (docs/carbon-ledger.md).

    A point's role is its own ``ledger`` field, else its device's (for electricity, heat and fuels),
    else by what it measures: PV generates, other energy counters and flows are consumption. Left
    out by default: reactive and apparent power; a power or flow whose device also has a counter of
    the same carrier and role (the counter is exact, the integral an estimate); storage power; and a
    quantity no emission factor is expressed in (steam in t/h when heat factors are per GJ).
    """
    factor_units: dict[Carrier, set[str]] = {}
    for factor in factors.factors:
        factor_units.setdefault(factor.carrier, set()).add(factor.unit.split("/", 1)[1])
    out: list[LedgerPoint] = []
    for device in site.devices:
        candidates: list[tuple[PointConfig, LedgerRole, bool]] = []
        for point in device.points:
            if point.carrier is Carrier.NONE or (point.kind not in COUNTER_KINDS | _RATE_KINDS):
                continue
            explicit = point.ledger is not None
            role = point.ledger or _default_role(point, device)
            candidates.append((point, role, explicit))
        counted = {(p.carrier, role) for p, role, _ in candidates if p.kind in COUNTER_KINDS}
        for point, role, explicit in candidates:
            rate = point.kind in _RATE_KINDS
            shadowed = not explicit and rate and (point.carrier, role) in counted
            if shadowed or role is LedgerRole.NONE:
                continue
            entry = LedgerPoint(
                point=make_point_id(device.id, point.key),
                node=NodeId(device.node),
                carrier=point.carrier,
                role=role,
                unit=point.unit.value,
                rate=rate,
                counter_wrap=counter_wrap(point),
            )
            units = factor_units.get(point.carrier, set())
            if not explicit and point.carrier is not Carrier.STORAGE and entry.activity_unit not in units:
                continue
            out.append(entry)
    return out


def _default_role(point: PointConfig, device: DeviceConfig) -> LedgerRole:
    if point.kind in _RATE_KINDS and point.unit in _REACTIVE_UNITS:
        return LedgerRole.NONE
    if point.carrier is Carrier.PV:
        return LedgerRole.GENERATION
    if point.carrier is Carrier.STORAGE:
        return LedgerRole.NONE  # storage counters name their role (checked at load); power is not booked
    if device.ledger is not None and point.carrier in _DEVICE_ROLE_CARRIERS:
        return device.ledger
    return LedgerRole.CONSUMPTION


def node_tree(site: SiteConfig) -> tuple[dict[NodeId, NodeId | None], dict[NodeId, NodeLevel]]:
    """Return every node's parent and level."""
    parents: dict[NodeId, NodeId | None] = {}
    levels: dict[NodeId, NodeLevel] = {}
    for node, parent in site.iter_nodes():
        parents[NodeId(node.id)] = parent
        levels[NodeId(node.id)] = node.level
    return parents, levels


_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PointEntry:
    """A point with the device it belongs to."""

    id: PointId
    device: DeviceConfig
    config: PointConfig


class SiteCatalog:
    """Fast lookups over a validated site: point id -> point, device id -> device."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        self._devices = {DeviceId(d.id): d for d in site.devices}
        self.parents, self.levels = node_tree(site)
        """Every node's parent (None for a root) and level."""
        self.names: dict[NodeId, str] = {NodeId(node.id): node.name for node, _parent in site.iter_nodes()}
        self._nodes = frozenset(self.parents)
        self._points = {
            make_point_id(d.id, p.key): PointEntry(make_point_id(d.id, p.key), d, p)
            for d in site.devices
            for p in d.points
        }

    def point(self, point_id: str) -> PointEntry:
        """Return a point by id; raise :class:`NotFound` if the site has none by that id."""
        entry = self._points.get(PointId(point_id))
        if entry is None:
            raise NotFound(f"no point {point_id!r} in site {self.site.site.id!r}")
        return entry

    def device(self, device_id: str) -> DeviceConfig:
        """Return a device by id; raise :class:`NotFound` if there is none."""
        device = self._devices.get(DeviceId(device_id))
        if device is None:
            raise NotFound(f"no device {device_id!r} in site {self.site.site.id!r}")
        return device

    def has_node(self, node_id: str) -> bool:
        """Return True if the site's hierarchy has this node (a set lookup)."""
        return node_id in self._nodes

    def has_point(self, point_id: str) -> bool:
        """Return True if the site has this point."""
        return point_id in self._points

    def points(self) -> Iterator[PointEntry]:
        """Yield every point in file order."""
        return iter(self._points.values())

    def __len__(self) -> int:
        return len(self._points)


@dataclass(frozen=True, slots=True)
class CatalogSyncReport:
    """What a sync changed."""

    nodes: int
    devices: int
    points: int
    retired_devices: int
    retired_points: int


CATALOG_SYNC_TIMEOUT_S = 120.0
"""Per statement of the start-up catalog sync: a site of 50,000 points upserts in seconds, more on a
loaded database, and every process does it at start, so the API's short service timeout does not fit."""


async def sync_catalog(
    conn: asyncpg.Connection, site: SiteConfig, *, timeout_s: float = CATALOG_SYNC_TIMEOUT_S
) -> CatalogSyncReport:
    """Upsert the site's hierarchy, devices and points; retire rows the site no longer lists."""
    nodes = [(n.id, n.name, n.level.value, parent) for n, parent in site.iter_nodes()]
    devices = [
        (
            d.id,
            d.node,
            d.name or d.id,
            d.kind.value,
            d.protocol.value,
            json.dumps(d.model_dump(mode="json", exclude={"points", "simulation"})),
        )
        for d in site.devices
    ]
    points = [
        (
            make_point_id(d.id, p.key),
            d.id,
            p.key,
            p.name or p.key,
            p.kind.value,
            p.unit.value,
            p.carrier.value,
            p.writable,
            p.retention,
            counter_wrap(p),
        )
        for d in site.devices
        for p in d.points
    ]
    async with conn.transaction():
        # Parents come before children in iter_nodes(), so the foreign key holds row by row.
        await conn.executemany(
            """INSERT INTO nodes (id, name, level, parent) VALUES ($1, $2, $3, $4)
               ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, level = EXCLUDED.level,
                                              parent = EXCLUDED.parent""",
            nodes,
            timeout=timeout_s,
        )
        await conn.executemany(
            """INSERT INTO devices (id, node_id, name, kind, protocol, config, retired_at)
               VALUES ($1, $2, $3, $4, $5, $6::jsonb, NULL)
               ON CONFLICT (id) DO UPDATE SET node_id = EXCLUDED.node_id, name = EXCLUDED.name,
                   kind = EXCLUDED.kind, protocol = EXCLUDED.protocol, config = EXCLUDED.config,
                   retired_at = NULL""",
            devices,
            timeout=timeout_s,
        )
        await conn.executemany(
            """INSERT INTO points (point_id, device_id, key, name, kind, unit, carrier, writable,
                                 retention, counter_wrap, retired_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL)
               ON CONFLICT (point_id) DO UPDATE SET device_id = EXCLUDED.device_id, key = EXCLUDED.key,
                   name = EXCLUDED.name, kind = EXCLUDED.kind, unit = EXCLUDED.unit,
                   carrier = EXCLUDED.carrier, writable = EXCLUDED.writable,
                   retention = EXCLUDED.retention, counter_wrap = EXCLUDED.counter_wrap,
                   retired_at = NULL""",
            points,
            timeout=timeout_s,
        )
        retired_points = await conn.fetchval(
            """WITH r AS (UPDATE points SET retired_at = now()
                          WHERE retired_at IS NULL AND NOT (point_id = ANY($1::text[])) RETURNING 1)
               SELECT count(*) FROM r""",
            [p[0] for p in points],
            timeout=timeout_s,
        )
        retired_devices = await conn.fetchval(
            """WITH r AS (UPDATE devices SET retired_at = now()
                          WHERE retired_at IS NULL AND NOT (id = ANY($1::text[])) RETURNING 1)
               SELECT count(*) FROM r""",
            [d[0] for d in devices],
            timeout=timeout_s,
        )
    report = CatalogSyncReport(len(nodes), len(devices), len(points), retired_devices, retired_points)
    _LOGGER.info(
        "catalog: %d nodes, %d devices, %d points (%d devices, %d points retired)",
        report.nodes,
        report.devices,
        report.points,
        retired_devices,
        retired_points,
    )
    return report
