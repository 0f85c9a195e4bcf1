import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from common import testing
from common.db import Database
from common.migrate import migrate, migration_files

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"greenhouses", "zones", "nodes", "node_channels", "telemetry_samples", "telemetry_last", "recipes",
          "recipe_phases", "zone_recipe_instances", "commands", "alerts", "zone_events", "ai_logs",
          "scheduler_logs", "schema_migrations"}


async def test_migrated_database_has_every_table(db):
    names = {r["table_name"] for r in await db.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    assert TABLES <= names
    versions = [r["version"] for r in await db.fetch("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [f.name.split("_", 1)[0] for f in migration_files()]


async def test_migrate_again_is_a_no_op(settings, db):
    assert await migrate(settings) == []
    assert await db.fetchval("SELECT count(*) FROM schema_migrations") == len(migration_files())


async def _empty_database(settings):
    name = f"hydro_t_{__import__('os').getpid()}_{testing.unique_id('')}"
    admin = await asyncpg.connect(host=settings.pg_host, port=settings.pg_port, user=settings.pg_user,
                                  database="postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    return name


async def _drop(settings, name):
    admin = await asyncpg.connect(host=settings.pg_host, port=settings.pg_port, user=settings.pg_user,
                                  database="postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def test_two_concurrent_cli_runs_both_succeed(settings):
    name = await _empty_database(settings)
    try:
        env = {"PATH": "/usr/bin:/bin", "PG_HOST": settings.pg_host, "PG_PORT": str(settings.pg_port),
               "PG_USER": settings.pg_user, "PG_PASS": "", "PG_DB": name}
        procs = [await asyncio.create_subprocess_exec(sys.executable, "-m", "common.migrate", cwd=ROOT, env=env,
                                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
        results = [await p.communicate() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], results
        outputs = sorted(out.decode() for out, _ in results)
        assert "database already current" in outputs[0]
        assert f"migrations applied: {len(migration_files())}" in outputs[1]
    finally:
        await _drop(settings, name)


async def test_helpers_and_jsonb_round_trip(db):
    await db.execute("INSERT INTO greenhouses (uid, name, coordinates) VALUES ($1, $2, $3)",
                     "gh-a", "A", {"lat": 55.75, "lon": [1, 2]})
    row = await db.fetchrow("SELECT coordinates FROM greenhouses WHERE uid = 'gh-a'")
    assert row["coordinates"] == {"lat": 55.75, "lon": [1, 2]}
    await db.executemany("INSERT INTO greenhouses (uid, name) VALUES ($1, $2)", [("gh-b", "B"), ("gh-c", "C")])
    async with db.transaction() as conn:
        await db.copy_records("greenhouses", [("gh-d", "D")], ["uid", "name"], conn=conn)
    with pytest.raises(asyncpg.UniqueViolationError):
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO greenhouses (uid, name) VALUES ('gh-e', 'E')")
            await conn.execute("INSERT INTO greenhouses (uid, name) VALUES ('gh-a', 'dup')")
    assert [r["uid"] for r in await db.fetch("SELECT uid FROM greenhouses ORDER BY uid")] == [
        "gh-a", "gh-b", "gh-c", "gh-d"]
    assert await db.fetchval("SELECT current_setting('TimeZone')") == "UTC"


async def test_pool_survives_a_postgres_restart():
    server = testing.PrivatePostgres()
    server.start()
    try:
        settings = testing.isolated_settings(**server.settings_env())
        db = Database(settings)
        await db.connect()
        assert await db.fetchval("SELECT 1") == 1
        server.restart()
        assert await db.fetchval("SELECT 2") == 2  # dead connection replaced transparently
        assert await db.ping()
        server.stop()
        assert not await db.ping()
        server.start()
        assert await testing.eventually(db.ping, 15, message="pool back after restart")
        await db.close()
    finally:
        server.close()


async def test_laravel_filled_database_is_completed_keeping_its_rows():
    """Laravel migrated and wrote rows first; our migrations complete its late migrations' intent."""
    settings = testing.isolated_settings()
    name = await _empty_database(settings)
    kwargs = dict(host=settings.pg_host, port=settings.pg_port, user=settings.pg_user, database=name)
    try:
        conn = await asyncpg.connect(**kwargs)
        await conn.execute(testing.LARAVEL_SCHEMA.read_text())
        await conn.close()
        conn = await asyncpg.connect(**kwargs)
        zone = await conn.fetchval(
            "WITH g AS (INSERT INTO greenhouses (uid, name) VALUES ('gh-1', 'G') RETURNING id) "
            "INSERT INTO zones (greenhouse_id, name, status) SELECT id, 'Z', 'RUNNING' FROM g RETURNING id")
        await conn.execute("INSERT INTO telemetry_last (zone_id, node_id, metric_type, value) VALUES "
                           "($1, NULL, 'PH', 6.1), ($1, NULL, 'EC', 1.4)", zone)
        await conn.close()

        assert len(await migrate(testing.isolated_settings(PG_DB=name))) == len(migration_files())
        assert await migrate(testing.isolated_settings(PG_DB=name)) == []  # a second run changes nothing

        conn = await asyncpg.connect(**kwargs)
        try:
            rows = await conn.fetch("SELECT node_id, metric_type, value FROM telemetry_last ORDER BY metric_type")
            assert [tuple(r) for r in rows] == [(-1, "EC", 1.4), (-1, "PH", 6.1)]
            key = await conn.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                                      "WHERE conrelid = 'telemetry_last'::regclass AND contype = 'p'")
            assert key == "PRIMARY KEY (zone_id, node_id, metric_type)"
            # The upsert the history-logger writes with: one row per node now, not per zone.
            await conn.execute("INSERT INTO telemetry_last (zone_id, node_id, metric_type, value) VALUES "
                               "($1, 7, 'PH', 5.9) ON CONFLICT (zone_id, node_id, metric_type) "
                               "DO UPDATE SET value = EXCLUDED.value", zone)
            assert await conn.fetchval("SELECT count(*) FROM telemetry_last WHERE metric_type = 'PH'") == 2
            columns = {r["column_name"] for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'zones'")}
            assert {"water_state", "solution_started_at", "health_score", "settings"} <= columns
            assert await conn.fetchval("SELECT water_state FROM zones WHERE id = $1", zone) == "NORMAL_RECIRC"
            indexes = {r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
            assert {"commands_created_at_idx", "alerts_zone_code_status_idx", "zone_events_created_at_idx"} <= indexes
        finally:
            await conn.close()
    finally:
        await _drop(settings, name)


async def test_a_connection_released_inside_a_transaction_comes_back_clean(db):
    """The pool skips asyncpg's reset query; an open transaction is still rolled back on release."""
    async with db.pool.acquire() as conn:
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO greenhouses (uid, name) VALUES ('gh-open', 'left open')")
    for _ in range(db.settings.db_pool_max + 1):  # whichever pooled connection comes next
        async with db.pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM greenhouses WHERE uid = 'gh-open'") == 0
