"""What is simulated: greenhouses, zones, nodes and their channels.

A layout is either synthetic (`synthetic_layout`: N greenhouses × M zones × K nodes, node types
in turn) or read from PostgreSQL (`layout_from_db`: exactly the nodes and channels a database
holds, so a seeded demo greenhouse comes alive). Nodes without a zone and greenhouse are
unregistered: they live on temporary ids and announce themselves with node_hello.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

from common.schemas import DEFAULT_SAFE_LIMITS

DEFAULT_POLL_MS = 3000
NODE_TYPES = ("ph", "ec", "climate", "irrig", "light")


@dataclass
class ChannelSpec:
    name: str
    type: str  # SENSOR | ACTUATOR
    metric: str | None = None
    poll_interval_ms: int = DEFAULT_POLL_MS
    actuator_type: str | None = None
    safe_limits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SAFE_LIMITS))
    ml_per_second: float | None = None

    @property
    def is_sensor(self) -> bool:
        return self.type == "SENSOR" and bool(self.metric)

    @property
    def is_pump(self) -> bool:
        return self.type == "ACTUATOR" and (self.actuator_type == "PUMP" or "pump" in self.name)

    def to_config(self) -> dict[str, Any]:
        """The NodeConfig channel entry (contract §5.1) for this channel."""
        if self.type == "SENSOR":
            return {"name": self.name, "type": "SENSOR", "metric": self.metric,
                    "poll_interval_ms": self.poll_interval_ms}
        entry = {"name": self.name, "type": "ACTUATOR", "metric": None,
                 "actuator_type": self.actuator_type or actuator_type_for(self.name),
                 "safe_limits": dict(self.safe_limits)}
        if self.ml_per_second is not None:
            entry["ml_per_second"] = self.ml_per_second
        return entry


@dataclass
class NodeSpec:
    uid: str
    type: str
    hardware_id: str
    gh: str | None = None        # greenhouse uid; None = unregistered (temporary ids)
    zone_id: int | None = None
    channels: list[ChannelSpec] = field(default_factory=list)
    fw_version: str = "sim-1.0.0"

    @property
    def registered(self) -> bool:
        return self.gh is not None and self.zone_id is not None


def actuator_type_for(name: str) -> str:
    lowered = name.lower()
    if "pump" in lowered:
        return "PUMP"
    if "valve" in lowered or "solenoid" in lowered:
        return "VALVE"
    if "relay" in lowered:
        return "RELAY"
    if "light" in lowered or "led" in lowered:
        return "LIGHT"
    return "ACTUATOR"


def sensor(name: str, metric: str, poll_ms: int = DEFAULT_POLL_MS) -> ChannelSpec:
    return ChannelSpec(name, "SENSOR", metric, poll_interval_ms=poll_ms)


def actuator(name: str, ml_per_second: float | None = None, max_duration_ms: int = 5000,
             min_off_ms: int = 3000) -> ChannelSpec:
    return ChannelSpec(name, "ACTUATOR", None, actuator_type=actuator_type_for(name),
                       safe_limits={"max_duration_ms": max_duration_ms, "min_off_ms": min_off_ms},
                       ml_per_second=ml_per_second)


def default_channels(node_type: str) -> list[ChannelSpec]:
    """The channels a node of this type has (firmware channel names, contract §4.1)."""
    if node_type == "ph":
        return [sensor("ph_sensor", "PH"), sensor("temp_water", "TEMP_WATER", 5000),
                actuator("pump_acid", 0.5), actuator("pump_base", 0.5)]
    if node_type == "ec":
        return [sensor("ec_sensor", "EC"), actuator("pump_nutrient", 1.0)]
    if node_type == "climate":
        return [sensor("temp_air", "TEMP_AIR", 5000), sensor("humidity", "HUMIDITY", 5000),
                sensor("co2", "CO2", 10000), actuator("fan_A"), actuator("heater_1")]
    if node_type in ("irrig", "pump"):
        return [sensor("water_level", "WATER_LEVEL", 5000), sensor("flow_sensor", "FLOW_RATE", 3000),
                actuator("pump_in", 1.5, max_duration_ms=60000, min_off_ms=5000)]
    if node_type == "light":
        return [sensor("light_sensor", "LUX", 10000), actuator("white_light")]
    return [sensor("temp_air", "TEMP_AIR", 5000)]


def hardware_id_for(seed: str) -> str:
    """`esp32-` + 12 lower-case hex digits, stable for a given seed (contract §3.5)."""
    return "esp32-" + hashlib.sha1(seed.encode()).hexdigest()[:12]


def synthetic_layout(greenhouses: int = 1, zones: int = 2, nodes_per_zone: int = 5,
                     node_types: tuple[str, ...] = NODE_TYPES, unregistered: int = 0,
                     gh_prefix: str = "gh-", node_prefix: str = "nd-sim-") -> list[NodeSpec]:
    """greenhouses × zones × nodes_per_zone registered nodes (zone ids 1, 2, … across greenhouses),
    node types taken in turn, plus `unregistered` nodes on temporary ids."""
    nodes: list[NodeSpec] = []
    zone_id = 0
    for g in range(1, greenhouses + 1):
        gh = f"{gh_prefix}{g}"
        for _ in range(zones):
            zone_id += 1
            for n in range(nodes_per_zone):
                node_type = node_types[n % len(node_types)]
                uid = f"{node_prefix}{node_type}-z{zone_id}-{n + 1}"
                nodes.append(NodeSpec(uid, node_type, hardware_id_for(uid), gh, zone_id,
                                      default_channels(node_type)))
    for i in range(unregistered):
        node_type = node_types[i % len(node_types)]
        hw = hardware_id_for(f"{node_prefix}new-{i}")
        nodes.append(NodeSpec(hw, node_type, hw, None, None, default_channels(node_type)))
    return nodes


def _channel_from_row(row: Any) -> ChannelSpec:
    config = row["config"] or {}
    if isinstance(config, str):  # a connection without the jsonb codec
        import json
        config = json.loads(config)
    kind = "SENSOR" if (row["type"] or "").strip().lower() in ("sensor", "s") else "ACTUATOR"
    limits = dict(DEFAULT_SAFE_LIMITS)
    limits.update(config.get("safe_limits") or {})
    mlps = config.get("ml_per_second")
    return ChannelSpec(
        name=row["channel"], type=kind, metric=(row["metric"] or None) if kind == "SENSOR" else None,
        poll_interval_ms=int(config.get("poll_interval_ms") or DEFAULT_POLL_MS),
        actuator_type=config.get("actuator_type") or (actuator_type_for(row["channel"]) if kind == "ACTUATOR" else None),
        safe_limits=limits, ml_per_second=float(mlps) if isinstance(mlps, (int, float)) else None)


async def layout_from_db(settings) -> list[NodeSpec]:
    """Every node of the database that is not decommissioned, with its channels."""
    from common.db import Database

    db = Database(settings.replace(db_pool_min=1, db_pool_max=2))
    await db.connect(wait=False)
    try:
        nodes = await db.fetch(
            "SELECT n.id, n.uid, n.type, n.hardware_id, n.zone_id, g.uid AS gh_uid "
            "FROM nodes n LEFT JOIN zones z ON z.id = n.zone_id LEFT JOIN greenhouses g ON g.id = z.greenhouse_id "
            "WHERE n.lifecycle_state <> 'DECOMMISSIONED' ORDER BY n.id")
        channels = await db.fetch("SELECT node_id, channel, type, metric, config FROM node_channels ORDER BY id")
    finally:
        await db.close()
    by_node: dict[int, list[ChannelSpec]] = {}
    for row in channels:
        by_node.setdefault(row["node_id"], []).append(_channel_from_row(row))
    specs = []
    for row in nodes:
        registered = row["zone_id"] is not None and row["gh_uid"] is not None
        specs.append(NodeSpec(
            uid=row["uid"], type=row["type"] or "unknown", hardware_id=row["hardware_id"] or hardware_id_for(row["uid"]),
            gh=row["gh_uid"] if registered else None, zone_id=row["zone_id"] if registered else None,
            channels=by_node.get(row["id"]) or default_channels(row["type"] or "")))
    return specs


def clone(spec: NodeSpec) -> NodeSpec:
    return copy.deepcopy(spec)
