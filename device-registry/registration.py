"""Registering a node from its node_hello (contract §5.4 step 5, Laravel's registerNodeFromHello rules).

Same hardware_id → same node, never a duplicate. A new node gets the I-11 uid
`nd-{prefix}-{first 8 characters of hardware_id without ':' '-' '_'}`, with `-1`, `-2`, … on collision.
Lifecycle: ASSIGNED_TO_ZONE when zoned else REGISTERED_BACKEND (an existing node moves
REGISTERED_BACKEND → ASSIGNED_TO_ZONE when a zone appears); validated=true; first_seen_at=now().
A DECOMMISSIONED node's hardware_id counts as unknown: the old row lets go of it and a new node is made.
"""
from __future__ import annotations

import hashlib
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import asyncpg

from common.db import Database
from common.schemas import BIGINT_MAX, NodeHello
from common.topics import TEMP_GH, zone_id_from_segment

UID_PREFIX = {"ph": "ph", "ec": "ec", "climate": "clim", "clim": "clim", "irrig": "irr", "irr": "irr",
              "pump": "irr", "light": "light"}
PRE_REGISTRATION = ("MANUFACTURED", "UNPROVISIONED", "PROVISIONED_WIFI")
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


def uid_base(hardware_id: str, node_type: str | None) -> str:
    prefix = UID_PREFIX.get((node_type or "").strip().lower(), "node")
    # The rule strips ':' '-' '_'; anything else that is not a letter or digit goes too (topic-safe uids).
    core = _NOT_ALNUM.sub("", hardware_id)[:8] or hashlib.sha1(hardware_id.encode()).hexdigest()[:8]
    return f"nd-{prefix}-{core}"


def meta_zone_id(value: object) -> int | None:
    """provisioning_meta.zone_id as an integer: 3, "3" or "zn-3"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value <= BIGINT_MAX else None
    if isinstance(value, str):
        return zone_id_from_segment(value.strip())
    return None


class NewNodeLimit:
    """At most `per_minute` new nodes in any 60 s (Laravel's own registration route is `throttle:20,1`),
    so a flood of invented hardware ids cannot create thousands of nodes. Known hardware ids are never
    limited: a fleet re-announcing itself is not starved by a flood of new ones."""

    WINDOW_SEC = 60.0

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._created: deque[float] = deque()  # monotonic times of the creations in the window

    def allow(self) -> bool:
        now = time.monotonic()
        while self._created and now - self._created[0] >= self.WINDOW_SEC:
            self._created.popleft()
        if len(self._created) >= self.per_minute:
            return False
        self._created.append(now)
        return True


@dataclass(frozen=True)
class Registration:
    node_id: int
    uid: str
    created: bool
    zone_id: int | None
    lifecycle_state: str
    zone_from_hello: int | None  # the zone the hello asked for (sent on to Laravel)


async def _free_uid(conn: asyncpg.Connection, base: str) -> str:
    taken = {r["uid"] for r in await conn.fetch(
        "SELECT uid FROM nodes WHERE uid = $1 OR uid LIKE $2", base, base.replace("_", r"\_") + "-%")}
    if base not in taken:
        return base
    n = 1
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


async def _hello_zone(conn: asyncpg.Connection, hello: NodeHello, topic_gh: str | None,
                      topic_zone: str | None) -> int | None:
    """The zone a hello binds to: the topic's zn-{id} else provisioning_meta.zone_id, inside the greenhouse
    named by greenhouse_token (else the topic's greenhouse) when one is named; None when that zone is unknown."""
    meta = hello.provisioning_meta
    wanted = zone_id_from_segment(topic_zone) if topic_zone else None
    if wanted is None:
        wanted = meta_zone_id(meta.zone_id)
    if wanted is None:
        return None
    token = meta.greenhouse_token or (topic_gh if topic_gh and topic_gh != TEMP_GH else None)
    if token:
        return await conn.fetchval(
            "SELECT z.id FROM zones z JOIN greenhouses g ON g.id = z.greenhouse_id WHERE z.id = $1 AND g.uid = $2",
            wanted, token)
    return await conn.fetchval("SELECT id FROM zones WHERE id = $1", wanted)


async def register_hello(db: Database, hello: NodeHello, *, topic_gh: str | None = None,
                         topic_zone: str | None = None,
                         may_create: Callable[[], bool] = lambda: True) -> Registration | None:
    """The node of this hello, created or updated; None when it would be a new node and `may_create()`
    says no (nothing is written then)."""
    meta = hello.provisioning_meta
    async with db.transaction() as conn:
        # One registration at a time: uid collisions and same-hardware races are decided in order.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('device-registry:register'))")
        zone_id = await _hello_zone(conn, hello, topic_gh, topic_zone)
        node = await conn.fetchrow(
            "SELECT id, uid, zone_id, lifecycle_state FROM nodes WHERE hardware_id = $1", hello.hardware_id)
        new = node is None or node["lifecycle_state"] == "DECOMMISSIONED"
        if new and not may_create():
            return None
        if node is not None and new:
            await conn.execute("UPDATE nodes SET hardware_id = NULL, updated_at = now() WHERE id = $1", node["id"])
            node = None
        if node is None:
            uid = await _free_uid(conn, uid_base(hello.hardware_id, hello.node_type))
            lifecycle = "ASSIGNED_TO_ZONE" if zone_id else "REGISTERED_BACKEND"
            node_id = await conn.fetchval(
                """
                INSERT INTO nodes (uid, hardware_id, name, type, fw_version, hardware_revision, capabilities,
                                   zone_id, lifecycle_state, validated, first_seen_at, created_at, updated_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, true, now(), now(), now()) RETURNING id
                """, uid, hello.hardware_id, meta.node_name, hello.node_type, hello.fw_version,
                hello.hardware_revision, hello.capabilities, zone_id, lifecycle)
            return Registration(node_id, uid, True, zone_id, lifecycle, zone_id)
        zone = node["zone_id"] if node["zone_id"] is not None else zone_id  # the DB zone wins (I-2)
        lifecycle = node["lifecycle_state"]
        if lifecycle in PRE_REGISTRATION:
            lifecycle = "ASSIGNED_TO_ZONE" if zone else "REGISTERED_BACKEND"
        elif lifecycle == "REGISTERED_BACKEND" and zone:
            lifecycle = "ASSIGNED_TO_ZONE"
        await conn.execute(
            """
            UPDATE nodes SET type = coalesce($2, type), fw_version = coalesce($3, fw_version),
                   hardware_revision = coalesce($4, hardware_revision), capabilities = $5,
                   name = coalesce(name, $6), zone_id = $7, lifecycle_state = $8, validated = true,
                   first_seen_at = coalesce(first_seen_at, now()), updated_at = now()
             WHERE id = $1
            """, node["id"], hello.node_type, hello.fw_version, hello.hardware_revision, hello.capabilities,
            meta.node_name, zone, lifecycle)
        return Registration(node["id"], node["uid"], False, zone, lifecycle, zone_id)
