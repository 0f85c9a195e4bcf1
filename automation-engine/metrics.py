"""automation-engine metrics (contract §9.3 names; the rest prefixed `automation_`)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OPTIMAL_CONCURRENCY = Gauge("optimal_concurrency_zones", "Zones processed in parallel in the last cycle")
ZONE_PROCESSING_TIME = Histogram("zone_processing_time_seconds", "Time to process one zone",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ZONE_PROCESSING_ERRORS = Counter("zone_processing_errors_total", "Zones whose processing raised",
                                 ["zone_id", "error_type"])
ZONE_CHECKS = Counter("zone_checks_total", "Zones processed")
COMMANDS_SENT = Counter("automation_commands_sent_total", "Commands the engine published", ["zone_id", "metric"])
CORRECTIONS = Counter("automation_corrections_total", "pH/EC corrections published", ["pump", "reason"])
REFUSALS = Counter("automation_dosing_refusals_total", "Corrections not made because a safety gate refused",
                   ["metric", "reason"])
ACTUATIONS = Counter("automation_actuations_total", "Climate / light / irrigation / recirculation commands",
                     ["controller", "action"])
CYCLE_DURATION = Histogram("automation_cycle_duration_seconds", "Duration of one full cycle",
                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60))
CYCLE_ZONES = Gauge("automation_cycle_zones", "Zones in the last cycle", ["state"])
CYCLES = Counter("automation_cycles_total", "Cycles run", ["outcome"])
CONFIG_SOURCE = Gauge("automation_config_source", "1 for the source of the configuration in use", ["source"])
CONFIG_AGE = Gauge("automation_config_age_seconds", "Age of the configuration in use")
CONFIG_LOADS = Counter("automation_config_loads_total", "Configuration loads", ["source", "outcome"])
LARAVEL_REQUEST = Histogram("automation_laravel_request_seconds", "Laravel config/full request time", ["outcome"])
CONFIG_RELOAD_SIGNALS = Counter("automation_config_reload_signals_total", "Config-changed signals received")
