"""Config delivery state: automatic (re)delivery, config_response bookkeeping, the state the API shows.

Publishing itself is `common.nodeconfig.publish_node_config` (shared with the bridge).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import asyncpg

import metrics
from refusal_log import RefusalLog
from common.alerts import add_zone_event, ensure_alert, resolve_alerts
from common.db import Database
from common.mqtt import MqttClient, MqttError
from common.nodeconfig import (CONFIGURABLE_STATES, ConfigDefaults, NodeConfigFailure, PublishResult,
                               publish_node_config)
from common.schemas import ConfigResponse
from common.topics import TEMP_GH, TEMP_NODE, TEMP_ZONE, ParsedTopic, Topics, TopicError

log = logging.getLogger("device_registry.delivery")

NODE_SQL = """
SELECT n.id, n.uid, n.hardware_id, n.zone_id, n.lifecycle_state, n.config,
       d.published_version, d.published_topic, d.applied_version, d.node_error_version, d.temp_pending,
       (SELECT max(version) FROM node_config_versions v WHERE v.node_id = n.id) AS current_version,
       (SELECT g.uid FROM zones z JOIN greenhouses g ON g.id = z.greenhouse_id WHERE z.id = n.zone_id) AS gh_uid
  FROM nodes n LEFT JOIN node_config_delivery d ON d.node_id = n.id
"""


async def find_node(conn: asyncpg.Connection | Database, ident: str | None) -> asyncpg.Record | None:
    """A node by uid, else by hardware_id (a node still on temporary ids uses its hardware id)."""
    if not ident:
        return None
    return (await conn.fetchrow(NODE_SQL + " WHERE n.uid = $1", ident)
            or await conn.fetchrow(NODE_SQL + " WHERE n.hardware_id = $1", ident))


class ConfigDelivery:
    def __init__(self, db: Database, mqtt: MqttClient, topics: Topics, defaults: ConfigDefaults,
                 republish_interval_sec: float, applied_events: bool):
        self.db = db
        self.mqtt = mqtt
        self.topics = topics
        self.defaults = defaults
        self.republish_interval_sec = republish_interval_sec
        self.applied_events = applied_events
        self._sent: dict[str, tuple[int, float]] = {}  # uid → (version, monotonic time) of the last automatic send
        self.refusals = RefusalLog(log)

    # -- publishing -------------------------------------------------------------------------
    async def publish(self, uid: str, config: dict[str, Any] | None = None) -> PublishResult:
        """Explicit publish (REST): errors propagate to the caller."""
        result = await publish_node_config(self.db, self.mqtt, self.topics, uid, config, defaults=self.defaults,
                                           source="registry")
        if not result.published:
            metrics.CONFIGS_FAILED.labels("broker").inc()
        return result

    async def deliver(self, uid: str, trigger: str) -> PublishResult | None:
        """Automatic delivery of the current config, for a node that may receive one (zoned, lifecycle
        REGISTERED_BACKEND / ASSIGNED_TO_ZONE / ACTIVE / DEGRADED). The same version is sent automatically
        at most once per REGISTRY_REPUBLISH_INTERVAL_SEC (the config is retained on the broker anyway)."""
        node = await find_node(self.db, uid)
        if node is None or node["zone_id"] is None or node["lifecycle_state"] not in CONFIGURABLE_STATES:
            metrics.MESSAGES_IGNORED.labels(trigger, "not_configurable").inc()
            return None
        last = self._sent.get(node["uid"])
        now = time.monotonic()
        if last and last[0] == node["current_version"] and now - last[1] < self.republish_interval_sec:
            metrics.MESSAGES_IGNORED.labels(trigger, "recently_sent").inc()
            return None
        try:
            result = await publish_node_config(self.db, self.mqtt, self.topics, node["uid"], None,
                                               defaults=self.defaults, source="registry")
        except NodeConfigFailure as exc:
            metrics.CONFIGS_FAILED.labels(exc.reason).inc()
            log.warning("config_delivery_refused", extra={"node_uid": uid, "trigger": trigger, "error": str(exc)})
            return None
        if not result.published:
            metrics.CONFIGS_FAILED.labels("broker").inc()
            return result
        self._sent[node["uid"]] = (result.version, now)
        metrics.CONFIG_DELIVERIES.labels(trigger).inc()
        log.info("config_delivered", extra={"node_uid": uid, "trigger": trigger, "version": result.version})
        return result

    # -- node → backend ---------------------------------------------------------------------
    async def on_status_online(self, parsed: ParsedTopic) -> PublishResult | None:
        """A node came ONLINE: re-send its current config when it has not applied it yet."""
        node = await find_node(self.db, parsed.node)
        if node is None:
            metrics.MESSAGES_IGNORED.labels("status", "unknown_node").inc()
            return None
        current = node["current_version"]
        applied = node["applied_version"]
        if current is None or (applied is not None and applied >= current):
            return None
        if node["node_error_version"] == current:  # the node refused this version: wait for a new one
            metrics.MESSAGES_IGNORED.labels("status", "refused_version").inc()
            return None
        return await self.deliver(node["uid"], "status")

    async def on_config_response(self, parsed: ParsedTopic, response: ConfigResponse) -> bool:
        """Record what the node applied (OK / ACK) or the error it reported (ERROR).

        A response counts only when it comes from the node the config was sent to, on that node's topic
        (its greenhouse and zone, or the gh-temp topics while a config waits there), and names a version
        we published; anything else is refused, counted by reason and changes nothing. False: refused."""
        node, reason = await self._responder(parsed, response)
        if reason is None:
            version, reason = await self._published_version(node, response)
        if reason is not None:
            metrics.CONFIG_RESPONSES_INVALID.labels(reason).inc()
            self.refusals.warning(reason, "config_response_refused", gh=str(parsed.gh)[:128],
                                  zone=str(parsed.zone)[:128], node=str(parsed.node)[:128],
                                  node_id=response.node_id, version=response.version)
            return False
        zone_id = node["zone_id"]
        async with self.db.transaction() as conn:
            if response.ok:
                await self._applied(conn, node, version, zone_id, parsed)
            else:
                await self._failed(conn, node, version, zone_id, response)
        return True

    async def _responder(self, parsed: ParsedTopic, response: ConfigResponse) -> tuple[asyncpg.Record | None,
                                                                                       str | None]:
        """The node a config_response is from: the node of its topic, on a topic that config went to."""
        temp = parsed.gh == TEMP_GH
        if temp and parsed.node == TEMP_NODE:
            # A node still on the firmware's placeholder ids can only be named by its payload.
            node = await find_node(self.db, response.node_id)
        else:
            node = await find_node(self.db, parsed.node)
        if node is None:
            return None, "unknown_node"
        if temp:
            # Only while a config of ours is retained on the gh-temp topics for this node.
            if parsed.zone != TEMP_ZONE or not node["temp_pending"]:
                return node, "topic_mismatch"
            return node, None
        sent_to = {node["published_topic"]}
        if node["zone_id"] is not None and node["gh_uid"]:
            try:
                sent_to.add(self.topics.config(node["gh_uid"], node["zone_id"], node["uid"]))
            except TopicError:
                pass
        if f"{self.topics.root}/{parsed.gh}/{parsed.zone}/{parsed.node}/config" not in sent_to:
            return node, "topic_mismatch"
        return node, None

    async def _published_version(self, node: asyncpg.Record, response: ConfigResponse) -> tuple[int | None,
                                                                                              str | None]:
        """The version a response is about: its `version`, else the last one published; it must be one
        of this node's stored versions, no newer than the last one published."""
        published = node["published_version"]
        if published is None:
            return None, "nothing_published"
        version = response.version if response.version is not None else published
        if not 1 <= version <= published or not await self.db.fetchval(
                "SELECT 1 FROM node_config_versions WHERE node_id = $1 AND version = $2", node["id"], version):
            return None, "unknown_version"
        return version, None

    async def _applied(self, conn: asyncpg.Connection, node: asyncpg.Record, version: int | None,
                       zone_id: int | None, parsed: ParsedTopic) -> None:
        # The row lock orders two registries handling the same response (both replicas receive it):
        # only the first sees a new version and writes the zone event; a repeated response adds none.
        previous = await conn.fetchval(
            "SELECT applied_version FROM node_config_delivery WHERE node_id = $1 FOR UPDATE", node["id"])
        await conn.execute(
            "INSERT INTO node_config_delivery (node_id, applied_version, applied_at, updated_at)"
            " VALUES ($1, $2, now(), now()) ON CONFLICT (node_id) DO UPDATE SET applied_version = $2,"
            " applied_at = now(), node_error = NULL, node_error_version = NULL, node_error_at = NULL,"
            " updated_at = now()", node["id"], version)
        metrics.CONFIGS_APPLIED.inc()
        if parsed.gh != TEMP_GH and node["temp_pending"]:
            await self._clear_temp_topics(conn, node)
        if zone_id is not None:
            if self.applied_events and previous != version:
                await add_zone_event(conn, zone_id, "NODE_CONFIG_APPLIED", {"node_uid": node["uid"],
                                                                             "version": version})
            await resolve_alerts(conn, zone_id=zone_id, alert_type="CONFIG_ERROR", match={"node_uid": node["uid"]})
        log.info("config_applied", extra={"node_uid": node["uid"], "version": version})

    async def _failed(self, conn: asyncpg.Connection, node: asyncpg.Record, version: int | None,
                      zone_id: int | None, response: ConfigResponse) -> None:
        error = response.error or "node reported ERROR without a message"
        await conn.execute(
            "INSERT INTO node_config_delivery (node_id, node_error, node_error_version, node_error_at, updated_at)"
            " VALUES ($1, $2, $3, now(), now()) ON CONFLICT (node_id) DO UPDATE SET node_error = $2,"
            " node_error_version = $3, node_error_at = now(), updated_at = now()", node["id"], error, version)
        metrics.CONFIGS_FAILED.labels("node_error").inc()
        if zone_id is not None:
            await ensure_alert(conn, zone_id=zone_id, alert_type="CONFIG_ERROR", match={"node_uid": node["uid"]},
                               details={"node_uid": node["uid"], "error": error, "version": version,
                                        "hash": response.hash, "message": f"Config error: {error}"})
        log.warning("config_error_reported", extra={"node_uid": node["uid"], "version": version, "error": error})

    async def _clear_temp_topics(self, conn: asyncpg.Connection, node: asyncpg.Record) -> None:
        """Empty retained payloads on the gh-temp config topics, once the node answers on its real topic."""
        try:
            for ident in {node["hardware_id"], node["uid"]} - {None}:
                await self.mqtt.publish(self.topics.temp_config(ident), b"", qos=1, retain=True)
        except MqttError as exc:
            log.warning("temp_config_clear_failed", extra={"node_uid": node["uid"], "error": str(exc)})
            return
        await conn.execute("UPDATE node_config_delivery SET temp_pending = false WHERE node_id = $1", node["id"])


async def config_state(db: Database, uid: str) -> dict[str, Any] | None:
    """Current version and config, applied version, delivery state and the version history of a node."""
    node = await db.fetchrow("SELECT id, uid, zone_id, config FROM nodes WHERE uid = $1", uid)
    if node is None:
        return None
    latest = await db.fetchrow(
        "SELECT version, config_hash, config, source, created_at FROM node_config_versions WHERE node_id = $1"
        " ORDER BY version DESC LIMIT 1", node["id"])
    delivery = await db.fetchrow("SELECT * FROM node_config_delivery WHERE node_id = $1", node["id"])
    versions = await db.fetch(
        "SELECT version, config_hash, source, created_at FROM node_config_versions WHERE node_id = $1"
        " ORDER BY version", node["id"])
    d = dict(delivery) if delivery else {}
    current = latest["version"] if latest else None
    applied = d.get("applied_version")
    return {
        "node_uid": node["uid"],
        "version": current,
        "config_hash": latest["config_hash"] if latest else None,
        "config": latest["config"] if latest else None,
        "applied_version": applied,
        "up_to_date": current is not None and applied == current,
        "delivery": {
            "published_version": d.get("published_version"),
            "published_at": _iso(d.get("published_at")),
            "published_topic": d.get("published_topic"),
            "publish_error": d.get("publish_error"),
            "publish_error_at": _iso(d.get("publish_error_at")),
            "applied_version": applied,
            "applied_at": _iso(d.get("applied_at")),
            "node_error": d.get("node_error"),
            "node_error_version": d.get("node_error_version"),
            "node_error_at": _iso(d.get("node_error_at")),
            "temp_topics_pending": bool(d.get("temp_pending")),
        },
        "versions": [{"version": v["version"], "config_hash": v["config_hash"], "source": v["source"],
                      "created_at": _iso(v["created_at"])} for v in versions],
    }


def _iso(value) -> str | None:
    return value.isoformat() + "Z" if value is not None else None
