"""Credentials for servers built in tests (``tests/`` is on sys.path through its conftest)."""

from __future__ import annotations

from scada.config import SiteConfig
from scada.security import Grant, Principal, PrincipalKind, Role, TokenSigner

TEST_SECRET_KEY = "test-signing-key-" + "x" * 32
"""``Settings.secret_key`` of servers built in tests, so a test can mint an admin's access token."""


def admin_headers(site: SiteConfig, *, tenant: str | None = None) -> dict[str, str]:
    """Return an Authorization header of an admin of every root node of ``site``.

    Valid for a server whose ``Settings.secret_key`` is :data:`TEST_SECRET_KEY`; no login needed.
    """
    roots = [node.id for node in site.hierarchy]
    principal = Principal(
        tenant=tenant or site.site.id,
        subject="test-admin",
        kind=PrincipalKind.USER,
        grants=tuple(Grant(root, Role.ADMIN) for root in roots),
        tenant_nodes=frozenset(roots),
    )
    return {"Authorization": f"Bearer {TokenSigner(TEST_SECRET_KEY.encode()).issue(principal)}"}
