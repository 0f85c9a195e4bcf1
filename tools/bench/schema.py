"""The schema of a benchmark's throwaway database: Laravel's then ours on top (`laravel-first`,
what production runs: Laravel migrates before our services start) or ours alone (`own`).

Laravel's schema is read from BENCH_LARAVEL_SCHEMA, else from common.testing.LARAVEL_SCHEMA;
without that file the benchmarks use `own` and say so."""
from __future__ import annotations

import os
from pathlib import Path

import asyncpg

from common import testing
from common.migrate import apply_migrations

SCHEMAS = ("laravel-first", "own")


def admin_kwargs(database: str = "postgres") -> dict:
    env = testing.SHARED_ENV
    return dict(host=env["PG_HOST"], port=int(env["PG_PORT"]), user=env["PG_USER"],
                password=env["PG_PASS"] or None, database=database)


def laravel_schema() -> Path | None:
    path = Path(os.environ.get("BENCH_LARAVEL_SCHEMA") or testing.LARAVEL_SCHEMA)
    return path if path.is_file() else None


def default() -> str:
    return "laravel-first" if laravel_schema() else "own"


async def migrate(database: str, schema: str) -> None:
    """Give the empty `database` its schema."""
    if schema == "laravel-first":
        path = laravel_schema()
        if path is None:
            raise SystemExit("laravel-first: Laravel's schema not found (set BENCH_LARAVEL_SCHEMA)")
        conn = await asyncpg.connect(**admin_kwargs(database))
        try:
            await conn.execute(path.read_text())
        finally:
            await conn.close()  # the dump empties search_path for its own session
    conn = await asyncpg.connect(**admin_kwargs(database))
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
