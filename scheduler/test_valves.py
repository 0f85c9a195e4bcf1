"""No valve left open: the firmware ignores set_relay's duration_ms, so the scheduler closes what it opened —
also when it is killed in between. Real scheduler and history-logger processes, the node simulator
behaving as the firmware does; and the catch-up burst of issue 15."""
import asyncio
import datetime as dt

import pytest

import irrigation
import water_cycle
from common import testing
from runs import claim, command_statuses
from schedules import load_schedules
from testing import Clock, add_node, events, local, make_scheduler, make_zone, node_answers, set_metric
from tests.stack import simulator
from tools.node_sim import Simulator
from test_water_cycle import state, water_zone
from tools.node_sim.layout import NodeSpec, actuator, hardware_id_for, sensor

TZ = "Europe/Berlin"


def simulate(settings, uid: str, gh_uid: str, zone: int, channels) -> Simulator:
    return simulator(settings, [NodeSpec(uid, "irrig", hardware_id_for(uid), gh_uid, zone, channels)],
                     poll_ms=500, heartbeat_sec=2)


async def until(check, timeout: float = 60, message: str = "condition"):
    async def probe():
        return check()
    return await testing.eventually(probe, timeout, 0.1, message)


async def test_scheduled_valve_is_closed_after_its_duration_across_a_killed_scheduler(settings, db):
    settings = settings.replace(scheduler_port=testing.free_port(), history_logger_port=testing.free_port(),
                                history_logger_metrics_port=testing.free_port())
    now = dt.datetime.now(dt.timezone.utc)
    zone = await make_zone(db, tz="UTC", targets={
        "irrigation_schedule": now.strftime("%H:%M"), "irrigation_duration_sec": 12})
    gh_uid = await db.fetchval("SELECT g.uid FROM zones z JOIN greenhouses g ON g.id = z.greenhouse_id"
                               " WHERE z.id = $1", zone)
    await add_node(db, zone, "nd-valve", "irrig", [("valve_irrigation", "actuator", None),
                                                   ("water_level", "sensor", None)])
    sim = simulate(settings, "nd-valve", gh_uid, zone, [actuator("valve_irrigation"),
                                                         sensor("water_level", "WATER_LEVEL", 500)])
    node = sim.node("nd-valve")
    env = dict(testing.settings_env(settings), SCHEDULER_INTERVAL_SEC="1", SCHEDULER_FOLLOWUP_POLL_SEC="0.2",
               COMMAND_TIMEOUT_SEC="5", COMMAND_TIMEOUT_SWEEP_SEC="1", TELEMETRY_FLUSH_MS="100")
    await db.execute("UPDATE nodes SET validated = true, last_seen_at = now() WHERE uid = 'nd-valve'")
    logger = testing.ServiceProcess("history-logger", env).start()
    scheduler = None
    try:
        await testing.eventually(lambda: db.fetchval(
            "SELECT 1 FROM telemetry_last WHERE zone_id = $1 AND metric_type = 'WATER_LEVEL'", zone), 30, 0.2,
            "the logger stores the node telemetry")
        assert await db.fetchval("SELECT status FROM nodes WHERE uid = 'nd-valve'") == "online"
        scheduler = testing.ServiceProcess("scheduler", env).start()
        # The start-up tick fires the current minute (catch-up window): the valve opens.
        await until(lambda: node.open_relays() == ["valve_irrigation"], message="valve opened")
        opened_at = asyncio.get_running_loop().time()
        scheduler.kill()  # SIGKILL while the valve is open: nothing in memory survives
        await asyncio.sleep(1)
        assert node.open_relays() == ["valve_irrigation"]  # the node does not close it by itself
        scheduler = testing.ServiceProcess("scheduler", env).start()
        await until(lambda: node.open_relays() == [], message="valve closed after the restart")
        assert asyncio.get_running_loop().time() - opened_at >= 10  # not before the duration was over
        run = await testing.eventually(lambda: db.fetchrow(
            "SELECT * FROM scheduler_runs WHERE zone_id = $1 AND status <> 'running'", zone), 30, 0.2,
            "run finished")
    finally:
        if scheduler is not None:
            scheduler.terminate()
        logger.terminate()
        sim.stop()
        sim.clear_retained()
    assert run["status"] == "completed", dict(run)
    # (killed before it wrote IRRIGATION_STARTED, the restarted scheduler writes it, marked recovered)
    assert [e["type"] for e in await events(db, zone, "IRRIGATION_STARTED", "IRRIGATION_FINISHED")] == [
        "IRRIGATION_STARTED", "IRRIGATION_FINISHED"]
    assert await db.fetchval("SELECT count(*) FROM scheduler_runs WHERE zone_id = $1", zone) == 1  # never refired
    close = await db.fetchrow("SELECT * FROM actuator_closes WHERE zone_id = $1", zone)
    assert close["done_at"] is not None and close["error"] is None
    assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = $1", close["cmd_id"]) == "ack"


async def test_catch_up_fires_only_the_latest_time_and_records_the_rest_missed(settings, db, mqtt, mqtt_probe):
    times = "07:57,07:58,07:59,08:00,08:01"
    zone = await make_zone(db, targets={"irrigation_schedule": times, "irrigation_duration_sec": 20})
    await add_node(db, zone, f"nd-irr-{zone}", "irrig", [("pump_in", "actuator", None)])
    sched = make_scheduler(settings, db, mqtt)  # a fresh database: no previous tick
    claimed = await sched.tick(local(TZ, 2026, 6, 1, 8, 1, 30))
    runs = {r["item"]: r for r in await db.fetch("SELECT * FROM scheduler_runs WHERE zone_id = $1", zone)}
    assert [f.item for f in claimed if f.status == "running"] == ["irrigation@08:01"]
    assert {item: r["status"] for item, r in runs.items()} == {
        "irrigation@07:57": "missed", "irrigation@07:58": "missed", "irrigation@07:59": "missed",
        "irrigation@08:00": "missed", "irrigation@08:01": "running"}
    assert runs["irrigation@08:00"]["details"]["reason"] == "superseded"
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/+/+/pump_in/command")
    await asyncio.sleep(0.3)
    assert len(mqtt_probe.received(f"{settings.mqtt_topic_root}/+/+/+/pump_in/command")) == 1  # no burst
    assert len(await events(db, zone, "IRRIGATION_STARTED")) == 1


@pytest.mark.parametrize("answer", ["refused", "timeout"])
async def test_a_run_whose_command_failed_is_failed_not_completed(settings, db, mqtt, answer):
    zone = await make_zone(db, targets={"irrigation_schedule": "08:00", "irrigation_duration_sec": 20})
    await add_node(db, zone, f"nd-irr-{zone}", "irrig", [("pump_in", "actuator", None)])
    clock = Clock(local(TZ, 2026, 6, 1, 8, 0, 30))
    sched = make_scheduler(settings, db, mqtt, clock)
    [firing] = await sched.tick()
    # Not answered yet when the duration is over: the finish waits for the answer (or the timeout sweep).
    assert await sched.run_followups(clock.now + dt.timedelta(seconds=21)) == 1
    assert await db.fetchval("SELECT status FROM scheduler_runs WHERE id = $1", firing.run_id) == "running"
    if answer == "refused":
        await node_answers(db, firing.run_id, "ERROR", "pump_busy")
    else:
        from common.commands import sweep_timeouts
        await db.execute("UPDATE commands SET sent_at = now() - interval '1 hour'")
        await sweep_timeouts(db, 30)
    assert await sched.run_followups(clock.now + dt.timedelta(seconds=27)) == 1
    run = await db.fetchrow("SELECT status, details FROM scheduler_runs WHERE id = $1", firing.run_id)
    assert run["status"] == "failed" and run["details"]["error"] == "commands_failed"
    assert [c["status"] for c in run["details"]["commands"]] == ["failed" if answer == "refused" else "timeout"]
    assert await events(db, zone, "IRRIGATION_FINISHED") == []
    logs = await db.fetch("SELECT status FROM scheduler_logs WHERE task_name = 'irrigation' ORDER BY id")
    assert [r["status"] for r in logs] == ["running", "failed"]
    [row] = await command_statuses(db, firing.run_id)
    assert row["status"] == ("failed" if answer == "refused" else "timeout")


async def test_a_run_never_answered_is_judged_after_the_command_timeout(settings, db, mqtt):
    zone = await make_zone(db, targets={"irrigation_schedule": "08:00", "irrigation_duration_sec": 20})
    await add_node(db, zone, f"nd-irr-{zone}", "irrig", [("pump_in", "actuator", None)])
    clock = Clock(local(TZ, 2026, 6, 1, 8, 0, 30))
    sched = make_scheduler(settings, db, mqtt, clock)
    [firing] = await sched.tick()
    late = clock.now + dt.timedelta(seconds=20 + settings.command_timeout_sec + 11)
    assert await sched.run_followups(late) == 1
    run = await db.fetchrow("SELECT status, details FROM scheduler_runs WHERE id = $1", firing.run_id)
    assert run["status"] == "failed" and run["details"]["commands"][0]["status"] == "sent"


async def test_no_valve_is_left_open_by_a_water_change_even_when_the_scheduler_dies_at_a_step(
        settings, db, mqtt, monkeypatch):
    zone = await water_zone(db)
    gh_uid = await db.fetchval("SELECT g.uid FROM zones z JOIN greenhouses g ON g.id = z.greenhouse_id"
                               " WHERE z.id = $1", zone)
    sim = simulate(settings, f"nd-water-{zone}", gh_uid, zone, [actuator("valve_drain"), actuator("valve_fill")])
    node = sim.node(f"nd-water-{zone}")
    try:
        await make_scheduler(settings, db, mqtt).tick(local(TZ, 2026, 6, 1, 9, 0, 30))
        await until(lambda: node.open_relays() == ["valve_drain"], message="drain opened")

        # Drained: the step to FILL commits, then this scheduler dies before it sends the drain's close.
        async def dies(*args, **kwargs):
            raise RuntimeError("killed after the step committed")
        monkeypatch.setattr(water_cycle, "run_due", dies)
        await set_metric(db, zone, "WATER_LEVEL", 0.05, local(TZ, 2026, 6, 1, 9, 10))
        await make_scheduler(settings, db, mqtt).tick(local(TZ, 2026, 6, 1, 9, 10, 30))
        assert (await state(db, zone))["water_state"] == "WATER_CHANGE_FILL"
        await asyncio.sleep(0.3)
        assert node.open_relays() == ["valve_drain"]  # the close is only on record
        monkeypatch.undo()

        # The restarted scheduler's follow-up loop sends it; the next step's closes go out at once.
        await make_scheduler(settings, db, mqtt).run_followups(local(TZ, 2026, 6, 1, 9, 10, 31))
        await until(lambda: node.open_relays() == [], message="drain closed")
        restarted = make_scheduler(settings, db, mqtt)
        await restarted.tick(local(TZ, 2026, 6, 1, 9, 11))  # (the fill valve stays shut: it was never opened)
        await set_metric(db, zone, "WATER_LEVEL", 0.95, local(TZ, 2026, 6, 1, 9, 20))
        await restarted.tick(local(TZ, 2026, 6, 1, 9, 20, 30))
        assert (await state(db, zone))["water_state"] == "WATER_CHANGE_STABILIZE"
        await until(lambda: node.open_relays() == [], message="fill closed")
        await restarted.tick(local(TZ, 2026, 6, 1, 9, 31))
        assert (await state(db, zone))["water_state"] == "NORMAL_RECIRC"
        # the safety closes fall due later: harmless, and nothing is open
        await restarted.run_followups(local(TZ, 2026, 6, 1, 10, 30))
        await asyncio.sleep(0.3)
        assert node.open_relays() == []
    finally:
        sim.stop()
        sim.clear_retained()
    assert await db.fetchval("SELECT count(*) FROM actuator_closes WHERE zone_id = $1 AND done_at IS NULL", zone) == 0


async def test_a_run_whose_scheduler_died_while_starting_it_is_still_judged(settings, db, mqtt, monkeypatch):
    zone = await make_zone(db, targets={"irrigation_schedule": "08:00", "irrigation_duration_sec": 20})
    await add_node(db, zone, f"nd-irr-{zone}", "irrig", [("pump_in", "actuator", None)])
    clock = Clock(local(TZ, 2026, 6, 1, 8, 0, 30))

    def dies_once_sent(*args):  # the command is out; the scheduler dies before recording it
        raise RuntimeError("killed")
    monkeypatch.setattr(irrigation, "_record_start", dies_once_sent)
    sched = make_scheduler(settings, db, mqtt, clock)
    with pytest.raises(RuntimeError):
        await irrigation.fire(sched.ctx, *(await _claimed(settings, db, mqtt, clock)))
    monkeypatch.undo()
    [row] = await db.fetch("SELECT id FROM scheduler_runs WHERE zone_id = $1", zone)
    await node_answers(db, row["id"])
    restarted = make_scheduler(settings, db, mqtt, clock)
    assert await restarted.run_followups(clock.now + dt.timedelta(seconds=21)) == 1
    run = await db.fetchrow("SELECT status, details FROM scheduler_runs WHERE id = $1", row["id"])
    assert run["status"] == "completed"
    started, finished = await events(db, zone, "IRRIGATION_STARTED", "IRRIGATION_FINISHED")
    assert started["details"]["recovered"] is True and finished["type"] == "IRRIGATION_FINISHED"


async def _claimed(settings, db, mqtt, clock):
    """The firing a tick would claim, claimed but not executed (the scheduler dies next)."""
    sched = make_scheduler(settings, db, mqtt, clock)
    zones = await load_schedules(db, 60)
    [firing] = await claim(db, sched.due(zones, clock.now - dt.timedelta(minutes=1), clock.now), clock.now)
    return firing, clock.now


async def test_a_refused_start_is_no_dry_run_alarm(settings, db, mqtt):
    zone = await make_zone(db, targets={"irrigation_schedule": "08:00", "irrigation_duration_sec": 20},
                           capabilities={"flow_sensor": True})
    await add_node(db, zone, f"nd-irr-{zone}", "irrig", [("pump_in", "actuator", None)])
    clock = Clock(local(TZ, 2026, 6, 1, 8, 0, 30))
    sched = make_scheduler(settings, db, mqtt, clock)
    [firing] = await sched.tick()
    await node_answers(db, firing.run_id, "ERROR", "pump_busy")
    assert await sched.run_followups(clock.now + dt.timedelta(seconds=3)) == 1  # the dry-run check
    assert await sched.run_followups(clock.now + dt.timedelta(seconds=3)) == 1  # the finish, at once
    run = await db.fetchrow("SELECT status, details FROM scheduler_runs WHERE id = $1", firing.run_id)
    assert run["status"] == "failed" and run["details"]["error"] == "commands_failed"
    assert await events(db, zone, "PUMP_STOPPED", "NO_FLOW", "IRRIGATION_FINISHED") == []
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE zone_id = $1", zone) == 0
