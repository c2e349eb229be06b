"""The cockpit's data layer: one task per credential keeps a snapshot of the plant from the server.

Panel sends every websocket frame of every session through one thread, so a session must never wait
on the network. The data layer therefore runs on its own event loop in one background thread per
Panel process (:class:`DataHub`). For each credential in use (a kiosk token, an operator's login)
it runs one :class:`DataLayer` task that

- polls the REST API every ``refresh_s`` (site tree, devices, points, emissions, forecasts, quotas,
  alarms, today's energy) and
- follows the websocket (``/api/v1/ws``): live readings of the points on screen, alarm transitions
  (which trigger an immediate alarm refresh) and command results (which re-read the dispatches).

Each change publishes a new immutable :class:`Snapshot` by reference assignment; Panel sessions
read ``layer.snapshot`` in their periodic callbacks and never block. Operator actions and history
queries run on the hub's loop and hand back ``concurrent.futures.Future`` objects that sessions poll:
acknowledge and shelve an alarm, approve and reject a dispatch, send a manual command.

Layers are keyed by credential because the server scopes every answer to the caller's tenant and
grants: two big screens with the same kiosk token share one layer, an operator gets their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp

from cockpit.client import ApiError
from scada.model import UTC
from scada.runtime import Backoff

__all__ = [
    "AlarmView",
    "ApiError",
    "CommandOutcome",
    "DataHub",
    "DataLayer",
    "Device",
    "DispatchView",
    "Emissions",
    "Forecast",
    "Node",
    "PointInfo",
    "QuotaView",
    "Sample",
    "Snapshot",
    "dispatch_order",
    "feeder_points",
    "node_power_kw",
    "point_label",
    "screen_points",
    "storage_status",
    "top_emitters",
]

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

REFRESH_S = 10.0
"""How often the REST resources are polled (the websocket carries what changes faster)."""
REQUEST_TIMEOUT_S = 10.0
IDLE_GRACE_S = 30.0
"""How long a layer nobody uses keeps running (a page reload finds it warm)."""
PAGE_LIMIT = 1000
ALARM_REFRESH_DEBOUNCE_S = 0.2
DISPATCH_REFRESH_DEBOUNCE_S = 0.5
"""A command result arrives just before the dispatcher records it: wait a little, then re-read."""
RECENT_DISPATCHES = 30
"""Decided or finished dispatches kept on screen besides every one awaiting approval."""
MAX_WAITING_DISPATCHES = 200
DECISION_TIMEOUT_S = 60.0
"""An approval waits for the send, its retries and the read-back (three tries of 10 s by default)."""
COMMAND_WAIT_S = 15.0
"""How long the server waits for a gateway's verified outcome of a manual command."""
MAX_WANTED_POINTS = 5000
"""Points a layer follows at most (the server allows 10,000 per connection)."""

METER_KINDS = frozenset({"power_meter"})


# --------------------------------------------------------------------------------------------------
# The snapshot model (immutable: sessions in other threads read it without locks)


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    """A hierarchy node: group, park, enterprise or workshop."""

    id: str
    name: str
    level: str
    parent: str | None
    children: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """A device with its availability (``online``, ``stale``, ``offline``, ``unknown``)."""

    id: str
    name: str
    node: str
    kind: str
    availability: str
    availability_reason: str
    points: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PointInfo:
    """A point's configuration as the API shows it."""

    id: str
    device: str
    key: str
    name: str
    kind: str
    unit: str
    carrier: str
    writable: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """The newest reading of a point; ``value`` is None only when the quality is bad."""

    ts: datetime
    value: float | None
    quality: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Emissions:
    """tCO2e by scope."""

    scope1_t: float
    scope2_t: float
    total_t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Forecast:
    """A node's month-end forecast: month to date, expected total and its interval (tCO2e)."""

    node: str
    actual_t: float
    forecast_t: float
    low_t: float
    high_t: float
    method: str
    computed_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchCut:
    """The month's measured effect of all dispatches (``GET /api/v1/verification/monthly``)."""

    co2e_avoided_t: float
    co2e_uncertainty_t: float
    measured: int
    """Dispatches measured so far this month (the unmeasurable ones are not in the sum)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaView:
    """A node's quota for a month and, once forecast, where it stands (percentages of the quota)."""

    node: str
    month: str
    quota_t: float
    actual_t: float | None
    forecast_t: float | None
    forecast_low_t: float | None
    forecast_high_t: float | None
    actual_pct: float | None
    forecast_pct: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AlarmView:
    """An alarm not in normal state (priority 1 critical … 4 low)."""

    alarm: str
    state: str
    since: datetime
    priority: int
    console: str
    node: str
    device: str | None
    point: str | None
    message: str
    value: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchView:
    """A dispatch of the controller as the API shows it (``GET /api/v1/dispatches``)."""

    id: int
    created_at: datetime
    node: str
    point: str
    value: float
    reason: str
    rule_id: str
    stage: int
    mode: str
    state: str
    """``awaiting_approval``, ``approved``, ``rejected``, ``sending``, ``verified``, ``failed``, …"""
    hold_until: datetime | None
    result: Mapping[str, Any] | None
    """The gateway's outcome (``status``, ``readback``, ``reason``, ``attempts``…) once sent."""
    decided_by: str | None
    decision_comment: str
    expected_kw: float | None
    """The reduction the rule expects (planning figure, not a measurement)."""
    co2e_avoided_t: float | None = None
    """The measured effect (``co2e_avoided_kg``), once the verification service has measured it."""

    @property
    def waiting(self) -> bool:
        """Return True while an operator must approve or reject it."""
        return self.state == "awaiting_approval"


def dispatch_order(dispatches: Iterable[DispatchView]) -> list[DispatchView]:
    """Return the queue as an operator reads it: waiting ones first (oldest first), then newest first."""
    items = list(dispatches)
    waiting = sorted((d for d in items if d.waiting), key=lambda d: d.id)
    others = sorted((d for d in items if not d.waiting), key=lambda d: d.id, reverse=True)
    return waiting + others


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandOutcome:
    """The server's answer to a manual command: the gateway's outcome after write and read-back."""

    correlation_id: str
    point: str
    requested: float
    status: str
    """``verified``, ``mismatch``, ``rejected``, ``timeout`` or ``failed``."""
    readback: float | None
    reason: str
    elapsed_ms: float | None

    @property
    def verified(self) -> bool:
        """Return True when the device holds the value (read back)."""
        return self.status == "verified"


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Everything the cockpits show, as of the last REST refresh and websocket frame."""

    version: int = 0
    ready: bool = False
    """True once the site tree, devices and points have been read."""
    site_name: str = ""
    timezone: str = "Asia/Shanghai"
    subject: str = ""
    """Who the credential belongs to (``/api/v1/auth/me``): the ``by`` of operator actions."""
    roots: tuple[str, ...] = ()
    nodes: Mapping[str, Node] = field(default_factory=_empty)
    devices: Mapping[str, Device] = field(default_factory=_empty)
    points: Mapping[str, PointInfo] = field(default_factory=_empty)
    latest: Mapping[str, Sample] = field(default_factory=_empty)
    month: Emissions | None = None
    today: Emissions | None = None
    daily_t: tuple[tuple[datetime, float], ...] = ()
    """This month's tCO2e per local day (start of the day, total), oldest first."""
    energy_today_kwh: float | None = None
    forecasts: Mapping[str, Forecast] = field(default_factory=_empty)
    quotas: tuple[QuotaView, ...] = ()
    alarms: tuple[AlarmView, ...] = ()
    dispatches: tuple[DispatchView, ...] = ()
    """Every dispatch awaiting approval and the newest others, in :func:`dispatch_order`."""
    dispatch_cut: DispatchCut | None = None
    """What this month's dispatches measurably cut, once any was measured."""
    live: bool = False
    """Whether the websocket is connected."""
    errors: Mapping[str, str] = field(default_factory=_empty)
    """The last error of each resource that failed (resource name -> detail)."""
    refreshed_at: datetime | None = None

    @property
    def zone(self) -> ZoneInfo:
        """Return the site's time zone (Asia/Shanghai if the server named an unknown one)."""
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            return ZoneInfo("Asia/Shanghai")

    def descendants(self, node_id: str) -> list[str]:
        """Return ``node_id`` and every node below it."""
        out, stack = [], [node_id]
        while stack:
            current = stack.pop()
            if current in self.nodes:
                out.append(current)
                stack.extend(self.nodes[current].children)
        return out

    def nodes_at(self, level: str) -> list[Node]:
        """Return the nodes of one level, in tree order."""
        ordered: list[Node] = []
        stack = list(reversed(self.roots))
        while stack:
            node = self.nodes.get(stack.pop())
            if node is None:
                continue
            if node.level == level:
                ordered.append(node)
            stack.extend(reversed(node.children))
        return ordered

    def month_quota(self) -> QuotaView | None:
        """Return this month's quota of the top visible node (the first root), if one is set."""
        for quota in self.quotas:
            if self.roots and quota.node == self.roots[0]:
                return quota
        return self.quotas[0] if len(self.quotas) == 1 else None


# --------------------------------------------------------------------------------------------------
# Derived figures (pure functions of a snapshot)


def _power_point(snap: Snapshot, point_id: str) -> bool:
    p = snap.points.get(point_id)
    return p is not None and p.kind == "power" and p.unit == "kW" and p.carrier == "electricity"


def feeder_points(snap: Snapshot, node_id: str) -> list[str]:
    """Return the electricity power points that measure what ``node_id`` draws, without double counting.

    The incoming feeders of a node are its own power meters (devices of kind ``power_meter`` attached
    to the node itself). Without one, the node draws what its children draw; a workshop without a
    meter draws the sum of its devices' electricity power.
    """
    node = snap.nodes.get(node_id)
    if node is None:
        return []
    own = [d for d in snap.devices.values() if d.node == node_id]
    meters = [p for d in own if d.kind in METER_KINDS for p in d.points if _power_point(snap, p)]
    if meters:
        return meters
    below = [p for child in node.children for p in feeder_points(snap, child)]
    loads = [p for d in own for p in d.points if _power_point(snap, p)]
    return below + loads


def node_power_kw(snap: Snapshot, node_id: str) -> float | None:
    """Return the live power a node draws (kW), None when none of its feeders has a value."""
    values = [
        s.value
        for p in feeder_points(snap, node_id)
        if (s := snap.latest.get(p)) is not None and s.value is not None
    ]
    return sum(values) if values else None


def _points_of_carrier(snap: Snapshot, carrier: str) -> list[PointInfo]:
    return [p for p in snap.points.values() if p.carrier == carrier and p.kind == "power" and p.unit == "kW"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageStatus:
    """PV output and battery state, summed over the visible devices."""

    pv_kw: float | None
    pv_devices: int
    battery_kw: float | None
    """Positive: discharging into the site; negative: charging."""
    soc_pct: float | None
    """Mean state of charge of the batteries that report one."""
    batteries: int


def storage_status(snap: Snapshot) -> StorageStatus:
    """Return PV output (points of carrier ``pv``) and battery power and charge (carrier ``storage``)."""

    def total(points: list[PointInfo]) -> float | None:
        values = [s.value for p in points if (s := snap.latest.get(p.id)) is not None and s.value is not None]
        return sum(values) if values else None

    pv = _points_of_carrier(snap, "pv")
    storage = _points_of_carrier(snap, "storage")
    battery_devices = {p.device for p in storage}
    socs = [
        s.value
        for p in snap.points.values()
        if p.device in battery_devices and p.kind == "state_of_charge"
        if (s := snap.latest.get(p.id)) is not None and s.value is not None
    ]
    return StorageStatus(
        pv_kw=total(pv),
        pv_devices=len({p.device for p in pv}),
        battery_kw=total(storage),
        soc_pct=sum(socs) / len(socs) if socs else None,
        batteries=len(battery_devices),
    )


def screen_points(snap: Snapshot) -> set[str]:
    """Return the points the big screen shows live: feeders of every node, PV, battery power and charge."""
    wanted: set[str] = set()
    for node_id in snap.nodes:
        wanted.update(feeder_points(snap, node_id))
    storage_devices = set()
    for p in snap.points.values():
        if p.carrier in ("pv", "storage") and p.kind == "power" and p.unit == "kW":
            wanted.add(p.id)
            if p.carrier == "storage":
                storage_devices.add(p.device)
    wanted.update(
        p.id for p in snap.points.values() if p.device in storage_devices and p.kind == "state_of_charge"
    )
    return wanted


def point_label(snap: Snapshot, point_id: str) -> str:
    """Return the "device · point" names of a point (its id if the snapshot does not know it)."""
    info = snap.points.get(point_id)
    if info is None:
        return point_id
    device = snap.devices.get(info.device)
    return f"{device.name if device else info.device} · {info.name}"


def top_emitters(snap: Snapshot, *, count: int = 5) -> list[tuple[Node, float]]:
    """Return the nodes that emitted most this month (month-to-date tCO2e of their forecasts).

    Workshops are compared when there are any, else enterprises: the finest level the ledger books.
    """
    for level in ("workshop", "enterprise", "park", "group"):
        ranked = [
            (n, f.actual_t) for n in snap.nodes_at(level) if (f := snap.forecasts.get(n.id)) is not None
        ]
        if ranked:
            ranked.sort(key=lambda item: item[1], reverse=True)
            return ranked[:count]
    return []


# --------------------------------------------------------------------------------------------------
# Parsing the API's JSON (field names as in scada/api/*.py)


def _time(raw: str) -> datetime:
    return datetime.fromisoformat(raw).astimezone(UTC)


def _float(raw: Any) -> float | None:
    return float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None


def _nodes(trees: list[Mapping[str, Any]]) -> tuple[tuple[str, ...], dict[str, Node]]:
    nodes: dict[str, Node] = {}

    def walk(tree: Mapping[str, Any], parent: str | None) -> None:
        children = tree.get("children", [])
        nodes[tree["id"]] = Node(
            id=tree["id"],
            name=tree.get("name") or tree["id"],
            level=tree.get("level", ""),
            parent=parent,
            children=tuple(c["id"] for c in children),
        )
        for child in children:
            walk(child, tree["id"])

    for tree in trees:
        walk(tree, None)
    return tuple(t["id"] for t in trees), nodes


def _sample(raw: Mapping[str, Any]) -> Sample:
    return Sample(
        ts=_time(raw["ts"]),
        value=_float(raw.get("value")),
        quality=str(raw.get("quality", "")),
        reason=str(raw.get("reason", "")),
    )


def _alarm(raw: Mapping[str, Any]) -> AlarmView:
    return AlarmView(
        alarm=raw["alarm"],
        state=raw["state"],
        since=_time(raw["since"]),
        priority=int(raw.get("priority") or 4),
        console=raw.get("console") or "",
        node=raw.get("node") or "",
        device=raw.get("device"),
        point=raw.get("point"),
        message=raw.get("message") or raw["alarm"],
        value=_float(raw.get("value")),
    )


def _dispatch(raw: Mapping[str, Any]) -> DispatchView:
    result = raw.get("result")
    hold = raw.get("hold_until")
    return DispatchView(
        id=int(raw["id"]),
        created_at=_time(raw["created_at"]),
        node=str(raw["node"]),
        point=str(raw["point"]),
        value=float(raw["value"]),
        reason=str(raw.get("reason") or ""),
        rule_id=str(raw.get("rule_id") or ""),
        stage=int(raw.get("stage") or 0),
        mode=str(raw.get("mode") or ""),
        state=str(raw["state"]),
        hold_until=_time(hold) if isinstance(hold, str) else None,
        result=MappingProxyType(dict(result)) if isinstance(result, dict) else None,
        decided_by=raw.get("decided_by"),
        decision_comment=str(raw.get("decision_comment") or ""),
        expected_kw=_float(raw.get("expected_kw")),
        co2e_avoided_t=avoided / 1000.0
        if (avoided := _float(raw.get("co2e_avoided_kg"))) is not None
        else None,
    )


def _outcome(raw: Mapping[str, Any]) -> CommandOutcome:
    return CommandOutcome(
        correlation_id=str(raw.get("correlation_id", "")),
        point=str(raw["point"]),
        requested=float(raw["requested"]),
        status=str(raw["status"]),
        readback=_float(raw.get("readback")),
        reason=str(raw.get("reason") or ""),
        elapsed_ms=_float(raw.get("elapsed_ms")),
    )


def _quota(raw: Mapping[str, Any]) -> QuotaView:
    status = raw.get("status") or {}
    return QuotaView(
        node=raw["node"],
        month=raw["month"],
        quota_t=float(raw["quota_t"]),
        actual_t=_float(status.get("actual_t")),
        forecast_t=_float(status.get("forecast_t")),
        forecast_low_t=_float(status.get("forecast_low_t")),
        forecast_high_t=_float(status.get("forecast_high_t")),
        actual_pct=_float(status.get("actual_pct")),
        forecast_pct=_float(status.get("forecast_pct")),
    )


def _forecast(raw: Mapping[str, Any]) -> Forecast:
    return Forecast(
        node=raw["node"],
        actual_t=float(raw["actual_t"]),
        forecast_t=float(raw["forecast_t"]),
        low_t=float(raw["low_t"]),
        high_t=float(raw["high_t"]),
        method=str(raw.get("method", "")),
        computed_at=_time(raw["computed_at"]),
    )


def _emissions(raw: Mapping[str, Any]) -> Emissions:
    return Emissions(
        scope1_t=float(raw["scope1_t"]), scope2_t=float(raw["scope2_t"]), total_t=float(raw["total_t"])
    )


def _local_midnight(now: datetime, zone: ZoneInfo) -> datetime:
    local = now.astimezone(zone)
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


# --------------------------------------------------------------------------------------------------
# One credential's layer


@dataclass(slots=True)
class Credentials:
    """An access (or kiosk) token and, after a login, the refresh token that renews it."""

    access_token: str
    refresh_token: str | None = None


@dataclass(slots=True)
class _Wants:
    """Points the sessions of a layer follow, by session (read and written under the hub's lock)."""

    by_owner: dict[int, frozenset[str]] = field(default_factory=dict)

    def union(self) -> set[str]:
        return {p for points in self.by_owner.values() for p in points}


class DataLayer:
    """Keep one credential's :class:`Snapshot` current from REST polls and the websocket."""

    def __init__(
        self,
        api_url: str,
        credentials: Credentials,
        *,
        loop: asyncio.AbstractEventLoop,
        lock: threading.Lock,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.snapshot = Snapshot()
        self._credentials = credentials
        self._loop = loop
        self._lock = lock
        self._refresh_s = refresh_s
        self._wants = _Wants()
        self._latest: dict[str, Sample] = {}
        self._errors: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None
        self._wanted_changed = asyncio.Event()
        self._alarms_dirty = asyncio.Event()
        self._dispatches_dirty = asyncio.Event()
        self._refresh_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.users = 0
        self.frames_received = 0

    # ---- used from Panel threads -----------------------------------------------------------------

    def want(self, owner: object, points: Iterable[str]) -> None:
        """Follow ``points`` live for ``owner`` (a session), replacing what it followed before."""
        with self._lock:
            self._wants.by_owner[id(owner)] = frozenset(points)
        self._loop.call_soon_threadsafe(self._wanted_changed.set)

    def forget(self, owner: object) -> None:
        """Stop following the points of ``owner``."""
        with self._lock:
            self._wants.by_owner.pop(id(owner), None)
        self._loop.call_soon_threadsafe(self._wanted_changed.set)

    def history(
        self, point_id: str, *, span: timedelta = timedelta(hours=24), points: int = 500
    ) -> concurrent.futures.Future[list[tuple[datetime, float | None]]]:
        """Return a future of a point's history, reduced on the server (LTTB) to about ``points``."""
        return asyncio.run_coroutine_threadsafe(self._history(point_id, span, points), self._loop)

    def acknowledge(self, alarm_id: str, *, by: str, comment: str) -> concurrent.futures.Future[Any]:
        """Acknowledge an alarm; the future raises :class:`ApiError` with the server's detail."""
        body = {"by": by, "comment": comment}
        return asyncio.run_coroutine_threadsafe(self._alarm_action(alarm_id, "acknowledge", body), self._loop)

    def shelve(
        self, alarm_id: str, *, by: str, reason: str, duration_s: float
    ) -> concurrent.futures.Future[Any]:
        """Shelve an alarm for ``duration_s``; the future raises :class:`ApiError` on refusal."""
        body = {"by": by, "reason": reason, "duration_s": duration_s}
        return asyncio.run_coroutine_threadsafe(self._alarm_action(alarm_id, "shelve", body), self._loop)

    def approve(self, dispatch_id: int, *, comment: str = "") -> concurrent.futures.Future[DispatchView]:
        """Approve a waiting dispatch; the future holds it as sent and verified (or failed).

        The future raises :class:`ApiError` with the server's detail when refused (409: not waiting
        any more; 403: not an operator of its node; 503: no dispatcher in that server process).
        """
        return asyncio.run_coroutine_threadsafe(self._decide(dispatch_id, "approve", comment), self._loop)

    def reject(self, dispatch_id: int, *, comment: str = "") -> concurrent.futures.Future[DispatchView]:
        """Reject a waiting dispatch; the future raises :class:`ApiError` when refused."""
        return asyncio.run_coroutine_threadsafe(self._decide(dispatch_id, "reject", comment), self._loop)

    def command(
        self, point_id: str, value: float, *, reason: str = "", wait_s: float = COMMAND_WAIT_S
    ) -> concurrent.futures.Future[CommandOutcome]:
        """Write ``value`` to a point through its gateway; the future holds the verified outcome.

        The future raises :class:`ApiError` when the server refuses (409 not writable, 403 not an
        engineer, 400 bad value) or no gateway answered within ``wait_s`` (504).
        """
        if not math.isfinite(value):
            raise ValueError(f"value: a finite number, not {value!r}")
        if not 0.5 <= wait_s <= 30.0:
            raise ValueError(f"wait_s: 0.5 to 30 s, not {wait_s!r}")
        body: dict[str, Any] = {"value": value, "wait_s": wait_s}
        if reason.strip():
            body["reason"] = reason.strip()
        return asyncio.run_coroutine_threadsafe(self._command(point_id, body, wait_s), self._loop)

    # ---- the task ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the layer's task on the hub loop (call on the hub loop)."""
        self._task = asyncio.create_task(self._run(), name=f"cockpit-data:{self.api_url}")

    async def stop(self) -> None:
        """Cancel the layer's task and close its HTTP session (call on the hub loop)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
            self._session = session
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._poll_loop(), name="cockpit-rest")
                    group.create_task(self._ws_loop(), name="cockpit-ws")
                    # Alarm transitions re-read the alarm list, command results the dispatches.
                    group.create_task(
                        self._refresh_when_dirty(
                            self._alarms_dirty, ALARM_REFRESH_DEBOUNCE_S, self._refresh_alarms
                        ),
                        name="cockpit-alarms",
                    )
                    group.create_task(
                        self._refresh_when_dirty(
                            self._dispatches_dirty, DISPATCH_REFRESH_DEBOUNCE_S, self._refresh_dispatches
                        ),
                        name="cockpit-dispatches",
                    )
            finally:
                self._session = None

    def _publish(self, **changes: Any) -> None:
        self.snapshot = replace(
            self.snapshot,
            version=self.snapshot.version + 1,
            errors=MappingProxyType(dict(self._errors)),
            **changes,
        )

    # ---- REST -------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._credentials.access_token}"}

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> Any:
        """Send one request; on 401 renew the access token once (after a login) and retry."""
        for attempt in range(2):
            status, payload = await self._send(method, path, params=params, body=body, timeout_s=timeout_s)
            if status == 401 and attempt == 0 and self._credentials.refresh_token:
                await self._renew()
                continue
            if status >= 400:
                detail = payload.get("detail", "") if isinstance(payload, dict) else str(payload)
                title = payload.get("title", "") if isinstance(payload, dict) else ""
                raise ApiError(status, title, detail or f"HTTP {status}")
            return payload
        raise AssertionError("unreachable: the loop returns or raises")

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        body: Any,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> tuple[int, Any]:
        session = self._session
        if session is None:
            raise ApiError(0, "", "the data layer is not running")
        try:
            async with session.request(
                method,
                self.api_url + path,
                params=params,
                json=body,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                if response.status == 204:
                    return 204, None
                if response.content_type in ("application/json", "application/problem+json"):
                    return response.status, await response.json(content_type=None)
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as err:
            raise ApiError(0, "", f"{self.api_url}: {err or type(err).__name__}") from err

    async def _renew(self) -> None:
        refresh = self._credentials.refresh_token
        status, payload = await self._send(
            "POST", "/api/v1/auth/refresh", params=None, body={"refresh_token": refresh}
        )
        if status != 200 or not isinstance(payload, dict):
            self._credentials.refresh_token = None
            raise ApiError(status, "Unauthorized", "the session expired: sign in again")
        self._credentials.access_token = payload["access_token"]
        self._credentials.refresh_token = payload["refresh_token"]

    async def get(self, path: str, **params: str) -> Any:
        """GET ``path`` on the API and return its JSON (raises :class:`ApiError`)."""
        return await self._request("GET", path, params=params or None)

    async def _paged(self, path: str) -> list[Any]:
        items: list[Any] = []
        cursor: str | None = "0"
        while cursor is not None:
            page = await self.get(path, limit=str(PAGE_LIMIT), cursor=cursor)
            items.extend(page["items"])
            cursor = page.get("next_cursor")
        return items

    async def _poll_loop(self) -> None:
        while True:
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._refresh_s):
                    await self._refresh_now.wait()
            self._refresh_now.clear()

    async def _guard(self, name: str, coro: Coroutine[Any, Any, T]) -> T | None:
        """Run one resource's read; record its error (and keep the previous value) if it fails."""
        try:
            result = await coro
        except ApiError as err:
            if self._errors.get(name) != err.detail:
                _LOGGER.warning("cockpit: %s unavailable: %s", name, err)
            self._errors[name] = err.detail
            return None
        except (KeyError, TypeError, ValueError) as err:
            _LOGGER.warning("cockpit: unexpected %s answer: %r", name, err)
            self._errors[name] = f"unexpected answer: {err!r}"
            return None
        if self._errors.pop(name, None) is not None:
            _LOGGER.info("cockpit: %s available again", name)
        return result

    async def refresh(self) -> None:
        """Read every REST resource once and publish the result."""
        site, devices, points, me = await asyncio.gather(
            self._guard("site", self.get("/api/v1/site")),
            self._guard("devices", self._paged("/api/v1/devices")),
            self._guard("points", self._paged("/api/v1/points")),
            self._guard("me", self.get("/api/v1/auth/me")) if not self.snapshot.subject else _none(),
        )
        changes: dict[str, Any] = {}
        if site is not None:
            roots, nodes = _nodes(site["hierarchy"])
            changes.update(
                site_name=site["name"], timezone=site["timezone"], roots=roots, nodes=MappingProxyType(nodes)
            )
        if devices is not None:
            changes["devices"] = MappingProxyType(
                {
                    d["id"]: Device(
                        id=d["id"],
                        name=d.get("name") or d["id"],
                        node=d["node"],
                        kind=d["kind"],
                        availability=d.get("availability", "unknown"),
                        availability_reason=d.get("availability_reason") or "",
                        points=tuple(d.get("points", [])),
                    )
                    for d in devices
                }
            )
        if points is not None:
            changes["points"] = MappingProxyType(
                {
                    p["id"]: PointInfo(
                        id=p["id"],
                        device=p["device"],
                        key=p["key"],
                        name=p.get("name") or p["key"],
                        kind=p["kind"],
                        unit=p["unit"],
                        carrier=p["carrier"],
                        writable=bool(p["writable"]),
                    )
                    for p in points
                }
            )
        if me is not None:
            changes["subject"] = str(me.get("subject", ""))
        ready = self.snapshot.ready or (site is not None and devices is not None and points is not None)
        self._publish(ready=ready, **changes)
        if ready:
            self._wanted_changed.set()  # the screen points depend on the tree
        await self._refresh_carbon()
        await self._refresh_alarms()
        await self._refresh_dispatches()

    async def _refresh_carbon(self) -> None:
        snap = self.snapshot
        zone = snap.zone
        now = datetime.now(UTC)
        midnight = _local_midnight(now, zone)
        month = f"{midnight.year:04d}-{midnight.month:02d}"
        emissions, forecasts, quotas, energy, cut = await asyncio.gather(
            self._guard("emissions", self.get("/api/v1/emissions", period="day")),
            self._guard("forecasts", self.get("/api/v1/forecasts", month=month)),
            self._guard("quotas", self.get("/api/v1/quotas", month=month)),
            self._guard("energy", self._energy_today(snap, midnight)),
            self._guard("verification", self.get("/api/v1/verification/monthly", month=month)),
        )
        changes: dict[str, Any] = {"refreshed_at": now}
        if emissions is not None:
            daily = tuple((_time(i["start"]), float(i["total_t"])) for i in emissions["intervals"])
            today = next(
                (_emissions(i) for i in emissions["intervals"] if _time(i["start"]) == midnight), None
            )
            changes.update(
                month=_emissions(emissions["total"]),
                daily_t=daily,
                today=today or Emissions(scope1_t=0.0, scope2_t=0.0, total_t=0.0),
            )
        if forecasts is not None:
            changes["forecasts"] = MappingProxyType({f["node"]: _forecast(f) for f in forecasts["forecasts"]})
        if quotas is not None:
            changes["quotas"] = tuple(_quota(q) for q in quotas["quotas"])
        if energy is not None:
            changes["energy_today_kwh"] = energy
        if cut is not None and cut.get("measured"):
            changes["dispatch_cut"] = DispatchCut(
                co2e_avoided_t=float(cut["co2e_avoided_t"]),
                co2e_uncertainty_t=float(cut["co2e_uncertainty_t"]),
                measured=int(cut["measured"]),
            )
        self._publish(**changes)

    async def _energy_today(self, snap: Snapshot, midnight: datetime) -> float | None:
        """Return today's grid import (kWh): the import counters of the top nodes' feeders."""
        feeder_devices = {
            snap.points[p].device
            for root in snap.roots
            for p in feeder_points(snap, root)
            if p in snap.points
        }
        counters = [
            p
            for p in snap.points.values()
            if p.device in feeder_devices
            and p.kind == "energy_counter"
            and p.unit == "kWh"
            and p.carrier == "electricity"
            and "export" not in p.key
        ]
        if not counters:
            return None
        answers = await asyncio.gather(
            *(
                self.get(
                    f"/api/v1/points/{quote(p.id, safe='')}/energy", interval="1d", start=midnight.isoformat()
                )
                for p in counters
            )
        )
        return float(sum(a["total"] for a in answers))

    async def _refresh_alarms(self) -> None:
        alarms = await self._guard("alarms", self.get("/api/v1/alarms"))
        if alarms is not None:
            self._publish(alarms=tuple(_alarm(a) for a in alarms["alarms"]))

    @staticmethod
    async def _refresh_when_dirty(
        dirty: asyncio.Event, debounce_s: float, refresh: Callable[[], Awaitable[None]]
    ) -> None:
        """Call ``refresh`` soon after ``dirty`` is set, once for a burst of settings (debounced)."""
        while True:
            await dirty.wait()
            await asyncio.sleep(debounce_s)
            dirty.clear()
            await refresh()

    async def _refresh_dispatches(self) -> None:
        waiting, recent = await asyncio.gather(
            self._guard(
                "dispatches",
                self.get("/api/v1/dispatches", state="awaiting_approval", limit=str(MAX_WAITING_DISPATCHES)),
            ),
            self._guard("dispatches", self.get("/api/v1/dispatches", limit=str(RECENT_DISPATCHES))),
        )
        if waiting is None or recent is None:
            return
        by_id = {d.id: d for d in map(_dispatch, [*waiting["dispatches"], *recent["dispatches"]])}
        self._publish(dispatches=tuple(dispatch_order(by_id.values())))

    def _merge_dispatch(self, dispatch: DispatchView) -> None:
        """Show an action's answer at once (the next list read confirms it)."""
        others = [d for d in self.snapshot.dispatches if d.id != dispatch.id]
        self._publish(dispatches=tuple(dispatch_order([*others, dispatch])))

    async def _decide(self, dispatch_id: int, action: str, comment: str) -> DispatchView:
        try:
            body = await self._request(
                "POST",
                f"/api/v1/dispatches/{int(dispatch_id)}/{action}",
                body={"comment": comment},
                timeout_s=DECISION_TIMEOUT_S,
            )
            try:
                dispatch = _dispatch(body)
            except (KeyError, TypeError, ValueError) as err:
                raise ApiError(0, "", f"unexpected answer to {action}: {err!r}") from err
            self._merge_dispatch(dispatch)
            return dispatch
        finally:
            self._dispatches_dirty.set()

    async def _command(self, point_id: str, body: Mapping[str, Any], wait_s: float) -> CommandOutcome:
        answer = await self._request(
            "POST",
            f"/api/v1/points/{quote(point_id, safe='')}/commands",
            body=body,
            timeout_s=wait_s + REQUEST_TIMEOUT_S,
        )
        try:
            return _outcome(answer)
        except (KeyError, TypeError, ValueError) as err:
            raise ApiError(0, "", f"unexpected answer to the command: {err!r}") from err

    async def _history(
        self, point_id: str, span: timedelta, points: int
    ) -> list[tuple[datetime, float | None]]:
        end = datetime.now(UTC)
        body = await self.get(
            f"/api/v1/points/{quote(point_id, safe='')}/history",
            start=(end - span).isoformat(),
            end=end.isoformat(),
            points=str(points),
            mode="lttb",
        )
        return [(_time(r["ts"]), _float(r.get("value"))) for r in body["readings"]]

    async def _alarm_action(self, alarm_id: str, action: str, body: Mapping[str, Any]) -> Any:
        try:
            return await self._request(
                "POST", f"/api/v1/alarms/{quote(alarm_id, safe='')}/{action}", body=body
            )
        finally:
            self._alarms_dirty.set()

    # ---- websocket --------------------------------------------------------------------------------

    def _wanted(self) -> set[str]:
        with self._lock:
            sessions = self._wants.union()
        snap = self.snapshot
        wanted = (screen_points(snap) | sessions) if snap.ready else sessions
        return set(sorted(wanted)[:MAX_WANTED_POINTS])

    async def _ws_loop(self) -> None:
        backoff = Backoff(initial_s=0.5, max_s=10.0)
        session = self._session
        assert session is not None
        while True:
            url = self.api_url + "/api/v1/ws"
            try:
                async with session.ws_connect(
                    url,
                    params={"token": self._credentials.access_token},
                    heartbeat=20.0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                ) as ws:
                    _LOGGER.info("cockpit: websocket connected to %s", url)
                    backoff.reset()
                    self._publish(live=True)
                    await ws.send_json({"type": "subscribe_alarms"})
                    await ws.send_json({"type": "subscribe", "topics": ["dispatches"]})
                    syncing = asyncio.create_task(self._sync_subscriptions(ws), name="cockpit-ws-sync")
                    try:
                        async for message in ws:
                            if message.type is aiohttp.WSMsgType.TEXT:
                                self._on_frame(message.json())
                            elif message.type is aiohttp.WSMsgType.ERROR:
                                break
                    finally:
                        syncing.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await syncing
            except (aiohttp.ClientError, TimeoutError, ValueError) as err:
                if self.snapshot.live or "ws" not in self._errors:
                    _LOGGER.warning("cockpit: websocket to %s lost: %s", url, err)
                self._errors["ws"] = str(err) or type(err).__name__
            else:
                self._errors["ws"] = "closed by the server"
            self._publish(live=False)
            if self._credentials.refresh_token:
                with contextlib.suppress(ApiError):
                    await self._renew()  # a 401 at the upgrade: the access token may have expired
            await asyncio.sleep(backoff.next_delay())

    async def _sync_subscriptions(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        subscribed: set[str] = set()
        while True:
            self._wanted_changed.clear()
            wanted = self._wanted()
            if added := sorted(wanted - subscribed):
                await ws.send_json({"type": "subscribe", "points": added})
            if removed := sorted(subscribed - wanted):
                await ws.send_json({"type": "unsubscribe", "points": removed})
                for point in removed:
                    self._latest.pop(point, None)
            subscribed = wanted
            await self._wanted_changed.wait()

    def _on_frame(self, frame: Any) -> None:
        self.frames_received += 1
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind in ("snapshot", "readings"):
            for raw in frame.get("readings", []):
                try:
                    self._latest[raw["point"]] = _sample(raw)
                except (KeyError, TypeError, ValueError):
                    continue
            self._publish(latest=MappingProxyType(dict(self._latest)))
        elif kind == "alarm_snapshot":
            self._publish(alarms=tuple(_alarm(a) for a in frame.get("alarms", [])))
        elif kind == "alarms":
            self._alarms_dirty.set()
        elif kind == "event" and frame.get("topic") == "dispatches":
            self._dispatches_dirty.set()  # a command result: a dispatch may have changed state
        elif kind == "error":
            _LOGGER.warning("cockpit: the server refused a websocket message: %s", frame.get("detail"))
        elif isinstance(kind, str) and ("ledger" in kind or "quota" in kind):
            self._refresh_now.set()  # a ledger or quota event: re-read the carbon figures now


async def _none() -> None:
    return None


# --------------------------------------------------------------------------------------------------
# The hub: one background event loop per Panel process


class DataHub:
    """Run every :class:`DataLayer` of this process on one background event loop."""

    def __init__(
        self, api_url: str, *, refresh_s: float = REFRESH_S, idle_grace_s: float = IDLE_GRACE_S
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._refresh_s = refresh_s
        self._idle_grace_s = idle_grace_s
        self._lock = threading.Lock()
        self._layers: dict[str, DataLayer] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cockpit-data", daemon=True)
        self._ids = itertools.count(1)
        self._stopping: set[asyncio.Task[None]] = set()  # only touched on the hub loop

    def start(self) -> None:
        """Start the background loop."""
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop every layer and the loop."""

        async def shutdown() -> None:
            with self._lock:
                layers = list(self._layers.values())
                self._layers.clear()
            for layer in layers:
                await layer.stop()

        if self._thread.is_alive():
            with contextlib.suppress(concurrent.futures.TimeoutError):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout_s)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the hub loop; return its future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def acquire(self, credentials: Credentials, *, key: str | None = None) -> DataLayer:
        """Return the running layer of a credential (started on first use) and count one more user."""
        key = key or credentials.access_token
        with self._lock:
            layer = self._layers.get(key)
            if layer is None:
                layer = DataLayer(
                    self.api_url, credentials, loop=self._loop, lock=self._lock, refresh_s=self._refresh_s
                )
                self._layers[key] = layer
                self._loop.call_soon_threadsafe(layer.start)
            layer.users += 1
        return layer

    def release(self, layer: DataLayer, owner: object) -> None:
        """Count one user less; a layer nobody uses stops after the grace period."""
        layer.forget(owner)
        with self._lock:
            layer.users -= 1
        self._loop.call_soon_threadsafe(self._loop.call_later, self._idle_grace_s, self._stop_if_idle, layer)

    def _stop_if_idle(self, layer: DataLayer) -> None:
        with self._lock:
            if layer.users > 0:
                return
            for key, value in list(self._layers.items()):
                if value is layer:
                    del self._layers[key]
        task = self._loop.create_task(layer.stop(), name="cockpit-data-stop")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def login(self, tenant: str, username: str, password: str) -> concurrent.futures.Future[Credentials]:
        """Sign in (``POST /api/v1/auth/login``); the future raises :class:`ApiError` when refused."""
        return self.submit(self._login(tenant, username, password))

    def new_key(self) -> str:
        """Return a key no credential uses: one layer per login."""
        return f"login-{next(self._ids)}"

    async def _login(self, tenant: str, username: str, password: str) -> Credentials:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(
                    self.api_url + "/api/v1/auth/login",
                    json={"tenant": tenant, "username": username, "password": password},
                ) as response,
            ):
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise ApiError(0, "", f"{self.api_url}: {err or type(err).__name__}") from err
        if response.status != 200 or not isinstance(body, dict):
            detail = body.get("detail", "") if isinstance(body, dict) else ""
            raise ApiError(
                response.status, str(body.get("title", "")) if isinstance(body, dict) else "", detail
            )
        return Credentials(access_token=body["access_token"], refresh_token=body.get("refresh_token"))
