"""Scheduled lighting (contract §8.5): `lighting_schedule` "HH:MM-HH:MM" in the greenhouse timezone.

The scheduler is the one owner of a zone's lights when that key is present. Each tick works out
the state the window asks for and the edge (start or end occurrence) that made it so; an edge is
claimed once like any firing, so commands and LIGHT_ON / LIGHT_OFF go out only on transitions —
and after a start-up the current state is asserted once, never again by a restart or a replica.
On: `set_pwm {value: light_intensity}` when the phase gives an intensity, else
`set_relay {state: true}`; off: `set_relay {state: false}`.
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING

from common.alerts import add_zone_event
from actuators import light_targets, zone_channels
from runs import Firing, finish, scheduler_log
from schedules import ZoneSchedule
from timespec import light_edge

if TYPE_CHECKING:
    from engine import Scheduler

log = logging.getLogger("scheduler.lighting")

TASK = "lighting"


def edge_firing(zone: ZoneSchedule, now: dt.datetime) -> Firing:
    on, edge = light_edge(zone.lighting, zone.tz, now)
    return Firing(zone, "lighting", "lighting:on" if on else "lighting:off", edge,
                  details={"window": str(zone.lighting), "state": "on" if on else "off"})


async def fire(sched: "Scheduler", firing: Firing, now: dt.datetime) -> str:
    zone = firing.zone
    on = firing.item == "lighting:on"
    targets = light_targets(await zone_channels(sched.db, zone.zone_id))
    base = {"zone_id": zone.zone_id, "run_id": firing.run_id, "state": "on" if on else "off",
            "window": str(zone.lighting), "scheduled_local": firing.occurrence.local.isoformat()}
    if not targets:
        await finish(sched.db, firing.run_id, "failed", {"error": "no_nodes"}, now)
        await scheduler_log(sched.db, TASK, "failed", dict(base, error="no_nodes"))
        log.info("lighting_no_nodes", extra=base)
        return "failed"
    if on and zone.light_intensity is not None:
        orders = [(t, "set_pwm", {"value": zone.light_intensity}) for t in targets]
    else:
        orders = [(t, "set_relay", {"state": on}) for t in targets]
    sent = await sched.sender.send_all(firing.run_id, zone.gh_uid, zone.zone_id, orders)
    ok = [s for s in sent if s.ok]
    status = "completed" if ok else "failed"
    async with sched.db.transaction() as conn:
        if ok:
            await add_zone_event(conn, zone.zone_id, "LIGHT_ON" if on else "LIGHT_OFF", dict(
                base, nodes=[{"node_uid": s.target.node_uid, "channel": s.target.channel} for s in ok],
                cmd_ids=[s.cmd_id for s in ok], intensity=zone.light_intensity if on else None))
        await finish(conn, firing.run_id, status, {"commands": [s.summary() for s in sent]}, now)
        await scheduler_log(conn, TASK, status, dict(base, commands=len(ok))
                            if ok else dict(base, error="commands_failed"))
    return status
