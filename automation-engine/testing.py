"""Test helpers: seed zones with nodes and telemetry (rows through common.testing's seeding), a small
real Laravel HTTP server. The fixtures are in conftest.py."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import REGISTRY

from common import testing
from common.service import HttpServer
from engine import utcnow

FULL_CAPS = {"ph_control": True, "ec_control": True, "climate_control": True, "light_control": True,
             "irrigation_control": True, "recirculation": True, "flow_sensor": True}
DOSING_CAPS = {"ph_control": True, "ec_control": True}
PUMP_LIMITS = {"safe_limits": {"max_duration_ms": 5000, "min_off_ms": 3000}}


def metric_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Seeded:
    gh_id: int
    zone_id: int
    recipe_id: int
    nodes: dict[str, int] = field(default_factory=dict)  # uid → id


async def seed_zone(db, *, gh_uid: str = "gh-1", name: str = "Z", capabilities: dict | None = DOSING_CAPS,
                    targets: dict | None = None, telemetry: dict[str, float] | None = None,
                    age_sec: float = 0, status: str = "RUNNING", nodes: dict[str, tuple[str, dict]] | None = None,
                    node_status: str = "online", timezone: str | None = None, started_hours_ago: float = 1,
                    phases: list[tuple[int | None, dict]] | None = None, history: int = 3) -> Seeded:
    """A zone with a recipe instance; `nodes` maps uid → (type, {channel: config}); telemetry rows of the
    first node that has a sensor for the metric (or the first node) updated `age_sec` ago."""
    gh_id = await testing.seed_greenhouse(db, gh_uid, timezone=timezone)
    zone_id = await testing.seed_zone(db, gh_id, name, phases=phases, targets=targets or {"ph": 5.8, "ec": 1.4},
                                      started_hours_ago=started_hours_ago, status=status, capabilities=capabilities)
    recipe_id = await db.fetchval("SELECT recipe_id FROM zone_recipe_instances WHERE zone_id = $1", zone_id)
    if nodes is None:
        nodes = {f"nd-ph-{zone_id}": ("ph", {"ph_sensor": {}, "pump_acid": dict(PUMP_LIMITS),
                                            "pump_base": dict(PUMP_LIMITS)}),
                 f"nd-ec-{zone_id}": ("ec", {"ec_sensor": {}, "pump_nutrient": dict(PUMP_LIMITS)})}
    seeded = Seeded(gh_id, zone_id, recipe_id)
    for uid, (node_type, channels) in nodes.items():
        seeded.nodes[uid] = await testing.seed_node(
            db, uid, zone_id, channels=[testing.Channel(channel, config) for channel, config in channels.items()],
            type=node_type, status=node_status, validated=True, last_seen_at=testing.Sql("now()"))
    first_node = next(iter(seeded.nodes.values()), -1)
    for metric, value in (telemetry or {}).items():
        await set_telemetry(db, zone_id, metric, value, age_sec=age_sec, node_id=first_node, history=history)
    return seeded


async def set_telemetry(db, zone_id: int, metric: str, value: float, *, age_sec: float = 0, node_id: int = -1,
                        history: int = 3):
    """The zone's latest reading, stored like the logger does (a sample and telemetry_last with the same
    ts), after `history` earlier samples of the same value 5 s apart (the sensor has been reading it: a
    confirmed reading); history=-1: telemetry_last only."""
    at = await db.fetchval("SELECT (now() AT TIME ZONE 'UTC')::timestamp - make_interval(secs => $1)", float(age_sec))
    await add_samples(db, zone_id, metric, [(value, 5.0 * k) for k in range(history, -1, -1)], at=at)
    await db.execute(
        "INSERT INTO telemetry_last (zone_id, node_id, metric_type, value, updated_at) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (zone_id, node_id, metric_type) DO UPDATE SET value = EXCLUDED.value,"
        " updated_at = EXCLUDED.updated_at", zone_id, node_id, metric, value, at)


async def add_samples(db, zone_id: int, metric: str, values_ages: list[tuple[float, float]], at=None):
    """Samples as (value, seconds before `at`, by default the database's now)."""
    if at is None:
        at = await db.fetchval("SELECT (now() AT TIME ZONE 'UTC')::timestamp")
    await db.executemany(
        "INSERT INTO telemetry_samples (zone_id, metric_type, value, ts) VALUES ($1, $2, $3, $4)",
        [(zone_id, metric, v, at - dt.timedelta(seconds=age)) for v, age in values_ages])


async def automation_commands(db, zone_id: int | None = None) -> list:
    return await db.fetch("SELECT * FROM commands WHERE source = 'automation'"
                          " AND ($1::bigint IS NULL OR zone_id = $1) ORDER BY id", zone_id)


async def events(db, zone_id: int, event_type: str) -> list:
    return await db.fetch("SELECT * FROM zone_events WHERE zone_id = $1 AND type = $2 ORDER BY id", zone_id, event_type)


async def alerts(db, alert_type: str, zone_id: int | None = None, status: str = "ACTIVE") -> list:
    return await db.fetch("SELECT * FROM alerts WHERE type = $1 AND zone_id IS NOT DISTINCT FROM $2 AND status = $3",
                          alert_type, zone_id, status)


# ---------------------------------------------------------------------------------------
# Laravel: a small real HTTP server answering config/full
# ---------------------------------------------------------------------------------------
class FakeLaravel:
    def __init__(self):
        self.port = testing.free_port()
        self.mode = "ok"                 # ok | down (500) | garbage | unauthorised
        self.greenhouses: list[dict[str, Any]] = []
        self.requests: list[dict[str, str]] = []
        app = FastAPI()

        @app.get("/api/system/config/full")
        async def config_full(request: Request):
            self.requests.append(dict(request.headers))
            if request.headers.get("authorization") != "Bearer 1|secret":
                return JSONResponse({"message": "Unauthenticated."}, status_code=401)
            if self.mode == "down":
                return JSONResponse({"message": "Server Error"}, status_code=500)
            if self.mode == "garbage":
                return PlainTextResponse("<html>maintenance</html>")
            if self.mode == "wrong_shape":
                return JSONResponse({"greenhouses": self.greenhouses})
            return JSONResponse({"status": "ok", "data": {"greenhouses": self.greenhouses}})

        self.server = HttpServer(app, "127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_zones(self, gh_uid: str, zone_ids: list[int], timezone: str | None = None) -> None:
        self.greenhouses = [{"id": 1, "uid": gh_uid, "name": "GH", "timezone": timezone,
                             "zones": [{"id": z, "name": f"Z{z}", "status": "RUNNING", "nodes": []}
                                       for z in zone_ids]}]


def later(minutes: float = 0, seconds: float = 0) -> dt.datetime:
    return utcnow() + dt.timedelta(minutes=minutes, seconds=seconds)


async def heartbeat(db, minutes_ahead: float = 0) -> None:
    """Nodes were seen at (now + minutes_ahead): for cycles run with a clock moved forward."""
    await db.execute("UPDATE nodes SET last_seen_at = (now() AT TIME ZONE 'UTC')::timestamp"
                     " + make_interval(secs => $1)", minutes_ahead * 60.0)
