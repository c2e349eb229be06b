"""Measure every dispatch after it ends: the automatic measurement and verification (M&V) service.

:func:`control_engine.verification.measure_dispatch` is pure; this service feeds it and keeps what it
says. Every ``period_s`` (and at once on start, so a restart catches up on what ended meanwhile) it:

1. **Finds** dispatches that took effect (``verified``, ``reverted``, ``revert_failed``) whose event
   window has ended (``hold_until`` passed) and that have no row in ``dispatch_verifications``
   (migration 009) yet. A dispatch is measured only once the rebound window after it
   (``post_window``) plus ``settle`` have passed, so the historian has the data.
2. **Picks the meters** the dispatch affects (:func:`affected_meters`): the target device's own
   electricity consumption points as the ledger books them; else the consumption meters of the
   dispatch's node; else its supply (boundary) meters.
3. **Reads** their interval energy from the historian's rollups (``readings_15m`` by default) for
   ``lookback_days`` before the event day up to the end of the rebound window: a counter's step
   between the ``last`` values of consecutive buckets, a power's bucket mean times the interval.
   The grid intensity is the electricity factor in force each local day (``factors.in_force``).
   Windows of other dispatches that touch the same meters are excluded from the similar days.
4. **Measures** in a worker thread (with a deadline), **stores** the effect, **audits** it
   (``dispatch.verify``) and **publishes** it on the ``command_results`` stream (``publish``).

A dispatch that cannot be measured (no meter, too little history, no factor, the data gone) gets a
row with status ``unmeasurable`` and the reason, never silence, and is not tried again. Missing data
in the event or rebound window is waited for (a gateway catching up) for ``data_grace`` after the
window, then measured with what there is (flagged) or declared unmeasurable.

Delivery: the row is the idempotency key (``ON CONFLICT DO NOTHING``). The audit entry is written
after the row and marked (``audited_at``); a crash between the two is repaired on the next turn,
so each verification is audited at least once. Publishing is best effort (a live view).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import asyncpg

from control_engine.factors import FactorLibrary
from control_engine.ledger import LedgerPoint
from control_engine.verification import BaselineMethod, DispatchEffect, measure_dispatch
from scada.model import UTC, Carrier, Clock, LedgerRole, NodeId, NotFound, PointId
from scada.runtime import raise_if_cancelling

__all__ = [
    "ENTRY_KIND",
    "MeterBasis",
    "MeterChoice",
    "MonthlyVerification",
    "Verification",
    "VerificationService",
    "VerificationStatus",
    "VerificationStore",
    "affected_meters",
]

_LOGGER = logging.getLogger(__name__)

Auditor = Callable[[str, str, str, Mapping[str, Any]], Awaitable[None]]
"""``audit(actor, action, target, detail)``, as the dispatcher's."""
Publisher = Callable[[Mapping[str, Any]], Awaitable[None]]
"""``publish(body)``: append a verification entry to the ``command_results`` stream."""

ENTRY_KIND: Final = "verification"
"""The ``type`` of a verification entry on ``command_results`` (see docs/dispatch-verification.md)."""
AUDIT_ACTION: Final = "dispatch.verify"
ACTOR: Final = "verifier"

EXECUTED_STATES: Final = ("verified", "reverting", "reverted", "revert_failed")
"""Dispatch states in which the write reached the device."""
ENDED_STATES: Final = ("verified", "reverted", "revert_failed")
"""States a dispatch is measured in (``reverting`` is waited out)."""
ROLLUP_TABLES: Final = {60: "readings_1m", 900: "readings_15m"}
"""Interval length (s) -> the rollup table its energy is read from."""
KG_PER_T: Final = 1000.0
SNAP: Final = timedelta(minutes=1)
"""A write or revert this close to an interval boundary is taken at the boundary (a revert lands a
second or two after ``hold_until``: that must not stretch the event window by a whole interval)."""
ZERO: Final = timedelta(0)


class VerificationStatus(enum.StrEnum):
    """Whether a dispatch's effect could be measured."""

    MEASURED = "measured"
    UNMEASURABLE = "unmeasurable"


class MeterBasis(enum.StrEnum):
    """Which meters stand for the load a dispatch changed."""

    DEVICE = "device"
    """The target device's own consumption points."""
    NODE_CONSUMPTION = "node_consumption"
    """The consumption meters of the devices on the dispatch's node."""
    NODE_SUPPLY = "node_supply"
    """The supply (boundary) meters of the dispatch's node."""
    NONE = "none"


class ServiceFlag(enum.StrEnum):
    """Flags the service adds to the method's :class:`~control_engine.verification.EffectFlag`."""

    REVERT_FAILED = "revert_failed"
    """The revert failed: the write stayed in force after the window, so the rebound is not seen."""
    NOT_REVERTED = "not_reverted"
    """The hold ended but the dispatcher had not reverted it when it was measured."""
    POST_WINDOW_CUT = "post_window_cut"
    """The meters' data ended inside the rebound window; it was shortened to the data."""


@dataclass(frozen=True, slots=True)
class MeterChoice:
    """The meters a dispatch is measured on, and why those."""

    basis: MeterBasis
    meters: tuple[LedgerPoint, ...]
    reason: str = ""
    """Why no meter fits, when :attr:`basis` is ``none``."""


def _device_of(point: str) -> str:
    return point.split(".", 1)[0]


def _kwh_electricity(meter: LedgerPoint) -> bool:
    return meter.carrier is Carrier.ELECTRICITY and meter.activity_unit == "kWh"


def affected_meters(point: str, node: str, meters: Sequence[LedgerPoint]) -> MeterChoice:
    """Return the meters whose energy a dispatch of ``point`` on ``node`` changes.

    1. The target device's own points the ledger books as ``consumption`` (a counter shadows the
       device's power of the same carrier, as in the ledger); electricity only, since the effect
       is valued at the grid factor. A device whose booked points are all another carrier (a gas
       boiler) is not measured.
    2. Else the ``consumption`` electricity meters of the devices on ``node`` itself (not below it:
       nested sub-meters would count a load twice).
    3. Else the ``supply`` electricity meters of ``node`` (a battery or PV dispatch shows there).

    >>> from scada.model import LedgerRole
    >>> m = lambda p, n, role, carrier=Carrier.ELECTRICITY, unit="kWh": LedgerPoint(
    ...     point=PointId(p), node=NodeId(n), carrier=carrier, role=role, unit=unit)
    >>> book = [m("hvac.e_kwh", "ws", LedgerRole.CONSUMPTION), m("main.e_kwh", "ws", LedgerRole.CONSUMPTION),
    ...         m("feed.e_kwh", "ent", LedgerRole.SUPPLY), m("boiler.gas", "ws", LedgerRole.CONSUMPTION,
    ...         Carrier.NATURAL_GAS, "Nm3")]
    >>> affected_meters("hvac.setpoint_c", "ws", book).basis.value
    'device'
    >>> [p.point for p in affected_meters("lights.dim_pct", "ws", book).meters]
    ['hvac.e_kwh', 'main.e_kwh']
    >>> affected_meters("battery.p_kw", "ent", book).basis.value
    'node_supply'
    >>> affected_meters("boiler.setpoint_c", "ws", book).reason
    'the target device boiler meters natural_gas only: only electricity effects are measured'
    """
    device = _device_of(point)
    own = [m for m in meters if _device_of(m.point) == device and m.role is LedgerRole.CONSUMPTION]
    own_electric = tuple(m for m in own if _kwh_electricity(m))
    if own_electric:
        return MeterChoice(MeterBasis.DEVICE, own_electric)
    if own:
        carriers = ", ".join(sorted({m.carrier.value for m in own}))
        return MeterChoice(
            MeterBasis.NONE,
            (),
            f"the target device {device} meters {carriers} only: only electricity effects are measured",
        )
    on_node = [m for m in meters if m.node == node and _kwh_electricity(m)]
    consumption = tuple(m for m in on_node if m.role is LedgerRole.CONSUMPTION)
    if consumption:
        return MeterChoice(MeterBasis.NODE_CONSUMPTION, consumption)
    supply = tuple(m for m in on_node if m.role is LedgerRole.SUPPLY)
    if supply:
        return MeterChoice(MeterBasis.NODE_SUPPLY, supply)
    return MeterChoice(
        MeterBasis.NONE,
        (),
        f"no meter: device {device} has no electricity consumption point booked by the ledger and "
        f"node {node} has no electricity consumption or supply meter",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    """A dispatch's measured effect (or why there is none), as stored and shown."""

    dispatch_id: int
    node: NodeId
    status: VerificationStatus
    reason: str
    month: str
    """``YYYY-MM`` of the event start in the site's zone."""
    event_start: datetime
    event_end: datetime | None
    post_end: datetime | None
    interval_s: int
    meters: tuple[str, ...] = ()
    meter_basis: MeterBasis = MeterBasis.NONE
    energy_avoided_kwh: float | None = None
    uncertainty_kwh: float | None = None
    co2e_avoided_kg: float | None = None
    co2e_uncertainty_kg: float | None = None
    confidence: float | None = None
    baseline_kwh: float | None = None
    actual_kwh: float | None = None
    rebound_kwh: float | None = None
    rebound_co2e_kg: float | None = None
    flags: tuple[str, ...] = ()
    baseline_method: str = ""
    days_used: int = 0
    factor_ids: tuple[str, ...] = ()
    detail: Mapping[str, Any] = field(default_factory=dict)
    verified_at: datetime

    def to_json(self, *, with_detail: bool = False) -> dict[str, Any]:
        """Return the verification as the API and the stream show it (``detail`` only if asked)."""
        out: dict[str, Any] = {
            "dispatch_id": self.dispatch_id,
            "node": self.node,
            "status": self.status.value,
            "reason": self.reason,
            "month": self.month,
            "event_start": _iso(self.event_start),
            "event_end": _iso(self.event_end),
            "post_end": _iso(self.post_end),
            "interval_s": self.interval_s,
            "meters": list(self.meters),
            "meter_basis": self.meter_basis.value,
            "energy_avoided_kwh": self.energy_avoided_kwh,
            "uncertainty_kwh": self.uncertainty_kwh,
            "co2e_avoided_kg": self.co2e_avoided_kg,
            "co2e_uncertainty_kg": self.co2e_uncertainty_kg,
            "confidence": self.confidence,
            "baseline_kwh": self.baseline_kwh,
            "actual_kwh": self.actual_kwh,
            "rebound_kwh": self.rebound_kwh,
            "rebound_co2e_kg": self.rebound_co2e_kg,
            "flags": list(self.flags),
            "baseline_method": self.baseline_method,
            "days_used": self.days_used,
            "factor_ids": list(self.factor_ids),
            "verified_at": _iso(self.verified_at),
        }
        if with_detail:
            out["detail"] = dict(self.detail)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class MonthlyVerification:
    """One month's verifications of some nodes added up (uncertainties in quadrature)."""

    month: str
    dispatches: int
    measured: int
    unmeasurable: int
    energy_avoided_kwh: float
    uncertainty_kwh: float
    co2e_avoided_t: float
    co2e_uncertainty_t: float
    confidence: float | None
    """The measured effects' confidence; None when there are none (or they mix levels)."""
    flag_counts: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        """Return the sums as the API shows them."""
        return {
            "month": self.month,
            "dispatches": self.dispatches,
            "measured": self.measured,
            "unmeasurable": self.unmeasurable,
            "energy_avoided_kwh": self.energy_avoided_kwh,
            "uncertainty_kwh": self.uncertainty_kwh,
            "co2e_avoided_t": self.co2e_avoided_t,
            "co2e_uncertainty_t": self.co2e_uncertainty_t,
            "confidence": self.confidence,
            "flag_counts": dict(self.flag_counts),
        }


def _iso(at: datetime | None) -> str | None:
    return at.astimezone(UTC).isoformat() if at is not None else None


# -- the table -------------------------------------------------------------------------------------


_SUMMARY_COLUMNS: Final = """dispatch_id, node_id, status, reason, month, event_start, event_end, post_end,
    interval_s, meters, meter_basis, energy_avoided_kwh, uncertainty_kwh, co2e_avoided_kg,
    co2e_uncertainty_kg, confidence, baseline_kwh, actual_kwh, rebound_kwh, rebound_co2e_kg, flags,
    baseline_method, days_used, factor_ids, verified_at"""
"""Every column but ``detail`` (the per-interval report: only one verification's view reads it)."""
_COLUMNS: Final = f"{_SUMMARY_COLUMNS}, detail"
_DISPATCH_COLUMNS: Final = "id, node_id, point_id, state, created_at, hold_until, result"


def _verification(row: Any, *, with_detail: bool = True) -> Verification:
    return Verification(
        dispatch_id=row["dispatch_id"],
        node=NodeId(row["node_id"]),
        status=VerificationStatus(row["status"]),
        reason=row["reason"],
        month=row["month"],
        event_start=row["event_start"],
        event_end=row["event_end"],
        post_end=row["post_end"],
        interval_s=row["interval_s"],
        meters=tuple(row["meters"]),
        meter_basis=MeterBasis(row["meter_basis"]) if row["meter_basis"] else MeterBasis.NONE,
        energy_avoided_kwh=row["energy_avoided_kwh"],
        uncertainty_kwh=row["uncertainty_kwh"],
        co2e_avoided_kg=row["co2e_avoided_kg"],
        co2e_uncertainty_kg=row["co2e_uncertainty_kg"],
        confidence=row["confidence"],
        baseline_kwh=row["baseline_kwh"],
        actual_kwh=row["actual_kwh"],
        rebound_kwh=row["rebound_kwh"],
        rebound_co2e_kg=row["rebound_co2e_kg"],
        flags=tuple(row["flags"]),
        baseline_method=row["baseline_method"],
        days_used=row["days_used"],
        factor_ids=tuple(row["factor_ids"]),
        detail=json.loads(row["detail"]) if with_detail else {},
        verified_at=row["verified_at"],
    )


_MONTH_ROWS: Final = """
WITH RECURSIVE sub AS (
    SELECT id FROM nodes WHERE id = $2
    UNION ALL
    SELECT n.id FROM nodes n JOIN sub ON n.parent = sub.id
), month_rows AS (
    -- The verifications counted: of the month, under the node, inside what the caller sees.
    SELECT status, energy_avoided_kwh, uncertainty_kwh, co2e_avoided_kg, co2e_uncertainty_kg,
           confidence, flags
    FROM dispatch_verifications
    WHERE month = $1
      AND ($2::text IS NULL OR node_id IN (SELECT id FROM sub))
      AND ($3::text[] IS NULL OR node_id = ANY($3::text[]))
)
"""


class VerificationStore:
    """The ``dispatch_verifications`` table (migration 009) and the reads the service needs."""

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        """Run ``query`` on a pooled connection; the timeout bounds both the wait for one and the query."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            rows: list[Any] = await conn.fetch(query, *args, timeout=self._timeout_s)
        return rows

    async def _fetchrow(self, query: str, *args: Any) -> Any:
        """Return the first row of ``query`` (None if none), as :meth:`_fetch` runs it."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            return await conn.fetchrow(query, *args, timeout=self._timeout_s)

    # -- the API's reads -----------------------------------------------------------------------

    async def get(self, dispatch_id: int) -> Verification | None:
        """Return one dispatch's verification with its detail, or None if it has none yet."""
        row = await self._fetchrow(
            f"SELECT {_COLUMNS} FROM dispatch_verifications WHERE dispatch_id = $1",  # noqa: S608 -- constant
            dispatch_id,
        )
        return _verification(row) if row is not None else None

    async def of_dispatches(self, dispatch_ids: Sequence[int]) -> dict[int, Verification]:
        """Return the verifications (without detail) of these dispatches, by dispatch id."""
        if not dispatch_ids:
            return {}
        rows = await self._fetch(
            f"""SELECT {_SUMMARY_COLUMNS} FROM dispatch_verifications
                WHERE dispatch_id = ANY($1::bigint[])""",  # noqa: S608 -- constant
            list(dispatch_ids),
        )
        return {row["dispatch_id"]: _verification(row, with_detail=False) for row in rows}

    async def monthly(
        self, month: str, *, node: str | None = None, within: Sequence[str] | None = None
    ) -> MonthlyVerification | None:
        """Add up the verifications of ``month`` on ``node`` and the nodes below it (all if None).

        ``within`` limits the nodes further (the caller's visible nodes; None: no limit). Returns
        None when ``node`` is not a node of the hierarchy.
        """
        sums = await self._fetchrow(
            _MONTH_ROWS  # noqa: S608 -- constants only
            + """SELECT EXISTS (SELECT 1 FROM nodes WHERE id = $2) AS node_known,
                        count(*)::int AS dispatches,
                        (count(*) FILTER (WHERE status = 'measured'))::int AS measured,
                        (count(*) FILTER (WHERE status = 'unmeasurable'))::int AS unmeasurable,
                        coalesce(sum(energy_avoided_kwh), 0) AS kwh,
                        sqrt(coalesce(sum(uncertainty_kwh ^ 2), 0)) AS u_kwh,
                        coalesce(sum(co2e_avoided_kg), 0) AS kg,
                        sqrt(coalesce(sum(co2e_uncertainty_kg ^ 2), 0)) AS u_kg,
                        array_agg(DISTINCT confidence) FILTER (WHERE confidence IS NOT NULL) AS conf,
                        (SELECT coalesce(jsonb_object_agg(flag, n), '{}'::jsonb)
                         FROM (SELECT flag, count(*)::int AS n FROM month_rows, unnest(flags) AS flag
                               GROUP BY flag) AS per_flag) AS flag_counts
                 FROM month_rows""",
            month,
            node,
            list(within) if within is not None else None,
        )
        if node is not None and not sums["node_known"]:
            return None
        confidences = sums["conf"] or []
        return MonthlyVerification(
            month=month,
            dispatches=sums["dispatches"],
            measured=sums["measured"],
            unmeasurable=sums["unmeasurable"],
            energy_avoided_kwh=sums["kwh"],
            uncertainty_kwh=sums["u_kwh"],
            co2e_avoided_t=sums["kg"] / KG_PER_T,
            co2e_uncertainty_t=sums["u_kg"] / KG_PER_T,
            confidence=confidences[0] if len(confidences) == 1 else None,
            flag_counts=dict(sorted(json.loads(sums["flag_counts"]).items())),
        )

    # -- the service's reads and writes --------------------------------------------------------

    async def save(self, v: Verification) -> bool:
        """Store a verification; return False if the dispatch already had one (nothing changed)."""
        inserted = await self._fetchrow(
            f"""INSERT INTO dispatch_verifications ({_COLUMNS})
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                        $18, $19, $20, $21, $22, $23, $24, $25, $26::jsonb)
                ON CONFLICT (dispatch_id) DO NOTHING RETURNING true""",  # noqa: S608 -- constant
            v.dispatch_id,
            v.node,
            v.status.value,
            v.reason,
            v.month,
            v.event_start,
            v.event_end,
            v.post_end,
            v.interval_s,
            list(v.meters),
            v.meter_basis.value,
            v.energy_avoided_kwh,
            v.uncertainty_kwh,
            v.co2e_avoided_kg,
            v.co2e_uncertainty_kg,
            v.confidence,
            v.baseline_kwh,
            v.actual_kwh,
            v.rebound_kwh,
            v.rebound_co2e_kg,
            list(v.flags),
            v.baseline_method,
            v.days_used,
            list(v.factor_ids),
            v.verified_at,
            json.dumps(v.detail, allow_nan=False),
        )
        return inserted is not None

    async def unaudited(self, limit: int) -> list[Verification]:
        """Return stored verifications (without detail) whose audit entry is not written yet, oldest first."""
        rows = await self._fetch(
            f"""SELECT {_SUMMARY_COLUMNS} FROM dispatch_verifications WHERE audited_at IS NULL
                ORDER BY dispatch_id LIMIT $1""",  # noqa: S608 -- constant
            limit,
        )
        return [_verification(row, with_detail=False) for row in rows]

    async def mark_audited(self, dispatch_id: int) -> None:
        """Record that a verification's audit entry is written."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            await conn.execute(
                "UPDATE dispatch_verifications SET audited_at = now() WHERE dispatch_id = $1",
                dispatch_id,
                timeout=self._timeout_s,
            )

    async def candidates(
        self, *, ended_before: datetime, open_before: datetime, skip: Sequence[int], limit: int
    ) -> list[_Dispatch]:
        """Return ended, executed dispatches without a verification, oldest first."""
        rows = await self._fetch(
            f"""SELECT {_DISPATCH_COLUMNS} FROM dispatches d
                WHERE d.state = ANY($1::text[])
                  AND NOT EXISTS (SELECT 1 FROM dispatch_verifications v WHERE v.dispatch_id = d.id)
                  AND NOT (d.id = ANY($2::bigint[]))
                  AND ((d.hold_until IS NOT NULL AND d.hold_until <= $3)
                       OR (d.hold_until IS NULL AND d.state = 'verified' AND d.created_at <= $4))
                ORDER BY d.id LIMIT $5""",  # noqa: S608 -- constant
            list(ENDED_STATES),
            list(skip),
            ended_before,
            open_before,
            limit,
        )
        return [_Dispatch.from_row(row) for row in rows]

    async def executed_between(self, start: datetime, end: datetime, *, but: int) -> list[_Dispatch]:
        """Return executed dispatches other than ``but`` created before ``end`` and not ended by ``start``."""
        rows = await self._fetch(
            f"""SELECT {_DISPATCH_COLUMNS} FROM dispatches
                WHERE id <> $1 AND state = ANY($2::text[]) AND created_at < $3
                  AND (hold_until IS NULL OR hold_until >= $4)
                ORDER BY id LIMIT 10000""",  # noqa: S608 -- constant
            but,
            list(EXECUTED_STATES),
            end,
            start,
        )
        return [_Dispatch.from_row(row) for row in rows]

    async def interval_energy(
        self, meters: Sequence[LedgerPoint], start: datetime, end: datetime, interval_s: int
    ) -> dict[str, list[tuple[datetime, float]]]:
        """Return each meter's kWh per rollup bucket in ``[start, end)`` (missing buckets left out).

        A counter's energy is the step between the ``last`` values of the bucket and the bucket just
        before it; a bucket whose neighbour is missing, or whose counter went down (a reset or a
        wrap: what was used is unknown), is left out rather than guessed. A power's energy is the
        bucket's mean kW times the interval.
        """
        step = timedelta(seconds=interval_s)
        hours = interval_s / 3600.0
        table = ROLLUP_TABLES[interval_s]
        by_point = {m.point: m for m in meters}
        async with self._pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
            await conn.execute("SET LOCAL jit = off", timeout=self._timeout_s)
            rows = await conn.fetch(
                f"""SELECT p.point_id, r.bucket, r.count, r.sum, r.last,
                           lag(r.last) OVER w AS prev_last, lag(r.bucket) OVER w AS prev_bucket
                    FROM {table} r JOIN points p ON p.id = r.point
                    WHERE p.point_id = ANY($1::text[]) AND r.bucket >= $2 AND r.bucket < $3
                      AND r.count > 0
                    WINDOW w AS (PARTITION BY r.point ORDER BY r.bucket)""",  # noqa: S608 -- table from a constant map
                list(by_point),
                start - step,
                end,
                timeout=self._timeout_s,
            )
        out: dict[str, list[tuple[datetime, float]]] = {point: [] for point in by_point}
        for row in rows:
            bucket: datetime = row["bucket"]
            if bucket < start:
                continue  # read only as the previous bucket of the first interval
            meter = by_point[row["point_id"]]
            if meter.rate:
                kwh = row["sum"] / row["count"] * hours
            else:
                prev_last, prev_bucket = row["prev_last"], row["prev_bucket"]
                if prev_bucket != bucket - step or prev_last is None or row["last"] < prev_last:
                    continue
                kwh = row["last"] - prev_last
            if math.isfinite(kwh):
                out[meter.point].append((bucket, float(kwh)))
        return out


@dataclass(frozen=True, slots=True)
class _Dispatch:
    """What the service needs of a ``dispatches`` row."""

    id: int
    node: NodeId
    point: PointId
    state: str
    created_at: datetime
    hold_until: datetime | None
    result: Mapping[str, Any]

    @classmethod
    def from_row(cls, row: Any) -> _Dispatch:
        result = json.loads(row["result"]) if row["result"] is not None else {}
        return cls(
            id=row["id"],
            node=NodeId(row["node_id"]),
            point=PointId(row["point_id"]),
            state=row["state"],
            created_at=row["created_at"],
            hold_until=row["hold_until"],
            result=result if isinstance(result, dict) else {},
        )

    def started(self) -> datetime:
        """Return when the write took effect: the gateway's result time, else when it was made."""
        return _parse_time(self.result.get("ts")) or self.created_at

    def ended(self) -> datetime | None:
        """Return when the write stopped: the revert's result time, else ``hold_until``."""
        revert = self.result.get("revert")
        if self.state == "reverted" and isinstance(revert, dict):
            reverted_at = _parse_time(revert.get("ts"))
            if reverted_at is not None and self.hold_until is not None:
                return max(reverted_at, self.hold_until)
        return self.hold_until


def _parse_time(raw: Any) -> datetime | None:
    if not isinstance(raw, str):
        return None
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return at if at.tzinfo is not None else None


@dataclass(slots=True, kw_only=True)
class _Draft:
    """What is known of a verification before the measurement says more."""

    dispatch_id: int
    node: NodeId
    month: str
    event_start: datetime
    interval_s: int
    verified_at: datetime
    event_end: datetime | None = None
    meters: tuple[str, ...] = ()
    meter_basis: MeterBasis = MeterBasis.NONE

    def unmeasurable(self, reason: str) -> Verification:
        """Return the verification of a dispatch that cannot be measured."""
        return Verification(
            dispatch_id=self.dispatch_id,
            node=self.node,
            status=VerificationStatus.UNMEASURABLE,
            reason=reason,
            month=self.month,
            event_start=self.event_start,
            event_end=self.event_end,
            post_end=None,
            interval_s=self.interval_s,
            meters=self.meters,
            meter_basis=self.meter_basis,
            verified_at=self.verified_at,
        )

    def measured(
        self,
        effect: DispatchEffect,
        flags: Sequence[str],
        factor_ids: tuple[str, ...],
        detail: Mapping[str, Any],
    ) -> Verification:
        """Return the verification of a measured effect."""
        return Verification(
            dispatch_id=self.dispatch_id,
            node=self.node,
            status=VerificationStatus.MEASURED,
            reason="",
            month=self.month,
            event_start=self.event_start,
            event_end=self.event_end,
            post_end=effect.post_end,
            interval_s=self.interval_s,
            meters=self.meters,
            meter_basis=self.meter_basis,
            energy_avoided_kwh=effect.energy_avoided_kwh,
            uncertainty_kwh=effect.uncertainty_kwh,
            co2e_avoided_kg=effect.co2e_avoided_kg,
            co2e_uncertainty_kg=effect.co2e_uncertainty_kg,
            confidence=effect.confidence,
            baseline_kwh=effect.baseline_kwh,
            actual_kwh=effect.actual_kwh,
            rebound_kwh=effect.rebound_kwh,
            rebound_co2e_kg=effect.rebound_co2e_kg,
            flags=tuple(sorted({f.value for f in effect.flags} | set(flags))),
            baseline_method=effect.method,
            days_used=len(effect.days_used),
            factor_ids=factor_ids,
            detail=detail,
            verified_at=self.verified_at,
        )


def _detail(effect: DispatchEffect, dispatch: _Dispatch, excluded_windows: int) -> dict[str, Any]:
    """Return what the report needs beyond the totals: per interval, similar days, adjustment."""
    return {
        "dispatch_state": dispatch.state,
        "point": dispatch.point,
        "took_effect_at": _iso(dispatch.started()),
        "ended_at": _iso(dispatch.ended()),
        "window_avoided_kwh": effect.window_avoided_kwh,
        "day_kind": effect.day_kind,
        "days_used": [d.isoformat() for d in effect.days_used],
        "adjustment": effect.adjustment.value,
        "adjustment_factor": effect.adjustment_factor,
        "adjustment_offset_kwh": effect.adjustment_offset_kwh,
        "missing_intervals": effect.missing_intervals,
        "excluded_windows": excluded_windows,
        "intervals": [
            {
                "start": _iso(i.start),
                "phase": i.phase.value,
                "baseline_kwh": i.baseline_kwh,
                "actual_kwh": i.actual_kwh,
                "intensity_kg_per_kwh": i.intensity_kg_per_kwh,
            }
            for i in effect.intervals
        ],
    }


# -- the service ----------------------------------------------------------------------------------


class _Deferred(Exception):
    """The dispatch's data may still arrive: try again at ``until``."""

    def __init__(self, until: datetime, why: str) -> None:
        super().__init__(why)
        self.until = until


class _Unmeasurable(Exception):
    """The dispatch cannot be measured, for the reason given."""


class VerificationService:
    """Measure each dispatch after its window, store, audit and publish the effect (see module doc)."""

    def __init__(
        self,
        store: VerificationStore,
        meters: Sequence[LedgerPoint],
        factors: FactorLibrary,
        *,
        region: str,
        timezone: str,
        clock: Clock,
        audit: Auditor | None = None,
        publish: Publisher | None = None,
        method: BaselineMethod | None = None,
        interval_s: int = 900,
        post_window: timedelta = timedelta(hours=1),
        settle: timedelta = timedelta(minutes=30),
        data_grace: timedelta = timedelta(hours=6),
        open_ended_after: timedelta = timedelta(days=1),
        retry_every: timedelta = timedelta(minutes=15),
        period_s: float = 300.0,
        batch: int = 20,
        measure_timeout_s: float = 30.0,
        publish_timeout_s: float = 5.0,
    ) -> None:
        how = method if method is not None else BaselineMethod(timezone=timezone)
        if how.timezone != timezone:
            raise ValueError(f"method.timezone {how.timezone!r} differs from the site's {timezone!r}")
        if interval_s not in ROLLUP_TABLES:
            raise ValueError(f"interval_s must be one of {sorted(ROLLUP_TABLES)}, got {interval_s}")
        step = timedelta(seconds=interval_s)
        if post_window < timedelta(0) or post_window % step:
            raise ValueError(f"post_window must be >= 0 and a whole number of intervals, got {post_window}")
        for name, value in (("settle", settle), ("data_grace", data_grace), ("retry_every", retry_every)):
            if value < timedelta(0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if open_ended_after <= timedelta(0) or period_s <= 0 or batch < 1 or measure_timeout_s <= 0:
            raise ValueError("open_ended_after, period_s, batch and measure_timeout_s must be positive")
        self._store = store
        self._meters = tuple(meters)
        self._factors = factors
        self._region = region
        self._zone = ZoneInfo(timezone)
        self._clock = clock
        self._audit = audit
        self._publish = publish
        self._method = how
        self._interval_s = interval_s
        self._step = step
        self._post_window = post_window
        self._settle = settle
        self._data_grace = data_grace
        self._open_ended_after = open_ended_after
        self._retry_every = retry_every
        self._period_s = period_s
        self._batch = batch
        self._measure_timeout_s = measure_timeout_s
        self._publish_timeout_s = publish_timeout_s
        self._deferred: dict[int, datetime] = {}
        """Dispatches waiting for late data, and when to look again (bounded by ``data_grace``)."""
        self._healthy = True

    @property
    def store(self) -> VerificationStore:
        """Return the verifications table."""
        return self._store

    async def run(self) -> None:
        """Verify what is due now (catch-up after a restart), then every ``period_s``, until cancelled."""
        while True:
            try:
                await self.turn()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
                raise_if_cancelling()
                if self._healthy:
                    _LOGGER.warning("dispatch verification: turn failed (will retry): %s", err)
                    self._healthy = False
            else:
                if not self._healthy:
                    _LOGGER.info("dispatch verification: working again")
                    self._healthy = True
            await self._clock.sleep(self._period_s)

    async def turn(self) -> list[Verification]:
        """Audit what a crash left unaudited, then verify every due dispatch; return the new rows."""
        for pending in await self._store.unaudited(self._batch * 5):
            await self._announce(pending)
        now = self._clock.now()
        self._deferred = {k: until for k, until in self._deferred.items() if until > now}
        done: list[Verification] = []
        while True:
            due = await self._store.candidates(
                ended_before=now - self._post_window - self._settle,
                open_before=now - self._open_ended_after,
                skip=sorted(self._deferred),
                limit=self._batch,
            )
            if not due:
                return done
            for dispatch in due:
                raise_if_cancelling()
                try:
                    verification = await self._verify(dispatch, now)
                except _Deferred as wait:
                    self._deferred[dispatch.id] = wait.until
                    _LOGGER.debug("dispatch %d: verification deferred: %s", dispatch.id, wait)
                    continue
                self._deferred.pop(dispatch.id, None)
                if await self._store.save(verification):
                    await self._announce(verification)
                    done.append(verification)

    async def _announce(self, verification: Verification) -> None:
        """Audit the verification (then mark it) and publish it (best effort)."""
        body = verification.to_json()
        if self._audit is not None:
            await self._audit(ACTOR, AUDIT_ACTION, f"dispatch:{verification.dispatch_id}", body)
        await self._store.mark_audited(verification.dispatch_id)
        if self._publish is None:
            return
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                await self._publish({"kind": ENTRY_KIND, **body})
        except (OSError, TimeoutError, ConnectionError) as err:
            raise_if_cancelling()
            _LOGGER.warning("dispatch %d: verification not published: %s", verification.dispatch_id, err)

    # -- one dispatch -------------------------------------------------------------------------

    async def _verify(self, dispatch: _Dispatch, now: datetime) -> Verification:
        start = self._floor(dispatch.started())
        draft = _Draft(
            dispatch_id=dispatch.id,
            node=dispatch.node,
            month=_month(start, self._zone),
            event_start=start,
            interval_s=self._interval_s,
            verified_at=now,
        )
        try:
            return await self._measure(dispatch, now, draft)
        except _Unmeasurable as err:
            return draft.unmeasurable(str(err))

    async def _measure(self, dispatch: _Dispatch, now: datetime, draft: _Draft) -> Verification:
        started, ended = dispatch.started(), dispatch.ended()
        if ended is None:
            raise _Unmeasurable(
                "the dispatch has no hold_until, so its event window has no end to measure to"
            )
        if ended <= started:
            raise _Unmeasurable(
                f"the hold ended ({_iso(ended)}) before the write took effect ({_iso(started)})"
            )
        event_start, event_end = self._floor(started), self._ceil(ended)
        draft.event_end = event_end
        choice = affected_meters(dispatch.point, dispatch.node, self._meters)
        if choice.basis is MeterBasis.NONE:
            raise _Unmeasurable(choice.reason)
        draft.meters = tuple(m.point for m in choice.meters)
        draft.meter_basis = choice.basis
        post_end = event_end + self._post_window if self._post_window else None
        window_end = post_end or event_end
        if now < window_end + self._settle:
            raise _Deferred(window_end + self._settle, "the rebound window has not settled")
        event_day = event_start.astimezone(self._zone).date()
        data_start = datetime.combine(
            event_day - timedelta(days=self._method.lookback_days + 1), datetime.min.time(), self._zone
        ).astimezone(UTC)
        series = await self._store.interval_energy(choice.meters, data_start, window_end, self._interval_s)
        empty = sorted(point for point, values in series.items() if not values)
        if empty:
            raise _Unmeasurable(
                f"no interval energy stored for {', '.join(empty)} between {_iso(data_start)} and "
                f"{_iso(window_end)} (retention, or the meter was not read)"
            )
        missing = self._missing(series, event_start, window_end)
        if missing and now < window_end + self._data_grace:
            raise _Deferred(
                min(now + self._retry_every, window_end + self._data_grace),
                f"{missing} interval(s) of the event and rebound windows are missing",
            )
        flags = self._state_flags(dispatch)
        common = set.intersection(*({t for t, _ in values} for values in series.values()))
        data_end = max(common) + self._step if common else event_start
        if post_end is not None and post_end > data_end:
            flags.append(ServiceFlag.POST_WINDOW_CUT.value)
            post_end = data_end if data_end > event_end else None
        intensity, factor_ids = self._intensity(event_start, post_end or event_end)
        excluded = await self._excluded(dispatch, data_start, post_end or event_end, choice)
        try:
            async with asyncio.timeout(self._measure_timeout_s):
                effect = await asyncio.to_thread(
                    measure_dispatch,
                    series,
                    event_start=event_start,
                    event_end=event_end,
                    intensity_kg_per_kwh=intensity,
                    post_end=post_end,
                    excluded=excluded,
                    method=self._method,
                    interval=self._step,
                    dispatch=str(dispatch.id),
                )
        except ValueError as err:
            raise _Unmeasurable(str(err)) from None
        except TimeoutError:
            raise _Unmeasurable(f"the measurement ran over {self._measure_timeout_s:g} s") from None
        return draft.measured(effect, flags, factor_ids, _detail(effect, dispatch, len(excluded)))

    def _missing(
        self, series: Mapping[str, Sequence[tuple[datetime, float]]], start: datetime, end: datetime
    ) -> int:
        """Return how many (meter, interval) pairs of ``[start, end)`` have no energy."""
        wanted = int((end - start) / self._step)
        return sum(wanted - sum(1 for t, _ in values if start <= t < end) for values in series.values())

    def _state_flags(self, dispatch: _Dispatch) -> list[str]:
        if dispatch.state == "revert_failed":
            return [ServiceFlag.REVERT_FAILED.value]
        if dispatch.state == "verified":
            return [ServiceFlag.NOT_REVERTED.value]
        return []

    def _intensity(
        self, start: datetime, end: datetime
    ) -> tuple[list[tuple[datetime, float]], tuple[str, ...]]:
        """Return the grid factor in force from ``start`` and at each local midnight before ``end``."""
        steps: list[tuple[datetime, float]] = []
        ids: list[str] = []
        at = start
        while at < end:
            try:
                factor = self._factors.in_force(Carrier.ELECTRICITY, at, self._region)
            except NotFound as err:
                raise _Unmeasurable(str(err)) from None
            steps.append((at, factor.value))
            if factor.id not in ids:
                ids.append(factor.id)
            local_day = at.astimezone(self._zone).date() + timedelta(days=1)
            at = datetime.combine(local_day, datetime.min.time(), self._zone).astimezone(UTC)
        return steps, tuple(ids)

    async def _excluded(
        self, dispatch: _Dispatch, start: datetime, end: datetime, choice: MeterChoice
    ) -> list[tuple[datetime, datetime]]:
        """Return the windows of other dispatches on the same meters: not similar days, not in the fit."""
        mine = {m.point for m in choice.meters}
        windows: list[tuple[datetime, datetime]] = []
        for other in await self._store.executed_between(start, end, but=dispatch.id):
            theirs = affected_meters(other.point, other.node, self._meters)
            if not mine.intersection(m.point for m in theirs.meters):
                continue
            other_end = other.ended() or other.started() + self._open_ended_after
            if other_end <= other.started():
                continue
            windows.append((self._floor(other.started()), self._ceil(other_end) + self._post_window))
        return windows

    def _floor(self, at: datetime) -> datetime:
        """Return the start of the interval holding ``at`` (a boundary up to ``SNAP`` after: itself)."""
        seconds = (at - SNAP).astimezone(UTC).timestamp()
        return datetime.fromtimestamp(seconds - seconds % self._interval_s, UTC) + (
            self._step if seconds % self._interval_s > self._interval_s - 2 * SNAP.total_seconds() else ZERO
        )

    def _ceil(self, at: datetime) -> datetime:
        """Return the end of the interval holding ``at`` (a boundary up to ``SNAP`` before: itself)."""
        seconds = (at - SNAP).astimezone(UTC).timestamp()
        return datetime.fromtimestamp(seconds - seconds % self._interval_s, UTC) + self._step


def _month(at: datetime, zone: ZoneInfo) -> str:
    local = at.astimezone(zone)
    return f"{local.year:04d}-{local.month:02d}"
