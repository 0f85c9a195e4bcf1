"""Climate (contract §8.4, capability `climate_control`).

Temperature with hysteresis: below target−0.5 the heater goes on until the air is back at the
target; above target+0.5 the fan relay goes on until it is back at the target (in between the
commanded state is kept). Humidity: above target+3 % the fans run at PWM 100
(increase_ventilation), at or below the target back to 50 (normal). Alerts TEMP_HIGH / TEMP_LOW
at ±2 °C (with a CLIMATE_OVERHEAT event when it opens), HUMIDITY_HIGH / LOW at ±15 %; CO2_LOW
event when CO2 falls under 400 ppm. Commands and events only on a change of commanded state.
"""
from __future__ import annotations

from actions import ZoneContext
from actuators import commanded, ensure
from gates import find_actuators
from targets import target

HYSTERESIS = 0.5
TEMP_ALERT = 2.0
HUMIDITY_VENT = 3.0
HUMIDITY_ALERT = 15.0
CO2_LOW_PPM = 400.0
RELAY = ("set_relay",)
PWM = ("set_pwm",)


def _relay_on(ctx: ZoneContext, actuator) -> bool:
    state = commanded(ctx, actuator[0], actuator[1], RELAY)
    return bool(state and state[1].get("state") is True)


async def run(ctx: ZoneContext) -> None:
    if not ctx.zone.capability("climate_control"):
        return
    zone = ctx.zone
    heaters = find_actuators(zone, ("heater_1",), ("climate",), ("heater",))
    fans = find_actuators(zone, ("fan_A", "fan_B"), ("climate",), ("fan",))

    temp, temp_target = ctx.fresh("TEMP_AIR"), target(ctx.targets, "temp_air")
    if temp is not None and temp_target is not None:
        goal = temp_target.value
        details = {"temp_air": temp, "target_temp_air": goal}
        heat = temp < goal - HYSTERESIS or (any(_relay_on(ctx, h) for h in heaters) and temp < goal)
        cool = temp > goal + HYSTERESIS or (any(_relay_on(ctx, f) for f in fans) and temp > goal)
        for heater in heaters:
            await ensure(ctx, "climate", *heater, "set_relay", {"state": heat}, kinds=RELAY,
                         event="CLIMATE_HEATING_ON" if heat else None, details=details)
        for fan in fans:
            await ensure(ctx, "climate", *fan, "set_relay", {"state": cool}, kinds=RELAY,
                         event="CLIMATE_COOLING_ON" if cool else "FAN_OFF", details=details)
        high, low = temp > goal + TEMP_ALERT, temp < goal - TEMP_ALERT
        message = {"message": f"air temperature {temp} °C against target {goal} °C"}
        if high:
            if await ctx.alert("TEMP_HIGH", {**details, **message}):
                await ctx.event("CLIMATE_OVERHEAT", details)
        else:
            await ctx.resolve("TEMP_HIGH")
        await ctx.set_alert("TEMP_LOW", low, {**details, **message})

    humidity, humidity_target = ctx.fresh("HUMIDITY"), target(ctx.targets, "humidity_air")
    if humidity is not None and humidity_target is not None:
        goal = humidity_target.value
        details = {"humidity": humidity, "target_humidity": goal}
        for fan in fans:
            if humidity > goal + HUMIDITY_VENT:
                await ensure(ctx, "climate", *fan, "set_pwm", {"value": 100}, kinds=PWM, event="FAN_ON",
                             details={**details, "mode": "increase_ventilation"})
            elif humidity <= goal:
                await ensure(ctx, "climate", *fan, "set_pwm", {"value": 50}, kinds=PWM, event="FAN_ON",
                             details={**details, "mode": "normal"})
        message = {"message": f"humidity {humidity} % against target {goal} %"}
        await ctx.set_alert("HUMIDITY_HIGH", humidity > goal + HUMIDITY_ALERT, {**details, **message})
        await ctx.set_alert("HUMIDITY_LOW", humidity < goal - HUMIDITY_ALERT, {**details, **message})

    co2 = ctx.fresh("CO2")
    if co2 is not None:
        await ctx.transition("co2_low", co2 < CO2_LOW_PPM, "CO2_LOW", {"co2": co2, "threshold": CO2_LOW_PPM})
