"""Deterministic device physics: named engineering variables of one device over simulated time.

A physics object is stepped to a simulated instant (:meth:`DevicePhysics.step`) and answers the
value of a variable by name (:meth:`DevicePhysics.value`); the names are the point keys of the site
file, so a point ``active_power_kw`` shows the variable ``active_power_kw``.

Everything is a pure function of (seed, simulated time) except the counters, which integrate power
or flow between steps. Two objects with the same parameters, stepped at the same instants, give the
same values, so tests can assert on shapes and a demo looks the same every day it starts.

Load shapes follow the site's time zone: an office draws its peak at 10:00 local time on a weekday,
not at 10:00 UTC. PV follows a clear-sky sun curve for the zone (latitude 31.2 N, east China, is
assumed: the site file has no coordinates) with passing clouds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Final
from zoneinfo import ZoneInfo

from scada.model import DeviceKind

__all__ = [
    "LOAD_PROFILES",
    "PROFILES",
    "DevicePhysics",
    "ElectricalLoadPhysics",
    "GasMeterPhysics",
    "PvInverterPhysics",
    "SimulationParams",
    "clear_sky_irradiance_w_m2",
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


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationParams:
    """Physics parameters of one device, as in the site file's ``simulation`` section."""

    profile: str = "flat"
    base_kw: float = 0.0
    peak_kw: float = 0.0
    base_nm3_h: float = 0.0
    peak_nm3_h: float = 0.0
    capacity_kwh: float = 0.0
    noise_pct: float = 2.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r} (use {', '.join(sorted(PROFILES))})")
        for name in ("base_kw", "peak_kw", "base_nm3_h", "peak_nm3_h", "capacity_kwh", "noise_pct"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")


# --------------------------------------------------------------------------------------------------
# Pure helpers: noise, smooth steps, load shapes, the sun


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _hash_unit(seed: int, channel: int, index: int) -> float:
    """Return a reproducible pseudo-random number in [-1, 1) for (seed, channel, index)."""
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
    a = _hash_unit(seed, channel, index)
    b = _hash_unit(seed, channel, index + 1)
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
    written), else 0.0 with a one-time warning.
    """

    VARIABLES: ClassVar[tuple[str, ...]] = ()
    """Variables the physics computes."""
    SETPOINTS: ClassVar[Mapping[str, tuple[float, float, float]]] = {}
    """Writable variables the physics models: name -> (default, min, max); writes are clamped."""

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
        self._written: dict[str, float] = {key: default for key, (default, _, _) in self.SETPOINTS.items()}
        self._warned: set[str] = set()
        self._now = start
        self._init_counters()
        self._compute(start, 0.0)

    @property
    def now(self) -> datetime:
        """Return the simulated instant of the last step."""
        return self._now

    def step(self, now: datetime) -> None:
        """Advance to simulated time ``now``; counters integrate over the elapsed time."""
        dt_h = max(0.0, (now - self._now).total_seconds() / 3600.0)
        self._compute(now, dt_h)
        self._now = max(now, self._now)
        self.revision += 1

    def value(self, key: str) -> float:
        """Return the current value of a variable (0.0, with a one-time warning, if unknown)."""
        if key in self._overrides:
            return self._overrides[key]
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

    def knows(self, key: str) -> bool:
        """Return True if the physics computes or models ``key``."""
        return key in self.VARIABLES or key in self.SETPOINTS

    def write(self, key: str, value: float) -> None:
        """Accept a value written to a writable point; modelled setpoints are clamped to range."""
        if key in self.SETPOINTS:
            _, low, high = self.SETPOINTS[key]
            value = min(high, max(low, value))
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

    # ----------------------------------------------------------------------------------------------
    # For subclasses

    def _init_counters(self) -> None:
        """Set counters to their (seeded) starting readings."""

    def _compute(self, now: datetime, dt_h: float) -> None:
        raise NotImplementedError

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
        return low + (high - low) * 0.5 * (1.0 + _hash_unit(self.seed, channel, 0))

    def _setpoint(self, key: str) -> float:
        return self._overrides.get(key, self._written[key])

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


class ElectricalLoadPhysics(DevicePhysics):
    """A metered three-phase load (feeder, line, HVAC, lighting...) following a load profile.

    ``active_power_kw = base_kw + (peak_kw - base_kw) * shape(profile, local time)`` with
    ``noise_pct`` of smooth noise, capped by the writable ``power_limit_pct`` of ``peak_kw``
    (curtailment); the power factor improves with load; energy counters integrate the power.
    """

    VARIABLES = ("active_power_kw", "energy_import_kwh", "energy_export_kwh", *_ELECTRICAL)
    SETPOINTS: ClassVar[Mapping[str, tuple[float, float, float]]] = {"power_limit_pct": (100.0, 0.0, 100.0)}

    def _init_counters(self) -> None:
        self._import_kwh = self._counter_start(100, 10_000.0, 500_000.0)
        self._export_kwh = 0.0
        self._last_power_kw: float | None = None

    def _compute(self, now: datetime, dt_h: float) -> None:
        p = self.params
        peak_kw = max(p.peak_kw, p.base_kw)
        shape = load_shape(p.profile, now.astimezone(self.tz))
        target_kw = p.base_kw + (peak_kw - p.base_kw) * shape
        target_kw *= 1.0 + p.noise_pct / 100.0 * self._noise(1, now, 20.0)
        target_kw = min(target_kw, peak_kw * self._setpoint("power_limit_pct") / 100.0)
        power_kw = self._set("active_power_kw", max(0.0, target_kw))
        self._electrical(now, power_kw, 0.90 + 0.07 * shape + 0.01 * self._noise(2, now, 90.0))
        if dt_h > 0 and self._last_power_kw is not None:
            mean_kw = (self._last_power_kw + power_kw) / 2.0
            self._import_kwh += max(0.0, mean_kw) * dt_h
            self._export_kwh += max(0.0, -mean_kw) * dt_h
        if dt_h > 0 or self._last_power_kw is None:
            self._last_power_kw = power_kw
        self._set("energy_import_kwh", self._import_kwh)
        self._set("energy_export_kwh", self._export_kwh)


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
    SETPOINTS: ClassVar[Mapping[str, tuple[float, float, float]]] = {"power_limit_pct": (100.0, 0.0, 100.0)}

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
        if dt_h > 0 or self._last_power_kw is None:
            self._last_power_kw = power_kw
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
        hour = local.hour + local.minute / 60.0
        ambient = 16.0 + 10.0 * (1.0 - _winter_share(local)) - 8.0 * _winter_share(local)
        self._set("temperature_degc", ambient + 4.0 * math.sin(2.0 * math.pi * (hour - 9.0) / 24.0))
        self._set("pressure_bar", 0.3 + 0.01 * self._noise(22, now, 60.0))
        if dt_h > 0 and self._last_flow is not None:
            self._volume_nm3 += max(0.0, (self._last_flow + flow) / 2.0) * dt_h
        if dt_h > 0 or self._last_flow is None:
            self._last_flow = flow
        self._set("gas_volume_nm3", self._volume_nm3)


def make_physics(
    kind: DeviceKind | str,
    params: SimulationParams | None,
    *,
    tz: ZoneInfo,
    start: datetime,
    seed: int,
    name: str = "",
) -> DevicePhysics:
    """Pick the physics for a device by its kind and profile.

    PV for inverters and the ``pv`` profile, gas for gas meters and the ``gas_boiler`` profile, an
    electrical load for everything else. Without a ``simulation`` section the device gets the
    default parameters (zero sizes) of the physics its kind implies.

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
    physics: type[DevicePhysics]
    if kind is DeviceKind.PV_INVERTER or params.profile == "pv":
        physics = PvInverterPhysics
    elif kind is DeviceKind.GAS_METER or params.profile == "gas_boiler":
        physics = GasMeterPhysics
    else:
        physics = ElectricalLoadPhysics
    return physics(params, tz=tz, start=start, seed=seed, name=name)
