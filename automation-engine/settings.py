"""Settings of the automation engine alone (the shared ones are in common.env.Settings).

Every variable is documented with its default in README.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from common.env import EnvReader, Settings, SettingsError


@dataclass(frozen=True)
class ServiceSettings:
    interval_sec: float
    adaptive_concurrency: bool
    target_cycle_time_sec: float
    min_concurrent_zones: int
    max_concurrent_zones: int
    failing_zones_alert_ratio: float
    config_reload_min_sec: float
    # pH / EC dosing
    ph_cooldown_min: float
    ec_cooldown_min: float
    ph_after_nutrient_min: float
    max_doses_per_pump_hour: int
    ph_max_ml_per_hour: float
    ec_max_ml_per_hour: float
    refusal_alert_cycles: int
    ph_max_rate_per_min: float
    ec_max_rate_per_min: float
    stuck_min_samples: int
    stuck_min_minutes: float
    # pumps and actuators
    pump_telemetry_max_age_sec: float
    reassert_min: float
    zone_lease_sec: float
    infra_alert_after_sec: float

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> "ServiceSettings":
        """The engine's knobs; in production also the secrets it uses (the Laravel token when it asks Laravel)."""
        settings.require_secrets(*(["LARAVEL_API_TOKEN"] if settings.laravel_api_url else []))
        env = EnvReader(environ)
        options = cls(
            interval_sec=env.float("AUTOMATION_INTERVAL_SEC", 15.0, 0.1, 3600),
            adaptive_concurrency=env.bool("ADAPTIVE_CONCURRENCY", True),
            target_cycle_time_sec=env.float("TARGET_CYCLE_TIME_SEC", 15.0, 0.1, 3600),
            min_concurrent_zones=env.int("MIN_CONCURRENT_ZONES", 5, 1, 1000),
            max_concurrent_zones=env.int("MAX_CONCURRENT_ZONES", 50, 1, 1000),
            failing_zones_alert_ratio=env.float("FAILING_ZONES_ALERT_RATIO", 0.10, 0.0, 1.0),
            config_reload_min_sec=env.float("CONFIG_RELOAD_MIN_SEC", 5.0, 0.0, 3600),
            ph_cooldown_min=env.float("PH_COOLDOWN_MIN", 10.0, 0.0, 1440),
            ec_cooldown_min=env.float("EC_COOLDOWN_MIN", 10.0, 0.0, 1440),
            ph_after_nutrient_min=env.float("PH_AFTER_NUTRIENT_MIN", 10.0, 0.0, 1440),
            max_doses_per_pump_hour=env.int("MAX_DOSES_PER_PUMP_HOUR", 4, 1, 3600),
            ph_max_ml_per_hour=env.float("PH_MAX_ML_PER_HOUR", 20.0, 0.1, 100_000),
            ec_max_ml_per_hour=env.float("EC_MAX_ML_PER_HOUR", 200.0, 0.1, 100_000),
            refusal_alert_cycles=env.int("REFUSAL_ALERT_CYCLES", 4, 1, 10_000),
            ph_max_rate_per_min=env.float("PH_MAX_RATE_PER_MIN", 1.0, 0.001, 14),
            ec_max_rate_per_min=env.float("EC_MAX_RATE_PER_MIN", 1.0, 0.001, 100),
            stuck_min_samples=env.int("STUCK_MIN_SAMPLES", 6, 2, 100),
            stuck_min_minutes=env.float("STUCK_MIN_MINUTES", 60.0, 0.1, 10_080),
            pump_telemetry_max_age_sec=env.float("PUMP_TELEMETRY_MAX_AGE_SEC", 300.0, 1.0, 86_400),
            reassert_min=env.float("ACTUATOR_REASSERT_MIN", 10.0, 0.1, 1440),
            zone_lease_sec=env.float("ZONE_LEASE_SEC", 120.0, 1.0, 86_400),
            infra_alert_after_sec=env.float("INFRA_ALERT_AFTER_SEC", 60.0, 1.0, 86_400),
        )
        if options.min_concurrent_zones > options.max_concurrent_zones:
            raise SettingsError(f"MIN_CONCURRENT_ZONES={options.min_concurrent_zones} is larger than "
                                f"MAX_CONCURRENT_ZONES={options.max_concurrent_zones}")
        return options

    def replace(self, **changes) -> "ServiceSettings":
        return dataclasses.replace(self, **changes)
