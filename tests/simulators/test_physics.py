"""Device physics: profile shapes in local time, sun curve, counters, determinism, overrides."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from simulators.physics import (
    LOAD_PROFILES,
    AirCompressorPhysics,
    BatteryPhysics,
    BoilerPhysics,
    ChillerPhysics,
    DevicePhysics,
    ElectricalLoadPhysics,
    GasMeterPhysics,
    LightingPhysics,
    ProductionLinePhysics,
    PvInverterPhysics,
    SimulationParams,
    load_shape,
    make_physics,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
WEDNESDAY = datetime(2026, 3, 4, tzinfo=SHANGHAI)  # local midnight
SUNDAY = datetime(2026, 3, 8, tzinfo=SHANGHAI)
MIDSUMMER = datetime(2026, 6, 21, tzinfo=SHANGHAI)


def at(day: datetime, hour: float) -> datetime:
    return (day + timedelta(hours=hour)).astimezone(UTC)


def load(
    profile: str,
    when: datetime,
    *,
    seed: int = 1,
    base_kw: float = 10.0,
    peak_kw: float = 100.0,
    noise_pct: float = 2.0,
) -> ElectricalLoadPhysics:
    params = SimulationParams(profile=profile, base_kw=base_kw, peak_kw=peak_kw, noise_pct=noise_pct)
    return ElectricalLoadPhysics(params, tz=SHANGHAI, start=when, seed=seed)


def power_at(profile: str, day: datetime, hour: float) -> float:
    return load(profile, at(day, hour)).value("active_power_kw")


def test_office_is_busy_at_ten_and_quiet_at_three_on_a_weekday() -> None:
    assert power_at("office", WEDNESDAY, 10) > 80
    assert power_at("office", WEDNESDAY, 3) < 15
    assert power_at("office", WEDNESDAY, 10) > 3 * power_at("office", SUNDAY, 10)


@pytest.mark.parametrize(
    ("profile", "busy", "quiet"),
    [
        ("production_2shift", (WEDNESDAY, 10), (WEDNESDAY, 2)),
        ("production_2shift", (WEDNESDAY, 20), (SUNDAY, 20)),
        ("production_3shift", (WEDNESDAY, 2), (SUNDAY, 2)),
        ("hvac", (WEDNESDAY, 15), (WEDNESDAY, 3)),
        ("lighting", (WEDNESDAY, 9), (WEDNESDAY, 23)),
    ],
)
def test_profile_shapes(profile: str, busy: tuple[datetime, float], quiet: tuple[datetime, float]) -> None:
    assert power_at(profile, *busy) > 1.3 * power_at(profile, *quiet)


def test_three_shifts_run_through_the_night_two_shifts_do_not() -> None:
    assert power_at("production_3shift", WEDNESDAY, 2) > 80
    assert power_at("production_2shift", WEDNESDAY, 2) < 15


@pytest.mark.parametrize("profile", sorted(LOAD_PROFILES))
def test_every_profile_stays_between_base_and_peak(profile: str) -> None:
    physics = load(profile, at(WEDNESDAY, 0))
    for step in range(7 * 24 * 4):  # a week, every 15 minutes
        physics.step(at(WEDNESDAY, step / 4))
        assert 10 * 0.98 - 1e-9 <= physics.value("active_power_kw") <= 100 * 1.02 + 1e-9  # 2 % noise


def test_the_site_time_zone_decides_the_shape() -> None:
    instant = at(WEDNESDAY, 10)  # 10:00 in Shanghai is 03:00 in Berlin
    params = SimulationParams(profile="office", base_kw=10, peak_kw=100, noise_pct=0)
    shanghai = ElectricalLoadPhysics(params, tz=SHANGHAI, start=instant, seed=1)
    berlin = ElectricalLoadPhysics(params, tz=ZoneInfo("Europe/Berlin"), start=instant, seed=1)
    assert shanghai.value("active_power_kw") > 90
    assert berlin.value("active_power_kw") == pytest.approx(10.0)


def test_meter_electrical_values_are_consistent() -> None:
    physics = load("flat", at(WEDNESDAY, 12), base_kw=120, peak_kw=120, noise_pct=0)
    p_kw = physics.value("active_power_kw")
    q_kvar = physics.value("reactive_power_kvar")
    pf = physics.value("power_factor")
    assert p_kw == pytest.approx(120.0)
    assert 0.9 < pf <= 1.0
    assert p_kw / math.hypot(p_kw, q_kvar) == pytest.approx(pf)
    assert physics.value("current_a") == pytest.approx(
        math.hypot(p_kw, q_kvar) * 1000 / (3 * physics.value("voltage_v"))
    )
    assert 225 < physics.value("voltage_v") < 235
    assert physics.value("frequency_hz") == pytest.approx(50.0, abs=0.05)
    phases = sum(physics.value(f"active_power_l{n}_kw") for n in (1, 2, 3))
    assert phases == pytest.approx(p_kw, rel=0.05)


def pv(when: datetime, *, peak_kw: float = 250.0) -> PvInverterPhysics:
    return PvInverterPhysics(
        SimulationParams(profile="pv", peak_kw=peak_kw), tz=SHANGHAI, start=when, seed=80
    )


@pytest.mark.parametrize("day", [WEDNESDAY, MIDSUMMER, datetime(2026, 12, 21, tzinfo=SHANGHAI)])
def test_pv_is_zero_at_night_and_positive_at_noon(day: datetime) -> None:
    for hour in (0, 3, 22):
        night = pv(at(day, hour))
        assert night.value("active_power_kw") == 0.0
        assert night.value("irradiance_w_m2") == 0.0
    noon = pv(at(day, 12))
    assert 0 < noon.value("active_power_kw") <= 250.0
    assert noon.value("irradiance_w_m2") > 100


def test_pv_summer_noon_beats_winter_noon_on_average() -> None:
    def mean_noon_kw(day: datetime) -> float:
        return sum(pv(at(day + timedelta(days=d), 12)).value("active_power_kw") for d in range(10)) / 10

    assert mean_noon_kw(MIDSUMMER) > mean_noon_kw(datetime(2026, 12, 15, tzinfo=SHANGHAI))


def test_pv_power_limit_caps_the_output() -> None:
    physics = pv(at(MIDSUMMER, 12))
    physics.override("irradiance_w_m2", 900.0)
    assert physics.value("active_power_kw") == pytest.approx(225.0)
    physics.write("power_limit_pct", 40.0)
    assert physics.value("power_limit_pct") == 40.0
    assert physics.value("active_power_kw") == pytest.approx(100.0)
    assert physics.value("available_power_kw") == pytest.approx(225.0)
    physics.write("power_limit_pct", 150.0)  # clamped, as an inverter does
    assert physics.value("power_limit_pct") == 100.0


def test_load_curtailment_through_power_limit() -> None:
    physics = load("flat", at(WEDNESDAY, 12), base_kw=80, peak_kw=80, noise_pct=0)
    physics.write("power_limit_pct", 25.0)
    assert physics.value("active_power_kw") == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("physics", "counter", "rate"),
    [
        (load("production_2shift", at(WEDNESDAY, 0)), "energy_import_kwh", "active_power_kw"),
        (pv(at(WEDNESDAY, 0)), "energy_export_kwh", "active_power_kw"),
        (
            GasMeterPhysics(
                SimulationParams(profile="gas_boiler", base_nm3_h=80, peak_nm3_h=260),
                tz=SHANGHAI,
                start=at(WEDNESDAY, 0),
                seed=7,
            ),
            "gas_volume_nm3",
            "gas_flow_nm3_h",
        ),
    ],
    ids=["meter", "pv", "gas"],
)
def test_counters_are_monotonic_and_integrate_the_rate(
    physics: DevicePhysics, counter: str, rate: str
) -> None:
    start_value = physics.value(counter)
    previous, integral = start_value, 0.0
    last_rate = physics.value(rate)
    for minute in range(10, 2 * 24 * 60 + 1, 10):  # two days, every 10 simulated minutes
        physics.step(at(WEDNESDAY, minute / 60))
        value = physics.value(counter)
        assert value >= previous
        integral += (last_rate + physics.value(rate)) / 2 * (10 / 60)
        last_rate, previous = physics.value(rate), value
    assert previous - start_value == pytest.approx(integral, rel=1e-9)
    assert previous > start_value


def test_gas_meter_variables() -> None:
    physics = make_physics(
        "gas_meter",
        SimulationParams(profile="gas_boiler", base_nm3_h=80, peak_nm3_h=260, noise_pct=0),
        tz=SHANGHAI,
        start=at(datetime(2026, 1, 14, tzinfo=SHANGHAI), 7),
        seed=3,
    )
    assert isinstance(physics, GasMeterPhysics)
    assert 200 < physics.value("gas_flow_nm3_h") <= 260  # a winter morning
    assert -10 < physics.value("temperature_degc") < 40


def test_same_seed_same_values_other_seed_other_values() -> None:
    def run(seed: int) -> dict[str, float]:
        physics = load("office", at(WEDNESDAY, 6), seed=seed)
        for minute in range(0, 6 * 60, 7):
            physics.step(at(WEDNESDAY, 6 + minute / 60))
        return physics.snapshot()

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_override_pins_a_variable_until_cleared() -> None:
    physics = load("flat", at(WEDNESDAY, 12), base_kw=50, peak_kw=50, noise_pct=0)
    revision = physics.revision
    physics.override("active_power_kw", 75.0)
    assert physics.revision > revision
    physics.step(at(WEDNESDAY, 13))
    assert physics.value("active_power_kw") == 75.0
    assert physics.value("current_a") > 75.0 * 1000 / (3 * 240)  # derived values follow the override
    physics.clear_override("active_power_kw")
    assert physics.value("active_power_kw") == pytest.approx(50.0)


def test_unknown_key_is_zero_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    physics = load("flat", at(WEDNESDAY, 12))
    with caplog.at_level(logging.WARNING, logger="simulators.physics"):
        assert physics.value("state_of_charge_pct") == 0.0
        assert physics.value("state_of_charge_pct") == 0.0
    assert caplog.text.count("state_of_charge_pct") == 1
    physics.write("state_of_charge_pct", 55.0)  # unmodelled setpoints read back what was written
    assert physics.value("state_of_charge_pct") == 55.0


@pytest.mark.parametrize(
    ("kind", "profile", "expected"),
    [
        ("pv_inverter", "flat", PvInverterPhysics),
        ("power_meter", "pv", PvInverterPhysics),
        ("gas_meter", "flat", GasMeterPhysics),
        ("heat_meter", "gas_boiler", GasMeterPhysics),
        ("power_meter", "office", ElectricalLoadPhysics),
        ("weather_station", "flat", ElectricalLoadPhysics),
        ("boiler", "gas_boiler", BoilerPhysics),
        ("chiller", "hvac", ChillerPhysics),
        ("battery", "flat", BatteryPhysics),
        ("lighting", "lighting", LightingPhysics),
        ("air_compressor", "production_3shift", AirCompressorPhysics),
        ("production_line", "production_2shift", ProductionLinePhysics),
    ],
)
def test_make_physics_picks_by_kind_and_profile(
    kind: str, profile: str, expected: type[DevicePhysics]
) -> None:
    physics = make_physics(
        kind, SimulationParams(profile=profile), tz=SHANGHAI, start=at(WEDNESDAY, 12), seed=1
    )
    assert type(physics) is expected


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown profile 'disco'"):
        SimulationParams(profile="disco")


def test_load_shape_is_between_zero_and_one() -> None:
    for profile in LOAD_PROFILES:
        for hour in range(0, 24 * 7 * 2):
            shape = load_shape(profile, (WEDNESDAY + timedelta(minutes=30 * hour)).astimezone(SHANGHAI))
            assert 0.0 <= shape <= 1.0, (profile, hour, shape)
