"""PUMP_STUCK_ON (contract §8.7): water moves while nothing should be moving it.

Evidence: the zone's freshest `PUMP_CURRENT` above STUCK_ON_CURRENT_MA or `FLOW_RATE` above
STUCK_ON_FLOW_L_MIN, measured in the last READING_MAX_AGE. Excuse: a command (any source, from the
cycle's batched read) that runs a water actuator — a pump / valve / irrigation / fill / drain /
recirculation channel, or a zone-level irrigation, fill or drain — and whose run, plus GRACE for the
flow to run down and the sensor to report, reaches the reading's time. `run_pump` and `dose` run
for their duration; `set_relay` / `set_state` on stay on until an off command to the same channel;
an unanswered command counts as running.

Stuck on → alert PUMP_STUCK_ON (code biz_pump_stuck_on, a pump fault: every pump gate of the zone
refuses while it is ACTIVE); a fresh reading back under both thresholds resolves it.
"""
from __future__ import annotations

import datetime as dt

from actions import ZoneContext
from snapshot import AlertRow, CommandRow, Node, ZoneData

STUCK_ON_CURRENT_MA = 50.0
STUCK_ON_FLOW_L_MIN = 0.1
READING_MAX_AGE = dt.timedelta(seconds=60)
GRACE = dt.timedelta(seconds=30)
WATER_WORDS = ("pump", "valve", "irrig", "fill", "drain", "recirc", "solenoid")
WATER_ZONE_COMMANDS = ("FORCE_IRRIGATION", "fill", "drain")
OPEN = ("pending", "sent")


def _moves_water(command: CommandRow) -> bool:
    if command.cmd in WATER_ZONE_COMMANDS:
        return True
    return any(word in (command.channel or "").lower() for word in WATER_WORDS)


def _on(command: CommandRow) -> bool | None:
    """True / False for a switch command, None for anything else."""
    if command.cmd in ("set_relay", "set_state"):
        return bool(command.params.get("state"))
    if command.cmd == "stop_pump":
        return False
    return None


def _runs_until(command: CommandRow, zone: ZoneData, later: list[CommandRow]) -> dt.datetime | None:
    """When the command's run ends (None: it does not run anything)."""
    switch = _on(command)
    if switch is False:
        return None
    if switch is True:
        duration = command.params.get("duration_ms")
        if isinstance(duration, (int, float)) and not isinstance(duration, bool) and duration > 0:
            return command.created_at + dt.timedelta(milliseconds=duration)
        offs = [c.created_at for c in later if c.node_id == command.node_id and c.channel == command.channel
                and _on(c) is False]
        return min(offs) if offs else dt.datetime.max
    if command.cmd == "run_pump":
        return command.created_at + dt.timedelta(milliseconds=float(command.params.get("duration_ms") or 0))
    if command.cmd == "dose":
        node = zone.node(command.node_id)
        ml_per_second = _ml_per_second(node, command.channel) if node else 1.0
        return command.created_at + dt.timedelta(seconds=float(command.params.get("dose_ml") or 0) / ml_per_second)
    if command.cmd == "FORCE_IRRIGATION":
        return command.created_at + dt.timedelta(seconds=float(command.params.get("duration_sec") or 0))
    return command.created_at  # fill / drain and anything else: only while unanswered (below) and GRACE


def _ml_per_second(node: Node, channel: str | None) -> float:
    value = (node.channels.get(channel or "") or {}).get("ml_per_second")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 1.0


def expected_running(zone: ZoneData, at: dt.datetime) -> bool:
    """Does some command account for water moving at `at`?"""
    water = [c for c in zone.commands if _moves_water(c)]
    for index, command in enumerate(water):
        if command.status in OPEN and _on(command) is not False:
            return True
        end = _runs_until(command, zone, water[index + 1:])
        if end is not None and command.created_at <= at and (end == dt.datetime.max or end + GRACE >= at):
            return True
    return False


def evidence(ctx: ZoneContext) -> list[tuple[str, float, dt.datetime, bool]]:
    """(metric, value, measured at, above its threshold) of the fresh current / flow readings."""
    found = []
    for metric, threshold in (("PUMP_CURRENT", STUCK_ON_CURRENT_MA), ("FLOW_RATE", STUCK_ON_FLOW_L_MIN)):
        reading = ctx.zone.telemetry.get(metric)
        if reading is None or reading.updated_at is None or ctx.now - reading.updated_at > READING_MAX_AGE:
            continue
        found.append((metric, reading.value, reading.updated_at, reading.value > threshold))
    return found


async def run(ctx: ZoneContext) -> None:
    seen = evidence(ctx)
    running = [(metric, value, at) for metric, value, at, above in seen if above]
    if running and not any(expected_running(ctx.zone, at) for _, _, at in running):
        metric, value, at = running[0]
        details = {"metric": metric, "value": value, "measured_at": at.isoformat(),
                   "message": f"{metric} {value} while no command runs a pump or valve in this zone"}
        created = await ctx.alert("PUMP_STUCK_ON", details)
        if created:  # the pump gates later in this cycle see it as well
            ctx.zone.alerts.append(AlertRow(-1, "PUMP_STUCK_ON", "biz_pump_stuck_on", details, True, ctx.now))
    elif seen and not running:
        await ctx.resolve("PUMP_STUCK_ON")
