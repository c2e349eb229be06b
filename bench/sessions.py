"""Device connectivity at scale: many real device sessions per protocol, one RESULT line each.

Each protocol part starts its simulators in a separate process, then runs real
:class:`scada.sessions.DeviceSession` objects in this one and returns a dict with at least
``protocol``, ``sessions_open``, ``readings_per_s``, ``poll_jitter_p99_ms``, ``rss_bytes_per_session``
and ``cpu_percent``, plus references measured in the same run (see each part's docstring):

- ``modbus``: bench/_sessions_modbus.py (Modbus TCP, polled; target 10,000 sessions at 1 Hz);
- ``opcua``: bench/_sessions_opcua.py (OPC UA subscriptions);
- ``mqtt``: bench/_sessions_mqtt.py (MQTT telemetry through the local broker).

A part whose module is not there is skipped with a message on stderr. With ``--protocol all`` each
part runs in a fresh process of its own, one after the other: never at the same time, so they do
not disturb each other, and with a clean heap, so one part's freed memory does not hide the next
part's RSS per session.

Usage::

    .venv/bin/python bench/sessions.py --protocol modbus [--sessions 10000] [--seconds 20]
        [--loop asyncio|uvloop] [--gc tuned|freeze|default] [--gateways 2]
    .venv/bin/python bench/sessions.py --protocol all

The Modbus part tunes the garbage collector once its sessions are up (``--gc tuned``: see
docs/protocols.md, "Running 10,000 sessions"), as the server does (scada.runtime.tune_gc_for_server).

Output: one human line and one ``RESULT {json}`` line per protocol measured.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

PROTOCOLS = ("modbus", "opcua", "mqtt")


async def run_part(protocol: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """Import one part lazily and run its measure(); None if the part is not there."""
    try:
        module = importlib.import_module(f"_sessions_{protocol}")
    except ModuleNotFoundError as err:
        if err.name != f"_sessions_{protocol}":
            raise  # the part is there but something it needs is not: that is a failure
        sys.stderr.write(f"{protocol}: skipped: bench/_sessions_{protocol}.py is not there\n")
        return None
    measure: Callable[..., Awaitable[dict[str, Any]]] = module.measure
    kwargs: dict[str, Any] = {"duration_s": args.seconds}
    if protocol == "modbus":
        kwargs.update(
            period_s=args.period,
            registers=args.registers,
            ramp_s=args.ramp,
            loop=args.loop,
            gc_mode=args.gc,
            gateways=args.gateways,
        )
        if args.sessions is not None:
            kwargs["sessions"] = args.sessions
    elif protocol == "opcua" and args.opcua_sessions is not None:
        kwargs["sessions"] = args.opcua_sessions
    elif protocol == "mqtt" and args.mqtt_devices is not None:
        kwargs["devices"] = args.mqtt_devices
    return await measure(**kwargs)


def summary(result: dict[str, Any]) -> str:
    return (
        f"{result.get('protocol')}: {result.get('sessions_open')} sessions open, "
        f"{result.get('readings_per_s')} readings/s, poll jitter p99 {result.get('poll_jitter_p99_ms')} ms, "
        f"{result.get('rss_bytes_per_session')} B RSS/session, cpu {result.get('cpu_percent')} %"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=(*PROTOCOLS, "all"), default="modbus")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measure window, s")
    parser.add_argument("--sessions", type=int, default=None, help="modbus: sessions (default 10,000)")
    parser.add_argument("--period", type=float, default=1.0, help="modbus: poll period, s")
    parser.add_argument("--registers", type=int, default=10, help="modbus: registers per poll")
    parser.add_argument(
        "--ramp", type=float, default=None, help="modbus: start the sessions over this many s"
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="modbus: event loop")
    parser.add_argument(
        "--gc",
        choices=("default", "freeze", "tuned"),
        default="tuned",
        help="modbus: once the sessions are up, leave the collector alone, gc.freeze(), or freeze and "
        "raise the thresholds (see _sessions_modbus.GC_TUNED_THRESHOLDS)",
    )
    parser.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="modbus: gateway processes sharing the sessions by shard (default 1: all in this process)",
    )
    parser.add_argument("--opcua-sessions", type=int, default=None, help="opcua: sessions (its default)")
    parser.add_argument("--mqtt-devices", type=int, default=None, help="mqtt: devices (its default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    if args.protocol == "all":
        given = sys.argv[1:]
        at = given.index("--protocol") if "--protocol" in given else None
        rest = given if at is None else given[:at] + given[at + 2 :]
        for protocol in PROTOCOLS:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, *rest, "--protocol", protocol
            )
            await proc.wait()  # its stdout and stderr are ours: the RESULT lines go straight through
        return
    result = await run_part(args.protocol, args)
    if result is not None:
        print(summary(result))
        print("RESULT " + json.dumps(result), flush=True)


def run(main_coro: Callable[[], Awaitable[None]]) -> None:
    """Run on uvloop when ``--loop uvloop`` is given (the loop must exist before anything starts)."""
    if "--loop" in sys.argv and sys.argv[sys.argv.index("--loop") + 1 :][:1] == ["uvloop"]:
        import uvloop  # noqa: PLC0415 -- optional

        uvloop.run(main_coro())  # type: ignore[arg-type]
    else:
        asyncio.run(main_coro())  # type: ignore[arg-type]


if __name__ == "__main__":
    run(main)
