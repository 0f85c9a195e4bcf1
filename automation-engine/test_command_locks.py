"""The engine's batch updates of `commands` against the history-logger's per-response updates, on the
real PostgreSQL: two connections whose row locks interleave as they did when the engine marked a batch
`sent` while the logger applied the nodes' responses in arrival order."""
import asyncio

from common import testing
from common.commands import issue_command
from common.topics import Topics
from testing import metric_value, seed_zone


async def _lock_waiters(db) -> int:
    return await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                             " AND wait_event_type = 'Lock' AND query ILIKE '%UPDATE commands%'")


async def _scenario(db, mqtt, settings, cmd_ids: list[str], logger_in_id_order: bool) -> list:
    """The engine issues `cmd_ids` (one batch); once they are claimed and while they are being published,
    a second connection (the logger) updates the two rows one by one inside one transaction, in id order
    or the reverse, the second only after the engine's `sent` update is waiting for a lock."""
    z = await seed_zone(db, telemetry={})
    node_uid = f"nd-ph-{z.zone_id}"
    # enough rows that PostgreSQL reads `cmd_id = ANY(...)` through the cmd_id index, as in production
    await db.execute("INSERT INTO commands (zone_id, cmd, params, status, cmd_id, source)"
                     " SELECT $1, 'dose', '{}', 'ack', 'old-' || i, 'automation' FROM generate_series(1, 3000) i",
                     z.zone_id)
    await db.execute("ANALYZE commands")
    release = asyncio.Event()
    publish = mqtt.publish_json

    async def held_publish(*args, **kwargs):  # the real publish, once the logger holds its first row
        await release.wait()
        return await publish(*args, **kwargs)
    mqtt.publish_json = held_publish
    topics = Topics(settings.mqtt_topic_root)
    # one pump each: a second dose on the same pump at the same moment is refused by its min_off
    issued = [asyncio.create_task(issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=z.zone_id, node_uid=node_uid,
                                                channel=channel, cmd="dose", params={"dose_ml": 0.5},
                                                cmd_id=cmd_id, source="automation"))
              for cmd_id, channel in zip(cmd_ids, ("pump_acid", "pump_base"))]
    await testing.eventually(lambda: db.fetchval(
        "SELECT count(*) = $1 FROM commands WHERE cmd_id = ANY($2::text[]) AND sent_at IS NOT NULL",
        len(cmd_ids), cmd_ids), 10, message="batch claimed")
    logger_order = [r["cmd_id"] for r in await db.fetch(
        f"SELECT cmd_id FROM commands WHERE cmd_id = ANY($1::text[]) ORDER BY id {'' if logger_in_id_order else 'DESC'}",
        cmd_ids)]
    async with db.pool.acquire() as logger:
        async with logger.transaction():
            await logger.execute("UPDATE commands SET updated_at = now() WHERE cmd_id = $1", logger_order[0])
            release.set()
            await testing.eventually(lambda: _positive(_lock_waiters(db)), 10, message="engine waits for a row")
            await logger.execute("UPDATE commands SET updated_at = now() WHERE cmd_id = $1", logger_order[1])
    return await asyncio.gather(*issued)


async def _positive(count):
    return (await count) > 0


async def test_batch_locks_rows_in_id_order_so_an_ordered_locker_never_deadlocks(db, mqtt, settings):
    retries = metric_value("commands_deadlock_retries_total", step="sent")
    results = await _scenario(db, mqtt, settings, ["lock-b", "lock-a"], logger_in_id_order=True)
    assert [r.status for r in results] == ["sent", "sent"]
    assert metric_value("commands_deadlock_retries_total", step="sent") == retries  # no deadlock at all
    assert await db.fetchval("SELECT count(*) FROM commands WHERE cmd_id LIKE 'lock-%' AND status = 'sent'") == 2


async def test_a_deadlock_victim_batch_is_retried(db, mqtt, settings):
    # the logger locks in the reverse of id order: a real deadlock; the engine's update is its victim
    retries = metric_value("commands_deadlock_retries_total", step="sent")
    results = await _scenario(db, mqtt, settings, ["dl-a", "dl-b"], logger_in_id_order=False)
    assert [r.status for r in results] == ["sent", "sent"]
    assert metric_value("commands_deadlock_retries_total", step="sent") == retries + 1
    assert await db.fetchval("SELECT count(*) FROM commands WHERE cmd_id LIKE 'dl-%' AND status = 'sent'") == 2
