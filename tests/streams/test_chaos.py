"""Chaos: kill -9 and SIGSTOP of role processes, of the broker and of a simulator; a read-only database.

One plant for the whole module (bench/_chaos.py): its own redis-server (append-only), PostgreSQL
cluster and mosquitto on free ports, numbered Modbus and MQTT simulators as processes, and
``scada run`` processes for the gateway, historian, api and two control roles, with a command sent
every half second throughout. Each test injects one fault and waits for the plant to recover by
itself; the last test stops production and checks the invariants over everything that happened:
every reading delivered to the stream is stored exactly once, no sample is missing outside the fault
windows that can lose one, and no command reached a device twice. Faults already covered by
test_faults.py (historian killed mid-batch, Redis and PostgreSQL restarts, poison) are not repeated.

The tests run in file order and share the plant; each one also passes alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import _chaos
from _chaos import ChaosPlant, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

FAILOVER_BOUND_S = 10.0
"""A standby must hold the control lease this soon after the leader was killed (the lease's promise)."""


class Running:
    """The module's plant, its Redis client and the background command traffic."""

    def __init__(self, plant: ChaosPlant, redis: aioredis.Redis) -> None:
        self.plant, self.redis = plant, redis
        self.traffic = _chaos.CommandTraffic(plant, redis, period_s=0.5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running() -> AsyncIterator[Running]:
    """Start the plant once for the module; stop and remove it at the end."""
    for tool in ("redis-server", _chaos.MOSQUITTO, str(_chaos.PG_BIN / "initdb")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    plant = ChaosPlant(_chaos.new_plant_root())
    redis: aioredis.Redis | None = None
    try:
        await plant.start_services()
        await asyncio.gather(
            plant.start_role("historian"),
            plant.start_role("gateway"),
            plant.start_role("api"),
            plant.start_role("control"),
        )
        await plant.start_role("control")  # the standby (the first one took the lease)
        redis = plant.redis.client()
        state = Running(plant, redis)
        await wait_for_fresh_readings(state, since=time.time(), what="every device after start-up")
        plant.mark_ready()
        async with state.traffic:
            yield state
    finally:
        if redis is not None:
            with contextlib.suppress(Exception):
                await redis.aclose()
        await plant.close()


async def newest_good(plant: ChaosPlant) -> dict[str, tuple[datetime, int]]:
    """Return device -> (ts, seq) of its newest good ``seq`` reading in the table."""
    conn = await plant.pg.connect()
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT ON (p.point_id) p.point_id, r.ts, r.value FROM readings r"
            " JOIN points p ON p.id = r.point WHERE p.key = 'seq' AND r.quality = 2"
            " ORDER BY p.point_id, r.ts DESC"
        )
    finally:
        await conn.close()
    return {r["point_id"].removesuffix(".seq"): (r["ts"], int(r["value"])) for r in rows}


async def wait_for_fresh_readings(state: Running, *, since: float, what: str, timeout_s: float = 30) -> None:
    """Wait until every device has a good reading stored with a time after ``since``."""
    plant = state.plant
    devices = [*plant.spec.modbus_ids(), *plant.spec.mqtt_ids()]
    after = datetime.fromtimestamp(since, UTC)
    last: dict[str, Any] = {}

    async def fresh() -> bool:
        nonlocal last
        try:
            last = await newest_good(plant)
        except (OSError, TimeoutError):
            return False
        return all(d in last and last[d][0] > after for d in devices)

    await wait_until(
        fresh, timeout_s, f"fresh readings of {what}", interval_s=0.25, detail=lambda: f"newest: {last}"
    )


async def historian_group(redis: aioredis.Redis) -> tuple[int, int]:
    """Return (pending, lag) of the historian group."""
    for info in await redis.xinfo_groups(_chaos.READINGS_KEY):
        if info["name"] in (b"historian", "historian"):
            return int(info["pending"]), int(info["lag"] or 0)
    raise AssertionError("no historian group")


async def test_gateway_kill9_then_restart_resumes_every_device(running: Running) -> None:
    window = await running.plant.kill_role("gateway", down_s=1.0)
    assert window.end is not None
    await wait_for_fresh_readings(running, since=window.end, what="every device after the gateway restart")


async def test_broker_kill9_then_restart_resumes_mqtt_devices(running: Running) -> None:
    window = await running.plant.kill_mosquitto(down_s=2.0)
    assert window.end is not None
    await wait_for_fresh_readings(running, since=window.end, what="every device after the broker restart")
    running.plant.role("gateway").assert_alive()


async def test_historian_frozen_then_catches_up(running: Running) -> None:
    plant, redis = running.plant, running.redis
    frozen = asyncio.create_task(plant.freeze_role("historian", frozen_s=5.0))
    try:
        await asyncio.sleep(3.0)
        _, lag = await historian_group(redis)
        assert lag > 0, "the gateway keeps appending while the historian is frozen"
    finally:
        window = await frozen
    assert window.end is not None
    await wait_for_fresh_readings(running, since=window.end, what="every device after SIGCONT")

    async def caught_up() -> bool:
        _, lag = await historian_group(redis)
        return lag < 10  # the gateway keeps producing: caught up, not empty

    await wait_until(caught_up, 20, "the historian to catch up")


async def test_read_only_database_then_writable_again(running: Running) -> None:
    plant, redis = running.plant, running.redis
    historian = plant.role("historian")
    before = await historian.metric("scada_historian_batch_failures_total")
    task = asyncio.create_task(plant.read_only_db(for_s=5.0))
    try:

        async def failing() -> bool:
            return await historian.metric("scada_historian_batch_failures_total") > before

        await wait_until(failing, 5, "the historian to fail a batch on the read-only database")
        pending, _ = await historian_group(redis)
        assert pending > 0, "a failed batch stays pending"
    finally:
        window = await task
    assert window.end is not None
    await wait_for_fresh_readings(running, since=window.end, what="every device once writable")
    historian.assert_alive()


async def test_simulator_kill9_then_restart_continues(running: Running) -> None:
    plant = running.plant
    before = await newest_good(plant)
    window = await plant.kill_sim("modbus", down_s=2.0)
    assert window.end is not None
    await wait_for_fresh_readings(running, since=window.end, what="every device after the simulator restart")
    after = await newest_good(plant)
    for device in plant.spec.modbus_ids():
        assert after[device][1] > before[device][1], f"{device}: numbering continues after the restart"


async def test_control_leader_kill9_standby_takes_over(running: Running) -> None:
    plant = running.plant
    first = await plant.leader()
    assert first is not None, "exactly one control process says it leads"
    failover_s = await plant.kill_leader(timeout_s=FAILOVER_BOUND_S)
    print(f"\ncontrol failover: {failover_s:.2f} s")
    second = await plant.leader()
    assert second is not None
    assert second[0] != first[0]
    assert second[1] > first[1], "a new election takes a larger fencing token"


async def test_every_reading_stored_once_and_no_command_twice(running: Running) -> None:
    plant, redis = running.plant, running.redis
    await running.traffic.stop()
    await asyncio.sleep(3.0)  # the last commands' results
    await plant.settle(redis, timeout_s=60)
    accounting = await plant.account(redis)
    print(f"\n{accounting.to_json()}")
    assert accounting.violations() == []
    assert accounting.readings_stored == accounting.readings_in_stream > 0
    assert accounting.readings_shed == 0  # never near the sink's buffer bound here
    assert accounting.commands_sent > 0
    assert accounting.commands_with_result == accounting.commands_sent
