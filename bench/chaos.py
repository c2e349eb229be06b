"""Chaos bench: a long randomized schedule of faults against a plant of real processes.

Starts private services, numbered simulators and one process per role (gateway, historian, api,
analytics, two control processes) through ``_chaos.ChaosPlant``, runs ``--baseline-s`` with no
faults (the reference rate), then injects faults at random until ``--duration-s``: kill -9 and
restart of each role process, of redis-server, of the PostgreSQL postmaster, of mosquitto and of
either simulator; SIGSTOP/SIGCONT of a role or a simulator; a read-only database; a full disk (a
tmpfs tablespace filled to the last byte, when this machine lets us mount one). A command is sent
every second throughout. At the end it stops production, lets the historian drain and accounts
(see bench/_chaos.py for how every reading is known).

    .venv/bin/python bench/chaos.py --duration-s 300 --seed 1

The last line is ``RESULT {json}``; the process exits 1 if an invariant was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import _chaos
from _chaos import ChaosPlant, FaultKind, SiteSpec


async def _fault(plant: ChaosPlant, rng: Any, kind: str) -> float | None:
    """Inject one fault of ``kind`` (with random lengths); return a failover time when measured."""
    down_s = rng.uniform(0.5, 4.0)
    if kind.startswith("kill9_") and kind.removeprefix("kill9_") in (
        "gateway",
        "historian",
        "api",
        "analytics",
    ):
        await plant.kill_role(kind.removeprefix("kill9_"), down_s=down_s)
    elif kind == FaultKind.KILL_CONTROL_LEADER:
        return await plant.kill_leader(timeout_s=30)
    elif kind == FaultKind.KILL_REDIS:
        await plant.kill_redis(down_s=down_s)
    elif kind == FaultKind.KILL_POSTGRES:
        await plant.kill_postgres(down_s=down_s)
    elif kind == FaultKind.KILL_MOSQUITTO:
        await plant.kill_mosquitto(down_s=down_s)
    elif kind == FaultKind.KILL_SIM_MODBUS:
        await plant.kill_sim("modbus", down_s=down_s)
    elif kind == FaultKind.KILL_SIM_MQTT:
        await plant.kill_sim("mqtt", down_s=down_s)
    elif kind == FaultKind.READ_ONLY_DB:
        await plant.read_only_db(for_s=rng.uniform(2.0, 8.0))
    elif kind == FaultKind.FULL_DISK:
        await plant.full_disk(for_s=rng.uniform(2.0, 8.0))
    elif kind == f"{FaultKind.STOP}_control":
        return await plant.freeze_leader(frozen_s=rng.uniform(2.0, 12.0))
    elif kind.startswith(f"{FaultKind.STOP}_sim_"):
        await plant.freeze_sim(kind.removeprefix(f"{FaultKind.STOP}_sim_"), frozen_s=rng.uniform(1.0, 6.0))
    elif kind.startswith(f"{FaultKind.STOP}_"):
        await plant.freeze_role(kind.removeprefix(f"{FaultKind.STOP}_"), frozen_s=rng.uniform(1.0, 8.0))
    else:
        raise ValueError(f"unknown fault {kind!r}")
    return None


FAULTS = [
    FaultKind.KILL_GATEWAY,
    FaultKind.KILL_HISTORIAN,
    FaultKind.KILL_API,
    FaultKind.KILL_ANALYTICS,
    FaultKind.KILL_CONTROL_LEADER,
    FaultKind.KILL_REDIS,
    FaultKind.KILL_POSTGRES,
    FaultKind.KILL_MOSQUITTO,
    FaultKind.KILL_SIM_MODBUS,
    FaultKind.KILL_SIM_MQTT,
    f"{FaultKind.STOP}_gateway",
    f"{FaultKind.STOP}_historian",
    f"{FaultKind.STOP}_api",
    f"{FaultKind.STOP}_analytics",
    f"{FaultKind.STOP}_control",
    f"{FaultKind.STOP}_sim_modbus",
    f"{FaultKind.STOP}_sim_mqtt",
    FaultKind.READ_ONLY_DB,
    FaultKind.FULL_DISK,
]


async def _retry(what: str, action: Callable[[], Awaitable[None]], errors: list[str]) -> None:
    for _ in range(3):
        try:
            await action()
        except (AssertionError, RuntimeError, OSError, TimeoutError) as err:
            errors.append(f"{what}: {err}"[:500])
            await asyncio.sleep(2)
        else:
            return
    raise RuntimeError(f"{what} failed three times: {errors[-1]}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the schedule; return the RESULT figures."""
    rng = _chaos.seeded(args.seed)
    spec = SiteSpec(
        modbus_devices=args.modbus_devices, mqtt_devices=args.mqtt_devices, period_s=args.period_s
    )
    plant = ChaosPlant(_chaos.new_plant_root(), spec)
    faults: Counter[str] = Counter()
    failovers: list[float] = []
    """Seconds until a standby led after the leader was killed (kill -9) or frozen longer than its lease."""
    errors: list[str] = []
    try:
        await plant.start_services(small_disk=not args.no_full_disk)
        for role in ("historian", "gateway", "api", "analytics", "control", "control"):
            await plant.start_role(role)
        redis = plant.redis.client()
        ready_s = time.time()

        async def all_fresh() -> bool:
            conn = await plant.pg.connect()
            try:
                n = await conn.fetchval(
                    "SELECT count(DISTINCT p.device_id) FROM readings r JOIN points p ON p.id = r.point"
                    " WHERE p.key = 'seq' AND r.quality = 2 AND r.ts > to_timestamp($1)",
                    ready_s,
                )
            finally:
                await conn.close()
            return bool(n == spec.modbus_devices + spec.mqtt_devices)

        await _chaos.wait_until(all_fresh, 60, "every device to be stored")
        plant.mark_ready()
        kinds = [k for k in FAULTS if k != FaultKind.FULL_DISK or plant.has_small_disk]
        async with _chaos.CommandTraffic(plant, redis, period_s=1.0) as traffic:
            await asyncio.sleep(args.baseline_s)
            baseline_rate = await _chaos.ingest_rate(plant.pg, args.baseline_s)
            print(f"baseline: {baseline_rate:.1f} readings/s stored ({spec.readings_per_s():.0f}/s expected)")
            faults_start = time.monotonic()
            end_s = faults_start + args.duration_s - args.baseline_s
            while time.monotonic() < end_s:
                kind = rng.choice(kinds)
                started = time.monotonic()
                try:
                    failover_s = await _fault(plant, rng, kind)
                except (AssertionError, RuntimeError, OSError, TimeoutError) as err:
                    errors.append(f"{kind}: {err}"[:500])
                    await _retry("bring everything back", plant.ensure_up, errors)
                    failover_s = None
                faults[kind] += 1
                if failover_s is not None:
                    failovers.append(failover_s)
                took_s = time.monotonic() - started
                print(
                    f"{time.monotonic() - faults_start:6.1f} s  {kind:<22} {took_s:5.1f} s"
                    + (f"  failover {failover_s:.2f} s" if failover_s is not None else "")
                )
                await plant.scrape_shed()
                await asyncio.sleep(rng.uniform(1.0, 6.0))
            fault_phase_s = time.monotonic() - faults_start
            await traffic.stop()
            await _retry("bring everything back", plant.ensure_up, errors)
            await asyncio.sleep(15.0)  # the last commands' results (write + read-back timeouts)
        leader = await plant.leader()
        settle_start = time.monotonic()
        await plant.settle(redis, timeout_s=300)
        settle_s = time.monotonic() - settle_start
        accounting = await plant.account(redis)
        await redis.aclose()
        stored_rate = accounting.readings_stored / (time.time() - ready_s)
        result: dict[str, Any] = {
            **accounting.to_json(),
            "leader_failover_s": (
                {
                    "max": round(max(failovers), 2),
                    "p50": round(statistics.median(failovers), 2),
                    "n": len(failovers),
                }
                if failovers
                else None
            ),
            "single_leader_at_end": leader is not None,
            "faults_injected": dict(sorted(faults.items())),
            "fault_errors": errors,
            "full_disk_variant": "tmpfs tablespace" if plant.has_small_disk else "not available",
            "violations": accounting.violations(),
            "duration_s": args.duration_s,
            "fault_phase_s": round(fault_phase_s, 1),
            "drain_after_faults_s": round(settle_s, 1),
            "reference": {
                "baseline_readings_per_s": round(baseline_rate, 1),
                "run_average_readings_per_s": round(stored_rate, 1),
                "fleet_nominal_readings_per_s": spec.readings_per_s(),
            },
            "seed": args.seed,
        }
        return result
    finally:
        await plant.close()


async def scenario(name: str) -> dict[str, Any]:
    """Reproduce one known recovery gap on a small plant; return whether it recovered by itself.

    ``read-only-no-terminate``: the database is read-only (sessions terminated, so new ones are
    read-only), then made writable again *without* ending the sessions, as a disk-full guard or an
    operator does; does the historian resume? ``command-result-redis-down``: Redis dies while a
    gateway executes a command (the device is slow to answer); is a result published once Redis is
    back, without restarting the gateway?
    """
    plant = ChaosPlant(_chaos.new_plant_root(), SiteSpec(modbus_devices=1, mqtt_devices=0))
    wait_s = 30.0
    try:
        await plant.start_services()
        historian = await plant.start_role("historian")
        await plant.start_role("gateway")
        await asyncio.sleep(3.0)
        if name == "read-only-no-terminate":
            await plant.pg.set_read_only(True)
            await asyncio.sleep(5.0)
            conn = await plant.pg.connect()
            try:
                await conn.execute("ALTER DATABASE postgres RESET default_transaction_read_only")
            finally:
                await conn.close()
            before = await historian.metric("scada_historian_written_readings_total")

            async def resumed() -> bool:
                return await historian.metric("scada_historian_written_readings_total") > before

        elif name == "command-result-redis-down":
            redis = plant.redis.client()
            plant.sims["modbus"].freeze()  # the write waits for an answer: Redis dies meanwhile
            await plant.send_commands(redis, 1)
            correlation_id = plant.commands_sent[-1][0]
            await redis.aclose()
            await asyncio.sleep(0.5)
            await plant.redis.kill()
            await asyncio.sleep(5.0)
            plant.sims["modbus"].thaw()
            await plant.redis.start()
            redis = plant.redis.client()

            async def resumed() -> bool:
                return correlation_id in await _chaos.results_by_correlation(redis)

        else:
            raise ValueError(f"unknown scenario {name!r}")
        start_s = time.monotonic()
        try:
            await _chaos.wait_until(resumed, wait_s, name, interval_s=0.5)
        except AssertionError:
            return {"scenario": name, "recovered": False, "waited_s": wait_s}
        return {
            "scenario": name,
            "recovered": True,
            "recovered_after_s": round(time.monotonic() - start_s, 2),
        }
    finally:
        await plant.close()


def main() -> None:
    """Parse arguments, run, print RESULT."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration-s", type=float, default=600.0, help="whole run, baseline included")
    parser.add_argument("--baseline-s", type=float, default=30.0, help="first part of the run with no faults")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--modbus-devices", type=int, default=3)
    parser.add_argument("--mqtt-devices", type=int, default=3)
    parser.add_argument("--period-s", type=float, default=0.5)
    parser.add_argument("--no-full-disk", action="store_true", help="skip the tmpfs full-disk fault")
    parser.add_argument(
        "--scenario",
        choices=["read-only-no-terminate", "command-result-redis-down"],
        help="instead of the schedule, reproduce one recovery gap and say whether it recovered",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.scenario:
        outcome = asyncio.run(scenario(args.scenario))
        print("RESULT " + json.dumps(outcome, sort_keys=True))
        raise SystemExit(0 if outcome["recovered"] else 1)
    result = asyncio.run(run(args))
    print("RESULT " + json.dumps(result, sort_keys=True))
    raise SystemExit(1 if result["violations"] or not result["single_leader_at_end"] else 0)


if __name__ == "__main__":
    main()
