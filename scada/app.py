"""The composition root: the one place where feature packages meet.

:func:`create_app` builds the aiohttp application for a site. Its long-lived resources are async
generators in ``app.cleanup_ctx`` (started in order, stopped in reverse):

1. PostgreSQL: pool, migrations, catalog sync, the reading store;
2. Redis: one client for the bus;
3. the plant, by role: device sessions feeding the readings stream (``gateway``), the historian
   consumer group (``historian``), the carbon ledger, forecasts and quota alerts (``analytics``),
   and the live feed behind the websocket (``api``).

Every task is owned by a :class:`~scada.runtime.TaskSupervisor` and cancelled on shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import json
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from anomaly.alarm_model import AlarmEvent, AlarmPriority
from anomaly.alarms import AlarmEngine
from anomaly.service import AlarmStore, AnomalyService, energy_message
from control_engine.carbon import CarbonQueries, CarbonService, CarbonStore
from control_engine.controller import ControllerStateStore, ControlService, dispatch_modes
from control_engine.dispatcher import CommandSender, Dispatch, Dispatcher, DispatchStore
from control_engine.forecast import MonthForecaster, month_key
from control_engine.ledger import CarbonLedger, Restatement
from control_engine.notify import Notification, Notifier, Severity
from control_engine.quota import QuotaAlerts
from control_engine.rules import NodeBudget, PointState, hourly_signals
from control_engine.verify_service import ENTRY_KIND, VerificationService, VerificationStore
from protocols.openadr.store import PostgresVtnStateStore
from scada.alarm_setup import alarm_definitions, monitored_points
from scada.api.alarms import ALARM_STORE, ANOMALY, add_alarm_routes
from scada.api.auth import AUTH, AuthContext, add_auth_routes, auth_middleware
from scada.api.carbon import CARBON, CARBON_QUERIES, CARBON_STORE, add_carbon_routes
from scada.api.commands import COMMANDS, CommandChannel, add_command_routes
from scada.api.dispatches import DISPATCH_STORE, DISPATCHER, VERIFICATION_STORE, add_dispatch_routes
from scada.api.metrics import METRICS, MetricsSources
from scada.api.problem import problem_middleware
from scada.api.routes import (
    CATALOG,
    DEADLETTER,
    FACTORS,
    HUB,
    LEASE,
    QUERIES,
    SERVICE_ORIGINS,
    STORE,
    DeadLetterView,
    add_routes,
)
from scada.audit import AuditLog, AuditRecord
from scada.auth_store import AuthStore
from scada.catalog import SiteCatalog, ledger_points, sync_catalog
from scada.config import SiteConfig
from scada.db import create_pool, migrate
from scada.gateway import Gateway
from scada.leader import LeaderLease, fence_key
from scada.model import (
    Carrier,
    Clock,
    Command,
    CommandResult,
    ConfigError,
    NodeId,
    PointId,
    Reading,
    ServiceError,
    StreamName,
)
from scada.runtime import Backoff, SystemClock, TaskSupervisor
from scada.security import Grant, NodeTree, TokenSigner
from scada.security import Role as AccessRole
from scada.services import Endpoints
from scada.sessions import DeviceSession
from scada.settings import Settings
from scada.sharding import Shard
from streams.bus import RedisReadingSink, run_consumer, stream_key
from streams.codec import decode_reading_rows, encode_json_event
from streams.commands import run_command_executor, send_and_wait
from streams.historian import HistorianStage
from streams.live import LiveHub, follow_events, run_live_feed
from streams.retention import RetentionClass, RetentionJob
from streams.store import PostgresReadingStore

__all__ = ["PLANT", "Plant", "Role", "create_app"]

_LOGGER = logging.getLogger(__name__)

HISTORIAN_GROUP = "historian"
LEDGER_GROUP = "ledger"
ANOMALY_GROUP = "anomaly"
ALARMS_MAXLEN = 100_000
EVENTS_MAXLEN = 100_000
RESULTS_MAXLEN = 100_000
"""Bound of ``command_results`` (the gateways' executor keeps it at the same length)."""
DISPATCH_EVENT = b"dispatch"
"""Type of the events-stream entry a dispatch outcome becomes (read by the alarms and the live feed)."""
HISTORIAN_BATCH_ENTRIES = 200
"""Entries (of up to 500 readings) per historian read: one transaction of up to 100,000 rows, so the
rollup merges (one row per point and bucket) are shared by many readings; see docs/storage.md."""
PARTITION_MAINTENANCE_PERIOD_S = 3600.0
RETENTION_PERIOD_S = 3600.0
_METERED_STREAMS = (StreamName.READINGS, StreamName.EVENTS, StreamName.DEADLETTER)
SERVICE_RETRY_MAX_S = 5.0
"""Cap of the historian's and the sink's backoff on Redis/PostgreSQL errors: one client per process,
so a short cap costs nothing, and ingestion resumes within seconds of a service coming back."""


class Role(enum.StrEnum):
    """What a server process does; ``all`` (the default) runs every role in one process."""

    ALL = "all"
    GATEWAY = "gateway"
    HISTORIAN = "historian"
    ANALYTICS = "analytics"
    CONTROL = "control"
    """The dispatcher and the controller, in the one process that holds the control lease."""
    API = "api"


class Plant:
    """The running parts of one process: sessions, consumers and feeds, by role."""

    def __init__(self) -> None:
        self.gateway: Gateway | None = None
        self.sink: RedisReadingSink | None = None
        self.historian: HistorianStage | None = None
        self.carbon: CarbonService | None = None
        self.anomaly: AnomalyService | None = None
        self.notifier: Notifier | None = None
        self.leader_dispatcher: Dispatcher | None = None
        """The sending dispatcher, while this process holds the control lease."""
        self.supervisor = TaskSupervisor("plant")

    @property
    def sessions(self) -> Mapping[str, DeviceSession]:
        """Return the device sessions of this process, by device id (none without the gateway role)."""
        return self.gateway.sessions if self.gateway is not None else {}


PLANT = web.AppKey("plant", Plant)
SETTINGS = web.AppKey("settings", Settings)
_ENDPOINTS = web.AppKey("endpoints", Endpoints)
_CLOCK = web.AppKey("clock", Clock)
_ROLES = web.AppKey("roles", frozenset[Role])
_POOL = web.AppKey("pool", asyncpg.Pool)
_REDIS = web.AppKey("redis", aioredis.Redis)


def create_app(
    site: SiteConfig,
    settings: Settings,
    endpoints: Endpoints,
    *,
    roles: frozenset[Role] = frozenset({Role.ALL}),
    clock: Clock | None = None,
) -> web.Application:
    """Build the server application for ``site`` on the given service endpoints."""
    app = web.Application(middlewares=[problem_middleware, auth_middleware])
    app[SETTINGS] = settings
    app[_ENDPOINTS] = endpoints
    app[_CLOCK] = clock or SystemClock()
    effective_roles: frozenset[Role] = frozenset(Role) if Role.ALL in roles else roles
    app[_ROLES] = effective_roles
    app[CATALOG] = SiteCatalog(site)
    app[HUB] = LiveHub()
    origins: dict[str, str] = {str(k): str(v) for k, v in endpoints.origins.items()}
    app[SERVICE_ORIGINS] = origins
    app[PLANT] = Plant()
    app[METRICS] = MetricsSources(
        plant=app[PLANT],
        hub=app[HUB],
        streams={s.value: stream_key(settings.stream_prefix, s) for s in _METERED_STREAMS},
    )
    app.cleanup_ctx.extend([_factors, _database, _security, _redis, _plant])
    add_routes(app)
    add_carbon_routes(app)
    add_alarm_routes(app)
    add_auth_routes(app)
    add_command_routes(app)
    add_dispatch_routes(app)
    return app


# --------------------------------------------------------------------------------------------------
# Resources (cleanup contexts)


async def _factors(app: web.Application) -> AsyncIterator[None]:
    """Load the emission factor library with the site's overrides (a file read: off the loop)."""
    app[FACTORS] = await asyncio.to_thread(app[CATALOG].site.factor_library)
    yield


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pool = await create_pool(app[_ENDPOINTS].db_url, timeout_s=settings.service_timeout_s)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            await sync_catalog(conn, app[CATALOG].site)
        app[_POOL] = pool
        app[STORE] = app[QUERIES] = PostgresReadingStore(pool)
        app[CARBON_STORE] = CarbonStore(pool, timeout_s=settings.service_timeout_s)
        app[CARBON_QUERIES] = CarbonQueries(pool, timeout_s=settings.service_timeout_s)
        app[ALARM_STORE] = AlarmStore(pool, timeout_s=settings.service_timeout_s)
        app[DISPATCH_STORE] = DispatchStore(pool, timeout_s=settings.service_timeout_s)
        app[VERIFICATION_STORE] = VerificationStore(pool, timeout_s=settings.service_timeout_s)
        yield
    finally:
        await pool.close()


async def _security(app: web.Application) -> AsyncIterator[None]:
    """Tenants, the token signer, the audit log and the bootstrap admin (docs/security.md)."""
    settings, site = app[SETTINGS], app[CATALOG].site
    tree = NodeTree({str(k): v for k, v in app[CATALOG].parents.items()})
    store = AuthStore(app[_POOL], tree, timeout_s=settings.service_timeout_s)
    await store.sync_tenants(site)
    audit = AuditLog(app[_POOL], timeout_s=settings.service_timeout_s)
    key = (
        settings.secret_key.encode()
        if settings.secret_key
        else await asyncio.to_thread(
            settings.private_file, "token-signing.key", lambda: secrets.token_bytes(32)
        )
    )
    app[AUTH] = AuthContext(TokenSigner(key), store, tree, audit, app[CATALOG])
    document = json.dumps(site.model_dump(mode="json"), sort_keys=True, ensure_ascii=False).encode()
    await audit.append(
        actor="system",
        action="config.load",
        target=f"site:{site.site.id}",
        detail={
            "site_sha256": hashlib.sha256(document).hexdigest(),
            "devices": len(site.devices),
            "points": sum(len(d.points) for d in site.devices),
            "tenants": [t.id for t in site.tenants] or [site.site.id],
        },
    )
    if settings.bootstrap_admin:
        tenant, username, password = settings.bootstrap_admin.split(":", 2)
        grants = [Grant(node, AccessRole.ADMIN) for node in sorted(store.tenant_nodes(tenant))]
        if not grants:
            raise ConfigError(f"SCADA_BOOTSTRAP_ADMIN: unknown tenant {tenant!r}")
        try:
            await store.create_user(tenant, username, password, grants)
        except KeyError:
            pass  # made on an earlier start
        else:
            await audit.append(
                actor="system", action="user.bootstrap", target=f"user:{username}", tenant=tenant
            )
            _LOGGER.info("created the bootstrap admin %s of tenant %s", username, tenant)
    yield


async def _redis(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = aioredis.Redis.from_url(
        app[_ENDPOINTS].redis_url,
        socket_timeout=settings.service_timeout_s,
        socket_connect_timeout=settings.service_timeout_s,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),  # our loops own retries and backoff; no second loop underneath
    )
    try:
        await client.ping()
        app[_REDIS] = app[METRICS].redis = client
        app[DEADLETTER] = DeadLetterView(
            client, stream_key(settings.stream_prefix, StreamName.DEADLETTER), settings.service_timeout_s
        )
        app[COMMANDS] = CommandChannel(
            client,
            commands_key=stream_key(settings.stream_prefix, StreamName.COMMANDS),
            results_key=stream_key(settings.stream_prefix, StreamName.COMMAND_RESULTS),
            timeout_s=settings.service_timeout_s,
        )
        yield
    finally:
        await client.aclose()


async def _plant(app: web.Application) -> AsyncIterator[None]:
    settings, roles, clock = app[SETTINGS], app[_ROLES], app[_CLOCK]
    plant, redis = app[PLANT], app[_REDIS]
    prefix = settings.stream_prefix
    readings_key = stream_key(prefix, StreamName.READINGS)
    events_key = stream_key(prefix, StreamName.EVENTS)
    deadletter_key = stream_key(prefix, StreamName.DEADLETTER)
    # Stable across restarts: a restarted historian first re-reads its own pending entries.
    consumer_name = f"{socket.gethostname()}-{settings.http_port}"
    try:
        if Role.API in roles:
            plant.supervisor.spawn(
                run_live_feed(
                    redis,
                    app[HUB],
                    readings_key=readings_key,
                    events_key=events_key,
                    alarms_key=stream_key(prefix, StreamName.ALARMS),
                    results_key=stream_key(prefix, StreamName.COMMAND_RESULTS),
                ),
                name="live-feed",
            )
        if Role.HISTORIAN in roles:
            plant.historian = HistorianStage(app[_POOL], timeout_s=settings.service_timeout_s, clock=clock)
            await plant.historian.ensure_partitions_ahead()
            for index in range(settings.historian_consumers):
                plant.supervisor.spawn(
                    run_consumer(
                        redis,
                        stream=readings_key,
                        group=HISTORIAN_GROUP,
                        consumer=f"{consumer_name}-{index}",
                        handler=app[METRICS].historian_batches.wrap(plant.historian.handle),
                        deadletter_stream=deadletter_key,
                        decode=decode_reading_rows,  # rows straight into COPY, no Reading objects
                        batch=HISTORIAN_BATCH_ENTRIES,
                        backoff=Backoff(max_s=SERVICE_RETRY_MAX_S),
                    ),
                    name=f"historian-{index}",
                )
            plant.supervisor.spawn(_partition_maintenance(plant.historian, clock), name="partitions")
            plant.supervisor.spawn(
                _retention(_retention_job(app[_POOL], app[CATALOG].site, clock), clock), name="retention"
            )
        await _start_analytics_and_control(app, roles, consumer_name)
        if Role.GATEWAY in roles:
            plant.sink = RedisReadingSink(
                redis,
                readings_key=readings_key,
                events_key=events_key,
                deadletter_key=deadletter_key,
                maxlen=settings.readings_maxlen,
                backoff=Backoff(max_s=SERVICE_RETRY_MAX_S),
            )
            await plant.sink.start()
            plant.gateway = Gateway(
                app[CATALOG].site,
                sink=plant.sink,
                clock=clock,
                mqtt_url=app[_ENDPOINTS].mqtt_url,
                shard=Shard.parse(settings.gateway_shard),
                client_id=f"carbonos-{consumer_name}",
                service_timeout_s=settings.service_timeout_s,
                mqtt_security=settings.mqtt_security,
                openadr_store=PostgresVtnStateStore(app[_POOL], timeout_s=settings.service_timeout_s),
            )
            await plant.gateway.start(plant.supervisor)
            gateway = plant.gateway
            plant.supervisor.spawn(
                run_command_executor(
                    redis,
                    commands_key=stream_key(prefix, StreamName.COMMANDS),
                    results_key=stream_key(prefix, StreamName.COMMAND_RESULTS),
                    deadletter_key=deadletter_key,
                    claims_prefix=f"{prefix}command-claim:",
                    group=f"gateway-{gateway.shard.index}of{gateway.shard.count}",
                    consumer=consumer_name,
                    owns=gateway.owns_point,
                    execute=gateway.execute,
                    timeout_s=settings.service_timeout_s,
                    clock=clock,
                    fence_key=fence_key(prefix),
                ),
                name="commands",
            )
        yield
    finally:
        await plant.supervisor.close()
        if plant.anomaly is not None:
            try:
                await asyncio.wait_for(plant.anomaly.save(), settings.service_timeout_s)
            except (OSError, TimeoutError, asyncpg.PostgresError) as err:
                _LOGGER.warning("anomaly state not saved at shutdown: %s", err)
        if plant.gateway is not None:
            await plant.gateway.close()
        if plant.sink is not None:
            await plant.sink.close()
        if plant.notifier is not None:
            await plant.notifier.close()


async def _start_carbon(app: web.Application, consumer_name: str) -> None:
    """Start the carbon ledger's consumer group and the service loop (analytics role)."""
    settings, clock, plant, redis = app[SETTINGS], app[_CLOCK], app[PLANT], app[_REDIS]
    site = app[CATALOG].site
    prefix = settings.stream_prefix
    events_key = stream_key(prefix, StreamName.EVENTS)
    parents, levels = app[CATALOG].parents, app[CATALOG].levels
    ledger = CarbonLedger(
        ledger_points(site, app[FACTORS]),
        parents,
        levels,
        app[FACTORS],
        region=site.carbon.grid_region,
        timezone=site.site.timezone,
        close_after_s=site.carbon.close_after_s,
    )
    if site.notifications is not None:
        plant.notifier = Notifier.from_config(site.notifications, clock=clock)
    timeout_s = settings.service_timeout_s

    async def publish(kind: str, body: Mapping[str, Any]) -> None:
        fields: Any = encode_json_event(kind.encode(), body)
        async with asyncio.timeout(timeout_s):
            await redis.xadd(events_key, fields, maxlen=EVENTS_MAXLEN, approximate=True)

    audit_log = app[AUTH].audit

    async def audit_restatements(restated: Sequence[Restatement]) -> None:
        await audit_log.append_many(
            [
                AuditRecord(
                    actor="ledger",
                    action="ledger.restate",
                    target=f"ledger:{r.node}:{r.hour.isoformat()}:{r.carrier.value}:{r.source.value}",
                    detail={
                        "old_co2e_kg": r.old_co2e_kg,
                        "new_co2e_kg": r.new_co2e_kg,
                        "old_activity": r.old_activity,
                        "new_activity": r.new_activity,
                        "reason": r.reason,
                    },
                )
                for r in restated
            ]
        )

    plant.carbon = app[CARBON] = CarbonService(
        ledger,
        app[CARBON_STORE],
        parents,
        app[CATALOG].names,
        clock=clock,
        timezone=site.site.timezone,
        forecaster=MonthForecaster(site.site.timezone),
        alerts=QuotaAlerts(site.carbon.alert_thresholds_pct, hysteresis_pct=site.carbon.alert_hysteresis_pct),
        notifier=plant.notifier,
        publish=publish,
        close_after_s=site.carbon.close_after_s,
        audit=audit_restatements,
    )
    await plant.carbon.warm_start()
    plant.supervisor.spawn(
        run_consumer(
            redis,
            stream=stream_key(prefix, StreamName.READINGS),
            group=LEDGER_GROUP,
            consumer=consumer_name,
            handler=plant.carbon.handle,
            deadletter_stream=stream_key(prefix, StreamName.DEADLETTER),
            backoff=Backoff(max_s=SERVICE_RETRY_MAX_S),
        ),
        name="ledger",
    )
    plant.supervisor.spawn(plant.carbon.run(), name="carbon")


async def _partition_maintenance(historian: HistorianStage, clock: Clock) -> None:
    """Create tomorrow's partitions well before midnight, so ingest never waits on DDL."""
    while True:
        await clock.sleep(PARTITION_MAINTENANCE_PERIOD_S)
        try:
            await historian.ensure_partitions_ahead()
        except (OSError, TimeoutError, asyncpg.PostgresError) as err:
            _LOGGER.warning(
                "partition maintenance failed (will retry in %.0f s): %s", PARTITION_MAINTENANCE_PERIOD_S, err
            )


# --------------------------------------------------------------------------------------------------
# Retention (historian role)


def _retention_job(pool: asyncpg.Pool, site: SiteConfig, clock: Clock) -> RetentionJob:
    classes = {
        name: RetentionClass(
            raw_days=cls.raw_days,
            rollup_1m_days=cls.rollup_1m_days,
            rollup_15m_days=cls.rollup_15m_days,
            rollup_1h_days=cls.rollup_1h_days,
        )
        for name, cls in site.retention.items()
    }
    return RetentionJob(pool, classes, clock=clock)


async def _retention(job: RetentionJob, clock: Clock) -> None:
    """Apply the retention classes once an hour (the first run a period after start-up)."""
    while True:
        await clock.sleep(RETENTION_PERIOD_S)
        try:
            await job.run()
        except (OSError, TimeoutError, asyncpg.PostgresError, ServiceError) as err:
            _LOGGER.warning("retention failed (will retry in %.0f s): %s", RETENTION_PERIOD_S, err)


_SEVERITY_BY_PRIORITY = {
    AlarmPriority.CRITICAL: Severity.CRITICAL,
    AlarmPriority.HIGH: Severity.WARNING,
    AlarmPriority.MEDIUM: Severity.WARNING,
    AlarmPriority.LOW: Severity.INFO,
}


async def _start_anomaly(app: web.Application, consumer_name: str) -> None:
    """Start the detectors and the alarm engine on the readings and availability events (analytics role)."""
    settings, clock, plant, redis = app[SETTINGS], app[_CLOCK], app[PLANT], app[_REDIS]
    site = app[CATALOG].site
    prefix, timeout_s = settings.stream_prefix, settings.service_timeout_s
    alarms_key = stream_key(prefix, StreamName.ALARMS)
    definitions = alarm_definitions(site)
    parents: dict[str, str | None] = {str(k): v for k, v in app[CATALOG].parents.items()}
    names, tree = app[CATALOG].names, app[AUTH].tree

    def make_engine(snapshot: Mapping[str, Any] | None) -> AlarmEngine:
        if snapshot is None:
            return AlarmEngine(definitions, parents=parents)
        return AlarmEngine.restore(snapshot, definitions, parents=parents)

    async def publish(events: Sequence[Mapping[str, Any]]) -> None:
        async with asyncio.timeout(timeout_s):
            pipe = redis.pipeline(transaction=False)
            for event in events:
                fields: Any = encode_json_event(b"alarm", event)
                pipe.xadd(alarms_key, fields, maxlen=ALARMS_MAXLEN, approximate=True)
            await pipe.execute()

    async def notify(event: AlarmEvent, extra: Mapping[str, Any]) -> None:
        if plant.notifier is None:
            return
        text = event.message
        if "excess_kwh" in extra:
            text = energy_message(event.message, extra)
        await plant.notifier.send(
            Notification(
                id=event.key,
                node=event.node,
                node_name=names.get(NodeId(event.node), event.node),
                severity=_SEVERITY_BY_PRIORITY[event.priority],
                title=f"告警 Alarm P{int(event.priority)} {event.to_state.value}: {event.message}"[:200],
                text=text,
                ts=event.at,
                fields={
                    "alarm": event.alarm_id,
                    "priority": int(event.priority),
                    "state": event.to_state.value,
                    **{k: v for k, v in extra.items() if k in ("excess_kwh", "excess_kgco2e")},
                },
            ),
            tree.chain(event.node)[1:],
        )

    service = AnomalyService(
        make_engine(None),
        monitored_points(site, app[FACTORS]),
        app[ALARM_STORE],
        clock=clock,
        publish=publish,
        notify=notify,
    )
    await service.restore(make_engine)
    plant.anomaly = app[ANOMALY] = service
    plant.supervisor.spawn(
        run_consumer(
            redis,
            stream=stream_key(prefix, StreamName.READINGS),
            group=ANOMALY_GROUP,
            consumer=consumer_name,
            handler=service.handle,
            deadletter_stream=stream_key(prefix, StreamName.DEADLETTER),
            backoff=Backoff(max_s=SERVICE_RETRY_MAX_S),
        ),
        name="anomaly",
    )
    plant.supervisor.spawn(service.run(), name="alarms")
    plant.supervisor.spawn(
        follow_events(  # one read of the events stream for both
            redis,
            stream_key(prefix, StreamName.EVENTS),
            availability=service.availability,
            json_events={DISPATCH_EVENT: service.dispatch_outcome},
            timeout_s=timeout_s,
        ),
        name="alarm-events",
    )


async def _start_analytics_and_control(
    app: web.Application, roles: frozenset[Role], consumer_name: str
) -> None:
    if Role.API in roles:
        app[DISPATCHER] = _new_dispatcher(app, fence=None)  # records approvals; the leader sends
    if Role.ANALYTICS in roles:
        await _start_carbon(app, consumer_name)
        await _start_anomaly(app, consumer_name)
    if Role.CONTROL in roles:
        _start_control(app)


def _dispatch_sender(app: web.Application, fence: int | None) -> CommandSender:
    """Return the dispatcher's path to devices: the command channel, with the leader's fence."""
    channel = app[COMMANDS]

    async def send(command: Command, wait_s: float) -> CommandResult | None:
        if fence is None:
            raise OSError("not the control leader: dispatches are sent by the process holding the lease")
        return await send_and_wait(
            channel.redis,
            channel.commands_key,
            channel.results_key,
            dataclasses.replace(command, fence=fence),
            wait_s=wait_s,
            timeout_s=channel.timeout_s,
        )

    return send


def _point_reader(app: web.Application) -> Callable[[PointId], Awaitable[Reading | None]]:
    """Return a reader of a point's newest reading: the live hub's, else the newest stored one.

    The hub is fed only in a process with the api role; elsewhere every read is a query.
    """
    hub, store = app[HUB], app[STORE]

    async def read(point: PointId) -> Reading | None:
        return hub.latest(point) or await store.latest(point)

    return read


def _new_dispatcher(app: web.Application, *, fence: int | None) -> Dispatcher:
    """Return a dispatcher: active (sends) with the leader's fence, passive (records) without."""
    settings, clock, audit = app[SETTINGS], app[_CLOCK], app[AUTH].audit
    read = _point_reader(app)

    async def latest(point: PointId) -> float | None:
        reading = await read(point)
        return reading.value if reading is not None and reading.quality.is_good else None

    events_key = stream_key(settings.stream_prefix, StreamName.EVENTS)
    redis = app[_REDIS]

    async def outcome(dispatch: Dispatch) -> None:
        body = {
            "id": dispatch.id,
            "node": dispatch.node,
            "point": dispatch.point,
            "value": dispatch.value,
            "state": dispatch.state.value,
            "rule": dispatch.rule_id,
            "reason": str((dispatch.result or {}).get("reason", "")),
            "ts": clock.now().isoformat(),
        }
        fields: Any = encode_json_event(DISPATCH_EVENT, body)
        async with asyncio.timeout(settings.service_timeout_s):
            await redis.xadd(events_key, fields, maxlen=EVENTS_MAXLEN, approximate=True)

    control = app[CATALOG].site.control
    return Dispatcher(
        app[DISPATCH_STORE],
        _dispatch_sender(app, fence),
        latest,
        clock=clock,
        modes=dispatch_modes(control, list(app[CATALOG].parents)) if control is not None else None,
        audit=audit.note,
        send_wait_s=settings.service_timeout_s * 2,
        active=fence is not None,
        outcome=outcome,
    )


def _start_control(app: web.Application) -> None:
    """Campaign for the control lease; the holder runs the dispatcher and the controller (control role)."""
    settings, plant = app[SETTINGS], app[PLANT]
    lease = app[LEASE] = LeaderLease(
        app[_REDIS], prefix=settings.stream_prefix, timeout_s=settings.service_timeout_s
    )
    plant.supervisor.spawn(lease.run(lambda fence: _lead(app, fence)), name="control-lease")


async def _lead(app: web.Application, fence: int) -> None:
    """Run the control leader's work until the lease ends (see :mod:`scada.leader`)."""
    supervisor = TaskSupervisor(f"control-{fence}")
    try:
        dispatcher = app[PLANT].leader_dispatcher = _new_dispatcher(app, fence=fence)
        heartbeat = control.heartbeat if (control := app[CATALOG].site.control) is not None else None
        supervisor.spawn(
            dispatcher.run(
                heartbeat_points=[PointId(p) for p in heartbeat.points] if heartbeat is not None else (),
                heartbeat_s=heartbeat.period_s if heartbeat is not None else 10.0,
            ),
            name="dispatcher",
        )
        supervisor.spawn(_verifier(app).run(), name="verifier")
        controller = _controller(app, dispatcher, fence=fence)
        if controller is not None:
            supervisor.spawn(controller.run(), name="controller")
        await asyncio.Event().wait()  # until the lease ends
    finally:
        app[PLANT].leader_dispatcher = None
        await supervisor.close()


def _verifier(app: web.Application) -> VerificationService:
    """Return the service that measures every dispatch after its hold (docs/dispatch-verification.md)."""
    settings, clock, redis, audit = app[SETTINGS], app[_CLOCK], app[_REDIS], app[AUTH].audit
    site, factors = app[CATALOG].site, app[FACTORS]
    results_key = stream_key(settings.stream_prefix, StreamName.COMMAND_RESULTS)
    timeout_s = settings.service_timeout_s

    async def publish(body: Mapping[str, Any]) -> None:
        # Its own entry type on command_results: decode_result refuses it, so result readers skip it.
        fields: Any = encode_json_event(ENTRY_KIND.encode(), body)
        async with asyncio.timeout(timeout_s):
            await redis.xadd(results_key, fields, maxlen=RESULTS_MAXLEN, approximate=True)

    return VerificationService(
        app[VERIFICATION_STORE],
        ledger_points(site, factors),
        factors,
        region=site.carbon.grid_region,
        timezone=site.site.timezone,
        clock=clock,
        audit=audit.note,
        publish=publish,
        publish_timeout_s=timeout_s * 2,
    )


def _controller(app: web.Application, dispatcher: Dispatcher, *, fence: int) -> ControlService | None:
    """Return the carbon-budget controller of the site's ``control:`` section (None without one)."""
    clock, plant, audit = app[_CLOCK], app[PLANT], app[AUTH].audit
    site = app[CATALOG].site
    control = site.control
    if control is None:
        return None
    catalog, factors, read = app[CATALOG], app[FACTORS], _point_reader(app)
    carbon_store, carbon_queries = app[CARBON_STORE], app[CARBON_QUERIES]
    zone = ZoneInfo(site.site.timezone)

    async def budgets() -> dict[str, NodeBudget]:
        month = month_key(clock.now().astimezone(zone))
        carbon = plant.carbon
        if carbon is not None:
            # The quotas and forecasts this process's carbon service evaluated last: no query.
            return {
                quota.node: NodeBudget.from_forecast(forecast, quota_t=quota.quota_t)
                for quota in carbon.quotas
                if quota.month == month
                and (forecast := carbon.forecasts.get(quota.node)) is not None
                and forecast.month == month
            }
        # Another process runs the analytics role: its stored forecasts (written every minute).
        quotas = {q.node: q.quota_t for q in await carbon_store.quotas(month)}
        return {
            row["node_id"]: NodeBudget(
                node=NodeId(row["node_id"]),
                month=month,
                quota_t=quotas[row["node_id"]],
                actual_t=row["actual_t"],
                forecast_t=row["forecast_t"],
                forecast_high_t=row["high_t"],
                computed_at=row["computed_at"],
            )
            for row in await carbon_queries.forecasts(month)
            if row["node_id"] in quotas
        }

    async def points(watched: Sequence[PointId]) -> dict[str, PointState]:
        out: dict[str, PointState] = {}
        for point in watched:
            reading = await read(point)
            if reading is None:
                continue
            entry = catalog.point(point)
            out[point] = PointState(
                point=point,
                value=reading.value,
                quality=reading.quality.code,
                ts=reading.ts,
                writable=entry.config.writable,
                max_age_s=entry.device.effective_stale_after_s,
            )
        return out

    def intensity() -> tuple[float | None, tuple[float, ...]]:
        # The config's hourly profile where it has one, else the grid factor in force (docs/control.md).
        now = clock.now()
        factor = factors.in_force(Carrier.ELECTRICITY, now, site.carbon.grid_region).value
        signals = hourly_signals(control, now, factor)
        return signals.intensity_kg_per_kwh, signals.intensity_hourly_kg_per_kwh

    return ControlService(
        control,
        dispatcher,
        budgets=budgets,
        points=points,
        intensity=intensity,
        watched=_watched_points(control.model_dump(mode="json"), catalog),
        clock=clock,
        audit=audit.note,
        # Stages and sizing survive a restart or a change of leader; a deposed leader cannot save.
        state_store=ControllerStateStore(app[_POOL], timeout_s=app[SETTINGS].service_timeout_s),
        fencing_token=lambda: fence,
    )


def _watched_points(document: Any, catalog: SiteCatalog) -> list[PointId]:
    """Return every point id the control section names (targets, mode points, SOC and comfort points)."""
    found: set[str] = set()
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
            stack.extend(k for k in item if isinstance(k, str))
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, str) and catalog.has_point(item):
            found.add(item)
    return sorted(PointId(p) for p in found)
