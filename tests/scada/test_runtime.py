"""Kernel runtime: backoff bounds, fake clock ordering, task supervision."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scada.runtime import Backoff, FakeClock, TaskSupervisor, raise_if_cancelling


@given(
    initial_s=st.floats(0.01, 5.0),
    factor=st.floats(1.0, 4.0),
    cap=st.floats(5.0, 120.0),
    jitter=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_backoff_delays_stay_within_cap_and_jitter_band(
    initial_s: float, factor: float, cap: float, jitter: float, seed: int
) -> None:
    backoff = Backoff(
        initial_s=initial_s, max_s=cap, multiplier=factor, jitter=jitter, rng=random.Random(seed)
    )
    for attempt in range(40):
        ceiling = min(cap, initial_s * factor**attempt)
        delay = backoff.next_delay()
        assert ceiling * (1 - jitter) - 1e-9 <= delay <= ceiling + 1e-9


def test_backoff_jitter_spreads_simultaneous_reconnects() -> None:
    delays = {
        round(Backoff(initial_s=1, max_s=30, rng=random.Random(seed)).next_delay(), 6) for seed in range(50)
    }
    assert len(delays) > 40  # fifty devices that dropped together do not come back together


@pytest.mark.parametrize(
    "kwargs", [{"initial_s": 0}, {"initial_s": 5, "max_s": 1}, {"multiplier": 0.5}, {"jitter": 1.5}]
)
def test_backoff_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**kwargs)  # type: ignore[arg-type]


async def test_fake_clock_wakes_in_deadline_order_and_now_moves() -> None:
    clock = FakeClock()
    start = clock.now()
    order: list[str] = []

    async def sleeper(name: str, delay_s: float) -> None:
        await clock.sleep(delay_s)
        order.append(name)

    tasks = [asyncio.create_task(sleeper(n, d)) for n, d in (("c", 3.0), ("a", 1.0), ("b", 2.0))]
    await clock.advance(2.5)
    assert order == ["a", "b"]
    await clock.advance(1.0)
    assert order == ["a", "b", "c"]
    await asyncio.gather(*tasks)
    assert (clock.now() - start).total_seconds() == pytest.approx(3.5)


async def test_supervisor_logs_crash_and_cancels_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = TaskSupervisor("test")
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    async def crash() -> None:
        raise RuntimeError("boom")

    supervisor.spawn(forever(), name="forever")
    supervisor.spawn(crash(), name="crash")
    await asyncio.sleep(0.01)
    assert [name for name, _ in supervisor.failures] == ["test:crash"]
    assert "task test:crash crashed" in caplog.text
    assert len(supervisor) == 1
    await supervisor.close()
    assert cancelled.is_set()
    assert len(supervisor) == 0


async def test_supervisor_cancels_again_a_task_that_swallowed_its_cancellation() -> None:
    supervisor = TaskSupervisor("test")
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:  # what asyncio.wait_for does on 3.11 when a reply races the cancel
            swallowed.set()
        await asyncio.sleep(3600)

    task = supervisor.spawn(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await supervisor.close(timeout_s=5)
    assert swallowed.is_set()
    assert task.cancelled()
    assert loop.time() - started < 2


async def test_raise_if_cancelling_restores_a_lost_cancellation() -> None:
    reached_loop_top = asyncio.Event()

    async def loop_body() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed by a library...
            await asyncio.sleep(3600)
        reached_loop_top.set()
        raise_if_cancelling()  # ...and raised again at the top of the next iteration
        await asyncio.sleep(3600)

    task = asyncio.create_task(loop_body())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reached_loop_top.is_set()
