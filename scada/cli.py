"""The ``scada`` command: run the server, run simulators, run the demo, check a site file.

Exit codes: 0 success, 1 runtime failure (a service could not be started), 2 invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from scada import __version__
from scada.app import Role, create_app
from scada.audit import AuditEntry, AuditLog, export
from scada.auth_store import tenants_of
from scada.config import SiteConfig, load_site
from scada.db import create_pool
from scada.model import (
    Command,
    CommandStatus,
    ConfigError,
    PointId,
    PointKind,
    Priority,
    ScadaError,
    ServiceError,
    StreamName,
)
from scada.runtime import SystemClock, tune_gc_for_server
from scada.services import DEFAULT_LOCAL, Endpoints, running_services
from scada.settings import EMBEDDED, Settings
from streams.bus import stream_key
from streams.commands import send_and_wait

__all__ = ["main"]

_LOGGER = logging.getLogger("scada")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
DEMO_SITE = Path(__file__).resolve().parent.parent / "examples" / "plant.yaml"
SIMULATOR_READY_TIMEOUT_S = 30.0
SIMULATOR_STOP_TIMEOUT_S = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scada`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        _configure_logging(settings.log_level)
        code: int = args.func(args, settings)
    except ConfigError as err:
        print(f"scada: invalid configuration: {err}", file=sys.stderr)  # noqa: T201 -- CLI output
        return EXIT_CONFIG
    except ScadaError as err:
        print(f"scada: {err}", file=sys.stderr)  # noqa: T201 -- CLI output
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scada", description="CarbonOS SCADA server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the server for a site file")
    run.add_argument("-c", "--config", required=True, type=Path, help="site file (YAML)")
    run.add_argument(
        "--role",
        action="append",
        choices=[r.value for r in Role],
        help="roles this process plays (repeatable; default: all)",
    )
    run.set_defaults(func=_cmd_run)

    simulate = sub.add_parser("simulate", help="run device simulators for a site file")
    simulate.add_argument("-c", "--config", required=True, type=Path, help="site file (YAML)")
    simulate.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    simulate.set_defaults(func=_cmd_simulate)

    demo = sub.add_parser("demo", help="services + simulators + server for the example plant")
    demo.add_argument(
        "-c", "--config", type=Path, default=DEMO_SITE, help="site file (default: example plant)"
    )
    demo.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    demo.set_defaults(func=_cmd_demo)

    command = sub.add_parser(
        "command",
        help="write a value to a point through its gateway and print the verified outcome",
        description=(
            "Append a command to the commands stream of the Redis in SCADA_REDIS_URL (default: the local "
            "one), wait for the gateway's result and print it as JSON. Exit 0 only when the device "
            "verifiably holds the value."
        ),
    )
    command.add_argument("point", help="point id, e.g. a-pv-1.power_limit_pct")
    command.add_argument("value", type=float, help="engineering value to write")
    command.add_argument("--reason", default="manual command", help="why (kept with the command)")
    command.add_argument("--source", default=f"cli:{os.environ.get('USER', 'unknown')}")
    command.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the result")
    command.set_defaults(func=_cmd_command)

    audit = sub.add_parser("audit", help="verify or export the tamper-evident audit log")
    audit_sub = audit.add_subparsers(required=True, metavar="ACTION")
    verify = audit_sub.add_parser(
        "verify",
        help="walk the hash chain; exit 0 only if no entry was edited, deleted or cut off",
        description="Check every entry of the audit log in SCADA_DB_URL (default: the local database).",
    )
    verify.add_argument("--expect-head", help="the head hash anchored earlier (printed by a previous verify)")
    verify.set_defaults(func=_cmd_audit_verify)
    export_cmd = audit_sub.add_parser("export", help="write the audit log as CSV or JSON")
    export_cmd.add_argument("--format", choices=["csv", "json"], default="csv")
    export_cmd.add_argument("--tenant", help="only this tenant's entries")
    export_cmd.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    export_cmd.set_defaults(func=_cmd_audit_export)

    check = sub.add_parser("check-config", help="validate a site file and print a summary")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_cmd_check)
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    # Sessions log each device's transitions once; pymodbus would log every failed reconnect again.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # During a PostgreSQL outage asyncpg's pool logs a traceback on every reconnect attempt; the
    # historian already reports the outage once, when it starts and when it ends.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
    for chatty in ("amqtt", "transitions"):  # the embedded broker logs every client state change
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))


# --------------------------------------------------------------------------------------------------
# Commands


T = TypeVar("T")


def _db_url(settings: Settings) -> str:
    if settings.db_url not in (None, EMBEDDED):
        return str(settings.db_url)
    base, _, _ = DEFAULT_LOCAL.db_admin_url.rpartition("/")
    return f"{base}/{DEFAULT_LOCAL.db_name}"


async def _with_audit(settings: Settings, action: Callable[[AuditLog], Awaitable[T]]) -> T:
    url = _db_url(settings)
    try:
        pool = await create_pool(url, timeout_s=settings.service_timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError) as err:
        raise ServiceError(f"PostgreSQL at {url}: {err}") from err
    try:
        return await action(AuditLog(pool, timeout_s=settings.service_timeout_s))
    except asyncpg.UndefinedTableError:
        raise ServiceError(f"no audit log in {url}: has the server run its migrations there?") from None
    finally:
        await pool.close()


def _cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    report = asyncio.run(_with_audit(settings, lambda log: log.verify(expect_head=args.expect_head)))
    print(  # noqa: T201 -- CLI output
        json.dumps(
            {
                "ok": report.ok,
                "entries": report.entries,
                "head_seq": report.head_seq,
                "head_hash": report.head_hash,
                "problems": report.problems,
            },
            indent=2,
        )
    )
    return EXIT_OK if report.ok else EXIT_FAILURE


def _cmd_audit_export(args: argparse.Namespace, settings: Settings) -> int:
    async def collect(log: AuditLog) -> list[AuditEntry]:
        out: list[AuditEntry] = []
        while True:
            page = await log.entries(tenant=args.tenant, after_seq=out[-1].seq if out else 0, limit=10_000)
            out.extend(page)
            if len(page) < 10_000:
                return out

    text = export(asyncio.run(_with_audit(settings, collect)), args.format)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace, _settings: Settings) -> int:
    site = load_site(args.file)
    nodes = sum(1 for _ in site.iter_nodes())
    points = sum(len(d.points) for d in site.devices)
    summary = f"{nodes} nodes, {len(site.devices)} devices, {points} points"
    print(f"{args.file}: OK: site {site.site.id!r}: {summary}")  # noqa: T201 -- CLI output
    return EXIT_OK


def _cmd_command(args: argparse.Namespace, settings: Settings) -> int:
    result = asyncio.run(_send_command(args, settings))
    print(json.dumps(result, indent=2))  # noqa: T201 -- CLI output
    return EXIT_OK if result.get("status") == CommandStatus.VERIFIED.value else EXIT_FAILURE


async def _send_command(args: argparse.Namespace, settings: Settings) -> dict[str, object]:
    url = settings.redis_url if settings.redis_url not in (None, EMBEDDED) else DEFAULT_LOCAL.redis_url
    redis = aioredis.Redis.from_url(
        url, socket_timeout=settings.service_timeout_s, socket_connect_timeout=settings.service_timeout_s
    )
    command = Command(
        point=PointId(args.point),
        value=args.value,
        priority=Priority.OPERATOR,
        source=args.source,
        reason=args.reason,
        correlation_id=f"cli-{uuid.uuid4()}",
    )
    prefix = settings.stream_prefix
    try:
        result = await send_and_wait(
            redis,
            stream_key(prefix, StreamName.COMMANDS),
            stream_key(prefix, StreamName.COMMAND_RESULTS),
            command,
            wait_s=args.timeout,
            timeout_s=settings.service_timeout_s,
        )
    except (RedisError, OSError, TimeoutError) as err:
        raise ServiceError(f"Redis at {url}: {err}") from err
    finally:
        await redis.aclose()
    if result is None:
        return {
            "correlation_id": command.correlation_id,
            "point": command.point,
            "status": "no result",
            "reason": f"no gateway answered within {args.timeout:g} s (is a gateway running for this point?)",
        }
    return {
        "correlation_id": result.correlation_id,
        "point": result.point,
        "requested": result.requested,
        "status": result.status.value,
        "readback": result.readback,
        "reason": result.reason,
        "elapsed_ms": result.elapsed_ms,
        "ts": result.ts.isoformat(),
    }


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    site = load_site(args.config)
    roles = frozenset(Role(r) for r in args.role) if args.role else frozenset({Role.ALL})
    asyncio.run(_serve(site, settings, roles=roles, simulators=None))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    site = load_site(args.config)
    if settings.bootstrap_admin is None:  # a first login for the person trying the demo
        settings = settings.model_copy(
            update={"bootstrap_admin": f"{tenants_of(site)[0][0]}:admin:{_demo_password(settings)}"}
        )
    asyncio.run(_serve(site, settings, roles=frozenset({Role.ALL}), simulators=args.speed))
    return EXIT_OK


def _demo_password(settings: Settings) -> str:
    """Return the demo admin's password, made once and kept (0600) in the data directory."""
    made = settings.private_file("demo-admin-password", lambda: secrets.token_urlsafe(12).encode() + b"\n")
    return made.decode("utf-8").strip()


def _cmd_simulate(args: argparse.Namespace, settings: Settings) -> NoReturn:
    site = load_site(args.config)
    document = write_normalized_site(site, settings.data_dir)
    mqtt_url = settings.mqtt_url if settings.mqtt_url not in (None, EMBEDDED) else DEFAULT_LOCAL.mqtt_url
    command = [
        sys.executable,
        *("-m", "simulators", "--site", str(document), "--speed", str(args.speed), "--mqtt-url", mqtt_url),
    ]
    os.execv(sys.executable, command)  # noqa: S606 -- replace this process: signals go straight to it


def write_normalized_site(site: SiteConfig, data_dir: Path) -> Path:
    """Write the normalized site document (templates expanded) that the simulators read."""
    path = data_dir / "simulators" / f"{site.site.id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(site.model_dump(mode="json"), ensure_ascii=False, indent=1), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Serving


async def _serve(
    site: SiteConfig, settings: Settings, *, roles: frozenset[Role], simulators: float | None
) -> None:
    """Run until SIGINT/SIGTERM: services, optionally simulators, then the server."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with running_services(settings) as endpoints, contextlib.AsyncExitStack() as stack:
            if simulators is not None:
                await stack.enter_async_context(
                    _simulator_process(site, settings, speed=simulators, mqtt_url=endpoints.mqtt_url)
                )
            runner = await stack.enter_async_context(_http_server(site, settings, endpoints, roles))
            # Every role is up: freeze what start-up built and collect young cycles on a timer
            # (docs/sessions.md).
            young_gc = tune_gc_for_server()
            if young_gc is not None:
                stack.callback(young_gc.cancel)
            cockpit: str | None = None
            if simulators is not None and settings.cockpit_port and settings.bootstrap_admin:
                host, port = _bound_address(runner)
                cockpit = await stack.enter_async_context(_cockpit_process(f"http://{host}:{port}", settings))
            _announce(runner, site, endpoints, settings, demo=simulators is not None, cockpit=cockpit)
            await stop.wait()
            _LOGGER.info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    _LOGGER.info("stopped")


@contextlib.asynccontextmanager
async def _http_server(
    site: SiteConfig, settings: Settings, endpoints: Endpoints, roles: frozenset[Role]
) -> AsyncIterator[web.AppRunner]:
    app = create_app(site, settings, endpoints, roles=roles, clock=SystemClock())
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.http_host, settings.http_port).start()
        yield runner
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _simulator_process(
    site: SiteConfig, settings: Settings, *, speed: float, mqtt_url: str
) -> AsyncIterator[None]:
    """Start ``python -m simulators`` for the site, wait until it listens, stop it on exit."""
    document = await asyncio.to_thread(write_normalized_site, site, settings.data_dir)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators",
        "--site",
        str(document),
        "--speed",
        str(speed),
        "--mqtt-url",
        mqtt_url,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,  # our Ctrl-C is not theirs: we stop them
    )
    try:
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(SIMULATOR_READY_TIMEOUT_S):
                while not (line := (await proc.stdout.readline()).decode()).startswith("SIMULATORS READY"):
                    if not line:
                        raise ScadaError(f"simulators exited with code {await proc.wait()} before ready")
        except TimeoutError:
            raise ScadaError(f"simulators not ready after {SIMULATOR_READY_TIMEOUT_S:.0f} s") from None
        _LOGGER.info("simulators: %s", line.strip())
        yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(SIMULATOR_STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                _LOGGER.warning("simulators did not stop within %.0f s; killing", SIMULATOR_STOP_TIMEOUT_S)
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def _cockpit_process(api: str, settings: Settings) -> AsyncIterator[str | None]:
    """Serve the cockpits for the demo (a kiosk token for the big screen); yield their base URL.

    The cockpits are a convenience of the demo: if they cannot start (the port is taken), the demo
    goes on without them and says so.
    """
    assert settings.bootstrap_admin is not None
    tenant, username, password = settings.bootstrap_admin.split(":", 2)
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.service_timeout_s)
        ) as http:
            login = {"tenant": tenant, "username": username, "password": password}
            async with http.post(f"{api}/api/v1/auth/login", json=login) as response:
                response.raise_for_status()
                token = (await response.json())["access_token"]
            root = (await _get_json(http, f"{api}/api/v1/site", token))["hierarchy"][0]["id"]
            async with http.post(
                f"{api}/api/v1/kiosk-tokens",
                json={"name": "demo big screen", "node": root},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                response.raise_for_status()
                kiosk = (await response.json())["token"]
    except (aiohttp.ClientError, TimeoutError, KeyError, IndexError) as err:
        _LOGGER.warning("cockpits not started: no kiosk token: %s", err)
        yield None
        return
    log = await asyncio.to_thread(_open_log, settings.data_dir / "cockpit.log")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cockpit",
        "--api",
        api,
        "--port",
        str(settings.cockpit_port),
        env={**os.environ, "CARBONOS_TOKEN": kiosk},
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{settings.cockpit_port}"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(SIMULATOR_STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


def _open_log(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("ab")


async def _get_json(http: aiohttp.ClientSession, url: str, token: str) -> Any:
    async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
        response.raise_for_status()
        return await response.json()


def _announce(
    runner: web.AppRunner,
    site: SiteConfig,
    endpoints: Endpoints,
    settings: Settings,
    *,
    demo: bool,
    cockpit: str | None = None,
) -> None:
    host, port = _bound_address(runner)
    base = f"http://{host}:{port}"
    example = next(
        (d.point_id(p.key) for d in site.devices for p in d.points if p.kind is PointKind.POWER),
        next((d.point_id(p.key) for d in site.devices for p in d.points), "<point>"),
    )
    lines = [
        f"CarbonOS SCADA {__version__} serving site {site.site.id!r} ({len(site.devices)} devices)",
        f"  health     {base}/api/v1/health",
        f"  devices    {base}/api/v1/devices",
        f"  latest     {base}/api/v1/points/{example}/latest",
        f"  history    {base}/api/v1/points/{example}/history",
        f"  websocket  ws://{host}:{port}/api/v1/ws",
        f"  services   {', '.join(f'{k}: {v}' for k, v in endpoints.origins.items())}",
        f"  API docs   {base}/api/v1/docs",
    ]
    if cockpit is not None:
        lines.append(f"  big screen {cockpit}/bigscreen   (中文; ?lang=en for English)")
        lines.append(f"  cockpit    {cockpit}/cockpit     (log in as below)")
    if demo and settings.bootstrap_admin:
        tenant, username, password = settings.bootstrap_admin.split(":", 2)
        lines.append(
            f"  log in     POST {base}/api/v1/auth/login "
            f'{{"tenant": "{tenant}", "username": "{username}", "password": "{password}"}}'
        )
    lines.append("Press Ctrl-C to stop." if demo else "Send SIGINT or SIGTERM to stop.")
    print("\n".join(lines), flush=True)  # noqa: T201 -- the demo's user-facing output


def _bound_address(runner: web.AppRunner) -> tuple[str, int]:
    for address in runner.addresses:
        host, port = address[:2]
        return str(host), int(port)
    raise ScadaError("the HTTP server is not listening")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
