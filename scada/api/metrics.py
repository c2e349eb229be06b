"""``GET /metrics``: the process's counters in the Prometheus text exposition format (0.0.4).

Written by hand (a few dozen lines) rather than with a client library: every value already lives in
an object of the plant (sink, historian, sessions, live hub) or in Redis (stream lengths, consumer
group lag and pending), so a scrape only reads them and renders text.

Redis is asked under one bound (``redis_timeout_s``) per scrape. When Redis is down or slow the
endpoint still answers, with everything it has in memory and ``scada_redis_up 0``; the stream series
are then absent rather than stale. The families are listed in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError, ResponseError

from scada import __version__
from scada.model import Reading
from scada.sessions import DeviceSession
from streams.bus import RedisReadingSink, RejectedReadings
from streams.historian import HistorianStage
from streams.live import LiveHub

__all__ = [
    "CONTENT_TYPE",
    "METRICS",
    "BatchMetrics",
    "Histogram",
    "MetricsSources",
    "PlantView",
    "metrics",
    "render_family",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
BATCH_SIZE_BUCKETS: Final = (1, 10, 50, 100, 500, 1_000, 2_500, 5_000, 10_000, 25_000)
LATENCY_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = Mapping[str, str]
Sample = tuple[str, Labels, float]
"""(name suffix such as ``""`` or ``"_bucket"``, labels, value)."""


class PlantView(Protocol):
    """What the metrics read of :class:`scada.app.Plant` (a protocol: ``scada.app`` imports us)."""

    @property
    def sessions(self) -> Mapping[str, DeviceSession]:
        """Device sessions of this process, by device id."""

    @property
    def sink(self) -> RedisReadingSink | None:
        """The gateway's readings sink, if this process is a gateway."""

    @property
    def historian(self) -> HistorianStage | None:
        """The historian stage, if this process is a historian."""


class Histogram:
    """A cumulative Prometheus histogram with fixed upper bounds.

    >>> h = Histogram((1, 10))
    >>> for v in (0.5, 3, 30):
    ...     h.observe(v)
    >>> [(s, dict(l), v) for s, l, v in h.samples()]  # doctest: +NORMALIZE_WHITESPACE
    [('_bucket', {'le': '1'}, 1), ('_bucket', {'le': '10'}, 2), ('_bucket', {'le': '+Inf'}, 3),
     ('_sum', {}, 33.5), ('_count', {}, 3)]
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(bounds) or not bounds:
            raise ValueError("histogram bounds must be a non-empty ascending sequence")
        self._bounds = tuple(bounds)
        self._counts = [0] * len(self._bounds)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self._bounds):
            if value <= bound:
                self._counts[i] += 1
                break

    def samples(self) -> list[Sample]:
        """Return the ``_bucket`` (cumulative), ``_sum`` and ``_count`` samples."""
        out: list[Sample] = []
        running = 0
        for bound, count in zip(self._bounds, self._counts, strict=True):
            running += count
            out.append(("_bucket", {"le": _number(bound)}, running))
        out.append(("_bucket", {"le": "+Inf"}, self.count))
        out.append(("_sum", {}, self.sum))
        out.append(("_count", {}, self.count))
        return out


@dataclass(slots=True)
class BatchMetrics:
    """Sizes and durations of a stage's handler calls, and how many raised (entries left pending)."""

    sizes: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    durations_s: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    failures_total: int = 0

    def wrap(
        self, handler: Callable[[Sequence[Reading]], Awaitable[None]]
    ) -> Callable[[Sequence[Reading]], Awaitable[None]]:
        """Return ``handler`` measured: every call's size and duration; a raise other than a reject."""

        async def measured(batch: Sequence[Reading]) -> None:
            start_s = time.perf_counter()
            try:
                await handler(batch)
            except RejectedReadings:
                raise  # the rest of the batch was committed: a write, not a failure
            except Exception:
                self.failures_total += 1
                raise
            finally:
                self.sizes.observe(len(batch))
                self.durations_s.observe(time.perf_counter() - start_s)

        return measured


@dataclass(slots=True)
class MetricsSources:
    """Everything ``/metrics`` reads; built by :func:`scada.app.create_app`, Redis set at start-up."""

    plant: PlantView
    hub: LiveHub
    streams: Mapping[str, str]
    """Stream name (``readings``, ``events``, ``deadletter``) -> Redis key."""
    historian_batches: BatchMetrics = field(default_factory=BatchMetrics)
    redis: aioredis.Redis | None = None
    redis_timeout_s: float = 2.0


METRICS = web.AppKey("metrics", MetricsSources)


async def metrics(request: web.Request) -> web.Response:
    """Render every metric of this process (Prometheus text format)."""
    sources = request.app[METRICS]
    parts = [*_process_families(), *_plant_families(sources), *await _redis_families(sources)]
    return web.Response(body="".join(parts).encode(), headers={"Content-Type": CONTENT_TYPE})


# --------------------------------------------------------------------------------------------------
# Families


def _process_families() -> list[str]:
    return [
        render_family("scada_build_info", "gauge", "Version of this server.", [({"version": __version__}, 1)])
    ]


def _plant_families(sources: MetricsSources) -> list[str]:
    plant, hub = sources.plant, sources.hub
    out: list[str] = []
    if (sink := plant.sink) is not None:
        out += [
            render_family(
                "scada_sink_buffered_readings", "gauge", "Readings waiting for Redis.", [({}, sink.buffered)]
            ),
            _counter("scada_sink_sent_readings_total", "Readings written to Redis.", sink.sent_total),
            _counter(
                "scada_sink_shed_readings_total",
                "Readings dropped because the buffer was full.",
                sink.shed_total,
            ),
            _counter(
                "scada_sink_rejected_readings_total",
                "Readings refused at publish (cannot be encoded).",
                sink.rejected_total,
            ),
            _counter(
                "scada_sink_shed_events_total",
                "Events dropped because their buffer was full.",
                sink.events_shed_total,
            ),
            render_family(
                "scada_sink_available",
                "gauge",
                "Whether the sink's last flush reached Redis (1), failed (0); absent before the first.",
                [] if sink.available is None else [({}, int(sink.available))],
            ),
        ]
    if (historian := plant.historian) is not None:
        batches = sources.historian_batches
        out += [
            _counter(
                "scada_historian_written_readings_total",
                "Readings sent to the database (redelivered duplicates included).",
                historian.written_total,
            ),
            _counter(
                "scada_historian_inserted_readings_total",
                "Rows actually inserted (redelivered duplicates excluded).",
                historian.inserted_total,
            ),
            _counter(
                "scada_historian_rejected_readings_total",
                "Readings the historian handed to the dead-letter stream (unknown point, far future).",
                historian.rejected_total,
            ),
            _counter(
                "scada_historian_batch_failures_total",
                "Batches whose write failed; their entries stay pending and are retried.",
                batches.failures_total,
            ),
            _histogram("scada_historian_batch_readings", "Readings per historian batch.", batches.sizes),
            _histogram(
                "scada_historian_batch_duration_seconds",
                "Time to write one batch (or fail to).",
                batches.durations_s,
            ),
        ]
    if plant.sessions:
        states = {"online": 0, "stale": 0, "offline": 0, "unknown": 0}
        for session in plant.sessions.values():
            states[session.availability.value if session.availability is not None else "unknown"] += 1
        per_device = sorted(plant.sessions.items())
        out += [
            render_family(
                "scada_devices",
                "gauge",
                "Device sessions of this process by availability.",
                [({"state": state}, count) for state, count in states.items()],
            ),
            render_family(
                "scada_device_polls_total",
                "counter",
                "Polls per device and result.",
                [
                    sample
                    for device, s in per_device
                    for sample in (
                        ({"device": device, "result": "ok"}, s.stats.polls_ok),
                        ({"device": device, "result": "failed"}, s.stats.polls_failed),
                    )
                ],
            ),
            render_family(
                "scada_device_connects_total",
                "counter",
                "Successful connects per device.",
                [({"device": d}, s.stats.connects) for d, s in per_device],
            ),
            render_family(
                "scada_device_overruns_total",
                "counter",
                "Poll ticks skipped because a poll took longer than the period.",
                [({"device": d}, s.stats.overruns) for d, s in per_device],
            ),
            render_family(
                "scada_device_uncertain_readings_total",
                "counter",
                "Readings a session marked uncertain, per device and cause (stuck value, old sample).",
                [
                    sample
                    for device, s in per_device
                    for sample in (
                        ({"device": device, "cause": "stuck"}, s.stats.stuck_readings),
                        ({"device": device, "cause": "old_sample"}, s.stats.old_samples),
                    )
                ],
            ),
            render_family(
                "scada_device_writes_total",
                "counter",
                "Writes (commands) sent per device.",
                [({"device": d}, s.stats.writes) for d, s in per_device],
            ),
        ]
    out += [
        render_family(
            "scada_live_subscribers", "gauge", "Websocket clients subscribed.", [({}, hub.subscriber_count)]
        ),
        _counter("scada_live_readings_seen_total", "Readings the live feed has read.", hub.readings_seen),
    ]
    return out


async def _redis_families(sources: MetricsSources) -> list[str]:
    """Stream lengths and consumer-group lag/pending; ``scada_redis_up 0`` if Redis did not answer."""
    lengths: list[tuple[Labels, float]] = []
    added: list[tuple[Labels, float]] = []
    lag: list[tuple[Labels, float]] = []
    pending: list[tuple[Labels, float]] = []
    consumers: list[tuple[Labels, float]] = []
    up = 0
    if sources.redis is not None:
        try:
            async with asyncio.timeout(sources.redis_timeout_s):  # one bound for the whole scrape
                for name, key in sources.streams.items():
                    info = await _xinfo(sources.redis, key)
                    if info is None:
                        continue  # the stream does not exist yet
                    stream_info, groups = info
                    lengths.append(({"stream": name}, float(stream_info.get("length", 0))))
                    if (entries_added := stream_info.get("entries-added")) is not None:
                        added.append(({"stream": name}, float(entries_added)))
                    for group in groups:
                        labels = {"stream": name, "group": _text(group.get("name", ""))}
                        pending.append((labels, float(group.get("pending", 0))))
                        consumers.append((labels, float(group.get("consumers", 0))))
                        if (group_lag := group.get("lag")) is not None:  # nil when Redis cannot tell
                            lag.append((labels, float(group_lag)))
            up = 1
        except (RedisError, OSError, TimeoutError):
            up = 0
            lengths, added, lag, pending, consumers = [], [], [], [], []
    return [
        render_family("scada_redis_up", "gauge", "Whether Redis answered this scrape.", [({}, up)]),
        render_family("scada_stream_length", "gauge", "Entries in a stream (XLEN).", lengths),
        render_family(
            "scada_stream_entries_added_total",
            "counter",
            "Entries ever added to a stream (survives trimming; Redis >= 7).",
            added,
        ),
        render_family(
            "scada_stream_group_lag",
            "gauge",
            "Entries of a stream not yet delivered to a consumer group.",
            lag,
        ),
        render_family(
            "scada_stream_group_pending",
            "gauge",
            "Entries delivered to a consumer group but not acknowledged.",
            pending,
        ),
        render_family("scada_stream_group_consumers", "gauge", "Consumers in a consumer group.", consumers),
    ]


async def _xinfo(redis: aioredis.Redis, key: str) -> tuple[Mapping[str, Any], list[Mapping[str, Any]]] | None:
    try:
        stream_info = await redis.xinfo_stream(key)
    except ResponseError as err:
        if "no such key" in str(err).lower():
            # redis-py's exception holds its own frame: drop the traceback so that cycle (and this
            # scrape's frames, with the response they hold) is freed now, not by the collector.
            err.__traceback__ = None
            return None
        raise
    groups = await redis.xinfo_groups(key) if stream_info.get("groups") else []
    return {_text(k): v for k, v in stream_info.items()}, [
        {_text(k): v for k, v in g.items()} for g in groups
    ]


# --------------------------------------------------------------------------------------------------
# Text format


def render_family(name: str, kind: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> str:
    r"""Render one metric family: ``# HELP``, ``# TYPE`` and its samples.

    >>> print(render_family("x_total", "counter", "A \\ b.", [({"a": 'q"\n'}, 2)]), end="")
    # HELP x_total A \\ b.
    # TYPE x_total counter
    x_total{a="q\"\n"} 2
    """
    return _render(name, kind, help_text, [("", labels, value) for labels, value in samples])


def _counter(name: str, help_text: str, value: float) -> str:
    return render_family(name, "counter", help_text, [({}, value)])


def _histogram(name: str, help_text: str, histogram: Histogram) -> str:
    return _render(name, "histogram", help_text, histogram.samples())


def _render(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> str:
    help_line = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    lines = [f"# HELP {name} {help_line}", f"# TYPE {name} {kind}"]
    for suffix, labels, value in samples:
        label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
        lines.append(
            f"{name}{suffix}{{{label_text}}} {_number(value)}"
            if label_text
            else f"{name}{suffix} {_number(value)}"
        )
    return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """Format a sample value: integers without a point, and the format's spellings of NaN and infinities.

    >>> [_number(v) for v in (3, 2.0, 0.25, math.inf, -math.inf, math.nan)]
    ['3', '2', '0.25', '+Inf', '-Inf', 'NaN']
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
