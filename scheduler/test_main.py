"""Irrigation firing against real PostgreSQL and Mosquitto: once inside its window, never twice."""
import asyncio
import datetime as dt

import orjson
import pytest
from prometheus_client import REGISTRY

from common.mqtt import MqttClient
from runs import command_statuses
from testing import Clock, add_node, events, local, make_scheduler, make_zone, node_answers, set_metric

TZ = "Europe/Berlin"
PUMP_LIMITS = {"safe_limits": {"max_duration_ms": 30000, "min_off_ms": 3000}}


async def irrigated_zone(db, **kwargs):
    targets = kwargs.pop("targets", {"irrigation_schedule": "08:00", "irrigation_duration_sec": 20})
    zone = await make_zone(db, targets=targets, **kwargs)
    await add_node(db, zone, f"nd-irr-{zone}", "irrig", [("pump_in", "actuator", PUMP_LIMITS),
                                                        ("flow_sensor", "sensor", None)])
    return zone


def commands_on(probe, settings, channel="pump_in"):
    return probe.payloads(f"{settings.mqtt_topic_root}/+/+/+/{channel}/command")


async def settle():
    await asyncio.sleep(0.3)  # time for a stray second publish to arrive before asserting there was none


async def test_a_time_inside_the_window_fires_once(settings, db, mqtt, mqtt_probe):
    zone = await irrigated_zone(db)
    sched = make_scheduler(settings, db, mqtt)
    now = local(TZ, 2026, 6, 1, 8, 0, 30)
    claimed = await sched.tick(now)
    assert [f.item for f in claimed] == ["irrigation@08:00"]
    [msg] = await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/zn-{zone}/nd-irr-{zone}/pump_in/command")
    body = orjson.loads(msg.payload)
    assert (body["cmd"], body["duration_ms"], body["params"]) == ("run_pump", 20000, {"duration_ms": 20000})
    cmd = await db.fetchrow("SELECT * FROM commands WHERE cmd_id = $1", body["cmd_id"])
    assert (cmd["status"], cmd["source"], cmd["zone_id"]) == ("sent", "scheduler", zone)
    run = await db.fetchrow("SELECT * FROM scheduler_runs WHERE zone_id = $1", zone)
    assert (run["kind"], run["item"], run["status"]) == ("irrigation", "irrigation@08:00", "running")
    assert run["scheduled_local"] == dt.datetime(2026, 6, 1, 8, 0)
    [started] = await events(db, zone, "IRRIGATION_STARTED")
    assert started["details"]["nodes_count"] == 1 and started["details"]["duration_sec"] == 20
    assert started["details"]["cmd_ids"] == [body["cmd_id"]]
    logs = await db.fetch("SELECT status FROM scheduler_logs WHERE task_name = 'irrigation'")
    assert [r["status"] for r in logs] == ["running"]

    # The same window evaluated again (same scheduler, and one that forgot its last tick): nothing more.
    assert await sched.tick(now) == []
    sched.last_tick = None
    assert await sched.tick(now + dt.timedelta(seconds=20)) == []
    await settle()
    assert len(commands_on(mqtt_probe, settings)) == 1


async def test_command_status_of_a_run_is_visible(settings, db, mqtt, mqtt_probe):
    zone = await irrigated_zone(db)
    sched = make_scheduler(settings, db, mqtt)
    [firing] = await sched.tick(local(TZ, 2026, 6, 1, 8, 1))
    [row] = await command_statuses(db, firing.run_id)
    assert (row["status"], row["cmd"], row["channel"], row["zone_id"]) == ("sent", "run_pump", "pump_in", zone)
    await db.execute("UPDATE commands SET status = 'ack', ack_at = now() WHERE cmd_id = $1", row["cmd_id"])
    [row] = await command_statuses(db, firing.run_id)
    assert row["status"] == "ack" and row["ack_at"] is not None


async def test_a_late_tick_still_fires_the_missed_time(settings, db, mqtt, mqtt_probe):
    zone = await irrigated_zone(db)
    sched = make_scheduler(settings, db, mqtt)
    assert await sched.tick(local(TZ, 2026, 6, 1, 7, 59, 10)) == []
    claimed = await sched.tick(local(TZ, 2026, 6, 1, 8, 2, 10))  # 3 minutes late
    assert [f.item for f in claimed] == ["irrigation@08:00"]
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/zn-{zone}/+/pump_in/command")


async def test_a_time_beyond_the_catchup_window_is_recorded_missed_not_fired(settings, db, mqtt, mqtt_probe):
    zone = await irrigated_zone(db)
    sched = make_scheduler(settings, db, mqtt, catchup_sec=300)
    missed = REGISTRY.get_sample_value("scheduler_missed_total", {"kind": "irrigation"}) or 0
    await sched.tick(local(TZ, 2026, 6, 1, 7, 59))
    claimed = await sched.tick(local(TZ, 2026, 6, 1, 8, 20))  # the loop was held up for 21 minutes
    assert [(f.item, f.status) for f in claimed] == [("irrigation@08:00", "missed")]
    run = await db.fetchrow("SELECT status FROM scheduler_runs WHERE zone_id = $1", zone)
    assert run["status"] == "missed"
    assert REGISTRY.get_sample_value("scheduler_missed_total", {"kind": "irrigation"}) == missed + 1
    await settle()
    assert commands_on(mqtt_probe, settings) == []


async def test_times_skipped_by_a_downtime_are_recorded_missed_after_restart(settings, db, mqtt, mqtt_probe):
    zone = await irrigated_zone(db, targets={"irrigation_schedule": "07:00,08:00,08:27"})
    await make_scheduler(settings, db, mqtt).tick(local(TZ, 2026, 6, 1, 7, 50))  # then the process dies
    claimed = await make_scheduler(settings, db, mqtt, catchup_sec=300).tick(local(TZ, 2026, 6, 1, 8, 30))
    assert [(f.item, f.status) for f in claimed] == [("irrigation@08:00", "missed"), ("irrigation@08:27", "running")]
    runs = await db.fetch("SELECT item, status FROM scheduler_runs WHERE zone_id = $1 ORDER BY scheduled_at", zone)
    assert [(r["item"], r["status"]) for r in runs] == [("irrigation@08:00", "missed"), ("irrigation@08:27", "running")]
    await settle()
    assert len(commands_on(mqtt_probe, settings)) == 1


async def test_first_tick_after_start_does_not_fire_old_times(settings, db, mqtt, mqtt_probe):
    await irrigated_zone(db, targets={"irrigation_schedule": ["06:00", "09:58"]})
    sched = make_scheduler(settings, db, mqtt, catchup_sec=300)
    claimed = await sched.tick(local(TZ, 2026, 6, 1, 10, 0))
    assert [f.item for f in claimed] == ["irrigation@09:58"]  # within the catch-up window; 06:00 is not


async def test_a_restart_does_not_refire(settings, db, mqtt, mqtt_probe):
    zone = await irrigated_zone(db)
    first = make_scheduler(settings, db, mqtt)
    assert len(await first.tick(local(TZ, 2026, 6, 1, 8, 0, 5))) == 1
    restarted = make_scheduler(settings, db, mqtt)  # fresh memory, its catch-up window covers 08:00
    assert await restarted.tick(local(TZ, 2026, 6, 1, 8, 1, 5)) == []
    await settle()
    assert len(commands_on(mqtt_probe, settings)) == 1
    assert await db.fetchval("SELECT count(*) FROM scheduler_runs WHERE zone_id = $1", zone) == 1


async def test_two_schedulers_on_one_database_fire_once(settings, db, mqtt, mqtt_probe):
    zones = [await irrigated_zone(db) for _ in range(5)]
    other_mqtt = MqttClient(settings, "-scheduler-2")
    await other_mqtt.start(wait=10)
    try:
        a = make_scheduler(settings, db, mqtt)
        b = make_scheduler(settings, db, other_mqtt)
        now = local(TZ, 2026, 6, 1, 8, 0, 40)
        got_a, got_b = await asyncio.gather(a.tick(now), b.tick(now))
    finally:
        await other_mqtt.stop()
    assert len(got_a) + len(got_b) == 5
    await mqtt_probe.wait_for(5, f"{settings.mqtt_topic_root}/+/+/+/pump_in/command")
    await settle()
    assert sorted(int(m.topic.split("/")[2][3:]) for m in
                  mqtt_probe.received(f"{settings.mqtt_topic_root}/+/+/+/pump_in/command")) == zones


@pytest.mark.parametrize("day, expected_utc, fired", [
    # 02:30 does not exist: it falls due at 03:30 CEST, the same instant as 03:30 itself, so only
    # one of the two is sent to the pump (the other is recorded missed, superseded).
    (dt.date(2026, 3, 29), dt.datetime(2026, 3, 29, 1, 30), 2),
    (dt.date(2026, 10, 25), dt.datetime(2026, 10, 25, 0, 30), 3),  # 02:30 exists twice: fires at the first
])
async def test_dst_transition_day_fires_each_local_time_once(settings, db, mqtt, mqtt_probe, day, expected_utc,
                                                              fired):
    zone = await irrigated_zone(db, targets={"irrigation_schedule": "01:30,02:30,03:30"})
    sched = make_scheduler(settings, db, mqtt)
    start = local(TZ, day.year, day.month, day.day, 0, 0) - dt.timedelta(hours=1)
    for step in range(0, 6 * 12):  # every 5 minutes for 6 hours, across the transition
        await sched.tick(start + dt.timedelta(minutes=5 * step, seconds=7))
        # the same 5 minutes for the pump's min_off, which the database measures on its own clock
        await db.execute("UPDATE commands SET sent_at = sent_at - interval '5 minutes'")
    runs = await db.fetch("SELECT item, scheduled_at FROM scheduler_runs WHERE zone_id = $1 ORDER BY scheduled_at",
                          zone)
    assert [r["item"] for r in runs] == ["irrigation@01:30", "irrigation@02:30", "irrigation@03:30"]
    assert runs[1]["scheduled_at"] == expected_utc
    await mqtt_probe.wait_for(fired, f"{settings.mqtt_topic_root}/+/+/+/pump_in/command")
    await settle()
    assert len(commands_on(mqtt_probe, settings)) == fired


async def test_water_level_low_blocks_irrigation(settings, db, mqtt, mqtt_probe):
    zone = await irrigated_zone(db)
    now = local(TZ, 2026, 6, 1, 8, 0, 30)
    await set_metric(db, zone, "WATER_LEVEL", 0.12, now)
    sched = make_scheduler(settings, db, mqtt)
    await sched.tick(now)
    alert = await db.fetchrow("SELECT * FROM alerts WHERE zone_id = $1", zone)
    assert (alert["type"], alert["code"], alert["status"]) == ("WATER_LEVEL_LOW", "biz_dry_run", "ACTIVE")
    run = await db.fetchrow("SELECT status, details FROM scheduler_runs WHERE zone_id = $1", zone)
    assert run["status"] == "failed" and run["details"]["error"] == "water_level_low"
    logs = await db.fetch("SELECT status, details FROM scheduler_logs ORDER BY id")
    assert [r["status"] for r in logs] == ["running", "failed"]
    assert logs[1]["details"]["error"] == "water_level_low"
    await settle()
    assert commands_on(mqtt_probe, settings) == []


async def test_all_online_irrigation_nodes_get_the_command(settings, db, mqtt, mqtt_probe):
    zone = await make_zone(db, targets={"irrigation_schedule": ["08:00"], "irrigation_duration_sec": 120})
    await add_node(db, zone, "nd-pump", "pump", [("pump_in", "actuator", PUMP_LIMITS)])
    await add_node(db, zone, "nd-valve", "irrig", [("valve_irrigation", "actuator", None)])
    await add_node(db, zone, "nd-off", "irrig", [("pump_in", "actuator", None)], status="offline")
    await add_node(db, zone, "nd-ph", "ph", [("pump_acid", "actuator", None)])
    sched = make_scheduler(settings, db, mqtt)
    await sched.tick(local(TZ, 2026, 6, 1, 8, 0, 30))
    root = settings.mqtt_topic_root
    [pump] = (await mqtt_probe.wait_for(1, f"{root}/+/+/nd-pump/pump_in/command"))
    [valve] = (await mqtt_probe.wait_for(1, f"{root}/+/+/nd-valve/valve_irrigation/command"))
    pump, valve = orjson.loads(pump.payload), orjson.loads(valve.payload)
    assert (pump["cmd"], pump["duration_ms"]) == ("run_pump", 30000)  # capped by the channel's safe_limits
    assert (valve["cmd"], valve["state"], valve["duration_ms"]) == ("set_relay", True, 120000)
    await settle()
    assert len(mqtt_probe.received(f"{root}/#")) == 2


async def test_no_flow_after_start_stops_the_pumps(settings, db, mqtt, mqtt_probe):
    zone = await irrigated_zone(db, capabilities={"flow_sensor": True, "irrigation_control": True})
    clock = Clock(local(TZ, 2026, 6, 1, 8, 0, 30))
    sched = make_scheduler(settings, db, mqtt, clock)
    [firing] = await sched.tick()
    assert await sched.run_followups(clock.now + dt.timedelta(seconds=1)) == 0  # not due yet
    assert await sched.run_followups(clock.now + dt.timedelta(seconds=3)) == 1
    root = settings.mqtt_topic_root
    msgs = await mqtt_probe.wait_for(2, f"{root}/+/+/+/pump_in/command")
    assert [orjson.loads(m.payload)["cmd"] for m in msgs] == ["run_pump", "stop_pump"]
    types = [e["type"] for e in await events(db, zone, "IRRIGATION_STARTED", "PUMP_STOPPED", "NO_FLOW",
                                             "IRRIGATION_FINISHED")]
    assert types == ["IRRIGATION_STARTED", "PUMP_STOPPED", "NO_FLOW", "IRRIGATION_FINISHED"]
    [stopped] = await events(db, zone, "PUMP_STOPPED")
    assert stopped["details"]["reason"] == "dry_run_detected"
    run = await db.fetchrow("SELECT status, details FROM scheduler_runs WHERE id = $1", firing.run_id)
    assert run["status"] == "failed" and run["details"]["error"] == "dry_run_detected"
    assert len(await command_statuses(db, firing.run_id)) == 2  # the start and the stop
    assert await sched.run_followups(clock.now + dt.timedelta(minutes=5)) == 0


async def test_flow_seen_then_finished_after_the_duration(settings, db, mqtt, mqtt_probe):
    zone = await irrigated_zone(db, capabilities={"flow_sensor": True})
    clock = Clock(local(TZ, 2026, 6, 1, 8, 0, 30))
    sched = make_scheduler(settings, db, mqtt, clock)
    [firing] = await sched.tick()
    await node_answers(db, firing.run_id)
    await set_metric(db, zone, "FLOW_RATE", 1.5, clock.now + dt.timedelta(seconds=2))
    assert await sched.run_followups(clock.now + dt.timedelta(seconds=3)) == 1  # flow ok: carry on
    assert await sched.run_followups(clock.now + dt.timedelta(seconds=10)) == 0  # 20 s not over yet
    assert await sched.run_followups(clock.now + dt.timedelta(seconds=21)) == 1
    [finished] = await events(db, zone, "IRRIGATION_FINISHED")
    assert finished["details"]["actual_duration_sec"] == 20 and finished["details"]["volume_l"] == 0.5
    assert await events(db, zone, "PUMP_STOPPED") == []
    run = await db.fetchrow("SELECT status FROM scheduler_runs WHERE id = $1", firing.run_id)
    assert run["status"] == "completed"
    logs = await db.fetch("SELECT status FROM scheduler_logs ORDER BY id")
    assert [r["status"] for r in logs] == ["running", "completed"]


async def test_without_flow_sensor_there_is_no_dry_run_stop(settings, db, mqtt, mqtt_probe):
    zone = await irrigated_zone(db, capabilities={"flow_sensor": False})
    clock = Clock(local(TZ, 2026, 6, 1, 8, 0, 30))
    sched = make_scheduler(settings, db, mqtt, clock)
    [firing] = await sched.tick()
    await node_answers(db, firing.run_id)
    assert await sched.run_followups(clock.now + dt.timedelta(seconds=5)) == 0
    assert await sched.run_followups(clock.now + dt.timedelta(seconds=20)) == 1
    assert [e["type"] for e in await events(db, zone, "PUMP_STOPPED", "NO_FLOW", "IRRIGATION_FINISHED")] == [
        "IRRIGATION_FINISHED"]
    await settle()
    assert [p["cmd"] for p in commands_on(mqtt_probe, settings)] == ["run_pump"]


async def test_bad_specs_are_reported_once_and_skipped(settings, db, mqtt, mqtt_probe):
    bad = await irrigated_zone(db, targets={"irrigation_schedule": "25:00", "lighting_schedule": "dusk-dawn"})
    good = await irrigated_zone(db)
    before = REGISTRY.get_sample_value("scheduler_bad_specs_total", {"key": "irrigation_schedule"}) or 0
    sched = make_scheduler(settings, db, mqtt)
    await sched.tick(local(TZ, 2026, 6, 1, 7, 59))
    await sched.tick(local(TZ, 2026, 6, 1, 8, 0, 1))
    reported = await events(db, bad, "SCHEDULE_SPEC_INVALID")
    assert sorted(e["details"]["key"] for e in reported) == ["irrigation_schedule", "lighting_schedule"]
    assert "hour must be 00-23" in next(e for e in reported if e["details"]["key"] == "irrigation_schedule")[
        "details"]["reason"]
    assert REGISTRY.get_sample_value("scheduler_bad_specs_total", {"key": "irrigation_schedule"}) == before + 1
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/zn-{good}/+/pump_in/command")


async def test_inactive_zones_are_not_scheduled(settings, db, mqtt, mqtt_probe):
    await irrigated_zone(db, status="PAUSED")
    running = await irrigated_zone(db, status="RUNNING")
    sched = make_scheduler(settings, db, mqtt)
    claimed = await sched.tick(local(TZ, 2026, 6, 1, 8, 0, 30))
    assert [f.zone.zone_id for f in claimed] == [running]
    assert REGISTRY.get_sample_value("active_schedules") == 1


async def test_one_zone_failing_does_not_stop_the_others(settings, db, mqtt, mqtt_probe):
    broken, fine = await irrigated_zone(db), await irrigated_zone(db)
    sched = make_scheduler(settings, db, mqtt)
    real = sched.planners["irrigation"]

    def explode_for_one(s, firing, facts, now):
        if firing.zone.zone_id == broken:
            raise RuntimeError("boom")
        return real(s, firing, facts, now)
    sched.planners["irrigation"] = explode_for_one
    await sched.tick(local(TZ, 2026, 6, 1, 8, 0, 30))
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/zn-{fine}/+/pump_in/command")
    runs = {r["zone_id"]: r for r in await db.fetch("SELECT zone_id, status, details FROM scheduler_runs")}
    assert runs[broken]["status"] == "failed" and runs[broken]["details"]["message"] == "boom"
    assert runs[fine]["status"] == "running"


async def test_a_firing_whose_records_fail_is_failed_alone_and_sends_nothing(settings, db, mqtt, mqtt_probe):
    broken, fine = await irrigated_zone(db), await irrigated_zone(db)
    sched = make_scheduler(settings, db, mqtt)
    real = sched.planners["irrigation"]

    def bad_record_for_one(s, firing, facts, now):
        step = real(s, firing, facts, now)
        if firing.zone.zone_id == broken:  # a record the database refuses: the batch write fails
            step.before.call(lambda conn: conn.execute("SELECT 1 / 0"))
        return step
    sched.planners["irrigation"] = bad_record_for_one
    await sched.tick(local(TZ, 2026, 6, 1, 8, 0, 30))
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/zn-{fine}/+/pump_in/command")
    runs = {r["zone_id"]: r for r in await db.fetch("SELECT zone_id, status, details FROM scheduler_runs")}
    assert runs[broken]["status"] == "failed" and runs[broken]["details"]["error"] == "internal"
    assert runs[fine]["status"] == "running" and runs[fine]["details"]["targets"]
    await settle()
    assert await db.fetchval("SELECT count(*) FROM commands WHERE zone_id = $1", broken) == 0
    assert await db.fetchval("SELECT count(*) FROM scheduler_run_commands rc JOIN scheduler_runs r"
                             " ON r.id = rc.run_id WHERE r.zone_id = $1", broken) == 0


async def test_nothing_is_claimed_while_the_broker_is_down(settings, db, mqtt_probe):
    zone = await irrigated_zone(db)
    client = MqttClient(settings, "-scheduler")
    sched = make_scheduler(settings, db, client)
    assert await sched.tick(local(TZ, 2026, 6, 1, 8, 0, 10)) == []  # not connected: skipped, nothing claimed
    assert sched.last_tick is None
    await client.start(wait=10)
    try:
        claimed = await sched.tick(local(TZ, 2026, 6, 1, 8, 1, 10))
    finally:
        await client.stop()
    assert [f.item for f in claimed] == ["irrigation@08:00"]
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/zn-{zone}/+/pump_in/command")
