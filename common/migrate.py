"""Apply the numbered SQL files of common/migrations in order, once each.

`python -m common.migrate` — idempotent, recorded in `schema_migrations`, and safe when several
services start at once: the whole run holds a PostgreSQL advisory lock.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import asyncpg

from .db import connect_kwargs
from .env import Settings, settings_or_exit

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
LOCK_KEY = 0x6879_6472_6F  # "hydro": one key for every migrate run against this database

log = logging.getLogger("common.migrate")


def migration_files() -> list[Path]:
    files = sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    versions = [f.name.split("_", 1)[0] for f in files]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"two migrations share a number in {MIGRATIONS_DIR}")
    return files


async def apply_migrations(conn: asyncpg.Connection) -> list[str]:
    """Apply what is missing on `conn`; returns the names applied now."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version varchar(255) PRIMARY KEY, name varchar(255) NOT NULL,"
            " applied_at timestamp(0) without time zone NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for path in migration_files():
            version = path.name.split("_", 1)[0]
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name
                )
            applied_now.append(path.name)
            log.info("migration_applied", extra={"migration": path.name})
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return applied_now


async def migrate(settings: Settings) -> list[str]:
    conn = await asyncpg.connect(**connect_kwargs(settings))
    try:
        return await apply_migrations(conn)
    finally:
        await conn.close()


def main() -> int:
    from .logs import setup_logging

    settings = settings_or_exit()
    setup_logging("migrate", settings.log_level)
    applied = asyncio.run(migrate(settings))
    print(f"migrations applied: {len(applied)} ({', '.join(applied) or 'database already current'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
