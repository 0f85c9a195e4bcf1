"""Responses are tied to their node (contract §3.9); heartbeat values within bounds; known statuses only."""
import asyncio

from common import testing

import metrics as m
from testing import apublish, dead_letters, seed


def topic(settings, ids, rest, zone=None, gh="gh-1"):
    return f"{settings.mqtt_topic_root}/{gh}/{zone or 'zn-%s' % ids['zone_id']}/{ids['node_uid']}/{rest}"


async def add_command(db, cmd_id, zone_id, node_id, status="sent"):
    await db.execute("INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, created_at,"
                     " updated_at, sent_at) VALUES ($1, $2, 'pump_in', 'run_pump', '{\"duration_ms\": 1000}', $3, $4,"
                     " now(), now(), now())", zone_id, node_id, status, cmd_id)


async def test_a_response_counts_only_from_the_node_the_command_went_to(logger, db):
    s = logger.settings
    victim = await seed(db, node_uid="nd-victim")
    other = await seed(db, node_uid="nd-other")
    await add_command(db, "c-1", victim["zone_id"], victim["node_id"])
    # a Laravel zone command not yet completed by the bridge: no node recorded, so no sender can be verified
    await db.execute("INSERT INTO commands (zone_id, cmd, params, status, cmd_id, created_at, updated_at)"
                     " VALUES ($1, 'run_pump', '[]', 'pending', 'c-laravel', now(), now())", victim["zone_id"])
    overcurrent = {"status": "ERROR", "error_code": "overcurrent", "error_message": "too much"}
    await apublish(s, [
        (topic(s, other, "pump_in/command_response"), {"cmd_id": "c-1", **overcurrent}),      # another node
        (topic(s, victim, "pump_in/command_response", zone=f"zn-{other['zone_id']}"),         # another zone
         {"cmd_id": "c-1", **overcurrent}),
        (topic(s, victim, "pump_in/command_response", gh="gh-evil"), {"cmd_id": "c-1", **overcurrent}),
        (topic(s, victim, "pump_in/command_response"), {"cmd_id": "c-laravel", "status": "ACK"}),
    ])

    async def refused():
        found = [d for d in await dead_letters(s) if d.get("reason") == b"node_mismatch"]
        return found if len(found) == 4 else None
    await testing.eventually(refused, 20)
    rows = {r["cmd_id"]: r["status"] for r in await db.fetch("SELECT cmd_id, status FROM commands")}
    assert rows == {"c-1": "sent", "c-laravel": "pending"}
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE type = 'OVERCURRENT'") == 0
    # the node it was sent to, from its own zone and greenhouse: counts (and raises the alert)
    await apublish(s, [(topic(s, victim, "pump_in/command_response"), {"cmd_id": "c-1", **overcurrent})])
    await testing.eventually(lambda: db.fetchval("SELECT status = 'failed' FROM commands WHERE cmd_id = 'c-1'"), 20)
    alert = await testing.eventually(lambda: db.fetchrow("SELECT * FROM alerts WHERE type = 'OVERCURRENT'"), 10)
    assert alert["zone_id"] == victim["zone_id"] and alert["details"]["node_uid"] == "nd-victim"


def rejected(field: str) -> float:
    return m.HEARTBEAT_FIELDS_REJECTED.labels(field)._value.get()


async def test_heartbeat_fields_within_bounds_and_long_uptimes_kept(logger, db):
    s = logger.settings
    ids = await seed(db, last_seen_sql="NULL")
    hb = topic(s, ids, "heartbeat")
    await apublish(s, [(hb, {"uptime": 3_000_000_000, "free_heap": 102_000, "rssi": -62})])  # 35 days in ms
    await testing.eventually(lambda: db.fetchval(
        "SELECT uptime_seconds = 3000000 FROM nodes WHERE id = $1", ids["node_id"]), 20)
    before = {f: rejected(f) for f in ("uptime", "free_heap", "rssi")}
    await apublish(s, [(hb, {"uptime": -5, "free_heap": -1, "rssi": 20}),
                       (hb, {"uptime": 10**15, "free_heap": 10**9, "rssi": -200})])
    await testing.eventually(lambda: asyncio.sleep(0, rejected("rssi") - before["rssi"] >= 2), 20)
    row = await db.fetchrow("SELECT uptime_seconds, free_heap_bytes, rssi FROM nodes WHERE id = $1", ids["node_id"])
    assert tuple(row) == (3_000_000, 102_000, -62)  # every absurd field refused alone, the old values kept
    assert {f: rejected(f) - before[f] for f in before} == {"uptime": 2, "free_heap": 2, "rssi": 2}


async def test_only_known_statuses_count(logger, db):
    s = logger.settings
    ids = await seed(db, status="offline", last_seen_sql="NULL")
    await apublish(s, [(topic(s, ids, "status"), {"status": "PWNED"})])
    await testing.eventually(lambda: asyncio.sleep(
        0, m.EVENTS_INVALID.labels("status", "unknown_status")._value.get() > 0), 20)
    assert await db.fetchval("SELECT status FROM nodes WHERE id = $1", ids["node_id"]) == "offline"
    await apublish(s, [(topic(s, ids, "status"), {"status": "Online"})])
    await testing.eventually(lambda: db.fetchval("SELECT status = 'online' FROM nodes WHERE id = $1", ids["node_id"]),
                             20)
    assert await db.fetchval("SELECT count(*) FROM nodes WHERE status NOT IN ('online', 'offline')") == 0
