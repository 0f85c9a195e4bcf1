"""The scheduler's Prometheus metrics (contract §9.3 names plus `scheduler_*`)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ACTIVE_SCHEDULES = Gauge("active_schedules", "Schedule items loaded by the last tick")
SCHEDULE_EXECUTIONS = Counter("schedule_executions_total", "Schedule firings executed", ["zone_id", "task_type"])
ZONES_LOADED = Gauge("scheduler_zones_loaded", "Zones with an active recipe seen by the last tick")
FIRINGS = Counter("scheduler_firings_total", "Firings claimed and executed, by kind and outcome", ["kind", "outcome"])
MISSED = Counter("scheduler_missed_total", "Scheduled times older than the catch-up window, not fired", ["kind"])
DUPLICATES = Counter("scheduler_duplicate_claims_total", "Firings already claimed by a previous tick, run or replica",
                     ["kind"])
BAD_SPECS = Counter("scheduler_bad_specs_total", "Schedule specs rejected (reported once each)", ["key"])
TICK_SECONDS = Histogram("scheduler_tick_seconds", "Duration of one scheduler tick",
                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TICK_ERRORS = Counter("scheduler_tick_errors_total", "Ticks that failed (database down, ...)")
TICK_SKIPPED = Counter("scheduler_ticks_skipped_total", "Ticks skipped because the broker was not connected")
ZONE_ERRORS = Counter("scheduler_zone_errors_total", "Firings that raised, by kind", ["kind"])
FOLLOWUPS = Counter("scheduler_followups_total", "Follow-up steps run (dry-run check, finish)", ["kind"])
WATER_TRANSITIONS = Counter("scheduler_water_change_transitions_total", "Water-change state transitions",
                            ["to_state"])
