"""Live hub: point index, coalescing at the client's rate, topics cut to the client's scope."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from scada.model import (
    Availability,
    AvailabilityEvent,
    CommandResult,
    CommandStatus,
    DeviceId,
    PointId,
    Reading,
    StreamName,
)
from streams.bus import stream_key
from streams.codec import encode_event, encode_json_event, encode_readings
from streams.commands import encode_result
from streams.live import EventFrame, LiveHub, ReadingsFrame, Topic, reading_text, run_live_feed

T0 = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)
P1, P2, P3 = PointId("m1.p_kw"), PointId("m2.p_kw"), PointId("m3.p_kw")


def reading(point: PointId, value: float, seconds: float = 0) -> Reading:
    return Reading(point=point, ts=T0 + timedelta(seconds=seconds), value=value)


def test_publish_touches_only_the_subscribers_indexed_under_the_point() -> None:
    hub = LiveHub()
    with hub.subscribe() as a, hub.subscribe() as b:
        a.points.update([P1])
        b.points.update([P2])
        hub.publish([reading(P1, 1.0)])
        assert list(a.pending) == [P1]
        assert b.pending == {}
        a.points.discard(P1)
        assert a.pending == {}  # unsubscribing forgets what waited
        hub.publish([reading(P1, 2.0, 1)])
        assert a.pending == {}
    assert hub._by_point == {}  # closing a subscription leaves no index entries behind


async def test_readings_coalesce_latest_wins_and_flush_at_most_at_the_rate() -> None:
    hub = LiveHub()
    with hub.subscribe() as sub:
        sub.max_rate_hz = 5.0
        sub.points.update([P1, P2])
        hub.publish([reading(P1, 1.0), reading(P2, 2.0)])
        first = await asyncio.wait_for(sub.next_frame(), 1)
        assert isinstance(first, ReadingsFrame)
        assert {r.point: r.value for r in first.readings()} == {P1: 1.0, P2: 2.0}
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(1, 20):
            hub.publish([reading(P1, float(i), i)])
        second = await asyncio.wait_for(sub.next_frame(), 1)
        waited_s = loop.time() - started
        assert isinstance(second, ReadingsFrame)
        assert [r.value for r in second.readings()] == [19.0]  # 19 readings, one frame, the newest
        assert 0.15 <= waited_s < 0.5  # the second flush waits for the 5 Hz slot


async def test_events_do_not_wait_for_the_readings_slot() -> None:
    hub = LiveHub()
    with hub.subscribe() as sub:
        sub.max_rate_hz = 0.2
        sub.points.add(P1)
        sub.topics.add(Topic.QUOTA_ALERT)
        hub.publish([reading(P1, 1.0)])
        assert isinstance(await asyncio.wait_for(sub.next_frame(), 1), ReadingsFrame)
        hub.publish([reading(P1, 2.0, 1)])  # due only in 5 s
        hub.publish_quota_alert({"node": "ent-a", "threshold_pct": 80})
        frame = await asyncio.wait_for(sub.next_frame(), 1)
        assert frame == EventFrame(Topic.QUOTA_ALERT, {"node": "ent-a", "threshold_pct": 80})


def test_topics_are_cut_to_the_clients_nodes_and_devices() -> None:
    hub = LiveHub()
    with hub.subscribe() as mine, hub.subscribe() as everything, hub.subscribe() as quiet:
        mine.topics.update(Topic)
        mine.visible_nodes, mine.visible_devices = frozenset({"ws-a"}), frozenset({DeviceId("m1")})
        everything.topics.update(Topic)
        hub.publish_ledger({"month": "2026-11", "nodes": {"ws-a": [1.0, 2.0], "ws-b": [3.0, 4.0]}})
        hub.publish_quota_alert({"node": "ws-b", "threshold_pct": 90})
        hub.publish_dispatch({"point": "m2.setpoint", "status": "verified"})
        hub.publish_dispatch({"point": "m1.setpoint", "status": "failed"})
        hub.publish_event(AvailabilityEvent(device=DeviceId("m2"), ts=T0, availability=Availability.OFFLINE))
        got = [mine.queue.get_nowait() for _ in range(mine.queue.qsize())]
        assert got == [
            EventFrame(Topic.LEDGER, {"month": "2026-11", "nodes": {"ws-a": [1.0, 2.0]}}),
            EventFrame(Topic.DISPATCHES, {"point": "m1.setpoint", "status": "failed"}),
        ]
        assert everything.queue.qsize() == 5
        assert quiet.queue.empty()


def test_a_device_subscription_follows_its_availability_without_the_topic() -> None:
    hub = LiveHub()
    with hub.subscribe() as sub:
        sub.devices.add(DeviceId("m1"))
        hub.publish_event(AvailabilityEvent(device=DeviceId("m2"), ts=T0, availability=Availability.ONLINE))
        hub.publish_event(
            AvailabilityEvent(device=DeviceId("m1"), ts=T0, availability=Availability.STALE, reason="silent")
        )
        frame = sub.queue.get_nowait()
        assert frame == EventFrame(
            Topic.AVAILABILITY,
            {"device": "m1", "availability": "stale", "since": T0.isoformat(), "reason": "silent"},
        )
        assert sub.queue.empty()


def test_reading_json_is_made_once_and_reads_like_the_rest_api() -> None:
    hub = LiveHub()
    hub.publish([reading(P1, 1.5)])
    [row] = hub.snapshot_rows([P1, P3])
    text = hub.readings_json([row])
    assert json.loads(text) == [{"point": P1, "ts": T0.isoformat(), "value": 1.5, "quality": "good"}]
    cached = hub._texts[P1]
    assert hub.readings_json([row]) == text
    assert hub._texts[P1] is cached  # the second client reuses the text
    assert cached[1] == reading_text(row)


async def test_feed_routes_dispatches_ledger_and_quota_events(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    hub = LiveHub()
    keys = {s: stream_key(stream_prefix, s) for s in StreamName}
    feed = asyncio.create_task(
        run_live_feed(
            redis_client,
            hub,
            readings_key=keys[StreamName.READINGS],
            events_key=keys[StreamName.EVENTS],
            alarms_key=keys[StreamName.ALARMS],
            results_key=keys[StreamName.COMMAND_RESULTS],
            block_ms=100,
        )
    )
    try:
        with hub.subscribe() as sub:
            sub.topics.update({Topic.DISPATCHES, Topic.LEDGER, Topic.QUOTA_ALERT, Topic.AVAILABILITY})
            sub.points.add(P1)
            await asyncio.sleep(0.3)  # the feed starts at the streams' ends
            result = CommandResult(
                correlation_id="c-1",
                point=PointId("m1.setpoint"),
                requested=21.0,
                status=CommandStatus.VERIFIED,
                ts=T0,
                readback=21.0,
            )
            await redis_client.xadd(keys[StreamName.COMMAND_RESULTS], encode_result(result, executor="gw-0"))
            await redis_client.xadd(
                keys[StreamName.EVENTS], encode_json_event(b"ledger", {"month": "2026-11"})
            )
            await redis_client.xadd(keys[StreamName.EVENTS], encode_json_event(b"quota_alert", {"node": "x"}))
            await redis_client.xadd(
                keys[StreamName.EVENTS],
                encode_event(
                    AvailabilityEvent(device=DeviceId("m1"), ts=T0, availability=Availability.ONLINE)
                ),
            )
            await redis_client.xadd(keys[StreamName.READINGS], encode_readings([reading(P1, 7.0)]))
            frames = [await asyncio.wait_for(sub.next_frame(), 5) for _ in range(5)]
        topics = [f.topic for f in frames if isinstance(f, EventFrame)]
        assert topics == [Topic.DISPATCHES, Topic.LEDGER, Topic.QUOTA_ALERT, Topic.AVAILABILITY]
        dispatch = next(f for f in frames if isinstance(f, EventFrame) and f.topic is Topic.DISPATCHES)
        assert dispatch.event["status"] == "verified"
        assert dispatch.event["correlation_id"] == "c-1"
        readings = [f for f in frames if isinstance(f, ReadingsFrame)]
        assert [r.value for r in readings[0].readings()] == [7.0]
    finally:
        feed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await feed
