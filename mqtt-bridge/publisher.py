"""Commands from the REST API to nodes: fill in missing facts from the database, then publish
through `common.commands.issue_command` (catalogue check, `commands` row, QoS1 with PUBACK,
once per cmd_id, never a false `sent`).

Errors are raised as they are: `ApiError` (400 / 404 with the contract's message), and
`CommandError` / `CommandPublishError` from common.commands, which main.py maps to 422 / 503.

`set_relay {state: true, duration_ms}` (Laravel's valve test button) gets a durable close: the
firmware ignores duration_ms, so an `actuator_closes` row (owner `bridge`) is written before the
command goes out and the bridge sends `set_relay {state:false}` when it is due.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from common.actuator_closes import schedule_close
from common.commands import IssuedCommand, issue_command, validate_command
from common.db import Database
from common.mqtt import MqttClient
from common.schemas import CommandRequest
from common.topics import Topics

ZONE_REQUIRED = "greenhouse_uid, node_uid and channel are required"
NODE_REQUIRED = "greenhouse_uid, zone_id and channel are required"


class ApiError(Exception):
    """An answer other than 200 that a route gives on purpose: status code and `detail`."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


class Publisher:
    def __init__(self, db: Database, mqtt: MqttClient, topics: Topics):
        self.db = db
        self.mqtt = mqtt
        self.topics = topics

    # -- facts the body may omit ------------------------------------------------------------
    async def greenhouse_of_zone(self, zone_id: int, required_message: str) -> str:
        row = await self.db.fetchrow(
            "SELECT g.uid FROM zones z LEFT JOIN greenhouses g ON g.id = z.greenhouse_id WHERE z.id = $1", zone_id)
        if row is None:
            raise ApiError(404, f"zone {zone_id} not found")
        if row["uid"] is None:
            raise ApiError(400, required_message)
        return row["uid"]

    async def zone_of_node(self, node_uid: str, required_message: str) -> int:
        row = await self.db.fetchrow("SELECT zone_id FROM nodes WHERE uid = $1", node_uid)
        if row is None:
            raise ApiError(404, f"node {node_uid!r} not found")
        if row["zone_id"] is None:
            raise ApiError(400, required_message)
        return row["zone_id"]

    async def node_with_channel(self, zone_id: int, channel: str) -> str:
        rows = await self.db.fetch(
            "SELECT n.uid FROM nodes n JOIN node_channels nc ON nc.node_id = n.id"
            " WHERE n.zone_id = $1 AND nc.channel = $2 ORDER BY n.id LIMIT 2", zone_id, channel)
        if not rows:
            if not await self.db.fetchval("SELECT 1 FROM zones WHERE id = $1", zone_id):
                raise ApiError(404, f"zone {zone_id} not found")
            raise ApiError(404, f"no node in zone {zone_id} has channel {channel!r}")
        if len(rows) > 1:  # ambiguous: the caller has to say which node
            raise ApiError(400, ZONE_REQUIRED)
        return rows[0]["uid"]

    # -- the two command routes -------------------------------------------------------------
    async def zone_command(self, zone_id: int, req: CommandRequest) -> IssuedCommand:
        if not req.channel:
            raise ApiError(400, ZONE_REQUIRED)
        gh_uid = req.greenhouse_uid or await self.greenhouse_of_zone(zone_id, ZONE_REQUIRED)
        node_uid = req.node_uid or await self.node_with_channel(zone_id, req.channel)
        await self._close_later(zone_id, node_uid, req)
        return await self.send(gh_uid, zone_id, node_uid, req.channel, req.type, req.params, req.cmd_id)

    async def node_command(self, node_uid: str, req: CommandRequest) -> IssuedCommand:
        if not req.channel:
            raise ApiError(400, NODE_REQUIRED)
        zone_id = req.zone_id or await self.zone_of_node(node_uid, NODE_REQUIRED)
        gh_uid = req.greenhouse_uid or await self.greenhouse_of_zone(zone_id, NODE_REQUIRED)
        await self._close_later(zone_id, node_uid, req)
        return await self.send(gh_uid, zone_id, node_uid, req.channel, req.type, req.params, req.cmd_id)

    async def _close_later(self, zone_id: int, node_uid: str, req: CommandRequest) -> None:
        """A relay switched on "for duration_ms": its close is on record before it can open."""
        params = req.params or {}
        if req.type != "set_relay" or params.get("state") is not True or "duration_ms" not in params:
            return
        validate_command(req.type, params)  # a refused command opens nothing and owes no close
        await schedule_close(self.db, owner="bridge", zone_id=zone_id, node_uid=node_uid, channel=req.channel,
                             close_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(
                                 milliseconds=params["duration_ms"]),
                             reason="duration_ms", opened_cmd_id=req.cmd_id)

    async def send(self, gh_uid: str, zone_id: int, node_uid: str, channel: str, cmd: str,
                   params: dict[str, Any] | None = None, cmd_id: str | None = None) -> IssuedCommand:
        return await issue_command(self.db, self.mqtt, self.topics, gh_uid=gh_uid, zone_id=zone_id,
                                   node_uid=node_uid, channel=channel, cmd=cmd, params=params, cmd_id=cmd_id,
                                   source="bridge")
