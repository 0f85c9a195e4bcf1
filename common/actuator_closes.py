"""Durable closes of relays opened for a duration (firmware set_relay ignores duration_ms).

The service that opens a valve writes an `actuator_closes` row (owner, node, channel, close_at)
in the same step, and runs `run_due` on its tick: each due row is taken with a short lease
(`retry_at`), closed with `set_relay {state:false}` under the row's own cmd_id (a retry after a
crash republishes the same command, never a second one) and marked done. A row whose close could
not be published stays due and is tried again; one the catalogue refuses is marked done with the
error. A close the node refused or never answered (`commands.status` failed / timeout, as
history-logger records it) is sent again under a new cmd_id, up to MAX_ATTEMPTS times in all.
Times are naive UTC and come from the caller's clock (the scheduler's is injectable).
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import asyncpg

from . import metrics
from .command_catalogue import CommandError
from .commands import CommandPublishError, issue_command, new_cmd_id
from .db import Database
from .mqtt import MqttClient
from .topics import Topics

log = logging.getLogger("common.actuator_closes")

LEASE = dt.timedelta(seconds=30)   # a taken close not finished by then is due again
MAX_ATTEMPTS = 5
KEEP_DONE = dt.timedelta(days=7)   # finished closes are deleted after this (looked at hourly per owner)
_last_purge: dict[str, dt.datetime] = {}

# Closes sent in the last hour that the node refused or never answered: due again, new cmd_id.
_RETRY_UNANSWERED = """
UPDATE actuator_closes c SET done_at = NULL, retry_at = NULL, close_at = $2::timestamp, cmd_id = gen_random_uuid()::text
  FROM commands k
 WHERE c.owner = $1 AND c.done_at IS NOT NULL AND c.error IS NULL AND c.attempts < $3
   AND c.done_at > $2::timestamp - interval '1 hour' AND k.cmd_id = c.cmd_id AND k.status IN ('failed', 'timeout')
"""

_TAKE = """
WITH due AS (
  SELECT id FROM actuator_closes
   WHERE owner = $1 AND done_at IS NULL AND close_at <= $2 AND (retry_at IS NULL OR retry_at <= $2)
     AND ($3::bigint IS NULL OR zone_id = $3)
   ORDER BY close_at LIMIT $4 FOR UPDATE SKIP LOCKED)
UPDATE actuator_closes c SET attempts = c.attempts + 1, retry_at = $5
  FROM due WHERE c.id = due.id
RETURNING c.id, c.zone_id, c.node_uid, c.channel, c.cmd_id, c.reason, c.attempts,
          (SELECT g.uid FROM zones z JOIN greenhouses g ON g.id = z.greenhouse_id WHERE z.id = c.zone_id) AS gh_uid
"""


def _naive(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


async def schedule_close(conn: asyncpg.Connection | Database, *, owner: str, zone_id: int, node_uid: str,
                         channel: str, close_at: dt.datetime, reason: str, opened_cmd_id: str | None = None) -> int:
    """Record that (node, channel) must be closed at `close_at`; returns the row id."""
    return await conn.fetchval(
        "INSERT INTO actuator_closes (owner, zone_id, node_uid, channel, close_at, reason, opened_cmd_id, cmd_id)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        owner, zone_id, node_uid, channel, _naive(close_at), reason, opened_cmd_id, new_cmd_id())


async def run_due(db: Database, mqtt: MqttClient, topics: Topics, *, owner: str, now: dt.datetime,
                  zone_id: int | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Close every relay of `owner` due at `now` (optionally one zone's); returns what was done."""
    now = _naive(now)
    if abs(now - _last_purge.get(owner, dt.datetime.min)) >= dt.timedelta(hours=1):
        _last_purge[owner] = now
        await db.execute("DELETE FROM actuator_closes WHERE owner = $1 AND done_at < $2", owner, now - KEEP_DONE)
    retried = await db.execute(_RETRY_UNANSWERED, owner, now, MAX_ATTEMPTS)
    if retried != "UPDATE 0":
        metrics.COMMANDS_FAILED.labels("close_unanswered").inc(int(retried.split()[-1]))
        log.warning("actuator_close_resent", extra={"owner": owner, "closes": retried.split()[-1]})
    rows = await db.fetch(_TAKE, owner, now, zone_id, limit, now + LEASE)
    same: dict[tuple, list[int]] = {}  # several closes of one relay due together: one command
    for row in rows:
        same.setdefault((row["zone_id"], row["node_uid"], row["channel"]), []).append(row["id"])
    done = []
    for row in rows:
        ids = same[(row["zone_id"], row["node_uid"], row["channel"])]
        if ids[0] != row["id"]:
            continue
        outcome: dict[str, Any] = {"id": row["id"], "zone_id": row["zone_id"], "node_uid": row["node_uid"],
                                   "channel": row["channel"], "cmd_id": row["cmd_id"], "reason": row["reason"]}
        error = None
        try:
            if row["gh_uid"] is None:
                raise CommandError(f"zone {row['zone_id']} has no greenhouse")
            await issue_command(db, mqtt, topics, gh_uid=row["gh_uid"], zone_id=row["zone_id"],
                                node_uid=row["node_uid"], channel=row["channel"], cmd="set_relay",
                                params={"state": False}, cmd_id=row["cmd_id"], source=owner)
        except CommandError as exc:  # will never go out: recorded, not retried
            error = str(exc)
        except (CommandPublishError, OSError, asyncpg.PostgresError) as exc:
            metrics.COMMANDS_FAILED.labels("close_retry").inc()
            log.warning("actuator_close_retry", extra={**outcome, "error": str(exc), "attempts": row["attempts"]})
            continue
        await db.execute("UPDATE actuator_closes SET done_at = $2, error = $3, retry_at = NULL"
                         " WHERE id = ANY($1::bigint[])", ids, now, error)
        if error:
            log.error("actuator_close_refused", extra={**outcome, "error": error})
        done.append(dict(outcome, error=error))
    return done
