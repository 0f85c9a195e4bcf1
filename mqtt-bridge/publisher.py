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
from common.command_catalogue import validate_command
from common.commands import IssuedCommand, issue_command
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

    # -- facts the body may omit: one query per request, whichever are missing ---------------
    async def zone_facts(self, zone_id: int, channel: str, gh_uid: str | None, node_uid: str | None) -> tuple[str, str]:
        """The greenhouse of the zone and its node that has `channel`, where not given."""
        row = await self.db.fetchrow(
            "SELECT g.uid, ARRAY(SELECT n.uid FROM nodes n JOIN node_channels nc ON nc.node_id = n.id"
            "                     WHERE $3 AND n.zone_id = z.id AND nc.channel = $2 ORDER BY n.id LIMIT 2) AS nodes"
            "  FROM zones z LEFT JOIN greenhouses g ON g.id = z.greenhouse_id WHERE z.id = $1",
            zone_id, channel, not node_uid)
        if row is None:
            raise ApiError(404, f"zone {zone_id} not found")
        if not gh_uid:
            if row["uid"] is None:
                raise ApiError(400, ZONE_REQUIRED)
            gh_uid = row["uid"]
        if not node_uid:
            if not row["nodes"]:
                raise ApiError(404, f"no node in zone {zone_id} has channel {channel!r}")
            if len(row["nodes"]) > 1:  # ambiguous: the caller has to say which node
                raise ApiError(400, ZONE_REQUIRED)
            node_uid = row["nodes"][0]
        return gh_uid, node_uid

    async def node_facts(self, node_uid: str, zone_id: int | None, gh_uid: str | None) -> tuple[int, str]:
        """The node's zone and the zone's greenhouse, where not given."""
        if not zone_id:
            row = await self.db.fetchrow(
                "SELECT n.zone_id, z.id AS zone, g.uid FROM nodes n LEFT JOIN zones z ON z.id = n.zone_id"
                " LEFT JOIN greenhouses g ON g.id = z.greenhouse_id WHERE n.uid = $1", node_uid)
            if row is None:
                raise ApiError(404, f"node {node_uid!r} not found")
            if row["zone_id"] is None:
                raise ApiError(400, NODE_REQUIRED)
            zone_id = row["zone_id"]
        elif not gh_uid:
            row = await self.db.fetchrow(
                "SELECT z.id AS zone, g.uid FROM zones z LEFT JOIN greenhouses g ON g.id = z.greenhouse_id"
                " WHERE z.id = $1", zone_id)
        if not gh_uid:
            if row is None or row["zone"] is None:
                raise ApiError(404, f"zone {zone_id} not found")
            if row["uid"] is None:
                raise ApiError(400, NODE_REQUIRED)
            gh_uid = row["uid"]
        return zone_id, gh_uid

    # -- the two command routes -------------------------------------------------------------
    async def zone_command(self, zone_id: int, req: CommandRequest) -> IssuedCommand:
        if not req.channel:
            raise ApiError(400, ZONE_REQUIRED)
        gh_uid, node_uid = req.greenhouse_uid, req.node_uid
        if not gh_uid or not node_uid:
            gh_uid, node_uid = await self.zone_facts(zone_id, req.channel, gh_uid, node_uid)
        await self._close_later(zone_id, node_uid, req)
        return await self.send(gh_uid, zone_id, node_uid, req.channel, req.type, req.params, req.cmd_id)

    async def node_command(self, node_uid: str, req: CommandRequest) -> IssuedCommand:
        if not req.channel:
            raise ApiError(400, NODE_REQUIRED)
        zone_id, gh_uid = req.zone_id, req.greenhouse_uid
        if not zone_id or not gh_uid:
            zone_id, gh_uid = await self.node_facts(node_uid, zone_id, gh_uid)
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
