"""The alarm engine: ISA-18.2 states, deadband and delays, shelving, suppression, chattering, floods.

:class:`AlarmEngine` holds one runtime per :class:`~anomaly.alarm_model.AlarmDefinition` and turns
values, condition flags, operator actions and the passing of time into
:class:`~anomaly.alarm_model.AlarmEvent` records. It is pure and synchronous: no I/O, no clock (every
call takes ``at`` from the caller's clock), no threads; the same calls give the same events.

State model (see docs/alarms.md)::

    NORMAL --condition--> ACTIVE_UNACK --ack--> ACTIVE_ACK --clears--> NORMAL
                          ACTIVE_UNACK --clears--> RTN_UNACK --ack--> NORMAL
                                                   RTN_UNACK --condition--> ACTIVE_UNACK

    any of the four  --shelve-->              SHELVED               (until an expiry, by a user)
    any              --suppress-->            SUPPRESSED_BY_DESIGN  (device offline, maintenance)
    any              --remove_from_service--> OUT_OF_SERVICE

The overrides rank OUT_OF_SERVICE > SUPPRESSED_BY_DESIGN > SHELVED. The condition is still evaluated
underneath them; when the last override is lifted the alarm goes to the state its condition implies:
ACTIVE_UNACK if active (annunciated afresh), NORMAL if clear.

Every method that can change an alarm returns the list of events it caused, in order; an empty list
means nothing visible changed. Operator actions always yield an event (also when the visible state
stays the same, e.g. shelving an alarm that is suppressed), so the audit trail is complete.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from scada.model import ConfigError, DecodeError, NotFound

from .alarm_model import (
    AlarmDefinition,
    AlarmEvent,
    AlarmInputError,
    AlarmPriority,
    AlarmState,
    AlarmStateError,
    AlarmStatus,
    ChatterPolicy,
    ConditionKind,
    EventCause,
    Instant,
    from_epoch_s,
    to_epoch_s,
)
from .flood import ConsoleFlood, FloodInterval, FloodPolicy

# The vocabulary (definitions, events, states, errors) lives in anomaly.alarm_model: import it from
# there. AlarmEvent, AlarmInputError, AlarmPriority and AlarmStateError are re-exported here only
# because scada/app.py and scada/api/alarms.py still import them from this module.
__all__ = [
    "SNAPSHOT_VERSION",
    "SYSTEM_USER",
    "AlarmEngine",
    "ConsoleLine",
    "ConsoleView",
]

SYSTEM_USER = "system"
"""``by`` of events caused by conditions, timers and policies rather than a person."""
SNAPSHOT_VERSION = 1
SUPPRESS_DESIGN = "design"
SUPPRESS_DEVICE_OFFLINE = "device_offline"
SUPPRESS_MAINTENANCE = "maintenance"

_VISIBLE = frozenset({AlarmState.ACTIVE_UNACK, AlarmState.ACTIVE_ACK, AlarmState.RTN_UNACK})
"""States in which an alarm has a line on the operator's console."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleLine:
    """One line of a console: an alarm shown by itself, or a group head with its grouped alarms."""

    alarm_id: str
    state: AlarmState
    priority: AlarmPriority
    """The most urgent priority among the head and its visible members."""
    since_s: float
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleView:
    """What one console shows now: lines in priority order, and its flood figures."""

    console: str
    lines: tuple[ConsoleLine, ...]
    grouped: int
    """Visible alarms shown under a group head instead of on their own line."""
    in_flood: bool
    flood_time_s: float
    activations_in_window: int
    annunciated_in_window: int


class _Runtime:
    """Mutable state of one alarm (the engine's private bookkeeping)."""

    __slots__ = (
        "acked",
        "activations",
        "active",
        "active_since",
        "ancestors",
        "chattering",
        "deadband_eu",
        "definition",
        "group",
        "head",
        "last_at",
        "last_value",
        "oos_by",
        "oos_reason",
        "prev_at",
        "prev_value",
        "raw",
        "raw_since",
        "shelve_reason",
        "shelved_by",
        "shelved_until",
        "state",
        "state_since",
        "suppressed",
    )

    def __init__(self, definition: AlarmDefinition, ancestors: tuple[str, ...], chatter_n: int) -> None:
        self.definition = definition
        self.ancestors = ancestors
        self.deadband_eu = definition.deadband_eu
        self.raw = False
        self.raw_since = 0.0
        self.active = False
        self.acked = True
        self.active_since: float | None = None
        self.state = AlarmState.NORMAL
        self.state_since = 0.0
        self.shelved_until: float | None = None
        self.shelved_by: str | None = None
        self.shelve_reason: str | None = None
        self.suppressed: dict[str, str] = {}
        self.oos_reason: str | None = None
        self.oos_by: str | None = None
        self.last_value: float | bool | None = None
        self.last_at: float | None = None
        self.prev_value: float | None = None
        self.prev_at: float | None = None
        self.activations: deque[float] = deque(maxlen=chatter_n)
        self.chattering = False
        self.group: str | None = None
        self.head = False

    @property
    def overridden(self) -> bool:
        return self.oos_reason is not None or bool(self.suppressed) or self.shelved_until is not None

    def derive(self) -> AlarmState:
        if self.oos_reason is not None:
            return AlarmState.OUT_OF_SERVICE
        if self.suppressed:
            return AlarmState.SUPPRESSED_BY_DESIGN
        if self.shelved_until is not None:
            return AlarmState.SHELVED
        if self.active:
            return AlarmState.ACTIVE_ACK if self.acked else AlarmState.ACTIVE_UNACK
        return AlarmState.NORMAL if self.acked else AlarmState.RTN_UNACK

    def to_dict(self) -> dict[str, Any]:
        return {
            "raw": self.raw,
            "raw_since": self.raw_since,
            "active": self.active,
            "acked": self.acked,
            "active_since": self.active_since,
            "state": self.state.value,
            "state_since": self.state_since,
            "shelved_until": self.shelved_until,
            "shelved_by": self.shelved_by,
            "shelve_reason": self.shelve_reason,
            "suppressed": dict(self.suppressed),
            "oos_reason": self.oos_reason,
            "oos_by": self.oos_by,
            "last_value": self.last_value,
            "last_at": self.last_at,
            "prev_value": self.prev_value,
            "prev_at": self.prev_at,
            "activations": list(self.activations),
            "chattering": self.chattering,
            "group": self.group,
            "head": self.head,
        }

    def load(self, data: Mapping[str, Any]) -> None:
        self.raw = bool(data["raw"])
        self.raw_since = float(data["raw_since"])
        self.active = bool(data["active"])
        self.acked = bool(data["acked"])
        self.active_since = _opt_float(data["active_since"])
        self.state_since = float(data["state_since"])
        self.shelved_until = _opt_float(data["shelved_until"])
        self.shelved_by = data["shelved_by"]
        self.shelve_reason = data["shelve_reason"]
        self.suppressed = {str(k): str(v) for k, v in dict(data["suppressed"]).items()}
        self.oos_reason = data["oos_reason"]
        self.oos_by = data["oos_by"]
        value = data["last_value"]
        self.last_value = value if value is None or isinstance(value, bool) else float(value)
        self.last_at = _opt_float(data["last_at"])
        self.prev_value = _opt_float(data["prev_value"])
        self.prev_at = _opt_float(data["prev_at"])
        self.activations.extend(float(t) for t in data["activations"])
        self.chattering = bool(data["chattering"])
        self.group = data["group"]
        self.head = bool(data["head"])
        self.state = self.derive()
        if self.state.value != data["state"]:
            raise DecodeError(
                f"alarm snapshot {self.definition.id!r}: state {data['state']!r} does not match its flags"
            )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _require_text(value: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise AlarmInputError(f"{name}: must be a non-empty string, got {value!r}")
    return value


class AlarmEngine:
    """All alarms of a site: evaluation, operator actions, timers, flood grouping and snapshots.

    Parameters
    ----------
    definitions
        The configured alarms; ids must be unique.
    parents
        Hierarchy as ``node id -> parent node id`` (None at the root), used to group flood alarms by
        node subtree and to suppress a subtree for maintenance. Without it only exact nodes match.
    flood, chatter
        Flood and chattering policies (ISA-18.2 defaults).
    max_shelve_s
        Longest shelving an operator may ask for (shelving is always time-limited).

    Examples
    --------
    >>> d = AlarmDefinition(id="boiler.temp:h", point="boiler.temp_degc", node="ws-a",
    ...                     kind=ConditionKind.HIGH, priority=AlarmPriority.HIGH, setpoint=90.0, deadband=2.0)
    >>> engine = AlarmEngine([d])
    >>> [e.to_state.name for e in engine.evaluate("boiler.temp:h", 91.0, at=0.0)]
    ['ACTIVE_UNACK']
    >>> engine.evaluate("boiler.temp:h", 89.0, at=1.0)  # inside the deadband: still active
    []
    >>> [e.to_state.name for e in engine.evaluate("boiler.temp:h", 87.5, at=2.0)]
    ['RTN_UNACK']
    >>> [e.to_state.name for e in engine.acknowledge("boiler.temp:h", at=3.0, by="li.wei", comment="seen")]
    ['NORMAL']
    """

    def __init__(
        self,
        definitions: Iterable[AlarmDefinition] = (),
        *,
        parents: Mapping[str, str | None] | None = None,
        flood: FloodPolicy | None = None,
        chatter: ChatterPolicy | None = None,
        max_shelve_s: float = 86_400.0,
    ) -> None:
        if not (math.isfinite(max_shelve_s) and max_shelve_s > 0):
            raise ConfigError(f"alarm engine: max_shelve_s: must be > 0, got {max_shelve_s}")
        self._parents: dict[str, str | None] = dict(parents or {})
        self._flood_policy = flood or FloodPolicy()
        self._chatter = chatter or ChatterPolicy()
        self._max_shelve_s = float(max_shelve_s)
        self._alarms: dict[str, _Runtime] = {}
        self._by_point: dict[str, list[_Runtime]] = {}
        self._by_device: dict[str, list[_Runtime]] = {}
        self._by_console: dict[str, list[_Runtime]] = {}
        self._consoles: dict[str, ConsoleFlood] = {}
        self._heads_by_device: dict[tuple[str, str], dict[str, None]] = {}
        self._heads_by_node: dict[tuple[str, str], dict[str, None]] = {}
        self._members: dict[str, dict[str, None]] = {}
        self._pending: set[str] = set()
        self._shelved: set[str] = set()
        self._chattering: set[str] = set()
        self._seq = 0
        self.late_samples = 0
        """Samples ignored because they were older than the alarm's last evaluation (redelivery)."""
        self.restore_skipped: tuple[str, ...] = ()
        """Alarm ids found in a restored snapshot but no longer defined."""
        for definition in definitions:
            self._add(definition)

    # ------------------------------------------------------------------------------------------
    # Configuration and lookups

    def _add(self, definition: AlarmDefinition) -> None:
        if definition.id in self._alarms:
            raise ConfigError(f"alarm {definition.id!r}: id: defined twice")
        rt = _Runtime(definition, self._ancestors(definition), self._chatter.activations)
        self._alarms[definition.id] = rt
        if definition.point is not None:
            self._by_point.setdefault(definition.point, []).append(rt)
        if definition.device is not None:
            self._by_device.setdefault(definition.device, []).append(rt)
        self._by_console.setdefault(definition.console, []).append(rt)
        if definition.console not in self._consoles:
            self._consoles[definition.console] = ConsoleFlood(self._flood_policy)

    def _ancestors(self, definition: AlarmDefinition) -> tuple[str, ...]:
        chain = [definition.node]
        node: str | None = self._parents.get(definition.node)
        while node is not None:
            if node in chain:
                raise ConfigError(f"alarm {definition.id!r}: node: hierarchy has a cycle through {node!r}")
            chain.append(node)
            node = self._parents.get(node)
        return tuple(chain)

    def _get(self, alarm_id: str) -> _Runtime:
        try:
            return self._alarms[alarm_id]
        except KeyError:
            raise NotFound(f"alarm {alarm_id!r} is not defined") from None

    def has(self, alarm_id: str) -> bool:
        """Return True if ``alarm_id`` is defined."""
        return alarm_id in self._alarms

    @property
    def definitions(self) -> tuple[AlarmDefinition, ...]:
        """Return the configured alarms in definition order."""
        return tuple(rt.definition for rt in self._alarms.values())

    def status(self, alarm_id: str) -> AlarmStatus:
        """Return the current status of one alarm; :class:`NotFound` for an unknown id."""
        return self._status(self._get(alarm_id))

    def statuses(self, console: str | None = None) -> list[AlarmStatus]:
        """Return the status of every alarm, or of one console's alarms."""
        runtimes = self._alarms.values() if console is None else self._by_console.get(console, [])
        return [self._status(rt) for rt in runtimes]

    def _status(self, rt: _Runtime) -> AlarmStatus:
        d = rt.definition
        return AlarmStatus(
            alarm_id=d.id,
            state=rt.state,
            since=from_epoch_s(rt.state_since),
            condition_active=rt.active,
            acknowledged=rt.acked,
            active_since=None if rt.active_since is None else from_epoch_s(rt.active_since),
            last_value=rt.last_value,
            priority=d.priority,
            console=d.console,
            group=rt.group,
            chattering=rt.chattering,
            shelved_until=None if rt.shelved_until is None else from_epoch_s(rt.shelved_until),
            shelved_by=rt.shelved_by,
            shelve_reason=rt.shelve_reason,
            suppressed_reason="; ".join(rt.suppressed[k] for k in sorted(rt.suppressed)) or None,
            out_of_service_reason=rt.oos_reason,
        )

    # ------------------------------------------------------------------------------------------
    # Evaluation

    def evaluate(self, alarm_id: str, value: float | bool, at: Instant) -> list[AlarmEvent]:
        """Evaluate one value (or condition flag) of an alarm at ``at``; return the events it caused.

        A number is compared with the setpoint: the condition starts at the setpoint and clears
        only beyond it by the deadband. A bool is the condition itself (detectors, quota alerts,
        device availability). The alarm activates once the condition has held for ``on_delay_s``
        and returns once it has been clear for ``off_delay_s``. A sample older than the alarm's
        last one is ignored and counted in :attr:`late_samples` (stream redelivery).
        """
        rt = self._get(alarm_id)
        at_s = to_epoch_s(at)
        if rt.last_at is not None and at_s < rt.last_at:
            self.late_samples += 1
            return []
        raw = self._condition(rt, value, at_s)
        out: list[AlarmEvent] = []
        self._expire_shelve(rt, at_s, out)
        if isinstance(value, bool):
            rt.last_value = value
        else:
            rt.last_value = rt.prev_value = float(value)
            rt.prev_at = at_s
        rt.last_at = at_s
        if raw != rt.raw:
            rt.raw = raw
            rt.raw_since = at_s
        self._settle(rt, at_s, out)
        if rt.chattering:
            self._decay_chatter(rt, at_s)
        return out

    def evaluate_point(self, point: str, value: float | bool, at: Instant) -> list[AlarmEvent]:
        """Evaluate a reading against every alarm watching its point (none: no events)."""
        out: list[AlarmEvent] = []
        for rt in self._by_point.get(point, ()):
            out += self.evaluate(rt.definition.id, value, at)
        return out

    def _condition(self, rt: _Runtime, value: float | bool, at_s: float) -> bool:
        """Return the raw condition (deadband applied, delays not yet) without changing anything."""
        d = rt.definition
        if isinstance(value, bool):
            return value
        if d.kind.flag_only:
            raise AlarmInputError(
                f"value: alarm {d.id!r} ({d.kind.value}) takes a condition flag, got {value!r}"
            )
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise AlarmInputError(f"value: alarm {d.id!r} needs a finite number or a flag, got {value!r}")
        setpoint = d.setpoint
        if setpoint is None:
            raise AlarmInputError(f"value: alarm {d.id!r} has no setpoint; pass a condition flag instead")
        x = float(value)
        if d.kind is ConditionKind.RATE_OF_CHANGE:
            if rt.prev_value is None or rt.prev_at is None or at_s <= rt.prev_at:
                return rt.raw  # no rate without two samples at distinct times
            x = abs(x - rt.prev_value) / (at_s - rt.prev_at)
        if d.kind.is_low:
            if x <= setpoint:
                return True
            return False if x > setpoint + rt.deadband_eu else rt.raw
        if x >= setpoint:
            return True
        return False if x < setpoint - rt.deadband_eu else rt.raw

    def _settle(self, rt: _Runtime, at_s: float, out: list[AlarmEvent]) -> None:
        """Apply on/off delays: move the debounced condition once the raw one has held long enough."""
        d = rt.definition
        if rt.raw and not rt.active:
            if at_s - rt.raw_since >= d.on_delay_s:
                rt.active = True
                rt.active_since = at_s
                self._on_condition(rt, at_s, out)
        elif not rt.raw and rt.active and at_s - rt.raw_since >= d.off_delay_s:
            rt.active = False
            rt.active_since = None
            self._on_condition(rt, at_s, out)
        if rt.raw != rt.active:
            self._pending.add(d.id)
        else:
            self._pending.discard(d.id)

    def _on_condition(self, rt: _Runtime, at_s: float, out: list[AlarmEvent]) -> None:
        before = rt.state
        newly_chattering = False
        if rt.active:
            rt.activations.append(at_s)
            was = rt.chattering
            self._decay_chatter(rt, at_s, rising=True)
            newly_chattering = rt.chattering and not was
            rt.acked = False  # a new activation needs a new acknowledgement
        self._commit(rt, before, at_s, EventCause.ACTIVATE if rt.active else EventCause.CLEAR, out)
        if newly_chattering and self._chatter.auto_shelve_s is not None and not rt.overridden:
            n, window_s = self._chatter.activations, self._chatter.window_s
            self._do_shelve(
                rt,
                at_s,
                until_s=at_s + self._chatter.auto_shelve_s,
                by=SYSTEM_USER,
                reason=f"chattering: {n} activations within {window_s:g} s",
                out=out,
            )

    def _decay_chatter(self, rt: _Runtime, at_s: float, *, rising: bool = False) -> None:
        times = rt.activations
        chattering = len(times) == times.maxlen and times[0] > at_s - self._chatter.window_s
        if chattering != rt.chattering and (rising or not chattering):
            rt.chattering = chattering
            if chattering:
                self._chattering.add(rt.definition.id)
            else:
                self._chattering.discard(rt.definition.id)

    def tick(self, at: Instant) -> list[AlarmEvent]:
        """Let time pass: expire shelving, complete on/off delays, decay chattering, close floods.

        Call it periodically (e.g. every second) so delays and expiries happen without new samples.
        """
        at_s = to_epoch_s(at)
        out: list[AlarmEvent] = []
        for alarm_id in sorted(self._shelved, key=lambda i: (self._alarms[i].shelved_until or 0.0, i)):
            self._expire_shelve(self._alarms[alarm_id], at_s, out)
        for alarm_id in sorted(self._pending):
            rt = self._alarms[alarm_id]
            if rt.last_at is None or at_s >= rt.last_at:
                self._settle(rt, at_s, out)
        for alarm_id in sorted(self._chattering):
            self._decay_chatter(self._alarms[alarm_id], at_s)
        for flood in self._consoles.values():
            flood.advance(at_s)
        return out

    # ------------------------------------------------------------------------------------------
    # Transitions, events, flood grouping

    def _commit(
        self,
        rt: _Runtime,
        before: AlarmState,
        at_s: float,
        cause: EventCause,
        out: list[AlarmEvent],
        *,
        by: str = SYSTEM_USER,
        comment: str = "",
        force: bool = False,
    ) -> None:
        after = rt.derive()
        if after is before and not force:
            return
        annunciated = False
        if after is AlarmState.ACTIVE_UNACK and before is not AlarmState.ACTIVE_UNACK:
            annunciated = self._admit(rt, at_s)
        if after is not before:
            rt.state = after
            rt.state_since = at_s
        d = rt.definition
        self._seq += 1
        out.append(
            AlarmEvent(
                seq=self._seq,
                alarm_id=d.id,
                from_state=before,
                to_state=after,
                at=from_epoch_s(at_s),
                cause=cause,
                by=by,
                comment=comment,
                value=rt.last_value,
                message=d.render(rt.last_value, after),
                priority=d.priority,
                console=d.console,
                node=d.node,
                device=d.device,
                point=d.point,
                group=rt.group,
                annunciated=annunciated,
                chattering=rt.chattering,
                shelved_until=None if rt.shelved_until is None else from_epoch_s(rt.shelved_until),
            )
        )
        if after not in _VISIBLE:
            self._leave_console(rt)

    def _admit(self, rt: _Runtime, at_s: float) -> bool:
        """Count an activation on its console; annunciate it, or group it under a parent line."""
        d = rt.definition
        flood = self._consoles[d.console]
        if flood.admit(d.id, at_s, bypass=self._flood_policy.bypasses(d.priority)):
            self._set_group(rt, None)
            if not rt.head:
                self._open_head(rt)
            return True
        if not rt.head and rt.group is None:
            self._set_group(rt, self._choose_parent(rt, flood))
        return False

    def _choose_parent(self, rt: _Runtime, flood: ConsoleFlood) -> str | None:
        """Pick a group head: same device, then the nearest shared node subtree, then the first-out."""
        d = rt.definition
        if d.device is not None:
            for head in self._heads_by_device.get((d.console, d.device), ()):
                if head != d.id:
                    return head
        for node in rt.ancestors:
            for head in self._heads_by_node.get((d.console, node), ()):
                if head != d.id:
                    return head
        if flood.first_out is not None and flood.first_out != d.id:
            return flood.first_out
        return None

    def _set_group(self, rt: _Runtime, group: str | None) -> None:
        if rt.group == group:
            return
        alarm_id = rt.definition.id
        if rt.group is not None:
            members = self._members.get(rt.group)
            if members is not None:
                members.pop(alarm_id, None)
                if not members:
                    del self._members[rt.group]
        rt.group = group
        if group is not None:
            self._members.setdefault(group, {})[alarm_id] = None

    def _open_head(self, rt: _Runtime) -> None:
        d = rt.definition
        rt.head = True
        if d.device is not None:
            self._heads_by_device.setdefault((d.console, d.device), {})[d.id] = None
        for node in rt.ancestors:
            self._heads_by_node.setdefault((d.console, node), {})[d.id] = None

    def _leave_console(self, rt: _Runtime) -> None:
        """Take an alarm off the console: it heads no new groups and leaves its own group."""
        self._set_group(rt, None)
        if not rt.head:
            return
        d = rt.definition
        rt.head = False
        keys: list[tuple[dict[tuple[str, str], dict[str, None]], tuple[str, str]]] = [
            (self._heads_by_node, (d.console, node)) for node in rt.ancestors
        ]
        if d.device is not None:
            keys.append((self._heads_by_device, (d.console, d.device)))
        for index, key in keys:
            heads = index.get(key)
            if heads is not None:
                heads.pop(d.id, None)
                if not heads:
                    del index[key]

    # ------------------------------------------------------------------------------------------
    # Operator and design actions

    def _peek_state(self, rt: _Runtime, at_s: float) -> AlarmState:
        """Return the state the alarm will be in at ``at_s`` once a due shelving has expired."""
        if rt.shelved_until is None or at_s < rt.shelved_until:
            return rt.state
        if rt.oos_reason is not None:
            return AlarmState.OUT_OF_SERVICE
        if rt.suppressed:
            return AlarmState.SUPPRESSED_BY_DESIGN
        return AlarmState.ACTIVE_UNACK if rt.active else AlarmState.NORMAL

    def _expire_shelve(self, rt: _Runtime, at_s: float, out: list[AlarmEvent]) -> None:
        if rt.shelved_until is not None and at_s >= rt.shelved_until:
            until_s = rt.shelved_until
            before = rt.state
            self._clear_shelve(rt)
            self._lift(rt)
            self._commit(rt, before, until_s, EventCause.SHELVE_EXPIRED, out, force=True)

    def _clear_shelve(self, rt: _Runtime) -> None:
        rt.shelved_until = rt.shelved_by = rt.shelve_reason = None
        self._shelved.discard(rt.definition.id)

    @staticmethod
    def _lift(rt: _Runtime) -> None:
        """After an override ends, show the state the condition implies (active: unacknowledged)."""
        if not rt.overridden:
            rt.acked = not rt.active

    def acknowledge(
        self, alarm_id: str, *, at: Instant, by: str, comment: str = "", with_group: bool = False
    ) -> list[AlarmEvent]:
        """Acknowledge an ACTIVE_UNACK or RTN_UNACK alarm; other states raise :class:`AlarmStateError`.

        With ``with_group`` the alarms grouped under it that await acknowledgement are acknowledged
        too, with the same user and comment.
        """
        rt = self._get(alarm_id)
        at_s = to_epoch_s(at)
        _require_text(by, "by")
        state = self._peek_state(rt, at_s)
        if not state.ackable:
            raise AlarmStateError(alarm_id, state, "acknowledge")
        out: list[AlarmEvent] = []
        self._expire_shelve(rt, at_s, out)
        self._ack(rt, at_s, by, comment, out)
        if with_group:
            for member_id in list(self._members.get(alarm_id, ())):
                member = self._alarms[member_id]
                self._expire_shelve(member, at_s, out)
                if member.state.ackable:
                    self._ack(member, at_s, by, comment, out)
        return out

    def _ack(self, rt: _Runtime, at_s: float, by: str, comment: str, out: list[AlarmEvent]) -> None:
        before = rt.state
        rt.acked = True
        self._commit(rt, before, at_s, EventCause.ACKNOWLEDGE, out, by=by, comment=comment, force=True)

    def shelve(self, alarm_id: str, *, at: Instant, until: Instant, by: str, reason: str) -> list[AlarmEvent]:
        """Shelve an alarm until ``until`` (at most ``max_shelve_s`` ahead); shelving again extends it.

        Refused (:class:`AlarmStateError`) while the alarm is suppressed or out of service.
        """
        rt = self._get(alarm_id)
        at_s = to_epoch_s(at)
        until_s = to_epoch_s(until, field="until")
        _require_text(by, "by")
        _require_text(reason, "reason")
        if not until_s > at_s:
            raise AlarmInputError(f"until: must be after at, got {until_s - at_s:g} s ahead")
        if until_s - at_s > self._max_shelve_s:
            raise AlarmInputError(
                f"until: shelving is limited to {self._max_shelve_s:g} s, asked for {until_s - at_s:g} s"
            )
        state = self._peek_state(rt, at_s)
        if state in (AlarmState.SUPPRESSED_BY_DESIGN, AlarmState.OUT_OF_SERVICE):
            raise AlarmStateError(alarm_id, state, "shelve")
        out: list[AlarmEvent] = []
        self._expire_shelve(rt, at_s, out)
        self._do_shelve(rt, at_s, until_s=until_s, by=by, reason=reason, out=out)
        return out

    def _do_shelve(
        self, rt: _Runtime, at_s: float, *, until_s: float, by: str, reason: str, out: list[AlarmEvent]
    ) -> None:
        before = rt.state
        rt.shelved_until, rt.shelved_by, rt.shelve_reason = until_s, by, reason
        self._shelved.add(rt.definition.id)
        self._commit(rt, before, at_s, EventCause.SHELVE, out, by=by, comment=reason, force=True)

    def unshelve(self, alarm_id: str, *, at: Instant, by: str, comment: str = "") -> list[AlarmEvent]:
        """End a shelving early; :class:`AlarmStateError` when the alarm is not shelved."""
        rt = self._get(alarm_id)
        at_s = to_epoch_s(at)
        _require_text(by, "by")
        if rt.shelved_until is None or at_s >= rt.shelved_until:
            raise AlarmStateError(alarm_id, self._peek_state(rt, at_s), "unshelve")
        out: list[AlarmEvent] = []
        before = rt.state
        self._clear_shelve(rt)
        self._lift(rt)
        self._commit(rt, before, at_s, EventCause.UNSHELVE, out, by=by, comment=comment, force=True)
        return out

    def suppress(
        self, alarm_id: str, *, at: Instant, reason: str, source: str = SUPPRESS_DESIGN, by: str = SYSTEM_USER
    ) -> list[AlarmEvent]:
        """Suppress an alarm by design for ``source`` (device offline, maintenance...); idempotent.

        Several sources may suppress one alarm; it stays suppressed until each has been lifted.
        """
        rt = self._get(alarm_id)
        at_s = to_epoch_s(at)
        _require_text(reason, "reason")
        _require_text(source, "source")
        out: list[AlarmEvent] = []
        self._expire_shelve(rt, at_s, out)
        if source in rt.suppressed:
            rt.suppressed[source] = reason
            return out
        before = rt.state
        rt.suppressed[source] = reason
        self._commit(rt, before, at_s, EventCause.SUPPRESS, out, by=by, comment=reason, force=True)
        return out

    def unsuppress(
        self, alarm_id: str, *, at: Instant, source: str = SUPPRESS_DESIGN, by: str = SYSTEM_USER
    ) -> list[AlarmEvent]:
        """Lift the suppression of ``source``; idempotent (no suppression: no events)."""
        rt = self._get(alarm_id)
        at_s = to_epoch_s(at)
        out: list[AlarmEvent] = []
        self._expire_shelve(rt, at_s, out)
        if source not in rt.suppressed:
            return out
        before = rt.state
        del rt.suppressed[source]
        self._lift(rt)
        self._commit(rt, before, at_s, EventCause.UNSUPPRESS, out, by=by, force=True)
        return out

    def set_device_online(
        self, device: str, online: bool, *, at: Instant, reason: str = ""
    ) -> list[AlarmEvent]:
        """Apply a device availability change: drive its device-offline alarms, suppress the rest.

        While a device is offline its other alarms (limits, no-data...) would only repeat that news,
        so they are suppressed by design with source ``device_offline``.
        """
        at_s = to_epoch_s(at)
        out: list[AlarmEvent] = []
        why = f"device {device} offline" + (f": {reason}" if reason else "")
        for rt in self._by_device.get(device, ()):
            alarm_id = rt.definition.id
            if rt.definition.kind is ConditionKind.DEVICE_OFFLINE:
                out += self.evaluate(alarm_id, not online, at_s)
            elif online:
                out += self.unsuppress(alarm_id, at=at_s, source=SUPPRESS_DEVICE_OFFLINE)
            else:
                out += self.suppress(alarm_id, at=at_s, reason=why, source=SUPPRESS_DEVICE_OFFLINE)
        return out

    def suppress_node(self, node: str, *, at: Instant, reason: str, by: str) -> list[AlarmEvent]:
        """Suppress every alarm in a node's subtree for maintenance (source ``maintenance``)."""
        _require_text(by, "by")
        out: list[AlarmEvent] = []
        for rt in list(self._alarms.values()):
            if node in rt.ancestors:
                out += self.suppress(
                    rt.definition.id, at=at, reason=reason, source=SUPPRESS_MAINTENANCE, by=by
                )
        return out

    def unsuppress_node(self, node: str, *, at: Instant, by: str) -> list[AlarmEvent]:
        """End the maintenance suppression of a node's subtree."""
        _require_text(by, "by")
        out: list[AlarmEvent] = []
        for rt in list(self._alarms.values()):
            if node in rt.ancestors:
                out += self.unsuppress(rt.definition.id, at=at, source=SUPPRESS_MAINTENANCE, by=by)
        return out

    def remove_from_service(self, alarm_id: str, *, at: Instant, by: str, reason: str) -> list[AlarmEvent]:
        """Take an alarm out of service; :class:`AlarmStateError` when it already is."""
        rt = self._get(alarm_id)
        at_s = to_epoch_s(at)
        _require_text(by, "by")
        _require_text(reason, "reason")
        if rt.oos_reason is not None:
            raise AlarmStateError(alarm_id, rt.state, "remove from service")
        out: list[AlarmEvent] = []
        self._expire_shelve(rt, at_s, out)
        before = rt.state
        rt.oos_reason, rt.oos_by = reason, by
        self._commit(rt, before, at_s, EventCause.REMOVE_FROM_SERVICE, out, by=by, comment=reason, force=True)
        return out

    def return_to_service(
        self, alarm_id: str, *, at: Instant, by: str, comment: str = ""
    ) -> list[AlarmEvent]:
        """Return an out-of-service alarm to service; :class:`AlarmStateError` when it is in service."""
        rt = self._get(alarm_id)
        at_s = to_epoch_s(at)
        _require_text(by, "by")
        if rt.oos_reason is None:
            raise AlarmStateError(alarm_id, self._peek_state(rt, at_s), "return to service")
        out: list[AlarmEvent] = []
        self._expire_shelve(rt, at_s, out)
        before = rt.state
        rt.oos_reason = rt.oos_by = None
        self._lift(rt)
        self._commit(rt, before, at_s, EventCause.RETURN_TO_SERVICE, out, by=by, comment=comment, force=True)
        return out

    # ------------------------------------------------------------------------------------------
    # Consoles

    def in_flood(self, console: str) -> bool:
        """Return True while a console is in flood."""
        return self._console(console).in_flood

    def flood_time_s(self, console: str, at: Instant) -> float:
        """Return the total time a console has spent in flood up to ``at``."""
        return self._console(console).flood_time_s(to_epoch_s(at))

    def flood_intervals(self, console: str) -> tuple[FloodInterval, ...]:
        """Return the console's most recent closed floods (epoch seconds)."""
        return tuple(self._console(console).intervals)

    def _console(self, console: str) -> ConsoleFlood:
        try:
            return self._consoles[console]
        except KeyError:
            raise NotFound(f"console {console!r} has no alarms") from None

    def console_view(self, console: str, *, at: Instant) -> ConsoleView:
        """Return the console's lines at ``at``: alarms by themselves, flood groups under their head."""
        flood = self._console(console)
        at_s = to_epoch_s(at)
        flood.advance(at_s)
        members: dict[str, list[_Runtime]] = {}
        lines: list[_Runtime] = []
        grouped = 0
        for rt in self._by_console[console]:
            if rt.state not in _VISIBLE:
                continue
            if rt.group is None:
                lines.append(rt)
            else:
                members.setdefault(rt.group, []).append(rt)
                grouped += 1
        out: list[ConsoleLine] = []
        seen = {rt.definition.id for rt in lines}
        heads = lines + [self._alarms[g] for g in members if g not in seen and g in self._alarms]
        for rt in heads:
            group = members.get(rt.definition.id, [])
            out.append(
                ConsoleLine(
                    alarm_id=rt.definition.id,
                    state=rt.state,
                    priority=min([rt.definition.priority] + [m.definition.priority for m in group]),
                    since_s=rt.state_since,
                    members=tuple(m.definition.id for m in group),
                )
            )
        out.sort(key=lambda line: (line.priority, line.since_s, line.alarm_id))
        return ConsoleView(
            console=console,
            lines=tuple(out),
            grouped=grouped,
            in_flood=flood.in_flood,
            flood_time_s=flood.flood_time_s(at_s),
            activations_in_window=flood.activations_in_window,
            annunciated_in_window=flood.annunciated_in_window,
        )

    # ------------------------------------------------------------------------------------------
    # Snapshot and restore

    def snapshot(self) -> dict[str, Any]:
        """Return the whole engine state as JSON-able data, for :meth:`restore` after a restart."""
        return {
            "version": SNAPSHOT_VERSION,
            "seq": self._seq,
            "late_samples": self.late_samples,
            "alarms": {alarm_id: rt.to_dict() for alarm_id, rt in self._alarms.items()},
            "consoles": {name: flood.to_dict() for name, flood in self._consoles.items()},
        }

    @classmethod
    def restore(
        cls,
        snapshot: Mapping[str, Any],
        definitions: Iterable[AlarmDefinition],
        *,
        parents: Mapping[str, str | None] | None = None,
        flood: FloodPolicy | None = None,
        chatter: ChatterPolicy | None = None,
        max_shelve_s: float = 86_400.0,
    ) -> AlarmEngine:
        """Return an engine with the current definitions and the states saved by :meth:`snapshot`.

        Alarms defined now but absent from the snapshot start NORMAL; saved alarms no longer
        defined are skipped and listed in :attr:`restore_skipped`. Raises :class:`DecodeError`.
        """
        engine = cls(definitions, parents=parents, flood=flood, chatter=chatter, max_shelve_s=max_shelve_s)
        if snapshot.get("version") != SNAPSHOT_VERSION:
            raise DecodeError(
                f"alarm snapshot: version: expected {SNAPSHOT_VERSION}, got {snapshot.get('version')!r}"
            )
        try:
            engine._seq = int(snapshot["seq"])
            engine.late_samples = int(snapshot["late_samples"])
            skipped: list[str] = []
            for alarm_id, data in dict(snapshot["alarms"]).items():
                rt = engine._alarms.get(alarm_id)
                if rt is None:
                    skipped.append(alarm_id)
                    continue
                rt.load(data)
            engine.restore_skipped = tuple(skipped)
            for name, data in dict(snapshot["consoles"]).items():
                if name in engine._consoles:
                    engine._consoles[name] = ConsoleFlood.from_dict(engine._flood_policy, data)
        except (KeyError, TypeError, ValueError) as err:
            raise DecodeError(f"alarm snapshot: {type(err).__name__}: {err}") from None
        engine._reindex()
        return engine

    def _reindex(self) -> None:
        for alarm_id, rt in self._alarms.items():
            group, rt.group = rt.group, None
            if group is not None:
                self._set_group(rt, group)
            if rt.head:
                self._open_head(rt)
            if rt.raw != rt.active:
                self._pending.add(alarm_id)
            if rt.shelved_until is not None:
                self._shelved.add(alarm_id)
            if rt.chattering:
                self._chattering.add(alarm_id)
