"""Alert notification delivery: route a notification by node and severity, then push it to channels.

Quota alerts (80 %, 90 %, 100 % of a month's carbon budget) must reach people where they already
read messages: a generic JSON webhook, SMTP email, and the group robots of WeCom (企业微信), Feishu
(飞书) and DingTalk (钉钉). The alert engine builds a :class:`Notification` and calls
:meth:`Notifier.send`; this module decides where it goes and delivers it.

Design
------
- **Config at the edge.** Channels and routes are frozen pydantic models (``extra="forbid"``);
  :func:`load_notify_config` turns a validation error into a :class:`~scada.model.ConfigError` that
  names the field (``notifications: channels.ops-mail.port: ...``). A route naming an unknown
  channel fails at load, not at 3 a.m.
- **Routing.** A :class:`Route` on a node covers the node and every descendant: the caller passes
  the notification node's ancestor chain, so this module needs no hierarchy. ``"*"`` covers every
  node. A route applies when the severity is at least its ``min_severity``. Each channel receives a
  notification at most once, however many routes lead to it.
- **Delivery never raises.** Every channel is delivered in its own task (concurrently), each attempt
  bounded by the channel's ``timeout_s``. A failure becomes a :class:`DeliveryResult` with the
  reason; only cancellation propagates. Transient failures (network errors, timeouts, HTTP 408/429/
  5xx, SMTP 4xx, the vendors' "busy" and rate-limit codes) are retried with capped, jittered
  backoff (:class:`~scada.runtime.Backoff`) up to ``max_attempts``; permanent ones (HTTP 4xx, a bad
  signature, SMTP 5xx) are not.
- **Vendors answer errors in the body.** WeCom and DingTalk answer HTTP 200 with ``errcode != 0``,
  Feishu with ``code != 0``; that is a failed delivery carrying the vendor's code and message.
- **Idempotent by notification id.** A channel that delivered a notification (or is delivering it)
  is not sent it again: a second :meth:`Notifier.send` of the same id reports
  :attr:`DeliveryStatus.DUPLICATE` for it. A channel whose delivery failed is tried again, so an
  at-least-once caller that redelivers after a failure completes the job without duplicates. The
  memory is bounded: the oldest ids are forgotten first.
- **Email without blocking the loop.** stdlib :mod:`smtplib` runs in :func:`asyncio.to_thread`,
  its socket timeout set to the channel's ``timeout_s``. The Message-ID is derived from the
  notification id, so a retried email carries the same Message-ID and mail systems can drop the copy.
- **Secrets stay secret.** Robot webhook URLs (they carry the access token), signing secrets, SMTP
  passwords and webhook header values are :class:`pydantic.SecretStr`: they never appear in a repr,
  a log line or a delivery reason, which name the target by scheme and host only. Redirects are not
  followed, so a token is never replayed to another host.

Vendor formats are documented in docs/notifications.md, with the sources they were checked against.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import hmac
import json
import logging
import math
import smtplib
import ssl
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from types import MappingProxyType, TracebackType
from typing import Annotated, Any, Final, Literal, Self
from zoneinfo import ZoneInfo

import aiohttp
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from yarl import URL

from scada.model import ID_PATTERN, Clock, ConfigError
from scada.runtime import Backoff, SystemClock

__all__ = [
    "ChannelConfig",
    "DeliveryResult",
    "DeliveryStatus",
    "DingTalkChannel",
    "EmailChannel",
    "FeishuChannel",
    "Notification",
    "Notifier",
    "NotifyConfig",
    "Route",
    "Severity",
    "WeComChannel",
    "WebhookChannel",
    "dingtalk_sign",
    "feishu_sign",
    "load_notify_config",
    "render_text",
]

_LOGGER = logging.getLogger(__name__)

MAX_FIELDS: Final = 32
"""Most entries a notification's ``fields`` may carry: it is a summary, not a data dump."""

_MAX_RESPONSE_BYTES: Final = 64 * 1024
"""Most of a receiver's answer we read: enough for any vendor's JSON, bounded against a hostile peer."""

_WECOM_TEXT_MAX_BYTES: Final = 2048
"""WeCom robot text content limit (UTF-8 bytes), per the WeCom robot documentation."""
_WECOM_MARKDOWN_MAX_BYTES: Final = 4096
"""WeCom robot markdown content limit (UTF-8 bytes), per the WeCom robot documentation."""
_FEISHU_TEXT_MAX_BYTES: Final = 18 * 1024
"""Feishu caps a request body at 20 KB; the text gets 18 KB, leaving room for the envelope."""
_DINGTALK_TEXT_MAX_BYTES: Final = 18 * 1024
"""Our own cap for DingTalk markdown text, kept to the same size as Feishu's."""

_WECOM_RETRYABLE: Final = frozenset({-1, 45009})
"""WeCom: -1 system busy, 45009 API call frequency over the limit (20 messages a minute per robot)."""
_DINGTALK_RETRYABLE: Final = frozenset({-1, 90030, 130101})
"""DingTalk: -1 system busy, 90030 webhook over limit, 130101 sending too fast (20 a minute per robot)."""
_FEISHU_RETRYABLE: Final = frozenset({11232})
"""Feishu: 11232 rate limited (100 a minute, 5 a second per custom robot)."""

_RETRYABLE_HTTP: Final = frozenset({408, 429})


# --------------------------------------------------------------------------------------------------
# The notification


class Severity(enum.StrEnum):
    """How urgent a notification is; routes filter on it (``min_severity``)."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """Return 0 for info, 2 for critical, so severities compare by urgency.

        >>> Severity.CRITICAL.rank > Severity.WARNING.rank > Severity.INFO.rank
        True
        """
        return _SEVERITY_RANK[self]


_SEVERITY_RANK: Final = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}

FieldValue = int | float | str
"""A value of :attr:`Notification.fields`: a number (with its unit in the key) or a short text."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Notification:
    """One message to people about one node: what happened, how bad, and the figures behind it."""

    id: str
    """Unique per alert event; deliveries are idempotent by it."""
    node: str
    """Id of the hierarchy node the notification is about."""
    node_name: str
    """Display name of the node (Chinese or English)."""
    severity: Severity
    title: str
    """One line; becomes the email subject and the robot message heading."""
    text: str
    """The body, Chinese or English, may contain newlines."""
    ts: datetime
    """When the condition was detected (timezone-aware)."""
    fields: Mapping[str, FieldValue] = field(default_factory=dict)
    """A few figures, units in the keys: ``quota_t``, ``forecast_t``, ``percent``, ``threshold``."""

    def __post_init__(self) -> None:
        if not self.id.strip():
            raise ValueError("notification: id must not be empty")
        if self.ts.tzinfo is None or self.ts.utcoffset() is None:
            raise ValueError(f"notification {self.id}: ts must be timezone-aware")
        if not self.title.strip():
            raise ValueError(f"notification {self.id}: title must not be empty")
        if len(self.fields) > MAX_FIELDS:
            raise ValueError(f"notification {self.id}: at most {MAX_FIELDS} fields, got {len(self.fields)}")
        for key, value in self.fields.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"notification {self.id}: field names must be non-empty strings")
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise TypeError(f"notification {self.id}: field {key} must be a number or a string")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"notification {self.id}: field {key} must be finite, got {value}")
        # A read-only copy: the caller's dict cannot change a frozen notification afterwards.
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))


def _format_value(value: FieldValue) -> str:
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def render_text(notification: Notification, zone: ZoneInfo) -> str:
    """Render a notification as plain text: heading, node, local time, body and figures.

    >>> from datetime import UTC
    >>> n = Notification(id="q-1", node="park-a", node_name="A 园区", severity=Severity.WARNING,
    ...                  title="碳配额预警 90 %", text="本月预测超出配额。",
    ...                  ts=datetime(2026, 3, 5, 1, 30, tzinfo=UTC),
    ...                  fields={"quota_t": 1200, "forecast_t": 1093.5})
    >>> print(render_text(n, ZoneInfo("Asia/Shanghai")))
    [WARNING] 碳配额预警 90 %
    A 园区 (park-a) · 2026-03-05 09:30 Asia/Shanghai
    本月预测超出配额。
    quota_t: 1200
    forecast_t: 1093.5
    """
    lines = [
        f"[{notification.severity.value.upper()}] {notification.title}",
        f"{notification.node_name} ({notification.node}) · {_local_time(notification.ts, zone)}",
    ]
    if notification.text:
        lines.append(notification.text)
    lines.extend(f"{key}: {_format_value(value)}" for key, value in notification.fields.items())
    return "\n".join(lines)


def _local_time(ts: datetime, zone: ZoneInfo) -> str:
    return f"{ts.astimezone(zone):%Y-%m-%d %H:%M} {zone.key}"


def _truncate_utf8(text: str, max_bytes: int) -> str:
    """Cut ``text`` to at most ``max_bytes`` UTF-8 bytes on a character boundary, marking the cut.

    >>> _truncate_utf8("碳排放", 7)
    '碳…'
    >>> _truncate_utf8("ok", 7)
    'ok'
    """
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    marker = "…"
    budget = max_bytes - len(marker.encode("utf-8"))
    return encoded[: max(budget, 0)].decode("utf-8", errors="ignore") + marker


# --------------------------------------------------------------------------------------------------
# Signing (pure)


def feishu_sign(secret: str, timestamp_s: int) -> str:
    r"""Return the Feishu custom-robot signature for ``timestamp_s`` (seconds since the epoch).

    Feishu keys HMAC-SHA256 with ``"<timestamp>\n<secret>"`` and signs an empty message; the result
    is Base64-encoded and sent in the JSON body next to ``timestamp``.

    >>> feishu_sign("demo-secret", 1599360473)
    '3/MaVZ8JLIy4TUG+7KSFJqvUkTKd+HWY8g+56DZWq8s='
    """
    key = f"{timestamp_s}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode("ascii")


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    r"""Return the DingTalk custom-robot signature (Base64, not yet URL-encoded).

    DingTalk keys HMAC-SHA256 with the secret and signs ``"<timestamp>\n<secret>"``, the
    timestamp in milliseconds; the result goes, URL-encoded, into the ``sign`` query parameter.

    >>> dingtalk_sign("SECdemo", 1599360473000)
    'tGWkA5eQOQNCNPDgphtxIoNLO+/gD8Lcb705KQoRzeY='
    """
    message = f"{timestamp_ms}\n{secret}".encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode("ascii")


# --------------------------------------------------------------------------------------------------
# Configuration


def _check_http_url(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return url


def _redact(url: str) -> str:
    """Name a target by scheme and host only: paths and queries of robot URLs carry tokens.

    >>> _redact("https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=secret-key")
    'https://qyapi.weixin.qq.com'
    """
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or "?"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{host}{port}"


class _ChannelBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(default=10.0, gt=0, le=300)
    """Bound on one delivery attempt, connection to answer."""


class WebhookChannel(_ChannelBase):
    """A generic HTTP endpoint: POST of the notification as JSON (see docs/notifications.md)."""

    kind: Literal["webhook"] = "webhook"
    url: str
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    """Extra request headers, e.g. ``Authorization``; values are secrets."""

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return _check_http_url(url)


class _RobotChannel(_ChannelBase):
    webhook_url: SecretStr
    """The robot's webhook address; it embeds the access token, so it is a secret."""

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, url: SecretStr) -> SecretStr:
        _check_http_url(url.get_secret_value())
        return url


class WeComChannel(_RobotChannel):
    """A WeCom (企业微信) group robot: ``markdown`` (default) or ``text`` messages."""

    kind: Literal["wecom"] = "wecom"
    msgtype: Literal["markdown", "text"] = "markdown"
    mentioned_mobiles: list[str] = Field(default_factory=list)
    """Mobile numbers to @-mention, or ``"@all"``; WeCom supports mentions in text messages only."""

    @model_validator(mode="after")
    def _mentions_need_text(self) -> Self:
        if self.mentioned_mobiles and self.msgtype != "text":
            raise ValueError("mentioned_mobiles: WeCom mentions work only with msgtype 'text'")
        return self


class FeishuChannel(_RobotChannel):
    """A Feishu (飞书) custom robot: ``text`` messages, signed when a secret is set."""

    kind: Literal["feishu"] = "feishu"
    secret: SecretStr | None = None
    """The robot's signature-verification secret (安全设置 → 签名校验)."""


class DingTalkChannel(_RobotChannel):
    """A DingTalk (钉钉) custom robot: ``markdown`` messages, signed when a secret is set."""

    kind: Literal["dingtalk"] = "dingtalk"
    secret: SecretStr | None = None
    """The robot's signing secret (安全设置 → 加签, starts with ``SEC``)."""
    at_mobiles: list[str] = Field(default_factory=list)
    """Mobile numbers to @-mention."""


class EmailChannel(_ChannelBase):
    """An SMTP submission server and the people to mail."""

    kind: Literal["email"] = "email"
    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    use_tls: bool = False
    """Implicit TLS from the first byte (SMTPS, usually port 465)."""
    starttls: bool = True
    """Upgrade a plain connection with STARTTLS before anything else is sent (usually port 587)."""
    username: str | None = None
    password: SecretStr | None = None
    sender: str
    recipients: list[str] = Field(min_length=1)
    subject_prefix: str = "[CarbonOS]"

    @field_validator("sender")
    @classmethod
    def _sender(cls, sender: str) -> str:
        return _check_address(sender)

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, recipients: list[str]) -> list[str]:
        return [_check_address(address) for address in recipients]

    @model_validator(mode="after")
    def _security(self) -> Self:
        if self.use_tls and self.starttls:
            raise ValueError("use_tls and starttls are exclusive: pick implicit TLS or STARTTLS")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.username is not None and not (self.use_tls or self.starttls):
            raise ValueError(
                "username: credentials need use_tls or starttls, or they cross the network in clear"
            )
        return self


def _check_address(address: str) -> str:
    local, at, domain = address.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() or c in "<>," for c in address):
        raise ValueError(f"{address!r} is not a plain email address (user@example.com)")
    return address


ChannelConfig = Annotated[
    WebhookChannel | EmailChannel | WeComChannel | FeishuChannel | DingTalkChannel,
    Field(discriminator="kind"),
]
"""Any channel, told apart by ``kind`` (webhook, email, wecom, feishu, dingtalk)."""

_ANY_NODE: Final = "*"


class Route(BaseModel):
    """Send notifications about these nodes (and their descendants) of at least this severity here."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: list[str] = Field(min_length=1)
    """Node ids, or ``"*"`` for every node."""
    min_severity: Severity = Severity.INFO
    channels: list[str] = Field(min_length=1)
    """Channel names (keys of the channel mapping)."""

    def covers(self, chain: Sequence[str], severity: Severity) -> bool:
        """Return True when a notification on ``chain`` (node, then its ancestors) takes this route.

        >>> r = Route(nodes=["park-a"], min_severity=Severity.WARNING, channels=["ops"])
        >>> r.covers(["ws-1", "ent-1", "park-a"], Severity.CRITICAL)
        True
        >>> r.covers(["ws-1", "ent-1", "park-a"], Severity.INFO), r.covers(["park-b"], Severity.CRITICAL)
        (False, False)
        """
        if severity.rank < self.min_severity.rank:
            return False
        return _ANY_NODE in self.nodes or any(node in self.nodes for node in chain)


class NotifyConfig(BaseModel):
    """Channels by name, routes, and the retry and idempotency policy of a :class:`Notifier`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: dict[Annotated[str, Field(pattern=rf"^{ID_PATTERN}$")], ChannelConfig] = Field(
        default_factory=dict
    )
    routes: list[Route] = Field(default_factory=list)
    max_attempts: int = Field(default=3, ge=1, le=10)
    """Attempts per channel and notification, the first included."""
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)
    dedupe_size: int = Field(default=10_000, ge=1, le=1_000_000)
    """How many notification ids are remembered for idempotency."""
    timezone: str = "Asia/Shanghai"
    """Zone of the times shown to people."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for index, route in enumerate(self.routes):
            unknown = [name for name in route.channels if name not in self.channels]
            if unknown:
                raise ValueError(f"routes[{index}].channels: unknown channel {', '.join(unknown)}")
        if self.retry_initial_s > self.retry_max_s:
            raise ValueError("retry_initial_s must not exceed retry_max_s")
        try:
            ZoneInfo(self.timezone)
        except (ValueError, KeyError) as err:  # ZoneInfoNotFoundError is a KeyError
            raise ValueError(f"timezone: unknown zone {self.timezone!r}") from err
        return self


def load_notify_config(data: Mapping[str, Any], *, source: str = "notifications") -> NotifyConfig:
    """Validate raw settings (YAML or JSON) into a :class:`NotifyConfig`; raise :class:`ConfigError`.

    The message names the source and the bad field.

    >>> load_notify_config({"channels": {"ops": {"kind": "webhook", "url": "ftp://x"}}})
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    scada.model.ConfigError: notifications: channels.ops.webhook.url: Value error, must be an http://...
    """
    try:
        return NotifyConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{source}: {where or 'root'}: {first['msg']}") from None


# --------------------------------------------------------------------------------------------------
# Results


class DeliveryStatus(enum.StrEnum):
    """What became of one notification on one channel."""

    DELIVERED = "delivered"
    """The receiver accepted it (HTTP 2xx with no vendor error, or the SMTP server queued it)."""
    FAILED = "failed"
    """Refused or unreachable after every attempt allowed; the reason says why."""
    TIMEOUT = "timeout"
    """The last attempt got no answer in time; the receiver may or may not have it."""
    DUPLICATE = "duplicate"
    """This channel already delivered (or is delivering) this notification id: nothing was sent."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryResult:
    """The outcome of one notification on one channel."""

    notification_id: str
    channel: str
    """The channel's name."""
    kind: str
    """The channel's kind: webhook, email, wecom, feishu or dingtalk."""
    status: DeliveryStatus
    attempts: int
    """Attempts made (0 for a duplicate)."""
    reason: str = ""
    """Why it failed, or a note on a success (recipients refused); never holds a secret."""
    elapsed_ms: float = 0.0

    @property
    def ok(self) -> bool:
        """Return True when the channel has the notification (now or from an earlier send)."""
        return self.status in {DeliveryStatus.DELIVERED, DeliveryStatus.DUPLICATE}


class _AttemptFailed(Exception):
    """One attempt failed; ``retryable`` says whether another attempt may succeed."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


# --------------------------------------------------------------------------------------------------
# Requests (pure)


class _Vendor(enum.Enum):
    NONE = "none"
    WECOM = "wecom"
    FEISHU = "feishu"
    DINGTALK = "dingtalk"


@dataclass(frozen=True, slots=True)
class _HttpRequest:
    url: URL
    body: bytes
    headers: Mapping[str, str]
    target: str
    """Scheme and host, for reasons and logs."""
    vendor: _Vendor
    secret_url: str = ""
    """The full URL, scrubbed from any library error text."""


_JSON_HEADERS: Final = MappingProxyType({"Content-Type": "application/json; charset=utf-8"})


def _json_bytes(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _webhook_request(channel: WebhookChannel, n: Notification) -> _HttpRequest:
    payload = {
        "version": 1,
        "source": "carbonos-scada",
        "id": n.id,
        "node": {"id": n.node, "name": n.node_name},
        "severity": n.severity.value,
        "title": n.title,
        "text": n.text,
        "ts": n.ts.isoformat(),
        "fields": dict(n.fields),
    }
    headers = {**_JSON_HEADERS, "Idempotency-Key": n.id}
    headers.update({key: value.get_secret_value() for key, value in channel.headers.items()})
    return _HttpRequest(URL(channel.url), _json_bytes(payload), headers, _redact(channel.url), _Vendor.NONE)


_WECOM_COLOUR: Final = {Severity.INFO: "info", Severity.WARNING: "warning", Severity.CRITICAL: "warning"}
"""WeCom markdown knows three colours: info (green), comment (grey) and warning (orange-red)."""


def _wecom_request(channel: WeComChannel, n: Notification, zone: ZoneInfo) -> _HttpRequest:
    payload: dict[str, Any]
    if channel.msgtype == "text":
        text: dict[str, Any] = {"content": _truncate_utf8(render_text(n, zone), _WECOM_TEXT_MAX_BYTES)}
        if channel.mentioned_mobiles:
            text["mentioned_mobile_list"] = list(channel.mentioned_mobiles)
        payload = {"msgtype": "text", "text": text}
    else:
        colour = _WECOM_COLOUR[n.severity]
        lines = [
            f'### <font color="{colour}">[{n.severity.value.upper()}]</font> {n.title}',
            f'> <font color="comment">{n.node_name} ({n.node}) · {_local_time(n.ts, zone)}</font>',
        ]
        if n.text:
            lines.append(n.text)
        lines.extend(f"> {key}: **{_format_value(value)}**" for key, value in n.fields.items())
        content = _truncate_utf8("\n".join(lines), _WECOM_MARKDOWN_MAX_BYTES)
        payload = {"msgtype": "markdown", "markdown": {"content": content}}
    url = channel.webhook_url.get_secret_value()
    return _HttpRequest(URL(url), _json_bytes(payload), _JSON_HEADERS, _redact(url), _Vendor.WECOM, url)


def _feishu_request(channel: FeishuChannel, n: Notification, zone: ZoneInfo, now: datetime) -> _HttpRequest:
    payload: dict[str, Any] = {}
    if channel.secret is not None:
        timestamp_s = int(now.timestamp())
        payload["timestamp"] = str(timestamp_s)
        payload["sign"] = feishu_sign(channel.secret.get_secret_value(), timestamp_s)
    payload["msg_type"] = "text"
    payload["content"] = {"text": _truncate_utf8(render_text(n, zone), _FEISHU_TEXT_MAX_BYTES)}
    url = channel.webhook_url.get_secret_value()
    return _HttpRequest(URL(url), _json_bytes(payload), _JSON_HEADERS, _redact(url), _Vendor.FEISHU, url)


def _dingtalk_request(
    channel: DingTalkChannel, n: Notification, zone: ZoneInfo, now: datetime
) -> _HttpRequest:
    # DingTalk markdown needs a blank line (or two trailing spaces) for a line break.
    lines = [
        f"#### [{n.severity.value.upper()}] {n.title}",
        f"> {n.node_name} ({n.node}) · {_local_time(n.ts, zone)}",
    ]
    if n.text:
        lines.extend(line for line in n.text.splitlines() if line.strip())
    lines.extend(f"- {key}: **{_format_value(value)}**" for key, value in n.fields.items())
    if channel.at_mobiles:
        lines.append(" ".join(f"@{mobile}" for mobile in channel.at_mobiles))  # shown only if in text
    text = _truncate_utf8("\n\n".join(lines), _DINGTALK_TEXT_MAX_BYTES)
    payload: dict[str, Any] = {"msgtype": "markdown", "markdown": {"title": n.title, "text": text}}
    if channel.at_mobiles:
        payload["at"] = {"atMobiles": list(channel.at_mobiles), "isAtAll": False}
    url = channel.webhook_url.get_secret_value()
    signed = url
    if channel.secret is not None:
        timestamp_ms = int(now.timestamp() * 1000)
        sign = dingtalk_sign(channel.secret.get_secret_value(), timestamp_ms)
        separator = "&" if urllib.parse.urlsplit(url).query else "?"
        signed = f"{url}{separator}timestamp={timestamp_ms}&sign={urllib.parse.quote_plus(sign)}"
    # encoded=True: the sign is already percent-encoded; yarl must not encode it again.
    return _HttpRequest(
        URL(signed, encoded=True), _json_bytes(payload), _JSON_HEADERS, _redact(url), _Vendor.DINGTALK, url
    )


def _vendor_error(vendor: _Vendor, body: bytes) -> _AttemptFailed | None:
    """Return the failure a vendor reported in its answer body, or None when it accepted the message."""
    if vendor is _Vendor.NONE:
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return _AttemptFailed(f"answer is not JSON: {body[:200]!r}", retryable=False)
    if not isinstance(answer, dict):
        return _AttemptFailed(f"answer is not a JSON object: {body[:200]!r}", retryable=False)
    if vendor is _Vendor.FEISHU:
        # "code" is current; older robots answer only the redundant "StatusCode".
        code, message = answer.get("code", answer.get("StatusCode")), answer.get("msg", "")
        retryable_codes = _FEISHU_RETRYABLE
    else:
        code, message = answer.get("errcode"), answer.get("errmsg", "")
        retryable_codes = _WECOM_RETRYABLE if vendor is _Vendor.WECOM else _DINGTALK_RETRYABLE
    if not isinstance(code, int):
        return _AttemptFailed(f"answer has no error code: {body[:200]!r}", retryable=False)
    if code != 0:
        return _AttemptFailed(f"{vendor.value} error {code}: {message}", retryable=code in retryable_codes)
    return None


def _email_message(channel: EmailChannel, n: Notification, zone: ZoneInfo, now: datetime) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = f"{channel.subject_prefix} [{n.severity.value.upper()}] {n.title} · {n.node_name}"
    message["From"] = channel.sender
    message["To"] = ", ".join(channel.recipients)
    message["Date"] = format_datetime(now)
    # Derived from the notification id: a retried email keeps its Message-ID, so it can be de-duplicated.
    digest = hashlib.sha256(n.id.encode()).hexdigest()[:32]
    message["Message-ID"] = f"<{digest}.notify@{channel.sender.rpartition('@')[2]}>"
    message["X-CarbonOS-Node"] = n.node
    message["X-CarbonOS-Severity"] = n.severity.value
    message.set_content(render_text(n, zone) + "\n", charset="utf-8")
    return message


def _send_email_blocking(channel: EmailChannel, message: EmailMessage) -> str:
    """Submit one message over SMTP; runs in a worker thread. Return a note on refused recipients."""
    target = f"smtp://{channel.host}:{channel.port}"
    context = ssl.create_default_context()
    try:
        smtp: smtplib.SMTP
        if channel.use_tls:
            smtp = smtplib.SMTP_SSL(channel.host, channel.port, timeout=channel.timeout_s, context=context)
        else:
            smtp = smtplib.SMTP(channel.host, channel.port, timeout=channel.timeout_s)
        with smtp:
            if channel.starttls:
                smtp.starttls(context=context)
            if channel.username is not None and channel.password is not None:
                smtp.login(channel.username, channel.password.get_secret_value())
            refused = smtp.send_message(message, from_addr=channel.sender, to_addrs=channel.recipients)
    except TimeoutError:
        raise  # a socket timeout: the caller reports it as a TIMEOUT, like its own deadline
    except smtplib.SMTPRecipientsRefused as err:
        codes = sorted({code for code, _ in err.recipients.values()})
        raise _AttemptFailed(
            f"{target}: every recipient refused ({', '.join(map(str, codes))})",
            retryable=all(400 <= code < 500 for code in codes),
        ) from err
    except smtplib.SMTPNotSupportedError as err:  # e.g. no STARTTLS: never fall back to clear text
        raise _AttemptFailed(f"{target}: {err}", retryable=False) from err
    except smtplib.SMTPResponseException as err:
        text = (
            err.smtp_error.decode("utf-8", "replace") if isinstance(err.smtp_error, bytes) else err.smtp_error
        )
        raise _AttemptFailed(f"{target}: SMTP {err.smtp_code} {text}", retryable=err.smtp_code < 500) from err
    except (smtplib.SMTPException, OSError) as err:  # connection refused or reset, TLS failure
        raise _AttemptFailed(f"{target}: {type(err).__name__}: {err}", retryable=True) from err
    if refused:
        return "refused by the server: " + ", ".join(sorted(refused))
    return ""


# --------------------------------------------------------------------------------------------------
# The notifier


SessionFactory = Callable[[], aiohttp.ClientSession]
AnyChannel = WebhookChannel | EmailChannel | WeComChannel | FeishuChannel | DingTalkChannel


class Notifier:
    """Route notifications to channels and deliver them: concurrent, bounded, retried, idempotent.

    Use it as an async context manager (or call :meth:`close`): it owns the HTTP session it creates.
    """

    def __init__(
        self,
        channels: Mapping[str, AnyChannel],
        routes: Sequence[Route],
        *,
        session_factory: SessionFactory | None = None,
        clock: Clock | None = None,
        max_attempts: int = 3,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 30.0,
        dedupe_size: int = 10_000,
        timezone: str = "Asia/Shanghai",
    ) -> None:
        for index, route in enumerate(routes):
            unknown = [name for name in route.channels if name not in channels]
            if unknown:
                raise ConfigError(
                    f"notifications: routes[{index}].channels: unknown channel {', '.join(unknown)}"
                )
        if max_attempts < 1 or dedupe_size < 1:
            raise ConfigError("notifications: max_attempts and dedupe_size must be at least 1")
        try:
            Backoff(initial_s=retry_initial_s, max_s=retry_max_s)  # fail fast on a bad retry policy
        except ValueError as err:
            raise ConfigError(f"notifications: retry policy: {err}") from None
        self._channels = dict(channels)
        self._routes = tuple(routes)
        self._session_factory = session_factory or aiohttp.ClientSession
        self._session: aiohttp.ClientSession | None = None
        self._clock: Clock = clock or SystemClock()
        self._max_attempts = max_attempts
        self._retry_initial_s, self._retry_max_s = retry_initial_s, retry_max_s
        self._dedupe_size = dedupe_size
        self._zone = ZoneInfo(timezone)
        self._claimed: OrderedDict[str, set[str]] = OrderedDict()
        """Notification id -> channels that delivered it or are delivering it (oldest id first)."""
        self._channel_ok: dict[str, bool] = {}
        self._closed = False

    @classmethod
    def from_config(
        cls,
        config: NotifyConfig,
        *,
        session_factory: SessionFactory | None = None,
        clock: Clock | None = None,
    ) -> Notifier:
        """Build a notifier from validated settings."""
        return cls(
            config.channels,
            config.routes,
            session_factory=session_factory,
            clock=clock,
            max_attempts=config.max_attempts,
            retry_initial_s=config.retry_initial_s,
            retry_max_s=config.retry_max_s,
            dedupe_size=config.dedupe_size,
            timezone=config.timezone,
        )

    def channels_for(self, notification: Notification, node_ancestors: Sequence[str]) -> list[str]:
        """Return the names of the channels a notification goes to, each once, in route order."""
        chain = [notification.node, *node_ancestors]
        names: dict[str, None] = {}
        for route in self._routes:
            if route.covers(chain, notification.severity):
                names.update(dict.fromkeys(route.channels))
        return list(names)

    async def send(self, notification: Notification, node_ancestors: Sequence[str]) -> list[DeliveryResult]:
        """Deliver ``notification`` to every channel its routes select; return one result per channel.

        ``node_ancestors`` is the chain from the node's parent up to the root (the node itself may be
        included). Never raises for a delivery failure; cancellation propagates.
        """
        if self._closed:
            raise RuntimeError("notifier is closed")
        names = self.channels_for(notification, node_ancestors)
        if not names:
            return []  # nothing to remember either: an unrouted id must not push a routed one out
        claimed = self._claim_set(notification.id)
        results: dict[str, DeliveryResult] = {}
        pending: dict[str, asyncio.Task[DeliveryResult]] = {}
        for name in names:
            if name in claimed:
                results[name] = DeliveryResult(
                    notification_id=notification.id,
                    channel=name,
                    kind=self._channels[name].kind,
                    status=DeliveryStatus.DUPLICATE,
                    attempts=0,
                )
                continue
            claimed.add(name)
        try:
            async with asyncio.TaskGroup() as group:
                for name in names:
                    if name not in results:
                        pending[name] = group.create_task(
                            self._deliver(name, notification), name=f"notify:{name}:{notification.id}"
                        )
        finally:
            for name, task in pending.items():
                # Release the claim unless delivered, so a later send (a redelivery) may try again.
                delivered = task.done() and not task.cancelled() and task.exception() is None
                if not (delivered and task.result().ok):
                    claimed.discard(name)
        results.update({name: task.result() for name, task in pending.items()})
        return [results[name] for name in names]

    def _claim_set(self, notification_id: str) -> set[str]:
        claimed = self._claimed.get(notification_id)
        if claimed is None:
            claimed = self._claimed[notification_id] = set()
            while len(self._claimed) > self._dedupe_size:
                self._claimed.popitem(last=False)  # forget the oldest id: bounded memory
        else:
            self._claimed.move_to_end(notification_id)
        return claimed

    async def _deliver(self, name: str, notification: Notification) -> DeliveryResult:
        channel = self._channels[name]
        backoff = Backoff(initial_s=self._retry_initial_s, max_s=self._retry_max_s)
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            status = DeliveryStatus.FAILED
            try:
                async with asyncio.timeout(channel.timeout_s):
                    note = await self._attempt(channel, notification)
            except TimeoutError:
                failure = _AttemptFailed(f"no answer within {channel.timeout_s:g} s", retryable=True)
                status = DeliveryStatus.TIMEOUT
            except _AttemptFailed as err:
                failure = err
            except Exception as err:  # a bug must not take the other channels down
                _LOGGER.exception("notification %s to %s: unexpected error", notification.id, name)
                failure = _AttemptFailed(f"internal error: {type(err).__name__}", retryable=False)
            else:
                self._set_channel_ok(name, ok=True, reason="")
                return self._result(
                    name,
                    notification=notification,
                    status=DeliveryStatus.DELIVERED,
                    attempts=attempt,
                    reason=note,
                    started=started,
                )
            if not failure.retryable or attempt >= self._max_attempts:
                self._set_channel_ok(name, ok=False, reason=failure.reason)
                return self._result(
                    name,
                    notification=notification,
                    status=status,
                    attempts=attempt,
                    reason=failure.reason,
                    started=started,
                )
            await self._clock.sleep(backoff.next_delay())

    def _result(
        self,
        name: str,
        *,
        notification: Notification,
        status: DeliveryStatus,
        attempts: int,
        reason: str,
        started: float,
    ) -> DeliveryResult:
        return DeliveryResult(
            notification_id=notification.id,
            channel=name,
            kind=self._channels[name].kind,
            status=status,
            attempts=attempts,
            reason=reason,
            elapsed_ms=(time.monotonic() - started) * 1000.0,
        )

    def _set_channel_ok(self, name: str, *, ok: bool, reason: str) -> None:
        if self._channel_ok.get(name, True) is ok:
            self._channel_ok[name] = ok
            return  # log transitions, not repetitions
        self._channel_ok[name] = ok
        if ok:
            _LOGGER.info("notification channel %s: delivering again", name)
        else:
            _LOGGER.warning("notification channel %s: delivery failed: %s", name, reason)

    async def _attempt(self, channel: AnyChannel, n: Notification) -> str:
        """Make one delivery attempt; return a note for the result or raise :class:`_AttemptFailed`."""
        if isinstance(channel, EmailChannel):
            message = _email_message(channel, n, self._zone, self._clock.now())
            return await asyncio.to_thread(_send_email_blocking, channel, message)
        request: _HttpRequest
        if isinstance(channel, WebhookChannel):
            request = _webhook_request(channel, n)
        elif isinstance(channel, WeComChannel):
            request = _wecom_request(channel, n, self._zone)
        elif isinstance(channel, FeishuChannel):
            request = _feishu_request(channel, n, self._zone, self._clock.now())
        else:
            request = _dingtalk_request(channel, n, self._zone, self._clock.now())
        await self._post(request)
        return ""

    async def _post(self, request: _HttpRequest) -> None:
        if self._session is None:
            self._session = self._session_factory()
        try:
            async with self._session.post(
                request.url, data=request.body, headers=dict(request.headers), allow_redirects=False
            ) as response:
                status = response.status
                body = await response.content.read(_MAX_RESPONSE_BYTES)
        except aiohttp.ClientError as err:
            text = str(err)
            if request.secret_url:
                text = text.replace(request.secret_url, request.target)
            raise _AttemptFailed(f"{request.target}: {type(err).__name__}: {text}", retryable=True) from err
        if not 200 <= status < 300:
            retryable = status in _RETRYABLE_HTTP or status >= 500
            snippet = body[:200].decode("utf-8", "replace")
            raise _AttemptFailed(f"{request.target}: HTTP {status}: {snippet}", retryable=retryable)
        failure = _vendor_error(request.vendor, body)
        if failure is not None:
            raise failure

    async def close(self) -> None:
        """Close the HTTP session; later sends raise :class:`RuntimeError`."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
