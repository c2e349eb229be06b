"""What drivers do alike: index point specs and refuse unknown points; hold what a device pushes.

Each driver keeps its own spec type (a Modbus register, an OPC UA node, an MQTT payload field); the
rules here are the ones they share, so a refusal reads the same whatever the protocol. Drivers whose
device pushes its values (MQTT, OpenADR) keep them in :class:`LatestReadings` (for ``read``) and a
:class:`BatchQueue` (for ``receive``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Protocol, TypeVar

from scada.model import DeviceId, PointId, Quality, Reading, RequestRejected

__all__ = ["BatchQueue", "LatestReadings", "PointRejected", "index_points", "lookup_point"]


class PointRejected(RequestRejected):
    """The request names a point this driver does not serve or a value the point cannot take.

    Raised before anything is sent, so the device is not to blame and stays online (the kernel's
    :class:`RequestRejected`, which the command path reports as FAILED: never applied).
    """


class _HasPoint(Protocol):
    @property
    def point(self) -> PointId: ...


_S = TypeVar("_S", bound=_HasPoint)


def index_points(device: str, specs: Iterable[_S]) -> dict[PointId, _S]:
    """Return the specs by point, in configuration order; a point configured twice is a ValueError.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Spec:
    ...     point: PointId
    >>> list(index_points("m1", [Spec(PointId("m1.a")), Spec(PointId("m1.b"))]))
    ['m1.a', 'm1.b']
    >>> index_points("m1", [Spec(PointId("m1.a")), Spec(PointId("m1.a"))])
    Traceback (most recent call last):
    ...
    ValueError: m1: point m1.a is configured twice
    """
    by_point: dict[PointId, _S] = {}
    for spec in specs:
        if spec.point in by_point:
            raise ValueError(f"{device}: point {spec.point} is configured twice")
        by_point[spec.point] = spec
    return by_point


_V = TypeVar("_V")


def lookup_point(device: DeviceId, by_point: Mapping[PointId, _V], point: PointId) -> _V:
    """Return what ``by_point`` holds for ``point``; :class:`PointRejected` if the device lacks it."""
    try:
        return by_point[point]
    except KeyError:
        raise PointRejected(f"{point}: not a point of device {device}") from None


class LatestReadings:
    """The newest reading of each point a device pushed; ``read`` answers from here."""

    def __init__(self, *, missing: Quality) -> None:
        self._by_point: dict[PointId, Reading] = {}
        self._missing = missing

    def keep(self, reading: Reading) -> None:
        """Keep ``reading`` unless the point already has a newer one (a late or replayed message)."""
        previous = self._by_point.get(reading.point)
        if previous is None or previous.ts <= reading.ts:
            self._by_point[reading.point] = reading

    def set(self, reading: Reading) -> None:
        """Make ``reading`` the point's latest, whatever its timestamp (a value the driver derives)."""
        self._by_point[reading.point] = reading

    def get(self, point: PointId) -> Reading | None:
        """Return the point's latest reading, None before the first."""
        return self._by_point.get(point)

    def snapshot(self, points: Iterable[PointId], now: datetime) -> list[Reading]:
        """Return the latest reading of every point, a bad reading (``missing``) for the others."""
        return [
            self._by_point.get(point) or Reading(point=point, ts=now, value=None, quality=self._missing)
            for point in points
        ]


class _CountsDrops(Protocol):
    dropped: int


class BatchQueue:
    """The batches a device pushed, waiting for the session's ``receive``; bounded, drops the oldest.

    The drop count goes to the driver's own ``stats.dropped`` and its warning to the driver's logger,
    logged at the first drop and every thousandth after.
    """

    def __init__(
        self, device: DeviceId, *, queue_batches: int, stats: _CountsDrops, logger: logging.Logger
    ) -> None:
        if queue_batches < 1:
            raise ValueError("queue_batches must be at least 1")
        self._device = device
        self._max_batches = queue_batches
        self._stats = stats
        self._logger = logger
        self._batches: deque[list[Reading]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[list[Reading]]:
        return iter(self._batches)

    def put(self, batch: list[Reading]) -> None:
        """Queue a batch and wake :meth:`get`; when full, drop the oldest and count it."""
        if len(self._batches) >= self._max_batches:
            self._batches.popleft()
            self._stats.dropped += 1
            dropped = self._stats.dropped
            if dropped == 1 or dropped % 1000 == 0:
                self._logger.warning(
                    "%s: session not keeping up; dropped %d batches so far", self._device, dropped
                )
        self._batches.append(batch)
        self.wake()

    def wake(self) -> None:
        """Wake a pending :meth:`get`, which then returns a batch or lets ``check_link`` raise."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, check_link: Callable[[], None]) -> list[Reading]:
        """Return the next batch, waiting for one; ``check_link()`` raises once the link is lost.

        It is called whenever the queue is empty, so queued batches are still delivered after a loss.
        """
        while True:
            if self._batches:
                return self._batches.popleft()
            check_link()
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def clear(self) -> None:
        """Forget every queued batch (the driver closed)."""
        self._batches.clear()
