"""Pure maths of history queries: source choice, downsampling with gaps, counter deltas.

Nothing here does I/O: :mod:`streams.store` fetches rows and hands them to these functions, and the
bench and tests call them directly.

Samples
-------
A series is a sequence of ``(t, v)`` pairs, ``t`` in seconds (any epoch, ascending) and ``v`` a float,
or None for a *gap*: a bad-quality reading or a bucket without good values. Downsampling never draws
across a gap: the series is split into runs of values at its gaps, each run is downsampled on its
own, and each gap keeps one sample (the first of consecutive gaps), so a chart shows the hole.

Counters
--------
Energy, gas and fuel counters only grow, except when the register wraps at its maximum or the meter
is reset (replaced, cleared). :func:`counter_delta` turns two successive readings into consumption:

1. ``cur >= prev``: the difference.
2. ``cur < prev``, the register's range ``wrap`` is known (an unsigned integer Modbus type:
   ``2**bits x scale``), ``prev`` lies in the top ``band`` (10 %) of the range and ``cur`` in the
   bottom ``band``: a wrap, ``wrap - prev + cur``.
3. ``cur < prev`` by more than ``reset_fraction`` (10 %) of ``prev``: a reset to zero, ``cur``
   (what was consumed between ``prev`` and the reset is lost; it cannot be known).
4. Any smaller drop is jitter (a meter re-reading its last value, rounding): 0.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "RAW_FACTOR",
    "ROLLUP_WIDTHS_S",
    "CounterStep",
    "DownsampleMode",
    "Source",
    "StepKind",
    "choose_source",
    "counter_delta",
    "downsample",
    "lttb",
    "minmax",
]

Sample = tuple[float, float | None]


class Source(enum.StrEnum):
    """Where a downsampled history comes from: the raw table or one of the rollups."""

    RAW = "raw"
    M1 = "1m"
    M15 = "15m"
    H1 = "1h"

    @property
    def table(self) -> str:
        """Return the table holding this source's rows.

        >>> Source.M15.table
        'readings_15m'
        """
        return "readings" if self is Source.RAW else f"readings_{self.value}"

    @property
    def width_s(self) -> float:
        """Return the bucket width in seconds (0 for raw).

        >>> Source.H1.width_s
        3600.0
        """
        return ROLLUP_WIDTHS_S.get(self, 0.0)


ROLLUP_WIDTHS_S: Final[dict[Source, float]] = {Source.M1: 60.0, Source.M15: 900.0, Source.H1: 3600.0}
"""Bucket width of each rollup table (buckets are ``date_bin(width, ts, '2000-01-01 UTC')``)."""

RAW_FACTOR: Final = 4
"""Raw rows are read when the span holds at most this many per requested point."""


class DownsampleMode(enum.StrEnum):
    """How a series is reduced to the requested number of points."""

    RAW = "raw"  # no reduction: raw rows, cut at a limit
    LTTB = "lttb"  # Largest-Triangle-Three-Buckets: keeps the visual shape
    MINMAX = "minmax"  # the minimum and the maximum of each time bucket: keeps every peak


def choose_source(
    span_s: float, points: int, *, raw_period_s: float, available: frozenset[Source] = frozenset(Source)
) -> Source:
    """Pick the table a history of ``span_s`` seconds reduced to ``points`` should be read from.

    Raw when the span holds at most ``RAW_FACTOR x points`` raw rows (one every ``raw_period_s``);
    otherwise the coarsest available rollup that still has at least ``points`` buckets; raw when
    none has (a short span at a fast poll rate: raw rows, then downsampled).

    >>> choose_source(3600, 1000, raw_period_s=1.0)  # 3,600 rows <= 4,000
    <Source.RAW: 'raw'>
    >>> choose_source(365 * 86400, 1000, raw_period_s=60.0)  # 8,760 hours >= 1,000
    <Source.H1: '1h'>
    >>> choose_source(7 * 86400, 1000, raw_period_s=1.0)  # 672 quarter hours < 1,000 <= 10,080 minutes
    <Source.M1: '1m'>
    >>> choose_source(365 * 86400, 1000, raw_period_s=60.0, available=frozenset({Source.RAW}))
    <Source.RAW: 'raw'>
    """
    if span_s / max(raw_period_s, 1e-3) <= RAW_FACTOR * points:
        return Source.RAW
    for source in (Source.H1, Source.M15, Source.M1):
        if source in available and span_s / source.width_s >= points:
            return source
    return Source.RAW


# --------------------------------------------------------------------------------------------------
# Downsampling


def lttb(samples: Sequence[tuple[float, float]], threshold: int) -> list[int]:
    """Return the indices Largest-Triangle-Three-Buckets keeps to draw ``samples`` with ``threshold`` points.

    The first and last samples are always kept; the rest is cut into ``threshold - 2`` buckets and
    each contributes the sample forming the largest triangle with the one kept before it and the
    mean of the next bucket (Steinarsson 2013). ``samples`` must be sorted by time.

    Examples
    --------
    >>> lttb([(0, 0), (1, 5), (2, 0), (3, 0), (4, 0)], 3)
    [0, 1, 4]
    >>> lttb([(0, 1.0), (1, 2.0)], 10)
    [0, 1]
    >>> lttb([(t, float(t % 7)) for t in range(1000)], 50)[:4]
    [0, 6, 21, 48]
    """
    n = len(samples)
    if threshold >= n or n <= 2:
        return list(range(n))
    if threshold <= 2:
        return [0, n - 1][:threshold] if threshold > 0 else []
    xs = [float(t) for t, _ in samples]
    ys = [float(v) for _, v in samples]
    kept = [0]
    every = (n - 2) / (threshold - 2)
    a = 0
    for i in range(threshold - 2):
        lo, hi = int(i * every) + 1, int((i + 1) * every) + 1
        nxt_lo, nxt_hi = hi, min(int((i + 2) * every) + 1, n)
        if nxt_lo >= n:  # the last bucket's "next" is the final sample
            nxt_lo, nxt_hi = n - 1, n
        count = nxt_hi - nxt_lo
        avg_t = sum(xs[nxt_lo:nxt_hi]) / count
        avg_v = sum(ys[nxt_lo:nxt_hi]) / count
        at, av = xs[a], ys[a]
        # Twice the triangle's area, up to sign: (at - avg_t)(v - av) - (at - t)(avg_v - av).
        dx, dv = at - avg_t, avg_v - av
        best, best_area = lo, -1.0
        for j in range(lo, min(hi, n - 1)):
            area = abs(dx * (ys[j] - av) - (at - xs[j]) * dv)
            if area > best_area:
                best, best_area = j, area
        kept.append(best)
        a = best
    kept.append(n - 1)
    return kept


def minmax(samples: Sequence[tuple[float, float]], buckets: int, start: float, end: float) -> list[int]:
    """Return the indices of the minimum and maximum of each of ``buckets`` equal time buckets.

    Each bucket of ``[start, end)`` contributes its minimum and its maximum, in time order (one
    index when they coincide); empty buckets contribute nothing. ``samples`` must be sorted by time.

    >>> minmax([(0, 1.0), (1, 9.0), (2, 4.0), (3, -2.0), (4, 3.0)], 2, 0, 5)
    [0, 1, 3, 4]
    >>> minmax([(0, 1.0)], 4, 0, 10)
    [0]
    """
    if buckets < 1 or end <= start:
        return []
    width = (end - start) / buckets
    kept: list[int] = []
    lo_i = hi_i = -1
    current = -1
    for i, (t, v) in enumerate(samples):
        b = min(int((t - start) // width), buckets - 1)
        if b != current:
            if current >= 0:
                kept.extend(sorted({lo_i, hi_i}))
            current, lo_i, hi_i = b, i, i
            continue
        if v < samples[lo_i][1]:
            lo_i = i
        if v > samples[hi_i][1]:
            hi_i = i
    if current >= 0:
        kept.extend(sorted({lo_i, hi_i}))
    return kept


def downsample(
    samples: Sequence[Sample], points: int, mode: DownsampleMode, *, start: float, end: float
) -> list[int]:
    """Return the indices of ``samples`` to keep so that about ``points`` remain, gaps kept visible.

    Values are split into runs at gaps (``v is None``); each gap keeps its first sample, and the
    point budget left is shared among the runs in proportion to their lengths (at least one point
    each, two for a run of two or more: its ends), so no line is ever drawn across a gap. A series
    with many gaps can therefore return more than ``points``. ``minmax`` uses ``points // 2`` time
    buckets over ``[start, end)``, cut per run. ``raw`` keeps everything.

    Examples
    --------
    >>> series = [(0, 1.0), (1, 2.0), (2, None), (3, None), (4, 5.0), (5, 4.0), (6, 6.0)]
    >>> downsample(series, 4, DownsampleMode.LTTB, start=0, end=7)  # each run keeps its two ends
    [0, 1, 2, 4, 6]
    >>> downsample(series, 100, DownsampleMode.LTTB, start=0, end=7)
    [0, 1, 2, 4, 5, 6]
    >>> downsample(series, 4, DownsampleMode.MINMAX, start=0, end=7)
    [0, 1, 2, 5, 6]
    """
    if mode is DownsampleMode.RAW:
        return list(range(len(samples)))
    runs: list[tuple[int, int]] = []  # [lo, hi) index ranges of consecutive values
    gaps: list[int] = []
    i, n = 0, len(samples)
    while i < n:
        if samples[i][1] is None:
            if i == 0 or samples[i - 1][1] is not None:
                gaps.append(i)
            i += 1
            continue
        lo = i
        while i < n and samples[i][1] is not None:
            i += 1
        runs.append((lo, i))
    budget = max(points - len(gaps), len(runs))
    total = sum(hi - lo for lo, hi in runs) or 1
    kept = list(gaps)
    for lo, hi in runs:
        share = max(1, math.floor(budget * (hi - lo) / total))
        run = [(t, v) for t, v in samples[lo:hi] if v is not None]
        if mode is DownsampleMode.MINMAX:
            buckets = max(1, math.floor(points / 2 * (samples[hi - 1][0] - samples[lo][0]) / (end - start)))
            buckets = min(buckets, max(1, share // 2))
            chosen = minmax(run, buckets, samples[lo][0], samples[hi - 1][0] + 1e-9)
        else:
            chosen = lttb(run, max(share, 2) if hi - lo >= 2 else 1)
        kept.extend(lo + j for j in chosen)
    return sorted(kept)


# --------------------------------------------------------------------------------------------------
# Counters


class StepKind(enum.StrEnum):
    """How :func:`counter_delta` read a step between two counter readings."""

    NORMAL = "normal"
    WRAP = "wrap"
    RESET = "reset"
    JITTER = "jitter"


@dataclass(frozen=True, slots=True)
class CounterStep:
    """Consumption between two counter readings and how it was judged."""

    delta: float
    kind: StepKind


RESET_FRACTION: Final = 0.1
"""A drop of more than this fraction of the previous value is a reset."""
WRAP_BAND: Final = 0.1
"""A drop from the top to the bottom band (this fraction) of a known register range is a wrap."""


def counter_delta(
    prev: float,
    cur: float,
    *,
    wrap: float | None = None,
    reset_fraction: float = RESET_FRACTION,
    band: float = WRAP_BAND,
) -> CounterStep:
    """Return the consumption between two successive counter readings (rules in the module doc).

    Parameters
    ----------
    prev, cur
        Two successive counter values in engineering units (kWh, Nm3, t).
    wrap
        The engineering value at which the register rolls over to 0 (``2**bits x scale``), or None
        when unknown (float registers, other protocols).
    reset_fraction
        A drop of more than this fraction of ``prev`` is a reset.
    band
        Width of the top and bottom bands of ``wrap`` that make a drop a wrap.

    Examples
    --------
    >>> counter_delta(100.0, 130.0)
    CounterStep(delta=30.0, kind=<StepKind.NORMAL: 'normal'>)
    >>> counter_delta(6553.0, 2.0, wrap=6553.6).kind, round(counter_delta(6553.0, 2.0, wrap=6553.6).delta, 6)
    (<StepKind.WRAP: 'wrap'>, 2.6)
    >>> counter_delta(5000.0, 12.0)  # no known range: a reset, counted from zero
    CounterStep(delta=12.0, kind=<StepKind.RESET: 'reset'>)
    >>> counter_delta(5000.0, 4999.5)
    CounterStep(delta=0.0, kind=<StepKind.JITTER: 'jitter'>)
    """
    if cur >= prev:
        return CounterStep(cur - prev, StepKind.NORMAL)
    if wrap is not None and wrap * (1 - band) <= prev <= wrap and 0 <= cur <= wrap * band:
        return CounterStep(wrap - prev + cur, StepKind.WRAP)
    if prev - cur > reset_fraction * abs(prev):
        return CounterStep(max(cur, 0.0), StepKind.RESET)
    return CounterStep(0.0, StepKind.JITTER)
