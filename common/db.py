"""asyncpg pool lifecycle and the few query helpers every service uses.

All timestamps in the schema are `timestamp without time zone` holding UTC, so every
connection runs with TimeZone=UTC and `now()` lands as UTC. jsonb/json columns decode to
Python objects.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Iterable, Sequence

import asyncpg
import orjson

from .env import Settings

log = logging.getLogger("common.db")

# Errors meaning "the connection died", after which the pool reconnects by itself.
CONNECTION_ERRORS = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    ConnectionError,
    OSError,
)

# The database cannot be reached or is too slow: a request answers 503, a batch fails as a whole.
PG_UNAVAILABLE = CONNECTION_ERRORS + (asyncpg.exceptions.PostgresConnectionError, asyncio.TimeoutError)

# Worth retrying later (the work is held, never dropped): unavailable, restarting, out of resources,
# or a transaction broken off; the pool reconnects by itself.
PG_TRANSIENT = PG_UNAVAILABLE + (
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's default reset query (a round trip on every release, a third
    of all statements): asyncpg still rolls back an open transaction, and no code here leaves
    session state behind (no LISTEN, no session advisory locks, no SET)."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("jsonb", "json"):
        await conn.set_type_codec(kind, encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


def connect_kwargs(settings: Settings) -> dict[str, Any]:
    return dict(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        password=settings.pg_pass or None,
        database=settings.pg_db,
        server_settings={"timezone": "UTC", "application_name": settings.mqtt_client_id},
    )


class Database:
    """One asyncpg pool. Queries that hit a dead connection are retried once on a fresh one."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pool: asyncpg.Pool | None = None

    async def connect(self, wait: bool = True, max_delay: float = 10.0) -> None:
        """Open the pool. With wait=True keep retrying until PostgreSQL answers; with
        wait=False open a lazy pool whose connections are made on first use."""
        s = self.settings
        kwargs = dict(
            connect_kwargs(s),
            min_size=s.db_pool_min if wait else 0,
            max_size=s.db_pool_max,
            command_timeout=s.db_command_timeout_sec,
            init=_init_connection,
            reset=_keep_session,
            max_inactive_connection_lifetime=300,
        )
        delay = 0.5
        while True:
            try:
                self.pool = await asyncpg.create_pool(**kwargs)
                return
            except CONNECTION_ERRORS + (asyncpg.exceptions.PostgresError,) as exc:
                if not wait:
                    raise
                log.warning("db_connect_retry", extra={"error": str(exc), "retry_in_sec": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_delay)

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except (asyncio.TimeoutError, *CONNECTION_ERRORS):
                pool.terminate()

    def _require_pool(self) -> asyncpg.Pool:
        if self.pool is None:
            raise RuntimeError("Database.connect() was not called")
        return self.pool

    async def _run(self, method: str, sql: str, args: Sequence[Any], timeout: float | None):
        pool = self._require_pool()
        for attempt in (1, 2):
            try:
                async with pool.acquire() as conn:
                    return await getattr(conn, method)(sql, *args, timeout=timeout)
            except CONNECTION_ERRORS:
                if attempt == 2:
                    raise
                log.info("db_connection_lost_retrying")

    async def fetch(self, sql: str, *args: Any, timeout: float | None = None) -> list[asyncpg.Record]:
        return await self._run("fetch", sql, args, timeout)

    async def fetchrow(self, sql: str, *args: Any, timeout: float | None = None) -> asyncpg.Record | None:
        return await self._run("fetchrow", sql, args, timeout)

    async def fetchval(self, sql: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._run("fetchval", sql, args, timeout)

    async def execute(self, sql: str, *args: Any, timeout: float | None = None) -> str:
        return await self._run("execute", sql, args, timeout)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]], timeout: float | None = None) -> None:
        pool = self._require_pool()
        async with pool.acquire() as conn:
            await conn.executemany(sql, rows, timeout=timeout)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection inside one transaction: commit on success, roll back on error."""
        pool = self._require_pool()
        async with pool.acquire() as conn:
            async with conn.transaction():
                yield conn

    async def copy_records(
        self, table: str, records: Iterable[Sequence[Any]], columns: Sequence[str], conn: asyncpg.Connection | None = None
    ) -> None:
        """Bulk load with COPY (inside `conn`'s transaction when given)."""
        if conn is not None:
            await conn.copy_records_to_table(table, records=records, columns=list(columns))
            return
        async with self._require_pool().acquire() as own:
            await own.copy_records_to_table(table, records=records, columns=list(columns))

    async def ping(self) -> bool:
        try:
            return await self.fetchval("SELECT 1", timeout=2) == 1
        except Exception:  # noqa: BLE001 - readiness is a yes/no answer
            return False
