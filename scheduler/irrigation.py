"""Scheduled irrigation (contract §8.6).

Firing: scheduler_log `running`; water-level check (`WATER_LEVEL` < 0.2 → alert WATER_LEVEL_LOW,
failed); every online irrigation node gets its command; IRRIGATION_STARTED. What comes after is a
durable follow-up on the run row, never a wait inside the tick: a dry-run check
`dry_run_check_sec` after the start where the zone has `capabilities.flow_sensor` (no
`FLOW_RATE` ≥ 0.1 → stop, PUMP_STOPPED + NO_FLOW, failed), then, once the duration has passed,
IRRIGATION_FINISHED and scheduler_log `completed` — only when a node acknowledged its start
command; when every start command failed or timed out the run is `failed` (no
IRRIGATION_FINISHED). A valve's close is written to `actuator_closes` before the valve is opened
and sent by the follow-up loop when the duration ends (the firmware ignores duration_ms).
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from common.actuator_closes import schedule_close
from common.alerts import add_zone_event, ensure_alert
import execution
from actuators import Order, Sent, Target, freshest_metric, irrigation_targets, new_order
from context import JobContext
from execution import Facts, Plan
from runs import Firing, Writes, command_statuses, finish, iso, naive_utc, scheduler_log, set_followup, update_details

log = logging.getLogger("scheduler.irrigation")

TASK = "irrigation"
WATER_LEVEL_MIN = 0.2
FLOW_MIN_L_PER_MIN = 0.1
ANSWER_POLL = dt.timedelta(seconds=5)   # a finish that finds start commands unanswered looks again after this
OPEN, ACKED = ("pending", "sent"), ("ack",)


def _orders(targets: list[Target], duration_ms: int) -> list[Order]:
    orders = []
    for target in targets:
        ms = target.max_duration_ms(duration_ms)
        if target.is_valve:
            orders.append(new_order(target, "set_relay", {"state": True, "duration_ms": ms}))
        else:
            orders.append(new_order(target, "run_pump", {"duration_ms": ms}))
    return orders


def _fail(firing: Firing, writes: Writes, error: str, **extra: Any) -> str:
    details = {"zone_id": firing.zone.zone_id, "run_id": firing.run_id, "error": error, **extra}
    writes.finish(firing.run_id, "failed", {"error": error, **extra})
    writes.log(TASK, "failed", details)
    log.info("irrigation_not_started", extra=details)
    return "failed"


def plan(ctx: JobContext, firing: Firing, facts: Facts, now: dt.datetime) -> Plan:
    zone = firing.zone
    base = {"zone_id": zone.zone_id, "run_id": firing.run_id, "scheduled_local": firing.occurrence.local.isoformat()}
    step = Plan(zone.zone_id, zone.gh_uid, firing.run_id, Writes(now).log(TASK, "running", base))
    before = step.before
    level = facts.water_levels.get(zone.zone_id)
    if level is not None and level < WATER_LEVEL_MIN:
        before.call(lambda conn: ensure_alert(
            conn, zone_id=zone.zone_id, alert_type="WATER_LEVEL_LOW",
            details={"level": level, "threshold": WATER_LEVEL_MIN, "source": "scheduler",
                     "message": "Water level too low for irrigation"}))
        before.event(zone.zone_id, "WATER_LEVEL_LOW",
                     {"level": level, "threshold": WATER_LEVEL_MIN, "run_id": firing.run_id})
        step.outcome = _fail(firing, before, "water_level_low", level=level)
        return step

    targets = irrigation_targets(facts.channels.get(zone.zone_id, []))
    if not targets:
        step.outcome = _fail(firing, before, "no_nodes")
        return step
    duration_sec = zone.irrigation_duration_sec
    step.orders = _orders(targets, duration_sec * 1000)
    for target, cmd, params, _ in step.orders:
        if cmd == "set_relay":  # on record before the valve can open
            close_at = now + dt.timedelta(milliseconds=params["duration_ms"])
            before.call(lambda conn, target=target, close_at=close_at: schedule_close(
                conn, owner="scheduler", zone_id=zone.zone_id, node_uid=target.node_uid, channel=target.channel,
                reason=TASK, close_at=close_at))
    # Should this scheduler die while sending, the run is still judged (from its linked commands)
    # when the duration is over; the normal path below replaces this follow-up.
    before.details(firing.run_id, {"duration_sec": duration_sec})
    before.followup(firing.run_id, "finish", now + dt.timedelta(seconds=duration_sec))
    for target, cmd, _, cmd_id in step.orders:
        before.link(firing.run_id, cmd_id, target.node_uid, target.channel, cmd)
    step.after = lambda sent, writes: _record_start(ctx, firing, now, sent, writes)
    return step


def _record_start(ctx: JobContext, firing: Firing, now: dt.datetime, sent: list[Sent], writes: Writes) -> str:
    zone, duration_sec = firing.zone, firing.zone.irrigation_duration_sec
    ok = [s for s in sent if s.ok]
    if not ok:
        return _fail(firing, writes, "commands_failed", commands=[s.summary() for s in sent])
    flow_sensor = zone.capabilities.get("flow_sensor") is True
    writes.details(firing.run_id, {
        "duration_sec": duration_sec, "started_at": iso(now), "flow_sensor": flow_sensor,
        "targets": [s.summary() for s in ok], "failed_commands": [s.summary() for s in sent if not s.ok]})
    writes.event(zone.zone_id, "IRRIGATION_STARTED", {
        "nodes_count": len(ok), "duration_sec": duration_sec, "start_time": iso(now), "run_id": firing.run_id,
        "scheduled_local": firing.occurrence.local.isoformat(), "cmd_ids": [s.cmd_id for s in ok]})
    if flow_sensor:
        writes.followup(firing.run_id, "dry_run_check",
                        now + dt.timedelta(seconds=ctx.options.dry_run_check_sec))
    else:
        writes.followup(firing.run_id, "finish", now + dt.timedelta(seconds=duration_sec))
    return "started"


async def fire(ctx: JobContext, firing: Firing, now: dt.datetime) -> str:
    """One firing executed on its own (the tick executes all of its firings together)."""
    return await execution.fire_one(ctx, plan, firing, now)


def _started(run) -> dt.datetime:
    return run["started_at"] or dt.datetime.min


async def dry_run_check(ctx: JobContext, run, now: dt.datetime) -> str:
    """Follow-up: flow seen since the start → carry on to `finish`; none → stop and fail."""
    details = run["details"] or {}
    zone_id, started = run["zone_id"], _started(run)
    flow = await freshest_metric(ctx.db, zone_id, "FLOW_RATE", started)
    if flow is not None and flow >= FLOW_MIN_L_PER_MIN:
        await update_details(ctx.db, run["id"], {"flow_value": flow})
        end = started.replace(tzinfo=dt.timezone.utc) + dt.timedelta(seconds=details.get("duration_sec", 0))
        await set_followup(ctx.db, run["id"], "finish", max(end, now))
        return "flow_ok"
    answers = [r["status"] for r in await command_statuses(ctx.db, run["id"])]
    if answers and all(a in ("failed", "timeout") for a in answers):
        # Nothing ran: no flow is expected, so no NO_FLOW alarm; the finish judges the run failed.
        await set_followup(ctx.db, run["id"], "finish", now)
        return "commands_failed"

    gh_uid = await ctx.db.fetchval(
        "SELECT g.uid FROM zones z JOIN greenhouses g ON g.id = z.greenhouse_id WHERE z.id = $1", zone_id)
    orders = []
    for t in details.get("targets", []):
        target = Target(t["node_uid"], t["channel"], {})
        orders.append((target, "set_relay", {"state": False}) if target.is_valve else (target, "stop_pump", {}))
    stopped = await ctx.sender.send_all(run["id"], gh_uid, zone_id, orders) if gh_uid else []
    elapsed = round((naive_utc(now) - started).total_seconds(), 1) if run["started_at"] else None
    info = {"reason": "dry_run_detected", "flow_value": flow, "run_id": run["id"],
            "nodes": [{"node_uid": s.target.node_uid, "channel": s.target.channel} for s in stopped]}
    async with ctx.db.transaction() as conn:
        await add_zone_event(conn, zone_id, "PUMP_STOPPED", info)
        await add_zone_event(conn, zone_id, "NO_FLOW", {"flow_value": flow, "threshold": FLOW_MIN_L_PER_MIN,
                                                          "run_id": run["id"]})
        pump_channel = details["targets"][0]["channel"] if details.get("targets") else None
        await ensure_alert(conn, zone_id=zone_id, alert_type="NO_FLOW",
                           details={"flow_value": flow, "pump_channel": pump_channel, "source": "scheduler",
                                    "message": "No water flow detected after pump start"})
        await add_zone_event(conn, zone_id, "IRRIGATION_FINISHED", {
            "actual_duration_sec": elapsed, "volume_l": 0.0, "flow_value": flow, "run_id": run["id"],
            "reason": "dry_run_detected"})
    await finish(ctx.db, run["id"], "failed", {"error": "dry_run_detected", "flow_value": flow,
                                                 "stop_commands": [s.summary() for s in stopped]}, now)
    await scheduler_log(ctx.db, TASK, "failed", {"zone_id": zone_id, "run_id": run["id"],
                                                   "error": "dry_run_detected", "flow_value": flow})
    log.warning("irrigation_dry_run_detected", extra={"zone_id": zone_id, "run_id": run["id"], "flow_value": flow})
    return "dry_run_detected"


async def finish_run(ctx: JobContext, run, now: dt.datetime) -> str:
    """Follow-up once the duration has passed: IRRIGATION_FINISHED, run and log completed — or,
    when no node acknowledged its start command, run and log failed."""
    details = run["details"] or {}
    duration = details.get("duration_sec")
    # The start commands as linked to the run before they were sent (also when details were never written).
    rows = await command_statuses(ctx.db, run["id"])
    targets = [{"node_uid": r["node_uid"], "channel": r["channel"], "cmd": r["cmd"], "cmd_id": r["cmd_id"]}
               for r in rows]
    answers = [r["status"] for r in rows]  # pending / sent / ack / failed / timeout, or unsent
    started = _started(run).replace(tzinfo=dt.timezone.utc)
    answer_deadline = started + dt.timedelta(seconds=(duration or 0) + ctx.settings.command_timeout_sec + 10)
    if any(a in OPEN for a in answers) and not any(a in ACKED for a in answers) and now < answer_deadline:
        # No answer yet (the timeout sweep has not judged them either): look again shortly.
        await set_followup(ctx.db, run["id"], "finish", now + ANSWER_POLL)
        return "waiting_for_answers"
    commands = [dict(t, status=a) for t, a in zip(targets, answers)]
    if not any(a in ACKED for a in answers):
        error = "commands_failed" if targets else "not_started"  # none: the scheduler died before sending
        failed = {"zone_id": run["zone_id"], "run_id": run["id"], "error": error, "commands": commands}
        async with ctx.db.transaction() as conn:
            await finish(conn, run["id"], "failed", {"error": error, "commands": commands}, now)
            await scheduler_log(conn, TASK, "failed", failed)
        log.warning("irrigation_commands_failed", extra={"zone_id": run["zone_id"], "run_id": run["id"],
                                                         "answers": answers})
        return "failed"
    flow = details.get("flow_value")
    volume = round(flow * duration / 60.0, 3) if isinstance(flow, (int, float)) and duration else None
    finished = {"actual_duration_sec": duration, "volume_l": volume, "flow_value": flow, "run_id": run["id"],
                "nodes_count": sum(a in ACKED for a in answers)}
    async with ctx.db.transaction() as conn:
        if "started_at" not in details:  # its scheduler died before it recorded the start
            await add_zone_event(conn, run["zone_id"], "IRRIGATION_STARTED", {
                "nodes_count": finished["nodes_count"], "duration_sec": duration, "run_id": run["id"],
                "start_time": iso(run["started_at"]), "cmd_ids": [t["cmd_id"] for t in targets], "recovered": True})
        await add_zone_event(conn, run["zone_id"], "IRRIGATION_FINISHED", finished)
        await finish(conn, run["id"], "completed", {"volume_l": volume, "commands": commands}, now)
        await scheduler_log(conn, TASK, "completed", dict(finished, zone_id=run["zone_id"]))
    return "completed"
