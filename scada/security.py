"""Who is calling and what they may do: roles, principals, passwords, tokens and keys.

- **Roles** are granted on a hierarchy node and cover its descendants: ``viewer`` reads,
  ``operator`` also acknowledges alarms and approves dispatches, ``engineer`` also changes
  configuration (quotas) and sends manual commands, ``admin`` also manages users, keys and kiosk
  tokens and reads the audit log. A grant never reaches outside its tenant's nodes.
- **Principals** are what a request runs as: a user (password login, then a short-lived signed
  access token), an API key (integrations) or a kiosk token (a read-only big screen).
- **Passwords** are hashed with argon2id; **access tokens** are HS256-signed (PyJWT) with the grants
  inside, valid :data:`ACCESS_TOKEN_TTL_S`; **refresh tokens**, **API keys** and **kiosk tokens** are
  random 256-bit secrets of which only a SHA-256 is stored.

Everything here is pure (no I/O): :mod:`scada.auth_store` keeps the records, :mod:`scada.api.auth`
authenticates requests.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = [
    "ACCESS_TOKEN_TTL_S",
    "REFRESH_TOKEN_TTL_S",
    "AuthError",
    "Grant",
    "NodeTree",
    "Principal",
    "PrincipalKind",
    "Role",
    "TokenSigner",
    "hash_password",
    "hash_secret",
    "make_secret",
    "parse_key",
    "verify_password",
]

ACCESS_TOKEN_TTL_S: Final = 900
REFRESH_TOKEN_TTL_S: Final = 7 * 86_400
_KEY_PREFIX: Final = "ck"
_VERIFIED_CACHE: Final = 50_000
"""Verified access tokens remembered per process (each ~1 KB)."""
_VISIBLE_CACHE: Final = 10_000
"""Distinct grant sets whose visible nodes a :class:`NodeTree` remembers."""
_HASHER = PasswordHasher()  # argon2id, RFC 9106 low-memory profile defaults of argon2-cffi


class AuthError(Exception):
    """Credentials missing, malformed, expired or wrong (the API answers 401)."""


class Role(enum.StrEnum):
    """What a grant allows, each role including the ones below it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ENGINEER = "engineer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Return 0 (viewer) to 3 (admin)."""
        return _RANK[self]


_RANK: Final = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ENGINEER: 2, Role.ADMIN: 3}


class PrincipalKind(enum.StrEnum):
    """How a caller authenticated."""

    USER = "user"
    API_KEY = "api_key"
    KIOSK = "kiosk"


@dataclass(frozen=True, slots=True)
class Grant:
    """A role on a node and its descendants."""

    node: str
    role: Role


class NodeTree:
    """Parents of the hierarchy's nodes, for "is this node under that one" checks."""

    def __init__(self, parents: Mapping[str, str | None]) -> None:
        self._parents = dict(parents)
        self._roots = tuple(node for node, parent in self._parents.items() if parent is None)
        self._chains: dict[str, tuple[str, ...]] = {}
        self._descendants: dict[str, frozenset[str]] = {}
        self._visible: dict[tuple[tuple[Grant, ...], frozenset[str]], frozenset[str]] = {}

    def __contains__(self, node: object) -> bool:
        return node in self._parents

    def chain(self, node: str) -> tuple[str, ...]:
        """Return the node and its ancestors up to the root (empty for an unknown node)."""
        cached = self._chains.get(node)
        if cached is None:
            out: list[str] = []
            current: str | None = node if node in self._parents else None
            while current is not None and current not in out:
                out.append(current)
                current = self._parents.get(current)
            cached = self._chains[node] = tuple(out)
        return cached

    def roots(self) -> tuple[str, ...]:
        """Return the nodes without a parent."""
        return self._roots

    def descendants(self, node: str) -> frozenset[str]:
        """Return the node and everything below it (computed once per node)."""
        cached = self._descendants.get(node)
        if cached is None:
            cached = self._descendants[node] = frozenset(n for n in self._parents if node in self.chain(n))
        return cached

    def visible(self, grants: tuple[Grant, ...], tenant_nodes: frozenset[str]) -> frozenset[str]:
        """Return the nodes these grants reach inside the tenant's subtrees (computed once per grant set).

        Every request of a caller asks this, so the answer is kept per distinct (grants, tenant
        subtrees): there are as many as users, keys and kiosk tokens, not requests.
        """
        key = (grants, tenant_nodes)
        cached = self._visible.get(key)
        if cached is None:
            if len(self._visible) >= _VISIBLE_CACHE:
                self._visible.clear()
            reached = [
                self.descendants(g.node)
                for g in grants
                if g.node in self._parents and tenant_nodes.intersection(self.chain(g.node))
            ]
            cached = self._visible[key] = frozenset().union(*reached)
        return cached


@dataclass(frozen=True, slots=True)
class Principal:
    """A caller: its tenant, who it is, how it authenticated, and its grants."""

    tenant: str
    subject: str
    kind: PrincipalKind
    grants: tuple[Grant, ...]
    tenant_nodes: frozenset[str] = field(default_factory=frozenset)
    """The subtrees the tenant owns; grants outside them count for nothing."""

    def role_on(self, node: str, tree: NodeTree) -> Role | None:
        """Return the strongest role this caller holds on ``node``, or None."""
        chain = tree.chain(node)
        if not chain or not self.tenant_nodes.intersection(chain):
            return None
        best: Role | None = None
        for grant in self.grants:
            if grant.node in chain and (best is None or grant.role.rank > best.rank):
                best = grant.role
        if best is not None and self.kind is PrincipalKind.KIOSK:
            return Role.VIEWER
        return best

    def can(self, role: Role, node: str, tree: NodeTree) -> bool:
        """Return True if this caller holds ``role`` (or stronger) on ``node``."""
        held = self.role_on(node, tree)
        return held is not None and held.rank >= role.rank

    def sees(self, node: str, tree: NodeTree) -> bool:
        """Return True if this caller may read ``node``."""
        return self.role_on(node, tree) is not None

    def visible(self, tree: NodeTree) -> frozenset[str]:
        """Return every node this caller may read."""
        return tree.visible(self.grants, self.tenant_nodes)

    def top_nodes(self, tree: NodeTree) -> list[str]:
        """Return the highest visible nodes (the roots of what the caller sees), in grant order."""
        visible = self.visible(tree)
        return [g.node for g in self.grants if g.node in visible and not _covered(g.node, visible, tree)]

    def is_system(self, tree: NodeTree) -> bool:
        """Return True for an admin of every root: it may see the site-wide views (dead letters, metrics)."""
        roots = tree.roots()
        return bool(roots) and all(self.can(Role.ADMIN, root, tree) for root in roots)


def _covered(node: str, visible: frozenset[str], tree: NodeTree) -> bool:
    return any(ancestor in visible for ancestor in tree.chain(node)[1:])


# --------------------------------------------------------------------------------------------------
# Passwords and secrets


def hash_password(password: str) -> str:
    """Return the argon2id hash (PHC string) of a password."""
    if not password or len(password) < 8:
        raise ValueError("password: at least 8 characters")
    return _HASHER.hash(password)


def verify_password(stored: str, password: str) -> bool:
    """Return True if ``password`` matches the stored argon2id hash (constant time)."""
    try:
        return _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def make_secret(kind: str, record_id: int) -> str:
    """Return a new key or token ``ck_<kind>_<id>_<secret>`` (the secret is 256-bit random)."""
    return f"{_KEY_PREFIX}_{kind}_{record_id}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> bytes:
    """Return the SHA-256 of a secret, as stored."""
    return hashlib.sha256(secret.encode()).digest()


def parse_key(value: str) -> tuple[str, int] | None:
    """Return (kind, id) of a ``ck_<kind>_<id>_<secret>`` key or token, or None if it is not one."""
    parts = value.split("_", 3)
    if len(parts) != 4 or parts[0] != _KEY_PREFIX or not parts[2].isdigit() or len(parts[3]) < 20:
        return None
    return parts[1], int(parts[2])


def same_secret(stored_hash: bytes, secret: str) -> bool:
    """Compare a presented secret with its stored hash in constant time."""
    return hmac.compare_digest(stored_hash, hash_secret(secret))


# --------------------------------------------------------------------------------------------------
# Access tokens


class TokenSigner:
    """Sign and check access tokens (HS256) carrying the caller's grants."""

    def __init__(
        self, key: bytes, *, ttl_s: int = ACCESS_TOKEN_TTL_S, issuer: str = "carbonos-scada"
    ) -> None:
        if len(key) < 32:
            raise ValueError("the token signing key must be at least 32 bytes")
        self._key = key
        self._ttl_s = ttl_s
        self._issuer = issuer
        self._verified: dict[str, tuple[Principal, float]] = {}

    @property
    def ttl_s(self) -> int:
        """Return how long an access token lives, in seconds."""
        return self._ttl_s

    def issue(self, principal: Principal, *, now: float | None = None) -> str:
        """Return a signed access token for ``principal``."""
        issued = int(now if now is not None else time.time())
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": principal.subject,
            "ten": principal.tenant,
            "knd": principal.kind.value,
            "grt": [[g.node, g.role.value] for g in principal.grants],
            "tnd": sorted(principal.tenant_nodes),
            "iat": issued,
            "exp": issued + self._ttl_s,
            "jti": secrets.token_hex(8),
        }
        return jwt.encode(claims, self._key, algorithm="HS256")

    def check(self, token: str) -> Principal:
        """Return the principal of a valid token; raise :class:`AuthError` otherwise.

        A verified token is remembered until it expires (a bounded cache), so the signature is
        checked once per token rather than once per request.
        """
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires:
                return principal
            del self._verified[token]
            raise AuthError("access token expired: refresh it")
        principal, expires = self._decode(token)
        if len(self._verified) >= _VERIFIED_CACHE:
            self._verified.clear()
        self._verified[token] = (principal, expires)
        return principal

    def _decode(self, token: str) -> tuple[Principal, float]:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                issuer=self._issuer,
                options={"require": ["exp", "iat", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("access token expired: refresh it") from None
        except jwt.PyJWTError as err:
            raise AuthError(f"invalid access token: {err}") from None
        try:
            principal = Principal(
                tenant=str(claims["ten"]),
                subject=str(claims["sub"]),
                kind=PrincipalKind(claims["knd"]),
                grants=tuple(Grant(str(node), Role(role)) for node, role in claims["grt"]),
                tenant_nodes=frozenset(str(n) for n in claims["tnd"]),
            )
            return principal, float(claims["exp"])
        except (KeyError, ValueError, TypeError) as err:
            raise AuthError(f"invalid access token claims: {err}") from None
