"""history-logger's own settings (on top of common Settings), read from the environment."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from common.env import EnvReader, Settings


@dataclass(frozen=True)
class ServiceSettings:
    consumer: str            # Redis consumer name: stable across restarts so a restart re-reads its own pending list
    max_payload_bytes: int   # larger MQTT payloads are dead-lettered as too_large
    sample_every: int        # above 90 % queue fill keep 1 of N samples per (node, channel, metric)
    claim_idle_ms: int       # pending entries of another consumer idle this long are taken over
    dead_letter_max: int     # the dead-letter stream keeps about this many entries
    offline_sweep_sec: int   # offline housekeeping period (contract §5.3)
    timeout_sweep_sec: float  # command timeout sweep period (contract §4.5)
    no_telemetry_min: int    # a zone silent this long gets a NO_TELEMETRY zone event
    lease_sec: float         # MQTT_SHARED_GROUP: a replica silent this long is dead, its session rescued

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> "ServiceSettings":
        settings.require_secrets()  # in production: a real PG_PASS (no other secret is required here)
        env = EnvReader(environ)
        return cls(
            consumer=env.str("HISTORY_LOGGER_CONSUMER", f"{settings.mqtt_client_id}-logger", max_len=128),
            max_payload_bytes=env.int("TELEMETRY_MAX_PAYLOAD_BYTES", 65_536, 256, 16_777_216),
            sample_every=env.int("TELEMETRY_SAMPLE_EVERY", 10, 2, 10_000),
            claim_idle_ms=env.int("TELEMETRY_CLAIM_IDLE_MS", 60_000, 1_000, 86_400_000),
            dead_letter_max=env.int("TELEMETRY_DEAD_LETTER_MAX", 10_000, 100, 10_000_000),
            offline_sweep_sec=env.int("NODE_OFFLINE_SWEEP_SEC", 60, 1, 3600),
            timeout_sweep_sec=env.float("COMMAND_TIMEOUT_SWEEP_SEC", 5.0, 0.1, 3600),
            no_telemetry_min=env.int("ZONE_NO_TELEMETRY_MIN", 3, 1, 10_080),
            lease_sec=env.float("HISTORY_LOGGER_LEASE_SEC", 10.0, 1.0, 300.0),
        )
