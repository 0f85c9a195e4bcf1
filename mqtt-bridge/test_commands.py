"""Command routes against real Mosquitto and PostgreSQL: topics, payloads, rows, every error."""
from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from common.commands import record_response
from common.schemas import CommandResponse


CMD_ID = "5f0c3c1e-7d1a-4b7e-9a51-0b6f1b2a9c10"


async def test_zone_command_publishes_the_contract_payload_and_row(bridge, world, mqtt_probe, db):
    body = {"type": "run_pump", "params": {"duration_ms": 2500}, "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1",
            "channel": "pump_in", "cmd_id": CMD_ID}
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=body)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "data": {"command_id": CMD_ID}}
    topic = f"{bridge.root}/gh-1/zn-{world.zone}/nd-irr-1/pump_in/command"
    [message] = await mqtt_probe.wait_for(1, topic)
    payload = orjson.loads(message.payload)
    assert (message.qos, message.retain) == (1, False)
    assert payload["cmd"] == "run_pump" and payload["cmd_id"] == CMD_ID
    assert payload["duration_ms"] == 2500 and payload["params"] == {"duration_ms": 2500}
    assert isinstance(payload["ts"], int) and set(payload) == {"cmd", "cmd_id", "duration_ms", "params", "ts"}
    row = await db.fetchrow("SELECT * FROM commands WHERE cmd_id = $1", CMD_ID)
    assert (row["status"], row["source"], row["zone_id"], row["node_id"], row["channel"]) == (
        "sent", "bridge", world.zone, world.irr, "pump_in")
    assert row["sent_at"] is not None and row["params"] == {"duration_ms": 2500}


async def test_zone_segment_form_and_facts_looked_up_from_the_zone(bridge, world, mqtt_probe, db):
    response = await bridge.http.post(f"/bridge/zones/zn-{world.zone}/commands",
                                      json={"type": "set_relay", "params": {"state": True}, "channel": "fan_A"})
    assert response.status_code == 200, response.text
    cmd_id = response.json()["data"]["command_id"]
    assert uuid.UUID(cmd_id)  # generated when Laravel sends none
    [message] = await mqtt_probe.wait_for(1, f"{bridge.root}/gh-1/zn-{world.zone}/nd-irr-1/fan_A/command")
    assert orjson.loads(message.payload)["state"] is True
    assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = $1", cmd_id) == "sent"


async def test_node_command_takes_zone_and_greenhouse_from_the_node(bridge, world, mqtt_probe):
    response = await bridge.http.post("/bridge/nodes/nd-ph-1/commands",
                                      json={"type": "dose", "params": {"dose_ml": 1.5}, "channel": "pump_acid"})
    assert response.status_code == 200, response.text
    [message] = await mqtt_probe.wait_for(1, f"{bridge.root}/gh-1/zn-{world.zone}/nd-ph-1/pump_acid/command")
    payload = orjson.loads(message.payload)
    assert payload["cmd"] == "dose" and payload["dose_ml"] == 1.5 and payload["params"] == {"dose_ml": 1.5}
    assert payload["cmd_id"] == response.json()["data"]["command_id"]


async def test_node_command_with_every_fact_in_the_body(bridge, world, mqtt_probe):
    body = {"type": "FORCE_IRRIGATION", "params": {"duration_sec": 60}, "greenhouse_uid": "gh-9", "zone_id": 42,
            "channel": "pump_in"}
    response = await bridge.http.post("/bridge/nodes/nd-irr-1/commands", json=body)
    assert response.status_code == 200, response.text
    [message] = await mqtt_probe.wait_for(1, f"{bridge.root}/gh-9/zn-42/nd-irr-1/pump_in/command")
    assert orjson.loads(message.payload)["cmd"] == "FORCE_IRRIGATION"  # passed through verbatim


async def test_repeated_cmd_id_publishes_once_and_answers_the_same(bridge, world, mqtt_probe, db):
    body = {"type": "stop_pump", "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1", "channel": "pump_in",
            "cmd_id": "repeat-1"}
    answers = await asyncio.gather(*[bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=body)
                                     for _ in range(3)])
    again = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=body)
    assert {(r.status_code, r.text) for r in [*answers, again]} == {
        (200, '{"status":"ok","data":{"command_id":"repeat-1"}}')}
    await mqtt_probe.wait_for(1, f"{bridge.root}/#")
    await asyncio.sleep(0.5)  # a second publish would have arrived by now
    assert len(mqtt_probe.received(f"{bridge.root}/#")) == 1
    assert await db.fetchval("SELECT count(*) FROM commands WHERE cmd_id = 'repeat-1'") == 1


@pytest.mark.parametrize("path, body, detail", [
    ("/bridge/zones/{zone}/commands", {"type": "stop_pump", "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1"},
     "greenhouse_uid, node_uid and channel are required"),
    ("/bridge/zones/{bare}/commands", {"type": "stop_pump", "node_uid": "nd-irr-1", "channel": "pump_in"},
     "greenhouse_uid, node_uid and channel are required"),
    ("/bridge/nodes/nd-irr-1/commands", {"type": "stop_pump", "greenhouse_uid": "gh-1", "zone_id": 1},
     "greenhouse_uid, zone_id and channel are required"),
    ("/bridge/nodes/nd-loose/commands", {"type": "stop_pump", "channel": "pump_in"},
     "greenhouse_uid, zone_id and channel are required"),
])
async def test_missing_facts_answer_400_with_the_contract_message(bridge, world, mqtt_probe, db, path, body, detail):
    response = await bridge.http.post(path.format(zone=world.zone, bare=world.bare_zone), json=body)
    assert (response.status_code, response.json()) == (400, {"detail": detail})
    assert await db.fetchval("SELECT count(*) FROM commands") == 0 and mqtt_probe.received() == []


@pytest.mark.parametrize("path, body, detail", [
    ("/bridge/zones/999999/commands", {"type": "stop_pump", "node_uid": "nd-irr-1", "channel": "pump_in"},
     "zone 999999 not found"),
    ("/bridge/nodes/nd-ghost/commands", {"type": "stop_pump", "channel": "pump_in"}, "node 'nd-ghost' not found"),
    ("/bridge/nodes/nd-irr-1/commands", {"type": "stop_pump", "zone_id": 999999, "channel": "pump_in"},
     "zone 999999 not found"),
    ("/bridge/zones/{zone}/commands", {"type": "stop_pump", "channel": "pump_out"},
     "no node in zone {zone} has channel 'pump_out'"),
])
async def test_unknown_facts_answer_404_naming_which(bridge, world, db, path, body, detail):
    response = await bridge.http.post(path.format(zone=world.zone), json=body)
    assert (response.status_code, response.json()) == (404, {"detail": detail.format(zone=world.zone)})
    assert await db.fetchval("SELECT count(*) FROM commands") == 0


@pytest.mark.parametrize("body, words", [
    ({"type": "adjust_ph", "params": {"amount": 1}}, "unknown command 'adjust_ph'"),
    ({"type": "run_pump", "params": {"duration_ms": 6000}}, "exceeds the channel's safe_limits.max_duration_ms=5000"),
    ({"type": "run_pump", "params": {"duration_ms": 61_000}}, "duration_ms=61000 is outside the safe range"),
    ({"type": "run_pump", "params": {}}, "parameter duration_ms is required"),
    ({"type": "dose", "params": {"dose_ml": "lots"}}, "dose_ml must be a number"),
    ({"type": "stop_pump", "channel": "pump+in"}, "channel 'pump+in' contains"),
    ({"type": "stop_pump", "channel": "pump/in"}, "channel 'pump/in' contains"),
    ({"type": "stop_pump", "channel": "pump\u0007"}, "contains '/', '+', '#' or a control character"),
    ({"type": "stop_pump", "node_uid": "nd#1"}, "node uid 'nd#1' contains"),
    ({"type": "stop_pump", "greenhouse_uid": "gh/2"}, "greenhouse uid 'gh/2' contains"),
    ({"type": "stop_pump", "cmd_id": "a+b"}, "cmd_id 'a+b' contains"),
])
async def test_commands_outside_the_catalogue_or_unsafe_answer_422(bridge, world, mqtt_probe, db, body, words):
    full = {"greenhouse_uid": "gh-1", "node_uid": "nd-irr-1", "channel": "pump_in", **body}
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=full)
    assert response.status_code == 422
    assert words in response.json()["detail"]
    assert await db.fetchval("SELECT count(*) FROM commands") == 0 and mqtt_probe.received() == []


async def test_unsafe_node_uid_in_the_path_answers_422(bridge, world, db):
    response = await bridge.http.post("/bridge/nodes/nd%2B1/commands",
                                      json={"type": "stop_pump", "greenhouse_uid": "gh-1", "zone_id": world.zone,
                                            "channel": "pump_in"})
    assert response.status_code == 422 and "node uid 'nd+1' contains" in response.json()["detail"]


@pytest.mark.parametrize("body, field", [
    ({"type": "x" * 65, "channel": "pump_in"}, ["body", "type"]),
    ({"type": "stop_pump", "channel": "c" * 65}, ["body", "channel"]),
    ({"type": "stop_pump", "channel": "pump_in", "node_uid": "n" * 129}, ["body", "node_uid"]),
    ({"type": "stop_pump", "channel": "pump_in", "cmd_id": "i" * 65}, ["body", "cmd_id"]),
    ({"type": "stop_pump", "channel": "pump_in", "params": [1]}, ["body", "params"]),
    ({"channel": "pump_in"}, ["body", "type"]),
])
async def test_invalid_bodies_answer_422_with_the_field(bridge, world, body, field):
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/commands",
                                      json={"greenhouse_uid": "gh-1", "node_uid": "nd-irr-1", **body})
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [field]


async def test_bad_zone_segment_answers_422(bridge):
    response = await bridge.http.post("/bridge/zones/zn-temp/commands", json={"type": "stop_pump"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["path", "zone_id"]


async def test_command_status_follows_the_lifecycle(bridge, world, db):
    missing = await bridge.http.get("/bridge/commands/nope")
    assert (missing.status_code, missing.json()) == (404, {"detail": "command 'nope' not found"})
    await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json={
        "type": "run_pump", "params": {"duration_ms": 1000}, "channel": "pump_in", "cmd_id": "life-1"})
    sent = (await bridge.http.get("/bridge/commands/life-1")).json()
    assert sent["status"] == "ok"
    assert sent["data"]["status"] == "sent" and sent["data"]["sent_at"].endswith("Z")
    assert (sent["data"]["node_uid"], sent["data"]["channel"], sent["data"]["zone_id"]) == (
        "nd-irr-1", "pump_in", world.zone)
    await record_response(db, CommandResponse(cmd_id="life-1", status="ERROR", error_code="current_not_detected",
                                              error="no current"), {})
    failed = (await bridge.http.get("/bridge/commands/life-1")).json()["data"]
    assert (failed["status"], failed["error_code"], failed["error_message"]) == (
        "failed", "current_not_detected", "no current")
    assert failed["failed_at"] is not None and failed["ack_at"] is None
