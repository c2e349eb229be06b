"""Run the simulators of a site: ``python -m simulators --site FILE.json [--speed 1.0] [--labels F]``.

The site file is the normalized site document (JSON) that ``scada simulate`` writes: templates
expanded, every device with its points. Once every socket listens, one line goes to stdout::

    SIMULATORS READY <n> devices on <endpoint> [<endpoint> ...]

where an endpoint is a Modbus ``host:port``, an OPC UA ``opc.tcp://`` URL or an MQTT fleet
(``mqtt://broker (n devices ...)``). MQTT devices publish through the broker named by
``--mqtt-url`` (default ``mqtt://127.0.0.1:1883``).

Nothing else is written to stdout (a parent may stop reading it); logs go to stderr. SIGINT or
SIGTERM stops the plant cleanly with exit code 0. A bad document exits with code 2 and a message on
stderr naming the field; a socket that cannot be bound exits with code 1.

``--start`` sets the simulated start time (ISO 8601; default: now), so a demo or a test can begin
at a chosen hour; ``--labels FILE`` writes one JSON line per injected anomaly (device, point, type,
start, end, magnitude...) as it starts in simulated time; the file is emptied first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from scada.model import utc_now
from simulators.anomalies import LabelFile
from simulators.modbus_server import SimulatorError
from simulators.opcua_server import OpcUaSimulatorError
from simulators.plant import DocumentError, SimulatedPlant

__all__ = ["main"]

_LOGGER = logging.getLogger("simulators")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_DOCUMENT = 2


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _aware_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text}") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a UTC offset, e.g. {text}+08:00")
    return when


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulators", description="Simulate a site's devices.")
    parser.add_argument("--site", required=True, type=Path, help="normalized site document (JSON)")
    parser.add_argument("--speed", type=_positive, default=1.0, help="simulated seconds per real second")
    parser.add_argument(
        "--start",
        type=_aware_time,
        default=None,
        help="simulated start time, ISO 8601 with offset (default now)",
    )
    parser.add_argument("--labels", type=Path, default=None, help="write anomaly labels here (JSON lines)")
    parser.add_argument(
        "--mqtt-url", default="mqtt://127.0.0.1:1883", help="broker the MQTT devices publish through"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level for stderr (default INFO)")
    return parser


def _load(
    path: Path,
    speed: float,
    *,
    start: datetime | None = None,
    labels: Path | None = None,
    mqtt_url: str | None = None,
) -> SimulatedPlant:
    """Read and check the document; raise DocumentError naming the file and the field."""
    if labels is not None:
        try:
            LabelFile(labels).truncate()  # fail now, not at the first anomaly
        except OSError as err:
            raise DocumentError(str(labels), f"cannot write labels: {err.strerror}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DocumentError(str(path), f"cannot read: {err.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise DocumentError(f"{path}:{err.lineno}:{err.colno}", f"not valid JSON: {err.msg}") from None
    try:
        return SimulatedPlant.from_document(
            doc, speed=speed, start=start or utc_now(), labels=labels, mqtt_url=mqtt_url
        )
    except DocumentError as err:
        raise DocumentError(f"{path}: {err.field}", str(err).removeprefix(f"{err.field}: ")) from None


async def _serve(plant: SimulatedPlant) -> int:
    """Run the plant until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    try:
        await plant.start()
        try:
            servers = " ".join(plant.servers)
            sys.stdout.write(f"SIMULATORS READY {len(plant.devices)} devices on {servers}\n")
            sys.stdout.flush()
            await stopping.wait()
            _LOGGER.info("stopping")
        finally:
            await plant.stop()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load the document, run the plant; return the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pymodbus").setLevel(logging.WARNING)  # it logs every listen and connection at INFO
    try:
        plant = _load(args.site, args.speed, start=args.start, labels=args.labels, mqtt_url=args.mqtt_url)
    except DocumentError as err:
        sys.stderr.write(f"simulators: {err}\n")
        return EXIT_BAD_DOCUMENT
    try:
        return asyncio.run(_serve(plant))
    except (SimulatorError, OpcUaSimulatorError) as err:
        sys.stderr.write(f"simulators: {err}\n")
        return EXIT_FAILED
    except (OSError, TimeoutError) as err:
        sys.stderr.write(f"simulators: MQTT broker {args.mqtt_url} unreachable: {err or 'timed out'}\n")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
