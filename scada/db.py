"""PostgreSQL access for the server: the connection pool and the schema migration runner.

This is composition-root code: feature packages (``streams``) receive a pool and never import this
module, so the schema's life cycle stays in one place.

Migrations
----------
Versioned files in ``scada/migrations`` named ``NNN_name.sql`` are applied in version order, each in
its own transaction, and recorded in ``schema_migrations``. A migration that differs between
storage engines ships two variants instead, ``NNN_name.timescale.sql`` and ``NNN_name.plain.sql``;
the runner picks TimescaleDB when the server offers the extension (and creates it), plain
PostgreSQL otherwise, and sticks to the engine of the first variant it applied. An applied file
whose checksum changed stops the start-up: editing history silently would leave databases that
claim the same version but differ. A session-level advisory lock serialises processes that start
at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from scada.model import ServiceError

__all__ = [
    "MIGRATION_LOCK_KEY",
    "Engine",
    "Migration",
    "MigrationChecksumError",
    "MigrationError",
    "MigrationReport",
    "create_pool",
    "load_migrations",
    "migrate",
]

_LOGGER = logging.getLogger(__name__)

MIGRATION_LOCK_KEY: Final = 0x5CADA_0001
"""Advisory lock key held while migrating (any bigint unique to this purpose)."""

_FILE_RE: Final = re.compile(
    r"^(?P<version>\d{3})_(?P<name>[a-z0-9_]+)(?:\.(?P<variant>plain|timescale))?\.sql$"
)
_COMMON: Final = "common"

_CREATE_LEDGER: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    variant    text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class MigrationError(ServiceError):
    """The database schema cannot be brought to this code's version."""


class MigrationChecksumError(MigrationError):
    """A migration already applied to the database was edited afterwards."""


class Engine(StrEnum):
    """Storage engine of the readings table."""

    PLAIN = "plain"
    TIMESCALE = "timescale"


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """One migration version: its name and the SQL of each variant (``common`` or per engine)."""

    version: int
    name: str
    sql_by_variant: dict[str, str]

    def variant_for(self, engine: Engine) -> str:
        """Return the variant to apply on ``engine``."""
        return _COMMON if _COMMON in self.sql_by_variant else engine.value

    def checksum(self, variant: str) -> str:
        """Return the SHA-256 of a variant's text, with line endings normalised (git autocrlf)."""
        text = self.sql_by_variant[variant].replace("\r\n", "\n")
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def label(self) -> str:
        """Return ``NNN_name`` as operators see it."""
        return f"{self.version:03d}_{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationReport:
    """What :func:`migrate` did: labels applied now, labels found applied, and the engine."""

    applied: tuple[str, ...]
    already_applied: tuple[str, ...]
    engine: Engine


def load_migrations(source: Traversable | Path | None = None) -> list[Migration]:
    """Read and check the migration files (blocking: call through ``asyncio.to_thread``).

    Raise :class:`MigrationError` for a stray file name, a duplicate version, or a variant without
    its partner.
    """
    # Next to this file rather than importlib.resources.files("scada"): under pytest, tests/scada/
    # (no __init__.py) can shadow the package as a namespace package and hide its data files.
    folder = source if source is not None else Path(__file__).resolve().with_name("migrations")
    found: dict[int, tuple[str, dict[str, str]]] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_RE.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r}: expected NNN_name[.plain|.timescale].sql")
        version, name = int(match["version"]), match["name"]
        variant = match["variant"] or _COMMON
        known_name, variants = found.setdefault(version, (name, {}))
        if known_name != name or variant in variants:
            raise MigrationError(f"migration version {version:03d} is defined twice ({entry.name!r})")
        variants[variant] = entry.read_text(encoding="utf-8")
    migrations = []
    for version, (name, variants) in sorted(found.items()):
        if set(variants) not in ({_COMMON}, {Engine.PLAIN.value, Engine.TIMESCALE.value}):
            raise MigrationError(
                f"migration {version:03d}_{name}: ship either one .sql file or both .plain.sql and "
                f".timescale.sql, found {sorted(variants)}"
            )
        migrations.append(Migration(version=version, name=name, sql_by_variant=variants))
    return migrations


async def migrate(
    conn: asyncpg.Connection,
    *,
    source: Traversable | Path | None = None,
    timescale: bool | None = None,
    lock_timeout_s: float = 60.0,
    statement_timeout_s: float = 600.0,
) -> MigrationReport:
    """Bring the schema up to date; safe to call from several processes at once.

    Parameters
    ----------
    conn
        A connection to the target database (its session holds the advisory lock meanwhile).
    source
        Folder of migration files; the packaged ``scada/migrations`` by default.
    timescale
        Force the engine for a fresh database; None detects TimescaleDB from
        ``pg_available_extensions``. A database that already has a variant keeps its engine.
    lock_timeout_s
        How long to wait for another process's migration before giving up.
    statement_timeout_s
        Timeout of each migration file (they may build indexes on big tables).
    """
    migrations = await asyncio.to_thread(load_migrations, source)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY, timeout=lock_timeout_s)
    except TimeoutError as err:
        raise MigrationError(
            f"another process held the migration lock for more than {lock_timeout_s} s"
        ) from err
    try:
        return await _migrate_locked(conn, migrations, timescale, statement_timeout_s)
    finally:
        # The lock also dies with the session, so a broken connection here loses nothing.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY, timeout=lock_timeout_s)


async def _migrate_locked(
    conn: asyncpg.Connection,
    migrations: list[Migration],
    timescale: bool | None,
    statement_timeout_s: float,
) -> MigrationReport:
    await conn.execute(_CREATE_LEDGER, timeout=statement_timeout_s)
    rows = await conn.fetch("SELECT version, name, variant, checksum FROM schema_migrations ORDER BY version")
    applied_rows: dict[int, Any] = {row["version"]: row for row in rows}
    by_version = {m.version: m for m in migrations}
    unknown = sorted(set(applied_rows) - set(by_version))
    if unknown:
        raise MigrationError(
            f"database has migrations {unknown} that this code does not know: it is newer than this "
            "release; upgrade the server instead"
        )
    engine = await _choose_engine(conn, applied_rows, timescale)
    applied: list[str] = []
    already: list[str] = []
    for migration in migrations:
        row = applied_rows.get(migration.version)
        if row is not None:
            _verify(migration, row)
            already.append(migration.label)
            continue
        variant = migration.variant_for(engine)
        if variant == Engine.TIMESCALE.value:
            await _create_timescale_extension(conn, statement_timeout_s)
        async with conn.transaction():
            await conn.execute(migration.sql_by_variant[variant], timeout=statement_timeout_s)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, variant, checksum) VALUES ($1, $2, $3, $4)",
                migration.version,
                migration.name,
                variant,
                migration.checksum(variant),
            )
        _LOGGER.info("applied migration %s (%s)", migration.label, variant)
        applied.append(migration.label)
    return MigrationReport(applied=tuple(applied), already_applied=tuple(already), engine=engine)


def _verify(migration: Migration, row: Any) -> None:
    variant = row["variant"]
    if row["name"] != migration.name or variant not in migration.sql_by_variant:
        raise MigrationError(
            f"migration {migration.version:03d} was applied as {row['name']!r} ({variant}) but this "
            f"code ships {migration.label!r} with variants {sorted(migration.sql_by_variant)}"
        )
    if migration.checksum(variant) != row["checksum"]:
        raise MigrationChecksumError(
            f"migration {migration.label} ({variant}) was edited after it was applied; add a new "
            "migration instead of changing an applied one"
        )


async def _choose_engine(
    conn: asyncpg.Connection, applied_rows: dict[int, Any], timescale: bool | None
) -> Engine:
    engines = {row["variant"] for row in applied_rows.values()} - {_COMMON}
    if engines:
        # The first variant chosen decides the layout of this database for good.
        return Engine(engines.pop())
    if timescale is None:
        found = await conn.fetchval("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
        timescale = found == 1
    return Engine.TIMESCALE if timescale else Engine.PLAIN


async def _create_timescale_extension(conn: asyncpg.Connection, timeout_s: float) -> None:
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb", timeout=timeout_s)
    except asyncpg.PostgresError as err:
        raise MigrationError(
            f"TimescaleDB is available but cannot be created ({err}); add it to "
            "shared_preload_libraries, or migrate with timescale=False for plain partitions"
        ) from err


async def create_pool(
    url: str,
    *,
    timeout_s: float,
    min_size: int = 1,
    max_size: int = 10,
    application_name: str = "carbonos-scada",
) -> asyncpg.Pool:
    """Open a connection pool whose every command times out after ``timeout_s`` seconds.

    Raise :class:`ServiceError` (with the password removed from the URL) if PostgreSQL cannot be
    reached in time.
    """
    try:
        async with asyncio.timeout(timeout_s * 2):  # connect + the pool's initial connections
            return await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout_s,
                command_timeout=timeout_s,
                server_settings={"application_name": application_name},
            )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
        raise ServiceError(f"PostgreSQL at {_redact(url)} is unreachable: {err}") from err


def _redact(url: str) -> str:
    """Drop the password from a URL before it goes into an error message or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
