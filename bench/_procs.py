"""Helpers for benches that run the server as several processes, one or more roles each.

:class:`Cluster` owns one scratch database, one Redis key prefix, one site file and any number of
``scada run --role ...`` processes and helper processes (simulators). Every process is stopped, the
database dropped and the Redis keys deleted when the ``async with`` block ends, also on Ctrl-C or an
exception. All processes share a token-signing key and a bootstrap admin, so one login reads
``/metrics`` of every process.

The benches run as scripts (``python bench/x.py``), so this module is imported as ``_procs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import aiohttp
import asyncpg
import psutil
from _fleet import (
    BENCH_REDIS_URL,
    create_scratch_database,
    drop_scratch,
    free_port,
    stop_process,
    stop_server,
    wait_healthy,
)

REPO = Path(__file__).resolve().parent.parent
SCADA = str(Path(sys.executable).with_name("scada"))
HTTP_TIMEOUT_S = 30.0
BENCH_USER = "bench"
BENCH_MQTT_URL = os.environ.get("SCADA_BENCH_MQTT_URL", "mqtt://127.0.0.1:1883")
_LOG_LEVEL_RE = re.compile(rb"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL)\b", re.MULTILINE)
_TRACEBACK_RE = re.compile(rb"^Traceback \(most recent call last\):", re.MULTILINE)


@dataclass(slots=True)
class RoleProcess:
    """One ``scada run`` process of a :class:`Cluster`."""

    name: str
    roles: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    base: str
    """``http://127.0.0.1:<port>``."""
    log_path: Path
    ps: psutil.Process


@dataclass(slots=True)
class HelperProcess:
    """A simulator (or other helper) process of a :class:`Cluster`, logging to a file."""

    name: str
    proc: asyncio.subprocess.Process
    ready_line: str
    log_path: Path
    ps: psutil.Process
    log_file: IO[bytes] = field(repr=False)


def log_levels(path: Path) -> dict[str, int]:
    """Count the lines of a server log by level (``%(asctime)s %(levelname)s ...``) and tracebacks."""
    text = path.read_bytes() if path.exists() else b""
    counts = {"WARNING": 0, "ERROR": 0, "CRITICAL": 0, "tracebacks": 0}
    for match in _LOG_LEVEL_RE.finditer(text):
        level = match.group(1).decode()
        if level in counts:
            counts[level] += 1
    counts["tracebacks"] = len(_TRACEBACK_RE.findall(text))
    return counts


def log_lines(path: Path, level: str, limit: int = 5) -> list[str]:
    """Return the first ``limit`` distinct messages logged at ``level`` (timestamps cut), for a report."""
    seen: list[str] = []
    if not path.exists():
        return seen
    for line in path.read_text("utf-8", errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2] == level:
            message = re.sub(r"\d+(\.\d+)?", "N", parts[3])[:200]
            if message not in seen:
                seen.append(message)
                if len(seen) >= limit:
                    break
    return seen


Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]
"""Parsed ``/metrics``: ``{(name, labels): value}``."""


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse Prometheus text (0.0.4) into ``{(name, labels): value}``.

    >>> m = parse_metrics('# HELP x y\\nx_total{a="1",b="q"} 3\\ny 2.5\\n')
    >>> m[("x_total", frozenset({("a", "1"), ("b", "q")}))], m[("y", frozenset())]
    (3.0, 2.5)
    """
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        out[(name, labels)] = float(value)
    return out


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


class CpuMeter:
    """CPU seconds of named groups of processes, sampled on demand; a process that ends keeps its last."""

    def __init__(self) -> None:
        self._procs: dict[str, list[psutil.Process]] = {}
        self._last: dict[tuple[str, int], float] = {}

    def track(self, name: str, procs: Sequence[psutil.Process]) -> None:
        """Add processes under ``name`` (several processes add up: e.g. every PostgreSQL backend)."""
        known = {p.pid for p in self._procs.get(name, [])}
        self._procs.setdefault(name, []).extend(p for p in procs if p.pid not in known)

    def cpu_s(self) -> dict[str, float]:
        """Return the CPU seconds (user + system) used so far by each name's processes."""
        for name, procs in self._procs.items():
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    self._last[(name, p.pid)] = t.user + t.system
        totals: dict[str, float] = dict.fromkeys(self._procs, 0.0)
        for (name, _pid), used in self._last.items():
            totals[name] = totals.get(name, 0.0) + used
        return totals

    @staticmethod
    def rss_mb(proc: psutil.Process) -> float | None:
        """Return a process's resident set size in MiB, or None if it has exited."""
        try:
            return float(proc.memory_info().rss) / 2**20
        except psutil.Error:
            return None


def processes_named(name: str) -> list[psutil.Process]:
    """Return the running processes whose name contains ``name`` (e.g. ``redis-server``)."""
    return [proc for proc in psutil.process_iter(["name"]) if name in (proc.info["name"] or "")]


async def postgres_backends(db_url: str) -> list[psutil.Process]:
    """Return the PostgreSQL backend processes connected to the database of ``db_url``."""
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    out = []
    for row in pids:
        with contextlib.suppress(psutil.Error):
            out.append(psutil.Process(int(row["pid"])))
    return out


def _popen(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=log)


class Cluster:
    """A scratch database, a Redis key prefix and a site file, with ``scada run`` processes on them."""

    def __init__(
        self, name: str, site_yaml: str, *, tenant: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self._site_yaml = site_yaml
        self._extra_env = dict(env or {})
        self.workdir = Path(tempfile.mkdtemp(prefix=f"scada-{name}-"))
        self.site_path = self.workdir / "site.yaml"
        self.db_name = ""
        self.db_url = ""
        self.prefix = ""
        self.tenant = tenant
        """The site's tenant (its site id when it lists none): the bench admin is made there."""
        self.password = secrets.token_urlsafe(16)
        self.secret_key = secrets.token_urlsafe(48)
        self.roles: dict[str, RoleProcess] = {}
        self.helpers: dict[str, HelperProcess] = {}
        self.exited: dict[str, Path] = {}
        """Logs of role processes already stopped, by ``<name>.<start number>``."""
        self._token: str | None = None
        self._starts = 0
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self.site_path.write_text(self._site_yaml, "utf-8")
        self.db_name, self.db_url = await create_scratch_database(f"scada_{self.name}")
        self.prefix = f"bench-{self.name}-{self.db_name}:"
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every process, drop the database and the Redis keys, remove the working directory."""
        try:
            for name in list(self.roles)[::-1]:
                await self.stop(name)
            for name in list(self.helpers)[::-1]:
                await self.stop_helper(name)
        finally:
            if self._http is not None:
                await self._http.close()
            if self.db_name:
                await drop_scratch(self.db_name, self.prefix)
            if os.environ.get("SCADA_BENCH_KEEP_DIR"):
                print(f"kept {self.workdir}", file=sys.stderr)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def env(self, http_port: int, data_dir: Path, extra: Mapping[str, str]) -> dict[str, str]:
        """Return a role process's environment: loopback services, this cluster's database and prefix."""
        return {
            **os.environ,
            "SCADA_DB_URL": self.db_url,
            "SCADA_REDIS_URL": BENCH_REDIS_URL,
            "SCADA_MQTT_URL": BENCH_MQTT_URL,
            "SCADA_HTTP_HOST": "127.0.0.1",
            "SCADA_HTTP_PORT": str(http_port),
            "SCADA_DATA_DIR": str(data_dir),
            "SCADA_STREAM_PREFIX": self.prefix,
            "SCADA_LOG_LEVEL": "WARNING",
            "SCADA_SECRET_KEY": self.secret_key,
            "SCADA_BOOTSTRAP_ADMIN": f"{self.tenant}:{BENCH_USER}:{self.password}",
            **self._extra_env,
            **extra,
        }

    async def start(
        self,
        name: str,
        roles: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        timeout_s: float = 300.0,
    ) -> RoleProcess:
        """Start ``scada run --role ...`` and wait until it answers /api/v1/health."""
        if name in self.roles:
            raise ValueError(f"{name} is already running")
        port = free_port()
        data_dir = self.workdir / "data" / name
        self._starts += 1
        log_path = self.workdir / f"{name}.{self._starts}.log"
        argv = [SCADA, "run", "-c", str(self.site_path)]
        for role_name in roles:
            argv += ["--role", role_name]
        proc = await asyncio.to_thread(_popen, argv, self.env(port, data_dir, env or {}), log_path)
        role = RoleProcess(
            name=name,
            roles=tuple(roles),
            proc=proc,
            base=f"http://127.0.0.1:{port}",
            log_path=log_path,
            ps=psutil.Process(proc.pid),
        )
        self.roles[name] = role
        try:
            await asyncio.to_thread(wait_healthy, role.base, proc, timeout_s)
        except SystemExit as err:
            tail = log_path.read_text("utf-8", errors="replace")[-2000:]
            raise SystemExit(f"{name}: {err}\n{tail}") from None
        return role

    async def stop(self, name: str) -> None:
        """Stop one role process with SIGINT (its clean shutdown), SIGKILL after 30 s."""
        role = self.roles.pop(name, None)
        if role is None:
            return
        await asyncio.to_thread(stop_server, role.proc)
        self.exited[role.log_path.stem] = role.log_path

    async def start_helper(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready: str = "SIMULATORS READY",
        timeout_s: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> HelperProcess:
        """Start a helper whose first stdout line starting with ``ready`` says it listens; stderr to a log."""
        log_path = self.workdir / f"{name}.log"
        log_file = log_path.open("ab")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env={**os.environ, **(env or {})},
        )
        helper = HelperProcess(name, proc, "", log_path, psutil.Process(proc.pid), log_file)
        self.helpers[name] = helper
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                line = (await proc.stdout.readline()).decode(errors="replace").strip()
        except TimeoutError:
            line = "<no line in time>"
        if not line.startswith(ready):
            tail = log_path.read_text("utf-8", errors="replace")[-2000:]
            raise SystemExit(f"{name} did not start: {line!r}\n{tail}")
        helper.ready_line = line
        return helper

    async def stop_helper(self, name: str, timeout_s: float = 30.0) -> None:
        """Stop a helper with SIGTERM, SIGKILL after ``timeout_s``."""
        helper = self.helpers.pop(name, None)
        if helper is None:
            return
        proc = helper.proc
        try:
            await stop_process(proc, timeout_s)
        finally:
            helper.log_file.close()

    async def login(self, role: RoleProcess) -> str:
        """Log in as the bench admin (once; every process shares the signing key) and return the token."""
        if self._token is None:
            assert self._http is not None
            body = {"tenant": self.tenant, "username": BENCH_USER, "password": self.password}
            async with self._http.post(f"{role.base}/api/v1/auth/login", json=body) as response:
                response.raise_for_status()
                self._token = str((await response.json())["access_token"])
        return self._token

    async def scrape(self, role: RoleProcess) -> Samples:
        """Return the parsed ``/metrics`` of a role process."""
        assert self._http is not None
        for _attempt in range(2):
            headers = {"Authorization": f"Bearer {await self.login(role)}"}
            async with self._http.get(f"{role.base}/metrics", headers=headers) as response:
                if response.status == 401:  # the access token expired: log in again, once
                    self._token = None
                    continue
                response.raise_for_status()
                return parse_metrics(await response.text())
        raise SystemExit(f"{role.name}: /metrics refused a fresh token")


def install_sigterm(task: asyncio.Task[object] | None = None) -> None:
    """Make SIGTERM cancel the main task like Ctrl-C does, so every ``finally`` cleans up."""
    loop = asyncio.get_running_loop()
    main = task or asyncio.current_task()
    if main is not None:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
