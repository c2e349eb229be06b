"""The command channel over the real Redis: codec, at-most-once execution, expiry, dead letters.

The executor's ``execute`` here records what it is asked and answers like a device session would;
the session's own write path (acknowledgement, read-back) is tested against real simulators in
tests/scada/test_session_commands.py and end to end in tests/scada/test_gateway.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from scada.model import Command, CommandResult, CommandStatus, DecodeError, PointId, Priority
from scada.runtime import SystemClock
from streams.commands import (
    decode_command,
    decode_result,
    encode_command,
    encode_result,
    results_cursor,
    run_command_executor,
    send_and_wait,
    send_command,
    wait_result,
)


def command(correlation_id: str, point: str = "pv.power_limit_pct", value: float = 40.0) -> Command:
    return Command(
        point=PointId(point),
        value=value,
        priority=Priority.OPERATOR,
        source="operator:alice",
        reason="test",
        correlation_id=correlation_id,
        hold_until=datetime(2026, 1, 5, 12, tzinfo=UTC),
    )


def test_commands_and_results_round_trip() -> None:
    sent = command("c-1")
    assert decode_command(encode_command(sent)) == sent
    result = CommandResult(
        correlation_id="c-1",
        point=PointId("pv.power_limit_pct"),
        requested=40.0,
        status=CommandStatus.MISMATCH,
        ts=datetime(2026, 1, 5, 12, 0, 1, 250_000, tzinfo=UTC),
        readback=38.5,
        reason="acknowledged, but the device holds 38.5",
        elapsed_ms=12.5,
    )
    assert decode_result(encode_result(result, executor="gw-0")) == result


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({b"v": b"2", b"c": b"{}"}, "unsupported version"),
        ({b"v": b"1"}, "missing field 'c'"),
        ({b"v": b"1", b"c": b"{not json"}, "not JSON"),
        ({b"v": b"1", b"c": b"[]"}, "must be a JSON object"),
        ({b"v": b"1", b"c": b'{"point": "no-dot"}'}, "point:"),
        (
            {
                b"v": b"1",
                b"c": b'{"point": "a.b", "value": "x", "priority": 10, "source": "s", "correlation_id": "c"}',
            },
            "value: expected a finite number",
        ),
        (
            {
                b"v": b"1",
                b"c": b'{"point": "a.b", "value": 1, "priority": 5, "source": "s", "correlation_id": "c"}',
            },
            "unknown priority",
        ),
    ],
)
def test_malformed_commands_say_what_is_wrong(fields: dict[bytes, bytes], message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_command(fields)


class Device:
    """Stands in for the gateway's sessions: records writes, answers VERIFIED (or waits when told)."""

    def __init__(self) -> None:
        self.writes: list[Command] = []
        self.hold = asyncio.Event()
        self.hold.set()

    def owns(self, point: PointId) -> bool:
        return point.startswith("pv.")

    async def execute(self, cmd: Command) -> CommandResult:
        self.writes.append(cmd)
        await self.hold.wait()
        return CommandResult(
            correlation_id=cmd.correlation_id,
            point=cmd.point,
            requested=cmd.value,
            status=CommandStatus.VERIFIED,
            ts=datetime.now(UTC),
            readback=cmd.value,
        )


@contextlib.asynccontextmanager
async def executor(
    redis: aioredis.Redis, prefix: str, device: Device, *, max_age_s: float = 60.0
) -> AsyncIterator[None]:
    task = asyncio.create_task(
        run_command_executor(
            redis,
            commands_key=f"{prefix}commands",
            results_key=f"{prefix}command_results",
            deadletter_key=f"{prefix}deadletter",
            claims_prefix=f"{prefix}claim:",
            group="gateway-0of1",
            consumer="gw-test",
            owns=device.owns,
            execute=device.execute,
            max_age_s=max_age_s,
            timeout_s=2.0,
            clock=SystemClock(),
        )
    )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def send(redis: aioredis.Redis, prefix: str, cmd: Command) -> CommandResult | None:
    return await send_and_wait(redis, f"{prefix}commands", f"{prefix}command_results", cmd, wait_s=5)


async def test_a_command_is_executed_once_and_its_result_found_by_correlation_id(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    device = Device()
    async with executor(redis_client, stream_prefix, device):
        await asyncio.sleep(0.2)  # the group is created at "$": commands sent from now on count
        first = await send(redis_client, stream_prefix, command("c-once"))
        again = await results_cursor(redis_client, f"{stream_prefix}command_results")
        await send_command(redis_client, f"{stream_prefix}commands", command("c-once"))  # a retry
        other = await send(redis_client, stream_prefix, command("c-other", value=55))
        await asyncio.sleep(0.3)
        assert (
            await wait_result(
                redis_client, f"{stream_prefix}command_results", "c-once", after_id=again, timeout_s=0.5
            )
            is None
        )  # the duplicate produced no second write and no second result
    assert first is not None
    assert first.status is CommandStatus.VERIFIED
    assert other is not None
    assert other.readback == 55
    assert [c.correlation_id for c in device.writes] == ["c-once", "c-other"]
    pending = await redis_client.xpending(f"{stream_prefix}commands", "gateway-0of1")
    assert pending["pending"] == 0


async def test_other_shards_commands_are_left_alone_and_garbage_goes_to_dead_letters(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    device = Device()
    async with executor(redis_client, stream_prefix, device):
        await asyncio.sleep(0.2)
        await send_command(redis_client, f"{stream_prefix}commands", command("c-elsewhere", point="meter.x"))
        await redis_client.xadd(f"{stream_prefix}commands", {b"v": b"1", b"c": b"{broken"})
        mine = await send(redis_client, stream_prefix, command("c-mine"))
    assert mine is not None
    assert [c.correlation_id for c in device.writes] == ["c-mine"]
    dead = await redis_client.xrange(f"{stream_prefix}deadletter")
    assert len(dead) == 1
    assert b"not JSON" in dead[0][1][b"reason"]
    assert dead[0][1][b"raw.c"] == b"{broken"


async def test_a_command_older_than_its_limit_is_not_executed(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    device = Device()
    await redis_client.xgroup_create(f"{stream_prefix}commands", "gateway-0of1", id="$", mkstream=True)
    entry = await results_cursor(redis_client, f"{stream_prefix}command_results")
    await send_command(redis_client, f"{stream_prefix}commands", command("c-old"))
    await asyncio.sleep(1.2)  # the gateway was down while the command waited
    async with executor(redis_client, stream_prefix, device, max_age_s=1.0):
        result = await wait_result(
            redis_client, f"{stream_prefix}command_results", "c-old", after_id=entry, timeout_s=5
        )
    assert result is not None
    assert result.status is CommandStatus.FAILED
    assert result.reason.startswith("expired: issued")
    assert device.writes == []


async def test_a_gateway_that_died_mid_write_reports_an_unknown_outcome_instead_of_writing_again(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    device = Device()
    device.hold.clear()  # the device never answers: the gateway dies while waiting
    async with executor(redis_client, stream_prefix, device):
        await asyncio.sleep(0.2)
        entry = await results_cursor(redis_client, f"{stream_prefix}command_results")
        await send_command(redis_client, f"{stream_prefix}commands", command("c-crash"))
        async with asyncio.timeout(5):
            while not device.writes:
                await asyncio.sleep(0.01)
    device.hold.set()
    async with executor(redis_client, stream_prefix, device):  # restarted with the same consumer name
        result = await wait_result(
            redis_client, f"{stream_prefix}command_results", "c-crash", after_id=entry, timeout_s=5
        )
    assert result is not None
    assert result.status is CommandStatus.TIMEOUT
    assert "outcome unknown" in result.reason
    assert len(device.writes) == 1  # written once, never again


def fenced(correlation_id: str, fence: int) -> Command:
    return dataclasses.replace(command(correlation_id), source="dispatch:1", fence=fence)


async def test_a_deposed_leaders_command_is_refused_and_the_current_leaders_runs(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    """A command whose fencing token is older than the newest leader's never reaches the device."""
    device = Device()
    fence = f"{stream_prefix}control:fence"
    task = asyncio.create_task(
        run_command_executor(
            redis_client,
            commands_key=f"{stream_prefix}commands",
            results_key=f"{stream_prefix}command_results",
            deadletter_key=f"{stream_prefix}deadletter",
            claims_prefix=f"{stream_prefix}claim:",
            group="gateway-0of1",
            consumer="gw-test",
            owns=device.owns,
            execute=device.execute,
            timeout_s=2.0,
            fence_key=fence,
        )
    )
    try:
        await asyncio.sleep(0.2)
        await redis_client.set(fence, 7)  # leader 7 was elected after leader 6
        stale = await send(redis_client, stream_prefix, fenced("c-old-leader", 6))
        current = await send(redis_client, stream_prefix, fenced("c-new-leader", 7))
        manual = await send(redis_client, stream_prefix, command("c-operator"))  # no fence: not subject
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert stale is not None
    assert stale.status is CommandStatus.REJECTED
    assert "fenced" in stale.reason
    assert "7" in stale.reason
    assert current is not None
    assert current.status is CommandStatus.VERIFIED
    assert manual is not None
    assert manual.status is CommandStatus.VERIFIED
    assert [c.correlation_id for c in device.writes] == ["c-new-leader", "c-operator"]


def test_the_fence_round_trips_and_a_bad_one_is_a_decode_error() -> None:
    sent = fenced("c-f", 3)
    assert decode_command(encode_command(sent)).fence == 3
    body = b'{"point": "a.b", "value": 1, "priority": 10, "source": "s", "correlation_id": "c", "fence": "3"}'
    with pytest.raises(DecodeError, match="fence: expected a positive integer"):
        decode_command({b"v": b"1", b"c": body})
