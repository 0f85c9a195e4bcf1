"""Durable valve closes against real PostgreSQL, Mosquitto and the simulated firmware: a close the node
never got is sent again; one close per relay; retries keep their cmd_id until the node answers."""
import datetime as dt

from common import testing
from common.actuator_closes import MAX_ATTEMPTS, run_due, schedule_close
from common.commands import issue_command, sweep_timeouts
from common.topics import Topics
from tools.node_sim import SimOptions, Simulator
from tools.node_sim.layout import NodeSpec, actuator, hardware_id_for

NOW = dt.datetime(2026, 6, 1, 8, 0)


async def valve_zone(db) -> int:
    zone = await testing.seed_zone(db, "gh-1", "Z")
    await testing.seed_node(db, "nd-valve", zone, type="irrig", status="online", channels=["valve_irrigation"])
    return zone


async def until(check, message):
    async def probe():
        return check()
    return await testing.eventually(probe, 15, 0.05, message)


async def test_a_close_the_node_never_got_is_sent_again(settings, db, mqtt):
    zone = await valve_zone(db)
    topics = Topics(settings.mqtt_topic_root)
    spec = NodeSpec("nd-valve", "irrig", hardware_id_for("nd-valve"), "gh-1", zone, [actuator("valve_irrigation")])
    sim = Simulator(SimOptions(host=settings.mqtt_host, port=settings.mqtt_port, topic_root=settings.mqtt_topic_root,
                               client_prefix=f"{settings.mqtt_client_id}-sim-"), [spec]).start(wait=15)
    node = sim.node("nd-valve")
    try:
        await issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd-valve",
                            channel="valve_irrigation", cmd="set_relay", params={"state": True}, source="scheduler")
        await until(lambda: node.open_relays() == ["valve_irrigation"], "valve open")
        for _ in range(2):  # two closes of one relay due together go out as one command
            await schedule_close(db, owner="scheduler", zone_id=zone, node_uid="nd-valve", channel="valve_irrigation",
                                 close_at=NOW, reason="irrigation")
        assert await run_due(db, mqtt, topics, owner="automation", now=NOW) == []  # another owner's: not touched

        node.go_offline()  # the close is published while the node is away: it never gets it
        [sent] = await run_due(db, mqtt, topics, owner="scheduler", now=NOW)
        assert sent["error"] is None
        await db.execute("UPDATE commands SET sent_at = sent_at - interval '1 minute' WHERE cmd_id = $1",
                         sent["cmd_id"])  # a minute passes
        await sweep_timeouts(db, 30)  # history-logger's sweep: no answer
        assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = $1", sent["cmd_id"]) == "timeout"
        node.start()
        assert node.connected.wait(15)
        assert node.open_relays() == ["valve_irrigation"]

        [again] = await run_due(db, mqtt, topics, owner="scheduler", now=NOW + dt.timedelta(seconds=5))
        assert again["cmd_id"] != sent["cmd_id"]
        await until(lambda: node.open_relays() == [], "valve closed by the second close")
        assert await run_due(db, mqtt, topics, owner="scheduler", now=NOW + dt.timedelta(seconds=10)) == []
    finally:
        sim.stop()
        sim.clear_retained()
    rows = await db.fetch("SELECT attempts, done_at FROM actuator_closes WHERE zone_id = $1", zone)
    assert all(r["done_at"] is not None and r["attempts"] <= MAX_ATTEMPTS for r in rows)


async def test_finished_closes_are_deleted_after_a_week(settings, db, mqtt):
    from common import actuator_closes
    zone = await valve_zone(db)
    topics = Topics(settings.mqtt_topic_root)
    await schedule_close(db, owner="bridge", zone_id=zone, node_uid="nd-valve", channel="valve_irrigation",
                         close_at=NOW, reason="duration_ms")
    [sent] = await run_due(db, mqtt, topics, owner="bridge", now=NOW)
    actuator_closes._last_purge.pop("bridge", None)
    await run_due(db, mqtt, topics, owner="bridge", now=NOW + dt.timedelta(days=6))
    assert await db.fetchval("SELECT count(*) FROM actuator_closes") == 1  # kept a week
    await run_due(db, mqtt, topics, owner="bridge", now=NOW + dt.timedelta(days=8))
    assert await db.fetchval("SELECT count(*) FROM actuator_closes") == 0
