"""Anomaly injection on top of device physics, with ground-truth labels for the detectors' tests.

An :class:`AnomalyInjector` is attached to one device's physics as its value layer
(:meth:`~simulators.physics.DevicePhysics.attach`): it changes what the device *reports*, never the
physics underneath, so a summing meter or a battery's state is not disturbed by a faulty register.

Five kinds, each over ``[start, start + duration)``:

============  =====================================================================================
spike         adds ``magnitude`` (a short burst: 120 s unless told)
stuck         freezes the point at the value it had when the anomaly started
drift         adds a ramp from 0 to ``magnitude`` over the duration, then snaps back
level_shift   adds ``magnitude`` for the duration (real extra load: its counter grows too)
night_load    adds ``magnitude`` during local night hours (22:00-06:00 unless told) inside the
              window (real extra load: its counter grows too); one label per night
============  =====================================================================================

``magnitude`` is in the point's unit; ``magnitude_pct`` instead takes a percentage of the point's
value when the anomaly starts. **Counters stay consistent**: an anomaly with a ``counter`` (by
default ``energy_import_kwh`` for a ``*_kw`` point and ``gas_volume_nm3`` for a ``*_nm3_h`` point,
for ``level_shift`` and ``night_load``) integrates its extra rate into that counter with the
trapezoid rule, so an extra night load raises the kWh counter by exactly ``kW x hours``.

Anomalies come from the site document (``simulation.anomalies``) and/or a seeded random schedule
(``simulation.random_anomalies``), which is a pure function of (seed, local day): the same seed
gives the same anomalies on the same days. Each anomaly, when it starts in simulated time, yields
one :class:`AnomalyLabel` (device, point, type, start, end, magnitude...); the plant writes them to a
JSON-lines file (:class:`LabelFile`) so detectors can be scored against ground truth.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

from simulators.physics import DevicePhysics, hash_unit

__all__ = [
    "AnomalyConfigError",
    "AnomalyInjector",
    "AnomalyLabel",
    "AnomalySpec",
    "AnomalyType",
    "LabelFile",
    "RandomAnomalies",
    "default_counter",
    "parse_anomalies",
    "parse_random_anomalies",
    "parse_start",
]


class AnomalyType(enum.StrEnum):
    """What an injected anomaly does to a point."""

    SPIKE = "spike"
    STUCK = "stuck"
    DRIFT = "drift"
    LEVEL_SHIFT = "level_shift"
    NIGHT_LOAD = "night_load"


DEFAULT_DURATION_S: Final[Mapping[AnomalyType, float]] = {
    AnomalyType.SPIKE: 120.0,
    AnomalyType.STUCK: 1800.0,
    AnomalyType.DRIFT: 3 * 3600.0,
    AnomalyType.LEVEL_SHIFT: 2 * 3600.0,
    AnomalyType.NIGHT_LOAD: 24 * 3600.0,
}
"""Duration of an anomaly that names none (a spike must outlast a poll even at 60x speed)."""

DEFAULT_RANDOM_MAGNITUDE_PCT: Final[Mapping[AnomalyType, float]] = {
    AnomalyType.SPIKE: 200.0,
    AnomalyType.STUCK: 0.0,
    AnomalyType.DRIFT: 30.0,
    AnomalyType.LEVEL_SHIFT: 30.0,
    AnomalyType.NIGHT_LOAD: 50.0,
}
"""Size of a random anomaly, in % of the point's value when it starts."""

_INTEGRATING: Final = frozenset({AnomalyType.LEVEL_SHIFT, AnomalyType.NIGHT_LOAD})
_COUNTER_OF_RATE: Final = (("_kw", "energy_import_kwh"), ("_nm3_h", "gas_volume_nm3"))
_OFFSET_RE: Final = re.compile(r"^\+?(\d+(?:\.\d+)?)\s*(s|min|h|d)?$")
_SECONDS: Final[Mapping[str, float]] = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


class AnomalyConfigError(ValueError):
    """An anomaly entry cannot be used; ``field`` is the path of the bad field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True, kw_only=True)
class AnomalySpec:
    """One anomaly to inject: what, where, when and how big."""

    device: str
    point: str
    type: AnomalyType
    start: datetime
    duration_s: float
    magnitude: float | None = None
    """Size in the point's unit; for ``stuck`` unused."""
    magnitude_pct: float | None = None
    """Size in % of the point's value when the anomaly starts (instead of ``magnitude``)."""
    counter: str | None = None
    """Counter that integrates the extra rate; None: no counter changes."""
    night_start_hour: float = 22.0
    night_end_hour: float = 6.0
    source: str = "configured"
    """``configured`` (site document) or ``random`` (seeded schedule)."""

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError("duration must be > 0")
        if self.type is not AnomalyType.STUCK and (self.magnitude is None) == (self.magnitude_pct is None):
            raise ValueError(f"a {self.type.value} anomaly needs exactly one of magnitude or magnitude_pct")
        for hour in (self.night_start_hour, self.night_end_hour):
            if not 0 <= hour < 24:
                raise ValueError("night hours must be in [0, 24)")

    @property
    def end(self) -> datetime:
        """Return the end of the anomaly's window (exclusive)."""
        return self.start + timedelta(seconds=self.duration_s)

    def intervals(self, tz: ZoneInfo) -> Iterator[tuple[datetime, datetime]]:
        """Yield the (start, end) intervals in which the anomaly acts: nights for ``night_load``.

        >>> from datetime import UTC
        >>> spec = AnomalySpec(device="d", point="p", type=AnomalyType.NIGHT_LOAD,
        ...     start=datetime(2026, 3, 4, 12, tzinfo=UTC), duration_s=86400.0, magnitude=5.0)
        >>> [(a.hour, b.hour) for a, b in spec.intervals(ZoneInfo("UTC"))]
        [(22, 6)]
        """
        if self.type is not AnomalyType.NIGHT_LOAD:
            yield self.start, self.end
            return
        first = self.start.astimezone(tz).date() - timedelta(days=1)
        last = self.end.astimezone(tz).date()
        day = first
        while day <= last:
            night_from = _local(day, self.night_start_hour, tz)
            night_to = _local(day, self.night_end_hour, tz)
            if night_to <= night_from:
                night_to = _local(day + timedelta(days=1), self.night_end_hour, tz)
            begin, finish = max(night_from, self.start), min(night_to, self.end)
            if begin < finish:
                yield begin, finish
            day += timedelta(days=1)


def _local(day: date, hour: float, tz: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz) + timedelta(hours=hour)


@dataclass(frozen=True, slots=True, kw_only=True)
class AnomalyLabel:
    """Ground truth of one injected anomaly interval, as written to the labels file."""

    device: str
    point: str
    type: AnomalyType
    start: datetime
    end: datetime
    magnitude: float | None
    """Absolute size in the point's unit (None for ``stuck``)."""
    value_at_start: float
    """The point's physical value when the anomaly started (the frozen value of ``stuck``)."""
    counter: str | None
    source: str

    def to_json(self) -> dict[str, Any]:
        """Return the label as a JSON-ready mapping (times in ISO 8601 UTC)."""
        return {
            "device": self.device,
            "point": self.point,
            "type": self.type.value,
            "start": self.start.astimezone(ZoneInfo("UTC")).isoformat(),
            "end": self.end.astimezone(ZoneInfo("UTC")).isoformat(),
            "magnitude": self.magnitude,
            "value_at_start": self.value_at_start,
            "counter": self.counter,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RandomAnomalies:
    """A seeded random schedule: on average ``per_day`` anomalies a day on one device."""

    per_day: float
    seed: int
    types: tuple[AnomalyType, ...] = tuple(AnomalyType)
    points: tuple[str, ...] = ("active_power_kw",)
    magnitude_pct: float | None = None
    """Size of every random anomaly in %; None: a default per type."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_day) and 0 < self.per_day <= 1000):
            raise ValueError("per_day must be in (0, 1000]")
        if not self.types or not self.points:
            raise ValueError("types and points must not be empty")

    def specs_for_day(self, device: str, day: date, tz: ZoneInfo) -> list[AnomalySpec]:
        """Return the anomalies starting on a local ``day``: a pure function of (seed, day).

        >>> r = RandomAnomalies(per_day=3.0, seed=7)
        >>> tz = ZoneInfo("Asia/Shanghai")
        >>> r.specs_for_day("m", date(2026, 3, 4), tz) == r.specs_for_day("m", date(2026, 3, 4), tz)
        True
        """
        ordinal = day.toordinal()
        count = _poisson(self.per_day, _unit(self.seed, 1, ordinal))
        midnight = _local(day, 0.0, tz)
        specs = []
        for i in range(count):
            index = ordinal * 1024 + i
            kind = self.types[int(_unit(self.seed, 3, index) * len(self.types))]
            point = self.points[int(_unit(self.seed, 4, index) * len(self.points))]
            if kind is AnomalyType.NIGHT_LOAD:  # one night, from 22:00
                start, duration_s = midnight + timedelta(hours=22), 8 * 3600.0
            else:
                start = midnight + timedelta(seconds=int(_unit(self.seed, 2, index) * 86400.0))
                duration_s = DEFAULT_DURATION_S[kind]
            pct = self.magnitude_pct if self.magnitude_pct is not None else DEFAULT_RANDOM_MAGNITUDE_PCT[kind]
            specs.append(
                AnomalySpec(
                    device=device,
                    point=point,
                    type=kind,
                    start=start,
                    duration_s=duration_s,
                    magnitude_pct=None if kind is AnomalyType.STUCK else pct,
                    counter=default_counter(kind, point),
                    source="random",
                )
            )
        return specs


def _unit(seed: int, channel: int, index: int) -> float:
    """Return a reproducible number in [0, 1)."""
    return min(0.999_999_999, (hash_unit(seed, channel, index) + 1.0) / 2.0)


def _poisson(mean: float, u: float) -> int:
    """Return the Poisson(mean) count at quantile ``u`` (inversion; capped for huge means)."""
    probability = math.exp(-mean)
    cumulative, count = probability, 0
    while u > cumulative and count < 10 * mean + 50:
        count += 1
        probability *= mean / count
        cumulative += probability
    return count


def default_counter(kind: AnomalyType, point: str) -> str | None:
    """Return the counter a real extra load on ``point`` integrates into (None: a sensor fault).

    >>> default_counter(AnomalyType.NIGHT_LOAD, "active_power_kw")
    'energy_import_kwh'
    >>> default_counter(AnomalyType.SPIKE, "active_power_kw") is None
    True
    """
    if kind not in _INTEGRATING:
        return None
    for suffix, counter in _COUNTER_OF_RATE:
        if point.endswith(suffix):
            return counter
    return None


@dataclass(slots=True)
class _Active:
    """One anomaly interval in progress, with what was resolved when it started."""

    spec: AnomalySpec
    start: datetime
    end: datetime
    magnitude: float
    frozen: float


@dataclass(slots=True)
class _Entry:
    """A known anomaly, its intervals, and which of them have begun."""

    spec: AnomalySpec
    intervals: list[tuple[datetime, datetime]]
    begun: set[datetime] = field(default_factory=set)


@dataclass(slots=True)
class _CounterState:
    extra_rate: float = 0.0
    total: float = 0.0


class AnomalyInjector:
    """The value layer of one device: applies its anomalies and records their labels.

    ``advance`` (called by the physics after every step) finds the anomaly intervals that contain
    the new instant, resolves their size on first sight and emits one label for each; ``adjust``
    (called for every value the device reports) applies them.
    """

    def __init__(
        self,
        device: str,
        specs: Sequence[AnomalySpec] = (),
        *,
        tz: ZoneInfo,
        random: RandomAnomalies | None = None,
    ) -> None:
        self.device = device
        self.tz = tz
        self._entries = [_Entry(s, list(s.intervals(tz))) for s in specs]
        self._random = random
        self._scheduled_days: set[int] = set()
        self._active: list[_Active] = []
        self._offsets: dict[str, float] = {}
        self._frozen: dict[str, float] = {}
        self._counters: dict[str, _CounterState] = {}
        self._pending: list[AnomalyLabel] = []

    @property
    def specs(self) -> tuple[AnomalySpec, ...]:
        """Return the anomalies not yet over for long (random ones appear day by day)."""
        return tuple(entry.spec for entry in self._entries)

    def drain_labels(self) -> list[AnomalyLabel]:
        """Return the labels emitted since the last call."""
        labels, self._pending = self._pending, []
        return labels

    def advance(self, physics: DevicePhysics, now: datetime, dt_h: float) -> None:
        """Move to ``now``: start and end anomaly intervals, integrate extra rates into counters."""
        self._schedule_random(now)
        for entry in self._entries:
            for begin, finish in entry.intervals:
                if begin <= now < finish and begin not in entry.begun:
                    entry.begun.add(begin)
                    self._active.append(self._begin(physics, entry.spec, begin, finish))
        self._active = [a for a in self._active if a.start <= now < a.end]
        horizon = now - timedelta(days=2)  # keep memory bounded on long runs
        self._entries = [e for e in self._entries if e.spec.end > horizon]
        self._offsets.clear()
        self._frozen.clear()
        rates: dict[str, float] = {}
        for active in self._active:
            spec = active.spec
            if spec.type is AnomalyType.STUCK:
                self._frozen[spec.point] = active.frozen
                continue
            extra = active.magnitude
            if spec.type is AnomalyType.DRIFT:
                extra *= (now - active.start) / (active.end - active.start)
            self._offsets[spec.point] = self._offsets.get(spec.point, 0.0) + extra
            if spec.counter is not None:
                rates[spec.counter] = rates.get(spec.counter, 0.0) + extra
        for counter in rates.keys() | self._counters.keys():
            state = self._counters.setdefault(counter, _CounterState())
            rate = rates.get(counter, 0.0)
            state.total += (state.extra_rate + rate) / 2.0 * dt_h
            state.extra_rate = rate

    def adjust(self, key: str, value: float) -> float:
        """Return what the device reports for ``key`` when its physics holds ``value``."""
        if key in self._frozen:
            return self._frozen[key]
        counter = self._counters.get(key)
        return value + self._offsets.get(key, 0.0) + (counter.total if counter is not None else 0.0)

    def _begin(self, physics: DevicePhysics, spec: AnomalySpec, begin: datetime, finish: datetime) -> _Active:
        value = physics.physical_value(spec.point)
        if spec.magnitude is not None:
            magnitude = spec.magnitude
        elif spec.magnitude_pct is not None:
            magnitude = spec.magnitude_pct / 100.0 * abs(value)
        else:
            magnitude = 0.0
        self._pending.append(
            AnomalyLabel(
                device=self.device,
                point=spec.point,
                type=spec.type,
                start=begin,
                end=finish,
                magnitude=None if spec.type is AnomalyType.STUCK else magnitude,
                value_at_start=value,
                counter=spec.counter,
                source=spec.source,
            )
        )
        return _Active(spec=spec, start=begin, end=finish, magnitude=magnitude, frozen=value)

    def _schedule_random(self, now: datetime) -> None:
        if self._random is None:
            return
        today = now.astimezone(self.tz).date()
        self._scheduled_days = {d for d in self._scheduled_days if d >= today.toordinal() - 2}
        for day in (today - timedelta(days=1), today):
            if day.toordinal() not in self._scheduled_days:
                self._scheduled_days.add(day.toordinal())
                specs = self._random.specs_for_day(self.device, day, self.tz)
                self._entries.extend(_Entry(s, list(s.intervals(self.tz))) for s in specs)


@dataclass(slots=True)
class LabelFile:
    """Ground-truth labels as JSON lines, one object per anomaly interval.

    One run, one file: the first :meth:`write` (or an explicit :meth:`truncate`) empties it, later
    ones append. Both are blocking file I/O: the plant calls them in a worker thread.
    """

    path: Path
    written: int = field(default=0, init=False)
    _truncated: bool = field(default=False, init=False)

    def truncate(self) -> None:
        """Create or empty the file (raises OSError if it cannot be written)."""
        self.path.write_text("", encoding="utf-8")
        self._truncated = True

    def write(self, labels: Sequence[AnomalyLabel]) -> None:
        """Append ``labels`` to the file."""
        if not self._truncated:
            self.truncate()
        if not labels:
            return
        with self.path.open("a", encoding="utf-8") as out:
            out.writelines(json.dumps(label.to_json(), ensure_ascii=False) + "\n" for label in labels)
        self.written += len(labels)


# --------------------------------------------------------------------------------------------------
# The site document's ``simulation.anomalies`` and ``simulation.random_anomalies``


def parse_start(raw: Any, *, where: str, tz: ZoneInfo, plant_start: datetime) -> datetime:
    """Return an anomaly's start from an offset after the plant's start, or from an ISO time.

    An offset is a number of seconds or a string like ``30s``, ``15min``, ``2h``, ``1d``; an ISO
    8601 time without an offset is in the site's zone.

    >>> from datetime import UTC
    >>> t0 = datetime(2026, 3, 4, tzinfo=UTC)
    >>> parse_start("90min", where="start", tz=ZoneInfo("UTC"), plant_start=t0).isoformat()
    '2026-03-04T01:30:00+00:00'
    >>> parse_start("2026-03-04T22:00", where="start", tz=ZoneInfo("Asia/Shanghai"), plant_start=t0).hour
    22
    """
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise AnomalyConfigError(where, f"expected seconds, an offset like '2h' or an ISO time, got {raw!r}")
    if isinstance(raw, int | float):
        if not (math.isfinite(raw) and raw >= 0):
            raise AnomalyConfigError(where, f"an offset must be >= 0 seconds, got {raw!r}")
        return plant_start + timedelta(seconds=float(raw))
    match = _OFFSET_RE.match(raw.strip())
    if match:
        return plant_start + timedelta(seconds=float(match[1]) * _SECONDS[match[2] or "s"])
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise AnomalyConfigError(
            where, f"expected seconds, an offset like '2h' or an ISO time, got {raw!r}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=tz)


def _number(raw: Mapping[str, Any], name: str, path: str) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AnomalyConfigError(f"{path}.{name}", f"expected a number, got {value!r}")
    return float(value)


def _text(raw: Mapping[str, Any], name: str, path: str) -> str | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, str):
        raise AnomalyConfigError(f"{path}.{name}", f"expected a string, got {value!r}")
    return value


def _kind(value: Any, path: str) -> AnomalyType:
    try:
        return AnomalyType(value)
    except ValueError:
        allowed = ", ".join(t.value for t in AnomalyType)
        raise AnomalyConfigError(path, f"unknown anomaly type {value!r} (use {allowed})") from None


def parse_anomalies(
    device: str, raw: Any, *, path: str, tz: ZoneInfo, plant_start: datetime
) -> list[AnomalySpec]:
    """Turn a device's ``simulation.anomalies`` list into specs; raise :class:`AnomalyConfigError`."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise AnomalyConfigError(path, "expected a list")
    specs = []
    for i, entry in enumerate(raw):
        where = f"{path}[{i}]"
        if not isinstance(entry, Mapping):
            raise AnomalyConfigError(where, "expected a mapping")
        kind = _kind(entry.get("type"), f"{where}.type")
        point = _text(entry, "point", where) or "active_power_kw"
        duration_s, duration_min = _number(entry, "duration_s", where), _number(entry, "duration_min", where)
        if duration_s is not None and duration_min is not None:
            raise AnomalyConfigError(f"{where}.duration_min", "give duration_s or duration_min, not both")
        duration = duration_s if duration_min is None else duration_min * 60.0
        counter = _text(entry, "counter", where) or default_counter(kind, point)
        fields: dict[str, Any] = {
            "device": device,
            "point": point,
            "type": kind,
            "start": parse_start(
                entry.get("start", 0), where=f"{where}.start", tz=tz, plant_start=plant_start
            ),
            "duration_s": DEFAULT_DURATION_S[kind] if duration is None else duration,
            "magnitude": _number(entry, "magnitude", where),
            "magnitude_pct": _number(entry, "magnitude_pct", where),
            "counter": counter,
        }
        for name in ("night_start_hour", "night_end_hour"):
            hour = _number(entry, name, where)
            if hour is not None:
                fields[name] = hour
        try:
            specs.append(AnomalySpec(**fields))
        except ValueError as err:
            raise AnomalyConfigError(where, str(err)) from None
    return specs


def parse_random_anomalies(raw: Any, *, path: str, default_seed: int) -> RandomAnomalies | None:
    """Turn a device's ``simulation.random_anomalies`` into a schedule (None when absent)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise AnomalyConfigError(path, "expected a mapping")
    per_day = _number(raw, "per_day", path)
    if per_day is None:
        raise AnomalyConfigError(f"{path}.per_day", "missing")
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise AnomalyConfigError(f"{path}.seed", f"expected an integer, got {seed!r}")
    fields: dict[str, Any] = {"per_day": per_day, "seed": default_seed if seed is None else seed}
    if raw.get("types") is not None:
        if not isinstance(raw["types"], list):
            raise AnomalyConfigError(f"{path}.types", "expected a list")
        fields["types"] = tuple(_kind(t, f"{path}.types[{i}]") for i, t in enumerate(raw["types"]))
    if raw.get("points") is not None:
        points = raw["points"]
        if not isinstance(points, list) or not all(isinstance(p, str) for p in points):
            raise AnomalyConfigError(f"{path}.points", "expected a list of point keys")
        fields["points"] = tuple(points)
    fields["magnitude_pct"] = _number(raw, "magnitude_pct", path)
    try:
        return RandomAnomalies(**fields)
    except ValueError as err:
        raise AnomalyConfigError(path, str(err)) from None
