"""Fixtures of the bridge's tests: a running bridge and a seeded zone."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.testing import Channel, insert_row, seed_greenhouse, seed_node, seed_zone

from testing import running_bridge


@pytest.fixture
async def bridge(settings):
    async with running_bridge(settings) as running:
        yield running


@pytest.fixture
async def world(db):
    """Greenhouse gh-1, a zone, an online irrigation node (pump_in limited to 5 s, fan_A, water_control),
    a pH node (pump_acid, ph_sensor; types in Laravel's upper case) and a second zone without greenhouse."""
    await seed_greenhouse(db, "gh-1", "GH")
    zone = await seed_zone(db, "gh-1", "A")
    bare_zone = await seed_zone(db, None, "no greenhouse")
    limits = {"safe_limits": {"max_duration_ms": 5000, "min_off_ms": 3000}}
    irr = await seed_node(db, "nd-irr-1", zone, type="irrig", status="online", channels=[
        Channel("pump_in", limits), "fan_A", "water_control"])
    ph = await seed_node(db, "nd-ph-1", zone, type="ph", status="online", channels=[
        Channel("pump_acid", limits, "ACTUATOR"), Channel("ph_sensor", type="SENSOR")])
    await seed_node(db, "nd-loose", type="ph")
    channels = {row["channel"]: row["id"] for row in await db.fetch(
        "SELECT channel, id FROM node_channels WHERE node_id = ANY($1::bigint[]) ORDER BY id", [irr, ph])}
    return SimpleNamespace(gh="gh-1", zone=zone, bare_zone=bare_zone, irr=irr, ph=ph, channels=channels)


@pytest.fixture
async def valves(world, db):
    """world's irrigation node also drives a fill and a drain valve."""
    for channel in ("valve_fill", "valve_drain"):
        await insert_row(db, "node_channels", node_id=world.irr, channel=channel, type="actuator")
    return world
