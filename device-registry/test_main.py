"""Registration and config delivery end to end: a test node ↔ real Mosquitto ↔ the registry ↔ PostgreSQL."""
import httpx
import orjson
import pytest

from common import testing
from testing import FakeNode, make_zone, metric, node_row, start_registry, wait_node


def config_msgs(probe, settings, gh, zone_id, uid):
    return [m for m in probe.received(f"{settings.mqtt_topic_root}/{gh}/zn-{zone_id}/{uid}/config") if m.payload]


async def test_fresh_node_registers_once_and_again_after_reboot(settings, db, registry, node):
    registered = metric("node_hello_registered_total")
    node.hello()
    row = await wait_node(db)
    assert row["uid"] == "nd-ph-esp32a1b"
    assert (row["lifecycle_state"], row["validated"], row["type"]) == ("REGISTERED_BACKEND", True, "ph")
    assert row["fw_version"] == "v5.1.2" and row["hardware_revision"] == "v1.0"
    assert row["capabilities"] == ["ph", "temperature"] and row["first_seen_at"] is not None
    assert metric("node_hello_registered_total") == registered + 1

    node.hello(fw_version="v5.2.0")  # the same hardware after a reboot and a firmware update
    row2 = await wait_node(db, check=lambda r: r["fw_version"] == "v5.2.0")
    assert row2["id"] == row["id"] and row2["uid"] == row["uid"] and row2["first_seen_at"] == row["first_seen_at"]
    assert await db.fetchval("SELECT count(*) FROM nodes") == 1
    assert metric("node_hello_registered_total") == registered + 1


async def test_uid_collision_gets_a_suffix(settings, db, registry):
    first, second = FakeNode(settings, "esp32-a1b2c3d4e5f6"), FakeNode(settings, "esp32-a1b000000000")
    first.hello()
    await wait_node(db, first.hardware_id)
    second.hello()
    row = await wait_node(db, second.hardware_id)
    assert row["uid"] == "nd-ph-esp32a1b-1"
    climate = FakeNode(settings, "AA:BB:CC:DD:EE:FF", node_type="climate")
    climate.hello()
    assert (await wait_node(db, climate.hardware_id))["uid"] == "nd-clim-AABBCCDD"


async def test_zoned_hello_gets_config_right_away(settings, db, registry, node, mqtt_probe):
    zone_id = await make_zone(db)
    node.hello(meta={"greenhouse_token": "gh-1", "zone_id": zone_id, "node_name": "pH tank"})
    row = await wait_node(db)
    assert (row["zone_id"], row["lifecycle_state"], row["name"]) == (zone_id, "ASSIGNED_TO_ZONE", "pH tank")
    (msg,) = await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/gh-1/zn-{zone_id}/{row['uid']}/config")
    config = orjson.loads(msg.payload)
    assert (config["node_id"], config["gh_uid"], config["zone_uid"], config["version"]) == \
        (row["uid"], "gh-1", f"zn-{zone_id}", 1)
    for ident in (node.hardware_id, row["uid"]):  # §5.5 temporary topics
        await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/gh-temp/zn-temp/{ident}/config")


async def test_hello_on_node_topic_takes_zone_from_topic(settings, db, registry, node):
    zone_id = await make_zone(db)
    node.hello(topic=f"{settings.mqtt_topic_root}/gh-1/zn-{zone_id}/nd-x/node_hello", meta={"zone_id": 999})
    row = await wait_node(db)
    assert row["zone_id"] == zone_id and row["lifecycle_state"] == "ASSIGNED_TO_ZONE"


async def test_hello_for_zone_of_another_greenhouse_does_not_bind(settings, db, registry, node):
    zone_id = await make_zone(db, "gh-2")
    await make_zone(db, "gh-1")
    node.hello(meta={"greenhouse_token": "gh-1", "zone_id": zone_id})
    row = await wait_node(db)
    assert row["zone_id"] is None and row["lifecycle_state"] == "REGISTERED_BACKEND"


async def test_assign_ok_applied_and_temp_topics_cleared(settings, db, registry, api, node, mqtt_probe):
    zone_id = await make_zone(db)
    node.hello()
    uid = (await wait_node(db))["uid"]
    response = await api.put(f"/nodes/{uid}/zone", json={"zone_id": zone_id})
    assert response.status_code == 200, response.text
    body = response.json()["data"]
    assert body["node"]["lifecycle_state"] == "ASSIGNED_TO_ZONE" and body["config"]["published"] is True
    topic = f"{settings.mqtt_topic_root}/gh-1/zn-{zone_id}/{uid}/config"
    assert body["config"]["topic"] == topic
    (msg,) = await mqtt_probe.wait_for(1, topic)
    assert msg.qos == 1 and orjson.loads(msg.payload)["version"] == 1

    state = (await api.get(f"/nodes/{uid}/config")).json()["data"]
    assert (state["version"], state["applied_version"], state["delivery"]["temp_topics_pending"]) == (1, None, True)

    node.config_response("gh-1", zone_id, uid, "ACK", applied_at=12.5, restarted=["mqtt"])

    async def applied():
        data = (await api.get(f"/nodes/{uid}/config")).json()["data"]
        return data if data["applied_version"] == 1 else None
    state = await testing.eventually(applied, 15, message="applied version")
    assert state["up_to_date"] and state["delivery"]["node_error"] is None
    assert not state["delivery"]["temp_topics_pending"]
    for ident in (node.hardware_id, uid):  # cleared with an empty retained payload
        temp = f"{settings.mqtt_topic_root}/gh-temp/zn-temp/{ident}/config"
        await testing.eventually(lambda: _has_empty(mqtt_probe, temp), 10, message=f"{temp} cleared")
    fresh = testing.MqttProbe(settings.mqtt_host, settings.mqtt_port, f"{settings.mqtt_topic_root}/gh-temp/#", topic)
    try:
        (retained,) = await fresh.wait_for(1, topic)  # the real topic keeps its retained config
        assert retained.retain
        assert fresh.received(f"{settings.mqtt_topic_root}/gh-temp/#") == []
    finally:
        fresh.close()
    assert await db.fetchval("SELECT count(*) FROM zone_events WHERE zone_id = $1 AND type = 'NODE_CONFIG_APPLIED'",
                             zone_id) == 1

    # The same answer again (a re-delivered config, or a second registry replica handling the same
    # message) is recorded, but the version's zone event stays one.
    handled = metric("registry_configs_applied_total")
    node.config_response("gh-1", zone_id, uid, "ACK", applied_at=13.0)

    async def recorded_again():
        return metric("registry_configs_applied_total") > handled
    await testing.eventually(recorded_again, 15, message="second config_response handled")
    assert await db.fetchval("SELECT count(*) FROM zone_events WHERE zone_id = $1 AND type = 'NODE_CONFIG_APPLIED'",
                             zone_id) == 1


async def _has_empty(probe, topic):
    return any(m.payload == b"" for m in probe.received(topic))


async def test_error_is_shown_and_nothing_claims_applied(settings, db, registry, api, node):
    zone_id = await make_zone(db)
    node.hello(meta={"greenhouse_token": "gh-1", "zone_id": zone_id})
    uid = (await wait_node(db))["uid"]
    await testing.eventually(lambda: _published(db, uid), 15, message="config published")
    node.config_response("gh-1", zone_id, uid, "ERROR", error="Invalid config structure", version=1, hash="abc")

    async def errored():
        data = (await api.get(f"/nodes/{uid}/config")).json()["data"]
        return data if data["delivery"]["node_error"] else None
    state = await testing.eventually(errored, 15, message="node error recorded")
    assert state["delivery"]["node_error"] == "Invalid config structure"
    assert state["delivery"]["node_error_version"] == 1
    assert state["applied_version"] is None and not state["up_to_date"]
    alert = await db.fetchrow("SELECT * FROM alerts WHERE type = 'CONFIG_ERROR' AND status = 'ACTIVE'")
    assert (alert["zone_id"], alert["code"], alert["source"]) == (zone_id, "biz_config_error", "biz")
    assert alert["details"]["node_uid"] == uid and alert["details"]["error"] == "Invalid config structure"

    node.config_response("gh-1", zone_id, uid, "OK", node_id=uid, applied=True)  # a later success resolves it
    await testing.eventually(lambda: _alert_status(db, "RESOLVED"), 15, message="alert resolved")
    assert (await api.get(f"/nodes/{uid}/config")).json()["data"]["applied_version"] == 1


async def _published(db, uid):
    return await db.fetchval("SELECT d.published_version FROM node_config_delivery d JOIN nodes n"
                             " ON n.id = d.node_id WHERE n.uid = $1", uid)


async def _alert_status(db, status):
    return await db.fetchval("SELECT status FROM alerts WHERE type = 'CONFIG_ERROR'") == status


async def test_new_version_while_offline_is_delivered_when_online(settings, db, registry, api, node, mqtt_probe):
    zone_id = await make_zone(db)
    node.hello(meta={"greenhouse_token": "gh-1", "zone_id": zone_id})
    uid = (await wait_node(db))["uid"]
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/gh-1/zn-{zone_id}/{uid}/config")
    node.config_response("gh-1", zone_id, uid, "OK")
    await testing.eventually(lambda: _applied(db, uid, 1), 15, message="v1 applied")

    # The node goes offline; an operator changes its config.
    current = (await api.get(f"/nodes/{uid}/config")).json()["data"]["config"]
    current["channels"] = [{"name": "ph_sensor", "type": "SENSOR", "metric": "PH", "poll_interval_ms": 5000}]
    response = await api.put(f"/nodes/{uid}/config", json=current)
    assert response.status_code == 200 and response.json()["data"]["version"] == 2
    await testing.eventually(lambda: _count_version(mqtt_probe, settings, zone_id, uid, 2, 1), 10,
                             message="v2 published once")

    node.status("gh-1", zone_id, uid, "ONLINE")  # back online, still on version 1
    await testing.eventually(lambda: _count_version(mqtt_probe, settings, zone_id, uid, 2, 2), 15,
                             message="v2 re-sent on ONLINE")
    node.config_response("gh-1", zone_id, uid, "ACK")
    await testing.eventually(lambda: _applied(db, uid, 2), 15, message="v2 applied")

    node.status("gh-1", zone_id, uid, "ONLINE")  # up to date: nothing re-sent
    await _drain(settings, node)
    assert len(config_msgs(mqtt_probe, settings, "gh-1", zone_id, uid)) == 3
    state = (await api.get(f"/nodes/{uid}/config")).json()["data"]
    assert [v["version"] for v in state["versions"]] == [1, 2]
    history = await db.fetch("SELECT v.config FROM node_config_versions v JOIN nodes n ON n.id = v.node_id"
                             " WHERE n.uid = $1 ORDER BY v.version", uid)
    assert len(history[0]["config"]["channels"]) == 0 and history[1]["config"]["channels"][0]["poll_interval_ms"] == 5000


async def _applied(db, uid, version):
    return await db.fetchval("SELECT d.applied_version FROM node_config_delivery d JOIN nodes n"
                             " ON n.id = d.node_id WHERE n.uid = $1", uid) == version


async def _count_version(probe, settings, zone_id, uid, version, count):
    msgs = config_msgs(probe, settings, "gh-1", zone_id, uid)
    return len([m for m in msgs if orjson.loads(m.payload)["version"] == version]) == count


async def _drain(settings, node):
    """Every message published before this one has been handled (one dispatcher, in order)."""
    label = dict(kind="config_request", reason="unknown_node")
    before = metric("registry_messages_ignored_total", **label)
    node.publish(f"{settings.mqtt_topic_root}/gh-1/config_request", {"node_id": "nobody"})

    async def handled():
        return metric("registry_messages_ignored_total", **label) > before
    await testing.eventually(handled, 15, message="registry caught up")


async def test_config_request_republishes(settings, db, registry, node, mqtt_probe):
    zone_id = await make_zone(db)
    node.hello(meta={"greenhouse_token": "gh-1", "zone_id": zone_id})
    uid = (await wait_node(db))["uid"]
    topic = f"{settings.mqtt_topic_root}/gh-1/zn-{zone_id}/{uid}/config"
    await mqtt_probe.wait_for(1, topic)
    registry.delivery.republish_interval_sec = 0  # the hello's delivery just went out
    node.publish(f"{settings.mqtt_topic_root}/gh-1/config_request", {"node_id": uid})
    await mqtt_probe.wait_for(2, topic)


async def test_invalid_hellos_are_counted_and_create_nothing(settings, db, registry, node):
    cases = [
        ("invalid_json", b"{not json"),
        ("invalid_json", b"[1, 2]"),
        ("message_type", node.hello_payload(message_type="hello")),
        ("hardware_id", {k: v for k, v in node.hello_payload().items() if k != "hardware_id"}),
        ("hardware_id", node.hello_payload(hardware_id="esp32/evil")),
        ("hardware_id", node.hello_payload(hardware_id="x" * 129)),
        ("capabilities", node.hello_payload(capabilities="ph")),
        ("node_type", node.hello_payload(node_type="p" * 65)),
        ("provisioning_meta", node.hello_payload(meta={"zone_id": [3]})),
    ]
    before = {reason: metric("registry_node_hello_invalid_total", reason=reason) for reason, _ in cases}
    for _, payload in cases:
        node.publish(f"{settings.mqtt_topic_root}/node_hello", payload)
    FakeNode(settings, "esp32-0000000000ok").hello()  # the loop goes on after bad input
    await wait_node(db, "esp32-0000000000ok")
    for reason in before:
        expected = before[reason] + sum(1 for r, _ in cases if r == reason)
        assert metric("registry_node_hello_invalid_total", reason=reason) == expected, reason
    assert await db.fetchval("SELECT count(*) FROM nodes") == 1


async def test_decommissioned_hardware_registers_as_new_node(settings, db, registry, node):
    node.hello()
    old = await wait_node(db)
    await db.execute("UPDATE nodes SET lifecycle_state = 'DECOMMISSIONED' WHERE id = $1", old["id"])
    node.hello()
    new = await wait_node(db, check=lambda r: r["id"] != old["id"])
    assert new["uid"] == "nd-ph-esp32a1b-1" and new["lifecycle_state"] == "REGISTERED_BACKEND"
    assert await db.fetchval("SELECT hardware_id FROM nodes WHERE id = $1", old["id"]) is None


async def test_runs_as_a_process_and_stops_on_sigterm(settings, db, node):
    env = testing.settings_env(settings.replace(py_api_token="t", registry_port=testing.free_port(),
                                                mqtt_clean_session=True))
    proc = testing.ServiceProcess("device-registry", env).start()
    try:
        async def healthy():
            try:
                async with httpx.AsyncClient() as client:
                    r = await client.get(f"http://127.0.0.1:{env['REGISTRY_PORT']}/ready", timeout=2)
                return r.status_code == 200
            except httpx.HTTPError:
                return False
        await testing.eventually(healthy, 30, interval=0.2, message="registry process ready")

        async def registered():  # hello is idempotent: repeat it until the subscription is in place
            node.hello()
            return await node_row(db)
        row = await testing.eventually(registered, 20, interval=0.3, message="node registered by the process")
        assert row["uid"] == "nd-ph-esp32a1b"
    finally:
        code = proc.terminate()
    assert code == 0, proc.log()[-2000:]


async def test_bad_config_responses_are_counted_and_skipped(settings, db, registry, node):
    zone_id = await make_zone(db)
    node.hello(meta={"greenhouse_token": "gh-1", "zone_id": zone_id})
    uid = (await wait_node(db))["uid"]
    labels = ("invalid_json", "invalid_field", "unknown_node")
    before = {r: metric("registry_config_response_invalid_total", reason=r) for r in labels}
    node.publish(node.node_topic("gh-1", zone_id, uid, "config_response"), b"OK")
    node.config_response("gh-1", zone_id, uid, "MAYBE")
    node.config_response("gh-1", zone_id, "nd-unknown", "OK")
    await _drain(settings, node)
    for reason in labels:
        assert metric("registry_config_response_invalid_total", reason=reason) == before[reason] + 1, reason
    assert not await _applied(db, uid, 1)


async def test_refused_version_is_not_resent_on_online(settings, db, registry, node, mqtt_probe):
    zone_id = await make_zone(db)
    node.hello(meta={"greenhouse_token": "gh-1", "zone_id": zone_id})
    uid = (await wait_node(db))["uid"]
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/gh-1/zn-{zone_id}/{uid}/config")
    node.config_response("gh-1", zone_id, uid, "ERROR", error="bad channel")
    registry.delivery.republish_interval_sec = 0
    node.status("gh-1", zone_id, uid, "ONLINE")
    await _drain(settings, node)
    assert len(config_msgs(mqtt_probe, settings, "gh-1", zone_id, uid)) == 1  # the node refused v1: not resent
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE type = 'CONFIG_ERROR' AND status = 'ACTIVE'") == 1


def test_production_refuses_to_start_without_api_token(settings, capsys):
    import main
    with pytest.raises(SystemExit) as info:
        main.build(settings.replace(app_env="production", pg_pass="a-real-secret", py_api_token="changeme"))
    assert info.value.code == 2 and "PY_API_TOKEN" in capsys.readouterr().err


async def test_config_response_counts_only_from_the_node_it_was_sent_to(settings, db, registry, node, mqtt_probe):
    """Another node, another zone or greenhouse, a placeholder topic with nothing pending there, or a
    version we never published: refused by reason, and nothing is applied, failed or alerted."""
    zone_id, other_zone = await make_zone(db), await make_zone(db)
    node.hello(meta={"greenhouse_token": "gh-1", "zone_id": zone_id})
    uid = (await wait_node(db))["uid"]
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/gh-1/zn-{zone_id}/{uid}/config")
    intruder = FakeNode(settings, "esp32-0badc0ffee00")
    intruder.hello(meta={"greenhouse_token": "gh-1", "zone_id": other_zone})
    intruder_uid = (await wait_node(db, intruder.hardware_id))["uid"]
    await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/gh-1/zn-{other_zone}/{intruder_uid}/config")
    await _drain(settings, node)

    cases = [  # (reason, topic segments, payload)
        ("topic_mismatch", ("gh-1", other_zone, uid), {"status": "ACK"}),           # right node, wrong zone
        ("topic_mismatch", ("gh-2", zone_id, uid), {"status": "ACK"}),              # wrong greenhouse
        ("topic_mismatch", ("gh-1", zone_id, intruder_uid), {"status": "ACK", "node_id": uid}),  # not its zone
        ("unknown_node", ("gh-1", zone_id, "nd-nobody"), {"status": "OK", "node_id": uid}),  # payload names the victim
        ("unknown_version", ("gh-1", zone_id, uid), {"status": "OK", "version": 7}),
        ("unknown_version", ("gh-1", zone_id, uid), {"status": "OK", "version": 0}),
        ("unknown_version", ("gh-1", zone_id, uid), {"status": "ERROR", "error": "x", "version": -2**63}),
        ("unknown_version", ("gh-1", zone_id, uid), {"status": "OK", "version": 2**63 - 1}),
        ("invalid_field", ("gh-1", zone_id, uid), {"status": "OK", "version": 2**70}),  # not an integer to us
        ("topic_mismatch", ("gh-temp", "zn-temp", "node-temp"), {"status": "ERROR", "node_id": intruder_uid}),
    ]
    reasons = {r for r, _, _ in cases}
    before = {r: metric("registry_config_response_invalid_total", reason=r) for r in reasons}
    # The intruder's own ACK on its real topic counts and ends its gh-temp window.
    intruder.config_response("gh-1", other_zone, intruder_uid, "ACK")
    await testing.eventually(lambda: _applied(db, intruder_uid, 1), 15, message="intruder applied its own v1")
    for _, (gh, zone, who), payload in cases:
        node.publish(node.node_topic(gh, zone, who, "config_response"), payload)
    await _drain(settings, node)
    for reason in reasons:
        expected = before[reason] + sum(1 for r, _, _ in cases if r == reason)
        assert metric("registry_config_response_invalid_total", reason=reason) == expected, reason
    state = await db.fetchrow("SELECT d.* FROM node_config_delivery d JOIN nodes n ON n.id = d.node_id"
                              " WHERE n.uid = $1", uid)
    assert (state["applied_version"], state["node_error"]) == (None, None)
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE type = 'CONFIG_ERROR'") == 0

    # The node itself, on its own topic, about the version it was sent: counts.
    node.config_response("gh-1", zone_id, uid, "ACK", version=1)
    await testing.eventually(lambda: _applied(db, uid, 1), 15, message="own response applied")


async def test_new_nodes_are_rate_limited_but_known_ones_are_not(settings, db):
    """A flood of invented hardware ids creates at most REGISTRY_NEW_NODES_PER_MIN nodes; the excess is
    counted; a known node re-announcing itself in the middle of the flood is still updated."""
    service = await start_registry(settings, {"REGISTRY_NEW_NODES_PER_MIN": "3"})
    try:
        known = FakeNode(settings, "esp32-known0000001")
        known.hello()
        await wait_node(db, known.hardware_id)
        limited = metric("registry_node_hello_rate_limited_total")
        flood = [FakeNode(settings, f"esp32-flood{i:07d}") for i in range(10)]
        messages = [(f"{settings.mqtt_topic_root}/node_hello", orjson.dumps(f.hello_payload()), 1, False)
                    for f in flood]
        messages.insert(5, (f"{settings.mqtt_topic_root}/node_hello",
                            orjson.dumps(known.hello_payload(fw_version="v9.9.9")), 1, False))
        testing.publish_sync(settings.mqtt_host, settings.mqtt_port, messages)
        await wait_node(db, known.hardware_id, check=lambda r: r["fw_version"] == "v9.9.9")
        await testing.eventually(lambda: _metric_at_least("registry_node_hello_rate_limited_total", limited + 8),
                                 15, message="flood counted")
        assert await db.fetchval("SELECT count(*) FROM nodes") == 3  # the known node and two new ones
        assert metric("registry_node_hello_rate_limited_total") == limited + 8
    finally:
        await service.stop()


async def _metric_at_least(name, value):
    return metric(name) >= value


async def test_hostile_hello_values_are_refused_and_do_not_stop_the_loop(settings, db, registry, node):
    """NUL characters, integers beyond bigint and deep nesting are refused by reason before any query;
    Unicode digits are not a zone id; the valid hello after them registers."""
    zone_id = await make_zone(db)
    arabic = str(zone_id).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    bad = [
        ("invalid_value", node.hello_payload(node_type="p\x00h")),
        ("invalid_value", node.hello_payload(meta={"node_name": "x\x00"})),
        ("invalid_value", node.hello_payload(capabilities=["ph\x00"])),
        ("invalid_value", node.hello_payload(meta={"zone_id": 2**63})),
        ("invalid_value", node.hello_payload(extra=_nested(40))),
        ("invalid_json", b'{"message_type": "node_hello", "hardware_id": "esp32-nan", "x": NaN}'),
    ]
    before = {r: metric("registry_node_hello_invalid_total", reason=r) for r, _ in bad}
    errors = metric("mqtt_handler_errors_total", filter=f"{settings.mqtt_topic_root}/node_hello")
    for _, payload in bad:
        node.publish(f"{settings.mqtt_topic_root}/node_hello", payload)
    node.hello(topic=f"{settings.mqtt_topic_root}/gh-1/zn-{arabic}/nd-x/node_hello",
               meta={"greenhouse_token": "gh-1", "zone_id": arabic})
    row = await wait_node(db)
    assert row["zone_id"] is None and row["lifecycle_state"] == "REGISTERED_BACKEND"
    for reason in before:
        assert metric("registry_node_hello_invalid_total", reason=reason) == \
            before[reason] + sum(1 for r, _ in bad if r == reason), reason
    assert metric("mqtt_handler_errors_total", filter=f"{settings.mqtt_topic_root}/node_hello") == errors
    assert await db.fetchval("SELECT count(*) FROM nodes") == 1


def _nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value
