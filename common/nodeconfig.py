"""NodeConfig: validation, content-hash versioning, storage and delivery (contract §5.1, §5.2, §5.5).

The one implementation of "publish a node its config", used by the bridge's
`POST /bridge/nodes/{uid}/config` and by the device-registry.

    from common.nodeconfig import publish_node_config, NodeConfigFailure

    try:
        result = await publish_node_config(db, mqtt, topics, node_uid, body.config,
                                           zone_id=body.zone_id, gh_uid=body.greenhouse_uid)
    except NodeConfigFailure as exc:          # ConfigError 422, NodeNotRoutable 400, NodeNotFound 404
        raise HTTPException(exc.status_code, str(exc))
    if not result.published:                  # stored, but the broker did not take it
        raise HTTPException(503, result.error)
    return {"status": "ok", "data": {"published": True, "topic": result.topic, "version": result.version}}

What `publish_node_config` does, in one transaction holding the node's row lock:
1. Node by uid (unknown → NodeNotFound, 404). Zone = `zone_id` argument else `nodes.zone_id`; greenhouse uid =
   `gh_uid` argument else `zones → greenhouses` (missing → NodeNotRoutable, 400, with the contract's messages).
2. The config: `config=None` → the node's latest stored version with node_id / gh_uid / zone_uid set to the
   current routing, or, when nothing is stored yet, one built from the DB rows (`build_config`: channels
   from node_channels, inferred actuator_type, default safe_limits, wifi / mqtt from nodes.config else
   `ConfigDefaults`). A given config is published as it is, except: its `version` is replaced (step 3), channel
   `type` is normalised to SENSOR / ACTUATOR, and top-level keys it lacks (node_id, type, gh_uid, zone_uid,
   channels, wifi, mqtt) are taken from the built config. A node_id / gh_uid / zone_uid that contradicts the
   node or the topic it is published to is refused (ConfigError).
3. Version by content hash: sha256 of the canonical JSON without `version`. Same hash as
   `nodes.config.config_hash` → same version; otherwise version = max(stored version, history) + 1.
   `nodes.config` gets `version` and `config_hash` (other keys untouched); every version is kept in
   `node_config_versions` and never rewritten.
4. Validation (`validate_config`): the §5.1 required keys and types, unique channel names, SENSOR / ACTUATOR,
   actuator safe_limits within bounds, serialised size ≤ 4096 bytes → else ConfigError (422) naming the field;
   nothing is stored then.
5. Publish QoS 1 retained on `topics.config(gh, zone_id, uid)` and on the temporary topics
   `topics.temp_config(hardware_id)` and `topics.temp_config(uid)` (§5.5); the device-registry clears those
   once the node acknowledges on its real topic. Delivery state goes to `node_config_delivery`
   (published version / time / topic, or the publish error). A broker failure does not raise: the version
   stays stored and the result says `published=False` with `error`.
"""
from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from prometheus_client import Counter
from pydantic import ValidationError

from .db import Database
from .env import Settings
from .mqtt import MqttClient, MqttError
from .schemas import CHANNEL_TYPES, DEFAULT_SAFE_LIMITS, MAX_CONFIG_BYTES, NodeConfig
from .topics import Topics, TopicError, zone_segment

log = logging.getLogger("common.nodeconfig")

DEFAULT_POLL_INTERVAL_MS = 3000
DEFAULT_STORED_VERSION = 0  # no version stored yet → the first one published is 1
# Lifecycle states that may receive a config (contract §5.3); the caller decides whether to enforce it.
CONFIGURABLE_STATES = frozenset({"REGISTERED_BACKEND", "ASSIGNED_TO_ZONE", "ACTIVE", "DEGRADED"})
IDENTITY_KEYS = ("node_id", "gh_uid", "zone_uid")
TOP_LEVEL_KEYS = ("node_id", "type", "gh_uid", "zone_uid", "channels", "wifi", "mqtt")

CONFIGS_PUBLISHED = Counter("node_config_published_total", "NodeConfigs published to MQTT", ["source"])
CONFIGS_NOT_PUBLISHED = Counter("node_config_publish_failed_total", "NodeConfig publishes refused or failed",
                                ["reason"])
CONFIG_VERSIONS_CREATED = Counter("node_config_versions_created_total", "New NodeConfig versions stored")


# ---------------------------------------------------------------------------------------
# Errors: each carries the HTTP status it maps to
# ---------------------------------------------------------------------------------------
class NodeConfigFailure(Exception):
    status_code = 500
    reason = "error"


class ConfigError(NodeConfigFailure, ValueError):
    """The config is invalid; `field` names the offending field (dotted path, e.g. channels.1.safe_limits)."""

    status_code = 422
    reason = "invalid"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NodeNotFound(NodeConfigFailure, LookupError):
    status_code = 404
    reason = "not_found"


class NodeNotRoutable(NodeConfigFailure):
    """The node has no zone, or its zone no greenhouse: there is no topic to publish to."""

    status_code = 400
    reason = "no_route"


# ---------------------------------------------------------------------------------------
# Validation and hashing (pure)
# ---------------------------------------------------------------------------------------
def validate_config(config: Any) -> NodeConfig:
    """Check a complete config (with `version`) against §5.1; raise ConfigError naming the field."""
    if not isinstance(config, dict):
        raise ConfigError("config", "must be a JSON object")
    try:
        model = NodeConfig.model_validate(config)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if not where:
            where = "channels" if "channel names" in err["msg"] else "config"
        message = err["msg"].removeprefix("Value error, ")
        raise ConfigError(where, message) from None
    size = len(orjson.dumps(config))
    if size > MAX_CONFIG_BYTES:
        raise ConfigError("config", f"serialised size {size} bytes exceeds the node's limit of {MAX_CONFIG_BYTES}")
    return model


def config_hash(config: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON (sorted keys, compact) of `config` without `version`."""
    body = {k: v for k, v in config.items() if k != "version"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def actuator_type_for(channel_name: str) -> str:
    """§5.1 inference: pump→PUMP, valve/solenoid→VALVE, relay→RELAY, light/led→LIGHT, else ACTUATOR."""
    name = channel_name.lower()
    for words, kind in ((("pump",), "PUMP"), (("valve", "solenoid"), "VALVE"), (("relay",), "RELAY"),
                        (("light", "led"), "LIGHT")):
        if any(w in name for w in words):
            return kind
    return "ACTUATOR"


def normalise_channel_type(value: Any) -> Any:
    """`sensor`/`S`/`actuator`/`A` (any case) → SENSOR / ACTUATOR; anything else unchanged (validation names it)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "SENSOR"
    if isinstance(value, str):
        return CHANNEL_TYPES.get(value.strip().lower(), value)
    return value


def channel_entry(channel: str, channel_type: Any, metric: str | None, extra: Any = None) -> dict[str, Any]:
    """One `channels[]` entry from a node_channels row; the row's `config` is merged over the base keys."""
    kind = normalise_channel_type(channel_type)
    entry: dict[str, Any] = {"name": channel, "type": kind, "metric": metric}
    if kind == "ACTUATOR":
        entry["actuator_type"] = actuator_type_for(channel)
        entry["safe_limits"] = dict(DEFAULT_SAFE_LIMITS)
    else:
        entry["poll_interval_ms"] = DEFAULT_POLL_INTERVAL_MS
    if isinstance(extra, dict):
        entry.update(copy.deepcopy(extra))
    return entry


@dataclass(frozen=True)
class ConfigDefaults:
    """wifi / mqtt blocks for nodes whose nodes.config has none."""

    wifi: dict[str, Any] = field(default_factory=dict)
    mqtt: dict[str, Any] = field(default_factory=lambda: {"host": "mqtt", "port": 1883, "keepalive": 30})

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> "ConfigDefaults":
        mqtt = {"host": settings.mqtt_host, "port": settings.mqtt_port, "keepalive": settings.mqtt_keepalive}
        return cls(**{"mqtt": mqtt, **overrides})


def build_config(node: dict[str, Any] | asyncpg.Record, channels: list, *, gh_uid: str, zone_id: int,
                 defaults: ConfigDefaults | None = None, version: int = 1) -> dict[str, Any]:
    """The §5.1 config from a nodes row (uid, type, config) and its node_channels rows
    (channel, type, metric, config)."""
    defaults = defaults or ConfigDefaults()
    stored = node["config"] if isinstance(node["config"], dict) else {}
    return {
        "node_id": node["uid"],
        "version": version,
        "type": node["type"] or "unknown",
        "gh_uid": gh_uid,
        "zone_uid": zone_segment(zone_id),
        "channels": [channel_entry(c["channel"], c["type"], c["metric"], c["config"]) for c in channels],
        "wifi": copy.deepcopy(stored["wifi"]) if isinstance(stored.get("wifi"), dict) else dict(defaults.wifi),
        "mqtt": copy.deepcopy(stored["mqtt"]) if isinstance(stored.get("mqtt"), dict) else dict(defaults.mqtt),
    }


def _ordered(config: dict[str, Any], version: int) -> dict[str, Any]:
    """The config with `version` set, keys in the §5.1 order first (readable on the wire)."""
    out = {k: config[k] for k in ("node_id",) if k in config}
    out["version"] = version
    out.update((k, v) for k, v in config.items() if k not in ("node_id", "version"))
    return out


def _normalise_channels(config: dict[str, Any]) -> dict[str, Any]:
    channels = config.get("channels")
    if isinstance(channels, list):
        config = dict(config)
        config["channels"] = [dict(c, type=normalise_channel_type(c.get("type"))) if isinstance(c, dict) else c
                              for c in channels]
    return config


# ---------------------------------------------------------------------------------------
# Storage and delivery
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishResult:
    node_uid: str
    topic: str                      # the real topic hydro/{gh}/zn-{zone}/{uid}/config
    version: int
    config_hash: str
    changed: bool                   # True when this call stored a new version
    published: bool                 # the broker acknowledged every publish
    config: dict[str, Any]          # exactly what was (or was to be) published
    temp_topics: tuple[str, ...] = ()
    error: str | None = None        # why it was not published


_NODE_SQL = "SELECT id, uid, hardware_id, type, zone_id, config FROM nodes WHERE uid = $1 FOR UPDATE"


async def _latest_version(conn: asyncpg.Connection, node_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT version, config_hash, config FROM node_config_versions WHERE node_id = $1"
        " ORDER BY version DESC LIMIT 1", node_id)


async def _built_config(conn: asyncpg.Connection, node: asyncpg.Record, gh_uid: str, zone_id: int,
                        defaults: ConfigDefaults | None) -> dict[str, Any]:
    channels = await conn.fetch(
        "SELECT channel, type, metric, config FROM node_channels WHERE node_id = $1 ORDER BY id", node["id"])
    return build_config(node, channels, gh_uid=gh_uid, zone_id=zone_id, defaults=defaults)


async def _resolve_config(conn: asyncpg.Connection, node: asyncpg.Record, config: dict[str, Any] | None,
                          gh_uid: str, zone_id: int, defaults: ConfigDefaults | None) -> dict[str, Any]:
    identity = {"node_id": node["uid"], "gh_uid": gh_uid, "zone_uid": zone_segment(zone_id)}
    if config is None:
        latest = await _latest_version(conn, node["id"])
        if latest is not None and isinstance(latest["config"], dict):
            return {**latest["config"], **identity}
        return await _built_config(conn, node, gh_uid, zone_id, defaults)
    if not isinstance(config, dict):
        raise ConfigError("config", "must be a JSON object")
    for key, expected in identity.items():
        if key in config and config[key] != expected:
            raise ConfigError(key, f"is {config[key]!r} but the config is published for {expected!r}")
    missing = [k for k in TOP_LEVEL_KEYS if k not in config]
    if not missing:
        return dict(config)
    built = await _built_config(conn, node, gh_uid, zone_id, defaults)
    return {**config, **{k: built[k] for k in missing}}


async def _route(conn: asyncpg.Connection, node: asyncpg.Record, zone_id: int | None,
                 gh_uid: str | None) -> tuple[int, str]:
    zone_id = zone_id if zone_id is not None else node["zone_id"]
    if zone_id is None:
        raise NodeNotRoutable("zone_id is required (node must be assigned to a zone)")
    if gh_uid is None:
        gh_uid = await conn.fetchval(
            "SELECT g.uid FROM zones z JOIN greenhouses g ON g.id = z.greenhouse_id WHERE z.id = $1", zone_id)
        if gh_uid is None:
            raise NodeNotRoutable("greenhouse_uid is required (zone must have a greenhouse)")
    return zone_id, gh_uid


def _temp_topics(topics: Topics, node: asyncpg.Record) -> tuple[str, ...]:
    found = []
    for ident in (node["hardware_id"], node["uid"]):
        if not ident:
            continue
        try:
            topic = topics.temp_config(ident)
        except TopicError:
            continue
        if topic not in found:
            found.append(topic)
    return tuple(found)


async def publish_node_config(
    db: Database,
    mqtt: MqttClient,
    topics: Topics,
    node_uid: str,
    config: dict[str, Any] | None = None,
    *,
    zone_id: int | None = None,
    gh_uid: str | None = None,
    defaults: ConfigDefaults | None = None,
    source: str = "bridge",
) -> PublishResult:
    """Store (versioned) and publish a node's config; see the module docstring.

    Raises NodeNotFound (404), NodeNotRoutable (400), ConfigError (422) before anything is stored
    or published; a broker failure returns `published=False` with `error` instead."""
    try:
        async with db.transaction() as conn:
            node = await conn.fetchrow(_NODE_SQL, node_uid)
            if node is None:
                raise NodeNotFound(f"node {node_uid!r} not found")
            zone_id, gh_uid = await _route(conn, node, zone_id, gh_uid)
            try:
                topic = topics.config(gh_uid, zone_id, node["uid"])
            except TopicError as exc:
                raise NodeNotRoutable(str(exc)) from None
            body = _normalise_channels(await _resolve_config(conn, node, config, gh_uid, zone_id, defaults))
            digest = config_hash(body)
            stored = node["config"] if isinstance(node["config"], dict) else {}
            stored_version = stored.get("version")
            stored_version = stored_version if isinstance(stored_version, int) and stored_version > 0 else None
            if stored_version is not None and stored.get("config_hash") == digest:
                version, changed = stored_version, False
            else:
                history_max = await conn.fetchval(
                    "SELECT max(version) FROM node_config_versions WHERE node_id = $1", node["id"])
                version = max(stored_version or DEFAULT_STORED_VERSION, history_max or 0) + 1
                changed = True
            full = _ordered(body, version)
            validate_config(full)
            await conn.execute(
                "INSERT INTO node_config_versions (node_id, version, config_hash, config, source, created_at)"
                " VALUES ($1, $2, $3, $4, $5, now()) ON CONFLICT (node_id, version) DO NOTHING",
                node["id"], version, digest, full, source)
            if changed:
                CONFIG_VERSIONS_CREATED.inc()
                await conn.execute(
                    "UPDATE nodes SET config = CASE WHEN jsonb_typeof(config) = 'object' THEN config"
                    " ELSE '{}'::jsonb END || jsonb_build_object('version', $2::int, 'config_hash', $3::text),"
                    " updated_at = now() WHERE id = $1", node["id"], version, digest)
            temp = _temp_topics(topics, node)
            error = None
            try:
                payload = orjson.dumps(full)
                for target in (topic, *temp):
                    await mqtt.publish(target, payload, qos=1, retain=True)
            except MqttError as exc:
                error = f"config version {version} not published: {exc}"
            await _record_publish(conn, node["id"], version, topic, error)
    except NodeConfigFailure as exc:
        CONFIGS_NOT_PUBLISHED.labels(exc.reason).inc()
        log.info("node_config_refused", extra={"node_uid": node_uid, "reason": exc.reason, "error": str(exc)})
        raise
    if error is not None:
        CONFIGS_NOT_PUBLISHED.labels("broker").inc()
        log.warning("node_config_publish_failed", extra={"node_uid": node_uid, "version": version, "error": error})
    else:
        CONFIGS_PUBLISHED.labels(source).inc()
        log.info("node_config_published", extra={"node_uid": node_uid, "version": version, "topic": topic,
                                                 "changed": changed})
    return PublishResult(node_uid=node["uid"], topic=topic, version=version, config_hash=digest, changed=changed,
                         published=error is None, config=full, temp_topics=temp, error=error)


async def _record_publish(conn: asyncpg.Connection, node_id: int, version: int, topic: str,
                          error: str | None) -> None:
    if error is None:
        await conn.execute(
            "INSERT INTO node_config_delivery (node_id, published_version, published_at, published_topic,"
            " publish_error, publish_error_at, temp_pending, updated_at)"
            " VALUES ($1, $2, now(), $3, NULL, NULL, true, now())"
            " ON CONFLICT (node_id) DO UPDATE SET published_version = $2, published_at = now(),"
            " published_topic = $3, publish_error = NULL, publish_error_at = NULL, temp_pending = true,"
            " updated_at = now()", node_id, version, topic)
    else:
        await conn.execute(
            "INSERT INTO node_config_delivery (node_id, publish_error, publish_error_at, updated_at)"
            " VALUES ($1, $2, now(), now())"
            " ON CONFLICT (node_id) DO UPDATE SET publish_error = $2, publish_error_at = now(), updated_at = now()",
            node_id, error)
