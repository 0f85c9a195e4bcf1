"""Commands as Laravel really sends and records them (shared/fixtures/laravel-client.md): its
pre-written `pending` rows, `[]` params, UI pass-through commands, numeric strings, and repeated
cmd_ids answered with the command's real state."""
from __future__ import annotations


import orjson
import pytest

from common import testing
from common.commands import sweep_timeouts

from testing import TOKEN, running_bridge

LARAVEL_HEADERS = {"Content-Type": "application/json", "User-Agent": "GuzzleHttp/7",
                   "Authorization": f"Bearer {TOKEN}"}


async def laravel_row(db, zone: int, cmd: str, params: str, cmd_id: str, node_id: int | None = None,
                      channel: str | None = None) -> None:
    """The row Laravel inserts before it calls us (zone commands: node_id and channel NULL)."""
    await db.execute("INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, created_at,"
                     " updated_at) VALUES ($1, $2, $3, $4, $5::text::jsonb, 'pending', $6, now(), now())",
                     zone, node_id, channel, cmd, params, cmd_id)


def php_json(body: dict) -> bytes:
    """JSON as PHP's json_encode writes it (escaped slashes and unicode)."""
    return orjson.dumps(body).replace(b"/", b"\\/")


async def test_zone_command_completes_the_row_laravel_prewrote(bridge, world, mqtt_probe, db):
    cmd_id = "51d82a5f-a524-46de-a23f-3b643bd51046"
    await laravel_row(db, world.zone, "dose", '{"ml": 1.5}', cmd_id)
    body = {"type": "dose", "params": {"ml": 1.5}, "greenhouse_uid": "gh-1", "node_uid": "nd-ph-1",
            "channel": "pump_acid", "cmd_id": cmd_id}
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", content=php_json(body),
                                      headers=LARAVEL_HEADERS)
    assert (response.status_code, response.json()) == (200, {"status": "ok", "data": {"command_id": cmd_id}})
    [message] = await mqtt_probe.wait_for(1, f"{bridge.root}/gh-1/zn-{world.zone}/nd-ph-1/pump_acid/command")
    payload = orjson.loads(message.payload)
    assert (payload["cmd"], payload["cmd_id"], payload["dose_ml"]) == ("dose", cmd_id, 1.5)  # what firmware reads
    row = await db.fetchrow("SELECT * FROM commands WHERE cmd_id = $1", cmd_id)
    assert (row["status"], row["node_id"], row["channel"], row["zone_id"]) == ("sent", world.ph, "pump_acid",
                                                                                world.zone)
    assert row["params"] == {"dose_ml": 1.5} and row["sent_at"] is not None
    assert await db.fetchval("SELECT count(*) FROM commands") == 1


async def test_force_command_with_empty_params_passes_through_unchanged(bridge, world, mqtt_probe, db):
    cmd_id = "0b5b9d1e-4a7e-4c1f-9f0e-2f6d1c3a7b11"
    await laravel_row(db, world.zone, "FORCE_IRRIGATION", "[]", cmd_id)
    body = {"type": "FORCE_IRRIGATION", "params": {}, "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1",
            "channel": "pump_in", "cmd_id": cmd_id}
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", content=php_json(body),
                                      headers=LARAVEL_HEADERS)
    assert response.status_code == 200, response.text
    [message] = await mqtt_probe.wait_for(1, f"{bridge.root}/gh-1/zn-{world.zone}/nd-irr-1/pump_in/command")
    payload = orjson.loads(message.payload)
    assert payload["cmd"] == "FORCE_IRRIGATION" and payload["params"] == {}
    assert set(payload) == {"cmd", "cmd_id", "params", "ts"}
    row = await db.fetchrow("SELECT status, node_id, channel, params FROM commands WHERE cmd_id = $1", cmd_id)
    assert (row["status"], row["node_id"], row["channel"], row["params"]) == ("sent", world.irr, "pump_in", {})
    status = (await bridge.http.get(f"/bridge/commands/{cmd_id}")).json()["data"]
    assert status["params"] == {} and status["status"] == "sent"


@pytest.mark.parametrize("cmd, params", [
    ("FORCE_PH_CONTROL", {"target_ph": "6.1"}),
    ("FORCE_CLIMATE", {"target_temp": 99, "note": "form"}),
    ("FORCE_LIGHTING", {}),
])
async def test_force_commands_keep_whatever_params_the_form_sent(bridge, world, mqtt_probe, cmd, params):
    body = {"type": cmd, "params": params, "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1", "channel": "fan_A"}
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=body)
    assert response.status_code == 200, response.text
    [message] = await mqtt_probe.wait_for(1, f"{bridge.root}/gh-1/zn-{world.zone}/nd-irr-1/fan_A/command")
    assert orjson.loads(message.payload)["params"] == params


async def test_laravel_empty_params_array_reads_as_an_empty_object(bridge, world, db):
    await laravel_row(db, world.zone, "stop_pump", "[]", "arr-1", world.irr, "pump_in")
    data = (await bridge.http.get("/bridge/commands/arr-1")).json()["data"]
    assert data["params"] == {} and data["status"] == "pending"
    # the same command sent with {} (as Laravel's HTTP body has it) is the same command, not a conflict
    response = await bridge.http.post("/bridge/nodes/nd-irr-1/commands", json={
        "type": "stop_pump", "params": {}, "greenhouse_uid": "gh-1", "zone_id": world.zone, "channel": "pump_in",
        "cmd_id": "arr-1"})
    assert response.status_code == 200, response.text
    assert await db.fetchval("SELECT params FROM commands WHERE cmd_id = 'arr-1'") == {}


@pytest.mark.parametrize("cmd, params, published", [
    ("run_pump", {"duration_ms": "2000"}, {"duration_ms": 2000}),
    ("dose", {"dose_ml": "0.8"}, {"dose_ml": 0.8}),
    ("dose", {"ml": " 1.5"}, {"dose_ml": 1.5}),
    ("calibrate", {"stage": "1", "known_ph": "6.1"}, {"stage": 1, "known_ph": 6.1}),
])
async def test_numeric_strings_are_numbers(bridge, world, mqtt_probe, db, cmd, params, published):
    channel = "ph_sensor" if cmd == "calibrate" else "pump_acid"
    response = await bridge.http.post("/bridge/nodes/nd-ph-1/commands",
                                      json={"type": cmd, "params": params, "channel": channel, "cmd_id": "num-1"})
    assert response.status_code == 200, response.text
    [message] = await mqtt_probe.wait_for(1, f"{bridge.root}/gh-1/zn-{world.zone}/nd-ph-1/{channel}/command")
    payload = orjson.loads(message.payload)
    assert payload["params"] == published and all(payload[k] == v for k, v in published.items())
    assert await db.fetchval("SELECT params FROM commands WHERE cmd_id = 'num-1'") == published


@pytest.mark.parametrize("params, words", [
    ({"duration_ms": "2s"}, "duration_ms must be an integer"),
    ({"duration_ms": "١٢"}, "duration_ms must be an integer"),
    ({"duration_ms": "1.5"}, "duration_ms must be an integer"),
    ({"duration_ms": "NaN"}, "duration_ms must be an integer"),
    ({"duration_ms": "99999"}, "outside the safe range"),
])
async def test_non_numeric_strings_are_a_clear_422(bridge, world, db, params, words):
    response = await bridge.http.post("/bridge/nodes/nd-ph-1/commands",
                                      json={"type": "run_pump", "params": params, "channel": "pump_acid"})
    assert response.status_code == 422 and words in response.json()["detail"]
    assert await db.fetchval("SELECT count(*) FROM commands") == 0


@pytest.mark.parametrize("path, body", [
    ("fill", {"target_level": "0.8", "max_duration_sec": "1"}),
    ("drain", {"target_level": "0.2", "max_duration_sec": "1"}),
])
async def test_routines_accept_numeric_strings(bridge, valves, path, body):
    response = await bridge.http.post(f"/bridge/zones/{valves.zone}/{path}?async=1", json=body)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("path, body, field", [
    ("fill", {"target_level": "full"}, "target_level"),
    ("fill", {"target_level": "٠.٨"}, "target_level"),
    ("fill", {"target_level": 0.8, "max_duration_sec": "1.5"}, "max_duration_sec"),
    ("calibrate-flow", {"node_id": "one", "channel": "pump_in"}, "node_id"),
])
async def test_routines_refuse_other_strings_naming_the_field(bridge, world, path, body, field):
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/{path}", json=body)
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["body", field]]


async def test_zone_id_as_numeric_string_in_bodies(bridge, world, mqtt_probe):
    response = await bridge.http.post("/bridge/nodes/nd-irr-1/commands", json={
        "type": "stop_pump", "greenhouse_uid": "gh-1", "zone_id": str(world.zone), "channel": "pump_in"})
    assert response.status_code == 200, response.text
    await mqtt_probe.wait_for(1, f"{bridge.root}/gh-1/zn-{world.zone}/nd-irr-1/pump_in/command")
    updated = await bridge.http.post("/bridge/config/zone-updated", json={"zone_id": f"{world.zone}"})
    assert updated.status_code == 202 and updated.json()["data"]["zone_id"] == world.zone


# -- repeated cmd_ids: the command's real state ----------------------------------------------------
BODY = {"type": "run_pump", "params": {"duration_ms": 1000}, "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1",
        "channel": "pump_in"}


@pytest.mark.parametrize("change, words", [
    ({"type": "stop_pump", "params": {}}, "cmd 'run_pump' ≠ 'stop_pump'"),
    ({"params": {"duration_ms": 2000}}, "params {'duration_ms': 1000} ≠ {'duration_ms': 2000}"),
    ({"channel": "fan_A", "type": "set_relay", "params": {"state": True}}, "cmd 'run_pump' ≠ 'set_relay'"),
    ({"node_uid": "nd-ph-1", "channel": "pump_acid"}, "node_id"),
])
async def test_reused_cmd_id_with_a_different_body_is_409(bridge, world, mqtt_probe, db, change, words):
    first = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=dict(BODY, cmd_id="reuse-1"))
    assert first.status_code == 200
    await mqtt_probe.wait_for(1, f"{bridge.root}/#")
    again = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=dict(BODY, cmd_id="reuse-1", **change))
    assert again.status_code == 409, again.text
    assert "cmd_id 'reuse-1' is already used by a different command" in again.json()["detail"]
    assert words in again.json()["detail"]
    assert await db.fetchval("SELECT params FROM commands WHERE cmd_id = 'reuse-1'") == {"duration_ms": 1000}


async def test_laravel_row_for_another_cmd_is_a_conflict(bridge, world, db):
    await laravel_row(db, world.zone, "stop_pump", "[]", "lr-1", world.ph, "pump_acid")
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=dict(BODY, cmd_id="lr-1"))
    assert response.status_code == 409 and "cmd 'stop_pump' ≠ 'run_pump'" in response.json()["detail"]
    assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = 'lr-1'") == "pending"


async def test_retry_after_503_is_published_and_after_timeout_is_409(settings, world, db, mqtt_probe):
    """A first attempt that never reached the broker stays pending and a retry publishes it; once the
    sweep has timed it out, a retry is a clear conflict, never a silent 200."""
    down = settings.replace(mqtt_port=testing.free_port())  # no broker there
    async with running_bridge(down, wait_mqtt=False) as b:
        for cmd_id in ("r503-1", "r503-2"):
            refused = await b.http.post(f"/bridge/zones/{world.zone}/commands",
                                        json=dict(BODY, type="stop_pump", params={}, cmd_id=cmd_id))
            assert refused.status_code == 503, refused.text
    assert {r["cmd_id"]: r["status"] for r in await db.fetch("SELECT cmd_id, status FROM commands")} == {
        "r503-1": "pending", "r503-2": "pending"}
    await db.execute("UPDATE commands SET created_at = now() - interval '1 hour' WHERE cmd_id = 'r503-2'")
    assert await sweep_timeouts(db, 30) == 1
    async with running_bridge(settings) as b:
        retried = await b.http.post(f"/bridge/zones/{world.zone}/commands",
                                    json=dict(BODY, type="stop_pump", params={}, cmd_id="r503-1"))
        assert retried.status_code == 200, retried.text
        [message] = await mqtt_probe.wait_for(1, f"{b.root}/gh-1/zn-{world.zone}/nd-irr-1/pump_in/command")
        assert orjson.loads(message.payload)["cmd_id"] == "r503-1"
        late = await b.http.post(f"/bridge/zones/{world.zone}/commands",
                                 json=dict(BODY, type="stop_pump", params={}, cmd_id="r503-2"))
        assert late.status_code == 409
        assert late.json() == {"detail": "command 'r503-2' is already timeout and was never sent; "
                                         "send it again with a new cmd_id"}
        await db.execute("UPDATE commands SET status = 'failed' WHERE cmd_id = 'r503-1'")
        failed = await b.http.post(f"/bridge/zones/{world.zone}/commands",
                                   json=dict(BODY, type="stop_pump", params={}, cmd_id="r503-1"))
        assert failed.status_code == 409 and "is already failed" in failed.json()["detail"]
    assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = 'r503-2'") == "timeout"


async def test_stale_claim_of_a_dead_publisher_is_published_again(bridge, world, db, mqtt_probe):
    await db.execute("INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, sent_at,"
                     " created_at) VALUES ($1, $2, 'pump_in', 'stop_pump', '{}', 'pending', 'claimed-1',"
                     " now() - interval '5 minutes', now() - interval '5 minutes')", world.zone, world.irr)
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/commands",
                                      json=dict(BODY, type="stop_pump", params={}, cmd_id="claimed-1"))
    assert response.status_code == 200, response.text
    await mqtt_probe.wait_for(1, f"{bridge.root}/#")
    assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = 'claimed-1'") == "sent"


async def test_fresh_claim_of_another_publisher_is_503_not_a_false_200(bridge, world, db):
    await db.execute("INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, sent_at,"
                     " created_at) VALUES ($1, $2, 'pump_in', 'stop_pump', '{}', 'pending', 'claimed-2', now(),"
                     " now())", world.zone, world.irr)
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/commands",
                                      json=dict(BODY, type="stop_pump", params={}, cmd_id="claimed-2"))
    assert response.status_code == 503 and "being published by another request" in response.json()["detail"]
    assert response.headers["Retry-After"] == "5"


async def test_calibrate_flow_accepts_numeric_strings(bridge, world):
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/calibrate-flow?async=1", json={
        "node_id": str(world.irr), "channel": "pump_in", "pump_duration_sec": "5"})
    assert response.status_code == 202, response.text
