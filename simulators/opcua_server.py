"""OPC UA servers for simulated devices: one asyncua server per endpoint URL, variables from physics.

An :class:`OpcUaEndpoint` serves every device configured on its endpoint URL, as a gateway or an
OPC UA wrapper in front of several PLCs would. Each device is an object under ``Objects`` and each
of its points a variable with the NodeId from the point, an ``EURange`` property and, for writable
points, write access; a point written through a method gets that method on an object with the
configured NodeId. Variables hold raw values: ``raw = (engineering - offset) / scale`` in the
point's OPC UA data type.

The plant calls :meth:`OpcUaEndpoint.refresh` on every tick. It is synchronous and cheap: it
compares each point's value with the one last pushed, and only changed values are handed to one
writer task that applies them to the address space (which runs the subscriptions' data-change
checks). A client write or method call goes to the device physics (``physics.write(key, value)``)
and the variable is set at once from the physics, so a clamped setpoint reads back clamped.

Two behaviours of asyncua's server are corrected here, per server instance, because a simulator
that mis-reports would test the driver against the wrong thing (OPC UA Part 4, 7.17.2):

- a deadband compares with the last *reported* value, not the previous sample, so a slow ramp is
  still reported once it has moved by more than the deadband;
- a percent deadband is a share of the variable's EURange (asyncua ignores it and reports all);
- a change of status code is always reported, whatever the deadband.

Tests pin a status code on a variable with :meth:`OpcUaEndpoint.set_status` (Uncertain and Bad
qualities); :meth:`OpcUaEndpoint.stop` closes every client connection, as a device that powers down.
Source timestamps are the server's wall clock (UTC), as a device with its own clock stamps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast
from urllib.parse import urlparse

from asyncua import ua
from asyncua.common.callback import CallbackService, CallbackType, ServerItemCallback
from asyncua.common.node import Node
from asyncua.common.utils import ServiceError
from asyncua.crypto import uacrypto
from asyncua.server.monitored_item_service import MonitoredItemValues
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStringParsingError
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from scada.model import utc_now
from simulators.physics import DevicePhysics

__all__ = ["DATA_TYPES", "NAMESPACE_URI", "OpcUaEndpoint", "OpcUaSimPoint", "OpcUaSimulatorError"]

_LOGGER = logging.getLogger(__name__)

NAMESPACE_URI: Final = "urn:carbonos:simulator"
"""Namespace of the simulated devices' nodes (index 2 on every simulated server)."""

DATA_TYPES: Final[Mapping[str, ua.VariantType]] = {
    "double": ua.VariantType.Double,
    "float": ua.VariantType.Float,
    "int16": ua.VariantType.Int16,
    "uint16": ua.VariantType.UInt16,
    "int32": ua.VariantType.Int32,
    "uint32": ua.VariantType.UInt32,
    "int64": ua.VariantType.Int64,
    "boolean": ua.VariantType.Boolean,
}
"""OPC UA data types a simulated variable can have, named as in the site file."""

_INT_RANGE: Final[Mapping[ua.VariantType, tuple[int, int]]] = {
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
}

Security = Literal["none", "basic256sha256"]
_MethodHandler = Callable[..., Awaitable[list[ua.Variant] | ua.StatusCode]]


class OpcUaSimulatorError(Exception):
    """An OPC UA simulator cannot start (address in use, bad NodeId, missing certificate...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpcUaSimPoint:
    """One simulated variable: which physics variable it shows and where it lives."""

    key: str
    """Name of the physics variable (the point key)."""
    node_id: str
    """NodeId in string form, e.g. ``ns=2;s=meter-1.active_power_kw``."""
    writable: bool = False
    method: tuple[str, str] | None = None
    """(object NodeId, method NodeId): the value is written by calling this method."""
    scale: float = 1.0
    """Engineering value = raw value x scale + offset."""
    offset: float = 0.0
    data_type: str = "double"
    eu_range: tuple[float, float] = (0.0, 100.0)
    """EURange (low, high) of the raw value, the base of percent deadbands."""

    def __post_init__(self) -> None:
        if self.data_type not in DATA_TYPES:
            raise ValueError(
                f"{self.key}: unknown data type {self.data_type!r} (use {', '.join(DATA_TYPES)})"
            )
        if self.scale == 0:
            raise ValueError(f"{self.key}: scale must not be 0")
        if not self.eu_range[0] < self.eu_range[1]:
            raise ValueError(f"{self.key}: eu_range must be (low, high) with low < high")
        for node_id in (self.node_id, *(self.method or ())):
            try:
                ua.NodeId.from_string(node_id)
            except (ValueError, UaStringParsingError) as err:
                raise ValueError(f"{self.key}: {node_id!r} is not a NodeId: {err}") from None

    @property
    def variant_type(self) -> ua.VariantType:
        """Return the OPC UA type of the variable."""
        return DATA_TYPES[self.data_type]

    def encode(self, value: float) -> Any:
        """Return the raw value the variable holds for an engineering value (ints saturate).

        >>> OpcUaSimPoint(key="p", node_id="ns=2;s=p", data_type="int16", scale=0.1).encode(23.04)
        230
        """
        raw = (value - self.offset) / self.scale
        vtype = self.variant_type
        if vtype is ua.VariantType.Boolean:
            return not (math.isnan(raw) or raw == 0)
        if vtype in _INT_RANGE:
            low, high = _INT_RANGE[vtype]
            if math.isnan(raw):
                return 0
            if math.isinf(raw):
                return high if raw > 0 else low
            return min(high, max(low, round(raw)))
        return raw

    def decode(self, raw: Any) -> float:
        """Return the engineering value of a raw value a client wrote.

        >>> OpcUaSimPoint(key="p", node_id="ns=2;s=p", scale=0.1, offset=1.0).decode(100)
        11.0
        """
        return float(raw) * self.scale + self.offset


@dataclass(slots=True)
class _Variable:
    device_id: str
    physics: DevicePhysics
    point: OpcUaSimPoint
    node_id: ua.NodeId
    last_raw: Any = None
    status: ua.StatusCode | None = None


class OpcUaEndpoint:
    """One OPC UA server (one endpoint URL) serving the variables of several simulated devices."""

    def __init__(
        self,
        endpoint_url: str,
        devices: Sequence[tuple[str, DevicePhysics, Sequence[OpcUaSimPoint]]],
        *,
        security: Security = "none",
        certificate: Path | None = None,
        private_key: Path | None = None,
        trusted_client_certificates: Sequence[Path] = (),
    ) -> None:
        parsed = urlparse(endpoint_url)
        if parsed.scheme != "opc.tcp" or not parsed.hostname:
            raise ValueError(f"{endpoint_url!r} is not an opc.tcp:// endpoint URL")
        if security not in ("none", "basic256sha256"):
            raise ValueError(f"unknown security {security!r} (use none or basic256sha256)")
        if security != "none" and (certificate is None or private_key is None):
            raise ValueError(f"security {security} needs certificate and private_key")
        self.endpoint_url = endpoint_url
        self.host: str = parsed.hostname
        self.port: int = parsed.port or 4840
        self.security: Security = security
        self._certificate = certificate
        self._private_key = private_key
        self._trusted = tuple(trusted_client_certificates)
        self._devices = tuple((device_id, physics, tuple(points)) for device_id, physics, points in devices)
        self._variables: dict[str, _Variable] = {}
        for device_id, physics, points in self._devices:
            for point in points:
                node = ua.NodeId.from_string(point.node_id)
                text = node.to_string()
                if text in self._variables:
                    raise ValueError(f"{endpoint_url}: NodeId {point.node_id} is used twice")
                self._variables[text] = _Variable(device_id, physics, point, node)
        self._by_method: dict[str, _Variable] = {
            ua.NodeId.from_string(v.point.method[1]).to_string(): v
            for v in self._variables.values()
            if v.point.method is not None
        }
        self._server: Server | None = None
        self._pending: dict[str, _Variable] = {}
        self._writer: asyncio.Task[None] | None = None
        self._deadband_spans: weakref.WeakKeyDictionary[MonitoredItemValues, float] = (
            weakref.WeakKeyDictionary()
        )
        self._reported: weakref.WeakKeyDictionary[MonitoredItemValues, ua.DataValue] = (
            weakref.WeakKeyDictionary()
        )
        self.pushed_values = 0
        """Variable updates applied since start (a bench reads it to check the plant's load)."""

    def __str__(self) -> str:
        return self.endpoint_url

    @property
    def listening(self) -> bool:
        """Return True while the server accepts connections."""
        return self._server is not None

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Return the NodeId (string form) of every simulated variable."""
        return tuple(self._variables)

    # ----------------------------------------------------------------------------------------------
    # Life cycle

    async def start(self) -> None:
        """Build a fresh server (as a device that boots) and listen; raise OpcUaSimulatorError if not."""
        if self._server is not None:
            return
        asyncua_logger = logging.getLogger("asyncua")
        if asyncua_logger.level == logging.NOTSET:  # asyncua logs every request at INFO
            asyncua_logger.setLevel(logging.WARNING)
        server = Server()
        try:
            await self._configure(server)
            await self._build(server)
            await server.start()
        except (OSError, UaError, ServiceError, ValueError) as err:
            with contextlib.suppress(Exception):
                await server.stop()
            raise OpcUaSimulatorError(f"cannot serve {self}: {err}") from err
        self._server = server
        _LOGGER.info("OPC UA server listening on %s with %d variables", self, len(self._variables))

    async def stop(self) -> None:
        """Close the server and every client connection; safe to call twice."""
        server, self._server = self._server, None
        writer, self._writer = self._writer, None
        self._pending.clear()
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        if server is not None:
            await server.stop()
            # Sessions with subscriptions outlive their connection (Part 4, 6.7) and would keep
            # publishing tasks alive in a stopped server until they time out: a device that powers
            # down forgets them, so close them (no public way to list a server's sessions).
            for session in list(server.iserver._external_sessions.values()):
                await session.close_session()
            await asyncio.sleep(0)  # let the closed transports deliver connection_lost before we return
            _LOGGER.info("OPC UA server on %s stopped", self)

    # ----------------------------------------------------------------------------------------------
    # Plant and test API

    def refresh(self) -> None:
        """Queue every variable whose physics value changed since it was last pushed."""
        if self._server is None:
            return
        for key, variable in self._variables.items():
            raw = variable.point.encode(variable.physics.value(variable.point.key))
            if raw != variable.last_raw or (isinstance(raw, float) and math.isnan(raw)):
                variable.last_raw = raw
                self._pending[key] = variable
        if self._pending and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._write_pending(), name=f"opcua-sim:{self.port}:writer")

    async def flush(self) -> None:
        """Wait until every queued update is in the address space (tests read right after)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def set_status(self, node_id: str, status: int | str | None) -> None:
        """Pin a status code (value or name, e.g. ``"UncertainLastUsableValue"``) on a variable.

        ``None`` returns the variable to Good. The change shows on the next :meth:`refresh`.
        """
        variable = self._variable(node_id)
        variable.status = None if status is None else ua.StatusCode(status)  # type: ignore[arg-type]
        variable.last_raw = None  # push again even if the value did not change

    # ----------------------------------------------------------------------------------------------
    # Internals

    def _variable(self, node_id: str) -> _Variable:
        try:
            return self._variables[ua.NodeId.from_string(node_id).to_string()]
        except (KeyError, ValueError, UaStringParsingError):
            raise KeyError(f"{self}: no simulated variable {node_id!r}") from None

    def _data_value(self, variable: _Variable, raw: Any) -> ua.DataValue:
        now = utc_now()
        status = variable.status or _status(StatusCodes.Good)
        return ua.DataValue(
            Value=ua.Variant(raw, variable.point.variant_type),
            StatusCode=status,
            SourceTimestamp=cast("ua.DateTime", now),
            ServerTimestamp=cast("ua.DateTime", now),
        )

    async def _write_pending(self) -> None:
        while self._pending and self._server is not None:
            batch, self._pending = self._pending, {}
            for variable in batch.values():
                await self._server.write_attribute_value(
                    variable.node_id, self._data_value(variable, variable.last_raw)
                )
                self.pushed_values += 1
            await asyncio.sleep(0)  # let the publish loops run between batches

    async def _configure(self, server: Server) -> None:
        await server.init()
        server.set_endpoint(self.endpoint_url)
        server.set_server_name(f"CarbonOS simulator {self.host}:{self.port}")
        if self.security == "none":
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.AnonymousIdentityToken])  # no password in clear text
        else:
            assert self._certificate is not None
            assert self._private_key is not None
            cert_bytes = await asyncio.to_thread(self._certificate.read_bytes)
            await server.load_certificate(cert_bytes, _extension(self._certificate))
            await server.load_private_key(
                await asyncio.to_thread(self._private_key.read_bytes), format=_extension(self._private_key)
            )
            uri = _application_uri(await uacrypto.load_certificate(cert_bytes, _extension(self._certificate)))
            if uri:
                await server.set_application_uri(uri)
            server.set_security_policy(
                [
                    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                    ua.SecurityPolicyType.Basic256Sha256_Sign,
                ]
            )
            server.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken])
            if self._trusted:
                trusted = {
                    _der(await uacrypto.load_certificate(data, _extension(path)))
                    for path in self._trusted
                    for data in [await asyncio.to_thread(path.read_bytes)]
                }
                server.set_certificate_validator(_TrustList(trusted))
        server.subscribe_server_callback(CallbackType.PostWrite, self._on_client_write)
        server.subscribe_server_callback(CallbackType.ItemSubscriptionCreated, self._on_items_created)
        server.subscribe_server_callback(CallbackType.ItemSubscriptionModified, self._on_items_created)

    async def _build(self, server: Server) -> None:
        """Create the namespace, one object per device, the variables and the methods."""
        namespace = await server.register_namespace(NAMESPACE_URI)
        highest = max(
            (
                ua.NodeId.from_string(node).NamespaceIndex
                for v in self._variables.values()
                for node in (v.point.node_id, *(v.point.method or ()))
            ),
            default=namespace,
        )
        for extra in range(namespace + 1, highest + 1):
            await server.register_namespace(f"{NAMESPACE_URI}:ns{extra}")
        objects = server.nodes.objects
        nodes: dict[str, Node] = {}
        for device_id, _physics, points in self._devices:
            device_node = await objects.add_object(
                ua.NodeId(ua.String(device_id), ua.Int16(namespace)), f"{namespace}:{device_id}"
            )
            for point in points:
                variable = self._variables[ua.NodeId.from_string(point.node_id).to_string()]
                variable.last_raw = point.encode(variable.physics.value(point.key))
                node = await device_node.add_variable(
                    variable.node_id,
                    ua.QualifiedName(point.key, variable.node_id.NamespaceIndex),
                    ua.Variant(variable.last_raw, point.variant_type),
                    varianttype=point.variant_type,
                )
                await server.write_attribute_value(
                    variable.node_id, self._data_value(variable, variable.last_raw)
                )
                eu_range_id = ua.String(f"{variable.node_id.to_string()}.EURange")
                await node.add_property(
                    ua.NodeId(eu_range_id, variable.node_id.NamespaceIndex),
                    ua.QualifiedName("EURange", 0),
                    ua.Variant(
                        ua.Range(Low=point.eu_range[0], High=point.eu_range[1]),
                        ua.VariantType.ExtensionObject,
                    ),
                    datatype=ua.NodeId(ua.Int32(ObjectIds.Range)),
                )
                if point.writable and point.method is None:
                    await node.set_writable()
                if point.method is not None:
                    await self._add_method(device_node, nodes, variable)

    async def _add_method(self, device_node: Node, objects: dict[str, Node], variable: _Variable) -> None:
        assert variable.point.method is not None
        object_text, method_text = variable.point.method
        object_id = ua.NodeId.from_string(object_text)
        parent = objects.get(object_id.to_string())
        if parent is None:
            if object_id == device_node.nodeid:
                parent = device_node
            else:
                parent = await device_node.add_object(
                    object_id, ua.QualifiedName(f"{variable.point.key}_control", object_id.NamespaceIndex)
                )
            objects[object_id.to_string()] = parent
        method_id = ua.NodeId.from_string(method_text)
        await parent.add_method(
            method_id,
            ua.QualifiedName(f"write_{variable.point.key}", method_id.NamespaceIndex),
            self._method_handler(variable),
            [variable.point.variant_type],
            [],
        )

    def _method_handler(self, variable: _Variable) -> _MethodHandler:
        """Return the callback of one point's method: its only argument is the raw value."""

        async def call(parent: ua.NodeId, *args: ua.Variant) -> list[ua.Variant] | ua.StatusCode:
            del parent
            if len(args) != 1 or not isinstance(args[0].Value, int | float | bool):
                return _status(StatusCodes.BadInvalidArgument)
            await self._apply_write(variable, args[0].Value)
            return []

        return call

    async def _on_client_write(self, event: ServerItemCallback, _dispatcher: CallbackService) -> None:
        """After a client's Write: feed each accepted value of ours to the physics."""
        params: ua.WriteParameters = event.request_params
        results: Sequence[ua.StatusCode] = event.response_params or ()
        for item, status in zip(params.NodesToWrite, results, strict=False):
            if not status.is_good() or item.AttributeId != AttributeIds.Value:
                continue
            variable = self._variables.get(item.NodeId.to_string())
            if variable is None or item.Value is None or item.Value.Value is None:
                continue
            await self._apply_write(variable, item.Value.Value.Value)

    async def _apply_write(self, variable: _Variable, raw: Any) -> None:
        value = variable.point.decode(raw)
        _LOGGER.info("%s: %s written: %g", variable.device_id, variable.point.key, value)
        variable.physics.write(variable.point.key, value)
        variable.last_raw = variable.point.encode(variable.physics.value(variable.point.key))
        if self._server is not None:  # show what the device holds now (a clamped setpoint reads clamped)
            await self._server.write_attribute_value(
                variable.node_id, self._data_value(variable, variable.last_raw)
            )

    async def _on_items_created(self, event: ServerItemCallback, _dispatcher: CallbackService) -> None:
        """Give the new monitored items of a subscription deadbands that follow the standard."""
        server = self._server
        if server is None:
            return
        subscription_id = event.request_params.SubscriptionId
        subscription = server.iserver.subscription_service.subscriptions.get(subscription_id)
        if subscription is None:
            return
        service = subscription.monitored_item_srv
        for data in service._monitored_items.values():  # no public way to reach the items
            node_id = data.read_value_id.NodeId if data.read_value_id is not None else None
            variable = self._variables.get(node_id.to_string()) if node_id is not None else None
            if variable is not None:
                low, high = variable.point.eu_range
                self._deadband_spans[data.mvalue] = high - low
            initial = data.mvalue.get_current_datavalue()  # reported when the item was created
            if initial is not None and data.mvalue not in self._reported:
                self._reported[data.mvalue] = initial
        service._is_deadband_exceeded = self._deadband_exceeded  # type: ignore[method-assign]

    def _deadband_exceeded(self, values: MonitoredItemValues, flt: ua.DataChangeFilter) -> bool:
        """Decide whether a sample is reported: against the last reported value (Part 4, 7.17.2)."""
        current = values.get_current_datavalue()
        reported = self._reported.get(values)
        if reported is None:
            reported = values.get_old_datavalue()
            if reported is not None:
                self._reported[values] = reported
        passed = _exceeds(current, reported, flt, self._deadband_spans.get(values))
        if passed and current is not None:
            self._reported[values] = current
        return passed


def _exceeds(
    current: ua.DataValue | None, reported: ua.DataValue | None, flt: ua.DataChangeFilter, span: float | None
) -> bool:
    if flt.DeadbandType == ua.DeadbandType.None_ or current is None or reported is None:
        return True
    if current.StatusCode != reported.StatusCode:
        return True
    now = current.Value.Value if current.Value is not None else None
    before = reported.Value.Value if reported.Value is not None else None
    if not isinstance(now, int | float) or not isinstance(before, int | float):
        return True
    if flt.DeadbandType == ua.DeadbandType.Absolute:
        return abs(float(now) - float(before)) > float(flt.DeadbandValue)
    if flt.DeadbandType == ua.DeadbandType.Percent and span is not None:
        return abs(float(now) - float(before)) > float(flt.DeadbandValue) / 100.0 * span
    return True


class _TrustList:
    """Server-side validator: accept only client certificates from the trust list."""

    def __init__(self, trusted_der: set[bytes]) -> None:
        self._trusted = trusted_der

    async def __call__(
        self, certificate: x509.Certificate, app_description: ua.ApplicationDescription
    ) -> None:
        del app_description
        if _der(certificate) not in self._trusted:
            raise ServiceError(StatusCodes.BadCertificateUntrusted)


def _extension(path: Path) -> str:
    return path.suffix.lstrip(".").lower() or "pem"


def _application_uri(certificate: x509.Certificate) -> str | None:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(Encoding.DER)
