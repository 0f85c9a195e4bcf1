"""Active schedules: one read per tick of every eligible zone's current phase targets.

A zone is eligible when it has a recipe instance, a greenhouse and `lower(status)` in
online / warning / running (contract §8.10). Specs are parsed once per distinct value (cached),
so a steady tick over thousands of zones costs little more than the read itself.
"""
from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, field
from typing import Any

import orjson

from common.db import Database
from timespec import SpecError, Window, parse_times, parse_window, zone_info

LOAD_SQL = """
SELECT z.id AS zone_id, g.uid AS gh_uid, g.timezone, z.capabilities, z.settings, z.water_state,
       z.solution_started_at, p.targets
  FROM zones z
  JOIN greenhouses g ON g.id = z.greenhouse_id
  JOIN LATERAL (SELECT i.recipe_id, i.current_phase_index FROM zone_recipe_instances i
                 WHERE i.zone_id = z.id ORDER BY i.id DESC LIMIT 1) i ON true
  LEFT JOIN LATERAL (SELECT rp.targets FROM recipe_phases rp
                      WHERE rp.recipe_id = i.recipe_id AND rp.phase_index = i.current_phase_index
                      ORDER BY rp.id LIMIT 1) p ON true
 WHERE lower(z.status) IN ('online', 'warning', 'running')
 ORDER BY z.id
"""


@dataclass(frozen=True, slots=True)
class BadSpec:
    zone_id: int
    key: str
    value: Any
    reason: str

    @property
    def identity(self) -> tuple:
        return (self.zone_id, self.key, orjson.dumps(self.value, option=orjson.OPT_SORT_KEYS, default=str))


@dataclass(slots=True)
class ZoneSchedule:
    zone_id: int
    gh_uid: str
    tz: dt.tzinfo
    capabilities: dict
    settings: dict
    water_state: str
    solution_started_at: dt.datetime | None
    irrigation_times: tuple[dt.time, ...] = ()
    irrigation_duration_sec: int = 60
    lighting: Window | None = None
    light_intensity: float | None = None
    bad_specs: list[BadSpec] = field(default_factory=list)

    @property
    def item_count(self) -> int:
        return len(self.irrigation_times) + (self.lighting is not None) + bool(water_change_settings(self))


def water_change_settings(zone: "ZoneSchedule") -> dict | None:
    """`settings.water_cycle.water_change` when enabled, else None (the cycle is off by default)."""
    cycle = zone.settings.get("water_cycle") if isinstance(zone.settings, dict) else None
    change = cycle.get("water_change") if isinstance(cycle, dict) else None
    if isinstance(change, dict) and change.get("enabled") is True:
        return change
    return None


def _cache_key(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str)


@functools.lru_cache(maxsize=4096)
def _times(raw: bytes) -> tuple[dt.time, ...] | SpecError:
    try:
        return parse_times(orjson.loads(raw))
    except SpecError as exc:
        return exc


@functools.lru_cache(maxsize=4096)
def _window(raw: bytes) -> Window | SpecError:
    try:
        return parse_window(orjson.loads(raw))
    except SpecError as exc:
        return exc


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and value == value and value >= 1 and float(value).is_integer():
        return int(value)
    return None


def build_zone(row: Any, default_duration_sec: int) -> ZoneSchedule:
    tz, tz_known = zone_info(row["timezone"])
    zone = ZoneSchedule(
        zone_id=row["zone_id"], gh_uid=row["gh_uid"], tz=tz,
        capabilities=row["capabilities"] if isinstance(row["capabilities"], dict) else {},
        settings=row["settings"] if isinstance(row["settings"], dict) else {},
        water_state=row["water_state"] or "NORMAL_RECIRC",
        solution_started_at=row["solution_started_at"],
        irrigation_duration_sec=default_duration_sec,
    )
    if not tz_known:
        zone.bad_specs.append(BadSpec(zone.zone_id, "timezone", row["timezone"], "unknown timezone, using UTC"))
    targets = row["targets"] if isinstance(row["targets"], dict) else {}
    if targets.get("irrigation_schedule") not in (None, "", []):
        parsed = _times(_cache_key(targets["irrigation_schedule"]))
        if isinstance(parsed, SpecError):
            zone.bad_specs.append(BadSpec(zone.zone_id, "irrigation_schedule", targets["irrigation_schedule"],
                                          str(parsed)))
        else:
            zone.irrigation_times = parsed
    if targets.get("irrigation_duration_sec") is not None:
        duration = _positive_int(targets["irrigation_duration_sec"])
        if duration is None:
            zone.bad_specs.append(BadSpec(zone.zone_id, "irrigation_duration_sec", targets["irrigation_duration_sec"],
                                          f"not an integer >= 1, using {default_duration_sec}"))
        else:
            zone.irrigation_duration_sec = duration
    if targets.get("lighting_schedule") not in (None, ""):
        parsed = _window(_cache_key(targets["lighting_schedule"]))
        if isinstance(parsed, SpecError):
            zone.bad_specs.append(BadSpec(zone.zone_id, "lighting_schedule", targets["lighting_schedule"],
                                          str(parsed)))
        else:
            zone.lighting = parsed
    intensity = targets.get("light_intensity")
    if isinstance(intensity, (int, float)) and not isinstance(intensity, bool) and 0 <= intensity <= 100:
        zone.light_intensity = float(intensity)
    return zone


async def load_schedules(db: Database, default_duration_sec: int) -> list[ZoneSchedule]:
    rows = await db.fetch(LOAD_SQL)
    return [build_zone(row, default_duration_sec) for row in rows]
