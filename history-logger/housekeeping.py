"""Periodic work: command timeout sweep (contract §4.5), offline housekeeping (§5.3), pruning.

Every COMMAND_TIMEOUT_SWEEP_SEC (5 s): commands with no answer after COMMAND_TIMEOUT_SEC → timeout.
Every NODE_OFFLINE_SWEEP_SEC (60 s): online nodes silent for NODE_OFFLINE_TIMEOUT_SEC → offline
(alert + events like an LWT); a zone whose newest telemetry is older than ZONE_NO_TELEMETRY_MIN
gets one NO_TELEMETRY zone event (zones.status is Laravel's and is not touched); committed-entry
records no pending entry can need are pruned.

Silence counts only while we were listening: `listening()` gives (since, until) — since this
service's current MQTT connection, up to the moment before which every received message is in
PostgreSQL (the oldest entry still in the streams, or when input started to be held). A logger,
broker, Redis or database outage therefore never makes a healthy fleet look silent: a node is
offline only if it was not heard from in NODE_OFFLINE_TIMEOUT_SEC of that window.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from common import commands
from common.db import Database
from common.lifecycle import cancel_tasks, every

import ingest_log
import metrics as m
from settings import ServiceSettings
from node_events import mark_offline, utc

log = logging.getLogger("history_logger.housekeeping")

_SILENT_NODES = """
SELECT id, uid, zone_id, status, last_seen_at FROM nodes
 WHERE status = 'online' AND (last_seen_at IS NULL OR last_seen_at < $1::timestamp)
 ORDER BY id FOR UPDATE SKIP LOCKED
"""

_NO_TELEMETRY = """
WITH latest AS (
  SELECT t.zone_id, max(t.updated_at) AS last_at FROM telemetry_last t GROUP BY t.zone_id)
INSERT INTO zone_events (zone_id, type, details, created_at)
SELECT l.zone_id, 'NO_TELEMETRY', jsonb_build_object('last_telemetry_at', l.last_at, 'silent_min', $1::int), now()
  FROM latest l JOIN zones z ON z.id = l.zone_id
 WHERE l.last_at < $2::timestamp
   AND NOT EXISTS (SELECT 1 FROM zone_events e
                    WHERE e.zone_id = l.zone_id AND e.type = 'NO_TELEMETRY' AND e.created_at >= l.last_at)
"""


Window = tuple[float, float]  # (since, until) in epoch seconds


class Housekeeping:
    def __init__(self, db: Database, options: ServiceSettings, timeout_sec: int, offline_sec: int,
                 prune: Callable[[], Awaitable[None]], listening: Callable[[], Awaitable[Window | None]]):
        self.db = db
        self.listening = listening
        self.options = options
        self.timeout_sec = timeout_sec
        self.offline_sec = offline_sec
        self.prune = prune
        self.tasks: list[asyncio.Task] = []
        self.stopping = False

    def start(self) -> None:
        o = self.options
        self.tasks = [asyncio.create_task(self._every(o.timeout_sweep_sec, self.sweep_timeouts), name="sweep"),
                      asyncio.create_task(self._every(o.offline_sweep_sec, self.offline_sweep), name="offline")]

    async def stop(self) -> None:
        self.stopping = True  # besides cancel: a cancel swallowed inside a client library still ends the loop
        await cancel_tasks(self.tasks)
        self.tasks = []

    def _every(self, period: float, job: Callable[[], Awaitable[object]]) -> Awaitable[None]:
        return every(period, job, log, "housekeeping_failed", lambda: not self.stopping)

    async def sweep_timeouts(self) -> int:
        count = await commands.sweep_timeouts(self.db, self.timeout_sec)
        if count:
            m.COMMAND_TIMEOUTS.inc(count)
            log.info("commands_timed_out", extra={"count": count})
        return count

    async def offline_sweep(self) -> int:
        window = await self.listening()
        nodes = []
        if window is None:
            log.info("offline_sweep_skipped", extra={"why": "not listening (MQTT down or input held)"})
        else:
            since, until = window
            offline_cutoff = until - self.offline_sec
            quiet_cutoff = until - 60 * self.options.no_telemetry_min
            async with self.db.transaction() as conn:
                if since <= offline_cutoff:  # else the silence overlaps our own outage: it says nothing
                    nodes = await conn.fetch(_SILENT_NODES, utc(offline_cutoff))
                    for node in nodes:
                        await mark_offline(conn, node, node["zone_id"], "timeout")
                # (a zone event only, so not held back by `since`: after our own outage it may say
                # what we could not see; never while a backlog is still being written)
                await conn.execute(_NO_TELEMETRY, self.options.no_telemetry_min, utc(quiet_cutoff))
        await self.prune()
        return len(nodes)


async def prune_streams(db: Database, client, streams: list[str], group: str) -> None:
    for stream in streams:
        await ingest_log.prune(db, client, stream, group)
