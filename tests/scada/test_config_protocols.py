"""Site files with OPC UA and MQTT devices: sections, defaults, and errors that name the field."""

from __future__ import annotations

import re

import pytest

from protocols.mqtt.config import MqttVersion
from protocols.opcua.config import DeadbandType, SecurityMode, SecurityPolicy
from scada.config import Protocol, parse_site
from scada.model import ConfigError

HEAD = """
site: {id: s1, name: Site one}
hierarchy: [{id: g, name: Group, level: group}]
devices:
"""

OPCUA = """
  - id: chiller
    node: g
    kind: chiller
    protocol: opcua
    opcua:
      endpoint: opc.tcp://127.0.0.1:4840/carbonos
      security_policy: basic256sha256
      security_mode: sign_and_encrypt
      certificate: certs/client.der
      private_key: certs/client.pem
      publishing_interval_ms: 250
    points:
      - key: power_kw
        kind: power
        unit: kW
        carrier: electricity
        stuck_after_s: 600
        opcua: {node_id: "ns=2;s=chiller.power_kw", deadband_type: absolute, deadband: 0.5}
      - key: supply_temp_setpoint_degc
        kind: setpoint
        unit: degC
        writable: true
        opcua:
          node_id: "ns=2;s=chiller.setpoint"
          method: {object_id: "ns=2;s=chiller", method_id: "ns=2;s=chiller.set_setpoint"}
"""

MQTT = """
  - id: pv-mqtt
    node: g
    kind: pv_inverter
    protocol: mqtt
    poll_period_s: 5
    points:
      - {key: active_power_kw, kind: power, unit: kW, carrier: pv, mqtt: {field: P}}
      - {key: energy_export_kwh, kind: energy_counter, unit: kWh, carrier: pv}
"""


def test_opcua_and_mqtt_devices_load_with_their_sections() -> None:
    site = parse_site(HEAD + OPCUA + MQTT)
    chiller, pv = site.device("chiller"), site.device("pv-mqtt")
    assert chiller.protocol is Protocol.OPCUA
    assert chiller.opcua is not None
    assert chiller.opcua.security_policy is SecurityPolicy.BASIC256SHA256
    assert chiller.opcua.security_mode is SecurityMode.SIGN_AND_ENCRYPT
    assert chiller.opcua.host_port == ("127.0.0.1", 4840)
    power = chiller.points[0]
    assert power.opcua is not None
    assert power.opcua.deadband_type is DeadbandType.ABSOLUTE
    assert power.stuck_after_s == 600
    assert chiller.points[1].opcua is not None
    assert chiller.points[1].opcua.method is not None
    # an MQTT device on the default topics needs no section; the point key is the field by default
    assert pv.mqtt is not None
    assert pv.mqtt.version is MqttVersion.V5
    assert pv.mqtt.topics_for("pv-mqtt") == (
        "carbonos/pv-mqtt/telemetry",
        "carbonos/pv-mqtt/command",
        "carbonos/pv-mqtt/command/response",
    )
    assert pv.points[0].mqtt is not None
    assert pv.points[0].mqtt.field == "P"
    assert pv.points[1].mqtt is None
    assert pv.effective_stale_after_s == 15  # 3 poll periods
    assert chiller.effective_stale_after_s == 10  # at least 10 s


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("opc.tcp://127.0.0.1:4840/carbonos", "http://x"), "devices[0] (chiller).opcua.endpoint"),
        (("security_mode: sign_and_encrypt", "security_mode: none"), "both be none or both be set"),
        (("      certificate: certs/client.der\n", ""), "needs certificate and private_key"),
        (('"ns=2;s=chiller.power_kw"', '"chiller.power_kw"'), "is not an OPC UA NodeId"),
        (("deadband_type: absolute, ", ""), "deadband needs a deadband_type"),
        (
            ("    protocol: opcua\n    opcua:", "    protocol: opcua\n    modbus: {host: h}\n    opcua:"),
            "cannot have a 'modbus' section",
        ),
        (
            (
                '        opcua: {node_id: "ns=2;s=chiller.power_kw", deadband_type: absolute, deadband: 0.5}\n',
                "",
            ),
            "needs an 'opcua' section with its node_id",
        ),
    ],
)
def test_bad_opcua_fields_are_named(change: tuple[str, str], expected: str) -> None:
    text = HEAD + OPCUA.replace(*change)
    assert text != HEAD + OPCUA
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_site(text)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("    mqtt: {command_topic: a/+/b}\n", "wildcards are not allowed in a publish topic"),
        ("    mqtt: {command_topic: x, response_topic: x}\n", "must differ"),
        ("    mqtt: {version: '4'}\n", "devices[0] (pv-mqtt).mqtt.version"),
        ("    mqtt: {qos: 3}\n", "devices[0] (pv-mqtt).mqtt.qos"),
    ],
)
def test_bad_mqtt_fields_are_named(section: str, expected: str) -> None:
    text = HEAD + MQTT.replace("    poll_period_s: 5\n", "    poll_period_s: 5\n" + section)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_site(text)


def test_write_tolerance_follows_the_register_type() -> None:
    site = parse_site(
        HEAD
        + """
  - id: m
    node: g
    kind: battery
    protocol: modbus_tcp
    modbus: {host: 127.0.0.1}
    points:
      - {key: limit_pct, kind: setpoint, unit: "%", writable: true, scale: 0.1, modbus: {address: 0, type: uint16}}
      - {key: power_kw, kind: setpoint, unit: kW, writable: true, modbus: {address: 2, type: float32}}
      - {key: soc_pct, kind: setpoint, unit: "%", writable: true, write_tolerance: 2, modbus: {address: 4}}
"""
    )
    limit, power, soc = site.device("m").points
    assert limit.verify_tolerance(50) == pytest.approx(0.05, rel=1e-2)  # half a raw step
    assert power.verify_tolerance(50) == pytest.approx(5e-5, rel=1e-3)  # float: relative only
    assert soc.verify_tolerance(50) == 2
