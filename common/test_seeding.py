"""The one seeding helper writes the rows Laravel writes, on both schemas."""
from __future__ import annotations

from common.testing import Channel, Sql, seed_greenhouse, seed_node, seed_zone


async def test_seeds_a_zone_with_a_recipe_and_a_node_with_channels(db):
    zone = await seed_zone(db, "gh-seed", "A", status="RUNNING", targets={"ph": 5.8}, started_hours_ago=2)
    again = await seed_zone(db, "gh-seed", "B")
    node = await seed_node(db, "nd-1", zone, type="ph", status="online", last_seen_at=Sql("now()"),
                           channels=["ph_sensor", Channel("pump_acid", {"safe_limits": {"min_off_ms": 1}})])

    zones = await db.fetch("SELECT z.id, z.name, z.status, g.uid FROM zones z JOIN greenhouses g"
                           " ON g.id = z.greenhouse_id ORDER BY z.id")
    assert [(r["id"], r["name"], r["uid"]) for r in zones] == [(zone, "A", "gh-seed"), (again, "B", "gh-seed")]
    assert zones[0]["status"] == "RUNNING"
    phase = await db.fetchrow("SELECT p.targets, now() - i.started_at AS age FROM zone_recipe_instances i"
                              " JOIN recipe_phases p ON p.recipe_id = i.recipe_id WHERE i.zone_id = $1", zone)
    assert phase["targets"] == {"ph": 5.8}
    assert 7100 < phase["age"].total_seconds() < 7300
    assert await db.fetchval("SELECT count(*) FROM zone_recipe_instances WHERE zone_id = $1", again) == 0
    channels = await db.fetch("SELECT channel, type, config FROM node_channels WHERE node_id = $1 ORDER BY channel",
                              node)
    assert [(c["channel"], c["type"], c["config"]) for c in channels] == [
        ("ph_sensor", "sensor", None), ("pump_acid", "actuator", {"safe_limits": {"min_off_ms": 1}})]
    row = await db.fetchrow("SELECT zone_id, type, last_seen_at IS NOT NULL AS seen FROM nodes WHERE id = $1", node)
    assert (row["zone_id"], row["type"], row["seen"]) == (zone, "ph", True)


async def test_an_existing_greenhouse_is_updated_not_duplicated(db):
    first = await seed_greenhouse(db, "gh-x")
    assert await seed_greenhouse(db, "gh-x", timezone="UTC") == first
    assert await db.fetchval("SELECT timezone FROM greenhouses WHERE id = $1", first) == "UTC"
