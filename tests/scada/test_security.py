"""Tenancy, authentication, role-based access and the tamper-evident audit log, over the real server.

Two tenants share one server: ``east`` owns group ``grp-e``, ``west`` owns group ``grp-w``. Every route
is tried with the other tenant's token against this tenant's ids: nothing may come back but 4xx.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from _auth_helpers import TEST_SECRET_KEY, two_tenant_site
from aiohttp import web
from aiohttp.test_utils import TestClient

from scada.app import Role as ProcessRole
from scada.app import create_app
from scada.config import parse_site
from scada.security import (
    AuthError,
    Grant,
    NodeTree,
    Principal,
    PrincipalKind,
    Role,
    TokenSigner,
    hash_password,
    parse_key,
    verify_password,
)
from scada.services import Endpoints
from scada.settings import Settings

SITE = two_tenant_site("Shared site")
EAST_ADMIN = {"tenant": "east", "username": "alice", "password": "east-secret-1"}
WEST_ADMIN = {"tenant": "west", "username": "bob", "password": "west-secret-1"}

# --------------------------------------------------------------------------------------------------
# Pure parts

TREE = NodeTree({"g": None, "p": "g", "e1": "p", "e2": "p", "w1": "e1", "other": None})


def test_roles_cover_descendants_within_the_tenant_only() -> None:
    operator = Principal("t", "u", PrincipalKind.USER, (Grant("e1", Role.OPERATOR),), frozenset({"g"}))
    assert operator.can(Role.OPERATOR, "w1", TREE)
    assert not operator.can(Role.ENGINEER, "w1", TREE)
    assert not operator.sees("e2", TREE)  # a sibling
    assert not operator.sees("p", TREE)  # above the grant
    assert operator.visible(TREE) == {"e1", "w1"}
    outside = Principal("t", "u", PrincipalKind.USER, (Grant("other", Role.ADMIN),), frozenset({"g"}))
    assert not outside.sees("other", TREE)  # a grant outside the tenant's nodes counts for nothing
    kiosk = Principal("t", "k", PrincipalKind.KIOSK, (Grant("g", Role.ADMIN),), frozenset({"g"}))
    assert kiosk.role_on("w1", TREE) is Role.VIEWER


def test_tokens_are_signed_and_expire() -> None:
    signer = TokenSigner(b"k" * 32, ttl_s=60)
    principal = Principal("t", "u", PrincipalKind.USER, (Grant("g", Role.VIEWER),), frozenset({"g"}))
    token = signer.issue(principal)
    assert signer.check(token) == principal
    with pytest.raises(AuthError, match="invalid access token"):
        TokenSigner(b"x" * 32).check(token)  # another key
    header, payload, signature = token.split(".")
    with pytest.raises(AuthError):
        signer.check(f"{header}.{payload}x.{signature}")
    with pytest.raises(AuthError, match="expired"):
        signer.check(signer.issue(principal, now=0))


def test_passwords_and_keys() -> None:
    hashed = hash_password("correct horse")
    assert hashed.startswith("$argon2id$")
    assert verify_password(hashed, "correct horse")
    assert not verify_password(hashed, "wrong horse")
    with pytest.raises(ValueError, match="at least 8"):
        hash_password("short")
    assert parse_key("ck_key_12_" + "a" * 43) == ("key", 12)
    assert parse_key("Bearer nonsense") is None


# --------------------------------------------------------------------------------------------------
# The server


@pytest.fixture
async def server(
    pg_url: str,
    redis_url: str,
    mqtt_url: str,
    stream_prefix: str,
    aiohttp_client: Callable[[web.Application], Any],
) -> TestClient[web.Request, web.Application]:
    site = parse_site(SITE)
    settings = Settings(
        stream_prefix=stream_prefix,
        secret_key=TEST_SECRET_KEY,
        bootstrap_admin="east:{username}:{password}".format(**EAST_ADMIN),
    )
    endpoints = Endpoints(db_url=pg_url, redis_url=redis_url, mqtt_url=mqtt_url, origins={})
    app = create_app(site, settings, endpoints, roles=frozenset({ProcessRole.API}))
    client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
    from scada.api.auth import AUTH  # noqa: PLC0415 - the app's own auth context

    store = client.server.app[AUTH].store
    await store.create_user("west", "bob", WEST_ADMIN["password"], [Grant("grp-w", Role.ADMIN)])
    return client


async def login(client: TestClient[web.Request, web.Application], who: dict[str, str]) -> dict[str, str]:
    response = await client.post("/api/v1/auth/login", json=who)
    assert response.status == 200, await response.text()
    body = await response.json()
    return {"Authorization": f"Bearer {body['access_token']}", "refresh": body["refresh_token"]}


def bearer(headers: dict[str, str]) -> dict[str, str]:
    return {"Authorization": headers["Authorization"]}


async def test_no_credentials_no_data(server: TestClient[web.Request, web.Application]) -> None:
    response = await server.get("/api/v1/devices")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.content_type == "application/problem+json"
    assert (await server.get("/api/v1/health")).status == 200  # liveness stays public
    bad = await server.get("/api/v1/devices", headers={"Authorization": "Bearer not-a-token"})
    assert bad.status == 401


async def test_login_refresh_logout_and_lockout(server: TestClient[web.Request, web.Application]) -> None:
    tokens = await login(server, EAST_ADMIN)
    me = await (await server.get("/api/v1/auth/me", headers=bearer(tokens))).json()
    assert me == {
        "tenant": "east",
        "subject": "alice",
        "kind": "user",
        "grants": [{"node": "grp-e", "role": "admin"}],
    }
    refreshed = await server.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh"]})
    assert refreshed.status == 200
    again = await server.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh"]})
    assert again.status == 401  # a refresh token is spent once
    new_refresh = (await refreshed.json())["refresh_token"]
    assert (await server.post("/api/v1/auth/logout", json={"refresh_token": new_refresh})).status == 204
    assert (await server.post("/api/v1/auth/refresh", json={"refresh_token": new_refresh})).status == 401
    wrong = {**WEST_ADMIN, "password": "not-it-at-all"}
    statuses = [(await server.post("/api/v1/auth/login", json=wrong)).status for _ in range(6)]
    assert statuses[:4] == [401] * 4
    assert statuses[4:] == [429, 429]  # locked after 5 failures in a row
    locked = await server.post("/api/v1/auth/login", json=WEST_ADMIN)
    assert locked.status == 429  # even with the right password, until the lock expires
    assert int(locked.headers["Retry-After"]) > 0
    unknown_tenant = await server.post("/api/v1/auth/login", json={**EAST_ADMIN, "tenant": "nobody"})
    assert unknown_tenant.status == 401


async def test_roles_keys_and_kiosk_tokens(server: TestClient[web.Request, web.Application]) -> None:
    admin = bearer(await login(server, EAST_ADMIN))
    created = await server.post(
        "/api/v1/users",
        json={
            "username": "carol",
            "password": "viewer-secret",
            "grants": [{"node": "ent-e", "role": "viewer"}],
        },
        headers=admin,
    )
    assert created.status == 201
    outside = await server.post(
        "/api/v1/users",
        json={
            "username": "mallory",
            "password": "x-secret-123",
            "grants": [{"node": "grp-w", "role": "admin"}],
        },
        headers=admin,
    )
    assert outside.status == 400  # an admin cannot grant on another tenant's node
    viewer = bearer(await login(server, {"tenant": "east", "username": "carol", "password": "viewer-secret"}))
    assert (await server.get("/api/v1/points/m-e1.p_kw", headers=viewer)).status == 200
    put = await server.put("/api/v1/quotas/ent-e/2026-12", json={"quota_t": 10}, headers=viewer)
    assert put.status == 403
    key = await server.post(
        "/api/v1/api-keys", json={"name": "bi", "node": "ws-e1", "role": "viewer"}, headers=admin
    )
    assert key.status == 201
    key_body = await key.json()
    by_key = {"X-API-Key": key_body["key"]}
    devices = await (await server.get("/api/v1/devices", headers=by_key)).json()
    assert [d["id"] for d in devices["items"]] == ["m-e1"]  # only the workshop it was granted
    assert (await server.get("/api/v1/points/m-e2.p_kw", headers=by_key)).status == 404
    listed = await (await server.get("/api/v1/api-keys", headers=admin)).json()
    assert "key" not in json.dumps(listed["keys"][0]).replace('"kind": "key"', "")  # never the secret
    assert (await server.delete(f"/api/v1/api-keys/{key_body['id']}", headers=admin)).status == 204
    assert (await server.get("/api/v1/devices", headers=by_key)).status == 401  # revoked at once here
    kiosk = await server.post("/api/v1/kiosk-tokens", json={"name": "lobby", "node": "grp-e"}, headers=admin)
    screen = {"Authorization": f"Bearer {(await kiosk.json())['token']}"}
    assert (await server.get("/api/v1/site", headers=screen)).status == 200
    ack = await server.post("/api/v1/alarms/m-e1:offline/acknowledge", json={"by": "x"}, headers=screen)
    assert ack.status == 403  # a kiosk only reads


def _routes(app: web.Application) -> list[tuple[str, str]]:
    out = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD":
            continue
        out.append((route.method, resource.canonical))
    return sorted(set(out))


EAST_IDS = {
    "{point_id}": "m-e1.p_kw",
    "{node_id}": "ent-e",
    "{month}": "2026-12",
    "{alarm_id}": "m-e1:offline",
    "{factor_id}": "cn-grid-national-average-2022",
    "{key_id}": "1",
}
EAST_QUERY = {"node": "ent-e", "console": "ent-e", "device": "m-e1"}


async def test_every_route_refuses_another_tenants_ids(
    server: TestClient[web.Request, web.Application],
) -> None:
    east = bearer(await login(server, EAST_ADMIN))
    # West's admin makes the same calls against East's ids: nothing of East may come back.
    west = bearer(await login(server, WEST_ADMIN))
    key = await server.post(
        "/api/v1/api-keys", json={"name": "k", "node": "ent-e", "role": "viewer"}, headers=east
    )
    east_key_id = str((await key.json())["id"])
    await server.put("/api/v1/quotas/ent-e/2026-12", json={"quota_t": 123.0}, headers=east)
    east_markers = ("m-e1", "m-e2", "ent-e", "ws-e1", "grp-e", "alice", "park-e")
    public = {
        ("GET", "/api/v1/health"),
        ("POST", "/api/v1/auth/login"),
        ("POST", "/api/v1/auth/refresh"),
        ("POST", "/api/v1/auth/logout"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/docs"),
    }
    tried = 0
    for method, path in _routes(server.server.app):
        if (method, path) in public or path == "/api/v1/ws":
            continue
        url = path
        for name, value in {**EAST_IDS, "{key_id}": east_key_id}.items():
            url = url.replace(name, value)
        body: Any = {
            "by": "bob",
            "reason": "r",
            "duration_s": 60,
            "quota_t": 1,
            "name": "n",
            "node": "ent-e",
            "role": "viewer",
            "username": "u2",
            "password": "pppppppp",
            "grants": [{"node": "ent-e", "role": "viewer"}],
        }
        response = await server.request(
            method, url, params=EAST_QUERY, json=body if method in ("POST", "PUT") else None, headers=west
        )
        text = await response.text()
        tried += 1
        assert response.status >= 400 or not any(m in text for m in east_markers), (
            method,
            url,
            response.status,
            text,
        )
        assert response.status < 500, (method, url, text)
    assert tried >= 25
    # The quota is untouched and East's key still works.
    quota = await (await server.get("/api/v1/quotas/ent-e/2026-12", headers=east)).json()
    assert quota["quota_t"] == 123.0
    # The websocket: West cannot subscribe to East's points.
    ws = await server.ws_connect(f"/api/v1/ws?token={west['Authorization'].split()[1]}")
    await ws.send_json({"type": "subscribe", "points": ["m-e1.p_kw", "m-w.p_kw"]})
    reply = await ws.receive_json(timeout=5)
    assert reply == {"type": "subscribed", "points": ["m-w.p_kw"], "unknown": ["m-e1.p_kw"]}
    await ws.close()
    anonymous = await server.get("/api/v1/ws")
    assert anonymous.status == 401


async def test_audit_chain_detects_edits_and_deletions(
    server: TestClient[web.Request, web.Application], pg_url: str
) -> None:
    east = bearer(await login(server, EAST_ADMIN))
    for quota in (10.0, 20.0, 30.0):
        await server.put("/api/v1/quotas/ent-e/2026-12", json={"quota_t": quota}, headers=east)
    verified = await (await server.get("/api/v1/audit/verify", headers=east)).json()
    assert verified["ok"], verified
    entries = await (await server.get("/api/v1/audit", params={"limit": "3"}, headers=east)).json()
    assert [e["action"] for e in entries["entries"]][:2] == ["user.bootstrap", "login"]
    assert entries["next_cursor"] == str(entries["entries"][-1]["seq"])
    csv = await server.get("/api/v1/audit", params={"format": "csv"}, headers=east)
    assert (await csv.text()).startswith("seq,at,tenant,actor,action,target,detail,prev_hash,hash")
    conn = await asyncpg.connect(pg_url)
    try:
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("UPDATE audit_log SET actor = 'eve' WHERE seq = 2")
        # A superuser who disables the guard can change rows, but the chain shows it.
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change")
        await conn.execute(
            """UPDATE audit_log SET detail = '{"quota_t": 1}' WHERE action = 'quota.put' AND seq = (SELECT max(seq) FROM audit_log WHERE action = 'quota.put')"""
        )
        edited = await _cli_verify(pg_url)
        assert edited[0] == 1
        assert re.search(r"entry \d+: content changed", edited[1])
        await conn.execute("DELETE FROM audit_log WHERE seq = 3")
        report = await (await server.get("/api/v1/audit/verify", headers=east)).json()
        assert not report["ok"]
        assert any("missing (deleted)" in p for p in report["problems"])
        head = await conn.fetchval("SELECT max(seq) FROM audit_log")
        await conn.execute("DELETE FROM audit_log WHERE seq = $1", head)  # cut the tail
        cut = await (await server.get("/api/v1/audit/verify", headers=east)).json()
        assert any("newest entries were removed" in p for p in cut["problems"])
    finally:
        await conn.close()


async def _cli_verify(pg_url: str) -> tuple[int, str]:
    env = {**os.environ, "SCADA_DB_URL": pg_url}
    scada = os.path.join(os.path.dirname(sys.executable), "scada")
    proc = await asyncio.to_thread(
        subprocess.run,
        [scada, "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_every_route_has_an_access_policy() -> None:
    from scada.api.auth import POLICIES  # noqa: PLC0415 - the table under test

    app = create_app(
        parse_site(SITE),
        Settings(secret_key=TEST_SECRET_KEY),
        Endpoints(db_url="", redis_url="", mqtt_url="", origins={}),
    )
    missing = [route for route in _routes(app) if route not in POLICIES]
    assert missing == []
