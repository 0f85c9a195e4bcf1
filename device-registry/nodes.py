"""Node rows for the REST API: list, get, rename, assign / unassign a zone (lifecycle kept consistent)."""
from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import HTTPException
from pydantic import Field, StrictInt, StringConstraints

from common.db import Database
from common.mqtt import MqttError
from common.nodeconfig import CONFIGURABLE_STATES
from common.schemas import Body
from delivery import ConfigDelivery

log = logging.getLogger("device_registry.nodes")

BEFORE_ZONE = ("MANUFACTURED", "UNPROVISIONED", "PROVISIONED_WIFI", "REGISTERED_BACKEND")
ZONED = ("ASSIGNED_TO_ZONE", "ACTIVE", "DEGRADED")


class RenameBody(Body):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]


class ZoneBody(Body):
    zone_id: StrictInt = Field(ge=1)


_SELECT = """
SELECT n.id, n.uid, n.hardware_id, n.name, n.type, n.fw_version, n.hardware_revision, n.capabilities,
       n.zone_id, n.status, n.lifecycle_state, n.validated, n.first_seen_at, n.last_seen_at,
       n.created_at, n.updated_at,
       CASE WHEN jsonb_typeof(n.config) = 'object' THEN n.config->'version' END AS config_version,
       d.applied_version, d.published_version
  FROM nodes n LEFT JOIN node_config_delivery d ON d.node_id = n.id
"""


def _public(row) -> dict[str, Any]:
    """A node as the API shows it (never nodes.config: it may hold Wi-Fi passwords)."""
    node = {k: (v.isoformat() + "Z" if hasattr(v, "isoformat") else v) for k, v in dict(row).items()}
    node["can_receive_config"] = row["zone_id"] is not None and row["lifecycle_state"] in CONFIGURABLE_STATES
    return node


async def list_nodes(db: Database, *, zone_id: int | None, status: str | None, lifecycle_state: str | None,
                     limit: int, offset: int) -> list[dict[str, Any]]:
    rows = await db.fetch(
        _SELECT + " WHERE ($1::bigint IS NULL OR n.zone_id = $1) AND ($2::text IS NULL OR n.status = lower($2))"
        " AND ($3::text IS NULL OR n.lifecycle_state = upper($3)) ORDER BY n.id LIMIT $4 OFFSET $5",
        zone_id, status, lifecycle_state, limit, offset)
    return [_public(r) for r in rows]


async def get_node(db: Database, uid: str) -> dict[str, Any] | None:
    row = await db.fetchrow(_SELECT + " WHERE n.uid = $1", uid)
    return _public(row) if row else None


async def rename(db: Database, uid: str, name: str) -> bool:
    result = await db.execute("UPDATE nodes SET name = $2, updated_at = now() WHERE uid = $1", uid, name)
    return result.endswith(" 1")


async def _clear_old_topic(delivery: ConfigDelivery, node_id: int) -> None:
    """The retained config on the topic the node leaves is cleared (empty retained payload)."""
    topic = await delivery.db.fetchval("SELECT published_topic FROM node_config_delivery WHERE node_id = $1", node_id)
    if not topic:
        return
    try:
        await delivery.mqtt.publish(topic, b"", qos=1, retain=True)
    except MqttError as exc:
        log.warning("old_config_topic_not_cleared", extra={"topic": topic, "error": str(exc)})
        return
    await delivery.db.execute("UPDATE node_config_delivery SET published_topic = NULL WHERE node_id = $1", node_id)


async def assign_zone(db: Database, delivery: ConfigDelivery, uid: str, zone_id: int) -> None:
    async with db.transaction() as conn:
        node = await conn.fetchrow("SELECT id, zone_id, lifecycle_state FROM nodes WHERE uid = $1 FOR UPDATE", uid)
        if node is None:
            raise HTTPException(404, f"node {uid!r} not found")
        if node["lifecycle_state"] in ("DECOMMISSIONED", "MAINTENANCE"):
            raise HTTPException(409, f"node {uid!r} is {node['lifecycle_state']}; it cannot be assigned a zone")
        if not await conn.fetchval("SELECT 1 FROM zones WHERE id = $1", zone_id):
            raise HTTPException(404, f"zone {zone_id} not found")
        lifecycle = "ASSIGNED_TO_ZONE" if node["lifecycle_state"] in BEFORE_ZONE else node["lifecycle_state"]
        await conn.execute("UPDATE nodes SET zone_id = $2, lifecycle_state = $3, updated_at = now() WHERE id = $1",
                           node["id"], zone_id, lifecycle)
    if node["zone_id"] is not None and node["zone_id"] != zone_id:
        await _clear_old_topic(delivery, node["id"])
    log.info("node_zone_assigned", extra={"node_uid": uid, "zone_id": zone_id, "lifecycle_state": lifecycle})


async def unassign_zone(db: Database, delivery: ConfigDelivery, uid: str) -> None:
    async with db.transaction() as conn:
        node = await conn.fetchrow("SELECT id, zone_id, lifecycle_state FROM nodes WHERE uid = $1 FOR UPDATE", uid)
        if node is None:
            raise HTTPException(404, f"node {uid!r} not found")
        lifecycle = "REGISTERED_BACKEND" if node["lifecycle_state"] in ZONED else node["lifecycle_state"]
        await conn.execute("UPDATE nodes SET zone_id = NULL, lifecycle_state = $2, updated_at = now() WHERE id = $1",
                           node["id"], lifecycle)
    if node["zone_id"] is not None:
        await _clear_old_topic(delivery, node["id"])
    log.info("node_zone_unassigned", extra={"node_uid": uid, "lifecycle_state": lifecycle})
