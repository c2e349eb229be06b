"""The pure query maths: LTTB, min/max buckets, gaps, source choice, counter deltas."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.query import (
    DownsampleMode,
    Source,
    StepKind,
    choose_source,
    counter_delta,
    downsample,
    lttb,
    minmax,
)

values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
series = st.lists(values, min_size=0, max_size=300).map(lambda vs: [(float(t), v) for t, v in enumerate(vs)])
gappy = st.lists(st.one_of(values, st.none()), min_size=0, max_size=300).map(
    lambda vs: [(float(t), v) for t, v in enumerate(vs)]
)


@given(series, st.integers(min_value=3, max_value=400))
def test_lttb_keeps_ends_and_the_budget(samples: list[tuple[float, float]], threshold: int) -> None:
    kept = lttb(samples, threshold)
    assert kept == sorted(set(kept))
    assert len(kept) == min(threshold, len(samples))
    if samples:
        assert kept[0] == 0
        assert kept[-1] == len(samples) - 1


@given(series, st.integers(min_value=1, max_value=50))
def test_minmax_keeps_every_buckets_extremes(samples: list[tuple[float, float]], buckets: int) -> None:
    end = float(len(samples)) or 1.0
    kept = minmax(samples, buckets, 0.0, end)
    assert kept == sorted(set(kept))
    assert len(kept) <= 2 * buckets
    width = end / buckets
    for b in range(buckets):
        inside = [v for t, v in samples if min(int(t // width), buckets - 1) == b]
        if inside:
            kept_inside = [samples[i][1] for i in kept if min(int(samples[i][0] // width), buckets - 1) == b]
            assert min(inside) in kept_inside
            assert max(inside) in kept_inside


@given(gappy, st.integers(min_value=2, max_value=200), st.sampled_from(list(DownsampleMode)))
def test_downsample_never_draws_across_a_gap(
    samples: list[tuple[float, float | None]], points: int, mode: DownsampleMode
) -> None:
    kept = downsample(samples, points, mode, start=0.0, end=float(len(samples)) + 1)
    assert kept == sorted(set(kept))
    starts_of_gaps = [
        i for i, (_, v) in enumerate(samples) if v is None and (i == 0 or samples[i - 1][1] is not None)
    ]
    assert set(starts_of_gaps) <= set(kept)
    # Between two kept values there is a gap in the output whenever there is one in the input.
    for a, b in itertools.pairwise(kept):
        if samples[a][1] is not None and samples[b][1] is not None:
            assert all(v is not None for _, v in samples[a:b])


def test_downsample_budget_holds_without_gaps() -> None:
    samples: list[tuple[float, float | None]] = [(float(t), math.sin(t / 50)) for t in range(10_000)]
    assert len(downsample(samples, 1000, DownsampleMode.LTTB, start=0, end=10_000)) == 1000
    assert len(downsample(samples, 1000, DownsampleMode.MINMAX, start=0, end=10_000)) <= 1000
    assert len(downsample(samples, 10, DownsampleMode.RAW, start=0, end=10_000)) == 10_000


def test_minmax_downsample_keeps_a_spike() -> None:
    samples: list[tuple[float, float | None]] = [(float(t), 1.0) for t in range(10_000)]
    samples[4321] = (4321.0, 99.0)
    kept = downsample(samples, 20, DownsampleMode.MINMAX, start=0, end=10_000)
    assert 4321 in kept


@pytest.mark.parametrize(
    ("span_s", "points", "period_s", "available", "expected"),
    [
        (3600, 1000, 1.0, set(Source), Source.RAW),  # 3,600 rows <= 4 x 1,000
        (86_400, 1000, 1.0, set(Source), Source.M1),  # 1,440 minutes; 96 quarters
        (30 * 86_400, 1000, 1.0, set(Source), Source.M15),  # 2,880 quarters; 720 hours
        (365 * 86_400, 1000, 60.0, set(Source), Source.H1),
        (365 * 86_400, 1000, 60.0, {Source.RAW, Source.M1}, Source.M1),  # the 1h table is missing
        (3600, 2000, 0.1, set(Source), Source.RAW),  # no rollup has 2,000 buckets in an hour
        (60, 1000, 86_400.0, set(Source), Source.RAW),
    ],
)
def test_choose_source(
    span_s: float, points: int, period_s: float, available: set[Source], expected: Source
) -> None:
    assert choose_source(span_s, points, raw_period_s=period_s, available=frozenset(available)) is expected


@pytest.mark.parametrize(
    ("prev", "cur", "wrap", "delta", "kind"),
    [
        (100.0, 100.0, None, 0.0, StepKind.NORMAL),
        (100.0, 130.5, None, 30.5, StepKind.NORMAL),
        (65_530.0, 4.0, 65_536.0, 10.0, StepKind.WRAP),  # uint16, scale 1
        (65_530.0, 4.0, None, 4.0, StepKind.RESET),  # range unknown: a reset
        (30_000.0, 4.0, 65_536.0, 4.0, StepKind.RESET),  # far from the top: a reset, not a wrap
        (1000.0, 950.0, None, 0.0, StepKind.JITTER),  # 5 % drop: noise
        (1000.0, 850.0, None, 850.0, StepKind.RESET),  # 15 % drop: reset
        (1000.0, -5.0, None, 0.0, StepKind.RESET),  # a reset never books negative energy
    ],
)
def test_counter_delta_rules(
    prev: float, cur: float, wrap: float | None, delta: float, kind: StepKind
) -> None:
    step = counter_delta(prev, cur, wrap=wrap)
    assert step.kind is kind
    assert step.delta == pytest.approx(delta)


@given(
    st.sampled_from([65_536.0 * 0.1, 2.0**32 * 0.01]),
    st.floats(min_value=0, max_value=1),
    st.lists(st.floats(min_value=0, max_value=0.05), min_size=1, max_size=200),
)
def test_counter_deltas_add_up_across_wraps(wrap: float, start: float, steps: list[float]) -> None:
    """A counter that only wraps (steps < the wrap band) is reconstructed exactly."""
    value = start * wrap
    total = 0.0
    for step in steps:
        nxt = (value + step * wrap) % wrap
        total += counter_delta(value, nxt, wrap=wrap).delta
        value = nxt
    assert total == pytest.approx(sum(steps) * wrap, rel=1e-9, abs=1e-6)


@given(values, values, st.one_of(st.none(), st.floats(min_value=1, max_value=1e7)))
def test_counter_delta_is_never_negative(prev: float, cur: float, wrap: float | None) -> None:
    assert counter_delta(prev, cur, wrap=wrap).delta >= 0
