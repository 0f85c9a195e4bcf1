"""The tick: load schedules, work out what is due, claim it once, execute it.

Each tick covers the interval (previous completed tick, now]; the first tick after start-up
fires only what falls in the catch-up window. A due time older than the catch-up window (a tick
held up by an outage, or a downtime since the last tick any scheduler completed) is recorded as
`missed` and counted, not fired; of several irrigation times of one zone due in one tick only the
latest fires (the others are `missed`, superseded): one pump is never sent a burst. The clock is
injected: tests call `tick(now)` and `run_followups(now)` directly and never wait.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from typing import Callable

import execution
import irrigation
import lighting
import metrics as m
import water_cycle
from actuators import CommandSender
from common.actuator_closes import run_due
from common.alerts import add_zone_event
from common.db import Database
from common.env import Settings
from context import JobContext
from execution import Plan, Planner
from runs import Firing, Writes, claim, finish, last_completed_tick, record_tick, take_due_followups
from schedules import ZoneSchedule, load_schedules
from settings import ServiceSettings
from common.timespec import UTC, next_instant, occurrences

log = logging.getLogger("scheduler.engine")

Clock = Callable[[], dt.datetime]
MISSED_LOOKBACK = dt.timedelta(hours=24)  # how far back a start-up records the downtime's missed times


def system_clock() -> dt.datetime:
    return dt.datetime.now(UTC)


class Scheduler:
    def __init__(self, settings: Settings, options: ServiceSettings, db: Database, sender: CommandSender,
                 clock: Clock = system_clock):
        self.options, self.db, self.sender, self.clock = options, db, sender, clock
        self.ctx = JobContext(db, sender, options, settings)   # what the jobs below are given
        self.last_tick: dt.datetime | None = None
        self._light_edges: dict[int, tuple] = {}   # zone → the lighting edge key already claimed or seen
        self._reported: set[tuple] = set()         # bad specs already reported
        self._next_due: dict[tuple, tuple] = {}    # (kind, zone) → (spec, evaluated at, next instant due)
        self.planners: dict[str, Planner] = {"irrigation": irrigation.plan, "lighting": lighting.plan}
        self._followups = {"dry_run_check": irrigation.dry_run_check, "finish": irrigation.finish_run,
                           "lighting_retry": lighting.retry}

    # -- the tick ---------------------------------------------------------------------------
    async def tick(self, now: dt.datetime | None = None) -> list[Firing]:
        """One evaluation at `now`; returns the firings this call claimed (executed or missed)."""
        now = now or self.clock()
        if not self.sender.mqtt.connected:
            # Nothing is claimed while commands cannot go out; the next tick covers this interval.
            m.TICK_SKIPPED.inc()
            log.warning("scheduler_tick_skipped_mqtt_down")
            return []
        started = time.perf_counter()
        try:
            zones = await load_schedules(self.db, self.options.irrigation_duration_sec)
            m.ZONES_LOADED.set(len(zones))
            m.ACTIVE_SCHEDULES.set(sum(z.item_count for z in zones))
            await self._report_bad_specs(zones)
            after = self.last_tick or await self._first_window_start(now)
            firings = self.due(zones, after, now)
            claimed = await claim(self.db, firings, now)
            self._count_claims(firings, claimed)
            await self._execute([f for f in claimed if f.status == "running"], now)
            await water_cycle.advance(self.ctx, zones, now, after, now - dt.timedelta(seconds=self.options.catchup_sec))
            await record_tick(self.db, now)
        except Exception:
            m.TICK_ERRORS.inc()
            log.exception("scheduler_tick_failed")
            raise
        finally:
            m.TICK_SECONDS.observe(time.perf_counter() - started)
        if self.last_tick is None or now > self.last_tick:
            self.last_tick = now
        return claimed

    async def _first_window_start(self, now: dt.datetime) -> dt.datetime:
        """The catch-up window; reaching back to the last tick any scheduler completed (at most
        MISSED_LOOKBACK) so that the times a downtime skipped are recorded as missed."""
        start = now - dt.timedelta(seconds=self.options.catchup_sec)
        previous = await last_completed_tick(self.db)
        if previous is not None and previous < start:
            return max(previous, now - MISSED_LOOKBACK)
        return start

    def due(self, zones: list[ZoneSchedule], after: dt.datetime, now: dt.datetime) -> list[Firing]:
        """Every firing falling in (after, now]: irrigation times and lighting edges."""
        horizon = now - dt.timedelta(seconds=self.options.catchup_sec)
        firings: list[Firing] = []
        for zone in zones:
            if zone.irrigation_times and not self._quiet(("irrigation", zone.zone_id),
                                                         (zone.irrigation_times, zone.tz), after, now):
                due = sorted(occurrences(zone.irrigation_times, zone.tz, after, now), key=lambda o: o.at)
                latest = next((o for o in reversed(due) if o.at >= horizon), None)
                for occ in due:
                    item = f"irrigation@{occ.local:%H:%M}"
                    if occ is latest:
                        firings.append(Firing(zone, "irrigation", item, occ))
                    elif occ.at >= horizon:  # superseded by a later time due in the same tick
                        firings.append(Firing(zone, "irrigation", item, occ, "missed",
                                              {"reason": "superseded", "fired": latest.local.isoformat()}))
                    else:
                        firings.append(Firing(zone, "irrigation", item, occ, "missed", {"reason": "too_late"}))
                self._remember(("irrigation", zone.zone_id), (zone.irrigation_times, zone.tz), now,
                               next_instant(zone.irrigation_times, zone.tz, now))
            if zone.lighting is not None:
                window = zone.lighting
                if not self._quiet(("lighting", zone.zone_id), (window, zone.tz), now, now):
                    edge = lighting.edge_firing(zone, now)
                    if self._light_edges.get(zone.zone_id) != edge.key:
                        firings.append(edge)
                    else:  # seen: nothing to do until the window's next edge
                        self._remember(("lighting", zone.zone_id), (window, zone.tz), now,
                                       next_instant((window.start, window.end), zone.tz, now))
        return firings

    def _quiet(self, key: tuple, spec: tuple, after: dt.datetime, now: dt.datetime) -> bool:
        """True when an earlier evaluation of the same spec proved nothing falls in (after, now]."""
        known = self._next_due.get(key)
        return known is not None and known[0] == spec and after >= known[1] and now < known[2]

    def _remember(self, key: tuple, spec: tuple, evaluated_at: dt.datetime, next_at: dt.datetime) -> None:
        self._next_due[key] = (spec, evaluated_at, next_at)

    def _count_claims(self, firings: list[Firing], claimed: list[Firing]) -> None:
        won = {id(f) for f in claimed}
        for firing in firings:
            if firing.kind == "lighting":
                self._light_edges[firing.zone.zone_id] = firing.key
            if id(firing) not in won:
                m.DUPLICATES.labels(firing.kind).inc()
            elif firing.status == "missed":
                m.MISSED.labels(firing.kind).inc()
                log.warning("schedule_missed", extra={"zone_id": firing.zone.zone_id, "item": firing.item,
                                                      "scheduled_local": firing.occurrence.local.isoformat(),
                                                      "run_id": firing.run_id})

    async def _execute(self, firings: list[Firing], now: dt.datetime) -> None:
        """Every claimed firing, stage by stage (execution.py); one firing's failure never stops the others."""
        if not firings:
            return
        facts = await execution.read_facts(self.ctx, firings, now)
        planned: list[tuple[Firing, Plan]] = []
        for firing in firings:
            try:
                planned.append((firing, self.planners[firing.kind](self.ctx, firing, facts, now)))
            except Exception as exc:  # noqa: BLE001
                await self._failed(firing, exc, now)
        planned = await self._write(planned, lambda plan: plan.before, now)
        await self._send([plan for _, plan in planned if plan.outcome is None])
        recorded = []
        for firing, plan in planned:
            try:
                if plan.error is not None:
                    raise plan.error
                if plan.outcome is None:
                    execution.record_sent(plan, now)
                recorded.append((firing, plan))
            except Exception as exc:  # noqa: BLE001
                await self._failed(firing, exc, now)
        for firing, plan in await self._write(recorded, lambda plan: plan.later, now):
            m.FIRINGS.labels(firing.kind, plan.outcome).inc()
            m.SCHEDULE_EXECUTIONS.labels(str(firing.zone.zone_id), firing.kind).inc()
            log.info("schedule_fired", extra={"zone_id": firing.zone.zone_id, "item": firing.item,
                                              "outcome": plan.outcome, "run_id": firing.run_id,
                                              "scheduled_local": firing.occurrence.local.isoformat()})

    async def _write(self, planned: list[tuple[Firing, Plan]], writes: Callable[[Plan], Writes | None],
                     now: dt.datetime) -> list[tuple[Firing, Plan]]:
        """One stage's records of every firing in one transaction; should that fail, firing by firing,
        so that only the firings whose own records fail are lost. Returns the firings recorded."""
        merged = Writes(now)
        for _, plan in planned:
            if writes(plan):
                merged.extend(writes(plan))
        try:
            await merged.flush(self.db)
            return planned
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            if len(planned) == 1:
                await self._failed(planned[0][0], exc, now)
                return []
            log.warning("scheduler_batch_write_failed", exc_info=True, extra={"firings": len(planned)})
        kept = []
        for firing, plan in planned:
            try:
                if writes(plan):
                    await writes(plan).flush(self.db)
                kept.append((firing, plan))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self._failed(firing, exc, now)
        return kept

    async def _send(self, plans: list[Plan]) -> None:
        """Every command at once, so that issue_command batches them; one zone's in order (e.g. lights
        off before irrigation), SCHEDULER_CONCURRENCY zones side by side."""
        gate = asyncio.Semaphore(self.options.concurrency)
        by_zone: dict[int, list[Plan]] = {}
        for plan in plans:
            by_zone.setdefault(plan.zone_id, []).append(plan)

        async def run_zone(items: list[Plan]) -> None:
            async with gate:
                for plan in items:
                    try:
                        await execution.send(self.ctx, plan)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - recorded as this firing's failure
                        plan.error = exc

        await asyncio.gather(*(run_zone(items) for items in by_zone.values()))

    async def _failed(self, firing: Firing, exc: BaseException | None, now: dt.datetime) -> None:
        m.ZONE_ERRORS.labels(firing.kind).inc()
        log.error("schedule_firing_failed", exc_info=exc,
                  extra={"zone_id": firing.zone.zone_id, "item": firing.item, "run_id": firing.run_id})
        with contextlib.suppress(Exception):  # the run says why it stopped, when the database lets it
            await finish(self.db, firing.run_id, "failed", {"error": "internal", "message": str(exc)[:500]}, now)

    async def _report_bad_specs(self, zones: list[ZoneSchedule]) -> None:
        """Each distinct bad spec once: a metric, one log line and a zone event."""
        for zone in zones:
            for bad in zone.bad_specs:
                if bad.identity in self._reported:
                    continue
                self._reported.add(bad.identity)
                m.BAD_SPECS.labels(bad.key).inc()
                log.warning("schedule_spec_invalid", extra={"zone_id": bad.zone_id, "key": bad.key,
                                                            "value": bad.value, "reason": bad.reason})
                try:
                    async with self.db.transaction() as conn:
                        await add_zone_event(conn, bad.zone_id, "SCHEDULE_SPEC_INVALID",
                                             {"key": bad.key, "value": bad.value, "reason": bad.reason})
                except Exception:  # noqa: BLE001 - e.g. the zone was deleted meanwhile; the tick goes on
                    log.exception("schedule_spec_event_failed", extra={"zone_id": bad.zone_id, "key": bad.key})

    # -- follow-ups -------------------------------------------------------------------------
    async def run_followups(self, now: dt.datetime | None = None) -> int:
        """Run every follow-up step due at `now` (each taken by exactly one scheduler)."""
        now = now or self.clock()
        done = 0
        if self.sender.mqtt.connected:  # closes wait for the broker; they stay due meanwhile
            for closed in await run_due(self.db, self.sender.mqtt, self.sender.topics, owner="scheduler", now=now):
                m.FOLLOWUPS.labels("valve_close").inc()
                done += 1
                if closed["error"]:
                    log.error("valve_close_refused", extra=closed)
        for run in await take_due_followups(self.db, now):
            kind = run["due_kind"]
            try:
                await self._followups[kind](self.ctx, run, now)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                m.ZONE_ERRORS.labels(f"followup_{kind}").inc()
                log.exception("schedule_followup_failed", extra={"run_id": run["id"], "followup": kind})
                continue
            m.FOLLOWUPS.labels(kind).inc()
            done += 1
        return done

    # -- loops (the service) ----------------------------------------------------------------
    async def tick_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            began = time.monotonic()
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - logged in tick(); the next tick covers the gap
                pass
            await _sleep_or_stop(stopping, max(0.0, self.options.interval_sec - (time.monotonic() - began)))

    async def followup_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.run_followups()
            except Exception:  # noqa: BLE001
                log.exception("schedule_followups_failed")
            await _sleep_or_stop(stopping, self.options.followup_poll_sec)


async def _sleep_or_stop(stopping: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except asyncio.TimeoutError:
        pass
