"""Zone water routines of contract §7.1 / §4.3: fill, drain and flow calibration.

Fill / drain drive a valve the firmware understands (`set_relay`; the `fill` / `drain` command
names of the original have no firmware support, contract §4.2): the zone's online fill valve
(`valve_fill`, `fill_valve`, `valve_in`) or drain valve (`valve_drain`, `drain_valve`,
`valve_out`). Without one the request is refused up front (409 naming what is missing).
FILL_STARTED, `set_relay {state:true}`, then `telemetry_last` WATER_LEVEL is polled every
BRIDGE_ROUTINE_POLL_SEC until the level reaches the target (fill: ≥, drain: ≤) or
max_duration_sec passes — or the node refuses the open (the routine ends `failed` at once) — then
always `set_relay {state:false}` (also when the service stops or the run fails), FILL_FINISHED.

Flow calibration: FLOW_CALIBRATION_STARTED, `run_pump {duration_ms}` on the channel, wait for the
run, average the zone's FLOW_RATE samples of that window (telemetry_samples: `raw` carries the
pulse counts), K = avg_flow / pulses_per_minute (1.0 when the sensor reports no pulses, i.e. the
flow is already in L/min, as the original), then `node_channels.config.flow_calibration` is written
directly (contract [DECISION]) and FLOW_CALIBRATION_FINISHED.

Durable: every routine is a `bridge_routines` row (one running per zone, across replicas) whose
`alive_at` the running bridge refreshes. A bridge that starts finds the running rows of its own
previous life (same instance name) — and any row not refreshed for BRIDGE_ROUTINE_STALE_SEC —
stops their actuator, writes `*_FINISHED {status: "interrupted"}` and records them `interrupted`
(also as the task's state). All commands go through the service's one MQTT client via `Publisher.send`.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from typing import Any

import asyncpg

from common.actuator_closes import run_due
from common.alerts import add_zone_event
from common.channels import DRAIN_CHANNELS, FILL_CHANNELS, is_valve
from common.db import Database
from common.schemas import CalibrateFlowRequest, FillRequest
from common.lifecycle import cancel_tasks

from publisher import ApiError, Publisher
from settings import ServiceSettings
from tasks import TaskRegistry, current_task_id

log = logging.getLogger("bridge.routines")

LEVEL_LIMITS = {"fill": (0.1, 1.0), "drain": (0.0, 0.9)}
PUMP_SECONDS = (5, 60)
WATER_CHANNELS = {"fill": FILL_CHANNELS, "drain": DRAIN_CHANNELS}
FINISHED_EVENT = {"fill": "FILL_FINISHED", "drain": "DRAIN_FINISHED", "calibrate_flow": "FLOW_CALIBRATION_FINISHED"}
ZONE_NOT_FOUND = "Zone not found or has no greenhouse"

_WATER_VALVE = """
SELECT n.uid, nc.channel
  FROM nodes n JOIN node_channels nc ON nc.node_id = n.id
 WHERE n.zone_id = $1 AND lower(n.status) = 'online' AND lower(nc.channel) = ANY($2::text[])
   AND lower(coalesce(nc.type, '')) NOT IN ('sensor', 's')
 ORDER BY array_position($2::text[], lower(nc.channel)), n.id
 LIMIT 1
"""
_LEVEL = """
SELECT value FROM telemetry_last
 WHERE zone_id = $1 AND upper(metric_type) = 'WATER_LEVEL' AND value IS NOT NULL
 ORDER BY updated_at DESC NULLS LAST LIMIT 1
"""
_FLOW_SAMPLES = """
SELECT value, raw FROM telemetry_samples
 WHERE zone_id = $1 AND upper(metric_type) = 'FLOW_RATE' AND value IS NOT NULL AND ts >= $2 AND ts <= $3
 ORDER BY ts
"""


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="seconds") + "Z"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Routines:
    def __init__(self, db: Database, publisher: Publisher, options: ServiceSettings,
                 tasks: TaskRegistry | None = None, instance: str = "bridge"):
        self.db = db
        self.publisher = publisher
        self.options = options
        self.tasks = tasks              # recovered routines are registered here as finished tasks
        self.instance = instance        # stable per replica (the MQTT client id): a restart knows its rows
        self.stopping = asyncio.Event()  # set when the service stops: runs end early and stop their pump
        self._mine: set[str] = set()     # routine ids running in this process
        self._recovery: asyncio.Task | None = None

    # -- durability -------------------------------------------------------------------------
    def start(self) -> None:
        """Begin recovering interrupted routines (now, and whenever another bridge's go stale)."""
        self._recovery = asyncio.create_task(self._recovery_loop(), name="routine-recovery")

    async def close(self) -> None:
        if self._recovery is not None:
            await cancel_tasks([self._recovery])
            self._recovery = None

    async def _recovery_loop(self) -> None:
        """Every second: the due relay closes of the command API (`set_relay` with duration_ms);
        at start-up and every stale/3 s (at most 10 s): interrupted routines."""
        pause = max(1.0, min(self.options.routine_stale_sec / 3, 10.0))
        next_recovery = 0.0
        while not self.stopping.is_set():
            try:
                if self.publisher.mqtt.connected:  # a stop command needs the broker
                    p = self.publisher
                    await run_due(self.db, p.mqtt, p.topics, owner="bridge", now=dt.datetime.now(dt.timezone.utc))
                    if time.monotonic() >= next_recovery:
                        await self.recover()
                        next_recovery = time.monotonic() + pause
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - database down: tried again on the next round
                log.warning("routine_recovery_failed", exc_info=True)
            if await self._pause(1.0):
                return

    async def recover(self) -> list[str]:
        """Interrupt the running routines no live bridge is running; returns their ids."""
        stale = _utcnow() - dt.timedelta(seconds=self.options.routine_stale_sec)
        rows = await self.db.fetch(
            "SELECT id FROM bridge_routines WHERE state = 'running'"
            " AND ((instance = $1 AND NOT id = ANY($2::text[])) OR alive_at < $3)",
            self.instance, list(self._mine), stale)
        recovered = []
        for row in rows:
            claimed = await self.db.fetchrow(
                "UPDATE bridge_routines SET state = 'interrupted', finished_at = $2,"
                " result = jsonb_build_object('success', false, 'error', 'interrupted')"
                " WHERE id = $1 AND state = 'running' RETURNING *", row["id"], _utcnow())
            if claimed is None:
                continue  # another bridge took it
            where = dict(gh_uid=claimed["gh_uid"], zone_id=claimed["zone_id"], node_uid=claimed["node_uid"],
                         channel=claimed["channel"])
            stop_cmd_id, stop_error = await self._stop(where) if claimed["node_uid"] else (None, "no_actuator")
            details = {"status": "interrupted", "task_id": claimed["id"], "node_uid": claimed["node_uid"],
                       "channel": claimed["channel"], "start_time": _iso(claimed["started_at"]),
                       "last_alive": _iso(claimed["alive_at"]), "stop_cmd_id": stop_cmd_id,
                       "stop_error": stop_error, "end_time": _iso(_utcnow()), **(claimed["request"] or {})}
            await self._event(claimed["zone_id"], FINISHED_EVENT.get(claimed["kind"], "ROUTINE_FINISHED"), details)
            await self.db.execute("UPDATE bridge_routines SET result = result || $2::jsonb WHERE id = $1",
                                  claimed["id"], {"stop_cmd_id": stop_cmd_id, "stop_error": stop_error})
            if self.tasks is not None:
                self.tasks.add_finished(claimed["id"], claimed["kind"], claimed["zone_id"], claimed["started_at"],
                                        "interrupted", {"success": False, "error": "interrupted",
                                                        "stop_cmd_id": stop_cmd_id})
            log.warning("routine_interrupted", extra={"task_id": claimed["id"], "kind": claimed["kind"],
                                                      "zone_id": claimed["zone_id"], "stop_error": stop_error})
            recovered.append(claimed["id"])
        return recovered

    async def _begin(self, kind: str, zone_id: int, gh_uid: str, node_uid: str | None, channel: str | None,
                     request: dict[str, Any]) -> str:
        routine_id = current_task_id.get() or uuid.uuid4().hex
        now = _utcnow()
        self._mine.add(routine_id)  # before the row exists: the recovery must never take it for an orphan
        try:
            await self.db.execute(
                "INSERT INTO bridge_routines (id, kind, zone_id, gh_uid, node_uid, channel, instance, request,"
                " started_at, alive_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
                routine_id, kind, zone_id, gh_uid, node_uid, channel, self.instance, request, now)
        except BaseException as exc:
            self._mine.discard(routine_id)
            if isinstance(exc, asyncpg.UniqueViolationError):
                raise ApiError(409, f"zone {zone_id} is already running a routine") from None
            raise
        return routine_id

    async def _alive(self, routine_id: str) -> None:
        await self.db.execute("UPDATE bridge_routines SET alive_at = $2 WHERE id = $1", routine_id, _utcnow())

    async def _end(self, routine_id: str, state: str, result: dict[str, Any]) -> None:
        self._mine.discard(routine_id)
        await self.db.execute("UPDATE bridge_routines SET state = $2, result = $3, finished_at = $4"
                              " WHERE id = $1 AND state = 'running'", routine_id, state, result, _utcnow())

    # -- helpers ----------------------------------------------------------------------------
    async def _pause(self, seconds: float) -> bool:
        """Sleep; True when the service is stopping (the run should end now)."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def _event(self, zone_id: int, event_type: str, details: dict[str, Any]) -> None:
        async with self.db.transaction() as conn:
            await add_zone_event(conn, zone_id, event_type, details)

    async def _greenhouse(self, zone_id: int) -> str:
        gh_uid = await self.db.fetchval(
            "SELECT g.uid FROM zones z JOIN greenhouses g ON g.id = z.greenhouse_id WHERE z.id = $1", zone_id)
        if gh_uid is None:
            raise ApiError(404, ZONE_NOT_FOUND)
        return gh_uid

    async def _water_valve(self, kind: str, zone_id: int) -> asyncpg.Record:
        names = WATER_CHANNELS[kind]
        row = await self.db.fetchrow(_WATER_VALVE, zone_id, list(names))
        if row is None:
            raise ApiError(409, f"zone {zone_id} has no online {kind} valve: {kind} needs an actuator channel "
                                f"named {', '.join(names[:-1])} or {names[-1]} on an online node of the zone")
        return row

    async def _running_elsewhere(self, zone_id: int) -> None:
        other = await self.db.fetchrow("SELECT id, kind FROM bridge_routines WHERE zone_id = $1 AND state = 'running'",
                                       zone_id)
        if other is not None:
            raise ApiError(409, f"zone {zone_id} is already running a {other['kind']} routine (task {other['id']})")

    async def _command_status(self, cmd_id: str) -> asyncpg.Record | None:
        return await self.db.fetchrow("SELECT status, error_code, error_message FROM commands WHERE cmd_id = $1",
                                      cmd_id)

    # -- fill / drain -----------------------------------------------------------------------
    async def check_level(self, kind: str, zone_id: int, req: FillRequest) -> str:
        """Refuse a bad request before anything runs (400 / 404 / 409); returns the greenhouse uid."""
        lo, hi = LEVEL_LIMITS[kind]
        if not lo <= req.target_level <= hi:
            raise ApiError(400, f"target_level must be between {lo} and {hi}")
        gh_uid = await self._greenhouse(zone_id)
        await self._water_valve(kind, zone_id)
        await self._running_elsewhere(zone_id)
        return gh_uid

    async def run_level(self, kind: str, zone_id: int, gh_uid: str, req: FillRequest) -> dict[str, Any]:
        upper, target = kind.upper(), req.target_level
        valve = await self._water_valve(kind, zone_id)
        where = dict(gh_uid=gh_uid, zone_id=zone_id, node_uid=valve["uid"], channel=valve["channel"])
        routine_id = await self._begin(kind, zone_id, gh_uid, valve["uid"], valve["channel"],
                                       {"target_level": target, "max_duration_sec": req.max_duration_sec})
        started_at, started = _utcnow(), time.monotonic()
        base = {"target_level": target, "max_duration_sec": req.max_duration_sec, "start_time": _iso(started_at),
                "task_id": routine_id, "node_uid": valve["uid"], "channel": valve["channel"]}
        await self._event(zone_id, f"{upper}_STARTED", base)
        try:
            start_cmd = await self.publisher.send(cmd="set_relay", params={"state": True}, **where)
        except Exception as exc:
            # The open may still have reached the broker (e.g. the database failed after the publish).
            stop_cmd_id, stop_error = await self._stop(where)
            await self._event(zone_id, f"{upper}_FINISHED", {**base, "status": "failed", "error": str(exc),
                                                              "stop_cmd_id": stop_cmd_id, "stop_error": stop_error,
                                                              "end_time": _iso(_utcnow())})
            await self._end(routine_id, "failed", {"success": False, "error": str(exc)})
            raise
        level, reached, status, refusal = None, False, "cancelled", None
        try:
            while True:
                if await self._pause(self.options.routine_poll_sec):
                    break
                await self._alive(routine_id)
                answer = await self._command_status(start_cmd.cmd_id)
                if answer is not None and answer["status"] in ("failed", "timeout"):
                    # The node refused the open (or never answered): nothing is flowing; stop waiting.
                    status = "failed"
                    refusal = {"error": "refused" if answer["status"] == "failed" else "no_answer",
                               "error_code": answer["error_code"], "error_message": answer["error_message"]}
                    break
                current = await self.db.fetchval(_LEVEL, zone_id)
                if current is not None:
                    level = current
                    reached = current >= target if kind == "fill" else current <= target
                if reached or time.monotonic() - started >= req.max_duration_sec:
                    status = "completed" if reached else "timeout"
                    break
        finally:  # the valve is always closed, also when the run is cancelled or fails
            elapsed = round(time.monotonic() - started, 3)
            stop_cmd_id, stop_error = await self._stop(where)
            await self._event(zone_id, f"{upper}_FINISHED", {
                **base, "status": status, "final_level": level, "elapsed_sec": elapsed,
                "cmd_id": start_cmd.cmd_id, "stop_cmd_id": stop_cmd_id, "stop_error": stop_error,
                "end_time": _iso(_utcnow()), **(refusal or {})})
            result: dict[str, Any] = {"success": reached, "target_level": target, "final_level": level,
                                      "elapsed_sec": elapsed}
            if not reached:
                result["error"] = {"timeout": "timeout", "failed": refusal and refusal["error"]}.get(status,
                                                                                                     "cancelled")
            if refusal and refusal["error_code"]:
                result["error_code"] = refusal["error_code"]
            if stop_error:
                result["stop_error"] = stop_error
            await self._end(routine_id, "succeeded" if reached else ("cancelled" if status == "cancelled"
                                                                      else "failed"), result)
        return result

    async def _stop(self, where: dict[str, Any]) -> tuple[str | None, str | None]:
        cmd, params = ("set_relay", {"state": False}) if is_valve(where["channel"]) else ("stop_pump", {})
        try:
            issued = await self.publisher.send(cmd=cmd, params=params, **where)
            return issued.cmd_id, None
        except Exception as exc:  # noqa: BLE001 - reported in the result and the FINISHED event
            log.error("routine_stop_failed", extra={**where, "error": str(exc)})
            return None, str(exc)

    # -- flow calibration -------------------------------------------------------------------
    async def check_calibration(self, zone_id: int, req: CalibrateFlowRequest) -> tuple[str, int, str]:
        """400 / 404 / 409 before anything runs; returns (greenhouse uid, node_channels.id, node uid)."""
        lo, hi = PUMP_SECONDS
        if not lo <= req.pump_duration_sec <= hi:
            raise ApiError(400, f"pump_duration_sec must be between {lo} and {hi}")
        gh_uid = await self._greenhouse(zone_id)
        row = await self.db.fetchrow(
            "SELECT nc.id, n.uid FROM nodes n JOIN node_channels nc ON nc.node_id = n.id"
            " WHERE n.id = $1 AND n.zone_id = $2 AND nc.channel = $3", req.node_id, zone_id, req.channel)
        if row is None:
            raise ApiError(404, f"node {req.node_id} with channel {req.channel!r} not found in zone {zone_id}")
        await self._running_elsewhere(zone_id)
        return gh_uid, row["id"], row["uid"]

    async def run_calibration(self, zone_id: int, gh_uid: str, channel_id: int, node_uid: str,
                              req: CalibrateFlowRequest) -> dict[str, Any]:
        seconds = req.pump_duration_sec
        routine_id = await self._begin("calibrate_flow", zone_id, gh_uid, node_uid, req.channel,
                                       {"node_id": req.node_id, "pump_duration_sec": seconds})
        try:
            result = await self._calibrate(zone_id, gh_uid, channel_id, node_uid, req, routine_id)
        except BaseException as exc:
            await self._end(routine_id, "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed",
                            {"success": False, "error": str(exc) or type(exc).__name__})
            raise
        await self._end(routine_id, "succeeded" if result.get("success") else
                        ("cancelled" if result.get("error") == "cancelled" else "failed"), result)
        return result

    async def _calibrate(self, zone_id: int, gh_uid: str, channel_id: int, node_uid: str,
                         req: CalibrateFlowRequest, routine_id: str) -> dict[str, Any]:
        seconds = req.pump_duration_sec
        window_start = await self.db.fetchval("SELECT now()::timestamp")
        base = {"node_id": req.node_id, "node_uid": node_uid, "channel": req.channel, "pump_duration_sec": seconds,
                "start_time": _iso(window_start), "task_id": routine_id}
        await self._event(zone_id, "FLOW_CALIBRATION_STARTED", base)
        try:
            issued = await self.publisher.send(gh_uid, zone_id, node_uid, req.channel, "run_pump",
                                               {"duration_ms": seconds * 1000})
        except Exception as exc:
            await self._event(zone_id, "FLOW_CALIBRATION_FINISHED", {**base, "status": "failed", "error": str(exc)})
            raise
        if await self._pause(seconds + self.options.flow_settle_sec):
            stop_cmd_id, stop_error = await self._stop(dict(gh_uid=gh_uid, zone_id=zone_id, node_uid=node_uid,
                                                            channel=req.channel))
            await self._event(zone_id, "FLOW_CALIBRATION_FINISHED", {
                **base, "status": "cancelled", "cmd_id": issued.cmd_id, "stop_cmd_id": stop_cmd_id,
                "stop_error": stop_error})
            return {"success": False, "error": "cancelled", "pump_duration_sec": seconds}
        window_end = await self.db.fetchval("SELECT now()::timestamp")
        rows = await self.db.fetch(_FLOW_SAMPLES, zone_id, window_start, window_end)
        if len(rows) < 2:
            await self._event(zone_id, "FLOW_CALIBRATION_FINISHED", {
                **base, "status": "failed", "error": "insufficient_flow_data", "samples_count": len(rows),
                "cmd_id": issued.cmd_id, "end_time": _iso(window_end)})
            return {"success": False, "error": "insufficient_flow_data", "samples_count": len(rows),
                    "pump_duration_sec": seconds}
        avg_flow = sum(r["value"] for r in rows) / len(rows)
        pulses = [_pulses(r["raw"]) for r in rows]
        pulses = [p for p in pulses if p is not None]
        per_minute = sum(pulses) / seconds * 60.0 if pulses else 0.0
        calibration = {"K": avg_flow / per_minute if per_minute > 0 else 1.0, "calibrated_at": _iso(window_end),
                       "avg_flow_l_per_min": avg_flow, "pump_duration_sec": seconds, "samples_count": len(rows)}
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE node_channels SET config = coalesce(config, '{}'::jsonb)"
                " || jsonb_build_object('flow_calibration', $2::jsonb), updated_at = now() WHERE id = $1",
                channel_id, calibration)
            await add_zone_event(conn, zone_id, "FLOW_CALIBRATION_FINISHED",
                                 {**base, "status": "completed", "cmd_id": issued.cmd_id, **calibration})
        return {"success": True, **calibration}


def _pulses(raw: Any) -> float | None:
    if isinstance(raw, dict):
        for key in ("pulses", "count", "pulse_count"):
            value = raw.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None
