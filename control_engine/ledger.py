"""The carbon ledger: every energy reading becomes kgCO2e, booked per node, hour, carrier and scope.

Readings stream in (:meth:`CarbonLedger.ingest`, the hot path: a dict lookup and a few comparisons
per reading); each point keeps one small summary per local hour: for a counter the first and last
sample of the hour, for a power or flow the sum and count of its samples and the span they cover.
:meth:`CarbonLedger.compute` turns the hours touched since the last call into bucket rows, replacing
what it computed before for them (never adding to it), so a redelivered or late reading changes a
bucket's value rather than counting twice.

**Activity** of a point in an hour: for a counter, the step from the last value of the latest earlier
hour with data to the last value of this hour (a reset counts from zero, a known register wrap is
unwrapped, a small step back is jitter and counts nothing); what a counter gains across a gap is
booked in the hour where it is read next. For a power or flow, its mean over the hour times the time
its samples cover.

**Balance**: per carrier, energy balances within a *balance node*: the nearest node at or above the
point that has a ``supply`` meter of that carrier or is an enterprise. There, per hour::

    S  supply (boundary meters; without one: max(0, C + Q - G - D))
    G  on-site generation (zero emission)          D  storage discharge (intensity I_b)
    C  consumption (sub-meters, and the supply of balance nodes below)      Q  storage charge
    I  = (S x f + D x I_b) / (S + G + D)   the intensity of the supply mix (f: the factor in force)

Every consumption point is booked ``activity x I`` to its own node; charge ``Q x I`` minus discharge
``D x I_b`` to the battery's node (carrier ``storage``); the rest, ``(S + G + D - C - Q) x I``, is
the balance node's unmetered use and losses. Within one balance node the rows add up to ``S x f``
exactly, every hour. ``I_b``, what a battery carries, is the charge-weighted intensity of its charging
over the previous 24 hours (a battery cycles daily), the grid factor before it has charged.

Hours follow the site's time zone, so days and months roll up from them without splitting.
Restatement: an hour is *closed* ``close_after_s`` after its end; a later change of a closed hour's
rows is returned as a :class:`Restatement` (old and new value and why) for the audit log.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final
from zoneinfo import ZoneInfo

from control_engine.factors import NATIONAL, FactorLibrary
from scada.model import (
    UTC,
    Carrier,
    ConfigError,
    LedgerRole,
    NodeId,
    NodeLevel,
    NotFound,
    PointId,
    QualityCode,
    Reading,
)

__all__ = [
    "BATTERY_MEMORY_H",
    "CarbonLedger",
    "LedgerPoint",
    "LedgerRow",
    "LedgerUpdate",
    "Restatement",
    "RowSource",
    "ancestry",
]

HOUR_S: Final = 3600
BATTERY_MEMORY_H: Final = 24
"""Hours of charging whose mean intensity a battery carries."""
RESET_FRACTION: Final = 0.1
"""A counter that falls by more than this share of its value was reset (it counts from zero)."""
WRAP_BAND: Final = 0.1
"""A counter near its register range that comes back near zero wrapped round."""
_RATE_PER_HOUR_UNITS: Final = {"kW": "kWh", "Nm3/h": "Nm3", "GJ/h": "GJ", "t/h": "t"}
_OFFSET_SLOT_S: Final = 900


class RowSource(enum.StrEnum):
    """What a ledger row books."""

    METERED = "metered"
    """Consumption measured by a node's own meters (and on-site generation, at zero)."""
    UNMETERED = "unmetered"
    """What the balance node bought but no sub-meter accounts for: common loads and losses."""
    STORAGE = "storage"
    """Carbon put into (charge) or taken out of (discharge) a battery."""


@dataclass(frozen=True, slots=True)
class LedgerPoint:
    """An energy point as the ledger books it."""

    point: PointId
    node: NodeId
    """The hierarchy node of the point's device."""
    carrier: Carrier
    role: LedgerRole
    unit: str
    """Unit of the readings: a counter's (kWh, Nm3, t, GJ) or a rate's (kW, Nm3/h, GJ/h, t/h)."""
    rate: bool = False
    """A power or flow integrated over time, rather than a counter."""
    counter_wrap: float | None = None
    """The value at which a counter's register rolls over, when known."""

    @property
    def activity_unit(self) -> str:
        """Return the unit of the energy this point books (kWh for kW...)."""
        return _RATE_PER_HOUR_UNITS.get(self.unit, self.unit) if self.rate else self.unit


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One bucket: a node's emissions of one carrier and source in one local hour."""

    node: NodeId
    hour: datetime
    """Start of the local hour, in UTC."""
    carrier: Carrier
    source: RowSource
    scope: int
    activity: float
    """Energy in ``unit``: used (metered, unmetered), generated (PV), net charged (storage)."""
    unit: str
    co2e_kg: float
    factor_id: str | None
    """The emission factor in force for the hour (None for storage, which has none of its own)."""
    points: int
    """Points that contributed readings."""


@dataclass(frozen=True, slots=True)
class Restatement:
    """A closed hour's row changed: the audit record of a late or corrected reading."""

    node: NodeId
    hour: datetime
    carrier: Carrier
    source: RowSource
    old_co2e_kg: float
    new_co2e_kg: float
    old_activity: float
    new_activity: float
    reason: str


@dataclass(frozen=True, slots=True)
class LedgerUpdate:
    """What one :meth:`CarbonLedger.compute` changed."""

    rows: list[LedgerRow]
    """New or changed rows (replace the stored ones with the same node, hour, carrier, source)."""
    restatements: list[Restatement]
    hours: list[datetime]
    """Every hour recomputed."""


@dataclass(slots=True)
class _Spec:
    index: int
    point: LedgerPoint
    group: int
    rate: bool
    warm_until: float = -math.inf
    """Rate samples at or before this time are already in the warm-start summaries."""


@dataclass(slots=True)
class _Group:
    """A balance node for one carrier."""

    index: int
    node: NodeId
    carrier: Carrier
    depth: int
    parent: int | None = None
    children: list[int] = field(default_factory=list)
    """Balance nodes whose supply this one books as consumption."""
    specs: list[_Spec] = field(default_factory=list)
    metered_supply: bool = False
    has_storage: bool = False


@dataclass(slots=True)
class _Balance:
    supply: float
    charge: float
    intensity: float


_ROLE_ORDER: Final = {
    LedgerRole.SUPPLY: 0,
    LedgerRole.CONSUMPTION: 1,
    LedgerRole.GENERATION: 2,
    LedgerRole.CHARGE: 3,
    LedgerRole.DISCHARGE: 4,
}


class CarbonLedger:
    """Hourly kgCO2e buckets per node, carrier and source, from a stream of readings (no I/O)."""

    def __init__(
        self,
        points: Sequence[LedgerPoint],
        parents: Mapping[NodeId, NodeId | None],
        levels: Mapping[NodeId, NodeLevel],
        factors: FactorLibrary,
        *,
        region: str = NATIONAL,
        timezone: str = "Asia/Shanghai",
        window_h: int = 72,
        close_after_s: float = 900.0,
    ) -> None:
        if window_h < BATTERY_MEMORY_H + 2:
            raise ValueError(f"window_h must be at least {BATTERY_MEMORY_H + 2}")
        self._parents = dict(parents)
        self._levels = dict(levels)
        self._factors = factors
        self._region = region
        self._zone = ZoneInfo(timezone)
        self._window_s = window_h * HOUR_S
        self._close_after_s = close_after_s
        self._depth = {node: self._node_depth(node) for node in self._parents}
        self._groups: list[_Group] = []
        self._specs: dict[PointId, _Spec] = {}
        self._build(points)
        self._summaries: dict[tuple[int, int], list[float]] = {}
        """(spec index, hour) -> counter [first_ts, first, last_ts, last] or rate [sum, n, first_ts,
        last_ts]."""
        self._hours: list[list[int]] = [[] for _ in self._specs]
        """Per spec, the hours it has a summary for, ascending (the keys of ``_summaries``, ordered)."""
        self._dirty: dict[int, set[int]] = defaultdict(set)
        """hour -> groups to recompute."""
        self._late: dict[tuple[int, int], set[str]] = defaultdict(set)
        self._rows: dict[tuple[int, int], dict[tuple[NodeId, Carrier, RowSource], LedgerRow]] = {}
        self._balances: dict[tuple[int, int], _Balance] = {}
        self._new_rows: dict[int, dict[tuple[NodeId, Carrier, RowSource], LedgerRow]] = {}
        self._offsets: dict[int, int] = {}
        self._factor_cache: dict[tuple[Carrier, int], tuple[float, str, int]] = {}
        self._oldest_hour = -math.inf
        self.too_late = 0
        """Readings dropped because their hour was older than the window."""
        self.ignored = 0
        """Readings of ledger points without a usable value (bad quality or no value)."""

    # -- set-up ----------------------------------------------------------------------------------

    def _node_depth(self, node: NodeId) -> int:
        depth, seen = 0, node
        while (parent := self._parents.get(seen)) is not None:
            depth, seen = depth + 1, parent
            if depth > len(self._parents):
                raise ConfigError(f"the hierarchy has a cycle through {node!r}")
        return depth

    def _build(self, points: Sequence[LedgerPoint]) -> None:
        booked = [p for p in points if p.role is not LedgerRole.NONE]
        supply_nodes: dict[Carrier, set[NodeId]] = defaultdict(set)
        for p in booked:
            if p.node not in self._parents:
                raise ConfigError(f"ledger point {p.point}: node {p.node!r} is not in the hierarchy")
            if p.role is LedgerRole.SUPPLY:
                supply_nodes[self._carrier_of(p)].add(p.node)
            self._check_unit(p)
        by_key: dict[tuple[NodeId, Carrier], _Group] = {}

        def group_for(node: NodeId, carrier: Carrier) -> _Group:
            balance = self._balance_node(node, supply_nodes[carrier])
            group = by_key.get((balance, carrier))
            if group is None:
                group = _Group(len(self._groups), balance, carrier, self._depth[balance])
                group.metered_supply = balance in supply_nodes[carrier]
                by_key[balance, carrier] = group
                self._groups.append(group)
            return group

        for p in sorted(booked, key=lambda p: (p.point, _ROLE_ORDER[p.role])):
            group = group_for(p.node, self._carrier_of(p))
            spec = _Spec(len(self._specs), p, group.index, p.rate)
            if p.point in self._specs:
                raise ConfigError(f"ledger point {p.point} listed twice")
            self._specs[p.point] = spec
            group.specs.append(spec)
            group.has_storage |= p.role in (LedgerRole.CHARGE, LedgerRole.DISCHARGE)
        # A balance node's supply is consumption of the balance node above it, if that one meters.
        for group in list(self._groups):
            parent_node = self._parents.get(group.node)
            if parent_node is None:
                continue
            above = self._balance_node(parent_node, supply_nodes[group.carrier])
            if above in supply_nodes[group.carrier]:
                parent = group_for(above, group.carrier)
                group.parent = parent.index
                parent.children.append(group.index)

    def _carrier_of(self, p: LedgerPoint) -> Carrier:
        """Return the carrier whose balance a point takes part in: PV and storage balance electricity."""
        return Carrier.ELECTRICITY if p.carrier in (Carrier.PV, Carrier.STORAGE) else p.carrier

    def _balance_node(self, node: NodeId, supplied: set[NodeId]) -> NodeId:
        chain = ancestry(self._parents, node)
        for candidate in chain:
            if candidate in supplied or self._levels.get(candidate) is NodeLevel.ENTERPRISE:
                return candidate
        return chain[-1]

    def _check_unit(self, p: LedgerPoint) -> None:
        if p.carrier is Carrier.STORAGE:
            if p.activity_unit != "kWh":
                raise ConfigError(f"ledger point {p.point}: storage is booked in kWh, not {p.unit}")
            return
        if p.rate and p.unit not in _RATE_PER_HOUR_UNITS:
            raise ConfigError(f"ledger point {p.point}: cannot integrate a rate in {p.unit}")
        units = {f.unit.split("/", 1)[1] for f in self._factors.query(carrier=p.carrier)}
        if not units:
            raise ConfigError(f"ledger point {p.point}: no emission factor for {p.carrier.value}")
        if p.activity_unit not in units:
            raise ConfigError(
                f"ledger point {p.point}: {p.carrier.value} factors are per {', '.join(sorted(units))}, "
                f"the point measures {p.activity_unit}"
            )

    @property
    def points(self) -> list[PointId]:
        """Return the points the ledger books."""
        return list(self._specs)

    # -- the hot path ----------------------------------------------------------------------------

    def hour_of(self, ts: float) -> int:
        """Return the start (epoch seconds) of the local hour holding ``ts``."""
        slot = int(ts // _OFFSET_SLOT_S)
        offset = self._offsets.get(slot)
        if offset is None:
            at = datetime.fromtimestamp(slot * _OFFSET_SLOT_S, UTC).astimezone(self._zone)
            delta = at.utcoffset()
            offset = int(delta.total_seconds()) if delta is not None else 0
            if len(self._offsets) > 100_000:
                self._offsets.clear()
            self._offsets[slot] = offset
        return int((ts + offset) // HOUR_S * HOUR_S - offset)

    def ingest(self, readings: Iterable[Reading], *, now: float) -> int:  # noqa: PLR0912, PLR0915 - the hot path, one frame
        """Book readings into their points' hour summaries; return how many were taken.

        ``now`` (epoch seconds) decides which hours are closed, for restatement reasons. Readings of
        points the ledger does not book are skipped; bad ones are counted in :attr:`ignored`; ones
        older than the window in :attr:`too_late`.
        """
        specs, summaries, dirty = self._specs, self._summaries, self._dirty
        bad = QualityCode.BAD
        closed_before = self.hour_of(now - self._close_after_s) - HOUR_S
        taken = 0
        for reading in readings:
            spec = specs.get(reading.point)
            if spec is None:
                continue
            value = reading.value
            if value is None or reading.quality.code is bad or not math.isfinite(value):
                self.ignored += 1
                continue
            ts = reading.ts.timestamp()
            hour = self.hour_of(ts)
            if hour < self._oldest_hour:
                self.too_late += 1
                continue
            key = (spec.index, hour)
            summary = summaries.get(key)
            if spec.rate:
                if ts <= spec.warm_until:
                    continue
                if summary is None:
                    summaries[key] = [value, 1.0, ts, ts]
                    self._add_hour(spec, hour)
                else:
                    summary[0] += value
                    summary[1] += 1.0
                    if ts < summary[2]:
                        summary[2] = ts
                    elif ts > summary[3]:
                        summary[3] = ts
            elif summary is None:
                summaries[key] = [ts, value, ts, value]
                self._add_hour(spec, hour)
                self._touch_next(spec, hour)
            elif ts < summary[0]:
                summary[0], summary[1] = ts, value
            elif ts >= summary[2]:
                if ts == summary[2] and value == summary[3]:
                    continue  # the same sample again
                summary[2], summary[3] = ts, value
                self._touch_next(spec, hour)
            else:
                continue  # inside the hour: neither first nor last, changes nothing
            dirty[hour].add(spec.group)
            if hour <= closed_before:
                late = self._late[spec.group, hour]
                if len(late) < 5:
                    late.add(reading.point)
            taken += 1
        return taken

    def _add_hour(self, spec: _Spec, hour: int) -> None:
        hours = self._hours[spec.index]
        if not hours or hour > hours[-1]:
            hours.append(hour)  # the usual case: a new hour of live data
        else:
            bisect.insort(hours, hour)

    def _touch_next(self, spec: _Spec, hour: int) -> None:
        """Mark the next hour with data: a counter's last value in ``hour`` changed, and it starts there."""
        hours = self._hours[spec.index]
        if hours[-1] > hour:
            self._dirty[hours[bisect.bisect_right(hours, hour)]].add(spec.group)

    # -- warm start ------------------------------------------------------------------------------

    def load_summary(
        self,
        point: PointId,
        hour_start: datetime,
        *,
        count: int,
        total: float,
        first_ts: datetime,
        first: float,
        last_ts: datetime,
        last: float,
    ) -> None:
        """Restore one point-hour from stored rollups (warm start after a restart).

        Later rate samples at or before the last loaded one are taken as already counted, so the
        stream's redelivery of entries the rollups already hold does not count them twice.
        """
        spec = self._specs.get(point)
        if spec is None or count <= 0:
            return
        hour = self.hour_of(hour_start.timestamp())
        first_s, last_s = first_ts.timestamp(), last_ts.timestamp()
        if (spec.index, hour) not in self._summaries:
            self._add_hour(spec, hour)
        if spec.rate:
            self._summaries[spec.index, hour] = [total, float(count), first_s, last_s]
            spec.warm_until = max(spec.warm_until, last_s)
        else:
            self._summaries[spec.index, hour] = [first_s, first, last_s, last]
        self._dirty[hour].add(spec.group)

    # -- computing buckets -----------------------------------------------------------------------

    def compute(self, *, now: float) -> LedgerUpdate:
        """Recompute every hour touched since the last call; return the changed rows.

        Storage makes later hours depend on earlier ones (what a battery carries), so a changed hour
        marks the next :data:`BATTERY_MEMORY_H` hours of its balance node for recomputation too.
        Hours older than the window are forgotten.
        """
        rows: list[LedgerRow] = []
        restatements: list[Restatement] = []
        hours: list[datetime] = []
        closed_before = self.hour_of(now - self._close_after_s) - HOUR_S
        while self._dirty:
            hour = min(self._dirty)
            groups = self._dirty.pop(hour)
            hours.append(datetime.fromtimestamp(hour, UTC))
            # A child's supply is its parent's consumption: recompute parents this hour too, after
            # their children (deepest first).
            groups |= {p for g in groups if (p := self._groups[g].parent) is not None}
            supply_of: dict[int, float] = {}
            for group in sorted((self._groups[g] for g in groups), key=lambda g: -g.depth):
                self._compute_group(group, hour, supply_of)
            for group_index in groups:
                new = self._new_rows.pop(group_index)
                old = self._rows.get((group_index, hour), {})
                self._rows[group_index, hour] = new
                closed = hour <= closed_before
                reason = self._reason(group_index, hour)
                for key, row in new.items():
                    before = old.get(key)
                    if before is not None and _same(before, row):
                        continue
                    rows.append(row)
                    if closed and before is not None:
                        restatements.append(
                            Restatement(
                                node=row.node,
                                hour=row.hour,
                                carrier=row.carrier,
                                source=row.source,
                                old_co2e_kg=before.co2e_kg,
                                new_co2e_kg=row.co2e_kg,
                                old_activity=before.activity,
                                new_activity=row.activity,
                                reason=reason,
                            )
                        )
        self._late.clear()
        self._forget(now)
        return LedgerUpdate(rows, restatements, hours)

    def _reason(self, group: int, hour: int) -> str:
        late = sorted(self._late.get((group, hour), ()))
        if late:
            return "late or corrected readings of " + ", ".join(late)
        return "recomputed after a change in an earlier hour (storage) or a balance node below"

    def _compute_group(  # noqa: PLR0912, PLR0915 - one balance, read top to bottom
        self, group: _Group, hour: int, supply_of: dict[int, float]
    ) -> None:
        at = datetime.fromtimestamp(hour, UTC)
        factor, factor_id, scope = self._factor(group.carrier, hour, at)
        own: dict[NodeId, list[float]] = {}
        generation: dict[NodeId, list[float]] = {}
        storage: dict[NodeId, list[float]] = {}
        supply = consumption = generated = charged = discharged = 0.0
        supply_points = 0
        for spec in group.specs:
            activity = self._activity(spec, hour)
            if activity is None:
                continue
            role = spec.point.role
            if role is LedgerRole.SUPPLY:
                supply += activity
                supply_points += 1
            elif role is LedgerRole.CONSUMPTION:
                consumption += activity
                entry = own.setdefault(spec.point.node, [0.0, 0.0])
                entry[0] += activity
                entry[1] += 1
            elif role is LedgerRole.GENERATION:
                generated += activity
                entry = generation.setdefault(spec.point.node, [0.0, 0.0])
                entry[0] += activity
                entry[1] += 1
            else:
                entry = storage.setdefault(spec.point.node, [0.0, 0.0, 0.0])
                if role is LedgerRole.CHARGE:
                    charged += activity
                    entry[0] += activity
                else:
                    discharged += activity
                    entry[1] += activity
                entry[2] += 1
        from_below = sum(supply_of.get(child, self._stored_supply(child, hour)) for child in group.children)
        used = consumption + from_below
        if not group.metered_supply:
            supply = max(0.0, used + charged - generated - discharged)
        carried = self._battery_intensity(group, hour, factor) if group.has_storage else factor
        mix = supply + generated + discharged
        intensity = (supply * factor + discharged * carried) / mix if mix > 0 else factor
        supply_of[group.index] = supply
        balance = _Balance(supply, charged, intensity)
        before = self._balances.get((group.index, hour))
        self._balances[group.index, hour] = balance

        unit = "kWh" if group.carrier is Carrier.ELECTRICITY else self._group_unit(group)
        new: dict[tuple[NodeId, Carrier, RowSource], LedgerRow] = {}
        for node, (activity, count) in own.items():
            new[node, group.carrier, RowSource.METERED] = LedgerRow(
                node,
                at,
                group.carrier,
                RowSource.METERED,
                scope,
                activity,
                unit,
                activity * intensity,
                factor_id,
                int(count),
            )
        if generation:
            pv_factor, pv_id, _ = self._factor(Carrier.PV, hour, at)
            for node, (activity, count) in generation.items():
                new[node, Carrier.PV, RowSource.METERED] = LedgerRow(
                    node,
                    at,
                    Carrier.PV,
                    RowSource.METERED,
                    2,
                    activity,
                    "kWh",
                    activity * pv_factor,
                    pv_id,
                    int(count),
                )
        for node, (into, out, count) in storage.items():
            new[node, Carrier.STORAGE, RowSource.STORAGE] = LedgerRow(
                node,
                at,
                Carrier.STORAGE,
                RowSource.STORAGE,
                2,
                into - out,
                "kWh",
                into * intensity - out * carried,
                None,
                int(count),
            )
        if group.metered_supply or own or generation or storage:
            rest = supply + generated + discharged - used - charged
            new[group.node, group.carrier, RowSource.UNMETERED] = LedgerRow(
                group.node,
                at,
                group.carrier,
                RowSource.UNMETERED,
                scope,
                rest,
                unit,
                rest * intensity,
                factor_id,
                supply_points,
            )
        self._new_rows[group.index] = new
        # What a battery carries later depends on this hour's charging.
        if group.has_storage and before != balance:
            for later in range(1, BATTERY_MEMORY_H + 1):
                later_hour = hour + later * HOUR_S
                if any(self._summaries.get((s.index, later_hour)) for s in group.specs):
                    self._dirty[later_hour].add(group.index)

    def _group_unit(self, group: _Group) -> str:
        for spec in group.specs:
            return spec.point.activity_unit
        return ""

    def _stored_supply(self, group: int, hour: int) -> float:
        balance = self._balances.get((group, hour))
        return balance.supply if balance is not None else 0.0

    def _battery_intensity(self, group: _Group, hour: int, grid_factor: float) -> float:
        energy = carbon = 0.0
        for back in range(1, BATTERY_MEMORY_H + 1):
            balance = self._balances.get((group.index, hour - back * HOUR_S))
            if balance is not None and balance.charge > 0:
                energy += balance.charge
                carbon += balance.charge * balance.intensity
        return carbon / energy if energy > 0 else grid_factor

    def _activity(self, spec: _Spec, hour: int) -> float | None:
        summary = self._summaries.get((spec.index, hour))
        if summary is None:
            return None
        if spec.rate:
            total, count, first_ts, last_ts = summary
            span = last_ts - first_ts
            covered = span + (span / (count - 1) if count > 1 else 0.0)
            return total / count * min(covered, HOUR_S) / HOUR_S
        hours = self._hours[spec.index]
        at = bisect.bisect_left(hours, hour)
        if at > 0 and hours[at - 1] >= hour - self._window_s:
            start = self._summaries[spec.index, hours[at - 1]][3]  # the last value of the hour before
        else:
            start = summary[1]
        return _counter_step(start, summary[3], spec.point.counter_wrap)

    def _factor(self, carrier: Carrier, hour: int, at: datetime) -> tuple[float, str, int]:
        key = (carrier, hour)
        cached = self._factor_cache.get(key)
        if cached is None:
            try:
                factor = self._factors.in_force(carrier, at, self._region)
            except NotFound as err:
                raise ConfigError(f"ledger: {err}") from None
            cached = self._factor_cache[key] = (factor.value, factor.id, factor.scope)
        return cached

    def _forget(self, now: float) -> None:
        oldest = self.hour_of(now) - self._window_s
        if oldest <= self._oldest_hour:
            return
        self._oldest_hour = oldest
        for key in [k for k in self._summaries if k[1] < oldest]:
            del self._summaries[key]
        for hours in self._hours:
            del hours[: bisect.bisect_left(hours, oldest)]
        for key in [k for k in self._rows if k[1] < oldest]:
            del self._rows[key]
        for key in [k for k in self._balances if k[1] < oldest - BATTERY_MEMORY_H * HOUR_S]:
            del self._balances[key]
        for factor_key in [k for k in self._factor_cache if k[1] < oldest]:
            del self._factor_cache[factor_key]

    # -- reading the buckets ---------------------------------------------------------------------

    def rows(self) -> list[LedgerRow]:
        """Return every row in the window, oldest hour first."""
        return [
            row for _key, new in sorted(self._rows.items(), key=lambda kv: kv[0][1]) for row in new.values()
        ]

    def node_hours(self, ancestors: bool = True) -> dict[NodeId, dict[datetime, list[float]]]:
        """Return kgCO2e per node and hour as ``[scope 1, scope 2]``, rolled up to the ancestors."""
        out: dict[NodeId, dict[datetime, list[float]]] = defaultdict(dict)
        for row in self.rows():
            chain = ancestry(self._parents, row.node) if ancestors else [row.node]
            for node in chain:
                cell = out[node].setdefault(row.hour, [0.0, 0.0])
                cell[row.scope - 1] += row.co2e_kg
        return dict(out)


def ancestry(parents: Mapping[NodeId, NodeId | None], node: NodeId) -> list[NodeId]:
    """Return ``node`` and its ancestors, nearest first.

    >>> ancestry({NodeId("ws"): NodeId("ent"), NodeId("ent"): None}, NodeId("ws"))
    ['ws', 'ent']
    """
    chain = [node]
    while (parent := parents.get(chain[-1])) is not None:
        chain.append(parent)
    return chain


def _same(a: LedgerRow, b: LedgerRow) -> bool:
    return (
        math.isclose(a.co2e_kg, b.co2e_kg, rel_tol=1e-12, abs_tol=1e-12)
        and math.isclose(a.activity, b.activity, rel_tol=1e-12, abs_tol=1e-12)
        and a.points == b.points
        and a.factor_id == b.factor_id
    )


def _counter_step(previous: float, current: float, wrap: float | None) -> float:
    """Return what a counter counted from ``previous`` to ``current``.

    >>> _counter_step(100.0, 130.0, None)
    30.0
    >>> _counter_step(4290.0, 10.0, 4300.0)  # wrapped round its register
    20.0
    >>> _counter_step(5000.0, 12.0, None)  # reset: counts from zero
    12.0
    >>> _counter_step(100.0, 99.95, None)  # jitter
    0.0
    """
    if current >= previous:
        return current - previous
    if wrap is not None and previous >= wrap * (1 - WRAP_BAND) and 0 <= current <= wrap * WRAP_BAND:
        return wrap - previous + current
    if previous - current > RESET_FRACTION * abs(previous):
        return max(current, 0.0)
    return 0.0
