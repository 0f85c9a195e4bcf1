"""Fault tests: servers restarted or the service killed mid-stream → no loss, no duplicates.

PostgreSQL, Redis and Mosquitto are private servers here (common.testing) so they can be
stopped and killed; the kill test runs the service as a real process and SIGKILLs it or its
writer process.
"""
import asyncio
import os
import signal
import time

import asyncpg
import orjson
import pytest

from common import testing
from common.db import Database
from common.migrate import apply_migrations
from common.redis_client import redis_client
from common.testing import drop_redis_keys

import metrics as m
import streams
from node_cache import NodeCache
from receiver import Receiver
from settings import ServiceSettings
from telemetry_writer import TelemetryWriter
from testing import (Publisher, assert_exactly, fast_settings, seed, start_logger, telemetry_messages, wait_published,
                     wait_rows, wait_subscribed, writer_pid)


async def test_postgres_restarted_mid_stream_loses_nothing():
    pg = testing.PrivatePostgres()
    pg.start()
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", database="postgres")
        await apply_migrations(conn)
        await conn.close()
        s = fast_settings(testing.isolated_settings(**pg.settings_env()), db_command_timeout_sec=5.0)
        db = Database(s)
        await db.connect()
        ids = await seed(db)
        service = await start_logger(s)
        try:
            pub = Publisher(s, ids, 1500, chunk=50)
            pub.start()
            await wait_rows(db, 100)
            pg.proc.send_signal(signal.SIGINT)  # fast shutdown: every connection is cut
            await asyncio.to_thread(pg.proc.wait, 30)
            pg.proc = None
            await asyncio.sleep(1.5)            # writes fail meanwhile; the backlog waits in Redis
            await asyncio.to_thread(pg.start)
            await wait_published(pub)
            await wait_rows(db, 1500, 60)
            await assert_exactly(db, 1500)
        finally:
            await service.stop()
            await db.close()
            await drop_redis_keys(s)
    finally:
        pg.close()


@pytest.mark.parametrize("victim", ["service", "writer"])
async def test_killed_mid_stream_no_loss_no_duplicates(settings, db, victim):
    """SIGKILL of the service process (its writer, orphaned, stops by itself) or of its writer
    process (the service starts another), anywhere between receipt, append, COMMIT and XACK."""
    # A private broker that queues without limit while the service is down (the stock config
    # keeps 1,000 queued QoS1 messages per client and drops the rest).
    with testing.PrivateMosquitto() as broker:
        s = fast_settings(settings, mqtt_port=broker.port)
        ids = await seed(db)
        env = dict(testing.settings_env(s), TELEMETRY_FLUSH_MS="50", TELEMETRY_BATCH_SIZE="200")
        proc = testing.ServiceProcess("history-logger", env).start()
        try:
            await asyncio.to_thread(testing.wait_port, s.history_logger_port, 30)
            await heartbeat_seen(s, db, ids)  # subscribed
            testing.publish_sync(s.mqtt_host, s.mqtt_port, telemetry_messages(s, ids, 0, 1))
            await wait_rows(db, 1, 20)
            pub = Publisher(s, ids, 4000, chunk=200, pause=0.02)
            pub.sent = 1
            pub.start()
            await wait_rows(db, 800, 60)
            writer = writer_pid(proc.proc.pid)
            if victim == "service":
                proc.kill()
                killed_at = await db.fetchval("SELECT count(*) FROM telemetry_samples")
                await testing.eventually(lambda: _gone(writer), 15)
                proc.start()
            else:
                os.kill(writer, signal.SIGKILL)
                killed_at = await db.fetchval("SELECT count(*) FROM telemetry_samples")
                await testing.eventually(lambda: _replaced(proc.proc.pid, writer), 20)
            await wait_published(pub)
            try:
                await wait_rows(db, 4000, 60)
            except AssertionError:
                print(proc.log()[-4000:])
                raise
            await asyncio.sleep(1.0)  # anything still arriving would be a duplicate
            await assert_exactly(db, 4000)
            assert killed_at < 4000
            writer = writer_pid(proc.proc.pid)
            assert proc.terminate() == 0, proc.log()[-2000:]  # SIGTERM: clean exit, the writer's too
            assert await _gone(writer)
        finally:
            proc.kill()
            await drop_redis_keys(s)


async def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"


async def _replaced(service_pid: int, old: int) -> bool:
    return writer_pid(service_pid) not in (None, old)


async def heartbeat_seen(s, db, ids, timeout: float = 30) -> None:
    topic = f"{s.mqtt_topic_root}/gh-1/zn-{ids['zone_id']}/{ids['node_uid']}/heartbeat"
    deadline = time.monotonic() + timeout
    while not await db.fetchval("SELECT last_heartbeat_at IS NOT NULL FROM nodes WHERE id = $1", ids["node_id"]):
        assert time.monotonic() < deadline, "the service never received a heartbeat"
        await asyncio.to_thread(testing.publish_sync, s.mqtt_host, s.mqtt_port, [(topic, b'{"uptime":1000}', 1, False)])
        await asyncio.sleep(0.3)


async def test_crash_between_commit_and_xack_and_dead_consumer_reclaimed(settings, db):
    """Entries committed but never acknowledged, and entries pending on a dead consumer."""
    s = fast_settings(settings)
    ids = await seed(db)
    client = redis_client(s)
    keys = streams.StreamKeys(s)
    await client.xgroup_create(keys.telemetry, keys.group, id="0", mkstream=True)
    for i in range(30):
        sample = streams.Sample(ids["node_uid"], None, "ph_sensor", "PH", 6.0, int(time.time() * 1000) + i, False,
                           orjson.dumps({"seq": i}))
        await client.xadd(keys.telemetry, streams.encode_entry([sample]))
    own = f"{s.mqtt_client_id}-logger"
    mine = (await client.xreadgroup(keys.group, own, {keys.telemetry: ">"}, count=10))[0][1]
    dead = (await client.xreadgroup(keys.group, "dead-replica", {keys.telemetry: ">"}, count=10))[0][1]
    writer = TelemetryWriter(db, client, keys, NodeCache(db), 1000)
    await writer.handle(mine)           # committed ...
    await writer.handle(dead[:5])       # ... and the dead replica committed half of its batch
    assert await db.fetchval("SELECT count(*) FROM telemetry_samples") == 15
    service = await start_logger(s, TELEMETRY_CLAIM_IDLE_MS="1000")  # ... XACK never happened
    try:
        await wait_rows(db, 30, 30)
        await testing.eventually(lambda: _empty(client, keys), 20)
        await asyncio.sleep(0.5)
        await assert_exactly(db, 30)
        assert await db.fetchval("SELECT count(*) FROM history_logger_ingested WHERE stream = $1", keys.telemetry) == 30
    finally:
        await service.stop()
        await client.aclose()
        await drop_redis_keys(s)


async def _empty(client, keys) -> bool:
    pending = await client.xpending(keys.telemetry, keys.group)
    return pending["pending"] == 0 and await client.xlen(keys.telemetry) == 0


async def test_redis_restarted_loses_no_acknowledged_message(settings, db):
    with testing.PrivateRedis(appendonly=True) as redis_server, testing.PrivateMosquitto() as broker:
        s = fast_settings(settings, redis_port=redis_server.port, mqtt_port=broker.port)
        ids = await seed(db)
        service = await start_logger(s)
        try:
            pub = Publisher(s, ids, 2000, chunk=100)
            pub.start()
            await wait_rows(db, 200)
            redis_server.kill()              # no shutdown save: only the append-only file survives
            await asyncio.sleep(1.0)
            await asyncio.to_thread(redis_server.start)
            await wait_published(pub)
            await wait_rows(db, 2000, 60)
            await asyncio.sleep(0.5)
            await assert_exactly(db, 2000)
        finally:
            await service.stop()


async def test_an_append_whose_reply_is_lost_is_stored_once(settings):
    """Redis applied the append, the connection broke before its reply: the receiver asks instead of
    appending again (the client it is given never resends on its own)."""
    marker = b"reply-lost-" + testing.unique_id().encode()
    async with testing.ReplyLosingProxy(settings.redis_host, settings.redis_port, marker) as proxy:
        through = settings.replace(redis_port=proxy.port)
        client = redis_client(through, resend=False)
        keys = streams.StreamKeys(through)
        receiver = Receiver(through, ServiceSettings.from_env(through), client, keys)
        try:
            proxy.armed = True
            await receiver.append([], [], [{b"t": b"hydro/gh/zn-1/nd/status", b"p": marker, b"ret": b"0",
                                            b"at": b"1.0"}], [marker])
            assert proxy.dropped == 1
            assert await client.xlen(keys.events) == 1
        finally:
            await client.aclose()
            await drop_redis_keys(settings)


async def test_broker_restarted_resubscribes_and_stores_what_follows(settings, db):
    with testing.PrivateMosquitto() as broker:  # no persistence: the broker forgets our session
        s = fast_settings(settings, mqtt_port=broker.port)
        ids = await seed(db)
        service = await start_logger(s)
        try:
            testing.publish_sync(s.mqtt_host, broker.port, telemetry_messages(s, ids, 0, 100))
            await wait_rows(db, 100)
            await asyncio.to_thread(broker.restart)
            await service.mqtt.wait_connected(30)
            await wait_subscribed(service, 20)
            await asyncio.to_thread(testing.publish_sync, s.mqtt_host, broker.port,
                                    telemetry_messages(s, ids, 100, 900))
            await wait_rows(db, 1000, 30)
            await asyncio.sleep(0.3)
            await assert_exactly(db, 1000)
        finally:
            await service.stop()
            await drop_redis_keys(s)


async def test_queue_sampling_above_90_percent_and_hold_at_capacity(settings, db):
    s = fast_settings(settings, telemetry_queue_capacity=100)
    ids = await seed(db)
    service = await start_logger(s, TELEMETRY_SAMPLE_EVERY="10")
    try:
        await service.writer.stop()  # the writer pauses: the stream fills up
        topic = f"{s.mqtt_topic_root}/gh-1/zn-{ids['zone_id']}/{ids['node_uid']}"
        t0 = int(time.time()) - 500
        fill = [(f"{topic}/ch{i}/telemetry", orjson.dumps({"metric": "EC", "value": 1.0, "ts": t0 + i}), 1, False)
                for i in range(92)]
        await asyncio.to_thread(testing.publish_sync, s.mqtt_host, s.mqtt_port, fill)
        await testing.eventually(lambda: _xlen_at_least(service, 92), 10)
        sampled_before = m.DROPPED.labels("sampled")._value.get()
        burst = [(f"{topic}/ph_sensor/telemetry", orjson.dumps({"metric": "PH", "value": 5.0 + i / 10, "ts": t0 + 100 + i}),
                  1, False) for i in range(20)]
        for item in burst:  # one by one: each is decided on its own
            await asyncio.to_thread(testing.publish_sync, s.mqtt_host, s.mqtt_port, [item])
        await testing.eventually(lambda: _sampled(m, sampled_before, 18), 10)
        assert await service.receiver.queued() == 94  # 1 of 10 kept per key
        # at capacity: held back, not acknowledged, not dropped
        overflow_before = m.OVERFLOW._value.get()
        held = [(f"{topic}/ch{i}/telemetry", orjson.dumps({"metric": "EC", "value": 2.0, "ts": t0 + 200 + i}), 1, False)
                for i in range(92, 100)] + \
               [(f"{topic}/ch{i}/telemetry", orjson.dumps({"metric": "TEMP_WATER", "value": 2.0, "ts": t0 + 300 + i}),
                 1, False) for i in range(20)]
        await asyncio.to_thread(testing.publish_sync, s.mqtt_host, s.mqtt_port, held)
        await testing.eventually(lambda: _grew(m.OVERFLOW, overflow_before), 10)
        service.writer.start()        # the writer resumes and makes room
        await wait_rows(db, 94 + 28, 30)   # everything held back is stored once there is room
        await asyncio.sleep(0.5)
        assert await db.fetchval("SELECT count(*) FROM telemetry_samples") == 122
        # newest PH (sampled away from the stream) still reached telemetry_last
        await testing.eventually(lambda: db.fetchval(
            "SELECT value = 6.9 FROM telemetry_last WHERE metric_type = 'PH'"), 10)
    finally:
        await service.stop()
        await drop_redis_keys(s)


async def _xlen_at_least(service, n):
    return await service.receiver.queued() >= n


async def _sampled(m, before, n):
    return m.DROPPED.labels("sampled")._value.get() - before >= n


async def _grew(counter, before):
    return counter._value.get() > before
