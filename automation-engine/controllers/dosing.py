"""pH and EC correction (contract §8.3 `[DECISION]` table).

pH: too high → `dose` on pump_acid, too low → `dose` on pump_base, dose_ml = clamp(|Δ|·10, 0.1, 5.0)
and within the channel's safe limits. EC: too low → `run_pump` on pump_nutrient for
clamp(|Δ|·100 / ml_per_second · 1000, 100, max_duration_ms); too high has no actuator (alert).
EC runs before pH, and pH waits for the settling time after a nutrient dose.

Every refusal names its reason (counted; `*_CORRECTION_SKIPPED` event when the reason changes;
DOSING_BLOCKED alert when a persistent one lasts REFUSAL_ALERT_CYCLES cycles).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import metrics as m
import gates
from actions import ZoneContext
from common.command_catalogue import CommandError
from common.commands import CommandPublishError
from common.schemas import as_number
from targets import target


@dataclass(frozen=True)
class Spec:
    key: str                 # targets key
    metric: str              # telemetry metric
    capability: str
    pumps: dict[str, str]    # direction → pump channel
    dose_events: tuple[str, ...]
    high_alert_at: float
    low_alert_at: float
    skipped_event: str


PH = Spec("ph", "PH", "ph_control", {"high": "pump_acid", "low": "pump_base"}, ("PH_CORRECTED",),
          0.3, 0.3, "PH_CORRECTION_SKIPPED")
EC = Spec("ec", "EC", "ec_control", {"low": "pump_nutrient"}, ("EC_DOSING",), 0.3, 0.15, "EC_CORRECTION_SKIPPED")


async def run_ec(ctx: ZoneContext) -> None:
    await correct(ctx, EC)


async def run_ph(ctx: ZoneContext) -> None:
    await correct(ctx, PH)


async def _refuse(ctx: ZoneContext, spec: Spec, reason: str, details: dict[str, Any]) -> None:
    await ctx.refuse(spec.metric, reason, details)
    key = (ctx.zone.id, spec.metric)
    if ctx.services.skip_reasons.get(key) != reason:
        ctx.services.skip_reasons[key] = reason
        await ctx.event(spec.skipped_event, {**details, "reason": reason})


async def _clear(ctx: ZoneContext, spec: Spec) -> None:
    ctx.services.skip_reasons.pop((ctx.zone.id, spec.metric), None)
    await ctx.unblocked(spec.metric)


def _size(spec: Spec, node, channel: str, diff: float) -> tuple[str, dict[str, Any], float] | None:
    """(cmd, params, ml) for the correction, or None when the channel's safe limits allow no dose."""
    max_ms = min(gates.max_duration_ms(node, channel), 60_000)
    ml_per_second = gates.ml_per_second(node, channel)
    if spec is PH:
        dose = min(max(abs(diff) * 10, 0.1), 5.0)
        if "ml_per_second" in (node.channels.get(channel) or {}):
            dose = min(dose, max_ms / 1000.0 * ml_per_second)
        dose = round(dose, 2)
        if dose < 0.1:
            return None
        return "dose", {"dose_ml": dose}, dose
    duration = int(min(max(abs(diff) * 100 / ml_per_second * 1000, 100), max_ms))
    return "run_pump", {"duration_ms": duration}, duration / 1000.0 * ml_per_second


async def correct(ctx: ZoneContext, spec: Spec) -> None:
    zone, now, auto = ctx.zone, ctx.now, ctx.options
    if not zone.capability(spec.capability):
        return
    tgt = target(ctx.targets, spec.key)
    if tgt is None:
        return
    reading = zone.telemetry.get(spec.metric)
    base = {f"target_{spec.key}": tgt.value, "band": tgt.band}
    if reading is None:
        await _refuse(ctx, spec, "stale_reading", {**base, f"current_{spec.key}": None})
        return
    current = reading.value
    diff = round(current - tgt.value, 4)
    details = {**base, f"current_{spec.key}": current, "diff": diff}
    problem = gates.reading_problem(
        zone, spec.metric, reading, now, max_age=dt.timedelta(minutes=ctx.services.settings.telemetry_max_age_min),
        max_rate_per_min=auto.ph_max_rate_per_min if spec is PH else auto.ec_max_rate_per_min,
        stuck_min_samples=auto.stuck_min_samples,
        settle=dt.timedelta(minutes=auto.ph_cooldown_min if spec is PH else auto.ec_cooldown_min))
    if problem:
        await _refuse(ctx, spec, problem, details)
        return

    # Alerts follow the reading (ensure while out, resolve once back); never inside the target's own band.
    high_type, low_type = f"{spec.metric}_HIGH", f"{spec.metric}_LOW"
    high, low = diff > max(spec.high_alert_at, tgt.band), diff < -max(spec.low_alert_at, tgt.band)
    message = {"message": f"{spec.metric} {current} against target {tgt.value}"} if high or low else {}
    if high:
        if await ctx.alert(high_type, {**details, **message}) and spec is PH:
            await ctx.event("PH_TOO_HIGH_DETECTED", details)
    else:
        await ctx.resolve(high_type)
    if low:
        if await ctx.alert(low_type, {**details, **message}) and spec is PH:
            await ctx.event("PH_TOO_LOW_DETECTED", details)
    else:
        await ctx.resolve(low_type)

    if abs(diff) <= tgt.band:
        await _clear(ctx, spec)
        return
    direction = "high" if diff > 0 else "low"
    pump = spec.pumps.get(direction)
    if pump is None:  # EC too high: nothing can dilute; the alert above is the action
        await _clear(ctx, spec)
        return

    level = gates.water_level(zone, now, dt.timedelta(minutes=ctx.services.settings.telemetry_max_age_min))
    if level is not None and level < gates.WATER_LEVEL_OK:
        await ctx.water_low(level)
        await _refuse(ctx, spec, "water_level_low", {**details, "water_level": level})
        return
    actuator = gates.find_actuator(zone, (pump,))
    if actuator is None:
        await _refuse(ctx, spec, "no_actuator", {**details, "channel": pump})
        return
    node, channel = actuator
    details.update(node_uid=node.uid, channel=channel)
    gate = gates.can_run_pump(zone, node, channel, now,
                              telemetry_max_age=dt.timedelta(seconds=auto.pump_telemetry_max_age_sec),
                              water_max_age=dt.timedelta(minutes=ctx.services.settings.telemetry_max_age_min),
                              fault_window=dt.timedelta(minutes=30))
    if gate:
        await _refuse(ctx, spec, gate, details)
        return
    cooldown = dt.timedelta(minutes=auto.ph_cooldown_min if spec is PH else auto.ec_cooldown_min)
    last = gates.last_time(zone, spec.dose_events, tuple(spec.pumps.values()))
    if last is not None and now - last < cooldown:
        await _refuse(ctx, spec, "settling", {**details, "last_dose_at": last.isoformat()})
        return
    if spec is PH:
        last_nutrient = gates.last_time(zone, EC.dose_events, tuple(EC.pumps.values()))
        if last_nutrient is not None and now - last_nutrient < dt.timedelta(minutes=auto.ph_after_nutrient_min):
            await _refuse(ctx, spec, "waiting_for_ec", {**details, "last_nutrient_at": last_nutrient.isoformat()})
            return
    sized = _size(spec, node, channel, diff)
    if sized is None:
        await _refuse(ctx, spec, "safe_limit", details)
        return
    cmd, params, ml = sized
    count, ml_hour = gates.pumped_last_hour(zone, node, channel, now)
    cap_ml = as_number(ctx.targets.get("max_correction_per_hour_ml")) or (
        auto.ph_max_ml_per_hour if spec is PH else auto.ec_max_ml_per_hour)
    if count >= auto.max_doses_per_pump_hour or ml_hour + ml > cap_ml + 1e-9:
        await _refuse(ctx, spec, "hourly_cap", {**details, "doses_last_hour": count, "ml_last_hour": round(ml_hour, 3),
                                                "cap_ml": cap_ml})
        return
    if gates.improving(zone, spec.metric, reading, tgt.value):
        await _refuse(ctx, spec, "trend_improving", details)
        return

    try:
        cmd_id = await ctx.command(node, channel, cmd, params, spec.metric)
    except CommandError as exc:
        await _refuse(ctx, spec, "command_rejected", {**details, "error": str(exc)})
        return
    except CommandPublishError as exc:
        await _refuse(ctx, spec, "publish_failed", {**details, "error": str(exc)})
        return
    reason = f"{spec.key}_{direction}"
    m.CORRECTIONS.labels(channel, reason).inc()
    correction = {"ph": {"high": "add_acid", "low": "add_base"}, "ec": {"low": "add_nutrients"}}[spec.key][direction]
    record = {**details, "correction_type": correction, "dose_ml": round(ml, 3), "cmd": cmd, "params": params,
              "cmd_id": cmd_id}
    await ctx.event(spec.dose_events[0], record)
    await ctx.event("DOSING", {**record, "type": f"{spec.key}_correction"})
    await ctx.ai_log("recommend", {"action": correction, "metric": spec.metric, "current": current,
                                   "target": tgt.value, "correction": params})
    await _clear(ctx, spec)
