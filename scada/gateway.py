"""The gateway role: this shard's device sessions, their drivers, and the command path to them.

One :class:`Gateway` per process builds a driver per device the shard owns (:mod:`scada.sharding`),
wraps each in a :class:`~scada.sessions.DeviceSession`, and shares what should be shared: one MQTT
connection per protocol version for every MQTT device (10,000 devices are 10,000 topics, not 10,000
broker connections). :meth:`Gateway.execute` routes a command to its device's session, which writes,
waits for the acknowledgement and verifies by read-back.

Everything a device section of the site file says becomes a driver argument here and nowhere else,
so the protocol packages never see the site file (import-linter keeps them apart).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol as TypingProtocol

from protocols.modbus.driver import ModbusDriver, ModbusPointSpec
from protocols.mqtt.config import MqttVersion
from protocols.mqtt.connection import MqttConnection
from protocols.mqtt.driver import MqttDriver, MqttPointSpec
from protocols.mqtt.security import MqttSecurityConfig
from protocols.opcua.driver import OpcUaDriver, OpcUaPointSpec
from protocols.openadr.driver import OpenAdrDriver, OpenAdrPointSpec
from protocols.openadr.store import VtnStateStore
from scada.config import DeviceConfig, PointConfig, Protocol, SiteConfig
from scada.model import (
    Clock,
    Command,
    CommandResult,
    CommandStatus,
    DeadLetterSink,
    Driver,
    EventSink,
    PointId,
    ReadingSink,
    split_point_id,
)
from scada.runtime import TaskSupervisor
from scada.sessions import DeviceSession
from scada.sharding import Shard

__all__ = ["Gateway", "GatewaySink", "build_driver"]

_LOGGER = logging.getLogger(__name__)


class GatewaySink(ReadingSink, EventSink, DeadLetterSink, TypingProtocol):
    """What the gateway publishes into: readings, availability events and dead letters."""


def build_driver(
    device: DeviceConfig,
    clock: Clock,
    *,
    mqtt: MqttConnection | None = None,
    dead_letters: DeadLetterSink | None = None,
    openadr_store: VtnStateStore | None = None,
) -> Driver:
    """Build the protocol driver a device's configuration asks for.

    MQTT devices need the shared ``mqtt`` connection and a ``dead_letters`` sink for payloads that
    cannot be used; OpenADR devices need ``dead_letters`` and the ``openadr_store`` of VTN state.
    """
    if device.protocol is Protocol.MODBUS_TCP:
        assert device.modbus is not None  # guaranteed by the config validator
        modbus_specs = [
            ModbusPointSpec(
                point=device.point_id(p.key),
                config=p.modbus,
                scale=p.scale,
                offset=p.offset,
                writable=p.writable,
            )
            for p in device.points
            if p.modbus is not None
        ]
        return ModbusDriver(device.id, device.modbus, modbus_specs, clock=clock)
    if device.protocol is Protocol.OPCUA:
        assert device.opcua is not None
        opcua_specs = [
            OpcUaPointSpec(
                point=device.point_id(p.key),
                config=p.opcua,
                scale=p.scale,
                offset=p.offset,
                writable=p.writable,
            )
            for p in device.points
            if p.opcua is not None
        ]
        return OpcUaDriver(device.id, device.opcua, opcua_specs, clock=clock)
    if device.protocol is Protocol.OPENADR:
        assert device.openadr is not None
        if openadr_store is None or dead_letters is None:
            raise ValueError(f"{device.id}: an OpenADR device needs the VTN state store and dead-letter sink")
        openadr_specs = [
            OpenAdrPointSpec(
                point=device.point_id(p.key),
                config=p.openadr,
                unit=p.unit.value,
                scale=p.scale,
                offset=p.offset,
                writable=p.writable,
            )
            for p in device.points
            if p.openadr is not None
        ]
        return OpenAdrDriver(
            device.id,
            device.openadr,
            openadr_specs,
            store=openadr_store,
            clock=clock,
            dead_letters=dead_letters,
        )
    assert device.protocol is Protocol.MQTT
    assert device.mqtt is not None
    if mqtt is None or dead_letters is None:
        raise ValueError(f"{device.id}: an MQTT device needs the shared MQTT connection and dead-letter sink")
    mqtt_specs = [
        MqttPointSpec(
            point=device.point_id(p.key),
            field=p.mqtt.field if p.mqtt is not None else p.key,
            scale=p.scale,
            offset=p.offset,
            writable=p.writable,
        )
        for p in device.points
    ]
    return MqttDriver(
        device.id, device.mqtt, mqtt_specs, connection=mqtt, clock=clock, dead_letters=dead_letters
    )


class Gateway:
    """The device sessions of one shard, with their shared connections and the command path."""

    def __init__(
        self,
        site: SiteConfig,
        *,
        sink: GatewaySink,
        clock: Clock,
        mqtt_url: str,
        shard: Shard | None = None,
        client_id: str = "carbonos-gateway",
        service_timeout_s: float = 5.0,
        mqtt_security: MqttSecurityConfig | None = None,
        openadr_store: VtnStateStore | None = None,
    ) -> None:
        self._site = site
        self._openadr_store = openadr_store
        self._mqtt_security = mqtt_security
        self._sink = sink
        self._clock = clock
        self._mqtt_url = mqtt_url
        self._shard = shard or Shard()
        self._client_id = client_id
        self._service_timeout_s = service_timeout_s
        self._mqtt: dict[MqttVersion, MqttConnection] = {}
        self._points: dict[PointId, PointConfig] = {}
        self.devices: tuple[DeviceConfig, ...] = tuple(
            d for d in site.devices if d.enabled and self._shard.owns(d.id)
        )
        """The enabled devices this shard supervises."""
        self.sessions: dict[str, DeviceSession] = {}

    @property
    def shard(self) -> Shard:
        """Return which share of the fleet this gateway supervises."""
        return self._shard

    @property
    def mqtt_connections(self) -> Mapping[MqttVersion, MqttConnection]:
        """Return the shared MQTT connections, by protocol version (empty without MQTT devices)."""
        return self._mqtt

    async def start(self, supervisor: TaskSupervisor) -> None:
        """Open the shared connections, then start one session task per device under ``supervisor``.

        The MQTT connections reconnect on their own with backoff; a broker that is down at start-up
        makes the MQTT devices offline, not the gateway.
        """
        versions = {d.mqtt.version for d in self.devices if d.mqtt is not None}
        for version in sorted(versions):
            connection = MqttConnection(
                self._mqtt_url,
                client_id=f"{self._client_id}-{self._shard.index}-v{version.value.replace('.', '')}",
                version=version,
                timeout_s=self._service_timeout_s,
                dead_letters=self._sink,
                security=self._mqtt_security,
            )
            await connection.start()
            self._mqtt[version] = connection
        for device in self.devices:
            session = self._session(device)
            self.sessions[device.id] = session
            supervisor.spawn(session.run(), name=f"session:{device.id}")
        _LOGGER.info(
            "gateway %s: %d device sessions started (%s)",
            self._shard,
            len(self.sessions),
            ", ".join(f"{n} {p}" for p, n in sorted(self._protocol_counts().items())) or "none",
        )

    async def close(self) -> None:
        """Close the shared connections (the sessions belong to the supervisor that runs them)."""
        for connection in self._mqtt.values():
            await connection.close()
        self._mqtt.clear()

    def owns_point(self, point: PointId) -> bool:
        """Return True if the point's device is supervised by this gateway."""
        device, _, _ = point.partition(".")
        return device in self.sessions

    async def execute(self, command: Command) -> CommandResult:
        """Send a command to the session of its device; a device of another shard fails clearly."""
        try:
            device, _ = split_point_id(command.point)
        except Exception as err:  # noqa: BLE001 (NotFound for malformed ids; reported, not raised)
            return self._failed(command, str(err))
        session = self.sessions.get(device)
        if session is None:
            where = "another gateway shard" if any(d.id == device for d in self._site.devices) else "no shard"
            return self._failed(command, f"device {device!r} is not supervised here ({where})")
        return await session.execute(command)

    def _failed(self, command: Command, reason: str) -> CommandResult:
        return CommandResult.of(command, CommandStatus.FAILED, ts=self._clock.now(), reason=reason)

    def _session(self, device: DeviceConfig) -> DeviceSession:
        points = {device.point_id(p.key): p for p in device.points}
        self._points.update(points)
        mqtt = self._mqtt.get(device.mqtt.version) if device.mqtt is not None else None
        driver = build_driver(
            device, self._clock, mqtt=mqtt, dead_letters=self._sink, openadr_store=self._openadr_store
        )
        return DeviceSession(
            driver,
            points=list(points),
            sink=self._sink,
            events=self._sink,
            period_s=device.poll_period_s,
            clock=self._clock,
            stale_after_s=device.effective_stale_after_s,
            stuck_after_s={pid: p.stuck_after_s for pid, p in points.items() if p.stuck_after_s is not None},
            write_tolerance=self._tolerance,
            write_timeout_s=_write_timeout_s(device),
        )

    def _tolerance(self, point: PointId, value: float) -> float:
        return self._points[point].verify_tolerance(value)

    def _protocol_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for device in self.devices:
            counts[device.protocol.value] = counts.get(device.protocol.value, 0) + 1
        return counts


def _write_timeout_s(device: DeviceConfig) -> float:
    """Return how long a write may wait for its acknowledgement: a few of the device's own timeouts."""
    section = device.modbus or device.opcua or device.mqtt or device.openadr
    timeout_s = getattr(section, "timeout_s", 5.0)
    return max(1.0, 3.0 * float(timeout_s))
