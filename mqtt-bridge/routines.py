"""Zone water routines of contract §7.1 / §4.3: fill, drain and flow calibration.

Fill / drain: FILL_STARTED event, `fill {target_level}` (or `drain`) to the zone's water node,
poll `telemetry_last` WATER_LEVEL every BRIDGE_ROUTINE_POLL_SEC until the level reaches the target
(fill: ≥, drain: ≤) or max_duration_sec passes, then always a stop command (also when the service
stops or the run fails), then FILL_FINISHED. `fill` / `drain` have no firmware support yet (contract §4.2).

Flow calibration: FLOW_CALIBRATION_STARTED, `run_pump {duration_ms}` on the channel, wait for the
run, average the zone's FLOW_RATE samples of that window (telemetry_samples: `raw` carries the
pulse counts), K = avg_flow / pulses_per_minute (1.0 when the sensor reports no pulses, i.e. the
flow is already in L/min, as the original), then `node_channels.config.flow_calibration` is written
directly (contract [DECISION]) and FLOW_CALIBRATION_FINISHED.

All commands go through the service's one MQTT client via `Publisher.send`.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any

from common.alerts import add_zone_event
from common.db import Database
from common.schemas import CalibrateFlowRequest, FillRequest

from bridge_settings import BridgeSettings
from publisher import ApiError, Publisher

log = logging.getLogger("bridge.routines")

LEVEL_LIMITS = {"fill": (0.1, 1.0), "drain": (0.0, 0.9)}
PUMP_SECONDS = (5, 60)
WATER_CHANNELS = {"fill": "fill_valve", "drain": "drain_valve"}
ZONE_NOT_FOUND = "Zone not found or has no greenhouse"

_WATER_NODE = """
SELECT n.uid, coalesce(nc.channel, 'default') AS channel
  FROM nodes n LEFT JOIN node_channels nc ON nc.node_id = n.id
 WHERE n.zone_id = $1 AND lower(n.status) = 'online'
   AND (lower(n.type) IN ('irrig', 'pump') OR nc.channel IN ('fill_valve', 'drain_valve', 'water_control'))
 ORDER BY CASE WHEN nc.channel = $2 THEN 0 WHEN nc.channel = 'water_control' THEN 1
               WHEN nc.channel IN ('fill_valve', 'drain_valve') THEN 3 ELSE 2 END, n.id, nc.channel
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
    def __init__(self, db: Database, publisher: Publisher, options: BridgeSettings):
        self.db = db
        self.publisher = publisher
        self.options = options
        self.stopping = asyncio.Event()  # set when the service stops: runs end early and stop their pump

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

    # -- fill / drain -----------------------------------------------------------------------
    async def check_level(self, kind: str, zone_id: int, req: FillRequest) -> str:
        """Refuse a bad request before anything runs (400 / 404); returns the greenhouse uid."""
        lo, hi = LEVEL_LIMITS[kind]
        if not lo <= req.target_level <= hi:
            raise ApiError(400, f"target_level must be between {lo} and {hi}")
        return await self._greenhouse(zone_id)

    async def run_level(self, kind: str, zone_id: int, gh_uid: str, req: FillRequest) -> dict[str, Any]:
        upper, target = kind.upper(), req.target_level
        started_at, started = _utcnow(), time.monotonic()
        base = {"target_level": target, "max_duration_sec": req.max_duration_sec, "start_time": _iso(started_at)}
        await self._event(zone_id, f"{upper}_STARTED", base)
        node = await self.db.fetchrow(_WATER_NODE, zone_id, WATER_CHANNELS[kind])
        if node is None:
            await self._event(zone_id, f"{upper}_FINISHED", {**base, "status": "failed", "error": "no_nodes",
                                                              "end_time": _iso(_utcnow())})
            return {"success": False, "error": "no_nodes"}
        where = dict(gh_uid=gh_uid, zone_id=zone_id, node_uid=node["uid"], channel=node["channel"])
        try:
            start_cmd = await self.publisher.send(cmd=kind, params={"target_level": target}, **where)
        except Exception as exc:
            await self._event(zone_id, f"{upper}_FINISHED", {**base, "status": "failed", "error": str(exc),
                                                              "end_time": _iso(_utcnow())})
            raise
        level, reached, status = None, False, "cancelled"
        try:
            while True:
                if await self._pause(self.options.routine_poll_sec):
                    break
                current = await self.db.fetchval(_LEVEL, zone_id)
                if current is not None:
                    level = current
                    reached = current >= target if kind == "fill" else current <= target
                if reached or time.monotonic() - started >= req.max_duration_sec:
                    status = "completed" if reached else "timeout"
                    break
        finally:  # the pump / valve is always told to stop, also when the run is cancelled or fails
            elapsed = round(time.monotonic() - started, 3)
            stop_cmd_id, stop_error = await self._stop(where)
            await self._event(zone_id, f"{upper}_FINISHED", {
                **base, "status": status, "final_level": level, "elapsed_sec": elapsed, "node_uid": node["uid"],
                "channel": node["channel"], "cmd_id": start_cmd.cmd_id, "stop_cmd_id": stop_cmd_id,
                "stop_error": stop_error, "end_time": _iso(_utcnow())})
        result = {"success": reached, "target_level": target, "final_level": level, "elapsed_sec": elapsed}
        if not reached:
            result["error"] = "timeout" if status == "timeout" else "cancelled"
        if stop_error:
            result["stop_error"] = stop_error
        return result

    async def _stop(self, where: dict[str, Any]) -> tuple[str | None, str | None]:
        valve = "valve" in where["channel"] or "relay" in where["channel"]
        cmd, params = ("set_relay", {"state": False}) if valve else ("stop_pump", {})
        try:
            issued = await self.publisher.send(cmd=cmd, params=params, **where)
            return issued.cmd_id, None
        except Exception as exc:  # noqa: BLE001 - reported in the result and the FINISHED event
            log.error("routine_stop_failed", extra={**where, "error": str(exc)})
            return None, str(exc)

    # -- flow calibration -------------------------------------------------------------------
    async def check_calibration(self, zone_id: int, req: CalibrateFlowRequest) -> tuple[str, int, str]:
        """400 / 404 before anything runs; returns (greenhouse uid, node_channels.id, node uid)."""
        lo, hi = PUMP_SECONDS
        if not lo <= req.pump_duration_sec <= hi:
            raise ApiError(400, f"pump_duration_sec must be between {lo} and {hi}")
        gh_uid = await self._greenhouse(zone_id)
        row = await self.db.fetchrow(
            "SELECT nc.id, n.uid FROM nodes n JOIN node_channels nc ON nc.node_id = n.id"
            " WHERE n.id = $1 AND n.zone_id = $2 AND nc.channel = $3", req.node_id, zone_id, req.channel)
        if row is None:
            raise ApiError(404, f"node {req.node_id} with channel {req.channel!r} not found in zone {zone_id}")
        return gh_uid, row["id"], row["uid"]

    async def run_calibration(self, zone_id: int, gh_uid: str, channel_id: int, node_uid: str,
                              req: CalibrateFlowRequest) -> dict[str, Any]:
        seconds = req.pump_duration_sec
        window_start = await self.db.fetchval("SELECT now()::timestamp")
        base = {"node_id": req.node_id, "node_uid": node_uid, "channel": req.channel, "pump_duration_sec": seconds,
                "start_time": _iso(window_start)}
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
