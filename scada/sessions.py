"""Device sessions: keep one driver connected; own rates, timeouts, backoff, availability and quality.

Drivers only translate; everything about *when* and *how often* to talk to a device lives here,
written once for every protocol (STYLE.md: drivers translate, sessions supervise):

- polled drivers (Modbus, OPC UA without subscriptions) are read at a fixed rate without drift; a poll
  that overruns skips the missed ticks instead of bursting;
- subscribed drivers (OPC UA monitored items, MQTT telemetry) are waited on; a device that sends
  nothing, not even a keep-alive, for ``stale_after_s`` is *stale*;
- a timeout on connect, on every poll and on every wait, on top of the driver's per-request timeouts;
- capped, jittered exponential backoff between reconnect attempts;
- availability (online / offline / stale) published as events and logged on transitions only;
- Quality on every reading: when a device goes offline every point gets a bad reading with the
  reason, when it goes stale every point gets its last value marked uncertain, a pushed sample older
  than ``stale_after_s`` is uncertain, and a value that should move but has not changed for its
  ``stuck_after_s`` is uncertain ("stuck"). Nothing downstream can mistake an old value for a live one;
- the command path (:meth:`DeviceSession.execute`): a write completes only when the device has
  acknowledged it, within a timeout, and a read-back shows the value, or the result says why not.

Staleness and write timeouts run on the event loop's time, like the drivers' timeouts: a device
answers in real seconds even when a simulation runs its clock faster. The injected clock paces polls
and stamps readings and events.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from scada.model import (
    Acquisition,
    Availability,
    AvailabilityEvent,
    Clock,
    Command,
    CommandResult,
    CommandStatus,
    DeviceError,
    DeviceProtocolError,
    DeviceUnavailable,
    Driver,
    EventSink,
    PointId,
    Quality,
    QualityCode,
    Reading,
    ReadingSink,
    RequestRejected,
    SubscriptionDriver,
)
from scada.runtime import Backoff, raise_if_cancelling

__all__ = ["DeviceSession", "SessionStats"]

_LOGGER = logging.getLogger(__name__)

_READBACK_RETRY_S = 0.1
"""Pause between read-backs while a device is still applying a write (a ramping setpoint)."""


@dataclass(slots=True)
class SessionStats:
    """Counters an operator or a bench reads to see how a session is doing."""

    polls_ok: int = 0
    """Successful polls (POLL) or received batches (SUBSCRIBE)."""
    polls_failed: int = 0
    connects: int = 0
    overruns: int = 0
    """Ticks skipped because a poll took longer than the period."""
    stale_periods: int = 0
    """Times the device went stale."""
    old_samples: int = 0
    """Pushed samples marked uncertain because they were older than ``stale_after_s`` on arrival."""
    stuck_readings: int = 0
    """Readings marked uncertain because their value had not moved for the point's ``stuck_after_s``."""
    writes: int = 0


@dataclass(slots=True)
class _PointWatch:
    """What the stuck-value check remembers of one point."""

    stuck_after_s: float
    value: float | None = None
    changed_at_s: float = 0.0
    stuck: bool = False


class DeviceSession:
    """Supervise one device: connect, poll or subscribe, back off, report availability and quality."""

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
        stale_after_s: float | None = None,
        stuck_after_s: Mapping[PointId, float] | None = None,
        write_tolerance: Callable[[PointId, float], float] | None = None,
        write_timeout_s: float = 5.0,
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
        self._stale_after_s = stale_after_s if stale_after_s is not None else max(10.0, 3.0 * period_s)
        self._watches = {p: _PointWatch(s) for p, s in (stuck_after_s or {}).items() if p in self._points}
        self._write_tolerance = write_tolerance or _default_tolerance
        self._write_timeout_s = write_timeout_s
        self._last: dict[PointId, Reading] | None = (
            {} if driver.acquisition is Acquisition.SUBSCRIBE else None
        )
        """Last reading published per point, kept only for subscriptions: going stale republishes it.
        Polled devices never go stale that way, so their poll path does not pay for it."""
        self._all_stuck = False
        self.availability: Availability | None = None
        """None until the first attempt, then the state last published."""
        self.last_error: str = ""
        self.stats = SessionStats()

    @property
    def device(self) -> str:
        """Return the id of the supervised device."""
        return self._driver.device

    @property
    def available(self) -> bool | None:
        """Return None before the first attempt, True while online (or stale but connected), else False."""
        if self.availability is None:
            return None
        return self.availability is not Availability.OFFLINE

    @property
    def points(self) -> tuple[PointId, ...]:
        """Return the ids of the points this session publishes."""
        return self._points

    # ----------------------------------------------------------------------------------------------
    # Running

    async def run(self) -> None:
        """Run until cancelled: connect, acquire, and on any device error back off and reconnect."""
        try:
            while True:
                try:
                    async with asyncio.timeout(self._connect_timeout_s):
                        await self._driver.connect()
                    self.stats.connects += 1
                    if self._driver.acquisition is Acquisition.SUBSCRIBE:
                        await self._receive_forever(_subscribing(self._driver))
                    else:
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
            readings = self._check_stuck(readings)
            if self._watches and self._all_stuck:
                await self._went_stale("every monitored value is stuck", republish=False)
            else:
                await self._came_online()
            await self._publish(readings)
            next_tick_s += self._period_s
            now_s = self._clock.monotonic()
            if now_s > next_tick_s:  # overran: skip the ticks we missed rather than poll in a burst
                missed = int((now_s - next_tick_s) // self._period_s) + 1
                self.stats.overruns += missed
                next_tick_s += missed * self._period_s
            await self._clock.sleep(next_tick_s - now_s)

    async def _receive_forever(self, driver: SubscriptionDriver) -> None:
        await self._came_online()  # connected and subscribed: online until proven stale or lost
        while True:
            raise_if_cancelling()
            try:
                async with asyncio.timeout(self._stale_after_s) as deadline:
                    batch = await driver.receive()
            except TimeoutError:
                if not deadline.expired():
                    raise  # the driver's own timeout: a device error, not silence
                await self._went_stale(f"no update for {self._stale_after_s:g} s", republish=True)
                continue
            self.stats.polls_ok += 1
            await self._came_online()
            if batch:
                await self._publish(self._check_stuck(self._check_age(batch)))

    async def _publish(self, readings: Sequence[Reading]) -> None:
        if self._last is not None:
            for reading in readings:
                self._last[reading.point] = reading
        await self._sink.publish(readings)

    # ----------------------------------------------------------------------------------------------
    # Quality checks

    def _check_age(self, batch: Sequence[Reading]) -> Sequence[Reading]:
        """Mark pushed samples that were already old when they arrived (retained, buffered, replayed)."""
        now = self._clock.now()
        out: list[Reading] | None = None
        for index, reading in enumerate(batch):
            age_s = (now - reading.ts).total_seconds()
            if age_s <= self._stale_after_s or reading.quality.code is not QualityCode.GOOD:
                if out is not None:
                    out.append(reading)
                continue
            if out is None:
                out = list(batch[:index])
            self.stats.old_samples += 1
            out.append(
                Reading(
                    point=reading.point,
                    ts=reading.ts,
                    value=reading.value,
                    quality=Quality.uncertain(f"stale: measured {age_s:.0f} s before it arrived"),
                )
            )
        return batch if out is None else out

    def _check_stuck(self, readings: Sequence[Reading]) -> Sequence[Reading]:
        """Mark values that should move but have not, for the points that ask for the check."""
        if not self._watches:
            return readings
        now_s = asyncio.get_running_loop().time()
        out: list[Reading] = []
        newly_stuck: list[str] = []
        for reading in readings:
            watch = self._watches.get(reading.point)
            if watch is None or reading.value is None or reading.quality.code is QualityCode.BAD:
                out.append(reading)
                continue
            if watch.value is None or reading.value != watch.value:
                watch.value, watch.changed_at_s, watch.stuck = reading.value, now_s, False
                out.append(reading)
                continue
            unchanged_s = now_s - watch.changed_at_s
            if unchanged_s < watch.stuck_after_s:
                out.append(reading)
                continue
            if not watch.stuck:
                watch.stuck = True
                newly_stuck.append(reading.point)
            self.stats.stuck_readings += 1
            out.append(
                Reading(
                    point=reading.point,
                    ts=reading.ts,
                    value=reading.value,
                    quality=Quality.uncertain(f"stuck: unchanged for {unchanged_s:.0f} s"),
                )
            )
        if newly_stuck:
            _LOGGER.warning("%s: values stuck: %s", self.device, ", ".join(sorted(newly_stuck)))
        self._all_stuck = all(w.stuck for w in self._watches.values())
        return out

    # ----------------------------------------------------------------------------------------------
    # Availability transitions

    async def _came_online(self) -> None:
        self._backoff.reset()
        if self.availability is Availability.ONLINE:
            return
        self.availability = Availability.ONLINE
        self.last_error = ""
        _LOGGER.info("%s: online", self.device)
        await self._events.publish_event(
            AvailabilityEvent(
                device=self._driver.device, ts=self._clock.now(), availability=Availability.ONLINE
            )
        )

    async def _went_stale(self, reason: str, *, republish: bool) -> None:
        if self.availability is Availability.STALE:
            return
        self.availability = Availability.STALE
        self.last_error = reason
        self.stats.stale_periods += 1
        _LOGGER.warning("%s: stale: %s", self.device, reason)
        now = self._clock.now()
        if republish:
            await self._publish([self._stale_reading(p, now, reason) for p in self._points])
        await self._events.publish_event(
            AvailabilityEvent(
                device=self._driver.device, ts=now, availability=Availability.STALE, reason=reason
            )
        )

    def _stale_reading(self, point: PointId, now: datetime, reason: str) -> Reading:
        """Return the last value marked uncertain (OPC UA's "last usable value"), or bad without one."""
        last = self._last.get(point) if self._last is not None else None
        if last is None or last.value is None:
            return Reading(point=point, ts=now, value=None, quality=Quality.bad(f"stale: {reason}"))
        return Reading(point=point, ts=now, value=last.value, quality=Quality.uncertain(f"stale: {reason}"))

    async def _went_offline(self, reason: str) -> None:
        self.stats.polls_failed += 1
        self.last_error = reason
        if self.availability is Availability.OFFLINE:
            return  # log and publish transitions, not repetitions
        self.availability = Availability.OFFLINE
        _LOGGER.warning("%s: offline: %s", self.device, reason)
        now = self._clock.now()
        quality = Quality.bad(f"device offline: {reason}")
        await self._publish([Reading(point=p, ts=now, value=None, quality=quality) for p in self._points])
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

    # ----------------------------------------------------------------------------------------------
    # Command path

    async def execute(self, command: Command) -> CommandResult:  # noqa: PLR0911 (one return per outcome)
        """Write a command's value, wait for the device's acknowledgement, then verify by read-back.

        Never raises for device trouble: the result's status and reason say what happened
        (:class:`~scada.model.CommandStatus`). The acknowledgement wait is bounded by
        ``write_timeout_s``; read-backs are retried for up to another ``write_timeout_s`` while the
        device may still be applying the value, then the last value read is reported.
        """
        loop = asyncio.get_running_loop()
        started_s = loop.time()
        point, value = command.point, command.value

        def result(status: CommandStatus, reason: str = "", readback: float | None = None) -> CommandResult:
            elapsed_ms = (loop.time() - started_s) * 1000.0
            if status is not CommandStatus.VERIFIED:
                _LOGGER.warning(
                    "%s: write %s = %g (%s): %s: %s",
                    self.device,
                    point,
                    value,
                    command.correlation_id,
                    status.value,
                    reason,
                )
            return CommandResult.of(
                command, status, ts=self._clock.now(), reason=reason, readback=readback, elapsed_ms=elapsed_ms
            )

        if point not in self._points:
            return result(CommandStatus.FAILED, f"{point} is not a point of device {self.device}")
        if not math.isfinite(value):
            return result(CommandStatus.FAILED, f"{value} is not a number that can be written")
        if self.availability not in (Availability.ONLINE, Availability.STALE):
            return result(CommandStatus.FAILED, f"device not connected: {self.last_error or 'not started'}")
        self.stats.writes += 1
        try:
            async with asyncio.timeout(self._write_timeout_s):
                await self._driver.write(
                    point, value, correlation_id=command.correlation_id, hold_until=command.hold_until
                )
        except RequestRejected as err:
            return result(CommandStatus.FAILED, _describe(err))
        except DeviceProtocolError as err:
            return result(CommandStatus.REJECTED, _describe(err))
        except (DeviceUnavailable, TimeoutError) as err:
            reason = _describe(err)
            if reason == "timed out":
                reason = f"no acknowledgement within {self._write_timeout_s:g} s"
            return result(CommandStatus.TIMEOUT, f"{reason}; the value may or may not have been applied")
        except DeviceError as err:
            return result(CommandStatus.REJECTED, _describe(err))
        return await self._verify(point, value, result)

    async def _verify(
        self,
        point: PointId,
        value: float,
        result: Callable[..., CommandResult],
    ) -> CommandResult:
        loop = asyncio.get_running_loop()
        tolerance = self._write_tolerance(point, value)
        deadline_s = loop.time() + self._write_timeout_s
        readback: float | None = None
        error = ""
        while True:
            try:
                async with asyncio.timeout(max(0.001, deadline_s - loop.time())):
                    readback = await self._driver.read_back(point)
                error = ""
            except (DeviceError, TimeoutError) as err:
                error = _describe(err)
            if readback is not None and abs(readback - value) <= tolerance:
                return result(CommandStatus.VERIFIED, readback=readback)
            if loop.time() + _READBACK_RETRY_S >= deadline_s:
                break
            await asyncio.sleep(_READBACK_RETRY_S)
        if readback is None:
            return result(CommandStatus.UNVERIFIED, f"acknowledged, but the read-back failed: {error}")
        return result(
            CommandStatus.MISMATCH,
            f"acknowledged, but the device holds {readback:g} (requested {value:g}, tolerance {tolerance:g})",
            readback=readback,
        )


def _subscribing(driver: Driver) -> SubscriptionDriver:
    if not isinstance(driver, SubscriptionDriver):
        raise TypeError(f"{driver.device}: a subscribing driver must implement receive()")
    return driver


def _default_tolerance(_point: PointId, value: float) -> float:
    return 1e-6 * abs(value) + 1e-9


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError) and not str(err):
        return "timed out"
    return str(err) or type(err).__name__
