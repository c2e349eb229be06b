"""Scale-mode Modbus TCP simulator: thousands of meters from one process, for load tests.

``python -m simulators.modbus_scale --devices 10000 --registers 10 --port 15020`` serves 10,000
simulated meters and prints, once every socket listens::

    SIMULATORS READY 10000 devices on 127.0.0.1:15020 127.0.0.1:15021 ...

Why a second simulator: the plant's simulator (:mod:`simulators.modbus_server`) runs every device's
full physics and pymodbus' server stack, about 0.1 ms of CPU per request, and saturates one core
long before ten thousand requests a second. This one is an ``asyncio.Protocol`` that answers from
a register image kept in one ``bytearray``, refreshed from cheap physics at 1 Hz.

Layout. Devices sit behind gateway ports like RS-485 meters behind a Modbus gateway: port ``i``
serves devices ``i * units_per_port ...`` as unit ids ``1..units_per_port`` (default 200, so 50
ports for 10,000 devices; each client connection is still one device session). A device has
``registers`` holding registers (FC 3; FC 4 reads the same image as input registers): channel ``k``
is a big-endian float32 at registers ``2k, 2k+1`` (0 voltage_v, 1 current_a, 2 active_power_kw,
3 frequency_hz, 4 reactive_power_kvar, further channels temperature_c), and an odd last register
is a uint16 seconds counter. FC 6 and FC 16 write holding registers; a written register keeps its
value (the physics stops refreshing it), as a setpoint would.

Bad input never crashes the server: an unknown function gets exception 1 (illegal function), an
address outside the image exception 2, a malformed PDU (bad quantity, byte count or length)
exception 3, an unknown unit id exception 11 (as a gateway answers for a silent device). A frame
with a bad MBAP protocol id or length closes that connection (the stream cannot be re-synchronised).
Requests that arrive together are answered in order.

The physics: meter ``d`` draws ``base_kw * (1 + 0.25 sin(2 pi t / 300 s + phase))`` plus 2 % noise,
with its own base and phase; voltage, frequency and reactive power follow. The image is refreshed
in ten slices per second, so no refresh stalls the loop for long.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import math
import random
import signal
import struct
import sys
import time
from collections.abc import Sequence
from typing import Final, cast

__all__ = ["ScaleSimulator", "main"]

_LOGGER = logging.getLogger(__name__)

MAX_UNITS_PER_PORT: Final = 247
"""Unit ids 1..247 are the addressable ones on a Modbus serial line."""
REFRESH_SLICES: Final = 10
"""The image is refreshed in this many slices per second."""
REFRESH_PERIOD_S: Final = 1.0

_MBAP: Final = struct.Struct(">HHHB")
_READ_ANSWER: Final = struct.Struct(">HHHBBB")
_EXCEPTION_ANSWER: Final = struct.Struct(">HHHBBB")
_WRITE_ANSWER: Final = struct.Struct(">HHHBBHH")
_ADDRESS_AND_QUANTITY: Final = struct.Struct(">HH")
_MIN_LENGTH: Final = 2
_MAX_LENGTH: Final = 254
_MAX_READ: Final = 125
_MAX_WRITE: Final = 123

_ILLEGAL_FUNCTION: Final = 1
_ILLEGAL_ADDRESS: Final = 2
_ILLEGAL_VALUE: Final = 3
_GATEWAY_NO_RESPONSE: Final = 11

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1


class ScaleSimulator:
    """Many simulated meters behind a few gateway ports, answered from one register image."""

    def __init__(
        self,
        devices: int,
        registers: int = 10,
        *,
        units_per_port: int = 200,
        host: str = "127.0.0.1",
        seed: int = 0,
    ) -> None:
        if devices < 1:
            raise ValueError("devices must be at least 1")
        if not 1 <= registers <= _MAX_READ:
            raise ValueError(f"registers must be 1..{_MAX_READ}")
        if not 1 <= units_per_port <= MAX_UNITS_PER_PORT:
            raise ValueError(f"units_per_port must be 1..{MAX_UNITS_PER_PORT}")
        self.devices = devices
        self.registers = registers
        self.units_per_port = units_per_port
        self.host = host
        self.image = bytearray(2 * registers * devices)
        """Every device's registers, big-endian, device after device."""
        self._held: dict[int, set[int]] = {}
        """Registers a master wrote, per device: the physics leaves them alone."""
        rng = random.Random(seed)
        self._base_kw = [rng.uniform(20.0, 150.0) for _ in range(devices)]
        self._phase = [rng.uniform(0.0, 2 * math.pi) for _ in range(devices)]
        self._rng = rng
        self._channels = struct.Struct(f">{registers // 2}f")
        self._t0_s = time.monotonic()
        self._servers: list[asyncio.Server] = []
        self._refresh_task: asyncio.Task[None] | None = None
        self.requests = 0
        """Requests answered (exception responses included)."""
        self.exceptions = 0
        """Exception responses sent."""
        self.dropped_connections = 0
        """Connections closed because of a bad MBAP header or an internal error."""
        self._connections: set[_DeviceConnection] = set()
        self.refresh_all(0.0)

    # ----------------------------------------------------------------------------------------------
    # Lifecycle

    @property
    def ports_needed(self) -> int:
        """Return how many gateway ports the devices need."""
        return -(-self.devices // self.units_per_port)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """Return the (host, port) of every listening gateway, in device order."""
        return [(self.host, int(s.sockets[0].getsockname()[1])) for s in self._servers]

    async def start(self, first_port: int = 0) -> None:
        """Listen on ``first_port``, ``first_port + 1``, ... (0: free ports) and start the physics."""
        if self._servers:
            return
        loop = asyncio.get_running_loop()
        try:
            for index in range(self.ports_needed):
                port = first_port + index if first_port else 0
                server = await loop.create_server(
                    functools.partial(_DeviceConnection, self, index),
                    self.host,
                    port,
                    backlog=4096,  # a bench opens thousands of sessions within seconds
                )
                self._servers.append(server)
        except OSError:
            await self.stop()
            raise
        self._refresh_task = asyncio.create_task(self._refresh_forever(), name="modbus-scale-physics")
        _LOGGER.info("serving %d devices on %d ports", self.devices, len(self._servers))

    async def stop(self) -> None:
        """Stop the physics, close every listening socket and connection; safe to call twice."""
        task, self._refresh_task = self._refresh_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for connection in list(self._connections):
            connection.abort()
        for server in servers:
            await server.wait_closed()

    # ----------------------------------------------------------------------------------------------
    # Physics

    def device_index(self, port_index: int, unit_id: int) -> int | None:
        """Return the device behind ``unit_id`` on gateway ``port_index``, or None if there is none."""
        if not 1 <= unit_id <= self.units_per_port:
            return None
        device = port_index * self.units_per_port + unit_id - 1
        return device if device < self.devices else None

    def words(self, device: int) -> tuple[int, ...]:
        """Return a device's registers as 16-bit words (for tests and diagnostics)."""
        start = 2 * self.registers * device
        return struct.unpack_from(f">{self.registers}H", self.image, start)

    def refresh_all(self, t_s: float) -> None:
        """Recompute every device's registers for simulated time ``t_s``."""
        self._refresh(range(self.devices), t_s)

    def _refresh(self, devices: range, t_s: float) -> None:
        image, size, pack_into = self.image, 2 * self.registers, self._channels.pack_into
        channels = self.registers // 2
        counter = int(t_s) & 0xFFFF
        slow = 2 * math.pi * t_s / 300.0
        fast = 2 * math.pi * t_s / 60.0
        gauss = self._rng.gauss
        values = [0.0] * channels
        for device in devices:
            phase = self._phase[device]
            power_kw = (
                self._base_kw[device] * (1.0 + 0.25 * math.sin(slow + phase)) * (1.0 + 0.02 * gauss(0, 1))
            )
            voltage_v = 230.0 + 2.0 * math.sin(fast + phase)
            values[: min(channels, 5)] = (
                voltage_v,
                power_kw * 1000.0 / (3 * voltage_v * 0.95),
                power_kw,
                50.0 + 0.02 * math.sin(fast * 2 + phase),
                0.33 * power_kw,
            )[:channels]
            for k in range(5, channels):
                values[k] = 20.0 + 5.0 * math.sin(slow + phase + k)
            start = size * device
            held = self._held.get(device)
            if held is None:
                pack_into(image, start, *values)
                if self.registers % 2:
                    image[start + size - 2 : start + size] = counter.to_bytes(2, "big")
                continue
            saved = {r: image[start + 2 * r : start + 2 * r + 2] for r in held}
            pack_into(image, start, *values)
            if self.registers % 2:
                image[start + size - 2 : start + size] = counter.to_bytes(2, "big")
            for r, word in saved.items():
                image[start + 2 * r : start + 2 * r + 2] = word

    async def _refresh_forever(self) -> None:
        """Refresh one slice of the devices every 1/REFRESH_SLICES s: each device once a second."""
        step_s = REFRESH_PERIOD_S / REFRESH_SLICES
        per_slice = -(-self.devices // REFRESH_SLICES)
        next_s = time.monotonic()
        slice_index = 0
        while True:
            next_s += step_s
            await asyncio.sleep(max(0.0, next_s - time.monotonic()))
            first = slice_index * per_slice
            self._refresh(range(first, min(self.devices, first + per_slice)), time.monotonic() - self._t0_s)
            slice_index = (slice_index + 1) % REFRESH_SLICES

    # ----------------------------------------------------------------------------------------------
    # Requests

    def answer(self, port_index: int, frame: bytes) -> bytes:
        """Return the answer to one complete request frame whose MBAP header is valid."""
        tid, _protocol_id, length, unit = _MBAP.unpack_from(frame)
        function = frame[7]
        self.requests += 1
        device = self.device_index(port_index, unit)
        code = _ILLEGAL_FUNCTION
        if device is None:
            code = _GATEWAY_NO_RESPONSE
        elif function in (3, 4):
            code = self._check_range(frame, length, 5, _MAX_READ)
            if not code:
                address, count = _ADDRESS_AND_QUANTITY.unpack_from(frame, 8)
                start = 2 * (self.registers * device + address)
                data = self.image[start : start + 2 * count]
                return _READ_ANSWER.pack(tid, 0, 3 + 2 * count, unit, function, 2 * count) + data
        elif function == 6:
            code = self._check_range(frame, length, 5, 1, single=True)
            if not code:
                self._write(device, _ADDRESS_AND_QUANTITY.unpack_from(frame, 8)[0], frame[10:12])
                return frame
        elif function == 16:
            code = self._check_range(frame, length, 6, _MAX_WRITE)
            if not code:
                address, count = _ADDRESS_AND_QUANTITY.unpack_from(frame, 8)
                if frame[12] != 2 * count or length != 7 + 2 * count:
                    code = _ILLEGAL_VALUE
                else:
                    self._write(device, address, frame[13 : 13 + 2 * count])
                    return _WRITE_ANSWER.pack(tid, 0, 6, unit, function, address, count)
        self.exceptions += 1
        return _EXCEPTION_ANSWER.pack(tid, 0, 3, unit, function | 0x80, code)

    def _check_range(
        self, frame: bytes, length: int, min_pdu: int, max_count: int, *, single: bool = False
    ) -> int:
        """Return 0 if the PDU's address/quantity fit the image, else the exception code."""
        if length - 1 < min_pdu or (min_pdu == 5 and length - 1 != 5):
            return _ILLEGAL_VALUE
        address, count = _ADDRESS_AND_QUANTITY.unpack_from(frame, 8)
        if single:
            count = 1
        if not 1 <= count <= max_count:
            return _ILLEGAL_VALUE
        if address + count > self.registers:
            return _ILLEGAL_ADDRESS
        return 0

    def _write(self, device: int, address: int, data: bytes) -> None:
        start = 2 * (self.registers * device + address)
        self.image[start : start + len(data)] = data
        self._held.setdefault(device, set()).update(range(address, address + len(data) // 2))


class _DeviceConnection(asyncio.Protocol):
    """One client connection to a gateway port: parse frames, answer them in order."""

    __slots__ = ("_buffer", "_port_index", "_simulator", "_transport")

    def __init__(self, simulator: ScaleSimulator, port_index: int) -> None:
        self._simulator = simulator
        self._port_index = port_index
        self._transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport and register the connection so stop() can close it."""
        # A stream transport (uvloop's is not registered as an asyncio.Transport subclass).
        self._transport = cast("asyncio.Transport", transport)
        self._simulator._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        self._transport = None
        self._simulator._connections.discard(self)

    def abort(self) -> None:
        """Close the connection now."""
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        """Answer every complete request; keep a partial one for the next segment."""
        transport = self._transport
        if transport is None:
            return
        buffer = self._buffer + data if self._buffer else data
        try:
            answers: list[bytes] = []
            while len(buffer) >= 7:
                protocol_id, length = (buffer[2] << 8) | buffer[3], (buffer[4] << 8) | buffer[5]
                if protocol_id != 0 or not _MIN_LENGTH <= length <= _MAX_LENGTH:
                    self._simulator.dropped_connections += 1
                    transport.abort()
                    return
                end = 6 + length
                if len(buffer) < end:
                    break
                answers.append(self._simulator.answer(self._port_index, buffer[:end]))
                buffer = buffer[end:]
            self._buffer = buffer
            if answers:
                transport.write(answers[0] if len(answers) == 1 else b"".join(answers))
        except Exception:  # a bug here must cost one connection, never the fleet
            _LOGGER.exception("closing a connection after an internal error")
            self._simulator.dropped_connections += 1
            transport.abort()


# --------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.modbus_scale", description="Serve many simulated Modbus TCP meters."
    )
    parser.add_argument("--devices", type=int, required=True, help="number of simulated meters")
    parser.add_argument("--registers", type=int, default=10, help="holding registers per meter (1..125)")
    parser.add_argument("--port", type=int, default=0, help="first gateway port; 0 picks free ports")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--units-per-port", type=int, default=200, help="meters behind one gateway port")
    parser.add_argument("--seed", type=int, default=0, help="seed of the meters' bases, phases and noise")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="event loop")
    parser.add_argument("--log-level", default="WARNING", help="logging level for stderr")
    return parser


async def _serve(simulator: ScaleSimulator, first_port: int) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    try:
        try:
            await simulator.start(first_port)
        except OSError as err:
            sys.stderr.write(f"modbus_scale: cannot listen: {err}\n")
            return EXIT_FAILED
        try:
            ports = " ".join(f"{host}:{port}" for host, port in simulator.endpoints)
            sys.stdout.write(f"SIMULATORS READY {simulator.devices} devices on {ports}\n")
            sys.stdout.flush()
            await stopping.wait()
        finally:
            await simulator.stop()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    _LOGGER.info("stopped after %d requests (%d exceptions)", simulator.requests, simulator.exceptions)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and serve until SIGINT or SIGTERM; return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        simulator = ScaleSimulator(
            args.devices, args.registers, units_per_port=args.units_per_port, host=args.host, seed=args.seed
        )
    except ValueError as err:
        parser.error(str(err))
    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415 -- optional: only when asked for

        return uvloop.run(_serve(simulator, args.port))
    return asyncio.run(_serve(simulator, args.port))


if __name__ == "__main__":
    sys.exit(main())
