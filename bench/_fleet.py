"""Helpers shared by the benches: free ports, percentiles, and a fleet of simulated meters.

The benches run as scripts (``python bench/x.py``), so this module is imported as ``_fleet``.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Sequence

UNITS_PER_PORT = 200
"""Meters behind one simulated gateway port (unit ids 1..200), as RS-485 gateways serve them."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ports_for(meters: int) -> list[int]:
    """Return one free port per gateway needed for ``meters`` meters."""
    return [free_port() for _ in range(-(-meters // UNITS_PER_PORT))]


async def stop_process(proc: asyncio.subprocess.Process, timeout_s: float = 30.0) -> None:
    """Stop a simulator process with SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(timeout_s):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


def percentile(values: Sequence[float], q: float) -> float:
    """Return the nearest-rank ``q``-th percentile (0..100) of ``values``.

    >>> percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50)
    3.0
    """
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def meter_devices_yaml(meters: int, period_s: float, ports: Sequence[int], *, template: str = "meter") -> str:
    """Return the ``devices:`` entries of ``meters`` power meters spread over gateway ``ports``."""
    return "\n".join(
        f"  - {{id: m{i:05d}, node: w, kind: power_meter, protocol: modbus_tcp, template: {template}, "
        f"poll_period_s: {period_s}, modbus: {{host: 127.0.0.1, port: {ports[i // UNITS_PER_PORT]}, "
        f"unit_id: {1 + i % UNITS_PER_PORT}}}, "
        f"simulation: {{profile: production_2shift, base_kw: 40, peak_kw: 120, seed: {i}}}}}"
        for i in range(meters)
    )


HIERARCHY_YAML = """site: {id: bench, name: Bench}
hierarchy: [{id: g, name: G, level: group, children: [{id: p, name: P, level: park, children: [
  {id: e, name: E, level: enterprise, children: [{id: w, name: W, level: workshop}]}]}]}]
"""
"""One of each level; every bench meter hangs on workshop ``w``."""
