"""Node life signs from the events stream → PostgreSQL (contract §3.2–3.4, §3.9, I-5).

One transaction per batch: entry ids recorded (ingest_log), all heartbeats in ONE UPDATE,
then status / lwt / command_response in arrival order, each in a savepoint so one bad message
cannot block the others. Offline: nodes.status, a NODE_OFFLINE alert (one per node) and
DEVICE_OFFLINE + NODE_OFFLINE zone events; online: DEVICE_ONLINE event, alert resolved.
A *retained* lwt or status is only a hint (the broker re-sends it after every reconnect): it
applies only when it agrees with nodes.last_seen_at.
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import Any, TypeVar

import asyncpg
import orjson
from pydantic import ValidationError

from common import alerts, commands
from common.db import Database
from common.env import Settings
from common.schemas import CommandResponse, Heartbeat, Status
from common.topics import ParsedTopic, Topics, TopicError

import ingest_log
import logger_metrics as m
from stream_consumer import Entry, Transient
from telemetry_writer import PG_TRANSIENT

T = TypeVar("T")
log = logging.getLogger("history_logger.events")

_HEARTBEATS = """
UPDATE nodes n
   SET uptime_seconds = coalesce(u.uptime, n.uptime_seconds),
       free_heap_bytes = coalesce(u.heap, n.free_heap_bytes),
       rssi = coalesce(u.rssi, n.rssi),
       last_heartbeat_at = u.at,
       last_seen_at = greatest(coalesce(n.last_seen_at, u.at), u.at),
       updated_at = now()
  FROM unnest($1::text[], $2::int[], $3::int[], $4::int[], $5::timestamp[]) AS u(uid, uptime, heap, rssi, at)
 WHERE n.uid = u.uid
"""


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


class NodeEvents:
    def __init__(self, settings: Settings, db: Database, stream: str):
        self.settings = settings
        self.db = db
        self.stream = stream
        self.topics = Topics(settings.mqtt_topic_root)
        self.offline_after = dt.timedelta(seconds=settings.node_offline_timeout_sec)

    async def handle(self, entries: list[Entry]) -> None:
        try:
            async with self.db.transaction() as conn:
                fresh = await ingest_log.claim(conn, self.stream, [eid for eid, _ in entries])
                events = []
                for entry_id, fields in entries:
                    if entry_id in fresh:
                        event = self._decode(fields)
                        if event is not None:
                            events.append(event)
                await self._heartbeats(conn, [e for e in events if e[0].kind == "heartbeat"])
                for event in events:
                    if event[0].kind != "heartbeat":
                        await self._one(conn, *event)
        except PG_TRANSIENT as exc:
            raise Transient(f"database: {exc}") from exc

    def _decode(self, fields: dict[bytes, bytes]) -> tuple[ParsedTopic, bytes, bool, float] | None:
        try:
            topic = fields[b"t"].decode()
            parsed = self.topics.parse(topic)
            return parsed, fields[b"p"], fields.get(b"ret") == b"1", float(fields[b"at"])
        except (KeyError, ValueError, TopicError):
            m.EVENTS_INVALID.labels("unknown", "unknown_topic").inc()
            return None

    async def _one(self, conn: asyncpg.Connection, topic: ParsedTopic, payload: bytes, retained: bool,
                   at: float) -> None:
        handler = {"status": self._status, "lwt": self._lwt, "command_response": self._command_response}.get(topic.kind)
        if handler is None:
            m.EVENTS_INVALID.labels(topic.kind, "unknown_topic").inc()
            return
        try:
            async with conn.transaction():  # a savepoint: one bad event does not spoil the batch
                await handler(conn, topic, payload, retained, utc(at))
        except PG_TRANSIENT:
            raise
        except (asyncpg.PostgresError, ValueError) as exc:
            m.EVENTS_INVALID.labels(topic.kind, "db_rejected").inc()
            log.warning("event_rejected", extra={"kind": topic.kind, "node_uid": topic.node, "error": str(exc)[:300]})

    # -- heartbeat (§3.4) ---------------------------------------------------------------
    async def _heartbeats(self, conn: asyncpg.Connection, events: list) -> None:
        if not events:
            return
        m.HEARTBEATS.inc(len(events))
        latest: dict[str, tuple] = {}
        for topic, payload, _retained, at in events:
            hb, _ = _validated("heartbeat", payload, Heartbeat)
            if hb is None:
                continue
            values = (hb.uptime_seconds(self.settings.heartbeat_uptime_ms), hb.free_heap_bytes, hb.rssi_dbm, utc(at))
            earlier = latest.get(topic.node)
            # A field a heartbeat could not give keeps the value of the node's earlier one in this batch.
            latest[topic.node] = values if earlier is None else tuple(
                new if new is not None else old for new, old in zip(values, earlier))
        if latest:
            cols = list(zip(*[(uid, *values) for uid, values in latest.items()]))
            await conn.execute(_HEARTBEATS, *[list(c) for c in cols])

    # -- status (§3.2) ------------------------------------------------------------------
    async def _status(self, conn, topic: ParsedTopic, payload: bytes, retained: bool, at: dt.datetime) -> None:
        m.STATUS.labels("status").inc()
        if not payload.strip():
            return  # an empty retained payload only clears the broker's copy
        parsed, _ = _validated("status", payload, Status)
        if parsed is None:
            return
        status = parsed.normalised
        node = await self._node(conn, topic.node)
        if node is None:
            return
        if retained and not self._recent(node, at):
            return  # an old retained ONLINE says nothing about now
        if status == "offline":
            await mark_offline(conn, node, await node_zone(conn, node["zone_id"], topic.zone_id), "status")
            return
        await conn.execute("UPDATE nodes SET status = $2, last_seen_at = greatest(coalesce(last_seen_at, $3), $3),"
                           " updated_at = now() WHERE id = $1", node["id"], status, at)
        if status != "online":
            return
        zone_id = await node_zone(conn, node["zone_id"], topic.zone_id)
        if zone_id is None:
            return
        if node["status"] != "online":
            log.info("node_online", extra={"node_uid": node["uid"]})
            await alerts.add_zone_event(conn, zone_id, "DEVICE_ONLINE", {"node_uid": node["uid"]})
        await alerts.resolve_alerts(conn, zone_id=zone_id, alert_type="NODE_OFFLINE", match={"node_uid": node["uid"]})

    # -- lwt (§3.3, I-5) ----------------------------------------------------------------
    async def _lwt(self, conn, topic: ParsedTopic, payload: bytes, retained: bool, at: dt.datetime) -> None:
        m.STATUS.labels("lwt").inc()
        text = payload.strip().lower()
        if text.startswith(b"{"):
            data = _json_object(payload) or {}
            text = str(data.get("status", "")).strip().lower().encode()
        if text != b"offline":
            if payload.strip():  # an empty retained payload only clears the broker's copy
                m.EVENTS_INVALID.labels("lwt", "invalid_payload").inc()
            return
        node = await self._node(conn, topic.node)
        if node is None:
            return
        if retained and self._recent(node, at):
            return  # the retained will of an earlier drop: the node has been seen since
        await mark_offline(conn, node, await node_zone(conn, node["zone_id"], topic.zone_id), "lwt")

    # -- command_response (§3.9) --------------------------------------------------------
    async def _command_response(self, conn, topic: ParsedTopic, payload: bytes, retained: bool,
                                at: dt.datetime) -> None:
        m.COMMAND_RESPONSES.inc()
        response, data = _validated("command_response", payload, CommandResponse)
        if response is None:
            return
        row = await commands.record_response(conn, response, data)
        if row is None:
            m.COMMAND_RESPONSE_UNKNOWN.inc()
            log.info("command_response_ignored", extra={"cmd_id": response.cmd_id, "status": response.status})
            return
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


def _validated(kind: str, payload: bytes, model: type[T]) -> tuple[T | None, dict | None]:
    """(model, the JSON object) of a payload, or (None, None) counted by reason."""
    data = _json_object(payload)
    if data is None:
        m.EVENTS_INVALID.labels(kind, "invalid_json").inc()
        return None, None
    try:
        return model.model_validate(data), data
    except ValidationError:
        m.EVENTS_INVALID.labels(kind, "invalid_payload").inc()
        return None, None


def _json_object(payload: bytes) -> dict | None:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
