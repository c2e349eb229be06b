"""The gateway end to end: simulators over real sockets, real Redis, commands in, verified results out.

A command sent with ``send_command`` (as the dispatcher and ``scada command`` do) reaches the
gateway's executor through the ``commands`` stream, is written by the device session, verified by
read-back on the simulator, and its result comes back on ``command_results``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from _session_helpers import wait_until

from scada import cli
from scada.config import SiteConfig, parse_site
from scada.gateway import Gateway
from scada.model import Command, CommandStatus, PointId, Priority, StreamName
from scada.runtime import SystemClock, TaskSupervisor
from scada.sharding import Shard
from simulators.plant import SimulatedPlant
from streams.bus import RedisReadingSink, stream_key
from streams.commands import run_command_executor, send_and_wait

SITE = """
site: {{id: t, name: Test}}
hierarchy: [{{id: g, name: G, level: group}}]
templates:
  inverter:
    points:
      - {{key: active_power_kw, kind: power, unit: kW, carrier: pv, modbus: {{address: 0, type: float32}}}}
      - {{key: power_limit_pct, kind: setpoint, unit: "%", writable: true, modbus: {{address: 100, type: uint16}}}}
devices:
  - {{id: pv-1, node: g, kind: pv_inverter, protocol: modbus_tcp, template: inverter, poll_period_s: 0.2,
      modbus: {{host: 127.0.0.1, port: {port}, unit_id: 1}}, simulation: {{profile: pv, peak_kw: 100, seed: 1}}}}
  - {{id: pv-3, node: g, kind: pv_inverter, protocol: modbus_tcp, template: inverter, poll_period_s: 0.2,
      modbus: {{host: 127.0.0.1, port: {port}, unit_id: 2}}, simulation: {{profile: pv, peak_kw: 50, seed: 2}}}}
"""


def site_on(port: int) -> SiteConfig:
    return parse_site(SITE.format(port=port))


@contextlib.asynccontextmanager
async def gateway_running(
    site: SiteConfig, redis: aioredis.Redis, prefix: str, shard: Shard
) -> AsyncIterator[Gateway]:
    clock = SystemClock()
    sink = RedisReadingSink(
        redis,
        readings_key=stream_key(prefix, StreamName.READINGS),
        events_key=stream_key(prefix, StreamName.EVENTS),
        deadletter_key=stream_key(prefix, StreamName.DEADLETTER),
        maxlen=10_000,
    )
    await sink.start()
    gateway = Gateway(site, sink=sink, clock=clock, mqtt_url="mqtt://127.0.0.1:1883", shard=shard)
    supervisor = TaskSupervisor("test-gateway")
    try:
        await gateway.start(supervisor)
        supervisor.spawn(
            run_command_executor(
                redis,
                commands_key=stream_key(prefix, StreamName.COMMANDS),
                results_key=stream_key(prefix, StreamName.COMMAND_RESULTS),
                deadletter_key=stream_key(prefix, StreamName.DEADLETTER),
                claims_prefix=f"{prefix}command-claim:",
                group=f"gateway-{shard.index}of{shard.count}",
                consumer=f"gw-{shard.index}",
                owns=gateway.owns_point,
                execute=gateway.execute,
                clock=clock,
            ),
            name="commands",
        )
        await wait_until(lambda: all(s.available for s in gateway.sessions.values()))
        await asyncio.sleep(0.2)  # the executor's group exists before the test sends
        yield gateway
    finally:
        await supervisor.close()
        await gateway.close()
        await sink.close()


def command(point: str, value: float, correlation_id: str) -> Command:
    return Command(
        point=PointId(point),
        value=value,
        priority=Priority.OPERATOR,
        source="test",
        reason="gateway test",
        correlation_id=correlation_id,
    )


async def test_commands_reach_the_device_through_the_stream_and_come_back_verified(
    unused_tcp_port: int, redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    site = site_on(unused_tcp_port)
    plant = SimulatedPlant.from_document(site.model_dump(mode="json"))
    async with plant, gateway_running(site, redis_client, stream_prefix, Shard()):
        results = []
        for correlation_id, point, value in (
            ("c-1", "pv-1.power_limit_pct", 30),
            ("c-2", "pv-3.power_limit_pct", 130),
        ):
            results.append(
                await send_and_wait(
                    redis_client,
                    stream_key(stream_prefix, StreamName.COMMANDS),
                    stream_key(stream_prefix, StreamName.COMMAND_RESULTS),
                    command(point, value, correlation_id),
                    wait_s=10,
                )
            )
        assert plant.device("pv-1").value("power_limit_pct") == 30
    verified, clamped = results
    assert verified is not None
    assert verified.status is CommandStatus.VERIFIED
    assert clamped is not None
    assert clamped.status is CommandStatus.MISMATCH
    assert clamped.readback == 100


async def test_each_shard_supervises_and_commands_only_its_own_devices(
    unused_tcp_port: int, redis_client: aioredis.Redis, stream_prefix: str
) -> None:
    site = site_on(unused_tcp_port)
    plant = SimulatedPlant.from_document(site.model_dump(mode="json"))
    shards = [Shard(0, 2), Shard(1, 2)]
    owners = {d.id: next(s for s in shards if s.owns(d.id)) for d in site.devices}
    async with plant:
        async with contextlib.AsyncExitStack() as stack:
            gateways = [
                await stack.enter_async_context(gateway_running(site, redis_client, stream_prefix, shard))
                for shard in shards
            ]
            # pv-1 hashes to shard 1 of 2, pv-3 to shard 0: one device each
            assert [sorted(g.sessions) for g in gateways] == [["pv-3"], ["pv-1"]]
            for gateway in gateways:
                assert all(owners[d] == gateway.shard for d in gateway.sessions)
            result = await send_and_wait(
                redis_client,
                stream_key(stream_prefix, StreamName.COMMANDS),
                stream_key(stream_prefix, StreamName.COMMAND_RESULTS),
                command("pv-3.power_limit_pct", 45, "c-s"),
                wait_s=10,
            )
            assert plant.device("pv-3").value("power_limit_pct") == 45
    assert result is not None
    assert result.status is CommandStatus.VERIFIED
    # exactly one result: the other shard acknowledged the entry without writing
    entries = await redis_client.xrange(stream_key(stream_prefix, StreamName.COMMAND_RESULTS))
    assert len(entries) == 1


async def test_scada_command_prints_the_verified_outcome(
    unused_tcp_port: int,
    redis_client: aioredis.Redis,
    stream_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = site_on(unused_tcp_port)
    plant = SimulatedPlant.from_document(site.model_dump(mode="json"))
    monkeypatch.setenv("SCADA_STREAM_PREFIX", stream_prefix)
    monkeypatch.setenv("SCADA_REDIS_URL", "redis://127.0.0.1:6379/0")
    async with plant, gateway_running(site, redis_client, stream_prefix, Shard()):
        code = await asyncio.to_thread(cli.main, ["command", "pv-1.power_limit_pct", "55", "--timeout", "10"])
        refused = await asyncio.to_thread(
            cli.main, ["command", "pv-1.active_power_kw", "1", "--timeout", "10"]
        )
    printed = capsys.readouterr().out
    first, second = (json.loads(part) for part in printed.replace("}\n{", "}\x00{").split("\x00"))
    assert code == 0
    assert first["status"] == "verified"
    assert first["readback"] == 55
    assert refused == 1
    assert second["status"] == "failed"
    assert "not writable" in second["reason"]
