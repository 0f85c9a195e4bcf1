"""Safety gates shared by every controller that runs a pump (contract §4.3 `can_run_pump`)
and the sensor checks in front of every correction. Each returns a refusal reason or None."""
from __future__ import annotations

import datetime as dt
import statistics

from snapshot import PHYSICAL_RANGE, PUMP_FAULT_CODES, Node, Reading, ZoneData

WATER_LEVEL_OK = 0.2      # below: no dosing / irrigation (alert WATER_LEVEL_LOW)
WATER_LEVEL_DRY = 0.15    # below: no pump at all (can_run_pump)
FAULTS_IN_WINDOW = 3      # overcurrent / no-flow / dry-run alerts per pump channel in 30 min
# A reading is judged against the median of the samples before it (at most REFERENCE_SAMPLES of the
# last REFERENCE_WINDOW): a spike, or two in a row, cannot move a median of several. With fewer than
# MIN_REFERENCE samples there is nothing to judge it by, and it is not acted on.
REFERENCE_SAMPLES = 9
MIN_REFERENCE = 3
REFERENCE_WINDOW = dt.timedelta(minutes=15)  # a probe polled every 5 minutes still has its 3 samples
# A reading is confirmed when the sample before it agrees within this much.
CONFIRM_TOLERANCE = {"PH": 0.1, "EC": 0.1}
# A sensor whose readings stay within this much of each other for STUCK_MIN_MINUTES is stuck (a live
# probe's noise is larger; a frozen one repeats one value).
STUCK_TOLERANCE = {"PH": 0.005, "EC": 0.005}
OPEN_STATUSES = ("pending", "sent")


def find_actuators(zone: ZoneData, channels: tuple[str, ...], node_types: tuple[str, ...] = (),
                   contains: tuple[str, ...] = ()) -> list[tuple[Node, str]]:
    """Every (node, channel) that is one of `channels`, or on a node of a type in `node_types` has a
    name containing one of `contains`; online nodes first, then in the order of `channels`."""
    found = [(node, name) for node in zone.nodes for name in node.channels
             if name in channels or (node.type in node_types and any(w in name.lower() for w in contains))]
    found.sort(key=lambda item: (not item[0].online,
                                 channels.index(item[1]) if item[1] in channels else len(channels)))
    return found


def find_actuator(zone: ZoneData, channels: tuple[str, ...], node_types: tuple[str, ...] = (),
                  contains: tuple[str, ...] = ()) -> tuple[Node, str] | None:
    """The preferred one of `find_actuators`, or None."""
    found = find_actuators(zone, channels, node_types, contains)
    return found[0] if found else None


def water_level(zone: ZoneData, now: dt.datetime, max_age: dt.timedelta) -> float | None:
    reading = zone.telemetry.get("WATER_LEVEL")
    if reading is None or reading.updated_at is None or now - reading.updated_at > max_age:
        return None
    return reading.value


def node_fresh_at(zone: ZoneData, node: Node) -> dt.datetime | None:
    times = [r.updated_at for r in zone.telemetry.values() if r.node_id == node.id and r.updated_at]
    if node.last_seen_at:
        times.append(node.last_seen_at)
    return max(times) if times else None


def open_command(zone: ZoneData, node: Node, channel: str) -> bool:
    return any(c.status in OPEN_STATUSES and c.node_id == node.id and c.channel == channel for c in zone.commands)


def can_run_pump(zone: ZoneData, node: Node, channel: str, now: dt.datetime, *, telemetry_max_age: dt.timedelta,
                 water_max_age: dt.timedelta, fault_window: dt.timedelta) -> str | None:
    if not node.online:
        return "node_offline"
    fresh = node_fresh_at(zone, node)
    if fresh is None or now - fresh > telemetry_max_age:
        return "node_silent"
    if any(a.active and a.code in PUMP_FAULT_CODES for a in zone.alerts):
        return "pump_fault_alert"
    level = water_level(zone, now, water_max_age)
    if level is not None and level < WATER_LEVEL_DRY:
        return "dry_run"
    faults = sum(1 for a in zone.alerts if a.code in ("biz_overcurrent", "biz_no_flow", "biz_dry_run")
                 and a.details.get("pump_channel") == channel and now - a.created_at <= fault_window)
    if faults >= FAULTS_IN_WINDOW:
        return "pump_fault_count"
    if open_command(zone, node, channel):
        return "pending_command"
    return None


def reading_problem(zone: ZoneData, metric: str, reading: Reading, now: dt.datetime, *, max_age: dt.timedelta,
                    max_rate_per_min: float, stuck_min_samples: int, settle: dt.timedelta) -> str | None:
    """stale / implausible value / implausible rate (jump) / unconfirmed / stuck sensor, else None."""
    if reading.updated_at is None or now - reading.updated_at > max_age:
        return "stale_reading"
    lo, hi = PHYSICAL_RANGE.get(metric, (float("-inf"), float("inf")))
    if not lo < reading.value < hi:
        return "implausible_value"
    earlier = [(ts, v) for ts, v in zone.samples.get(metric, [])
               if reading.updated_at - REFERENCE_WINDOW <= ts < reading.updated_at][:REFERENCE_SAMPLES]
    if len(earlier) < MIN_REFERENCE:
        return "unconfirmed_reading"
    reference = statistics.median_low([v for _, v in earlier])
    reference_ts = sorted(ts for ts, _ in earlier)[(len(earlier) - 1) // 2]
    minutes = max((reading.updated_at - reference_ts).total_seconds() / 60.0, 1.0)
    if abs(reading.value - reference) / minutes > max_rate_per_min:
        return "implausible_rate"
    if abs(reading.value - earlier[0][1]) > CONFIRM_TOLERANCE.get(metric, float("inf")):
        return "unconfirmed_reading"
    tolerance = STUCK_TOLERANCE.get(metric, 0.0)
    if _flat(zone.flat.get(metric), stuck_min_samples, tolerance):
        return "stuck_sensor"
    # A probe that did not move at all through a dose and its settling time is stuck too: this catches a
    # probe stuck from the start after one dose instead of after STUCK_MIN_MINUTES.
    dosed = zone.after_dose.get(metric)
    if dosed is not None and now - dosed.dose_at >= settle and _flat(dosed.span, stuck_min_samples, tolerance):
        return "stuck_sensor"
    return None


def _flat(span, min_samples: int, tolerance: float) -> bool:
    return (span is not None and span.covered and span.count >= min_samples and span.low is not None
            and span.high - span.low <= tolerance)


def improving(zone: ZoneData, metric: str, reading: Reading, target: float) -> bool:
    """The original trend rule: with ≥3 samples in 2 h before the reading, the deviation from target
    shrinks by > 0.05."""
    current = reading.value
    history = [s for s in zone.samples.get(metric, []) if reading.updated_at is None or s[0] < reading.updated_at][:3]
    if len(history) < 3:
        return False
    values = [v for _, v in reversed(history)] + [current]
    deviations = [abs(v - target) for v in values]
    half = len(deviations) // 2
    first = sum(deviations[:half]) / half
    second = sum(deviations[half:]) / (len(deviations) - half)
    return first - second > 0.05


def last_time(zone: ZoneData, event_types: tuple[str, ...], channels: tuple[str, ...]) -> dt.datetime | None:
    """The latest of the zone's events of `event_types` and commands to `channels` (any source)."""
    times = [zone.events[t][0] for t in event_types if t in zone.events]
    times += [c.created_at for c in zone.commands if c.channel in channels and c.cmd in ("dose", "run_pump")]
    return max(times) if times else None


def pumped_last_hour(zone: ZoneData, node: Node, channel: str, now: dt.datetime) -> tuple[int, float]:
    """(commands, ml) sent to this pump in the last hour."""
    ml_per_second = _ml_per_second(node.channels.get(channel) or {})
    count, ml = 0, 0.0
    for c in zone.commands:
        if c.node_id != node.id or c.channel != channel or now - c.created_at > dt.timedelta(hours=1):
            continue
        if c.cmd == "dose":
            count += 1
            ml += float(c.params.get("dose_ml") or 0)
        elif c.cmd == "run_pump":
            count += 1
            ml += float(c.params.get("duration_ms") or 0) / 1000.0 * ml_per_second
    return count, ml


def _ml_per_second(config: dict) -> float:
    value = config.get("ml_per_second")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return 1.0


def ml_per_second(node: Node, channel: str) -> float:
    return _ml_per_second(node.channels.get(channel) or {})


def max_duration_ms(node: Node, channel: str, default: int = 5000) -> int:
    limits = (node.channels.get(channel) or {}).get("safe_limits") or {}
    value = limits.get("max_duration_ms") if isinstance(limits, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return default
