"""The OPC UA simulator endpoint, seen by asyncua's own client over real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import DataChangeEvent

from simulators.opcua_server import OpcUaEndpoint, OpcUaSimPoint, OpcUaSimulatorError
from simulators.physics import DevicePhysics, SimulationParams, make_physics

pytestmark = pytest.mark.asyncio(loop_scope="module")

START = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)

POINTS = (
    OpcUaSimPoint(key="active_power_kw", node_id="ns=2;s=a.active_power_kw", eu_range=(0.0, 500.0)),
    OpcUaSimPoint(key="voltage_v", node_id="ns=2;s=a.voltage_v", data_type="uint16", scale=0.1),
    OpcUaSimPoint(
        key="power_limit_pct",
        node_id="ns=2;s=a.power_limit_pct",
        data_type="int16",
        writable=True,
        offset=10.0,
    ),
    OpcUaSimPoint(
        key="power_limit_pct",
        node_id="ns=3;i=77",
        method=("ns=3;s=a.control", "ns=3;s=a.control.set_limit"),
    ),
)
OTHER_POINTS = (OpcUaSimPoint(key="active_power_kw", node_id="ns=2;s=b.active_power_kw"),)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def physics(seed: int) -> DevicePhysics:
    params = SimulationParams(profile="flat", base_kw=100, peak_kw=100, noise_pct=0, seed=seed)
    return make_physics("power_meter", params, tz=ZoneInfo("UTC"), start=START, seed=seed)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plant() -> AsyncIterator[tuple[OpcUaEndpoint, DevicePhysics, DevicePhysics]]:
    a, b = physics(1), physics(2)
    endpoint = OpcUaEndpoint(f"opc.tcp://127.0.0.1:{free_port()}", [("a", a, POINTS), ("b", b, OTHER_POINTS)])
    endpoint.refresh()  # before start: nothing to push to, nothing breaks
    await endpoint.start()
    try:
        yield endpoint, a, b
    finally:
        await endpoint.stop()
        await endpoint.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def client(plant: tuple[OpcUaEndpoint, DevicePhysics, DevicePhysics]) -> AsyncIterator[Client]:
    endpoint, a, _ = plant
    for point in POINTS:
        a.clear_override(point.key)
        endpoint.set_status(point.node_id, None)
    endpoint.refresh()
    await endpoint.flush()
    ua_client = Client(endpoint.endpoint_url, timeout=3)
    ua_client.session_timeout = 60_000
    await ua_client.connect()
    try:
        yield ua_client
    finally:
        await ua_client.disconnect()


def node(ua_client: Client, node_id: str) -> Any:
    return ua_client.get_node(ua.NodeId.from_string(node_id))


async def test_refresh_pushes_only_changed_values(
    plant: tuple[OpcUaEndpoint, DevicePhysics, DevicePhysics], client: Client
) -> None:
    endpoint, a, _ = plant
    assert endpoint.listening
    assert str(endpoint) == f"opc.tcp://127.0.0.1:{endpoint.port}"
    endpoint.refresh()
    await endpoint.flush()
    pushed = endpoint.pushed_values
    endpoint.refresh()
    await endpoint.flush()
    assert endpoint.pushed_values == pushed  # nothing changed: nothing written
    a.override("active_power_kw", 321.5)
    a.override("voltage_v", 236.04)
    endpoint.refresh()
    await endpoint.flush()
    assert endpoint.pushed_values == pushed + 2
    assert await node(client, "ns=2;s=a.active_power_kw").read_value() == 321.5
    voltage = await node(client, "ns=2;s=a.voltage_v").read_data_value()
    assert (voltage.Value.Value, voltage.Value.VariantType) == (2360, ua.VariantType.UInt16)
    assert voltage.SourceTimestamp is not None


async def test_every_variable_has_an_eu_range(client: Client) -> None:
    eu_range = await node(client, "ns=2;s=a.active_power_kw").get_child("0:EURange")
    value = await eu_range.read_value()
    assert (value.Low, value.High) == (0.0, 500.0)


async def test_a_client_write_reaches_the_physics_and_the_clamped_value_shows(
    plant: tuple[OpcUaEndpoint, DevicePhysics, DevicePhysics], client: Client
) -> None:
    _, a, _ = plant
    limit = node(client, "ns=2;s=a.power_limit_pct")
    await limit.write_value(ua.Variant(40, ua.VariantType.Int16))
    assert a.value("power_limit_pct") == 50.0  # raw 40 + offset 10
    await limit.write_value(ua.Variant(500, ua.VariantType.Int16))
    assert a.value("power_limit_pct") == 100.0  # the physics clamps to 0..100
    assert await limit.read_value() == 90  # and the variable shows what the device holds
    with pytest.raises(ua.uaerrors.BadTypeMismatch):
        await limit.write_value(ua.Variant(1.5, ua.VariantType.Double))
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        await node(client, "ns=2;s=a.active_power_kw").write_value(ua.Variant(1.0, ua.VariantType.Double))


async def test_a_method_call_writes_the_physics(
    plant: tuple[OpcUaEndpoint, DevicePhysics, DevicePhysics], client: Client
) -> None:
    _, a, _ = plant
    control = node(client, "ns=3;s=a.control")
    await control.call_method(ua.NodeId.from_string("ns=3;s=a.control.set_limit"), ua.Variant(25.0))
    assert a.value("power_limit_pct") == 25.0
    assert await node(client, "ns=3;i=77").read_value() == 25.0
    with pytest.raises(ua.uaerrors.BadInvalidArgument):
        await control.call_method(ua.NodeId.from_string("ns=3;s=a.control.set_limit"), ua.Variant("x"))


async def test_a_pinned_status_code_shows_with_the_value(
    plant: tuple[OpcUaEndpoint, DevicePhysics, DevicePhysics], client: Client
) -> None:
    endpoint, a, _ = plant
    a.override("active_power_kw", 12.0)
    endpoint.set_status("ns=2;s=a.active_power_kw", "UncertainLastUsableValue")
    endpoint.refresh()
    await endpoint.flush()
    value = await node(client, "ns=2;s=a.active_power_kw").read_data_value(raise_on_bad_status=False)
    assert value.StatusCode.name == "UncertainLastUsableValue"
    assert value.Value.Value == 12.0
    endpoint.set_status("ns=2;s=a.active_power_kw", ua.StatusCodes.BadSensorFailure)
    endpoint.refresh()
    await endpoint.flush()
    value = await node(client, "ns=2;s=a.active_power_kw").read_data_value(raise_on_bad_status=False)
    assert value.StatusCode.name == "BadSensorFailure"
    with pytest.raises(KeyError):
        endpoint.set_status("ns=2;s=nothing", None)


async def test_an_absolute_deadband_compares_with_the_last_reported_value(
    plant: tuple[OpcUaEndpoint, DevicePhysics, DevicePhysics], client: Client
) -> None:
    endpoint, a, _ = plant
    a.override("active_power_kw", 100.0)
    endpoint.refresh()
    await endpoint.flush()
    subscription = await client.create_subscription(20, None)
    async with subscription:
        await subscription.deadband_monitor(node(client, "ns=2;s=a.active_power_kw"), ua.Double(1.0))
        seen: list[float] = []
        for value in (100.4, 100.8, 101.2, 101.6):  # a slow ramp: 0.4 per step, under the deadband
            a.override("active_power_kw", value)
            endpoint.refresh()
            await endpoint.flush()
            await asyncio.sleep(0.1)
        while (event := await subscription.next_event(timeout=0.3)) is not None:
            if isinstance(event, DataChangeEvent):
                seen.append(event.value)
    assert seen == [100.0, 101.2]  # the initial value, then the first sample 1.0 beyond it


async def test_a_percent_deadband_is_a_share_of_the_eu_range(
    plant: tuple[OpcUaEndpoint, DevicePhysics, DevicePhysics], client: Client
) -> None:
    endpoint, a, _ = plant
    a.override("active_power_kw", 100.0)
    endpoint.refresh()
    await endpoint.flush()
    subscription = await client.create_subscription(20, None)
    async with subscription:
        await subscription.deadband_monitor(
            node(client, "ns=2;s=a.active_power_kw"), ua.Double(2.0), deadbandtype=ua.UInt32(2)
        )
        for value in (108.0, 111.0):  # 2 % of 0..500 is 10
            a.override("active_power_kw", value)
            endpoint.refresh()
            await endpoint.flush()
            await asyncio.sleep(0.1)
        seen = []
        while (event := await subscription.next_event(timeout=0.3)) is not None:
            if isinstance(event, DataChangeEvent):
                seen.append(event.value)
    assert seen == [100.0, 111.0]


async def test_two_devices_share_one_endpoint(
    plant: tuple[OpcUaEndpoint, DevicePhysics, DevicePhysics], client: Client
) -> None:
    endpoint, _, b = plant
    b.override("active_power_kw", 7.0)
    endpoint.refresh()
    await endpoint.flush()
    assert await node(client, "ns=2;s=b.active_power_kw").read_value() == 7.0
    names = {(await child.read_browse_name()).Name for child in await client.nodes.objects.get_children()}
    assert {"a", "b"} <= names
    assert set(endpoint.node_ids) == {p.node_id for p in (*POINTS, *OTHER_POINTS)}


async def test_a_stopped_endpoint_restarts_on_the_same_port() -> None:
    a = physics(3)
    port = free_port()
    endpoint = OpcUaEndpoint(f"opc.tcp://127.0.0.1:{port}", [("a", a, POINTS[:1])])
    await endpoint.start()
    await endpoint.stop()
    assert not endpoint.listening
    a.override("active_power_kw", 55.0)
    await endpoint.start()
    try:
        async with Client(endpoint.endpoint_url, timeout=3) as ua_client:
            assert await node(ua_client, "ns=2;s=a.active_power_kw").read_value() == 55.0
        busy = OpcUaEndpoint(f"opc.tcp://127.0.0.1:{port}", [("a", a, POINTS[:1])])
        with pytest.raises(OpcUaSimulatorError, match="cannot serve"):
            await busy.start()
        assert not busy.listening
    finally:
        await endpoint.stop()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key": "p", "node_id": "not a node"}, "not a NodeId"),
        ({"key": "p", "node_id": "ns=2;s=p", "data_type": "decimal"}, "unknown data type"),
        ({"key": "p", "node_id": "ns=2;s=p", "scale": 0.0}, "scale"),
        ({"key": "p", "node_id": "ns=2;s=p", "eu_range": (5.0, 5.0)}, "eu_range"),
    ],
)
async def test_bad_points_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OpcUaSimPoint(**kwargs)


async def test_bad_endpoints_are_refused() -> None:
    a = physics(4)
    with pytest.raises(ValueError, match=r"opc\.tcp"):
        OpcUaEndpoint("http://127.0.0.1:4840", [("a", a, POINTS)])
    with pytest.raises(ValueError, match="certificate"):
        OpcUaEndpoint("opc.tcp://127.0.0.1:4840", [("a", a, POINTS)], security="basic256sha256")
    with pytest.raises(ValueError, match="used twice"):
        OpcUaEndpoint("opc.tcp://127.0.0.1:4840", [("a", a, POINTS), ("c", a, POINTS)])
