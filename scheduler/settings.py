"""Settings of the scheduler alone (the shared ones are in common.env.Settings); documented in README.md."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from common.env import EnvReader, Settings


@dataclass(frozen=True)
class ServiceSettings:
    interval_sec: float = 60.0          # SCHEDULER_INTERVAL_SEC: time between ticks
    catchup_sec: float = 300.0          # SCHEDULER_CATCHUP_SEC: the oldest a scheduled time may be and still fire
    followup_poll_sec: float = 1.0      # SCHEDULER_FOLLOWUP_POLL_SEC: how often due follow-ups are looked for
    dry_run_check_sec: float = 3.0      # SCHEDULER_DRY_RUN_CHECK_SEC: flow check this long after a pump start
    irrigation_duration_sec: int = 60   # SCHEDULER_IRRIGATION_DURATION_SEC: when the phase has no duration
    concurrency: int = 200              # SCHEDULER_CONCURRENCY: zones whose commands are in flight at once

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> "ServiceSettings":
        """The scheduler's knobs; in production also its one secret, PG_PASS."""
        settings.require_secrets()
        env = EnvReader(environ)
        return cls(
            interval_sec=env.float("SCHEDULER_INTERVAL_SEC", 60.0, 1, 3600),
            catchup_sec=env.float("SCHEDULER_CATCHUP_SEC", 300.0, 0, 86_400),
            followup_poll_sec=env.float("SCHEDULER_FOLLOWUP_POLL_SEC", 1.0, 0.05, 60),
            dry_run_check_sec=env.float("SCHEDULER_DRY_RUN_CHECK_SEC", 3.0, 0, 600),
            irrigation_duration_sec=env.int("SCHEDULER_IRRIGATION_DURATION_SEC", 60, 1, 3600),
            concurrency=env.int("SCHEDULER_CONCURRENCY", 200, 1, 200),
        )
