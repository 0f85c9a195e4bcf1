"""Water-change cycle (contract §8.6), off unless `settings.water_cycle.water_change.enabled` is true.

    NORMAL_RECIRC ─(time_of_day, solution old or EC drifted)→ WATER_CHANGE_DRAIN
      ─(WATER_LEVEL ≤ drain target, or drain timeout)→ WATER_CHANGE_FILL
      ─(WATER_LEVEL ≥ fill target, or fill timeout)→ WATER_CHANGE_STABILIZE
      ─(stabilize minutes passed)→ NORMAL_RECIRC   (solution_started_at = now)

A change starts at `time_of_day` (greenhouse timezone) once the solution is `interval_days` old, or
its EC is `ec_drift_threshold` % away from the phase target (`trigger_by_ec_drift`); a solution
older than `max_solution_age_days` starts one at the next tick whatever the hour. The start is a
claimed firing (item `water_change`), so it happens once; each step is a compare-and-set on
`zones.water_state`, so two schedulers never both take it. Events: WATER_CHANGE_STARTED,
WATER_CHANGE_STEP {from, to, reason, level} on every step, WATER_CHANGE_COMPLETED. Drain and fill
valves (`valve_drain` / `valve_fill` …) are opened with `set_relay {state: true}` when their step
begins and closed when it ends. The firmware ignores set_relay's duration, so each close is a row
of `actuator_closes` written with the step change (in its transaction) and sent by the follow-up
loop — a scheduler that dies between the step and the close still closes after its restart; each
opened valve also gets a safety close at its step's timeout plus CLOSE_MARGIN, should the cycle
stop being advanced (zone paused). A zone with no online drain or fill valve does not start a change.
"""
from __future__ import annotations

import datetime as dt
import logging

import metrics as m
from actuators import DRAIN_CHANNELS, FILL_CHANNELS, freshest_metric, named_targets, zone_channels
from common.actuator_closes import run_due, schedule_close
from common.alerts import add_zone_event
from context import JobContext
from runs import Firing, claim, finish, iso, naive_utc, scheduler_log
from schedules import WaterChange, ZoneSchedule
from common.timespec import Occurrence, occurrences

log = logging.getLogger("scheduler.water_cycle")

NORMAL, DRAIN, FILL, STABILIZE = ("NORMAL_RECIRC", "WATER_CHANGE_DRAIN", "WATER_CHANGE_FILL",
                                  "WATER_CHANGE_STABILIZE")
CHANGING = (DRAIN, FILL, STABILIZE)
TASK = "water_change"
CLOSE_MARGIN = dt.timedelta(minutes=2)


async def _close_later(conn, zone: ZoneSchedule, targets, at: dt.datetime, reason: str) -> None:
    for target in targets:
        await schedule_close(conn, owner="scheduler", zone_id=zone.zone_id, node_uid=target.node_uid,
                             channel=target.channel, close_at=at, reason=reason)


def solution_age_days(zone: ZoneSchedule, now: dt.datetime) -> float | None:
    if zone.solution_started_at is None:
        return None
    return (naive_utc(now) - zone.solution_started_at).total_seconds() / 86400


async def advance(ctx: JobContext, zones: list[ZoneSchedule], now: dt.datetime, after: dt.datetime,
                  horizon: dt.datetime) -> None:
    """Start due water changes and move the ones under way on by at most one step each."""
    changing = [z for z in zones if z.water_state in CHANGING]
    for zone in zones:
        if zone.water_change is not None and zone.water_state == NORMAL:
            await _guarded(ctx, zone, _maybe_start(ctx, zone, now, after, horizon))
    if changing:
        cycles = {r["zone_id"]: r for r in await ctx.db.fetch(
            "SELECT * FROM scheduler_water_cycles WHERE zone_id = ANY($1)", [z.zone_id for z in changing])}
        for zone in changing:
            await _guarded(ctx, zone, _step(ctx, zone, cycles.get(zone.zone_id), now))


async def _guarded(ctx: JobContext, zone: ZoneSchedule, work) -> None:
    try:
        await work
    except Exception:  # noqa: BLE001 - one zone's failure never stops the others
        m.ZONE_ERRORS.labels("water_change").inc()
        log.exception("water_change_failed", extra={"zone_id": zone.zone_id})


async def _reason(ctx: JobContext, zone: ZoneSchedule, settings: WaterChange, now: dt.datetime) -> str | None:
    age = solution_age_days(zone, now)
    if age is not None and age >= settings.interval_days:
        return "interval"
    if settings.trigger_by_ec_drift and zone.ec_target:
        fresh_after = naive_utc(now) - dt.timedelta(minutes=ctx.settings.telemetry_max_age_min)
        ec = await freshest_metric(ctx.db, zone.zone_id, "EC", fresh_after)
        if ec is not None and abs(ec - zone.ec_target) / zone.ec_target * 100 >= settings.ec_drift_threshold:
            return "ec_drift"
    return None


async def _maybe_start(ctx: JobContext, zone: ZoneSchedule, now: dt.datetime, after: dt.datetime,
                       horizon: dt.datetime) -> None:
    settings = zone.water_change
    if zone.solution_started_at is None:
        # Unknown age: count from now rather than drain a tank nobody asked to change.
        await ctx.db.execute("UPDATE zones SET solution_started_at = $2 WHERE id = $1"
                               " AND solution_started_at IS NULL", zone.zone_id, naive_utc(now))
        log.info("water_change_age_baseline", extra={"zone_id": zone.zone_id})
        return
    age = solution_age_days(zone, now)
    firing = None
    if age >= settings.max_solution_age_days:
        local_day = now.astimezone(zone.tz).date()
        firing = Firing(zone, "water_change", "water_change:max_age",
                        Occurrence(dt.datetime.combine(local_day, dt.time(0)), now), details={"reason": "max_age"})
    else:
        due = [o for o in occurrences((settings.time_of_day,), zone.tz, after, now) if o.at >= horizon]
        if due:
            reason = await _reason(ctx, zone, settings, now)
            if reason is not None:
                firing = Firing(zone, "water_change", "water_change", due[-1], details={"reason": reason})
    if firing is None:
        return
    rows = await zone_channels(ctx.db, zone.zone_id)
    drains, fills = named_targets(rows, DRAIN_CHANNELS), named_targets(rows, FILL_CHANNELS)
    if not drains or not fills:
        if ("no_valves", zone.zone_id, firing.occurrence.local) not in ctx.water_notes:
            ctx.water_notes.add(("no_valves", zone.zone_id, firing.occurrence.local))
            log.warning("water_change_no_valves", extra={"zone_id": zone.zone_id, "drain": len(drains),
                                                         "fill": len(fills)})
        return
    if not await claim(ctx.db, [firing], now):
        m.DUPLICATES.labels("water_change").inc()
        return
    details = {"reason": firing.details["reason"], "solution_age_days": round(age, 2), "run_id": firing.run_id}
    async with ctx.db.transaction() as conn:
        moved = await conn.fetchval(
            "UPDATE zones SET water_state = $2, updated_at = now() WHERE id = $1 AND water_state = $3 RETURNING id",
            zone.zone_id, DRAIN, NORMAL)
        if moved is None:
            await finish(conn, firing.run_id, "failed", {"error": "water_state_changed"}, now)
            return
        await _save_cycle(conn, zone.zone_id, firing.run_id, DRAIN, now, started=True, details=details)
        await _close_later(conn, zone, drains, now + dt.timedelta(minutes=settings.drain_timeout_min) + CLOSE_MARGIN,
                           "water_change:drain")
        await add_zone_event(conn, zone.zone_id, "WATER_CHANGE_STARTED", dict(details, started_at=iso(now)))
        await scheduler_log(conn, TASK, "running", dict(details, zone_id=zone.zone_id))
    m.WATER_TRANSITIONS.labels(DRAIN).inc()
    m.FIRINGS.labels("water_change", "started").inc()
    m.SCHEDULE_EXECUTIONS.labels(str(zone.zone_id), "water_change").inc()
    await _valves(ctx, zone, firing.run_id, drains, True)
    log.info("water_change_started", extra={"zone_id": zone.zone_id, **details})


async def _save_cycle(conn, zone_id: int, run_id: int | None, state: str, now: dt.datetime,
                      started: bool = False, details: dict | None = None) -> None:
    await conn.execute(
        """
        INSERT INTO scheduler_water_cycles (zone_id, run_id, state, state_since, cycle_started_at, details, updated_at)
        VALUES ($1, $2, $3, $4::timestamp, CASE WHEN $5::boolean THEN $4::timestamp END, $6, now())
        ON CONFLICT (zone_id) DO UPDATE SET state = excluded.state, state_since = excluded.state_since,
          run_id = CASE WHEN $5 THEN excluded.run_id ELSE scheduler_water_cycles.run_id END,
          cycle_started_at = CASE WHEN $5 THEN excluded.cycle_started_at
                                  ELSE scheduler_water_cycles.cycle_started_at END,
          details = coalesce(scheduler_water_cycles.details, '{}'::jsonb) || excluded.details, updated_at = now()
        """, zone_id, run_id, state, naive_utc(now), started, details or {})


async def _valves(ctx: JobContext, zone: ZoneSchedule, run_id: int | None, targets, open_: bool) -> None:
    for target in targets:
        await ctx.sender.send(run_id, zone.gh_uid, zone.zone_id, target, "set_relay", {"state": open_})


async def _step(ctx: JobContext, zone: ZoneSchedule, cycle, now: dt.datetime) -> None:
    settings = zone.water_change or WaterChange()
    if cycle is None or cycle["state"] != zone.water_state:
        # A state set outside the scheduler (or by an older cycle): time the step from now.
        async with ctx.db.transaction() as conn:
            await _save_cycle(conn, zone.zone_id, None, zone.water_state, now)
        return
    since = cycle["state_since"]
    elapsed_min = (naive_utc(now) - since).total_seconds() / 60
    level = await freshest_metric(ctx.db, zone.zone_id, "WATER_LEVEL", since)
    state, nxt, reason = zone.water_state, None, None
    if state == DRAIN:
        if level is not None and level <= settings.drain_target_level:
            nxt, reason = FILL, "level_reached"
        elif elapsed_min >= settings.drain_timeout_min:
            nxt, reason = FILL, "timeout"
    elif state == FILL:
        if level is not None and level >= settings.fill_target_level:
            nxt, reason = STABILIZE, "level_reached"
        elif elapsed_min >= settings.fill_timeout_min:
            nxt, reason = STABILIZE, "timeout"
    elif state == STABILIZE and elapsed_min >= settings.stabilize_min:
        nxt, reason = NORMAL, "stabilized"
    if nxt is None:
        return
    run_id = cycle["run_id"]
    step = {"from": state, "to": nxt, "reason": reason, "level": level, "run_id": run_id,
            "step_minutes": round(elapsed_min, 1)}
    rows = await zone_channels(ctx.db, zone.zone_id) if nxt in (FILL, STABILIZE) else []
    drains, fills = named_targets(rows, DRAIN_CHANNELS), named_targets(rows, FILL_CHANNELS)
    async with ctx.db.transaction() as conn:
        moved = await conn.fetchval(
            "UPDATE zones SET water_state = $2::varchar, updated_at = now(),"
            " solution_started_at = CASE WHEN $2::varchar = 'NORMAL_RECIRC' THEN $4::timestamp"
            " ELSE solution_started_at END"
            " WHERE id = $1 AND water_state = $3 RETURNING id", zone.zone_id, nxt, state, naive_utc(now))
        if moved is None:
            return  # another scheduler took this step
        await _save_cycle(conn, zone.zone_id, run_id, nxt, now, details={f"{state.lower()}_end": step})
        if nxt == FILL:  # the drain closes now, the fill valve at the latest after its step's timeout
            await _close_later(conn, zone, drains, now, "water_change:drain")
            await _close_later(conn, zone, fills, now + dt.timedelta(minutes=settings.fill_timeout_min) + CLOSE_MARGIN,
                               "water_change:fill")
        elif nxt == STABILIZE:
            await _close_later(conn, zone, fills, now, "water_change:fill")
        await add_zone_event(conn, zone.zone_id, "WATER_CHANGE_STEP", step)
        if nxt == NORMAL:
            started = cycle["cycle_started_at"]
            done = {"run_id": run_id, "solution_started_at": iso(now),
                    "duration_min": round((naive_utc(now) - started).total_seconds() / 60, 1) if started else None}
            await add_zone_event(conn, zone.zone_id, "WATER_CHANGE_COMPLETED", done)
            if run_id is not None:
                await finish(conn, run_id, "completed", {"completed_at": iso(now)}, now)
            await scheduler_log(conn, TASK, "completed", dict(done, zone_id=zone.zone_id))
    m.WATER_TRANSITIONS.labels(nxt).inc()
    log.info("water_change_step", extra={"zone_id": zone.zone_id, **step})
    if nxt in (FILL, STABILIZE) and ctx.sender.mqtt.connected:
        await run_due(ctx.db, ctx.sender.mqtt, ctx.sender.topics, owner="scheduler", now=now,
                      zone_id=zone.zone_id)  # the closes just recorded; else the follow-up loop sends them
    if nxt == FILL:
        await _valves(ctx, zone, run_id, fills, True)
