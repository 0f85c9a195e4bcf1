"""The water-change cycle walks NORMAL_RECIRC → DRAIN → FILL → STABILIZE → NORMAL_RECIRC."""
import asyncio
import datetime as dt

from common.mqtt import MqttClient
from testing import add_node, events, local, make_scheduler, make_zone, set_metric

TZ = "Europe/Berlin"
CHANGE = {"enabled": True, "interval_days": 7, "time_of_day": "09:00", "drain_timeout_min": 30,
          "fill_timeout_min": 30, "stabilize_min": 10}
EVENTS = ("WATER_CHANGE_STARTED", "WATER_CHANGE_STEP", "WATER_CHANGE_COMPLETED")


async def water_zone(db, change=None, age_days=8.0, targets=None, valves=True, now=None):
    zone = await make_zone(db, targets=targets or {}, settings={"water_cycle": {
        "mode": "RECIRCULATING", "water_change": dict(CHANGE, **(change or {}))}})
    now = now or local(TZ, 2026, 6, 1, 8, 0)
    started = None if age_days is None else (now - dt.timedelta(days=age_days)).replace(tzinfo=None)
    await db.execute("UPDATE zones SET solution_started_at = $2 WHERE id = $1", zone, started)
    if valves:
        await add_node(db, zone, f"nd-water-{zone}", "pump", [("valve_drain", "actuator", None),
                                                             ("valve_fill", "actuator", None),
                                                             ("level_sensor", "sensor", None)])
    return zone


async def state(db, zone):
    return await db.fetchrow("SELECT water_state, solution_started_at FROM zones WHERE id = $1", zone)


def valve_commands(probe, settings):
    return [(m.topic.split("/")[-2], p["state"]) for m, p in
            zip(probe.received(f"{settings.mqtt_topic_root}/#"), probe.payloads(f"{settings.mqtt_topic_root}/#"))]


async def test_full_cycle_walks_its_states_with_events_and_resets_solution_age(settings, db, mqtt, mqtt_probe):
    zone = await water_zone(db)
    sched = make_scheduler(settings, db, mqtt)
    await sched.tick(local(TZ, 2026, 6, 1, 8, 59))
    assert (await state(db, zone))["water_state"] == "NORMAL_RECIRC"

    await sched.tick(local(TZ, 2026, 6, 1, 9, 0, 30))
    assert (await state(db, zone))["water_state"] == "WATER_CHANGE_DRAIN"
    [started] = await events(db, zone, "WATER_CHANGE_STARTED")
    assert started["details"]["reason"] == "interval" and started["details"]["solution_age_days"] >= 8
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/#")

    await set_metric(db, zone, "WATER_LEVEL", 0.5, local(TZ, 2026, 6, 1, 9, 5))
    await sched.tick(local(TZ, 2026, 6, 1, 9, 5, 30))
    assert (await state(db, zone))["water_state"] == "WATER_CHANGE_DRAIN"  # not drained yet

    await set_metric(db, zone, "WATER_LEVEL", 0.05, local(TZ, 2026, 6, 1, 9, 6))
    await sched.tick(local(TZ, 2026, 6, 1, 9, 6, 30))
    assert (await state(db, zone))["water_state"] == "WATER_CHANGE_FILL"

    await sched.tick(local(TZ, 2026, 6, 1, 9, 7, 30))
    assert (await state(db, zone))["water_state"] == "WATER_CHANGE_FILL"  # the drained level is not a fill
    await set_metric(db, zone, "WATER_LEVEL", 0.95, local(TZ, 2026, 6, 1, 9, 20))
    await sched.tick(local(TZ, 2026, 6, 1, 9, 20, 30))
    assert (await state(db, zone))["water_state"] == "WATER_CHANGE_STABILIZE"

    await sched.tick(local(TZ, 2026, 6, 1, 9, 25, 30))
    assert (await state(db, zone))["water_state"] == "WATER_CHANGE_STABILIZE"
    done_at = local(TZ, 2026, 6, 1, 9, 31)
    await sched.tick(done_at)
    row = await state(db, zone)
    assert row["water_state"] == "NORMAL_RECIRC"
    assert row["solution_started_at"] == done_at.replace(tzinfo=None)

    got = await events(db, zone, *EVENTS)
    assert [e["type"] for e in got] == ["WATER_CHANGE_STARTED"] + ["WATER_CHANGE_STEP"] * 3 + [
        "WATER_CHANGE_COMPLETED"]
    assert [(e["details"]["to"], e["details"]["reason"]) for e in got[1:4]] == [
        ("WATER_CHANGE_FILL", "level_reached"), ("WATER_CHANGE_STABILIZE", "level_reached"),
        ("NORMAL_RECIRC", "stabilized")]
    assert got[-1]["details"]["duration_min"] == 30.5
    await mqtt_probe.wait_for(4, f"{settings.mqtt_topic_root}/#")
    await asyncio.sleep(0.3)
    assert valve_commands(mqtt_probe, settings) == [("valve_drain", True), ("valve_drain", False),
                                                   ("valve_fill", True), ("valve_fill", False)]
    run = await db.fetchrow("SELECT item, status FROM scheduler_runs WHERE zone_id = $1", zone)
    assert (run["item"], run["status"]) == ("water_change", "completed")
    assert await db.fetchval("SELECT count(*) FROM scheduler_run_commands") == 2  # the opens
    closes = await db.fetch("SELECT channel, reason, done_at IS NOT NULL AS done, cmd_id FROM actuator_closes"
                            " WHERE zone_id = $1 ORDER BY close_at", zone)
    sent = [(c["channel"], c["reason"]) for c in closes if c["done"]]
    assert sent == [("valve_drain", "water_change:drain"), ("valve_fill", "water_change:fill")]
    # each opened valve also has a safety close at its step's timeout, not due yet
    assert sorted(c["channel"] for c in closes if not c["done"]) == ["valve_drain", "valve_fill"]
    logs = await db.fetch("SELECT status FROM scheduler_logs WHERE task_name = 'water_change' ORDER BY id")
    assert [r["status"] for r in logs] == ["running", "completed"]

    # The fresh solution is not changed again the next morning.
    await sched.tick(local(TZ, 2026, 6, 2, 9, 0, 30))
    assert (await state(db, zone))["water_state"] == "NORMAL_RECIRC"


async def test_off_unless_enabled(settings, db, mqtt, mqtt_probe):
    zone = await water_zone(db, change={"enabled": False})
    plain = await make_zone(db, targets={})
    await db.execute("UPDATE zones SET solution_started_at = now() - interval '30 days' WHERE id = $1", plain)
    sched = make_scheduler(settings, db, mqtt)
    await sched.tick(local(TZ, 2026, 6, 1, 9, 0, 30))
    assert (await state(db, zone))["water_state"] == "NORMAL_RECIRC"
    assert (await state(db, plain))["water_state"] == "NORMAL_RECIRC"
    assert await events(db, zone, *EVENTS) == [] and await events(db, plain, *EVENTS) == []


async def test_young_solution_waits_unless_ec_has_drifted(settings, db, mqtt, mqtt_probe):
    calm = await water_zone(db, age_days=2, targets={"ec": {"min": 1.2, "max": 1.6}})
    drifted = await water_zone(db, age_days=2, targets={"ec": 1.4})
    now = local(TZ, 2026, 6, 1, 9, 0, 30)
    await set_metric(db, calm, "EC", 1.5, now)
    await set_metric(db, drifted, "EC", 2.0, now)  # 43 % above target, threshold 30 %
    await make_scheduler(settings, db, mqtt).tick(now)
    assert (await state(db, calm))["water_state"] == "NORMAL_RECIRC"
    assert (await state(db, drifted))["water_state"] == "WATER_CHANGE_DRAIN"
    [started] = await events(db, drifted, "WATER_CHANGE_STARTED")
    assert started["details"]["reason"] == "ec_drift"


async def test_two_schedulers_start_one_change(settings, db, mqtt, mqtt_probe):
    zone = await water_zone(db)
    other = MqttClient(settings, "-scheduler-2")
    await other.start(wait=10)
    try:
        now = local(TZ, 2026, 6, 1, 9, 0, 30)
        await asyncio.gather(make_scheduler(settings, db, mqtt).tick(now), make_scheduler(settings, db, other).tick(now))
        later = local(TZ, 2026, 6, 1, 9, 45)  # both see the drain timed out
        await asyncio.gather(make_scheduler(settings, db, mqtt).tick(later),
                             make_scheduler(settings, db, other).tick(later))
    finally:
        await other.stop()
    assert [e["type"] for e in await events(db, zone, *EVENTS)] == ["WATER_CHANGE_STARTED", "WATER_CHANGE_STEP"]
    assert (await state(db, zone))["water_state"] == "WATER_CHANGE_FILL"
    await mqtt_probe.wait_for(3, f"{settings.mqtt_topic_root}/#")
    await asyncio.sleep(0.3)
    assert len(mqtt_probe.received(f"{settings.mqtt_topic_root}/#")) == 3  # drain on; drain off, fill on


async def test_drain_without_level_data_moves_on_after_its_timeout(settings, db, mqtt, mqtt_probe):
    zone = await water_zone(db)
    sched = make_scheduler(settings, db, mqtt)
    await sched.tick(local(TZ, 2026, 6, 1, 9, 0, 30))
    await sched.tick(local(TZ, 2026, 6, 1, 9, 29))
    assert (await state(db, zone))["water_state"] == "WATER_CHANGE_DRAIN"
    await sched.tick(local(TZ, 2026, 6, 1, 9, 31))
    assert (await state(db, zone))["water_state"] == "WATER_CHANGE_FILL"
    [step] = await events(db, zone, "WATER_CHANGE_STEP")
    assert step["details"]["reason"] == "timeout" and step["details"]["level"] is None


async def test_solution_past_its_maximum_age_is_changed_at_once(settings, db, mqtt, mqtt_probe):
    zone = await water_zone(db, age_days=11)
    sched = make_scheduler(settings, db, mqtt)
    await sched.tick(local(TZ, 2026, 6, 1, 15, 0))
    assert (await state(db, zone))["water_state"] == "WATER_CHANGE_DRAIN"
    [started] = await events(db, zone, "WATER_CHANGE_STARTED")
    assert started["details"]["reason"] == "max_age"


async def test_no_valves_no_change_and_unknown_age_gets_a_baseline(settings, db, mqtt, mqtt_probe):
    no_valves = await water_zone(db, valves=False)
    unknown_age = await water_zone(db, age_days=None)
    now = local(TZ, 2026, 6, 1, 9, 0, 30)
    await make_scheduler(settings, db, mqtt).tick(now)
    assert (await state(db, no_valves))["water_state"] == "NORMAL_RECIRC"
    assert await db.fetchval("SELECT count(*) FROM scheduler_runs") == 0
    row = await state(db, unknown_age)
    assert row["water_state"] == "NORMAL_RECIRC" and row["solution_started_at"] == now.replace(
        tzinfo=None, microsecond=0)


async def test_bad_water_change_settings_are_reported(settings, db, mqtt, mqtt_probe):
    zone = await water_zone(db, change={"time_of_day": "9am", "interval_days": -1})
    await make_scheduler(settings, db, mqtt).tick(local(TZ, 2026, 6, 1, 8, 0))
    keys = sorted(e["details"]["key"] for e in await events(db, zone, "SCHEDULE_SPEC_INVALID"))
    assert keys == ["water_cycle.water_change.interval_days", "water_cycle.water_change.time_of_day"]
