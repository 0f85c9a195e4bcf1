"""Lighting from `lighting_schedule`: on and off at the right local times, only on transitions."""
import asyncio

import orjson

from testing import add_node, events, local, make_scheduler, make_zone

TZ = "Europe/Berlin"


async def lit_zone(db, window="06:00-22:00", **targets):
    zone = await make_zone(db, targets={"lighting_schedule": window, **targets})
    await add_node(db, zone, f"nd-light-{zone}", "light", [("white_light", "actuator", None),
                                                           ("lux_sensor", "sensor", None)])
    return zone


def light_commands(probe, settings):
    return [(p["cmd"], p.get("state", p.get("value"))) for p in
            probe.payloads(f"{settings.mqtt_topic_root}/+/+/+/white_light/command")]


async def tick_at(sched, *hm, day=1):
    return await sched.tick(local(TZ, 2026, 6, day, *hm))


async def test_photoperiod_turns_lights_on_and_off_once_each(settings, db, mqtt, mqtt_probe):
    zone = await lit_zone(db)
    sched = make_scheduler(settings, db, mqtt)
    await tick_at(sched, 5, 0)            # start-up at night: the current state (off) is asserted once
    await tick_at(sched, 5, 1)
    await tick_at(sched, 6, 0, 20)        # on
    await tick_at(sched, 6, 1, 20)
    await tick_at(sched, 12, 0)
    await tick_at(sched, 22, 0, 20)       # off
    await tick_at(sched, 23, 0)
    await tick_at(sched, 6, 0, 20, day=2)  # on again the next morning
    await mqtt_probe.wait_for(4, f"{settings.mqtt_topic_root}/+/+/+/white_light/command")
    await asyncio.sleep(0.3)
    assert light_commands(mqtt_probe, settings) == [("set_relay", False), ("set_relay", True),
                                                    ("set_relay", False), ("set_relay", True)]
    assert [e["type"] for e in await events(db, zone, "LIGHT_ON", "LIGHT_OFF")] == [
        "LIGHT_OFF", "LIGHT_ON", "LIGHT_OFF", "LIGHT_ON"]
    runs = await db.fetch("SELECT item, scheduled_local, status FROM scheduler_runs WHERE zone_id = $1 ORDER BY id",
                          zone)
    assert [(r["item"], r["scheduled_local"].strftime("%d %H:%M"), r["status"]) for r in runs] == [
        ("lighting:off", "31 22:00", "completed"), ("lighting:on", "01 06:00", "completed"),
        ("lighting:off", "01 22:00", "completed"), ("lighting:on", "02 06:00", "completed")]


async def test_window_across_midnight_with_intensity(settings, db, mqtt, mqtt_probe):
    zone = await lit_zone(db, "20:00-06:00", light_intensity=70)
    sched = make_scheduler(settings, db, mqtt)
    await tick_at(sched, 19, 59)
    await tick_at(sched, 20, 0, 30)
    await tick_at(sched, 0, 30, day=2)
    await tick_at(sched, 6, 0, 30, day=2)
    await mqtt_probe.wait_for(3, f"{settings.mqtt_topic_root}/+/+/+/white_light/command")
    await asyncio.sleep(0.3)
    assert light_commands(mqtt_probe, settings) == [("set_relay", False), ("set_pwm", 70.0), ("set_relay", False)]
    [on] = await events(db, zone, "LIGHT_ON")
    assert on["details"]["intensity"] == 70.0 and on["details"]["window"] == "20:00-06:00"


async def test_a_restarted_scheduler_does_not_reassert_the_lights(settings, db, mqtt, mqtt_probe):
    await lit_zone(db)
    await tick_at(make_scheduler(settings, db, mqtt), 10, 0)
    await tick_at(make_scheduler(settings, db, mqtt), 10, 5)
    await tick_at(make_scheduler(settings, db, mqtt), 11, 0)
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/+/+/white_light/command")
    await asyncio.sleep(0.3)
    assert light_commands(mqtt_probe, settings) == [("set_relay", True)]


async def test_an_edge_with_no_light_online_is_retried_until_applied(settings, db, mqtt, mqtt_probe):
    zone = await make_zone(db, targets={"lighting_schedule": "06:00-22:00"})
    node = await add_node(db, zone, "nd-l-off", "light", [("white_light", "actuator", None)], status="offline")
    sched = make_scheduler(settings, db, mqtt)
    await tick_at(sched, 7, 0)
    run = await db.fetchrow("SELECT status, details FROM scheduler_runs WHERE zone_id = $1", zone)
    assert run["status"] == "running" and run["details"]["error"] == "no_nodes"
    log = await db.fetchrow("SELECT task_name, status, details FROM scheduler_logs")
    assert (log["task_name"], log["status"], log["details"]["error"]) == ("lighting", "failed", "no_nodes")
    assert await sched.run_followups(local(TZ, 2026, 6, 1, 7, 0, 30)) == 0  # the retry is an interval away
    assert await sched.run_followups(local(TZ, 2026, 6, 1, 7, 1, 0)) == 1  # still offline: waits again
    await db.execute("UPDATE nodes SET status = 'online' WHERE id = $1", node)
    await tick_at(sched, 7, 1, 30)  # the tick itself does not re-fire the claimed edge
    assert await sched.run_followups(local(TZ, 2026, 6, 1, 7, 2, 0)) == 1
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/+/+/white_light/command")
    await asyncio.sleep(0.3)
    assert light_commands(mqtt_probe, settings) == [("set_relay", True)]
    run = await db.fetchrow("SELECT status, details FROM scheduler_runs WHERE zone_id = $1", zone)
    assert run["status"] == "completed" and run["details"]["error"] is None
    assert [e["type"] for e in await events(db, zone, "LIGHT_ON", "LIGHT_OFF")] == ["LIGHT_ON"]


async def test_a_pending_edge_is_superseded_by_the_next_one(settings, db, mqtt, mqtt_probe):
    zone = await make_zone(db, targets={"lighting_schedule": "06:00-22:00"})
    await add_node(db, zone, "nd-l-off", "light", [("white_light", "actuator", None)], status="offline")
    sched = make_scheduler(settings, db, mqtt)
    await tick_at(sched, 21, 59)
    await tick_at(sched, 22, 0, 10)  # the off edge: no light either, pending too
    assert await sched.run_followups(local(TZ, 2026, 6, 1, 23, 0)) == 2
    runs = await db.fetch("SELECT item, status, details FROM scheduler_runs WHERE zone_id = $1 ORDER BY id", zone)
    assert [(r["item"], r["status"]) for r in runs] == [("lighting:on", "failed"), ("lighting:off", "running")]
    assert runs[0]["details"]["superseded"] is True


async def test_lighting_and_irrigation_in_one_tick(settings, db, mqtt, mqtt_probe):
    zone = await make_zone(db, targets={"lighting_schedule": "06:00-22:00", "irrigation_schedule": "06:00"})
    await add_node(db, zone, "nd-all", "irrig", [("pump_in", "actuator", None), ("white_light", "actuator", None)])
    sched = make_scheduler(settings, db, mqtt)
    claimed = await tick_at(sched, 6, 0, 10)
    assert sorted(f.item for f in claimed) == ["irrigation@06:00", "lighting:on"]
    msgs = await mqtt_probe.wait_for(2, f"{settings.mqtt_topic_root}/#")
    assert sorted(orjson.loads(m.payload)["cmd"] for m in msgs) == ["run_pump", "set_relay"]
