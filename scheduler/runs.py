"""Run records: claim a firing once, link its commands, finish it, and durable follow-ups.

A firing is claimed by inserting its key (zone, item, scheduled local time) with
ON CONFLICT DO NOTHING *before* anything is published: only the inserter executes it, so a
re-run tick, a restart or a second replica never publishes the same firing twice.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import asyncpg
import orjson

from common.alerts import add_zone_events
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


@dataclass(slots=True)
class RunChange:
    details: dict[str, Any] = field(default_factory=dict)   # merged into the row's details (jsonb ||)
    followup: tuple[str, dt.datetime] | None = None         # the next durable step
    status: str | None = None                               # set: the run is finished (its follow-up cleared)


_RUNS_SQL = """
UPDATE scheduler_runs r
   SET details = coalesce(r.details, '{}'::jsonb) || u.details::jsonb,
       status = coalesce(u.status, r.status),
       finished_at = CASE WHEN u.status IS NULL THEN r.finished_at ELSE $6::timestamp END,
       followup_kind = CASE WHEN u.status IS NOT NULL THEN NULL ELSE coalesce(u.followup_kind, r.followup_kind) END,
       followup_at = CASE WHEN u.status IS NOT NULL THEN NULL
                          WHEN u.followup_kind IS NOT NULL THEN u.followup_at ELSE r.followup_at END,
       updated_at = now()
  FROM unnest($1::bigint[], $2::text[], $3::varchar[], $4::varchar[], $5::timestamp[])
       AS u(id, details, status, followup_kind, followup_at)
 WHERE r.id = u.id
"""
_LINKS_SQL = """
INSERT INTO scheduler_run_commands (run_id, cmd_id, node_uid, channel, cmd)
SELECT * FROM unnest($1::bigint[], $2::varchar[], $3::varchar[], $4::varchar[], $5::varchar[])
ON CONFLICT DO NOTHING
"""
_LOGS_SQL = """
INSERT INTO scheduler_logs (task_name, status, details, created_at)
SELECT t.task_name, t.status, t.details::jsonb, now()
  FROM unnest($1::varchar[], $2::varchar[], $3::text[]) WITH ORDINALITY AS t(task_name, status, details, ord)
 ORDER BY t.ord
"""


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


class Writes:
    """Run records of one or many firings, written together: one statement per table, so a tick's
    stage costs the same few round trips for one firing or thousands. Rows are written in the
    order they were added; the changes of one run merge (details), its last follow-up wins and a
    finish clears its follow-up."""

    def __init__(self, now: dt.datetime | None = None):
        self.now = now
        self.runs: dict[int, RunChange] = {}
        self.links: list[tuple[int, str, str, str, str]] = []
        self.events: list[tuple[int, str, dict]] = []
        self.logs: list[tuple[str, str, dict]] = []
        self.calls: list[Callable[[asyncpg.Connection], Awaitable[Any]]] = []  # writes of common's, run first

    def __bool__(self) -> bool:
        return bool(self.runs or self.links or self.events or self.logs or self.calls)

    def _run(self, run_id: int) -> RunChange:
        change = self.runs.get(run_id)
        if change is None:
            change = self.runs[run_id] = RunChange()
        return change

    def details(self, run_id: int, details: dict[str, Any]) -> "Writes":
        self._run(run_id).details.update(details)
        return self

    def followup(self, run_id: int, kind: str, at: dt.datetime) -> "Writes":
        self._run(run_id).followup = (kind, at)
        return self

    def finish(self, run_id: int, status: str, details: dict[str, Any]) -> "Writes":
        change = self._run(run_id)
        change.details.update(details)
        change.status, change.followup = status, None
        return self

    def link(self, run_id: int, cmd_id: str, node_uid: str, channel: str, cmd: str) -> "Writes":
        self.links.append((run_id, cmd_id, node_uid, channel, cmd))
        return self

    def event(self, zone_id: int, event_type: str, details: dict[str, Any]) -> "Writes":
        self.events.append((zone_id, event_type, details))
        return self

    def log(self, task_name: str, status: str, details: dict[str, Any]) -> "Writes":
        """scheduler_logs row (contract §6): running | completed | failed."""
        self.logs.append((task_name, status, details))
        return self

    def call(self, write: Callable[[asyncpg.Connection], Awaitable[Any]]) -> "Writes":
        """A write of its own (e.g. common.alerts.ensure_alert), run on the same transaction."""
        self.calls.append(write)
        return self

    def extend(self, other: "Writes") -> None:
        for run_id, change in other.runs.items():
            mine = self._run(run_id)
            mine.details.update(change.details)
            if change.status is not None:
                mine.status, mine.followup = change.status, None
            elif change.followup is not None:
                mine.followup = change.followup
        self.links += other.links
        self.events += other.events
        self.logs += other.logs
        self.calls += other.calls

    async def write(self, conn: asyncpg.Connection | Database) -> None:
        """Run the statements on `conn` (the caller's transaction, if any)."""
        for call in self.calls:
            await call(conn)
        if self.runs:
            ids = sorted(self.runs)  # rows locked in id order
            changes = [self.runs[i] for i in ids]
            if any(c.status is not None for c in changes) and self.now is None:
                raise ValueError("a finish needs the time it finished")
            await conn.execute(
                _RUNS_SQL, ids, [_json(c.details) for c in changes], [c.status for c in changes],
                [c.followup[0] if c.followup else None for c in changes],
                [naive_utc(c.followup[1]) if c.followup else None for c in changes],
                naive_utc(self.now) if self.now else None)
        if self.links:
            await conn.execute(_LINKS_SQL, *map(list, zip(*self.links)))
        await add_zone_events(conn, self.events)
        if self.logs:
            await conn.execute(_LOGS_SQL, [e[0] for e in self.logs], [e[1] for e in self.logs],
                               [_json(e[2]) for e in self.logs])

    async def flush(self, db: Database) -> None:
        """Write everything in one transaction (a single statement needs none)."""
        statements = bool(self.runs) + bool(self.links) + bool(self.events) + bool(self.logs) + len(self.calls)
        if statements == 1 and not self.calls:
            await self.write(db)
        elif statements:
            async with db.transaction() as conn:
                await self.write(conn)


async def finish(conn: asyncpg.Connection | Database, run_id: int, status: str, details: dict[str, Any],
                 now: dt.datetime) -> None:
    await Writes(now).finish(run_id, status, details).write(conn)


async def update_details(conn: asyncpg.Connection | Database, run_id: int, details: dict[str, Any]) -> None:
    await Writes().details(run_id, details).write(conn)


async def set_followup(conn: asyncpg.Connection | Database, run_id: int, kind: str, at: dt.datetime) -> None:
    await Writes().followup(run_id, kind, at).write(conn)


async def link_command(conn: asyncpg.Connection | Database, run_id: int, cmd_id: str, node_uid: str,
                       channel: str, cmd: str) -> None:
    await Writes().link(run_id, cmd_id, node_uid, channel, cmd).write(conn)


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
    await Writes().log(task_name, status, details).write(conn)


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

