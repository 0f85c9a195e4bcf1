"""Commands to nodes: ids, the catalogue, validation, publishing and the `commands` lifecycle.

`issue_command` is the one path every service publishes a command through (contract §4):
validate → `commands` row → publish QoS1 → row `sent`. A repeated cmd_id publishes at most
once; a publish that fails leaves the row `pending` (never a false `sent`).
History-logger moves rows to ack / failed (`record_response`) and timeout (`sweep_timeouts`).
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from . import metrics
from .db import Database
from .mqtt import MqttClient
from .schemas import CommandResponse
from .topics import Topics, TopicError, check_segment

OPEN_STATUSES = ("pending", "sent")


class CommandError(ValueError):
    """A command that must not be sent; the message says why."""


class CommandPublishError(RuntimeError):
    """The broker did not take the command; its row stays `pending`."""


def new_cmd_id() -> str:
    """A UUIDv7: unique, and sortable by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & (2**62 - 1)
    return str(uuid.UUID(int=value))


# ---------------------------------------------------------------------------------------
# The catalogue (contract §4.1 firmware commands, §4.2 UI pass-through, §4.3 limits)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    kind: str  # "int" | "float" | "bool"
    required: bool = True
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True)
class CommandSpec:
    params: dict[str, Param] = field(default_factory=dict)
    one_of: tuple[str, ...] = ()  # at least one of these optional params is required
    pump: bool = False            # duration capped by the channel's safe_limits


RUN_PUMP_MAX_MS = 60_000
CATALOGUE: dict[str, CommandSpec] = {
    "run_pump": CommandSpec({"duration_ms": Param("int", True, 1, RUN_PUMP_MAX_MS)}, pump=True),
    "stop_pump": CommandSpec(),
    "dose": CommandSpec({"dose_ml": Param("float", True, 0.1, 5.0)}),
    "set_state": CommandSpec({"state": Param("int", True, 0, 1)}),
    "set_relay": CommandSpec({"state": Param("bool"), "duration_ms": Param("int", False, 1, 3_600_000)}),
    "set_pwm": CommandSpec({"value": Param("float", True, 0, 255)}),
    "calibrate": CommandSpec({"stage": Param("int", True, 0, 10), "known_ph": Param("float", False, 0, 14),
                              "tds_value": Param("float", False, 0, 100_000)}, one_of=("known_ph", "tds_value")),
    # No firmware support yet (contract §4.2): kept for the bridge's fill/drain routines.
    "fill": CommandSpec({"target_level": Param("float", True, 0.1, 1.0)}),
    "drain": CommandSpec({"target_level": Param("float", True, 0.0, 0.9)}),
    # Zone-level UI commands, passed through verbatim.
    "FORCE_IRRIGATION": CommandSpec({"duration_sec": Param("int", True, 1, 3600)}),
    "FORCE_PH_CONTROL": CommandSpec({"target_ph": Param("float", True, 4, 9)}),
    "FORCE_EC_CONTROL": CommandSpec({"target_ec": Param("float", True, 0.1, 10)}),
    "FORCE_CLIMATE": CommandSpec({"target_temp": Param("float", False, 10, 35),
                                  "target_humidity": Param("float", False, 30, 90)}),
    "FORCE_LIGHTING": CommandSpec({"intensity": Param("float", False, 0, 100),
                                   "duration_hours": Param("float", False, 0.5, 24)}),
}


def _check_param(cmd: str, name: str, spec: Param, value: Any) -> None:
    ok_type = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        and value not in (float("inf"), float("-inf")),
        "bool": isinstance(value, bool),
    }[spec.kind]
    if not ok_type:
        kind = {"int": "an integer", "float": "a number", "bool": "true or false"}[spec.kind]
        raise CommandError(f"{cmd}: parameter {name} must be {kind}")
    if spec.lo is not None and value < spec.lo or spec.hi is not None and value > spec.hi:
        raise CommandError(f"{cmd}: parameter {name}={value} is outside the safe range {spec.lo:g}..{spec.hi:g}")


def validate_command(cmd: str, params: dict[str, Any], channel_config: dict | None = None) -> None:
    """Raise CommandError unless `cmd` with `params` is in the catalogue and within limits."""
    spec = CATALOGUE.get(cmd)
    if spec is None:
        metrics.COMMANDS_REJECTED.labels("unknown_command").inc()
        raise CommandError(f"unknown command {cmd!r}; known: {', '.join(sorted(CATALOGUE))}")
    if not isinstance(params, dict):
        raise CommandError(f"{cmd}: params must be an object")
    try:
        for name, pspec in spec.params.items():
            if name in params:
                _check_param(cmd, name, pspec, params[name])
            elif pspec.required:
                raise CommandError(f"{cmd}: parameter {name} is required")
        if spec.one_of and not any(name in params for name in spec.one_of):
            raise CommandError(f"{cmd}: one of {', '.join(spec.one_of)} is required")
        limits = (channel_config or {}).get("safe_limits") or {}
        max_ms = limits.get("max_duration_ms")
        if spec.pump and isinstance(max_ms, int) and params["duration_ms"] > max_ms:
            raise CommandError(f"{cmd}: duration_ms={params['duration_ms']} exceeds the channel's "
                               f"safe_limits.max_duration_ms={max_ms}")
    except CommandError:
        metrics.COMMANDS_REJECTED.labels("invalid_params").inc()
        raise


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

    Raises CommandError (refused, nothing recorded) or CommandPublishError (row left `pending`)."""
    params = dict(params or {})
    try:
        topic = topics.command(gh_uid, zone_id, node_uid, channel)
        if cmd_id is not None:
            check_segment(cmd_id, "cmd_id")
    except TopicError as exc:
        metrics.COMMANDS_REJECTED.labels("unsafe_topic").inc()
        raise CommandError(str(exc)) from None
    validate_command(cmd, params)  # the channel's own limits are checked with its row, in the batch
    request = _Request(topic, zone_id, node_uid, channel, cmd, params, cmd_id or new_cmd_id(), source,
                       asyncio.get_running_loop().create_future())
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
    cmd_id: str
    source: str
    future: asyncio.Future


_issuers: "weakref.WeakKeyDictionary[MqttClient, _Issuer]" = weakref.WeakKeyDictionary()


def _issuer(db: Database, mqtt: MqttClient) -> "_Issuer":
    issuer = _issuers.get(mqtt)
    if issuer is None or issuer.db is not db:
        issuer = _issuers[mqtt] = _Issuer(db, mqtt)
    return issuer


class _Issuer:
    """Group commit: commands issued while a batch is in flight go together in the next one,
    sharing four database round trips (look up nodes, insert, claim, mark sent) instead of
    paying them each. One command alone is a batch of one: no waiting for company.

    A row is claimed for publishing by setting `sent_at` while still `pending`, in one atomic
    UPDATE: a Laravel row that is `pending` is published once, a repeated or concurrent cmd_id
    never twice. A failed publish clears `sent_at`, so the same cmd_id can be retried."""

    MAX_BATCH = 500

    def __init__(self, db: Database, mqtt: MqttClient):
        self.db = db
        self.mqtt = mqtt
        self.queue: list[_Request] = []
        self.worker: asyncio.Task | None = None

    def submit(self, request: _Request) -> None:
        self.queue.append(request)
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self.queue:
            batch, self.queue = self.queue[:self.MAX_BATCH], self.queue[self.MAX_BATCH:]
            try:
                await self._process(batch)
            except Exception as exc:  # noqa: BLE001 - e.g. database down: every caller hears it
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)

    async def _process(self, batch: list[_Request]) -> None:
        leaders: dict[str, _Request] = {}
        followers: list[_Request] = []
        for request in batch:
            if request.cmd_id in leaders:
                followers.append(request)
            else:
                leaders[request.cmd_id] = request
        nodes = {(r["uid"], r["channel"]): r for r in await self.db.fetch(
            "SELECT n.uid, n.id, nc.channel, nc.config FROM nodes n"
            " LEFT JOIN node_channels nc ON nc.node_id = n.id WHERE n.uid = ANY($1::text[])",
            list({r.node_uid for r in leaders.values()}))}
        node_ids = {uid: row["id"] for (uid, _), row in nodes.items()}
        valid: list[_Request] = []
        for request in leaders.values():
            channel_row = nodes.get((request.node_uid, request.channel))
            try:
                validate_command(request.cmd, request.params, channel_row["config"] if channel_row else None)
            except CommandError as exc:
                request.future.set_exception(exc)
                continue
            valid.append(request)
        if valid:
            await self._publish(valid, node_ids)
        for request in followers:
            _settle_follower(request, leaders[request.cmd_id])

    async def _publish(self, batch: list[_Request], node_ids: dict[str, int]) -> None:
        ids = [r.cmd_id for r in batch]
        await self.db.execute(
            """
            INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, source, created_at, updated_at)
            SELECT z.id, t.node_id, t.channel, t.cmd, t.params::jsonb, 'pending', t.cmd_id, t.source, now(), now()
              FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
                   AS t(zone_id, node_id, channel, cmd, params, cmd_id, source)
              LEFT JOIN zones z ON z.id = t.zone_id
            ON CONFLICT (cmd_id) DO NOTHING
            """,
            [r.zone_id for r in batch], [node_ids.get(r.node_uid) for r in batch], [r.channel for r in batch],
            [r.cmd for r in batch], [orjson.dumps(r.params).decode() for r in batch], ids, [r.source for r in batch])
        claimed = {row["cmd_id"] for row in await self.db.fetch(
            "UPDATE commands SET sent_at = now(), updated_at = now()"
            " WHERE cmd_id = ANY($1::text[]) AND status = 'pending' AND sent_at IS NULL RETURNING cmd_id", ids)}
        others = [r for r in batch if r.cmd_id not in claimed]
        if others:
            status = {row["cmd_id"]: row["status"] for row in await self.db.fetch(
                "SELECT cmd_id, status FROM commands WHERE cmd_id = ANY($1::text[])", [r.cmd_id for r in others])}
            for request in others:
                request.future.set_result(IssuedCommand(request.cmd_id, status[request.cmd_id], request.topic, False))
        mine = [r for r in batch if r.cmd_id in claimed]
        for request in mine:
            metrics.COMMANDS_TOTAL.labels(request.cmd, request.source).inc()
        results = await asyncio.gather(
            *(self.mqtt.publish_json(r.topic, build_payload(r.cmd, r.cmd_id, r.params)) for r in mine),
            return_exceptions=True)
        sent = [r for r, result in zip(mine, results) if result is None]
        failed = [(r, result) for r, result in zip(mine, results) if result is not None]
        if sent:
            await self.db.execute("UPDATE commands SET status = 'sent', sent_at = now(), updated_at = now()"
                                  " WHERE cmd_id = ANY($1::text[]) AND status = 'pending'", [r.cmd_id for r in sent])
        if failed:
            await self.db.execute("UPDATE commands SET sent_at = NULL, updated_at = now()"
                                  " WHERE cmd_id = ANY($1::text[]) AND status = 'pending'",
                                  [r.cmd_id for r, _ in failed])
        for request in sent:
            metrics.COMMANDS_PUBLISHED.labels(request.cmd, request.source).inc()
            request.future.set_result(IssuedCommand(request.cmd_id, "sent", request.topic, published=True))
        for request, error in failed:
            metrics.COMMANDS_FAILED.labels("publish").inc()
            request.future.set_exception(CommandPublishError(f"command {request.cmd_id} not sent: {error}"))


def _settle_follower(follower: _Request, leader: _Request) -> None:
    """A second request for a cmd_id in the same batch answers as a repeat of the first."""
    outcome = leader.future
    if outcome.exception() is not None:
        follower.future.set_exception(outcome.exception())
    else:
        first = outcome.result()
        follower.future.set_result(IssuedCommand(first.cmd_id, first.status, follower.topic, published=False))


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
        RETURNING id, zone_id, node_id, channel, cmd, params, status, cmd_id
        """,
        response.cmd_id, status, response.error_code, response.error_message, payload)


async def sweep_timeouts(db: Database, timeout_sec: int) -> int:
    """Mark commands with no answer after `timeout_sec` as `timeout`; returns how many."""
    result = await db.execute(
        """
        UPDATE commands SET status = 'timeout', updated_at = now()
         WHERE status IN ('pending', 'sent')
           AND coalesce(sent_at, created_at) < now() - make_interval(secs => $1)
        """, float(timeout_sec))
    return int(result.split()[-1])
