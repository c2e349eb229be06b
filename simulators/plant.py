"""A simulated plant: every device of a normalized site document, over Modbus TCP, OPC UA and MQTT.

The plant reads the *normalized site document* (``SiteConfig.model_dump(mode="json")`` after the
site file is loaded: templates expanded, every device with its full ``points``), builds one physics
object per device and serves each device the way its ``protocol`` says: one
:class:`~simulators.modbus_server.ModbusEndpoint` per (host, port), one
:class:`~simulators.opcua_server.OpcUaEndpoint` per endpoint URL, and one
:class:`~simulators.mqtt_devices.MqttDeviceFleet` per (MQTT version, publish period) on the broker
given as ``mqtt_url``. One tick task moves simulated time on and refreshes every endpoint.

OPC UA devices are served without security (the site's client certificates belong to the server);
MQTT devices publish their telemetry once per ``poll_period_s`` with wall-clock timestamps, so a
server can tell an old sample from a fresh one whatever the simulation speed.

Simulated time is ``start + speed * (real time since start())``, so a demo can run a day in minutes
while counters still integrate consistently. Devices are stepped in dependency order: a main meter
that sums other devices (``simulation.sums``) after them. Devices with ``simulation.anomalies`` or
``simulation.random_anomalies`` get an :class:`~simulators.anomalies.AnomalyInjector`; the labels of
the anomalies that start are kept (bounded) and, with ``labels=path``, appended to a JSON-lines
file from a worker thread. The simulators never import the server's config
models (import-linter): the document is checked here, and errors name the field the way the site
loader does (``devices[2] (b-line-1).points[0].modbus.type: ...``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import graphlib
import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from scada.model import DeviceKind, utc_now
from simulators.anomalies import (
    AnomalyConfigError,
    AnomalyInjector,
    AnomalyLabel,
    LabelFile,
    parse_anomalies,
    parse_random_anomalies,
)
from simulators.modbus_server import ModbusEndpoint, SimulatedPoint, SimulatedUnit
from simulators.mqtt_devices import MqttDeviceFleet, MqttSimPoint, MqttSimTopics
from simulators.opcua_server import OpcUaEndpoint, OpcUaSimPoint
from simulators.physics import (
    PROFILES,
    DevicePhysics,
    JobSpec,
    MainMeterPhysics,
    SimulationParams,
    make_physics,
)

__all__ = ["DEFAULT_TICK_S", "MAX_LABELS_KEPT", "DocumentError", "SimulatedDevice", "SimulatedPlant"]

_LOGGER = logging.getLogger(__name__)

DEFAULT_TICK_S = 0.2
"""Real seconds between physics steps."""
MAX_LABELS_KEPT = 10_000
"""Anomaly labels kept in memory (:attr:`SimulatedPlant.labels`); older ones are dropped."""


class DocumentError(ValueError):
    """The site document cannot be simulated; the message starts with the path of the bad field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


_MqttServed = tuple[str, DevicePhysics, MqttSimTopics, Sequence[MqttSimPoint]]


@dataclass(frozen=True, slots=True, kw_only=True)
class OpcUaServing:
    """How an OPC UA device is served: its endpoint URL and its variables."""

    endpoint: str
    points: tuple[OpcUaSimPoint, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttServing:
    """How an MQTT device publishes: topics, protocol version, period, and payload fields."""

    topics: MqttSimTopics
    version: str
    period_s: float
    points: tuple[MqttSimPoint, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatedDevice:
    """One device of the plant: where it is served and what it simulates.

    ``host``, ``port``, ``unit_id`` and ``points`` describe a Modbus TCP device; an OPC UA or MQTT
    device carries ``opcua`` or ``mqtt`` instead (and no Modbus points).
    """

    device_id: str
    kind: DeviceKind
    host: str = ""
    port: int = 0
    unit_id: int = 0
    physics: DevicePhysics
    points: tuple[SimulatedPoint, ...] = ()
    opcua: OpcUaServing | None = None
    mqtt: MqttServing | None = None

    @property
    def protocol(self) -> str:
        """Return ``modbus_tcp``, ``opcua`` or ``mqtt``."""
        return "opcua" if self.opcua is not None else "mqtt" if self.mqtt is not None else "modbus_tcp"


class SimulatedPlant:
    """Every simulated device of a site, with their Modbus endpoints and one clock of their own."""

    def __init__(
        self,
        devices: Sequence[SimulatedDevice],
        *,
        start: datetime,
        speed: float = 1.0,
        tick_s: float = DEFAULT_TICK_S,
        labels: Path | None = None,
        mqtt_url: str | None = None,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        if tick_s <= 0:
            raise ValueError("tick_s must be positive")
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self._devices = {d.device_id: d for d in devices}
        self._stepping = _summed_first(devices)
        self._start = start
        self._speed = speed
        self._tick_s = tick_s
        by_address: dict[tuple[str, int], list[SimulatedUnit]] = {}
        by_url: dict[str, list[tuple[str, DevicePhysics, Sequence[OpcUaSimPoint]]]] = {}
        by_fleet: dict[
            tuple[str, float], list[tuple[str, DevicePhysics, MqttSimTopics, Sequence[MqttSimPoint]]]
        ]
        by_fleet = {}
        for d in devices:
            if d.opcua is not None:
                by_url.setdefault(d.opcua.endpoint, []).append((d.device_id, d.physics, d.opcua.points))
            elif d.mqtt is not None:
                fleet_key = (d.mqtt.version, d.mqtt.period_s)
                by_fleet.setdefault(fleet_key, []).append(
                    (d.device_id, d.physics, d.mqtt.topics, d.mqtt.points)
                )
            else:
                unit = SimulatedUnit(d.device_id, d.unit_id, d.physics, d.points)
                by_address.setdefault((d.host, d.port), []).append(unit)
        if by_fleet and mqtt_url is None:
            raise ValueError("the site has MQTT devices: give the broker's URL (--mqtt-url)")
        self._endpoints = [ModbusEndpoint(host, port, units) for (host, port), units in by_address.items()]
        self._opcua = [OpcUaEndpoint(url, served) for url, served in by_url.items()]
        self._fleets = [
            MqttDeviceFleet(
                mqtt_url or "",
                served,
                publish_period_s=period_s,
                version=version,
                client_id_prefix=f"carbonos-sim-{version.replace('.', '')}-{period_s:g}",
            )
            for (version, period_s), served in by_fleet.items()
        ]
        self._t0_s: float | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._injectors = [d.physics.layer for d in devices if isinstance(d.physics.layer, AnomalyInjector)]
        self._label_file = LabelFile(labels) if labels is not None else None
        self._labels: collections.deque[AnomalyLabel] = collections.deque(maxlen=MAX_LABELS_KEPT)
        self._unwritten: list[AnomalyLabel] = []

    # ----------------------------------------------------------------------------------------------
    # Building from a site document

    @classmethod
    def from_document(
        cls,
        doc: Mapping[str, Any],
        *,
        speed: float = 1.0,
        start: datetime | None = None,
        tick_s: float = DEFAULT_TICK_S,
        labels: Path | None = None,
        mqtt_url: str | None = None,
    ) -> SimulatedPlant:
        """Build the plant of a normalized site document; raise :class:`DocumentError` if unusable.

        ``labels`` names a JSON-lines file that receives one line per injected anomaly as it
        starts; the plant empties it on its first write.
        """
        if not isinstance(doc, Mapping):
            raise DocumentError("document", "expected a mapping with 'site' and 'devices'")
        site = doc.get("site") or {}
        if not isinstance(site, Mapping):
            raise DocumentError("site", "expected a mapping")
        zone = site.get("timezone") or "Asia/Shanghai"
        try:
            tz = ZoneInfo(_expect(zone, str, "site.timezone"))
        except (ZoneInfoNotFoundError, ValueError):
            raise DocumentError("site.timezone", f"unknown time zone {zone!r}") from None
        start = start or utc_now()
        raw_devices = doc.get("devices")
        if not isinstance(raw_devices, list) or not raw_devices:
            raise DocumentError("devices", "expected a non-empty list of devices")
        drafts = [_draft(raw, f"devices[{i}]", tz=tz, start=start) for i, raw in enumerate(raw_devices)]
        seen: dict[str, int] = {}
        for i, draft in enumerate(drafts):
            if draft.device_id in seen:
                raise DocumentError(f"devices[{i}].id", f"duplicate device id {draft.device_id!r}")
            seen[draft.device_id] = i
        devices = _build(drafts, tz=tz, start=start)
        used: dict[tuple[str, int, int], str] = {}
        for i, device in enumerate(devices):
            if device.protocol != "modbus_tcp":
                continue
            slot = (device.host, device.port, device.unit_id)
            if slot in used:
                raise DocumentError(
                    f"devices[{i}] ({device.device_id}).modbus.unit_id",
                    f"unit {device.unit_id} on {device.host}:{device.port} is already used by {used[slot]!r}",
                )
            used[slot] = device.device_id
        order = {draft.device_id: i for i, draft in enumerate(drafts)}
        devices.sort(key=lambda d: order[d.device_id])  # document order for endpoints and ids
        try:
            return cls(devices, start=start, speed=speed, tick_s=tick_s, labels=labels, mqtt_url=mqtt_url)
        except ValueError as err:
            raise DocumentError("document", str(err)) from None

    # ----------------------------------------------------------------------------------------------
    # Running

    @property
    def speed(self) -> float:
        """Return simulated seconds per real second."""
        return self._speed

    @property
    def devices(self) -> tuple[str, ...]:
        """Return the ids of every simulated device."""
        return tuple(self._devices)

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """Return the (host, port) of every listening socket: Modbus first, then OPC UA."""
        return (*((e.host, e.port) for e in self._endpoints), *((e.host, e.port) for e in self._opcua))

    @property
    def servers(self) -> tuple[str, ...]:
        """Return a description of every endpoint and MQTT fleet, for logs and the READY line."""
        return tuple(str(e) for e in (*self._endpoints, *self._opcua, *self._fleets))

    def opcua_endpoint(self, url: str) -> OpcUaEndpoint:
        """Return the OPC UA endpoint serving ``url`` (e.g. to set a status code in a test)."""
        for endpoint in self._opcua:
            if str(endpoint.endpoint_url) == url:
                return endpoint
        raise KeyError(f"no OPC UA endpoint {url!r}")

    @property
    def mqtt_fleets(self) -> tuple[MqttDeviceFleet, ...]:
        """Return the simulated MQTT fleets (e.g. to silence a device in a test)."""
        return tuple(self._fleets)

    @property
    def running(self) -> bool:
        """Return True between :meth:`start` and :meth:`stop`."""
        return self._tick_task is not None

    def now(self) -> datetime:
        """Return the simulated time: ``start + speed * real time since start()``."""
        if self._t0_s is None:
            return self._start
        elapsed_s = asyncio.get_running_loop().time() - self._t0_s
        return self._start + timedelta(seconds=self._speed * elapsed_s)

    def step_physics(self, now: datetime) -> None:
        """Advance every device's physics to simulated time ``now``, without serving anything.

        For offline runs faster than any clock (a month of the plant in seconds, e.g.
        ``bench/carbon.py``); a served plant steps itself from :meth:`start`. The anomalies that
        start are recorded in :attr:`labels` (not in the labels file).
        """
        if self._t0_s is not None:
            raise RuntimeError("the plant is running: it steps itself")
        for device_id in self._stepping:
            self._devices[device_id].physics.step(now)
        for injector in self._injectors:
            self._labels.extend(injector.drain_labels())  # ground truth, as :attr:`labels`

    @property
    def labels(self) -> tuple[AnomalyLabel, ...]:
        """Return the labels of the anomalies started so far (the last :data:`MAX_LABELS_KEPT`)."""
        return tuple(self._labels)

    def device(self, device_id: str) -> DevicePhysics:
        """Return a device's physics, e.g. to ``override`` a variable in a test."""
        try:
            return self._devices[device_id].physics
        except KeyError:
            raise KeyError(f"no simulated device {device_id!r}") from None

    async def start(self) -> None:
        """Listen on every endpoint and start the tick; on failure nothing stays open."""
        if self._tick_task is not None:
            return
        if self._t0_s is None:
            self._t0_s = asyncio.get_running_loop().time()
        self._step()
        try:
            for endpoint in self._endpoints:
                await endpoint.start()
            for opcua in self._opcua:
                await opcua.start()
            for fleet in self._fleets:
                await fleet.start()
        except BaseException:
            await self._stop_endpoints()
            raise
        self._tick_task = asyncio.create_task(self._tick(), name="simulators:tick")
        _LOGGER.info(
            "simulating %d devices on %s at %gx speed from %s",
            len(self._devices),
            ", ".join(self.servers),
            self._speed,
            self._start.isoformat(),
        )

    async def stop(self) -> None:
        """Stop the tick and close every socket; safe to call twice. Simulated time keeps running."""
        task, self._tick_task = self._tick_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_endpoints()
        await self._write_labels()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _stop_endpoints(self) -> None:
        for fleet in self._fleets:
            await fleet.stop()
        for opcua in self._opcua:
            await opcua.stop()
        for endpoint in self._endpoints:
            await endpoint.stop()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        next_s = loop.time()
        while True:
            next_s += self._tick_s
            await asyncio.sleep(max(0.0, next_s - loop.time()))
            self._step()
            await self._write_labels()

    def _step(self) -> None:
        now = self.now()
        for device_id in self._stepping:
            self._devices[device_id].physics.step(now)
        for endpoint in self._endpoints:
            endpoint.refresh()
        for opcua in self._opcua:
            opcua.refresh()
        for fleet in self._fleets:
            fleet.refresh()
        for injector in self._injectors:
            for label in injector.drain_labels():
                _LOGGER.info(
                    "%s: %s anomaly on %s from %s to %s",
                    label.device,
                    label.type.value,
                    label.point,
                    label.start.isoformat(),
                    label.end.isoformat(),
                )
                self._labels.append(label)
                if self._label_file is not None:
                    self._unwritten.append(label)

    async def _write_labels(self) -> None:
        """Append new labels to the labels file, off the event loop."""
        if self._label_file is None or not self._unwritten:
            return
        batch, self._unwritten = self._unwritten, []
        try:
            await asyncio.to_thread(self._label_file.write, batch)
        except OSError as err:
            _LOGGER.warning(
                "cannot write %d anomaly labels to %s: %s", len(batch), self._label_file.path, err
            )


# --------------------------------------------------------------------------------------------------
# Document checks


def _expect(value: Any, kind: type | tuple[type, ...], path: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise DocumentError(path, f"expected a number, got {value!r}")
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DocumentError(path, f"expected {names}, got {value!r}")
    return value


def _section(raw: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = raw.get(key)
    if not isinstance(value, Mapping):
        raise DocumentError(f"{path}.{key}", "missing or not a mapping")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class _Draft:
    """A checked device of the document whose physics is not built yet (sums need an order)."""

    device_id: str
    path: str
    kind: DeviceKind
    host: str = ""
    port: int = 0
    unit_id: int = 0
    points: tuple[SimulatedPoint, ...] = ()
    opcua: OpcUaServing | None = None
    mqtt: MqttServing | None = None
    params: SimulationParams | None
    seed: int
    injector: AnomalyInjector | None


def _draft(raw: Any, path: str, *, tz: ZoneInfo, start: datetime) -> _Draft:
    if not isinstance(raw, Mapping):
        raise DocumentError(path, "expected a mapping")
    device_id = _expect(raw.get("id"), str, f"{path}.id")
    path = f"{path} ({device_id})"
    if raw.get("template") is not None:
        raise DocumentError(
            f"{path}.template",
            "templates are not expanded: give the simulators the normalized document that "
            "`scada simulate` writes (it expands templates)",
        )
    raw_points = raw.get("points")
    if not isinstance(raw_points, list) or not raw_points:
        raise DocumentError(
            f"{path}.points",
            "no points: give the simulators the normalized document that `scada simulate` writes",
        )
    kind_name = raw.get("kind")
    if kind_name not in {k.value for k in DeviceKind}:
        allowed = ", ".join(k.value for k in DeviceKind)
        raise DocumentError(f"{path}.kind", f"unknown device kind {kind_name!r} (use {allowed})")
    kind = DeviceKind(kind_name)
    protocol = raw.get("protocol", "modbus_tcp")
    serving: dict[str, Any]
    if protocol == "modbus_tcp":
        serving = _modbus_serving(raw, raw_points, path)
    elif protocol == "opcua":
        serving = {"opcua": _opcua_serving(raw, raw_points, path)}
    elif protocol == "mqtt":
        serving = {"mqtt": _mqtt_serving(raw, raw_points, path)}
    else:
        raise DocumentError(
            f"{path}.protocol", f"cannot simulate protocol {protocol!r} (use modbus_tcp, opcua or mqtt)"
        )
    simulation = raw.get("simulation")
    params = _simulation(simulation, f"{path}.simulation")
    seed = params.seed if params is not None and params.seed is not None else zlib.crc32(device_id.encode())
    injector = None
    if isinstance(simulation, Mapping):
        try:
            specs = parse_anomalies(
                device_id,
                simulation.get("anomalies"),
                path=f"{path}.simulation.anomalies",
                tz=tz,
                plant_start=start,
            )
            schedule = parse_random_anomalies(
                simulation.get("random_anomalies"),
                path=f"{path}.simulation.random_anomalies",
                default_seed=seed,
            )
        except AnomalyConfigError as err:
            raise DocumentError(err.field, str(err).removeprefix(f"{err.field}: ")) from None
        if specs or schedule is not None:
            injector = AnomalyInjector(device_id, specs, tz=tz, random=schedule)
    return _Draft(
        device_id=device_id, path=path, kind=kind, params=params, seed=seed, injector=injector, **serving
    )


def _modbus_serving(raw: Mapping[str, Any], raw_points: list[Any], path: str) -> dict[str, Any]:
    modbus = _section(raw, "modbus", path)
    host = _expect(modbus.get("host"), str, f"{path}.modbus.host")
    port = _expect(modbus.get("port", 502), int, f"{path}.modbus.port")
    if not 1 <= port <= 65535:
        raise DocumentError(f"{path}.modbus.port", f"{port} is not a TCP port (1..65535)")
    unit_id = _expect(modbus.get("unit_id", 1), int, f"{path}.modbus.unit_id")
    if not 0 <= unit_id <= 255:
        raise DocumentError(f"{path}.modbus.unit_id", f"{unit_id} is not a unit id (0..255)")
    points = tuple(_point(p, f"{path}.points[{i}]") for i, p in enumerate(raw_points))
    return {"host": host, "port": port, "unit_id": unit_id, "points": points}


def _keyed_point(raw: Any, path: str) -> tuple[Mapping[str, Any], str, str]:
    """Check one point of the document; return it, its key, and its path named by the key."""
    if not isinstance(raw, Mapping):
        raise DocumentError(path, "expected a mapping")
    key = _expect(raw.get("key"), str, f"{path}.key")
    return raw, key, f"{path} ({key})"


def _engineering(raw: Mapping[str, Any], path: str) -> dict[str, Any]:
    return {
        "scale": _expect(raw.get("scale", 1.0), (int, float), f"{path}.scale"),
        "offset": _expect(raw.get("offset", 0.0), (int, float), f"{path}.offset"),
        "writable": _expect(raw.get("writable", False), bool, f"{path}.writable"),
    }


def _opcua_serving(raw: Mapping[str, Any], raw_points: list[Any], path: str) -> OpcUaServing:
    section = _section(raw, "opcua", path)
    endpoint = _expect(section.get("endpoint"), str, f"{path}.opcua.endpoint")
    points: list[OpcUaSimPoint] = []
    for index, raw_point in enumerate(raw_points):
        point, key, where = _keyed_point(raw_point, f"{path}.points[{index}]")
        opcua = _section(point, "opcua", where)
        method = opcua.get("method")
        if method is not None:
            method_map = _section(opcua, "method", f"{where}.opcua")
            method = (
                _expect(method_map.get("object_id"), str, f"{where}.opcua.method.object_id"),
                _expect(method_map.get("method_id"), str, f"{where}.opcua.method.method_id"),
            )
        try:
            points.append(
                OpcUaSimPoint(
                    key=key,
                    node_id=_expect(opcua.get("node_id"), str, f"{where}.opcua.node_id"),
                    method=method,
                    **_engineering(point, where),
                )
            )
        except ValueError as err:
            raise DocumentError(f"{where}.opcua", str(err)) from None
    return OpcUaServing(endpoint=endpoint, points=tuple(points))


def _mqtt_serving(raw: Mapping[str, Any], raw_points: list[Any], path: str) -> MqttServing:
    section = raw.get("mqtt") or {}
    if not isinstance(section, Mapping):
        raise DocumentError(f"{path}.mqtt", "expected a mapping")
    defaults = MqttSimTopics()
    topics = MqttSimTopics(
        telemetry_topic=_expect(
            section.get("telemetry_topic", defaults.telemetry_topic), str, f"{path}.mqtt"
        ),
        command_topic=_expect(section.get("command_topic", defaults.command_topic), str, f"{path}.mqtt"),
        response_topic=_expect(section.get("response_topic", defaults.response_topic), str, f"{path}.mqtt"),
        qos=_expect(section.get("qos", 1), int, f"{path}.mqtt.qos"),
    )
    version = str(section.get("version", "5"))
    period_s = float(_expect(raw.get("poll_period_s", 1.0), (int, float), f"{path}.poll_period_s"))
    points: list[MqttSimPoint] = []
    for index, raw_point in enumerate(raw_points):
        point, key, where = _keyed_point(raw_point, f"{path}.points[{index}]")
        mqtt = point.get("mqtt") or {}
        field = _expect(
            mqtt.get("field", key) if isinstance(mqtt, Mapping) else key, str, f"{where}.mqtt.field"
        )
        try:
            points.append(MqttSimPoint(key=key, field=field, **_engineering(point, where)))
        except ValueError as err:
            raise DocumentError(where, str(err)) from None
    return MqttServing(topics=topics, version=version, period_s=period_s, points=tuple(points))


def _stepping_order(drafts: Sequence[_Draft]) -> list[_Draft]:
    """Return the drafts with every summed device before the meter that sums it."""
    by_id = {d.device_id: d for d in drafts}
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for draft in drafts:
        sums = draft.params.sums if draft.params is not None else ()
        for i, part in enumerate(sums):
            if part not in by_id:
                raise DocumentError(f"{draft.path}.simulation.sums[{i}]", f"unknown device {part!r}")
        sorter.add(draft.device_id, *sums)
    try:
        return [by_id[device_id] for device_id in sorter.static_order()]
    except graphlib.CycleError as err:
        cycle = " -> ".join(err.args[1])
        raise DocumentError("simulation.sums", f"devices sum each other in a circle: {cycle}") from None


def _summed_first(devices: Sequence[SimulatedDevice]) -> list[str]:
    """Return device ids with every device a main meter sums before that meter."""
    owner = {id(d.physics): d.device_id for d in devices}
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for device in devices:
        parts = device.physics.parts if isinstance(device.physics, MainMeterPhysics) else ()
        sorter.add(device.device_id, *(owner[id(p)] for p in parts if id(p) in owner))
    try:
        return list(sorter.static_order())
    except graphlib.CycleError as err:
        raise ValueError(f"devices sum each other in a circle: {' -> '.join(err.args[1])}") from None


def _build(drafts: Sequence[_Draft], *, tz: ZoneInfo, start: datetime) -> list[SimulatedDevice]:
    """Build every device's physics, summed devices first."""
    physics: dict[str, DevicePhysics] = {}
    devices = []
    for draft in _stepping_order(drafts):
        sums = draft.params.sums if draft.params is not None else ()
        made = make_physics(
            draft.kind,
            draft.params,
            tz=tz,
            start=start,
            seed=draft.seed,
            name=draft.device_id,
            parts=[physics[part] for part in sums],
        )
        made.attach(draft.injector)
        physics[draft.device_id] = made
        if draft.opcua is None and draft.mqtt is None:
            try:
                SimulatedUnit(draft.device_id, draft.unit_id, made, draft.points)  # checks register overlaps
            except ValueError as err:
                raise DocumentError(f"{draft.path}.points", str(err)) from None
        devices.append(
            SimulatedDevice(
                device_id=draft.device_id,
                kind=draft.kind,
                host=draft.host,
                port=draft.port,
                unit_id=draft.unit_id,
                physics=made,
                points=draft.points,
                opcua=draft.opcua,
                mqtt=draft.mqtt,
            )
        )
    return devices


def _point(raw_point: Any, path: str) -> SimulatedPoint:
    raw, key, path = _keyed_point(raw_point, path)
    modbus = _section(raw, "modbus", path)
    fields: dict[str, Any] = {
        "key": key,
        **_engineering(raw, path),
        "address": _expect(modbus.get("address"), int, f"{path}.modbus.address"),
    }
    for name in ("table", "type", "word_order", "byte_order"):
        if modbus.get(name) is not None:
            fields[name] = _expect(modbus[name], str, f"{path}.modbus.{name}")
    try:
        return SimulatedPoint(**fields)
    except ValueError as err:
        raise DocumentError(f"{path}.modbus", str(err)) from None


_PARAM_NUMBERS = (
    "base_kw",
    "peak_kw",
    "base_nm3_h",
    "peak_nm3_h",
    "capacity_kwh",
    "noise_pct",
    "max_charge_kw",
    "max_discharge_kw",
    "soc_min_pct",
    "soc_max_pct",
    "initial_soc_pct",
    "round_trip_efficiency",
    "time_constant_min",
    "ballast_min_pct",
    "pressure_band_bar",
)


def _simulation(raw: Any, path: str) -> SimulationParams | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise DocumentError(path, "expected a mapping")
    fields: dict[str, Any] = {}
    if raw.get("profile") is not None:
        profile = _expect(raw["profile"], str, f"{path}.profile")
        if profile not in PROFILES:
            raise DocumentError(
                f"{path}.profile", f"unknown profile {profile!r} (use {', '.join(sorted(PROFILES))})"
            )
        fields["profile"] = profile
    for name in _PARAM_NUMBERS:
        if raw.get(name) is not None:
            number = float(_expect(raw[name], (int, float), f"{path}.{name}"))
            if not number >= 0:
                raise DocumentError(f"{path}.{name}", f"must be >= 0, got {number!r}")
            fields[name] = number
    if raw.get("seed") is not None:
        fields["seed"] = _expect(raw["seed"], int, f"{path}.seed")
    if raw.get("jobs") is not None:
        fields["jobs"] = tuple(
            _job(job, f"{path}.jobs[{i}]") for i, job in enumerate(_expect(raw["jobs"], list, f"{path}.jobs"))
        )
    if raw.get("sums") is not None:
        sums = _expect(raw["sums"], list, f"{path}.sums")
        fields["sums"] = tuple(_expect(part, str, f"{path}.sums[{i}]") for i, part in enumerate(sums))
    try:
        return SimulationParams(**fields)
    except ValueError as err:
        raise DocumentError(path, str(err)) from None


def _job(raw: Any, path: str) -> JobSpec:
    if not isinstance(raw, Mapping):
        raise DocumentError(path, "expected a mapping")
    fields: dict[str, Any] = {}
    for name in ("start_hour", "duration_h", "power_kw"):
        fields[name] = float(_expect(raw.get(name), (int, float), f"{path}.{name}"))
    if raw.get("workdays_only") is not None:
        fields["workdays_only"] = _expect(raw["workdays_only"], bool, f"{path}.workdays_only")
    try:
        return JobSpec(**fields)
    except ValueError as err:
        raise DocumentError(path, str(err)) from None
