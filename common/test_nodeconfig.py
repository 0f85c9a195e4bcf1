"""NodeConfig validation, content-hash versioning, storage and delivery on real PostgreSQL + Mosquitto."""
import asyncio
import copy

import orjson
import pytest

from common import nodeconfig as nc
from common import testing
from common.mqtt import MqttClient
from common.topics import Topics

GOOD = {
    "node_id": "nd-ph-1", "version": 3, "type": "ph", "gh_uid": "gh-1", "zone_uid": "zn-3",
    "channels": [
        {"name": "ph_sensor", "type": "SENSOR", "metric": "PH", "poll_interval_ms": 3000},
        {"name": "pump_acid", "type": "ACTUATOR", "metric": None, "actuator_type": "PUMP",
         "safe_limits": {"max_duration_ms": 5000, "min_off_ms": 3000}, "ml_per_second": 0.5}],
    "wifi": {"ssid": "HydroFarm", "pass": "secret"},
    "mqtt": {"host": "mqtt", "port": 1883, "keepalive": 30},
}


def variant(change):
    config = copy.deepcopy(GOOD)
    change(config)
    return config


# ---------------------------------------------------------------------------------------
# Pure validation
# ---------------------------------------------------------------------------------------
def test_contract_example_validates():
    model = nc.validate_config(GOOD)
    assert [c.type for c in model.channels] == ["SENSOR", "ACTUATOR"]


@pytest.mark.parametrize("change, field", [
    (lambda c: c["channels"].append(dict(c["channels"][0])), "channels"),
    (lambda c: c["channels"][0].update(type="THERMOSTAT"), "channels.0.type"),
    (lambda c: c["channels"][1].pop("safe_limits"), "channels.1"),
    (lambda c: c["channels"][1]["safe_limits"].update(max_duration_ms=900_000), "channels.1.safe_limits.max_duration_ms"),
    (lambda c: c["channels"][1]["safe_limits"].update(min_off_ms=-1), "channels.1.safe_limits.min_off_ms"),
    (lambda c: c["channels"][1]["safe_limits"].pop("min_off_ms"), "channels.1.safe_limits.min_off_ms"),
    (lambda c: c["channels"][0].update(name="ph/sensor"), "channels.0.name"),
    (lambda c: c["channels"][0].update(poll_interval_ms=5), "channels.0.poll_interval_ms"),
    (lambda c: c.pop("wifi"), "wifi"),
    (lambda c: c.update(mqtt="mqtt://x"), "mqtt"),
    (lambda c: c.pop("node_id"), "node_id"),
    (lambda c: c.update(version=0), "version"),
    (lambda c: c.update(version="3"), "version"),
    (lambda c: c.update(channels=[{"name": f"c{i}", "type": "SENSOR"} for i in range(65)]), "channels"),
    (lambda c: c.update(notes="x" * 5000), "config"),
])
def test_each_validation_error_names_the_field(change, field):
    with pytest.raises(nc.ConfigError) as info:
        nc.validate_config(variant(change))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert info.value.status_code == 422


def test_missing_safe_limits_message_names_safe_limits():
    with pytest.raises(nc.ConfigError, match="safe_limits"):
        nc.validate_config(variant(lambda c: c["channels"][1].pop("safe_limits")))


def test_not_an_object_is_refused():
    with pytest.raises(nc.ConfigError) as info:
        nc.validate_config(["not", "a", "config"])
    assert info.value.field == "config"


def test_size_limit_is_on_the_serialised_bytes():
    base = len(orjson.dumps(GOOD))
    fits = variant(lambda c: c.update(pad="x" * (4096 - base - len(',"pad":""'))))
    assert len(orjson.dumps(fits)) == 4096
    nc.validate_config(fits)
    with pytest.raises(nc.ConfigError, match="4096"):
        nc.validate_config(variant(lambda c: c.update(pad="x" * (4097 - base - len(',"pad":""')))))


def test_hash_ignores_version_and_key_order():
    reordered = dict(reversed(list(GOOD.items())))
    assert nc.config_hash(GOOD) == nc.config_hash(dict(reordered, version=99))
    assert nc.config_hash(GOOD) != nc.config_hash(variant(lambda c: c["wifi"].update(ssid="Other")))


@pytest.mark.parametrize("name, kind", [("pump_acid", "PUMP"), ("main_valve", "VALVE"), ("solenoid_1", "VALVE"),
                                        ("relay_fan", "RELAY"), ("grow_light", "LIGHT"), ("led_strip", "LIGHT"),
                                        ("fan_A", "ACTUATOR")])
def test_actuator_type_inference(name, kind):
    assert nc.actuator_type_for(name) == kind


def test_build_config_from_rows():
    node = {"uid": "nd-ph-1", "type": None, "config": {"wifi": {"ssid": "Farm"}, "version": 7}}
    channels = [
        {"channel": "ph_sensor", "type": "sensor", "metric": "PH", "config": None},
        {"channel": "pump_acid", "type": "A", "metric": None, "config": {"ml_per_second": 0.5,
                                                                         "safe_limits": {"max_duration_ms": 2000,
                                                                                         "min_off_ms": 1000}}},
        {"channel": "valve_in", "type": "actuator", "metric": None, "config": None},
    ]
    config = nc.build_config(node, channels, gh_uid="gh-a", zone_id=4,
                             defaults=nc.ConfigDefaults(mqtt={"host": "broker", "port": 1883, "keepalive": 30}))
    assert config["node_id"] == "nd-ph-1" and config["type"] == "unknown"
    assert config["gh_uid"] == "gh-a" and config["zone_uid"] == "zn-4"
    assert config["channels"][0] == {"name": "ph_sensor", "type": "SENSOR", "metric": "PH", "poll_interval_ms": 3000}
    assert config["channels"][1]["actuator_type"] == "PUMP"
    assert config["channels"][1]["safe_limits"] == {"max_duration_ms": 2000, "min_off_ms": 1000}  # row wins
    assert config["channels"][1]["ml_per_second"] == 0.5
    assert config["channels"][2]["safe_limits"] == nc.DEFAULT_SAFE_LIMITS
    assert config["channels"][2]["actuator_type"] == "VALVE"
    assert config["wifi"] == {"ssid": "Farm"}                   # node override
    assert config["mqtt"]["host"] == "broker"                   # default
    nc.validate_config(config)


# ---------------------------------------------------------------------------------------
# Storage and delivery (real PostgreSQL + Mosquitto)
# ---------------------------------------------------------------------------------------
async def make_node(db, *, zone=True, greenhouse=True, uid="nd-ph-1", hardware_id="esp32-a1b2c3d4e5f6",
                    config=None):
    gh_id = await testing.seed_greenhouse(db, "gh-1", "Main") if greenhouse else None
    zone_id = await testing.seed_zone(db, gh_id, "A") if zone else None
    node_id = await testing.seed_node(
        db, uid, zone_id, hardware_id=hardware_id, type="ph", lifecycle_state="ASSIGNED_TO_ZONE",
        config=config if config is not None else {"wifi": {"ssid": "Farm", "pass": "p"}},
        channels=[testing.Channel("ph_sensor", metric="PH"), "pump_acid"])
    return node_id, zone_id


def retained(settings, topic):
    """A fresh subscriber on `topic`: all it gets are retained messages."""
    return testing.MqttProbe(settings.mqtt_host, settings.mqtt_port, topic)


async def test_publish_from_db_rows_stores_version_and_publishes_retained(settings, db, mqtt, mqtt_probe):
    topics = Topics(settings.mqtt_topic_root)
    node_id, zone_id = await make_node(db)
    result = await nc.publish_node_config(db, mqtt, topics, "nd-ph-1")
    assert result.published and result.changed and result.version == 1
    assert result.topic == f"{settings.mqtt_topic_root}/gh-1/zn-{zone_id}/nd-ph-1/config"
    temp = {f"{settings.mqtt_topic_root}/gh-temp/zn-temp/esp32-a1b2c3d4e5f6/config",
            f"{settings.mqtt_topic_root}/gh-temp/zn-temp/nd-ph-1/config"}
    assert set(result.temp_topics) == temp
    for topic in (result.topic, *temp):
        (msg,) = await mqtt_probe.wait_for(1, topic)
        assert msg.qos == 1
        sent = orjson.loads(msg.payload)
        assert sent["version"] == 1 and sent["zone_uid"] == f"zn-{zone_id}" and sent["wifi"]["ssid"] == "Farm"
        assert [c["name"] for c in sent["channels"]] == ["ph_sensor", "pump_acid"]
    probe = retained(settings, result.topic)
    try:
        (msg,) = await probe.wait_for(1, result.topic)
        assert msg.retain and orjson.loads(msg.payload)["version"] == 1
    finally:
        probe.close()

    stored = await db.fetchval("SELECT config FROM nodes WHERE id = $1", node_id)
    assert stored["version"] == 1 and stored["config_hash"] == result.config_hash
    assert stored["wifi"] == {"ssid": "Farm", "pass": "p"}  # other keys untouched
    delivery = await db.fetchrow("SELECT * FROM node_config_delivery WHERE node_id = $1", node_id)
    assert delivery["published_version"] == 1 and delivery["published_at"] is not None
    assert delivery["publish_error"] is None and delivery["temp_pending"] is True
    assert delivery["applied_version"] is None


async def test_same_content_keeps_version_new_content_adds_one(settings, db, mqtt):
    topics = Topics(settings.mqtt_topic_root)
    node_id, zone_id = await make_node(db, config={"version": 5})  # e.g. written by Laravel, no hash
    first = await nc.publish_node_config(db, mqtt, topics, "nd-ph-1")
    assert first.version == 6
    again = await nc.publish_node_config(db, mqtt, topics, "nd-ph-1", dict(first.config, version=1))
    assert (again.version, again.changed, again.published) == (6, False, True)
    changed = dict(first.config, channels=first.config["channels"][:1])
    second = await nc.publish_node_config(db, mqtt, topics, "nd-ph-1", changed)
    assert (second.version, second.changed) == (7, True)
    history = await db.fetch("SELECT version, config FROM node_config_versions WHERE node_id = $1 ORDER BY version",
                             node_id)
    assert [r["version"] for r in history] == [6, 7]
    assert len(history[0]["config"]["channels"]) == 2 and len(history[1]["config"]["channels"]) == 1
    # Going back to the first content is a new version too: history is never rewritten.
    third = await nc.publish_node_config(db, mqtt, topics, "nd-ph-1", first.config)
    assert third.version == 8
    assert await db.fetchval("SELECT count(*) FROM node_config_versions WHERE node_id = $1", node_id) == 3


async def test_config_none_republishes_latest_stored_version(settings, db, mqtt):
    topics = Topics(settings.mqtt_topic_root)
    await make_node(db)
    custom = dict(GOOD, node_id="nd-ph-1")
    custom.pop("gh_uid"), custom.pop("zone_uid")
    stored = await nc.publish_node_config(db, mqtt, topics, "nd-ph-1", custom)
    again = await nc.publish_node_config(db, mqtt, topics, "nd-ph-1")
    assert again.version == stored.version and not again.changed
    assert again.config["wifi"] == {"ssid": "HydroFarm", "pass": "secret"}


async def test_given_config_is_completed_and_channel_types_normalised(settings, db, mqtt):
    topics = Topics(settings.mqtt_topic_root)
    _, zone_id = await make_node(db)
    result = await nc.publish_node_config(db, mqtt, topics, "nd-ph-1", {"channels": [
        {"name": "ph_sensor", "type": "sensor", "metric": "PH"}], "extra_block": {"a": 1}})
    assert result.config["node_id"] == "nd-ph-1" and result.config["type"] == "ph"
    assert result.config["gh_uid"] == "gh-1" and result.config["zone_uid"] == f"zn-{zone_id}"
    assert result.config["channels"] == [{"name": "ph_sensor", "type": "SENSOR", "metric": "PH"}]
    assert result.config["extra_block"] == {"a": 1}


async def test_zone_and_greenhouse_from_arguments(settings, db, mqtt, mqtt_probe):
    topics = Topics(settings.mqtt_topic_root)
    await make_node(db, zone=False, greenhouse=False)
    result = await nc.publish_node_config(db, mqtt, topics, "nd-ph-1", zone_id=42, gh_uid="gh-x")
    assert result.topic == f"{settings.mqtt_topic_root}/gh-x/zn-42/nd-ph-1/config"
    (msg,) = await mqtt_probe.wait_for(1, result.topic)
    assert orjson.loads(msg.payload)["gh_uid"] == "gh-x"


async def test_unknown_node_no_zone_no_greenhouse(settings, db, mqtt):
    topics = Topics(settings.mqtt_topic_root)
    with pytest.raises(nc.NodeNotFound) as info:
        await nc.publish_node_config(db, mqtt, topics, "nd-missing")
    assert info.value.status_code == 404
    await make_node(db, zone=False)
    with pytest.raises(nc.NodeNotRoutable, match="zone_id is required") as info:
        await nc.publish_node_config(db, mqtt, topics, "nd-ph-1")
    assert info.value.status_code == 400
    await make_node(db, uid="nd-ph-2", hardware_id="esp32-000000000002", greenhouse=False)
    with pytest.raises(nc.NodeNotRoutable, match="greenhouse_uid is required"):
        await nc.publish_node_config(db, mqtt, topics, "nd-ph-2")
    assert await db.fetchval("SELECT count(*) FROM node_config_versions") == 0


async def test_invalid_config_stores_and_publishes_nothing(settings, db, mqtt, mqtt_probe):
    topics = Topics(settings.mqtt_topic_root)
    node_id, _ = await make_node(db)
    bad = variant(lambda c: c["channels"][1]["safe_limits"].update(max_duration_ms=0))
    bad.pop("gh_uid"), bad.pop("zone_uid"), bad.update(node_id="nd-ph-1")
    with pytest.raises(nc.ConfigError) as info:
        await nc.publish_node_config(db, mqtt, topics, "nd-ph-1", bad)
    assert info.value.field == "channels.1.safe_limits.max_duration_ms"
    with pytest.raises(nc.ConfigError) as info:
        await nc.publish_node_config(db, mqtt, topics, "nd-ph-1", dict(bad, node_id="nd-other"))
    assert info.value.field == "node_id"
    with pytest.raises(nc.ConfigError) as info:
        await nc.publish_node_config(db, mqtt, topics, "nd-ph-1", dict(GOOD, node_id="nd-ph-1", zone_uid="zn-999"))
    assert info.value.field == "zone_uid"
    assert await db.fetchval("SELECT count(*) FROM node_config_versions") == 0
    assert await db.fetchval("SELECT config FROM nodes WHERE id = $1", node_id) == {"wifi": {"ssid": "Farm",
                                                                                            "pass": "p"}}
    assert mqtt_probe.received(f"{settings.mqtt_topic_root}/+/+/+/config") == []


async def test_broker_failure_keeps_version_and_records_error(settings, db):
    topics = Topics(settings.mqtt_topic_root)
    node_id, _ = await make_node(db)
    offline = MqttClient(settings, "-never-started")
    result = await nc.publish_node_config(db, offline, topics, "nd-ph-1")
    assert not result.published and "not connected" in result.error and result.version == 1
    delivery = await db.fetchrow("SELECT * FROM node_config_delivery WHERE node_id = $1", node_id)
    assert delivery["published_version"] is None and "not connected" in delivery["publish_error"]
    assert (await db.fetchval("SELECT config FROM nodes WHERE id = $1", node_id))["version"] == 1


async def test_concurrent_publishes_get_distinct_versions(settings, db, mqtt):
    topics = Topics(settings.mqtt_topic_root)
    node_id, _ = await make_node(db)
    configs = [{"channels": [{"name": f"sensor_{i}", "type": "SENSOR"}]} for i in range(6)]
    results = await asyncio.gather(*(nc.publish_node_config(db, mqtt, topics, "nd-ph-1", c) for c in configs))
    assert sorted(r.version for r in results) == [1, 2, 3, 4, 5, 6]
    assert (await db.fetchval("SELECT config FROM nodes WHERE id = $1", node_id))["version"] == 6
    assert await db.fetchval("SELECT published_version FROM node_config_delivery WHERE node_id = $1", node_id) == 6
