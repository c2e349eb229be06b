"""One broker connection shared by every MQTT device driver of the process.

10,000 MQTT devices must not mean 10,000 broker connections: the server holds one gmqtt client per
broker and each :class:`~protocols.mqtt.driver.MqttDriver` registers the topics it owns with it.
Incoming messages are routed by a dict lookup on the exact topic; only filters with ``+`` or ``#``
(rare: a device whose telemetry topic has wildcards) are matched one by one after that lookup
misses. A message on a topic nobody owns goes to the dead-letter sink ("unknown topic").

Security
--------
``mqtts://`` URLs connect over TLS, verifying the broker against ``security.ca_file`` (else the
system CAs) and presenting a client certificate when configured; credentials come from the URL or
from ``security`` (see :mod:`protocols.mqtt.security`). Refusals are told apart in
``last_error`` and in the ``DeviceUnavailable`` of ``wait_connected()``: an untrusted broker
certificate, a TLS handshake the broker broke off, bad credentials, or a plain ``mqtt://`` client
talking to a TLS port. Passwords never appear in logs or errors.

Who reconnects
--------------
STYLE.md wants reconnects in one place, the device session, and library auto-reconnect off. A
shared connection is the exception: it is not one device's, so no device session may own it, and
10,000 sessions must not all try to re-open it. This connection therefore owns the broker link:

- gmqtt's own reconnect is switched off (it retries forever at a fixed 6 s with no jitter and
  would run next to ours). A fresh gmqtt client is made for every attempt, since gmqtt keeps
  "connected" set on a client whose socket has died;
- a supervisor task connects, and after a loss or a failed attempt waits a capped, jittered
  :class:`scada.runtime.Backoff` delay before the next attempt;
- on every (re)connect it subscribes every registered filter again (clean session), batched into
  a few SUBSCRIBE packets;
- on a loss it tells every registered driver, whose ``receive()`` then raises
  :class:`DeviceUnavailable`; device sessions go offline and back off, and their ``connect()``
  raises :class:`DeviceUnavailable` until the broker is back.

gmqtt quirks handled here
-------------------------
- gmqtt keeps the MQTT version in a class attribute set by every ``connect()``; two clients with
  different versions in one process would overwrite each other. The version is pinned on each
  connection's protocol object instead.
- gmqtt passes ``ssl`` straight to ``loop.create_connection``, so the TLS context built by
  :func:`protocols.mqtt.security.make_ssl_context` (CA, client certificate) is used as is.
- gmqtt answers CONNACK code 1 (the broker does not speak the version, e.g. the embedded amqtt
  broker, which is 3.1.1 only, asked for MQTT 5) by quietly downgrading and reconnecting; here it
  is a failed attempt, "code 1 (Connection Refused: unacceptable protocol version)".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from protocols.mqtt.config import MqttVersion
from protocols.mqtt.security import MqttSecurityConfig, broker_connect_args, make_ssl_context
from scada.model import DeadLetterSink, DeviceProtocolError, DeviceUnavailable
from scada.runtime import Backoff

__all__ = ["MessageHandler", "MqttConnection", "MqttConnectionStats", "MqttMessage", "topic_matches"]

_LOGGER = logging.getLogger(__name__)

_SUBSCRIPTIONS_PER_PACKET: Final = 500
"""Filters per SUBSCRIBE packet: 10,000 devices resubscribe in 20 packets, none of them huge."""
_START_MARGIN_S: Final = 0.5
"""start() waits this much longer than one attempt may take, so it sees the attempt's outcome."""
_RECEIVE_MAXIMUM: Final = 65535
"""QoS 1/2 messages the broker may have in flight to us (MQTT 5). Without it Mosquitto allows 20
(``max_inflight_messages``), which caps one shared connection at 20 messages per round trip
through our event loop, a few thousand per second, and drops the rest from its queue."""
_GMQTT_VERSION: Final = {MqttVersion.V311: MQTTv311, MqttVersion.V5: MQTTv50}


@dataclass(frozen=True, slots=True)
class MqttMessage:
    """One message delivered to a driver."""

    topic: str
    payload: bytes
    retained: bool
    """Sent by the broker from its store on subscribe: possibly old."""
    correlation_data: bytes | None = None
    """MQTT 5 correlation data (None on 3.1.1)."""


class MessageHandler(Protocol):
    """What a driver gives the connection: a sink for its topics' messages and for link losses."""

    def handle_message(self, message: MqttMessage) -> None:
        """Take one message; runs in gmqtt's receive callback, so it must not block."""

    def connection_lost(self, reason: str) -> None:
        """Learn that the broker link is gone: pending and later waits must raise DeviceUnavailable."""


@dataclass(slots=True)
class MqttConnectionStats:
    """Counters of the shared connection, for /metrics and the benches."""

    connects: int = 0
    connect_failures: int = 0
    losses: int = 0
    messages_in: int = 0
    unknown_topic: int = 0
    handler_errors: int = 0
    published: int = 0


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Return True if ``topic`` matches ``topic_filter`` with MQTT ``+`` and ``#`` wildcards.

    >>> topic_matches("site/+/telemetry", "site/m1/telemetry")
    True
    >>> topic_matches("site/#", "site")
    True
    >>> topic_matches("site/+", "site/a/b")
    False
    """
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part not in ("+", t_parts[i])):
            return False
    return len(f_parts) == len(t_parts)


class _Client(gmqtt.Client):  # type: ignore[misc]  # gmqtt ships no type hints
    """A gmqtt client without its own reconnect and with its MQTT version pinned per connection."""

    def __init__(self, client_id: str, *, version: int, **kwargs: Any) -> None:
        super().__init__(client_id, **kwargs)
        self.pinned_version = version

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
        connection = await super()._create_connection(*args, **kwargs)
        connection._protocol.proto_ver = self.pinned_version  # see the module docstring
        return connection

    async def reconnect(self, delay: bool = False) -> None:  # gmqtt's signature
        """Do nothing: :class:`MqttConnection` owns reconnects (see the module docstring)."""
        del delay


class MqttConnection:
    """One gmqtt client shared by many device drivers: routing, publishing, reconnecting."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        version: MqttVersion,
        timeout_s: float,
        dead_letters: DeadLetterSink,
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = 30,
        backoff: Backoff | None = None,
        security: MqttSecurityConfig | None = None,
    ) -> None:
        args = broker_connect_args(url, security)
        if username is not None:  # explicit arguments win over the URL's userinfo
            args = dataclasses.replace(args, username=username, password=password)
        self._broker = args
        self._host = args.host
        self._port = args.port
        self._username = args.username
        self._password = args.password
        if args.plaintext_password:
            _LOGGER.warning("MQTT %s: the password is sent without TLS; use mqtts://", args.display)
        self._client_id = client_id
        self._version = MqttVersion(version)
        self._timeout_s = timeout_s
        self._keepalive_s = keepalive_s
        self._dead_letters = dead_letters
        self._backoff = backoff or Backoff(initial_s=0.5, max_s=30.0)
        self._exact: dict[str, tuple[MessageHandler, int]] = {}
        self._wildcard: dict[str, tuple[MessageHandler, int]] = {}
        self._client: _Client | None = None
        self._connected = False
        self._lost: asyncio.Future[str] | None = None
        self._first_attempt: asyncio.Event = asyncio.Event()
        self._state_changed: asyncio.Event = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._pending: list[tuple[bool, str, int, asyncio.Future[bool] | None]] = []
        """Queued (subscribe?, filter, qos, SUBACK waiter) operations, flushed in order once a tick."""
        self._flush_scheduled = False
        self._suback_waiters: dict[int, list[asyncio.Future[bool] | None]] = {}
        self.last_error = ""
        self.stats = MqttConnectionStats()

    def __repr__(self) -> str:
        return f"MqttConnection({self._broker.display}, MQTT {self._version.value}, {self._client_id!r})"

    @property
    def version(self) -> MqttVersion:
        """Return the MQTT version spoken to the broker."""
        return self._version

    @property
    def connected(self) -> bool:
        """Return True while the broker link is up (CONNACK received, socket open)."""
        return self._connected

    @property
    def routes(self) -> int:
        """Return how many topic filters are registered."""
        return len(self._exact) + len(self._wildcard)

    # ----------------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        """Start the supervisor and wait (at most ``timeout_s``) for the first attempt to finish.

        It does not raise when the broker is down: drivers raise :class:`DeviceUnavailable` and the
        supervisor keeps trying with backoff, so the server starts without its broker.
        """
        if self._supervisor is not None:
            return
        self._supervisor = asyncio.create_task(self._supervise(), name=f"mqtt:{self._client_id}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout_s + _START_MARGIN_S):
                await self._first_attempt.wait()

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until the broker link is up; raise :class:`DeviceUnavailable` after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                while not self._connected:
                    self._state_changed.clear()
                    await self._state_changed.wait()
        except TimeoutError:
            raise DeviceUnavailable(f"MQTT broker {self._host}:{self._port}: {self.last_error}") from None

    async def close(self) -> None:
        """Stop reconnecting and disconnect (bounded by ``timeout_s``); safe to call twice."""
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drop("connection closed")

    # ----------------------------------------------------------------------------------------------
    # Routing

    async def register(self, topic_filter: str, handler: MessageHandler, *, qos: int) -> None:
        """Route ``topic_filter``'s messages to ``handler`` and subscribe; wait for the broker's SUBACK.

        Raise :class:`DeviceUnavailable` if the broker is not connected or does not answer within
        ``timeout_s``, :class:`DeviceProtocolError` if it refuses the subscription, ``ValueError``
        if another handler owns the filter.
        """
        if not self._connected:
            raise DeviceUnavailable(f"MQTT broker not connected: {self.last_error or 'connecting'}")
        routes = self._wildcard if ("+" in topic_filter or "#" in topic_filter) else self._exact
        owner = routes.get(topic_filter)
        if owner is not None and owner[0] is not handler:
            raise ValueError(f"topic {topic_filter!r} is already registered by {owner[0]!r}")
        routes[topic_filter] = (handler, qos)
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue(subscribe=True, topic_filter=topic_filter, qos=qos, waiter=waiter)
        try:
            async with asyncio.timeout(self._timeout_s):
                granted = await waiter
        except TimeoutError:
            self.unregister(topic_filter, handler)
            raise DeviceUnavailable(
                f"MQTT broker did not acknowledge the subscription to {topic_filter!r} "
                f"within {self._timeout_s:g} s"
            ) from None
        except BaseException:
            self.unregister(topic_filter, handler)
            raise
        if not granted:
            self.unregister(topic_filter, handler)
            raise DeviceProtocolError(f"MQTT broker refused the subscription to {topic_filter!r}")

    def unregister(self, topic_filter: str, handler: MessageHandler) -> None:
        """Stop routing ``topic_filter`` to ``handler`` and unsubscribe; no-op if it is not its owner."""
        routes = self._wildcard if ("+" in topic_filter or "#" in topic_filter) else self._exact
        owner = routes.get(topic_filter)
        if owner is None or owner[0] is not handler:
            return
        del routes[topic_filter]
        if self._connected:
            self._queue(subscribe=False, topic_filter=topic_filter, qos=0, waiter=None)

    # ----------------------------------------------------------------------------------------------
    # Publishing

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        """Hand one message to the socket; MQTT 5 properties are dropped on 3.1.1.

        Raise :class:`DeviceUnavailable` when the broker is not connected. Delivery is the
        broker's (QoS); a command's outcome is known from the device's response.
        """
        client = self._client
        if not self._connected or client is None:
            raise DeviceUnavailable(f"MQTT broker not connected: {self.last_error or 'connecting'}")
        properties: dict[str, Any] = {}
        if self._version is MqttVersion.V5:
            if response_topic is not None:
                properties["response_topic"] = response_topic
            if correlation_data is not None:
                properties["correlation_data"] = correlation_data
        try:
            client.publish(gmqtt.Message(topic, payload, qos=qos, retain=retain, **properties))
        except (OSError, OverflowError) as err:  # OverflowError: gmqtt ran out of packet ids
            raise DeviceUnavailable(f"MQTT publish to {topic!r} failed: {err}") from err
        self.stats.published += 1

    # ----------------------------------------------------------------------------------------------
    # Supervisor

    async def _supervise(self) -> None:
        try:
            while True:
                lost = await self._connect_once()
                self._first_attempt.set()
                if lost is not None:
                    reason = await lost
                    self._went_down(f"connection lost: {reason}")
                await asyncio.sleep(self._backoff.next_delay())
        finally:
            self._first_attempt.set()

    async def _connect_once(self) -> asyncio.Future[str] | None:
        """Make one connection attempt; return the future that completes when it is lost."""
        loop = asyncio.get_running_loop()
        client = _Client(
            self._client_id,
            version=_GMQTT_VERSION[self._version],
            clean_session=True,
            receive_maximum=_RECEIVE_MAXIMUM,  # an MQTT 5 property; gmqtt leaves it out on 3.1.1
        )
        lost: asyncio.Future[str] = loop.create_future()

        def on_disconnect(_client: object, _packet: object) -> None:
            if not lost.done():
                lost.set_result("broker closed the connection")

        def on_subscribe(_client: object, mid: int, granted: Sequence[int], _props: object) -> None:
            for waiter, code in zip(self._suback_waiters.pop(mid, []), granted, strict=False):
                if waiter is not None and not waiter.done():
                    waiter.set_result(code < 0x80)

        client.on_message = self._on_message
        client.on_disconnect = on_disconnect
        client.on_subscribe = on_subscribe
        if self._username is not None:
            client.set_auth_credentials(self._username, self._password)
        try:
            tls: ssl.SSLContext | bool = False
            if self._broker.tls:
                tls = await asyncio.to_thread(make_ssl_context, self._broker.security)
            async with asyncio.timeout(self._timeout_s):
                await _connect_unless_lost(
                    client, lost, self._host, self._port, ssl=tls, keepalive_s=self._keepalive_s
                )
        except (OSError, TimeoutError, gmqtt.MQTTConnectError) as err:
            self.stats.connect_failures += 1
            reason = _describe(err, self._timeout_s, tls=self._broker.tls)
            self._went_down(f"cannot connect to {self._host}:{self._port}: {reason}")
            self._first_attempt.set()
            await _disconnect(client, self._timeout_s)
            return None
        self._client, self._lost = client, lost
        self._connected = True
        self.last_error = ""
        self.stats.connects += 1
        self._backoff.reset()
        _LOGGER.info("MQTT %s: connected to %s:%s", self._version.value, self._host, self._port)
        self._state_changed.set()
        self._resubscribe()
        return lost

    def _went_down(self, reason: str, *, closing: bool = False) -> None:
        was_connected = self._connected
        self._connected = False
        self._client = None
        self._lost = None
        self._state_changed.set()
        for waiters in self._suback_waiters.values():
            for waiter in waiters:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(DeviceUnavailable(f"MQTT broker: {reason}"))
        self._suback_waiters.clear()
        self._pending.clear()
        if was_connected:
            if closing:
                _LOGGER.info("MQTT broker %s:%s: %s", self._host, self._port, reason)
            else:
                self.stats.losses += 1
                _LOGGER.warning("MQTT broker %s:%s: %s", self._host, self._port, reason)
            handlers = {id(h): h for h, _ in (*self._exact.values(), *self._wildcard.values())}
            for handler in handlers.values():
                handler.connection_lost(reason)
        elif reason != self.last_error:
            _LOGGER.warning("MQTT broker %s:%s: %s", self._host, self._port, reason)
        self.last_error = reason

    async def _drop(self, reason: str) -> None:
        client = self._client
        if self._connected:
            self._went_down(reason, closing=True)
        if client is not None:
            await _disconnect(client, self._timeout_s)

    def _resubscribe(self) -> None:
        for routes in (self._exact, self._wildcard):
            for topic_filter, (_, qos) in routes.items():
                self._queue(subscribe=True, topic_filter=topic_filter, qos=qos, waiter=None)

    def _queue(
        self, *, subscribe: bool, topic_filter: str, qos: int, waiter: asyncio.Future[bool] | None
    ) -> None:
        """Queue a (un)subscription; all queued in one loop turn go out in a few packets, in order."""
        self._pending.append((subscribe, topic_filter, qos, waiter))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        client = self._client
        if client is None or not self._connected:
            for _, _, _, waiter in pending:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(DeviceUnavailable("MQTT broker not connected"))
            return
        start = 0
        while start < len(pending):
            subscribe = pending[start][0]
            end = start
            while (
                end < len(pending)
                and pending[end][0] == subscribe
                and end - start < _SUBSCRIPTIONS_PER_PACKET
            ):
                end += 1
            run = pending[start:end]
            try:
                if subscribe:
                    mid = client.subscribe([gmqtt.Subscription(f, qos=q) for _, f, q, _ in run])
                    self._suback_waiters[mid] = [w for *_, w in run]
                else:
                    client.unsubscribe([f for _, f, _, _ in run])
            except (OSError, OverflowError) as err:
                for _, _, _, waiter in run:
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(DeviceUnavailable(f"MQTT subscribe failed: {err}"))
            start = end

    # ----------------------------------------------------------------------------------------------
    # Receiving

    def _on_message(
        self, _client: object, topic: str | bytes, payload: bytes, _qos: int, properties: dict[str, Any]
    ) -> None:
        """Route one message by exact topic, then by wildcard filter; else dead-letter it."""
        self.stats.messages_in += 1
        if isinstance(topic, bytes):  # gmqtt passes bytes when the topic is not UTF-8
            self.stats.unknown_topic += 1
            self._dead_letters.reject(
                origin=f"mqtt:{topic!r}", payload=bytes(payload), reason="topic is not UTF-8"
            )
            return
        route = self._exact.get(topic)
        if route is None:
            route = next((r for f, r in self._wildcard.items() if topic_matches(f, topic)), None)
        if route is None:
            self.stats.unknown_topic += 1
            self._dead_letters.reject(
                origin=f"mqtt:{topic}", payload=bytes(payload), reason="unknown topic: no device owns it"
            )
            return
        correlation = properties.get("correlation_data")
        message = MqttMessage(
            topic=topic,
            payload=bytes(payload),
            retained=bool(properties.get("retain")),
            correlation_data=correlation[0] if correlation else None,
        )
        try:
            route[0].handle_message(message)
        except Exception:  # a driver bug must not stop delivery to the other 9,999 devices
            self.stats.handler_errors += 1
            _LOGGER.exception("MQTT: handler of %s failed on a message", topic)
            self._dead_letters.reject(
                origin=f"mqtt:{topic}", payload=message.payload, reason="internal error in the driver"
            )


async def _connect(
    client: _Client, host: str, port: int, *, ssl: ssl.SSLContext | bool, keepalive_s: int
) -> None:
    """Connect and wait for CONNACK; raise ``MQTTConnectError`` for a refusal gmqtt let pass."""
    await client.connect(host, port, ssl=ssl, keepalive=keepalive_s, version=client.pinned_version)
    if client.failed_connections:  # gmqtt only swallows CONNACK code 1: "unacceptable protocol version"
        raise gmqtt.MQTTConnectError(1)


_CREDENTIALS_REFUSED: Final = frozenset({4, 5, 134, 135})
"""CONNACK codes for bad credentials / not authorised (MQTT 3.1.1: 4, 5; MQTT 5: 0x86, 0x87)."""


async def _connect_unless_lost(
    client: _Client,
    lost: asyncio.Future[str],
    host: str,
    port: int,
    *,
    ssl: ssl.SSLContext | bool,
    keepalive_s: int,
) -> None:
    """Connect, but fail at once if the broker drops the socket before CONNACK.

    gmqtt itself would wait for a CONNACK that never comes (a TLS broker that refuses our client
    certificate, or a plain client on a TLS port), and the attempt would end as a bare timeout.
    """
    attempt = asyncio.create_task(_connect(client, host, port, ssl=ssl, keepalive_s=keepalive_s))
    try:
        first: set[asyncio.Future[Any]] = {attempt, lost}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if attempt.done():
            attempt.result()
            return
        refusal = client._error  # a refusing CONNACK seen just before the socket closed
        if isinstance(refusal, gmqtt.MQTTConnectError):
            raise refusal
        raise ConnectionAbortedError("the broker closed the connection before CONNACK")
    finally:
        if not attempt.done():
            attempt.cancel()
            await asyncio.wait({attempt})
        if not attempt.cancelled():
            attempt.exception()  # retrieved here; the caller saw it through result() or not at all


def _describe(err: BaseException, timeout_s: float, *, tls: bool = False) -> str:
    """Say why a connection attempt failed, in words an operator can act on (never a password)."""
    plain_hint = "" if tls else " (if the port is a TLS listener, use an mqtts:// URL)"
    if isinstance(err, TimeoutError):
        message = f"no CONNACK within {timeout_s:g} s{plain_hint}"
    elif isinstance(err, ssl.SSLCertVerificationError):
        message = f"TLS: broker certificate not trusted: {err.verify_message or err.reason or err}"
    elif isinstance(err, ssl.SSLError):
        message = f"TLS handshake failed: {err.reason or err}"
    elif isinstance(err, ConnectionAbortedError | ConnectionResetError | BrokenPipeError):
        tls_hint = " (with TLS: does the broker require a client certificate, or refuse ours?)"
        message = f"the broker closed the connection before CONNACK{tls_hint if tls else plain_hint}"
    elif isinstance(err, OSError):
        message = err.strerror or str(err) or type(err).__name__
    elif isinstance(err, gmqtt.MQTTConnectError) and getattr(err, "_code", None) in _CREDENTIALS_REFUSED:
        message = f"credentials refused by the broker (check username and password): {err}"
    else:
        message = str(err)
    return message


async def _disconnect(client: _Client, timeout_s: float) -> None:
    """Close a gmqtt client's socket, politely if it is still open; never raises."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_s):
            if client._connection is not None:  # None when the TCP connect failed
                await client.disconnect()
