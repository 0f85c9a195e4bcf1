"""Lighting (contract §8.5, capability `light_control`): photoperiod from `light_hours`
(alias `photoperiod`: N hours from 06:00, "HH:MM-HH:MM" or {start,end}) on the greenhouse's wall
clock; windows across midnight allowed, bounds inclusive. On: `set_pwm {value: light_intensity}`
when an intensity is given, else `set_relay {state:true}` (LIGHT_ON); off: `set_relay {state:false}`
(LIGHT_OFF); only on a change of state. LIGHT_FAILURE alert and event when the light has been on
for a minute and LUX stays under 20. Zones whose phase has `lighting_schedule` belong to the scheduler.
"""
from __future__ import annotations

import datetime as dt

from actions import ZoneContext
from actuators import ensure, last_command
from gates import find_actuator
from common.schemas import as_number
from targets import in_window, light_window

KINDS = ("set_relay", "set_pwm")
LUX_MIN = 20.0
FAILURE_GRACE = dt.timedelta(minutes=1)


async def run(ctx: ZoneContext) -> None:
    if not ctx.zone.capability("light_control") or ctx.targets.get("lighting_schedule"):
        return
    window = light_window(ctx.targets)
    if window is None:
        return
    light = find_actuator(ctx.zone, ("white_light", "uv_light", "light"), ("light",), ("light",))
    if light is None:
        return
    node, channel = light
    local = ctx.local_now()
    on = in_window(window, local.time().replace(second=0, microsecond=0))
    details = {"local_time": local.strftime("%H:%M"), "window": [w.strftime("%H:%M") if w else None for w in window]}
    if on:
        intensity = as_number(ctx.targets.get("light_intensity", ctx.targets.get("ppfd")))
        if intensity is not None and 0 <= intensity <= 100:
            cmd, params = "set_pwm", {"value": intensity}
        else:
            cmd, params = "set_relay", {"state": True}
        await ensure(ctx, "lighting", node, channel, cmd, params, kinds=KINDS, event="LIGHT_ON", details=details)
    else:
        await ensure(ctx, "lighting", node, channel, "set_relay", {"state": False}, kinds=KINDS, event="LIGHT_OFF",
                     details=details)

    lux = ctx.fresh("LUX")
    last = last_command(ctx, node, channel, KINDS)
    lit_for_a_while = on and last is not None and last.status not in ("failed", "timeout") and \
        ctx.now - last.created_at >= FAILURE_GRACE
    failing = lit_for_a_while and lux is not None and lux < LUX_MIN
    if failing:
        if await ctx.alert("LIGHT_FAILURE", {"lux": lux, "node_uid": node.uid, "channel": channel,
                                             "message": f"light on but only {lux} lux"}):
            await ctx.event("LIGHT_FAILURE", {"lux": lux, "node_uid": node.uid, "channel": channel})
    elif lux is not None or not on:
        await ctx.resolve("LIGHT_FAILURE")
