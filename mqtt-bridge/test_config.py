"""POST /bridge/nodes/{uid}/config through common.nodeconfig: topics, retain, versions, errors."""
from __future__ import annotations

import copy

import orjson
import pytest

from common import testing


def node_config(zone: int, **changes) -> dict:
    config = {
        "node_id": "nd-ph-1", "version": 1, "type": "ph", "gh_uid": "gh-1", "zone_uid": f"zn-{zone}",
        "channels": [
            {"name": "ph_sensor", "type": "SENSOR", "metric": "PH", "poll_interval_ms": 3000},
            {"name": "pump_acid", "type": "ACTUATOR", "metric": None, "actuator_type": "PUMP",
             "safe_limits": {"max_duration_ms": 5000, "min_off_ms": 3000}, "ml_per_second": 0.5}],
        "wifi": {"ssid": "HydroFarm", "pass": "secret"},
        "mqtt": {"host": "mqtt", "port": 1883, "keepalive": 30},
    }
    config.update(changes)
    return config


async def test_config_is_published_retained_on_the_node_and_temp_topics_and_versioned(bridge, world, mqtt_probe,
                                                                                      db):
    config = node_config(world.zone)
    response = await bridge.http.post("/bridge/nodes/nd-ph-1/config", json={"node_uid": "nd-ph-1", "config": config})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    topic = f"{bridge.root}/gh-1/zn-{world.zone}/nd-ph-1/config"
    assert (data["published"], data["topic"], data["version"], data["changed"]) == (True, topic, 1, True)
    [live] = await mqtt_probe.wait_for(1, topic)
    assert live.qos == 1 and orjson.loads(live.payload) == dict(config, version=1)
    await mqtt_probe.wait_for(1, f"{bridge.root}/gh-temp/zn-temp/nd-ph-1/config")
    late = testing.MqttProbe(bridge.settings.mqtt_host, bridge.settings.mqtt_port, topic)
    try:
        [kept] = await late.wait_for(1, topic)
        assert kept.retain  # a node subscribing later still gets it
    finally:
        late.close()

    same = await bridge.http.post("/bridge/nodes/nd-ph-1/config", json={"node_uid": "nd-ph-1", "config": config})
    assert (same.json()["data"]["version"], same.json()["data"]["changed"]) == (1, False)
    changed = copy.deepcopy(config)
    changed["channels"][1]["ml_per_second"] = 0.7
    newer = await bridge.http.post("/bridge/nodes/nd-ph-1/config", json={"node_uid": "nd-ph-1", "config": changed})
    assert newer.json()["data"]["version"] == 2
    stored = await db.fetchval("SELECT config FROM nodes WHERE uid = 'nd-ph-1'")
    assert stored["version"] == 2 and len(stored["config_hash"]) == 64


@pytest.mark.parametrize("change, words", [
    (lambda c: c["channels"][1].pop("safe_limits"), "channels.1"),
    (lambda c: c.update(notes="x" * 5000), "exceeds the node's limit of 4096"),
    (lambda c: c.update(node_id="nd-other"), "node_id: is 'nd-other'"),
    (lambda c: c.update(wifi="open"), "wifi"),
])
async def test_invalid_configs_answer_422_and_publish_nothing(bridge, world, mqtt_probe, change, words):
    config = node_config(world.zone)
    change(config)
    response = await bridge.http.post("/bridge/nodes/nd-ph-1/config", json={"node_uid": "nd-ph-1", "config": config})
    assert response.status_code == 422 and words in response.json()["detail"]
    assert mqtt_probe.received() == []


@pytest.mark.parametrize("uid, extra, status, detail", [
    ("nd-loose", {}, 400, "zone_id is required (node must be assigned to a zone)"),
    ("nd-ph-1", {"zone_id": "bare"}, 400, "greenhouse_uid is required (zone must have a greenhouse)"),
    ("nd-ghost", {}, 404, "node 'nd-ghost' not found"),
])
async def test_unroutable_or_unknown_nodes(bridge, world, uid, extra, status, detail):
    if extra.get("zone_id") == "bare":
        extra = {"zone_id": world.bare_zone}
    response = await bridge.http.post(f"/bridge/nodes/{uid}/config",
                                      json={"node_uid": uid, "config": node_config(world.zone), **extra})
    assert (response.status_code, response.json()) == (status, {"detail": detail})


async def test_body_node_uid_must_match_the_path(bridge, world):
    response = await bridge.http.post("/bridge/nodes/nd-ph-1/config",
                                      json={"node_uid": "nd-irr-1", "config": node_config(world.zone)})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "node_uid"]
