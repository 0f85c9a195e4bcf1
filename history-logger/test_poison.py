"""One poison message never stops the logger: every per-message failure is a dead letter with its
reason, valid messages beside it land, and dispatch goes on (issue: a ts before year 1 stopped it)."""
import asyncio

from common import testing

import metrics as m
from testing import apublish, dead_letters, seed, wait_rows

YEAR_ONE = "0001-01-01T00:00:00+14:00"  # before year 1 in UTC: datetime cannot represent it


def topic(settings, ids, *rest):
    return "/".join((settings.mqtt_topic_root, "gh-1", f"zn-{ids['zone_id']}", ids["node_uid"], *rest))


async def test_timestamps_before_year_one_never_stop_dispatch(logger, db):
    """More poison messages than the receive maximum (1000), valid readings interleaved, then a
    life sign: everything lands; the odd timestamps become the receive time (contract §3.1)."""
    s = logger.settings
    ids = await seed(db, status="offline", last_seen_sql="NULL")
    tel = topic(s, ids, "ph_sensor", "telemetry")
    items = []
    for i in range(1100):
        ts = YEAR_ONE if i % 2 else "9999-12-31T23:59:59-14:00"
        items.append((tel, {"metric": "PH", "value": 6.0, "seq": i, "ts": ts}))
        if i % 100 == 0:
            items.append((tel, {"metric": "PH", "value": 6.1, "seq": -i}))
    items.append((topic(s, ids, "heartbeat"), {"uptime": 5000, "rssi": -40}))
    await apublish(s, items)
    total = 1100 + 11
    await wait_rows(db, total, timeout=60)
    row = await db.fetchrow("SELECT count(*) AS n, min(ts) AS lo FROM telemetry_samples")
    assert row["n"] == total and row["lo"].year >= 2020
    await testing.eventually(lambda: db.fetchval(
        "SELECT status = 'online' FROM nodes WHERE id = $1", ids["node_id"]), 20)
    status = await logger.ready()
    assert status["mqtt"] is True


async def test_bad_life_signs_are_dead_lettered_with_their_reason(logger, db):
    s = logger.settings
    ids = await seed(db, status="online", last_seen_sql="now()")
    before = {r: m.EVENTS_INVALID.labels(k, r)._value.get() for k, r in
              (("status", "unknown_status"), ("heartbeat", "invalid_json"), ("command_response", "invalid_payload"))}
    await apublish(s, [
        (topic(s, ids, "status"), {"status": "PWNED"}),
        (topic(s, ids, "heartbeat"), b"{not json"),
        (topic(s, ids, "pump_in", "command_response"), {"status": "ACK"}),   # no cmd_id
        (topic(s, ids, "heartbeat"), {"uptime": 7000, "rssi": -55}),         # valid: lands
    ])
    await testing.eventually(lambda: db.fetchval(
        "SELECT rssi = -55 FROM nodes WHERE id = $1", ids["node_id"]), 20)

    async def all_dead():
        found = {(d["kind"].decode(), d["reason"].decode()) for d in await dead_letters(s) if "kind" in d}
        return found if {("status", "unknown_status"), ("heartbeat", "invalid_json"),
                         ("command_response", "invalid_payload")} <= found else None
    await testing.eventually(all_dead, 20)
    assert await db.fetchval("SELECT status FROM nodes WHERE id = $1", ids["node_id"]) == "online"
    assert m.EVENTS_INVALID.labels("status", "unknown_status")._value.get() > before["unknown_status"]


async def test_a_failing_event_is_set_aside_and_the_stream_goes_on(logger, db):
    """A life sign the database refuses (here: a command_response whose payload PostgreSQL cannot
    store as jsonb) is dead-lettered; the events after it are applied."""
    s = logger.settings
    ids = await seed(db)
    await db.execute("INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, created_at,"
                     " updated_at, sent_at) VALUES ($1, $2, 'pump_in', 'run_pump', '{}', 'sent', 'c-nul', now(),"
                     " now(), now())", ids["zone_id"], ids["node_id"])
    await apublish(s, [
        (topic(s, ids, "pump_in", "command_response"), b'{"cmd_id":"c-nul","status":"ACK","x":"a\\u0000b"}'),
        (topic(s, ids, "heartbeat"), {"uptime": 9000, "rssi": -33}),
    ])
    await testing.eventually(lambda: db.fetchval("SELECT rssi = -33 FROM nodes WHERE id = $1", ids["node_id"]), 20)

    async def refused():
        return [d for d in await dead_letters(s) if d.get("kind") == b"command_response"]
    [entry] = await testing.eventually(refused, 20)
    assert entry["reason"] == b"db_rejected"
    assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = 'c-nul'") == "sent"


async def test_ready_reports_a_dispatcher_that_no_longer_runs(logger):
    assert (await logger.ready())["mqtt"] is True
    logger.mqtt._dispatcher.cancel()  # however it ended: connected, but nothing is dispatched any more
    await testing.eventually(lambda: asyncio.sleep(0, logger.mqtt._dispatcher.done()), 5)
    assert logger.mqtt.connected and (await logger.ready())["mqtt"] is False
