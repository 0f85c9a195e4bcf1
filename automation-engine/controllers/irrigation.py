"""Interval irrigation and recirculation (contract §8.6), behind every pump gate of §4.3.

Irrigation (capability `irrigation_control`, target `irrigation_interval_sec`): when the interval
has passed since the last IRRIGATION_STARTED — or there was none: the first run fires at once —
`run_pump {duration_ms}` on the irrigation pump of an `irrig`/`pump` node (`pump_in`, else
`pump_irrigation`), or `set_relay {state:true, duration_ms}` on its `valve_irrigation` (common.channels).
Recirculation (capability `recirculation`, `recirculation_enabled`): every
`recirculation_interval_min`, `run_pump` on `recirculation_pump` (or a pump of a `recirculation`
node), or `set_relay` on `valve_recirculation`, for `recirculation_duration_sec` (default 300),
RECIRCULATION_CYCLE event.
Durations are capped by the channel's `safe_limits.max_duration_ms` and the 60 s run_pump limit
(valves: 3600 s); the event records both the wanted and the commanded time.
The firmware ignores `duration_ms` on set_relay, so a valve's close is written to
`actuator_closes` before it is opened and sent when due (`close_due_valves`, every cycle, also
after a restart).
"""
from __future__ import annotations

import datetime as dt
from typing import Any

import metrics as m
import gates
from actions import ZoneContext
from actuators import send
from common.actuator_closes import run_due, schedule_close
from common.channels import IRRIGATION_CHANNELS, irrigation_channel, is_valve
from common.command_catalogue import RUN_PUMP_MAX_MS
from snapshot import Node
from common.schemas import as_number

RECIRCULATION_CHANNELS = ("recirculation_pump", "valve_recirculation")
VALVE_MAX_MS = 3_600_000
OWNER = "automation"


def _duration_ms(node: Node, channel: str, seconds: float) -> int:
    ceiling = VALVE_MAX_MS if is_valve(channel) else RUN_PUMP_MAX_MS
    return int(max(1, min(seconds * 1000, gates.max_duration_ms(node, channel, ceiling), ceiling)))


async def close_due_valves(ctx: ZoneContext) -> None:
    """Send every due valve close of the engine, once per cycle (the first zone to get here does it:
    one query per cycle whatever the number of zones; a close is taken by exactly one engine)."""
    services = ctx.services
    if getattr(services, "valve_closes_at", None) == ctx.now or not services.mqtt.connected:
        return  # done this cycle, or no broker: still due on the next cycle
    services.valve_closes_at = ctx.now
    for closed in await run_due(ctx.db, services.mqtt, services.topics, owner=OWNER, now=ctx.now):
        m.ACTUATIONS.labels("valve_close", "refused" if closed["error"] else "set_relay").inc()
        ctx.log.append(f"close:{closed['zone_id']}:{closed['channel']}")


async def _pump_cycle(ctx: ZoneContext, controller: str, actuator: tuple[Node, str], seconds: float,
                      event: str, details: dict[str, Any]) -> bool:
    zone, now = ctx.zone, ctx.now
    level = ctx.fresh("WATER_LEVEL")
    if level is not None and level < gates.WATER_LEVEL_OK:
        m.ACTUATIONS.labels(controller, "water_level_low").inc()
        await ctx.water_low(level)
        await ctx.transition(f"{controller}_water_low", True, "WATER_LEVEL_LOW", {"water_level": level})
        return False
    ctx.services.conditions.pop((zone.id, f"{controller}_water_low"), None)
    node, channel = actuator
    refusal = gates.can_run_pump(zone, node, channel, now,
                                 telemetry_max_age=dt.timedelta(seconds=ctx.options.pump_telemetry_max_age_sec),
                                 water_max_age=dt.timedelta(minutes=ctx.services.settings.telemetry_max_age_min),
                                 fault_window=dt.timedelta(minutes=30))
    if refusal:
        m.ACTUATIONS.labels(controller, refusal).inc()
        ctx.log.append(f"refused:{controller}:{refusal}")
        return False
    duration = _duration_ms(node, channel, seconds)
    if is_valve(channel):
        cmd, params = "set_relay", {"state": True, "duration_ms": duration}
        # The close is on record before the valve can open.
        await schedule_close(ctx.db, owner=OWNER, zone_id=zone.id, node_uid=node.uid, channel=channel,
                             close_at=now + dt.timedelta(milliseconds=duration), reason=controller)
    else:
        cmd, params = "run_pump", {"duration_ms": duration}
    cmd_id = await send(ctx, controller, node, channel, cmd, params)
    if cmd_id is None:
        return False
    await ctx.event(event, {**details, "duration_sec": seconds, "commanded_duration_ms": duration,
                            "node_uid": node.uid, "channel": channel, "cmd": cmd, "cmd_id": cmd_id})
    return True


def _due(ctx: ZoneContext, event: str, interval: dt.timedelta) -> tuple[bool, dict[str, Any]]:
    last = ctx.zone.events.get(event)
    if last is None:
        return True, {"last_time": None, "elapsed_sec": None}
    elapsed = ctx.now - last[0]
    return elapsed >= interval, {"last_time": last[0].isoformat(), "elapsed_sec": int(elapsed.total_seconds())}


async def run_irrigation(ctx: ZoneContext) -> None:
    await close_due_valves(ctx)
    if not ctx.zone.capability("irrigation_control"):
        return
    interval = as_number(ctx.targets.get("irrigation_interval_sec"))
    if interval is None or interval < 1:
        return
    due, since = _due(ctx, "IRRIGATION_STARTED", dt.timedelta(seconds=interval))
    if not due:
        return
    found = [(node, name) for node in ctx.zone.nodes if (name := irrigation_channel(node.type, node.channels))]
    actuator = min(found, key=lambda a: (not a[0].online, IRRIGATION_CHANNELS.index(a[1])), default=None)
    if actuator is None:
        m.ACTUATIONS.labels("irrigation", "no_actuator").inc()
        return
    seconds = as_number(ctx.targets.get("irrigation_duration_sec")) or 60.0
    await _pump_cycle(ctx, "irrigation", actuator, seconds, "IRRIGATION_STARTED",
                      {"interval_sec": interval, "last_irrigation_time": since["last_time"],
                       "elapsed_sec": since["elapsed_sec"]})


async def run_recirculation(ctx: ZoneContext) -> None:
    if not ctx.zone.capability("recirculation") or ctx.targets.get("recirculation_enabled") is not True:
        return
    interval_min = as_number(ctx.targets.get("recirculation_interval_min"))
    if interval_min is None or interval_min <= 0:
        return
    due, since = _due(ctx, "RECIRCULATION_CYCLE", dt.timedelta(minutes=interval_min))
    if not due:
        return
    actuator = gates.find_actuator(ctx.zone, RECIRCULATION_CHANNELS, ("recirculation",), ("pump",))
    if actuator is None:
        m.ACTUATIONS.labels("recirculation", "no_actuator").inc()
        return
    seconds = as_number(ctx.targets.get("recirculation_duration_sec")) or 300.0
    await _pump_cycle(ctx, "recirculation", actuator, seconds, "RECIRCULATION_CYCLE",
                      {"interval_min": interval_min, "last_cycle_time": since["last_time"],
                       "elapsed_sec": since["elapsed_sec"]})
