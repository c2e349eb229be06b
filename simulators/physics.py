"""Deterministic device physics: named engineering variables of one device over simulated time.

A physics object is stepped to a simulated instant (:meth:`DevicePhysics.step`) and answers the
value of a variable by name (:meth:`DevicePhysics.value`); the names are the point keys of the site
file, so a point ``active_power_kw`` shows the variable ``active_power_kw``.

Profiles, noise and the sun are pure functions of (seed, simulated time). State that real equipment
carries (counters, a battery's charge, a chiller's thermal lag, a compressor's receiver pressure, a
production line's started jobs) integrates between steps, so two objects with the same parameters,
stepped at the same instants and given the same writes, give the same values: tests can assert on
shapes and a demo looks the same every day it starts.

Writable variables (setpoints) are clamped to what the device can do, and read back what the
physics holds, so a write the device cannot honour shows as a mismatch on read-back. Everything a
device reports passes through an optional :class:`ValueLayer` (anomaly injection) on its way out;
the physics itself, and meters that sum other devices, never see that layer.

Load shapes follow the site's time zone: an office draws its peak at 10:00 local time on a weekday,
not at 10:00 UTC. PV follows a clear-sky sun curve for the zone (latitude 31.2 N, east China, is
assumed: the site file has no coordinates) with passing clouds.

Sign convention, in one place: ``active_power_kw`` is positive when a device draws power from the
site's bus, except for generators (PV) which report their output as positive, and batteries, whose
``active_power_kw`` and ``power_setpoint_kw`` are **positive when discharging** (delivering to the
bus) and negative when charging. :meth:`DevicePhysics.grid_import_kw` turns each into what it adds
to the site's import.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar, Final, Protocol
from zoneinfo import ZoneInfo

from scada.model import DeviceKind

__all__ = [
    "LOAD_PROFILES",
    "NATURAL_GAS_NCV_GJ_PER_NM3",
    "PROFILES",
    "AirCompressorPhysics",
    "BatteryPhysics",
    "BoilerPhysics",
    "ChillerPhysics",
    "DevicePhysics",
    "ElectricalLoadPhysics",
    "GasMeterPhysics",
    "JobSpec",
    "LightingPhysics",
    "MainMeterPhysics",
    "ProductionLinePhysics",
    "PvInverterPhysics",
    "SetpointSpec",
    "SimulationParams",
    "ValueLayer",
    "clear_sky_irradiance_w_m2",
    "hash_unit",
    "load_shape",
    "make_physics",
    "smooth_noise",
]

_LOGGER = logging.getLogger(__name__)

_MASK64: Final = (1 << 64) - 1
LATITUDE_DEG: Final = 31.2
"""Latitude assumed for the sun curve (Suzhou/Shanghai)."""
NOMINAL_VOLTAGE_V: Final = 230.0
NOMINAL_FREQUENCY_HZ: Final = 50.0
NATURAL_GAS_NCV_GJ_PER_NM3: Final = 0.038931
"""Net calorific value of natural gas, 389.31 GJ per 10^4 Nm3 (the Chinese default, GB/T 32150)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """One energy-intensive batch job of a production line, run every (work)day."""

    start_hour: float
    """Planned start, in local hours after midnight (9.5 is 09:30)."""
    duration_h: float
    power_kw: float
    """Power the job adds to the line's base load while it runs."""
    workdays_only: bool = True
    """Run Monday to Friday only; False runs it every day."""

    def __post_init__(self) -> None:
        if not 0 <= self.start_hour < 24:
            raise ValueError("start_hour must be in [0, 24)")
        if not 0 < self.duration_h <= 24:
            raise ValueError("duration_h must be in (0, 24]")
        if not self.power_kw >= 0:
            raise ValueError("power_kw must be >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationParams:
    """Physics parameters of one device, as in the site file's ``simulation`` section.

    Every field has a default that keeps a document written for an older simulator working; a
    physics reads only the fields it needs (docs/simulators.md lists them per kind).
    """

    profile: str = "flat"
    base_kw: float = 0.0
    peak_kw: float = 0.0
    base_nm3_h: float = 0.0
    peak_nm3_h: float = 0.0
    capacity_kwh: float = 0.0
    noise_pct: float = 2.0
    seed: int | None = None
    # battery
    max_charge_kw: float = 0.0
    """0 means half the capacity per hour (a 2-hour battery)."""
    max_discharge_kw: float = 0.0
    soc_min_pct: float = 10.0
    soc_max_pct: float = 90.0
    initial_soc_pct: float = 50.0
    round_trip_efficiency: float = 0.9
    # chiller
    time_constant_min: float = 15.0
    """First-order thermal lag of a chiller's supply temperature and load."""
    # lighting
    ballast_min_pct: float = 10.0
    """Share of the full lighting power the drivers draw at the lowest dim level."""
    # air compressor
    pressure_band_bar: float = 1.0
    """Width of the load/unload band, centred on ``pressure_setpoint_bar``."""
    # production line
    jobs: tuple[JobSpec, ...] = ()
    # summing meter
    sums: tuple[str, ...] = ()
    """Ids of the devices a grid main meter adds up (loads add, PV and battery discharge subtract)."""

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r} (use {', '.join(sorted(PROFILES))})")
        for name in (
            "base_kw",
            "peak_kw",
            "base_nm3_h",
            "peak_nm3_h",
            "capacity_kwh",
            "noise_pct",
            "max_charge_kw",
            "max_discharge_kw",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("soc_min_pct", "soc_max_pct", "initial_soc_pct", "ballast_min_pct"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must be between 0 and 100")
        if not self.soc_min_pct < self.soc_max_pct:
            raise ValueError("soc_min_pct must be below soc_max_pct")
        if not 0 < self.round_trip_efficiency <= 1:
            raise ValueError("round_trip_efficiency must be in (0, 1]")
        if not self.time_constant_min > 0:
            raise ValueError("time_constant_min must be > 0")
        if not self.pressure_band_bar > 0:
            raise ValueError("pressure_band_bar must be > 0")


@dataclass(frozen=True, slots=True)
class SetpointSpec:
    """A writable variable the physics models: its default and the range writes are clamped to."""

    default: float
    low: float
    high: float
    integer: bool = False
    """Round writes to whole numbers (modes, on/off)."""

    def accept(self, value: float, current: float) -> float:
        """Return what the device holds after a write of ``value``; NaN or inf leave ``current``.

        >>> SetpointSpec(7.0, 5.0, 15.0).accept(20.0, 7.0)
        15.0
        >>> SetpointSpec(0.0, 0.0, 1.0, integer=True).accept(0.7, 0.0)
        1.0
        >>> SetpointSpec(7.0, 5.0, 15.0).accept(float("nan"), 8.0)
        8.0
        """
        if not math.isfinite(value):
            return current
        if self.integer:
            value = float(round(value))
        return min(self.high, max(self.low, value))


class ValueLayer(Protocol):
    """What a device reports on top of its physics (anomaly injection); the physics never sees it."""

    def advance(self, physics: DevicePhysics, now: datetime, dt_h: float) -> None:
        """Move the layer to ``now`` (just after the physics stepped there)."""

    def adjust(self, key: str, value: float) -> float:
        """Return what the device reports for ``key`` when its physics holds ``value``."""


# --------------------------------------------------------------------------------------------------
# Pure helpers: noise, smooth steps, load shapes, the sun


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_unit(seed: int, channel: int, index: int) -> float:
    """Return a reproducible pseudo-random number in [-1, 1) for (seed, channel, index).

    >>> hash_unit(1, 2, 3) == hash_unit(1, 2, 3) != hash_unit(1, 2, 4)
    True
    """
    x = _splitmix64((seed & _MASK64) ^ _splitmix64((channel << 40) ^ (index & _MASK64)))
    return (x >> 11) / float(1 << 52) - 1.0


def _smoothstep(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3.0 - 2.0 * x)


def smooth_noise(seed: int, channel: int, t_s: float, period_s: float) -> float:
    """Return smooth, reproducible noise in [-1, 1] at time ``t_s``; it wanders over ``period_s``.

    A pure function of its arguments (value noise: random values at multiples of ``period_s``,
    eased in between), so the simulated plant needs no random state that depends on tick timing.

    >>> smooth_noise(7, 1, 1000.0, 60.0) == smooth_noise(7, 1, 1000.0, 60.0)
    True
    >>> -1.0 <= smooth_noise(7, 1, 1234.5, 60.0) <= 1.0
    True
    """
    pos = t_s / period_s
    index = math.floor(pos)
    a = hash_unit(seed, channel, index)
    b = hash_unit(seed, channel, index + 1)
    return a + (b - a) * _smoothstep(pos - index)


def _window(hour: float, on: float, off: float, ramp_h: float) -> float:
    """Return 1 between ``on`` and ``off`` o'clock, 0 outside, with smooth ramps of ``ramp_h``."""
    return min(_smoothstep((hour - on) / ramp_h + 0.5), _smoothstep((off - hour) / ramp_h + 0.5))


def _bump(hour: float, centre: float, width_h: float) -> float:
    """Return a bell of height 1 at ``centre`` o'clock, about ``width_h`` hours wide."""
    return math.exp(-(((hour - centre) / (width_h / 2.0)) ** 2))


def _winter_share(local: datetime) -> float:
    """Return 1 in mid-January, 0 in mid-July (northern hemisphere heating season)."""
    day = local.timetuple().tm_yday
    return 0.5 + 0.5 * math.cos(2.0 * math.pi * (day - 15) / 365.0)


def _flat(_hour: float, _workday: bool, _local: datetime) -> float:
    return 1.0


def _office(hour: float, workday: bool, _local: datetime) -> float:
    if not workday:
        return 0.05
    return _window(hour, 8.0, 18.0, 1.5) * (1.0 - 0.15 * _bump(hour, 12.5, 1.0))


def _production_2shift(hour: float, workday: bool, local: datetime) -> float:
    if workday:
        return _window(hour, 6.0, 22.0, 0.5) * (1.0 - 0.3 * _bump(hour, 14.0, 0.5))
    if local.weekday() == 5:  # Saturday: the morning shift only, lighter
        return 0.6 * _window(hour, 6.0, 14.0, 0.5)
    return 0.0


def _production_3shift(hour: float, workday: bool, _local: datetime) -> float:
    shift_change = max(_bump(hour, h, 0.5) for h in (6.0, 14.0, 22.0))
    return (0.95 if workday else 0.7) * (1.0 - 0.25 * shift_change)


def _hvac(hour: float, workday: bool, local: datetime) -> float:
    summer = 1.0 - _winter_share(local)
    season = 0.5 + 0.5 * max(summer, 0.6 * (1.0 - summer))  # cooling in summer, some heating in winter
    heat_of_day = 0.55 + 0.45 * _bump(hour, 15.0, 6.0)
    occupancy = _window(hour, 7.0, 20.0, 1.0) if workday else 0.15
    return min(1.0, season * heat_of_day * occupancy)


def _lighting(hour: float, workday: bool, _local: datetime) -> float:
    if not workday:
        return 0.1 * _window(hour, 7.0, 19.0, 0.25)
    return _window(hour, 7.0, 19.0, 0.25) * (1.0 - 0.2 * _bump(hour, 12.5, 3.0))  # daylight helps at noon


def _gas_boiler(hour: float, workday: bool, local: datetime) -> float:
    season = 0.25 + 0.75 * _winter_share(local)
    daily = 0.45 + 0.55 * min(1.0, _bump(hour, 7.0, 3.0) + 0.8 * _bump(hour, 19.0, 4.0))
    return season * daily * (1.0 if workday else 0.75)


_SHAPES: Final[Mapping[str, Callable[[float, bool, datetime], float]]] = {
    "flat": _flat,
    "office": _office,
    "production_2shift": _production_2shift,
    "production_3shift": _production_3shift,
    "hvac": _hvac,
    "lighting": _lighting,
    "gas_boiler": _gas_boiler,
}
LOAD_PROFILES: Final = frozenset(_SHAPES)
"""Profiles with a load shape (everything but ``pv``)."""
PROFILES: Final = LOAD_PROFILES | {"pv"}


def load_shape(profile: str, local: datetime) -> float:
    """Return how far between base (0) and peak (1) a load is at a local time.

    >>> from datetime import datetime
    >>> tz = ZoneInfo("Asia/Shanghai")
    >>> load_shape("office", datetime(2026, 3, 4, 10, tzinfo=tz)) > 0.9   # Wednesday 10:00
    True
    >>> load_shape("office", datetime(2026, 3, 4, 3, tzinfo=tz)) < 0.05   # Wednesday 03:00
    True
    """
    hour = local.hour + local.minute / 60.0 + local.second / 3600.0
    workday = local.weekday() < 5
    return _SHAPES[profile](hour, workday, local)


def clear_sky_irradiance_w_m2(now: datetime, tz: ZoneInfo, *, latitude_deg: float = LATITUDE_DEG) -> float:
    """Return global horizontal irradiance under a clear sky, from the sun's elevation.

    Solar time is taken as the zone's standard time, which is close enough for a demo plant
    (Beijing time is the solar time of 120 E; Suzhou is at 120.6 E).

    >>> from datetime import UTC, datetime
    >>> tz = ZoneInfo("Asia/Shanghai")
    >>> clear_sky_irradiance_w_m2(datetime(2026, 6, 21, 4, tzinfo=UTC), tz) > 800   # noon local
    True
    >>> clear_sky_irradiance_w_m2(datetime(2026, 6, 21, 16, tzinfo=UTC), tz)        # midnight local
    0.0
    """
    local = now.astimezone(tz)
    dst = local.dst()
    standard = local - dst if dst else local
    hour = standard.hour + standard.minute / 60.0 + standard.second / 3600.0
    day = standard.timetuple().tm_yday
    declination = math.radians(23.44) * math.sin(2.0 * math.pi * (284 + day) / 365.0)
    latitude = math.radians(latitude_deg)
    hour_angle = math.radians(15.0 * (hour - 12.0))
    sin_elevation = math.sin(latitude) * math.sin(declination) + math.cos(latitude) * math.cos(
        declination
    ) * math.cos(hour_angle)
    if sin_elevation <= 0:
        return 0.0
    return 1000.0 * math.pow(sin_elevation, 1.15)


# --------------------------------------------------------------------------------------------------
# Physics


class DevicePhysics:
    """Variables of one simulated device over simulated time; subclasses define the physics.

    Value precedence for a key: an override (pinned by a test), then the computed variable, then
    the last value written to it (setpoints the physics does not model read back what was
    written), else 0.0 with a one-time warning. An attached :class:`ValueLayer` adjusts all but
    overrides on their way out.
    """

    VARIABLES: ClassVar[tuple[str, ...]] = ()
    """Variables the physics computes."""
    SETPOINTS: ClassVar[Mapping[str, SetpointSpec]] = {}
    """Writable variables the physics models, with their defaults and ranges (writes are clamped)."""

    def __init__(
        self, params: SimulationParams, *, tz: ZoneInfo, start: datetime, seed: int, name: str = ""
    ) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self.params = params
        self.tz = tz
        self.seed = seed
        self.name = name or type(self).__name__
        self.revision = 0
        """Grows on every step, write and override: tells encoders their image is stale."""
        self._values: dict[str, float] = {}
        self._overrides: dict[str, float] = {}
        self._setpoints: Mapping[str, SetpointSpec] = self._setpoint_specs()
        self._written: dict[str, float] = {key: spec.default for key, spec in self._setpoints.items()}
        self._warned: set[str] = set()
        self._layer: ValueLayer | None = None
        self._now = start
        self._init_counters()
        self._compute(start, 0.0)

    @property
    def now(self) -> datetime:
        """Return the simulated instant of the last step."""
        return self._now

    @property
    def setpoints(self) -> Mapping[str, SetpointSpec]:
        """Return the writable variables this device models, with their ranges."""
        return self._setpoints

    @property
    def layer(self) -> ValueLayer | None:
        """Return the attached value layer (anomaly injection), if any."""
        return self._layer

    def attach(self, layer: ValueLayer | None) -> None:
        """Report every value through ``layer`` from now on (None detaches)."""
        self._layer = layer
        if layer is not None:
            layer.advance(self, self._now, 0.0)
        self.revision += 1

    def step(self, now: datetime) -> None:
        """Advance to simulated time ``now``; state and counters integrate over the elapsed time."""
        dt_h = max(0.0, (now - self._now).total_seconds() / 3600.0)
        self._compute(now, dt_h)
        self._now = max(now, self._now)
        if self._layer is not None:
            self._layer.advance(self, self._now, dt_h)
        self.revision += 1

    def value(self, key: str) -> float:
        """Return what the device reports for a variable (0.0, with a one-time warning, if unknown)."""
        if key in self._overrides:
            return self._overrides[key]
        raw = self._raw(key)
        return raw if self._layer is None else self._layer.adjust(key, raw)

    def physical_value(self, key: str) -> float:
        """Return the value the physics holds, overrides included but without the value layer."""
        if key in self._overrides:
            return self._overrides[key]
        return self._raw(key)

    def knows(self, key: str) -> bool:
        """Return True if the physics computes or models ``key``."""
        return key in self.VARIABLES or key in self._setpoints

    def write(self, key: str, value: float) -> None:
        """Accept a value written to a writable point; modelled setpoints are clamped to range."""
        spec = self._setpoints.get(key)
        if spec is not None:
            value = spec.accept(value, self._written[key])
        self._written[key] = value
        self._compute(self._now, 0.0)
        self.revision += 1

    def override(self, key: str, value: float) -> None:
        """Pin a variable to ``value`` until :meth:`clear_override` (the test's "value changed")."""
        self._overrides[key] = value
        self._compute(self._now, 0.0)
        self.revision += 1

    def clear_override(self, key: str) -> None:
        """Let a pinned variable follow the physics again."""
        self._overrides.pop(key, None)
        self._compute(self._now, 0.0)
        self.revision += 1

    def snapshot(self) -> dict[str, float]:
        """Return every known variable with its current value (overrides applied)."""
        keys = [*self.VARIABLES, *self._written, *self._overrides]
        return {key: self.value(key) for key in dict.fromkeys(keys)}

    def grid_import_kw(self) -> float:
        """Return what this device adds to the site's grid import (negative: it feeds the site)."""
        return 0.0

    # ----------------------------------------------------------------------------------------------
    # For subclasses

    def _setpoint_specs(self) -> Mapping[str, SetpointSpec]:
        """Return the modelled setpoints; a subclass may size them from its parameters."""
        return self.SETPOINTS

    def _init_counters(self) -> None:
        """Set counters and other state to their (seeded) starting values."""

    def _compute(self, now: datetime, dt_h: float) -> None:
        raise NotImplementedError

    def _raw(self, key: str) -> float:
        if key in self._values:
            return self._values[key]
        if key in self._written:
            return self._written[key]
        if key not in self._warned:
            self._warned.add(key)
            _LOGGER.warning(
                "%s: no variable %r in %s physics; serving 0", self.name, key, type(self).__name__
            )
        return 0.0

    def _set(self, key: str, computed: float) -> float:
        """Store a computed variable and return what the rest of the physics should use.

        An override wins, unless it is NaN or inf: that stands for a faulty register and shows on
        the wire only, instead of poisoning every variable derived from it.
        """
        self._values[key] = computed
        pinned = self._overrides.get(key, computed)
        return pinned if math.isfinite(pinned) else computed

    def _noise(self, channel: int, now: datetime, period_s: float) -> float:
        return smooth_noise(self.seed, channel, now.timestamp(), period_s)

    def _counter_start(self, channel: int, low: float, high: float) -> float:
        return low + (high - low) * 0.5 * (1.0 + hash_unit(self.seed, channel, 0))

    def _setpoint(self, key: str) -> float:
        """Return a modelled setpoint as the physics uses it (and publish it for read-back)."""
        return self._set(key, self._written[key])

    def _shape(self, now: datetime) -> float:
        profile = self.params.profile if self.params.profile in LOAD_PROFILES else "flat"
        return load_shape(profile, now.astimezone(self.tz))

    def _electrical(self, now: datetime, power_kw: float, power_factor: float) -> None:
        """Derive voltages, currents, reactive and apparent power of a balanced three-phase feed."""
        voltage = self._set("voltage_v", NOMINAL_VOLTAGE_V * (1.0 + 0.01 * self._noise(3, now, 60.0)))
        for phase, channel in (("l1", 4), ("l2", 5), ("l3", 6)):
            self._set(f"voltage_{phase}_v", voltage * (1.0 + 0.004 * self._noise(channel, now, 45.0)))
        pf = self._set("power_factor", min(1.0, max(0.05, power_factor)))
        reactive = self._set("reactive_power_kvar", abs(power_kw) * math.tan(math.acos(pf)))
        apparent = self._set("apparent_power_kva", math.hypot(power_kw, reactive))
        current = self._set("current_a", apparent * 1000.0 / (3.0 * voltage) if voltage > 0 else 0.0)
        for phase, channel in (("l1", 7), ("l2", 8), ("l3", 10)):
            share = 1.0 + 0.03 * self._noise(channel, now, 120.0)
            self._set(f"current_{phase}_a", current * share)
            self._set(f"active_power_{phase}_kw", power_kw / 3.0 * share)
        self._set("frequency_hz", NOMINAL_FREQUENCY_HZ + 0.03 * self._noise(9, now, 30.0))


_ELECTRICAL: Final = (
    "voltage_v",
    "voltage_l1_v",
    "voltage_l2_v",
    "voltage_l3_v",
    "current_a",
    "current_l1_a",
    "current_l2_a",
    "current_l3_a",
    "active_power_l1_kw",
    "active_power_l2_kw",
    "active_power_l3_kw",
    "reactive_power_kvar",
    "apparent_power_kva",
    "power_factor",
    "frequency_hz",
)
_POWER_LIMIT: Final = SetpointSpec(100.0, 0.0, 100.0)


def _lag_factor(dt_h: float, time_constant_min: float) -> float:
    """Return how far a first-order lag moves towards its target over ``dt_h`` (0 to 1).

    >>> round(_lag_factor(0.25, 15.0), 4)    # one time constant: 63.2 %
    0.6321
    """
    return 1.0 - math.exp(-dt_h * 60.0 / time_constant_min) if dt_h > 0 else 0.0


class ElectricalLoadPhysics(DevicePhysics):
    """A metered three-phase load (feeder, line, HVAC, lighting...) following a load profile.

    ``active_power_kw = base_kw + (peak_kw - base_kw) * shape(profile, local time)`` with
    ``noise_pct`` of smooth noise, capped by the writable ``power_limit_pct`` of ``peak_kw``
    (curtailment); the power factor improves with load; energy counters integrate the power.
    Subclasses replace :meth:`_power_kw` and keep the feed, the counters and the power factor.
    """

    VARIABLES: ClassVar[tuple[str, ...]] = (
        "active_power_kw",
        "energy_import_kwh",
        "energy_export_kwh",
        *_ELECTRICAL,
    )
    SETPOINTS: ClassVar[Mapping[str, SetpointSpec]] = {"power_limit_pct": _POWER_LIMIT}

    def grid_import_kw(self) -> float:
        """Return the load's power: all of it comes from the site's bus."""
        return self.physical_value("active_power_kw")

    def _init_counters(self) -> None:
        self._import_kwh = self._counter_start(100, 10_000.0, 500_000.0)
        self._export_kwh = 0.0
        self._last_power_kw: float | None = None
        self._interval_kwh: float | None = None
        """Exact energy of the last interval, when a subclass knows it better than the trapezoid."""

    @property
    def _peak_kw(self) -> float:
        return max(self.params.peak_kw, self.params.base_kw)

    def _profile_kw(self, now: datetime) -> tuple[float, float]:
        """Return (profile power with noise, shape) before any limit."""
        p = self.params
        shape = self._shape(now)
        target_kw = p.base_kw + (self._peak_kw - p.base_kw) * shape
        return target_kw * (1.0 + p.noise_pct / 100.0 * self._noise(1, now, 20.0)), shape

    def _limit_kw(self) -> float:
        return self._peak_kw * self._setpoint("power_limit_pct") / 100.0

    def _power_kw(self, now: datetime, dt_h: float) -> tuple[float, float]:
        """Return (active power, load fraction 0..1 for the power factor) at ``now``."""
        target_kw, shape = self._profile_kw(now)
        return max(0.0, min(target_kw, self._limit_kw())), shape

    def _compute(self, now: datetime, dt_h: float) -> None:
        computed_kw, load_fraction = self._power_kw(now, dt_h)
        power_kw = self._set("active_power_kw", computed_kw)
        self._electrical(now, power_kw, 0.90 + 0.07 * load_fraction + 0.01 * self._noise(2, now, 90.0))
        exact_kwh, self._interval_kwh = self._interval_kwh, None
        if dt_h > 0 and self._last_power_kw is not None:
            if exact_kwh is not None and "active_power_kw" not in self._overrides:
                self._import_kwh += max(0.0, exact_kwh)
                self._export_kwh += max(0.0, -exact_kwh)
            else:
                mean_kw = (self._last_power_kw + power_kw) / 2.0
                self._import_kwh += max(0.0, mean_kw) * dt_h
                self._export_kwh += max(0.0, -mean_kw) * dt_h
        self._last_power_kw = power_kw  # a write or override holds from now on
        self._set("energy_import_kwh", self._import_kwh)
        self._set("energy_export_kwh", self._export_kwh)


class LightingPhysics(ElectricalLoadPhysics):
    """Lighting on a dimmable circuit: the profile says when lights are on, ``dim_level_pct`` how bright.

    ``power = base_kw + (peak_kw - base_kw) * shape * driver`` where the driver draws
    ``ballast_min_pct`` at the lowest dim level and scales linearly to 100 % at full brightness;
    ``dim_level_pct`` 0 switches the dimmable lights off. ``base_kw`` (emergency and security
    lighting) is not dimmable.
    """

    VARIABLES = (*ElectricalLoadPhysics.VARIABLES, "dim_level_pct")
    SETPOINTS: ClassVar[Mapping[str, SetpointSpec]] = {
        "power_limit_pct": _POWER_LIMIT,
        "dim_level_pct": SetpointSpec(100.0, 0.0, 100.0),
    }

    def _power_kw(self, now: datetime, dt_h: float) -> tuple[float, float]:
        p = self.params
        shape = self._shape(now)
        dim_pct = self._setpoint("dim_level_pct")
        ballast = p.ballast_min_pct / 100.0
        driver = 0.0 if dim_pct <= 0 else ballast + (1.0 - ballast) * dim_pct / 100.0
        target_kw = p.base_kw + (self._peak_kw - p.base_kw) * shape * driver
        target_kw *= 1.0 + p.noise_pct / 100.0 * self._noise(1, now, 20.0)
        return max(0.0, min(target_kw, self._limit_kw())), shape * driver


class ChillerPhysics(ElectricalLoadPhysics):
    """A chiller (or HVAC plant) with a writable chilled-water supply temperature setpoint.

    The profile gives the electrical demand at the design supply temperature (7 degC); the load
    the chiller sees follows it with a first-order thermal lag (``time_constant_min``, 15 min),
    and the supply temperature approaches its setpoint with the same lag. Each degree above the
    design temperature lowers the power by 3 % (a better COP), so a higher setpoint saves energy,
    visible after the lag. Cooling output is the power times the COP (5 at design).
    """

    DESIGN_SUPPLY_DEGC: ClassVar[float] = 7.0
    POWER_CHANGE_PER_DEGC: ClassVar[float] = 0.03
    DESIGN_COP: ClassVar[float] = 5.0

    VARIABLES = (
        *ElectricalLoadPhysics.VARIABLES,
        "supply_temp_degc",
        "return_temp_degc",
        "cooling_load_kw",
        "cop",
        "supply_temp_setpoint_degc",
    )
    SETPOINTS: ClassVar[Mapping[str, SetpointSpec]] = {
        "power_limit_pct": _POWER_LIMIT,
        "supply_temp_setpoint_degc": SetpointSpec(7.0, 5.0, 15.0),
    }

    def _init_counters(self) -> None:
        super()._init_counters()
        self._load_kw: float | None = None
        self._supply_degc: float | None = None

    def _power_kw(self, now: datetime, dt_h: float) -> tuple[float, float]:
        demand_kw, _shape = self._profile_kw(now)
        setpoint_degc = self._setpoint("supply_temp_setpoint_degc")
        if self._load_kw is None or self._supply_degc is None:  # start in steady state
            self._load_kw, self._supply_degc = demand_kw, setpoint_degc
        else:
            alpha = _lag_factor(dt_h, self.params.time_constant_min)
            self._load_kw += (demand_kw - self._load_kw) * alpha
            self._supply_degc += (setpoint_degc - self._supply_degc) * alpha
        supply_degc = self._set("supply_temp_degc", self._supply_degc)
        factor = max(0.05, 1.0 - self.POWER_CHANGE_PER_DEGC * (supply_degc - self.DESIGN_SUPPLY_DEGC))
        power_kw = max(0.0, min(self._load_kw * factor, self._limit_kw()))
        cop = self._set("cop", self.DESIGN_COP / factor)
        self._set("cooling_load_kw", power_kw * cop)
        fraction = min(1.0, self._load_kw / self._peak_kw) if self._peak_kw > 0 else 0.0
        self._set("return_temp_degc", supply_degc + 5.0 * fraction)
        return power_kw, fraction


class AirCompressorPhysics(ElectricalLoadPhysics):
    """A load/unload screw compressor on an air receiver, cycling within a pressure band.

    Air demand follows the profile, from 15 % (leaks) to 85 % of the compressor's flow. Loaded,
    the compressor delivers its full flow and draws ``peak_kw`` (+7 % per bar of setpoint above
    7 bar); unloaded it draws ``base_kw``. The receiver pressure rises (loaded) or falls
    (unloaded) at 1 bar/min times the flow imbalance; the compressor unloads at ``setpoint +
    band/2`` and loads at ``setpoint - band/2``. Switching instants are solved exactly inside a
    step, so the energy counter holds the exact loaded and unloaded time whatever the tick.
    """

    FULL_RATE_BAR_PER_MIN: ClassVar[float] = 1.0
    POWER_CHANGE_PER_BAR: ClassVar[float] = 0.07
    REFERENCE_PRESSURE_BAR: ClassVar[float] = 7.0
    LEAK_SHARE: ClassVar[float] = 0.15
    MAX_DEMAND_SHARE: ClassVar[float] = 0.85
    MAX_SWITCHES_PER_STEP: ClassVar[int] = 2_000

    VARIABLES = (
        *ElectricalLoadPhysics.VARIABLES,
        "pressure_bar",
        "loaded",
        "air_demand_pct",
        "pressure_setpoint_bar",
    )
    SETPOINTS: ClassVar[Mapping[str, SetpointSpec]] = {
        "pressure_setpoint_bar": SetpointSpec(7.0, 4.0, 10.0),
    }

    def _init_counters(self) -> None:
        super()._init_counters()
        self._pressure_bar: float | None = None
        self._loaded = True

    def _limit_kw(self) -> float:
        return math.inf  # no power limit: a compressor is controlled by its pressure setpoint

    def _power_kw(self, now: datetime, dt_h: float) -> tuple[float, float]:
        p = self.params
        shape = self._shape(now)
        demand = self.LEAK_SHARE + (self.MAX_DEMAND_SHARE - self.LEAK_SHARE) * shape
        demand = min(1.0, max(0.0, demand * (1.0 + p.noise_pct / 100.0 * self._noise(1, now, 20.0))))
        setpoint_bar = self._setpoint("pressure_setpoint_bar")
        loaded_kw = max(
            p.base_kw,
            p.peak_kw * (1.0 + self.POWER_CHANGE_PER_BAR * (setpoint_bar - self.REFERENCE_PRESSURE_BAR)),
        )
        if self._pressure_bar is None:
            self._pressure_bar = setpoint_bar
        elif dt_h > 0:
            self._interval_kwh = self._run(dt_h, demand, setpoint_bar, loaded_kw, p.base_kw)
        self._set("pressure_bar", self._pressure_bar)
        self._set("loaded", 1.0 if self._loaded else 0.0)
        self._set("air_demand_pct", 100.0 * demand)
        return (loaded_kw if self._loaded else p.base_kw), (1.0 if self._loaded else 0.3)

    def _run(
        self, dt_h: float, demand: float, setpoint_bar: float, loaded_kw: float, idle_kw: float
    ) -> float:
        """Advance the receiver over ``dt_h`` hours; return the energy drawn (kWh)."""
        assert self._pressure_bar is not None
        low = setpoint_bar - self.params.pressure_band_bar / 2.0
        high = setpoint_bar + self.params.pressure_band_bar / 2.0
        full_rate_bar_h = 60.0 * self.FULL_RATE_BAR_PER_MIN
        remaining_h, energy_kwh = dt_h, 0.0
        for _ in range(self.MAX_SWITCHES_PER_STEP):
            rate_bar_h = full_rate_bar_h * ((1.0 if self._loaded else 0.0) - demand)
            if self._loaded:
                to_switch_h = (high - self._pressure_bar) / rate_bar_h if rate_bar_h > 0 else math.inf
            else:
                to_switch_h = (self._pressure_bar - low) / -rate_bar_h if rate_bar_h < 0 else math.inf
            span_h = min(remaining_h, max(0.0, to_switch_h))
            self._pressure_bar = max(0.0, self._pressure_bar + rate_bar_h * span_h)
            energy_kwh += (loaded_kw if self._loaded else idle_kw) * span_h
            remaining_h -= span_h
            if remaining_h <= 0:
                return energy_kwh
            self._loaded = not self._loaded
        # A very long step: finish it at the average duty cycle instead of thousands of cycles.
        return energy_kwh + (idle_kw + (loaded_kw - idle_kw) * demand) * remaining_h


class ProductionLinePhysics(ElectricalLoadPhysics):
    """A production line: a base load on its profile plus shiftable batch jobs.

    Each job of ``jobs`` runs once a (work)day from ``start_hour`` local time for ``duration_h``
    and adds ``power_kw``. The writable ``job_start_delay_min`` delays every job that has not
    started yet (a running job finishes where it is), so a controller can move energy-intensive
    jobs into low-carbon hours; write 0 to return to the plan. A job whose planned start passed
    while it was held back starts at once. ``power_limit_pct`` caps the base load only.
    Job energy is integrated exactly (start and end instants inside a step count).
    """

    VARIABLES = (
        *ElectricalLoadPhysics.VARIABLES,
        "job_running",
        "job_power_kw",
        "next_job_start_hour",
        "job_start_delay_min",
    )
    SETPOINTS: ClassVar[Mapping[str, SetpointSpec]] = {
        "power_limit_pct": _POWER_LIMIT,
        "job_start_delay_min": SetpointSpec(0.0, 0.0, 1440.0),
    }

    def _init_counters(self) -> None:
        super()._init_counters()
        self._started: dict[tuple[int, int], datetime] = {}
        self._done: set[tuple[int, int]] = set()
        self._last_base_kw: float | None = None
        self._first = True

    def _power_kw(self, now: datetime, dt_h: float) -> tuple[float, float]:
        target_kw, shape = self._profile_kw(now)
        base_kw = max(0.0, min(target_kw, self._limit_kw()))
        previous = self._now
        self._start_jobs(now, previous)
        job_kw, running, next_start = 0.0, False, None
        jobs = self.params.jobs
        for (_day, index), started in self._started.items():
            job = jobs[index]
            if started <= now < started + timedelta(hours=job.duration_h):
                job_kw += job.power_kw
                running = True
        for _key, planned in self._pending(now):
            next_start = planned if next_start is None else min(next_start, planned)
        self._set("job_running", 1.0 if running else 0.0)
        self._set("job_power_kw", job_kw)
        local_next = next_start.astimezone(self.tz) if next_start is not None else None
        self._set(
            "next_job_start_hour",
            local_next.hour + local_next.minute / 60.0 if local_next is not None else -1.0,
        )
        if dt_h > 0:
            last_base = base_kw if self._last_base_kw is None else self._last_base_kw
            self._interval_kwh = (last_base + base_kw) / 2.0 * dt_h + self._job_kwh(previous, now)
            self._prune(now)
        self._last_base_kw = base_kw  # a write or override holds from now on
        return base_kw + job_kw, shape

    def _candidates(self, now: datetime) -> list[tuple[tuple[int, int], datetime]]:
        """Return (key, nominal start) of every job that could still matter around ``now``."""
        today = now.astimezone(self.tz).date()
        out = []
        for offset in range(-2, 2):
            day = today + timedelta(days=offset)
            midnight = datetime(day.year, day.month, day.day, tzinfo=self.tz)
            for index, job in enumerate(self.params.jobs):
                if job.workdays_only and day.weekday() >= 5:
                    continue
                out.append(((day.toordinal(), index), midnight + timedelta(hours=job.start_hour)))
        return out

    def _pending(self, now: datetime) -> list[tuple[tuple[int, int], datetime]]:
        delay = timedelta(minutes=self._setpoint("job_start_delay_min"))
        return [
            (key, nominal + delay)
            for key, nominal in self._candidates(now)
            if key not in self._started and key not in self._done and nominal + delay > now
        ]

    def _start_jobs(self, now: datetime, previous: datetime) -> None:
        delay = timedelta(minutes=self._setpoint("job_start_delay_min"))
        for key, nominal in self._candidates(now):
            if key in self._started or key in self._done:
                continue
            planned = nominal + delay
            if planned > now:
                continue
            end = planned + timedelta(hours=self.params.jobs[key[1]].duration_h)
            if self._first:  # the plant starts: jobs already over did not happen here, running ones run
                if end <= now:
                    self._done.add(key)
                else:
                    self._started[key] = planned
            else:
                self._started[key] = max(planned, previous)
        self._first = False

    def _job_kwh(self, previous: datetime, now: datetime) -> float:
        energy_kwh = 0.0
        for (_day, index), started in self._started.items():
            job = self.params.jobs[index]
            overlap_s = (
                min(now, started + timedelta(hours=job.duration_h)) - max(previous, started)
            ).total_seconds()
            energy_kwh += job.power_kw * max(0.0, overlap_s) / 3600.0
        return energy_kwh

    def _prune(self, now: datetime) -> None:
        horizon = now.astimezone(self.tz).date().toordinal() - 3
        for key in [k for k in self._started if k[0] < horizon]:
            del self._started[key]
        self._done = {k for k in self._done if k[0] >= horizon}


class BoilerPhysics(ElectricalLoadPhysics):
    """A gas-fired boiler: gas flow and counter (Scope 1), heat output, auxiliaries' power.

    Heat demand follows the profile; the boiler modulates to it, capped by the writable
    ``heat_setpoint_pct`` (0 holds it at minimum fire) and switched by the writable ``enabled``
    (0 stops the burner; auxiliaries keep ``base_kw``). Modulation ``u`` in 0..1 gives
    ``gas_flow_nm3_h = base_nm3_h + (peak_nm3_h - base_nm3_h) * u``, the auxiliaries'
    ``active_power_kw = base_kw + (peak_kw - base_kw) * u`` and the heat output
    ``flow * NCV * efficiency`` (GB/T 32150 default NCV, 92 % efficiency).
    """

    EFFICIENCY: ClassVar[float] = 0.92

    VARIABLES = (
        *ElectricalLoadPhysics.VARIABLES,
        "gas_flow_nm3_h",
        "gas_volume_nm3",
        "heat_output_gj_h",
        "heat_energy_gj",
        "firing_pct",
        "temperature_degc",
        "pressure_bar",
        "heat_setpoint_pct",
        "enabled",
    )
    SETPOINTS: ClassVar[Mapping[str, SetpointSpec]] = {
        "heat_setpoint_pct": SetpointSpec(100.0, 0.0, 100.0),
        "enabled": SetpointSpec(1.0, 0.0, 1.0, integer=True),
    }

    def _init_counters(self) -> None:
        super()._init_counters()
        self._volume_nm3 = self._counter_start(300, 5_000.0, 900_000.0)
        self._heat_gj = self._volume_nm3 * NATURAL_GAS_NCV_GJ_PER_NM3 * self.EFFICIENCY
        self._last_flow: float | None = None

    def _limit_kw(self) -> float:
        return math.inf

    def _power_kw(self, now: datetime, dt_h: float) -> tuple[float, float]:
        p = self.params
        demand = self._shape(now) * (1.0 + p.noise_pct / 100.0 * self._noise(21, now, 20.0))
        enabled = self._setpoint("enabled") >= 1
        modulation = (
            min(1.0, max(0.0, demand), self._setpoint("heat_setpoint_pct") / 100.0) if enabled else 0.0
        )
        peak_nm3_h = max(p.peak_nm3_h, p.base_nm3_h)
        computed_flow = p.base_nm3_h + (peak_nm3_h - p.base_nm3_h) * modulation if enabled else 0.0
        flow = self._set("gas_flow_nm3_h", computed_flow)
        firing = 100.0 * flow / peak_nm3_h if peak_nm3_h > 0 else 100.0 * modulation
        self._set("firing_pct", firing)
        self._set("heat_output_gj_h", flow * NATURAL_GAS_NCV_GJ_PER_NM3 * self.EFFICIENCY)
        _gas_conditions(self, now)
        if dt_h > 0 and self._last_flow is not None:
            volume = max(0.0, (self._last_flow + flow) / 2.0) * dt_h
            self._volume_nm3 += volume
            self._heat_gj += volume * NATURAL_GAS_NCV_GJ_PER_NM3 * self.EFFICIENCY
        self._last_flow = flow  # a write or override holds from now on
        self._set("gas_volume_nm3", self._volume_nm3)
        self._set("heat_energy_gj", self._heat_gj)
        aux_kw = p.base_kw + (self._peak_kw - p.base_kw) * modulation
        return max(0.0, aux_kw), modulation


def _gas_conditions(physics: DevicePhysics, now: datetime) -> None:
    """Set the gas temperature (near ambient) and line pressure of a gas meter."""
    local = now.astimezone(physics.tz)
    hour = local.hour + local.minute / 60.0
    winter = _winter_share(local)
    ambient = 16.0 + 10.0 * (1.0 - winter) - 8.0 * winter
    physics._set("temperature_degc", ambient + 4.0 * math.sin(2.0 * math.pi * (hour - 9.0) / 24.0))
    physics._set("pressure_bar", 0.3 + 0.01 * physics._noise(22, now, 60.0))


class PvInverterPhysics(DevicePhysics):
    """A PV inverter: clear-sky sun curve with passing clouds; ``peak_kw`` is its capacity.

    The writable ``power_limit_pct`` (of capacity) caps the output, as grid operators and
    curtailment rules use it; ``available_power_kw`` shows what the sun would give without it.
    """

    VARIABLES = (
        "active_power_kw",
        "available_power_kw",
        "energy_export_kwh",
        "irradiance_w_m2",
        "temperature_degc",
        *_ELECTRICAL,
    )
    SETPOINTS: ClassVar[Mapping[str, SetpointSpec]] = {"power_limit_pct": _POWER_LIMIT}

    def grid_import_kw(self) -> float:
        """Return minus the output: PV feeds the site."""
        return -self.physical_value("active_power_kw")

    def _init_counters(self) -> None:
        self._export_kwh = self._counter_start(200, 1_000.0, 300_000.0)
        self._last_power_kw: float | None = None

    def _compute(self, now: datetime, dt_h: float) -> None:
        p = self.params
        capacity_kw = max(p.peak_kw, p.base_kw)
        clear = clear_sky_irradiance_w_m2(now, self.tz)
        cloud = max(0.0, self._noise(11, now, 600.0)) ** 2  # clear about half the time, dips otherwise
        small = 1.0 + p.noise_pct / 100.0 * self._noise(12, now, 15.0)
        irradiance = self._set("irradiance_w_m2", max(0.0, clear * (1.0 - 0.75 * cloud) * small))
        available_kw = self._set("available_power_kw", min(capacity_kw, capacity_kw * irradiance / 1000.0))
        limit_kw = capacity_kw * self._setpoint("power_limit_pct") / 100.0
        power_kw = self._set("active_power_kw", max(0.0, min(available_kw, limit_kw)))
        ambient = 18.0 + 8.0 * (1.0 - _winter_share(now.astimezone(self.tz)))
        self._set("temperature_degc", ambient + irradiance / 40.0)
        self._electrical(now, power_kw, 0.99 if power_kw > 0 else 1.0)
        if dt_h > 0 and self._last_power_kw is not None:
            self._export_kwh += max(0.0, (self._last_power_kw + power_kw) / 2.0) * dt_h
        self._last_power_kw = power_kw  # a write or override holds from now on
        self._set("energy_export_kwh", self._export_kwh)


class GasMeterPhysics(DevicePhysics):
    """A natural-gas meter on a boiler feed: flow follows a shape, volume integrates it.

    ``gas_flow_nm3_h = base_nm3_h + (peak_nm3_h - base_nm3_h) * shape`` (``gas_boiler``: more
    in winter mornings and evenings); ``temperature_degc`` is the gas temperature, near ambient.
    """

    VARIABLES = ("gas_flow_nm3_h", "gas_volume_nm3", "temperature_degc", "pressure_bar")

    def _init_counters(self) -> None:
        self._volume_nm3 = self._counter_start(300, 5_000.0, 900_000.0)
        self._last_flow: float | None = None

    def _compute(self, now: datetime, dt_h: float) -> None:
        p = self.params
        local = now.astimezone(self.tz)
        peak = max(p.peak_nm3_h, p.base_nm3_h)
        shape = load_shape(p.profile if p.profile in LOAD_PROFILES else "gas_boiler", local)
        flow = (p.base_nm3_h + (peak - p.base_nm3_h) * shape) * (
            1.0 + p.noise_pct / 100.0 * self._noise(21, now, 20.0)
        )
        flow = self._set("gas_flow_nm3_h", max(0.0, flow))
        _gas_conditions(self, now)
        if dt_h > 0 and self._last_flow is not None:
            self._volume_nm3 += max(0.0, (self._last_flow + flow) / 2.0) * dt_h
        self._last_flow = flow  # a write or override holds from now on
        self._set("gas_volume_nm3", self._volume_nm3)


class BatteryPhysics(DevicePhysics):
    """A battery energy storage system following a power setpoint within its SOC window.

    ``power_setpoint_kw`` is **positive to discharge**, negative to charge (module docstring),
    clamped to ``-max_charge_kw .. +max_discharge_kw``; ``mode`` 0 is standby (the setpoint is
    held but not followed), 1 follows the setpoint. The stored energy integrates the power with
    the square root of ``round_trip_efficiency`` on each way in and out, and stops at the SOC
    window (``soc_min_pct`` .. ``soc_max_pct``): at a limit the actual ``active_power_kw`` drops
    to 0 while the setpoint still reads back what was written. ``capacity_kwh`` 0 means 100 kWh,
    and a power limit of 0 means half the capacity per hour.
    """

    VARIABLES = (
        "active_power_kw",
        "soc_pct",
        "stored_energy_kwh",
        "energy_charge_kwh",
        "energy_discharge_kwh",
        "energy_import_kwh",
        "energy_export_kwh",
        "max_charge_kw",
        "max_discharge_kw",
        "power_setpoint_kw",
        "mode",
        *_ELECTRICAL,
    )
    DEFAULT_CAPACITY_KWH: ClassVar[float] = 100.0

    def grid_import_kw(self) -> float:
        """Return minus the power: a discharging battery feeds the site, a charging one loads it."""
        return -self.physical_value("active_power_kw")

    @property
    def capacity_kwh(self) -> float:
        """Return the usable capacity (100 % SOC)."""
        return self.params.capacity_kwh or self.DEFAULT_CAPACITY_KWH

    def _limits_kw(self) -> tuple[float, float]:
        half = self.capacity_kwh / 2.0
        return self.params.max_charge_kw or half, self.params.max_discharge_kw or half

    def _setpoint_specs(self) -> Mapping[str, SetpointSpec]:
        charge_kw, discharge_kw = self._limits_kw()
        return {
            "power_setpoint_kw": SetpointSpec(0.0, -charge_kw, discharge_kw),
            "mode": SetpointSpec(1.0, 0.0, 1.0, integer=True),
        }

    def _init_counters(self) -> None:
        self._stored_kwh = self.capacity_kwh * self.params.initial_soc_pct / 100.0
        self._charge_kwh = self._counter_start(400, 1_000.0, 50_000.0)
        self._discharge_kwh = self._charge_kwh * self.params.round_trip_efficiency
        self._power_kw = 0.0

    def _compute(self, now: datetime, dt_h: float) -> None:
        p = self.params
        low_kwh = self.capacity_kwh * p.soc_min_pct / 100.0
        high_kwh = self.capacity_kwh * p.soc_max_pct / 100.0
        one_way = math.sqrt(p.round_trip_efficiency)
        if dt_h > 0 and self._power_kw > 0:  # the power in force since the last step
            drawn_kwh = min(self._power_kw * dt_h / one_way, max(0.0, self._stored_kwh - low_kwh))
            self._stored_kwh -= drawn_kwh
            self._discharge_kwh += drawn_kwh * one_way
        elif dt_h > 0 and self._power_kw < 0:
            stored_kwh = min(-self._power_kw * dt_h * one_way, max(0.0, high_kwh - self._stored_kwh))
            self._stored_kwh += stored_kwh
            self._charge_kwh += stored_kwh / one_way
        requested_kw = self._setpoint("power_setpoint_kw") if self._setpoint("mode") >= 1 else 0.0
        if (requested_kw > 0 and self._stored_kwh <= low_kwh + 1e-9) or (
            requested_kw < 0 and self._stored_kwh >= high_kwh - 1e-9
        ):
            requested_kw = 0.0  # the BMS stops at the SOC window
        self._power_kw = self._set("active_power_kw", requested_kw)
        charge_kw, discharge_kw = self._limits_kw()
        self._set("max_charge_kw", charge_kw if self._stored_kwh < high_kwh - 1e-9 else 0.0)
        self._set("max_discharge_kw", discharge_kw if self._stored_kwh > low_kwh + 1e-9 else 0.0)
        self._set("stored_energy_kwh", self._stored_kwh)
        self._set("soc_pct", 100.0 * self._stored_kwh / self.capacity_kwh)
        self._set("energy_charge_kwh", self._charge_kwh)
        self._set("energy_discharge_kwh", self._discharge_kwh)
        self._set("energy_import_kwh", self._charge_kwh)
        self._set("energy_export_kwh", self._discharge_kwh)
        self._electrical(now, self._power_kw, 0.99 if self._power_kw else 1.0)


class MainMeterPhysics(ElectricalLoadPhysics):
    """A grid main meter that adds up other devices (``sums``) plus an optional unmetered load.

    ``active_power_kw = profile load (base_kw..peak_kw) + sum(device.grid_import_kw())``: loads
    add, PV output and battery discharge subtract. Negative power (export) grows
    ``energy_export_kwh``. It sums the physics, not what the devices report: an anomaly injected
    on a sub-meter shows on that sub-meter only. The plant steps summed devices first.
    """

    def __init__(
        self,
        params: SimulationParams,
        *,
        tz: ZoneInfo,
        start: datetime,
        seed: int,
        name: str = "",
        parts: Sequence[DevicePhysics] = (),
    ) -> None:
        self.parts = tuple(parts)
        super().__init__(params, tz=tz, start=start, seed=seed, name=name)

    def _power_kw(self, now: datetime, dt_h: float) -> tuple[float, float]:
        residual_kw, shape = self._profile_kw(now)
        residual_kw = max(0.0, min(residual_kw, self._limit_kw())) if self._peak_kw > 0 else 0.0
        return residual_kw + sum(part.grid_import_kw() for part in self.parts), max(0.5, shape)


_BY_KIND: Final[Mapping[DeviceKind, type[DevicePhysics]]] = {
    DeviceKind.PV_INVERTER: PvInverterPhysics,
    DeviceKind.BATTERY: BatteryPhysics,
    DeviceKind.CHILLER: ChillerPhysics,
    DeviceKind.LIGHTING: LightingPhysics,
    DeviceKind.AIR_COMPRESSOR: AirCompressorPhysics,
    DeviceKind.BOILER: BoilerPhysics,
    DeviceKind.GAS_METER: GasMeterPhysics,
    DeviceKind.PRODUCTION_LINE: ProductionLinePhysics,
}


def make_physics(
    kind: DeviceKind | str,
    params: SimulationParams | None,
    *,
    tz: ZoneInfo,
    start: datetime,
    seed: int,
    name: str = "",
    parts: Sequence[DevicePhysics] = (),
) -> DevicePhysics:
    """Pick the physics for a device by its kind and profile.

    The ``pv`` profile makes a PV inverter of any kind; otherwise the kind decides (battery,
    chiller, lighting, air_compressor, boiler, gas_meter, production_line, pv_inverter); a
    power meter with ``sums`` adds up ``parts`` (the physics of the summed devices, in order);
    other kinds are a gas meter with the ``gas_boiler`` profile and an electrical load otherwise.
    Without a ``simulation`` section the device gets the default parameters (zero sizes).

    >>> from datetime import UTC, datetime
    >>> start = datetime(2026, 1, 5, tzinfo=UTC)
    >>> p = make_physics("pv_inverter", None, tz=ZoneInfo("UTC"), start=start, seed=1)
    >>> type(p).__name__
    'PvInverterPhysics'
    """
    kind = DeviceKind(kind)
    if params is None:
        default = {DeviceKind.PV_INVERTER: "pv", DeviceKind.GAS_METER: "gas_boiler"}.get(kind, "flat")
        params = SimulationParams(profile=default)
    if params.sums:
        if len(parts) != len(params.sums):
            raise ValueError(f"{name or kind}: sums {list(params.sums)} need the physics of those devices")
        return MainMeterPhysics(params, tz=tz, start=start, seed=seed, name=name, parts=parts)
    physics: type[DevicePhysics]
    if params.profile == "pv":
        physics = PvInverterPhysics
    elif kind in _BY_KIND:
        physics = _BY_KIND[kind]
    elif params.profile == "gas_boiler":
        physics = GasMeterPhysics
    else:
        physics = ElectricalLoadPhysics
    return physics(params, tz=tz, start=start, seed=seed, name=name)
