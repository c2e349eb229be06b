"""Manual commands over REST: write a value to a point, verified by read-back, and audited.

``POST /api/v1/points/{point_id}/commands {"value", "reason", "wait_s"}`` needs the engineer role on
the point's node.
The server checks that the point exists, is writable and that the value is a finite number, then puts
the command on the ``commands`` stream; the gateway that owns the device writes it, waits for the
acknowledgement and reads it back (docs/sessions.md), and its result comes back here. The answer is
that result (``verified``, ``mismatch``, ``rejected``, ``timeout``, ``failed``) or 504 if no gateway
answered in time. Every command and its outcome go to the audit log.

Commands of the carbon-budget controller will pass through its dispatcher and interlocks; an
operator's manual command is checked against the point's configuration only.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from scada.api.auth import audit_actions, principal_of
from scada.api.problem import ApiProblem, json_object
from scada.api.problem import invalid as _invalid
from scada.api.routes import CATALOG
from scada.model import Command, PointId, Priority, ServiceError
from streams.commands import send_and_wait

__all__ = ["COMMANDS", "CommandChannel", "add_command_routes"]

MAX_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class CommandChannel:
    """Where commands go and results come back."""

    redis: aioredis.Redis
    commands_key: str
    results_key: str
    timeout_s: float


COMMANDS = web.AppKey("commands", CommandChannel)


def add_command_routes(app: web.Application) -> None:
    """Register the manual command route."""
    app.router.add_post("/api/v1/points/{point_id}/commands", post_command)


async def post_command(request: web.Request) -> web.Response:
    """Write a value to a point through its gateway and return the verified outcome."""
    body = await json_object(request, {"value", "reason", "wait_s"})
    point_id, value = request.match_info["point_id"], body.get("value")
    reason = body.get("reason", "manual command")
    wait_s = body.get("wait_s", 15.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid("value: required, a finite number")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
        raise _invalid("reason: a short text, at most 500 characters")
    if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or not 0.5 <= wait_s <= MAX_WAIT_S:
        raise _invalid(f"wait_s: seconds to wait for the outcome, 0.5 to {MAX_WAIT_S:g}")
    entry = request.app[CATALOG].point(point_id)  # 404 for an unknown point (the policy checked the node)
    if not entry.config.writable:
        raise ApiProblem(409, "Conflict", f"point {point_id} is not writable", slug="not-writable")
    channel = request.app.get(COMMANDS)
    if channel is None:
        raise ApiProblem(503, "Service unavailable", "no command channel in this process")
    principal = principal_of(request)
    command = Command(
        point=PointId(point_id),
        value=float(value),
        priority=Priority.OPERATOR,
        source=f"api:{principal.tenant}:{principal.subject}",
        reason=reason,
        correlation_id=f"api-{uuid.uuid4()}",
    )
    target = f"point:{point_id}"
    await audit_actions(
        request,
        (
            "command.send",
            target,
            {"value": command.value, "reason": reason, "correlation_id": command.correlation_id},
        ),
    )
    try:
        result = await send_and_wait(
            channel.redis,
            channel.commands_key,
            channel.results_key,
            command,
            wait_s=float(wait_s),
            timeout_s=channel.timeout_s,
        )
    except (RedisError, OSError, TimeoutError) as err:
        raise ServiceError(f"command channel: {err}") from err
    outcome: dict[str, Any]
    if result is None:
        outcome = {"status": "no result", "reason": f"no gateway answered within {wait_s:g} s"}
    else:
        outcome = {
            "status": result.status.value,
            "readback": result.readback,
            "reason": result.reason,
            "elapsed_ms": result.elapsed_ms,
            "ts": result.ts.isoformat(),
        }
    await audit_actions(
        request, ("command.result", target, {"correlation_id": command.correlation_id, **outcome})
    )
    body_out = {
        "correlation_id": command.correlation_id,
        "point": point_id,
        "requested": command.value,
        **outcome,
    }
    if result is None:
        raise ApiProblem(504, "Gateway timeout", outcome["reason"], slug="no-result", **body_out)
    return web.json_response(body_out, status=200)
