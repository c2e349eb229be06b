"""Alarm vocabulary: definitions, states, events, status views and errors.

The model follows ISA-18.2 / IEC 62682 and the OPC UA Part 9 ``AlarmConditionType``: a condition is
*active* or not, an annunciation is *acknowledged* or not, and three overrides take an alarm off the
operator's console (shelved by an operator, suppressed by design, out of service). The engine in
:mod:`anomaly.alarms` drives these values; this module only holds them and their codecs.

Time is the caller's: every instant is an aware ``datetime`` or epoch seconds (``float``). Nothing
here reads a clock or does I/O.

Errors
------
::

    ScadaError (scada.model)
    ├── ConfigError             an alarm definition is invalid (names the alarm and the field)
    ├── NotFound                an alarm id the engine does not know
    ├── DecodeError             an event or snapshot dictionary cannot be decoded
    └── AlarmError              an alarm operation was refused
        ├── AlarmStateError     the operation is not allowed in the alarm's current state
        └── AlarmInputError     a value, time or argument is unusable (names the field)
"""

from __future__ import annotations

import enum
import math
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from scada.model import ConfigError, DecodeError, NotFound, ScadaError, split_point_id

__all__ = [
    "DEFAULT_MESSAGE",
    "AlarmDefinition",
    "AlarmError",
    "AlarmEvent",
    "AlarmInputError",
    "AlarmPriority",
    "AlarmState",
    "AlarmStateError",
    "AlarmStatus",
    "ChatterPolicy",
    "ConditionKind",
    "DeadbandUnit",
    "EventCause",
    "Instant",
    "from_epoch_s",
    "to_epoch_s",
]

Instant = datetime | float | int
"""An instant from the caller's clock: an aware ``datetime`` or epoch seconds."""


def to_epoch_s(at: Instant, *, field: str = "at") -> float:
    """Return epoch seconds for an aware datetime or a finite number; raise naming ``field`` otherwise.

    >>> to_epoch_s(datetime(2026, 3, 1, tzinfo=UTC))
    1772323200.0
    >>> to_epoch_s(12.5)
    12.5
    """
    if isinstance(at, datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise AlarmInputError(f"{field}: datetime must be timezone-aware, got naive {at.isoformat()}")
        return at.timestamp()
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise AlarmInputError(f"{field}: expected an aware datetime or finite epoch seconds, got {at!r}")
    return float(at)


def from_epoch_s(epoch_s: float) -> datetime:
    """Return the aware UTC datetime of epoch seconds.

    >>> from_epoch_s(0.0).isoformat()
    '1970-01-01T00:00:00+00:00'
    """
    return datetime.fromtimestamp(epoch_s, UTC)


# --------------------------------------------------------------------------------------------------
# Enumerations


class AlarmPriority(enum.IntEnum):
    """Alarm priority, 1 (critical) to 4 (low); the lower number is more urgent."""

    CRITICAL = 1
    HIGH = 2
    MEDIUM = 3
    LOW = 4

    @classmethod
    def parse(cls, value: str | int) -> AlarmPriority:
        """Return the priority named ``"critical"``...``"low"`` or numbered 1..4.

        >>> AlarmPriority.parse("High"), AlarmPriority.parse(4)
        (<AlarmPriority.HIGH: 2>, <AlarmPriority.LOW: 4>)
        """
        if isinstance(value, AlarmPriority):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                value = int(text)
            else:
                try:
                    return cls[text.upper()]
                except KeyError:
                    raise AlarmInputError(
                        f"priority: expected critical, high, medium, low or 1..4, got {value!r}"
                    ) from None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4:
            raise AlarmInputError(f"priority: expected critical, high, medium, low or 1..4, got {value!r}")
        return cls(value)


class ConditionKind(enum.StrEnum):
    """What an alarm watches, and so how a value is compared with its setpoint."""

    HIHI = "hh"
    """Value at or above the setpoint (high-high limit)."""
    HIGH = "h"
    """Value at or above the setpoint (high limit)."""
    LOW = "l"
    """Value at or below the setpoint (low limit)."""
    LOLO = "ll"
    """Value at or below the setpoint (low-low limit)."""
    RATE_OF_CHANGE = "roc"
    """Absolute rate of change between two samples at or above the setpoint (units per second)."""
    DEVIATION = "deviation"
    """A deviation or anomaly score at or above the setpoint (from the detectors)."""
    NO_DATA = "no_data"
    """No fresh reading: a flag, or the age of the last reading in seconds against the setpoint."""
    DEVICE_OFFLINE = "device_offline"
    """The device session reports the device offline (a flag)."""
    QUOTA = "quota"
    """Share of a carbon quota, percent, at or above the setpoint (or a flag from the quota alerts)."""
    DISPATCH_FAILED = "dispatch_failed"
    """The last dispatch to a point failed (no acknowledgement after retries, refused, read-back
    mismatch, revert failed): a flag, cleared by the next verified write or revert."""

    @property
    def is_low(self) -> bool:
        """Return True when the condition is a value *below* the setpoint."""
        return self in (ConditionKind.LOW, ConditionKind.LOLO)

    @property
    def flag_only(self) -> bool:
        """Return True when only a boolean condition flag can drive the alarm."""
        return self in (ConditionKind.DEVICE_OFFLINE, ConditionKind.DISPATCH_FAILED)


class DeadbandUnit(enum.StrEnum):
    """Unit of a deadband: engineering units of the value, or percent of the setpoint's magnitude."""

    ENGINEERING = "eu"
    PERCENT = "pct"


class AlarmState(enum.StrEnum):
    """The state an operator sees (ISA-18.2 state model, plus the three overrides)."""

    NORMAL = "normal"
    ACTIVE_UNACK = "active_unack"
    ACTIVE_ACK = "active_ack"
    RTN_UNACK = "rtn_unack"
    """Returned to normal before being acknowledged."""
    SHELVED = "shelved"
    SUPPRESSED_BY_DESIGN = "suppressed_by_design"
    OUT_OF_SERVICE = "out_of_service"

    @property
    def ackable(self) -> bool:
        """Return True when an acknowledgement is accepted in this state."""
        return self in (AlarmState.ACTIVE_UNACK, AlarmState.RTN_UNACK)


class EventCause(enum.StrEnum):
    """What made an alarm change: its condition, an operator, the design, or a timer."""

    ACTIVATE = "activate"
    CLEAR = "clear"
    ACKNOWLEDGE = "acknowledge"
    SHELVE = "shelve"
    UNSHELVE = "unshelve"
    SHELVE_EXPIRED = "shelve_expired"
    SUPPRESS = "suppress"
    UNSUPPRESS = "unsuppress"
    REMOVE_FROM_SERVICE = "remove_from_service"
    RETURN_TO_SERVICE = "return_to_service"


# --------------------------------------------------------------------------------------------------
# Errors


class AlarmError(ScadaError):
    """An alarm operation was refused."""


class AlarmStateError(AlarmError):
    """An operation is not allowed in the alarm's current state (the API answers 409)."""

    def __init__(self, alarm_id: str, state: AlarmState, action: str) -> None:
        super().__init__(f"cannot {action} alarm {alarm_id!r} in state {state.name}")
        self.alarm_id = alarm_id
        self.state = state
        self.action = action


class AlarmInputError(AlarmError):
    """A value, time or argument cannot be used; the message names the field."""


# --------------------------------------------------------------------------------------------------
# Definitions and policies

DEFAULT_MESSAGE = "{id}: {kind} alarm, value {value} (setpoint {setpoint})"
"""Message template used when a definition gives none."""
_MESSAGE_FIELDS = frozenset(
    {"id", "value", "setpoint", "kind", "node", "device", "point", "priority", "console", "state"}
)


class _LenientFormatter(string.Formatter):
    """Format spec failures (``{value:.1f}`` with no value yet) fall back to ``str(value)``."""

    def format_field(self, value: Any, format_spec: str) -> str:
        try:
            return str(super().format_field(value, format_spec))
        except (TypeError, ValueError):
            return str(value)


_FORMATTER = _LenientFormatter()


@dataclass(frozen=True, slots=True, kw_only=True)
class AlarmDefinition:
    """One configured alarm: what it watches, where it shows, and how it settles.

    >>> d = AlarmDefinition(id="m1.p:h", point="m1.p", node="ws-a", kind=ConditionKind.HIGH,
    ...                     priority=AlarmPriority.HIGH, setpoint=100.0, deadband=5.0, deadband_unit="pct")
    >>> d.device, d.console, d.deadband_eu
    ('m1', 'ws-a', 5.0)
    """

    id: str
    node: str
    """Hierarchy node id the alarm belongs to (workshop, enterprise...)."""
    kind: ConditionKind
    priority: AlarmPriority
    point: str | None = None
    device: str | None = None
    """Device id; taken from ``point`` (``<device>.<key>``) when not given."""
    console: str = ""
    """Operator console the alarm annunciates on; the node id when not given."""
    setpoint: float | None = None
    deadband: float = 0.0
    deadband_unit: DeadbandUnit = DeadbandUnit.ENGINEERING
    on_delay_s: float = 0.0
    """The condition must hold this long before the alarm activates."""
    off_delay_s: float = 0.0
    """The condition must stay clear this long before the alarm returns to normal."""
    message: str = DEFAULT_MESSAGE
    """``str.format`` template over id, value, setpoint, kind, node, device, point, priority, console,
    state."""

    def __post_init__(self) -> None:
        where = f"alarm {self.id!r}"
        if not isinstance(self.id, str) or not self.id or self.id != self.id.strip() or len(self.id) > 200:
            raise ConfigError(f"alarm {self.id!r}: id: must be a non-empty string without outer spaces")
        if not isinstance(self.node, str) or not self.node:
            raise ConfigError(f"{where}: node: must be a non-empty node id")
        self._coerce_enums(where)
        if self.point is not None and self.device is None:
            try:
                device, _ = split_point_id(self.point)
            except NotFound as err:
                raise ConfigError(f"{where}: point: {err}") from None
            object.__setattr__(self, "device", str(device))
        if not self.console:
            object.__setattr__(self, "console", self.node)
        if self.setpoint is not None:
            setpoint: object = self.setpoint
            if (
                isinstance(setpoint, bool)
                or not isinstance(setpoint, int | float)
                or not math.isfinite(setpoint)
            ):
                raise ConfigError(f"{where}: setpoint: must be a finite number, got {self.setpoint!r}")
            object.__setattr__(self, "setpoint", float(self.setpoint))
        for name in ("deadband", "on_delay_s", "off_delay_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{where}: {name}: must be a finite number >= 0, got {value!r}")
            if value < 0:
                raise ConfigError(f"{where}: {name}: must be >= 0, got {value}")
            object.__setattr__(self, name, float(value))
        if self.deadband_unit is DeadbandUnit.PERCENT and self.setpoint is None and self.deadband:
            raise ConfigError(f"{where}: deadband_unit: pct needs a setpoint")
        if self.kind is ConditionKind.RATE_OF_CHANGE and self.setpoint is not None and self.setpoint < 0:
            raise ConfigError(f"{where}: setpoint: a rate-of-change limit must be >= 0, got {self.setpoint}")
        self._check_message(where)

    def _coerce_enums(self, where: str) -> None:
        try:
            object.__setattr__(self, "kind", ConditionKind(self.kind))
        except ValueError:
            kinds = ", ".join(k.value for k in ConditionKind)
            raise ConfigError(f"{where}: kind: expected one of {kinds}, got {self.kind!r}") from None
        try:
            object.__setattr__(self, "priority", AlarmPriority.parse(self.priority))
        except AlarmInputError as err:
            raise ConfigError(f"{where}: {err}") from None
        try:
            object.__setattr__(self, "deadband_unit", DeadbandUnit(self.deadband_unit))
        except ValueError:
            raise ConfigError(
                f"{where}: deadband_unit: expected eu or pct, got {self.deadband_unit!r}"
            ) from None

    def _check_message(self, where: str) -> None:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(self.message) if name is not None}
        except ValueError as err:
            raise ConfigError(f"{where}: message: {err}") from None
        unknown = sorted(n for n in names if n.split(".")[0].split("[")[0] not in _MESSAGE_FIELDS)
        if unknown or "" in names:
            raise ConfigError(
                f"{where}: message: unknown field(s) {unknown or ['{}']}; use {sorted(_MESSAGE_FIELDS)}"
            )

    @property
    def deadband_eu(self) -> float:
        """Return the deadband in engineering units (percent deadbands scale |setpoint|)."""
        if self.deadband_unit is DeadbandUnit.PERCENT:
            return abs(self.setpoint or 0.0) * self.deadband / 100.0
        return self.deadband

    def render(self, value: float | bool | None, state: AlarmState) -> str:
        """Return the message for a value and state.

        >>> AlarmDefinition(id="t", node="n", kind="h", priority=1, setpoint=80.0,
        ...                 message="{id} {value:.1f} > {setpoint:g}").render(81.25, AlarmState.NORMAL)
        't 81.2 > 80'
        """
        fields: dict[str, Any] = {
            "id": self.id,
            "value": value,
            "setpoint": self.setpoint,
            "kind": self.kind.value,
            "node": self.node,
            "device": self.device,
            "point": self.point,
            "priority": self.priority.name.lower(),
            "console": self.console,
            "state": state.value,
        }
        return _FORMATTER.vformat(self.message, (), fields)

    def to_dict(self) -> dict[str, Any]:
        """Return the definition as JSON-able data (the shape :meth:`from_dict` reads)."""
        return {
            "id": self.id,
            "node": self.node,
            "kind": self.kind.value,
            "priority": self.priority.name.lower(),
            "point": self.point,
            "device": self.device,
            "console": self.console,
            "setpoint": self.setpoint,
            "deadband": self.deadband,
            "deadband_unit": self.deadband_unit.value,
            "on_delay_s": self.on_delay_s,
            "off_delay_s": self.off_delay_s,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlarmDefinition:
        """Return a definition from configuration data; unknown keys are a :class:`ConfigError`."""
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"alarm {data.get('id')!r}: unknown field(s) {unknown}")
        missing = sorted(k for k in ("id", "node", "kind", "priority") if k not in data)
        if missing:
            raise ConfigError(f"alarm {data.get('id')!r}: missing field(s) {missing}")
        return cls(**dict(data))


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatterPolicy:
    """When an alarm is chattering, and what to do about it.

    An alarm that activates ``activations`` times or more within ``window_s`` seconds is flagged
    chattering. With ``auto_shelve_s`` set, the engine also shelves it for that long (by ``system``).
    """

    activations: int = 3
    window_s: float = 60.0
    auto_shelve_s: float | None = None

    def __post_init__(self) -> None:
        if self.activations < 2:
            raise ConfigError(f"chatter policy: activations: must be >= 2, got {self.activations}")
        if not self.window_s > 0:
            raise ConfigError(f"chatter policy: window_s: must be > 0, got {self.window_s}")
        if self.auto_shelve_s is not None and not self.auto_shelve_s > 0:
            raise ConfigError(f"chatter policy: auto_shelve_s: must be > 0, got {self.auto_shelve_s}")


# --------------------------------------------------------------------------------------------------
# Events and status


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat()


def _parse_ts(data: Mapping[str, Any], key: str) -> datetime:
    raw = data[key]
    if not isinstance(raw, str):
        raise DecodeError(f"alarm event: {key}: expected an ISO 8601 string, got {raw!r}")
    try:
        ts = datetime.fromisoformat(raw)
    except ValueError as err:
        raise DecodeError(f"alarm event: {key}: {err}") from None
    if ts.tzinfo is None:
        raise DecodeError(f"alarm event: {key}: timestamp must carry a UTC offset, got {raw!r}")
    return ts.astimezone(UTC)


def _parse_value(raw: Any) -> float | bool | None:
    if raw is None or isinstance(raw, bool):
        return raw
    if isinstance(raw, int | float):
        return float(raw)
    raise DecodeError(f"alarm event: value: expected a number, a boolean or null, got {raw!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AlarmEvent:
    """One transition of one alarm: the record the ``alarms`` stream carries and the store keeps.

    ``seq`` increases by one per event across the engine (and survives a restore), so ``key`` is
    unique and redelivered events can be stored idempotently.
    """

    seq: int
    alarm_id: str
    from_state: AlarmState
    to_state: AlarmState
    at: datetime
    cause: EventCause
    by: str
    """``system`` for the condition and timers, else the user (or design reason source)."""
    comment: str
    value: float | bool | None
    """The last value (or flag) evaluated for the alarm when the event happened."""
    message: str
    priority: AlarmPriority
    console: str
    node: str
    device: str | None
    point: str | None
    group: str | None
    """Alarm id of the group head this alarm is shown under during a flood (None: shown by itself)."""
    annunciated: bool
    """True when this event puts a new alarm on the console (an activation that was not grouped)."""
    chattering: bool
    shelved_until: datetime | None

    @property
    def key(self) -> str:
        """Return a unique, stable id for idempotent storage."""
        return f"{self.alarm_id}#{self.seq}"

    @property
    def is_activation(self) -> bool:
        """Return True when the alarm (re)appears as active and unacknowledged (counted in KPIs)."""
        return self.to_state is AlarmState.ACTIVE_UNACK and self.from_state is not AlarmState.ACTIVE_UNACK

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-able data (ISO 8601 times, enum values); :meth:`from_dict` reads it back."""
        return {
            "seq": self.seq,
            "alarm_id": self.alarm_id,
            "from_state": self.from_state.value,
            "to_state": self.to_state.value,
            "at": self.at.isoformat(),
            "cause": self.cause.value,
            "by": self.by,
            "comment": self.comment,
            "value": self.value,
            "message": self.message,
            "priority": int(self.priority),
            "console": self.console,
            "node": self.node,
            "device": self.device,
            "point": self.point,
            "group": self.group,
            "annunciated": self.annunciated,
            "chattering": self.chattering,
            "shelved_until": _iso(self.shelved_until),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlarmEvent:
        """Return the event encoded by :meth:`to_dict`; raise :class:`DecodeError` naming the field."""
        try:
            seq = data["seq"]
            if isinstance(seq, bool) or not isinstance(seq, int):
                raise DecodeError(f"alarm event: seq: expected an integer, got {seq!r}")
            shelved = data["shelved_until"]
            return cls(
                seq=seq,
                alarm_id=str(data["alarm_id"]),
                from_state=AlarmState(data["from_state"]),
                to_state=AlarmState(data["to_state"]),
                at=_parse_ts(data, "at"),
                cause=EventCause(data["cause"]),
                by=str(data["by"]),
                comment=str(data["comment"]),
                value=_parse_value(data["value"]),
                message=str(data["message"]),
                priority=AlarmPriority.parse(data["priority"]),
                console=str(data["console"]),
                node=str(data["node"]),
                device=None if data["device"] is None else str(data["device"]),
                point=None if data["point"] is None else str(data["point"]),
                group=None if data["group"] is None else str(data["group"]),
                annunciated=bool(data["annunciated"]),
                chattering=bool(data["chattering"]),
                shelved_until=None if shelved is None else _parse_ts(data, "shelved_until"),
            )
        except KeyError as err:
            raise DecodeError(f"alarm event: missing field {err.args[0]!r}") from None
        except (ValueError, AlarmInputError) as err:
            raise DecodeError(f"alarm event {data.get('alarm_id')!r}: {err}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class AlarmStatus:
    """The current state of one alarm, as the API and the console show it."""

    alarm_id: str
    state: AlarmState
    since: datetime
    """When the alarm entered ``state``."""
    condition_active: bool
    """The (debounced) condition, also while the alarm is shelved, suppressed or out of service."""
    acknowledged: bool
    active_since: datetime | None
    last_value: float | bool | None
    priority: AlarmPriority
    console: str
    group: str | None
    chattering: bool
    shelved_until: datetime | None
    shelved_by: str | None
    shelve_reason: str | None
    suppressed_reason: str | None
    out_of_service_reason: str | None
