"""Scheduled lighting (contract §8.5): `lighting_schedule` "HH:MM-HH:MM" in the greenhouse timezone.

The scheduler is the one owner of a zone's lights when that key is present. Each tick works out
the state the window asks for and the edge (start or end occurrence) that made it so; an edge is
claimed once like any firing, so commands and LIGHT_ON / LIGHT_OFF go out only on transitions —
and after a start-up the current state is asserted once, never again by a restart or a replica.
On: `set_pwm {value: light_intensity}` when the phase gives an intensity, else
`set_relay {state: true}`; off: `set_relay {state: false}`. An edge that finds no light online (or
whose commands fail) stays `running` and is retried every interval until it is applied or a newer
edge supersedes it.
"""
from __future__ import annotations

import datetime as dt
import logging

import execution
from actuators import Sent, light_targets, new_order, zone_channels
from context import JobContext
from execution import Facts, Plan
from runs import Firing, Writes, finish
from schedules import ZoneSchedule
from common.timespec import light_edge

log = logging.getLogger("scheduler.lighting")

TASK = "lighting"


def edge_firing(zone: ZoneSchedule, now: dt.datetime) -> Firing:
    on, edge = light_edge(zone.lighting, zone.tz, now)
    return Firing(zone, "lighting", "lighting:on" if on else "lighting:off", edge,
                  details={"window": str(zone.lighting), "state": "on" if on else "off",
                           "intensity": zone.light_intensity if on else None})


def plan(ctx: JobContext, firing: Firing, facts: Facts, now: dt.datetime) -> Plan:
    zone = firing.zone
    return _plan(ctx, zone.zone_id, zone.gh_uid, firing.run_id, firing.item == "lighting:on", firing.details,
                 firing.occurrence.local, facts.channels.get(zone.zone_id, []), now, first=True)


async def retry(ctx: JobContext, run, now: dt.datetime) -> str:
    """Follow-up of an edge that found no light online (or whose commands failed): try again
    every interval until it succeeds or a newer edge of the zone supersedes it."""
    newer = await ctx.db.fetchval(
        "SELECT 1 FROM scheduler_runs WHERE zone_id = $1 AND kind = 'lighting' AND scheduled_at > $2 LIMIT 1",
        run["zone_id"], await ctx.db.fetchval("SELECT scheduled_at FROM scheduler_runs WHERE id = $1", run["id"]))
    if newer:
        await finish(ctx.db, run["id"], "failed", {"superseded": True}, now)
        return "superseded"
    gh_uid = await ctx.db.fetchval(
        "SELECT g.uid FROM zones z JOIN greenhouses g ON g.id = z.greenhouse_id WHERE z.id = $1", run["zone_id"])
    if gh_uid is None:
        await finish(ctx.db, run["id"], "failed", {"error": "zone_gone"}, now)
        return "failed"
    step = _plan(ctx, run["zone_id"], gh_uid, run["id"], run["item"] == "lighting:on", run["details"] or {},
                 run["scheduled_local"], await zone_channels(ctx.db, run["zone_id"]), now, first=False)
    return await execution.run_one(ctx, step, now)


def _plan(ctx: JobContext, zone_id: int, gh_uid: str, run_id: int, on: bool, spec: dict,
          scheduled_local: dt.datetime, rows: list, now: dt.datetime, first: bool) -> Plan:
    intensity = spec.get("intensity") if on else None
    base = {"zone_id": zone_id, "run_id": run_id, "state": "on" if on else "off", "window": spec.get("window"),
            "scheduled_local": scheduled_local.isoformat()}
    step = Plan(zone_id, gh_uid, run_id, Writes(now))
    targets = light_targets(rows)
    if not targets:
        step.outcome = _retrying(ctx, step.before, base, run_id, "no_nodes", [], now, first)
        return step
    if intensity is not None:
        step.orders = [new_order(t, "set_pwm", {"value": intensity}) for t in targets]
    else:
        step.orders = [new_order(t, "set_relay", {"state": on}) for t in targets]
    for target, cmd, _, cmd_id in step.orders:
        step.before.link(run_id, cmd_id, target.node_uid, target.channel, cmd)

    def applied(sent: list[Sent], writes: Writes) -> str:
        ok = [s for s in sent if s.ok]
        if not ok:
            return _retrying(ctx, writes, base, run_id, "commands_failed", sent, now, first)
        writes.event(zone_id, "LIGHT_ON" if on else "LIGHT_OFF", dict(
            base, nodes=[{"node_uid": s.target.node_uid, "channel": s.target.channel} for s in ok],
            cmd_ids=[s.cmd_id for s in ok], intensity=intensity))
        writes.finish(run_id, "completed", {"commands": [s.summary() for s in sent], "error": None})
        writes.log(TASK, "completed", dict(base, commands=len(ok)))
        return "completed"
    step.after = applied
    return step


def _retrying(ctx: JobContext, writes: Writes, base: dict, run_id: int, error: str, sent: list[Sent],
              now: dt.datetime, first: bool) -> str:
    writes.details(run_id, {"error": error, "commands": [s.summary() for s in sent]})
    writes.followup(run_id, "lighting_retry", now + dt.timedelta(seconds=ctx.options.interval_sec))
    if first:
        writes.log(TASK, "failed", dict(base, error=error, retrying=True))
        log.info("lighting_not_applied_retrying", extra=dict(base, error=error))
    return "retrying"
