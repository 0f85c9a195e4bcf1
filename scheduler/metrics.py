"""The scheduler's Prometheus metrics (contract §9.3 names plus `scheduler_*`).

Defined through `_metric`, which hands back the already registered collector when this module is
imported a second time in one process (the test run re-imports service modules).
"""
from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram


def _metric(kind, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs):
    existing = REGISTRY._names_to_collectors.get(name)  # noqa: SLF001 - no public lookup by name
    if existing is not None:
        return existing
    return kind(name, doc, list(labels), **kwargs)


ACTIVE_SCHEDULES = _metric(Gauge, "active_schedules", "Schedule items loaded by the last tick")
SCHEDULE_EXECUTIONS = _metric(Counter, "schedule_executions_total", "Schedule firings executed",
                              ("zone_id", "task_type"))
ZONES_LOADED = _metric(Gauge, "scheduler_zones_loaded", "Zones with an active recipe seen by the last tick")
FIRINGS = _metric(Counter, "scheduler_firings_total", "Firings claimed and executed, by kind and outcome",
                  ("kind", "outcome"))
MISSED = _metric(Counter, "scheduler_missed_total", "Scheduled times older than the catch-up window, not fired",
                 ("kind",))
DUPLICATES = _metric(Counter, "scheduler_duplicate_claims_total",
                     "Firings already claimed by a previous tick, run or replica", ("kind",))
BAD_SPECS = _metric(Counter, "scheduler_bad_specs_total", "Schedule specs rejected (reported once each)",
                    ("key",))
TICK_SECONDS = _metric(Histogram, "scheduler_tick_seconds", "Duration of one scheduler tick",
                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TICK_ERRORS = _metric(Counter, "scheduler_tick_errors_total", "Ticks that failed (database down, ...)")
TICK_SKIPPED = _metric(Counter, "scheduler_ticks_skipped_total", "Ticks skipped because the broker was not connected")
ZONE_ERRORS = _metric(Counter, "scheduler_zone_errors_total", "Firings that raised, by kind", ("kind",))
FOLLOWUPS = _metric(Counter, "scheduler_followups_total", "Follow-up steps run (dry-run check, finish)",
                    ("kind",))
WATER_TRANSITIONS = _metric(Counter, "scheduler_water_change_transitions_total",
                            "Water-change state transitions", ("to_state",))
