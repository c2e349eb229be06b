"""Alarm system performance KPIs per console (ISA-18.2 section 16 / EEMUA 191), from the event history.

An *alarm* here is an activation: an event that takes an alarm into ACTIVE_UNACK
(:attr:`AlarmEvent.is_activation`), annunciated or grouped. Rates are counted over fixed periods
aligned on the window start (10 minutes by default, as ISA-18.2 measures floods):

- ``alarms_per_hour_avg``: activations per hour over the window;
- ``alarms_per_10min_peak`` / ``annunciated_per_10min_peak``: the busiest period, all activations
  and only those the console annunciated (grouped ones left out);
- ``flood_periods_pct``: share of periods with more than ``flood_threshold`` activations;
- ``bad_actors``: the alarms with most activations, and their share of all;
- ``chattering``: alarms that activated ``ChatterPolicy.activations`` times within its window, or
  whose events carry the chattering flag;
- ``stale``: alarms active (acknowledged or not) for longer than ``stale_after_s`` at the window end,
  judged from every event given up to then (pass enough history to see when they became active);
- ``priority_distribution``: activations per priority (ISA-18.2 suggests about 80 % low, 15 %
  medium, 5 % high).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .alarm_model import (
    AlarmEvent,
    AlarmInputError,
    AlarmPriority,
    AlarmState,
    ChatterPolicy,
    EventCause,
    Instant,
    from_epoch_s,
    to_epoch_s,
)

__all__ = ["AlarmKpis", "BadActor", "StaleAlarm", "compute_kpis", "compute_kpis_by_console"]

_ACTIVE = (AlarmState.ACTIVE_UNACK, AlarmState.ACTIVE_ACK)


@dataclass(frozen=True, slots=True, kw_only=True)
class BadActor:
    """An alarm among the most frequent, with its activations and share of the console's."""

    alarm_id: str
    activations: int
    share_pct: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleAlarm:
    """An alarm that has been active for longer than the stale limit."""

    alarm_id: str
    active_since: datetime
    active_for_s: float
    state: AlarmState


@dataclass(frozen=True, slots=True, kw_only=True)
class AlarmKpis:
    """Alarm system KPIs of one console over one window."""

    console: str
    start: datetime
    end: datetime
    period_s: float
    periods: int
    activations: int
    annunciated: int
    grouped: int
    alarms_per_hour_avg: float
    alarms_per_10min_peak: int
    """Peak activations in one period (``period_s``, 10 minutes by default)."""
    annunciated_per_10min_peak: int
    flood_periods: int
    flood_periods_pct: float
    bad_actors: tuple[BadActor, ...]
    chattering: tuple[str, ...]
    stale: tuple[StaleAlarm, ...]
    priority_distribution: tuple[tuple[str, int], ...]
    """Activations per priority name, critical first."""

    def priority_pct(self) -> dict[str, float]:
        """Return the priority distribution as percentages of the activations."""
        total = self.activations
        return {name: (100.0 * n / total if total else 0.0) for name, n in self.priority_distribution}

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-able data for the API."""
        return {
            "console": self.console,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "period_s": self.period_s,
            "periods": self.periods,
            "activations": self.activations,
            "annunciated": self.annunciated,
            "grouped": self.grouped,
            "alarms_per_hour_avg": self.alarms_per_hour_avg,
            "alarms_per_10min_peak": self.alarms_per_10min_peak,
            "annunciated_per_10min_peak": self.annunciated_per_10min_peak,
            "flood_periods": self.flood_periods,
            "flood_periods_pct": self.flood_periods_pct,
            "bad_actors": [
                {"alarm_id": b.alarm_id, "activations": b.activations, "share_pct": b.share_pct}
                for b in self.bad_actors
            ],
            "chattering": list(self.chattering),
            "stale": [
                {
                    "alarm_id": s.alarm_id,
                    "active_since": s.active_since.isoformat(),
                    "active_for_s": s.active_for_s,
                    "state": s.state.value,
                }
                for s in self.stale
            ],
            "priority_distribution": dict(self.priority_distribution),
            "priority_pct": self.priority_pct(),
        }


def _chattering_ids(times_by_alarm: dict[str, list[float]], policy: ChatterPolicy) -> set[str]:
    found: set[str] = set()
    for alarm_id, times in times_by_alarm.items():
        recent: deque[float] = deque(maxlen=policy.activations)
        for t in times:
            recent.append(t)
            if len(recent) == policy.activations and t - recent[0] < policy.window_s:
                found.add(alarm_id)
                break
    return found


def compute_kpis(
    events: Iterable[AlarmEvent],
    *,
    console: str,
    start: Instant,
    end: Instant,
    period_s: float = 600.0,
    flood_threshold: int = 10,
    top_n: int = 10,
    stale_after_s: float = 86_400.0,
    chatter: ChatterPolicy | None = None,
) -> AlarmKpis:
    """Return the KPIs of ``console`` over ``[start, end)`` from its alarm events.

    Examples
    --------
    >>> kpis = compute_kpis([], console="cr-1", start=0, end=3600)
    >>> kpis.periods, kpis.alarms_per_hour_avg, kpis.flood_periods_pct
    (6, 0.0, 0.0)
    """
    start_s = to_epoch_s(start, field="start")
    end_s = to_epoch_s(end, field="end")
    if not end_s > start_s:
        raise AlarmInputError(f"end: must be after start, got a {end_s - start_s:g} s window")
    if not (math.isfinite(period_s) and period_s > 0):
        raise AlarmInputError(f"period_s: must be > 0, got {period_s}")
    policy = chatter or ChatterPolicy()
    periods = math.ceil((end_s - start_s) / period_s)
    per_period = [0] * periods
    annunciated_per_period = [0] * periods
    per_alarm: Counter[str] = Counter()
    per_priority: Counter[AlarmPriority] = Counter()
    condition_times: dict[str, list[float]] = {}
    flagged: set[str] = set()
    active_since: dict[str, tuple[float, AlarmState]] = {}
    annunciated = 0
    mine = sorted((e for e in events if e.console == console), key=lambda e: (e.at, e.seq))
    for event in mine:
        t = event.at.timestamp()
        if t >= end_s:
            break
        if event.to_state in _ACTIVE:
            since = active_since.get(event.alarm_id, (t, event.to_state))[0]
            active_since[event.alarm_id] = (since, event.to_state)
        else:
            active_since.pop(event.alarm_id, None)
        if t < start_s:
            continue
        if event.chattering:
            flagged.add(event.alarm_id)
        if not event.is_activation:
            continue
        index = int((t - start_s) // period_s)
        per_period[index] += 1
        per_alarm[event.alarm_id] += 1
        per_priority[event.priority] += 1
        if event.annunciated:
            annunciated += 1
            annunciated_per_period[index] += 1
        if event.cause is EventCause.ACTIVATE:
            condition_times.setdefault(event.alarm_id, []).append(t)
    activations = sum(per_period)
    flood_periods = sum(1 for n in per_period if n > flood_threshold)
    bad_actors = tuple(
        BadActor(alarm_id=alarm_id, activations=n, share_pct=100.0 * n / activations)
        for alarm_id, n in sorted(per_alarm.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
    )
    stale = tuple(
        StaleAlarm(
            alarm_id=alarm_id, active_since=from_epoch_s(since), active_for_s=end_s - since, state=state
        )
        for alarm_id, (since, state) in sorted(active_since.items(), key=lambda kv: (kv[1][0], kv[0]))
        if end_s - since > stale_after_s
    )
    return AlarmKpis(
        console=console,
        start=from_epoch_s(start_s),
        end=from_epoch_s(end_s),
        period_s=period_s,
        periods=periods,
        activations=activations,
        annunciated=annunciated,
        grouped=activations - annunciated,
        alarms_per_hour_avg=activations * 3600.0 / (end_s - start_s),
        alarms_per_10min_peak=max(per_period),
        annunciated_per_10min_peak=max(annunciated_per_period),
        flood_periods=flood_periods,
        flood_periods_pct=100.0 * flood_periods / periods,
        bad_actors=bad_actors,
        chattering=tuple(sorted(flagged | _chattering_ids(condition_times, policy))),
        stale=stale,
        priority_distribution=tuple((p.name.lower(), per_priority[p]) for p in AlarmPriority),
    )


def compute_kpis_by_console(
    events: Iterable[AlarmEvent], *, start: Instant, end: Instant, **options: Any
) -> dict[str, AlarmKpis]:
    """Return :func:`compute_kpis` for every console that appears in ``events``."""
    by_console: dict[str, list[AlarmEvent]] = {}
    for event in events:  # one pass, not one pass over every event per console
        by_console.setdefault(event.console, []).append(event)
    return {
        c: compute_kpis(by_console[c], console=c, start=start, end=end, **options) for c in sorted(by_console)
    }
