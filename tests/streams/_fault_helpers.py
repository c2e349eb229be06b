"""Private services and server processes for the fault tests (imported by name: tests/ has no packages).

Each fault test kills or restarts PostgreSQL, Redis or the server, so it must never touch the shared
local services other tests use: it starts its own ``redis-server`` and its own PostgreSQL cluster on
free ports, in directories outside pytest's tmp tree (as root, PostgreSQL runs as user ``postgres``,
which must be able to reach its data directory; pytest makes its own tree private).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from _auth_helpers import TEST_SECRET_KEY, admin_headers
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from scada.config import load_site

SCADA: Final = str(Path(sys.executable).with_name("scada"))
PG_BIN: Final = Path(os.environ.get("SCADA_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
_AS_POSTGRES: Final = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def free_port() -> int:
    """Return a local TCP port nobody listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` (and ``detail()``) after ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            while not await condition():
                await asyncio.sleep(interval_s)
    except TimeoutError:
        extra = f"\n{detail()}" if detail is not None else ""
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}{extra}") from None


async def _run(*cmd: str, timeout_s: float = 60.0, check: bool = True) -> str:
    """Run ``cmd`` and return its output; raise if it fails (``check``) or outlasts ``timeout_s``."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    except TimeoutError:
        await kill_process(proc)
        raise
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{text}")
    return text


async def kill_process(proc: asyncio.subprocess.Process | None) -> None:
    """SIGKILL ``proc`` if it still runs (no cleanup, no goodbye) and reap it."""
    if proc is not None and proc.returncode is None:
        proc.kill()
        await proc.wait()


def private_dir(prefix: str) -> Path:
    """A new directory outside pytest's tmp tree, owned by the PostgreSQL user when we are root."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def initdb_command(data: Path) -> list[str]:
    """``initdb`` of a trust-auth cluster in ``data`` (as the PostgreSQL user when we are root)."""
    return [
        *_AS_POSTGRES,
        str(PG_BIN / "initdb"),
        "-D",
        str(data),
        "-U",
        "postgres",
        "--auth=trust",
        "--no-sync",
    ]


def pg_ctl_start_command(data: Path, root: Path, port: int) -> list[str]:
    """``pg_ctl start`` of the cluster in ``data`` on loopback ``port``, its socket and log in ``root``."""
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
        # fsync off: a stopped server loses nothing (the OS keeps the WAL); only a machine crash
        # would. synchronous_commit stays on: a commit must be in the WAL before it returns.
        "-c fsync=off"
    )
    return [
        *_AS_POSTGRES,
        str(PG_BIN / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(root / "postgres.log"),
        "-w",
        "-t",
        "30",
        "-o",
        options,
        "start",
    ]


def pg_ctl_stop_command(data: Path, mode: str) -> list[str]:
    """``pg_ctl stop`` of the cluster in ``data`` (``immediate``: like a crash)."""
    return [*_AS_POSTGRES, str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-m", mode, "stop"]


def init_postgres_template(parent: Path) -> Path:
    """Run initdb once (synchronously, from a module fixture); tests copy the result."""
    data = parent / "template"
    if _AS_POSTGRES:
        shutil.chown(parent, "postgres", "postgres")
    subprocess.run(initdb_command(data), check=True, capture_output=True, timeout=60)
    return data


class PrivatePostgres:
    """A PostgreSQL cluster of one test: a copy of the template, on its own port."""

    def __init__(self, template: Path, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._template = template

    async def create(self) -> None:
        """Copy the template cluster into this instance's directory."""

        def copy() -> None:
            shutil.copytree(self._template, self.data, symlinks=True)
            if _AS_POSTGRES:
                for path in [self.root, *self.data.rglob("*")]:
                    shutil.chown(path, "postgres", "postgres")
                shutil.chown(self.data, "postgres", "postgres")

        await asyncio.to_thread(copy)

    async def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        await _run(*pg_ctl_start_command(self.data, self.root, self.port))

    async def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: like a crash; WAL recovery at the next start)."""
        await _run(*pg_ctl_stop_command(self.data, mode))

    async def destroy(self) -> None:
        """Stop the server if it runs and remove its files."""
        with contextlib.suppress(RuntimeError, TimeoutError):
            await self.stop()
        await asyncio.to_thread(shutil.rmtree, self.root, True)

    async def fetchrow(self, sql: str) -> asyncpg.Record:
        """Run one query on a fresh connection and return its row."""
        conn = await asyncpg.connect(self.url, timeout=5)
        try:
            row = await conn.fetchrow(sql, timeout=10)
        finally:
            await conn.close()
        assert row is not None
        return row


class PrivateRedis:
    """A ``redis-server`` of one test, with an append-only file so a restart keeps the streams."""

    READY_TIMEOUT_S: float = 15.0
    """How long :meth:`start` waits for PING (a restart replays the append-only file first)."""
    SOCKET_TIMEOUT_S: float = 2.0
    CONNECT_TIMEOUT_S: float = 0.5

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the server and wait until it answers PING."""
        with (self.root / "redis.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(self.root),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        client = self.client()
        try:

            async def answers() -> bool:
                try:
                    return bool(await client.ping())
                except (OSError, aioredis.RedisError):
                    return False

            await wait_until(answers, self.READY_TIMEOUT_S, "redis-server to answer")
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL: no goodbye (the append-only file has every acknowledged write)."""
        proc, self.proc = self.proc, None
        await kill_process(proc)

    async def stop(self) -> None:
        """Stop the server (SIGTERM: it syncs its append-only file first)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                await proc.wait()

    async def destroy(self) -> None:
        """Stop the server and remove its files."""
        proc = self.proc
        try:
            await self.stop()
        except TimeoutError:
            await kill_process(proc)
        await asyncio.to_thread(shutil.rmtree, self.root, True)

    def client(self) -> aioredis.Redis:
        """A client that fails fast and never retries on its own."""
        return aioredis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=self.SOCKET_TIMEOUT_S,
            socket_connect_timeout=self.CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )


class ScadaProcess:
    """``scada run`` as a real process; its output goes to a file so nothing blocks on a full pipe."""

    def __init__(self, site: Path, env: Mapping[str, str], roles: list[str], log: Path) -> None:
        self.site, self.env, self.roles, self.log = (
            site,
            {"SCADA_SECRET_KEY": TEST_SECRET_KEY, **env},
            roles,
            log,
        )
        self.http_port = int(env["SCADA_HTTP_PORT"])
        self.headers = admin_headers(load_site(site))
        """An admin of the whole site: the API needs a caller (docs/security.md)."""
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def output(self) -> str:
        """Everything the process (and its earlier runs) wrote."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def start(self, ready_timeout_s: float = 30.0) -> None:
        """Start it and wait until its API answers."""
        role_args = [arg for role in self.roles for arg in ("--role", role)]
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                SCADA,
                "run",
                "-c",
                str(self.site),
                *role_args,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{self.http_port}/api/v1/health"

        async def ready() -> bool:
            self.assert_alive()
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
                    async with http.get(url) as response:
                        return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await wait_until(
            ready, ready_timeout_s, f"scada {self.roles} to serve", interval_s=0.1, detail=self.tail
        )

    def tail(self, chars: int = 6_000) -> str:
        """The end of the process's output, for failure messages."""
        return self.output[-chars:]

    def assert_alive(self) -> None:
        """Fail with the process's output if it has exited."""
        assert self.proc is not None
        assert self.proc.returncode is None, f"scada exited with {self.proc.returncode}:\n{self.output}"

    async def kill(self) -> None:
        """SIGKILL: no cleanup, no acknowledgements, no goodbye."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def stop(self) -> int:
        """SIGTERM and wait; return the exit code."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc is not None and proc.returncode is not None else 0
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                return await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise

    async def get_json(self, path: str) -> object:
        """GET an API path of this process and return its JSON body."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"http://127.0.0.1:{self.http_port}{path}", headers=self.headers) as response,
        ):
            assert response.status == 200, await response.text()
            return await response.json()

    async def get_text(self, path: str) -> str:
        """GET an API path of this process and return its body."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"http://127.0.0.1:{self.http_port}{path}", headers=self.headers) as response,
        ):
            assert response.status == 200, await response.text()
            return await response.text()
