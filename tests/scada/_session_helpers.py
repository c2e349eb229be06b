"""What the session tests share: a sink that records what a session publishes, and polling waits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from scada.model import AvailabilityEvent, Reading


class RecordingSink:
    """Collects what a session publishes (the session's seam; the Redis sink is tested in streams)."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.events: list[AvailabilityEvent] = []

    async def publish(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)

    async def publish_event(self, event: AvailabilityEvent) -> None:
        self.events.append(event)

    def of(self, point: str) -> list[Reading]:
        """Return the readings of one point, oldest first."""
        return [r for r in self.readings if r.point == point]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``condition`` every 5 ms until it holds; fail the test after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)
