"""The command channel: ``commands`` in, ``command_results`` out, each command executed at most once.

Whoever decides (the dispatcher, an operator's manual command) appends a command to the ``commands``
stream with :func:`send_command`; the gateway that supervises the point's device runs it through
the device session (write, acknowledgement, read-back) and appends the outcome to
``command_results``, where :func:`wait_result` finds it by correlation id.

Delivery
--------
Every gateway shard reads the whole ``commands`` stream through a consumer group of its own
(``gateway-<index>of<count>``) and executes only the commands of its devices. Before executing, it
claims the correlation id with ``SET NX`` (kept for a day): a command re-delivered after a crash, or
sent twice by a retrying client, is never written twice. An entry re-delivered after the gateway
died between claim and result gets a TIMEOUT result ("interrupted: outcome unknown"): the write may
have reached the device, and saying so is the honest answer.

A command that carries a control leader's fencing token (``fence``, see :mod:`scada.leader`) is
refused (REJECTED, "fenced") when the fencing counter in Redis has moved past it: a newer leader was
elected, so the sender is a deposed one (frozen, partitioned) and its write must not reach a device.
Commands without a fence (an operator's manual write) are not subject to it.

A command older than ``max_age_s`` when a gateway first sees it (a gateway that was down for an
hour) is not executed: it FAILS as expired. Writing an hour-old setpoint to a PLC is worse than not
writing it.

Wire format (version 1)
-----------------------
::

    commands:        v = b"1", c = {"point", "value", "priority", "source", "reason",
                                     "correlation_id", "hold_until_us", "fence"?}
    command_results: v = b"1", r = {"correlation_id", "point", "requested", "status", "ts_us",
                                     "readback", "reason", "elapsed_ms", "executor"}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from scada.model import (
    Clock,
    Command,
    CommandResult,
    CommandStatus,
    DecodeError,
    PointId,
    Priority,
    split_point_id,
)
from scada.runtime import Backoff, SystemClock, raise_if_cancelling
from streams.bus import as_text, deadletter_fields, entries_of, xfields

__all__ = [
    "decode_command",
    "decode_result",
    "encode_command",
    "encode_result",
    "results_cursor",
    "run_command_executor",
    "send_and_wait",
    "send_command",
    "wait_result",
]

_LOGGER = logging.getLogger(__name__)

_VERSION: Final = b"1"
_REDIS_ERRORS: Final = (RedisError, OSError, TimeoutError)
_CLAIM_TTL_S: Final = 86_400
_EXECUTING: Final = b"executing"
_DONE: Final = b"done"
DEFAULT_MAX_AGE_S: Final = 60.0
DEFAULT_MAX_IN_FLIGHT: Final = 64
_STATUSES: Final = frozenset(status.value for status in CommandStatus)


# --------------------------------------------------------------------------------------------------
# Codec


def _us(ts: datetime) -> int:
    return int((ts - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))


def _from_us(where: str, value: Any) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(f"{where}: expected integer microseconds, got {value!r:.60}")
    try:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value)
    except OverflowError:
        raise DecodeError(f"{where}: {value!r:.60} is out of range") from None


def encode_command(command: Command) -> dict[bytes, bytes]:
    """Return the stream fields of a command."""
    body = {
        "point": command.point,
        "value": command.value,
        "priority": int(command.priority),
        "source": command.source,
        "reason": command.reason,
        "correlation_id": command.correlation_id,
        "hold_until_us": _us(command.hold_until) if command.hold_until is not None else None,
    }
    if command.fence is not None:
        body["fence"] = command.fence
    return {b"v": _VERSION, b"c": json.dumps(body, allow_nan=False).encode()}


def _body(fields: Mapping[Any, Any], name: bytes) -> dict[str, Any]:
    raw = {k.encode() if isinstance(k, str) else k: v for k, v in fields.items()}
    version = raw.get(b"v")
    if version not in (_VERSION, _VERSION.decode()):
        raise DecodeError(f"unsupported version {version!r} (expected 1)")
    data = raw.get(name)
    if data is None:
        raise DecodeError(f"missing field {name.decode()!r}")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueError
        raise DecodeError(f"field {name.decode()!r} is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise DecodeError(f"field {name.decode()!r} must be a JSON object")
    return body


def _text(body: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = body.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise DecodeError(f"{key}: expected a non-empty string, got {value!r:.60}")
    return value


def _number(body: Mapping[str, Any], key: str) -> float:
    value = body.get(key)
    try:
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond the double range
        number = math.nan
    if not math.isfinite(number):
        raise DecodeError(f"{key}: expected a finite number, got {value!r:.60}")
    return number


def decode_command(fields: Mapping[Any, Any]) -> Command:
    """Decode a ``commands`` entry; raise :class:`DecodeError` saying what is wrong."""
    body = _body(fields, b"c")
    point = _text(body, "point")
    try:
        split_point_id(point)
    except Exception:  # noqa: BLE001 (NotFound: a malformed id is a decode error here)
        raise DecodeError(f"point: malformed point id {point!r:.60}") from None
    try:
        priority = Priority(int(body["priority"]))
    except (KeyError, TypeError, ValueError, OverflowError):
        raise DecodeError(f"priority: unknown priority {body.get('priority')!r:.60}") from None
    hold = body.get("hold_until_us")
    fence = body.get("fence")
    if fence is not None and (isinstance(fence, bool) or not isinstance(fence, int) or fence < 1):
        raise DecodeError(f"fence: expected a positive integer, got {fence!r}")
    return Command(
        point=PointId(point),
        value=_number(body, "value"),
        priority=priority,
        source=_text(body, "source"),
        reason=_text(body, "reason", required=False),
        correlation_id=_text(body, "correlation_id"),
        hold_until=None if hold is None else _from_us("hold_until_us", hold),
        fence=fence,
    )


def encode_result(result: CommandResult, *, executor: str) -> dict[bytes, bytes]:
    """Return the stream fields of a command result; ``executor`` names the gateway that ran it."""
    body = {
        "correlation_id": result.correlation_id,
        "point": result.point,
        "requested": result.requested,
        "status": result.status.value,
        "ts_us": _us(result.ts),
        "readback": result.readback,
        "reason": result.reason,
        "elapsed_ms": round(result.elapsed_ms, 3),
        "executor": executor,
    }
    return {b"v": _VERSION, b"r": json.dumps(body, allow_nan=False).encode()}


def decode_result(fields: Mapping[Any, Any]) -> CommandResult:
    """Decode a ``command_results`` entry; raise :class:`DecodeError` saying what is wrong."""
    body = _body(fields, b"r")
    status_text = body.get("status")
    if not isinstance(status_text, str) or status_text not in _STATUSES:
        raise DecodeError(f"status: unknown status {status_text!r:.60}")
    status = CommandStatus(status_text)
    readback = body.get("readback")
    return CommandResult(
        correlation_id=_text(body, "correlation_id"),
        point=PointId(_text(body, "point")),
        requested=_number(body, "requested"),
        status=status,
        ts=_from_us("ts_us", body.get("ts_us")),
        readback=None if readback is None else _number(body, "readback"),
        reason=_text(body, "reason", required=False),
        elapsed_ms=_number(body, "elapsed_ms"),
    )


# --------------------------------------------------------------------------------------------------
# Clients


async def send_command(
    redis: Redis, commands_key: str, command: Command, *, maxlen: int = 100_000, timeout_s: float = 5.0
) -> str:
    """Append a command to the ``commands`` stream; return its entry id (for :func:`wait_result`)."""
    async with asyncio.timeout(timeout_s):
        entry_id = await redis.xadd(
            commands_key, xfields(encode_command(command)), maxlen=maxlen, approximate=True
        )
    return as_text(entry_id)


async def wait_result(
    redis: Redis, results_key: str, correlation_id: str, *, after_id: str = "0-0", timeout_s: float = 10.0
) -> CommandResult | None:
    """Return the result of ``correlation_id`` once a gateway publishes it, or None after ``timeout_s``.

    Reads ``command_results`` after ``after_id``, a position in that stream taken before the command
    was sent (:func:`results_cursor`). Not the command's own id: ids are per stream, and a result
    written in the same millisecond as its command (a refusal comes back that fast) can carry that
    very id, which a read strictly after it would miss.
    """
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + timeout_s
    last_id = after_id
    while (remaining_s := deadline_s - loop.time()) > 0:
        block_ms = max(1, int(min(remaining_s, 1.0) * 1000))
        async with asyncio.timeout(remaining_s + 5.0):
            response: Any = await redis.xread({results_key: last_id}, count=100, block=block_ms)
        for entry_id, fields in entries_of(response):
            last_id = as_text(entry_id)
            try:
                result = decode_result(fields)
            except DecodeError:
                continue  # someone else's garbage: not ours to judge here
            if result.correlation_id == correlation_id:
                return result
    return None


async def results_cursor(redis: Redis, results_key: str, *, timeout_s: float = 5.0) -> str:
    """Return the id of the newest entry of ``command_results`` (``0-0`` if none).

    Taken before a command is sent, it is where :func:`wait_result` starts to see its result.
    """
    async with asyncio.timeout(timeout_s):
        newest: Any = await redis.xrevrange(results_key, count=1)
    return as_text(newest[0][0]) if newest else "0-0"


async def send_and_wait(
    redis: Redis,
    commands_key: str,
    results_key: str,
    command: Command,
    *,
    wait_s: float,
    timeout_s: float = 5.0,
) -> CommandResult | None:
    """Send a command and return its result, or None if no gateway answered within ``wait_s``."""
    cursor = await results_cursor(redis, results_key, timeout_s=timeout_s)
    await send_command(redis, commands_key, command, timeout_s=timeout_s)
    return await wait_result(redis, results_key, command.correlation_id, after_id=cursor, timeout_s=wait_s)


# --------------------------------------------------------------------------------------------------
# Executor (gateway side)


async def run_command_executor(
    redis: Redis,
    *,
    commands_key: str,
    results_key: str,
    deadletter_key: str,
    claims_prefix: str,
    group: str,
    consumer: str,
    owns: Callable[[PointId], bool],
    execute: Callable[[Command], Awaitable[CommandResult]],
    max_age_s: float = DEFAULT_MAX_AGE_S,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    results_maxlen: int = 100_000,
    timeout_s: float = 5.0,
    clock: Clock | None = None,
    backoff: Backoff | None = None,
    fence_key: str | None = None,
) -> None:
    """Execute this gateway's commands from the ``commands`` stream until cancelled.

    Commands run concurrently (up to ``max_in_flight``; one slow device does not hold up the others)
    and each entry is acknowledged only after its result is in ``command_results``. ``fence_key`` is
    the control leader's fencing counter (:func:`scada.leader.fence_key`): fenced commands older
    than it are refused.
    """
    executor = _Executor(
        redis=redis,
        commands_key=commands_key,
        results_key=results_key,
        deadletter_key=deadletter_key,
        claims_prefix=claims_prefix,
        group=group,
        consumer=consumer,
        owns=owns,
        execute=execute,
        max_age_s=max_age_s,
        slots=asyncio.Semaphore(max_in_flight),
        results_maxlen=results_maxlen,
        timeout_s=timeout_s,
        clock=clock or SystemClock(),
        backoff=backoff or Backoff(max_s=5.0),
        fence_key=fence_key,
    )
    await executor.run()


@dataclass(kw_only=True)
class _Executor:
    """State of one :func:`run_command_executor` call (private, like the bus's consumer loop)."""

    redis: Redis
    commands_key: str
    results_key: str
    deadletter_key: str
    claims_prefix: str
    group: str
    consumer: str
    owns: Callable[[PointId], bool]
    execute: Callable[[Command], Awaitable[CommandResult]]
    max_age_s: float
    slots: asyncio.Semaphore
    results_maxlen: int
    timeout_s: float
    clock: Clock
    backoff: Backoff
    fence_key: str | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    in_progress: set[str] = field(default_factory=set)
    redis_ok: bool | None = None
    left_pending: bool = False
    """An entry's result could not be published: the loop re-reads its pending list (id "0")."""

    async def run(self) -> None:
        try:
            pending = True  # first our own unacknowledged entries (a previous run's), then new ones
            while True:
                raise_if_cancelling()
                try:
                    if pending:
                        await self._ensure_group()
                    entries = await self._read("0" if pending else ">")
                    self._redis_ok(True, None)
                    self.backoff.reset()
                except _REDIS_ERRORS as err:
                    self._redis_ok(False, err)
                    await self.clock.sleep(self.backoff.next_delay())
                    continue
                if self.left_pending:  # a result could not be published: read our pending list again
                    self.left_pending, pending = False, True
                    continue
                if pending and not entries:
                    pending = False
                    continue
                for entry_id, fields in entries:
                    key = as_text(entry_id)
                    if key in self.in_progress:
                        continue  # still running from a previous read of the pending list
                    await self.slots.acquire()
                    self.in_progress.add(key)
                    task = asyncio.create_task(self._handle(key, fields, redelivered=pending))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                if pending:
                    await self.clock.sleep(0.05 if self.in_progress else 0)
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _ensure_group(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            async with asyncio.timeout(self.timeout_s):
                await self.redis.xgroup_create(self.commands_key, self.group, id="$", mkstream=True)

    async def _read(self, start: str) -> list[tuple[Any, Any]]:
        block_ms = 1_000
        async with asyncio.timeout(self.timeout_s + block_ms / 1000):
            response: Any = await self.redis.xreadgroup(
                self.group, self.consumer, {self.commands_key: start}, count=32, block=block_ms
            )
        out: list[tuple[Any, Any]] = []
        for entry_id, fields in entries_of(response):
            if fields:
                out.append((entry_id, fields))
            else:  # a pending entry trimmed from the stream: nothing left to execute
                _LOGGER.warning("command %s was trimmed before it was handled; dropping it", entry_id)
                await self._ack(entry_id)
        return out

    async def _handle(self, entry_id: str, fields: Any, *, redelivered: bool) -> None:
        try:
            await self._handle_once(entry_id, fields, redelivered=redelivered)
        except _REDIS_ERRORS as err:
            # Not acknowledged: the entry stays pending and is handled again after a restart; the
            # claim makes sure the device is not written twice.
            _LOGGER.warning("command %s: Redis failed (%s); left pending", entry_id, err)
            self.left_pending = True
        except Exception:
            _LOGGER.exception("command %s: unexpected error; left pending", entry_id)
        finally:
            self.in_progress.discard(entry_id)
            self.slots.release()

    async def _handle_once(self, entry_id: str, fields: Any, *, redelivered: bool) -> None:
        try:
            command = decode_command(fields)
        except DecodeError as err:
            await self._deadletter(entry_id, fields, str(err))
            return
        if not self.owns(command.point):
            await self._ack(entry_id)
            return
        claim_key = f"{self.claims_prefix}{command.correlation_id}"
        async with asyncio.timeout(self.timeout_s):
            claimed = await self.redis.set(claim_key, _EXECUTING, nx=True, ex=_CLAIM_TTL_S)
        if not claimed:
            async with asyncio.timeout(self.timeout_s):
                state = await self.redis.get(claim_key)
            if redelivered and state == _EXECUTING:
                result = CommandResult.of(
                    command,
                    CommandStatus.TIMEOUT,
                    ts=self.clock.now(),
                    reason="interrupted: the gateway stopped while executing it; outcome unknown",
                )
                await self._publish(entry_id, result, claim_key)
            else:
                _LOGGER.warning(
                    "command %s (%s): correlation id already executed; not writing it again",
                    entry_id,
                    command.correlation_id,
                )
                await self._ack(entry_id)
            return
        age_s = (self.clock.now() - _entry_time(entry_id)).total_seconds()
        newest_fence = await self._newest_fence() if command.fence is not None else None
        if newest_fence is not None and command.fence is not None and command.fence < newest_fence:
            result = CommandResult.of(
                command,
                CommandStatus.REJECTED,
                ts=self.clock.now(),
                reason=(
                    f"fenced: sent by a control leader with fence {command.fence}, "
                    f"but leader fence {newest_fence} is newer"
                ),
            )
        elif age_s > self.max_age_s:
            result = CommandResult.of(
                command,
                CommandStatus.FAILED,
                ts=self.clock.now(),
                reason=f"expired: issued {age_s:.0f} s ago (limit {self.max_age_s:g} s)",
            )
        else:
            result = await self.execute(command)
        await self._publish(entry_id, result, claim_key)

    async def _newest_fence(self) -> int | None:
        if self.fence_key is None:
            return None
        async with asyncio.timeout(self.timeout_s):
            raw = await self.redis.get(self.fence_key)
        return int(raw) if raw is not None else None

    async def _publish(self, entry_id: str, result: CommandResult, claim_key: str) -> None:
        """Append the result, mark the claim done and acknowledge the entry, all in one MULTI."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.results_key,
                xfields(encode_result(result, executor=self.consumer)),
                maxlen=self.results_maxlen,
                approximate=True,
            )
            pipe.set(claim_key, _DONE, ex=_CLAIM_TTL_S)
            pipe.xack(self.commands_key, self.group, entry_id)
            async with asyncio.timeout(self.timeout_s):
                await pipe.execute()

    async def _ack(self, entry_id: Any) -> None:
        async with asyncio.timeout(self.timeout_s):
            await self.redis.xack(self.commands_key, self.group, entry_id)

    async def _deadletter(self, entry_id: str, fields: Any, reason: str) -> None:
        dead = deadletter_fields(
            reason,
            origin=self.commands_key,
            entry_ids=[entry_id],
            group=self.group,
            consumer=self.consumer,
            raw=dict(fields),
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.deadletter_key, xfields(dead), maxlen=100_000, approximate=True)
            pipe.xack(self.commands_key, self.group, entry_id)
            async with asyncio.timeout(self.timeout_s):
                await pipe.execute()
        _LOGGER.warning("command %s moved to the dead-letter stream: %s", entry_id, reason)

    def _redis_ok(self, ok: bool, err: BaseException | None) -> None:
        if ok is self.redis_ok:
            return
        previous, self.redis_ok = self.redis_ok, ok
        if not ok:
            _LOGGER.warning("command executor: Redis unavailable: %s; retrying with backoff", err)
        elif previous is not None:
            _LOGGER.info("command executor: Redis restored")


def _entry_time(entry_id: str) -> datetime:
    """Return when Redis appended an entry (the milliseconds part of its id)."""
    millis = int(entry_id.split("-", 1)[0])
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)
