"""Device physics that answers commands: battery, chiller, lighting, compressor, boiler, line, main meter."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from simulators.physics import (
    NATURAL_GAS_NCV_GJ_PER_NM3,
    AirCompressorPhysics,
    BatteryPhysics,
    BoilerPhysics,
    ChillerPhysics,
    DevicePhysics,
    ElectricalLoadPhysics,
    JobSpec,
    LightingPhysics,
    MainMeterPhysics,
    ProductionLinePhysics,
    PvInverterPhysics,
    SimulationParams,
    make_physics,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
WEDNESDAY = datetime(2026, 3, 4, tzinfo=SHANGHAI)  # local midnight
SATURDAY = datetime(2026, 3, 7, tzinfo=SHANGHAI)


def at(day: datetime, hour: float) -> datetime:
    return (day + timedelta(hours=hour)).astimezone(UTC)


def run(physics: DevicePhysics, until: datetime, *, every_s: float = 60.0) -> None:
    """Step ``physics`` from where it is to ``until`` every ``every_s`` simulated seconds."""
    now = physics.now
    while now < until:
        now = min(until, now + timedelta(seconds=every_s))
        physics.step(now)


def battery(**kwargs: float) -> BatteryPhysics:
    params = SimulationParams(capacity_kwh=100.0, max_charge_kw=50.0, max_discharge_kw=40.0, **kwargs)  # type: ignore[arg-type]
    return BatteryPhysics(params, tz=SHANGHAI, start=at(WEDNESDAY, 12), seed=1)


# --------------------------------------------------------------------------------------------------
# Battery


def test_battery_charges_to_the_soc_limit_then_stops() -> None:
    ess = battery(initial_soc_pct=50.0)
    charged_before = ess.value("energy_charge_kwh")
    ess.write("power_setpoint_kw", -50.0)  # negative: charge
    assert ess.value("active_power_kw") == -50.0
    assert ess.grid_import_kw() == 50.0  # charging loads the site
    run(ess, at(WEDNESDAY, 14))  # 40 kWh of room at 50 kW x sqrt(0.9) takes 51 minutes
    assert ess.value("soc_pct") == pytest.approx(90.0)
    assert ess.value("active_power_kw") == 0.0  # the BMS stopped at the SOC window...
    assert ess.value("power_setpoint_kw") == -50.0  # ...while the setpoint reads back as written
    assert ess.value("max_charge_kw") == 0.0
    assert ess.value("energy_charge_kwh") - charged_before == pytest.approx(40.0 / math.sqrt(0.9))


def test_battery_discharges_to_the_soc_floor_and_loses_the_round_trip() -> None:
    ess = battery(initial_soc_pct=90.0)
    discharged_before = ess.value("energy_discharge_kwh")
    ess.write("power_setpoint_kw", 40.0)  # positive: discharge
    assert ess.grid_import_kw() == -40.0
    run(ess, at(WEDNESDAY, 12.5))
    assert ess.value("soc_pct") == pytest.approx(90.0 - 20.0 / math.sqrt(0.9))  # 20 kWh out at the AC side
    run(ess, at(WEDNESDAY, 16))
    assert ess.value("soc_pct") == pytest.approx(10.0)
    assert ess.value("active_power_kw") == 0.0
    assert ess.value("max_discharge_kw") == 0.0
    assert ess.value("energy_discharge_kwh") - discharged_before == pytest.approx(80.0 * math.sqrt(0.9))


def test_battery_soc_follows_power_over_an_hour() -> None:
    ess = battery(initial_soc_pct=50.0)
    ess.write("power_setpoint_kw", -20.0)
    run(ess, at(WEDNESDAY, 13), every_s=7.0)
    assert ess.value("soc_pct") == pytest.approx(50.0 + 20.0 * math.sqrt(0.9))


@pytest.mark.parametrize(
    ("written", "held"),
    [(500.0, 40.0), (-500.0, -50.0), (12.5, 12.5), (math.nan, 0.0), (math.inf, 0.0)],
)
def test_battery_setpoint_is_clamped_to_its_power_limits(written: float, held: float) -> None:
    ess = battery()
    ess.write("power_setpoint_kw", written)
    assert ess.value("power_setpoint_kw") == held
    assert ess.value("active_power_kw") == held


def test_battery_in_standby_holds_its_charge() -> None:
    ess = battery(initial_soc_pct=50.0)
    ess.write("power_setpoint_kw", 30.0)
    ess.write("mode", 0.2)  # rounds to 0: standby
    assert ess.value("mode") == 0.0
    assert ess.value("active_power_kw") == 0.0
    run(ess, at(WEDNESDAY, 13))
    assert ess.value("soc_pct") == pytest.approx(50.0)
    ess.write("mode", 7.0)  # clamps to 1: follow the setpoint
    assert ess.value("mode") == 1.0
    assert ess.value("active_power_kw") == 30.0


# --------------------------------------------------------------------------------------------------
# Chiller


def chiller(start: datetime, **kwargs: float | str) -> ChillerPhysics:
    fields = {"profile": "flat", "base_kw": 100.0, "peak_kw": 100.0, "noise_pct": 0.0, **kwargs}
    return ChillerPhysics(SimulationParams(**fields), tz=SHANGHAI, start=start, seed=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("every_s", [10.0, 60.0, 300.0])
def test_chiller_setpoint_acts_through_a_first_order_lag(every_s: float) -> None:
    unit = chiller(at(WEDNESDAY, 12))
    assert unit.value("active_power_kw") == pytest.approx(100.0)
    unit.write("supply_temp_setpoint_degc", 10.0)
    assert unit.value("supply_temp_setpoint_degc") == 10.0
    assert unit.value("supply_temp_degc") == pytest.approx(7.0)  # no jump
    assert unit.value("active_power_kw") == pytest.approx(100.0)
    run(unit, at(WEDNESDAY, 12.25), every_s=every_s)  # one time constant (15 min)
    rise_degc = 3.0 * (1.0 - math.exp(-1.0))
    assert unit.value("supply_temp_degc") == pytest.approx(7.0 + rise_degc)
    assert unit.value("active_power_kw") == pytest.approx(100.0 * (1.0 - 0.03 * rise_degc))
    run(unit, at(WEDNESDAY, 14), every_s=every_s)
    assert unit.value("supply_temp_degc") == pytest.approx(10.0, abs=0.01)
    assert unit.value("active_power_kw") == pytest.approx(91.0, abs=0.05)  # 3 % per degree
    assert unit.value("cooling_load_kw") == pytest.approx(500.0, abs=0.5)  # same cooling, better COP


def test_chiller_setpoint_writes_are_clamped() -> None:
    unit = chiller(at(WEDNESDAY, 12))
    unit.write("supply_temp_setpoint_degc", 30.0)
    assert unit.value("supply_temp_setpoint_degc") == 15.0
    unit.write("supply_temp_setpoint_degc", 0.0)
    assert unit.value("supply_temp_setpoint_degc") == 5.0


def test_chiller_load_lags_the_profile() -> None:
    unit = chiller(at(WEDNESDAY, 6), profile="office", base_kw=10.0, peak_kw=110.0)
    plain = ElectricalLoadPhysics(
        SimulationParams(profile="office", base_kw=10.0, peak_kw=110.0, noise_pct=0.0),
        tz=SHANGHAI,
        start=at(WEDNESDAY, 6),
        seed=1,
    )
    run(unit, at(WEDNESDAY, 8.5))
    run(plain, at(WEDNESDAY, 8.5))
    assert unit.value("active_power_kw") < plain.value("active_power_kw") - 10  # morning ramp: still behind
    run(unit, at(WEDNESDAY, 11))
    run(plain, at(WEDNESDAY, 11))
    assert unit.value("active_power_kw") == pytest.approx(plain.value("active_power_kw"), rel=0.02)


# --------------------------------------------------------------------------------------------------
# Lighting


@pytest.mark.parametrize(
    ("dim_pct", "power_kw"),
    [(100.0, 22.0), (50.0, 2.0 + 20.0 * 0.55), (10.0, 2.0 + 20.0 * 0.19), (0.0, 2.0), (150.0, 22.0)],
)
def test_dim_level_sets_lighting_power_with_a_ballast_minimum(dim_pct: float, power_kw: float) -> None:
    lights = LightingPhysics(
        SimulationParams(profile="flat", base_kw=2.0, peak_kw=22.0, noise_pct=0.0),
        tz=SHANGHAI,
        start=at(WEDNESDAY, 10),
        seed=1,
    )
    lights.write("dim_level_pct", dim_pct)
    assert lights.value("dim_level_pct") == min(100.0, dim_pct)
    assert lights.value("active_power_kw") == pytest.approx(power_kw)


def test_lighting_follows_its_profile_at_any_dim_level() -> None:
    params = SimulationParams(profile="lighting", base_kw=1.0, peak_kw=21.0, noise_pct=0.0)
    lights = LightingPhysics(params, tz=SHANGHAI, start=at(WEDNESDAY, 9), seed=1)
    lights.write("dim_level_pct", 60.0)
    day_kw = lights.value("active_power_kw")
    run(lights, at(WEDNESDAY, 23), every_s=600.0)
    assert day_kw > 10.0
    assert lights.value("active_power_kw") == pytest.approx(1.0, abs=0.01)


# --------------------------------------------------------------------------------------------------
# Air compressor


def compressor(start: datetime) -> AirCompressorPhysics:
    params = SimulationParams(profile="flat", base_kw=25.0, peak_kw=75.0, noise_pct=0.0)
    return AirCompressorPhysics(params, tz=SHANGHAI, start=start, seed=1)


def test_compressor_cycles_within_its_pressure_band() -> None:
    unit = compressor(at(WEDNESDAY, 10))
    pressures, states = [], []
    for second in range(10, 3600 + 1, 10):
        unit.step(at(WEDNESDAY, 10 + second / 3600))
        pressures.append(unit.value("pressure_bar"))
        states.append(unit.value("loaded"))
        assert unit.value("active_power_kw") == (75.0 if states[-1] else 25.0)
    assert 6.5 - 1e-9 <= min(pressures) < 6.6
    assert 7.4 < max(pressures) <= 7.5 + 1e-9
    loads = sum(1 for a, b in itertools.pairwise(states) if b > a)
    assert 6 <= loads <= 9  # a 1 bar band at 85 % demand: one cycle every 7.8 minutes


def test_compressor_energy_is_exact_whatever_the_tick() -> None:
    energies = []
    for every_s in (1.0, 45.0, 900.0):
        unit = compressor(at(WEDNESDAY, 10))
        before = unit.value("energy_import_kwh")
        run(unit, at(WEDNESDAY, 12), every_s=every_s)
        energies.append(unit.value("energy_import_kwh") - before)
    # 85 % loaded over two hours, but for the start at the setpoint (a loaded climb of 0.5 bar)
    assert energies[0] == pytest.approx(2 * (25.0 + 50.0 * 0.85), rel=0.01)
    assert energies[1] == pytest.approx(energies[0], rel=1e-9)
    assert energies[2] == pytest.approx(energies[0], rel=1e-9)


def test_compressor_setpoint_moves_the_band_and_the_power() -> None:
    unit = compressor(at(WEDNESDAY, 10))
    unit.write("pressure_setpoint_bar", 8.0)
    run(unit, at(WEDNESDAY, 11), every_s=5.0)
    pressures = []
    for second in range(5, 1800, 5):
        unit.step(at(WEDNESDAY, 11 + second / 3600))
        pressures.append(unit.value("pressure_bar"))
        if unit.value("loaded"):
            assert unit.value("active_power_kw") == pytest.approx(75.0 * 1.07)
    assert min(pressures) >= 7.5 - 1e-9
    assert max(pressures) <= 8.5 + 1e-9
    unit.write("pressure_setpoint_bar", 12.0)
    assert unit.value("pressure_setpoint_bar") == 10.0


# --------------------------------------------------------------------------------------------------
# Gas boiler


def boiler(**kwargs: float) -> BoilerPhysics:
    fields = {"profile": "flat", "base_nm3_h": 20.0, "peak_nm3_h": 220.0, "base_kw": 5.0, "peak_kw": 15.0}
    params = SimulationParams(**(fields | {"noise_pct": 0.0} | kwargs))  # type: ignore[arg-type]
    return BoilerPhysics(params, tz=SHANGHAI, start=at(WEDNESDAY, 6), seed=4)


def test_boiler_heat_setpoint_caps_the_firing_rate() -> None:
    unit = boiler()
    assert unit.value("gas_flow_nm3_h") == pytest.approx(220.0)
    unit.write("heat_setpoint_pct", 30.0)
    assert unit.value("gas_flow_nm3_h") == pytest.approx(20.0 + 200.0 * 0.3)
    assert unit.value("active_power_kw") == pytest.approx(5.0 + 10.0 * 0.3)
    assert unit.value("heat_output_gj_h") == pytest.approx(80.0 * NATURAL_GAS_NCV_GJ_PER_NM3 * 0.92)
    assert unit.value("firing_pct") == pytest.approx(100.0 * 80.0 / 220.0)


def test_boiler_counters_integrate_flow_and_stop_when_disabled() -> None:
    unit = boiler()
    unit.write("heat_setpoint_pct", 50.0)
    volume, heat = unit.value("gas_volume_nm3"), unit.value("heat_energy_gj")
    run(unit, at(WEDNESDAY, 8))
    assert unit.value("gas_volume_nm3") - volume == pytest.approx(2 * 120.0)
    assert unit.value("heat_energy_gj") - heat == pytest.approx(2 * 120.0 * NATURAL_GAS_NCV_GJ_PER_NM3 * 0.92)
    unit.write("enabled", 0.0)
    assert unit.value("gas_flow_nm3_h") == 0.0
    assert unit.value("active_power_kw") == pytest.approx(5.0)  # auxiliaries stay on
    run(unit, at(WEDNESDAY, 9))
    assert unit.value("gas_volume_nm3") - volume == pytest.approx(2 * 120.0)


# --------------------------------------------------------------------------------------------------
# Production line with shiftable jobs


def line(start: datetime, **kwargs: object) -> ProductionLinePhysics:
    params = SimulationParams(
        profile="flat",
        base_kw=20.0,
        peak_kw=20.0,
        noise_pct=0.0,
        jobs=(JobSpec(start_hour=9.0, duration_h=2.0, power_kw=150.0),),
        **kwargs,  # type: ignore[arg-type]
    )
    return ProductionLinePhysics(params, tz=SHANGHAI, start=start, seed=1)


def energy_by_hour(physics: DevicePhysics, day: datetime, hours: range) -> list[float]:
    out = []
    for hour in hours:
        before = physics.value("energy_import_kwh")
        run(physics, at(day, hour + 1), every_s=137.0)  # a tick that does not divide the hour
        out.append(physics.value("energy_import_kwh") - before)
    return out


def test_jobs_run_at_their_planned_hour() -> None:
    unit = line(at(WEDNESDAY, 8))
    assert unit.value("next_job_start_hour") == 9.0
    assert unit.value("job_running") == 0.0
    energy = energy_by_hour(unit, WEDNESDAY, range(8, 14))
    assert energy == pytest.approx([20.0, 170.0, 170.0, 20.0, 20.0, 20.0])


def test_a_delay_moves_the_job_energy_into_later_hours() -> None:
    unit = line(at(WEDNESDAY, 8))
    unit.write("job_start_delay_min", 180.0)  # into the PV peak
    assert unit.value("job_start_delay_min") == 180.0
    assert unit.value("next_job_start_hour") == 12.0
    energy = energy_by_hour(unit, WEDNESDAY, range(8, 15))
    assert energy == pytest.approx([20.0, 20.0, 20.0, 20.0, 170.0, 170.0, 20.0])


def test_a_running_job_finishes_where_it_is() -> None:
    unit = line(at(WEDNESDAY, 8))
    run(unit, at(WEDNESDAY, 10))
    assert unit.value("job_running") == 1.0
    assert unit.value("active_power_kw") == pytest.approx(170.0)
    unit.write("job_start_delay_min", 120.0)
    assert unit.value("job_running") == 1.0
    run(unit, at(WEDNESDAY, 11.01))
    assert unit.value("job_running") == 0.0
    assert unit.value("active_power_kw") == pytest.approx(20.0)


def test_a_held_job_starts_as_soon_as_the_delay_is_lifted() -> None:
    unit = line(at(WEDNESDAY, 8))
    unit.write("job_start_delay_min", 600.0)
    run(unit, at(WEDNESDAY, 12))
    assert unit.value("job_running") == 0.0
    unit.write("job_start_delay_min", 0.0)
    assert unit.value("job_running") == 1.0  # its planned start (09:00) has passed: run now
    run(unit, at(WEDNESDAY, 13.99))
    assert unit.value("job_running") == 1.0
    run(unit, at(WEDNESDAY, 14.01))
    assert unit.value("job_running") == 0.0


@pytest.mark.parametrize(("start_hour", "running"), [(10.0, 1.0), (12.0, 0.0)])
def test_a_plant_started_mid_day_runs_only_the_jobs_still_in_progress(
    start_hour: float, running: float
) -> None:
    unit = line(at(WEDNESDAY, start_hour))
    assert unit.value("job_running") == running
    assert unit.value("next_job_start_hour") == 9.0  # tomorrow's


def test_workday_jobs_skip_the_weekend() -> None:
    unit = line(at(SATURDAY, 8))
    assert energy_by_hour(unit, SATURDAY, range(8, 12)) == pytest.approx([20.0] * 4)


# --------------------------------------------------------------------------------------------------
# Main meter, sign convention, documents written for older simulators


def test_main_meter_sums_loads_minus_pv_and_battery() -> None:
    start = at(WEDNESDAY, 11)
    load = ElectricalLoadPhysics(
        SimulationParams(profile="office", base_kw=50, peak_kw=400), tz=SHANGHAI, start=start, seed=2
    )
    pv = PvInverterPhysics(SimulationParams(profile="pv", peak_kw=300), tz=SHANGHAI, start=start, seed=3)
    ess = battery()
    ess.write("power_setpoint_kw", 30.0)
    meter = make_physics(
        "power_meter",
        SimulationParams(sums=("load", "pv", "ess"), base_kw=20, peak_kw=20, noise_pct=0.0),
        tz=SHANGHAI,
        start=start,
        seed=4,
        parts=(load, pv, ess),
    )
    assert isinstance(meter, MainMeterPhysics)
    before_kwh = meter.value("energy_import_kwh")
    for minute in range(1, 121):
        now = start + timedelta(minutes=minute)
        for device in (load, pv, ess, meter):
            device.step(now)
        expected = 20.0 + load.value("active_power_kw") - pv.value("active_power_kw") - 30.0
        assert meter.value("active_power_kw") == pytest.approx(expected)
    assert meter.value("energy_import_kwh") > before_kwh


def test_a_summing_meter_needs_its_parts() -> None:
    with pytest.raises(ValueError, match="sums"):
        make_physics(
            "power_meter", SimulationParams(sums=("a",)), tz=SHANGHAI, start=at(WEDNESDAY, 1), seed=1
        )


METER_KEYS = (
    "voltage_v",
    "current_a",
    "active_power_kw",
    "reactive_power_kvar",
    "power_factor",
    "frequency_hz",
    "energy_import_kwh",
)


@pytest.mark.parametrize(
    "kind", ["chiller", "lighting", "air_compressor", "boiler", "production_line", "battery", "power_meter"]
)
def test_every_electrical_kind_still_serves_a_three_phase_meter(kind: str) -> None:
    """Old site files put the ``meter_3ph`` template on chillers, compressors, boilers..."""
    params = SimulationParams(profile="production_3shift", base_kw=45, peak_kw=75)
    physics = make_physics(kind, params, tz=SHANGHAI, start=at(WEDNESDAY, 10), seed=5)
    for key in METER_KEYS:
        assert physics.knows(key), key
    run(physics, at(WEDNESDAY, 11))
    assert 220 < physics.value("voltage_v") < 240
    if kind != "battery":
        assert 20 < physics.value("active_power_kw") < 90


@pytest.mark.parametrize(
    ("kind", "key", "written", "held"),
    [
        ("chiller", "supply_temp_setpoint_degc", 99.0, 15.0),
        ("lighting", "dim_level_pct", -5.0, 0.0),
        ("air_compressor", "pressure_setpoint_bar", 1.0, 4.0),
        ("boiler", "heat_setpoint_pct", 140.0, 100.0),
        ("boiler", "enabled", 3.0, 1.0),
        ("production_line", "job_start_delay_min", 5000.0, 1440.0),
        ("battery", "power_setpoint_kw", -1e6, -50.0),
        ("pv_inverter", "power_limit_pct", 120.0, 100.0),
    ],
)
def test_writes_read_back_what_the_device_holds(kind: str, key: str, written: float, held: float) -> None:
    physics = make_physics(
        kind, SimulationParams(capacity_kwh=100.0), tz=SHANGHAI, start=at(WEDNESDAY, 10), seed=5
    )
    assert key in physics.setpoints
    physics.write(key, written)
    assert physics.value(key) == held


@pytest.mark.parametrize("kind", ["chiller", "air_compressor", "production_line", "battery", "boiler"])
def test_stateful_physics_is_deterministic(kind: str) -> None:
    def replay() -> dict[str, float]:
        params = SimulationParams(
            profile="office",
            base_kw=20,
            peak_kw=80,
            base_nm3_h=10,
            peak_nm3_h=90,
            jobs=(JobSpec(start_hour=10, duration_h=1, power_kw=40),),
        )
        physics = make_physics(kind, params, tz=SHANGHAI, start=at(WEDNESDAY, 6), seed=9)
        for minute in range(0, 8 * 60, 3):
            physics.step(at(WEDNESDAY, 6 + minute / 60))
            if minute == 120:
                for key, spec in physics.setpoints.items():
                    physics.write(key, (spec.low + spec.high) / 2)
        return physics.snapshot()

    assert replay() == replay()
