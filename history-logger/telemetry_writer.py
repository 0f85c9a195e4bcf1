"""Telemetry stream → PostgreSQL, one transaction per batch (contract §6 write path, §9.4).

Per batch: node uids resolved through NodeCache (one query for all misses), then in ONE
transaction: record the entry ids (ingest_log.claim, skips what a crashed run committed),
ONE insert into telemetry_samples, ONE upsert of telemetry_last keeping each key's newest
sample (and never letting an older sample overwrite a newer one). value null and stub samples
are stored but do not touch telemetry_last; a node without a zone gets samples only.
A batch PostgreSQL refuses for its content (not a connection problem) is retried entry by
entry; an entry refused alone goes to the dead-letter stream as db_rejected.
"""
from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import orjson
import redis.asyncio as redis

from common.db import CONNECTION_ERRORS, Database

import ingest_log
import logger_metrics as m
import telemetry_parse as tp
from node_cache import NodeCache
from receiver import REDIS_TRANSIENT, StreamKeys
from stream_consumer import Entry, Transient

log = logging.getLogger("history_logger.writer")

PG_TRANSIENT = CONNECTION_ERRORS + (
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.TooManyConnectionsError,
)

_INSERT_SAMPLES = """
INSERT INTO telemetry_samples (zone_id, node_id, channel, metric_type, value, raw, ts)
SELECT z.id, n.id, u.channel, u.metric, u.value, u.raw::jsonb, u.ts
  FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::float8[], $6::text[], $7::timestamp[])
       AS u(zone_id, node_id, channel, metric, value, raw, ts)
  LEFT JOIN zones z ON z.id = u.zone_id
  LEFT JOIN nodes n ON n.id = u.node_id
"""

_UPSERT_LAST = """
INSERT INTO telemetry_last AS t (zone_id, node_id, metric_type, channel, value, updated_at)
SELECT z.id, u.node_id, u.metric, u.channel, u.value, u.ts
  FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::float8[], $6::timestamp[])
       AS u(zone_id, node_id, metric, channel, value, ts)
  JOIN zones z ON z.id = u.zone_id
ON CONFLICT (zone_id, node_id, metric_type) DO UPDATE
   SET channel = EXCLUDED.channel, value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
 WHERE t.updated_at IS NULL OR t.updated_at <= EXCLUDED.updated_at
"""


class Row:
    __slots__ = ("entry_id", "sample", "node_id", "zone_id")

    def __init__(self, entry_id: bytes, sample: tp.Sample, node_id: int | None, zone_id: int | None):
        self.entry_id = entry_id
        self.sample = sample
        self.node_id = node_id
        self.zone_id = zone_id


class TelemetryWriter:
    def __init__(self, db: Database, client: redis.Redis, keys: StreamKeys, cache: NodeCache, dead_max: int):
        self.db = db
        self.redis = client
        self.keys = keys
        self.cache = cache
        self.dead_max = dead_max

    async def handle(self, entries: list[Entry]) -> None:
        """The StreamConsumer handler: returns once the batch is committed (or dead-lettered)."""
        started = time.perf_counter()
        rows, dead = await self._resolve(entries)
        if dead:
            await self._dead_letter(dead)
        try:
            stored = await self._write(rows, [])
        except PG_TRANSIENT as exc:
            raise Transient(f"database: {exc}") from exc
        except asyncpg.PostgresError as exc:
            log.warning("telemetry_batch_refused", extra={"error": str(exc)[:300], "rows": len(rows)})
            stored = await self._write_one_by_one(rows)
        m.PROCESSED.inc(len(entries))
        m.BATCH_SIZE.observe(len(entries))
        m.FLUSH_SECONDS.observe(time.perf_counter() - started)
        if stored:
            m.INSERTED.inc(len(stored))
            now_ms = time.time() * 1000
            for row in stored:
                m.COMMIT_LAG.observe(max(0.0, (now_ms - row.sample.ts_ms) / 1000))

    async def _resolve(self, entries: list[Entry]) -> tuple[list[Row], list[tuple[bytes, tp.Sample, str]]]:
        decoded = []
        dead = []
        for entry_id, fields in entries:
            try:
                decoded.append((entry_id, tp.decode(fields)))
            except (KeyError, ValueError, TypeError, orjson.JSONDecodeError):
                dead.append((entry_id, None, "invalid_entry"))
        try:
            nodes = await self.cache.resolve({s.node for _, s in decoded if s.node})
        except PG_TRANSIENT as exc:
            raise Transient(f"database: {exc}") from exc
        rows = []
        for entry_id, sample in decoded:
            if sample.node is None:
                rows.append(Row(entry_id, sample, None, sample.zone))
                continue
            info = nodes.get(sample.node)
            if info is None:
                dead.append((entry_id, sample, "unknown_node"))
            elif not info.validated:
                dead.append((entry_id, sample, "unvalidated_node"))
            else:
                rows.append(Row(entry_id, sample, info.node_id, info.zone_id))
        return rows, dead

    async def _write(self, rows: list[Row], extra_last: list[Row]) -> list[Row]:
        if not rows and not extra_last:
            return []
        async with self.db.transaction() as conn:
            if rows:
                fresh = await ingest_log.claim(conn, self.keys.telemetry, [r.entry_id for r in rows])
                if len(fresh) != len(rows):
                    log.info("telemetry_already_committed", extra={"skipped": len(rows) - len(fresh)})
                    rows = [r for r in rows if r.entry_id in fresh]
            if rows:
                await conn.execute(_INSERT_SAMPLES, *_sample_columns(rows))
            last = _newest_per_key(rows + extra_last)
            if last:
                await conn.execute(_UPSERT_LAST, *_last_columns(last))
        return rows

    async def _write_one_by_one(self, rows: list[Row]) -> list[Row]:
        stored = []
        for row in rows:
            try:
                stored += await self._write([row], [])
            except PG_TRANSIENT as exc:
                raise Transient(f"database: {exc}") from exc
            except asyncpg.PostgresError as exc:
                await self._dead_letter([(row.entry_id, row.sample, "db_rejected")], str(exc))
        return stored

    async def flush_sampled(self) -> int:
        """Samples the receiver kept out of the stream while sampling refresh telemetry_last only
        (contract §9.4: telemetry_last stays fresh). Runs every second; returns how many."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(self.keys.last)
        pipe.delete(self.keys.last)
        values, _ = await pipe.execute()
        if not values:
            return 0
        samples = [tp.decode({b"d": d}) for d in values.values()]
        nodes = await self.cache.resolve({s.node for s in samples if s.node})
        rows = []
        for s in samples:
            info = nodes.get(s.node) if s.node else None
            if s.node is None:
                rows.append(Row(b"", s, None, s.zone))
            elif info is not None and info.validated:
                rows.append(Row(b"", s, info.node_id, info.zone_id))
        await self._write([], rows)
        return len(rows)

    async def _dead_letter(self, dead: list[tuple[bytes, tp.Sample | None, str]], detail: str = "") -> None:
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, sample, reason in dead:
            m.DROPPED.labels(reason).inc()
            pipe.xadd(self.keys.dead, {
                b"reason": reason, b"detail": detail[:500], b"entry_id": entry_id,
                b"node": (sample.node or "") if sample else "", b"metric": sample.metric if sample else "",
                b"payload": sample.raw[:4096] if sample else b"", b"at": repr(time.time())},
                maxlen=self.dead_max, approximate=True)
        try:
            await pipe.execute()
        except REDIS_TRANSIENT as exc:
            raise Transient(f"redis: {exc}") from exc


def _sample_columns(rows: list[Row]) -> tuple[list, ...]:
    zone, node, channel, metric, value, raw, ts = [], [], [], [], [], [], []
    for r in rows:
        s = r.sample
        zone.append(r.zone_id)
        node.append(r.node_id)
        channel.append(s.channel)
        metric.append(s.metric)
        value.append(s.value)
        raw.append(s.raw.decode("utf-8", "replace"))
        ts.append(tp.from_ms(s.ts_ms))
    return zone, node, channel, metric, value, raw, ts


def _newest_per_key(rows: list[Row]) -> list[Row]:
    newest: dict[tuple, Row] = {}
    for r in rows:
        s = r.sample
        if s.value is None or s.stub or r.zone_id is None:
            continue
        k = (r.zone_id, r.node_id if r.node_id is not None else -1, s.metric)
        old = newest.get(k)
        if old is None or old.sample.ts_ms <= s.ts_ms:
            newest[k] = r
    return list(newest.values())


def _last_columns(rows: list[Row]) -> tuple[list, ...]:
    return ([r.zone_id for r in rows], [r.node_id if r.node_id is not None else -1 for r in rows],
            [r.sample.metric for r in rows], [r.sample.channel for r in rows], [r.sample.value for r in rows],
            [tp.from_ms(r.sample.ts_ms) for r in rows])
