"""Telemetry stream → PostgreSQL, one transaction per batch (contract §6 write path, §9.4).

A read of up to TELEMETRY_BATCH_SIZE stream entries (each holding one or more samples) is
written in batches of at most TELEMETRY_BATCH_SIZE samples (whole entries). Per batch: node uids
resolved through NodeCache (one query for all misses), then ONE statement (one transaction, one
round trip): record the entry ids (skips what a crashed run committed, see ingest_log.py),
ONE insert into telemetry_samples, ONE upsert of telemetry_last keeping each key's newest
sample (and never letting an older sample overwrite a newer one). value null and stub samples
are stored but do not touch telemetry_last; a node without a zone gets samples only.
A batch PostgreSQL refuses for its content (not a connection problem) is retried entry by entry,
each sample in a savepoint; a sample refused alone goes to the dead-letter stream as db_rejected.
"""
from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import orjson
import redis.asyncio as redis

from common.db import PG_TRANSIENT, Database
from common.redis_client import REDIS_TRANSIENT

import ingest_log
import metrics as m
from node_cache import NodeCache
from streams import Sample, StreamKeys, decode_entry, from_meta, from_ms
from stream_consumer import Entry, Transient

log = logging.getLogger("history_logger.writer")

_INSERT_SAMPLES = """
INSERT INTO telemetry_samples (zone_id, node_id, channel, metric_type, value, raw, ts)
SELECT z.id, n.id, u.channel, u.metric, u.value, u.raw::jsonb, u.ts
  FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::float8[], $6::text[], $7::timestamp[])
       AS u(zone_id, node_id, channel, metric, value, raw, ts)
  LEFT JOIN zones z ON z.id = u.zone_id
  LEFT JOIN nodes n ON n.id = u.node_id
"""

def _upsert_last(first: int) -> str:
    """The telemetry_last upsert with its parameters numbered from `first`: a late, older sample
    never overwrites a newer value (one statement text for both places it runs in)."""
    p = [f"${first + i}" for i in range(6)]
    return f"""
INSERT INTO telemetry_last AS t (zone_id, node_id, metric_type, channel, value, updated_at)
SELECT z.id, u.node_id, u.metric, u.channel, u.value, u.ts
  FROM unnest({p[0]}::bigint[], {p[1]}::bigint[], {p[2]}::text[], {p[3]}::text[], {p[4]}::float8[],
              {p[5]}::timestamp[]) AS u(zone_id, node_id, metric, channel, value, ts)
  JOIN zones z ON z.id = u.zone_id
ON CONFLICT (zone_id, node_id, metric_type) DO UPDATE
   SET channel = EXCLUDED.channel, value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
 WHERE t.updated_at IS NULL OR t.updated_at <= EXCLUDED.updated_at
"""


_UPSERT_LAST = _upsert_last(1)

# The whole batch in ONE statement (one round trip, atomic on its own): record the entry ids,
# insert the samples of the entries recorded now (not those a crashed run committed already),
# upsert telemetry_last (idempotent, so it needs no filter). Returns the entries recorded now.
WRITE_CONCURRENCY = 4

_WRITE_BATCH = f"""
WITH claimed AS (
  INSERT INTO history_logger_ingested (stream, entry_ms, entry_seq)
  SELECT $1, e.ms, e.seq FROM unnest($2::bigint[], $3::bigint[]) AS e(ms, seq)
  ON CONFLICT DO NOTHING
  RETURNING entry_ms, entry_seq
), samples AS (
  INSERT INTO telemetry_samples (zone_id, node_id, channel, metric_type, value, raw, ts)
  SELECT z.id, n.id, u.channel, u.metric, u.value, u.raw::jsonb, u.ts
    FROM unnest($4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::float8[],
                $11::text[], $12::timestamp[]) AS u(ems, eseq, zone_id, node_id, channel, metric, value, raw, ts)
    JOIN claimed c ON c.entry_ms = u.ems AND c.entry_seq = u.eseq
    LEFT JOIN zones z ON z.id = u.zone_id
    LEFT JOIN nodes n ON n.id = u.node_id
  RETURNING 1
), last AS ({_upsert_last(13)}  RETURNING 1
)
SELECT entry_ms, entry_seq FROM claimed
"""


class Row:
    __slots__ = ("entry_id", "sample", "node_id", "zone_id")

    def __init__(self, entry_id: bytes, sample: Sample, node_id: int | None, zone_id: int | None):
        self.entry_id = entry_id
        self.sample = sample
        self.node_id = node_id
        self.zone_id = zone_id


Dead = tuple[bytes, "Sample | None", str]


class TelemetryWriter:
    def __init__(self, db: Database, client: redis.Redis, keys: StreamKeys, cache: NodeCache, dead_max: int,
                 batch_size: int = 200):
        self.db = db
        self.redis = client
        self.keys = keys
        self.cache = cache
        self.dead_max = dead_max
        self.batch_size = batch_size

    async def handle(self, entries: list[Entry]) -> None:
        """The StreamConsumer handler: returns once every entry is committed (or dead-lettered).

        A backlog read holds many batches; up to WRITE_CONCURRENCY of them are written at once on
        separate connections (each its own transaction; telemetry_last rows are sorted by key so
        concurrent upserts lock in the same order)."""
        batches: list[list[tuple[bytes, list[Sample]]]] = []
        batch: list[tuple[bytes, list[Sample]]] = []
        size = 0
        dead: list[Dead] = []
        for entry_id, fields in entries:
            try:
                samples = decode_entry(fields)
            except (KeyError, ValueError, TypeError, orjson.JSONDecodeError):
                dead.append((entry_id, None, "invalid_entry"))
                continue
            if batch and size + len(samples) > self.batch_size:
                batches.append(batch)
                batch, size = [], 0
            batch.append((entry_id, samples))
            size += len(samples)
        if batch:
            batches.append(batch)
        if dead:
            await self._dead_letter(dead)
        for start in range(0, len(batches), WRITE_CONCURRENCY):
            group = batches[start:start + WRITE_CONCURRENCY]
            if len(group) == 1:
                await self._batch(group[0])
                continue
            results = await asyncio.gather(*(self._batch(b) for b in group), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def _batch(self, batch: list[tuple[bytes, list[Sample]]]) -> None:
        started = time.perf_counter()
        rows, dead = await self._resolve(batch)
        if dead:
            await self._dead_letter(dead)
        entry_ids = [entry_id for entry_id, _ in batch]
        try:
            stored = await self._write(entry_ids, rows)
        except PG_TRANSIENT as exc:
            raise Transient(f"database: {exc}") from exc
        except asyncpg.PostgresError as exc:
            log.warning("telemetry_batch_refused", extra={"error": str(exc)[:300], "rows": len(rows)})
            stored = await self._write_entry_by_entry(entry_ids, rows)
        count = sum(len(samples) for _, samples in batch)
        m.PROCESSED.inc(count)
        m.BATCH_SIZE.observe(count)
        m.FLUSH_SECONDS.observe(time.perf_counter() - started)
        if stored:
            m.INSERTED.inc(len(stored))
            now_ms = time.time() * 1000
            observe = m.COMMIT_LAG.observe
            for row in stored:
                observe(max(0.0, (now_ms - row.sample.ts_ms) / 1000))

    async def _resolve(self, batch: list[tuple[bytes, list[Sample]]]) -> tuple[list[Row], list[Dead]]:
        try:
            nodes = await self.cache.resolve({s.node for _, samples in batch for s in samples if s.node})
        except PG_TRANSIENT as exc:
            raise Transient(f"database: {exc}") from exc
        rows: list[Row] = []
        dead: list[Dead] = []
        for entry_id, samples in batch:
            for sample in samples:
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

    async def _write(self, entry_ids: list[bytes], rows: list[Row]) -> list[Row]:
        ids = {eid: ingest_log.split_id(eid) for eid in entry_ids}
        claimed = await self.db.fetch(
            _WRITE_BATCH, self.keys.telemetry, [p[0] for p in ids.values()], [p[1] for p in ids.values()],
            [ids[r.entry_id][0] for r in rows], [ids[r.entry_id][1] for r in rows], *_sample_columns(rows),
            *_last_columns(_newest_per_key(rows)))
        if len(claimed) != len(entry_ids):
            log.info("telemetry_already_committed", extra={"entries": len(entry_ids) - len(claimed)})
            fresh = {(c["entry_ms"], c["entry_seq"]) for c in claimed}
            rows = [r for r in rows if ids[r.entry_id] in fresh]
        return rows

    async def _write_entry_by_entry(self, entry_ids: list[bytes], rows: list[Row]) -> list[Row]:
        stored: list[Row] = []
        refused: list[Dead] = []
        try:
            for entry_id in entry_ids:
                async with self.db.transaction() as conn:
                    if not await ingest_log.claim(conn, self.keys.telemetry, [entry_id]):
                        continue
                    for row in (r for r in rows if r.entry_id == entry_id):
                        try:
                            async with conn.transaction():  # savepoint: the entry's other samples stay
                                await _insert(conn, [row])
                            stored.append(row)
                        except PG_TRANSIENT:
                            raise
                        except asyncpg.PostgresError as exc:
                            refused.append((entry_id, row.sample, "db_rejected"))
                            log.warning("telemetry_sample_refused", extra={"error": str(exc)[:300]})
        except PG_TRANSIENT as exc:
            raise Transient(f"database: {exc}") from exc
        if refused:
            await self._dead_letter(refused)
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
        samples = [from_meta(orjson.loads(d)) for d in values.values()]
        nodes = await self.cache.resolve({s.node for s in samples if s.node})
        rows = []
        for s in samples:
            info = nodes.get(s.node) if s.node else None
            if s.node is None:
                rows.append(Row(b"", s, None, s.zone))
            elif info is not None and info.validated:
                rows.append(Row(b"", s, info.node_id, info.zone_id))
        last = _newest_per_key(rows)
        if last:
            async with self.db.transaction() as conn:
                await conn.execute(_UPSERT_LAST, *_last_columns(last))
        return len(last)

    async def _dead_letter(self, dead: list[Dead], detail: str = "") -> None:
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


async def _insert(conn: asyncpg.Connection, rows: list[Row]) -> None:
    if not rows:
        return
    await conn.execute(_INSERT_SAMPLES, *_sample_columns(rows))
    last = _newest_per_key(rows)
    if last:
        await conn.execute(_UPSERT_LAST, *_last_columns(last))


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
        ts.append(from_ms(s.ts_ms))
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
    return [newest[k] for k in sorted(newest)]  # one lock order for concurrent writers


def _last_columns(rows: list[Row]) -> tuple[list, ...]:
    return ([r.zone_id for r in rows], [r.node_id if r.node_id is not None else -1 for r in rows],
            [r.sample.metric for r in rows], [r.sample.channel for r in rows], [r.sample.value for r in rows],
            [from_ms(r.sample.ts_ms) for r in rows])
