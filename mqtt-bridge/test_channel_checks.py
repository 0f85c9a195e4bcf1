"""Every actuation is checked against the channel it targets (kind, known to the database,
safe_limits), for the bridge and for every other source through common.commands."""
from __future__ import annotations

import asyncio

import pytest

from common.command_catalogue import CommandError, channel_kind
from common.commands import issue_command
from common.testing import insert_row
from common.topics import Topics


@pytest.mark.parametrize("body, words", [
    ({"type": "set_state", "params": {"state": 1}, "channel": "pump_acid", "node_uid": "nd-ph-1"},
     "set_state 1 runs the pump for up to 300000 ms, beyond the channel's safe_limits.max_duration_ms=5000"),
    ({"type": "set_relay", "params": {"state": True}, "channel": "pump_in"},
     "set_relay is for relay channels; channel 'pump_in' of node 'nd-irr-1' is a pump channel"),
    ({"type": "set_pwm", "params": {"value": 50}, "channel": "pump_in"}, "set_pwm is for relay channels"),
    ({"type": "run_pump", "params": {"duration_ms": 1000}, "channel": "ph_sensor", "node_uid": "nd-ph-1"},
     "run_pump is for pump channels; channel 'ph_sensor' of node 'nd-ph-1' is a sensor channel"),
    ({"type": "run_pump", "params": {"duration_ms": 1000}, "channel": "fan_A"}, "is a relay channel"),
    ({"type": "calibrate", "params": {"stage": 1, "known_ph": 7}, "channel": "pump_acid", "node_uid": "nd-ph-1"},
     "calibrate is for sensor channels"),
    ({"type": "stop_pump", "channel": "pump_ghost"}, "channel 'pump_ghost' of node 'nd-irr-1' is not in the database"),
    ({"type": "set_relay", "params": {"state": False}, "channel": "fan_A", "node_uid": "nd-ghost"},
     "node 'nd-ghost' is not in the database"),
    ({"type": "set_relay", "params": {"state": True, "duration_ms": 6000}, "channel": "valve_x"},
     "duration_ms=6000 exceeds the channel's safe_limits.max_duration_ms=4000"),
])
async def test_actuation_on_the_wrong_or_an_unknown_channel_is_refused(bridge, world, mqtt_probe, db, body, words):
    await insert_row(db, "node_channels", node_id=world.irr, channel="valve_x", type="actuator",
                     config={"safe_limits": {"max_duration_ms": 4000, "min_off_ms": 0}})
    full = {"greenhouse_uid": "gh-1", "node_uid": "nd-irr-1", **body}
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=full)
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]
    assert await db.fetchval("SELECT count(*) FROM commands") == 0
    await asyncio.sleep(0.2)
    assert mqtt_probe.received() == []


@pytest.mark.parametrize("body", [
    {"type": "set_state", "params": {"state": 0}, "channel": "pump_acid", "node_uid": "nd-ph-1"},
    {"type": "set_relay", "params": {"state": True}, "channel": "fan_A"},
    {"type": "set_pwm", "params": {"value": 40}, "channel": "fan_A"},
    {"type": "calibrate", "params": {"stage": 1, "known_ph": 7}, "channel": "ph_sensor", "node_uid": "nd-ph-1"},
])
async def test_commands_on_their_own_kind_of_channel_pass(bridge, world, mqtt_probe, body):
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/commands",
                                      json={"greenhouse_uid": "gh-1", "node_uid": "nd-irr-1", **body})
    assert response.status_code == 200, response.text
    await mqtt_probe.wait_for(1, f"{bridge.root}/#")


async def test_min_off_holds_a_pump_after_its_run(bridge, world, mqtt_probe, db):
    run = {"type": "run_pump", "params": {"duration_ms": 1000}, "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1",
           "channel": "pump_in"}
    first = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=run)
    assert first.status_code == 200
    second = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=run)
    assert second.status_code == 422
    assert "is running or resting after its last run (safe_limits.min_off_ms=3000)" in second.json()["detail"]
    # the same cmd_id again is a repeat, not a second run; a stop is always allowed
    repeat = await bridge.http.post(f"/bridge/zones/{world.zone}/commands",
                                    json=dict(run, cmd_id=first.json()["data"]["command_id"]))
    stop = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=dict(run, type="stop_pump", params={}))
    assert (repeat.status_code, stop.status_code) == (200, 200)
    # once the run and its rest are over, the pump runs again
    await db.execute("UPDATE commands SET sent_at = sent_at - interval '10 seconds'")
    third = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=run)
    assert third.status_code == 200, third.text
    await mqtt_probe.wait_for(3, f"{bridge.root}/#")


async def test_two_runs_of_one_pump_at_the_same_moment_only_one_goes(bridge, world, mqtt_probe, db):
    run = {"type": "run_pump", "params": {"duration_ms": 1000}, "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1",
           "channel": "pump_in"}
    answers = await asyncio.gather(*[bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=run)
                                     for _ in range(4)])
    assert sorted(a.status_code for a in answers) == [200, 422, 422, 422]
    assert await db.fetchval("SELECT count(*) FROM commands") == 1


async def test_other_sources_get_the_same_channel_checks(settings, bridge, world, db, mqtt_probe):
    """automation-engine and the scheduler issue through the same function: same refusals."""
    topics = Topics(settings.mqtt_topic_root)
    for source in ("automation", "scheduler"):
        with pytest.raises(CommandError, match="set_relay is for relay channels"):
            await issue_command(db, bridge.service.mqtt, topics, gh_uid="gh-1", zone_id=world.zone,
                                node_uid="nd-irr-1", channel="pump_in", cmd="set_relay", params={"state": True},
                                source=source)
        with pytest.raises(CommandError, match="is not in the database"):
            await issue_command(db, bridge.service.mqtt, topics, gh_uid="gh-1", zone_id=world.zone,
                                node_uid="nd-irr-1", channel="valve_nowhere", cmd="set_relay",
                                params={"state": True}, source=source)
        with pytest.raises(CommandError, match="exceeds the channel's safe_limits.max_duration_ms=5000"):
            await issue_command(db, bridge.service.mqtt, topics, gh_uid="gh-1", zone_id=world.zone,
                                node_uid="nd-irr-1", channel="pump_in", cmd="run_pump",
                                params={"duration_ms": 5001}, source=source)
    assert await db.fetchval("SELECT count(*) FROM commands") == 0


@pytest.mark.parametrize("name, db_type, config, kind", [
    ("pump_acid", "actuator", None, "pump"), ("pump_in", "ACTUATOR", {}, "pump"),
    ("recirculation_pump", "a", None, "pump"), ("valve_irrigation", "actuator", None, "relay"),
    ("fan_A", None, None, "relay"), ("white_light", None, None, "relay"), ("heater", "Actuator", None, "relay"),
    ("main", "actuator", {"actuator_type": "PUMP"}, "pump"), ("pump_valve", "actuator", {"actuator_type": "VALVE"},
                                                              "relay"),
    ("ph_sensor", "sensor", None, "sensor"), ("ph_sensor", "S", None, "sensor"), ("pump_bus_current", None, None,
                                                                                 "sensor"),
    ("flow_sensor", None, None, "sensor"), ("mystery", None, None, "unknown"),
])
def test_channel_kind_from_type_and_naming(name, db_type, config, kind):
    assert channel_kind(name, db_type, config) == kind
