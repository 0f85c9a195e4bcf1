"""automation-engine metrics (contract §9.3 names; the rest prefixed `automation_`).

Defined through `_get` so that importing this module twice in one process (the test runner
re-imports service modules per test file) returns the collectors already registered.
"""
from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram


def _get(kind, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs):
    existing = REGISTRY._names_to_collectors.get(name)  # noqa: SLF001 - the registry has no public lookup
    if existing is not None:
        return existing
    return kind(name, doc, list(labels), **kwargs)


OPTIMAL_CONCURRENCY = _get(Gauge, "optimal_concurrency_zones", "Zones processed in parallel in the last cycle")
ZONE_PROCESSING_TIME = _get(Histogram, "zone_processing_time_seconds", "Time to process one zone",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ZONE_PROCESSING_ERRORS = _get(Counter, "zone_processing_errors_total", "Zones whose processing raised",
                              ("zone_id", "error_type"))
ZONE_CHECKS = _get(Counter, "zone_checks_total", "Zones processed")
COMMANDS_SENT = _get(Counter, "automation_commands_sent_total", "Commands the engine published",
                     ("zone_id", "metric"))
CORRECTIONS = _get(Counter, "automation_corrections_total", "pH/EC corrections published", ("pump", "reason"))
REFUSALS = _get(Counter, "automation_dosing_refusals_total", "Corrections not made because a safety gate refused",
                ("metric", "reason"))
ACTUATIONS = _get(Counter, "automation_actuations_total", "Climate / light / irrigation / recirculation commands",
                  ("controller", "action"))
CYCLE_DURATION = _get(Histogram, "automation_cycle_duration_seconds", "Duration of one full cycle",
                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60))
CYCLE_ZONES = _get(Gauge, "automation_cycle_zones", "Zones in the last cycle", ("state",))
CYCLES = _get(Counter, "automation_cycles_total", "Cycles run", ("outcome",))
CONFIG_SOURCE = _get(Gauge, "automation_config_source", "1 for the source of the configuration in use", ("source",))
CONFIG_AGE = _get(Gauge, "automation_config_age_seconds", "Age of the configuration in use")
CONFIG_LOADS = _get(Counter, "automation_config_loads_total", "Configuration loads", ("source", "outcome"))
LARAVEL_REQUEST = _get(Histogram, "automation_laravel_request_seconds", "Laravel config/full request time", ("outcome",))
CONFIG_RELOAD_SIGNALS = _get(Counter, "automation_config_reload_signals_total", "Config-changed signals received")
