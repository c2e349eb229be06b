"""OpenADR 2.0b driver: the server is the VTN, an external EMS is the VEN; dispatches become events.

The driver implements :class:`scada.model.SubscriptionDriver`. :meth:`OpenAdrDriver.connect` loads
the VTN's state (:mod:`protocols.openadr.store`) and starts an OpenADR 2.0b VTN (``openleadr``'s
``OpenADRServer``: XML, schema validation, EiRegisterParty, EiEvent, EiReport, OadrPoll over
simpleHttp, pull model) on the device's ``listen_host:listen_port``. The VEN polls it.

Flow
----
- Every oadrPoll from the VEN is a sign of life: :meth:`~OpenAdrDriver.receive` returns ``[]``
  for it, so the session keeps the device online while the VEN polls and calls it stale when the
  VEN goes quiet.
- :meth:`~OpenAdrDriver.write` on a ``signal`` point creates an event: interval now..``hold_until``
  (the configured ``default_duration_s`` without one), LOAD_DISPATCH delta ``-value`` kW or SIMPLE
  level ``value``. The event is stored first, then served at the VEN's next poll. The write returns
  when the VEN opts in; an optOut raises :class:`DeviceProtocolError` ("opted out"), silence for
  ``timeout_s`` cancels the event and raises :class:`DeviceUnavailable`. Writing 0 cancels the
  point's open event and waits for the VEN to acknowledge the cancellation. A new write supersedes
  (cancels) the point's open event.
- :meth:`~OpenAdrDriver.read_back` of a ``signal`` point returns the value the VEN accepted: the
  requested value of the open event it opted into, 0 when none is open (cancelled, completed, opted
  out).
- TELEMETRY_USAGE / TELEMETRY_STATUS reports: at oadrRegisterReport the VTN requests every offered
  data point whose ``resourceID`` (and measurement) a point names, at the poll interval; each
  oadrUpdateReport value becomes a reading, converted to the point's unit (W -> kW...). A value
  that is not a finite number, or in a unit that cannot be converted, becomes a bad-quality
  reading with the reason. A message the VTN cannot parse (bad XML, schema violation) or a value
  for an rID nobody requested goes to the dead-letter sink with the reason.
- ``status`` points publish the status of the device's latest event (far/active/completed/
  cancelled) and the VEN's opt, and ``signal`` points the value the VEN accepted, whenever they
  change (so the dispatcher knows the value to restore at ``hold_until``).

Security
--------
Plain HTTP; the VEN is known by its ``venName`` at registration and its ``venID`` afterwards. No
TLS, no client certificates, no XML signatures (see docs/openadr.md): bind to a trusted network.

openleadr keeps some settings on a class shared by every VTN in the process (the VEN lookup, the
message signer): the driver installs one VEN lookup that asks each running driver by ``venID``, so
several OpenADR devices can share a gateway as long as their ``ven_id`` differ.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Final

from aiohttp import web
from openleadr import OpenADRServer, objects  # type: ignore[import-untyped]

from protocols.common import BatchQueue, LatestReadings, PointRejected, index_points, lookup_point
from protocols.openadr.config import OpenAdrDeviceConfig, OpenAdrPointConfig, OpenAdrSignal, OpenAdrStatus
from protocols.openadr.store import (
    EventRecord,
    EventStatus,
    OptType,
    Registration,
    ReportSource,
    VtnStateStore,
)
from scada.model import (
    Acquisition,
    Clock,
    DeadLetterSink,
    DeviceId,
    DeviceProtocolError,
    DeviceUnavailable,
    PointId,
    Quality,
    Reading,
    RequestRejected,
    ServiceError,
)

__all__ = ["OpenAdrDriver", "OpenAdrDriverStats", "OpenAdrPointSpec"]

_LOGGER = logging.getLogger(__name__)

DEFAULT_QUEUE_BATCHES: Final = 64
_NO_VALUE_YET: Final = Quality.bad("no report received yet")
_KEEP_EVENTS_S: Final = 86_400.0
"""Events that ended longer ago than this are not reloaded at start (they stay in the table)."""
_SI_PREFIX: Final[Mapping[str, float]] = {
    "p": 1e-12,
    "n": 1e-9,
    "micro": 1e-6,
    "m": 1e-3,
    "c": 1e-2,
    "d": 1e-1,
    "none": 1.0,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
}
_UNIT_FACTORS: Final[Mapping[tuple[str, str], float]] = {
    ("w", "kw"): 1e-3,
    ("wh", "kwh"): 1e-3,
    ("var", "kvar"): 1e-3,
    ("va", "kva"): 1e-3,
    ("celsius", "degc"): 1.0,
}
"""Report unit (lowercase, as the VEN sends it) -> point unit (lowercase): factor."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenAdrPointSpec:
    """One point as the driver sees it: its OpenADR role, unit and scaling."""

    point: PointId
    config: OpenAdrPointConfig
    unit: str
    """The point's engineering unit (``kW``), which reported values are converted to."""
    scale: float = 1.0
    """Reported values: engineering value = converted value x scale + offset."""
    offset: float = 0.0
    writable: bool = False

    def __post_init__(self) -> None:
        if self.scale == 0:
            raise ValueError(f"{self.point}: scale must not be 0")
        if self.writable and self.config.signal is None:
            raise ValueError(f"{self.point}: only a 'signal' point of an openadr device can be writable")


@dataclass(slots=True)
class OpenAdrDriverStats:
    """Counters of one driver, for the session, /metrics and tests."""

    polls: int = 0
    events_sent: int = 0
    opt_ins: int = 0
    opt_outs: int = 0
    report_values: int = 0
    rejected: int = 0
    """Inputs sent to the dead-letter sink."""
    dropped: int = 0
    """Batches dropped because the session did not keep up (oldest first)."""


class OpenAdrDriver:
    """Serve one VEN as an OpenADR 2.0b VTN; dispatch by events, read by reports."""

    def __init__(
        self,
        device: str,
        config: OpenAdrDeviceConfig,
        points: Sequence[OpenAdrPointSpec],
        *,
        store: VtnStateStore,
        clock: Clock,
        dead_letters: DeadLetterSink,
        queue_batches: int = DEFAULT_QUEUE_BATCHES,
    ) -> None:
        self.stats = OpenAdrDriverStats()
        self._device = DeviceId(device)
        self._batches = BatchQueue(
            self._device, queue_batches=queue_batches, stats=self.stats, logger=_LOGGER
        )
        self._config = config
        self._specs = index_points(device, points)
        self._store = store
        self._clock = clock
        self._dead_letters = dead_letters
        self._runner: web.AppRunner | None = None
        self._registration: Registration | None = None
        self._events: dict[str, EventRecord] = {}
        self._answers: dict[str, asyncio.Future[OptType]] = {}
        self._latest = LatestReadings(missing=_NO_VALUE_YET)
        self._status_published: dict[PointId, float] = {}
        self._distribute = False
        self._last_distribution_s = -math.inf
        self._last_poll_s: float | None = None
        self._lost: str | None = "not connected"
        self.bound_port: int | None = None
        """The TCP port the VTN listens on once connected (``listen_port``, or the one picked for 0)."""

    @property
    def device(self) -> DeviceId:
        """Return the id of the device this driver talks to."""
        return self._device

    @property
    def acquisition(self) -> Acquisition:
        """Return SUBSCRIBE: the VEN pushes its reports and polls on its own schedule."""
        return Acquisition.SUBSCRIBE

    @property
    def registration(self) -> Registration | None:
        """Return the VEN's registration, None until it has registered."""
        return self._registration

    @property
    def events(self) -> tuple[EventRecord, ...]:
        """Return the events the VTN holds, oldest first."""
        return tuple(self._events.values())

    def __repr__(self) -> str:
        return f"OpenAdrDriver({self._device!r}, {self._config.listen_host}:{self._config.listen_port})"

    # ----------------------------------------------------------------------------------------------
    # Driver protocol

    async def connect(self) -> None:
        """Reload the VTN's state and start listening; raise :class:`DeviceUnavailable` if we cannot."""
        if self._runner is not None and self._lost is None:
            return
        await self.close()
        owner = _VEN_LOOKUP.get(self._config.ven_id)
        if owner is not None and owner is not self:
            raise DeviceUnavailable(
                f"{self._device}: ven_id {self._config.ven_id!r} is served by device {owner.device} already"
            )
        since = self._clock.now() - timedelta(seconds=_KEEP_EVENTS_S)
        try:
            state = await self._store.load(self._device, since=since)
        except ServiceError as err:
            raise DeviceUnavailable(f"{self._device}: cannot load the VTN state: {err}") from err
        registration = state.registration
        if registration is not None and (
            registration.ven_id != self._config.ven_id or registration.ven_name != self._config.ven_name
        ):
            registration = None  # the configuration names another VEN now: it must register anew
        self._registration = registration
        self._events = {e.event_id: e for e in state.events}
        self._distribute = any(self._deliverable(e, self._clock.now()) for e in self._events.values())
        server = self._make_server()
        runner = web.AppRunner(server.app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._config.listen_host, self._config.listen_port)
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise DeviceUnavailable(
                f"{self._device}: cannot listen on {self._config.listen_host}:{self._config.listen_port}: "
                f"{err.strerror or err}"
            ) from err
        self._runner = runner
        address = runner.addresses[0] if runner.addresses else None
        self.bound_port = int(address[1]) if isinstance(address, tuple) else self._config.listen_port
        _VEN_LOOKUP[self._config.ven_id] = self
        self._lost = None
        self._publish_statuses()
        _LOGGER.info(
            "%s: OpenADR VTN listening on %s:%s%s (%d open events)",
            self._device,
            self._config.listen_host,
            self.bound_port,
            self._config.http_path_prefix,
            len(self._events),
        )

    async def receive(self) -> list[Reading]:
        """Return the next batch (reports, status changes; [] for a VEN poll); raise once closed."""
        return await self._batches.get(self._check_link)

    async def read(self) -> list[Reading]:
        """Return the latest reading of every point; bad "no report received yet" for the others."""
        self._check_link()
        self._publish_statuses()
        return self._latest.snapshot(self._specs, self._clock.now())

    async def write(
        self,
        point: PointId,
        value: float,
        *,
        correlation_id: str = "",
        hold_until: datetime | None = None,
    ) -> None:
        """Issue (or, for 0, cancel) the point's event and wait ``timeout_s`` for the VEN's answer."""
        spec = lookup_point(self._device, self._specs, point)
        signal = spec.config.signal
        if not spec.writable or signal is None:
            raise PointRejected(f"{point}: the point is not writable")
        payload = _signal_payload(point, signal, value)
        self._check_link()
        now = self._clock.now()
        if hold_until is not None and hold_until <= now:
            raise PointRejected(f"{point}: hold_until {hold_until.isoformat()} is not in the future")
        self._forget_old_events(now)
        open_event = self._open_event(point, now)
        if payload == 0.0:
            if open_event is None:
                return  # nothing to cancel: the VEN holds no event of this point
            cancelled = await self._cancel(open_event, reason="cancelled by a write of 0")
            await self._await_answer(cancelled, point)
            return
        if open_event is not None:
            await self._cancel(open_event, reason="superseded by a new dispatch")
        duration_s = (
            (hold_until - now).total_seconds() if hold_until is not None else self._config.default_duration_s
        )
        event = EventRecord(
            event_id=uuid.uuid4().hex,
            point=point,
            correlation_id=correlation_id,
            signal=signal,
            requested=value,
            payload=payload,
            dtstart=now,
            duration_s=duration_s,
            created_at=now,
        )
        try:
            await self._save(event)
        except DeviceUnavailable as err:
            raise RequestRejected(f"{point}: event not issued: {err}") from err
        self._events[event.event_id] = event
        self._distribute = True
        self._publish_statuses()
        answer = await self._await_answer(event, point)
        if answer is OptType.OPT_OUT:
            raise DeviceProtocolError(
                f"{self._device}: VEN {self._config.ven_id} opted out of event {event.event_id} "
                f"({signal.value} {value:g})"
            )

    async def read_back(self, point: PointId) -> float:
        """Return the value the VEN accepted (signal points) or the latest reported value."""
        spec = lookup_point(self._device, self._specs, point)
        if spec.config.signal is not None:
            return self._accepted_value(point)
        if spec.config.status is not None:
            return self._status_value(spec.config.status)
        reading = self._latest.get(point)
        if reading is None or reading.value is None:
            reason = reading.quality.reason if reading is not None else "no report received yet"
            raise DeviceProtocolError(f"{self._device}: read-back of {point}: {reason}")
        return reading.value

    async def close(self) -> None:
        """Stop listening and fail pending waits; safe to call at any time."""
        self._fail_waits("VTN closed")
        if _VEN_LOOKUP.get(self._config.ven_id) is self:
            del _VEN_LOOKUP[self._config.ven_id]
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._batches.clear()

    # ----------------------------------------------------------------------------------------------
    # Events

    def _forget_old_events(self, now: datetime) -> None:
        """Drop events that ended a day ago from memory (their rows stay), as a restart would."""
        horizon = now - timedelta(seconds=_KEEP_EVENTS_S)
        for event_id in [e.event_id for e in self._events.values() if e.end < horizon]:
            del self._events[event_id]

    def _open_event(self, point: PointId, now: datetime) -> EventRecord | None:
        """Return the point's newest event that is neither cancelled nor over, if any."""
        for event in reversed(self._events.values()):
            if event.point == point and event.status(now) in (EventStatus.FAR, EventStatus.ACTIVE):
                return event
        return None

    async def _cancel(self, event: EventRecord, *, reason: str) -> EventRecord:
        cancelled = replace(
            event,
            cancelled=True,
            modification_number=event.modification_number + 1,
        )
        self._events[event.event_id] = cancelled
        self._distribute = True
        _LOGGER.info("%s: event %s cancelled: %s", self._device, event.event_id, reason)
        try:
            await self._save(cancelled)
        except DeviceUnavailable as err:
            _LOGGER.warning("%s: cancellation of event %s not stored: %s", self._device, event.event_id, err)
        self._publish_statuses()
        return cancelled

    async def _await_answer(self, event: EventRecord, point: PointId) -> OptType:
        """Wait for the VEN's answer to the event's current version; cancel the event on silence."""
        timeout_s = self._config.timeout_s
        known = self._events.get(event.event_id, event)
        if known.modification_number == event.modification_number and known.answered:
            return known.opt  # the VEN answered while the event was being stored
        answer: asyncio.Future[OptType] = asyncio.get_running_loop().create_future()
        self._answers[event.event_id] = answer
        try:
            async with asyncio.timeout(timeout_s):
                return await answer
        except TimeoutError:
            pass
        finally:
            if self._answers.get(event.event_id) is answer:
                del self._answers[event.event_id]
        last_poll = (
            "it has not polled since the VTN started"
            if self._last_poll_s is None
            else f"its last poll was {asyncio.get_running_loop().time() - self._last_poll_s:.0f} s ago"
        )
        current = self._events.get(event.event_id, event)
        if not current.cancelled:
            await self._cancel(current, reason="no answer from the VEN")
            what = "the event was cancelled"
        else:
            what = "the cancellation may not have reached it"
        raise DeviceUnavailable(
            f"{self._device}: no opt-in or opt-out from VEN {self._config.ven_id} for event {event.event_id} "
            f"on {point} within {timeout_s:g} s ({last_poll}); {what}"
        )

    def _accepted_value(self, point: PointId) -> float:
        now = self._clock.now()
        event = self._open_event(point, now)
        if event is None:
            return 0.0
        if event.opt is OptType.OPT_IN and event.answered:
            return event.requested
        if event.opt is OptType.OPT_OUT and event.answered:
            return 0.0
        raise DeviceProtocolError(f"{self._device}: VEN has not answered event {event.event_id} yet")

    def _deliverable(self, event: EventRecord, now: datetime) -> bool:
        """Return True if the VEN should see the event: open, or cancelled and not yet acknowledged."""
        status = event.status(now)
        if status is EventStatus.CANCELLED:
            return not event.answered and now < event.end
        return status is not EventStatus.COMPLETED

    def _oadr_events(self, now: datetime) -> list[objects.Event]:
        events = [e for e in self._events.values() if self._deliverable(e, now)]
        return [self._oadr_event(e, now) for e in events]

    def _oadr_event(self, event: EventRecord, now: datetime) -> objects.Event:
        duration = timedelta(seconds=event.duration_s)
        if event.signal is OpenAdrSignal.LOAD_DISPATCH:
            signal_name, signal_type = "LOAD_DISPATCH", "delta"
        else:
            signal_name, signal_type = "SIMPLE", "level"
        signal = objects.EventSignal(
            intervals=[
                objects.Interval(dtstart=event.dtstart, duration=duration, signal_payload=event.payload)
            ],
            signal_name=signal_name,
            signal_type=signal_type,
            signal_id=f"{event.event_id}-0",
        )
        oadr_event = objects.Event(
            event_descriptor=objects.EventDescriptor(
                event_id=event.event_id,
                modification_number=event.modification_number,
                market_context=self._config.market_context,
                event_status=event.status(now).oadr,
                created_date_time=event.created_at,
            ),
            event_signals=[signal],
            targets=[{"ven_id": self._config.ven_id}],
            active_period=objects.ActivePeriod(dtstart=event.dtstart, duration=duration),
            response_required="always",
        )
        # objects.Event derives the status from the active period; a cancellation must say so itself.
        oadr_event.event_descriptor.event_status = event.status(now).oadr
        return oadr_event

    async def _save(self, event: EventRecord) -> None:
        try:
            await self._store.save_event(self._device, event)
        except ServiceError as err:
            raise DeviceUnavailable(f"cannot store event {event.event_id}: {err}") from err

    # ----------------------------------------------------------------------------------------------
    # openleadr handlers (called on the event loop by the VTN's HTTP handlers)

    def _make_server(self) -> OpenADRServer:
        config = self._config
        with warnings.catch_warnings():
            # openleadr stores itself under a str key of its aiohttp app (NotAppKeyWarning).
            warnings.simplefilter("ignore")
            server = OpenADRServer(
                vtn_id=config.vtn_id,
                http_host=config.listen_host,
                http_port=config.listen_port,
                http_path_prefix=config.http_path_prefix,
                requested_poll_freq=timedelta(seconds=config.poll_interval_s),
                ven_lookup=_lookup_ven,
                show_fingerprint=False,
            )
        server.add_handler("on_create_party_registration", self._on_create_party_registration)
        server.add_handler("on_cancel_party_registration", self._on_cancel_party_registration)
        server.add_handler("on_register_report", self._on_register_report)
        server.add_handler("on_update_report", self._on_update_report)
        server.add_handler("on_poll", self._on_poll)
        server.add_handler("on_request_event", self._on_request_event)
        server.add_handler("on_created_event", self._on_created_event)
        server.app.middlewares.append(self._dead_letter_middleware)
        return server

    def ven_lookup(self, ven_id: str) -> dict[str, Any] | None:
        """Return the registered VEN's record for openleadr, None (re-register) if it is not ours."""
        registration = self._registration
        if registration is None or ven_id != registration.ven_id:
            return None
        return {
            "ven_id": registration.ven_id,
            "ven_name": registration.ven_name,
            "fingerprint": None,
            "registration_id": registration.registration_id,
        }

    async def _on_create_party_registration(self, payload: Mapping[str, Any]) -> tuple[str, str] | bool:
        ven_name = payload.get("ven_name")
        if ven_name != self._config.ven_name:
            self._reject("EiRegisterParty", repr(dict(payload)).encode(), f"unknown venName {ven_name!r}")
            return False
        previous = self._registration
        registration = Registration(
            ven_id=self._config.ven_id,
            ven_name=self._config.ven_name,
            registration_id=uuid.uuid4().hex,
            registered_at=self._clock.now(),
            reports=previous.reports if previous is not None else {},
        )
        self._registration = registration
        await self._save_registration(registration)
        _LOGGER.info("%s: VEN %s registered as %s", self._device, ven_name, registration.ven_id)
        self._distribute = True  # a (re-)registered VEN gets the open events again
        return registration.ven_id, registration.registration_id

    async def _on_cancel_party_registration(self, payload: Mapping[str, Any]) -> None:
        if payload.get("ven_id") == self._config.ven_id and self._registration is not None:
            _LOGGER.info("%s: VEN %s cancelled its registration", self._device, self._config.ven_id)
            self._registration = None
            await self._save_registration(None)

    async def _save_registration(self, registration: Registration | None) -> None:
        try:
            await self._store.save_registration(self._device, registration)
        except ServiceError as err:
            _LOGGER.warning("%s: VEN registration not stored: %s", self._device, err)

    async def _on_register_report(self, report: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Request every offered data point a point of ours names, at the poll interval."""
        registration = self._registration
        requests: list[tuple[Any, ...]] = []
        sources = dict(registration.reports) if registration is not None else {}
        for description in report.get("report_descriptions") or []:
            r_id = description.get("r_id")
            resource_id = (description.get("report_data_source") or {}).get("resource_id")
            measurement = description.get("measurement") or {}
            names = {str(measurement.get(k) or "").lower() for k in ("name", "description")} - {""}
            spec = self._report_spec(resource_id, names)
            if spec is None or not isinstance(r_id, str):
                continue
            sources[r_id] = ReportSource(
                r_id=r_id,
                point=spec.point,
                resource_id=str(resource_id),
                measurement=str(measurement.get("name") or measurement.get("description") or ""),
                unit=measurement.get("unit"),
                scale=measurement.get("scale"),
            )
            rate = description.get("sampling_rate") or {}
            interval = timedelta(seconds=self._config.poll_interval_s)
            if isinstance(rate.get("min_period"), timedelta):
                interval = max(interval, rate["min_period"])
            if isinstance(rate.get("max_period"), timedelta) and rate["max_period"] > timedelta(0):
                interval = min(interval, rate["max_period"])
            requests.append((r_id, self._report_callback(r_id), interval))
        if registration is not None:
            self._registration = replace(registration, reports=sources)
            await self._save_registration(self._registration)
        return requests

    def _report_spec(self, resource_id: object, measurements: set[str]) -> OpenAdrPointSpec | None:
        for spec in self._specs.values():
            wanted = spec.config
            if wanted.resource_id is None or wanted.resource_id != resource_id:
                continue
            if wanted.measurement is None or wanted.measurement.lower() in measurements:
                return spec
        return None

    def _report_callback(self, r_id: str) -> Callable[[list[tuple[datetime, Any]]], Awaitable[None]]:
        async def values(items: list[tuple[datetime, Any]]) -> None:
            self._report_values(r_id, items)

        return values

    async def _on_update_report(self, report: Mapping[str, Any]) -> None:
        """Map reports whose request the VTN no longer knows (sent before a restart) by their rID."""
        for interval in report.get("intervals") or []:
            payload = interval.get("report_payload") or {}
            self._report_values(str(payload.get("r_id")), [(interval.get("dtstart"), payload.get("value"))])

    def _report_values(self, r_id: str, items: Sequence[tuple[Any, Any]]) -> None:
        self._vtn_heard()
        registration = self._registration
        source = registration.reports.get(r_id) if registration is not None else None
        spec = self._specs.get(source.point) if source is not None else None
        if source is None or spec is None:
            self._reject("EiReport", repr(list(items)).encode(), f"report value for unrequested rID {r_id!r}")
            return
        factor, unit_problem = _unit_factor(source.unit, source.scale, spec.unit)
        now = self._clock.now()
        batch: list[Reading] = []
        for ts, raw in items:
            stamp = ts if isinstance(ts, datetime) and ts.tzinfo is not None else now
            value: float | None = None
            quality = Quality.good()
            if unit_problem:
                quality = Quality.bad(unit_problem)
            elif isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
                quality = Quality.bad(f"VEN reported {raw!r} for rID {r_id}: not a finite number")
            else:
                value = float(raw) * factor * spec.scale + spec.offset
            reading = Reading(point=spec.point, ts=stamp, value=value, quality=quality)
            batch.append(reading)
            self._latest.keep(reading)
        self.stats.report_values += len(batch)
        self._batches.put(batch)

    async def _on_poll(self, ven_id: str) -> tuple[str, dict[str, Any]] | None:
        if ven_id != self._config.ven_id:
            return None
        self.stats.polls += 1
        self._vtn_heard()
        self._publish_statuses()
        self._batches.put([])  # a sign of life for the session
        now = self._clock.now()
        loop_now_s = asyncio.get_running_loop().time()
        unanswered = any(self._deliverable(e, now) and not e.answered for e in self._events.values())
        # Serve events when they changed, and again while the VEN owes an answer (a lost reply).
        resend = unanswered and loop_now_s - self._last_distribution_s >= 2 * self._config.poll_interval_s
        if not (self._distribute or resend):
            return None
        events = self._oadr_events(now)
        self._distribute = False
        self._last_distribution_s = loop_now_s
        if not events:
            return None
        self.stats.events_sent += len(events)
        return "oadrDistributeEvent", {"events": events}

    async def _on_request_event(self, ven_id: str) -> list[objects.Event] | None:
        if ven_id != self._config.ven_id:
            return None
        self._vtn_heard()
        return self._oadr_events(self._clock.now()) or None

    async def _on_created_event(self, ven_id: str, event_id: str, opt_type: str) -> None:
        """Record the VEN's answer to the current version of an event (openleadr omits the version)."""
        if ven_id != self._config.ven_id:
            return
        self._vtn_heard()
        event = self._events.get(event_id)
        try:
            opt = OptType(opt_type)
        except ValueError:
            opt = OptType.NONE
        if event is None or opt is OptType.NONE:
            what = "unknown event" if event is None else f"unknown optType {opt_type!r}"
            self._reject("EiEvent", f"{event_id}:{opt_type}".encode(), f"oadrCreatedEvent for {what}")
            return
        answered = replace(event, opt=opt, opt_modification_number=event.modification_number)
        self._events[event_id] = answered
        if opt is OptType.OPT_IN:
            self.stats.opt_ins += 1
        else:
            self.stats.opt_outs += 1
        try:
            await self._save(answered)
        except DeviceUnavailable as err:
            _LOGGER.warning("%s: answer to event %s not stored: %s", self._device, event_id, err)
        self._publish_statuses()
        waiter = self._answers.get(event_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(opt)

    @web.middleware
    async def _dead_letter_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Keep what the VTN refused (bad XML, schema violations) with the reason it gave."""
        body = await request.read()
        response = await handler(request)
        if response.status >= 400:
            text = response.text if isinstance(response, web.Response) and response.text else ""
            self._reject(request.path.rsplit("/", 1)[-1], body, f"HTTP {response.status}: {text[:500]}")
        return response

    # ----------------------------------------------------------------------------------------------
    # Internals

    def _vtn_heard(self) -> None:
        self._last_poll_s = asyncio.get_running_loop().time()

    def _status_value(self, which: OpenAdrStatus) -> float:
        now = self._clock.now()
        latest = max(self._events.values(), key=lambda e: e.created_at, default=None)
        if latest is None:
            return float(EventStatus.NONE) if which is OpenAdrStatus.EVENT else OptType.NONE.code
        if which is OpenAdrStatus.EVENT:
            return float(latest.status(now))
        return latest.opt.code

    def _publish_statuses(self) -> None:
        """Queue a reading for every status and signal point whose value changed since last published.

        A signal point reads as the value the VEN accepted (0 without an open event), so the
        dispatcher knows what to write back at ``hold_until``; it is not published while the VEN
        owes an answer.
        """
        now = self._clock.now()
        batch: list[Reading] = []
        for spec in self._specs.values():
            if spec.config.status is not None:
                value = self._status_value(spec.config.status)
            elif spec.config.signal is not None:
                try:
                    value = self._accepted_value(spec.point)
                except DeviceProtocolError:
                    continue
            else:
                continue
            if self._status_published.get(spec.point) == value:
                continue
            self._status_published[spec.point] = value
            reading = Reading(point=spec.point, ts=now, value=value)
            self._latest.set(reading)
            batch.append(reading)
        if batch:
            self._batches.put(batch)

    def _reject(self, service: str, payload: bytes, reason: str) -> None:
        self.stats.rejected += 1
        _LOGGER.debug("%s: rejected %s input: %s", self._device, service, reason)
        self._dead_letters.reject(origin=f"openadr:{self._device}:{service}", payload=payload, reason=reason)

    def _fail_waits(self, reason: str) -> None:
        self._lost = reason
        self._batches.wake()
        error = DeviceUnavailable(f"{self._device}: {reason}")
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(error)
        self._answers.clear()

    def _check_link(self) -> None:
        if self._lost is not None:
            raise DeviceUnavailable(f"{self._device}: {self._lost}")


_VEN_LOOKUP: dict[str, OpenAdrDriver] = {}
"""The running drivers by venID: openleadr keeps its VEN lookup on a class shared by every VTN."""


def _lookup_ven(ven_id: str) -> dict[str, Any] | None:
    driver = _VEN_LOOKUP.get(ven_id)
    return driver.ven_lookup(ven_id) if driver is not None else None


def _signal_payload(point: PointId, signal: OpenAdrSignal, value: float) -> float:
    """Return the event payload for a written value; :class:`PointRejected` for an impossible one.

    >>> _signal_payload(PointId("e.shed_kw"), OpenAdrSignal.LOAD_DISPATCH, 120.0)
    -120.0
    >>> _signal_payload(PointId("e.level"), OpenAdrSignal.SIMPLE, 2.0)
    2.0
    """
    if not math.isfinite(value):
        raise PointRejected(f"{point}: {value} is not a number that can be sent")
    if signal is OpenAdrSignal.LOAD_DISPATCH:
        if value < 0:
            raise PointRejected(f"{point}: a load shed request cannot be negative ({value:g} kW)")
        return -value if value else 0.0
    if value not in (0.0, 1.0, 2.0, 3.0):
        raise PointRejected(f"{point}: a SIMPLE signal level is 0, 1, 2 or 3, not {value:g}")
    return value


def _unit_factor(unit: str | None, scale: str | None, point_unit: str) -> tuple[float, str]:
    """Return (factor, "") converting a reported value to the point's unit, or (1, why not).

    >>> _unit_factor("W", "k", "kW")
    (1.0, '')
    >>> _unit_factor("W", "none", "kW")
    (0.001, '')
    >>> _unit_factor("Wh", "k", "kW")[1]
    'VEN reports in kWh, which cannot be converted to kW'
    """
    prefix = _SI_PREFIX.get(scale or "none")
    if prefix is None:
        return 1.0, f"VEN reports with an unknown SI scale {scale!r}"
    if unit is None or unit.lower() == point_unit.lower():
        return prefix, ""
    factor = _UNIT_FACTORS.get((unit.lower(), point_unit.lower()))
    if factor is None:
        shown = unit if (scale or "none") == "none" else f"{scale}{unit}"
        return 1.0, f"VEN reports in {shown}, which cannot be converted to {point_unit}"
    return prefix * factor, ""
