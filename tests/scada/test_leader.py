"""The control lease on the real Redis: one leader at a time, takeover, stepping down, fencing tokens.

One candidate reaches Redis through a TCP relay in the test, so that "Redis unreachable for this
process" (a network partition, as far as that process can tell) is a real socket that stops
answering, not a mock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis
from conftest import REDIS_URL

from scada.leader import LeaderLease, fence_key, leader_key

FAST = {"ttl_s": 1.5, "renew_s": 0.2, "campaign_s": 0.1, "margin_s": 0.3, "timeout_s": 0.4}


@dataclass
class Work:
    """Records when each candidate led and with which fence."""

    periods: list[tuple[str, int, float, float | None]] = field(default_factory=list)
    leading: asyncio.Event = field(default_factory=asyncio.Event)

    def for_(self, name: str) -> object:
        async def work(fence: int) -> None:
            index = len(self.periods)
            self.periods.append((name, fence, time.monotonic(), None))
            self.leading.set()
            try:
                await asyncio.Event().wait()
            finally:
                _, _, started, _ = self.periods[index]
                self.periods[index] = (name, fence, started, time.monotonic())

        return work

    def current(self) -> list[str]:
        return [name for name, _, _, ended in self.periods if ended is None]


class Relay:
    """A TCP relay to Redis that can be cut (connections hang, new ones are refused)."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.cut = False
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    while self.cut:  # partitioned: hold the bytes, answer nothing
                        await asyncio.sleep(0.05)
                    dst.write(data)
                    await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Candidate:
    """One campaigning process: its lease and the task that runs it."""

    lease: LeaderLease
    task: asyncio.Task[None]

    async def stop(self) -> None:
        """Stop the way a process shutdown does: the task is cancelled, the lease released."""
        self.task.cancel()
        async with asyncio.timeout(5):  # a campaign that swallowed its cancellation fails here
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@contextlib.asynccontextmanager
async def candidate(redis: aioredis.Redis, prefix: str, work: Work, name: str) -> AsyncIterator[Candidate]:
    lease = LeaderLease(redis, prefix=prefix, instance=name, **FAST)  # type: ignore[arg-type]
    running = Candidate(lease, asyncio.create_task(lease.run(work.for_(name))))  # type: ignore[arg-type]
    try:
        yield running
    finally:
        await running.stop()


async def until(condition: object, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_one_leader_at_a_time_and_a_standby_takes_over_with_a_newer_fence(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    work = Work()
    async with candidate(redis_client, stream_prefix, work, "a") as a:
        await until(lambda: a.lease.status.leader, 3)
        async with candidate(redis_client, stream_prefix, work, "b") as b:
            await asyncio.sleep(1.0)  # several renewals and campaigns
            assert work.current() == ["a"]
            assert not b.lease.status.leader
            first_fence = a.lease.fence
        # b stopped (cleanly) while a led: a still leads
        assert work.current() == ["a"]
        async with candidate(redis_client, stream_prefix, work, "c") as c:
            stopped = time.monotonic()
            await a.stop()  # a releases the lease; c takes it at its next campaign
            await until(lambda: c.lease.status.leader, 3)
            took_over_s = time.monotonic() - stopped
            fence = c.lease.fence
            assert fence is not None
            assert first_fence is not None
            assert fence > first_fence
            assert await redis_client.get(fence_key(stream_prefix)) == str(fence).encode()
    assert took_over_s < 1.0
    assert [name for name, *_ in work.periods] == ["a", "c"]


async def test_a_partitioned_leader_steps_down_before_its_lease_can_pass_on(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    host, port = REDIS_URL.split("//", 1)[1].split("/", 1)[0].split(":")
    relay = Relay(host, int(port))
    await relay.start()
    behind = aioredis.Redis(host="127.0.0.1", port=relay.port, socket_timeout=1, socket_connect_timeout=1)
    work = Work()
    try:
        async with candidate(behind, stream_prefix, work, "partitioned") as a:
            await until(lambda: a.lease.status.leader, 3)
            async with candidate(redis_client, stream_prefix, work, "standby") as b:
                relay.cut = True
                await until(lambda: b.lease.status.leader, 5)
                assert not a.lease.status.leader
                assert a.lease.status.lost_total == 1
    finally:
        relay.cut = False
        await behind.aclose()
        await relay.close()
    (old, old_fence, _, old_end), (new, new_fence, new_start, _) = work.periods[:2]
    assert (old, new) == ("partitioned", "standby")
    assert old_end is not None
    assert old_end < new_start
    assert new_fence > old_fence


async def test_a_leader_whose_key_was_taken_steps_down_at_its_next_renewal(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    work = Work()
    async with candidate(redis_client, stream_prefix, work, "a") as a:
        await until(lambda: a.lease.status.leader, 3)
        await redis_client.set(leader_key(stream_prefix), b"someone-else", px=60_000)
        await until(lambda: not a.lease.status.leader, 2)
        assert work.current() == []
        assert a.lease.status.lost_total == 1


async def test_a_crashing_leader_work_gives_the_lease_up(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    runs: list[int] = []

    async def crashes(fence: int) -> None:
        runs.append(fence)
        raise RuntimeError("boom")

    lease = LeaderLease(redis_client, prefix=stream_prefix, instance="x", **FAST)  # type: ignore[arg-type]
    task = asyncio.create_task(lease.run(crashes))
    try:
        await until(lambda: len(runs) >= 2, 3)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert runs[1] > runs[0]  # re-elected with a new fence, not resumed with the old one
    assert await redis_client.get(leader_key(stream_prefix)) is None  # released on the way out


def test_settings_that_could_outlive_the_lease_are_refused() -> None:
    with pytest.raises(ValueError, match="renew_s"):
        LeaderLease(None, prefix="p:", ttl_s=1.0, renew_s=0.9, margin_s=0.3)  # type: ignore[arg-type]


async def test_a_stop_while_the_lease_is_being_released_is_not_lost(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    """Stop right after stepping down, while the release is in flight: the campaign must end."""
    for _ in range(20):  # the release takes one Redis round trip: try to land inside it
        work = Work()
        async with candidate(redis_client, stream_prefix, work, "a") as a:
            await until(lambda: a.lease.status.leader, 3)
            await redis_client.set(leader_key(stream_prefix), b"someone-else", px=60_000)
            await until(lambda: not a.lease.status.leader, 2)
            await a.stop()  # within 5 s, or Candidate.stop fails
            assert a.task.done()
        await redis_client.delete(leader_key(stream_prefix))
