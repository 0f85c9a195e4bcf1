"""Test fixtures of the bridge (imported by its test modules): a running bridge and a seeded zone."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import httpx
import pytest

from common import testing

from bridge_settings import BridgeSettings
from main import build

TOKEN = "bridge-test-token"
FAST = BridgeSettings(max_body_bytes=65_536, retry_after_sec=5, routine_poll_sec=0.05, flow_settle_sec=0.3,
                      task_keep_sec=60, max_tasks=100)


@contextlib.asynccontextmanager
async def running_bridge(settings, token: str = TOKEN, options: BridgeSettings = FAST, wait_mqtt: bool = True):
    for attempt in range(5):  # another process may take the free port before uvicorn binds it
        settings = settings.replace(bridge_port=testing.free_port(), py_api_token=token, http_host="127.0.0.1")
        service = build(settings, options)
        try:
            await service.start()
            break
        except RuntimeError:
            if attempt == 4:
                raise
    if wait_mqtt:
        await service.mqtt.wait_connected(10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.bridge_port}", headers=headers, timeout=30)
    try:
        yield SimpleNamespace(service=service, http=client, settings=settings,
                              root=settings.mqtt_topic_root)
    finally:
        await client.aclose()
        await service.stop()


@pytest.fixture
async def bridge(settings):
    async with running_bridge(settings) as running:
        yield running


@pytest.fixture
async def world(db):
    """Greenhouse gh-1, a zone, an online irrigation node (pump_in limited to 5 s, fan_A, water_control),
    a pH node (pump_acid, ph_sensor; types in Laravel's upper case) and a second zone without greenhouse."""
    gh_id = await db.fetchval("INSERT INTO greenhouses (uid, name) VALUES ('gh-1', 'GH') RETURNING id")
    zone = await db.fetchval("INSERT INTO zones (greenhouse_id, name) VALUES ($1, 'A') RETURNING id", gh_id)
    bare_zone = await db.fetchval("INSERT INTO zones (name) VALUES ('no greenhouse') RETURNING id")
    irr = await db.fetchval("INSERT INTO nodes (uid, zone_id, type, status) VALUES ('nd-irr-1', $1, 'irrig',"
                            " 'online') RETURNING id", zone)
    ph = await db.fetchval("INSERT INTO nodes (uid, zone_id, type, status) VALUES ('nd-ph-1', $1, 'ph', 'online')"
                           " RETURNING id", zone)
    await db.fetchval("INSERT INTO nodes (uid, type) VALUES ('nd-loose', 'ph') RETURNING id")
    limits = {"safe_limits": {"max_duration_ms": 5000, "min_off_ms": 3000}}
    channels = {}
    for node_id, channel, kind, config in (
            (irr, "pump_in", "actuator", limits), (irr, "fan_A", "actuator", None),
            (irr, "water_control", "actuator", None), (ph, "pump_acid", "ACTUATOR", limits),
            (ph, "ph_sensor", "SENSOR", None)):
        channels[channel] = await db.fetchval(
            "INSERT INTO node_channels (node_id, channel, type, config) VALUES ($1, $2, $3, $4) RETURNING id",
            node_id, channel, kind, config)
    return SimpleNamespace(gh="gh-1", zone=zone, bare_zone=bare_zone, irr=irr, ph=ph, channels=channels)


@pytest.fixture
async def valves(world, db):
    """world's irrigation node also drives a fill and a drain valve."""
    for channel in ("valve_fill", "valve_drain"):
        await db.execute("INSERT INTO node_channels (node_id, channel, type) VALUES ($1, $2, 'actuator')",
                         world.irr, channel)
    return world
