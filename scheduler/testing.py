"""Test helpers for the scheduler: a settable clock, zones with a recipe phase, nodes, a scheduler."""
from __future__ import annotations

import datetime as dt
import itertools
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from common.topics import Topics
from actuators import CommandSender
from settings import SchedulerConfig
from engine import Scheduler

_seq = itertools.count(1)


class Clock:
    """A clock the test moves by hand (aware UTC)."""

    def __init__(self, now: dt.datetime):
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def local(tz: str, *args: int, fold: int = 0) -> dt.datetime:
    """An aware UTC instant from a local wall time in `tz`."""
    return dt.datetime(*args, tzinfo=ZoneInfo(tz), fold=fold).astimezone(dt.timezone.utc)


async def make_zone(db, *, targets: dict[str, Any], tz: str | None = "Europe/Berlin",
                    capabilities: dict | None = None, status: str = "online", settings: dict | None = None,
                    gh_uid: str | None = None) -> int:
    n = next(_seq)
    gh_uid = gh_uid or f"gh-{n}"
    gh = await db.fetchval("INSERT INTO greenhouses (uid, name, timezone) VALUES ($1, 'GH', $2)"
                           " ON CONFLICT (uid) DO UPDATE SET name = excluded.name RETURNING id", gh_uid, tz)
    zone = await db.fetchval(
        "INSERT INTO zones (greenhouse_id, name, status, capabilities, settings) VALUES ($1, $2, $3, $4, $5)"
        " RETURNING id", gh, f"zone {n}", status, capabilities, settings)
    recipe = await db.fetchval("INSERT INTO recipes (name) VALUES ($1) RETURNING id", f"recipe {n}")
    await db.execute("INSERT INTO recipe_phases (recipe_id, phase_index, name, targets) VALUES ($1, 0, 'p0', $2)",
                     recipe, targets)
    await db.execute("INSERT INTO zone_recipe_instances (zone_id, recipe_id, current_phase_index, started_at)"
                     " VALUES ($1, $2, 0, now())", zone, recipe)
    return zone


async def add_node(db, zone_id: int, uid: str, node_type: str, channels: list[tuple[str, str, dict | None]],
                   status: str = "online") -> int:
    node = await db.fetchval("INSERT INTO nodes (uid, zone_id, type, status) VALUES ($1, $2, $3, $4) RETURNING id",
                             uid, zone_id, node_type, status)
    for name, kind, config in channels:
        await db.execute("INSERT INTO node_channels (node_id, channel, type, config) VALUES ($1, $2, $3, $4)",
                         node, name, kind, config)
    return node


async def set_metric(db, zone_id: int, metric: str, value: float, at: dt.datetime) -> None:
    await db.execute(
        "INSERT INTO telemetry_last (zone_id, node_id, metric_type, value, updated_at) VALUES ($1, -1, $2, $3, $4)"
        " ON CONFLICT (zone_id, node_id, metric_type) DO UPDATE SET value = excluded.value,"
        " updated_at = excluded.updated_at", zone_id, metric, value, at.astimezone(dt.timezone.utc).replace(tzinfo=None))


async def events(db, zone_id: int, *types: str) -> list:
    return await db.fetch("SELECT type, details FROM zone_events WHERE zone_id = $1 AND type = ANY($2) ORDER BY id",
                          zone_id, list(types))


def make_scheduler(settings, db, mqtt, clock: Clock | None = None, **config: Any) -> Scheduler:
    return Scheduler(settings, SchedulerConfig(**config), db,
                     CommandSender(db, mqtt, Topics(settings.mqtt_topic_root)),
                     clock=clock or Clock(dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)))


async def node_answers(db, run_id: int, status: str = "ACK", error_code: str | None = None) -> None:
    """A node's command_response to each open command of the run, applied as history-logger does."""
    from common.commands import record_response
    from common.schemas import CommandResponse
    for row in await db.fetch("SELECT cmd_id FROM scheduler_run_command_status WHERE run_id = $1"
                              " AND status IN ('pending', 'sent')", run_id):
        payload = {"cmd_id": row["cmd_id"], "status": status, "error_code": error_code}
        await record_response(db, CommandResponse.model_validate(payload), payload)
