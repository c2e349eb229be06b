"""Emission factor library: GB/T 32150 arithmetic, packaged data, validity, overrides, export, errors."""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_engine.factors import CSV_COLUMNS, FactorLibrary, fuel_factor
from scada.model import Carrier, ConfigError, NotFound

PACKAGED = Path(__file__).resolve().parents[2] / "control_engine" / "data" / "emission_factors.yaml"
BEIJING = timezone(timedelta(hours=8))


@pytest.fixture(scope="module")
def library() -> FactorLibrary:
    return FactorLibrary.load()


# ------------------------------------------------------------------------------------------------
# GB/T 32150: NCV x CC x OF x 44/12, hand-computed references

# Each reference is computed by hand from the parameters (tC/TJ == kgC/GJ):
FUEL_REFERENCES = [
    # 389.31 GJ/10^4 Nm3 = 0.038931 GJ/Nm3; 0.038931 x 15.3 = 0.5956443; x 0.99 = 0.589687857;
    # x 44/12 = 2.162188809 kgCO2/Nm3
    ("natural-gas-default", Carrier.NATURAL_GAS, 2.162188809, "kgCO2/Nm3"),
    # 42.652 x 20.2 = 861.5704; x 0.98 = 844.338992; x 44/12 = 3095.909637333... kgCO2/t
    ("diesel-default", Carrier.DIESEL, 844.338992 * 44 / 12, "kgCO2/t"),
    # 43.070 x 18.9 = 814.023; x 0.98 = 797.74254; x 44/12 = 2925.05598 kgCO2/t
    ("gasoline-default", Carrier.GASOLINE, 2925.05598, "kgCO2/t"),
    # 41.816 x 21.1 = 882.3176; x 0.98 = 864.671248; x 44/12 = 3170.461242666... kgCO2/t
    ("fuel-oil-default", Carrier.FUEL_OIL, 864.671248 * 44 / 12, "kgCO2/t"),
    # 50.179 x 17.2 = 863.0788; x 0.98 = 845.817224; x 44/12 = 3101.329821333... kgCO2/t
    ("lpg-default", Carrier.LPG, 845.817224 * 44 / 12, "kgCO2/t"),
    # 20.908 x 26.37 = 551.34396; x 0.94 = 518.2633224; x 44/12 = 1900.2988488 kgCO2/t
    ("raw-coal-default", Carrier.COAL, 1900.2988488, "kgCO2/t"),
    # 28.435 x 29.5 = 838.8325; x 0.93 = 780.114225; x 44/12 = 2860.418825 kgCO2/t
    ("coke-default", Carrier.COKE, 2860.418825, "kgCO2/t"),
]


@pytest.mark.parametrize(("factor_id", "carrier", "expected", "unit"), FUEL_REFERENCES)
def test_packaged_fuel_factors_match_hand_computation(
    library: FactorLibrary, factor_id: str, carrier: Carrier, expected: float, unit: str
) -> None:
    factor = library.get(factor_id)
    assert factor.carrier is carrier
    assert factor.scope == 1
    assert factor.unit == unit
    assert math.isclose(factor.value, expected, rel_tol=1e-9)
    assert factor.gbt32150 is not None
    assert "44/12" in factor.derivation
    assert factor.derivation.endswith(unit)


def test_fuel_factor_converts_per_ten_thousand_nm3_to_per_nm3() -> None:
    per_1e4 = fuel_factor(389.31, "GJ/10^4Nm3", 15.3, 0.99)
    per_nm3 = fuel_factor(0.038931, "GJ/Nm3", 15.3, 0.99)
    assert per_1e4.unit == per_nm3.unit == "kgCO2/Nm3"
    assert per_1e4.value == per_nm3.value
    assert "= 0.038931 GJ/Nm3" in per_1e4.derivation


def test_fuel_factor_is_exact_on_the_written_decimals() -> None:
    # 1 GJ/t x 12 tC/TJ x 1 x 44/12 = 44 kgCO2/t exactly; float arithmetic gives the same here,
    # but 0.1 x 0.3 style products must not drift: 10 x 0.3 x 0.1 x 44/12 = 1.1 exactly.
    assert fuel_factor(1, "GJ/t", 12, 1).value == 44.0
    assert fuel_factor(10, "GJ/t", 0.3, 0.1).value == 1.1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((389.31, "GJ/m3", 15.3, 0.99), "unknown NCV unit"),
        ((0.0, "GJ/t", 15.3, 0.99), "NCV must be positive"),
        ((42.652, "GJ/t", -1.0, 0.98), "carbon content must be positive"),
        ((42.652, "GJ/t", 20.2, 98), "write 0.99, not 99"),
    ],
)
def test_fuel_factor_rejects_bad_parameters(args: tuple[float, str, float, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fuel_factor(*args)


# ------------------------------------------------------------------------------------------------
# Packaged electricity factors

ELECTRICITY = [
    # (year, region, variant, kgCO2/kWh) as published by MEE/NBS
    (2021, "national", "average", 0.5568),
    (2021, "national", "fossil_only", 0.8426),
    (2022, "national", "average", 0.5366),
    (2022, "national", "fossil_only", 0.8325),
    (2022, "national", "excl_market_non_fossil", 0.5856),
    (2022, "north", "average", 0.6776),
    (2022, "northwest", "average", 0.5857),
    (2022, "east", "average", 0.5617),
    (2022, "northeast", "average", 0.5564),
    (2022, "central", "average", 0.5395),
    (2022, "south", "average", 0.3869),
    (2022, "southwest", "average", 0.2268),
]


@pytest.mark.parametrize(("year", "region", "variant", "value"), ELECTRICITY)
def test_every_required_grid_factor_is_present(
    library: FactorLibrary, year: int, region: str, variant: str, value: float
) -> None:
    (factor,) = library.query(carrier=Carrier.ELECTRICITY, year=year, region=region, variant=variant)
    assert factor.value == value
    assert factor.unit == "kgCO2/kWh"
    assert factor.scope == 2
    assert "MEE/NBS" in factor.source


def test_library_metadata_and_other_carriers(library: FactorLibrary) -> None:
    assert library.version == "2024.1"
    assert library.changelog[0].version == "2024.1"
    heat = library.in_force(Carrier.HEAT, datetime(2024, 6, 1, tzinfo=UTC))
    assert (heat.value, heat.unit, heat.scope) == (110.0, "kgCO2/GJ", 2)
    pv = library.in_force("pv", datetime(2024, 6, 1, tzinfo=UTC), "east")
    assert pv.value == 0.0
    assert pv.region == "national"


# ------------------------------------------------------------------------------------------------
# in_force


def test_in_force_switches_from_2021_to_2022_at_local_new_year(library: FactorLibrary) -> None:
    # 2021-12-31 23:30 in Beijing is still 2021; 2022-01-01 00:00 Beijing is 2021-12-31 16:00 UTC.
    last_2021 = datetime(2021, 12, 31, 23, 30, tzinfo=BEIJING)
    first_2022 = datetime(2021, 12, 31, 16, 0, tzinfo=UTC)
    assert library.in_force(Carrier.ELECTRICITY, last_2021).value == 0.5568
    assert library.in_force(Carrier.ELECTRICITY, first_2022).value == 0.5366
    assert library.in_force(Carrier.ELECTRICITY, first_2022 - timedelta(microseconds=1)).value == 0.5568
    assert library.in_force(Carrier.ELECTRICITY, last_2021, variant="fossil_only").value == 0.8426
    assert library.in_force(Carrier.ELECTRICITY, first_2022, variant="fossil_only").value == 0.8325


def test_in_force_prefers_region_and_falls_back_to_national(library: FactorLibrary) -> None:
    mid_2022 = datetime(2022, 7, 1, tzinfo=UTC)
    mid_2021 = datetime(2021, 7, 1, tzinfo=UTC)
    assert library.in_force(Carrier.ELECTRICITY, mid_2022, "south").value == 0.3869
    # no regional factor for 2021 in this release: the national one applies
    assert library.in_force(Carrier.ELECTRICITY, mid_2021, "south").id == "cn-grid-national-average-2021"
    # an unknown region falls back too
    assert library.in_force(Carrier.ELECTRICITY, mid_2022, "guangdong").id == "cn-grid-national-average-2022"
    # the latest year stays in force until a newer one is added
    assert library.in_force(Carrier.ELECTRICITY, datetime(2026, 3, 1, tzinfo=UTC), "east").value == 0.5617
    # variants are chosen explicitly
    assert library.in_force(Carrier.ELECTRICITY, mid_2022, variant="fossil_only").value == 0.8325
    # fuels have one national default
    assert library.in_force(Carrier.DIESEL, mid_2022, "east").id == "diesel-default"


def test_in_force_raises_not_found_with_the_reason(library: FactorLibrary) -> None:
    with pytest.raises(NotFound, match="in force on 2020-06-01"):
        library.in_force(Carrier.ELECTRICITY, datetime(2020, 6, 1, 12, tzinfo=UTC), "east")
    with pytest.raises(NotFound, match="excl_market_non_fossil"):  # published from 2022 only
        library.in_force(
            Carrier.ELECTRICITY, datetime(2021, 6, 1, tzinfo=UTC), variant="excl_market_non_fossil"
        )
    with pytest.raises(NotFound, match="storage has no emission factor"):
        library.in_force(Carrier.STORAGE, datetime(2022, 6, 1, tzinfo=UTC))
    with pytest.raises(NotFound, match="unknown carrier"):
        library.in_force("steam", datetime(2022, 6, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="timezone-aware"):
        library.in_force(Carrier.ELECTRICITY, datetime(2022, 6, 1))  # noqa: DTZ001


# ------------------------------------------------------------------------------------------------
# query


def test_query_filters_combine(library: FactorLibrary) -> None:
    assert len(library.query(carrier=Carrier.ELECTRICITY)) == 12
    assert len(library.query(carrier="electricity", year=2022)) == 10
    assert {f.carrier for f in library.query(scope=1)} == {
        Carrier.NATURAL_GAS,
        Carrier.DIESEL,
        Carrier.GASOLINE,
        Carrier.FUEL_OIL,
        Carrier.LPG,
        Carrier.COAL,
        Carrier.COKE,
    }
    assert [f.id for f in library.query(region="east")] == ["cn-grid-east-average-2022"]
    assert library.query(carrier=Carrier.ELECTRICITY, year=2021, region="east") == ()
    assert len(library.query()) == len(library.factors)


# ------------------------------------------------------------------------------------------------
# overrides


def test_override_by_id_keeps_unspecified_fields_and_marks_the_source(library: FactorLibrary) -> None:
    site = library.with_overrides(
        [{"id": "cn-grid-east-average-2022", "value": 0.512, "source": "PPA audit 2024"}]
    )
    factor = site.get("cn-grid-east-average-2022")
    assert factor.value == 0.512
    assert factor.region == "east"
    assert factor.valid_from is not None
    assert factor.source == "site override"
    assert (
        factor.note
        == "Replaces cn-grid-east-average-2022 (MEE/NBS announcement of 2022 electricity CO2 emission factors (2024-12-20)). Basis: PPA audit 2024"
    )
    assert site.in_force(Carrier.ELECTRICITY, datetime(2023, 1, 1, tzinfo=UTC), "east").value == 0.512
    # the original library is unchanged
    assert library.get("cn-grid-east-average-2022").value == 0.5617


def test_override_of_a_measured_ncv_rederives_the_fuel_factor(library: FactorLibrary) -> None:
    site = library.with_overrides([{"id": "natural-gas-default", "gbt32150": {"ncv": 360.0}}])
    gas = site.get("natural-gas-default")
    assert gas.gbt32150 is not None
    assert gas.gbt32150.ncv == 360.0
    assert gas.gbt32150.carbon_content_tc_per_tj == 15.3  # kept from the packaged factor
    # 360 GJ/10^4 Nm3 = 0.036 GJ/Nm3 x 15.3 x 0.99 x 44/12 = 1.99950 kgCO2/Nm3
    assert math.isclose(gas.value, 0.036 * 15.3 * 0.99 * 44 / 12, rel_tol=1e-9)
    assert gas.source == "site override"


def test_override_with_a_measured_value_replaces_the_derivation(library: FactorLibrary) -> None:
    site = library.with_overrides([{"id": "diesel-default", "value": 3100.0}])
    diesel = site.get("diesel-default")
    assert (diesel.value, diesel.unit, diesel.gbt32150, diesel.derivation) == (3100.0, "kgCO2/t", None, "")


def test_override_by_carrier_region_year_and_new_factor(library: FactorLibrary) -> None:
    site = library.with_overrides(
        [
            {
                "carrier": "electricity",
                "region": "south",
                "year": 2022,
                "id": "site-south-2022",
                "value": 0.40,
            },
            {
                "id": "province-x-2022",
                "carrier": "electricity",
                "scope": 2,
                "value": 0.4404,
                "unit": "kgCO2/kWh",
                "year": 2022,
                "region": "province-x",
                "valid_from": "2022-01-01",
            },
        ]
    )
    assert not any(f.id == "cn-grid-south-average-2022" for f in site.factors)
    assert site.get("site-south-2022").value == 0.40
    added = site.in_force(Carrier.ELECTRICITY, datetime(2022, 5, 1, tzinfo=UTC), "province-x")
    assert (added.id, added.variant, added.source) == ("province-x-2022", "average", "site override")
    assert len(site.factors) == len(library.factors) + 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"id": "diesel-default", "value": -1},
            r"site overrides: overrides\[0\] \(diesel-default\)\.value: ",
        ),
        (
            {"id": "new-one", "carrier": "heat", "scope": 2, "unit": "kgCO2/GJ"},
            r"overrides\[0\] \(new-one\)\.value: Field required",
        ),
        (
            {"id": "x", "carrier": "storage", "scope": 2, "value": 0, "unit": "kgCO2/kWh"},
            "storage has no factor",
        ),
        ({"id": "cn-grid-north-average-2022", "scope": 1}, "scope 1 does not fit carrier electricity"),
        (
            {"id": "coke-default", "gbt32150": {"oxidation": 93}},
            r"overrides\[0\] \(coke-default\)\.gbt32150\.oxidation",
        ),
        (
            {
                "id": "east-2",
                "carrier": "electricity",
                "scope": 2,
                "value": 0.5,
                "unit": "kgCO2/kWh",
                "region": "east",
            },
            r"^site overrides: overrides\[0\] \(east-2\)\.valid_from: validity overlaps cn-grid-east-average-2022",
        ),
        (
            {"id": "cn-grid-national-average-2021", "valid_to": None},
            r"overrides\[0\] \(cn-grid-national-average-2021\)\.valid_from: validity overlaps cn-grid-national-average-2022",
        ),
        ("not a mapping", r"overrides\[0\]: expected a mapping of factor fields"),
    ],
)
def test_bad_overrides_name_the_field(library: FactorLibrary, override: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        library.with_overrides([override])


# ------------------------------------------------------------------------------------------------
# export


def test_csv_round_trip(library: FactorLibrary) -> None:
    rows = list(csv.DictReader(io.StringIO(library.to_csv())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(library.factors)
    for row, factor in zip(rows, library.factors, strict=True):
        assert row["id"] == factor.id
        assert float(row["value"]) == factor.value  # shortest round-trip decimals, no precision lost
        assert row["carrier"] == factor.carrier.value
        assert int(row["scope"]) == factor.scope
        assert (row["valid_from"] or None) == (factor.valid_from.isoformat() if factor.valid_from else None)
        assert row["note"] == factor.note
    gas = next(row for row in rows if row["id"] == "natural-gas-default")
    assert (gas["ncv"], gas["ncv_unit"], gas["oxidation"]) == ("389.31", "GJ/10^4Nm3", "0.99")


def test_csv_of_a_query_exports_only_those(library: FactorLibrary) -> None:
    rows = list(csv.DictReader(io.StringIO(library.to_csv(library.query(region="east")))))
    assert [row["id"] for row in rows] == ["cn-grid-east-average-2022"]


def test_json_round_trip(library: FactorLibrary) -> None:
    document = json.loads(library.to_json())
    assert document["version"] == "2024.1"
    assert [tuple(record) for record in document["factors"]] == [CSV_COLUMNS] * len(library.factors)
    assert [record for record in document["factors"]] == [f.record() for f in library.factors]
    diesel = next(r for r in document["factors"] if r["id"] == "diesel-default")
    assert math.isclose(diesel["value"], 844.338992 * 44 / 12, rel_tol=1e-9)
    assert diesel["valid_from"] is None


# ------------------------------------------------------------------------------------------------
# bad data files


def _packaged_raw() -> dict[str, object]:
    raw = yaml.safe_load(PACKAGED.read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    return raw


def _write(tmp_path: Path, raw: object) -> Path:
    path = tmp_path / "emission_factors.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def test_loading_a_copy_by_path_gives_the_same_library(tmp_path: Path, library: FactorLibrary) -> None:
    copy = FactorLibrary.load(_write(tmp_path, _packaged_raw()))
    assert copy.factors == library.factors


def _factor_edit(index: int, **changes: object) -> dict[str, object]:
    raw = _packaged_raw()
    factors = raw["factors"]
    assert isinstance(factors, list)
    factors[index] = {**factors[index], **changes}
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            _factor_edit(3, value="lots"),
            r"^emission_factors\.yaml: factors\[3\] \(cn-grid-national-excl-market-non-fossil-2022\)\.value: "
            "Input should be a valid number",
        ),
        (_factor_edit(2, unit="tCO2/MWh"), r"factors\[2\] \(cn-grid-national-fossil-only-2022\)\.unit: "),
        (
            _factor_edit(15, value=3.1),
            r"factors\[15\] \(diesel-default\): 'value' is derived from 'gbt32150'",
        ),
        (
            _factor_edit(
                14, gbt32150={"ncv": 389.31, "ncv_unit": "GJ/10^4Nm3", "carbon_content_tc_per_tj": 15.3}
            ),
            r"factors\[14\] \(natural-gas-default\)\.gbt32150\.oxidation: Field required",
        ),
        (
            _factor_edit(1, id="cn-grid-national-average-2021"),
            r"factors\[1\] \(cn-grid-national-average-2021\)\.id: duplicate of factors\[0\]",
        ),
        (
            _factor_edit(0, valid_to="2022-06-01"),
            r"factors\[1\] \(cn-grid-national-average-2022\)\.valid_from: validity overlaps",
        ),
        (
            _factor_edit(0, valid_to="2020-01-01"),
            r"factors\[0\] \(cn-grid-national-average-2021\): valid_to 2020-01-01 must be after",
        ),
        (
            _factor_edit(4, colour="green"),
            r"factors\[4\] \(cn-grid-north-average-2022\)\.colour: Extra inputs",
        ),
        (
            {**_packaged_raw(), "version": 2024.1},
            r"emission_factors\.yaml: version: Input should be a valid string",
        ),
        ({**_packaged_raw(), "version": "2025.1"}, r"version '2025.1' has no changelog entry"),
        (
            {**_packaged_raw(), "timezone": "Mars/Olympus"},
            r"timezone: Value error, unknown time zone|timezone: unknown time zone",
        ),
        (["not", "a", "mapping"], r"expected a mapping with 'version'"),
    ],
)
def test_bad_data_file_errors_name_the_file_and_field(tmp_path: Path, raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FactorLibrary.load(_write(tmp_path, raw))


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read factor file"):
        FactorLibrary.load(tmp_path / "missing.yaml")
    bad = tmp_path / "emission_factors.yaml"
    bad.write_text("version: '1'\nfactors: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^emission_factors\.yaml:\d+:\d+: not valid YAML"):
        FactorLibrary.load(bad)
