"""What a controller may do to a zone: publish a command, write a zone event, open / refresh /
resolve an alert (the shared lifecycle of contract §8.7), and record a refused correction.

Controllers decide; this module is the one place that writes. Events are written at most once
per (zone, type) per cycle, once the zone's controllers are done (`flush`), together with the
events of the other zones done meanwhile (EventWriter). Alerts are resolved only when the cycle's
snapshot shows one ACTIVE, and refreshed only when their details changed, so a healthy zone, or
one whose trouble is unchanged, costs no writes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from common.alerts import ZONE_EVENTS_INSERT, ensure_alert, resolve_alerts
from common.commands import CommandPublishError, issue_command
from common.db import CONNECTION_ERRORS, Database
from common.env import Settings
from common.mqtt import MqttClient
from common.timespec import zone_info
from common.topics import Topics
import metrics as m
from settings import ServiceSettings
from snapshot import AlertRow, CommandRow, Node, ZoneData

log = logging.getLogger("automation.actions")

# Refusals that mean "something is wrong" when they last several cycles (alert DOSING_BLOCKED);
# the others (settling, waiting for EC, improving trend) are the normal rhythm of dosing.
PERSISTENT_REASONS = {"stale_reading", "implausible_value", "implausible_rate", "unconfirmed_reading", "stuck_sensor",
                      "no_actuator",
                      "node_offline", "node_silent", "water_level_low", "dry_run", "pump_fault_alert",
                      "pump_fault_count", "pending_command", "hourly_cap", "safe_limit", "command_rejected",
                      "publish_failed"}
DOSING_BLOCKED = "DOSING_BLOCKED"
_BAD_TIMEZONES: set[str] = set()  # logged once each
# Zones' events and ai_logs, in one round trip.
_WRITE = f"""
WITH events AS ({ZONE_EVENTS_INSERT})
INSERT INTO ai_logs (zone_id, action, details, created_at)
SELECT a.zone_id, a.action, a.details::jsonb, now()
  FROM unnest($4::bigint[], $5::text[], $6::text[]) WITH ORDINALITY a(zone_id, action, details, n) ORDER BY a.n
"""


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass
class _Written:
    events: list[tuple[int, str, str]]   # (zone_id, type, details as JSON)
    ai_logs: list[tuple[int, str, str]]  # (zone_id, action, details as JSON)
    future: asyncio.Future


class EventWriter:
    """Group commit of the zones' events and ai_logs: zones done while a write is in flight go
    together in the next one, one round trip for all. When PostgreSQL refuses the batch (a value
    jsonb cannot hold), its rows are written one by one: only the refused row is lost, and only
    its zone hears of it."""

    def __init__(self, db: Database):
        self.db = db
        self.queue: list[_Written] = []
        self.worker: asyncio.Task | None = None

    def submit(self, events: list[tuple[int, str, str]], ai_logs: list[tuple[int, str, str]]) -> asyncio.Future:
        """Queue the rows; the future is done once they are written (or holds why not)."""
        item = _Written(events, ai_logs, asyncio.get_running_loop().create_future())
        self.queue.append(item)
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())
        return item.future

    async def _drain(self) -> None:
        while self.queue:
            batch, self.queue = self.queue, []
            try:
                await self._insert([e for item in batch for e in item.events],
                                   [a for item in batch for a in item.ai_logs])
            except CONNECTION_ERRORS as exc:  # nobody's fault: every zone hears it at once
                for item in batch:
                    _answer(item.future, exc)
            except Exception:  # noqa: BLE001 - a row PostgreSQL refuses
                for item in batch:
                    _answer(item.future, await self._one_by_one(item))
            else:
                for item in batch:
                    _answer(item.future, None)

    async def _one_by_one(self, item: _Written) -> Exception | None:
        error = None
        for events, ai_logs in [([e], []) for e in item.events] + [([], [a]) for a in item.ai_logs]:
            try:
                await self._insert(events, ai_logs)
            except Exception as exc:  # noqa: BLE001 - this row's own
                error = error or exc
        return error

    async def _insert(self, events: list[tuple[int, str, str]], ai_logs: list[tuple[int, str, str]]) -> None:
        await self.db.execute(_WRITE, [e[0] for e in events], [e[1] for e in events], [e[2] for e in events],
                              [a[0] for a in ai_logs], [a[1] for a in ai_logs], [a[2] for a in ai_logs])


def _seen(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _answer(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # its zone stopped waiting
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class RefusalTracker:
    """Consecutive cycles each (zone, metric) correction has been refused for a persistent reason."""

    def __init__(self):
        self.counts: dict[tuple[int, str], tuple[str, int]] = {}

    def refused(self, zone_id: int, metric: str, reason: str) -> int:
        if reason not in PERSISTENT_REASONS:
            return 0
        previous = self.counts.get((zone_id, metric))
        count = previous[1] + 1 if previous else 1
        self.counts[(zone_id, metric)] = (reason, count)
        return count

    def cleared(self, zone_id: int, metric: str) -> None:
        self.counts.pop((zone_id, metric), None)


@dataclass
class Services:
    """The engine-wide things a zone context needs."""
    db: Database
    mqtt: MqttClient
    topics: Topics
    settings: Settings
    options: ServiceSettings
    refusals: RefusalTracker = field(default_factory=RefusalTracker)
    skip_reasons: dict[tuple[int, str], str] = field(default_factory=dict)  # last *_CORRECTION_SKIPPED reason
    conditions: dict[tuple[int, str], bool] = field(default_factory=dict)   # zone conditions for transition events
    events: EventWriter = field(init=False)

    def __post_init__(self) -> None:
        self.events = EventWriter(self.db)


@dataclass
class ZoneContext:
    zone: ZoneData
    services: Services
    now: dt.datetime                 # naive UTC, the cycle's clock
    gh_uid: str
    timezone: str | None
    targets: dict[str, Any] = field(default_factory=dict)
    events_written: set[str] = field(default_factory=set)
    pending_events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # written by `flush`
    pending_ai_logs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # what happened, for tests and debugging
    health: tuple[float, str] | None = None

    @property
    def options(self) -> ServiceSettings:
        return self.services.options

    @property
    def db(self) -> Database:
        return self.services.db

    def fresh(self, metric: str) -> float | None:
        """The zone's freshest reading of `metric` if younger than TELEMETRY_MAX_AGE_MIN, else None."""
        reading = self.zone.telemetry.get(metric)
        max_age = dt.timedelta(minutes=self.services.settings.telemetry_max_age_min)
        if reading is None or reading.updated_at is None or self.now - reading.updated_at > max_age:
            return None
        return reading.value

    def local_now(self) -> dt.datetime:
        """The cycle's time on the greenhouse's wall clock (UTC when the zone has no valid timezone)."""
        tz, known = zone_info(self.timezone)
        if not known and self.timezone not in _BAD_TIMEZONES:
            _BAD_TIMEZONES.add(self.timezone)
            log.warning("unknown_timezone_using_utc", extra={"zone_id": self.zone.id, "timezone": self.timezone})
        return self.now.replace(tzinfo=dt.timezone.utc).astimezone(tz)

    # -- commands -------------------------------------------------------------------------
    async def command(self, node: Node, channel: str, cmd: str, params: dict[str, Any], metric: str) -> str:
        """Publish through common.commands; CommandError when refused by validation, CommandPublishError
        when the broker is not reachable (checked first, so no row is left `pending` for nothing)."""
        if not self.services.mqtt.connected:
            raise CommandPublishError("MQTT broker is not connected")
        issued = await issue_command(self.db, self.services.mqtt, self.services.topics, gh_uid=self.gh_uid,
                                     zone_id=self.zone.id, node_uid=node.uid, channel=channel, cmd=cmd,
                                     params=params, source="automation")
        m.COMMANDS_SENT.labels(str(self.zone.id), metric).inc()
        # later controllers of this cycle see it as open and recent
        self.zone.commands.append(CommandRow(node.id, channel, cmd, params, issued.status, self.now))
        self.log.append(f"command:{cmd}:{channel}")
        return issued.cmd_id

    # -- events ---------------------------------------------------------------------------
    async def event(self, event_type: str, details: dict[str, Any]) -> bool:
        """Queue the event for `flush`; True when queued (not written already this cycle)."""
        if event_type in self.events_written:
            return False
        self.events_written.add(event_type)
        self.pending_events.append((event_type, details))
        self.log.append(f"event:{event_type}")
        return True

    async def ai_log(self, action: str, details: dict[str, Any]) -> None:
        self.pending_ai_logs.append((action, details))

    def flush(self) -> asyncio.Future | None:
        """Submit the zone's queued events and ai_logs to the EventWriter (the engine calls it once the
        zone's controllers are done, whether they succeeded or not); the future of their write, None
        when there was nothing to write. Raises when a row cannot even be serialised, after
        submitting the others."""
        events, logs = self.pending_events, self.pending_ai_logs
        if not events and not logs:
            return None
        self.pending_events, self.pending_ai_logs = [], []
        error: Exception | None = None

        def rows(queued: list[tuple[str, Any]]) -> list[tuple[int, str, str]]:
            nonlocal error
            out = []
            for kind, details in queued:
                try:
                    out.append((self.zone.id, kind, _dumps(details)))
                except TypeError as exc:  # this row only: the zone's others are still written
                    error = error or exc
            return out

        written = self.services.events.submit(rows([(t, d or {}) for t, d in events]), rows(logs))
        if error is not None:
            written.add_done_callback(_seen)  # nobody awaits it: the error raised here is the one told
            raise error
        return written

    # -- alerts ---------------------------------------------------------------------------
    async def alert(self, alert_type: str, details: dict[str, Any], match: dict[str, Any] | None = None) -> bool:
        """Open the alert (ALERT_CREATED) or refresh the details of the ACTIVE one; True when created.
        An ACTIVE one the snapshot shows with these very details is left as it is."""
        active = min(self._active(alert_type, match), key=lambda a: a.id, default=None)
        if active is not None and active.details == details:
            self.log.append(f"alert:{alert_type}")
            return False
        async with self.db.pool.acquire() as conn:
            _, created = await ensure_alert(conn, zone_id=self.zone.id, alert_type=alert_type,
                                            details=details, match=match)
        self.log.append(f"alert:{alert_type}")
        return created

    def _active(self, alert_type: str, match: dict[str, Any] | None) -> list[AlertRow]:
        """The snapshot's ACTIVE alerts of (type, match); `ensure_alert` refreshes the oldest."""
        if not self.zone.alerts:  # most zones, every cycle
            return []
        return [a for a in self.zone.active_alerts(alert_type)
                if all(a.details.get(k) == v for k, v in (match or {}).items())]

    def has_alert(self, alert_type: str, match: dict[str, Any] | None = None) -> bool:
        return bool(self._active(alert_type, match))

    async def resolve(self, alert_type: str, match: dict[str, Any] | None = None) -> bool:
        if not self.has_alert(alert_type, match):
            return False
        async with self.db.pool.acquire() as conn:
            ids = await resolve_alerts(conn, zone_id=self.zone.id, alert_type=alert_type, match=match)
        if ids:
            self.log.append(f"resolved:{alert_type}")
            resolved = set(ids)
            self.zone.alerts = [dataclasses.replace(a, active=False) if a.id in resolved else a
                                for a in self.zone.alerts]
        return bool(ids)

    async def set_alert(self, alert_type: str, active: bool, details: dict[str, Any],
                        match: dict[str, Any] | None = None) -> None:
        """Alert while a condition holds, resolve once it is gone."""
        if active:
            await self.alert(alert_type, details, match)
        else:
            await self.resolve(alert_type, match)

    async def water_low(self, level: float) -> None:
        """Level under 0.2: WATER_LEVEL_LOW; under 0.15 also DRY_RUN (a pump must not start). Both are
        resolved by `water_recovered` once a fresh level is back."""
        await self.alert("WATER_LEVEL_LOW", {"water_level": level, "message": "water level below 0.2"})
        if level < 0.15:
            await self.alert("DRY_RUN", {"water_level": level, "raised_by": "automation-engine",
                                         "message": "water level below 0.15: pumps must not run dry"},
                             match={"raised_by": "automation-engine"})

    async def water_recovered(self) -> None:
        """Resolve the water alerts once a fresh level is back at 0.2 (before any pump controller runs)."""
        level = self.fresh("WATER_LEVEL")
        if level is not None and level >= 0.2:
            await self.resolve("WATER_LEVEL_LOW")
            await self.resolve("DRY_RUN", {"raised_by": "automation-engine"})

    async def transition(self, condition: str, active: bool, event_type: str, details: dict[str, Any]) -> bool:
        """Write `event_type` when `condition` becomes true (not while it stays true); True when written."""
        key = (self.zone.id, condition)
        was = self.services.conditions.get(key, False)
        self.services.conditions[key] = active
        if active and not was:
            return await self.event(event_type, details)
        return False

    # -- refusals -------------------------------------------------------------------------
    async def refuse(self, metric: str, reason: str, details: dict[str, Any]) -> None:
        m.REFUSALS.labels(metric, reason).inc()
        self.log.append(f"refused:{metric}:{reason}")
        cycles = self.services.refusals.refused(self.zone.id, metric, reason)
        if cycles >= self.options.refusal_alert_cycles:
            await self.alert(DOSING_BLOCKED, {**details, "metric": metric, "reason": reason, "cycles": cycles,
                                              "message": f"{metric} correction refused for {cycles} cycles: {reason}"},
                             match={"metric": metric})

    async def unblocked(self, metric: str) -> None:
        self.services.refusals.cleared(self.zone.id, metric)
        await self.resolve(DOSING_BLOCKED, {"metric": metric})
