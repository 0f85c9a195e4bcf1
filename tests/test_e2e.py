"""The whole greenhouse, end to end: the five services as real processes against the real
PostgreSQL, Redis and Mosquitto, driven by the node simulator (tools/node_sim).

One stack serves the module (short cycle settings); the scenarios run in file order and each
uses its own zone or nodes, so they do not disturb each other. The last one kills the
history-logger, so it runs last.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from common import testing
from common.db import Database
from tests.stack import (SERVICES, ServiceStack, create_database, tear_down, free_ports,
                         node_spec, run_with_db, seed_nodes)
from tools.node_sim import NodeSpec, ReservoirParams
from tools.node_sim.layout import actuator, hardware_id_for, sensor

TOKEN = "e2e-token"
PH_TARGET = {"min": 5.6, "max": 6.0}  # target 5.8, band 0.2
SERVICE_ENV = {
    "AUTOMATION_INTERVAL_SEC": "2",
    "SCHEDULER_INTERVAL_SEC": "2",
    "COMMAND_TIMEOUT_SEC": "4",
    "COMMAND_TIMEOUT_SWEEP_SEC": "1",
    "TELEMETRY_FLUSH_MS": "200",
    "PH_MAX_RATE_PER_MIN": "14",  # the simulated reservoir mixes a dose within seconds
    "PH_COOLDOWN_MIN": "0.2",     # and settles within seconds, so the next correction may follow soon
    "NODE_OFFLINE_TIMEOUT_SEC": "10",  # simulated nodes are heard from every few seconds
    "NODE_OFFLINE_SWEEP_SEC": "1",
}
# Zone C changes its water as soon as its solution is old (the test ages it), in seconds.
WATER_CHANGE = {"water_cycle": {"water_change": {
    "enabled": True, "max_solution_age_days": 1, "trigger_by_ec_drift": False,
    "drain_target_level": 0.3, "fill_target_level": 0.7, "stabilize_min": 0}}}


class Stack(ServiceStack):
    """Facts the scenarios share: settings, seeded ids, the simulator, the service processes."""

    def __init__(self, settings, zones: dict[str, int], irrigation_time: str):
        super().__init__(settings, SERVICE_ENV)
        self.zones = zones
        self.irrigation_time = irrigation_time


_spec = node_spec


async def _seed(db: Database, irrigation_time: str) -> dict[str, int]:
    """Like Laravel would: a greenhouse, a dosing zone (A) and a scheduled zone (B), their nodes."""
    gh = await testing.seed_greenhouse(db, "gh-e2e", "E2E", timezone="UTC")
    zones = {}
    for name, caps, settings in (("A", {"ph_control": True}, None), ("B", None, None), ("C", None, WATER_CHANGE)):
        zones[name] = await testing.seed_zone(db, gh, name, status="RUNNING", capabilities=caps, settings=settings,
                                              solution_started_at=testing.Sql("now()"))
    # Zones B and C run the recipe's second phase (its schedule); phases are open-ended (no duration).
    await testing.seed_recipe(db, [(None, {"ph": PH_TARGET, "ec": {"min": 0.6, "max": 1.6}}),
                                   (None, {"irrigation_schedule": irrigation_time, "irrigation_duration_sec": 2})],
                              {zones["A"]: 0, zones["B"]: 1, zones["C"]: 1}, started_hours_ago=0)
    await seed_nodes(db, _registered_specs(zones) + [_spec("nd-e2e-silent", "irrig", "gh-e2e", zones["B"]),
                                                     _spec("nd-e2e-burst", "climate", "gh-e2e", zones["B"]),
                                                     _spec("nd-e2e-quiet", "climate", "gh-e2e", zones["B"])])
    return zones


def _registered_specs(zones: dict[str, int]) -> list[NodeSpec]:
    valves = NodeSpec(uid="nd-e2e-valves", type="irrig", hardware_id=hardware_id_for("nd-e2e-valves"), gh="gh-e2e",
                      zone_id=zones["C"], channels=[actuator("valve_irrigation"), actuator("valve_fill"),
                                                    actuator("valve_drain"), sensor("water_level", "WATER_LEVEL", 500)])
    return [_spec("nd-e2e-ph", "ph", "gh-e2e", zones["A"]), _spec("nd-e2e-irr", "irrig", "gh-e2e", zones["B"]),
            _spec("nd-e2e-clim", "climate", "gh-e2e", zones["B"]), valves]


@pytest.fixture(scope="module")
def stack(pg_template):
    name = create_database(pg_template)
    broker = testing.PrivateMosquitto.like_deploy().start()
    settings = testing.isolated_settings(PG_DB=name, PY_API_TOKEN=TOKEN, COMMAND_TIMEOUT_SEC="4",
                                         MQTT_PORT=str(broker.port),
                                         LARAVEL_API_URL=f"http://127.0.0.1:{testing.free_port()}", **free_ports())
    # An irrigation time just ahead, at least 20 s away so the scheduler sees it coming.
    irrigation_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=80)
    irrigation_time = irrigation_at.strftime("%H:%M")
    s = Stack(settings, asyncio.run(run_with_db(settings, lambda db: _seed(db, irrigation_time))), irrigation_time)
    try:
        for service in SERVICES:
            s.start(service)
        asyncio.run(s.wait_ready())
        s.start_simulator(_registered_specs(s.zones) + [_spec("nd-e2e-new", "ph", None, None)],
                          poll_ms=500, heartbeat_sec=5, hello_interval_sec=2, initial_ph=6.3, initial_ec=1.1, seed=7,
                          reservoir=ReservoirParams(valve_flow_l_min=300))  # a valve moves 5 % of the tank a second
        yield s
    finally:
        codes = tear_down(s, name, broker)
    assert codes == {n: 0 for n in codes}, f"services did not stop cleanly: {codes}\n{s.logs()}"


@pytest.fixture
async def db(stack):
    database = Database(stack.settings)
    await database.connect()
    yield database
    await database.close()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


# ---------------------------------------------------------------------------------------------
async def test_1_new_node_registers_once_and_applies_its_config(stack, db):
    hardware_id = hardware_id_for("nd-e2e-new")
    uid = await testing.eventually(
        lambda: db.fetchval("SELECT uid FROM nodes WHERE hardware_id = $1", hardware_id), 30, message="registration")
    await asyncio.sleep(2.5)  # the node keeps saying hello until configured: still one row
    assert await db.fetchval("SELECT count(*) FROM nodes WHERE hardware_id = $1", hardware_id) == 1
    async with httpx.AsyncClient(timeout=10, headers=_auth()) as client:
        answer = await client.put(stack.url("registry_port", f"/nodes/{uid}/zone"), json={"zone_id": stack.zones["B"]})
        assert answer.status_code == 200, answer.text

        async def applied():
            state = (await client.get(stack.url("registry_port", f"/nodes/{uid}/config"))).json()["data"]
            return state if state["up_to_date"] else None
        state = await testing.eventually(applied, 30, 0.3, "config applied")
    node = stack.sim.node(hardware_id)
    assert node.applied_config is not None and node.applied_config["version"] == state["version"]
    assert node.uid == uid and node.spec.zone_id == stack.zones["B"]


async def test_2_telemetry_from_several_nodes_lands(stack, db):
    async def landed():
        rows = await db.fetch(
            "SELECT n.uid, s.metric_type FROM telemetry_samples s JOIN nodes n ON n.id = s.node_id"
            " GROUP BY n.uid, s.metric_type")
        return {(r["uid"], r["metric_type"]) for r in rows}
    wanted = {("nd-e2e-ph", "PH"), ("nd-e2e-irr", "WATER_LEVEL"), ("nd-e2e-clim", "TEMP_AIR")}
    await testing.eventually(lambda: _contains(landed, wanted), 30, 0.3, "samples of three nodes")
    last = {(r["zone_id"], r["metric_type"]) for r in await db.fetch("SELECT zone_id, metric_type FROM telemetry_last")}
    assert {(stack.zones["A"], "PH"), (stack.zones["B"], "WATER_LEVEL"), (stack.zones["B"], "HUMIDITY")} <= last


async def _contains(fetch, wanted):
    return wanted <= await fetch()


async def test_3_closed_loop_brings_ph_back_into_band(stack, db):
    reservoir = stack.sim.reservoir(stack.zones["A"])
    assert reservoir.snapshot()["ph"] > PH_TARGET["max"]  # starts above the band and drifts up

    async def in_band():
        ph = reservoir.snapshot()["ph"]
        return PH_TARGET["min"] <= ph <= PH_TARGET["max"] and ph
    try:
        await testing.eventually(in_band, 90, 0.5, "simulated pH inside the band")
    except AssertionError:
        facts = [dict(r) for r in await db.fetch(
            "SELECT type, details FROM zone_events WHERE zone_id = $1 ORDER BY id DESC LIMIT 10", stack.zones["A"])]
        facts += [dict(r) for r in await db.fetch("SELECT * FROM telemetry_last WHERE zone_id = $1", stack.zones["A"])]
        facts += [dict(r) for r in await db.fetch("SELECT uid, status, last_seen_at FROM nodes")]
        raise AssertionError(f"{facts}\n{stack.logs()}") from None
    doses = await db.fetch("SELECT channel, cmd, params, status FROM commands WHERE zone_id = $1 AND source = 'automation'"
                           " AND cmd = 'dose'", stack.zones["A"])
    assert doses and all(d["channel"] == "pump_acid" for d in doses)
    assert all(0.1 <= d["params"]["dose_ml"] <= 5.0 for d in doses)  # within the catalogue's cap
    assert len(doses) <= 4  # MAX_DOSES_PER_PUMP_HOUR
    await testing.eventually(lambda: db.fetchval(
        "SELECT bool_and(status = 'ack') FROM commands WHERE zone_id = $1 AND cmd = 'dose'", stack.zones["A"]),
        20, message="doses acknowledged")
    events = [r["type"] for r in await db.fetch("SELECT type FROM zone_events WHERE zone_id = $1", stack.zones["A"])]
    assert "PH_CORRECTED" in events


async def test_4_scheduled_irrigation_fires_once_and_is_acked(stack, db):
    async def fired():
        return await db.fetch("SELECT cmd_id, status FROM commands WHERE zone_id = $1 AND source = 'scheduler'"
                              " AND node_id = (SELECT id FROM nodes WHERE uid = 'nd-e2e-irr')", stack.zones["B"])
    rows = await testing.eventually(fired, 150, 0.5, f"irrigation at {stack.irrigation_time}")
    await testing.eventually(lambda: db.fetchval(
        "SELECT status = 'ack' FROM commands WHERE cmd_id = $1", rows[0]["cmd_id"]), 20, message="irrigation ack")
    await asyncio.sleep(5)  # more scheduler ticks pass over the same minute
    assert len(await fired()) == 1
    node = stack.sim.node("nd-e2e-irr")
    answered = [r for r in node.responses if r.get("cmd_id") == rows[0]["cmd_id"]]
    assert [r["status"] for r in answered] == ["ACK"]
    assert await db.fetchval("SELECT count(*) FROM zone_events WHERE zone_id = $1 AND type = 'IRRIGATION_STARTED'",
                             stack.zones["B"]) == 1


async def test_5_bridge_commands_are_acked_or_time_out(stack, db):
    zone = stack.zones["B"]
    async with httpx.AsyncClient(timeout=10, headers=_auth()) as client:
        ok = await client.post(stack.url("bridge_port", f"/bridge/zones/{zone}/commands"), json={
            "type": "set_relay", "params": {"state": True}, "greenhouse_uid": "gh-e2e", "node_uid": "nd-e2e-clim",
            "channel": "fan_A", "cmd_id": "laravel-e2e-ok"})
        silent = await client.post(stack.url("bridge_port", "/bridge/nodes/nd-e2e-silent/commands"), json={
            "type": "run_pump", "params": {"duration_ms": 1000}, "greenhouse_uid": "gh-e2e", "zone_id": zone,
            "channel": "pump_in"})
        assert ok.status_code == 200 and silent.status_code == 200, (ok.text, silent.text)
        assert ok.json() == {"status": "ok", "data": {"command_id": "laravel-e2e-ok"}}
        silent_id = silent.json()["data"]["command_id"]

        async def status_of(cmd_id, wanted):
            body = (await client.get(stack.url("bridge_port", f"/bridge/commands/{cmd_id}"))).json()
            return body["data"]["status"] == wanted and body
        await testing.eventually(lambda: status_of("laravel-e2e-ok", "ack"), 20, 0.3, "ack")
        await testing.eventually(lambda: status_of(silent_id, "timeout"), 30, 0.5, "timeout")


async def test_6_node_lost_without_disconnect_raises_and_resolves_an_alert(stack, db):
    node = stack.sim.node("nd-e2e-clim")
    await testing.eventually(lambda: db.fetchval("SELECT status = 'online' FROM nodes WHERE uid = 'nd-e2e-clim'"), 20)
    node.go_offline(abrupt=True)

    async def alert(status):
        return await db.fetchval("SELECT count(*) FROM alerts WHERE type = 'NODE_OFFLINE' AND status = $1"
                                 " AND details->>'node_uid' = 'nd-e2e-clim'", status)
    await testing.eventually(lambda: alert("ACTIVE"), 60, 0.5, "NODE_OFFLINE alert")
    assert await db.fetchval("SELECT status FROM nodes WHERE uid = 'nd-e2e-clim'") == "offline"
    node.start()
    await testing.eventually(lambda: alert("RESOLVED"), 30, 0.5, "alert resolved")
    assert await alert("ACTIVE") == 0


async def test_6b_a_node_laravel_created_or_marked_offline_by_silence_is_online_when_heard_from(stack, db):
    """No status message: a heartbeat, then (after silence) telemetry, bring the node back."""
    zone = stack.zones["B"]
    node_topic = stack.topics.node_topic("gh-e2e", f"zn-{zone}", "nd-e2e-quiet", "heartbeat")
    telemetry_topic = stack.topics.channel_topic("gh-e2e", f"zn-{zone}", "nd-e2e-quiet", "temp_air", "telemetry")

    async def node():
        return await db.fetchrow("SELECT status, last_seen_at FROM nodes WHERE uid = 'nd-e2e-quiet'")

    async def events():
        return [r["type"] for r in await db.fetch(
            "SELECT type FROM zone_events WHERE zone_id = $1 AND details->>'node_uid' = 'nd-e2e-quiet' ORDER BY id",
            zone)]

    assert tuple(await node()) == ("offline", None)  # as Laravel created it
    testing.publish_sync(stack.settings.mqtt_host, stack.settings.mqtt_port,
                         [(node_topic, orjson.dumps({"uptime": 35555, "free_heap": 102000, "rssi": -62}), 1, False)])
    await testing.eventually(lambda: _node_status_is(node, "online"), 20, 0.3, "online after a heartbeat")
    assert (await node())["last_seen_at"] is not None
    await testing.eventually(lambda: _node_status_is(node, "offline"), 40, 0.5, "offline after silence")
    await testing.eventually(lambda: db.fetchval(
        "SELECT count(*) FROM alerts WHERE type = 'NODE_OFFLINE' AND status = 'ACTIVE'"
        " AND details->>'node_uid' = 'nd-e2e-quiet'"), 20, 0.3, "NODE_OFFLINE alert")
    testing.publish_sync(stack.settings.mqtt_host, stack.settings.mqtt_port,
                         [(telemetry_topic, orjson.dumps({"metric_type": "TEMP_AIR", "value": 21.5}), 1, False)])
    await testing.eventually(lambda: _node_status_is(node, "online"), 20, 0.3, "online after telemetry")
    await testing.eventually(lambda: db.fetchval(
        "SELECT count(*) = 0 FROM alerts WHERE type = 'NODE_OFFLINE' AND status = 'ACTIVE'"
        " AND details->>'node_uid' = 'nd-e2e-quiet'"), 20, 0.3, "NODE_OFFLINE alert resolved")
    assert (await events()).count("DEVICE_ONLINE") == 2


async def _node_status_is(node, status):
    return (await node())["status"] == status


async def test_6c_laravel_prewritten_zone_command_is_completed_and_force_commands_pass_through(stack, db):
    """Laravel inserts its row first (zone command: node and channel NULL, empty params as []),
    then calls the bridge with its own cmd_id, exactly as PythonBridgeService does."""
    zone = stack.zones["B"]
    relay_id, force_id = str(uuid.uuid4()), str(uuid.uuid4())
    await db.execute(
        "INSERT INTO commands (zone_id, cmd, params, status, cmd_id, created_at, updated_at) VALUES"
        " ($1, 'set_relay', $2, 'pending', $3, now(), now()),"
        " ($1, 'FORCE_IRRIGATION', '[]'::jsonb, 'pending', $4, now(), now())",
        zone, {"state": True}, relay_id, force_id)
    probe = testing.MqttProbe(stack.settings.mqtt_host, stack.settings.mqtt_port,
                              f"{stack.settings.mqtt_topic_root}/+/+/+/+/command")
    # Guzzle's request: PHP-escaped JSON, no Accept header.
    headers = {"Content-Type": "application/json", "User-Agent": "GuzzleHttp/7", **_auth()}
    bodies = [
        b'{"type":"set_relay","params":{"state":true},"greenhouse_uid":"gh-e2e","node_uid":"nd-e2e-clim",'
        b'"channel":"fan_A","cmd_id":"' + relay_id.encode() + b'"}',
        b'{"type":"FORCE_IRRIGATION","params":{},"greenhouse_uid":"gh-e2e","node_uid":"nd-e2e-irr",'
        b'"channel":"pump_in","cmd_id":"' + force_id.encode() + b'"}',
    ]
    try:
        async with httpx.AsyncClient(timeout=10, headers=headers) as client:
            for body in bodies:
                answer = await client.post(stack.url("bridge_port", f"/bridge/zones/{zone}/commands"), content=body)
                assert answer.status_code == 200, answer.text
        rows = await testing.eventually(lambda: _rows_if(db, [relay_id], "ack"), 20, 0.3, "relay command ack")
        assert (rows[0]["node"], rows[0]["channel"], rows[0]["sent"]) == ("nd-e2e-clim", "fan_A", True)
        sent = await probe.wait_for(1, f"{stack.settings.mqtt_topic_root}/+/+/nd-e2e-irr/+/command")
        forced = [p for p in (orjson.loads(m.payload) for m in sent) if p.get("cmd_id") == force_id]
        assert len(forced) == 1
        assert forced[0]["cmd"] == "FORCE_IRRIGATION" and forced[0].get("params", {}) == {}
        row = await db.fetchrow("SELECT n.uid AS node, c.channel, c.sent_at IS NOT NULL AS sent, c.status"
                                " FROM commands c LEFT JOIN nodes n ON n.id = c.node_id WHERE c.cmd_id = $1", force_id)
        assert (row["node"], row["channel"], row["sent"]) == ("nd-e2e-irr", "pump_in", True)
        assert row["status"] in ("sent", "ack", "failed")  # the firmware answers unknown_command
    finally:
        probe.close()


async def _rows_if(db, cmd_ids, status):
    rows = await db.fetch("SELECT n.uid AS node, c.channel, c.sent_at IS NOT NULL AS sent, c.status FROM commands c"
                          " LEFT JOIN nodes n ON n.id = c.node_id WHERE c.cmd_id = ANY($1::text[])", cmd_ids)
    return rows if rows and all(r["status"] == status for r in rows) else None


async def test_6d_no_valve_stays_open_after_irrigation_water_change_fill_or_drain(stack, db):
    """The firmware ignores duration_ms on set_relay: whoever opens a valve closes it."""
    zone, node = stack.zones["C"], stack.sim.node("nd-e2e-valves")

    async def relay_commands():
        return [(r["channel"], r["state"], r["status"]) for r in await db.fetch(
            "SELECT channel, params->>'state' AS state, status FROM commands WHERE zone_id = $1 AND cmd = 'set_relay'"
            " ORDER BY id", zone)]

    async def event_count(kind):
        return await db.fetchval("SELECT count(*) FROM zone_events WHERE zone_id = $1 AND type = $2", zone, kind)

    # Irrigation through a valve, at the same minute as zone B's (test 4 waited for it).
    await testing.eventually(lambda: event_count("IRRIGATION_FINISHED"), 150, 0.5, "valve irrigation finished")
    await testing.eventually(lambda: _closed(node), 20, 0.3, "irrigation valve closed")
    assert [c[:2] for c in await relay_commands()] == [("valve_irrigation", "true"), ("valve_irrigation", "false")]

    await db.execute("UPDATE zones SET solution_started_at = now() - interval '30 days' WHERE id = $1", zone)
    await testing.eventually(lambda: event_count("WATER_CHANGE_COMPLETED"), 120, 0.5, "water change completed")
    await testing.eventually(lambda: _closed(node), 20, 0.3, "water change valves closed")

    async with httpx.AsyncClient(timeout=90, headers=_auth()) as client:
        for route, body in (("fill", {"target_level": 0.9, "max_duration_sec": 60}),
                            ("drain", {"target_level": 0.5, "max_duration_sec": 60})):
            answer = await client.post(stack.url("bridge_port", f"/bridge/zones/{zone}/{route}"), json=body)
            assert answer.status_code == 200, answer.text
            await testing.eventually(lambda: _closed(node), 20, 0.3, f"{route} valve closed")
    async def every_close_acked():
        commands = await relay_commands()
        return all(c[2] == "ack" for c in commands if c[1] == "false") and commands
    commands = await testing.eventually(every_close_acked, 20, 0.3, "every close acknowledged")
    opened = [c[0] for c in commands if c[1] == "true"]
    assert set(opened) == {"valve_irrigation", "valve_drain", "valve_fill"}
    assert sorted(c[0] for c in commands if c[1] == "false") == sorted(opened)  # one close for each opening


async def _closed(node):
    return node.open_relays() == []


async def test_7_killed_logger_loses_and_duplicates_nothing(stack, db):
    """Readings published while the history-logger is SIGKILLed and restarted: each stored once."""
    topic = stack.topics.channel_topic("gh-e2e", f"zn-{stack.zones['B']}", "nd-e2e-burst", "temp_air", "telemetry")
    base_ms = int(time.time() * 1000) - 60_000
    count = 3000
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=testing.unique_id("burst-"))
    client.connect(stack.settings.mqtt_host, stack.settings.mqtt_port)
    client.loop_start()
    try:
        infos = []
        for i in range(count):
            payload = orjson.dumps({"metric_type": "TEMP_AIR", "value": 20 + i / 1000, "ts": base_ms + i})
            infos.append(client.publish(topic, payload, qos=1))
            if i == count // 3:
                stack.processes["history-logger"].kill()
            if i == 2 * count // 3:
                stack.start("history-logger")
            if i % 200 == 0:
                await asyncio.sleep(0.05)
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()

    async def stored():
        return await db.fetchval("SELECT count(*) FROM telemetry_samples WHERE node_id ="
                                 " (SELECT id FROM nodes WHERE uid = 'nd-e2e-burst')")
    try:
        await testing.eventually(lambda: _at_least(stored, count), 90, 0.5, f"{count} readings stored")
    except AssertionError:
        raise AssertionError(f"stored {await stored()} of {count}\n"
                             f"{stack.processes['history-logger'].log()[-6000:]}") from None
    await asyncio.sleep(2)
    # Each reading has its own value (ts may keep whole seconds only, as on a Laravel-built database).
    rows = await db.fetchrow("SELECT count(*) AS n, count(DISTINCT value) AS distinct_values FROM telemetry_samples"
                             " WHERE node_id = (SELECT id FROM nodes WHERE uid = 'nd-e2e-burst')")
    assert (rows["n"], rows["distinct_values"]) == (count, count)


async def _at_least(fetch, n):
    return (await fetch()) >= n
