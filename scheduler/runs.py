"""Run records: claim a firing once, link its commands, finish it, and durable follow-ups.

A firing is claimed by inserting its key (zone, item, scheduled local time) with
ON CONFLICT DO NOTHING *before* anything is published: only the inserter executes it, so a
re-run tick, a restart or a second replica never publishes the same firing twice.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from common.db import Database
from schedules import ZoneSchedule
from common.timespec import Occurrence

CLAIM_SQL = """
INSERT INTO scheduler_runs (zone_id, kind, item, scheduled_local, scheduled_at, status, details, started_at,
                            finished_at, created_at, updated_at)
SELECT c.zone_id, c.kind, c.item, c.scheduled_local, c.scheduled_at, c.status, c.details::jsonb, $9::timestamp,
       CASE WHEN c.status = 'running' THEN NULL ELSE $9::timestamp END, now(), now()
  FROM unnest($1::bigint[], $2::varchar[], $3::varchar[], $4::timestamp[], $5::timestamp[], $6::varchar[],
              $7::text[], $8::int[]) AS c(zone_id, kind, item, scheduled_local, scheduled_at, status, details, ord)
 ORDER BY c.ord
ON CONFLICT ON CONSTRAINT scheduler_runs_firing_key DO NOTHING
RETURNING id, zone_id, item, scheduled_local
"""


def naive_utc(moment: dt.datetime) -> dt.datetime:
    """The database's form of an instant: naive UTC (contract §6)."""
    return moment.astimezone(dt.timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


def aware_utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.timezone.utc) if moment.tzinfo is None else moment


@dataclass(slots=True)
class Firing:
    zone: ZoneSchedule
    kind: str                 # irrigation | lighting | water_change
    item: str                 # irrigation@08:00 | lighting:on | lighting:off | water_change
    occurrence: Occurrence
    status: str = "running"   # or "missed": recorded, never executed
    details: dict[str, Any] = field(default_factory=dict)
    run_id: int | None = None

    @property
    def key(self) -> tuple[int, str, dt.datetime]:
        return (self.zone.zone_id, self.item, self.occurrence.local)


async def claim(db: Database, firings: list[Firing], now: dt.datetime) -> list[Firing]:
    """Insert every firing's key; return those this call inserted (run_id set), in input order."""
    if not firings:
        return []
    rows = await db.fetch(
        CLAIM_SQL,
        [f.zone.zone_id for f in firings], [f.kind for f in firings], [f.item for f in firings],
        [f.occurrence.local for f in firings], [naive_utc(f.occurrence.at) for f in firings],
        [f.status for f in firings],
        [orjson.dumps(dict(f.details, scheduled_local=f.occurrence.local.isoformat())).decode() for f in firings],
        list(range(len(firings))), naive_utc(now))
    won = {(r["zone_id"], r["item"], r["scheduled_local"]): r["id"] for r in rows}
    claimed = []
    for firing in firings:
        run_id = won.get(firing.key)
        if run_id is not None:
            firing.run_id = run_id
            claimed.append(firing)
    return claimed


async def finish(conn: asyncpg.Connection | Database, run_id: int, status: str, details: dict[str, Any],
                 now: dt.datetime) -> None:
    await conn.execute(
        "UPDATE scheduler_runs SET status = $2, details = coalesce(details, '{}'::jsonb) || $3::jsonb,"
        " finished_at = $4, followup_kind = NULL, followup_at = NULL, updated_at = now() WHERE id = $1",
        run_id, status, details, naive_utc(now))


async def update_details(conn: asyncpg.Connection | Database, run_id: int, details: dict[str, Any]) -> None:
    await conn.execute(
        "UPDATE scheduler_runs SET details = coalesce(details, '{}'::jsonb) || $2::jsonb, updated_at = now()"
        " WHERE id = $1", run_id, details)


async def set_followup(conn: asyncpg.Connection | Database, run_id: int, kind: str, at: dt.datetime) -> None:
    await conn.execute(
        "UPDATE scheduler_runs SET followup_kind = $2, followup_at = $3, updated_at = now() WHERE id = $1",
        run_id, kind, naive_utc(at))


async def link_command(conn: asyncpg.Connection | Database, run_id: int, cmd_id: str, node_uid: str,
                       channel: str, cmd: str) -> None:
    await conn.execute(
        "INSERT INTO scheduler_run_commands (run_id, cmd_id, node_uid, channel, cmd) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT DO NOTHING", run_id, cmd_id, node_uid, channel, cmd)


# A taken follow-up stays on the row, due again after FOLLOWUP_LEASE: a scheduler that dies while
# running it (before it set the next step or finished the run) leaves it to be run again.
FOLLOWUP_LEASE = dt.timedelta(seconds=60)
TAKE_DUE_SQL = """
WITH due AS (
  SELECT id FROM scheduler_runs
   WHERE followup_at IS NOT NULL AND followup_at <= $1
   ORDER BY followup_at LIMIT $2 FOR UPDATE SKIP LOCKED)
UPDATE scheduler_runs r SET followup_at = $3, updated_at = now()
  FROM due WHERE r.id = due.id
RETURNING r.id, r.zone_id, r.kind, r.item, r.scheduled_local, r.details, r.started_at, r.followup_kind AS due_kind
"""


async def take_due_followups(db: Database, now: dt.datetime, limit: int = 200) -> list[asyncpg.Record]:
    """Atomically take the follow-ups due at `now` (each is taken by exactly one caller until its
    lease ends); the step run sets the next follow-up or finishes the run."""
    return await db.fetch(TAKE_DUE_SQL, naive_utc(now), limit, naive_utc(now + FOLLOWUP_LEASE))


async def scheduler_log(conn: asyncpg.Connection | Database, task_name: str, status: str,
                        details: dict[str, Any]) -> None:
    """scheduler_logs row (contract §6): running | completed | failed."""
    await conn.execute(
        "INSERT INTO scheduler_logs (task_name, status, details, created_at) VALUES ($1, $2, $3, now())",
        task_name, status, details)


async def command_statuses(db: Database, run_id: int) -> list[asyncpg.Record]:
    """The commands of a run with their lifecycle status (sent / ack / failed / timeout)."""
    return await db.fetch("SELECT * FROM scheduler_run_command_status WHERE run_id = $1 ORDER BY cmd_id", run_id)


async def last_completed_tick(db: Database) -> dt.datetime | None:
    value = await db.fetchval("SELECT last_tick_at FROM scheduler_ticks WHERE name = 'scheduler'")
    return aware_utc(value) if value is not None else None


async def record_tick(db: Database, now: dt.datetime) -> None:
    await db.execute(
        "INSERT INTO scheduler_ticks (name, last_tick_at, updated_at) VALUES ('scheduler', $1, now())"
        " ON CONFLICT (name) DO UPDATE SET updated_at = now(),"
        " last_tick_at = GREATEST(scheduler_ticks.last_tick_at, excluded.last_tick_at)", naive_utc(now))


def iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else aware_utc(moment).isoformat().replace("+00:00", "Z")

