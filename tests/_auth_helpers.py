"""Credentials and tenancy for servers built in tests (``tests/`` is on sys.path through its conftest)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from scada.app import Role as ServerRole
from scada.app import create_app
from scada.config import SiteConfig, parse_site
from scada.security import Grant, Principal, PrincipalKind, Role, TokenSigner
from scada.services import Endpoints
from scada.settings import Settings

TEST_SECRET_KEY = "test-signing-key-" + "x" * 32
"""``Settings.secret_key`` of servers built in tests, so a test can mint an admin's access token."""


def access_token(principal: Principal) -> str:
    """Return an access token of ``principal`` for a server whose secret key is :data:`TEST_SECRET_KEY`."""
    return TokenSigner(TEST_SECRET_KEY.encode()).issue(principal)


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
    return {"Authorization": f"Bearer {access_token(principal)}"}


async def start_api_server(
    site_yaml: str,
    aiohttp_server: Callable[[web.Application], Any],
    *,
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    bootstrap_admin: str = "fuzz:admin:fuzz-password",
) -> tuple[TestServer, dict[str, str]]:
    """Start the API role of ``site_yaml`` on a real port; return it and an admin's headers."""
    site = parse_site(site_yaml)
    settings = Settings(
        stream_prefix=stream_prefix, secret_key=TEST_SECRET_KEY, bootstrap_admin=bootstrap_admin
    )
    endpoints = Endpoints(db_url=pg_url, redis_url=redis_url, mqtt_url=mqtt_url, origins={})
    server: TestServer = await aiohttp_server(
        create_app(site, settings, endpoints, roles=frozenset({ServerRole.API}))
    )
    return server, admin_headers(site)


def two_tenant_site(name: str, *, extra_points: Sequence[str] = ()) -> str:
    """Return the YAML of a site shared by two tenants, with one power meter per workshop.

    ``east`` owns group ``grp-e`` (workshops ``ws-e1``, ``ws-e2``; meters ``m-e1``, ``m-e2``) and
    ``west`` owns ``grp-w`` (workshop ``ws-w``; meter ``m-w``). Every meter has the point ``p_kw``,
    plus ``extra_points`` (YAML flow mappings of the ``meter`` template).
    """
    points = "".join(
        f"\n      - {point}"
        for point in (
            "{key: p_kw, kind: power, unit: kW, carrier: electricity, modbus: {address: 0, type: float32}}",
            *extra_points,
        )
    )
    meter = "kind: power_meter, protocol: modbus_tcp, template: meter, modbus: {host: 127.0.0.1, port: 9}"
    return f"""
site: {{id: s, name: {name}}}
hierarchy:
  - id: grp-e
    name: East
    level: group
    children:
      - id: park-e
        name: Park E
        level: park
        children:
          - id: ent-e
            name: Ent E
            level: enterprise
            children: [{{id: ws-e1, name: WS E1, level: workshop}}, {{id: ws-e2, name: WS E2, level: workshop}}]
  - id: grp-w
    name: West
    level: group
    children:
      - id: park-w
        name: Park W
        level: park
        children:
          - id: ent-w
            name: Ent W
            level: enterprise
            children: [{{id: ws-w, name: WS W, level: workshop}}]
tenants:
  - {{id: east, name: East Co, nodes: [grp-e]}}
  - {{id: west, name: West Co, nodes: [grp-w]}}
templates:
  meter:
    points:{points}
devices:
  - {{id: m-e1, node: ws-e1, {meter}}}
  - {{id: m-e2, node: ws-e2, {meter}}}
  - {{id: m-w, node: ws-w, {meter}}}
"""
