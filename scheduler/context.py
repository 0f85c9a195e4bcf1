"""What a scheduler job (a firing's plan, a follow-up, a water-change step) works with.

The engine builds one per scheduler and hands it to the jobs, so the job modules depend on
these few things, never on the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from actuators import CommandSender
from common.db import Database
from common.env import Settings
from settings import ServiceSettings


@dataclass(slots=True)
class JobContext:
    db: Database
    sender: CommandSender
    options: ServiceSettings
    settings: Settings   # telemetry_max_age_min, command_timeout_sec
    water_notes: set[tuple] = field(default_factory=set)   # water-change problems already logged
