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

import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from common import testing
from common.db import Database
from tests import stack as stack_module
from tests.stack import (SERVICES, ServiceStack, create_database, drop_database, drop_redis_keys, free_ports,
                         node_spec, run_with_db, seed_nodes)
from tools.node_sim import NodeSpec
from tools.node_sim.layout import hardware_id_for

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
}


class Stack(ServiceStack):
    """Facts the scenarios share: settings, seeded ids, the simulator, the service processes."""

    def __init__(self, settings, zones: dict[str, int], irrigation_time: str):
        super().__init__(settings, SERVICE_ENV)
        self.zones = zones
        self.irrigation_time = irrigation_time


_spec = node_spec


# Names other cross-service test modules import from here (kept until they use tests/stack.py).
_create_database = stack_module._create_database
_drop_database = stack_module._drop_database


async def _wait_ready(s: ServiceStack) -> None:
    await s.wait_ready()


async def _seed(db: Database, irrigation_time: str) -> dict[str, int]:
    """Like Laravel would: a greenhouse, a dosing zone (A) and a scheduled zone (B), their nodes."""
    gh = await db.fetchval("INSERT INTO greenhouses (uid, name, timezone) VALUES ('gh-e2e', 'E2E', 'UTC') RETURNING id")
    recipe = await db.fetchval("INSERT INTO recipes (name) VALUES ('e2e') RETURNING id")
    await db.execute(
        "INSERT INTO recipe_phases (recipe_id, phase_index, name, targets) VALUES ($1, 0, 'a', $2), ($1, 1, 'b', $3)",
        recipe, {"ph": PH_TARGET, "ec": {"min": 0.6, "max": 1.6}},
        {"irrigation_schedule": irrigation_time, "irrigation_duration_sec": 2})
    zones = {}
    for name, caps in (("A", {"ph_control": True}), ("B", None)):
        zones[name] = await db.fetchval(
            "INSERT INTO zones (greenhouse_id, name, status, capabilities) VALUES ($1, $2, 'RUNNING', $3) RETURNING id",
            gh, name, caps)
    # Zone B runs the recipe's second phase (its schedule); phases are open-ended (no duration).
    for name, phase in (("A", 0), ("B", 1)):
        await db.execute("INSERT INTO zone_recipe_instances (zone_id, recipe_id, current_phase_index, started_at)"
                         " VALUES ($1, $2, $3, now())", zones[name], recipe, phase)
    await seed_nodes(db, _registered_specs(zones) + [_spec("nd-e2e-silent", "irrig", "gh-e2e", zones["B"]),
                                                     _spec("nd-e2e-burst", "climate", "gh-e2e", zones["B"])])
    return zones


def _registered_specs(zones: dict[str, int]) -> list[NodeSpec]:
    return [_spec("nd-e2e-ph", "ph", "gh-e2e", zones["A"]), _spec("nd-e2e-irr", "irrig", "gh-e2e", zones["B"]),
            _spec("nd-e2e-clim", "climate", "gh-e2e", zones["B"])]


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
                          poll_ms=500, heartbeat_sec=5, hello_interval_sec=2, initial_ph=6.3, initial_ec=1.1, seed=7)
        yield s
    finally:
        codes = s.stop()
        drop_database(name)
        drop_redis_keys(settings)
        broker.close()
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
