"""Which stream entries are already committed (table history_logger_ingested, migration 0003).

A writer inserts its batch's entry ids in the same transaction as the rows they produce
(`claim`); ids already present come from a batch that committed but was not acknowledged
before a crash, and are skipped. Concurrent writers that claimed the same entry serialise on
the primary key, so exactly one of them stores it. Rows are pruned once no pending entry can
need them any more (`prune`).
"""
from __future__ import annotations

import asyncpg
import redis.asyncio as redis
import redis.exceptions as rex

from common.db import Database

_CLAIM = """
INSERT INTO history_logger_ingested (stream, entry_ms, entry_seq)
SELECT $1, u.ms, u.seq FROM unnest($2::bigint[], $3::bigint[]) AS u(ms, seq)
ON CONFLICT DO NOTHING
RETURNING entry_ms, entry_seq
"""


def split_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def claim(conn: asyncpg.Connection, stream: str, entry_ids: list[bytes]) -> set[bytes]:
    """Record the ids; returns those not committed before (the ones to store now)."""
    pairs = [split_id(e) for e in entry_ids]
    rows = await conn.fetch(_CLAIM, stream, [p[0] for p in pairs], [p[1] for p in pairs])
    if len(rows) == len(entry_ids):
        return set(entry_ids)
    fresh = {(r["entry_ms"], r["entry_seq"]) for r in rows}
    return {e for e, p in zip(entry_ids, pairs) if p in fresh}


async def prune(db: Database, client: redis.Redis, stream: str, group: str, min_age_sec: int = 600) -> int:
    """Delete records older than min_age_sec below the group's oldest pending entry (none before
    the group exists: its writer, a process of its own, may not have created it yet)."""
    try:
        summary = await client.xpending(stream, group)
    except rex.ResponseError as exc:
        if "NOGROUP" in str(exc):
            return 0
        raise
    oldest = summary.get("min") if summary and summary.get("pending") else None
    bound = split_id(oldest) if oldest else (2**62, 0)
    result = await db.execute(
        "DELETE FROM history_logger_ingested WHERE stream = $1 AND committed_at < now() - make_interval(secs => $2)"
        " AND (entry_ms, entry_seq) < ($3::bigint, $4::bigint)", stream, float(min_age_sec), bound[0], bound[1])
    return int(result.split()[-1])
