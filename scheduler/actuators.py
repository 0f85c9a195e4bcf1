"""Which online node channels a firing drives, and sending commands linked to their run.

Irrigation (§8.6, §4.2): every online node of type irrig / pump, on its irrigation channel
(`pump_in`, else `pump_irrigation`, else `valve_irrigation`: common.channels.irrigation_channel):
pumps get `run_pump {duration_ms}`, valves `set_relay {state, duration_ms}` and a durable close (the
firmware ignores duration_ms). Lighting (§8.5): every online light node's light channels and
`white_light` / `uv_light` / `light` channels on any node. Water change: valve channels for drain
and fill, driven with `set_relay`.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

from common.channels import DRAIN_CHANNELS, FILL_CHANNELS, irrigation_channel, is_valve
from common.command_catalogue import RUN_PUMP_MAX_MS, CommandError
from common.commands import CommandPublishError, issue_command, new_cmd_id
from common.db import Database
from common.mqtt import MqttClient
from common.topics import Topics
from runs import link_command

log = logging.getLogger("scheduler.actuators")

CHANNELS_SQL = """
SELECT n.zone_id, n.uid, lower(coalesce(n.type, '')) AS node_type, nc.channel,
       lower(coalesce(nc.type, '')) AS channel_type, nc.config
  FROM nodes n JOIN node_channels nc ON nc.node_id = n.id
 WHERE n.zone_id = ANY($1::bigint[]) AND lower(n.status) = 'online'
 ORDER BY n.zone_id, n.id, nc.id
"""

LIGHT_CHANNELS = ("white_light", "uv_light", "light")
__all__ = ["DRAIN_CHANNELS", "FILL_CHANNELS"]  # re-exported for water_cycle


@dataclass(frozen=True, slots=True)
class Target:
    node_uid: str
    channel: str
    config: dict

    @property
    def is_valve(self) -> bool:
        return is_valve(self.channel)

    def max_duration_ms(self, wanted_ms: int) -> int:
        """`wanted_ms` within the backend limit and the channel's safe_limits (§4.3)."""
        limits = (self.config or {}).get("safe_limits") or {}
        cap = limits.get("max_duration_ms")
        ceiling = RUN_PUMP_MAX_MS if not self.is_valve else 3_600_000
        if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
            ceiling = min(ceiling, cap)
        return max(1, min(wanted_ms, ceiling))


async def zones_channels(db: Database, zone_ids: list[int]) -> dict[int, list[Any]]:
    """The online node channels of each zone (one query for all of them)."""
    by_zone: dict[int, list[Any]] = {}
    for row in await db.fetch(CHANNELS_SQL, zone_ids):
        by_zone.setdefault(row["zone_id"], []).append(row)
    return by_zone


async def zone_channels(db: Database, zone_id: int) -> list[Any]:
    return (await zones_channels(db, [zone_id])).get(zone_id, [])


def _is_actuator(row) -> bool:
    return row["channel_type"] not in ("sensor", "s")


def irrigation_targets(rows: list[Any]) -> list[Target]:
    """Each node's irrigation channel (nodes without one are left out)."""
    nodes: dict[str, tuple[str, dict[str, Any]]] = {}
    for row in rows:
        if _is_actuator(row):
            nodes.setdefault(row["uid"], (row["node_type"], {}))[1][row["channel"]] = row
    targets = []
    for uid, (node_type, channels) in nodes.items():
        name = irrigation_channel(node_type, channels)
        if name is not None:
            targets.append(Target(uid, name, channels[name]["config"] or {}))
    return targets


def light_targets(rows: list[Any]) -> list[Target]:
    targets = []
    for row in rows:
        if not _is_actuator(row):
            continue
        name = row["channel"].lower()
        is_light = name in LIGHT_CHANNELS or (row["node_type"] == "light" and ("light" in name or "led" in name))
        if is_light:
            targets.append(Target(row["uid"], row["channel"], row["config"] or {}))
    return targets


def named_targets(rows: list[Any], names: tuple[str, ...]) -> list[Target]:
    return [Target(r["uid"], r["channel"], r["config"] or {}) for r in rows
            if _is_actuator(r) and r["channel"].lower() in names]


class Order(NamedTuple):
    """A command with its cmd_id chosen up front, so that it is linked to its run before it goes out."""
    target: Target
    cmd: str
    params: dict
    cmd_id: str


def new_order(target: Target, cmd: str, params: dict) -> Order:
    return Order(target, cmd, params, new_cmd_id())


@dataclass(frozen=True, slots=True)
class Sent:
    target: Target
    cmd: str
    params: dict
    cmd_id: str
    ok: bool
    error: str | None = None

    def summary(self) -> dict:
        out = {"node_uid": self.target.node_uid, "channel": self.target.channel, "cmd": self.cmd,
               "cmd_id": self.cmd_id, "params": self.params}
        if self.error:
            out["error"] = self.error
        return out


class CommandSender:
    """Issues commands through common.commands (source "scheduler"), each linked to its run first."""

    def __init__(self, db: Database, mqtt: MqttClient, topics: Topics):
        self.db, self.mqtt, self.topics = db, mqtt, topics

    async def send(self, run_id: int | None, gh_uid: str, zone_id: int, target: Target, cmd: str,
                   params: dict) -> Sent:
        cmd_id = new_cmd_id()
        if run_id is not None:
            await link_command(self.db, run_id, cmd_id, target.node_uid, target.channel, cmd)
        return await self.issue(run_id, gh_uid, zone_id, Order(target, cmd, params, cmd_id))

    async def issue(self, run_id: int | None, gh_uid: str, zone_id: int, order: "Order") -> Sent:
        """Issue an order whose cmd_id is already linked to its run."""
        target, cmd, params, cmd_id = order
        try:
            await issue_command(self.db, self.mqtt, self.topics, gh_uid=gh_uid, zone_id=zone_id,
                                node_uid=target.node_uid, channel=target.channel, cmd=cmd, params=params,
                                cmd_id=cmd_id, source="scheduler")
        except (CommandError, CommandPublishError) as exc:
            log.warning("scheduler_command_failed", extra={"zone_id": zone_id, "run_id": run_id, "cmd": cmd,
                                                           "node_uid": target.node_uid, "error": str(exc)})
            return Sent(target, cmd, params, cmd_id, False, str(exc))
        return Sent(target, cmd, params, cmd_id, True)

    async def send_all(self, run_id: int, gh_uid: str, zone_id: int,
                       orders: list[tuple[Target, str, dict]]) -> list[Sent]:
        return [await self.send(run_id, gh_uid, zone_id, target, cmd, params) for target, cmd, params in orders]


async def freshest_metrics(db: Database, zone_ids: list[int], metric: str,
                           not_before: dt.datetime) -> dict[int, float]:
    """Each zone's newest telemetry_last value of `metric` updated at or after `not_before` (zones
    without one are left out)."""
    rows = await db.fetch(
        "SELECT DISTINCT ON (zone_id) zone_id, value FROM telemetry_last"
        " WHERE zone_id = ANY($1::bigint[]) AND upper(metric_type) = $2 AND value IS NOT NULL AND updated_at >= $3"
        " ORDER BY zone_id, updated_at DESC", zone_ids, metric, not_before)
    return {row["zone_id"]: row["value"] for row in rows}


async def freshest_metric(db: Database, zone_id: int, metric: str, not_before: dt.datetime) -> float | None:
    """The zone's newest telemetry_last value of `metric` updated at or after `not_before`, else None."""
    return (await freshest_metrics(db, [zone_id], metric, not_before)).get(zone_id)
