"""Liveness from life signs (contract §3.2): a node heard from is online; only silence while we
listened, or the broker's LWT, makes it offline — never our own (or the database's) outage."""
import asyncio
import signal

import asyncpg

from common import alerts, testing
from common.db import Database
from common.migrate import apply_migrations
from common.testing import drop_redis_keys

from testing import apublish, fast_settings, seed, start_logger

CAUSES = {
    "heartbeat": ("heartbeat", {"uptime": 1000, "rssi": -50}),
    "telemetry": ("ph_sensor/telemetry", {"metric": "PH", "value": 6.1}),
    "command_response": ("pump_in/command_response", {"cmd_id": "c-unknown", "status": "ACK"}),
    "config_response": ("config_response", {"status": "OK", "version": 3}),
    "status": ("status", {"status": "online"}),
}


def topic(settings, ids, rest):
    return f"{settings.mqtt_topic_root}/gh-1/zn-{ids['zone_id']}/{ids['node_uid']}/{rest}"


async def status_of(db, ids) -> str:
    return await db.fetchval("SELECT status FROM nodes WHERE id = $1", ids["node_id"])


async def test_every_life_sign_brings_a_laravel_node_online(logger, db):
    """Nodes as Laravel creates them (offline, last_seen_at NULL), one with an active NODE_OFFLINE
    alert: each kind of life sign alone brings its node online, with DEVICE_ONLINE, once."""
    s = logger.settings
    nodes = {kind: await seed(db, node_uid=f"nd-{kind[:6]}-{i}", status="offline", last_seen_sql="NULL")
             for i, kind in enumerate(CAUSES)}
    hb = nodes["heartbeat"]
    async with db.transaction() as conn:
        await alerts.ensure_alert(conn, zone_id=hb["zone_id"], alert_type="NODE_OFFLINE",
                                  details={"node_uid": hb["node_uid"]}, match={"node_uid": hb["node_uid"]})
    await apublish(s, [(topic(s, nodes[kind], rest), payload) for kind, (rest, payload) in CAUSES.items()])

    async def all_online():
        rows = await db.fetch("SELECT uid, status, last_seen_at FROM nodes")
        return rows if all(r["status"] == "online" and r["last_seen_at"] is not None for r in rows) else None
    await testing.eventually(all_online, 20)
    await testing.eventually(lambda: db.fetchval(
        "SELECT count(*) = 1 FROM alerts WHERE type = 'NODE_OFFLINE' AND status = 'RESOLVED'"), 10)
    events = await db.fetch("SELECT zone_id, details->>'node_uid' AS uid FROM zone_events WHERE type = 'DEVICE_ONLINE'")
    assert sorted(e["uid"] for e in events) == sorted(n["node_uid"] for n in nodes.values())
    # heard from again: no transition, no second event
    await apublish(s, [(topic(s, nodes["heartbeat"], "heartbeat"), {"uptime": 2000})])
    await testing.eventually(lambda: db.fetchval(
        "SELECT uptime_seconds = 2 FROM nodes WHERE id = $1", hb["node_id"]), 10)
    assert await db.fetchval("SELECT count(*) FROM zone_events WHERE type = 'DEVICE_ONLINE'") == len(nodes)


async def test_a_retained_online_is_no_life_sign_and_an_lwt_before_a_heartbeat_is_superseded(settings, db):
    s = fast_settings(settings)
    gone = await seed(db, node_uid="nd-gone", status="offline", last_seen_sql="now() - interval '1 hour'")
    back = await seed(db, node_uid="nd-back", status="online", last_seen_sql="now()")
    await apublish(s, [(topic(s, gone, "status"), {"status": "ONLINE"})], retain=True)  # nobody listens yet
    service = await start_logger(s)  # receives the broker's retained copy (retain flag set)
    try:
        # the node dropped and came back at once: its will, then its heartbeat, in one burst
        await apublish(s, [(topic(s, back, "lwt"), b"offline"), (topic(s, back, "heartbeat"), {"uptime": 4000})])
        await testing.eventually(lambda: db.fetchval(
            "SELECT uptime_seconds = 4 FROM nodes WHERE id = $1", back["node_id"]), 10)
        assert await status_of(db, gone) == "offline"   # the broker's old copy says nothing about now
        # (the will and the heartbeat may land in one batch or in two: online at the end either way)
        await testing.eventually(lambda: db.fetchval(
            "SELECT status = 'online' FROM nodes WHERE id = $1", back["node_id"]), 10)
    finally:
        await service.stop()
        await drop_redis_keys(s)
        testing.publish_sync(s.mqtt_host, s.mqtt_port, [(topic(s, gone, "status"), b"", 1, True)])


class Beats:
    """A live node: heartbeats every `every` seconds, published straight to the broker."""

    def __init__(self, settings, ids, every: float = 0.3):
        self.task = asyncio.create_task(self._run(settings, ids, every))

    @staticmethod
    async def _run(settings, ids, every):
        n = 0
        while True:
            n += 1
            await apublish(settings, [(topic(settings, ids, "heartbeat"), {"uptime": 1000 * n})])
            await asyncio.sleep(every)

    def stop(self):
        self.task.cancel()


async def assert_never_offline(db, ids) -> None:
    assert await status_of(db, ids) == "online"
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE type = 'NODE_OFFLINE'") == 0
    assert await db.fetchval("SELECT count(*) FROM zone_events WHERE type = 'DEVICE_OFFLINE'") == 0


async def test_a_logger_outage_longer_than_the_timeout_leaves_a_live_fleet_online(settings, db):
    """Timeout 2 s; the logger is down 6 s while its node keeps beating (the broker queues for the
    persistent session). On restart the sweep must not call the node silent."""
    with testing.PrivateMosquitto() as broker:
        s = fast_settings(settings, mqtt_port=broker.port, node_offline_timeout_sec=2)
        ids = await seed(db, status="online", last_seen_sql="now() - interval '1 hour'")
        silent = await seed(db, node_uid="nd-silent", status="online", last_seen_sql="now() - interval '1 hour'")
        service = await start_logger(s, NODE_OFFLINE_SWEEP_SEC="1")
        beats = Beats(s, ids)
        try:
            await testing.eventually(lambda: db.fetchval(
                "SELECT status = 'offline' FROM nodes WHERE id = $1", silent["node_id"]), 20)
            await service.stop()
            await asyncio.sleep(6)
            service = await start_logger(s, NODE_OFFLINE_SWEEP_SEC="1")
            await asyncio.sleep(6)  # several sweeps, each after more than the timeout of listening
            beats.stop()
            await db.execute("DELETE FROM alerts WHERE details->>'node_uid' = 'nd-silent'")
            await db.execute("DELETE FROM zone_events WHERE details->>'node_uid' = 'nd-silent'")
            await assert_never_offline(db, ids)
        finally:
            beats.stop()
            await service.stop()
            await drop_redis_keys(s)


async def connect_when_up(port: int) -> asyncpg.Connection:
    """The port opens before PostgreSQL accepts connections ("the database system is starting up")."""
    async def attempt():
        try:
            return await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres")
        except (OSError, asyncpg.exceptions.CannotConnectNowError):
            return None
    return await testing.eventually(attempt, 30, 0.2, message="PostgreSQL accepting connections")


async def test_a_database_outage_longer_than_the_timeout_leaves_a_live_fleet_online():
    """PostgreSQL down 6 s (timeout 2 s) while the node keeps beating: life signs wait in Redis and
    the sweep, back with the database, counts only what was written — the node stays online."""
    pg = testing.PrivatePostgres()
    pg.start()
    try:
        conn = await connect_when_up(pg.port)
        await apply_migrations(conn)
        await conn.close()
        s = fast_settings(testing.isolated_settings(**pg.settings_env()), db_command_timeout_sec=5.0,
                          node_offline_timeout_sec=2)
        db = Database(s)
        await db.connect()
        ids = await seed(db, status="offline", last_seen_sql="NULL")
        service = await start_logger(s, NODE_OFFLINE_SWEEP_SEC="1")
        beats = Beats(s, ids)
        try:
            await testing.eventually(lambda: db.fetchval(
                "SELECT status = 'online' FROM nodes WHERE id = $1", ids["node_id"]), 20)
            await db.execute("DELETE FROM zone_events")
            await db.close()
            pg.proc.send_signal(signal.SIGINT)
            await asyncio.to_thread(pg.proc.wait, 30)
            pg.proc = None
            await asyncio.sleep(6)
            await asyncio.to_thread(pg.start)
            db = Database(s)
            await db.connect()
            await asyncio.sleep(6)  # the backlog lands and several sweeps run
            beats.stop()
            await assert_never_offline(db, ids)
        finally:
            beats.stop()
            await service.stop()
            await db.close()
            await drop_redis_keys(s)
    finally:
        pg.close()


async def test_life_signs_not_yet_written_hold_the_offline_sweep(settings, db):
    """The events writer is held (as during a database outage): a heartbeat waits in the events
    stream. However long it waits, the sweep counts silence only up to that unwritten entry."""
    s = fast_settings(settings, node_offline_timeout_sec=1)
    ids = await seed(db, status="online", last_seen_sql="now() - interval '1 hour'")
    service = await start_logger(s, NODE_OFFLINE_SWEEP_SEC="3600")  # sweeps run by hand below
    try:
        await asyncio.sleep(1.5)  # listened longer than the timeout
        await apublish(s, [(topic(s, ids, "heartbeat"), {"uptime": 1000})])
        await testing.eventually(lambda: db.fetchval(
            "SELECT uptime_seconds = 1 FROM nodes WHERE id = $1", ids["node_id"]), 10)
        await service.events_consumer.stop()
        await apublish(s, [(topic(s, ids, "heartbeat"), {"uptime": 2000})])
        await testing.eventually(lambda: service.redis.xlen(service.keys.events), 10)
        await asyncio.sleep(2.5)  # the node's last word is older than the timeout, but not written yet
        assert await service.housekeeping.offline_sweep() == 0
        assert await status_of(db, ids) == "online"
        service.events_consumer.stopping = False
        service.events_consumer.start()
        await testing.eventually(lambda: db.fetchval(
            "SELECT uptime_seconds = 2 FROM nodes WHERE id = $1", ids["node_id"]), 10)
        assert await status_of(db, ids) == "online"
        # written and silent since: now the silence counts
        await asyncio.sleep(1.5)
        assert await service.housekeeping.offline_sweep() == 1
        assert await status_of(db, ids) == "offline"
    finally:
        await service.stop()
        await drop_redis_keys(s)


async def test_silence_counts_only_once_the_logger_listened_for_the_timeout(settings, db):
    """Right after a start (or a reconnect) a node's old last_seen_at says nothing: the logger was not
    listening. As Laravel creates it ('online' set in the form, last_seen_at NULL) or silent for an
    hour, it becomes offline only after NODE_OFFLINE_TIMEOUT_SEC of listening without a word."""
    s = fast_settings(settings, node_offline_timeout_sec=2)
    old = await seed(db, node_uid="nd-old", status="online", last_seen_sql="now() - interval '1 hour'")
    new = await seed(db, node_uid="nd-new", status="online", last_seen_sql="NULL")
    service = await start_logger(s, NODE_OFFLINE_SWEEP_SEC="3600")  # sweeps run by hand below
    try:
        assert await service.housekeeping.offline_sweep() == 0
        assert (await status_of(db, old), await status_of(db, new)) == ("online", "online")
        await asyncio.sleep(2.5)
        assert await service.housekeeping.offline_sweep() == 2
        assert (await status_of(db, old), await status_of(db, new)) == ("offline", "offline")
    finally:
        await service.stop()
        await drop_redis_keys(s)
