"""The bridge's REST routes (contract §7.1), each with OpenAPI examples for /docs.

Success bodies are `{"status":"ok","data":{...}}`; errors are FastAPI's `{"detail": ...}`.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated

import orjson
from fastapi import APIRouter, Body, Path, Query
from fastapi.responses import Response
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.db import Database
from common.http_api import ok
from common.mqtt import MqttClient
from common.nodeconfig import NodeConfigFailure, publish_node_config
from common.schemas import (CalibrateFlowRequest, CommandRequest, ConfigPublishRequest, FillRequest,
                            ZoneUpdatedRequest)
from common.topics import zone_id_from_segment

import examples as ex
from publisher import ApiError, Publisher
from routines import Routines
from tasks import TaskRegistry


@dataclass(frozen=True)
class Deps:
    """What the routes use (built by main.BridgeService)."""
    db: Database
    mqtt: MqttClient
    redis: Redis
    config_channel: str  # the Redis channel the automation engine listens to for configuration changes
    publisher: Publisher
    routines: Routines
    tasks: TaskRegistry
    retry_after: dict[str, str]  # headers of a 503


def parse_zone(segment: str) -> int:
    """`3` or `zn-3` (the topic's zone segment) → 3."""
    zone_id = zone_id_from_segment(segment)
    if not zone_id:
        raise ApiError(422, [{"loc": ["path", "zone_id"], "msg": "must be a positive integer or zn-<id>",
                              "type": "value_error", "input": segment[:64]}])
    return zone_id


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


ZonePath = Annotated[str, Path(description="zone id, `3` or `zn-3`", examples=["3"], max_length=24)]
# Path segments that could never be stored (control characters, NUL) are a 422 before any query.
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
NodePath = Annotated[str, Path(description="nodes.uid", examples=["nd-ph-esp32a1b"], max_length=128,
                               pattern=PRINTABLE)]
AsyncFlag = Annotated[bool, Query(alias="async", description="1 → run in the background, answer 202 with a "
                                                           "task id (poll GET /bridge/tasks/{task_id})")]


def build_router(deps: Deps) -> APIRouter:
    router = APIRouter(prefix="/bridge", tags=["bridge"])

    @router.post("/zones/{zone_id}/commands", summary="Send a command to a node of a zone",
                 responses=ex.responses(ex.COMMAND_OK, 400, 401, 404, 413, 422, 500, 503))
    async def zone_command(zone_id: ZonePath,
                           body: Annotated[CommandRequest, Body(openapi_examples=ex.ZONE_COMMAND)]) -> Response:
        """Publish `type` as the command's `cmd` to `{gh}/zn-{zone_id}/{node_uid}/{channel}/command` (QoS 1).
        `greenhouse_uid` and `node_uid` may be omitted: they are looked up in the database (the node is the
        one in the zone that has `channel`). A repeated `cmd_id` is published once and answered the same."""
        issued = await deps.publisher.zone_command(parse_zone(zone_id), body)
        return ok({"command_id": issued.cmd_id})

    @router.post("/nodes/{node_uid}/commands", summary="Send a command to a node",
                 responses=ex.responses(ex.COMMAND_OK, 400, 401, 404, 413, 422, 500, 503))
    async def node_command(node_uid: NodePath,
                           body: Annotated[CommandRequest, Body(openapi_examples=ex.NODE_COMMAND)]) -> Response:
        """As the zone route; `zone_id` and `greenhouse_uid` may be omitted (taken from the node's zone)."""
        issued = await deps.publisher.node_command(node_uid, body)
        return ok({"command_id": issued.cmd_id})

    @router.post("/nodes/{node_uid}/config", summary="Publish a node its NodeConfig",
                 responses=ex.responses(ex.CONFIG_OK, 400, 401, 404, 413, 422, 500, 503))
    async def node_config(node_uid: NodePath,
                          body: Annotated[ConfigPublishRequest, Body(openapi_examples=ex.CONFIG)]) -> Response:
        """Through common.nodeconfig (the same code as the device-registry): §5.1 checks (required keys,
        ≤ 4096 bytes) else 422, `version` set by content hash, published QoS 1 retained on
        `{gh}/zn-{zone}/{uid}/config` and on the gh-temp topics of the node. Zone and greenhouse come from
        the body, else from the database (400 with the contract's messages when the node has none)."""
        if body.node_uid != node_uid:
            raise ApiError(422, [{"loc": ["body", "node_uid"], "type": "value_error", "input": body.node_uid[:128],
                                  "msg": f"must equal the node uid of the path ({node_uid[:128]!r})"}])
        try:
            result = await publish_node_config(deps.db, deps.mqtt, deps.publisher.topics, node_uid,
                                               body.config, zone_id=body.zone_id, gh_uid=body.greenhouse_uid or None)
        except NodeConfigFailure as exc:
            raise ApiError(exc.status_code, str(exc)) from None
        if not result.published:
            raise ApiError(503, result.error, deps.retry_after)
        return ok({"published": True, "topic": result.topic, "version": result.version,
                   "config_hash": result.config_hash, "changed": result.changed})

    @router.get("/commands/{cmd_id}", summary="A command's lifecycle",
                responses=ex.responses(ex.COMMAND_STATUS_OK, 401, 404, 422, 503))
    async def command_status(cmd_id: Annotated[str, Path(max_length=255, pattern=PRINTABLE,
                                                         examples=[ex.CMD_ID])]) -> Response:
        """Status `pending → sent → ack | failed | timeout` with its timestamps and the node's error."""
        row = await deps.db.fetchrow(
            "SELECT c.cmd_id, c.cmd, c.status, c.zone_id, n.uid AS node_uid, c.channel,"
            " CASE WHEN jsonb_typeof(c.params) = 'object' THEN c.params ELSE '{}'::jsonb END AS params, c.source,"
            " c.error_code, c.error_message, c.created_at, c.sent_at, c.ack_at, c.failed_at, c.updated_at"
            " FROM commands c LEFT JOIN nodes n ON n.id = c.node_id WHERE c.cmd_id = $1", cmd_id)
        if row is None:
            raise ApiError(404, f"command {cmd_id!r} not found")
        data = dict(row)
        for name in ("created_at", "sent_at", "ack_at", "failed_at", "updated_at"):
            data[name] = _iso(data[name])
        return ok(data)

    async def start_routine(kind: str, zone_id: int, run, background: bool) -> Response:
        entry = deps.tasks.start(kind, zone_id, run)
        if background:
            return ok({"task_id": entry.id}, 202)
        return ok(await deps.tasks.wait(entry))

    @router.post("/zones/{zone_id}/fill", summary="Fill the zone's tank to a level",
                 responses=ex.responses(ex.LEVEL_OK, 400, 401, 404, 409, 422, 500, 503, accepted=True))
    async def fill(zone_id: ZonePath, body: Annotated[FillRequest, Body(openapi_examples=ex.FILL)],
                   background: AsyncFlag = False) -> Response:
        """`fill {target_level}` to the zone's water node, then WATER_LEVEL is polled every 2 s until it
        reaches `target_level` (0.1–1.0) or `max_duration_sec` passes; the node is then told to stop.
        Events FILL_STARTED / FILL_FINISHED."""
        zid = parse_zone(zone_id)
        gh_uid = await deps.routines.check_level("fill", zid, body)
        return await start_routine("fill", zid, lambda: deps.routines.run_level("fill", zid, gh_uid, body),
                                   background)

    @router.post("/zones/{zone_id}/drain", summary="Drain the zone's tank to a level",
                 responses=ex.responses(ex.LEVEL_OK, 400, 401, 404, 409, 422, 500, 503, accepted=True))
    async def drain(zone_id: ZonePath, body: Annotated[FillRequest, Body(openapi_examples=ex.DRAIN)],
                    background: AsyncFlag = False) -> Response:
        """Mirror of fill: `drain`, stop once WATER_LEVEL ≤ `target_level` (0.0–0.9). DRAIN_* events."""
        zid = parse_zone(zone_id)
        gh_uid = await deps.routines.check_level("drain", zid, body)
        return await start_routine("drain", zid, lambda: deps.routines.run_level("drain", zid, gh_uid, body),
                                   background)

    @router.post("/zones/{zone_id}/calibrate-flow", summary="Calibrate a flow sensor with a pump run",
                 responses=ex.responses(ex.CALIBRATION_OK, 400, 401, 404, 409, 422, 500, 503, accepted=True))
    async def calibrate_flow(zone_id: ZonePath,
                             body: Annotated[CalibrateFlowRequest, Body(openapi_examples=ex.CALIBRATE)],
                             background: AsyncFlag = False) -> Response:
        """`run_pump` for `pump_duration_sec` (5–60), average the zone's FLOW_RATE samples of the run,
        compute K and store it in `node_channels.config.flow_calibration`. FLOW_CALIBRATION_* events."""
        zid = parse_zone(zone_id)
        gh_uid, channel_id, node_uid = await deps.routines.check_calibration(zid, body)
        return await start_routine(
            "calibrate_flow", zid,
            lambda: deps.routines.run_calibration(zid, gh_uid, channel_id, node_uid, body), background)

    @router.get("/tasks/{task_id}", summary="State of a background routine",
                responses=ex.responses(ex.TASK_OK, 401, 404, 422))
    async def task_status(task_id: Annotated[str, Path(max_length=64, examples=[ex.TASK_ID])]) -> Response:
        """`state` is running, succeeded, failed (see `result.error` or `error`) or cancelled."""
        entry = deps.tasks.get(task_id)
        if entry is None:
            raise ApiError(404, f"task {task_id!r} not found")
        return ok(entry.as_dict())

    @router.post("/config/zone-updated", status_code=202, summary="Laravel changed a zone: reload configuration",
                 responses=ex.responses(ex.ZONE_UPDATED_OK, 401, 422, 503, ok_status=202))
    async def zone_updated(body: Annotated[ZoneUpdatedRequest, Body(openapi_examples=ex.ZONE_UPDATED)]) -> Response:
        """Publishes `{zone_id, greenhouse_uid}` on the Redis channel `<prefix>config:changed`, which the
        automation engine listens to."""
        message = {"zone_id": body.zone_id, "greenhouse_uid": body.greenhouse_uid}
        try:
            receivers = await deps.redis.publish(deps.config_channel, orjson.dumps(message))
        except (RedisError, OSError) as exc:
            raise ApiError(503, f"Redis unavailable: {exc}", deps.retry_after) from None
        return ok({**message, "receivers": receivers}, 202)

    return router
