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
from common.schemas import as_number
from common.timespec import SpecError, Window, parse_time, parse_times, parse_window, zone_info

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


@dataclass(frozen=True, slots=True)
class WaterChange:
    """`zones.settings.water_cycle.water_change` (contract §8.6 defaults, plus the step limits)."""
    interval_days: float = 7.0
    time_of_day: dt.time = dt.time(9, 0)
    max_solution_age_days: float = 10.0
    trigger_by_ec_drift: bool = True
    ec_drift_threshold: float = 30.0      # percent away from the phase's EC target
    drain_target_level: float = 0.1       # WATER_LEVEL at or below which draining is done
    fill_target_level: float = 0.9        # WATER_LEVEL at or above which filling is done
    drain_timeout_min: float = 30.0
    fill_timeout_min: float = 30.0
    stabilize_min: float = 15.0


_WATER_NUMBERS = {  # field: (lowest, highest)
    "interval_days": (0.01, 365), "max_solution_age_days": (0.01, 365), "ec_drift_threshold": (1, 1000),
    "drain_target_level": (0, 0.9), "fill_target_level": (0.1, 1), "drain_timeout_min": (1, 1440),
    "fill_timeout_min": (1, 1440), "stabilize_min": (0, 1440),
}


def parse_water_change(zone_id: int, raw: dict) -> tuple[WaterChange, list[BadSpec]]:
    """The enabled water-change settings; each bad field is reported and its default used."""
    values: dict[str, Any] = {}
    bad: list[BadSpec] = []
    prefix = "water_cycle.water_change."
    for name, (lo, hi) in _WATER_NUMBERS.items():
        if name not in raw:
            continue
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            bad.append(BadSpec(zone_id, prefix + name, value, f"expected a number from {lo:g} to {hi:g}"))
        else:
            values[name] = float(value)
    if "time_of_day" in raw:
        try:
            values["time_of_day"] = parse_time(raw["time_of_day"])
        except SpecError as exc:
            bad.append(BadSpec(zone_id, prefix + "time_of_day", raw["time_of_day"], str(exc)))
    if "trigger_by_ec_drift" in raw:
        if isinstance(raw["trigger_by_ec_drift"], bool):
            values["trigger_by_ec_drift"] = raw["trigger_by_ec_drift"]
        else:
            bad.append(BadSpec(zone_id, prefix + "trigger_by_ec_drift", raw["trigger_by_ec_drift"],
                               "expected true or false"))
    return WaterChange(**values), bad


def _ec_target(value: Any) -> float | None:
    """The phase's EC target (contract §8.1): a number, {min, max} or {target}."""
    if isinstance(value, dict):
        if "target" in value:
            value = value["target"]
        elif "min" in value and "max" in value:
            try:
                return (float(value["min"]) + float(value["max"])) / 2
            except (TypeError, ValueError):
                return None
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


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
    water_change: WaterChange | None = None   # None: the water-change cycle is off for this zone
    ec_target: float | None = None
    bad_specs: list[BadSpec] = field(default_factory=list)

    @property
    def item_count(self) -> int:
        return len(self.irrigation_times) + (self.lighting is not None) + (self.water_change is not None)


def enabled_water_change(settings: Any) -> dict | None:
    """`settings.water_cycle.water_change` when `enabled` is true, else None (off by default)."""
    cycle = settings.get("water_cycle") if isinstance(settings, dict) else None
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
    number = as_number(value)
    return int(number) if number is not None and number >= 1 and number.is_integer() else None


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
    change = enabled_water_change(zone.settings)
    if change is not None:
        zone.water_change, bad = parse_water_change(zone.zone_id, change)
        zone.bad_specs.extend(bad)
    zone.ec_target = _ec_target(targets.get("ec"))
    intensity = targets.get("light_intensity")
    if isinstance(intensity, (int, float)) and not isinstance(intensity, bool) and 0 <= intensity <= 100:
        zone.light_intensity = float(intensity)
    return zone


async def load_schedules(db: Database, default_duration_sec: int) -> list[ZoneSchedule]:
    rows = await db.fetch(LOAD_SQL)
    return [build_zone(row, default_duration_sec) for row in rows]
