"""Device sessions: keep one driver connected and polled; own timeouts, backoff and availability.

Drivers only translate; everything about *when* and *how often* to talk to a device lives here,
written once for every protocol (STYLE.md: drivers translate, sessions supervise):

- fixed-rate polling without drift; a poll that overruns skips the missed ticks instead of bursting;
- a timeout on connect and on every poll, on top of the driver's per-request timeouts;
- capped, jittered exponential backoff between reconnect attempts;
- availability (online/offline) published as events, logged on transitions only;
- when a device goes offline every one of its points gets a bad-quality reading with the reason, so
  nothing downstream mistakes the last good value for a live one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from scada.model import (
    Availability,
    AvailabilityEvent,
    Clock,
    DeviceError,
    Driver,
    EventSink,
    PointId,
    Quality,
    Reading,
    ReadingSink,
)
from scada.runtime import Backoff, raise_if_cancelling

__all__ = ["DeviceSession", "SessionStats"]

_LOGGER = logging.getLogger(__name__)


@dataclass(slots=True)
class SessionStats:
    """Counters an operator or a bench reads to see how a session is doing."""

    polls_ok: int = 0
    polls_failed: int = 0
    connects: int = 0
    overruns: int = 0
    """Ticks skipped because a poll took longer than the period."""


class DeviceSession:
    """Supervise one device: connect, poll at a fixed rate, back off and report availability."""

    def __init__(
        self,
        driver: Driver,
        *,
        points: Sequence[PointId],
        sink: ReadingSink,
        events: EventSink,
        period_s: float,
        clock: Clock,
        backoff: Backoff | None = None,
        connect_timeout_s: float = 5.0,
        poll_timeout_s: float | None = None,
    ) -> None:
        if period_s <= 0:
            raise ValueError("period_s must be positive")
        self._driver = driver
        self._points = tuple(points)
        self._sink = sink
        self._events = events
        self._period_s = period_s
        self._clock = clock
        self._backoff = backoff or Backoff(initial_s=min(1.0, period_s), max_s=60.0)
        self._connect_timeout_s = connect_timeout_s
        self._poll_timeout_s = poll_timeout_s if poll_timeout_s is not None else max(period_s, 1.0) * 2
        self.available: bool | None = None
        """None until the first attempt, then True (online) or False (offline)."""
        self.last_error: str = ""
        self.stats = SessionStats()

    @property
    def device(self) -> str:
        """Return the id of the supervised device."""
        return self._driver.device

    async def run(self) -> None:
        """Run until cancelled: connect, poll, and on any device error back off and reconnect."""
        try:
            while True:
                try:
                    async with asyncio.timeout(self._connect_timeout_s):
                        await self._driver.connect()
                    self.stats.connects += 1
                    await self._poll_forever()
                except (DeviceError, TimeoutError) as err:
                    await self._went_offline(_describe(err))
                except Exception as err:
                    _LOGGER.exception("%s: session error; reconnecting", self.device)
                    await self._went_offline(f"internal error: {err!r}")
                finally:
                    await self._close_driver()
                await self._clock.sleep(self._backoff.next_delay())
        finally:
            await self._close_driver()

    async def _poll_forever(self) -> None:
        next_tick_s = self._clock.monotonic()
        while True:
            raise_if_cancelling()
            async with asyncio.timeout(self._poll_timeout_s):
                readings = await self._driver.read()
            self.stats.polls_ok += 1
            await self._came_online()
            await self._sink.publish(readings)
            next_tick_s += self._period_s
            now_s = self._clock.monotonic()
            if now_s > next_tick_s:  # overran: skip the ticks we missed rather than poll in a burst
                missed = int((now_s - next_tick_s) // self._period_s) + 1
                self.stats.overruns += missed
                next_tick_s += missed * self._period_s
            await self._clock.sleep(next_tick_s - now_s)

    async def _came_online(self) -> None:
        self._backoff.reset()
        if self.available is True:
            return
        self.available = True
        self.last_error = ""
        _LOGGER.info("%s: online", self.device)
        await self._events.publish_event(
            AvailabilityEvent(
                device=self._driver.device, ts=self._clock.now(), availability=Availability.ONLINE
            )
        )

    async def _went_offline(self, reason: str) -> None:
        self.stats.polls_failed += 1
        self.last_error = reason
        if self.available is False:
            return  # log and publish transitions, not repetitions
        self.available = False
        _LOGGER.warning("%s: offline: %s", self.device, reason)
        now = self._clock.now()
        quality = Quality.bad(f"device offline: {reason}")
        await self._sink.publish(
            [Reading(point=p, ts=now, value=None, quality=quality) for p in self._points]
        )
        await self._events.publish_event(
            AvailabilityEvent(
                device=self._driver.device, ts=now, availability=Availability.OFFLINE, reason=reason
            )
        )

    async def _close_driver(self) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await self._driver.close()
        except (DeviceError, TimeoutError, OSError) as err:
            _LOGGER.debug("%s: close failed: %s", self.device, err)


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError) and not str(err):
        return "timed out"
    return str(err) or type(err).__name__
