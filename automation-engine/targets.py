"""Recipe phase targets (contract §8.1) and the current phase (§8.2)."""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from common.schemas import as_number
from common.timespec import SpecError, parse_window

log = logging.getLogger("automation.targets")

DEFAULT_BANDS = {"ph": 0.2, "ec": 0.2, "temp_air": 0.5, "humidity_air": 3.0}
TOLERANCE_KEYS = {"ph": "ph_tolerance", "ec": "ec_tolerance"}


@dataclass(frozen=True)
class Target:
    value: float
    band: float

    @property
    def low(self) -> float:
        return self.value - self.band

    @property
    def high(self) -> float:
        return self.value + self.band


def target(targets: dict[str, Any], key: str) -> Target | None:
    """Normalise a numeric target: scalar → (v, default band); {min,max} → (mid, half-width);
    {target,tolerance} as given; an explicit `<key>_tolerance` overrides the band."""
    raw = targets.get(key)
    default_band = DEFAULT_BANDS.get(key, 0.0)
    result: Target | None = None
    if isinstance(raw, dict):
        lo, hi = as_number(raw.get("min")), as_number(raw.get("max"))
        if lo is not None and hi is not None and hi >= lo:
            result = Target((lo + hi) / 2, (hi - lo) / 2)
        else:
            value = as_number(raw.get("target", raw.get("value")))
            if value is not None:
                tol = as_number(raw.get("tolerance"))
                result = Target(value, tol if tol is not None and tol >= 0 else default_band)
    else:
        value = as_number(raw)
        if value is not None:
            result = Target(value, default_band)
    if result is None:
        return None
    override = as_number(targets.get(TOLERANCE_KEYS.get(key, f"{key}_tolerance")))
    if override is not None and override >= 0:
        result = Target(result.value, override)
    return result


# ---------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    index: int
    name: str
    duration_hours: float | None
    targets: dict[str, Any]


def due_phase_index(phases: Sequence[Phase], started_at: dt.datetime | None, now: dt.datetime) -> int | None:
    """The phase index elapsed time says the zone should be in, or None (no phases / no start)."""
    if not phases or started_at is None:
        return None
    elapsed_h = (now - started_at).total_seconds() / 3600.0
    cumulative = 0.0
    for phase in phases:
        if phase.duration_hours is None:  # open-ended: never ends
            return phase.index
        cumulative += phase.duration_hours
        if cumulative > elapsed_h:
            return phase.index
    return phases[-1].index


# ---------------------------------------------------------------------------------------
# Time windows (contract §8.11)
# ---------------------------------------------------------------------------------------
ALWAYS_OFF = (dt.time(0, 0), None)  # light_hours 0: lights stay off
def light_window(targets: dict[str, Any]) -> tuple[dt.time, dt.time] | None:
    """Photoperiod from `light_hours` (alias `photoperiod`): int N → 06:00..06:00+N h,
    "HH:MM-HH:MM", or {start,end}. None when absent or invalid."""
    raw = targets.get("light_hours", targets.get("photoperiod"))
    if raw is None:
        return None
    if isinstance(raw, dict) or isinstance(raw, str) and "-" in raw:
        try:
            window = parse_window(raw)
        except SpecError:
            return None
        return window.start, window.end
    hours = as_number(raw)
    if hours is None or not 0 <= hours <= 24:
        return None
    if hours == 0:
        return ALWAYS_OFF
    minutes = int(round(hours * 60))
    end_minutes = (6 * 60 + minutes) % (24 * 60)
    if minutes >= 24 * 60:
        return (dt.time(0, 0), dt.time(23, 59))
    return dt.time(6, 0), dt.time(end_minutes // 60, end_minutes % 60)


def in_window(window: tuple[dt.time, dt.time], local: dt.time) -> bool:
    """Inclusive bounds; end < start crosses midnight."""
    start, end = window
    if end is None:
        return False
    if start <= end:
        return start <= local <= end
    return local >= start or local <= end
