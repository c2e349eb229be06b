"""Notification channels over real sockets: a local aiohttp receiver and a local aiosmtpd server.

The receiver stands in for the generic webhook and the WeCom, Feishu and DingTalk robot endpoints:
it records every request and answers from a per-path plan (vendor success by default). Signatures
are recomputed here from the request, independently of the code under test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

from control_engine.notify import (
    DeliveryStatus,
    DingTalkChannel,
    EmailChannel,
    FeishuChannel,
    Notification,
    Notifier,
    Route,
    Severity,
    WebhookChannel,
    WeComChannel,
    load_notify_config,
    render_text,
)
from scada.model import ConfigError

SHANGHAI = ZoneInfo("Asia/Shanghai")
FAST_RETRY: dict[str, Any] = {"retry_initial_s": 0.01, "retry_max_s": 0.05}


def make_notification(
    *, id: str = "quota-park-a-2026-03-90", severity: Severity = Severity.WARNING, node: str = "ws-1"
) -> Notification:
    return Notification(
        id=id,
        node=node,
        node_name="一号车间 Workshop 1",
        severity=severity,
        title="碳配额预警:本月预测达到 90 %",
        text="预测月末排放 1093.5 tCO2e。\nForecast exceeds 90 % of the quota.",
        ts=datetime(2026, 3, 5, 1, 30, tzinfo=UTC),
        fields={"quota_t": 1200, "actual_t": 640.25, "forecast_t": 1093.5, "percent": 91.1, "threshold": 90},
    )


# --------------------------------------------------------------------------------------------------
# Local receivers


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server that records requests and answers from a per-path plan."""

    base: str = ""
    requests: list[Seen] = field(default_factory=list)
    plans: dict[str, deque[tuple[str, Any]]] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def plan(self, path: str, *answers: tuple[str, Any]) -> None:
        """Queue answers for ``path``: ("json", (status, body)), ("hang", None) or ("delay", seconds)."""
        self.plans.setdefault(path, deque()).extend(answers)

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Seen(request.path, dict(request.query), dict(request.headers), body))
        plan = self.plans.get(request.path)
        kind, arg = plan.popleft() if plan else ("default", None)
        if kind == "hang":
            await self.release.wait()
        elif kind == "delay":
            await asyncio.sleep(arg)
        elif kind == "json":
            status, answer = arg
            return web.json_response(answer, status=status)
        elif kind == "text":
            status, answer = arg
            return web.Response(text=answer, status=status)
        if request.path.startswith("/feishu"):
            return web.json_response({"code": 0, "msg": "success", "data": {}})
        if request.path.startswith(("/wecom", "/dingtalk")):
            return web.json_response({"errcode": 0, "errmsg": "ok"})
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", rx.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    rx.base = f"http://{host}:{port}"
    yield rx
    rx.release.set()
    await runner.cleanup()


class Inbox:
    """aiosmtpd handler: keep every message; refuse recipients at refused.example.com."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.endswith("@refused.example.com"):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"


@pytest.fixture
async def smtp_server() -> AsyncIterator[tuple[Inbox, int]]:
    inbox = Inbox()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(inbox, hostname="mx.test"), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield inbox, port
    server.close()
    await server.wait_closed()


def notifier(channels: dict[str, Any], routes: list[Route] | None = None, **kwargs: Any) -> Notifier:
    routes = routes if routes is not None else [Route(nodes=["*"], channels=list(channels))]
    return Notifier(channels, routes, **{**FAST_RETRY, **kwargs})


# --------------------------------------------------------------------------------------------------
# Formats


async def test_webhook_posts_the_notification_as_json(receiver: Receiver) -> None:
    n = make_notification()
    channel = WebhookChannel(url=f"{receiver.base}/hook", headers={"Authorization": "Bearer t0ken"})
    async with notifier({"ops": channel}) as notify:
        [result] = await notify.send(n, ["ent-1", "park-a"])
    assert result.status is DeliveryStatus.DELIVERED, result.reason
    assert (result.channel, result.kind, result.attempts) == ("ops", "webhook", 1)
    [seen] = receiver.seen("/hook")
    assert seen.json == {
        "version": 1,
        "source": "carbonos-scada",
        "id": n.id,
        "node": {"id": "ws-1", "name": "一号车间 Workshop 1"},
        "severity": "warning",
        "title": n.title,
        "text": n.text,
        "ts": "2026-03-05T01:30:00+00:00",
        "fields": {
            "quota_t": 1200,
            "actual_t": 640.25,
            "forecast_t": 1093.5,
            "percent": 91.1,
            "threshold": 90,
        },
    }
    assert seen.headers["Content-Type"] == "application/json; charset=utf-8"
    assert seen.headers["Idempotency-Key"] == n.id
    assert seen.headers["Authorization"] == "Bearer t0ken"
    assert "一号车间".encode() in seen.body  # UTF-8 on the wire, not \u escapes


async def test_wecom_markdown_and_text(receiver: Receiver) -> None:
    n = make_notification(severity=Severity.CRITICAL)
    channels = {
        "wx-md": WeComChannel(webhook_url=f"{receiver.base}/wecom/md?key=k1"),
        "wx-text": WeComChannel(
            webhook_url=f"{receiver.base}/wecom/text?key=k2",
            msgtype="text",
            mentioned_mobiles=["13800001111"],
        ),
    }
    async with notifier(channels) as notify:
        results = await notify.send(n, [])
    assert [r.status for r in results] == [DeliveryStatus.DELIVERED] * 2
    [md] = receiver.seen("/wecom/md")
    assert md.query == {"key": "k1"}
    assert md.json == {
        "msgtype": "markdown",
        "markdown": {
            "content": '### <font color="warning">[CRITICAL]</font> 碳配额预警:本月预测达到 90 %\n'
            '> <font color="comment">一号车间 Workshop 1 (ws-1) · 2026-03-05 09:30 Asia/Shanghai</font>\n'
            "预测月末排放 1093.5 tCO2e。\nForecast exceeds 90 % of the quota.\n"
            "> quota_t: **1200**\n> actual_t: **640.25**\n> forecast_t: **1093.5**\n"
            "> percent: **91.1**\n> threshold: **90**"
        },
    }
    [text] = receiver.seen("/wecom/text")
    assert text.json == {
        "msgtype": "text",
        "text": {"content": render_text(n, SHANGHAI), "mentioned_mobile_list": ["13800001111"]},
    }


async def test_wecom_content_is_cut_to_the_documented_byte_limit(receiver: Receiver) -> None:
    n = Notification(
        id="long",
        node="ws-1",
        node_name="车间",
        severity=Severity.INFO,
        title="长消息",
        text="碳" * 3000,
        ts=datetime(2026, 3, 5, tzinfo=UTC),
    )
    channel = WeComChannel(webhook_url=f"{receiver.base}/wecom?key=k")
    async with notifier({"wx": channel}) as notify:
        [result] = await notify.send(n, [])
    assert result.ok
    content = receiver.seen("/wecom")[0].json["markdown"]["content"]
    assert len(content.encode("utf-8")) <= 4096
    assert content.endswith("…")


async def test_feishu_signed_text_message(receiver: Receiver) -> None:
    n = make_notification()
    channel = FeishuChannel(
        webhook_url=f"{receiver.base}/feishu/open-apis/bot/v2/hook/tok", secret="fs-secret"
    )
    async with notifier({"fs": channel}) as notify:
        [result] = await notify.send(n, [])
    assert result.status is DeliveryStatus.DELIVERED, result.reason
    [seen] = receiver.seen("/feishu/open-apis/bot/v2/hook/tok")
    body = seen.json
    assert set(body) == {"timestamp", "sign", "msg_type", "content"}
    assert body["msg_type"] == "text"
    assert body["content"] == {"text": render_text(n, SHANGHAI)}
    timestamp = int(body["timestamp"])
    assert abs(timestamp - time.time()) < 30  # seconds, not milliseconds
    key = f"{timestamp}\nfs-secret".encode()
    assert body["sign"] == base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


async def test_feishu_without_secret_sends_no_signature(receiver: Receiver) -> None:
    channel = FeishuChannel(webhook_url=f"{receiver.base}/feishu/hook/tok")
    async with notifier({"fs": channel}) as notify:
        [result] = await notify.send(make_notification(), [])
    assert result.ok
    assert set(receiver.seen("/feishu/hook/tok")[0].json) == {"msg_type", "content"}


async def test_dingtalk_signed_markdown(receiver: Receiver) -> None:
    n = make_notification()
    channel = DingTalkChannel(
        webhook_url=f"{receiver.base}/dingtalk/robot/send?access_token=tok123",
        secret="SECabc+/=",
        at_mobiles=["13900002222"],
    )
    async with notifier({"dd": channel}) as notify:
        [result] = await notify.send(n, [])
    assert result.status is DeliveryStatus.DELIVERED, result.reason
    [seen] = receiver.seen("/dingtalk/robot/send")
    assert set(seen.query) == {"access_token", "timestamp", "sign"}
    assert seen.query["access_token"] == "tok123"
    timestamp_ms = int(seen.query["timestamp"])
    assert abs(timestamp_ms / 1000 - time.time()) < 30  # milliseconds
    expected = hmac.new(b"SECabc+/=", f"{timestamp_ms}\nSECabc+/=".encode(), hashlib.sha256).digest()
    assert seen.query["sign"] == base64.b64encode(expected).decode()  # decoded by the server: was URL-encoded
    assert seen.json == {
        "msgtype": "markdown",
        "markdown": {
            "title": n.title,
            "text": "#### [WARNING] 碳配额预警:本月预测达到 90 %\n\n"
            "> 一号车间 Workshop 1 (ws-1) · 2026-03-05 09:30 Asia/Shanghai\n\n"
            "预测月末排放 1093.5 tCO2e。\n\nForecast exceeds 90 % of the quota.\n\n"
            "- quota_t: **1200**\n\n- actual_t: **640.25**\n\n- forecast_t: **1093.5**\n\n"
            "- percent: **91.1**\n\n- threshold: **90**\n\n@13900002222",
        },
        "at": {"atMobiles": ["13900002222"], "isAtAll": False},
    }


async def test_dingtalk_without_secret_keeps_the_url(receiver: Receiver) -> None:
    channel = DingTalkChannel(webhook_url=f"{receiver.base}/dingtalk?access_token=tok")
    async with notifier({"dd": channel}) as notify:
        [result] = await notify.send(make_notification(), [])
    assert result.ok
    assert receiver.seen("/dingtalk")[0].query == {"access_token": "tok"}


async def test_email_reaches_the_smtp_server(smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    n = make_notification()
    channel = EmailChannel(
        host="127.0.0.1",
        port=port,
        starttls=False,
        sender="scada@plant.example.com",
        recipients=["energy@plant.example.com", "ops@plant.example.com"],
        timeout_s=5,
    )
    async with notifier({"mail": channel}) as notify:
        [result] = await notify.send(n, ["park-a"])
    assert result.status is DeliveryStatus.DELIVERED, result.reason
    [envelope] = inbox.envelopes
    assert envelope.mail_from == "scada@plant.example.com"
    assert envelope.rcpt_tos == channel.recipients
    assert isinstance(envelope.content, bytes)
    message = message_from_bytes(envelope.content, policy=policy.default)
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == "[CarbonOS] [WARNING] 碳配额预警:本月预测达到 90 % · 一号车间 Workshop 1"
    assert message["From"] == "scada@plant.example.com"
    assert message["Date"] is not None
    assert message["Message-ID"].endswith("@plant.example.com>")
    assert message["X-CarbonOS-Severity"] == "warning"
    body = message.get_body()
    assert body is not None
    assert body.get_content_charset() == "utf-8"
    assert body.get_content().replace("\r\n", "\n") == render_text(n, SHANGHAI) + "\n"  # SMTP lines end CRLF


async def test_email_retry_keeps_the_message_id_and_refusal_is_final(smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    base = {"host": "127.0.0.1", "port": port, "starttls": False, "sender": "scada@plant.example.com"}
    good = EmailChannel(**base, recipients=["a@plant.example.com"])
    refused = EmailChannel(**base, recipients=["nobody@refused.example.com"])
    async with notifier({"good": good, "refused": refused}, max_attempts=3) as notify:
        ok, bad = await notify.send(make_notification(id="n-1"), [])
        await notify.send(make_notification(id="n-2"), [])
    assert ok.status is DeliveryStatus.DELIVERED
    assert (bad.status, bad.attempts) == (DeliveryStatus.FAILED, 1)  # 5xx: not retried
    assert "550" in bad.reason
    ids = [message_from_bytes(e.content, policy=policy.default)["Message-ID"] for e in inbox.envelopes]  # type: ignore[arg-type]
    assert len(ids) == 2
    assert len(set(ids)) == 2  # one per notification id


async def test_email_never_falls_back_to_clear_text(smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    channel = EmailChannel(
        host="127.0.0.1",
        port=port,
        starttls=True,  # the test server offers no STARTTLS
        username="scada",
        password="pw",
        sender="scada@plant.example.com",
        recipients=["a@plant.example.com"],
    )
    async with notifier({"mail": channel}, max_attempts=3) as notify:
        [result] = await notify.send(make_notification(), [])
    assert (result.status, result.attempts) == (DeliveryStatus.FAILED, 1)
    assert "STARTTLS" in result.reason
    assert "pw" not in result.reason
    assert inbox.envelopes == []


# --------------------------------------------------------------------------------------------------
# Failures, retries, timeouts


@pytest.mark.parametrize(
    ("path", "make_channel", "answer", "expected"),
    [
        (
            "/wecom",
            lambda url: WeComChannel(webhook_url=url),
            {"errcode": 93000, "errmsg": "invalid webhook url"},
            "wecom error 93000: invalid webhook url",
        ),
        (
            "/feishu",
            lambda url: FeishuChannel(webhook_url=url, secret="s"),
            {"code": 19021, "msg": "sign match fail or timestamp is not within one hour from current time"},
            "feishu error 19021: sign match fail",
        ),
        (
            "/dingtalk",
            lambda url: DingTalkChannel(webhook_url=url),
            {"errcode": 310000, "errmsg": "keywords not in content"},
            "dingtalk error 310000: keywords not in content",
        ),
    ],
)
async def test_vendor_error_body_is_a_failed_delivery(
    receiver: Receiver, path: str, make_channel: Any, answer: dict[str, Any], expected: str
) -> None:
    receiver.plan(path, ("json", (200, answer)))
    async with notifier({"bot": make_channel(f"{receiver.base}{path}")}, max_attempts=3) as notify:
        [result] = await notify.send(make_notification(), [])
    assert (result.status, result.attempts) == (DeliveryStatus.FAILED, 1)  # permanent: not retried
    assert expected in result.reason
    assert len(receiver.seen(path)) == 1


async def test_vendor_rate_limit_is_retried(receiver: Receiver) -> None:
    receiver.plan("/wecom", ("json", (200, {"errcode": 45009, "errmsg": "api freq out of limit"})))
    async with notifier({"wx": WeComChannel(webhook_url=f"{receiver.base}/wecom")}) as notify:
        [result] = await notify.send(make_notification(), [])
    assert (result.status, result.attempts) == (DeliveryStatus.DELIVERED, 2)


async def test_server_error_is_retried_then_succeeds(receiver: Receiver) -> None:
    receiver.plan("/hook", ("text", (503, "busy")), ("text", (502, "bad gateway")))
    async with notifier({"ops": WebhookChannel(url=f"{receiver.base}/hook")}, max_attempts=3) as notify:
        [result] = await notify.send(make_notification(), [])
    assert (result.status, result.attempts) == (DeliveryStatus.DELIVERED, 3)
    assert len(receiver.seen("/hook")) == 3


async def test_retries_stop_at_max_attempts(receiver: Receiver) -> None:
    receiver.plan("/hook", *[("text", (500, "down"))] * 5)
    async with notifier({"ops": WebhookChannel(url=f"{receiver.base}/hook")}, max_attempts=2) as notify:
        [result] = await notify.send(make_notification(), [])
    assert (result.status, result.attempts) == (DeliveryStatus.FAILED, 2)
    assert "HTTP 500: down" in result.reason
    assert len(receiver.seen("/hook")) == 2


async def test_client_error_is_not_retried(receiver: Receiver) -> None:
    receiver.plan("/hook", ("text", (401, "unauthorized")))
    async with notifier({"ops": WebhookChannel(url=f"{receiver.base}/hook")}, max_attempts=3) as notify:
        [result] = await notify.send(make_notification(), [])
    assert (result.status, result.attempts) == (DeliveryStatus.FAILED, 1)
    assert "HTTP 401" in result.reason


async def test_channel_failures_are_logged_on_transitions_only(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="control_engine.notify")
    receiver.plan("/hook", ("text", (400, "no")), ("text", (400, "no")))
    async with notifier({"ops": WebhookChannel(url=f"{receiver.base}/hook")}) as notify:
        for notification_id in ("n-1", "n-2", "n-3", "n-4"):
            await notify.send(make_notification(id=notification_id), [])
    messages = [r.getMessage() for r in caplog.records if r.name == "control_engine.notify"]
    assert messages == [
        f"notification channel ops: delivery failed: {receiver.base}: HTTP 400: no",
        "notification channel ops: delivering again",
    ]


async def test_hanging_receiver_times_out(receiver: Receiver) -> None:
    receiver.plan("/hook", ("hang", None), ("hang", None))
    channel = WebhookChannel(url=f"{receiver.base}/hook", timeout_s=0.2)
    async with notifier({"ops": channel}, max_attempts=2) as notify:
        started = time.monotonic()
        [result] = await notify.send(make_notification(), [])
        elapsed_s = time.monotonic() - started
    assert (result.status, result.attempts) == (DeliveryStatus.TIMEOUT, 2)
    assert "no answer within 0.2 s" in result.reason
    assert 0.4 <= elapsed_s < 2.0


async def test_unreachable_robot_fails_without_leaking_its_token(unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}/cgi-bin/webhook/send?key=top-secret-key"
    async with notifier({"wx": WeComChannel(webhook_url=url)}, max_attempts=2) as notify:
        [result] = await notify.send(make_notification(), [])
    assert (result.status, result.attempts) == (DeliveryStatus.FAILED, 2)  # connection refused is transient
    assert f"http://127.0.0.1:{unused_tcp_port}" in result.reason
    assert "top-secret-key" not in result.reason
    assert "webhook/send" not in result.reason


async def test_channels_are_delivered_concurrently(receiver: Receiver) -> None:
    receiver.plan("/a", ("delay", 0.5))
    receiver.plan("/b", ("delay", 0.5))
    receiver.plan("/c", ("hang", None))
    channels = {
        "a": WebhookChannel(url=f"{receiver.base}/a"),
        "b": WebhookChannel(url=f"{receiver.base}/b"),
        "c": WebhookChannel(url=f"{receiver.base}/c", timeout_s=0.5),
    }
    async with notifier(channels, max_attempts=1) as notify:
        started = time.monotonic()
        results = await notify.send(make_notification(), [])
        elapsed_s = time.monotonic() - started
    assert [r.status for r in results] == [
        DeliveryStatus.DELIVERED,
        DeliveryStatus.DELIVERED,
        DeliveryStatus.TIMEOUT,
    ]
    assert elapsed_s < 1.2  # serial delivery would take at least 1.5 s


# --------------------------------------------------------------------------------------------------
# Routing and idempotency


def test_routing_by_node_ancestry_and_severity() -> None:
    hook = WebhookChannel(url="http://127.0.0.1:9/x")
    channels = {"park": hook, "all-critical": hook, "other-park": hook, "ws": hook}
    routes = [
        Route(nodes=["park-a"], channels=["park"]),
        Route(nodes=["*"], min_severity=Severity.CRITICAL, channels=["all-critical", "park"]),
        Route(nodes=["park-b"], channels=["other-park"]),
        Route(nodes=["ws-1"], min_severity=Severity.WARNING, channels=["ws"]),
    ]
    notify = Notifier(channels, routes)
    chain = ["ent-1", "park-a", "group"]
    assert notify.channels_for(make_notification(severity=Severity.INFO), chain) == ["park"]
    assert notify.channels_for(make_notification(severity=Severity.WARNING), chain) == ["park", "ws"]
    # "park" is named by two routes but listed once.
    assert notify.channels_for(make_notification(severity=Severity.CRITICAL), chain) == [
        "park",
        "all-critical",
        "ws",
    ]
    assert notify.channels_for(
        make_notification(node="ws-9", severity=Severity.INFO), ["ent-9", "park-b"]
    ) == ["other-park"]
    assert notify.channels_for(make_notification(node="ws-9", severity=Severity.INFO), ["park-c"]) == []


async def test_channel_named_by_two_routes_receives_once(receiver: Receiver) -> None:
    hook = WebhookChannel(url=f"{receiver.base}/hook")
    routes = [Route(nodes=["park-a"], channels=["ops"]), Route(nodes=["ws-1"], channels=["ops"])]
    async with notifier({"ops": hook}, routes) as notify:
        results = await notify.send(make_notification(), ["ent-1", "park-a"])
        unrouted = await notify.send(make_notification(id="elsewhere", node="ws-7"), ["park-z"])
    assert [r.status for r in results] == [DeliveryStatus.DELIVERED]
    assert unrouted == []
    assert len(receiver.seen("/hook")) == 1


async def test_second_send_of_an_id_is_a_no_op(receiver: Receiver) -> None:
    async with notifier({"ops": WebhookChannel(url=f"{receiver.base}/hook")}) as notify:
        [first] = await notify.send(make_notification(), [])
        [second] = await notify.send(make_notification(), [])
    assert first.status is DeliveryStatus.DELIVERED
    assert (second.status, second.attempts, second.ok) == (DeliveryStatus.DUPLICATE, 0, True)
    assert len(receiver.seen("/hook")) == 1


async def test_resend_retries_only_the_channels_that_failed(receiver: Receiver) -> None:
    receiver.plan("/b", ("text", (400, "bad")))
    channels = {"a": WebhookChannel(url=f"{receiver.base}/a"), "b": WebhookChannel(url=f"{receiver.base}/b")}
    async with notifier(channels) as notify:
        first = await notify.send(make_notification(), [])
        second = await notify.send(make_notification(), [])
    assert [r.status for r in first] == [DeliveryStatus.DELIVERED, DeliveryStatus.FAILED]
    assert [r.status for r in second] == [DeliveryStatus.DUPLICATE, DeliveryStatus.DELIVERED]
    assert (len(receiver.seen("/a")), len(receiver.seen("/b"))) == (1, 2)


async def test_idempotency_memory_is_bounded(receiver: Receiver) -> None:
    async with notifier({"ops": WebhookChannel(url=f"{receiver.base}/hook")}, dedupe_size=2) as notify:
        for notification_id in ("n-1", "n-2", "n-3"):
            await notify.send(make_notification(id=notification_id), [])
        [recent] = await notify.send(make_notification(id="n-3"), [])
        [forgotten] = await notify.send(make_notification(id="n-1"), [])
    assert recent.status is DeliveryStatus.DUPLICATE
    assert forgotten.status is DeliveryStatus.DELIVERED  # evicted: the oldest id is forgotten first
    assert len(receiver.seen("/hook")) == 4


async def test_concurrent_sends_of_one_id_deliver_once(receiver: Receiver) -> None:
    receiver.plan("/hook", ("delay", 0.2))
    async with notifier({"ops": WebhookChannel(url=f"{receiver.base}/hook")}) as notify:
        first, second = await asyncio.gather(
            notify.send(make_notification(), []), notify.send(make_notification(), [])
        )
    assert sorted(r.status for [r] in (first, second)) == [DeliveryStatus.DELIVERED, DeliveryStatus.DUPLICATE]
    assert len(receiver.seen("/hook")) == 1


async def test_cancelled_send_releases_its_claim(receiver: Receiver) -> None:
    receiver.plan("/hook", ("hang", None))
    async with notifier({"ops": WebhookChannel(url=f"{receiver.base}/hook")}) as notify:
        task = asyncio.create_task(notify.send(make_notification(), []))
        while not receiver.seen("/hook"):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [result] = await notify.send(make_notification(), [])
    assert result.status is DeliveryStatus.DELIVERED  # not a duplicate of the cancelled attempt


# --------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"channels": {"ops": {"kind": "webhook", "url": "http://x.test", "verify": False}}}, "verify"),
        ({"channels": {"ops": {"kind": "pager"}}}, "channels.ops"),
        (
            {
                "channels": {
                    "m": {
                        "kind": "email",
                        "host": "h",
                        "use_tls": True,
                        "sender": "a@b.cn",
                        "recipients": ["c@d.cn"],
                    }
                }
            },
            "use_tls and starttls are exclusive",
        ),
        (
            {
                "channels": {
                    "m": {
                        "kind": "email",
                        "host": "h",
                        "starttls": False,
                        "username": "u",
                        "password": "p",
                        "sender": "a@b.cn",
                        "recipients": ["c@d.cn"],
                    }
                }
            },
            "credentials need use_tls or starttls",
        ),
        (
            {
                "channels": {
                    "m": {"kind": "email", "host": "h", "sender": "not-an-address", "recipients": ["c@d.cn"]}
                }
            },
            "channels.m.email.sender",
        ),
        (
            {"channels": {"m": {"kind": "email", "host": "h", "sender": "a@b.cn", "recipients": []}}},
            "recipients",
        ),
        (
            {
                "channels": {
                    "wx": {"kind": "wecom", "webhook_url": "https://x.test", "mentioned_mobiles": ["1"]}
                }
            },
            "mentions work only with msgtype 'text'",
        ),
        (
            {
                "channels": {"ops": {"kind": "webhook", "url": "http://x.test"}},
                "routes": [{"nodes": ["*"], "channels": ["pager"]}],
            },
            "routes[0].channels: unknown channel pager",
        ),
        ({"routes": [{"nodes": [], "channels": ["x"]}]}, "routes.0.nodes"),
        ({"timezone": "Mars/Olympus"}, "unknown zone"),
        ({"channels": {"Bad Name": {"kind": "webhook", "url": "http://x.test"}}}, "Bad Name"),
    ],
)
def test_config_errors_name_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^notifications: ") as info:
        load_notify_config(raw)
    assert message in str(info.value)


def test_config_builds_a_notifier_and_hides_secrets() -> None:
    config = load_notify_config(
        {
            "channels": {
                "fs": {
                    "kind": "feishu",
                    "webhook_url": "https://open.feishu.cn/open-apis/bot/v2/hook/tok",
                    "secret": "s3",
                },
                "ops": {
                    "kind": "webhook",
                    "url": "https://ops.test/hook",
                    "headers": {"Authorization": "Bearer b"},
                },
            },
            "routes": [{"nodes": ["park-a"], "min_severity": "critical", "channels": ["fs", "ops"]}],
            "max_attempts": 5,
        }
    )
    assert config.routes[0].min_severity is Severity.CRITICAL
    assert "tok" not in repr(config)
    assert "s3" not in repr(config)
    assert "Bearer" not in repr(config)
    Notifier.from_config(config)  # no I/O until the first send


def test_notifier_refuses_routes_to_unknown_channels() -> None:
    with pytest.raises(ConfigError, match="unknown channel nope"):
        Notifier({}, [Route(nodes=["*"], channels=["nope"])])


@pytest.mark.parametrize(
    "changes",
    [
        {"ts": datetime(2026, 3, 5)},  # noqa: DTZ001 -- the naive time under test
        {"id": " "},
        {"fields": {"percent": float("nan")}},
        {"fields": {"flag": True}},
        {"fields": {f"f{i}": i for i in range(40)}},
    ],
)
def test_bad_notifications_are_refused(changes: dict[str, Any]) -> None:
    base = make_notification()
    values = {
        name: getattr(base, name) for name in ("id", "node", "node_name", "severity", "title", "text", "ts")
    }
    values["fields"] = dict(base.fields)
    with pytest.raises((ValueError, TypeError)):
        Notification(**{**values, **changes})


def test_notification_fields_are_a_read_only_copy() -> None:
    fields: dict[str, int | float | str] = {"percent": 91.1}
    n = Notification(
        id="x",
        node="n",
        node_name="N",
        severity=Severity.INFO,
        title="t",
        text="",
        ts=datetime.now(UTC),
        fields=fields,
    )
    fields["percent"] = 0.0
    assert n.fields["percent"] == 91.1
    with pytest.raises(TypeError):
        n.fields["percent"] = 1.0  # type: ignore[index]
