"""The batched reads of one cycle: every per-zone fact the controllers need, for all zones at
once (one query per kind, never one per zone)."""
from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson

from common.db import CONNECTION_ERRORS, Database
from common.metric_ranges import RANGES
from targets import Phase

log = logging.getLogger("automation.snapshot")

ELIGIBLE_STATUSES = ["online", "warning", "running"]  # contract §8.10
TRACKED_EVENTS = ["PH_CORRECTED", "EC_DOSING", "IRRIGATION_STARTED", "RECIRCULATION_CYCLE"]
PUMP_FAULT_CODES = ["biz_overcurrent", "biz_no_flow", "biz_dry_run", "biz_pump_stuck_on"]
DOSING_METRICS = ["PH", "EC"]
HEALTH_WINDOW = dt.timedelta(hours=2)
# What a sensor of the metric can physically report (the shared table the history-logger refuses
# readings by); statistics and gates ignore anything outside, so a value that reached the database
# anyway (written before, or by someone else) cannot overflow stddev_samp nor fake a jump.
PHYSICAL_RANGE = {metric: RANGES[metric] for metric in DOSING_METRICS}
# What doses a metric: its correction events and its pump channels (controllers/dosing.py's PH / EC).
DOSE_SOURCES = {"PH": (("PH_CORRECTED",), ("pump_acid", "pump_base")), "EC": (("EC_DOSING",), ("pump_nutrient",))}
BEFORE_DOSE = dt.timedelta(minutes=5)  # how far back the last reading before a dose may be
READ_SETTINGS = "SET LOCAL work_mem = '64MB'; SET LOCAL jit = off"


@dataclass(frozen=True)
class Reading:
    value: float
    updated_at: dt.datetime | None
    node_id: int
    channel: str | None


@dataclass
class Node:
    id: int
    uid: str
    type: str
    status: str
    last_seen_at: dt.datetime | None
    channels: dict[str, dict[str, Any]] = field(default_factory=dict)  # channel → config (may be {})

    @property
    def online(self) -> bool:
        return self.status.lower() == "online"


@dataclass(frozen=True)
class CommandRow:
    node_id: int | None
    channel: str | None
    cmd: str
    params: dict[str, Any]
    status: str
    created_at: dt.datetime


@dataclass(frozen=True)
class AlertRow:
    id: int
    type: str
    code: str | None
    details: dict[str, Any]
    active: bool
    created_at: dt.datetime


@dataclass(frozen=True)
class FlatSpan:
    """The samples of one metric in the stuck-sensor window [now − STUCK_MIN_MINUTES, now]."""
    count: int
    low: float | None
    high: float | None
    covered: bool  # the sensor reported before the window began: the window is fully observed


@dataclass(frozen=True)
class AfterDose:
    """The samples of one metric from the last one before its last dose until now."""
    dose_at: dt.datetime
    span: FlatSpan  # covered: there is a sample from before the dose


def last_dose(zone: "ZoneData", metric: str) -> dt.datetime | None:
    """The latest correction event or pump command (any source) of `metric`."""
    events, channels = DOSE_SOURCES[metric]
    times = [zone.events[t][0] for t in events if t in zone.events]
    times += [c.created_at for c in zone.commands if c.channel in channels and c.cmd in ("dose", "run_pump")]
    return max(times, default=None)


@dataclass
class ZoneData:
    id: int
    name: str
    status: str
    capabilities: dict[str, Any] | None
    settings: dict[str, Any] | None
    gh_uid: str | None
    timezone: str | None
    instance_id: int
    recipe_id: int
    current_phase_index: int
    started_at: dt.datetime | None
    phases: list[Phase] = field(default_factory=list)
    telemetry: dict[str, Reading] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    events: dict[str, tuple[dt.datetime, dict[str, Any]]] = field(default_factory=dict)
    alerts: list[AlertRow] = field(default_factory=list)
    commands: list[CommandRow] = field(default_factory=list)
    samples: dict[str, list[tuple[dt.datetime, float]]] = field(default_factory=dict)  # newest first
    stats: dict[str, tuple[float | None, int, dt.datetime | None]] = field(default_factory=dict)  # (sd, n, first ts)
    flat: dict[str, FlatSpan] = field(default_factory=dict)
    after_dose: dict[str, AfterDose] = field(default_factory=dict)
    read_error: Exception | None = None  # this zone's facts could not be read: it is skipped this cycle

    def clear_facts(self) -> None:
        for name in ("telemetry", "events", "samples", "stats", "flat", "after_dose"):
            getattr(self, name).clear()
        self.nodes, self.alerts, self.commands = [], [], []

    def capability(self, name: str) -> bool:
        return bool(self.capabilities and self.capabilities.get(name) is True)

    def active_alerts(self, alert_type: str | None = None) -> list[AlertRow]:
        return [a for a in self.alerts if a.active and (alert_type is None or a.type == alert_type)]

    def node(self, node_id: int | None) -> Node | None:
        return next((n for n in self.nodes if n.id == node_id), None)


def _json(text: str | None, what: str) -> Any:
    """A jsonb column read as text, decoded here so one unreadable value fails only its own zone."""
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{what} cannot be read: {exc}") from None


async def _read(db: Database, sql: str, *args: Any) -> list:
    """One batched read, in a transaction of its own that sorts in memory (the default work_mem spills
    10,000 zones' nodes and samples to disk) and skips JIT (compiling these plans takes longer than
    running them). A connection that died is replaced once, as Database.fetch does."""
    for attempt in (1, 2):
        try:
            async with db.transaction() as conn:
                await conn.execute(READ_SETTINGS)
                return await conn.fetch(sql, *args)
        except CONNECTION_ERRORS:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def load_zones(db: Database) -> list[ZoneData]:
    """Eligible zones (recipe instance + status online/warning/running) with their phases. A zone whose
    capabilities, settings or phase targets cannot be decoded gets `read_error` (skipped, counted)."""
    rows = await db.fetch(
        """
        SELECT z.id, z.name, z.status, z.capabilities::text AS capabilities, z.settings::text AS settings,
               g.uid AS gh_uid, g.timezone, i.id AS instance_id, i.recipe_id, i.current_phase_index, i.started_at
          FROM zones z
          JOIN LATERAL (SELECT * FROM zone_recipe_instances ri WHERE ri.zone_id = z.id
                         ORDER BY ri.id DESC LIMIT 1) i ON true
          LEFT JOIN greenhouses g ON g.id = z.greenhouse_id
         WHERE lower(z.status) = ANY($1::text[])
         ORDER BY z.id
        """, ELIGIBLE_STATUSES)
    zones = []
    for r in rows:
        zone = ZoneData(id=r["id"], name=r["name"], status=r["status"], capabilities=None, settings=None,
                        gh_uid=r["gh_uid"], timezone=r["timezone"], instance_id=r["instance_id"],
                        recipe_id=r["recipe_id"], current_phase_index=r["current_phase_index"],
                        started_at=r["started_at"])
        try:
            capabilities, settings = _json(r["capabilities"], "zones.capabilities"), _json(r["settings"], "zones.settings")
        except ValueError as exc:
            zone.read_error = exc
        else:
            zone.capabilities = capabilities if isinstance(capabilities, dict) else None
            zone.settings = settings if isinstance(settings, dict) else None
        zones.append(zone)
    recipe_ids = sorted({z.recipe_id for z in zones})
    if recipe_ids:
        phases: dict[int, list[Phase]] = defaultdict(list)
        unreadable: dict[int, ValueError] = {}
        for r in await db.fetch(
                "SELECT recipe_id, phase_index, name, duration_hours, targets::text AS targets FROM recipe_phases"
                " WHERE recipe_id = ANY($1::bigint[]) ORDER BY recipe_id, phase_index, id", recipe_ids):
            try:
                targets = _json(r["targets"], f"recipe_phases.targets of recipe {r['recipe_id']}")
            except ValueError as exc:
                unreadable[r["recipe_id"]] = exc
                continue
            phases[r["recipe_id"]].append(Phase(r["phase_index"], r["name"], r["duration_hours"],
                                                targets if isinstance(targets, dict) else {}))
        for zone in zones:
            zone.phases = phases.get(zone.recipe_id, [])
            if zone.recipe_id in unreadable and zone.read_error is None:
                zone.read_error = unreadable[zone.recipe_id]
    return zones


async def load_facts(db: Database, zones: list[ZoneData], now: dt.datetime, *, command_window: dt.timedelta,
                     fault_window: dt.timedelta, sample_count: int, stuck_window: dt.timedelta) -> None:
    """Fill every zone's facts in one batch. When the batch fails (one zone's data PostgreSQL or the
    decoder refuses), read zone by zone: a zone whose own read fails gets `read_error` and is skipped,
    the others go on. A lost connection is no zone's fault and is raised."""
    windows = dict(command_window=command_window, fault_window=fault_window, sample_count=sample_count,
                   stuck_window=stuck_window)
    try:
        await _load_facts(db, zones, now, **windows)
        return
    except CONNECTION_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - find the zone(s) it came from
        log.warning("batched_read_failed_reading_zone_by_zone", extra={"error": f"{type(exc).__name__}: {exc}"[:300],
                                                                       "zones": len(zones)})
    limit = asyncio.Semaphore(8)

    async def one(zone: ZoneData) -> None:
        zone.clear_facts()
        async with limit:
            try:
                await _load_facts(db, [zone], now, **windows)
            except CONNECTION_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - this zone only
                zone.clear_facts()
                zone.read_error = exc
    await asyncio.gather(*(one(zone) for zone in zones))


async def _load_facts(db: Database, zones: list[ZoneData], now: dt.datetime, *, command_window: dt.timedelta,
                      fault_window: dt.timedelta, sample_count: int, stuck_window: dt.timedelta) -> None:
    """Every zone's telemetry, nodes, events, alerts, commands, samples, stats and flat spans (one query each)."""
    if not zones:
        return
    ranges = [PHYSICAL_RANGE[m] for m in DOSING_METRICS]
    lows, highs = [r[0] for r in ranges], [r[1] for r in ranges]
    by_id = {z.id: z for z in zones}
    ids = list(by_id)
    dosing_ids = [z.id for z in zones if z.capability("ph_control") or z.capability("ec_control")]
    dosing = set(dosing_ids)
    fetch = functools.partial(_read, db)

    async def telemetry():
        for r in await fetch(
                "SELECT zone_id, node_id, upper(metric_type) AS metric, channel, value, updated_at"
                " FROM telemetry_last WHERE zone_id = ANY($1::bigint[]) AND value IS NOT NULL", ids):
            zone = by_id[r["zone_id"]]
            current = zone.telemetry.get(r["metric"])
            if current is None or (r["updated_at"] or dt.datetime.min) > (current.updated_at or dt.datetime.min):
                zone.telemetry[r["metric"]] = Reading(r["value"], r["updated_at"], r["node_id"], r["channel"])

    async def nodes():
        # One row per node, its channels in arrays (configs in one jsonb array, decoded like any jsonb):
        # 10,000 zones' channels are 50,000 rows otherwise.
        for r in await fetch(
                "SELECT n.id, n.zone_id, n.uid, n.type, n.status, n.last_seen_at,"
                "       array_agg(nc.channel ORDER BY nc.id) FILTER (WHERE nc.id IS NOT NULL) AS channels,"
                "       jsonb_agg(nc.config ORDER BY nc.id) FILTER (WHERE nc.id IS NOT NULL) AS configs"
                " FROM nodes n LEFT JOIN node_channels nc ON nc.node_id = n.id"
                " WHERE n.zone_id = ANY($1::bigint[]) GROUP BY n.id ORDER BY n.zone_id, n.id", ids):
            node = Node(r["id"], r["uid"], (r["type"] or "").lower(), r["status"] or "offline", r["last_seen_at"])
            node.channels = {channel: config if isinstance(config, dict) else {}
                             for channel, config in zip(r["channels"] or (), r["configs"] or ())}
            by_id[r["zone_id"]].nodes.append(node)

    async def events():
        for r in await fetch(
                """
                SELECT z.id AS zone_id, t.type, e.created_at, e.details
                  FROM unnest($1::bigint[]) z(id) CROSS JOIN unnest($2::text[]) t(type)
                  CROSS JOIN LATERAL (SELECT created_at, details FROM zone_events ev
                                       WHERE ev.zone_id = z.id AND ev.type = t.type
                                       ORDER BY ev.created_at DESC, ev.id DESC LIMIT 1) e
                """, ids, TRACKED_EVENTS):
            by_id[r["zone_id"]].events[r["type"]] = (r["created_at"], r["details"] or {})

    async def alerts():
        for r in await fetch(
                "SELECT id, zone_id, type, code, details, status, created_at FROM alerts"
                " WHERE zone_id = ANY($1::bigint[])"
                "   AND (status = 'ACTIVE' OR (created_at >= $2 AND code = ANY($3::text[])))",
                ids, now - fault_window, PUMP_FAULT_CODES):
            by_id[r["zone_id"]].alerts.append(AlertRow(r["id"], r["type"], r["code"], r["details"] or {},
                                                       r["status"] == "ACTIVE", r["created_at"]))

    async def commands():
        for r in await fetch(
                "SELECT zone_id, node_id, channel, cmd, params, status, created_at FROM commands"
                " WHERE zone_id = ANY($1::bigint[]) AND (created_at >= $2 OR status IN ('pending', 'sent'))"
                " ORDER BY created_at, id", ids, now - command_window):
            by_id[r["zone_id"]].commands.append(CommandRow(r["node_id"], r["channel"], r["cmd"], r["params"] or {},
                                                           r["status"], r["created_at"]))

    async def samples():
        if not dosing_ids:
            return
        # One row per (zone, metric), the samples newest first in two arrays ordered alike.
        for r in await fetch(
                """
                SELECT z.id AS zone_id, m.metric, s.ts, s.value
                  FROM unnest($1::bigint[]) z(id) CROSS JOIN unnest($2::text[], $5::float8[], $6::float8[]) m(metric, lo, hi)
                  CROSS JOIN LATERAL (SELECT array_agg(l.ts ORDER BY l.ts DESC, l.value) AS ts,
                                             array_agg(l.value ORDER BY l.ts DESC, l.value) AS value
                                        FROM (SELECT ts, value FROM telemetry_samples ts_
                                               WHERE ts_.zone_id = z.id AND ts_.metric_type = m.metric
                                                 AND ts_.ts >= $3 AND ts_.value BETWEEN m.lo AND m.hi
                                               ORDER BY ts_.ts DESC LIMIT $4) l) s
                 WHERE s.ts IS NOT NULL
                """, dosing_ids, DOSING_METRICS, now - HEALTH_WINDOW, sample_count, lows, highs):
            by_id[r["zone_id"]].samples[r["metric"]] = list(zip(r["ts"], r["value"]))

    async def stats():
        for r in await fetch(
                "SELECT s.zone_id, s.metric_type, stddev_samp(s.value) AS sd, count(s.value) AS n, min(s.ts) AS first_ts"
                " FROM telemetry_samples s JOIN unnest($2::text[], $4::float8[], $5::float8[]) m(metric, lo, hi)"
                "   ON s.metric_type = m.metric"
                " WHERE s.zone_id = ANY($1::bigint[]) AND s.ts >= $3 AND s.value BETWEEN m.lo AND m.hi"
                " GROUP BY s.zone_id, s.metric_type", ids, DOSING_METRICS, now - HEALTH_WINDOW, lows, highs):
            by_id[r["zone_id"]].stats[r["metric_type"]] = (r["sd"], r["n"], r["first_ts"])

    async def flat():
        if not dosing_ids:
            return
        for r in await fetch(
                """
                SELECT z.id AS zone_id, m.metric, w.n, w.low, w.high, b.covered
                  FROM unnest($1::bigint[]) z(id) CROSS JOIN unnest($2::text[], $4::float8[], $5::float8[]) m(metric, lo, hi)
                  CROSS JOIN LATERAL (SELECT count(*) AS n, min(value) AS low, max(value) AS high
                                        FROM telemetry_samples s
                                       WHERE s.zone_id = z.id AND s.metric_type = m.metric AND s.ts >= $3
                                         AND s.value BETWEEN m.lo AND m.hi) w
                  CROSS JOIN LATERAL (SELECT EXISTS (SELECT 1 FROM telemetry_samples s
                                                      WHERE s.zone_id = z.id AND s.metric_type = m.metric
                                                        AND s.ts < $3 AND s.ts >= $3 - $6::interval
                                                        AND s.value BETWEEN m.lo AND m.hi) AS covered) b
                """, dosing_ids, DOSING_METRICS, now - stuck_window, lows, highs, HEALTH_WINDOW):
            by_id[r["zone_id"]].flat[r["metric"]] = FlatSpan(r["n"], r["low"], r["high"], r["covered"])

    await asyncio.gather(telemetry(), nodes(), events(), alerts(), commands(), samples(), stats(), flat())

    # Then, for zones dosed in the last 2 h, the readings since just before the dose (needs events + commands).
    doses = [(z.id, metric, at) for z in zones for metric in DOSING_METRICS
             if z.id in dosing and (at := last_dose(z, metric)) is not None and now - at <= HEALTH_WINDOW]
    if doses:
        for r in await fetch(
                """
                SELECT d.zone_id, d.metric, d.dose_at, w.n, w.low, w.high, p.pre IS NOT NULL AS covered
                  FROM unnest($1::bigint[], $2::text[], $3::timestamp[]) d(zone_id, metric, dose_at)
                  JOIN unnest($4::text[], $5::float8[], $6::float8[]) m(metric, lo, hi) ON m.metric = d.metric
                  CROSS JOIN LATERAL (SELECT max(ts) AS pre FROM telemetry_samples s
                                       WHERE s.zone_id = d.zone_id AND s.metric_type = d.metric AND s.ts < d.dose_at
                                         AND s.ts >= d.dose_at - $7::interval AND s.value BETWEEN m.lo AND m.hi) p
                  CROSS JOIN LATERAL (SELECT count(*) AS n, min(value) AS low, max(value) AS high
                                        FROM telemetry_samples s
                                       WHERE s.zone_id = d.zone_id AND s.metric_type = d.metric
                                         AND s.ts >= p.pre AND s.value BETWEEN m.lo AND m.hi) w
                """, [d[0] for d in doses], [d[1] for d in doses], [d[2] for d in doses], DOSING_METRICS, lows, highs,
                BEFORE_DOSE):
            by_id[r["zone_id"]].after_dose[r["metric"]] = AfterDose(
                r["dose_at"], FlatSpan(r["n"], r["low"], r["high"], r["covered"]))
