"""Chaos harness: private services, numbered simulators, role processes, faults and invariant checks.

Used by ``bench/chaos.py`` (a long randomized schedule) and ``tests/streams/test_chaos.py`` (a few
focused faults). Everything runs on private instances on free ports: a ``redis-server`` with an
append-only file, a PostgreSQL cluster of its own, a ``mosquitto`` broker, two simulator processes
(Modbus TCP and MQTT) and ``scada run --role ...`` processes. The shared services on 5432, 6379 and
1883 are never touched.

How "every reading" is known
----------------------------
Two ledgers, both exact and both surviving a ``kill -9`` of any process:

- **The readings stream.** The stream is never trimmed during a run (``SCADA_READINGS_MAXLEN`` far
  above what a run adds), so at the end ``XRANGE`` lists every reading the gateways' sinks ever
  delivered to Redis. Together with the sinks' ``shed`` counters (the explicit overflow policy,
  scraped from ``/metrics``) that is what the gateways *produced*. The invariant: every reading of
  the stream is in the ``readings`` table exactly once, and the table holds nothing else.
- **The simulators' own numbering.** Each simulated device has a point ``seq``: the Modbus
  simulator increments it on every read of its input registers, the MQTT simulator on every
  telemetry message, and each simulator appends ``R <device> <seq> <unix time>`` to its log (one
  unbuffered ``write`` per sample, so a ``kill -9`` of the simulator loses no line) and continues
  its numbering after a restart. Every sample whose ``seq`` is not stored with good quality is
  *missing at the source*; it is attributed to a fault window during which a sample may honestly
  be lost before it ever reaches a gateway's sink (a gateway killed with readings in its memory, a
  broker or gateway down while an MQTT device publishes to a clean session, a simulator killed in
  the middle of a reply). A missing sample outside such windows is a loss the system must not have.

Commands are counted at the devices: every command carries a unique value (and MQTT commands their
correlation id), each simulator logs ``W <device> <value> <correlation id> <unix time>`` for every
write it applies, and a value written twice is a command executed twice.

The simulator entry point is this module: ``python bench/_chaos.py sim-modbus|sim-mqtt SPEC LOG``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
import redis.asyncio as aioredis

sys.path.extend(str(Path(__file__).resolve().parents[1] / sub) for sub in ("tests", "tests/streams"))
# The repository first: without it, tests/scada (a folder of tests) would shadow the package scada.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _fault_helpers
from _fault_helpers import (
    _AS_POSTGRES,
    SCADA,
    _run,
    free_port,
    initdb_command,
    pg_ctl_start_command,
    pg_ctl_stop_command,
    private_dir,
)
from _procs import metric_sum, parse_metrics

_LOGGER = logging.getLogger("chaos")

REPO: Final = Path(__file__).resolve().parents[1]
PYTHON: Final = sys.executable
PG_BIN: Final = _fault_helpers.PG_BIN
MOSQUITTO: Final = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SECRET_KEY: Final = "chaos-signing-key-" + "c" * 32
PREFIX: Final = "chaos:"
READINGS_KEY: Final = PREFIX + "readings"
COMMANDS_KEY: Final = PREFIX + "commands"
RESULTS_KEY: Final = PREFIX + "command_results"
DEADLETTER_KEY: Final = PREFIX + "deadletter"
HISTORIAN_GROUP: Final = "historian"
POINTS_PER_DEVICE: Final = 5
"""seq, p1, p2, p3 and the writable setpoint sp."""
LATE_RESPONSE_REASON: Final = "command response: no pending command"
"""Dead-letter reason of a device's answer that arrived after its write had timed out (a frozen
device, a broker outage): the gateway reported TIMEOUT and sets the late answer aside, as it should."""
SOURCE_LOSS_MARGIN_S: Final = 3.0
"""A sample this close to a source-lossy fault window is attributed to it (flush linger, poll period)."""


class FaultKind:
    """Names of the faults, as they appear in ``faults_injected``."""

    KILL_GATEWAY = "kill9_gateway"
    KILL_HISTORIAN = "kill9_historian"
    KILL_API = "kill9_api"
    KILL_ANALYTICS = "kill9_analytics"
    KILL_CONTROL_LEADER = "kill9_control_leader"
    KILL_REDIS = "kill9_redis"
    KILL_POSTGRES = "kill9_postgres"
    KILL_MOSQUITTO = "kill9_mosquitto"
    KILL_SIM_MODBUS = "kill9_sim_modbus"
    KILL_SIM_MQTT = "kill9_sim_mqtt"
    STOP = "sigstop"  # suffixed with the target: sigstop_historian
    READ_ONLY_DB = "read_only_db"
    FULL_DISK = "full_disk"


SOURCE_LOSSY: Final = {
    FaultKind.KILL_GATEWAY: {"modbus", "mqtt"},  # polled/received readings still in its memory
    FaultKind.STOP + "_gateway": {"modbus", "mqtt"},  # polls time out; clean MQTT session drops
    FaultKind.KILL_MOSQUITTO: {"mqtt"},  # published to a dying broker, or while the gateway reconnects
    FaultKind.KILL_SIM_MODBUS: {"modbus"},  # a read served, the reply never sent
    FaultKind.KILL_SIM_MQTT: {"mqtt"},  # a publish handed to the socket, never delivered
    FaultKind.STOP + "_sim_modbus": {"modbus"},
    FaultKind.STOP + "_sim_mqtt": {"mqtt"},
    "startup": {"modbus", "mqtt"},  # simulators run before the gateway has connected and subscribed
    "shutdown": {"modbus", "mqtt"},  # simulators stopping at the end of a run
}
"""Faults during which a simulator's sample may be lost before it reaches a gateway's sink, and for
which protocol; any other missing sample is a loss the system must not have."""


# --------------------------------------------------------------------------------------------------
# Small helpers


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> None:
    """:func:`_fault_helpers.wait_until`, polling every 0.1 s by default (the state lives in other
    processes, which take longer to change than the fault tests' in-process state)."""
    await _fault_helpers.wait_until(condition, timeout_s, what, interval_s=interval_s, detail=detail)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------
# Private services


class PrivateRedis(_fault_helpers.PrivateRedis):
    """A ``redis-server`` with an append-only file: a restart (even after ``kill -9``) keeps the streams.

    With ``appendfsync everysec`` (the default) Redis writes each command to the file before it
    replies, so a killed process loses nothing it acknowledged (only a machine crash could lose the
    last second).
    """

    READY_TIMEOUT_S = 30.0
    SOCKET_TIMEOUT_S = 3.0
    CONNECT_TIMEOUT_S = 1.0


class PrivatePostgres:
    """A PostgreSQL cluster of its own; optionally its database on a small tmpfs that can be filled."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.disk: Path | None = None
        """The tmpfs holding the database's tablespace, when :meth:`put_on_small_disk` succeeded."""
        self._ballast: Path | None = None

    async def init(self) -> None:
        """Run initdb (as the PostgreSQL user when we are root)."""
        if _AS_POSTGRES:
            shutil.chown(self.root, "postgres", "postgres")
        await _run(*initdb_command(self.data))

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and wait until it accepts connections (retrying while a killed one's
        backends still hold its shared memory)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await _run(*pg_ctl_start_command(self.data, self.root, self.port), timeout_s=40)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
            else:
                return

    def postmaster_pid(self) -> int | None:
        """Return the postmaster's pid, if it runs."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    async def kill(self) -> None:
        """SIGKILL the postmaster (its backends notice and exit; crash recovery at the next start)."""
        pid = self.postmaster_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

            async def dead() -> bool:
                return not _alive(pid)

            await wait_until(dead, 10, "the postmaster to die")

    async def stop(self, mode: str = "immediate") -> None:
        """Stop the server with pg_ctl (``immediate`` is like a crash)."""
        await _run(*pg_ctl_stop_command(self.data, mode))

    async def destroy(self) -> None:
        """Stop the server, unmount the small disk, remove the files."""
        with contextlib.suppress(RuntimeError, TimeoutError):
            await self.stop()
        if self.disk is not None:
            await _run("umount", "-l", str(self.disk), check=False)
        await asyncio.to_thread(shutil.rmtree, self.root, True)

    async def connect(self, **settings: str) -> asyncpg.Connection:
        """Open an admin connection (read-write even while the database defaults to read-only)."""
        return await asyncpg.connect(
            self.url,
            timeout=5,
            server_settings={"default_transaction_read_only": "off", **settings},
        )

    async def put_on_small_disk(self, size_mb: int = 64) -> bool:
        """Move the database ``postgres`` onto a tablespace on a tmpfs of ``size_mb``; return False if
        mounting is not possible here (not root, no CAP_SYS_ADMIN). Call before anything connects."""
        disk = self.root / "smalldisk"
        disk.mkdir()
        try:
            await _run("mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(disk))
        except (RuntimeError, FileNotFoundError) as err:
            _LOGGER.warning("no small disk for the full-disk fault: %s", err)
            return False
        self.disk = disk
        space = disk / "ts"
        space.mkdir()
        if _AS_POSTGRES:
            shutil.chown(space, "postgres", "postgres")
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/template1", timeout=5)
        try:
            await conn.execute(f"CREATE TABLESPACE chaos_small LOCATION '{space}'")
            await conn.execute("ALTER DATABASE postgres SET TABLESPACE chaos_small")
        finally:
            await conn.close()
        return True

    async def fill_disk(self) -> None:
        """Fill the small disk to the last byte (the database's next extension fails: ENOSPC)."""
        assert self.disk is not None
        self._ballast = self.disk / "ballast"

        def fill() -> None:
            assert self._ballast is not None
            fd = os.open(self._ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for size in (1 << 20, 4096, 1):  # megabytes, then the last pages, then the last bytes
                    chunk = b"\0" * size
                    with contextlib.suppress(OSError):  # ENOSPC: full at this granularity
                        while os.write(fd, chunk) > 0:
                            pass
            finally:
                os.close(fd)

        await asyncio.to_thread(fill)

    async def free_disk(self) -> None:
        """Remove the ballast."""
        if self._ballast is not None:
            await asyncio.to_thread(self._ballast.unlink, True)
            self._ballast = None

    async def set_read_only(self, read_only: bool) -> None:
        """Make the database default to read-only transactions (or back), and end every other session
        so that each new one gets the setting (the way a fail-over to a read-only node looks)."""
        conn = await self.connect()
        try:
            if read_only:
                await conn.execute("ALTER DATABASE postgres SET default_transaction_read_only = on")
            else:
                await conn.execute("ALTER DATABASE postgres RESET default_transaction_read_only")
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = 'postgres' AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
        finally:
            await conn.close()


# --------------------------------------------------------------------------------------------------
# Processes: simulators and server roles


class ChildProcess:
    """A subprocess whose output goes to a file; kill -9, SIGSTOP/SIGCONT, restart."""

    def __init__(
        self, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name, self.argv, self.log = name, list(argv), log
        self.env = {**os.environ, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.stopped = False

    @property
    def running(self) -> bool:
        """Return True while the process exists (even when frozen)."""
        return self.proc is not None and self.proc.returncode is None

    def tail(self, chars: int = 4_000) -> str:
        """The end of the process's output, for failure messages."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    async def spawn(self) -> None:
        """Start the process (no readiness wait)."""
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, stdout=out, stderr=asyncio.subprocess.STDOUT
            )
        self.stopped = False

    def assert_alive(self) -> None:
        """Raise with the output if the process has exited."""
        assert self.proc is not None, f"{self.name} was never started"
        if self.proc.returncode is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    async def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye."""
        await _fault_helpers.kill_process(self.proc)
        self.stopped = False

    def freeze(self) -> None:
        """SIGSTOP."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def thaw(self) -> None:
        """SIGCONT."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    async def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (after SIGCONT) and wait; SIGKILL if it does not exit; return the exit code."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc is not None and proc.returncode is not None else 0
        self.thaw()
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                return await proc.wait()
        except TimeoutError:
            await _fault_helpers.kill_process(proc)
            return await proc.wait()


class PrivateMosquitto(ChildProcess):
    """A ``mosquitto`` broker of its own (MQTT 3.1.1 and 5, anonymous, no persistence)."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        config = root / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\n",
            encoding="utf-8",
        )
        super().__init__("mosquitto", [MOSQUITTO, "-c", str(config)], root / "mosquitto.log")

    async def start(self) -> None:
        """Start the broker and wait until its port accepts connections."""
        await self.spawn()

        async def listening() -> bool:
            self.assert_alive()
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 1)
            except (OSError, TimeoutError):
                return False
            writer.close()
            return True

        await wait_until(listening, 15, "mosquitto to listen", detail=self.tail)

    def log_size(self) -> int:
        """Return the size of the broker's log (a mark for :meth:`wait_for_client`)."""
        return self.log.stat().st_size if self.log.exists() else 0

    async def wait_for_client(self, prefix: str, since: int, timeout_s: float = 60.0) -> None:
        """Wait until a client whose id starts with ``prefix`` connected after log mark ``since``."""

        async def connected() -> bool:
            with self.log.open("rb") as handle:
                handle.seek(since)
                return f" as {prefix}".encode() in handle.read()

        await wait_until(connected, timeout_s, f"an MQTT client {prefix}* to connect", interval_s=0.1)


class SimProcess(ChildProcess):
    """A simulator process (``sim-modbus`` or ``sim-mqtt``) of this module; ready once it logs READY."""

    def __init__(self, kind: str, spec: Path, root: Path) -> None:
        self.kind = kind
        self.sample_log = root / f"samples-{kind}.log"
        super().__init__(
            f"sim-{kind}",
            [PYTHON, str(Path(__file__).resolve()), f"sim-{kind}", str(spec), str(self.sample_log)],
            root / f"sim-{kind}.out",
        )

    async def start(self) -> None:
        """Start it and wait for its READY line (listening / connected)."""
        size = self.log.stat().st_size if self.log.exists() else 0
        await self.spawn()

        async def ready() -> bool:
            self.assert_alive()
            return b"READY" in self.log.read_bytes()[size:]

        await wait_until(ready, 30, f"{self.name} to be ready", detail=self.tail)


def _mint_admin_token(site_id: str, roots: Sequence[str]) -> str:
    from scada.security import Grant, Principal, PrincipalKind, Role, TokenSigner  # noqa: PLC0415

    principal = Principal(
        tenant=site_id,
        subject="chaos-admin",
        kind=PrincipalKind.USER,
        grants=tuple(Grant(root, Role.ADMIN) for root in roots),
        tenant_nodes=frozenset(roots),
    )
    return TokenSigner(SECRET_KEY.encode()).issue(principal)


class RoleProcess(ChildProcess):
    """``scada run --role ROLE`` on the private services."""

    def __init__(
        self, role: str, index: int, site: Path, env: Mapping[str, str], root: Path, token: str
    ) -> None:
        self.role, self.http_port = role, free_port()
        self.headers = {"Authorization": f"Bearer {token}"}
        super().__init__(
            f"{role}-{index}",
            [SCADA, "run", "-c", str(site), "--role", role],
            root / f"scada-{role}-{index}.out",
            {**env, "SCADA_HTTP_PORT": str(self.http_port)},
        )

    async def start(self, ready_timeout_s: float = 60.0) -> None:
        """Start it and wait until its health endpoint answers."""
        await self.spawn()

        async def ready() -> bool:
            self.assert_alive()
            try:
                await self.health()
            except (aiohttp.ClientError, TimeoutError, AssertionError):
                return False
            return True

        await wait_until(ready, ready_timeout_s, f"scada {self.role} to serve", detail=self.tail)

    async def _get(self, path: str, timeout_s: float = 3.0) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
            http.get(f"http://127.0.0.1:{self.http_port}{path}", headers=self.headers) as response,
        ):
            return response.status, await response.text()

    async def health(self) -> dict[str, Any]:
        """Return the body of ``GET /api/v1/health`` (raise if it does not answer 200)."""
        status, text = await self._get("/api/v1/health")
        assert status == 200, text
        body = json.loads(text)
        assert isinstance(body, dict)
        return body

    async def metric(self, name: str, **labels: str) -> float:
        """Return the sum of ``/metrics`` samples of ``name`` with ``labels`` (0 when there is none)."""
        status, text = await self._get("/metrics")
        assert status == 200, text
        return metric_sum(parse_metrics(text), name, **labels)


# --------------------------------------------------------------------------------------------------
# The site


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """What the generated site holds: Modbus devices behind one simulator port, MQTT devices."""

    modbus_devices: int = 3
    mqtt_devices: int = 3
    period_s: float = 0.5

    def modbus_ids(self) -> list[str]:
        """Return the Modbus device ids."""
        return [f"m{i}" for i in range(self.modbus_devices)]

    def mqtt_ids(self) -> list[str]:
        """Return the MQTT device ids."""
        return [f"q{i}" for i in range(self.mqtt_devices)]

    def readings_per_s(self) -> float:
        """Return the readings the fleet produces per second when every device is up."""
        return (self.modbus_devices + self.mqtt_devices) * POINTS_PER_DEVICE / self.period_s


def site_yaml(spec: SiteSpec, modbus_port: int) -> str:
    """Return the site file: every device has seq, p1..p3 and a writable setpoint sp."""
    lines = [
        "site: {id: chaos, name: Chaos, timezone: UTC}",
        "hierarchy: [{id: g, name: G, level: group}]",
        "devices:",
    ]
    for unit, device in enumerate(spec.modbus_ids(), start=1):
        lines += [
            f"  - id: {device}",
            "    node: g",
            "    kind: production_line",
            "    protocol: modbus_tcp",
            f"    poll_period_s: {spec.period_s}",
            f"    modbus: {{host: 127.0.0.1, port: {modbus_port}, unit_id: {unit}, timeout_s: 1.0}}",
            "    points:",
            "      - {key: seq, kind: status, unit: '1', modbus: {table: input, address: 0, type: uint32}}",
            *(
                f"      - {{key: p{k}, kind: temperature, unit: degC,"
                f" modbus: {{table: input, address: {2 * k}, type: float32}}}}"
                for k in (1, 2, 3)
            ),
            "      - {key: sp, kind: setpoint, unit: degC, writable: true,"
            " modbus: {table: holding, address: 0, type: float32}}",
        ]
    for device in spec.mqtt_ids():
        lines += [
            f"  - id: {device}",
            "    node: g",
            "    kind: production_line",
            "    protocol: mqtt",
            f"    poll_period_s: {spec.period_s}",
            "    mqtt: {timeout_s: 2.0}",
            "    points:",
            "      - {key: seq, kind: status, unit: '1'}",
            *(f"      - {{key: p{k}, kind: temperature, unit: degC}}" for k in (1, 2, 3)),
            "      - {key: sp, kind: setpoint, unit: degC, writable: true}",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Faults and the plant


@dataclasses.dataclass
class FaultWindow:
    """One injected fault: what, on what, from when to when (unix time)."""

    kind: str
    start: float
    end: float | None = None


class ChaosPlant:
    """Private services, simulators and role processes, with fault actions and the final accounting."""

    def __init__(self, root: Path, spec: SiteSpec | None = None) -> None:
        self.root = root
        self.spec = spec or SiteSpec()
        self.redis = PrivateRedis(root)
        self.pg = PrivatePostgres(private_dir("chaos-pg-"))
        self.mqtt = PrivateMosquitto(root)
        self.modbus_port = free_port()
        self.site = root / "site.yaml"
        self.site.write_text(site_yaml(self.spec, self.modbus_port), encoding="utf-8")
        sim_spec = root / "sim.json"
        sim_spec.write_text(
            json.dumps(
                {
                    "modbus_port": self.modbus_port,
                    "modbus_devices": self.spec.modbus_ids(),
                    "mqtt_url": self.mqtt.url,
                    "mqtt_devices": self.spec.mqtt_ids(),
                    "period_s": self.spec.period_s,
                }
            ),
            encoding="utf-8",
        )
        self.sims = {kind: SimProcess(kind, sim_spec, root) for kind in ("modbus", "mqtt")}
        self.env = {
            "SCADA_DB_URL": self.pg.url,
            "SCADA_REDIS_URL": self.redis.url,
            "SCADA_MQTT_URL": self.mqtt.url,
            "SCADA_STREAM_PREFIX": PREFIX,
            "SCADA_DATA_DIR": str(root / "data"),
            "SCADA_SECRET_KEY": SECRET_KEY,
            "SCADA_READINGS_MAXLEN": "10000000",  # never trimmed in a run: XRANGE lists every reading
            "SCADA_SERVICE_TIMEOUT_S": "3",
            "SCADA_LOG_LEVEL": "WARNING",
        }
        self.token = _mint_admin_token("chaos", ["g"])
        self.roles: dict[str, list[RoleProcess]] = {}
        self.faults: list[FaultWindow] = []
        self.shed_seen: dict[int, float] = {}
        """Sink shed counter per gateway process (pid), as last scraped."""
        self.commands_sent: list[tuple[str, str, float, float]] = []
        """(correlation id, point, value, unix time sent) of every command the harness appended."""
        self._command_no = 0
        self.has_small_disk = False
        self._sims_started = time.time()

    # -------------------------------------------------------------------------- lifecycle

    async def start_services(self, *, small_disk: bool = False) -> None:
        """Start Redis, PostgreSQL (optionally on a small disk), Mosquitto and both simulators."""
        await self.pg.init()
        await asyncio.gather(self.redis.start(), self.pg.start(), self.mqtt.start())
        if small_disk:
            self.has_small_disk = await self.pg.put_on_small_disk()
        self._sims_started = time.time()
        await asyncio.gather(*(sim.start() for sim in self.sims.values()))

    def mark_ready(self) -> None:
        """Say the gateways are up: samples from the simulators' start until now are start-up, not
        losses (an MQTT device publishing before anyone subscribed)."""
        self.faults.append(FaultWindow("startup", self._sims_started, time.time()))

    async def start_role(self, role: str) -> RoleProcess:
        """Start one more process of ``role`` and wait until it serves."""
        procs = self.roles.setdefault(role, [])
        proc = RoleProcess(role, len(procs), self.site, self.env, self.root, self.token)
        procs.append(proc)
        await proc.start()
        return proc

    def role(self, role: str, index: int = 0) -> RoleProcess:
        """Return a started role process."""
        return self.roles[role][index]

    async def close(self) -> None:
        """Stop everything this plant started and remove its files."""
        for procs in self.roles.values():
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.thaw()
                    await proc.kill()
        for sim in self.sims.values():
            with contextlib.suppress(Exception):
                sim.thaw()
                await sim.kill()
        with contextlib.suppress(Exception):
            await self.mqtt.kill()
        with contextlib.suppress(Exception):
            await self.redis.kill()
        with contextlib.suppress(Exception):
            await self.pg.destroy()
        await asyncio.to_thread(shutil.rmtree, self.root, True)

    # -------------------------------------------------------------------------- fault actions

    def _begin(self, kind: str) -> FaultWindow:
        window = FaultWindow(kind, time.time())
        self.faults.append(window)
        return window

    async def scrape_shed(self) -> None:
        """Remember each live gateway's shed counter (a killed gateway keeps its last scrape)."""
        for proc in self.roles.get("gateway", []):
            if proc.running and not proc.stopped and proc.proc is not None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, AssertionError, ValueError):
                    self.shed_seen[proc.proc.pid] = await proc.metric("scada_sink_shed_readings_total")

    async def wait_devices_online(self, timeout_s: float = 60.0) -> None:
        """Wait until every gateway's sessions are all online (MQTT devices subscribed again)."""
        total = self.spec.modbus_devices + self.spec.mqtt_devices

        async def online() -> bool:
            count = 0.0
            for proc in self.roles.get("gateway", []):
                if not proc.running or proc.stopped:
                    return False
                try:
                    count += await proc.metric("scada_devices", state="online")
                except (aiohttp.ClientError, TimeoutError, AssertionError, ValueError):
                    return False
            return count >= total

        await wait_until(online, timeout_s, "every device session to be online", interval_s=0.1)

    async def kill_role(self, role: str, index: int = 0, *, down_s: float = 0.0) -> FaultWindow:
        """kill -9 a role process, wait ``down_s``, start it again (same port: same consumer names)."""
        kind = {
            "gateway": FaultKind.KILL_GATEWAY,
            "historian": FaultKind.KILL_HISTORIAN,
            "api": FaultKind.KILL_API,
            "analytics": FaultKind.KILL_ANALYTICS,
            "control": FaultKind.KILL_CONTROL_LEADER,
        }[role]
        if role == "gateway":
            await self.scrape_shed()
        window = self._begin(kind)
        proc = self.role(role, index)
        await proc.kill()
        await asyncio.sleep(down_s)
        mark = self.mqtt.log_size()
        await proc.start()
        if role == "gateway" and self.spec.mqtt_devices and self.mqtt.running:
            await self.mqtt.wait_for_client("carbonos-", mark)
        if role == "gateway":
            await self.wait_devices_online()  # polling and subscribed again: no sample is lost after this
        window.end = time.time()
        return window

    async def freeze_role(self, role: str, index: int = 0, *, frozen_s: float) -> FaultWindow:
        """SIGSTOP a role process for ``frozen_s``, then SIGCONT."""
        window = self._begin(f"{FaultKind.STOP}_{role}")
        proc = self.role(role, index)
        proc.freeze()
        try:
            await asyncio.sleep(frozen_s)
        finally:
            proc.thaw()
        if role == "gateway":
            await self.wait_devices_online()
        window.end = time.time()
        return window

    async def kill_sim(self, kind: str, *, down_s: float = 0.0) -> FaultWindow:
        """kill -9 a simulator process and start it again (it continues its numbering)."""
        window = self._begin(FaultKind.KILL_SIM_MODBUS if kind == "modbus" else FaultKind.KILL_SIM_MQTT)
        sim = self.sims[kind]
        await sim.kill()
        await asyncio.sleep(down_s)
        await sim.start()
        await self.wait_devices_online()
        window.end = time.time()
        return window

    async def freeze_sim(self, kind: str, *, frozen_s: float) -> FaultWindow:
        """SIGSTOP a simulator for ``frozen_s``."""
        window = self._begin(f"{FaultKind.STOP}_sim_{kind}")
        sim = self.sims[kind]
        sim.freeze()
        try:
            await asyncio.sleep(frozen_s)
        finally:
            sim.thaw()
        await self.wait_devices_online()
        window.end = time.time()
        return window

    async def _kill_service(
        self, kind: str, service: PrivateRedis | PrivatePostgres, down_s: float
    ) -> FaultWindow:
        """kill -9 a private service, wait ``down_s``, start it again; the window spans all three."""
        window = self._begin(kind)
        await service.kill()
        await asyncio.sleep(down_s)
        await service.start()
        window.end = time.time()
        return window

    async def kill_redis(self, *, down_s: float) -> FaultWindow:
        """kill -9 redis-server, wait, start it again on its append-only file."""
        return await self._kill_service(FaultKind.KILL_REDIS, self.redis, down_s)

    async def kill_postgres(self, *, down_s: float) -> FaultWindow:
        """kill -9 the postmaster, wait, start it again (crash recovery)."""
        return await self._kill_service(FaultKind.KILL_POSTGRES, self.pg, down_s)

    async def kill_mosquitto(self, *, down_s: float) -> FaultWindow:
        """kill -9 the broker, wait, start it again on the same port."""
        window = self._begin(FaultKind.KILL_MOSQUITTO)
        await self.mqtt.kill()
        await asyncio.sleep(down_s)
        mark = self.mqtt.log_size()
        await self.mqtt.start()
        # MQTT telemetry is lost until the gateway has reconnected and its sessions subscribed again
        # (clean session): the fault lasts until then, which backoffs make seconds after the broker.
        await self.mqtt.wait_for_client("carbonos-", mark)
        await self.wait_devices_online()
        window.end = time.time()
        return window

    async def read_only_db(self, *, for_s: float) -> FaultWindow:
        """Make the database read-only (sessions terminated) for ``for_s``, then writable again."""
        window = self._begin(FaultKind.READ_ONLY_DB)
        await self.pg.set_read_only(True)
        try:
            await asyncio.sleep(for_s)
        finally:
            await self.pg.set_read_only(False)
        window.end = time.time()
        return window

    async def full_disk(self, *, for_s: float) -> FaultWindow:
        """Fill the database's disk for ``for_s``, then free it (needs :meth:`start_services` with
        ``small_disk=True`` and a successful mount)."""
        assert self.has_small_disk, "no small disk: start_services(small_disk=True) could not mount one"
        window = self._begin(FaultKind.FULL_DISK)
        await self.pg.fill_disk()
        try:
            await asyncio.sleep(for_s)
        finally:
            await self.pg.free_disk()
        window.end = time.time()
        return window

    # -------------------------------------------------------------------------- control leader

    async def control_status(self, proc: RoleProcess) -> dict[str, Any] | None:
        """Return the ``control`` part of a control process's health, or None if it does not answer."""
        if not proc.running or proc.stopped:
            return None
        try:
            body = await proc.health()
        except (aiohttp.ClientError, TimeoutError, AssertionError, ValueError):
            return None
        control = body.get("control")
        return control if isinstance(control, dict) else None

    async def leader(self) -> tuple[int, int] | None:
        """Return (index, fence) of the control process whose health says it leads, if exactly one."""
        found = []
        for index, proc in enumerate(self.roles.get("control", [])):
            status = await self.control_status(proc)
            if status is not None and status.get("leader") is True:
                found.append((index, int(status.get("fence") or 0)))
        return found[0] if len(found) == 1 else None

    async def kill_leader(self, *, timeout_s: float = 30.0) -> float:
        """kill -9 the control leader; return seconds until another process's health says it leads
        (with a larger fence). The killed process is started again afterwards, as a standby."""
        current = await self.leader()
        assert current is not None, "no single control leader to kill"
        index, fence = current
        window = self._begin(FaultKind.KILL_CONTROL_LEADER)
        killed = self.role("control", index)
        await killed.kill()
        start_s = time.monotonic()

        async def taken_over() -> bool:
            now = await self.leader()
            return now is not None and now[0] != index and now[1] > fence

        await wait_until(taken_over, timeout_s, "a standby to take the control lease", interval_s=0.05)
        failover_s = time.monotonic() - start_s
        await killed.start()
        window.end = time.time()
        return failover_s

    async def freeze_leader(self, *, frozen_s: float) -> float | None:
        """SIGSTOP the control leader for ``frozen_s``; return seconds until a standby's health says
        it leads with a larger fence (None if that did not happen while the leader was frozen)."""
        current = await self.leader()
        assert current is not None, "no single control leader to freeze"
        index, fence = current
        window = self._begin(f"{FaultKind.STOP}_control")
        frozen = self.role("control", index)
        frozen.freeze()
        start_s = time.monotonic()
        failover_s: float | None = None
        try:
            while (elapsed_s := time.monotonic() - start_s) < frozen_s:
                if failover_s is None:
                    for other, proc in enumerate(self.roles["control"]):
                        status = await self.control_status(proc) if other != index else None
                        if status and status.get("leader") is True and int(status.get("fence") or 0) > fence:
                            failover_s = elapsed_s
                await asyncio.sleep(0.05)
        finally:
            frozen.thaw()
        window.end = time.time()
        return failover_s

    # -------------------------------------------------------------------------- commands

    async def send_commands(self, redis: aioredis.Redis, count: int = 1) -> int:
        """Append ``count`` commands, each with a unique value and correlation id; return how many
        Redis took (a down Redis refuses them, which is not a loss: the sender knows)."""
        from scada.model import Command, PointId, Priority  # noqa: PLC0415
        from streams.commands import send_command  # noqa: PLC0415

        devices = [*self.spec.modbus_ids(), *self.spec.mqtt_ids()]
        sent = 0
        for _ in range(count):
            self._command_no += 1
            device = devices[self._command_no % len(devices)]
            value = float(1000 + self._command_no)
            command = Command(
                point=PointId(f"{device}.sp"),
                value=value,
                priority=Priority.OPERATOR,
                source="chaos",
                reason="chaos harness",
                correlation_id=f"chaos-{uuid.uuid4().hex}",
            )
            try:
                await send_command(redis, COMMANDS_KEY, command, timeout_s=3)
            except (OSError, TimeoutError, aioredis.RedisError):
                continue
            self.commands_sent.append((command.correlation_id, command.point, value, time.time()))
            sent += 1
        return sent

    # -------------------------------------------------------------------------- settling

    async def ensure_up(self) -> None:
        """Bring back whatever a fault left down or frozen (the end of a schedule)."""
        for sim in self.sims.values():
            sim.thaw()
        for procs in self.roles.values():
            for proc in procs:
                proc.thaw()
        if self.pg.disk is not None:
            await self.pg.free_disk()
        if self.redis.proc is None:
            await self.redis.start()
        if self.pg.postmaster_pid() is None:
            await self.pg.start()
        if self.mqtt.proc is None:
            await self.mqtt.start()

    async def settle(self, redis: aioredis.Redis, *, timeout_s: float = 120.0) -> None:
        """Stop the simulators, then the gateways (SIGTERM: the sink flushes), then wait until the
        historian group has nothing pending and nothing unread."""
        await self.scrape_shed()
        shutdown = FaultWindow("shutdown", time.time())
        self.faults.append(shutdown)
        for sim in self.sims.values():
            await sim.terminate()
        await asyncio.sleep(1.0)  # the last MQTT messages reach the gateway
        await self.scrape_shed()
        for proc in self.roles.get("gateway", []):
            code = await proc.terminate()
            assert code == 0, f"gateway exited with {code}:\n{proc.tail()}"
        shutdown.end = time.time()

        async def drained() -> bool:
            for proc in self.roles.get("historian", []):
                proc.assert_alive()
            try:
                for info in await redis.xinfo_groups(READINGS_KEY):
                    if info["name"] in (HISTORIAN_GROUP, HISTORIAN_GROUP.encode()):
                        return bool(info["pending"] == 0 and info["lag"] == 0)
            except (OSError, TimeoutError, aioredis.RedisError):
                return False
            return False

        historian = self.roles.get("historian", [None])[0]
        await wait_until(
            drained,
            timeout_s,
            "the historian group to drain",
            interval_s=0.5,
            detail=historian.tail if historian is not None else None,
        )

    # -------------------------------------------------------------------------- accounting

    async def account(self, redis: aioredis.Redis) -> Accounting:
        """Compare the stream, the table and the simulators' logs; count command executions."""
        stream = await _stream_readings(redis)
        conn = await self.pg.connect()
        try:
            rows = await conn.fetch(
                "SELECT p.point_id, r.ts, r.value, r.quality FROM readings r JOIN points p ON p.id = r.point"
            )
        finally:
            await conn.close()
        stored = Counter((row["point_id"], _us(row["ts"])) for row in rows)
        stream_keys = set(stream)
        stored_keys = set(stored)
        good_seq: dict[str, set[int]] = {}
        for row in rows:
            point_id: str = row["point_id"]
            if point_id.endswith(".seq") and row["quality"] == 2 and row["value"] is not None:
                good_seq.setdefault(point_id.removesuffix(".seq"), set()).add(int(row["value"]))
        source = _source_samples(self.sims.values())
        missing_by_kind: Counter[str] = Counter()
        unexplained: list[tuple[str, int, float]] = []
        protocol = {d: "modbus" for d in self.spec.modbus_ids()} | {d: "mqtt" for d in self.spec.mqtt_ids()}
        samples = 0
        for device, served in source.items():
            samples += len(served)
            have = good_seq.get(device, set())
            for seq, at in served.items():
                if seq in have:
                    continue
                kind = self._lossy_fault_at(at, protocol[device])
                if kind is None:
                    unexplained.append((device, seq, at))
                else:
                    missing_by_kind[f"{kind}/{protocol[device]}"] += 1
        deadletters = await redis.xlen(DEADLETTER_KEY)
        writes = _device_writes(self.sims.values())
        results = await results_by_correlation(redis)
        sent_ids = {c for c, _, _, _ in self.commands_sent}
        no_result = [
            (c, point, self._fault_at(at)) for c, point, _, at in self.commands_sent if c not in results
        ]
        reasons: Counter[str] = Counter()
        late: list[str] = []
        dead: Any = await redis.xrange(DEADLETTER_KEY, count=10_000)
        for _entry_id, fields in dead:
            reason = fields.get(b"reason", b"?").decode(errors="replace")
            if reason.startswith(LATE_RESPONSE_REASON):
                late.append(reason.removeprefix(LATE_RESPONSE_REASON).strip(" '"))
                reason = LATE_RESPONSE_REASON
            reasons[reason[:160]] += 1
        pending_commands = 0
        with contextlib.suppress(aioredis.ResponseError):
            for info in await redis.xinfo_groups(COMMANDS_KEY):
                pending_commands += int(info["pending"])
        value_writes = Counter(value for _, value, _ in writes)
        corr_writes = Counter(corr for _, _, corr in writes if corr)
        return Accounting(
            readings_in_stream=len(stream_keys),
            stream_duplicates=sum(stream.values()) - len(stream_keys),
            readings_shed=int(sum(self.shed_seen.values())),
            readings_stored=sum(stored.values()),
            readings_lost_after_stream=len(stream_keys - stored_keys),
            readings_phantom=len(stored_keys - stream_keys),
            readings_duplicated=sum(stored.values()) - len(stored_keys),
            deadletters=deadletters,
            deadletter_reasons=dict(reasons),
            commands_without_result=no_result,
            commands_pending_at_end=pending_commands,
            late_responses=len(late),
            late_responses_without_timeout=sum(1 for c in late if results.get(c, (0, ""))[1] != "timeout"),
            source_samples=samples,
            source_missing_in_fault_windows=dict(missing_by_kind),
            source_missing_unexplained=unexplained,
            commands_sent=len(self.commands_sent),
            commands_with_result=len(sent_ids & set(results)),
            command_results_duplicated=sum(n - 1 for c, (n, _) in results.items() if c in sent_ids and n > 1),
            commands_written=len(writes),
            commands_duplicated=sum(n - 1 for n in value_writes.values() if n > 1)
            + sum(n - 1 for n in corr_writes.values() if n > 1),
            result_status=dict(Counter(s for c, (_, s) in results.items() if c in sent_ids)),
        )

    def _fault_at(self, at: float, margin_s: float = 10.0) -> str | None:
        """Return the kind of the fault whose window (widened by ``margin_s``) holds ``at``."""
        for window in self.faults:
            end = window.end if window.end is not None else time.time()
            if window.start - margin_s <= at <= end + margin_s and window.kind != "startup":
                return window.kind
        return None

    def _lossy_fault_at(self, at: float, protocol: str) -> str | None:
        for window in self.faults:
            end = window.end if window.end is not None else time.time()
            lossy = SOURCE_LOSSY.get(window.kind, set())
            if protocol in lossy and window.start - SOURCE_LOSS_MARGIN_S <= at <= end + SOURCE_LOSS_MARGIN_S:
                return window.kind
        return None


@dataclasses.dataclass
class Accounting:
    """What the run produced, stored, lost, duplicated and shed (see the module docstring)."""

    readings_in_stream: int
    """Distinct (point, ts) the gateways delivered to the readings stream."""
    stream_duplicates: int
    """Readings delivered to the stream more than once (a pipeline re-sent after a Redis error)."""
    readings_shed: int
    readings_stored: int
    readings_lost_after_stream: int
    readings_phantom: int
    """Rows with no reading in the stream (would mean Redis lost an acknowledged entry)."""
    readings_duplicated: int
    deadletters: int
    deadletter_reasons: dict[str, int]
    commands_without_result: list[tuple[str, str, str | None]]
    """(correlation id, point, the fault around the time it was sent) of commands with no result."""
    commands_pending_at_end: int
    """Command entries still pending in a gateway group after everything settled."""
    late_responses: int
    """Dead-lettered device answers that came after their write timed out."""
    late_responses_without_timeout: int
    """Of those, answers to a command whose result was not TIMEOUT (would be a wrong result)."""
    source_samples: int
    source_missing_in_fault_windows: dict[str, int]
    """Missing samples by ``fault kind/protocol``: Modbus samples are counted only when a read was
    served, so a Modbus loss is a reading in flight or in a killed gateway's memory."""
    source_missing_unexplained: list[tuple[str, int, float]]
    commands_sent: int
    commands_with_result: int
    command_results_duplicated: int
    commands_written: int
    commands_duplicated: int
    result_status: dict[str, int]

    @property
    def readings_produced(self) -> int:
        """Readings the gateways produced: delivered to the stream, or shed by the overflow policy."""
        return self.readings_in_stream + self.readings_shed

    @property
    def readings_lost(self) -> int:
        """Readings lost where the system promises none: after the stream, or at the source outside
        any fault that can lose them (each missing sample is POINTS_PER_DEVICE readings)."""
        return (
            self.readings_lost_after_stream
            + self.readings_phantom
            + POINTS_PER_DEVICE * len(self.source_missing_unexplained)
        )

    def violations(self) -> list[str]:
        """Return what breaks the invariants (empty when every promise held)."""
        out = []
        if self.readings_lost_after_stream:
            out.append(f"{self.readings_lost_after_stream} readings in the stream are not in the table")
        if self.readings_phantom:
            out.append(f"{self.readings_phantom} rows have no reading in the stream")
        if self.readings_duplicated:
            out.append(f"{self.readings_duplicated} rows are duplicates")
        if self.source_missing_unexplained:
            head = ", ".join(
                f"{d}#{s}@{datetime.fromtimestamp(t, UTC):%H:%M:%S.%f}"
                for d, s, t in self.source_missing_unexplained[:10]
            )
            out.append(
                f"{len(self.source_missing_unexplained)} samples missing outside fault windows: {head}"
            )
        if self.commands_duplicated:
            out.append(f"{self.commands_duplicated} command writes repeated at a device")
        if self.commands_without_result:
            out.append(
                f"{len(self.commands_without_result)} commands without a result"
                f" ({self.commands_pending_at_end} entries still pending in a gateway group):"
                f" {self.commands_without_result[:5]}"
            )
        if self.command_results_duplicated:
            out.append(f"{self.command_results_duplicated} duplicate command results")
        unexpected = {
            r: n for r, n in self.deadletter_reasons.items() if not r.startswith(LATE_RESPONSE_REASON)
        }
        if unexpected:
            out.append(f"dead-letter entries: {unexpected}")
        if self.late_responses_without_timeout:
            out.append(
                f"{self.late_responses_without_timeout} late device answers to commands not reported TIMEOUT"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        """Return the figures for a RESULT line."""
        return {
            "readings_produced": self.readings_produced,
            "readings_lost": self.readings_lost,
            "readings_duplicated": self.readings_duplicated,
            "readings_shed": self.readings_shed,
            "readings_stored": self.readings_stored,
            "stream_duplicates_absorbed": self.stream_duplicates,
            "source_samples": self.source_samples,
            "source_samples_missing_in_fault_windows": self.source_missing_in_fault_windows,
            "source_samples_missing_unexplained": len(self.source_missing_unexplained),
            "commands_sent": self.commands_sent,
            "commands_with_result": self.commands_with_result,
            "commands_written_at_devices": self.commands_written,
            "commands_duplicated": self.commands_duplicated,
            "command_results_duplicated": self.command_results_duplicated,
            "command_result_status": self.result_status,
            "deadletters": self.deadletters,
            "deadletter_reasons": self.deadletter_reasons,
            "commands_without_result": len(self.commands_without_result),
            "commands_without_result_detail": self.commands_without_result[:20],
            "commands_pending_at_end": self.commands_pending_at_end,
            "late_command_responses": self.late_responses,
            "late_command_responses_to_non_timeout": self.late_responses_without_timeout,
        }


def _us(ts: datetime) -> int:
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


async def _stream_readings(redis: aioredis.Redis) -> Counter[tuple[str, int]]:
    """Return every (point id, ts in µs) of the readings stream, counted (format v1, docs/streams.md)."""
    out: Counter[tuple[str, int]] = Counter()
    start = "-"
    while True:
        entries: Any = await redis.xrange(READINGS_KEY, min=start, count=1_000)
        if not entries:
            return out
        for _entry_id, fields in entries:
            if fields.get(b"v") != b"1":
                continue
            for row in json.loads(fields[b"r"]):
                out[(row[0], int(row[1]))] += 1
        last = entries[-1][0].decode()
        ms, _, n = last.partition("-")
        start = f"{ms}-{int(n) + 1}"


async def results_by_correlation(redis: aioredis.Redis) -> dict[str, tuple[int, str]]:
    """Return correlation id -> (results seen, last status) from the command_results stream."""
    out: dict[str, tuple[int, str]] = {}
    start = "-"
    while True:
        entries: Any = await redis.xrange(RESULTS_KEY, min=start, count=1_000)
        if not entries:
            return out
        for _entry_id, fields in entries:
            with contextlib.suppress(KeyError, ValueError, TypeError):
                body = json.loads(fields[b"r"])
                seen, _ = out.get(body["correlation_id"], (0, ""))
                out[body["correlation_id"]] = (seen + 1, str(body["status"]))
        last = entries[-1][0].decode()
        ms, _, n = last.partition("-")
        start = f"{ms}-{int(n) + 1}"


def _log_lines(sims: Iterable[SimProcess]) -> Iterable[list[str]]:
    for sim in sims:
        if sim.sample_log.exists():
            for line in sim.sample_log.read_text().splitlines():
                parts = line.split(" ")
                if parts and parts[-1] != "":
                    yield parts


def _source_samples(sims: Iterable[SimProcess]) -> dict[str, dict[int, float]]:
    """Return device -> {seq: unix time served/published} from the simulators' logs."""
    out: dict[str, dict[int, float]] = {}
    for parts in _log_lines(sims):
        if parts[0] == "R" and len(parts) == 4:
            out.setdefault(parts[1], {})[int(parts[2])] = float(parts[3])
    return out


def _device_writes(sims: Iterable[SimProcess]) -> list[tuple[str, float, str]]:
    """Return (device, value, correlation id or '') of every write a simulator applied."""
    return [
        (parts[1], float(parts[2]), parts[3] if parts[3] != "-" else "")
        for parts in _log_lines(sims)
        if parts[0] == "W" and len(parts) == 5
    ]


async def ingest_rate(pg: PrivatePostgres, window_s: float) -> float:
    """Return readings stored per second over the last ``window_s`` seconds (by reading time)."""
    conn = await pg.connect()
    try:
        value = await conn.fetchval(
            "SELECT count(*) FROM readings WHERE ts > now() - make_interval(secs => $1)", window_s
        )
    finally:
        await conn.close()
    return float(value) / window_s


class CommandTraffic:
    """Send one command every ``period_s`` until stopped (an async context manager)."""

    def __init__(self, plant: ChaosPlant, redis: aioredis.Redis, *, period_s: float = 1.0) -> None:
        self.plant, self.redis, self.period_s = plant, redis, period_s
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CommandTraffic:
        self._task = asyncio.create_task(self._loop(), name="chaos-commands")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop sending (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            await self.plant.send_commands(self.redis)
            await asyncio.sleep(self.period_s)


# --------------------------------------------------------------------------------------------------
# The simulators (run as ``python bench/_chaos.py sim-modbus|sim-mqtt SPEC LOG``)


class _SampleLog:
    """Append-only log of samples and writes; one unbuffered write per line survives ``kill -9``."""

    def __init__(self, path: Path) -> None:
        self.seq: dict[str, int] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split(" ")
                if parts[0] == "R" and len(parts) == 4:
                    self.seq[parts[1]] = max(self.seq.get(parts[1], 0), int(parts[2]))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def sample(self, device: str) -> int:
        """Number the next sample of ``device`` and log it."""
        seq = self.seq.get(device, 0) + 1
        self.seq[device] = seq
        os.write(self._fd, f"R {device} {seq} {time.time():.6f}\n".encode())
        return seq

    def write(self, device: str, value: float, correlation_id: str | None) -> None:
        """Log an applied command."""
        os.write(self._fd, f"W {device} {value!r} {correlation_id or '-'} {time.time():.6f}\n".encode())


def _values(seq: int) -> list[float]:
    return [20.0 + (seq % 7), 30.0 + (seq % 11), 40.0 + (seq % 13)]


async def _sim_modbus(spec: Mapping[str, Any], log: _SampleLog) -> None:
    from pymodbus.constants import ExcCodes  # noqa: PLC0415
    from pymodbus.datastore import ModbusServerContext  # noqa: PLC0415
    from pymodbus.server import ModbusTcpServer  # noqa: PLC0415

    devices: dict[int, str] = {unit: d for unit, d in enumerate(spec["modbus_devices"], start=1)}
    setpoints: dict[str, list[int]] = {d: [0, 0] for d in devices.values()}

    class Store(ModbusServerContext):
        """Input registers 0-7: seq (uint32, +1 per read of register 0), p1..p3; holding 0-1: sp."""

        def __init__(self) -> None:  # base __init__ skipped, as simulators/modbus_server.py does
            self.old_simulator = True
            self.simdevices = []

        async def async_getValues(
            self, device_id: int, func_code: int, address: int, count: int = 1
        ) -> list[int] | ExcCodes:
            device = devices.get(device_id)
            if device is None:
                return ExcCodes.GATEWAY_NO_RESPONSE
            if func_code == 4:
                seq = log.sample(device) if address == 0 else log.seq.get(device, 0)
                words = list(struct.unpack(">2H", struct.pack(">I", seq)))
                for value in _values(seq):
                    words += struct.unpack(">2H", struct.pack(">f", value))
            elif func_code == 3:
                words = list(setpoints[device]) + [0] * 6
            else:
                return ExcCodes.ILLEGAL_FUNCTION
            if address + count > len(words):
                return ExcCodes.ILLEGAL_ADDRESS
            return words[address : address + count]

        async def async_setValues(
            self, device_id: int, func_code: int, address: int, values: Sequence[int]
        ) -> ExcCodes | None:
            device = devices.get(device_id)
            if device is None:
                return ExcCodes.GATEWAY_NO_RESPONSE
            if func_code not in (6, 16) or address != 0 or len(values) != 2:
                return ExcCodes.ILLEGAL_ADDRESS
            setpoints[device] = [int(v) for v in values]
            (value,) = struct.unpack(">f", struct.pack(">2H", *setpoints[device]))
            log.write(device, float(value), None)
            return None

        def device_ids(self) -> list[int]:
            return list(devices)

    server = ModbusTcpServer(Store(), address=("127.0.0.1", int(spec["modbus_port"])))
    await server.serve_forever(background=True)
    print("READY", flush=True)
    await asyncio.Event().wait()


async def _sim_mqtt(spec: Mapping[str, Any], log: _SampleLog) -> None:
    from urllib.parse import urlsplit  # noqa: PLC0415

    import gmqtt  # noqa: PLC0415
    from gmqtt.mqtt.constants import UNLIMITED_RECONNECTS, MQTTv50  # noqa: PLC0415

    url = urlsplit(spec["mqtt_url"])
    devices: list[str] = list(spec["mqtt_devices"])
    setpoint = dict.fromkeys(devices, 0.0)
    client = gmqtt.Client(f"chaos-sim-{uuid.uuid4().hex[:8]}")
    client.set_config({"reconnect_retries": UNLIMITED_RECONNECTS, "reconnect_delay": 1})

    def on_connect(client: Any, *_: Any) -> None:
        client.subscribe([gmqtt.Subscription(f"carbonos/{d}/command", qos=1) for d in devices])

    def on_message(client: Any, topic: str, payload: bytes, _qos: int, properties: dict[str, Any]) -> int:
        device = topic.split("/")[1]
        try:
            body = json.loads(payload)
            value = float(body["value"])
            correlation_id = str(body["correlation_id"])
        except (ValueError, KeyError, TypeError):
            return 0
        setpoint[device] = value
        log.write(device, value, correlation_id)
        answer = json.dumps({"correlation_id": correlation_id, "status": "ok", "value": value}).encode()
        reply_to = properties.get("response_topic")
        extra: dict[str, Any] = {}
        if properties.get("correlation_data"):
            extra["correlation_data"] = properties["correlation_data"][0]
        topic_out = reply_to[0] if reply_to else f"carbonos/{device}/command/response"
        client.publish(gmqtt.Message(topic_out, answer, qos=1, **extra))
        return 0

    client.on_connect = on_connect
    client.on_message = on_message
    while True:
        try:
            await client.connect(url.hostname, url.port, version=MQTTv50, keepalive=5)
            break
        except OSError:
            await asyncio.sleep(0.5)
    print("READY", flush=True)
    period_s = float(spec["period_s"])
    next_s = time.monotonic()
    while True:
        for device in devices:
            if not client.is_connected:
                continue
            seq = log.sample(device)
            p1, p2, p3 = _values(seq)
            body = {
                "ts": int(time.time() * 1000),
                "values": {"seq": seq, "p1": p1, "p2": p2, "p3": p3, "sp": setpoint[device]},
            }
            client.publish(gmqtt.Message(f"carbonos/{device}/telemetry", json.dumps(body), qos=1))
        next_s += period_s
        await asyncio.sleep(max(0.0, next_s - time.monotonic()))


def _sim_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="numbered simulators of the chaos harness")
    parser.add_argument("kind", choices=["sim-modbus", "sim-mqtt"])
    parser.add_argument("spec", type=Path)
    parser.add_argument("log", type=Path)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    log = _SampleLog(args.log)
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run = _sim_modbus if args.kind == "sim-modbus" else _sim_mqtt
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(spec, log))


def new_plant_root() -> Path:
    """A fresh working directory for a plant."""
    return private_dir("chaos-")


def seeded(seed: int) -> random.Random:
    """Return the schedule's random generator."""
    return random.Random(seed)


if __name__ == "__main__":
    _sim_main(sys.argv[1:])
