"""Migrations and the pool against the real local PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

import scada.db
from scada.db import (
    MIGRATION_LOCK_KEY,
    Engine,
    MigrationChecksumError,
    MigrationError,
    create_pool,
    load_migrations,
    migrate,
)
from scada.model import ServiceError

MIGRATIONS = Path(scada.db.__file__).with_name("migrations")
ALL = tuple(m.label for m in load_migrations())  # every shipped migration, in order


@pytest.fixture
async def conn(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_url, timeout=5)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A copy of the shipped migrations that a test may edit."""
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder)
    return folder


async def test_fresh_database_gets_plain_partitioned_schema(conn: asyncpg.Connection) -> None:
    report = await migrate(conn)
    assert report.applied == ALL
    assert report.already_applied == ()
    assert report.engine is Engine.PLAIN  # TimescaleDB is not available on these machines
    rows = await conn.fetch("SELECT version, name, variant FROM schema_migrations ORDER BY version")
    assert [tuple(r) for r in rows][:2] == [(1, "hierarchy", "common"), (2, "readings", "plain")]
    assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'readings'") == "p"
    assert await conn.fetchval("SELECT pg_get_partkeydef('readings'::regclass)") == "RANGE (ts)"
    brin = await conn.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = 'readings_ts_brin'")
    assert "USING brin (ts)" in brin
    assert await conn.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'readings'::regclass") == 0


async def test_schema_constraints_hold(conn: asyncpg.Connection) -> None:
    await migrate(conn)
    await conn.execute("INSERT INTO nodes VALUES ('g', 'Group', 'group', NULL), ('w', 'W1', 'workshop', 'g')")
    await conn.execute(
        "INSERT INTO devices (id, node_id, name, kind, protocol) VALUES ('m1', 'w', 'M1', 'meter', 'x')"
    )
    insert_point = (
        "INSERT INTO points (point_id, device_id, key, name, kind, unit)"
        " VALUES ($1, 'm1', $2, 'P', 'power', 'kW')"
    )
    await conn.execute(insert_point, "m1.p_kw", "p_kw")
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO nodes VALUES ('x', 'X', 'country', NULL)")
    with pytest.raises(asyncpg.CheckViolationError):  # point_id must be "<device>.<key>"
        await conn.execute(insert_point, "m1.q", "p")
    with pytest.raises(asyncpg.CheckViolationError):  # only bad quality may lack a value
        await conn.execute(
            "CREATE TABLE readings_p20260105 PARTITION OF readings"
            " FOR VALUES FROM ('2026-01-05 00:00+00') TO ('2026-01-06 00:00+00');"
            "INSERT INTO readings VALUES (1, '2026-01-05 12:00+00', NULL, 2, NULL)"
        )


async def test_rerun_is_idempotent(conn: asyncpg.Connection) -> None:
    await migrate(conn)
    report = await migrate(conn)
    assert report.applied == ()
    assert report.already_applied == ALL
    assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(ALL)


async def test_edited_applied_migration_is_refused(conn: asyncpg.Connection, migrations_copy: Path) -> None:
    await migrate(conn, source=migrations_copy)
    target = migrations_copy / "001_hierarchy.sql"
    target.write_text(target.read_text() + "\n-- a harmless-looking edit\n")
    with pytest.raises(MigrationChecksumError, match="001_hierarchy"):
        await migrate(conn, source=migrations_copy)


async def test_line_endings_do_not_change_the_checksum(
    conn: asyncpg.Connection, migrations_copy: Path
) -> None:
    await migrate(conn, source=migrations_copy)
    target = migrations_copy / "001_hierarchy.sql"
    target.write_bytes(target.read_bytes().replace(b"\n", b"\r\n"))  # a Windows checkout
    assert (await migrate(conn, source=migrations_copy)).already_applied == ALL


async def test_new_migration_is_applied_after_the_old_ones(
    conn: asyncpg.Connection, migrations_copy: Path
) -> None:
    await migrate(conn, source=migrations_copy)
    (migrations_copy / "900_extra.sql").write_text("CREATE TABLE extra (id integer PRIMARY KEY);")
    report = await migrate(conn, source=migrations_copy)
    assert report.applied == ("900_extra",)
    assert await conn.fetchval("SELECT to_regclass('extra') IS NOT NULL")


async def test_failed_migration_rolls_back_and_is_not_recorded(
    conn: asyncpg.Connection, migrations_copy: Path
) -> None:
    (migrations_copy / "900_broken.sql").write_text(
        "CREATE TABLE half (id integer); SELECT no_such_function();"
    )
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrate(conn, source=migrations_copy)
    assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == load_migrations()[-1].version
    assert await conn.fetchval("SELECT to_regclass('half') IS NULL")


async def test_database_newer_than_code_is_refused(conn: asyncpg.Connection, migrations_copy: Path) -> None:
    (migrations_copy / "900_extra.sql").write_text("SELECT 1;")
    await migrate(conn, source=migrations_copy)
    with pytest.raises(MigrationError, match=r"\[900\]"):
        await migrate(conn)  # the shipped set stops before 900


async def test_concurrent_migrations_apply_each_file_once(pg_url: str) -> None:
    conns = [await asyncpg.connect(pg_url, timeout=5) for _ in range(3)]
    try:
        reports = await asyncio.gather(*(migrate(c) for c in conns))
        applied = sorted(label for report in reports for label in report.applied)
        assert applied == list(ALL)  # exactly one process applied each file
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(ALL)
    finally:
        for c in conns:
            await c.close()


async def test_lock_wait_is_bounded(pg_url: str, conn: asyncpg.Connection) -> None:
    holder = await asyncpg.connect(pg_url, timeout=5)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        with pytest.raises(MigrationError, match="migration lock"):
            await migrate(conn, lock_timeout_s=0.2)
    finally:
        await holder.close()
    assert (await migrate(conn)).applied == ALL  # the lock died with the holder's session


async def test_forcing_timescale_without_the_extension_is_a_clear_error(conn: asyncpg.Connection) -> None:
    with pytest.raises(MigrationError, match="TimescaleDB"):
        await migrate(conn, timescale=True)


def test_both_readings_variants_define_the_same_table() -> None:
    """The query API serves both engines, so the column and key definitions must not drift."""
    [readings] = [m for m in load_migrations() if m.name == "readings"]

    def table(sql: str) -> str:
        match = re.search(r"CREATE TABLE readings \((.*?)\n\)", sql, re.DOTALL)
        assert match is not None
        return match.group(1)

    assert table(readings.sql_by_variant["plain"]) == table(readings.sql_by_variant["timescale"])
    timescale = readings.sql_by_variant["timescale"]
    for call in ("create_hypertable(", "timescaledb.compress_segmentby = 'point'", "add_compression_policy("):
        assert call in timescale


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"1_bad.sql": ""}, "expected NNN_name"),
        ({"001_a.sql": "", "001_b.sql": ""}, "defined twice"),
        ({"001_a.plain.sql": ""}, "both .plain.sql and .timescale.sql"),
        ({"001_a.sql": "", "001_a.plain.sql": "", "001_a.timescale.sql": ""}, "either one .sql file"),
    ],
)
def test_malformed_migration_sets_are_refused(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(MigrationError, match=re.escape(message)):
        load_migrations(tmp_path)


async def test_unreachable_database_is_a_service_error_without_password() -> None:
    with pytest.raises(ServiceError) as info:
        await create_pool("postgresql://scada:s3cret@127.0.0.1:1/scada", timeout_s=1)
    assert "s3cret" not in str(info.value)
    assert "scada:***@127.0.0.1:1" in str(info.value)


async def test_pool_commands_time_out(pg_url: str) -> None:
    pool = await create_pool(pg_url, timeout_s=0.2)
    try:
        with pytest.raises(TimeoutError):
            await pool.execute("SELECT pg_sleep(5)")
    finally:
        await pool.close()
