"""One automation cycle over every eligible zone (contract §8.10).

config → eligible zones → claim them (leases) → one batched read of their facts → controllers
per zone, as many zones at once as the adaptive limit says (that many workers taking the zones in
turn) → the zones' events, written together as they finish → zone health in one write → release.
A zone (or one of its controllers) that raises is counted and logged; the others go on; more
than FAILING_ZONES_ALERT_RATIO of zones failing raises an infra alert.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import metrics as m
import gates
import leases
from actions import Services, ZoneContext
from common.alerts import ensure_alert, resolve_alerts
from config_source import ConfigLoader
from controllers import climate, dosing, health, irrigation, lighting, phase, pump_watch
from snapshot import ZoneData, load_facts, load_zones

log = logging.getLogger("automation.engine")

Controller = Callable[[ZoneContext], Awaitable[None]]
# Order of contract §8.10, except that EC runs before pH (pH waits for a nutrient dose to settle).
CONTROLLERS: list[tuple[str, Controller]] = [
    ("phase", phase.run),
    ("pump_watch", pump_watch.run),  # first: a pump stuck on blocks every pump of the zone in this very cycle
    ("light", lighting.run),
    ("climate", climate.run),
    ("irrigation", irrigation.run_irrigation),
    ("recirculation", irrigation.run_recirculation),
    ("ec", dosing.run_ec),
    ("ph", dosing.run_ph),
    ("health", health.run),
]
# The controllers of a zone whose capabilities are NULL (contract §8.10: control is opt-in; these only observe).
ALWAYS = {"pump_watch", "health"}
FAILURE_ALERT_MATCH = {"service": "automation-engine", "reason": "zone_failures"}


_gc_pause = {"depth": 0, "enabled": True}


@contextlib.contextmanager
def _collector_paused():
    """No garbage-collector runs during a cycle: with 10,000 zones' facts alive, every full collection
    walks all of them (0.1-0.4 s each, several per cycle). The cycle's objects are freed by reference
    counting when it ends; the collector resumes between cycles. Nested (two engines in one process)
    the outermost restores the collector as it found it."""
    if _gc_pause["depth"] == 0:
        _gc_pause["enabled"] = gc.isenabled()
        gc.disable()
    _gc_pause["depth"] += 1
    try:
        yield
    finally:
        _gc_pause["depth"] -= 1
        if _gc_pause["depth"] == 0 and _gc_pause["enabled"]:
            gc.enable()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


@dataclass
class CycleResult:
    zones: int = 0
    processed: int = 0
    failed: int = 0
    skipped: int = 0            # claimed by another engine
    concurrency: int = 0
    duration: float = 0.0
    config_source: str = "none"
    contexts: dict[int, ZoneContext] = field(default_factory=dict)


class Engine:
    def __init__(self, services: Services, config: ConfigLoader, *, owner: str | None = None,
                 clock: Callable[[], dt.datetime] = utcnow, controllers: list[tuple[str, Controller]] | None = None):
        self.services = services
        self.config = config
        self.owner = owner or f"{services.settings.mqtt_client_id}-auto-{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.controllers = controllers if controllers is not None else list(CONTROLLERS)
        self.avg_zone_time: float | None = None
        self._null_capabilities_logged: set[int] = set()
        self._failure_alert_maybe_open = True  # resolve once on the first healthy cycle

    # -- concurrency ----------------------------------------------------------------------
    def concurrency(self, total_zones: int) -> int:
        auto = self.services.options
        if not auto.adaptive_concurrency:
            return auto.max_concurrent_zones
        if self.avg_zone_time is None:
            wanted = auto.max_concurrent_zones  # nothing measured yet: be quick, not clever
        else:
            wanted = math.ceil(total_zones * self.avg_zone_time / auto.target_cycle_time_sec)
        return max(auto.min_concurrent_zones, min(auto.max_concurrent_zones, wanted))

    def _measured(self, seconds: float) -> None:
        m.ZONE_PROCESSING_TIME.observe(seconds)
        self.avg_zone_time = seconds if self.avg_zone_time is None else 0.8 * self.avg_zone_time + 0.2 * seconds

    # -- one cycle ------------------------------------------------------------------------
    async def run_cycle(self, now: dt.datetime | None = None) -> CycleResult:
        with _collector_paused():
            return await self._run_cycle(now or self.clock())

    async def _run_cycle(self, now: dt.datetime) -> CycleResult:
        started = time.monotonic()
        result = CycleResult()
        services, auto = self.services, self.services.options
        config = await self.config.load()
        result.config_source = config.source
        zones = await load_zones(services.db)
        result.zones = len(zones)
        claimed = await leases.claim(services.db, [z.id for z in zones], self.owner, now,
                                     lease=dt.timedelta(seconds=auto.zone_lease_sec),
                                     min_gap=dt.timedelta(seconds=auto.interval_sec / 2))
        mine = [z for z in zones if z.id in claimed]
        result.skipped = len(zones) - len(mine)
        try:
            await load_facts(services.db, [z for z in mine if z.read_error is None], now, command_window=dt.timedelta(minutes=max(60.0, auto.reassert_min)),
                             fault_window=dt.timedelta(minutes=30),
                             sample_count=gates.REFERENCE_SAMPLES + 1,
                             stuck_window=dt.timedelta(minutes=auto.stuck_min_minutes))
            result.concurrency = self.concurrency(len(mine))
            m.OPTIMAL_CONCURRENCY.set(result.concurrency)
            result.failed = await self._zones(mine, config, now, result)
            result.processed = len(mine)
            await self._write_health(result)
        finally:
            await leases.release(services.db, list(claimed), self.owner)
        await self._failure_alert(result)
        result.duration = time.monotonic() - started
        m.CYCLE_DURATION.observe(result.duration)
        m.CYCLES.labels("ok" if not result.failed else "zone_errors").inc()
        for state, count in (("eligible", result.zones), ("processed", result.processed),
                             ("failed", result.failed), ("skipped", result.skipped)):
            m.CYCLE_ZONES.labels(state).set(count)
        log.info("cycle_done", extra={"zones": result.zones, "processed": result.processed, "failed": result.failed,
                                      "skipped": result.skipped, "concurrency": result.concurrency,
                                      "duration_sec": round(result.duration, 3), "config_source": config.source})
        return result

    async def _zones(self, zones: list[ZoneData], config, now: dt.datetime, result: CycleResult) -> int:
        """Run every zone, `result.concurrency` at a time (a worker each, not a task per zone); the number failed."""
        pending = iter(zones)
        ok: dict[int, bool] = {}
        writes: list[tuple[int, asyncio.Future]] = []  # each zone's events, written while its worker goes on

        async def worker() -> None:
            for zone in pending:
                try:
                    ok[zone.id] = await self._zone(zone, config, now, result, writes)
                except Exception as exc:  # noqa: BLE001 - one zone never stops the worker's next ones
                    ok[zone.id] = False
                    m.ZONE_PROCESSING_ERRORS.labels(str(zone.id), f"zone:{type(exc).__name__}").inc()
                    log.exception("zone_failed", extra={"zone_id": zone.id})

        await asyncio.gather(*(worker() for _ in range(min(result.concurrency, len(zones)))))
        for zone_id, written in writes:
            try:
                await written
            except Exception as exc:  # noqa: BLE001 - counted like a controller failure
                ok[zone_id] = False
                m.ZONE_PROCESSING_ERRORS.labels(str(zone_id), f"events:{type(exc).__name__}").inc()
                log.error("zone_events_failed", extra={"zone_id": zone_id, "error": repr(exc)[:300]})
        return sum(1 for zone_ok in ok.values() if not zone_ok)

    async def _zone(self, zone: ZoneData, config, now: dt.datetime, result: CycleResult,
                    writes: list[tuple[int, asyncio.Future]]) -> bool:
        started = time.monotonic()
        gh = config.zones.get(zone.id)
        ctx = ZoneContext(zone, self.services, now, gh_uid=gh.uid if gh else (zone.gh_uid or ""),
                          timezone=(gh.timezone if gh else None) or zone.timezone)
        result.contexts[zone.id] = ctx
        if zone.read_error is not None:  # its facts could not be read: nothing to decide on
            error = zone.read_error
            m.ZONE_PROCESSING_ERRORS.labels(str(zone.id), f"read:{type(error).__name__}").inc()
            log.error("zone_read_failed", extra={"zone_id": zone.id, "error": str(error)[:300]})
            ctx.log.append(f"read_failed:{type(error).__name__}")
            return False
        ctx.targets = phase.current_targets(ctx)
        if zone.capabilities is None and zone.id not in self._null_capabilities_logged:
            self._null_capabilities_logged.add(zone.id)
            log.info("zone_without_capabilities_runs_health_only", extra={"zone_id": zone.id})
        ok = True
        try:
            await ctx.water_recovered()
        except Exception as exc:  # noqa: BLE001 - counted like a controller failure
            ok = False
            m.ZONE_PROCESSING_ERRORS.labels(str(zone.id), f"water:{type(exc).__name__}").inc()
            log.exception("zone_water_alerts_failed", extra={"zone_id": zone.id})
        for name, controller in self.controllers:
            if zone.capabilities is None and name not in ALWAYS:
                continue
            try:
                await controller(ctx)
            except Exception as exc:  # noqa: BLE001 - one controller never stops the others
                ok = False
                m.ZONE_PROCESSING_ERRORS.labels(str(zone.id), f"{name}:{type(exc).__name__}").inc()
                log.exception("zone_controller_failed", extra={"zone_id": zone.id, "controller": name})
        try:
            written = ctx.flush()
            if written is not None:
                writes.append((zone.id, written))
        except Exception as exc:  # noqa: BLE001 - counted like a controller failure
            ok = False
            m.ZONE_PROCESSING_ERRORS.labels(str(zone.id), f"events:{type(exc).__name__}").inc()
            log.exception("zone_events_failed", extra={"zone_id": zone.id})
        m.ZONE_CHECKS.inc()
        self._measured(time.monotonic() - started)
        return ok

    async def _write_health(self, result: CycleResult) -> None:
        rows = [(zone_id, ctx.health[0], ctx.health[1]) for zone_id, ctx in result.contexts.items() if ctx.health]
        if not rows:
            return
        await self.services.db.execute(
            "UPDATE zones z SET health_score = v.score, health_status = v.status"
            " FROM unnest($1::bigint[], $2::numeric[], $3::text[]) AS v(id, score, status) WHERE z.id = v.id",
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])

    async def _failure_alert(self, result: CycleResult) -> None:
        db = self.services.db
        ratio = result.failed / result.processed if result.processed else 0.0
        if result.processed and ratio > self.services.options.failing_zones_alert_ratio:
            details = {**FAILURE_ALERT_MATCH, "failed": result.failed, "processed": result.processed,
                       "ratio": round(ratio, 3),
                       "message": f"{result.failed} of {result.processed} zones failed in one automation cycle"}
            async with db.pool.acquire() as conn:
                await ensure_alert(conn, zone_id=None, alert_type="SERVICE_DOWN", details=details,
                                   match=FAILURE_ALERT_MATCH, source="infra")
            self._failure_alert_maybe_open = True
        elif self._failure_alert_maybe_open:
            async with db.pool.acquire() as conn:
                await resolve_alerts(conn, zone_id=None, alert_type="SERVICE_DOWN", match=FAILURE_ALERT_MATCH)
            self._failure_alert_maybe_open = False
