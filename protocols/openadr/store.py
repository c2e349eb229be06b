"""What a VTN must remember across restarts: the VEN's registration, its report map, and its events.

The state lives in PostgreSQL (migration ``011_openadr.sql``), not in Redis: an event the EMS has
accepted may curtail load for hours, so its record must survive a restart of Redis as well as of the
gateway, and it sits next to the dispatches it carries out (``008_dispatches.sql``) where operators
query them. The volume is tiny (a few rows per dispatch), so PostgreSQL's latency does not matter.

:class:`VtnStateStore` is the seam the driver uses; :class:`PostgresVtnStateStore` is the store.
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import asyncpg

from protocols.openadr.config import OpenAdrSignal
from scada.model import PointId, ServiceError

__all__ = [
    "EventRecord",
    "EventStatus",
    "OptType",
    "PostgresVtnStateStore",
    "Registration",
    "ReportSource",
    "VtnState",
    "VtnStateStore",
]


class OptType(enum.StrEnum):
    """The VEN's answer to an event (oadrCreatedEvent optType); NONE until it answers."""

    NONE = "none"
    OPT_IN = "optIn"
    OPT_OUT = "optOut"

    @property
    def code(self) -> float:
        """Return the value an ``opt`` status point carries: 0 none, 1 in, -1 out."""
        return {"none": 0.0, "optIn": 1.0, "optOut": -1.0}[self.value]


class EventStatus(enum.IntEnum):
    """OpenADR event status, with the code an ``event`` status point carries."""

    NONE = 0
    FAR = 1
    ACTIVE = 2
    COMPLETED = 3
    CANCELLED = 4

    @property
    def oadr(self) -> str:
        """Return the oadr eventStatus word (``far``, ``active``...)."""
        return self.name.lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportSource:
    """One data point (rID) the VEN offered in a METADATA report, and the point it feeds."""

    r_id: str
    point: PointId
    resource_id: str
    measurement: str
    unit: str | None
    scale: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """The VEN's registration with this VTN (oadrCreatedPartyRegistration)."""

    ven_id: str
    ven_name: str
    registration_id: str
    registered_at: datetime
    reports: Mapping[str, ReportSource] = field(default_factory=dict)
    """Report data points by rID."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRecord:
    """One OpenADR event the VTN issued for a write, and the VEN's answer to its current version."""

    event_id: str
    point: PointId
    correlation_id: str
    signal: OpenAdrSignal
    requested: float
    """The value written, in the point's unit."""
    payload: float
    """The signal payload sent (``-requested`` for LOAD_DISPATCH delta)."""
    dtstart: datetime
    duration_s: float
    created_at: datetime
    modification_number: int = 0
    cancelled: bool = False
    opt: OptType = OptType.NONE
    opt_modification_number: int | None = None

    @property
    def end(self) -> datetime:
        """Return when the event's active period ends."""
        return self.dtstart + timedelta(seconds=self.duration_s)

    @property
    def answered(self) -> bool:
        """Return True when the VEN has answered the current version (modification) of the event."""
        return self.opt_modification_number == self.modification_number

    def status(self, now: datetime) -> EventStatus:
        """Return the event's status at ``now``."""
        if self.cancelled:
            return EventStatus.CANCELLED
        if now >= self.end:
            return EventStatus.COMPLETED
        if now >= self.dtstart:
            return EventStatus.ACTIVE
        return EventStatus.FAR


@dataclass(frozen=True, slots=True, kw_only=True)
class VtnState:
    """Everything a VTN reloads at start: the registration (if any) and the events still relevant."""

    registration: Registration | None
    events: Sequence[EventRecord]


class VtnStateStore(Protocol):
    """Durable state of the VTNs, by device; every method raises :class:`ServiceError` on failure."""

    async def load(self, device: str, *, since: datetime) -> VtnState:
        """Return the device's registration and its events that end after ``since``."""

    async def save_registration(self, device: str, registration: Registration | None) -> None:
        """Store (or, with None, delete) the device's registration."""

    async def save_event(self, device: str, event: EventRecord) -> None:
        """Insert or update one event."""


class PostgresVtnStateStore:
    """The VTN state in PostgreSQL (tables of migration 011)."""

    _LOAD_REGISTRATION = """
        SELECT ven_id, ven_name, registration_id, registered_at, reports::text AS reports
        FROM openadr_registrations WHERE device_id = $1"""
    _LOAD_EVENTS = """
        SELECT * FROM openadr_events
        WHERE device_id = $1 AND dtstart + make_interval(secs => duration_s) > $2
        ORDER BY created_at"""
    _SAVE_REGISTRATION = """
        INSERT INTO openadr_registrations
            (device_id, ven_id, ven_name, registration_id, registered_at, reports)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb)
        ON CONFLICT (device_id) DO UPDATE SET
            ven_id = EXCLUDED.ven_id, ven_name = EXCLUDED.ven_name,
            registration_id = EXCLUDED.registration_id, registered_at = EXCLUDED.registered_at,
            reports = EXCLUDED.reports"""
    _SAVE_EVENT = """
        INSERT INTO openadr_events
            (event_id, device_id, point_id, correlation_id, signal, requested, payload, dtstart,
             duration_s, modification_number, cancelled, opt, opt_modification_number, created_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
        ON CONFLICT (event_id) DO UPDATE SET
            modification_number = EXCLUDED.modification_number, cancelled = EXCLUDED.cancelled,
            opt = EXCLUDED.opt, opt_modification_number = EXCLUDED.opt_modification_number,
            updated_at = now()"""

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def load(self, device: str, *, since: datetime) -> VtnState:
        """Return the device's registration and its events that end after ``since``."""
        async with self._connection() as conn:
            row = await conn.fetchrow(self._LOAD_REGISTRATION, device, timeout=self._timeout_s)
            rows = await conn.fetch(self._LOAD_EVENTS, device, since, timeout=self._timeout_s)
        registration = None
        if row is not None:
            registration = Registration(
                ven_id=row["ven_id"],
                ven_name=row["ven_name"],
                registration_id=row["registration_id"],
                registered_at=row["registered_at"],
                reports={
                    r_id: _report_source(r_id, item) for r_id, item in json.loads(row["reports"]).items()
                },
            )
        events = [
            EventRecord(
                event_id=r["event_id"],
                point=PointId(r["point_id"]),
                correlation_id=r["correlation_id"],
                signal=OpenAdrSignal(r["signal"]),
                requested=r["requested"],
                payload=r["payload"],
                dtstart=r["dtstart"],
                duration_s=r["duration_s"],
                created_at=r["created_at"],
                modification_number=r["modification_number"],
                cancelled=r["cancelled"],
                opt=OptType(r["opt"]),
                opt_modification_number=r["opt_modification_number"],
            )
            for r in rows
        ]
        return VtnState(registration=registration, events=events)

    async def save_registration(self, device: str, registration: Registration | None) -> None:
        """Store (or, with None, delete) the device's registration."""
        async with self._connection() as conn:
            if registration is None:
                await conn.execute(
                    "DELETE FROM openadr_registrations WHERE device_id = $1", device, timeout=self._timeout_s
                )
                return
            reports = {
                r_id: {
                    "point": s.point,
                    "resource_id": s.resource_id,
                    "measurement": s.measurement,
                    "unit": s.unit,
                    "scale": s.scale,
                }
                for r_id, s in registration.reports.items()
            }
            await conn.execute(
                self._SAVE_REGISTRATION,
                device,
                registration.ven_id,
                registration.ven_name,
                registration.registration_id,
                registration.registered_at,
                json.dumps(reports),
                timeout=self._timeout_s,
            )

    async def save_event(self, device: str, event: EventRecord) -> None:
        """Insert or update one event (identity fields are written once; status fields updated)."""
        async with self._connection() as conn:
            await conn.execute(
                self._SAVE_EVENT,
                event.event_id,
                device,
                event.point,
                event.correlation_id,
                event.signal.value,
                event.requested,
                event.payload,
                event.dtstart,
                event.duration_s,
                event.modification_number,
                event.cancelled,
                event.opt.value,
                event.opt_modification_number,
                event.created_at,
                timeout=self._timeout_s,
            )

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """Yield a pooled connection; PostgreSQL trouble becomes :class:`ServiceError`."""
        try:
            async with self._pool.acquire(timeout=self._timeout_s) as conn:
                yield conn
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as err:
            raise ServiceError(f"OpenADR state store: {err or type(err).__name__}") from err


def _report_source(r_id: str, item: Mapping[str, Any]) -> ReportSource:
    return ReportSource(
        r_id=r_id,
        point=PointId(str(item["point"])),
        resource_id=str(item["resource_id"]),
        measurement=str(item.get("measurement") or ""),
        unit=item.get("unit"),
        scale=item.get("scale"),
    )
