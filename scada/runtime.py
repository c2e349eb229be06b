"""Kernel runtime helpers with no I/O: clocks, backoff and task supervision.

Feature packages may import this module (and :mod:`scada.model`) and nothing else of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import itertools
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "SERVER_GC_THRESHOLDS",
    "Backoff",
    "FakeClock",
    "SystemClock",
    "TaskSupervisor",
    "YoungCollection",
    "raise_if_cancelling",
    "tune_gc_for_server",
]

SERVER_GC_THRESHOLDS = (50_000, 50, 100)
"""Generation thresholds for a server process (CPython's default is (700, 10, 10))."""


YOUNG_COLLECTION_INTERVAL_S = 10.0
"""How often a server collects its young generations on a timer, whatever the allocation counts."""


class YoungCollection:
    """Collect generations 0 and 1 every ``interval_s`` on the event loop.

    Why: the gen-0 threshold counts allocations *minus* deallocations. In a steady server reference
    counting frees almost everything at once, so the count hovers far below 50,000 and the
    collector never runs; reference cycles then pile up for an hour or more before it does. One
    per ``/metrics`` scrape was enough to grow a 410-device gateway by about 1 MB/min: redis-py
    raises a ``ResponseError`` that holds its own frame, and the frames it keeps (``f_back``) held
    the 65 KB response. A young collection walks only what was made since the previous one (start-up
    is frozen), a few milliseconds, so a timer keeps such garbage to seconds' worth.
    """

    def __init__(self, interval_s: float = YOUNG_COLLECTION_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self.runs = 0
        self.collected_total = 0
        """Unreachable objects found by the timer's collections."""
        self._handle: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        """Return True while a collection is scheduled."""
        return self._handle is not None

    def start(self) -> None:
        """Schedule the first collection on the running loop (idempotent)."""
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.interval_s, self._collect)

    def cancel(self) -> None:
        """Stop collecting (idempotent)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()

    def _collect(self) -> None:
        self.collected_total += gc.collect(1)
        self.runs += 1
        self._handle = asyncio.get_running_loop().call_later(self.interval_s, self._collect)


_young_collection: YoungCollection | None = None


def tune_gc_for_server(
    young_interval_s: float | None = YOUNG_COLLECTION_INTERVAL_S,
) -> YoungCollection | None:
    """Freeze what start-up built, raise the thresholds, and collect young cycles on a timer.

    Why: a gateway holds tens of thousands of long-lived objects (sessions, drivers, decoders,
    connections) and allocates a short-lived batch of readings on every poll. With CPython's default
    thresholds the collector ran a full collection about twice a second at 10,000 sessions, each
    walking every live object for 100-200 ms: the poll loop stalled and p99 jitter reached 715 ms
    (docs/benchmarks.md). Frozen start-up objects are never scanned again, and a gen-0 threshold of
    50,000 allocations keeps collections rare and short; reference counting still frees the
    readings at once. Cycles are not freed that way, and with that threshold the collector would
    rarely run at all, so :class:`YoungCollection` collects them every ``young_interval_s``.

    Call it once every role has started, on the event loop: the timer runs on it and is returned
    (None without a running loop or with ``young_interval_s=None``); a second call replaces it.
    """
    global _young_collection  # noqa: PLW0603 (one timer per process, replaced by a second call)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVER_GC_THRESHOLDS)
    if _young_collection is not None:
        _young_collection.cancel()
        _young_collection = None
    if young_interval_s is None:
        return None
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    _young_collection = YoungCollection(young_interval_s)
    _young_collection.start()
    return _young_collection


_LOGGER = logging.getLogger(__name__)

_RECANCEL_INTERVAL_S = 0.5


def raise_if_cancelling() -> None:
    """Re-raise a cancellation of the current task that a library swallowed.

    On Python 3.11 ``asyncio.wait_for`` (used inside asyncpg and pymodbus) returns the result and
    drops a ``cancel()`` that lands in the same loop turn as the answer (CPython gh-86296). Long
    loops call this once per iteration so shutdown cannot be lost that way.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class SystemClock:
    """The real clock: UTC wall time, ``time.monotonic`` and ``asyncio.sleep``."""

    def now(self) -> datetime:
        """Return the current UTC time."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """Return monotonic seconds."""
        return time.monotonic()

    async def sleep(self, delay_s: float) -> None:
        """Sleep on the event loop."""
        await asyncio.sleep(delay_s)


class FakeClock:
    """A clock that moves only when told to, for deterministic tests of timing logic.

    Sleepers wake in deadline order as :meth:`advance` moves time forward; between wake-ups the
    event loop runs so woken tasks can act (and go back to sleep) before time moves on.

    >>> async def demo() -> list[float]:
    ...     clock = FakeClock()
    ...     woke: list[float] = []
    ...     async def sleeper(d: float) -> None:
    ...         await clock.sleep(d)
    ...         woke.append(clock.monotonic())
    ...     tasks = [asyncio.create_task(sleeper(d)) for d in (5.0, 1.0)]
    ...     await asyncio.sleep(0)
    ...     await clock.advance(10.0)
    ...     await asyncio.gather(*tasks)
    ...     return woke
    >>> asyncio.run(demo())
    [1.0, 5.0]
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._start_wall = start or datetime(2026, 1, 5, tzinfo=UTC)
        self._now_s = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        """Return the fake wall time."""
        return self._start_wall + timedelta(seconds=self._now_s)

    def monotonic(self) -> float:
        """Return fake monotonic seconds since the clock was made."""
        return self._now_s

    async def sleep(self, delay_s: float) -> None:
        """Wait until :meth:`advance` has moved time ``delay_s`` seconds forward."""
        if delay_s <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now_s + delay_s, next(self._seq), future))
        await future

    @property
    def pending_sleepers(self) -> int:
        """Return how many tasks are waiting on this clock."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    @property
    def next_deadline_s(self) -> float | None:
        """Return the monotonic time the next sleeper wakes at, or None if nobody sleeps."""
        pending = [deadline for deadline, _, future in self._sleepers if not future.done()]
        return min(pending) if pending else None

    async def advance(self, seconds: float, *, settle_rounds: int = 20) -> None:
        """Move time forward by ``seconds``, waking sleepers in order and letting them run."""
        target = self._now_s + seconds
        await self._settle(settle_rounds)
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self._now_s = max(self._now_s, deadline)
            if not future.done():
                future.set_result(None)
            await self._settle(settle_rounds)
        self._now_s = target
        await self._settle(settle_rounds)

    @staticmethod
    async def _settle(rounds: int) -> None:
        for _ in range(rounds):
            await asyncio.sleep(0)


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with full jitter: spreads reconnects when many devices drop at once.

    This is the "full jitter" variant of the AWS architecture blog's "Exponential Backoff and
    Jitter". The n-th delay is uniform in ``[initial_s * m**n * (1 - jitter), initial_s * m**n]``, capped
    at ``max_s``.

    >>> b = Backoff(initial_s=1.0, max_s=8.0, multiplier=2.0, jitter=0.0)
    >>> [b.next_delay() for _ in range(5)]
    [1.0, 2.0, 4.0, 8.0, 8.0]
    >>> b.reset(); b.next_delay()
    1.0
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("backoff: need 0 < initial_s <= max_s")
        if self.multiplier < 1:
            raise ValueError("backoff: multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff: jitter must be within [0, 1]")

    def next_delay(self) -> float:
        """Return the delay before the next attempt and count this attempt."""
        ceiling_s = min(self.max_s, self.initial_s * self.multiplier ** min(self._attempt, 64))
        self._attempt += 1
        return ceiling_s * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        """Start again from the initial delay (after a success)."""
        self._attempt = 0


class TaskSupervisor:
    """Own a set of long-running tasks: keep references, log crashes, cancel all on close.

    A task that ends with an exception is logged once with its name; the others keep running.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failures: list[tuple[str, BaseException]] = []

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Start ``coro`` as a task owned by this supervisor."""
        task = asyncio.create_task(coro, name=f"{self._name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            self.failures.append((task.get_name(), err))
            _LOGGER.error("task %s crashed", task.get_name(), exc_info=err)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Cancel every task and wait for them to finish (at most ``timeout_s``)."""
        tasks = list(self._tasks)
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    while pending := [t for t in tasks if not t.done()]:
                        for task in pending:
                            task.cancel()  # again each round: a library may have swallowed the last one
                        await asyncio.wait(pending, timeout=_RECANCEL_INTERVAL_S)
            stuck = sorted(t.get_name() for t in tasks if not t.done())
            if stuck:
                _LOGGER.error(
                    "%s: %d tasks ignored cancellation for %.0f s: %s",
                    self._name,
                    len(stuck),
                    timeout_s,
                    ", ".join(stuck),
                )
        self._tasks.clear()
