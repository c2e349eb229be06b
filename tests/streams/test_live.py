"""Live hub: latest values, routing to subscribers, drop-oldest when a client falls behind."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
import redis.asyncio as aioredis

from scada.model import Availability, AvailabilityEvent, DeviceId, PointId, Quality, Reading, StreamName
from streams.bus import stream_key
from streams.codec import encode_event, encode_json_event, encode_readings
from streams.live import AlarmFrame, LiveHub, follow_availability, run_live_feed

T0 = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)
P1, P2 = PointId("m1.active_power_kw"), PointId("m2.active_power_kw")


def reading(point: PointId, value: float, seconds: float = 0) -> Reading:
    return Reading(point=point, ts=T0 + timedelta(seconds=seconds), value=value)


def test_latest_keeps_the_newest_and_ignores_redelivered_old_readings() -> None:
    hub = LiveHub()
    hub.publish([reading(P1, 1.0, 10)])
    hub.publish([reading(P1, 0.5, 5)])  # older: a redelivery, not news
    latest = hub.latest(P1)
    assert latest is not None
    assert latest.value == 1.0
    assert hub.latest(P2) is None


def test_subscribers_get_only_their_points() -> None:
    hub = LiveHub()
    with hub.subscribe() as a, hub.subscribe() as b:
        a.points.add(P1)
        b.points.update({P1, P2})
        hub.publish([reading(P1, 1.0), reading(P2, 2.0)])
        assert list(a.pending) == [P1]  # readings wait, coalesced, for the client's next flush
        assert list(b.pending) == [P1, P2]
    assert hub.subscriber_count == 0


def test_a_slow_client_drops_its_oldest_frames_and_counts_them() -> None:
    hub = LiveHub(frames_per_client=3)
    with hub.subscribe() as slow:
        slow.points.add(P1)
        slow.alarm_consoles = set()
        for i in range(10):
            hub.publish([reading(P1, float(i), i)])
            hub.publish_alarms([{"alarm_id": f"a{i}", "console": "e"}])
        assert slow.dropped_frames == 7
        ids = [cast(AlarmFrame, slow.queue.get_nowait()).events[0]["alarm_id"] for _ in range(3)]
        assert ids == ["a7", "a8", "a9"]  # latest wins
        assert [r[2] for r in slow.pending.values()] == [9.0]  # readings coalesce: only the newest waits


def test_availability_keeps_the_newest_event() -> None:
    hub = LiveHub()
    device = DeviceId("m1")
    hub.publish_event(AvailabilityEvent(device=device, ts=T0, availability=Availability.OFFLINE, reason="x"))
    hub.publish_event(
        AvailabilityEvent(device=device, ts=T0 - timedelta(1), availability=Availability.ONLINE)
    )
    assert hub.availability[device].availability is Availability.OFFLINE


async def test_feed_follows_the_streams(redis_client: aioredis.Redis, stream_prefix: str) -> None:
    hub = LiveHub()
    readings_key = stream_key(stream_prefix, StreamName.READINGS)
    events_key = stream_key(stream_prefix, StreamName.EVENTS)
    task = asyncio.create_task(
        run_live_feed(redis_client, hub, readings_key=readings_key, events_key=events_key, block_ms=100)
    )
    try:
        await asyncio.sleep(0.3)  # the feed starts at the streams' ends
        await redis_client.xadd(readings_key, {b"garbage": b"entry"})  # skipped, feed keeps going
        await redis_client.xadd(
            readings_key,
            encode_readings(
                [
                    reading(P1, 42.0),
                    Reading(point=P2, ts=T0, value=None, quality=Quality.bad("device offline")),
                ]
            ),
        )
        await redis_client.xadd(
            events_key,
            encode_event(
                AvailabilityEvent(
                    device=DeviceId("m2"), ts=T0, availability=Availability.OFFLINE, reason="refused"
                )
            ),
        )
        async with asyncio.timeout(5):
            while hub.latest(P2) is None or DeviceId("m2") not in hub.availability:
                await asyncio.sleep(0.02)
        assert hub.latest(P1) == reading(P1, 42.0)
        latest_p2 = hub.latest(P2)
        assert latest_p2 is not None
        assert latest_p2.quality.reason == "device offline"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_alarm_frames_go_to_clients_that_follow_the_console() -> None:
    hub = LiveHub()
    with hub.subscribe() as all_consoles, hub.subscribe() as plant_a, hub.subscribe() as readings_only:
        all_consoles.alarm_consoles = set()
        plant_a.alarm_consoles = {"ent-a"}
        hub.publish_alarms(
            [{"alarm_id": "x:hh", "console": "ent-a"}, {"alarm_id": "y:h", "console": "ent-b"}]
        )
        assert all_consoles.queue.get_nowait() == AlarmFrame(
            [{"alarm_id": "x:hh", "console": "ent-a"}, {"alarm_id": "y:h", "console": "ent-b"}]
        )
        assert plant_a.queue.get_nowait() == AlarmFrame([{"alarm_id": "x:hh", "console": "ent-a"}])
        assert readings_only.queue.empty()


async def test_live_feed_carries_alarm_events_and_the_availability_follower_sees_devices(
    redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    hub = LiveHub()
    readings_key = stream_key(stream_prefix, StreamName.READINGS)
    events_key = stream_key(stream_prefix, StreamName.EVENTS)
    alarms_key = stream_key(stream_prefix, StreamName.ALARMS)
    seen: list[tuple[str, bool, str]] = []

    async def on_availability(device: DeviceId, online: bool, ts: datetime, reason: str) -> None:
        seen.append((device, online, reason))

    feed = asyncio.create_task(
        run_live_feed(
            redis_client,
            hub,
            readings_key=readings_key,
            events_key=events_key,
            alarms_key=alarms_key,
            block_ms=100,
        )
    )
    follower = asyncio.create_task(
        follow_availability(redis_client, events_key, on_availability, block_ms=100)
    )
    try:
        with hub.subscribe() as sub:
            sub.alarm_consoles = set()
            await asyncio.sleep(0.3)  # both start at the streams' ends
            await redis_client.xadd(
                events_key, encode_json_event(b"ledger", {"month": "2026-11"})
            )  # not availability
            await redis_client.xadd(
                events_key,
                encode_event(
                    AvailabilityEvent(
                        device=DeviceId("m2"), ts=T0, availability=Availability.STALE, reason="silent"
                    )
                ),
            )
            await redis_client.xadd(
                alarms_key, encode_json_event(b"alarm", {"alarm_id": "m2:offline", "console": "e"})
            )
            async with asyncio.timeout(5):
                frame = await sub.queue.get()
                while not seen:
                    await asyncio.sleep(0.02)
        assert frame == AlarmFrame([{"alarm_id": "m2:offline", "console": "e"}])
        assert seen == [("m2", False, "silent")]
    finally:
        for task in (feed, follower):
            task.cancel()
        await asyncio.gather(feed, follower, return_exceptions=True)
