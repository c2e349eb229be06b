"""OPC UA client driver (asyncua): Read for polling, one subscription for pushes, Write and Call.

The driver implements :class:`scada.model.SubscriptionDriver`. Like every driver it translates and
supervises nothing: asyncua's auto-reconnect stays off (``auto_reconnect=False``), the client's
stale-subscription watchdog never sees our subscription, and every failure is raised as a kernel
error so the device's session decides when to connect again (STYLE.md: drivers translate,
sessions supervise).

Subscriptions
-------------
With ``subscribe: true`` :meth:`connect` creates one subscription (publishing interval and
keep-alive count from the device config) with one monitored item per point: sampling interval of
the point (else the publishing interval), queue size 1, and a ``DataChangeFilter`` with the
point's absolute or percent deadband. The subscription is created on the raw service layer with
the driver's own publish callback, so each Publish response becomes exactly one batch:

- data changes become readings (one per monitored-item notification);
- a keep-alive (a Publish response with no notifications) becomes an empty batch, which tells the
  session the server is alive although nothing changed;
- a status-change notification with a bad code (``BadTimeout``: the server dropped the
  subscription, ``BadShutdown``: the server is going down or the client lost the connection) and
  asyncua's connection-lost signal make the next :meth:`receive` raise :class:`DeviceUnavailable`.

Batches wait in a bounded queue (``max_queued_batches``, drop oldest, counted in
:attr:`OpcUaDriver.dropped_batches`); :meth:`receive` returns everything queued as one batch. If no
Publish response at all (data or keep-alive) arrives within 1.5 keep-alive periods plus
``timeout_s``, the subscription is dead and :meth:`receive` raises :class:`DeviceUnavailable`.

Quality mapping
---------------
::

    StatusCode Good                      -> good, value = raw x scale + offset
    StatusCode Uncertain*                -> uncertain (reason: the status name), value kept
    StatusCode Bad* (BadNodeIdUnknown..) -> bad (reason: the status name), value None
    value not a number or bool, NaN, inf -> bad ("not a number: ...")

The reading's timestamp is the source timestamp, else the server timestamp, else ``clock.now()``.

Errors
------
Every service call is bounded by ``timeout_s`` (asyncua's own request timeout is set a little
longer, so ``asyncio.timeout`` decides) and mapped in one place, :meth:`OpcUaDriver._exchange`::

    no answer in time, socket errors, connection lost, session/channel gone -> DeviceUnavailable
    server certificate not pinned / not in the trust list                  -> SecurityRefused
    user identity refused (BadUserAccessDenied...), unprotected password   -> SecurityRefused
    any other bad service result, malformed answers                        -> DeviceProtocolError
    bad status of a Write or Call, or of a read-back                       -> DeviceProtocolError
    unknown or read-only point, value the data type cannot hold            -> PointRejected

:class:`~protocols.opcua.security.SecurityRefused` is a :class:`DeviceUnavailable`. Trust
decisions and the password rule are explained in :mod:`protocols.opcua.security`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.ua_utils import data_type_to_variant_type
from asyncua.crypto import security_policies, uacrypto
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError, UaStringParsingError
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from protocols.common import PointRejected, index_points, lookup_point
from protocols.opcua.config import (
    DeadbandType,
    OpcUaDeviceConfig,
    OpcUaPointConfig,
    SecurityMode,
    SecurityPolicy,
)
from protocols.opcua.security import (
    SecurityRefused,
    TrustList,
    describe_certificate,
    password_is_protected,
    sha256_fingerprint,
    split_der_chain,
)
from scada.model import (
    Acquisition,
    Clock,
    DeviceError,
    DeviceId,
    DeviceProtocolError,
    DeviceUnavailable,
    PointId,
    Quality,
    QualityCode,
    Reading,
)

__all__ = ["BrowsedNode", "OpcUaDriver", "OpcUaPointSpec", "PointRejected", "SecurityRefused", "quality_of"]

_LOGGER = logging.getLogger(__name__)

_LIBRARY_TIMEOUT_MARGIN_S: Final = 1.0
"""asyncua's request timeout is this much longer than ours, so ``asyncio.timeout`` always decides."""
_SESSION_TIMEOUT_MS: Final = 60_000
"""The server drops our session a minute after we vanish without closing it."""
_MONITORED_ITEMS_PER_CALL: Final = 500
"""Servers limit items per CreateMonitoredItems call (MaxMonitoredItemsPerCall); stay well below."""
_KEEPALIVE_MARGIN: Final = 1.5
_NO_TIMESTAMP: Final = datetime(1601, 1, 2, tzinfo=UTC)
"""OPC UA encodes "no timestamp" as the 1601 epoch; anything before this is treated as missing."""
_CONNECTION_CODES: Final = frozenset(
    {
        StatusCodes.BadTimeout,
        StatusCodes.BadShutdown,
        StatusCodes.BadServerHalted,
        StatusCodes.BadServerNotConnected,
        StatusCodes.BadCommunicationError,
        StatusCodes.BadConnectionClosed,
        StatusCodes.BadConnectionRejected,
        StatusCodes.BadDisconnect,
        StatusCodes.BadSecureChannelClosed,
        StatusCodes.BadSecureChannelIdInvalid,
        StatusCodes.BadSessionClosed,
        StatusCodes.BadSessionIdInvalid,
        StatusCodes.BadSessionNotActivated,
        StatusCodes.BadTooManySessions,
        StatusCodes.BadNoSubscription,
        StatusCodes.BadSubscriptionIdInvalid,
        StatusCodes.BadTcpServerTooBusy,
        StatusCodes.BadServerTooBusy,
    }
)
"""Status codes that mean the connection, session or subscription is gone, not a refused request."""
_IDENTITY_CODES: Final[Mapping[int, str]] = {
    StatusCodes.BadUserAccessDenied: "the server refused the user: wrong username or password, or user "
    "certificate not accepted",
    StatusCodes.BadIdentityTokenInvalid: "the server could not use the user identity token",
    StatusCodes.BadIdentityTokenRejected: "the server does not accept this kind of user identity",
    StatusCodes.BadUserSignatureInvalid: "the user certificate's signature was refused",
    StatusCodes.BadCertificateUntrusted: "the server does not trust our certificate",
    StatusCodes.BadCertificateInvalid: "the server found our certificate invalid",
    StatusCodes.BadCertificateUriInvalid: "the server found our certificate's application URI invalid",
    StatusCodes.BadCertificateTimeInvalid: "the server found our certificate expired or not yet valid",
    StatusCodes.BadCertificateRevoked: "the server says our certificate is revoked",
    StatusCodes.BadSecurityChecksFailed: "the server's security checks failed",
}
"""Refusals of who we are: a security problem to fix, not a network one, so the message says which."""
_INT_RANGES: Final[Mapping[ua.VariantType, tuple[int, int]]] = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}
_FLOAT_TYPES: Final = frozenset({ua.VariantType.Float, ua.VariantType.Double})
_DEADBAND_TYPES: Final[Mapping[DeadbandType, int]] = {
    DeadbandType.ABSOLUTE: ua.DeadbandType.Absolute,
    DeadbandType.PERCENT: ua.DeadbandType.Percent,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class OpcUaPointSpec:
    """One point as the driver sees it: its node, how to scale it, whether it may be written."""

    point: PointId
    config: OpcUaPointConfig
    scale: float = 1.0
    """Engineering value = raw value x scale + offset."""
    offset: float = 0.0
    writable: bool = False

    def __post_init__(self) -> None:
        if self.scale == 0:
            raise ValueError(f"{self.point}: scale must not be 0")
        if self.config.method is not None and not self.writable:
            raise ValueError(f"{self.point}: a point written by a method must be writable")


@dataclass(frozen=True, slots=True, kw_only=True)
class BrowsedNode:
    """One child found by :meth:`OpcUaDriver.browse`."""

    node_id: str
    browse_name: str
    """``<namespace index>:<name>``."""
    node_class: str
    """``Object``, ``Variable``, ``Method``..."""
    data_type: str | None = None
    """NodeId of the DataType for variables, else None."""


def quality_of(status: ua.StatusCode) -> Quality:
    """Map an OPC UA status code to a quality, the status name being the reason.

    >>> str(quality_of(_status(StatusCodes.UncertainLastUsableValue)))
    'uncertain: UncertainLastUsableValue'
    >>> str(quality_of(_status(StatusCodes.Good)))
    'good'
    """
    if status.is_good():
        return Quality.good()
    if status.is_uncertain():
        return Quality.uncertain(status.name)
    return Quality.bad(status.name)


@dataclass(slots=True)
class _Item:
    spec: OpcUaPointSpec
    node_id: ua.NodeId
    variant_type: ua.VariantType | None = None


class OpcUaDriver:
    """Talk to one OPC UA server: Read, one subscription, Write, Call, Browse; no retries."""

    def __init__(
        self,
        device: str,
        config: OpcUaDeviceConfig,
        points: Sequence[OpcUaPointSpec],
        *,
        clock: Clock,
        max_queued_batches: int = 1_000,
    ) -> None:
        if max_queued_batches < 1:
            raise ValueError("max_queued_batches must be at least 1")
        self._device = DeviceId(device)
        self._config = config
        self._clock = clock
        self._items = {
            point: _Item(spec, ua.NodeId.from_string(spec.config.node_id))
            for point, spec in index_points(device, points).items()
        }
        self._handles: tuple[_Item, ...] = tuple(self._items.values())
        """Client handle of a monitored item = its index here."""
        self._client: Client | None = None
        self._batches: deque[list[Reading]] = deque(maxlen=max_queued_batches)
        self._wakeup = asyncio.Event()
        self._lost: str | None = None
        self._keepalive_s = config.publishing_interval_ms / 1000 * config.keepalive_count
        self.dropped_batches = 0
        """Batches dropped because :meth:`receive` fell behind (oldest first)."""
        self._warned_unverified = False
        _quiet_asyncua()

    @property
    def device(self) -> DeviceId:
        """Return the id of the device this driver talks to."""
        return self._device

    @property
    def acquisition(self) -> Acquisition:
        """Return SUBSCRIBE when the config asks for a subscription, else POLL."""
        return Acquisition.SUBSCRIBE if self._config.subscribe else Acquisition.POLL

    @property
    def points(self) -> tuple[PointId, ...]:
        """Return the ids of every configured point, in configuration order."""
        return tuple(self._items)

    @property
    def connected(self) -> bool:
        """Return True while a session is open and not known to be lost."""
        return self._client is not None and self._lost is None

    def __repr__(self) -> str:
        return f"OpcUaDriver({self._device!r}, {self._config.endpoint})"

    # ----------------------------------------------------------------------------------------------
    # Driver protocol

    async def connect(self) -> None:
        """Open a session (and the subscription when configured); raise DeviceUnavailable if not."""
        if self.connected:
            return
        await self.close()
        cfg = self._config
        client = _GuardedClient(
            cfg.endpoint,
            device=self._device,
            allow_plaintext_password=cfg.allow_plaintext_password,
            timeout=cfg.timeout_s + _LIBRARY_TIMEOUT_MARGIN_S,
            # asyncua probes ServerState at this interval; keep-alives already prove liveness.
            watchdog_intervall=max(cfg.timeout_s, self._keepalive_s),
            auto_reconnect=False,  # the session owns reconnects; two retry loops are a bug
        )
        client.name = client.description = "CarbonOS SCADA"
        client.application_uri = "urn:carbonos:scada"
        client.session_timeout = _SESSION_TIMEOUT_MS
        client.connection_lost_callback = self._on_connection_lost
        if cfg.username is not None and cfg.password is not None:
            client.set_user(cfg.username)
            client.set_password(cfg.password)
        self._client = client
        self._lost = None
        self._batches.clear()
        try:
            if cfg.user_certificate is not None:
                await self._load_user_identity(client)
            if cfg.security_policy is not SecurityPolicy.NONE:
                await self._secure(client)
            async with self._exchange(f"connect to {cfg.endpoint}"):
                await client.connect()
            await self._learn_data_types()
            if cfg.subscribe:
                await self._subscribe()
        except BaseException:
            await self.close()
            raise
        _LOGGER.debug("%s: connected to %s", self._device, cfg.endpoint)

    async def read(self) -> list[Reading]:
        """Read every point with one Read service call; per-point problems become bad readings."""
        values = await self._read_values([item.node_id for item in self._handles], "read")
        now = self._clock.now()
        return [
            self._reading(item.spec, value, now) for item, value in zip(self._handles, values, strict=True)
        ]

    async def receive(self) -> list[Reading]:
        """Return everything the subscription pushed since the last call; wait if nothing yet.

        An empty list is a keep-alive. Raises :class:`DeviceUnavailable` when the connection or
        the subscription is lost, or when no Publish response arrives for 1.5 keep-alive periods.
        """
        if not self._config.subscribe:
            raise DeviceProtocolError(f"{self._device}: receive() on a polled device (subscribe: false)")
        wait_s = self._keepalive_s * _KEEPALIVE_MARGIN + self._config.timeout_s
        while True:
            if self._lost is not None:
                raise DeviceUnavailable(f"{self._device}: {self._lost}")
            if self._client is None:
                raise DeviceUnavailable(f"{self._device}: not connected")
            if self._batches:
                merged: list[Reading] = []
                while self._batches:
                    merged.extend(self._batches.popleft())
                return merged
            self._wakeup.clear()
            try:
                async with asyncio.timeout(wait_s):
                    await self._wakeup.wait()
            except TimeoutError:
                self._lost = f"no data and no keep-alive from the subscription for {wait_s:g} s"

    async def write(
        self, point: PointId, value: float, *, correlation_id: str = "", hold_until: datetime | None = None
    ) -> None:
        """Write one value with the node's data type, or call the point's method with it.

        OPC UA carries no correlation id, so ``correlation_id`` is ignored.
        """
        del correlation_id
        item = self._item(point)
        if not item.spec.writable:
            raise PointRejected(f"{point}: the point is not writable")
        variant = self._variant(item, value)
        method = item.spec.config.method
        if method is not None:
            await self.call(method.object_id, method.method_id, variant)
            return
        client = self._session()
        request = ua.WriteParameters(
            NodesToWrite=[
                ua.WriteValue(
                    NodeId=item.node_id, AttributeId=AttributeIds.Value, Value=ua.DataValue(variant)
                )
            ]
        )
        async with self._exchange(f"write of {point}"):
            results = await client.uaclient.write(request)
        status = results[0] if results else _status(StatusCodes.BadUnexpectedError)
        if not status.is_good():
            raise DeviceProtocolError(f"{self._device}: write of {point} refused: {status.name}")

    async def read_back(self, point: PointId) -> float:
        """Read one point now and return its engineering value, to verify a write."""
        item = self._item(point)
        [value] = await self._read_values([item.node_id], f"read-back of {point}")
        reading = self._reading(item.spec, value, self._clock.now())
        if reading.value is None:
            raise DeviceProtocolError(f"{self._device}: read-back of {point}: {reading.quality.reason}")
        return reading.value

    async def close(self) -> None:
        """Close the session (deleting the subscription); safe to call at any time, any number of times."""
        client, self._client = self._client, None
        if client is None:
            return
        lost = self._lost is not None
        self._lost = self._lost or "connection closed"
        self._wakeup.set()
        try:
            async with asyncio.timeout(self._config.timeout_s):
                if lost:  # nothing to say to a server we lost: stop asyncua's tasks, drop the socket
                    client.uaclient.request_disconnect()
                    with contextlib.suppress(ConnectionError, OSError, UaError):
                        await client.close_session()
                else:
                    await client.disconnect()
        except TimeoutError:
            _LOGGER.debug("%s: close timed out; dropping the socket", self._device)
        finally:
            client.disconnect_socket()

    # ----------------------------------------------------------------------------------------------
    # Extra services

    async def browse(self, node_id: str) -> list[BrowsedNode]:
        """Return the children of a node (hierarchical references), with the DataType of variables."""
        client = self._session()
        parent = self._parse_node_id(node_id)
        description = ua.BrowseDescription(
            NodeId=parent,
            BrowseDirection=ua.BrowseDirection.Forward,
            ReferenceTypeId=ua.NodeId(ua.Int32(ObjectIds.HierarchicalReferences)),
            IncludeSubtypes=True,
            NodeClassMask=0,
            ResultMask=ua.BrowseResultMask.All,
        )
        references: list[ua.ReferenceDescription] = []
        async with self._exchange(f"browse of {node_id}"):
            [result] = await client.uaclient.browse(ua.BrowseParameters(NodesToBrowse=[description]))
            while True:
                if not result.StatusCode.is_good():
                    raise DeviceProtocolError(
                        f"{self._device}: browse of {node_id}: {result.StatusCode.name}"
                    )
                references.extend(result.References or [])
                if not result.ContinuationPoint:
                    break
                [result] = await client.uaclient.browse_next(
                    ua.BrowseNextParameters(ContinuationPoints=[result.ContinuationPoint])
                )
        variables = [r.NodeId for r in references if r.NodeClass == ua.NodeClass.Variable]
        types = dict(zip(map(_node_text, variables), await self._read_attribute(variables), strict=True))
        return [
            BrowsedNode(
                node_id=_node_text(r.NodeId),
                browse_name=r.BrowseName.to_string(),
                node_class=ua.NodeClass(r.NodeClass).name,
                data_type=_data_type_text(types.get(_node_text(r.NodeId))),
            )
            for r in references
        ]

    async def call(self, object_id: str, method_id: str, *args: ua.Variant | float | bool | str) -> list[Any]:
        """Call a method; return its output arguments. A bad status raises DeviceProtocolError."""
        client = self._session()
        request = ua.CallMethodRequest(
            ObjectId=self._parse_node_id(object_id),
            MethodId=self._parse_node_id(method_id),
            InputArguments=[arg if isinstance(arg, ua.Variant) else ua.Variant(arg) for arg in args],
        )
        async with self._exchange(f"call of {method_id}"):
            [result] = await client.uaclient.call([request])
        if not result.StatusCode.is_good():
            raise DeviceProtocolError(
                f"{self._device}: call of {method_id} refused: {result.StatusCode.name}"
            )
        bad_inputs = [s.name for s in result.InputArgumentResults or [] if not s.is_good()]
        if bad_inputs:
            raise DeviceProtocolError(f"{self._device}: call of {method_id}: arguments refused: {bad_inputs}")
        return [out.Value for out in result.OutputArguments or []]

    # ----------------------------------------------------------------------------------------------
    # Connection internals

    async def _secure(self, client: Client) -> None:
        """Set Basic256Sha256 with our certificate; refuse a server that is not the pinned one."""
        cfg = self._config
        assert cfg.certificate is not None  # checked by the config
        assert cfg.private_key is not None
        mode = (
            ua.MessageSecurityMode.SignAndEncrypt
            if cfg.security_mode is SecurityMode.SIGN_AND_ENCRYPT
            else ua.MessageSecurityMode.Sign
        )
        policy = security_policies.SecurityPolicyBasic256Sha256
        try:
            certificate_bytes = await asyncio.to_thread(cfg.certificate.read_bytes)
            key_bytes = await asyncio.to_thread(cfg.private_key.read_bytes)
            pinned = (
                await asyncio.to_thread(cfg.server_certificate.read_bytes)
                if cfg.server_certificate is not None
                else None
            )
        except OSError as err:
            raise DeviceUnavailable(f"{self._device}: cannot read a certificate or key: {err}") from err
        trust_list = await self._load_trust_list()
        async with self._exchange(f"endpoint discovery at {cfg.endpoint}"):
            endpoints = await client.connect_and_get_server_endpoints()
        try:
            endpoint = Client.find_endpoint(endpoints, mode, policy.URI)
        except UaError as err:
            raise DeviceProtocolError(
                f"{self._device}: the server offers no {cfg.security_policy.value} {cfg.security_mode.value} "
                "endpoint"
            ) from err
        chain = self._server_chain(endpoint.ServerCertificate)
        presented = chain[0].public_bytes(Encoding.DER)
        if pinned is not None:
            expected = _der(await uacrypto.load_certificate(pinned, _extension(cfg.server_certificate)))
            if presented != expected:
                raise SecurityRefused(
                    f"{self._device}: server certificate not trusted: {describe_certificate(chain[0])}: "
                    f"not the pinned certificate (sha256 {sha256_fingerprint(expected)})"
                )
        if trust_list is not None:
            try:
                trust_list.check(chain[0], intermediates=chain[1:])
            except SecurityRefused as err:
                raise SecurityRefused(f"{self._device}: {err}") from None
        if pinned is None and trust_list is None and not self._warned_unverified:
            self._warned_unverified = True
            _LOGGER.warning(
                "%s: no trust_list or server_certificate: accepting the server certificate %s unchecked",
                self._device,
                describe_certificate(chain[0]),
            )
        own = await uacrypto.load_certificate(certificate_bytes, _extension(cfg.certificate))
        client.application_uri = _application_uri(own) or client.application_uri
        try:
            await client.set_security(
                policy,
                uacrypto.CertProperties(certificate_bytes, extension=_extension(cfg.certificate)),
                uacrypto.CertProperties(key_bytes, extension=_extension(cfg.private_key)),
                server_certificate=uacrypto.CertProperties(presented, extension="der"),
                mode=mode,
            )
        except (ValueError, UaError) as err:
            raise DeviceProtocolError(f"{self._device}: cannot use the certificate or key: {err}") from err

    async def _load_trust_list(self) -> TrustList | None:
        """Read the trust list again (an operator may have added a certificate since the last connect)."""
        paths = self._config.trust_list
        if not paths:
            return None
        try:
            return await asyncio.to_thread(TrustList.load, paths)
        except (OSError, ValueError) as err:
            raise SecurityRefused(f"{self._device}: cannot read the trust list: {_describe(err)}") from err

    def _server_chain(self, data: bytes | None) -> list[x509.Certificate]:
        """Return the server's certificate and the intermediates it sent after it."""
        if not data:
            raise SecurityRefused(f"{self._device}: the server presented no certificate")
        try:
            return [x509.load_der_x509_certificate(der) for der in split_der_chain(data)]
        except ValueError as err:
            raise DeviceProtocolError(f"{self._device}: malformed server certificate: {err}") from err

    async def _load_user_identity(self, client: Client) -> None:
        """Load the X.509 user certificate and key that ActivateSession presents and signs with."""
        cfg = self._config
        assert cfg.user_certificate is not None  # checked by the config
        assert cfg.user_private_key is not None
        try:
            certificate_bytes = await asyncio.to_thread(cfg.user_certificate.read_bytes)
            key_bytes = await asyncio.to_thread(cfg.user_private_key.read_bytes)
        except OSError as err:
            raise DeviceUnavailable(
                f"{self._device}: cannot read the user certificate or key: {err}"
            ) from err
        try:
            client.user_certificate = await uacrypto.load_certificate(
                certificate_bytes, _extension(cfg.user_certificate)
            )
            client.user_private_key = await uacrypto.load_private_key(
                key_bytes, None, _extension(cfg.user_private_key)
            )
        except (ValueError, TypeError, UaError) as err:
            raise DeviceProtocolError(
                f"{self._device}: cannot use the user certificate or key: {_describe(err)}"
            ) from err

    async def _learn_data_types(self) -> None:
        """Read every point's DataType once, so writes send the Variant type the server expects."""
        nodes = [item.node_id for item in self._handles]
        for item, data_type in zip(self._handles, await self._read_attribute(nodes), strict=True):
            item.variant_type = await self._variant_type(data_type) if data_type is not None else None

    async def _variant_type(self, data_type: ua.NodeId) -> ua.VariantType | None:
        if data_type.NamespaceIndex == 0 and isinstance(data_type.Identifier, int):
            with contextlib.suppress(ValueError):
                vtype = ua.VariantType(data_type.Identifier)
                if vtype in _INT_RANGES or vtype in _FLOAT_TYPES or vtype is ua.VariantType.Boolean:
                    return vtype
        client = self._session()
        async with self._exchange(f"lookup of data type {data_type.to_string()}"):  # derived types
            vtype = await data_type_to_variant_type(client.get_node(data_type))
        return (
            vtype
            if vtype in _INT_RANGES or vtype in _FLOAT_TYPES or vtype is ua.VariantType.Boolean
            else None
        )

    async def _subscribe(self) -> None:
        cfg = self._config
        client = self._session()
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=cfg.publishing_interval_ms,
            RequestedLifetimeCount=cfg.keepalive_count * 10,
            RequestedMaxKeepAliveCount=cfg.keepalive_count,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        async with self._exchange("create subscription"):
            result = await client.uaclient.session.create_subscription(params, callback=self._on_publish)
        self._keepalive_s = result.RevisedPublishingInterval / 1000 * result.RevisedMaxKeepAliveCount
        requests = [self._monitored_item(handle, item) for handle, item in enumerate(self._handles)]
        refused: list[Reading] = []
        now = self._clock.now()
        for start in range(0, len(requests), _MONITORED_ITEMS_PER_CALL):
            chunk = requests[start : start + _MONITORED_ITEMS_PER_CALL]
            async with self._exchange("create monitored items"):
                results = await client.uaclient.create_monitored_items(
                    ua.CreateMonitoredItemsParameters(
                        SubscriptionId=result.SubscriptionId,
                        TimestampsToReturn=ua.TimestampsToReturn.Both,
                        ItemsToCreate=chunk,
                    )
                )
            for request, item_result in zip(chunk, results, strict=True):
                if not item_result.StatusCode.is_good():  # the point stays bad; the others still flow
                    point = self._handles[request.RequestedParameters.ClientHandle].spec.point
                    refused.append(
                        Reading(
                            point=point, ts=now, value=None, quality=Quality.bad(item_result.StatusCode.name)
                        )
                    )
        if refused:
            self._push(refused)

    def _monitored_item(self, handle: int, item: _Item) -> ua.MonitoredItemCreateRequest:
        config = item.spec.config
        parameters = ua.MonitoringParameters(
            ClientHandle=handle,
            SamplingInterval=(
                config.sampling_interval_ms
                if config.sampling_interval_ms is not None
                else self._config.publishing_interval_ms
            ),
            QueueSize=1,
            DiscardOldest=True,
        )
        if config.deadband_type is not DeadbandType.NONE:
            parameters.Filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=_DEADBAND_TYPES[config.deadband_type],
                DeadbandValue=config.deadband,
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=item.node_id, AttributeId=AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=parameters,
        )

    def _on_publish(self, result: ua.PublishResult) -> None:
        """Turn one Publish response into one batch (empty for a keep-alive); runs in asyncua's loop."""
        readings: list[Reading] = []
        now = self._clock.now()
        for notification in result.NotificationMessage.NotificationData or []:
            if isinstance(notification, ua.DataChangeNotification):
                handles = self._handles
                readings.extend(
                    self._reading(handles[change.ClientHandle].spec, change.Value, now)
                    for change in notification.MonitoredItems
                    if 0 <= change.ClientHandle < len(handles)
                )
            elif isinstance(notification, ua.StatusChangeNotification):
                status = notification.Status
                if status is not None and status.is_bad():
                    self._set_lost(f"subscription status {status.name}")
                    return
        self._push(readings)

    async def _on_connection_lost(self, err: Exception) -> None:
        self._set_lost(f"connection lost: {err or type(err).__name__}")

    def _set_lost(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
        self._wakeup.set()

    def _push(self, readings: list[Reading]) -> None:
        if len(self._batches) == self._batches.maxlen:
            self.dropped_batches += 1
            if self.dropped_batches == 1 or self.dropped_batches % 1000 == 0:
                _LOGGER.warning(
                    "%s: receive() falls behind: %d batches dropped", self._device, self.dropped_batches
                )
        self._batches.append(readings)
        self._wakeup.set()

    # ----------------------------------------------------------------------------------------------
    # Request internals

    def _session(self) -> Client:
        if self._client is None or self._lost is not None:
            raise DeviceUnavailable(
                f"{self._device}: not connected" + (f" ({self._lost})" if self._lost else "")
            )
        return self._client

    def _item(self, point: PointId) -> _Item:
        return lookup_point(self._device, self._items, point)

    def _parse_node_id(self, node_id: str) -> ua.NodeId:
        try:
            return ua.NodeId.from_string(node_id)
        except (ValueError, UaStringParsingError) as err:
            raise PointRejected(f"{self._device}: {node_id!r} is not a NodeId: {err}") from None

    async def _read_values(self, nodes: list[ua.NodeId], what: str) -> list[ua.DataValue]:
        client = self._session()
        request = ua.ReadParameters(
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            NodesToRead=[ua.ReadValueId(NodeId=node, AttributeId=AttributeIds.Value) for node in nodes],
        )
        async with self._exchange(what):
            values = await client.uaclient.read(request)
        if len(values) != len(nodes):
            raise DeviceProtocolError(f"{self._device}: {what}: {len(values)} results for {len(nodes)} nodes")
        return values

    async def _read_attribute(self, nodes: list[ua.NodeId]) -> list[ua.NodeId | None]:
        """Return the DataType of each node (None where the server has none or refuses)."""
        if not nodes:
            return []
        client = self._session()
        async with self._exchange("read of data types"):
            values = await client.uaclient.read_attributes(nodes, AttributeIds.DataType)
        out: list[ua.NodeId | None] = []
        for value in values:
            status = value.StatusCode
            raw = value.Value.Value if value.Value is not None else None
            ok = status is None or status.is_good()
            out.append(raw if ok and isinstance(raw, ua.NodeId) else None)
        return out

    def _reading(self, spec: OpcUaPointSpec, value: ua.DataValue | None, now: datetime) -> Reading:
        if value is None:
            return Reading(
                point=spec.point, ts=now, value=None, quality=Quality.bad("no value in the answer")
            )
        ts = _timestamp(value.SourceTimestamp) or _timestamp(value.ServerTimestamp) or now
        quality = quality_of(value.StatusCode or _status(StatusCodes.Good))
        if quality.code is QualityCode.BAD:
            return Reading(point=spec.point, ts=ts, value=None, quality=quality)
        raw = value.Value.Value if value.Value is not None else None
        if isinstance(raw, bool):
            raw = float(raw)
        if not isinstance(raw, int | float) or not math.isfinite(raw):
            shown = repr(raw)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return Reading(point=spec.point, ts=ts, value=None, quality=Quality.bad(f"not a number: {shown}"))
        return Reading(point=spec.point, ts=ts, value=float(raw) * spec.scale + spec.offset, quality=quality)

    def _variant(self, item: _Item, value: float) -> ua.Variant:
        """Return the raw value in the node's type; PointRejected if the type cannot hold it."""
        point = item.spec.point
        if not math.isfinite(value):
            raise PointRejected(f"{point}: cannot write {value!r}")
        raw = (value - item.spec.offset) / item.spec.scale
        vtype = item.variant_type or ua.VariantType.Double
        if vtype is ua.VariantType.Boolean:
            if raw not in (0.0, 1.0):
                raise PointRejected(f"{point}: a Boolean takes 0 or 1, not {raw:g}")
            return ua.Variant(raw == 1.0, vtype)
        if vtype in _INT_RANGES:
            low, high = _INT_RANGES[vtype]
            rounded = round(raw)
            if not low <= rounded <= high:
                raise PointRejected(f"{point}: {raw:g} does not fit {vtype.name} ({low}..{high})")
            return ua.Variant(rounded, vtype)
        return ua.Variant(raw, vtype)

    @contextlib.asynccontextmanager
    async def _exchange(self, what: str) -> AsyncIterator[None]:
        """Bound one exchange by ``timeout_s`` and map library and socket errors to the kernel's.

        Cancellation needs two repairs. On Python 3.11 asyncua's requests await ``wait_for2``, which
        raises a *subclass* of CancelledError when the answer and a cancel meet in one loop turn;
        ``asyncio.timeout`` converts only the exact type, so the subclass is re-raised as a plain
        CancelledError. And asyncua's clean-up (``Client._cancel_task``) awaits its own tasks under
        ``except CancelledError: pass``, which can swallow a cancel meant for the caller; one that
        was requested during the exchange but never surfaced is raised again at its end.
        """
        device, timeout_s = self._device, self._config.timeout_s
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    yield
                except asyncio.CancelledError as err:
                    if type(err) is not asyncio.CancelledError:
                        # asyncua's wait_for2 raises a subclass that carries a late answer; asyncio.timeout
                        # turns only the exact type into TimeoutError, so a timeout would escape as a
                        # cancellation of the caller.
                        raise asyncio.CancelledError from None
                    raise
        except DeviceError:
            raise
        except TimeoutError as err:
            raise DeviceUnavailable(f"{device}: no answer to {what} within {timeout_s:g} s") from err
        except UaStatusCodeError as err:
            status = ua.StatusCode(err.code)
            if err.code in _IDENTITY_CODES:
                raise SecurityRefused(
                    f"{device}: {what} failed: {status.name} ({_IDENTITY_CODES[err.code]})"
                ) from err
            kind = DeviceUnavailable if err.code in _CONNECTION_CODES else DeviceProtocolError
            raise kind(f"{device}: {what} failed: {status.name}") from err
        except (ConnectionError, OSError) as err:
            raise DeviceUnavailable(f"{device}: {what} failed: {_describe(err)}") from err
        except (UaError, ValueError, KeyError, IndexError, TypeError) as err:
            # asyncua raises plain UaError for protocol violations (certificate mismatch, bad
            # messages) and lets decoding errors of malformed answers through.
            raise DeviceProtocolError(f"{device}: {what} failed: {_describe(err)}") from err
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError


class _GuardedClient(Client):
    """An asyncua client that will not send a password the channel or the token policy leaves readable."""

    def __init__(self, url: str, *, device: DeviceId, allow_plaintext_password: bool, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._device = device
        self._allow_plaintext_password = allow_plaintext_password

    async def activate_session(
        self,
        username: str | None = None,
        password: str | None = None,
        certificate: x509.Certificate | None = None,
    ) -> ua.ActivateSessionResult:
        """Check the server's UserName token policy (from CreateSession), then activate."""
        sends_password = bool(username) and not (
            certificate is not None and self.user_private_key is not None
        )
        if sends_password and password and not self._allow_plaintext_password:
            token_policy = self.server_policy(ua.UserTokenType.UserName)
            if not password_is_protected(
                self.security_policy.Mode, token_policy.SecurityPolicyUri, self.security_policy.URI
            ):
                raise SecurityRefused(
                    f"{self._device}: the password would travel in plain text (channel "
                    f"{self.security_policy.Mode.name}, user token policy "
                    f"{token_policy.SecurityPolicyUri or 'none'}); use sign_and_encrypt, or set "
                    "allow_plaintext_password: true on an isolated network"
                )
        return await super().activate_session(username, password, certificate)


class _LostConnectionPublishFilter(logging.Filter):
    """Drop asyncua's traceback for the pending Publish that a lost connection fails.

    The driver reports the loss itself (the session logs "offline" once); asyncua would add an
    ERROR with a traceback for every outage of every device.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(record.msg, str)
            and record.msg.startswith("Publish iteration crashed")
            and isinstance(error, ConnectionError | OSError)
        )


_PUBLISH_FILTER: Final = _LostConnectionPublishFilter()


def _quiet_asyncua() -> None:
    """Keep asyncua's warnings and drop its chatter (it logs every request and publish at INFO)."""
    logger = logging.getLogger("asyncua")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    session_logger = logging.getLogger("asyncua.client.ua_session.UaSession")
    if _PUBLISH_FILTER not in session_logger.filters:
        session_logger.addFilter(_PUBLISH_FILTER)


def _timestamp(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value if value > _NO_TIMESTAMP else None


def _node_text(node: ua.NodeId) -> str:
    return node.to_string()


def _data_type_text(data_type: ua.NodeId | None) -> str | None:
    return data_type.to_string() if data_type is not None else None


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _extension(path: Path | None) -> str:
    suffix = path.suffix.lstrip(".").lower() if path is not None else ""
    return suffix if suffix in ("der", "pem") else "pem"


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
