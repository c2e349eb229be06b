"""Alarm flood detection and the per-console annunciation budget.

ISA-18.2 calls a console *in flood* when it receives more than 10 alarms in 10 minutes. Here a
console's alarms are its *activations*: every transition of one of its alarms into ACTIVE_UNACK.

- **Flood.** The console is in flood while more than ``flood_threshold`` activations fall in the
  sliding window ``(t - window_s, t]``. It enters flood at the activation that makes the count
  exceed the threshold and leaves it at the instant the oldest activation ages out and the count is
  back at the threshold, so the time in flood is exact whatever the caller's sampling.
- **Budget.** At most ``max_annunciated`` activations are *annunciated* (shown as a new line on the
  console) in any sliding window. An activation beyond the budget is *grouped* under a parent the
  engine chooses (same device, same node subtree, else the flood's first-out alarm), so the console
  never shows more than ``max_annunciated`` new alarms per window.

:class:`ConsoleFlood` is the bookkeeping of one console; it is pure and deterministic.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from scada.model import ConfigError

from .alarm_model import AlarmPriority

__all__ = ["ConsoleFlood", "FloodInterval", "FloodPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FloodPolicy:
    """Flood definition and annunciation budget of every console (ISA-18.2 defaults)."""

    window_s: float = 600.0
    flood_threshold: int = 10
    """A console is in flood while it has *more* than this many activations in the window."""
    max_annunciated: int = 10
    """Most activations annunciated on a console in any window; the rest are grouped."""
    always_annunciate: AlarmPriority | None = None
    """Priorities at or above this one (e.g. CRITICAL) bypass grouping; None keeps the bound strict."""
    history: int = 100
    """Closed flood intervals kept per console (oldest dropped first)."""

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ConfigError(f"flood policy: window_s: must be > 0, got {self.window_s}")
        if self.flood_threshold < 1:
            raise ConfigError(f"flood policy: flood_threshold: must be >= 1, got {self.flood_threshold}")
        if self.max_annunciated < 1:
            raise ConfigError(f"flood policy: max_annunciated: must be >= 1, got {self.max_annunciated}")
        if self.history < 0:
            raise ConfigError(f"flood policy: history: must be >= 0, got {self.history}")

    def bypasses(self, priority: AlarmPriority) -> bool:
        """Return True when an alarm of this priority is annunciated even beyond the budget."""
        return self.always_annunciate is not None and priority <= self.always_annunciate


@dataclass(frozen=True, slots=True)
class FloodInterval:
    """One closed flood of a console, epoch seconds."""

    start_s: float
    end_s: float
    first_out: str

    @property
    def duration_s(self) -> float:
        """Return the length of the flood."""
        return self.end_s - self.start_s


class ConsoleFlood:
    """Sliding-window activation counts, flood state and time in flood of one console.

    >>> flood = ConsoleFlood(FloodPolicy(flood_threshold=2, max_annunciated=2, window_s=10))
    >>> [flood.admit(f"a{i}", float(i)) for i in range(4)]
    [True, True, False, False]
    >>> flood.in_flood, flood.first_out
    (True, 'a0')
    >>> flood.advance(12.5)
    >>> flood.in_flood, flood.flood_time_s(12.5), flood.intervals[-1].end_s
    (False, 9.0, 11.0)
    """

    __slots__ = (
        "_activations",
        "_annunciated",
        "_closed_s",
        "_last_s",
        "_policy",
        "first_out",
        "flood_start_s",
        "intervals",
    )

    def __init__(self, policy: FloodPolicy) -> None:
        self._policy = policy
        self._activations: deque[tuple[float, str]] = deque()
        self._annunciated: deque[float] = deque()
        self._closed_s = 0.0
        self._last_s = float("-inf")
        self.flood_start_s: float | None = None
        self.first_out: str | None = None
        """The oldest activation in the window when the current flood began."""
        self.intervals: deque[FloodInterval] = deque(maxlen=policy.history or None)

    @property
    def in_flood(self) -> bool:
        """Return True while the console is in flood."""
        return self.flood_start_s is not None

    @property
    def activations_in_window(self) -> int:
        """Return the activations in the current window (as of the last advance)."""
        return len(self._activations)

    @property
    def annunciated_in_window(self) -> int:
        """Return the annunciated activations in the current window (as of the last advance)."""
        return len(self._annunciated)

    def flood_time_s(self, now_s: float) -> float:
        """Return the total time this console has been in flood, up to ``now_s``."""
        open_s = 0.0 if self.flood_start_s is None else max(0.0, now_s - self.flood_start_s)
        return self._closed_s + open_s

    def advance(self, now_s: float) -> None:
        """Age out activations older than the window; close the flood at the exact instant it ends."""
        now_s = max(now_s, self._last_s)  # activations from one batch may arrive slightly out of order
        self._last_s = now_s
        horizon = now_s - self._policy.window_s
        threshold = self._policy.flood_threshold
        activations = self._activations
        while activations and activations[0][0] <= horizon:
            aged_s, _ = activations.popleft()
            if self.flood_start_s is not None and len(activations) <= threshold:
                self._close(aged_s + self._policy.window_s)
        annunciated = self._annunciated
        while annunciated and annunciated[0] <= horizon:
            annunciated.popleft()

    def admit(self, alarm_id: str, at_s: float, *, bypass: bool = False) -> bool:
        """Count one activation; return True when it is annunciated, False when it must be grouped."""
        self.advance(at_s)
        at_s = self._last_s
        self._activations.append((at_s, alarm_id))
        if self.flood_start_s is None and len(self._activations) > self._policy.flood_threshold:
            self.flood_start_s = at_s
            self.first_out = self._activations[0][1]
        if bypass or len(self._annunciated) < self._policy.max_annunciated:
            self._annunciated.append(at_s)
            return True
        return False

    def _close(self, end_s: float) -> None:
        assert self.flood_start_s is not None
        self._closed_s += end_s - self.flood_start_s
        self.intervals.append(FloodInterval(self.flood_start_s, end_s, self.first_out or ""))
        self.flood_start_s = None
        self.first_out = None

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-able state for a snapshot."""
        return {
            "activations": [[t, a] for t, a in self._activations],
            "annunciated": list(self._annunciated),
            "closed_s": self._closed_s,
            "last_s": None if self._last_s == float("-inf") else self._last_s,
            "flood_start_s": self.flood_start_s,
            "first_out": self.first_out,
            "intervals": [[i.start_s, i.end_s, i.first_out] for i in self.intervals],
        }

    @classmethod
    def from_dict(cls, policy: FloodPolicy, data: dict[str, Any]) -> ConsoleFlood:
        """Return the console state saved by :meth:`to_dict`."""
        flood = cls(policy)
        flood._activations.extend((float(t), str(a)) for t, a in data["activations"])
        flood._annunciated.extend(float(t) for t in data["annunciated"])
        flood._closed_s = float(data["closed_s"])
        flood._last_s = float("-inf") if data["last_s"] is None else float(data["last_s"])
        flood.flood_start_s = None if data["flood_start_s"] is None else float(data["flood_start_s"])
        flood.first_out = data["first_out"]
        flood.intervals.extend(FloodInterval(float(s), float(e), str(f)) for s, e, f in data["intervals"])
        return flood
