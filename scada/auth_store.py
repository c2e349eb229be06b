"""Tenants, users, grants, API keys, kiosk tokens and refresh tokens in PostgreSQL (migration 007).

Logins are rate limited per user: after :data:`MAX_FAILED_LOGINS` wrong passwords in a row the user
is locked for :data:`LOCKOUT_S`. Keys and kiosk tokens are looked up by id and checked against their
stored SHA-256 in constant time; a verified key is cached for :data:`KEY_CACHE_S`, so a revoked key
stops working within that time in every process (at once in the one that revoked it).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from scada.config import SiteConfig
from scada.model import UTC
from scada.security import (
    REFRESH_TOKEN_TTL_S,
    AuthError,
    Grant,
    NodeTree,
    Principal,
    PrincipalKind,
    Role,
    hash_password,
    hash_secret,
    make_secret,
    parse_key,
    same_secret,
    verify_password,
)

__all__ = ["LOCKOUT_S", "MAX_FAILED_LOGINS", "AuthStore", "LockedOut", "tenants_of"]

MAX_FAILED_LOGINS: Final = 5
LOCKOUT_S: Final = 900.0
KEY_CACHE_S: Final = 30.0
_DUMMY_HASH: Final = hash_password("not-a-real-password")
"""Verified against when the user does not exist, so a login takes as long either way."""
_USER_GRANTS: Final = """coalesce((SELECT json_agg(json_build_array(g.node_id, g.role) ORDER BY g.id)
                                 FROM grants g WHERE g.user_id = u.id), '[]') AS grants"""
"""A select-list item: the grants of user ``u`` as a JSON list of [node, role] (see :func:`_grants`)."""


class LockedOut(Exception):
    """Too many failed logins: retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"too many failed logins: try again in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


def tenants_of(site: SiteConfig) -> list[tuple[str, str, list[str]]]:
    """Return (id, name, owned nodes) of every tenant: the site's list, or one owning every root."""
    if site.tenants:
        return [(t.id, t.name, list(t.nodes)) for t in site.tenants]
    return [(site.site.id, site.site.name, [n.id for n in site.hierarchy])]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key or kiosk token as listed to admins (never the secret)."""

    id: int
    kind: str
    name: str
    created_by: str
    created_at: datetime
    revoked: bool
    grants: tuple[Grant, ...]


class AuthStore:
    """The security records of every tenant."""

    def __init__(self, pool: asyncpg.Pool, tree: NodeTree, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._tree = tree
        self._timeout_s = timeout_s
        self._tenant_nodes: dict[str, frozenset[str]] = {}
        self._keys: dict[int, tuple[float, bytes, Principal]] = {}

    # -- tenants ---------------------------------------------------------------------------------

    async def sync_tenants(self, site: SiteConfig) -> None:
        """Upsert the site's tenants and the subtrees they own (start-up)."""
        tenants = tenants_of(site)
        async with self._pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
            for tenant_id, name, nodes in tenants:
                await conn.execute(
                    """INSERT INTO tenants (id, name) VALUES ($1, $2)
                       ON CONFLICT (id) DO UPDATE SET name = excluded.name""",
                    tenant_id,
                    name,
                    timeout=self._timeout_s,
                )
                await conn.execute(
                    "DELETE FROM tenant_nodes WHERE tenant_id = $1 AND NOT node_id = ANY($2::text[])",
                    tenant_id,
                    nodes,
                    timeout=self._timeout_s,
                )
                await conn.executemany(
                    "INSERT INTO tenant_nodes (tenant_id, node_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    [(tenant_id, node) for node in nodes],
                    timeout=self._timeout_s,
                )
        self._tenant_nodes = {tenant_id: frozenset(nodes) for tenant_id, _name, nodes in tenants}

    def tenant_nodes(self, tenant: str) -> frozenset[str]:
        """Return the subtrees a tenant owns (empty for an unknown tenant)."""
        return self._tenant_nodes.get(tenant, frozenset())

    def _check_grants(self, tenant: str, grants: Sequence[Grant]) -> None:
        owned = self.tenant_nodes(tenant)
        if not owned:
            raise ValueError(f"tenant: unknown tenant {tenant!r}")
        if not grants:
            raise ValueError("grants: at least one")
        for grant in grants:
            if grant.node not in self._tree:
                raise ValueError(f"grants: unknown node {grant.node!r}")
            if not owned.intersection(self._tree.chain(grant.node)):
                raise ValueError(f"grants: node {grant.node!r} is outside tenant {tenant!r}")

    # -- users -----------------------------------------------------------------------------------

    async def create_user(self, tenant: str, username: str, password: str, grants: Sequence[Grant]) -> int:
        """Create a user with grants; raise ValueError naming a bad field, KeyError if it exists."""
        self._check_grants(tenant, grants)
        hashed = await asyncio.to_thread(hash_password, password)  # argon2: tens of ms of CPU
        async with self._pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
            try:
                user_id = await conn.fetchval(
                    "INSERT INTO users (tenant_id, username, password_hash) VALUES ($1, $2, $3) RETURNING id",
                    tenant,
                    username,
                    hashed,
                    timeout=self._timeout_s,
                )
            except asyncpg.UniqueViolationError:
                raise KeyError(f"user {username!r} exists in tenant {tenant!r}") from None
            except asyncpg.CheckViolationError:
                raise ValueError("username: letters, digits and . _ @ - only, at most 100") from None
            await conn.executemany(
                "INSERT INTO grants (tenant_id, user_id, node_id, role) VALUES ($1, $2, $3, $4)",
                [(tenant, user_id, g.node, g.role.value) for g in grants],
                timeout=self._timeout_s,
            )
        return int(user_id)

    async def users(self, tenant: str) -> list[dict[str, object]]:
        """Return the users of a tenant with their grants."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT u.id, u.username, u.disabled, u.locked_until, u.created_at,
                          coalesce(json_agg(json_build_array(g.node_id, g.role))
                                       FILTER (WHERE g.id IS NOT NULL), '[]') AS grants
                   FROM users u LEFT JOIN grants g ON g.user_id = u.id
                   WHERE u.tenant_id = $1 GROUP BY u.id ORDER BY u.id""",
                tenant,
                timeout=self._timeout_s,
            )
        return [
            {
                "id": r["id"],
                "username": r["username"],
                "disabled": r["disabled"],
                "locked_until": r["locked_until"].astimezone(UTC).isoformat() if r["locked_until"] else None,
                "created_at": r["created_at"].astimezone(UTC).isoformat(),
                "grants": [{"node": n, "role": role} for n, role in json.loads(r["grants"])],
            }
            for r in rows
        ]

    async def login(self, tenant: str, username: str, password: str) -> tuple[Principal, int]:
        """Check a password; return the principal and user id. Raise AuthError or LockedOut."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            row = await conn.fetchrow(
                f"""SELECT u.id, u.password_hash, u.disabled, u.failed_logins, u.locked_until,
                           {_USER_GRANTS}
                    FROM users u WHERE u.tenant_id = $1 AND u.username = $2""",  # noqa: S608 -- constant
                tenant,
                username,
                timeout=self._timeout_s,
            )
            now = datetime.now(UTC)
            if row is None:
                await asyncio.to_thread(verify_password, _DUMMY_HASH, password)  # as long as a wrong one
                raise AuthError("wrong tenant, username or password")
            if row["locked_until"] is not None and row["locked_until"] > now:
                raise LockedOut((row["locked_until"] - now).total_seconds())
            if row["disabled"] or not await asyncio.to_thread(
                verify_password, row["password_hash"], password
            ):
                failed = row["failed_logins"] + 1
                locked = now + timedelta(seconds=LOCKOUT_S) if failed >= MAX_FAILED_LOGINS else None
                await conn.execute(
                    "UPDATE users SET failed_logins = $2, locked_until = $3 WHERE id = $1",
                    row["id"],
                    0 if locked else failed,
                    locked,
                    timeout=self._timeout_s,
                )
                if locked is not None:
                    raise LockedOut(LOCKOUT_S)
                raise AuthError("wrong tenant, username or password")
            if row["failed_logins"]:
                await conn.execute(
                    "UPDATE users SET failed_logins = 0, locked_until = NULL WHERE id = $1",
                    row["id"],
                    timeout=self._timeout_s,
                )
        return self._user_principal(tenant, username, row["grants"]), int(row["id"])

    def _user_principal(self, tenant: str, username: str, grants_json: str) -> Principal:
        return Principal(
            tenant=tenant,
            subject=username,
            kind=PrincipalKind.USER,
            grants=tuple(Grant(node, Role(role)) for node, role in json.loads(grants_json)),
            tenant_nodes=self.tenant_nodes(tenant),
        )

    async def issue_refresh(self, user_id: int) -> str:
        """Return a new refresh token for a user."""
        token = secrets.token_urlsafe(32)
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, user_id, expires_at) VALUES ($1, $2, $3)",
                hash_secret(token),
                user_id,
                datetime.now(UTC) + timedelta(seconds=REFRESH_TOKEN_TTL_S),
                timeout=self._timeout_s,
            )
        return token

    async def use_refresh(self, token: str) -> tuple[Principal, int]:
        """Spend a refresh token (once); return the user's current principal. Raise AuthError."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            row = await conn.fetchrow(
                f"""UPDATE refresh_tokens r SET used_at = now()
                    FROM users u
                    WHERE r.token_hash = $1 AND r.used_at IS NULL AND r.expires_at > now()
                      AND u.id = r.user_id AND NOT u.disabled
                    RETURNING u.id, u.tenant_id, u.username, {_USER_GRANTS}""",  # noqa: S608 -- constant
                hash_secret(token),
                timeout=self._timeout_s,
            )
        if row is None:
            raise AuthError("refresh token unknown, used or expired: log in again")
        return self._user_principal(row["tenant_id"], row["username"], row["grants"]), int(row["id"])

    async def revoke_refresh(self, token: str) -> None:
        """Spend a refresh token without using it (logout)."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            await conn.execute(
                "UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1 AND used_at IS NULL",
                hash_secret(token),
                timeout=self._timeout_s,
            )

    # -- API keys and kiosk tokens ---------------------------------------------------------------

    async def create_key(
        self, tenant: str, kind: str, name: str, grant: Grant, created_by: str
    ) -> tuple[int, str]:
        """Create an API key (``kind`` "key") or a kiosk token ("kiosk"); return (id, secret)."""
        if kind not in ("key", "kiosk"):
            raise ValueError(f"kind: key or kiosk, not {kind!r}")
        if not name.strip() or len(name) > 200:
            raise ValueError("name: 1 to 200 characters")
        if kind == "kiosk":
            grant = Grant(grant.node, Role.VIEWER)
        self._check_grants(tenant, [grant])
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            # The secret names its id, so take the id first; the key and its grant go in as one statement.
            key_id = int(
                await conn.fetchval(
                    "SELECT nextval(pg_get_serial_sequence('api_keys', 'id'))", timeout=self._timeout_s
                )
            )
            secret = make_secret(kind, key_id)
            await conn.execute(
                """WITH k AS (
                       INSERT INTO api_keys (id, tenant_id, kind, name, secret_hash, created_by)
                       OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, tenant_id)
                   INSERT INTO grants (tenant_id, key_id, node_id, role)
                   SELECT tenant_id, id, $7, $8 FROM k""",
                key_id,
                tenant,
                kind,
                name,
                hash_secret(secret),
                created_by,
                grant.node,
                grant.role.value,
                timeout=self._timeout_s,
            )
        return key_id, secret

    async def revoke_key(self, tenant: str, key_id: int) -> bool:
        """Revoke a key or kiosk token of a tenant; return False if there is none."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            status = await conn.execute(
                """UPDATE api_keys SET revoked_at = now()
                   WHERE id = $1 AND tenant_id = $2 AND revoked_at IS NULL""",
                key_id,
                tenant,
                timeout=self._timeout_s,
            )
        self._keys.pop(key_id, None)
        return bool(status.endswith(" 1"))

    async def keys(self, tenant: str) -> list[KeyRecord]:
        """Return a tenant's keys and kiosk tokens (never their secrets)."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT k.id, k.kind, k.name, k.created_by, k.created_at,
                          k.revoked_at IS NOT NULL AS revoked,
                          g.node_id, g.role
                   FROM api_keys k JOIN grants g ON g.key_id = k.id
                   WHERE k.tenant_id = $1 ORDER BY k.id""",
                tenant,
                timeout=self._timeout_s,
            )
        return [
            KeyRecord(
                r["id"],
                r["kind"],
                r["name"],
                r["created_by"],
                r["created_at"],
                r["revoked"],
                (Grant(r["node_id"], Role(r["role"])),),
            )
            for r in rows
        ]

    async def key_principal(self, secret: str) -> Principal:
        """Return the principal of an API key or kiosk token; raise AuthError."""
        parsed = parse_key(secret)
        if parsed is None:
            raise AuthError("malformed key")
        kind, key_id = parsed
        cached = self._keys.get(key_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < KEY_CACHE_S:
            if not same_secret(cached[1], secret):
                raise AuthError("unknown or revoked key")
            return cached[2]
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            row = await conn.fetchrow(
                """SELECT k.tenant_id, k.kind, k.name, k.secret_hash, g.node_id, g.role
                   FROM api_keys k JOIN grants g ON g.key_id = k.id
                   WHERE k.id = $1 AND k.revoked_at IS NULL""",
                key_id,
                timeout=self._timeout_s,
            )
        if row is None or row["kind"] != kind or not same_secret(bytes(row["secret_hash"]), secret):
            raise AuthError("unknown or revoked key")
        principal = Principal(
            tenant=row["tenant_id"],
            subject=f"{row['kind']}:{key_id}:{row['name']}",
            kind=PrincipalKind.KIOSK if kind == "kiosk" else PrincipalKind.API_KEY,
            grants=(Grant(row["node_id"], Role(row["role"])),),
            tenant_nodes=self.tenant_nodes(row["tenant_id"]),
        )
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[key_id] = (now, bytes(row["secret_hash"]), principal)
        return principal
