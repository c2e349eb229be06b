"""The site file: hierarchy, devices and points, validated once at load.

A site file is YAML (see ``examples/plant.yaml`` and docs/configuration.md). :func:`load_site` turns
it into a frozen :class:`SiteConfig` or raises :class:`~scada.model.ConfigError` naming the file and
the path of the first bad field, e.g. ``plant.yaml: devices[3].points[1].modbus.type: ...``.

Device templates keep a site with dozens of identical meters short: a device names a template and
inherits its points (and may add its own). After loading, every device carries its full point list;
``SiteConfig.model_dump(mode="json")`` is the *normalized site document* that the simulators read.
"""

from __future__ import annotations

import enum
import itertools
import re
import zoneinfo
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anomaly.detectors import DetectorSpec
from control_engine.control_config import ControlConfig, parse_control
from control_engine.factors import NATIONAL, FactorLibrary
from control_engine.notify import NotifyConfig
from protocols.modbus.config import ModbusDeviceConfig, ModbusPointConfig
from protocols.mqtt.config import MqttDeviceConfig, MqttPointConfig
from protocols.opcua.config import OpcUaDeviceConfig, OpcUaPointConfig
from protocols.openadr.config import OpenAdrDeviceConfig, OpenAdrPointConfig
from scada.model import (
    ID_PATTERN,
    Carrier,
    ConfigError,
    DeviceId,
    DeviceKind,
    LedgerRole,
    NodeId,
    NodeLevel,
    PointId,
    PointKind,
    Unit,
    make_point_id,
)

__all__ = [
    "DEFAULT_RETENTION",
    "CarbonConfig",
    "DeviceConfig",
    "DeviceTemplate",
    "NodeConfig",
    "PointAlarmConfig",
    "PointAnomalyConfig",
    "PointConfig",
    "Protocol",
    "RetentionClassConfig",
    "SimulationConfig",
    "SiteConfig",
    "SiteInfo",
    "TenantConfig",
    "load_site",
    "parse_site",
]

Id = Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]

_UNITS_BY_KIND: Mapping[PointKind, frozenset[Unit]] = {
    PointKind.POWER: frozenset({Unit.KW, Unit.KVAR, Unit.KVA}),
    PointKind.ENERGY_COUNTER: frozenset({Unit.KWH, Unit.GJ}),
    PointKind.GAS_FLOW: frozenset({Unit.NM3_PER_H}),
    PointKind.GAS_COUNTER: frozenset({Unit.NM3}),
    PointKind.FUEL_COUNTER: frozenset({Unit.T}),
    PointKind.HEAT_FLOW: frozenset({Unit.GJ_PER_H, Unit.T_PER_H}),
    PointKind.TEMPERATURE: frozenset({Unit.DEG_C}),
    PointKind.VOLTAGE: frozenset({Unit.V}),
    PointKind.CURRENT: frozenset({Unit.A}),
    PointKind.FREQUENCY: frozenset({Unit.HZ}),
    PointKind.POWER_FACTOR: frozenset({Unit.DIMENSIONLESS}),
    PointKind.STATE_OF_CHARGE: frozenset({Unit.PERCENT}),
    PointKind.IRRADIANCE: frozenset({Unit.W_PER_M2}),
    PointKind.PRESSURE: frozenset({Unit.BAR}),
    PointKind.SETPOINT: frozenset(Unit),
    PointKind.STATUS: frozenset({Unit.DIMENSIONLESS}),
}
"""Units each point kind may be measured in: a kWh counter configured as kW is a typo, not a choice."""

_KINDS_NEEDING_CARRIER = frozenset(
    {
        PointKind.ENERGY_COUNTER,
        PointKind.GAS_FLOW,
        PointKind.GAS_COUNTER,
        PointKind.FUEL_COUNTER,
        PointKind.HEAT_FLOW,
    }
)


_COUNTING_KINDS = frozenset({PointKind.ENERGY_COUNTER, PointKind.GAS_COUNTER, PointKind.FUEL_COUNTER})
_ENERGY_KINDS = _COUNTING_KINDS | {PointKind.POWER, PointKind.GAS_FLOW, PointKind.HEAT_FLOW}


class Protocol(enum.StrEnum):
    """Southbound protocols a device can speak."""

    MODBUS_TCP = "modbus_tcp"
    OPCUA = "opcua"
    MQTT = "mqtt"
    OPENADR = "openadr"
    """An external EMS that speaks OpenADR 2.0b as a VEN; the gateway serves it a VTN."""

    @property
    def section(self) -> str:
        """Return the name of the device and point section this protocol needs."""
        return {"modbus_tcp": "modbus", "opcua": "opcua", "mqtt": "mqtt", "openadr": "openadr"}[self.value]


_SECTIONS = tuple(protocol.section for protocol in Protocol)
"""Every protocol's section name: a device or point may carry only its own protocol's."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SiteInfo(_Frozen):
    """The site as a whole."""

    id: Id
    name: Annotated[str, Field(min_length=1)]
    timezone: str = "Asia/Shanghai"
    """IANA zone the cockpit shows times in and that quota months follow."""

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


class NodeConfig(_Frozen):
    """One node of the hierarchy and its children, one level deeper each."""

    id: Id
    name: Annotated[str, Field(min_length=1)]
    level: NodeLevel
    children: tuple[NodeConfig, ...] = ()


DEFAULT_RETENTION = "default"
"""The retention class of a point that names none; the site always has one by this name."""


class RetentionClassConfig(_Frozen):
    """How long one class of points keeps each resolution, in days; None keeps it for ever."""

    raw_days: Annotated[int, Field(ge=1)] | None = 30
    rollup_1m_days: Annotated[int, Field(ge=1)] | None = 365
    rollup_15m_days: Annotated[int, Field(ge=1)] | None = 1095
    rollup_1h_days: Annotated[int, Field(ge=1)] | None = None


class PointAlarmConfig(_Frozen):
    """A limit alarm on a point, in the ISA-18.2 manner (docs/alarms.md)."""

    kind: Literal["hh", "h", "l", "ll", "roc", "no_data"]
    """High-high, high, low, low-low limit; rate of change (units per second); no data (age in s)."""
    setpoint: Annotated[float, Field(allow_inf_nan=False)]
    priority: Literal["critical", "high", "medium", "low"] = "medium"
    deadband: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """The alarm clears only this far back on the safe side of the setpoint."""
    deadband_unit: Literal["eu", "pct"] = "eu"
    """Engineering units of the point, or percent of the setpoint."""
    on_delay_s: Annotated[float, Field(ge=0, le=86_400)] = 0.0
    off_delay_s: Annotated[float, Field(ge=0, le=86_400)] = 0.0
    message: Annotated[str, Field(min_length=1, max_length=500)] | None = None
    """``str.format`` template over id, value, setpoint, kind, node, device, point, priority, state."""


class PointAnomalyConfig(_Frozen):
    """An online anomaly detector on a point (docs/anomaly-detection.md) and the alarm it raises."""

    detector: Mapping[str, Any] = Field(default_factory=lambda: {"kind": "ensemble"})
    """Detector spec: ``kind`` (ensemble, forecast, hst, robust_z, limits...) and its parameters."""
    priority: Literal["critical", "high", "medium", "low"] = "medium"
    on_delay_s: Annotated[float, Field(ge=0, le=86_400)] = 0.0
    off_delay_s: Annotated[float, Field(ge=0, le=86_400)] = 60.0

    @field_validator("detector")
    @classmethod
    def _check_detector(cls, value: Mapping[str, Any]) -> Mapping[str, Any]:
        DetectorSpec.from_mapping(value)  # ValueError names the bad field of the spec
        return dict(value)


class PointConfig(_Frozen):
    """One measured or writable value of a device."""

    key: Id
    name: str = ""
    """Display name; the key when empty."""
    kind: PointKind
    unit: Unit
    carrier: Carrier = Carrier.NONE
    scale: float = 1.0
    """Engineering value = raw value x scale + offset."""
    offset: float = 0.0
    writable: bool = False
    modbus: ModbusPointConfig | None = None
    opcua: OpcUaPointConfig | None = None
    mqtt: MqttPointConfig | None = None
    """Payload field of an MQTT point; the point key when absent."""
    openadr: OpenAdrPointConfig | None = None
    """What a point of an OpenADR device maps to: an event signal, a status, or a reported value."""
    retention: Id = DEFAULT_RETENTION
    """Name of a class in the site's ``retention`` section."""
    stuck_after_s: Annotated[float, Field(gt=0, le=86_400)] | None = None
    """A value that should keep moving (a noisy power, a running counter) and has not changed for
    this long is reported with uncertain quality ("stuck"); None disables the check."""
    write_tolerance: Annotated[float, Field(ge=0)] | None = None
    """How far a read-back may differ from the written value and still verify the write; by default
    half a raw step (``abs(scale) / 2``) plus a relative 1e-6."""
    alarms: tuple[PointAlarmConfig, ...] = ()
    """Limit alarms on the point's value."""
    anomaly: PointAnomalyConfig | None = None
    """An online anomaly detector; it raises a ``deviation`` alarm while it flags an anomaly."""
    ledger: LedgerRole | None = None
    """How the carbon ledger books this point (docs/carbon-ledger.md); by default ``generation`` for
    PV, ``consumption`` for other energy counters and flows, ``none`` otherwise. A storage counter
    must say ``charge`` or ``discharge``; a boundary meter of purchased energy says ``supply``."""

    @model_validator(mode="after")
    def _check_point(self) -> Self:
        if self.unit not in _UNITS_BY_KIND[self.kind]:
            allowed = ", ".join(sorted(u.value for u in _UNITS_BY_KIND[self.kind]))
            raise ValueError(
                f"unit {self.unit.value!r} does not fit kind {self.kind.value!r} (use {allowed})"
            )
        if self.kind in _KINDS_NEEDING_CARRIER and self.carrier is Carrier.NONE:
            raise ValueError(f"a {self.kind.value} point needs a carrier (electricity, natural_gas, heat...)")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        if self.ledger not in (None, LedgerRole.NONE) and (
            self.kind not in _ENERGY_KINDS or self.carrier is Carrier.NONE
        ):
            raise ValueError(
                f"ledger: {self.ledger.value} needs an energy point (kind power, energy, gas, fuel or heat "
                "with a carrier)"
            )
        if self.carrier is Carrier.STORAGE and self.kind in _COUNTING_KINDS and self.ledger is None:
            raise ValueError("a storage counter needs 'ledger: charge' or 'ledger: discharge'")
        if self.writable and self.modbus is not None and not self.modbus.table.is_writable:
            raise ValueError(f"writable point in the read-only table {self.modbus.table.value!r}")
        return self

    def verify_tolerance(self, value: float) -> float:
        """Return how far a read-back of a write of ``value`` may be off and still verify it.

        >>> PointConfig(key="p", kind="setpoint", unit="%", scale=0.1,
        ...             modbus={"address": 0, "type": "uint16"}).verify_tolerance(50.0)  # half a step
        0.050050000000000004
        """
        if self.write_tolerance is not None:
            return self.write_tolerance
        relative = 1e-6 * abs(value)
        if self.modbus is not None and self.modbus.type.value.startswith(("int", "uint", "bool")):
            return abs(self.scale) / 2.0 + relative  # integer registers hold whole raw steps only
        return relative + 1e-9


class DeviceTemplate(_Frozen):
    """Points shared by every device of one model (a meter type, an inverter type)."""

    points: tuple[PointConfig, ...]


class SimulationConfig(_Frozen):
    """Physics parameters for the device's simulator; ignored by the server.

    Which fields a device uses depends on its kind (docs/simulators.md): a battery reads the
    battery fields, a production line its ``jobs``, a power meter with ``sums`` adds up other
    devices. ``anomalies`` and ``random_anomalies`` inject faults with ground-truth labels.
    """

    class Job(_Frozen):
        """One energy-intensive batch job of a production line, run every (work)day."""

        start_hour: Annotated[float, Field(ge=0, lt=24)]
        """Planned start in local hours after midnight (9.5 is 09:30)."""
        duration_h: Annotated[float, Field(gt=0, le=24)]
        power_kw: Annotated[float, Field(ge=0)]
        """Power the job adds to the line while it runs."""
        workdays_only: bool = True

    class Anomaly(_Frozen):
        """One injected anomaly (spike, stuck, drift, level_shift, night_load) on one point."""

        type: Literal["spike", "stuck", "drift", "level_shift", "night_load"]
        point: Id = "active_power_kw"
        start: Annotated[float, Field(ge=0)] | str = 0.0
        """Seconds after the simulators start, an offset such as ``90min``/``2h``/``1d``, or an
        ISO 8601 time (in the site's zone when it has no offset)."""
        duration_s: Annotated[float, Field(gt=0)] | None = None
        duration_min: Annotated[float, Field(gt=0)] | None = None
        """Give one of the two, or neither for the type's default (spike 120 s, stuck 30 min,
        drift 3 h, level_shift 2 h, night_load 24 h)."""
        magnitude: float | None = None
        """Size in the point's unit (added for spike, level_shift, night_load; reached at the end
        of a drift)."""
        magnitude_pct: float | None = None
        """Size in % of the point's value when the anomaly starts, instead of ``magnitude``."""
        counter: Id | None = None
        """Counter that integrates the extra rate; by default ``energy_import_kwh`` (``*_kw``
        points) or ``gas_volume_nm3`` (``*_nm3_h``) for level_shift and night_load, else none."""
        night_start_hour: Annotated[float, Field(ge=0, lt=24)] = 22.0
        night_end_hour: Annotated[float, Field(ge=0, lt=24)] = 6.0

        @field_validator("start")
        @classmethod
        def _check_start(cls, value: float | str) -> float | str:
            offset = r"^\+?\d+(?:\.\d+)?\s*(?:s|min|h|d)?$"  # 90, 90min, 2h after the start
            if isinstance(value, str) and not re.match(offset, value.strip()):
                try:
                    datetime.fromisoformat(value)
                except ValueError:
                    raise ValueError(
                        f"expected seconds, an offset like '2h' or an ISO time, got {value!r}"
                    ) from None
            return value

        @model_validator(mode="after")
        def _check_anomaly(self) -> Self:
            if self.duration_s is not None and self.duration_min is not None:
                raise ValueError("give duration_s or duration_min, not both")
            if self.type != "stuck" and (self.magnitude is None) == (self.magnitude_pct is None):
                raise ValueError(f"a {self.type} anomaly needs exactly one of magnitude or magnitude_pct")
            return self

    class RandomAnomalies(_Frozen):
        """A seeded random anomaly schedule: the same seed gives the same anomalies on the same days."""

        per_day: Annotated[float, Field(gt=0, le=1000)]
        """Mean number of anomalies per day on this device."""
        types: Annotated[
            tuple[Literal["spike", "stuck", "drift", "level_shift", "night_load"], ...], Field(min_length=1)
        ] = ("spike", "stuck", "drift", "level_shift", "night_load")
        points: Annotated[tuple[Id, ...], Field(min_length=1)] = ("active_power_kw",)
        magnitude_pct: float | None = None
        """Size of each anomaly in % of the point's value; by default spike 200, drift 30,
        level_shift 30, night_load 50."""
        seed: int | None = None
        """Default: the device's seed."""

    profile: str = "flat"
    """Load shape: flat, office, production_2shift, production_3shift, hvac, lighting, pv, gas_boiler."""
    base_kw: Annotated[float, Field(ge=0)] = 0.0
    peak_kw: Annotated[float, Field(ge=0)] = 0.0
    base_nm3_h: Annotated[float, Field(ge=0)] = 0.0
    peak_nm3_h: Annotated[float, Field(ge=0)] = 0.0
    capacity_kwh: Annotated[float, Field(ge=0)] = 0.0
    """Battery capacity (100 % SOC); 0 means 100 kWh."""
    noise_pct: Annotated[float, Field(ge=0, le=50)] = 2.0
    seed: int | None = None
    max_charge_kw: Annotated[float, Field(ge=0)] = 0.0
    """Battery charge limit; 0 means half the capacity per hour."""
    max_discharge_kw: Annotated[float, Field(ge=0)] = 0.0
    soc_min_pct: Annotated[float, Field(ge=0, le=100)] = 10.0
    soc_max_pct: Annotated[float, Field(ge=0, le=100)] = 90.0
    initial_soc_pct: Annotated[float, Field(ge=0, le=100)] = 50.0
    round_trip_efficiency: Annotated[float, Field(gt=0, le=1)] = 0.9
    time_constant_min: Annotated[float, Field(gt=0, le=1440)] = 15.0
    """Chiller thermal lag of the supply temperature and the load."""
    ballast_min_pct: Annotated[float, Field(ge=0, le=100)] = 10.0
    """Lighting: share of full power the drivers draw at the lowest dim level."""
    pressure_band_bar: Annotated[float, Field(gt=0, le=5)] = 1.0
    """Air compressor: load/unload band around the pressure setpoint."""
    jobs: tuple[Job, ...] = ()
    """Production line: shiftable batch jobs."""
    sums: tuple[Id, ...] = ()
    """Power meter: ids of the devices it adds up (loads add, PV and battery discharge subtract)."""
    anomalies: tuple[Anomaly, ...] = ()
    random_anomalies: RandomAnomalies | None = None

    @model_validator(mode="after")
    def _check_simulation(self) -> Self:
        if self.soc_min_pct >= self.soc_max_pct:
            raise ValueError("soc_min_pct must be below soc_max_pct")
        if len(set(self.sums)) != len(self.sums):
            raise ValueError("sums lists a device twice")
        return self


class DeviceConfig(_Frozen):
    """One device: where it hangs in the hierarchy, how to reach it, what it measures."""

    id: Id
    name: str = ""
    node: Id
    kind: DeviceKind
    protocol: Protocol
    enabled: bool = True
    poll_period_s: Annotated[float, Field(ge=0.05, le=3600)] = 1.0
    """Fixed poll rate of polled devices; the expected update rate of subscribed ones."""
    stale_after_s: Annotated[float, Field(gt=0, le=86_400)] | None = None
    """A subscribed device that sends nothing (not even a keep-alive) for this long is stale, and a
    pushed sample older than this is uncertain. Default: 3 poll periods, at least 10 s."""
    modbus: ModbusDeviceConfig | None = None
    opcua: OpcUaDeviceConfig | None = None
    mqtt: MqttDeviceConfig | None = None
    openadr: OpenAdrDeviceConfig | None = None
    template: Id | None = None
    points: tuple[PointConfig, ...] = ()
    ledger: LedgerRole | None = None
    """How the carbon ledger books this device's energy points that name no role of their own: an
    incoming feeder (the boundary meter of what its node buys) says ``supply``."""
    simulation: SimulationConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_mqtt_section(cls, data: Any) -> Any:
        # An MQTT device on the default topics needs no section of its own.
        if isinstance(data, dict) and data.get("protocol") == Protocol.MQTT.value and "mqtt" not in data:
            return {**data, "mqtt": {}}
        return data

    @model_validator(mode="after")
    def _check_protocol_section(self) -> Self:
        if self.protocol is Protocol.MODBUS_TCP and self.modbus is None:
            raise ValueError("protocol modbus_tcp needs a 'modbus' section (host, port, unit_id)")
        if self.protocol is Protocol.OPCUA and self.opcua is None:
            raise ValueError("protocol opcua needs an 'opcua' section (endpoint, security)")
        if self.protocol is Protocol.OPENADR and self.openadr is None:
            raise ValueError("protocol openadr needs an 'openadr' section (ven_name, ven_id, listen_port)")
        for section in _SECTIONS:
            if section != self.protocol.section and getattr(self, section) is not None:
                raise ValueError(f"a {self.protocol.value} device cannot have a {section!r} section")
        return self

    @property
    def effective_stale_after_s(self) -> float:
        """Return the staleness timeout: as configured, else 3 poll periods and at least 10 s.

        An OpenADR VEN is heard once per oadrPoll, at its own interval: allow three of those too.
        """
        if self.stale_after_s is not None:
            return self.stale_after_s
        periods_s = [self.poll_period_s] + (
            [self.openadr.poll_interval_s] if self.openadr is not None else []
        )
        return max(10.0, 3.0 * max(periods_s))

    def point_id(self, key: str) -> PointId:
        """Return the point id of one of this device's points."""
        return make_point_id(self.id, key)


class CarbonConfig(_Frozen):
    """How the site accounts for carbon and warns about quotas (docs/carbon-ledger.md, docs/quotas.md)."""

    grid_region: Id = NATIONAL
    """Region of the grid emission factor (``east``, ``north``...); ``national`` by default."""
    price_cny_per_t: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Carbon price for quotas that name none (CNY per tCO2e)."""
    alert_thresholds_pct: Annotated[tuple[float, ...], Field(min_length=1)] = (80.0, 90.0, 100.0)
    alert_hysteresis_pct: Annotated[float, Field(ge=0, lt=50)] = 2.0
    """A threshold fires again only after the share fell this far below it."""
    close_after_s: Annotated[float, Field(ge=0, le=86_400)] = 900.0
    """An hour is closed this long after it ends; later changes to it are restatements."""

    @field_validator("alert_thresholds_pct")
    @classmethod
    def _check_thresholds(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < t <= 1000 for t in value):
            raise ValueError("thresholds must be percentages in (0, 1000]")
        return tuple(sorted(set(value)))


class TenantConfig(_Frozen):
    """A tenant: the customer that owns some subtrees of the hierarchy (docs/security.md)."""

    id: Id
    name: Annotated[str, Field(min_length=1)]
    nodes: Annotated[tuple[Id, ...], Field(min_length=1)]
    """The nodes the tenant owns, each with everything below it."""


class SiteConfig(_Frozen):
    """A validated site: hierarchy, templates, devices (with their templates expanded)."""

    site: SiteInfo
    hierarchy: Annotated[tuple[NodeConfig, ...], Field(min_length=1)]
    templates: Mapping[Id, DeviceTemplate] = Field(default_factory=dict)
    devices: tuple[DeviceConfig, ...] = ()
    retention: Mapping[Id, RetentionClassConfig] = Field(
        default_factory=lambda: {DEFAULT_RETENTION: RetentionClassConfig()}
    )
    """Retention classes by name; ``default`` is added (with the built-in periods) when missing."""
    emission_factors: tuple[dict[str, Any], ...] = ()
    """Site overrides of the emission factor library (docs/emission-factors.md): each replaces the
    factor with the same id (or carrier, region, variant and year), or adds one. Checked at load."""
    carbon: CarbonConfig = CarbonConfig()
    control: ControlConfig | None = None
    """The carbon-budget controller: node modes, stages, rules and interlocks (docs/control.md)."""
    tenants: tuple[TenantConfig, ...] = ()
    """Tenants and the subtrees they own; without any, one tenant (the site's id) owns everything."""
    notifications: NotifyConfig | None = None
    """Alert channels and routes (docs/notifications.md); quota alerts are only logged without."""

    def factor_library(self, *, source: str = "site file") -> FactorLibrary:
        """Return the packaged emission factor library with this site's overrides applied.

        ``source`` names the site file in errors (``plant.yaml: emission_factors[0] (id).field``).
        """
        return FactorLibrary.load().with_overrides(
            self.emission_factors, source=source, field_name="emission_factors"
        )

    def iter_nodes(self) -> Iterator[tuple[NodeConfig, NodeId | None]]:
        """Yield every node with its parent id, parents before children."""
        stack: list[tuple[NodeConfig, NodeId | None]] = [(n, None) for n in reversed(self.hierarchy)]
        while stack:
            node, parent = stack.pop()
            yield node, parent
            stack.extend((child, NodeId(node.id)) for child in reversed(node.children))

    def device(self, device_id: str) -> DeviceConfig:
        """Return a device by id; raise KeyError if there is none."""
        for device in self.devices:
            if device.id == device_id:
                return device
        raise KeyError(device_id)

    @property
    def device_ids(self) -> list[DeviceId]:
        """Return the ids of every device, in file order."""
        return [DeviceId(d.id) for d in self.devices]


# --------------------------------------------------------------------------------------------------
# Loading


def load_site(path: str | Path) -> SiteConfig:
    """Read and validate a site file; raise :class:`ConfigError` naming the file and the bad field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read site file: {err.strerror}") from err
    return parse_site(text, source=str(path))


def parse_site(text: str, *, source: str = "<site>") -> SiteConfig:
    r"""Validate a site document given as YAML text.

    >>> parse_site("site: {id: s, name: S}\nhierarchy: []")
    Traceback (most recent call last):
    ...
    scada.model.ConfigError: <site>: hierarchy: List should have at least 1 item after validation, not 0
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError.of_yaml(source, err) from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deep") from None
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        # PyYAML's constructors raise these for a scalar its resolver or an explicit tag promised
        # but that does not convert: "2001-13-45" (a date), "!!int abc", "!!bool maybe".
        raise ConfigError(f"{source}: not valid YAML: cannot convert a value: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with 'site', 'hierarchy' and 'devices'")
    try:
        site = SiteConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError.at(source, first["loc"], raw, first["msg"]) from None
    try:
        site = _expand_and_check(site)
    except _FieldError as err:
        raise ConfigError(f"{source}: {err.path}: {err.message}") from None
    if site.emission_factors:
        site.factor_library(source=source)  # overrides are checked at load, like the rest of the file
    if "control" in raw and raw["control"] is not None:
        # Rules and interlocks name points, nodes and devices: checked against the expanded site.
        points = {d.point_id(p.key): p for d in site.devices for p in d.points}
        control = parse_control(
            raw["control"],
            source=source,
            known_points=set(points),
            writable_points={pid for pid, p in points.items() if p.writable},
            known_nodes={node.id for node, _parent in site.iter_nodes()},
            known_devices={d.id for d in site.devices},
        )
        site = site.model_copy(update={"control": control})
    return site


class _FieldError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


def _expand_and_check(site: SiteConfig) -> SiteConfig:
    """Expand templates and run the checks that span several fields."""
    nodes = _check_hierarchy(site)
    retention = dict(site.retention)
    retention.setdefault(DEFAULT_RETENTION, RetentionClassConfig())
    devices: list[DeviceConfig] = []
    seen_devices: set[str] = set()
    for index, device in enumerate(site.devices):
        where = f"devices[{index}]"
        if device.id in seen_devices:
            raise _FieldError(f"{where}.id", f"duplicate device id {device.id!r}")
        seen_devices.add(device.id)
        if device.node not in nodes:
            raise _FieldError(f"{where}.node", f"unknown node {device.node!r}")
        devices.append(_expand_device(site, device, where))
        _check_retention_names(devices[-1], where, retention)
    _check_openadr_endpoints(devices)
    _check_tenants(site, nodes)
    return site.model_copy(update={"devices": tuple(devices), "retention": retention})


def _check_openadr_point(device: DeviceConfig, point: PointConfig, where: str) -> None:
    if device.protocol is Protocol.OPENADR and point.openadr is None:
        raise _FieldError(
            where, "a point of an openadr device needs an 'openadr' section (signal, status or resource_id)"
        )
    if point.writable and point.openadr is not None and point.openadr.signal is None:
        raise _FieldError(f"{where}.writable", "only a point with an OpenADR 'signal' can be written")


def _check_openadr_endpoints(devices: list[DeviceConfig]) -> None:
    # Each OpenADR device is its own VTN: one listening socket and one venID per device.
    ports: dict[tuple[str, int], str] = {}
    ven_ids: dict[str, str] = {}
    for index, device in enumerate(devices):
        if device.openadr is None:
            continue
        where = f"devices[{index}] ({device.id}).openadr"
        endpoint = (device.openadr.listen_host, device.openadr.listen_port)
        if endpoint[1] and endpoint in ports:
            raise _FieldError(
                f"{where}.listen_port", f"port {endpoint[1]} is used by device {ports[endpoint]!r}"
            )
        ports[endpoint] = device.id
        if device.openadr.ven_id in ven_ids:
            other = ven_ids[device.openadr.ven_id]
            raise _FieldError(
                f"{where}.ven_id", f"ven_id {device.openadr.ven_id!r} is used by device {other!r}"
            )
        ven_ids[device.openadr.ven_id] = device.id


def _check_tenants(site: SiteConfig, nodes: Mapping[str, Any]) -> None:
    # A node may belong to several tenants (a platform operator and its customer); ids are unique.
    seen: set[str] = set()
    for index, tenant in enumerate(site.tenants):
        if tenant.id in seen:
            raise _FieldError(f"tenants[{index}].id", f"duplicate tenant id {tenant.id!r}")
        seen.add(tenant.id)
        for node in tenant.nodes:
            if node not in nodes:
                raise _FieldError(f"tenants[{index}] ({tenant.id}).nodes", f"unknown node {node!r}")


def _check_retention_names(
    device: DeviceConfig, where: str, retention: Mapping[str, RetentionClassConfig]
) -> None:
    for p_index, point in enumerate(device.points):
        if point.retention not in retention:
            known = ", ".join(sorted(retention))
            raise _FieldError(
                f"{where}.points[{p_index}] ({point.key}).retention",
                f"unknown retention class {point.retention!r} (known: {known})",
            )


def _check_hierarchy(site: SiteConfig) -> dict[str, NodeConfig]:
    nodes: dict[str, NodeConfig] = {}
    for root_index, root in enumerate(site.hierarchy):
        if root.level is not NodeLevel.GROUP:
            raise _FieldError(f"hierarchy[{root_index}].level", "a top-level node must be a group")
    for node, _parent in site.iter_nodes():
        if node.id in nodes:
            raise _FieldError(f"hierarchy: node {node.id!r}", "duplicate node id")
        nodes[node.id] = node
        for child in node.children:
            if child.level.depth != node.level.depth + 1:
                raise _FieldError(
                    f"hierarchy: node {child.id!r}",
                    f"level {child.level.value!r} cannot sit directly under {node.level.value} {node.id!r}"
                    f" (group > park > enterprise > workshop)",
                )
    return nodes


def _expand_device(site: SiteConfig, device: DeviceConfig, where: str) -> DeviceConfig:
    points = list(device.points)
    if device.template is not None:
        template = site.templates.get(device.template)
        if template is None:
            raise _FieldError(f"{where}.template", f"unknown template {device.template!r}")
        points = [*template.points, *points]
    if not points:
        raise _FieldError(f"{where}.points", "a device needs at least one point (or a template)")
    keys: set[str] = set()
    for p_index, point in enumerate(points):
        if point.key in keys:
            raise _FieldError(f"{where}.points", f"duplicate point key {point.key!r}")
        keys.add(point.key)
        if device.protocol is Protocol.MODBUS_TCP and point.modbus is None:
            raise _FieldError(
                f"{where}.points[{p_index}] ({point.key})",
                "a point of a modbus_tcp device needs a 'modbus' section",
            )
        if device.protocol is Protocol.OPCUA and point.opcua is None:
            raise _FieldError(
                f"{where}.points[{p_index}] ({point.key})",
                "a point of an opcua device needs an 'opcua' section with its node_id",
            )
        _check_openadr_point(device, point, f"{where}.points[{p_index}] ({point.key})")
        for section in _SECTIONS:
            if section != device.protocol.section and getattr(point, section) is not None:
                raise _FieldError(
                    f"{where}.points[{p_index}] ({point.key}).{section}",
                    f"a point of a {device.protocol.value} device cannot have a {section!r} section",
                )
    _check_register_overlaps(where, points)
    if device.modbus is not None:
        widest = max((p.modbus.type.register_count for p in points if p.modbus is not None), default=1)
        if widest > device.modbus.max_block_registers:
            raise _FieldError(
                f"{where}.modbus.max_block_registers",
                f"must be at least {widest}: the widest point spans {widest} registers",
            )
    return device.model_copy(update={"points": tuple(points), "template": None})


def _check_register_overlaps(where: str, points: list[PointConfig]) -> None:
    spans = sorted(
        (p.modbus.table.value, p.modbus.address, p.modbus.end, p.key) for p in points if p.modbus is not None
    )
    for (table_a, _, end_a, key_a), (table_b, start_b, _, key_b) in itertools.pairwise(spans):
        if table_a == table_b and start_b < end_a:
            raise _FieldError(f"{where}.points", f"registers of {key_a!r} and {key_b!r} overlap in {table_a}")
