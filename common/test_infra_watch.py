"""MQTT_DOWN and DB_UNREACHABLE are raised by the service that lost the connection, on private
servers that are really stopped and started again."""
import asyncpg

from common import testing
from common.db import Database
from common.infra_watch import ConnectionWatch
from common.migrate import apply_migrations
from common.mqtt import MqttClient


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _alerts(db, alert_type):
    return await db.fetch("SELECT * FROM alerts WHERE type = $1 ORDER BY id", alert_type)


async def test_mqtt_down_opens_after_the_delay_and_resolves_on_reconnect(db, settings):
    broker = testing.PrivateMosquitto().start()
    mqtt = MqttClient(settings.replace(mqtt_port=broker.port), "-watch", clean_session=True)
    await mqtt.start(wait=10)
    clock = Clock()
    watch = ConnectionWatch("automation-engine", db, mqtt, after_sec=60, clock=clock)
    try:
        await watch.check()
        assert await _alerts(db, "MQTT_DOWN") == []
        broker.stop()
        await testing.eventually(lambda: _async(not mqtt.connected), 15, message="client sees the broker gone")
        await watch.check()
        clock.now += 30
        await watch.check()
        assert await _alerts(db, "MQTT_DOWN") == []  # a short blip is no alert
        clock.now += 31
        await watch.check()
        [alert] = await _alerts(db, "MQTT_DOWN")
        assert (alert["status"], alert["source"], alert["code"], alert["zone_id"]) == \
            ("ACTIVE", "infra", "infra_mqtt_down", None)
        assert alert["details"]["service"] == "automation-engine" and alert["details"]["down_sec"] >= 60
        clock.now += 10
        await watch.check()
        assert len(await _alerts(db, "MQTT_DOWN")) == 1  # refreshed, not repeated
        broker.start()
        await mqtt.wait_connected(30)
        await watch.check()
        [alert] = await _alerts(db, "MQTT_DOWN")
        assert alert["status"] == "RESOLVED" and alert["resolved_at"] is not None
    finally:
        await mqtt.stop()
        broker.close()


async def test_db_outage_is_recorded_once_the_database_is_back():
    pg = testing.PrivatePostgres().start()
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", database="postgres")
        await apply_migrations(conn)
        await conn.close()
        db = Database(testing.isolated_settings(**pg.settings_env()))
        await db.connect()
        clock = Clock()
        watch = ConnectionWatch("scheduler", db, None, after_sec=60, clock=clock)
        try:
            await watch.check()
            pg.stop()
            await watch.check()
            assert watch.db_down is not None
            clock.now += 5
            pg.start()
            await testing.eventually(db.ping, 30, 0.2, "database back")  # the port opens before it accepts
            await watch.check()  # 5 s: too short to be recorded
            assert watch.db_down is None
            assert await _alerts(db, "DB_UNREACHABLE") == []
            pg.stop()
            await watch.check()
            clock.now += 90
            await watch.check()
            pg.start()
            await testing.eventually(db.ping, 30, 0.2, "database back")
            await watch.check()
            [alert] = await _alerts(db, "DB_UNREACHABLE")
            assert (alert["status"], alert["source"], alert["code"]) == ("RESOLVED", "infra", "infra_db_unreachable")
            assert alert["details"]["service"] == "scheduler" and alert["details"]["down_sec"] == 90
            assert alert["created_at"] <= alert["resolved_at"]
        finally:
            await db.close()
    finally:
        pg.close()


async def _async(value):
    return value
