"""Authentication and authorisation of every request, and the auth, user, key and audit routes.

The middleware authenticates the caller (``Authorization: Bearer`` access token or kiosk token,
``X-API-Key``, or ``?token=`` on the websocket), then applies the route's :class:`Policy`: the role
it needs and the node it is about (from the path or query: a node, a point's or device's node, an
alarm's device). A route without a policy is refused (deny by default). Something outside the
caller's tenant or grants answers 404, as if it did not exist; a weaker role on a visible node 403.
Handlers that list things filter them with :func:`principal_of` and :func:`visible_nodes`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from scada.api.problem import ApiProblem, json_object, parse_id, parse_time, query_cursor, query_int
from scada.api.problem import invalid as _invalid
from scada.audit import AuditLog, AuditRecord, export
from scada.auth_store import AuthStore, LockedOut
from scada.catalog import SiteCatalog
from scada.model import UTC, NotFound
from scada.security import AuthError, Grant, NodeTree, Principal, PrincipalKind, Role, TokenSigner

__all__ = [
    "AUTH",
    "AuthContext",
    "Policy",
    "add_auth_routes",
    "audit_actions",
    "auth_middleware",
    "default_node",
    "principal_of",
    "require_visible",
    "scope_of",
    "visible_nodes",
]

PRINCIPAL = web.RequestKey("principal", Principal)
LOGIN_RATE_PER_MIN: Final = 20
"""Login attempts per client address and minute (then 429), on top of the per-user lockout."""
AUDIT_PAGE_DEFAULT: Final = 1_000
AUDIT_PAGE_MAX: Final = 10_000
"""Entries per page of ``GET /api/v1/audit`` (default and most)."""


@dataclass
class AuthContext:
    """What the middleware and the auth routes need."""

    signer: TokenSigner
    store: AuthStore
    tree: NodeTree
    audit: AuditLog
    catalog: SiteCatalog
    _attempts: dict[str, list[float]] = field(default_factory=dict)

    def allow_login_attempt(self, client: str, now: float) -> float | None:
        """Count a login attempt; return seconds to wait if the client is over its rate."""
        window = [t for t in self._attempts.get(client, []) if now - t < 60.0]
        if len(window) >= LOGIN_RATE_PER_MIN:
            self._attempts[client] = window
            return 60.0 - (now - window[0])
        window.append(now)
        if len(self._attempts) > 50_000:
            self._attempts.clear()
        self._attempts[client] = window
        return None


AUTH = web.AppKey("auth", AuthContext)

# --------------------------------------------------------------------------------------------------
# Policies

NodeResolver = Callable[[web.Request, AuthContext, Principal], str | None]
"""Return the node a request is about (None: not node-scoped); raise NotFound for an unknown thing."""


@dataclass(frozen=True, slots=True)
class Policy:
    """What a route needs: ``public`` (no caller), or a role, optionally on the node ``node`` returns."""

    role: Role | None = Role.VIEWER
    node: NodeResolver | None = None
    system: bool = False
    """Only an admin of every root (site-wide views that cross tenants: dead letters, metrics)."""
    public: bool = False
    humans_only: bool = False
    """Not for kiosk tokens (a kiosk only reads dashboards)."""


def node_from_path(name: str) -> NodeResolver:
    """Return a resolver of the node named by path parameter ``name``."""

    def resolve(request: web.Request, ctx: AuthContext, principal: Principal) -> str | None:
        node = request.match_info[name]
        if node not in ctx.tree:
            raise NotFound(f"no node {node!r}")
        return node

    return resolve


def node_from_query(name: str = "node") -> NodeResolver:
    """Return a resolver of the node in query parameter ``name`` (absent: not node-scoped)."""

    def resolve(request: web.Request, ctx: AuthContext, principal: Principal) -> str | None:
        node = request.query.get(name)
        if node is None:
            return None
        if node not in ctx.tree:
            raise NotFound(f"no node {node!r}")
        return node

    return resolve


def point_node(request: web.Request, ctx: AuthContext, principal: Principal) -> str | None:
    """Return the node of the point in the path."""
    return ctx.catalog.point(request.match_info["point_id"]).device.node


def alarm_node(request: web.Request, ctx: AuthContext, principal: Principal) -> str | None:
    """Return the node of the device an alarm id starts with (``<device>[.<key>]:<kind>``)."""
    alarm_id = request.match_info["alarm_id"]
    device = alarm_id.split(":", 1)[0].split(".", 1)[0]
    return ctx.catalog.device(device).node


def console_node(request: web.Request, ctx: AuthContext, principal: Principal) -> str | None:
    """Return the console in the query (a console is a node id)."""
    console = request.query.get("console")
    if console is None:
        return None
    if console not in ctx.tree:
        raise NotFound(f"no console {console!r}")
    return console


PUBLIC = Policy(role=None, public=True)
READ = Policy()
POLICIES: dict[tuple[str, str], Policy] = {
    ("GET", "/api/v1/health"): PUBLIC,
    ("POST", "/api/v1/auth/login"): PUBLIC,
    ("POST", "/api/v1/auth/refresh"): PUBLIC,
    ("POST", "/api/v1/auth/logout"): PUBLIC,
    ("GET", "/api/v1/openapi.json"): PUBLIC,
    ("GET", "/api/v1/docs"): PUBLIC,
    ("GET", "/api/v1/auth/me"): READ,
    ("GET", "/api/v1/site"): READ,
    ("GET", "/api/v1/devices"): READ,
    ("GET", "/api/v1/points"): READ,
    ("GET", "/api/v1/points/{point_id}"): Policy(node=point_node),
    ("GET", "/api/v1/points/{point_id}/latest"): Policy(node=point_node),
    ("GET", "/api/v1/points/{point_id}/history"): Policy(node=point_node),
    ("GET", "/api/v1/points/{point_id}/energy"): Policy(node=point_node),
    ("POST", "/api/v1/points/{point_id}/commands"): Policy(
        role=Role.ENGINEER, node=point_node, humans_only=True
    ),
    ("GET", "/api/v1/nodes/{node_id}/energy"): Policy(node=node_from_path("node_id")),
    ("GET", "/api/v1/deadletter"): Policy(role=Role.ADMIN, system=True),
    ("GET", "/metrics"): Policy(role=Role.ADMIN, system=True),
    ("GET", "/api/v1/emission-factors"): READ,
    ("GET", "/api/v1/emission-factors/{factor_id}"): READ,
    ("GET", "/api/v1/ws"): READ,
    ("GET", "/api/v1/emissions"): Policy(node=node_from_query()),
    ("GET", "/api/v1/quotas"): Policy(node=node_from_query()),
    ("GET", "/api/v1/quotas/{node_id}/{month}"): Policy(node=node_from_path("node_id")),
    ("PUT", "/api/v1/quotas/{node_id}/{month}"): Policy(
        role=Role.ENGINEER, node=node_from_path("node_id"), humans_only=True
    ),
    ("DELETE", "/api/v1/quotas/{node_id}/{month}"): Policy(
        role=Role.ENGINEER, node=node_from_path("node_id"), humans_only=True
    ),
    ("GET", "/api/v1/forecasts"): Policy(node=node_from_query()),
    ("GET", "/api/v1/ledger/restatements"): Policy(node=node_from_query()),
    ("GET", "/api/v1/alarms"): Policy(node=console_node),
    ("GET", "/api/v1/alarms/events"): Policy(node=console_node),
    ("GET", "/api/v1/alarms/kpis"): Policy(node=console_node),
    ("POST", "/api/v1/alarms/{alarm_id}/acknowledge"): Policy(
        role=Role.OPERATOR, node=alarm_node, humans_only=True
    ),
    ("POST", "/api/v1/alarms/{alarm_id}/shelve"): Policy(
        role=Role.OPERATOR, node=alarm_node, humans_only=True
    ),
    ("POST", "/api/v1/alarms/{alarm_id}/unshelve"): Policy(
        role=Role.OPERATOR, node=alarm_node, humans_only=True
    ),
    # Dispatches: the handlers check the dispatch's node (it is known only after reading it).
    ("GET", "/api/v1/dispatches"): READ,
    ("GET", "/api/v1/dispatches/{dispatch_id}"): READ,
    ("POST", "/api/v1/dispatches/{dispatch_id}/approve"): Policy(role=Role.OPERATOR, humans_only=True),
    ("POST", "/api/v1/dispatches/{dispatch_id}/reject"): Policy(role=Role.OPERATOR, humans_only=True),
    ("GET", "/api/v1/dispatches/{dispatch_id}/verification"): READ,
    ("GET", "/api/v1/verification/monthly"): Policy(node=node_from_query()),
    ("GET", "/api/v1/users"): Policy(role=Role.ADMIN, humans_only=True),
    ("POST", "/api/v1/users"): Policy(role=Role.ADMIN, humans_only=True),
    ("GET", "/api/v1/api-keys"): Policy(role=Role.ADMIN, humans_only=True),
    ("POST", "/api/v1/api-keys"): Policy(role=Role.ADMIN, humans_only=True),
    ("DELETE", "/api/v1/api-keys/{key_id}"): Policy(role=Role.ADMIN, humans_only=True),
    ("POST", "/api/v1/kiosk-tokens"): Policy(role=Role.ADMIN, humans_only=True),
    ("DELETE", "/api/v1/kiosk-tokens/{key_id}"): Policy(role=Role.ADMIN, humans_only=True),
    ("GET", "/api/v1/audit"): Policy(role=Role.ADMIN, humans_only=True),
    ("GET", "/api/v1/audit/verify"): Policy(role=Role.ADMIN, humans_only=True),
}


def principal_of(request: web.Request) -> Principal:
    """Return the authenticated caller of a request (the middleware put it there)."""
    if PRINCIPAL not in request:
        raise ApiProblem(401, "Unauthorized", "authentication required")
    return request[PRINCIPAL]


def visible_nodes(request: web.Request) -> frozenset[str]:
    """Return the nodes the caller may read (the tree keeps the answer per grant set)."""
    return principal_of(request).visible(request.app[AUTH].tree)


def require_visible(request: web.Request, node: str) -> None:
    """Raise 404 unless the caller may read ``node``."""
    if node not in visible_nodes(request):
        raise ApiProblem(404, "Not found", f"no node {node!r}", slug="not-found")


def scope_of(request: web.Request) -> frozenset[str] | None:
    """Return the nodes the caller may read, or None when the app runs without authentication."""
    if AUTH not in request.app:
        return None
    return visible_nodes(request)


def default_node(request: web.Request) -> str:
    """Return the caller's top node (where list views start when no node is named)."""
    tops = principal_of(request).top_nodes(request.app[AUTH].tree)
    if not tops:
        raise ApiProblem(403, "Forbidden", "this caller has no grant on any node")
    return tops[0]


async def audit_actions(request: web.Request, *actions: tuple[str, str, Mapping[str, Any]]) -> None:
    """Record what the caller did, as ``(action, target, detail)``, in one transaction.

    Nothing is recorded when the app runs without authentication (unit tests of bare routes).
    """
    ctx = request.app.get(AUTH)
    if ctx is None:
        return
    principal = principal_of(request)
    await ctx.audit.append_many(
        [
            AuditRecord(
                actor=principal.subject, action=action, target=target, detail=detail, tenant=principal.tenant
            )
            for action, target, detail in actions
        ]
    )


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(
        401,
        "Unauthorized",
        detail,
        slug="unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="carbonos"'},
    )


async def _authenticate(request: web.Request, ctx: AuthContext) -> Principal:
    header = request.headers.get("Authorization", "")
    key = request.headers.get("X-API-Key")
    token: str | None = None
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized("Authorization: use 'Bearer <token>'")
        token = value.strip()
    elif key:
        token = key.strip()
    elif request.path == "/api/v1/ws" and request.query.get("token"):
        token = request.query["token"]
    if not token:
        raise _unauthorized("authentication required: a bearer token or an X-API-Key")
    try:
        if token.startswith("ck_"):
            return await ctx.store.key_principal(token)
        return ctx.signer.check(token)
    except AuthError as err:
        raise _unauthorized(str(err)) from None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate the caller and apply the route's policy (deny by default)."""
    ctx = request.app.get(AUTH)
    route = request.match_info.route
    resource = route.resource
    if ctx is None or resource is None:  # no auth configured (unit tests of bare routes), or a 404/405
        return await handler(request)
    policy = POLICIES.get((request.method, resource.canonical))
    if policy is None and request.method == "HEAD":
        policy = POLICIES.get(("GET", resource.canonical))
    if policy is None:
        raise ApiProblem(403, "Forbidden", f"no access policy for {request.method} {resource.canonical}")
    if policy.public:
        return await handler(request)
    principal = await _authenticate(request, ctx)
    request[PRINCIPAL] = principal
    if policy.humans_only and principal.kind is PrincipalKind.KIOSK:
        raise ApiProblem(403, "Forbidden", "a kiosk token only reads")
    if policy.system and not principal.is_system(ctx.tree):
        raise ApiProblem(403, "Forbidden", "a site-wide view: only an admin of every root node")
    if policy.node is not None:
        node = policy.node(request, ctx, principal)
        if node is not None:
            role = principal.role_on(node, ctx.tree)
            if role is None:
                raise ApiProblem(404, "Not found", f"nothing here for {request.path!r}", slug="not-found")
            if policy.role is not None and role.rank < policy.role.rank:
                raise ApiProblem(403, "Forbidden", f"needs the {policy.role.value} role on {node!r}")
    elif policy.role is not None and not any(g.role.rank >= policy.role.rank for g in principal.grants):
        raise ApiProblem(403, "Forbidden", f"needs the {policy.role.value} role")
    return await handler(request)


# --------------------------------------------------------------------------------------------------
# Routes


def add_auth_routes(app: web.Application) -> None:
    """Register login, tokens, users, keys and the audit log."""
    app.router.add_post("/api/v1/auth/login", login)
    app.router.add_post("/api/v1/auth/refresh", refresh)
    app.router.add_post("/api/v1/auth/logout", logout)
    app.router.add_get("/api/v1/auth/me", me)
    app.router.add_get("/api/v1/users", list_users)
    app.router.add_post("/api/v1/users", create_user)
    app.router.add_get("/api/v1/api-keys", list_keys)
    app.router.add_post("/api/v1/api-keys", create_key)
    app.router.add_delete("/api/v1/api-keys/{key_id}", revoke_key)
    app.router.add_post("/api/v1/kiosk-tokens", create_kiosk_token)
    app.router.add_delete("/api/v1/kiosk-tokens/{key_id}", revoke_key)
    app.router.add_get("/api/v1/audit", audit_entries)
    app.router.add_get("/api/v1/audit/verify", audit_verify)


async def _json_body(
    request: web.Request, fields: dict[str, type | tuple[type, ...]], required: set[str]
) -> dict[str, Any]:
    body = await json_object(request, fields)
    for name, kind in fields.items():
        if name in body and (
            not isinstance(body[name], kind) or (isinstance(body[name], bool) and kind is not bool)
        ):
            raise _invalid(f"{name}: wrong type")
        if name in required and (
            name not in body or (isinstance(body[name], str) and not body[name].strip())
        ):
            raise _invalid(f"{name}: required")
    return body


def _token_response(ctx: AuthContext, principal: Principal, refresh_token: str) -> web.Response:
    return web.json_response(
        {
            "access_token": ctx.signer.issue(principal),
            "refresh_token": refresh_token,
            "token_type": "Bearer",
            "expires_in": ctx.signer.ttl_s,
        },
        headers={"Cache-Control": "no-store"},
    )


async def login(request: web.Request) -> web.Response:
    """Log in with tenant, username and password: an access token and a refresh token."""
    ctx = request.app[AUTH]
    wait = ctx.allow_login_attempt(request.remote or "?", time.monotonic())
    if wait is not None:
        raise ApiProblem(429, "Too many requests", "too many login attempts", retry_after=math.ceil(wait))
    body = await _json_body(
        request, {"tenant": str, "username": str, "password": str}, {"tenant", "username", "password"}
    )
    tenant, username = body["tenant"], body["username"]

    async def note(action: str) -> None:
        await ctx.audit.append(
            actor=username,
            action=action,
            target=f"user:{username}",
            tenant=tenant,
            detail={"client": request.remote},
        )

    try:
        principal, user_id = await ctx.store.login(tenant, username, body["password"])
    except LockedOut as err:
        await note("login.locked")
        raise ApiProblem(
            429, "Too many requests", str(err), retry_after=math.ceil(err.retry_after_s)
        ) from None
    except AuthError as err:
        await note("login.failed")
        raise _unauthorized(str(err)) from None
    await note("login")
    return _token_response(ctx, principal, await ctx.store.issue_refresh(user_id))


async def refresh(request: web.Request) -> web.Response:
    """Trade a refresh token (once) for a new access token and refresh token."""
    ctx = request.app[AUTH]
    body = await _json_body(request, {"refresh_token": str}, {"refresh_token"})
    try:
        principal, user_id = await ctx.store.use_refresh(body["refresh_token"])
    except AuthError as err:
        raise _unauthorized(str(err)) from None
    return _token_response(ctx, principal, await ctx.store.issue_refresh(user_id))


async def logout(request: web.Request) -> web.Response:
    """Spend a refresh token so it cannot be used again."""
    body = await _json_body(request, {"refresh_token": str}, {"refresh_token"})
    await request.app[AUTH].store.revoke_refresh(body["refresh_token"])
    return web.Response(status=204)


async def me(request: web.Request) -> web.Response:
    """Return who the caller is and what it holds."""
    principal = principal_of(request)
    return web.json_response(
        {
            "tenant": principal.tenant,
            "subject": principal.subject,
            "kind": principal.kind.value,
            "grants": [{"node": g.node, "role": g.role.value} for g in principal.grants],
        }
    )


def _admin_grant(request: web.Request, node: str, role: Role) -> Grant:
    """Return a grant the calling admin may give: on a node it administers, not above its own role."""
    held = principal_of(request).role_on(node, request.app[AUTH].tree)  # None for an unknown node too
    if held is None:
        raise _invalid(f"grants: unknown node {node!r}")
    if held.rank < Role.ADMIN.rank:
        raise ApiProblem(403, "Forbidden", f"needs the admin role on {node!r} to grant there")
    return Grant(node, role)


def _grants(request: web.Request, raw: Any) -> list[Grant]:
    if not isinstance(raw, list) or not raw:
        raise _invalid("grants: a non-empty list of {node, role}")
    out = []
    for item in raw:
        if (
            not isinstance(item, dict)
            or set(item) != {"node", "role"}
            or not all(isinstance(v, str) for v in item.values())
        ):
            raise _invalid('grants: each one is {"node": str, "role": str}')
        try:
            role = Role(item["role"])
        except ValueError:
            raise _invalid(f"grants: unknown role {item['role']!r}") from None
        out.append(_admin_grant(request, item["node"], role))
    return out


async def list_users(request: web.Request) -> web.Response:
    """Return the users of the caller's tenant."""
    principal = principal_of(request)
    return web.json_response({"users": await request.app[AUTH].store.users(principal.tenant)})


async def create_user(request: web.Request) -> web.Response:
    """Create a user of the caller's tenant: ``{"username", "password", "grants": [{"node", "role"}]}``."""
    ctx, principal = request.app[AUTH], principal_of(request)
    body = await _json_body(
        request, {"username": str, "password": str, "grants": list}, {"username", "password", "grants"}
    )
    grants = _grants(request, body["grants"])
    try:
        user_id = await ctx.store.create_user(principal.tenant, body["username"], body["password"], grants)
    except KeyError as err:
        raise ApiProblem(409, "Conflict", str(err.args[0]), slug="exists") from None
    except ValueError as err:
        raise _invalid(str(err)) from None
    await audit_actions(
        request,
        (
            "user.create",
            f"user:{body['username']}",
            {"grants": [{"node": g.node, "role": g.role.value} for g in grants]},
        ),
    )
    return web.json_response({"id": user_id, "username": body["username"]}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    """Return the caller's tenant's API keys and kiosk tokens (never the secrets)."""
    principal = principal_of(request)
    keys = await request.app[AUTH].store.keys(principal.tenant)
    return web.json_response(
        {
            "keys": [
                {
                    "id": k.id,
                    "kind": k.kind,
                    "name": k.name,
                    "created_by": k.created_by,
                    "created_at": k.created_at.astimezone(UTC).isoformat(),
                    "revoked": k.revoked,
                    "node": k.grants[0].node,
                    "role": k.grants[0].role.value,
                }
                for k in keys
            ]
        }
    )


async def _create_key(request: web.Request, kind: str) -> web.Response:
    ctx, principal = request.app[AUTH], principal_of(request)
    fields: dict[str, type | tuple[type, ...]] = {"name": str, "node": str}
    if kind == "key":
        fields["role"] = str
    body = await _json_body(request, fields, set(fields))
    try:
        role = Role(body.get("role", "viewer"))
    except ValueError:
        raise _invalid(f"role: unknown role {body['role']!r}") from None
    grant = _admin_grant(request, body["node"], role)
    try:
        key_id, secret = await ctx.store.create_key(
            principal.tenant, kind, body["name"], grant, principal.subject
        )
    except ValueError as err:
        raise _invalid(str(err)) from None
    await audit_actions(
        request,
        (
            f"{'api_key' if kind == 'key' else 'kiosk_token'}.create",
            f"key:{key_id}",
            {
                "name": body["name"],
                "node": grant.node,
                "role": grant.role.value if kind == "key" else "viewer",
            },
        ),
    )
    name = "key" if kind == "key" else "token"
    return web.json_response({"id": key_id, name: secret}, status=201, headers={"Cache-Control": "no-store"})


async def create_key(request: web.Request) -> web.Response:
    """Create an API key: ``{"name", "node", "role"}``; the key is shown once."""
    return await _create_key(request, "key")


async def create_kiosk_token(request: web.Request) -> web.Response:
    """Create a read-only kiosk token for a big screen: ``{"name", "node"}``; shown once."""
    return await _create_key(request, "kiosk")


async def revoke_key(request: web.Request) -> web.Response:
    """Revoke an API key or kiosk token of the caller's tenant."""
    raw = request.match_info["key_id"]
    key_id = parse_id(raw)
    if key_id is None or not await request.app[AUTH].store.revoke_key(principal_of(request).tenant, key_id):
        raise ApiProblem(404, "Not found", f"no key {raw!r}", slug="not-found")
    await audit_actions(request, ("key.revoke", f"key:{raw}", {}))
    return web.Response(status=204)


async def audit_entries(request: web.Request) -> web.Response:
    """Return the caller's tenant's audit entries (``format=csv`` to download), paged by ``cursor``."""
    ctx, principal = request.app[AUTH], principal_of(request)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise _invalid("format: json or csv")
    limit = query_int(request.query, "limit", default=AUDIT_PAGE_DEFAULT, low=1, high=AUDIT_PAGE_MAX)
    after_seq = query_cursor(request.query)
    start, end = parse_time(request.query.get("start"), "start"), parse_time(request.query.get("end"), "end")
    tenant = None if principal.is_system(ctx.tree) else principal.tenant
    entries = await ctx.audit.entries(tenant=tenant, start=start, end=end, after_seq=after_seq, limit=limit)
    next_cursor = str(entries[-1].seq) if len(entries) == limit else None
    if fmt == "csv":
        return web.Response(
            text=export(entries, "csv"),
            content_type="text/csv",
            headers={
                "Content-Disposition": 'attachment; filename="audit.csv"',
                **({"X-Next-Cursor": next_cursor} if next_cursor else {}),
            },
        )
    return web.json_response({"entries": [e.to_json() for e in entries], "next_cursor": next_cursor})


async def audit_verify(request: web.Request) -> web.Response:
    """Walk the whole audit chain and report whether any entry was edited or removed."""
    report = await request.app[AUTH].audit.verify(expect_head=request.query.get("expect_head") or None)
    return web.json_response(
        {
            "ok": report.ok,
            "entries": report.entries,
            "head_seq": report.head_seq,
            "head_hash": report.head_hash,
            "problems": report.problems,
        }
    )
