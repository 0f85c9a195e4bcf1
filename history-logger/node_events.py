"""Node life signs from the events stream → PostgreSQL (contract §3.2–3.4, §3.7, §3.9, I-5).

One transaction per batch: entry ids recorded (ingest_log), then
1. liveness in ONE statement: every node heard from in the batch — a live (not retained) status
   ONLINE, heartbeat, command_response, config_response, or telemetry (the receiver announces
   a node's telemetry at most every few seconds, see receiver.py) — is `online` with
   `last_seen_at`; a node that was not online gets DEVICE_ONLINE and its NODE_OFFLINE alert
   resolved;
2. all heartbeats' columns in ONE UPDATE (each field checked against its bounds alone);
3. status OFFLINE / lwt / command_response in arrival order, each in a savepoint. An lwt or
   status OFFLINE followed in the same batch by a life sign of the node is superseded by it.
Offline: nodes.status, a NODE_OFFLINE alert (one per node), DEVICE_OFFLINE + NODE_OFFLINE zone
events. A *retained* lwt or status is only a hint (the broker re-sends it after every
reconnect): a retained lwt applies only when nodes.last_seen_at is old, a retained ONLINE never.

Every message that cannot be applied — bad JSON, unknown status, a response from a node the
command was not sent to, a row PostgreSQL refuses, a bug — is counted in
`history_logger_events_invalid_total{kind,reason}` and dead-lettered with its reason; it never
holds up the batch (only a database outage does: the batch is retried as a whole).
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import asyncpg
import orjson
import redis.asyncio as redis
from pydantic import ValidationError

from common import alerts, commands
from common.db import PG_TRANSIENT, Database
from common.env import Settings
from common.redis_client import REDIS_TRANSIENT
from common.schemas import CommandResponse, Heartbeat, Status
from common.topics import ParsedTopic, Topics, TopicError

import ingest_log
import metrics as m
from stream_consumer import Entry, Transient

T = TypeVar("T")
log = logging.getLogger("history_logger.events")

INT32_MAX = 2**31 - 1
FREE_HEAP_MAX = 16 * 1024 * 1024   # bytes; an ESP32 with 8 MB PSRAM reports less than this
RSSI_RANGE = (-127, 0)             # dBm as Wi-Fi drivers report it
KNOWN_STATUSES = {"online", "offline"}

# Nodes heard from: locked in id order (as the offline sweep does), then online with last_seen_at
# moved forward only.
_LOCK_COMMANDS = "SELECT id FROM commands WHERE cmd_id = ANY($1::text[]) ORDER BY id FOR UPDATE"
_LOCK_NODES = "SELECT id, uid, zone_id, status FROM nodes WHERE uid = ANY($1::text[]) ORDER BY id FOR UPDATE"
_LIFE_SIGNS = """
UPDATE nodes n SET status = 'online', last_seen_at = greatest(coalesce(n.last_seen_at, u.at), u.at),
       updated_at = now()
  FROM unnest($1::text[], $2::timestamp[]) AS u(uid, at)
 WHERE n.uid = u.uid
   AND (n.status IS DISTINCT FROM 'online' OR n.last_seen_at IS NULL OR n.last_seen_at < u.at)
"""

_HEARTBEATS = """
UPDATE nodes n
   SET uptime_seconds = coalesce(u.uptime, n.uptime_seconds),
       free_heap_bytes = coalesce(u.heap, n.free_heap_bytes),
       rssi = coalesce(u.rssi, n.rssi),
       last_heartbeat_at = u.at,
       updated_at = now()
  FROM unnest($1::text[], $2::int[], $3::int[], $4::int[], $5::timestamp[]) AS u(uid, uptime, heap, rssi, at)
 WHERE n.uid = u.uid
"""

# The command a response answers, with where it was sent (contract §3.9: tied to its node).
_COMMAND_TARGET = """
SELECT c.node_id, n.uid AS node_uid, c.zone_id, g.uid AS gh_uid
  FROM commands c
  LEFT JOIN nodes n ON n.id = c.node_id
  LEFT JOIN zones z ON z.id = c.zone_id
  LEFT JOIN greenhouses g ON g.id = z.greenhouse_id
 WHERE c.cmd_id = $1
"""


class Refused(Exception):
    """One message that cannot be applied; `reason` is the metric label and dead-letter reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Event:
    entry_id: bytes
    topic: ParsedTopic
    payload: bytes
    retained: bool
    at: dt.datetime
    index: int           # arrival order in the batch


def utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).replace(tzinfo=None)


async def node_zone(conn: asyncpg.Connection, node_zone_id: int | None, topic_zone_id: int | None) -> int | None:
    """The node's DB zone wins; else the topic's `zn-{id}` if that zone exists (contract I-2)."""
    if node_zone_id is not None:
        return node_zone_id
    if topic_zone_id is not None:
        return await conn.fetchval("SELECT id FROM zones WHERE id = $1", topic_zone_id)
    return None


async def mark_offline(conn: asyncpg.Connection, node: asyncpg.Record, zone_id: int | None, reason: str) -> None:
    """nodes.status offline + NODE_OFFLINE alert (one per node) + zone events on the transition."""
    await conn.execute("UPDATE nodes SET status = 'offline', updated_at = now() WHERE id = $1", node["id"])
    was_online = node["status"] != "offline"
    if was_online:
        m.NODES_OFFLINE.labels(reason).inc()
        log.info("node_offline", extra={"node_uid": node["uid"], "reason": reason})
    if zone_id is None:
        return
    details = {"node_uid": node["uid"], "reason": reason, "message": f"Node {node['uid']} is offline"}
    _, created = await alerts.ensure_alert(conn, zone_id=zone_id, alert_type="NODE_OFFLINE", details=details,
                                           match={"node_uid": node["uid"]})
    if was_online or created:
        for event in ("DEVICE_OFFLINE", "NODE_OFFLINE"):
            await alerts.add_zone_event(conn, zone_id, event, {"node_uid": node["uid"], "reason": reason})


async def mark_online(conn: asyncpg.Connection, node: asyncpg.Record, zone_id: int | None) -> None:
    """The transition to online (contract §3.2): DEVICE_ONLINE, the node's NODE_OFFLINE alert resolved."""
    m.NODES_ONLINE.inc()
    log.info("node_online", extra={"node_uid": node["uid"], "was": node["status"]})
    if zone_id is None:
        return
    await alerts.add_zone_event(conn, zone_id, "DEVICE_ONLINE", {"node_uid": node["uid"]})
    await alerts.resolve_alerts(conn, zone_id=zone_id, alert_type="NODE_OFFLINE", match={"node_uid": node["uid"]})


class NodeEvents:
    def __init__(self, settings: Settings, db: Database, stream: str, client: redis.Redis | None = None,
                 dead_key: str | None = None, dead_max: int = 10_000):
        self.settings = settings
        self.db = db
        self.stream = stream
        self.redis = client
        self.dead_key = dead_key
        self.dead_max = dead_max
        self.topics = Topics(settings.mqtt_topic_root)
        self.offline_after = dt.timedelta(seconds=settings.node_offline_timeout_sec)
        self._reported: set[tuple[str, str]] = set()

    async def handle(self, entries: list[Entry]) -> None:
        dead: list[dict] = []
        try:
            async with self.db.transaction() as conn:
                fresh = await ingest_log.claim(conn, self.stream, [eid for eid, _ in entries])
                events = []
                for index, (entry_id, fields) in enumerate(entries):
                    if entry_id in fresh:
                        event = self._decode(entry_id, fields, index, dead)
                        if event is not None:
                            events.append(event)
                await self._apply(conn, events, dead)
        except PG_TRANSIENT as exc:
            raise Transient(f"database: {exc}") from exc
        if dead:
            await self._dead_letter(dead)

    def _decode(self, entry_id: bytes, fields: dict[bytes, bytes], index: int, dead: list[dict]) -> Event | None:
        try:
            topic = fields[b"t"].decode()
            parsed = self.topics.parse(topic)
            return Event(entry_id, parsed, fields[b"p"], fields.get(b"ret") == b"1", utc(float(fields[b"at"])), index)
        except (KeyError, ValueError, OverflowError, TopicError) as exc:
            self._refuse(dead, "unknown", Refused("unknown_topic", str(exc)[:200]), fields.get(b"t", b""),
                         fields.get(b"p", b""))
            return None

    # -- one batch ----------------------------------------------------------------------
    async def _apply(self, conn: asyncpg.Connection, events: list[Event], dead: list[dict]) -> None:
        signs: dict[str, Event] = {}          # node uid → its latest life sign in this batch
        heartbeats: list[tuple[Event, tuple]] = []
        ordered: list[tuple[Event, Callable[..., Awaitable[None]], Any]] = []
        for ev in events:
            try:
                step = self._classify(ev, heartbeats)
            except Refused as exc:
                self._refuse(dead, ev.topic.kind, exc, ev)
                continue
            except Exception as exc:  # noqa: BLE001 - a message the code did not foresee: dead-lettered alone
                log.exception("event_failed", extra={"kind": ev.topic.kind})
                self._refuse(dead, ev.topic.kind, Refused("handler_error", repr(exc)[:300]), ev)
                continue
            if step is None:
                continue
            life_sign, handler, arg = step
            if life_sign and not ev.retained and ev.topic.node:
                signs[ev.topic.node] = ev
            if handler is not None:
                ordered.append((ev, handler, arg))
        if signs:
            await self._guarded(conn, list(signs.values()), dead, lambda: self._life_signs(conn, signs))
        if heartbeats:
            await self._guarded(conn, [ev for ev, _ in heartbeats], dead, lambda: self._heartbeats(conn, heartbeats))
        cmd_ids = [arg[0].cmd_id for _, handler, arg in ordered if handler == self._command_response]
        if cmd_ids:  # every writer of `commands` locks its rows in id order: no deadlock between them
            try:
                async with conn.transaction():
                    await conn.execute(_LOCK_COMMANDS, cmd_ids)
            except PG_TRANSIENT:
                raise
            except (asyncpg.PostgresError, UnicodeError):
                pass  # an id PostgreSQL cannot hold (NUL, …): its own handler refuses it below
        for ev, handler, arg in ordered:
            later = signs.get(ev.topic.node)
            superseded = later is not None and later.index > ev.index
            await self._guarded(conn, [ev], dead, lambda: handler(conn, ev, arg, superseded))

    def _classify(self, ev: Event, heartbeats: list) -> tuple[bool, Callable | None, Any] | None:
        """(is a life sign, ordered handler or None, its argument), or None: nothing to do."""
        kind = ev.topic.kind
        if kind == "telemetry":      # announced by the receiver: the node sent telemetry
            return True, None, None
        if kind == "heartbeat":
            m.HEARTBEATS.inc()
            heartbeats.append((ev, self._heartbeat_values(ev)))
            return True, None, None
        if kind == "status":
            m.STATUS.labels("status").inc()
            if not ev.payload.strip():
                return None  # an empty retained payload only clears the broker's copy
            status = _validated(ev.payload, Status).normalised
            if status not in KNOWN_STATUSES:
                raise Refused("unknown_status", f"status {status[:40]!r} is neither ONLINE nor OFFLINE")
            if status == "online":
                return (not ev.retained), None, None  # a retained ONLINE says nothing about now
            return False, self._offline, "status"
        if kind == "lwt":
            m.STATUS.labels("lwt").inc()
            if not ev.payload.strip():
                return None
            if _lwt_text(ev.payload) != b"offline":
                raise Refused("invalid_payload", "lwt is not 'offline'")
            return False, self._offline, "lwt"
        if kind == "command_response":
            m.COMMAND_RESPONSES.inc()
            data = _json_object(ev.payload)
            response = _validated(ev.payload, CommandResponse, data)
            return True, self._command_response, (response, data)
        if kind == "config_response":  # its meaning is device-registry's; here it only says the node lives
            m.CONFIG_RESPONSES.inc()
            _validated(ev.payload, dict)
            return True, None, None
        raise Refused("unknown_topic", f"{kind} is not a life-sign topic")

    async def _guarded(self, conn: asyncpg.Connection, evs: list[Event], dead: list[dict],
                       work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` in a savepoint; a refusal or any non-transient failure dead-letters `evs`."""
        try:
            async with conn.transaction():
                await work()
        except PG_TRANSIENT:
            raise
        except Refused as exc:
            for ev in evs:
                self._refuse(dead, ev.topic.kind, exc, ev)
        except asyncpg.PostgresError as exc:
            for ev in evs:
                self._refuse(dead, ev.topic.kind, Refused("db_rejected", str(exc)[:300]), ev)
        except Exception as exc:  # noqa: BLE001 - a bug must not block the stream: those messages are set aside
            log.exception("event_failed", extra={"kind": evs[0].topic.kind if evs else "?"})
            for ev in evs:
                self._refuse(dead, ev.topic.kind, Refused("handler_error", repr(exc)[:300]), ev)

    # -- liveness (§3.2) ----------------------------------------------------------------
    async def _life_signs(self, conn: asyncpg.Connection, signs: dict[str, Event]) -> None:
        uids = sorted(signs)
        nodes = await conn.fetch(_LOCK_NODES, uids)
        if not nodes:
            return
        await conn.execute(_LIFE_SIGNS, uids, [signs[uid].at for uid in uids])
        for node in nodes:
            if node["status"] != "online":
                await mark_online(conn, node, await node_zone(conn, node["zone_id"], signs[node["uid"]].topic.zone_id))

    async def _offline(self, conn, ev: Event, reason: str, superseded: bool) -> None:
        if superseded:
            return  # the node was heard from after it (reconnected): it is online
        node = await self._node(conn, ev.topic.node)
        if node is None:
            return
        if ev.retained and self._recent(node, ev.at):
            return  # the retained will of an earlier drop: the node has been seen since (I-5)
        await mark_offline(conn, node, await node_zone(conn, node["zone_id"], ev.topic.zone_id), reason)

    # -- heartbeat (§3.4) ---------------------------------------------------------------
    def _heartbeat_values(self, ev: Event) -> tuple:
        hb = _validated(ev.payload, Heartbeat)
        if hb.uptime_ms is not None:
            uptime = _bounded_int("uptime_ms", hb.uptime_ms, 0, 1000 * INT32_MAX + 999)
            uptime = None if uptime is None else uptime // 1000
        elif hb.uptime is not None:
            in_ms = self.settings.heartbeat_uptime_ms
            uptime = _bounded_int("uptime", hb.uptime, 0, (1000 * INT32_MAX + 999) if in_ms else INT32_MAX)
            uptime = None if uptime is None else (uptime // 1000 if in_ms else uptime)
        else:
            uptime = None
        heap = _bounded_int("free_heap", hb.free_heap, 0, FREE_HEAP_MAX)
        rssi = _bounded_int("rssi", hb.rssi, *RSSI_RANGE)
        return uptime, heap, rssi, ev.at

    async def _heartbeats(self, conn: asyncpg.Connection, heartbeats: list[tuple[Event, tuple]]) -> None:
        latest: dict[str, tuple] = {}
        for ev, values in heartbeats:
            earlier = latest.get(ev.topic.node)
            # A field a heartbeat could not give keeps the value of the node's earlier one in this batch.
            latest[ev.topic.node] = values if earlier is None else tuple(
                new if new is not None else old for new, old in zip(values, earlier))
        cols = list(zip(*[(uid, *values) for uid, values in sorted(latest.items())]))
        await conn.execute(_HEARTBEATS, *[list(c) for c in cols])

    # -- command_response (§3.9) --------------------------------------------------------
    async def _command_response(self, conn, ev: Event, arg: tuple, superseded: bool) -> None:
        response, data = arg
        topic = ev.topic
        target = await conn.fetchrow(_COMMAND_TARGET, response.cmd_id)
        if target is None:
            m.COMMAND_RESPONSE_UNKNOWN.inc()
            raise Refused("unknown_command", f"no command {response.cmd_id[:64]!r}")
        _check_sender(topic, target)
        row = await commands.record_response(conn, response, data)
        if row is None:
            m.COMMAND_RESPONSE_UNKNOWN.inc()
            log.info("command_response_ignored", extra={"cmd_id": response.cmd_id, "status": response.status})
            return  # already closed (a repeated answer, or after the timeout): nothing to change
        if (response.error_code or "").strip().lower() == "overcurrent":
            zone_id = row["zone_id"] or await node_zone(conn, None, topic.zone_id)
            details: dict[str, Any] = {**(response.details or {}), "cmd_id": row["cmd_id"], "cmd": row["cmd"],
                                       "params": row["params"], "channel": row["channel"] or topic.channel,
                                       "pump_channel": row["channel"] or topic.channel, "node_uid": topic.node,
                                       "error_code": response.error_code,
                                       "message": response.error_message or "Pump overcurrent"}
            await alerts.ensure_alert(conn, zone_id=zone_id, alert_type="OVERCURRENT", details=details)

    # -- helpers ------------------------------------------------------------------------
    async def _node(self, conn: asyncpg.Connection, uid: str | None) -> asyncpg.Record | None:
        node = await conn.fetchrow(
            "SELECT id, uid, zone_id, status, last_seen_at FROM nodes WHERE uid = $1 FOR UPDATE", uid)
        if node is None:
            m.EVENTS_INVALID.labels("node", "unknown_node").inc()
        return node

    def _recent(self, node: asyncpg.Record, at: dt.datetime) -> bool:
        seen = node["last_seen_at"]
        return seen is not None and seen > at - self.offline_after

    def _refuse(self, dead: list[dict], kind: str, exc: Refused, ev: Event | bytes, payload: bytes = b"") -> None:
        m.EVENTS_INVALID.labels(kind, exc.reason).inc()
        if (kind, exc.reason) not in self._reported:  # log each kind once; the metric counts them all
            self._reported.add((kind, exc.reason))
            log.warning("event_rejected", extra={"kind": kind, "reason": exc.reason, "detail": exc.detail[:300]})
        if isinstance(ev, Event):
            topic = "/".join(p for p in (self.topics.root, ev.topic.gh, ev.topic.zone, ev.topic.node, ev.topic.channel,
                                         ev.topic.kind) if p)
            entry_id, payload = ev.entry_id, ev.payload
        else:
            topic, entry_id = ev.decode(errors="replace"), b""
        dead.append({b"reason": exc.reason, b"kind": kind, b"detail": exc.detail[:500], b"topic": topic[:300],
                     b"entry_id": entry_id, b"payload": payload[:4096], b"at": repr(time.time())})

    async def _dead_letter(self, dead: list[dict]) -> None:
        """Best effort after the commit: the metric has counted them; the stream is for inspection."""
        if self.redis is None or self.dead_key is None:
            return
        pipe = self.redis.pipeline(transaction=False)
        for entry in dead:
            pipe.xadd(self.dead_key, entry, maxlen=self.dead_max, approximate=True)
        try:
            await pipe.execute()
        except REDIS_TRANSIENT as exc:
            log.warning("dead_letter_failed", extra={"count": len(dead), "error": str(exc)[:200]})


def _check_sender(topic: ParsedTopic, target: asyncpg.Record) -> None:
    """A response counts only from the node the command was sent to, in its zone and greenhouse."""
    if target["node_uid"] is None:
        raise Refused("node_mismatch", "the command has no node recorded: its sender cannot be verified")
    if target["node_uid"] != topic.node:
        raise Refused("node_mismatch", f"sent to {target['node_uid']!r}, answered by {topic.node!r}")
    if target["zone_id"] is not None and topic.zone_id is not None and target["zone_id"] != topic.zone_id:
        raise Refused("node_mismatch", f"sent to zone {target['zone_id']}, answered from {topic.zone!r}")
    if target["gh_uid"] is not None and topic.gh != target["gh_uid"]:
        raise Refused("node_mismatch", f"sent to greenhouse {target['gh_uid']!r}, answered from {topic.gh!r}")


def _bounded_int(field: str, value: Any, low: int, high: int) -> int | None:
    """An integer heartbeat field within [low, high]; anything else is refused alone and counted."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        m.HEARTBEAT_FIELDS_REJECTED.labels(field).inc()
        return None
    return value


def _lwt_text(payload: bytes) -> bytes:
    text = payload.strip().lower()
    if text.startswith(b"{"):
        data = _json_object(payload) or {}
        text = str(data.get("status", "")).strip().lower().encode()
    return text


def _validated(payload: bytes, model: type[T], data: dict | None = None) -> T:
    """The payload as `model` (`dict`: any JSON object), or Refused invalid_json / invalid_payload."""
    if data is None:
        data = _json_object(payload)
    if data is None:
        raise Refused("invalid_json", "not a JSON object")
    if model is dict:
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Refused("invalid_payload", str(exc.errors()[0].get("msg", ""))[:200]) from None


def _json_object(payload: bytes) -> dict | None:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
