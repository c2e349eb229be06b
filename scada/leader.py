"""A single control leader among server processes: a Redis lease with a fencing token.

Only one process may dispatch to devices at a time. Every process started with the ``control`` role
campaigns for the lease, a Redis key set with ``SET NX PX`` (``<prefix>control:leader``) whose value
names the holder. The holder renews it every ``renew_s``; if it does not renew for ``ttl_s`` the key
expires and a standby takes it within one campaign period. On a clean shutdown the holder deletes
the key, so a standby takes over at its next campaign.

**Stepping down before the lease can pass on.** The leader counts its lease from the moment it
*sent* the last successful renewal, so its local deadline ``sent + ttl_s - margin_s`` always falls
before Redis can expire the key. When that deadline passes without a renewal (Redis unreachable,
the process frozen), or a renewal finds the key held by someone else, the leader's work is cancelled
at once.

**Fencing.** A process frozen with SIGSTOP cannot notice that its deadline passed; when it wakes up it
may still send a command it had prepared. So each election takes a *fencing token* from
``INCR <prefix>control:fence``, strictly larger than every earlier leader's, and the leader puts it
on every command it sends. A gateway refuses a command whose fence is lower than the newest in Redis
(see :mod:`streams.commands`), so a deposed leader's late write never reaches a device.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from scada.runtime import raise_if_cancelling

__all__ = ["LeaderLease", "LeaseStatus", "fence_key", "leader_key"]

_LOGGER = logging.getLogger(__name__)

LEASE_TTL_S: Final = 5.0
RENEW_EVERY_S: Final = 1.0
CAMPAIGN_EVERY_S: Final = 1.0
MARGIN_S: Final = 0.5
"""Stop this long before the lease could expire in Redis (clock-rate drift, scheduling delays)."""

_REDIS_ERRORS: Final = (RedisError, OSError, TimeoutError)

# Renew only our own lease: GET and PEXPIRE in one step, so a lease another process took after ours
# expired is never extended by us.
_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Release only our own lease.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
# Take the lease and a new fencing token in one step, so no token is ever wasted on a lost race and
# the token is always newer than any command the previous leader sent.
_ACQUIRE: Final = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return redis.call('INCR', KEYS[2])
end
return 0
"""

LeaderWork = Callable[[int], Coroutine[Any, Any, None]]
"""The work only the leader does; called with its fencing token and cancelled when the lease ends."""


def leader_key(prefix: str) -> str:
    """Return the Redis key of the control lease."""
    return f"{prefix}control:leader"


def fence_key(prefix: str) -> str:
    """Return the Redis key of the fencing counter (the newest leader's token)."""
    return f"{prefix}control:fence"


@dataclass(frozen=True, slots=True)
class LeaseStatus:
    """What this process knows about the lease, for the health endpoint."""

    instance: str
    leader: bool
    fence: int | None
    elected_total: int
    lost_total: int

    def to_json(self) -> dict[str, Any]:
        """Return the status as JSON for ``/api/v1/health``."""
        return {
            "instance": self.instance,
            "leader": self.leader,
            "fence": self.fence,
            "elected_total": self.elected_total,
            "lost_total": self.lost_total,
        }


class LeaderLease:
    """Campaign for the control lease and run the leader's work while it is held."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        instance: str | None = None,
        ttl_s: float = LEASE_TTL_S,
        renew_s: float = RENEW_EVERY_S,
        campaign_s: float = CAMPAIGN_EVERY_S,
        margin_s: float = MARGIN_S,
        timeout_s: float = 2.0,
    ) -> None:
        if not 0 < renew_s < ttl_s - margin_s or campaign_s <= 0 or margin_s < 0:
            raise ValueError("need 0 < renew_s < ttl_s - margin_s, campaign_s > 0 and margin_s >= 0")
        self._redis = redis
        self._key = leader_key(prefix)
        self._fence_key = fence_key(prefix)
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._ttl_ms = int(ttl_s * 1000)
        self._ttl_s = ttl_s
        self._renew_s = renew_s
        self._campaign_s = campaign_s
        self._margin_s = margin_s
        # A Redis call must end before the lease could: the deadline logic relies on it.
        self._timeout_s = min(timeout_s, ttl_s - margin_s - renew_s)
        self._fence: int | None = None
        self._elected_total = 0
        self._lost_total = 0

    @property
    def status(self) -> LeaseStatus:
        """Return whether this process leads now, with its fencing token."""
        return LeaseStatus(
            instance=self.instance,
            leader=self._fence is not None,
            fence=self._fence,
            elected_total=self._elected_total,
            lost_total=self._lost_total,
        )

    @property
    def fence(self) -> int | None:
        """Return this process's fencing token while it leads, else None."""
        return self._fence

    async def run(self, work: LeaderWork) -> None:
        """Campaign until cancelled; while leading, run ``work(fence)`` and renew the lease."""
        while True:
            raise_if_cancelling()  # a library that swallowed a cancel must not keep us campaigning
            fence, sent_at = await self._try_acquire()
            if fence is None:
                await asyncio.sleep(self._campaign_s)
                continue
            try:
                await self._lead(work, fence, sent_at)
            finally:
                self._fence = None
                await self._release()
            await asyncio.sleep(self._campaign_s)  # a crashed work does not restart in a tight loop

    async def _try_acquire(self) -> tuple[int | None, float]:
        sent_at = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout_s):
                token: Any = await self._redis.eval(
                    _ACQUIRE, 2, self._key, self._fence_key, self.instance, self._ttl_ms
                )
        except _REDIS_ERRORS as err:
            raise_if_cancelling()
            _LOGGER.debug("control lease: campaign failed: %s", err)
            return None, sent_at
        return (int(token) or None), sent_at

    async def _lead(self, work: LeaderWork, fence: int, sent_at: float) -> None:
        self._fence = fence
        self._elected_total += 1
        _LOGGER.info("control lease: %s leads with fence %d", self.instance, fence)
        task = asyncio.create_task(work(fence), name=f"control-leader-{fence}")
        valid_until = sent_at + self._ttl_s - self._margin_s
        try:
            while not task.done():
                raise_if_cancelling()
                wait_s = max(0.0, min(self._renew_s, valid_until - time.monotonic()))
                await asyncio.wait({task}, timeout=wait_s)
                if task.done():
                    break
                if time.monotonic() >= valid_until:
                    _LOGGER.warning("control lease: not renewed in time; stepping down (fence %d)", fence)
                    self._lost_total += 1
                    return
                renewed_at = time.monotonic()
                held = await self._renew()
                if held is False:
                    _LOGGER.warning("control lease: taken by another; stepping down (fence %d)", fence)
                    self._lost_total += 1
                    return
                if held:
                    valid_until = renewed_at + self._ttl_s - self._margin_s
            # The work ended by itself: a crash is logged, and the lease is given up so that a
            # standby (or this process's next campaign) starts the work afresh.
            if not task.cancelled() and (err := task.exception()) is not None:
                _LOGGER.error("control leader work crashed; giving up the lease", exc_info=err)
        finally:
            task.cancel()
            # Not suppressed: a cancellation of this task while it waits for the work to end must
            # reach run(), or the process could never stop campaigning.
            await asyncio.wait({task})

    async def _renew(self) -> bool | None:
        """Return True if renewed, False if the lease is someone else's, None if Redis did not answer."""
        try:
            async with asyncio.timeout(self._timeout_s):
                renewed: Any = await self._redis.eval(_RENEW, 1, self._key, self.instance, self._ttl_ms)
        except _REDIS_ERRORS as err:
            raise_if_cancelling()
            _LOGGER.warning("control lease: renewal failed: %s", err)
            return None
        return bool(renewed)

    async def _release(self) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.eval(_RELEASE, 1, self._key, self.instance)
        except _REDIS_ERRORS as err:
            raise_if_cancelling()  # redis-py may turn a cancellation mid-command into an error
            _LOGGER.info("control lease: not released (it expires by itself): %s", err)
