import asyncio
import uuid

import orjson
import pytest

from common import testing
from common.alerts import ensure_alert, resolve_alerts
from common.command_catalogue import CommandError, validate_command
from common.commands import (CommandPublishError, build_payload, issue_command, new_cmd_id, record_response,
                             sweep_timeouts)
from common.mqtt import MqttClient
from common.schemas import CommandResponse
from common.topics import Topics


@pytest.fixture
async def zone(db):
    zone_id = await testing.seed_zone(db, "gh-1", "Z")
    await testing.seed_node(db, "nd-1", zone_id, type="pump", channels=[
        testing.Channel("pump_in", {"safe_limits": {"max_duration_ms": 5000, "min_off_ms": 3000}})])
    return zone_id


def test_cmd_ids_are_unique_sortable_uuids():
    ids = [new_cmd_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)


def test_payload_is_flat_and_nested():
    payload = build_payload("run_pump", "abc", {"duration_ms": 2500, "cmd": "evil", "cmd_id": "evil"})
    assert payload["cmd"] == "run_pump" and payload["cmd_id"] == "abc" and payload["duration_ms"] == 2500
    assert payload["params"]["duration_ms"] == 2500 and isinstance(payload["ts"], int)


@pytest.mark.parametrize("cmd, params, config, words", [
    ("adjust_ph", {}, None, "unknown command"),
    ("run_pump", {}, None, "duration_ms is required"),
    ("run_pump", {"duration_ms": "9.5"}, None, "must be an integer"),
    ("run_pump", {"duration_ms": "٩"}, None, "must be an integer"),  # Unicode digits are not a number
    ("run_pump", {"duration_ms": 2**63}, None, "integer outside the 64-bit range"),
    ("run_pump", {"duration_ms": 5, "note": "a\x00b"}, None, "params.note: contains a NUL character"),
    ("run_pump", {"duration_ms": 61_000}, None, "outside the safe range"),
    ("run_pump", {"duration_ms": 6000}, {"safe_limits": {"max_duration_ms": 5000}}, "max_duration_ms=5000"),
    ("dose", {"dose_ml": 9.0}, None, "outside the safe range"),
    ("set_relay", {"state": 1}, None, "true or false"),
    ("calibrate", {"stage": 1}, None, "one of known_ph, tds_value"),
])
def test_catalogue_rejects(cmd, params, config, words):
    with pytest.raises(CommandError, match=words):
        validate_command(cmd, params, config)


async def test_issue_publishes_once_per_cmd_id(settings, db, mqtt, mqtt_probe, zone):
    topics = Topics(settings.mqtt_topic_root)
    kwargs = dict(gh_uid="gh-1", zone_id=zone, node_uid="nd-1", channel="pump_in", cmd="run_pump",
                  params={"duration_ms": 2500}, cmd_id="laravel-uuid-1")
    first = await issue_command(db, mqtt, topics, **kwargs)
    second = await issue_command(db, mqtt, topics, **kwargs)
    assert (first.published, second.published) == (True, False)
    assert first.topic == f"{settings.mqtt_topic_root}/gh-1/zn-{zone}/nd-1/pump_in/command"
    [msg] = await mqtt_probe.wait_for(1, first.topic)
    await asyncio.sleep(0.3)
    assert len(mqtt_probe.received(first.topic)) == 1
    body = orjson.loads(msg.payload)
    assert (msg.qos, msg.retain, body["cmd"], body["cmd_id"], body["duration_ms"]) == (1, False, "run_pump",
                                                                                      "laravel-uuid-1", 2500)
    row = await db.fetchrow("SELECT * FROM commands WHERE cmd_id = 'laravel-uuid-1'")
    assert row["status"] == "sent" and row["sent_at"] is not None and row["zone_id"] == zone
    assert row["node_id"] is not None and row["params"] == {"duration_ms": 2500}


async def test_concurrent_commands_share_batches_and_repeats_publish_once(settings, db, mqtt, mqtt_probe, zone):
    topics = Topics(settings.mqtt_topic_root)

    def send(cmd_id):
        return issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd-1", channel="pump_in",
                             cmd="stop_pump", cmd_id=cmd_id)

    ids = [f"c-{i}" for i in range(40)]
    results = await asyncio.gather(*(send(i) for i in ids + ids[:10]), send(None))
    assert sum(r.published for r in results) == 41 and all(r.status == "sent" for r in results)
    await mqtt_probe.wait_for(41, f"{settings.mqtt_topic_root}/#")
    await asyncio.sleep(0.3)
    published_ids = sorted(p["cmd_id"] for p in mqtt_probe.payloads(f"{settings.mqtt_topic_root}/#"))
    assert len(published_ids) == 41 and set(ids) <= set(published_ids)
    assert await db.fetchval("SELECT count(*) FROM commands WHERE status = 'sent'") == 41
    with pytest.raises(CommandError, match="max_duration_ms=5000"):
        await asyncio.gather(send("ok-1"), issue_command(
            db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd-1", channel="pump_in", cmd="run_pump",
            params={"duration_ms": 9000}, cmd_id="too-long"))
    assert await db.fetchval("SELECT count(*) FROM commands WHERE cmd_id = 'too-long'") == 0


async def _in_flight(*calls):
    """Each call issued once the batch of the one before it is in its first database round trip."""
    tasks = []
    for call in calls:
        tasks.append(asyncio.create_task(call))
        for _ in range(3):
            await asyncio.sleep(0)
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_cmd_id_repeated_while_its_batch_is_in_flight_is_published_once(settings, db, mqtt, mqtt_probe,
                                                                                zone):
    """The repeat arrives while the first request's row is claimed and its publish is held: it waits for
    that batch's answer (published once, "sent"), instead of finding a claimed row and being told to retry."""
    topics = Topics(settings.mqtt_topic_root)
    release = asyncio.Event()
    publish = mqtt.publish_json

    async def held_publish(topic, payload, *args, **kwargs):
        if payload["cmd_id"] == "fl-1":
            await release.wait()
        return await publish(topic, payload, *args, **kwargs)
    mqtt.publish_json = held_publish

    def send(cmd_id):
        return asyncio.create_task(issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd-1",
                                                 channel="pump_in", cmd="stop_pump", cmd_id=cmd_id))
    first = send("fl-1")
    await testing.eventually(lambda: db.fetchval("SELECT sent_at IS NOT NULL FROM commands WHERE cmd_id = 'fl-1'"),
                             10, message="fl-1 claimed")
    again, other = send("fl-1"), send("fl-2")
    assert (await other).published  # another batch goes out meanwhile
    assert not again.done()
    release.set()
    first, again = await first, await again
    assert (first.published, again.published) == (True, False)
    assert {first.status, again.status} == {"sent"}
    await mqtt_probe.wait_for(2, f"{settings.mqtt_topic_root}/#")
    await asyncio.sleep(0.3)
    assert sorted(p["cmd_id"] for p in mqtt_probe.payloads(f"{settings.mqtt_topic_root}/#")) == ["fl-1", "fl-2"]


async def test_min_off_holds_between_batches_in_flight(settings, db, mqtt, mqtt_probe, zone):
    topics = Topics(settings.mqtt_topic_root)

    def run(cmd_id):
        return issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd-1", channel="pump_in",
                             cmd="run_pump", params={"duration_ms": 1000}, cmd_id=cmd_id)
    results = await _in_flight(run("mo-1"), run("mo-2"), run("mo-3"))
    assert getattr(results[0], "status", None) == "sent", results
    assert all(isinstance(r, CommandError) and "min_off_ms=3000" in str(r) for r in results[1:]), results
    assert await db.fetchval("SELECT array_agg(cmd_id) FROM commands") == ["mo-1"]


async def test_laravel_pending_row_is_published(settings, db, mqtt, mqtt_probe, zone):
    await db.execute("INSERT INTO commands (cmd, cmd_id, status, created_at) VALUES ('stop_pump', 'pend-1', 'pending',"
                     " now())")
    result = await issue_command(db, mqtt, Topics(settings.mqtt_topic_root), gh_uid="gh-1", zone_id=zone,
                                 node_uid="nd-1", channel="pump_in", cmd="stop_pump", cmd_id="pend-1")
    assert result.published and await db.fetchval("SELECT status FROM commands WHERE cmd_id='pend-1'") == "sent"


async def test_channel_limit_and_unsafe_topic_rejected_without_a_row(settings, db, mqtt, zone):
    topics = Topics(settings.mqtt_topic_root)
    with pytest.raises(CommandError, match="max_duration_ms=5000"):
        await issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd-1", channel="pump_in",
                            cmd="run_pump", params={"duration_ms": 6000})
    with pytest.raises(CommandError, match="node uid"):
        await issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd/+", channel="pump_in",
                            cmd="stop_pump")
    assert await db.fetchval("SELECT count(*) FROM commands") == 0


async def test_failed_publish_never_claims_sent(db, zone):
    settings = testing.isolated_settings(MQTT_PORT=str(testing.free_port()), PG_DB=db.settings.pg_db)
    down = MqttClient(settings, "-down")
    await down.start()
    with pytest.raises(CommandPublishError):
        await issue_command(db, down, Topics(settings.mqtt_topic_root), gh_uid="gh-1", zone_id=zone,
                            node_uid="nd-1", channel="pump_in", cmd="stop_pump", cmd_id="c-down")
    assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = 'c-down'") == "pending"
    await down.stop()


async def test_response_and_timeout_lifecycle(settings, db, mqtt, zone):
    topics = Topics(settings.mqtt_topic_root)
    for cmd_id in ("a", "b", "c"):
        await issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd-1", channel="pump_in",
                            cmd="stop_pump", cmd_id=cmd_id)
    ack = CommandResponse(cmd_id="a", status="ACK")
    assert (await record_response(db, ack, {"status": "ACK"}))["status"] == "ack"
    assert await record_response(db, ack, {}) is None  # already closed: no second change
    err = CommandResponse(cmd_id="b", status="ERROR", error_code="overcurrent", error="too much")
    row = await record_response(db, err, {"status": "ERROR"})
    assert row["status"] == "failed"
    assert await record_response(db, CommandResponse(cmd_id="zzz", status="ACK"), {}) is None
    await db.execute("UPDATE commands SET sent_at = now() - interval '60 seconds' WHERE cmd_id = 'c'")
    assert await sweep_timeouts(db, 30) == 1
    rows = {r["cmd_id"]: r for r in await db.fetch("SELECT * FROM commands")}
    assert rows["a"]["ack_at"] is not None and rows["b"]["error_code"] == "overcurrent"
    assert rows["b"]["error_message"] == "too much" and rows["c"]["status"] == "timeout"


async def test_alert_is_opened_once_and_resolved(db, zone):
    async with db.transaction() as conn:
        first = await ensure_alert(conn, zone_id=zone, alert_type="NODE_OFFLINE", details={"node_uid": "a"},
                                   match={"node_uid": "a"})
        again = await ensure_alert(conn, zone_id=zone, alert_type="NODE_OFFLINE",
                                   details={"node_uid": "a", "n": 2}, match={"node_uid": "a"})
        other = await ensure_alert(conn, zone_id=zone, alert_type="NODE_OFFLINE", details={"node_uid": "b"},
                                   match={"node_uid": "b"})
        assert first[1] and not again[1] and first[0] == again[0] and other[1]
        assert await resolve_alerts(conn, zone_id=zone, alert_type="NODE_OFFLINE", match={"node_uid": "a"}) == [first[0]]
    rows = await db.fetch("SELECT code, status, details FROM alerts ORDER BY id")
    assert [(r["code"], r["status"]) for r in rows] == [("biz_node_offline", "RESOLVED"), ("biz_node_offline", "ACTIVE")]
    assert rows[0]["details"] == {"node_uid": "a", "n": 2}
    events = [r["type"] for r in await db.fetch("SELECT type FROM zone_events ORDER BY id")]
    assert events == ["ALERT_CREATED", "ALERT_CREATED", "ALERT_RESOLVED"]


async def test_a_batch_statement_failure_is_retried_per_command(settings, db, mqtt, mqtt_probe, zone):
    """A command that passes validation but fails its INSERT (here a source longer than the column)
    fails alone; the commands batched with it are recorded and published."""
    topics = Topics(settings.mqtt_topic_root)

    def send(cmd_id, source="bridge"):
        return issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd-1", channel="pump_in",
                             cmd="stop_pump", cmd_id=cmd_id, source=source)
    results = await asyncio.gather(*(send(f"iso-{i}") for i in range(10)), send("iso-bad", "s" * 40),
                                   *(send(f"iso-{i}") for i in range(10, 20)), return_exceptions=True)
    bad = results[10]
    good = results[:10] + results[11:]
    assert isinstance(bad, Exception) and not isinstance(bad, (CommandError, CommandPublishError))
    assert all(getattr(r, "status", None) == "sent" for r in good), good
    await mqtt_probe.wait_for(20, f"{settings.mqtt_topic_root}/#")
    assert await db.fetchval("SELECT count(*) FROM commands WHERE status = 'sent'") == 20
    assert await db.fetchval("SELECT count(*) FROM commands WHERE cmd_id = 'iso-bad'") == 0


DEEP: list = [1]
for _ in range(40):
    DEEP = [DEEP]


@pytest.mark.parametrize("kwargs, words", [
    (dict(params={"note": "\x00"}), "params.note: contains a NUL character"),
    (dict(params={"deep": DEEP}),
     "nested deeper than 32 levels"),
    (dict(params={"n": 2**63}), "integer outside the 64-bit range"),
    (dict(params={"n": float("nan")}), "must be a finite number"),
    (dict(zone_id=2**63), "zone id must be a positive 64-bit integer"),
    (dict(channel="pump\x00in"), "control character"),
])
async def test_values_jsonb_cannot_hold_are_refused_before_the_batch(settings, db, mqtt, mqtt_probe, zone, kwargs,
                                                                     words):
    topics = Topics(settings.mqtt_topic_root)
    call = dict(gh_uid="gh-1", zone_id=zone, node_uid="nd-1", channel="pump_in", cmd="stop_pump")
    bad = issue_command(db, mqtt, topics, **{**call, **kwargs})
    good = [issue_command(db, mqtt, topics, **call, cmd_id=f"ok-{i}") for i in range(5)]
    results = await asyncio.gather(bad, *good, return_exceptions=True)
    assert isinstance(results[0], CommandError) and words in str(results[0])
    assert all(getattr(r, "status", None) == "sent" for r in results[1:]), results
    await mqtt_probe.wait_for(5, f"{settings.mqtt_topic_root}/#")
    assert await db.fetchval("SELECT count(*) FROM commands") == 5


async def test_a_caller_cancelled_while_batched_does_not_fail_the_batch(settings, db, mqtt, mqtt_probe, zone):
    topics = Topics(settings.mqtt_topic_root)
    tasks = [asyncio.create_task(issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd-1",
                                               channel="pump_in", cmd="stop_pump", cmd_id=f"cx-{i}"))
             for i in range(10)]
    for _ in range(3):  # every caller is waiting and the batch is in its first database round trip
        await asyncio.sleep(0)
    tasks[4].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[4], asyncio.CancelledError)
    assert all(getattr(r, "status", None) == "sent" for i, r in enumerate(results) if i != 4), results
    # the issuer is still healthy afterwards
    after = await issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd-1", channel="pump_in",
                                cmd="stop_pump", cmd_id="cx-after")
    assert after.status == "sent"
    assert await db.fetchval("SELECT count(*) FROM commands WHERE status = 'sent' AND cmd_id <> 'cx-4'") == 10


@pytest.mark.parametrize("source", ["bridge", "automation", "scheduler"])
async def test_min_off_holds_a_pump_for_every_source_and_by_default(settings, db, mqtt, zone, source):
    """A pump that just ran is refused a second run by every source, with the §4.3 default min_off
    (3000 ms) when its channel states no limits; one that states min_off_ms 0 runs again once its run is over."""
    topics = Topics(settings.mqtt_topic_root)
    node_id = await db.fetchval("SELECT id FROM nodes WHERE uid = 'nd-1'")
    await testing.insert_row(db, "node_channels", node_id=node_id, channel="pump_bare", type="actuator", config={})
    await testing.insert_row(db, "node_channels", node_id=node_id, channel="pump_free", type="actuator",
                             config={"safe_limits": {"max_duration_ms": 5000, "min_off_ms": 0}})

    def run(channel):
        return issue_command(db, mqtt, topics, gh_uid="gh-1", zone_id=zone, node_uid="nd-1", channel=channel,
                             cmd="run_pump", params={"duration_ms": 1}, source=source)

    for channel, limit in (("pump_in", 3000), ("pump_bare", 3000)):
        await run(channel)
        with pytest.raises(CommandError, match=f"resting after its last run \\(safe_limits.min_off_ms={limit}\\)"):
            await run(channel)
    assert (await run("pump_free")).published
    await asyncio.sleep(1.0)  # Laravel's sent_at is timestamp(0): rounded, it can lie up to 0.5 s ahead
    assert (await run("pump_free")).published
    refused = await db.fetchval("SELECT count(*) FROM commands WHERE channel IN ('pump_in', 'pump_bare')")
    assert refused == 2  # a refusal records no row
