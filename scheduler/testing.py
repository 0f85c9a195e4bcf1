"""Test helpers for the scheduler: a settable clock, zones with a recipe phase, nodes, a scheduler."""
from __future__ import annotations

import datetime as dt
import itertools
from typing import Any
from zoneinfo import ZoneInfo

from common.commands import record_response
from common.schemas import CommandResponse
from common.testing import Channel, seed_greenhouse, seed_node, seed_zone
from common.topics import Topics
from actuators import CommandSender
from engine import Scheduler
from settings import ServiceSettings

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
    """A zone (in greenhouse `gh_uid` with timezone `tz`) running a one-phase recipe of `targets`."""
    n = next(_seq)
    greenhouse = await seed_greenhouse(db, gh_uid or f"gh-{n}", timezone=tz)
    return await seed_zone(db, greenhouse, f"zone {n}", targets=targets, status=status, capabilities=capabilities,
                           settings=settings)


async def add_node(db, zone_id: int, uid: str, node_type: str, channels: list[tuple[str, str, dict | None]],
                   status: str = "online") -> int:
    """A node with `channels` given as (name, type, config)."""
    return await seed_node(db, uid, zone_id, type=node_type, status=status,
                           channels=[Channel(name, config, kind) for name, kind, config in channels])


async def set_metric(db, zone_id: int, metric: str, value: float, at: dt.datetime) -> None:
    await db.execute(
        "INSERT INTO telemetry_last (zone_id, node_id, metric_type, value, updated_at) VALUES ($1, -1, $2, $3, $4)"
        " ON CONFLICT (zone_id, node_id, metric_type) DO UPDATE SET value = excluded.value,"
        " updated_at = excluded.updated_at", zone_id, metric, value,
        at.astimezone(dt.timezone.utc).replace(tzinfo=None))


async def events(db, zone_id: int, *types: str) -> list:
    return await db.fetch("SELECT type, details FROM zone_events WHERE zone_id = $1 AND type = ANY($2) ORDER BY id",
                          zone_id, list(types))


def make_scheduler(settings, db, mqtt, clock: Clock | None = None, **options: Any) -> Scheduler:
    return Scheduler(settings, ServiceSettings(**options), db,
                     CommandSender(db, mqtt, Topics(settings.mqtt_topic_root)),
                     clock=clock or Clock(dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)))


async def node_answers(db, run_id: int, status: str = "ACK", error_code: str | None = None) -> None:
    """A node's command_response to each open command of the run, applied as history-logger does."""
    for row in await db.fetch("SELECT cmd_id FROM scheduler_run_command_status WHERE run_id = $1"
                              " AND status IN ('pending', 'sent')", run_id):
        payload = {"cmd_id": row["cmd_id"], "status": status, "error_code": error_code}
        await record_response(db, CommandResponse.model_validate(payload), payload)
