"""The shared kernel: ids, units, quality, readings, commands, hierarchy, errors and seams.

Every package may import this module; it imports only the standard library and does no I/O.
Values are frozen, slotted dataclasses so they can cross task and process boundaries safely.

Error tree
----------
::

    ScadaError                      anything this product raises on purpose
    ├── ConfigError                 a site file or setting is invalid (names the bad field)
    ├── ServiceError                PostgreSQL, Redis or MQTT cannot be reached or started
    ├── DeviceError                 a device could not be talked to; the session backs off
    │   ├── DeviceUnavailable       connection refused, reset or timed out
    │   ├── DeviceProtocolError     the device answered, but not as the protocol says
    │   └── RequestRejected         refused before sending (unknown point, value out of range)
    ├── DecodeError                 a stream entry or payload cannot be decoded (goes to dead-letter)
    └── NotFound                    an id that does not exist (the API answers 404)

Conventions
-----------
- Timestamps are timezone-aware UTC ``datetime`` objects.
- Units live in point configuration (:class:`Unit`) and in field names (``power_kw``, ``timeout_s``).
- A point id is ``"<device id>.<point key>"``; both parts use ``[a-z0-9_-]``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NewType, Protocol, runtime_checkable

__all__ = [
    "ID_PATTERN",
    "UTC",
    "Acquisition",
    "Availability",
    "AvailabilityEvent",
    "Carrier",
    "Clock",
    "Command",
    "CommandResult",
    "CommandStatus",
    "ConfigError",
    "DeadLetterSink",
    "DecodeError",
    "DeviceError",
    "DeviceId",
    "DeviceKind",
    "DeviceProtocolError",
    "DeviceUnavailable",
    "Driver",
    "EventSink",
    "Handler",
    "LedgerRole",
    "Node",
    "NodeId",
    "NodeLevel",
    "NotFound",
    "PointId",
    "PointKind",
    "Priority",
    "Quality",
    "QualityCode",
    "Reading",
    "ReadingSink",
    "ReadingStore",
    "RequestRejected",
    "ScadaError",
    "ServiceError",
    "StreamName",
    "SubscriptionDriver",
    "Unit",
    "make_point_id",
    "split_point_id",
    "utc_now",
]

ID_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
"""Allowed shape of node, device and point-key ids: lowercase, URL- and SQL-safe."""
_POINT_ID_RE = re.compile(rf"^({ID_PATTERN})\.({ID_PATTERN})$")

NodeId = NewType("NodeId", str)
DeviceId = NewType("DeviceId", str)
PointId = NewType("PointId", str)


def make_point_id(device: str, key: str) -> PointId:
    """Join a device id and a point key into a point id.

    >>> make_point_id("a1-main-meter", "active_power_kw")
    'a1-main-meter.active_power_kw'
    """
    return PointId(f"{device}.{key}")


def split_point_id(point: str) -> tuple[DeviceId, str]:
    """Split a point id into its device id and point key; raise :class:`NotFound` if malformed.

    >>> split_point_id("a1-main-meter.active_power_kw")
    ('a1-main-meter', 'active_power_kw')
    """
    match = _POINT_ID_RE.match(point)
    if match is None:
        raise NotFound(f"malformed point id {point!r}: expected '<device>.<key>'")
    return DeviceId(match.group(1)), match.group(2)


def utc_now() -> datetime:
    """Return the current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------------
# Enumerations


class Unit(enum.StrEnum):
    """Engineering units, spelled as operators read them."""

    KW = "kW"
    KWH = "kWh"
    KVAR = "kvar"
    KVA = "kVA"
    V = "V"
    A = "A"
    HZ = "Hz"
    DEG_C = "degC"
    PERCENT = "%"
    NM3 = "Nm3"
    NM3_PER_H = "Nm3/h"
    GJ = "GJ"
    GJ_PER_H = "GJ/h"
    T = "t"
    T_PER_H = "t/h"
    W_PER_M2 = "W/m2"
    BAR = "bar"
    DIMENSIONLESS = "1"


class PointKind(enum.StrEnum):
    """What a point measures; decides how later stages (ledger, rollups) treat its values."""

    POWER = "power"  # instantaneous power (kW): integrated over time for energy
    ENERGY_COUNTER = "energy_counter"  # monotonically increasing counter (kWh, GJ), may wrap or reset
    GAS_FLOW = "gas_flow"  # instantaneous flow (Nm3/h)
    GAS_COUNTER = "gas_counter"  # cumulative volume (Nm3)
    FUEL_COUNTER = "fuel_counter"  # cumulative mass (t) of a liquid or solid fuel
    HEAT_FLOW = "heat_flow"  # instantaneous heat (GJ/h)
    TEMPERATURE = "temperature"
    VOLTAGE = "voltage"
    CURRENT = "current"
    FREQUENCY = "frequency"
    POWER_FACTOR = "power_factor"
    STATE_OF_CHARGE = "state_of_charge"
    IRRADIANCE = "irradiance"
    PRESSURE = "pressure"
    SETPOINT = "setpoint"  # writable target (dispatch writes these)
    STATUS = "status"  # discrete state (on/off, run/stop, fault codes)


class Carrier(enum.StrEnum):
    """The energy carrier a point measures, which picks its emission factor in the ledger."""

    ELECTRICITY = "electricity"
    PV = "pv"  # on-site photovoltaic generation: zero emission
    STORAGE = "storage"  # battery throughput: carries the intensity of what charged it
    NATURAL_GAS = "natural_gas"
    DIESEL = "diesel"
    GASOLINE = "gasoline"
    FUEL_OIL = "fuel_oil"
    LPG = "lpg"
    COAL = "coal"
    COKE = "coke"
    HEAT = "heat"  # purchased heat or steam
    NONE = "none"  # not an energy measurement (temperature, status...)


class LedgerRole(enum.StrEnum):
    """How the carbon ledger books a point's energy (docs/carbon-ledger.md).

    Energy balances per carrier within a *balance node* (the point's enterprise): what was bought
    (``supply``), made on site (``generation``) and taken from storage (``discharge``) covers what was
    used (``consumption``), put into storage (``charge``) and lost or unmetered.
    """

    CONSUMPTION = "consumption"  # a (sub-)meter of what its node uses: booked to that node
    SUPPLY = "supply"  # the boundary meter of purchased energy: the balance node's whole Scope 1/2
    GENERATION = "generation"  # on-site generation (PV): zero emission, lowers the supply intensity
    CHARGE = "charge"  # energy into storage: carries the intensity of the supply mix at that hour
    DISCHARGE = "discharge"  # energy out of storage: carries the intensity of what charged it
    NONE = "none"  # not booked (a power reading shadowed by a counter, a reactive power...)


class DeviceKind(enum.StrEnum):
    """What a device is; simulators pick their physics by it and the cockpit its icon."""

    POWER_METER = "power_meter"
    PV_INVERTER = "pv_inverter"
    BATTERY = "battery"
    CHILLER = "chiller"
    LIGHTING = "lighting"
    AIR_COMPRESSOR = "air_compressor"
    GAS_METER = "gas_meter"
    BOILER = "boiler"
    HEAT_METER = "heat_meter"
    PRODUCTION_LINE = "production_line"
    WEATHER_STATION = "weather_station"


class NodeLevel(enum.StrEnum):
    """Levels of the account hierarchy, from the top down."""

    GROUP = "group"  # 集团
    PARK = "park"  # 园区
    ENTERPRISE = "enterprise"  # 企业
    WORKSHOP = "workshop"  # 车间

    @property
    def depth(self) -> int:
        """Return 0 for a group, 3 for a workshop.

        >>> NodeLevel.WORKSHOP.depth
        3
        """
        return list(NodeLevel).index(self)


class QualityCode(enum.IntEnum):
    """Coarse quality, ordered so that ``min()`` of inputs gives the quality of a derived value."""

    BAD = 0
    UNCERTAIN = 1
    GOOD = 2


class Priority(enum.IntEnum):
    """Command priority: the lowest number wins when the dispatcher merges writes to one point."""

    SAFETY = 0
    OPERATOR = 10
    SCHEDULE = 20
    OPTIMISER = 30


class Availability(enum.StrEnum):
    """Device communication state as seen by its session."""

    ONLINE = "online"
    OFFLINE = "offline"
    STALE = "stale"


class Acquisition(enum.StrEnum):
    """How a driver gets values: the session asks at a fixed rate, or the device pushes them."""

    POLL = "poll"
    SUBSCRIBE = "subscribe"


class CommandStatus(enum.StrEnum):
    """Outcome of one write, as the command path reports it to the dispatcher and the operator."""

    VERIFIED = "verified"
    """The device acknowledged and a read-back shows the requested value."""
    UNVERIFIED = "unverified"
    """The device acknowledged but the value could not be read back; the reason says why."""
    MISMATCH = "mismatch"
    """The device acknowledged, but the read-back shows another value (clamped, ignored, overridden)."""
    REJECTED = "rejected"
    """The device refused the write (exception response, bad status code, negative response)."""
    TIMEOUT = "timeout"
    """No acknowledgement within the timeout: the write may or may not have been applied."""
    FAILED = "failed"
    """Nothing was sent: unknown or read-only point, value out of range, device offline."""

    @property
    def applied(self) -> bool:
        """Return True only when the device is known to hold the requested value."""
        return self is CommandStatus.VERIFIED


class StreamName(enum.StrEnum):
    """The Redis streams of the bus (see docs/architecture.md)."""

    READINGS = "readings"
    EVENTS = "events"
    ALARMS = "alarms"
    COMMANDS = "commands"
    COMMAND_RESULTS = "command_results"
    DEADLETTER = "deadletter"


# --------------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class Quality:
    """Quality of one value: a code and, unless good, the reason an operator should read.

    >>> Quality.bad("timeout after 1.0 s").is_good
    False
    >>> str(Quality.good())
    'good'
    """

    code: QualityCode
    reason: str = ""

    @classmethod
    def good(cls) -> Quality:
        """Return the shared good quality."""
        return _GOOD

    @classmethod
    def uncertain(cls, reason: str) -> Quality:
        """Return an uncertain quality with its reason."""
        return cls(QualityCode.UNCERTAIN, reason)

    @classmethod
    def bad(cls, reason: str) -> Quality:
        """Return a bad quality with its reason."""
        return cls(QualityCode.BAD, reason)

    @property
    def is_good(self) -> bool:
        """Return True when the value can be used as measured."""
        return self.code is QualityCode.GOOD

    def __str__(self) -> str:
        name = self.code.name.lower()
        return f"{name}: {self.reason}" if self.reason else name


_GOOD = Quality(QualityCode.GOOD)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """One value of one point at one instant; ``value`` is None only when quality is bad."""

    point: PointId
    ts: datetime
    value: float | None
    quality: Quality = field(default_factory=Quality.good)

    def __post_init__(self) -> None:
        if self.ts.tzinfo is None:
            raise ValueError(f"reading for {self.point}: timestamp must be timezone-aware")
        if self.value is None and self.quality.code is not QualityCode.BAD:
            raise ValueError(f"reading for {self.point}: a missing value must have bad quality")


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A request to write ``value`` to a point, with who asked, why and until when it holds."""

    point: PointId
    value: float
    priority: Priority
    source: str
    reason: str
    correlation_id: str
    hold_until: datetime | None = None
    fence: int | None = None
    """The control leader's fencing token (:mod:`scada.leader`); gateways refuse a stale one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandResult:
    """What became of one write: acknowledged or not, and what the device holds afterwards."""

    correlation_id: str
    point: PointId
    requested: float
    status: CommandStatus
    ts: datetime
    """When the outcome was known."""
    readback: float | None = None
    """The value read back after the write, when there was one."""
    reason: str = ""
    """Why the status is not VERIFIED, in words an operator can act on."""
    elapsed_ms: float = 0.0
    """Time from sending the write to knowing the outcome."""

    @classmethod
    def of(
        cls,
        command: Command,
        status: CommandStatus,
        *,
        ts: datetime,
        reason: str = "",
        readback: float | None = None,
        elapsed_ms: float = 0.0,
    ) -> CommandResult:
        """Return the result of ``command``: its correlation id, point and value carried over."""
        return cls(
            correlation_id=command.correlation_id,
            point=command.point,
            requested=command.value,
            status=status,
            ts=ts,
            readback=readback,
            reason=reason,
            elapsed_ms=elapsed_ms,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AvailabilityEvent:
    """A device's communication state changed."""

    device: DeviceId
    ts: datetime
    availability: Availability
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    """One node of the account hierarchy (group, park, enterprise or workshop)."""

    id: NodeId
    name: str
    level: NodeLevel
    parent: NodeId | None


# --------------------------------------------------------------------------------------------------
# Errors


class ScadaError(Exception):
    """Base of every error this product raises on purpose."""


class ConfigError(ScadaError):
    """A site file or setting is invalid; the message names the file and the field."""

    @classmethod
    def at(cls, source: str, loc: Sequence[int | str], document: Any, message: str) -> ConfigError:
        """Return the error of one validation failure, naming the field the way users wrote it.

        ``loc`` is a validator's location (pydantic's ``error["loc"]``) in ``document``, the parsed
        YAML; list items are named by their ``id`` or ``key``:

        >>> doc = {"devices": [{"id": "m1", "modbus": {"port": 0}}]}
        >>> str(ConfigError.at("plant.yaml", ("devices", 0, "modbus", "port"), doc, "Value error, too small"))
        'plant.yaml: devices[0] (m1).modbus.port: too small'
        """
        parts: list[str] = []
        node: Any = document
        for item in loc:
            if isinstance(item, str) and _VALIDATOR_STEP_RE.match(item):
                continue  # validator wrapper names in locations carry no information for users
            if isinstance(item, int):
                parts.append(f"[{item}]")
                node = node[item] if isinstance(node, list) and item < len(node) else None
                name = (node.get("id") or node.get("key")) if isinstance(node, dict) else None
                if isinstance(name, str):
                    parts.append(f" ({name})" if name.isprintable() else f" ({name!r})")  # one line
            else:
                parts.append(f".{item}" if parts else str(item))
                node = node.get(item) if isinstance(node, dict) else None
        # Users write YAML lists; validators speak of the tuples we freeze them into.
        clean = message.removeprefix("Value error, ").replace("Tuple should", "List should")
        return cls(f"{source}: {''.join(parts) or 'document'}: {clean}")

    @classmethod
    def of_yaml(cls, source: str, err: Exception) -> ConfigError:
        """Return the error of a YAML document that does not parse, with its line and column.

        ``err`` is PyYAML's ``YAMLError`` (read by duck typing: the kernel does not import yaml).
        """
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        position, reason = getattr(err, "position", None), getattr(err, "reason", None)
        if mark is None and isinstance(position, int) and reason:  # ReaderError: a character YAML refuses
            problem = f"{reason} (character {position + 1})"
        return cls(f"{source}{where}: not valid YAML: {problem}")


_VALIDATOR_STEP_RE = re.compile(r"^(function-after|function-before|function-wrap|tagged-union)\[.*\]$")


class ServiceError(ScadaError):
    """A backing service (PostgreSQL, Redis, MQTT) cannot be reached or started."""


class DeviceError(ScadaError):
    """A device could not be talked to; the session marks it offline and backs off."""


class DeviceUnavailable(DeviceError):
    """Connection refused, reset or timed out."""


class DeviceProtocolError(DeviceError):
    """The device answered, but not as the protocol says (exception code, bad frame)."""


class RequestRejected(DeviceError):
    """A request was refused before anything was sent: unknown or read-only point, unencodable value.

    The device is not to blame and stays online; a command that meets this was never applied.
    """


class DecodeError(ScadaError):
    """A stream entry or payload cannot be decoded; the entry goes to the dead-letter stream."""


class NotFound(ScadaError):
    """An id (point, device, node) that does not exist."""


# --------------------------------------------------------------------------------------------------
# Seams


@runtime_checkable
class Clock(Protocol):
    """Time as the rest of the system sees it, so tests and simulations can run on fake time."""

    def now(self) -> datetime:
        """Return the current wall-clock time (UTC, aware)."""

    def monotonic(self) -> float:
        """Return seconds on a clock that never goes backwards."""

    def sleep(self, delay_s: float) -> Awaitable[None]:
        """Wait ``delay_s`` seconds of this clock's time."""


class Driver(Protocol):
    """Translate between one device's wire protocol and readings; sessions supervise it.

    A driver never retries or reconnects on its own: it raises :class:`DeviceError` and the
    session decides what to do. Every network call of a driver is bounded by the device's timeout.
    """

    @property
    def device(self) -> DeviceId:
        """Return the id of the device this driver talks to."""

    @property
    def acquisition(self) -> Acquisition:
        """Return how the session acquires values.

        POLL: the session calls :meth:`read` at a fixed rate. SUBSCRIBE: the driver is a
        :class:`SubscriptionDriver` whose device pushes values.
        """

    async def connect(self) -> None:
        """Open the connection; raise :class:`DeviceUnavailable` if the device cannot be reached."""

    async def read(self) -> Sequence[Reading]:
        """Read every configured point once; per-point problems become bad-quality readings."""

    async def write(
        self, point: PointId, value: float, *, correlation_id: str = "", hold_until: datetime | None = None
    ) -> None:
        """Write one value and return once the device has acknowledged it.

        Raise :class:`DeviceError` if the device refuses (``DeviceProtocolError``) or cannot be
        reached or does not answer in time (``DeviceUnavailable``). ``correlation_id`` travels to
        devices whose protocol carries one (MQTT); others ignore it. ``hold_until`` is the end of a
        dispatch's hold, for protocols that carry an interval (an OpenADR event); others ignore it:
        the dispatcher writes the previous value back at that time.
        """

    async def read_back(self, point: PointId) -> float:
        """Read one point now and return its engineering value, to verify a write.

        Raise :class:`DeviceError` when it cannot be read (the reason ends up in the command result).
        """

    async def close(self) -> None:
        """Close the connection; safe to call when not connected."""


@runtime_checkable
class SubscriptionDriver(Driver, Protocol):
    """A driver whose device pushes values (OPC UA monitored items, MQTT telemetry)."""

    async def receive(self) -> Sequence[Reading]:
        """Wait for the next batch the device pushed and return it.

        An empty batch means "the device is alive but nothing changed" (an OPC UA keep-alive, an
        MQTT heartbeat), so the session does not call it stale. Raise :class:`DeviceUnavailable`
        when the connection is lost. The session bounds the wait with its staleness timeout.
        """


class ReadingSink(Protocol):
    """Where sessions put readings (the Redis ``readings`` stream in production)."""

    async def publish(self, readings: Sequence[Reading]) -> None:
        """Accept a batch; must not block for long: a slow bus is handled by the sink's policy."""


class DeadLetterSink(Protocol):
    """Where input that cannot be used goes, with the reason (the Redis ``deadletter`` stream).

    Drivers call it for messages that belong to no point or cannot be parsed (a non-JSON MQTT
    payload, a message on an unknown topic), so nothing is lost silently and nothing crashes.
    """

    def reject(self, *, origin: str, payload: bytes, reason: str) -> None:
        """Record one rejected input; never blocks (a full buffer drops the oldest and counts it)."""


class EventSink(Protocol):
    """Where sessions report device availability (the Redis ``events`` stream in production)."""

    async def publish_event(self, event: AvailabilityEvent) -> None:
        """Accept one availability change."""


class ReadingStore(Protocol):
    """Read access to stored readings, whichever storage engine is underneath."""

    async def latest(self, point: PointId) -> Reading | None:
        """Return the newest stored reading of a point, or None if it has none yet."""

    async def history(
        self, point: PointId, start: datetime, end: datetime, *, limit: int
    ) -> Sequence[Reading]:
        """Return stored readings with ``start <= ts < end``, oldest first, at most ``limit``."""


Handler = Callable[[Sequence[Reading]], Awaitable[None]]
"""A stage's batch handler: apply the batch's effect, idempotently, then return."""
