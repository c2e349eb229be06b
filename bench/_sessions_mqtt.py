"""MQTT device sessions at scale: N simulated devices publishing through the local Mosquitto.

The simulated fleet (:class:`simulators.mqtt_devices.MqttDeviceFleet`, 5 points per device, one
message per device per period, spread evenly over the period) runs **in a separate process**
(``python bench/_sessions_mqtt.py --fleet ...``). The bench process is the server side: one shared
:class:`protocols.mqtt.connection.MqttConnection`, one :class:`protocols.mqtt.driver.MqttDriver`
and one real :class:`scada.sessions.DeviceSession` per device, publishing into a counting sink
(Redis is not what is measured here). Figures, over a ``duration_s`` window after every session is
online:

- ``sessions_open``: sessions online at the end of the window;
- ``readings_per_s``: good readings the sink received per second (ideal: 5 * N / period);
- ``poll_jitter_p99_ms``: p99 of the **publish-to-session latency**, the time from the device
  stamping its message (its ``ts``, taken just before the publish, same machine clock) to the
  session handing the batch to the sink: broker, gmqtt, parsing, queueing and the session loop;
- ``rss_bytes_per_session``: (RSS after the ramp - RSS before the drivers were made) / N;
- ``cpu_percent`` / ``fleet_cpu_percent``: the bench and the fleet process over the window
  (100 = one core); Mosquitto's own CPU is ``broker_cpu_percent`` when it can be read;
- ``messages_dropped``: batches the drivers dropped because a session fell behind (drop-oldest),
  and ``messages_missing``: messages the fleet published in the window that never reached a session.

Reference in the same run, before the sessions exist: ``raw_gmqtt_messages_per_s`` and
``raw_gmqtt_cpu_percent``, one plain gmqtt client subscribed to the same telemetry with a wildcard
that only counts messages: the floor this process cannot beat for this traffic.

Usage: ``.venv/bin/python bench/_sessions_mqtt.py [--devices 10000] [--seconds 20]``. Last line:
``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
import uuid
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import gmqtt
import psutil
from _fleet import percentile, running_sessions, start_ready_process, stop_process
from gmqtt.mqtt.constants import MQTTv50

from protocols.mqtt.config import MqttDeviceConfig, MqttVersion
from protocols.mqtt.connection import MqttConnection
from protocols.mqtt.driver import MqttDriver, MqttPointSpec
from scada.model import AvailabilityEvent, Reading, make_point_id
from scada.runtime import Backoff, SystemClock
from scada.sessions import DeviceSession

THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parent.parent
BROKER_URL = "mqtt://127.0.0.1:1883"
FIELDS = {
    "voltage_v": "u",
    "current_a": "i",
    "active_power_kw": "p",
    "frequency_hz": "f",
    "reactive_power_kvar": "q",
}
POINTS_PER_DEVICE = len(FIELDS)
RAW_REFERENCE_S = 5.0


def device_ids(devices: int) -> list[str]:
    return [f"q{i:05d}" for i in range(devices)]


def topics(prefix: str) -> dict[str, str]:
    return {
        "telemetry_topic": f"{prefix}/{{device}}/telemetry",
        "command_topic": f"{prefix}/{{device}}/command",
        "response_topic": f"{prefix}/{{device}}/response",
    }


# --------------------------------------------------------------------------------------------------
# The fleet process


async def run_fleet(args: argparse.Namespace) -> None:
    from simulators.mqtt_devices import MqttDeviceFleet, MqttSimPoint, MqttSimTopics  # noqa: PLC0415
    from simulators.physics import SimulationParams, make_physics  # noqa: PLC0415

    start = datetime.now(UTC)
    tz = ZoneInfo("Asia/Shanghai")
    config = MqttSimTopics(**topics(args.prefix), qos=args.qos)
    points = [MqttSimPoint(key, field) for key, field in FIELDS.items()]
    params = SimulationParams(profile="production_2shift", base_kw=40, peak_kw=120)
    devices = [
        (device, make_physics("power_meter", params, tz=tz, start=start, seed=i), config, points)
        for i, device in enumerate(device_ids(args.devices))
    ]
    fleet = MqttDeviceFleet(
        BROKER_URL,
        devices,
        publish_period_s=args.period,
        connections=args.connections,
        client_id_prefix=f"bench-fleet-{args.prefix.rsplit('/', 1)[-1]}",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await fleet.start()
    print("FLEET READY", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stats_task = asyncio.create_task(_answer_stats(reader, fleet))
    await stop.wait()
    stats_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stats_task
    await fleet.stop()


async def _answer_stats(reader: asyncio.StreamReader, fleet: Any) -> None:
    """Print the fleet's publish count whenever the bench asks (one line on stdin)."""
    while await reader.readline():
        print(
            f"STATS {json.dumps({'published': fleet.stats.published, 'skipped': fleet.stats.skipped})}",
            flush=True,
        )


class Fleet:
    """The fleet subprocess, seen from the bench."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.ps = psutil.Process(proc.pid)

    async def published(self) -> int:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(b"stats\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(10):
            line = await self.proc.stdout.readline()
        return int(json.loads(line.split(b" ", 1)[1])["published"])


async def start_fleet(devices: int, period_s: float, prefix: str, connections: int, qos: int) -> Fleet:
    argv = [sys.executable, str(THIS_FILE), "--fleet", f"--devices={devices}", f"--period={period_s}"]
    argv += [f"--prefix={prefix}", f"--connections={connections}", f"--qos={qos}"]
    proc, _ready = await start_ready_process(
        "the MQTT fleet", argv, ready=b"FLEET READY", timeout_s=60 + devices / 200, stdin=True, cwd=REPO
    )
    return Fleet(proc)


# --------------------------------------------------------------------------------------------------
# The server side


class LatencySink:
    """ReadingSink and EventSink: counts good readings and records publish-to-session latency."""

    def __init__(self) -> None:
        self.good = 0
        self.batches = 0
        self.events = 0
        self.latency_ms = array("d")
        self.recording = False

    async def publish(self, readings: Sequence[Reading]) -> None:
        if not readings:
            return
        self.batches += 1
        self.good += sum(1 for r in readings if r.value is not None)
        if self.recording:
            self.latency_ms.append((time.time() - readings[0].ts.timestamp()) * 1000)

    async def publish_event(self, event: AvailabilityEvent) -> None:
        self.events += 1


class NullDeadLetters:
    """Count rejected input (none is expected in the bench)."""

    def __init__(self) -> None:
        self.count = 0

    def reject(self, *, origin: str, payload: bytes, reason: str) -> None:
        self.count += 1
        if self.count <= 3:
            logging.getLogger("bench").warning("dead letter from %s: %s", origin, reason)


async def raw_reference(prefix: str, seconds: float) -> tuple[float, float]:
    """Return (messages/s, CPU %) of a plain gmqtt client that only counts the fleet's telemetry."""
    me = psutil.Process()
    count = 0

    def on_message(*_args: object) -> int:
        nonlocal count
        count += 1
        return 0

    client = gmqtt.Client(f"bench-raw-{uuid.uuid4().hex[:8]}")
    client.on_message = on_message
    await client.connect("127.0.0.1", 1883, version=MQTTv50)
    client.subscribe(f"{prefix}/+/telemetry", qos=0)
    await asyncio.sleep(1.5)  # subscription in place, one period of traffic seen
    count = 0
    me.cpu_percent()
    started = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    received, cpu = count, me.cpu_percent()
    await client.disconnect()
    return received / elapsed, cpu


def broker_process() -> psutil.Process | None:
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "mosquitto":
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr.port == 1883:
                        return proc
    return None


async def measure(
    devices: int = 10_000,
    duration_s: float = 20.0,
    *,
    period_s: float = 1.0,
    fleet_connections: int | None = None,
    qos: int = 1,
) -> dict[str, Any]:
    """Run the fleet in a subprocess and N sessions here; return the figures described at the top."""
    prefix = f"carbonos-bench/{uuid.uuid4().hex[:8]}"
    connections = fleet_connections or max(1, devices // 1000)
    fleet = await start_fleet(devices, period_s, prefix, connections, qos)
    try:
        result = await _measure(fleet, devices, duration_s, period_s=period_s, prefix=prefix, qos=qos)
    finally:
        await stop_process(fleet.proc)
    result["broker_connections"] = {"server": 1, "fleet": connections}
    return result


async def _measure(
    fleet: Fleet, devices: int, duration_s: float, *, period_s: float, prefix: str, qos: int
) -> dict[str, Any]:
    me = psutil.Process()
    broker = broker_process()
    raw_per_s, raw_cpu = await raw_reference(prefix, RAW_REFERENCE_S)

    clock = SystemClock()
    sink = LatencySink()
    dead = NullDeadLetters()
    baseline_rss = me.memory_info().rss
    connection = MqttConnection(
        BROKER_URL,
        client_id=f"bench-server-{uuid.uuid4().hex[:8]}",
        version=MqttVersion.V5,
        timeout_s=10.0,
        dead_letters=dead,
    )
    await connection.start()
    config = MqttDeviceConfig(**topics(prefix), qos=qos, telemetry_qos=qos, timeout_s=10.0)
    drivers: list[MqttDriver] = []
    sessions: list[DeviceSession] = []
    for device in device_ids(devices):
        specs = [MqttPointSpec(point=make_point_id(device, key), field=f) for key, f in FIELDS.items()]
        driver = MqttDriver(device, config, specs, connection=connection, clock=clock, dead_letters=dead)
        drivers.append(driver)
        sessions.append(
            DeviceSession(
                driver,
                points=[s.point for s in specs],
                sink=sink,
                events=sink,
                period_s=period_s,
                clock=clock,
                backoff=Backoff(initial_s=1.0, max_s=10.0),
                connect_timeout_s=30.0,
            )
        )
    try:
        async with running_sessions(sessions, max_wait_s=60 + devices / 100) as ramp:
            await asyncio.sleep(2 * period_s)  # settle: every session past its first batches
            rss_after_ramp = me.memory_info().rss

            dropped_before = sum(d.stats.dropped for d in drivers)
            published_before = await fleet.published()
            batches_before, good_before, dead_before = sink.batches, sink.good, dead.count
            sink.recording = True
            me.cpu_percent()
            fleet.ps.cpu_percent()
            if broker is not None:
                broker.cpu_percent()
            window_start = time.monotonic()
            await asyncio.sleep(duration_s)
            elapsed = time.monotonic() - window_start
            cpu = me.cpu_percent()
            fleet_cpu = fleet.ps.cpu_percent()
            broker_cpu = broker.cpu_percent() if broker is not None else math.nan
            sink.recording = False
            published = await fleet.published() - published_before
            batches = sink.batches - batches_before
            good = sink.good - good_before
            dropped = sum(d.stats.dropped for d in drivers) - dropped_before
            dead_in_window = dead.count - dead_before
            sessions_open = sum(1 for s in sessions if s.available)
    finally:
        await connection.close()

    latency = list(sink.latency_ms) or [math.nan]
    return {
        "protocol": "mqtt",
        "devices": devices,
        "points_per_session": POINTS_PER_DEVICE,
        "publish_period_s": period_s,
        "qos": qos,
        "seconds": duration_s,
        "ramp_s": round(ramp.seconds, 1),
        "online_after_ramp": ramp.online,
        "sessions_open": sessions_open,
        "readings_per_s": round(good / elapsed, 1),
        "readings_per_s_ideal": round(devices * POINTS_PER_DEVICE / period_s, 1),
        "messages_per_s": round(batches / elapsed, 1),
        "poll_jitter_p99_ms": round(percentile(latency, 99), 1),
        "poll_jitter_measures": "publish-to-session latency (device ts to sink), not inter-arrival jitter",
        "latency_p50_ms": round(statistics.median(latency), 1),
        "latency_max_ms": round(max(latency), 1),
        "rss_bytes_per_session": round((rss_after_ramp - baseline_rss) / devices),
        "cpu_percent": round(cpu, 1),
        "fleet_cpu_percent": round(fleet_cpu, 1),
        "broker_cpu_percent": round(broker_cpu, 1),
        "messages_dropped": dropped,
        "messages_missing": max(0, published - batches),
        "fleet_published": published,
        "dead_letters": dead_in_window,
        "raw_gmqtt_messages_per_s": round(raw_per_s, 1),
        "raw_gmqtt_cpu_percent": round(raw_cpu, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--period", type=float, default=1.0)
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1))
    parser.add_argument("--fleet", action="store_true", help="run as the fleet process")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--connections", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    if args.fleet:
        await run_fleet(args)
        return
    result = await measure(args.devices, args.seconds, period_s=args.period, qos=args.qos)
    print(
        f"mqtt: {result['sessions_open']}/{args.devices} sessions open, "
        f"{result['readings_per_s']} readings/s (ideal {result['readings_per_s_ideal']}), "
        f"latency p50 {result['latency_p50_ms']} ms "
        f"p99 {result['poll_jitter_p99_ms']} ms, {result['rss_bytes_per_session']} B RSS/session, "
        f"cpu {result['cpu_percent']} % (raw gmqtt {result['raw_gmqtt_cpu_percent']} % at "
        f"{result['raw_gmqtt_messages_per_s']} msg/s), fleet cpu {result['fleet_cpu_percent']} %, "
        f"dropped {result['messages_dropped']}, missing {result['messages_missing']}"
    )
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
