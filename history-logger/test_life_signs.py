"""heartbeat, status, lwt, command_response, the timeout sweep and offline housekeeping."""
import asyncio
import datetime as dt
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from common import alerts, testing
from common.testing import drop_redis_keys
from common.topics import Topics

from node_events import Event, NodeEvents, utc
from testing import apublish, fast_settings, seed, start_logger


def node_topic(settings, ids, kind, zone=None):
    return f"{settings.mqtt_topic_root}/gh-1/{zone or 'zn-%s' % ids['zone_id']}/{ids['node_uid']}/{kind}"


async def test_heartbeat_updates_node_columns(logger, db):
    s = logger.settings
    ids = await seed(db, last_seen_sql="NULL")
    await apublish(s, [(node_topic(s, ids, "heartbeat"), {"uptime": 35555, "free_heap": 102000, "rssi": -62}),
                       (node_topic(s, ids, "heartbeat"), {"uptime": 36555, "heap": "bad", "rssi": -60})])

    async def updated():
        row = await db.fetchrow("SELECT * FROM nodes WHERE id = $1", ids["node_id"])
        return row if row["uptime_seconds"] == 36 else None
    row = await testing.eventually(updated, 15)
    # the second heartbeat's bad heap is skipped alone; uptime in ms → seconds (HEARTBEAT_UPTIME_MS=1)
    assert (row["free_heap_bytes"], row["rssi"]) == (102000, -60)
    assert row["last_heartbeat_at"] is not None and row["last_seen_at"] is not None
    assert abs((row["last_seen_at"] - dt.datetime.utcnow()).total_seconds()) < 30


async def test_heartbeats_of_one_batch_keep_each_valid_field(settings, db):
    """Two heartbeats of a node in one batch: a field the newer one lacks keeps the older value."""
    ids = await seed(db, last_seen_sql="NULL")
    topic = Topics(settings.mqtt_topic_root).parse(node_topic(settings, ids, "heartbeat"))
    now = time.time()
    batch = [Event(b"1-0", topic, b'{"uptime": 35555, "free_heap": 102000, "rssi": -62}', False, utc(now), 0),
             Event(b"1-1", topic, b'{"uptime": 36555, "heap": "bad", "rssi": -60}', False, utc(now + 1), 1)]
    dead = []
    async with db.transaction() as conn:
        await NodeEvents(settings, db, "unused")._apply(conn, batch, dead)
    assert dead == []
    row = await db.fetchrow("SELECT * FROM nodes WHERE id = $1", ids["node_id"])
    assert (row["uptime_seconds"], row["free_heap_bytes"], row["rssi"]) == (36, 102000, -60)


async def test_status_online_resolves_offline_alert_and_logs_event(logger, db):
    s = logger.settings
    ids = await seed(db, status="offline", last_seen_sql="now() - interval '1 hour'")
    async with db.transaction() as conn:
        await alerts.ensure_alert(conn, zone_id=ids["zone_id"], alert_type="NODE_OFFLINE",
                                  details={"node_uid": ids["node_uid"]}, match={"node_uid": ids["node_uid"]})
    await apublish(s, [(node_topic(s, ids, "status"), {"status": "ONLINE", "ts": 12})])

    async def online():
        return await db.fetchval("SELECT status FROM nodes WHERE id = $1", ids["node_id"]) == "online"
    await testing.eventually(online, 15)
    await testing.eventually(lambda: db.fetchval(
        "SELECT count(*) = 1 FROM alerts WHERE type = 'NODE_OFFLINE' AND status = 'RESOLVED'"), 10)
    events = [r["type"] for r in await db.fetch("SELECT type FROM zone_events WHERE zone_id = $1 ORDER BY id",
                                                ids["zone_id"])]
    assert "DEVICE_ONLINE" in events and "ALERT_RESOLVED" in events
    # a second ONLINE is no transition: no second DEVICE_ONLINE
    await apublish(s, [(node_topic(s, ids, "status"), {"status": "online"})])
    await asyncio.sleep(1.0)
    assert await db.fetchval("SELECT count(*) FROM zone_events WHERE type = 'DEVICE_ONLINE'") == 1


async def test_lwt_of_a_killed_client_marks_offline_and_raises_alert(logger, db):
    s = logger.settings
    ids = await seed(db, status="online", last_seen_sql="now()")
    node = paho.Client(CallbackAPIVersion.VERSION2, client_id=testing.unique_id("node-"))
    node.will_set(node_topic(s, ids, "lwt"), b"offline", qos=1, retain=True)
    node.connect(s.mqtt_host, s.mqtt_port, keepalive=5)
    node.loop_start()
    await asyncio.sleep(0.5)
    node.loop_stop()
    node.socket().close()  # dies without DISCONNECT: the broker publishes the will
    try:
        async def offline():
            return await db.fetchval("SELECT status FROM nodes WHERE id = $1", ids["node_id"]) == "offline"
        await testing.eventually(offline, 20)
        alert = await testing.eventually(lambda: db.fetchrow(
            "SELECT * FROM alerts WHERE type = 'NODE_OFFLINE' AND status = 'ACTIVE'"), 10)
        assert alert["code"] == "biz_node_offline" and alert["details"]["node_uid"] == ids["node_uid"]
        assert alert["zone_id"] == ids["zone_id"]
        events = {r["type"] for r in await db.fetch("SELECT type FROM zone_events")}
        assert {"DEVICE_OFFLINE", "NODE_OFFLINE", "ALERT_CREATED"} <= events
    finally:
        testing.publish_sync(s.mqtt_host, s.mqtt_port, [(node_topic(s, ids, "lwt"), b"", 1, True)])


async def test_retained_lwt_is_only_a_hint(settings, db):
    s = fast_settings(settings)
    fresh = await seed(db, node_uid="nd-fresh", status="online", last_seen_sql="now()")
    stale = await seed(db, node_uid="nd-stale", status="online", last_seen_sql="now() - interval '1 hour'")
    topics = [node_topic(s, fresh, "lwt"), node_topic(s, stale, "lwt")]
    await apublish(s, [(tp, b"offline") for tp in topics], retain=True)  # nobody subscribed: kept retained
    service = await start_logger(s)  # its subscription receives the retained copies (retain flag set)
    try:
        async def stale_offline():
            return await db.fetchval("SELECT status FROM nodes WHERE uid = 'nd-stale'") == "offline"
        await testing.eventually(stale_offline, 15)
        assert await db.fetchval("SELECT status FROM nodes WHERE uid = 'nd-fresh'") == "online"
        assert await db.fetchval("SELECT count(*) FROM alerts WHERE type = 'NODE_OFFLINE'") == 1
    finally:
        await service.stop()
        await drop_redis_keys(s)
        testing.publish_sync(s.mqtt_host, s.mqtt_port, [(tp, b"", 1, True) for tp in topics])


async def insert_command(db, ids, cmd_id, status="sent", age_sec=0, cmd="run_pump"):
    await db.execute(
        "INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, created_at, updated_at, sent_at)"
        " VALUES ($1, $2, 'pump_in', $3, $4, $5, $6, now() - make_interval(secs => $7), now(),"
        " now() - make_interval(secs => $7))", ids["zone_id"], ids["node_id"], cmd, {"duration_ms": 1000}, status,
        cmd_id, float(age_sec))


async def test_command_response_ack_failed_overcurrent_and_unknown(logger, db):
    s = logger.settings
    ids = await seed(db)
    for cmd_id in ("c-ack", "c-err", "c-closed"):
        await insert_command(db, ids, cmd_id, status="ack" if cmd_id == "c-closed" else "sent")
    topic = node_topic(s, ids, "pump_in/command_response")
    await apublish(s, [
        (topic, {"cmd_id": "c-ack", "status": "ACK", "ts": 12}),
        (topic, {"cmd_id": "c-err", "status": "ERROR", "error_code": "overcurrent", "error_message": "too much",
                 "details": {"current_ma": 2500}}),
        (topic, {"cmd_id": "c-closed", "status": "ERROR"}),
        (topic, {"cmd_id": "c-unknown", "status": "ACK"}),
        (topic, {"status": "ACK"}),
    ])

    async def settled():
        rows = {r["cmd_id"]: r for r in await db.fetch("SELECT * FROM commands")}
        return rows if rows["c-ack"]["status"] == "ack" and rows["c-err"]["status"] == "failed" else None
    rows = await testing.eventually(settled, 15)
    assert rows["c-ack"]["ack_at"] is not None
    assert (rows["c-err"]["error_code"], rows["c-err"]["error_message"]) == ("overcurrent", "too much")
    assert rows["c-err"]["failed_at"] is not None and rows["c-closed"]["status"] == "ack"
    alert = await testing.eventually(lambda: db.fetchrow("SELECT * FROM alerts WHERE type = 'OVERCURRENT'"), 10)
    assert alert["code"] == "biz_overcurrent" and alert["zone_id"] == ids["zone_id"]
    assert alert["details"]["cmd_id"] == "c-err" and alert["details"]["current_ma"] == 2500
    assert alert["details"]["channel"] == "pump_in"


async def test_timeout_sweep_marks_old_sent_commands(settings, db):
    s = fast_settings(settings, command_timeout_sec=30)
    ids = await seed(db)
    await insert_command(db, ids, "c-old", age_sec=120)
    await insert_command(db, ids, "c-new", age_sec=0)
    await insert_command(db, ids, "c-pending-old", status="pending", age_sec=120)
    service = await start_logger(s, COMMAND_TIMEOUT_SWEEP_SEC="0.2")
    try:
        async def swept():
            rows = {r["cmd_id"]: r["status"] for r in await db.fetch("SELECT cmd_id, status FROM commands")}
            return rows if rows["c-old"] == "timeout" else None
        rows = await testing.eventually(swept, 10)
        assert rows == {"c-old": "timeout", "c-new": "sent", "c-pending-old": "timeout"}
    finally:
        await service.stop()
        await drop_redis_keys(s)


async def heartbeats(settings, ids, every: float = 0.3) -> None:
    """A live node: a heartbeat every `every` seconds until cancelled."""
    while True:
        await apublish(settings, [(node_topic(settings, ids, "heartbeat"), {"uptime": 1000, "rssi": -50})])
        await asyncio.sleep(every)


async def test_offline_housekeeping_marks_silent_nodes(settings, db):
    s = fast_settings(settings, node_offline_timeout_sec=2)  # silence counts once we listened this long
    silent = await seed(db, node_uid="nd-silent", status="online", last_seen_sql="now() - interval '5 minutes'")
    alive = await seed(db, node_uid="nd-alive", status="online", last_seen_sql="now()")
    await db.execute("INSERT INTO telemetry_last (zone_id, node_id, metric_type, value, updated_at)"
                     " VALUES ($1, $2, 'PH', 6.0, now() - interval '10 minutes')", silent["zone_id"], silent["node_id"])
    service = await start_logger(s, NODE_OFFLINE_SWEEP_SEC="1")
    beating = asyncio.create_task(heartbeats(s, alive))
    try:
        async def offline():
            return await db.fetchval("SELECT status FROM nodes WHERE uid = 'nd-silent'") == "offline"
        await testing.eventually(offline, 15)
        assert await db.fetchval("SELECT status FROM nodes WHERE uid = 'nd-alive'") == "online"
        alert = await db.fetchrow("SELECT * FROM alerts WHERE type = 'NODE_OFFLINE'")
        assert alert["details"]["node_uid"] == "nd-silent" and alert["details"]["reason"] == "timeout"
        await testing.eventually(lambda: db.fetchval(
            "SELECT count(*) = 1 FROM zone_events WHERE type = 'NO_TELEMETRY' AND zone_id = $1", silent["zone_id"]))
        await asyncio.sleep(2.5)  # further sweeps add nothing
        assert await db.fetchval("SELECT count(*) FROM zone_events WHERE type = 'NO_TELEMETRY'") == 1
        assert await db.fetchval("SELECT count(*) FROM zone_events WHERE type = 'DEVICE_OFFLINE'") == 1
        assert await db.fetchval("SELECT status FROM nodes WHERE uid = 'nd-alive'") == "online"
    finally:
        beating.cancel()
        await service.stop()
        await drop_redis_keys(s)
