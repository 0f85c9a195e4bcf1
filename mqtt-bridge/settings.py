"""Settings of the bridge alone (the shared ones are in common.env.Settings).

Every variable is documented with its default in README.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from common.env import EnvReader, Settings


@dataclass(frozen=True)
class ServiceSettings:
    max_body_bytes: int          # larger request bodies are refused with 413
    retry_after_sec: int         # Retry-After of a 503 (broker or database unreachable)
    routine_poll_sec: float      # fill / drain poll WATER_LEVEL this often (contract: 2 s)
    flow_settle_sec: float       # calibration waits this long after the pump stops for the last samples
    task_keep_sec: int           # finished background routines stay pollable this long
    max_tasks: int               # at most this many routines (running + kept) at once
    routine_stale_sec: float = 30.0  # a running routine not refreshed this long is another bridge's, dead

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> "ServiceSettings":
        settings.require_secrets("PY_API_TOKEN")  # every /bridge route needs it
        env = EnvReader(environ)
        return cls(
            max_body_bytes=env.int("BRIDGE_MAX_BODY_BYTES", 65_536, 1024, 16 * 1024 * 1024),
            retry_after_sec=env.int("BRIDGE_RETRY_AFTER_SEC", 5, 1, 3600),
            routine_poll_sec=env.float("BRIDGE_ROUTINE_POLL_SEC", 2.0, 0.01, 60),
            flow_settle_sec=env.float("BRIDGE_FLOW_SETTLE_SEC", 1.0, 0, 60),
            task_keep_sec=env.int("BRIDGE_TASK_KEEP_SEC", 3600, 1, 7 * 86_400),
            max_tasks=env.int("BRIDGE_MAX_TASKS", 1000, 1, 100_000),
            routine_stale_sec=env.float("BRIDGE_ROUTINE_STALE_SEC", 30.0, 1, 3600),
        )
