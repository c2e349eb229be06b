"""Helpers of the tests that run a whole site over real sockets (``tests/`` is on sys.path through its conftest)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from scada.config import SiteConfig
from simulators.plant import SimulatedPlant


async def eventually(check: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def simulated_plant(
    site: SiteConfig, *, without: Collection[str] = ()
) -> AsyncIterator[SimulatedPlant]:
    """Run a simulator for every device of ``site`` but those in ``without`` (no hardware behind them)."""
    doc = site.model_dump(mode="json")
    doc["devices"] = [d for d in doc["devices"] if d["id"] not in without]
    plant = SimulatedPlant.from_document(doc)
    await plant.start()
    try:
        yield plant
    finally:
        await plant.stop()
