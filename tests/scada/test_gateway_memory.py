"""Server GC tuning must not let reference cycles pile up: the young-generation timer frees them.

With the server thresholds the gen-0 count (allocations minus deallocations) stays far below 50,000
in a steady process, so without a timer a cycle made now is freed an hour later or more. The cycle
that grew the gateway is the one here: an exception that holds its own frame (redis-py raises its
``ResponseError`` that way), whose frames keep what the handler held.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import Iterator

import pytest

from scada import runtime
from scada.runtime import SERVER_GC_THRESHOLDS, YoungCollection, tune_gc_for_server

INTERVAL_S = 0.05
WAIT_BOUND_S = 5.0
"""Only a bound on a wait that ends much sooner; nothing is timed."""


class _Body:
    """Stands for a response body a handler held when an exception passed through it."""

    def __init__(self) -> None:
        self.data = bytes(64 * 1024)


@pytest.fixture
def server_gc() -> Iterator[None]:
    """Leave the test process's collector as it was: thresholds, nothing frozen, no timer."""
    thresholds = gc.get_threshold()
    yield
    if runtime._young_collection is not None:
        runtime._young_collection.cancel()
        runtime._young_collection = None
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def _raise_holding_itself() -> None:
    response = LookupError("no such key")  # the local keeps the exception: exception -> frame -> it
    raise response


def _scrape_once() -> weakref.ref[_Body]:
    """Fail a lookup the way a Redis XINFO of a missing stream does, with a body alive in the frame."""
    body = _Body()
    with contextlib.suppress(LookupError):
        _raise_holding_itself()
    return weakref.ref(body)


def _self_cycle() -> weakref.ref[_Body]:
    body = _Body()
    body.me = body  # type: ignore[attr-defined]
    return weakref.ref(body)


async def _until_freed(refs: list[weakref.ref[_Body]]) -> None:
    async with asyncio.timeout(WAIT_BOUND_S):
        while any(ref() is not None for ref in refs):
            await asyncio.sleep(INTERVAL_S / 5)


@pytest.mark.usefixtures("server_gc")
async def test_cycles_are_freed_without_allocation_pressure() -> None:
    collection = tune_gc_for_server(young_interval_s=INTERVAL_S)
    assert collection is not None
    assert collection.running
    assert gc.get_threshold() == SERVER_GC_THRESHOLDS
    refs = [_scrape_once() for _ in range(20)] + [_self_cycle() for _ in range(20)]
    assert all(ref() is not None for ref in refs[:1]), "the pattern must make a cycle, or this tests nothing"
    await _until_freed(refs)
    assert collection.runs >= 1
    assert collection.collected_total > 0


@pytest.mark.usefixtures("server_gc")
async def test_without_the_timer_the_server_thresholds_keep_the_cycles() -> None:
    """The reason for the timer: the same cycles outlive the wait when only the thresholds act."""
    assert tune_gc_for_server(young_interval_s=None) is None
    refs = [_scrape_once() for _ in range(20)]
    await asyncio.sleep(INTERVAL_S * 4)
    assert sum(ref() is not None for ref in refs) == len(refs)
    gc.collect(1)
    assert all(ref() is None for ref in refs)


@pytest.mark.usefixtures("server_gc")
async def test_a_second_call_replaces_the_timer() -> None:
    first = tune_gc_for_server(young_interval_s=INTERVAL_S)
    second = tune_gc_for_server(young_interval_s=INTERVAL_S)
    assert first is not None
    assert second is not None
    assert not first.running
    assert second.running
    second.cancel()
    second.cancel()  # idempotent
    assert not second.running


@pytest.mark.usefixtures("server_gc")
def test_without_a_running_loop_no_timer_is_started() -> None:
    assert tune_gc_for_server() is None
    assert gc.get_threshold() == SERVER_GC_THRESHOLDS


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        YoungCollection(0)
