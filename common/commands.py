"""Issuing commands to nodes and their `commands` lifecycle; what a command may be is common.command_catalogue.

`issue_command` is the one path every service publishes a command through (contract §4):
validate (catalogue, then the target channel's kind and safe_limits) → `commands` row →
publish QoS1 → row `sent`. A publish that fails leaves the row `pending` (never a false `sent`).

A repeated cmd_id answers with the command's real state: published (again) while its row is
`pending` and was never handed to the broker — a row Laravel wrote before calling us, or one
left by a failed publish — and completed with what was sent (node, channel, params);
answered as a repeat once `sent` / `ack`; refused (CommandConflict) once `failed` / `timeout`,
or when the same cmd_id comes with a different command.
History-logger moves rows to ack / failed (`record_response`) and timeout (`sweep_timeouts`).
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from . import metrics
from .command_catalogue import (CATALOGUE, PUMP, UNKNOWN, CommandError, channel_kind, limit_problem, normalise_params,
                                run_ms, safe_limits, validate_command)
from .db import PG_UNAVAILABLE, Database
from .mqtt import MqttClient
from .schemas import BIGINT_MAX, DEFAULT_SAFE_LIMITS, CommandResponse
from .topics import Topics, TopicError, check_segment

DEADLOCK_ATTEMPTS = 4
log = logging.getLogger("common.commands")


class CommandConflict(CommandError):
    """The cmd_id is taken by a different command, or by one that already failed / timed out."""


class CommandPublishError(RuntimeError):
    """The broker did not take the command; its row stays `pending`."""


def new_cmd_id() -> str:
    """A UUIDv7: unique, and sortable by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & (2**62 - 1)
    return str(uuid.UUID(int=value))


def build_payload(cmd: str, cmd_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """Parameters flat at the top level (what firmware reads) and nested under `params`
    (what the original bridge sent); flat keys never override cmd / cmd_id (contract I-6)."""
    payload: dict[str, Any] = {k: v for k, v in params.items() if k not in ("cmd", "cmd_id", "params", "ts")}
    payload.update(cmd=cmd, cmd_id=cmd_id, params=params, ts=int(time.time()))
    return payload


# ---------------------------------------------------------------------------------------
# Issuing
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IssuedCommand:
    cmd_id: str
    status: str
    topic: str
    published: bool  # False when the cmd_id had already been published before


async def issue_command(
    db: Database,
    mqtt: MqttClient,
    topics: Topics,
    *,
    gh_uid: str,
    zone_id: int,
    node_uid: str,
    channel: str,
    cmd: str,
    params: dict[str, Any] | None = None,
    cmd_id: str | None = None,
    source: str = "bridge",
) -> IssuedCommand:
    """Validate, record, publish QoS1 and mark `sent`; see the module docstring.

    Raises CommandError (refused, nothing recorded; CommandConflict for a cmd_id taken by another
    or a closed command) or CommandPublishError (row left `pending`, a retry publishes it)."""
    try:
        if isinstance(zone_id, bool) or not isinstance(zone_id, int) or not 1 <= zone_id <= BIGINT_MAX:
            raise TopicError(f"zone id must be a positive 64-bit integer, got {str(zone_id)[:24]}")
        topic = topics.command(gh_uid, zone_id, node_uid, channel)
        if cmd_id is not None:
            check_segment(cmd_id, "cmd_id")
    except TopicError as exc:
        metrics.COMMANDS_REJECTED.labels("unsafe_topic").inc()
        raise CommandError(str(exc)) from None
    params = validate_command(cmd, params)  # the channel's kind and limits are checked with its row, in the batch
    request = _Request(topic, zone_id, node_uid, channel, cmd, params, orjson.dumps(params).decode(),
                       cmd_id or new_cmd_id(), source, asyncio.get_running_loop().create_future())
    _issuer(db, mqtt).submit(request)
    return await request.future


@dataclass
class _Request:
    topic: str
    zone_id: int
    node_uid: str
    channel: str
    cmd: str
    params: dict[str, Any]
    params_json: str  # serialised before batching: a value JSON cannot carry fails its own request only
    cmd_id: str
    source: str
    future: asyncio.Future


def _resolve(future: asyncio.Future, outcome: Any) -> None:
    """Answer a caller unless it stopped waiting (cancelled) or was answered already."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


_issuers: "weakref.WeakKeyDictionary[MqttClient, _Issuer]" = weakref.WeakKeyDictionary()


def _issuer(db: Database, mqtt: MqttClient) -> "_Issuer":
    issuer = _issuers.get(mqtt)
    if issuer is None or issuer.db is not db:
        issuer = _issuers[mqtt] = _Issuer(db, mqtt)
    return issuer


# Facts of the targeted channels, and when each pump last ran (for min_off_ms) where the check needs it.
_LOOKUP = """
SELECT r.cmd_id, r.uid, r.channel, n.id AS node_id, nc.id AS channel_id, nc.type, nc.config, last.sent_at, last.cmd,
       last.params, extract(epoch FROM (now() - last.sent_at)) * 1000 AS since_ms
  FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[]) AS r(uid, channel, cmd_id, runs)
  LEFT JOIN (SELECT n.id, n.uid FROM nodes n WHERE n.uid = ANY($1::text[])) n ON n.uid = r.uid
  LEFT JOIN node_channels nc ON nc.node_id = n.id AND nc.channel = r.channel
  LEFT JOIN LATERAL (
        SELECT c.sent_at, c.cmd, c.params FROM commands c
         WHERE r.runs AND c.node_id = n.id AND c.channel = r.channel AND c.status IN ('sent', 'ack')
           AND c.cmd_id <> r.cmd_id AND c.sent_at IS NOT NULL AND c.sent_at > now() - interval '1 hour'
           AND c.cmd IN ('run_pump', 'dose', 'set_state')
         ORDER BY c.sent_at DESC LIMIT 1) last ON true
"""
CLAIM_LEASE_SEC = 60  # a claim older than this was left by a process that died while publishing


class _Issuer:
    """Group commit: commands issued while batches are in flight go together in a next one, sharing
    three database round trips (look up channels, record and claim, mark sent) instead of paying
    them each. One command alone is a batch of one: no waiting for company. Up to MAX_IN_FLIGHT
    batches are issued at once, so one batch's round trips and PUBACKs overlap another's.

    A row is claimed for publishing by setting `sent_at` while still `pending`, atomically: our new
    rows are inserted claimed; a `pending` row (Laravel's, or one a failed publish left) is claimed
    in the same statement. So it is published once, a repeated or concurrent cmd_id never twice. A
    cmd_id already in a batch of this process is not put in another: its requests wait for that
    batch and get its answer. A failed publish clears `sent_at`, so the same cmd_id can be retried.
    If a batch statement fails, its members are retried one by one, so a command only ever fails
    for its own reasons."""

    MAX_BATCH = 500
    MAX_IN_FLIGHT = 3

    def __init__(self, db: Database, mqtt: MqttClient):
        self.db = db
        self.mqtt = mqtt
        self.queue: list[_Request] = []
        self.workers = 0
        self.tasks: set[asyncio.Task] = set()
        # cmd_id of every request in a batch being issued → later requests for it (answered with the batch)
        self.in_flight: dict[str, list[_Request]] = {}
        # Channels looked up one batch at a time: each sees the pumps the batches before it switch on.
        self.checking = asyncio.Lock()
        self.moving: dict[object, set[tuple[str, str]]] = {}  # pumps each batch in flight switches on

    def submit(self, request: _Request) -> None:
        self.queue.append(request)
        if self.workers < self.MAX_IN_FLIGHT:
            self.workers += 1
            task = asyncio.create_task(self._drain())
            self.tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self.tasks.discard)

    async def _drain(self) -> None:
        try:
            while self.queue:
                batch = self._take()
                if batch:
                    await self._run(batch)
        finally:
            self.workers -= 1

    def _take(self) -> list[_Request]:
        taken, self.queue = self.queue[:self.MAX_BATCH], self.queue[self.MAX_BATCH:]
        batch: list[_Request] = []
        for request in taken:
            if request.future.cancelled():  # its caller gave up before it was sent
                continue
            waiting = self.in_flight.get(request.cmd_id)
            if waiting is not None:
                waiting.append(request)
            else:
                batch.append(request)
        for request in batch:
            self.in_flight.setdefault(request.cmd_id, [])
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        leaders: dict[str, _Request] = {}
        for request in batch:
            leaders.setdefault(request.cmd_id, request)
        outcomes: dict[str, Any] = {}
        try:
            try:
                outcomes = await self._process(batch)
            except PG_UNAVAILABLE as exc:  # the database is down or too slow: every caller hears it at once
                outcomes = dict.fromkeys(leaders, exc)
            except Exception as exc:  # noqa: BLE001
                if len(leaders) == 1:
                    outcomes = dict.fromkeys(leaders, exc)
                else:
                    log.warning("command_batch_failed", extra={"size": len(batch), "error": repr(exc)})
                    # each on its own: one bad command never fails its neighbours
                    for cmd_id, leader in leaders.items():
                        waiting = [r for r in batch if r.cmd_id == cmd_id] + self.in_flight.get(cmd_id, [])
                        if all(r.future.done() for r in waiting):
                            continue
                        try:
                            outcomes.update(await self._process([leader]))
                        except Exception as single:  # noqa: BLE001 - e.g. database down: this caller hears it
                            outcomes[cmd_id] = single
        finally:
            for request in batch + [r for cmd_id in leaders for r in self.in_flight.pop(cmd_id, [])]:
                if request.cmd_id not in outcomes:  # the issuing itself was cancelled: so is the caller's wait
                    request.future.cancel()
                    continue
                outcome = outcomes[request.cmd_id]
                if request is not leaders[request.cmd_id] and isinstance(outcome, IssuedCommand):
                    outcome = IssuedCommand(outcome.cmd_id, outcome.status, request.topic, published=False)
                _resolve(request.future, outcome)

    async def _process(self, batch: list[_Request]) -> dict[str, Any]:
        """The outcome of each cmd_id of the batch."""
        leaders: dict[str, _Request] = {}
        for request in batch:
            leaders.setdefault(request.cmd_id, request)
        outcomes: dict[str, Any] = {}
        valid: list[_Request] = []
        token = object()
        async with self.checking:
            # Pumps switched on by batches in flight, whose rows this lookup may not see as sent yet.
            earlier = set().union(*self.moving.values())
            moving = set(earlier)
            facts = await self._lookup(list(leaders.values()))
            node_ids = {row["uid"]: row["node_id"] for row in facts.values()}
            for request in leaders.values():
                try:
                    self._check_channel(request, facts.get(request.cmd_id), moving)
                except CommandError as exc:
                    outcomes[request.cmd_id] = exc
                    continue
                valid.append(request)
            self.moving[token] = moving - earlier
        try:
            if valid:
                outcomes.update(await self._publish(valid, node_ids))
        finally:
            del self.moving[token]
        return outcomes

    async def _lookup(self, requests: list[_Request]) -> dict[str, Any]:
        """The _LOOKUP row of each cmd_id. A pump's last run is read only for the commands the min_off
        check can need it for (scanning a busy pump's recent commands is the costly part); one that
        switches the pump on only by its channel's config gets it in a second read."""
        def rows_of(batch: list[_Request], runs: list[bool]) -> Any:
            return self.db.fetch(_LOOKUP, [r.node_uid for r in batch], [r.channel for r in batch],
                                 [r.cmd_id for r in batch], runs)

        def may_run(request: _Request, config: Any) -> bool:
            return run_ms(request.cmd, request.params, config) is not None

        runs = [may_run(r, {}) for r in requests]
        facts = {row["cmd_id"]: row for row in await rows_of(requests, runs)}
        again = []
        for request, read in zip(requests, runs):
            row = facts.get(request.cmd_id)
            config = row["config"] if row is not None and isinstance(row["config"], dict) else {}
            if not read and row is not None and may_run(request, config):
                again.append(request)
        if again:
            facts.update({row["cmd_id"]: row for row in await rows_of(again, [True] * len(again))})
        return facts

    @staticmethod
    def _check_channel(request: _Request, row: Any, moving: set[tuple[str, str]]) -> None:
        """The command against the channel it targets (every source gets this): the channel must be
        known, of a kind the command is for, and the run within its safe_limits."""
        spec = CATALOGUE[request.cmd]
        if spec.passthrough:  # UI zone command: not a channel actuation (§4.2), forwarded faithfully
            return
        where = f"channel {request.channel!r} of node {request.node_uid!r}"
        if row is None or row["node_id"] is None:
            metrics.COMMANDS_REJECTED.labels("unknown_channel").inc()
            raise CommandError(f"{request.cmd}: node {request.node_uid!r} is not in the database")
        if row["channel_id"] is None:
            metrics.COMMANDS_REJECTED.labels("unknown_channel").inc()
            raise CommandError(f"{request.cmd}: {where} is not in the database")
        config = row["config"] if isinstance(row["config"], dict) else {}
        kind = channel_kind(request.channel, row["type"], config)
        if kind not in spec.on:
            metrics.COMMANDS_REJECTED.labels("wrong_channel").inc()
            raise CommandError(f"{request.cmd} is for {' or '.join(spec.on)} channels; {where} is "
                               f"{'a ' + kind if kind != UNKNOWN else 'of unknown kind'} channel")
        problem = limit_problem(request.cmd, request.params, config)
        if problem:
            metrics.COMMANDS_REJECTED.labels("safe_limits").inc()
            raise CommandError(problem)
        # Every source: the node refuses a run inside min_off (`pump_busy`) with the §4.3 default when
        # its NodeConfig states none, so a run we cannot pace would only come back as a failure.
        min_off = safe_limits(config).get("min_off_ms", DEFAULT_SAFE_LIMITS["min_off_ms"])
        if kind != PUMP or run_ms(request.cmd, request.params, config) is None:
            return
        key = (request.node_uid, request.channel)
        if key in moving:
            metrics.COMMANDS_REJECTED.labels("min_off").inc()
            raise CommandError(f"{request.cmd}: {where} is switched on by another command issued at the same "
                               f"moment (safe_limits.min_off_ms={min_off})")
        if row["sent_at"] is not None:
            last_params = row["params"] if isinstance(row["params"], dict) else {}
            wait_ms = (run_ms(row["cmd"], last_params, config) or 0) + min_off - float(row["since_ms"])
            if wait_ms > 0:
                metrics.COMMANDS_REJECTED.labels("min_off").inc()
                raise CommandError(f"{request.cmd}: {where} is running or resting after its last run "
                                   f"(safe_limits.min_off_ms={min_off}); retry in {math.ceil(wait_ms / 100) / 10:g} s")
        moving.add(key)

    async def _publish(self, batch: list[_Request], node_ids: dict[str, int]) -> dict[str, Any]:
        """Record and claim, settle repeats, publish, mark sent; the outcome of each cmd_id."""
        outcomes: dict[str, Any] = {}
        ids = [r.cmd_id for r in batch]
        # New rows are inserted claimed; Laravel's pre-written ones, ones a failed publish left, and
        # stale claims of a process that died while publishing are claimed by the same statement.
        claimed = {row["cmd_id"]: row for row in await _update_in_order(
            self.db, "claim", _RECORD_AND_CLAIM, ids, [r.zone_id for r in batch],
            [node_ids.get(r.node_uid) for r in batch], [r.channel for r in batch], [r.cmd for r in batch],
            [r.params_json for r in batch], [r.source for r in batch], float(CLAIM_LEASE_SEC))}
        mine: list[_Request] = []
        for request in batch:
            row = claimed.get(request.cmd_id)
            if row is None:
                continue
            conflict = None if row["inserted"] else _difference(row, request, node_ids.get(request.node_uid))
            if conflict:  # a row written for another command: left as it was
                metrics.COMMANDS_REJECTED.labels("cmd_id_conflict").inc()
                outcomes[request.cmd_id] = CommandConflict(
                    f"cmd_id {request.cmd_id!r} is already used by a different command ({conflict})")
            else:
                mine.append(request)
        unclaim = [r.cmd_id for r in batch if r.cmd_id in claimed and r.cmd_id in outcomes]
        if unclaim:
            await _update_in_order(self.db, "unclaim", _UNCLAIM_CONFLICT, unclaim)
        repeats = [r for r in batch if r.cmd_id not in claimed]
        if repeats:
            await self._settle_repeats(repeats, node_ids, outcomes)
        for request in mine:
            metrics.COMMANDS_TOTAL.labels(request.cmd, request.source).inc()
        results = await asyncio.gather(
            *(self.mqtt.publish_json(r.topic, build_payload(r.cmd, r.cmd_id, r.params)) for r in mine),
            return_exceptions=True)
        sent = [r for r, result in zip(mine, results) if result is None]
        failed = [(r, result) for r, result in zip(mine, results) if result is not None]
        if failed:
            await _update_in_order(self.db, "unclaim", _UNCLAIM, [r.cmd_id for r, _ in failed])
        if sent:
            try:  # the row gets what was sent: Laravel's zone rows lack node and channel, its params may be []
                await _update_in_order(self.db, "sent", _MARK_SENT, [r.cmd_id for r in sent], [r.zone_id for r in sent],
                                       [node_ids.get(r.node_uid) for r in sent], [r.channel for r in sent],
                                       [r.params_json for r in sent])
            except Exception as exc:  # noqa: BLE001 - the broker has them: the callers hear "sent" all the same
                # The rows stay pending with their claim; a node's response still settles them.
                log.warning("command_mark_sent_failed", extra={"count": len(sent), "error": repr(exc)})
        for request in sent:
            metrics.COMMANDS_PUBLISHED.labels(request.cmd, request.source).inc()
            outcomes[request.cmd_id] = IssuedCommand(request.cmd_id, "sent", request.topic, published=True)
        for request, error in failed:
            metrics.COMMANDS_FAILED.labels("publish").inc()
            outcomes[request.cmd_id] = CommandPublishError(f"command {request.cmd_id} not sent: {error}")
        return outcomes

    async def _settle_repeats(self, repeats: list[_Request], node_ids: dict[str, int],
                              outcomes: dict[str, Any]) -> None:
        """Answer cmd_ids whose row was not claimable from the row's state."""
        rows = {row["cmd_id"]: row for row in await self.db.fetch(
            "SELECT cmd_id, zone_id, node_id, channel, cmd, params, status, sent_at FROM commands"
            " WHERE cmd_id = ANY($1::text[])", [r.cmd_id for r in repeats])}
        for request in repeats:
            row = rows.get(request.cmd_id)
            if row is None:  # deleted between the insert and now: a retry is safe
                outcomes[request.cmd_id] = CommandPublishError(f"command {request.cmd_id} not sent: row vanished")
                continue
            conflict = _difference(row, request, node_ids.get(request.node_uid))
            if conflict:
                metrics.COMMANDS_REJECTED.labels("cmd_id_conflict").inc()
                outcomes[request.cmd_id] = CommandConflict(
                    f"cmd_id {request.cmd_id!r} is already used by a different command ({conflict})")
            elif row["status"] in ("sent", "ack"):
                outcomes[request.cmd_id] = IssuedCommand(request.cmd_id, row["status"], request.topic, False)
            elif row["status"] == "pending":  # claimed moments ago by another request or replica
                outcomes[request.cmd_id] = CommandPublishError(
                    f"command {request.cmd_id} is being published by another request; retry")
            else:
                metrics.COMMANDS_REJECTED.labels("cmd_id_closed").inc()
                never = " and was never sent" if row["sent_at"] is None else ""
                outcomes[request.cmd_id] = CommandConflict(
                    f"command {request.cmd_id!r} is already {row['status']}{never}; send it again with a new cmd_id")


# Batch updates lock their rows in id order first (SELECT … ORDER BY id FOR UPDATE): two batches, or a
# batch and a transaction that locks rows in the same order, never wait for each other in a circle.
# A transaction that locks in another order (e.g. responses applied in arrival order) can still form
# one; the batch chosen as the victim is simply run again. $1 is always the cmd_id array.
def _lock(condition: str) -> str:
    return f"locked AS (SELECT id FROM commands WHERE cmd_id = ANY($1::text[]) AND {condition} ORDER BY id FOR UPDATE)"


def _locked(condition: str) -> str:
    return f"WITH {_lock(condition)} "


# New rows go in claimed (`sent_at` set); the sibling UPDATE claims the batch's rows that were there
# before this statement (its snapshot does not see the rows the INSERT adds). New rows are inserted
# in cmd_id order, so two replicas inserting the same cmd_ids wait for each other in one order.
_RECORD_AND_CLAIM = """
WITH inserted AS (
  INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, source, sent_at, created_at,
                        updated_at)
  SELECT z.id, t.node_id, t.channel, t.cmd, t.params::jsonb, 'pending', t.cmd_id, t.source, now(), now(), now()
    FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[])
         AS t(cmd_id, zone_id, node_id, channel, cmd, params, source)
    LEFT JOIN zones z ON z.id = t.zone_id
   ORDER BY t.cmd_id
  ON CONFLICT (cmd_id) DO NOTHING
  RETURNING cmd_id),
""" + _lock("status = 'pending' AND (sent_at IS NULL OR sent_at < now() - make_interval(secs => $8))") + """,
claimed AS (
  UPDATE commands c SET sent_at = now(), updated_at = now() FROM locked WHERE c.id = locked.id
  RETURNING c.cmd_id, c.zone_id, c.node_id, c.channel, c.cmd, c.params)
SELECT cmd_id, true AS inserted, NULL::bigint AS zone_id, NULL::bigint AS node_id, NULL::text AS channel,
       NULL::text AS cmd, NULL::jsonb AS params FROM inserted
UNION ALL
SELECT cmd_id, false, zone_id, node_id, channel, cmd, params FROM claimed
"""
_UNCLAIM_CONFLICT = _locked("status = 'pending'") + \
    "UPDATE commands c SET sent_at = NULL FROM locked WHERE c.id = locked.id RETURNING c.cmd_id"
_UNCLAIM = _locked("status = 'pending'") + \
    "UPDATE commands c SET sent_at = NULL, updated_at = now() FROM locked WHERE c.id = locked.id RETURNING c.cmd_id"
# the row gets what was sent: Laravel's zone rows lack node and channel, its params may be []
_MARK_SENT = _locked("status = 'pending'") + """
UPDATE commands c SET status = 'sent', sent_at = now(), updated_at = now(), params = t.params::jsonb,
       zone_id = coalesce(c.zone_id, (SELECT id FROM zones WHERE id = t.zone_id)),
       node_id = coalesce(c.node_id, t.node_id), channel = coalesce(c.channel, t.channel)
  FROM locked, unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[])
       AS t(cmd_id, zone_id, node_id, channel, params)
 WHERE c.id = locked.id AND c.cmd_id = t.cmd_id AND c.status = 'pending'
RETURNING c.cmd_id"""


async def _update_in_order(db: Database, step: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run one of the batch updates; a deadlock victim is retried (the statement was rolled back whole)."""
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            return await db.fetch(sql, *args)
        except asyncpg.exceptions.DeadlockDetectedError:
            if attempt == DEADLOCK_ATTEMPTS:
                raise
            metrics.COMMANDS_DEADLOCK_RETRIES.labels(step).inc()
            await asyncio.sleep(0.02 * attempt)
    raise AssertionError("unreachable")


def _difference(row: Any, request: _Request, node_id: int | None) -> str | None:
    """What differs between a stored command and a request with the same cmd_id (None: the same).
    Columns the row leaves NULL (Laravel's zone commands) are not a difference: they get filled."""
    def shown(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    if row["cmd"] != request.cmd:
        return f"cmd {shown(row['cmd'])} ≠ {shown(request.cmd)}"
    for name, mine in (("zone_id", request.zone_id), ("node_id", node_id), ("channel", request.channel)):
        if row[name] is not None and mine is not None and row[name] != mine:
            return f"{name} {shown(row[name])} ≠ {shown(mine)}"
    try:
        stored = normalise_params(row["cmd"], row["params"])
    except CommandError:
        stored = row["params"]
    if stored != request.params:
        return f"params {shown(stored)} ≠ {shown(request.params)}"
    return None


# ---------------------------------------------------------------------------------------
# Lifecycle (history-logger)
# ---------------------------------------------------------------------------------------
async def record_response(conn: asyncpg.Connection | Database, response: CommandResponse,
                          payload: dict[str, Any]) -> asyncpg.Record | None:
    """Apply a node's command_response while the command is still open (pending / sent).

    Returns the updated row, or None when the cmd_id is unknown or the command was already closed."""
    status = response.command_status
    return await conn.fetchrow(
        """
        UPDATE commands SET status = $2::varchar,
               ack_at = CASE WHEN $2::varchar = 'ack' THEN now() ELSE ack_at END,
               failed_at = CASE WHEN $2::varchar = 'failed' THEN now() ELSE failed_at END,
               error_code = $3, error_message = $4, response = $5, updated_at = now()
         WHERE cmd_id = $1 AND status IN ('pending', 'sent')
        RETURNING id, zone_id, node_id, channel, cmd,
                  CASE WHEN jsonb_typeof(params) = 'object' THEN params ELSE '{}'::jsonb END AS params,
                  status, cmd_id
        """,
        response.cmd_id, status, response.error_code, response.error_message, payload)


_SWEEP = """
WITH locked AS (SELECT id FROM commands WHERE status IN ('pending', 'sent')
                   AND coalesce(sent_at, created_at) < now() - make_interval(secs => $1)
                 ORDER BY id FOR UPDATE)
UPDATE commands c SET status = 'timeout', updated_at = now() FROM locked WHERE c.id = locked.id RETURNING c.id
"""


async def sweep_timeouts(db: Database, timeout_sec: int) -> int:
    """Mark commands with no answer after `timeout_sec` as `timeout` (rows locked in id order, like the
    batch updates); returns how many."""
    return len(await _update_in_order(db, "sweep", _SWEEP, float(timeout_sec)))
