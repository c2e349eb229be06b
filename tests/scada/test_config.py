"""Site file validation: good files load, every kind of bad file names its bad field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from scada.config import load_site, parse_site
from scada.model import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plant.yaml"

BASE = """
site: {id: s1, name: Site one, timezone: Asia/Shanghai}
hierarchy:
  - id: g
    name: Group
    level: group
    children:
      - id: p
        name: Park
        level: park
        children:
          - id: e
            name: Enterprise
            level: enterprise
            children: [{id: w, name: Workshop, level: workshop}]
templates:
  meter:
    points:
      - {key: active_power_kw, kind: power, unit: kW, carrier: electricity, modbus: {address: 0, type: float32}}
      - {key: energy_import_kwh, kind: energy_counter, unit: kWh, carrier: electricity, scale: 0.1,
         modbus: {address: 2, type: uint32}}
devices:
  - id: m1
    node: w
    kind: power_meter
    protocol: modbus_tcp
    template: meter
    modbus: {host: 127.0.0.1, port: 15020, unit_id: 3}
"""


def test_example_plant_is_valid_and_realistic() -> None:
    site = load_site(EXAMPLE)
    levels = [node.level.value for node, _ in site.iter_nodes()]
    assert levels.count("group") == 1
    assert levels.count("park") == 1
    assert levels.count("enterprise") == 2
    assert levels.count("workshop") >= 3
    assert 24 <= len(site.devices) <= 60
    assert all(d.points for d in site.devices), "templates are expanded at load"


def test_template_points_are_expanded_and_extra_points_appended() -> None:
    text = (
        BASE
        + "    points: [{key: temperature_degc, kind: temperature, unit: degC, modbus: {address: 10, type: int16}}]\n"
    )
    device = parse_site(text).devices[0]
    assert [p.key for p in device.points] == ["active_power_kw", "energy_import_kwh", "temperature_degc"]
    assert device.template is None
    assert device.point_id("active_power_kw") == "m1.active_power_kw"


def test_normalized_document_round_trips() -> None:
    site = parse_site(BASE)
    again = parse_site(__import__("json").dumps(site.model_dump(mode="json")))
    assert again == site


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("unit_id: 3", "unit_id: 300"),
            "devices[0] (m1).modbus.unit_id: Input should be less than or equal to 255",
        ),
        (("kind: power_meter", "kind: toaster"), "devices[0] (m1).kind: Input should be"),
        (("node: w", "node: nowhere"), "devices[0].node: unknown node 'nowhere'"),
        (("template: meter", "template: nope"), "devices[0].template: unknown template 'nope'"),
        (("timezone: Asia/Shanghai", "timezone: Mars/Olympus"), "site.timezone"),
        (
            ("unit: kW,", "unit: kWh,"),
            "templates.meter.points[0] (active_power_kw): unit 'kWh' does not fit kind 'power'",
        ),
        (
            ("type: float32}", "type: bool}"),
            "templates.meter.points[0] (active_power_kw).modbus: Value error",
        ),
        (("id: m1", "id: M1!"), "devices[0] (M1!).id: String should match pattern"),
        (("level: park", "level: enterprise"), "level 'enterprise' cannot sit directly under group 'g'"),
        (
            ("address: 2, type: uint32", "address: 1, type: uint32"),
            "registers of 'active_power_kw' and 'energy_import_kwh' overlap",
        ),
        (
            ("unit_id: 3}", "unit_id: 3, max_block_registers: 1}"),
            "devices[0].modbus.max_block_registers: must be at least 2",
        ),
        (("carrier: electricity, scale", "scale"), "needs a carrier"),
        (
            ("    protocol: modbus_tcp\n", "    protocol: modbus_tcp\n    colour: blue\n"),
            "devices[0] (m1).colour: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_field_is_named(change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in BASE
    with pytest.raises(ConfigError) as info:
        parse_site(BASE.replace(old, new, 1), source="site.yaml")
    message = str(info.value)
    assert message.startswith("site.yaml: ")
    assert expected.replace("Value error", "") in message.replace("Value error, ", "")


def test_duplicate_ids_are_rejected() -> None:
    device = BASE[BASE.index("  - id: m1") :]
    with pytest.raises(ConfigError, match=r"devices\[1\]\.id: duplicate device id 'm1'"):
        parse_site(BASE + device)


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(
        textwrap.dedent("""\
        site: {id: s, name: S}
        hierarchy: [
          {id: g, name: G, level: group
        """)
    )
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+:\d+: not valid YAML"):
        load_site(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read site file"):
        load_site(tmp_path / "absent.yaml")


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_site("- just\n- a list\n")


# --------------------------------------------------------------------------------------------------
# Retention classes


def test_retention_defaults_and_classes() -> None:
    site = parse_site(BASE)
    assert set(site.retention) == {"default"}
    default = site.retention["default"]
    assert (default.raw_days, default.rollup_1m_days, default.rollup_15m_days, default.rollup_1h_days) == (
        30,
        365,
        1095,
        None,
    )
    assert all(p.retention == "default" for d in site.devices for p in d.points)

    text = BASE.replace(
        "templates:",
        "retention:\n  default: {raw_days: 7}\n  audit: {raw_days: 400, rollup_1m_days: null}\ntemplates:",
    ).replace("scale: 0.1,", "scale: 0.1, retention: audit,")
    site = parse_site(text)
    assert site.retention["default"].raw_days == 7
    assert site.retention["audit"].raw_days == 400
    assert site.retention["audit"].rollup_1m_days is None
    assert {p.key: p.retention for p in site.devices[0].points} == {
        "active_power_kw": "default",
        "energy_import_kwh": "audit",
    }
    assert parse_site(__import__("json").dumps(site.model_dump(mode="json"))) == site


def test_a_site_naming_only_other_classes_still_has_default() -> None:
    site = parse_site(BASE.replace("templates:", "retention:\n  audit: {raw_days: 400}\ntemplates:"))
    assert set(site.retention) == {"default", "audit"}
    assert site.retention["default"].raw_days == 30


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("scale: 0.1,", "scale: 0.1, retention: forever,"),
            "devices[0].points[1] (energy_import_kwh).retention: unknown retention class 'forever' (known: default)",
        ),
        (
            ("templates:", "retention:\n  fast: {raw_days: 0}\ntemplates:"),
            "retention.fast.raw_days: Input should be greater than or equal to 1",
        ),
        (
            ("templates:", "retention:\n  fast: {raw_dayz: 3}\ntemplates:"),
            "retention.fast.raw_dayz: Extra inputs are not permitted",
        ),
        (("templates:", "retention:\n  Fast!: {raw_days: 3}\ntemplates:"), "retention.Fast!"),
    ],
)
def test_bad_retention_is_named(change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in BASE
    with pytest.raises(ConfigError) as info:
        parse_site(BASE.replace(old, new, 1), source="site.yaml")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("point_extra", "expected"),
    [
        (
            "anomaly: {detector: {kind: robust_z, window: 0}}",
            "detector spec field 'window': must be an integer >= 1",
        ),
        ("anomaly: {detector: {kind: sorcery}}", "detector spec field 'kind'"),
        ("alarms: [{kind: hh}]", "alarms[0].setpoint"),
        ("alarms: [{kind: hh, setpoint: 5, priority: urgent}]", "alarms[0].priority"),
        ("ledger: supply, kind_of: x", "kind_of"),
        ("ledger: charge", "needs an energy point"),
    ],
)
def test_bad_point_alarm_anomaly_and_ledger_fields_are_named(point_extra: str, expected: str) -> None:
    kind = "temperature, unit: degC" if "charge" in point_extra else "power, unit: kW, carrier: electricity"
    text = (
        BASE
        + f"    points: [{{key: x_point, kind: {kind}, modbus: {{address: 10, type: float32}}, {point_extra}}}]\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_site(text, source="site.yaml")
    message = str(info.value)
    assert message.startswith("site.yaml: devices[0] (m1).points[0]")
    assert expected in message


def test_storage_counter_must_name_its_ledger_role() -> None:
    point = (
        "{key: e_in, kind: energy_counter, unit: kWh, carrier: storage, modbus: {address: 10, type: uint32}}"
    )
    with pytest.raises(ConfigError, match="a storage counter needs 'ledger: charge' or 'ledger: discharge'"):
        parse_site(BASE + f"    points: [{point}]\n")
