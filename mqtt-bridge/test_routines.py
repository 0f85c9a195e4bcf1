"""fill / drain / calibrate-flow on real PostgreSQL + Mosquitto, with telemetry rows written by the test
(short durations and a fast poll interval keep them quick)."""
from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from common import testing
from common.testing import insert_row, seed_node
from tests.stack import simulator
from tools.node_sim import Simulator
from tools.node_sim.layout import NodeSpec, actuator, hardware_id_for

from testing import TOKEN, running_bridge


async def set_level(db, zone: int, node: int, value: float) -> None:
    await db.execute(
        "INSERT INTO telemetry_last (zone_id, node_id, metric_type, channel, value, updated_at)"
        " VALUES ($1, $2, 'WATER_LEVEL', 'level', $3, now()) ON CONFLICT (zone_id, node_id, metric_type)"
        " DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at", zone, node, value)


async def events(db, zone: int) -> list[tuple[str, dict]]:
    rows = await db.fetch("SELECT type, details FROM zone_events WHERE zone_id = $1 ORDER BY id", zone)
    return [(r["type"], r["details"]) for r in rows]


async def finished_task(bridge, task_id: str, timeout: float = 20) -> dict:
    async def done():
        data = (await bridge.http.get(f"/bridge/tasks/{task_id}")).json()["data"]
        return data if data["state"] != "running" else None
    return await testing.eventually(done, timeout, interval=0.1, message=f"task {task_id} finished")


def relay_commands(probe, root: str) -> list[tuple[str, str, bool]]:
    return [(m.topic.split("/")[-2], p["cmd"], p.get("state")) for m in probe.received(f"{root}/#")
            for p in [orjson.loads(m.payload)]]


async def test_fill_opens_the_fill_valve_until_the_level_reaches_the_target_then_closes_it(bridge, valves,
                                                                                          mqtt_probe, db):
    world = valves
    await set_level(db, world.zone, world.irr, 0.2)

    async def rising():
        for level in (0.3, 0.45, 0.62, 0.7):
            await asyncio.sleep(0.15)
            await set_level(db, world.zone, world.irr, level)
    feeder = asyncio.create_task(rising())
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/fill",
                                      json={"target_level": 0.6, "max_duration_sec": 20})
    await feeder
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and set(body["data"]) == {"success", "target_level", "final_level", "elapsed_sec"}
    assert body["data"]["success"] is True and body["data"]["target_level"] == 0.6
    assert body["data"]["final_level"] >= 0.6
    topic = f"{bridge.root}/gh-1/zn-{world.zone}/nd-irr-1/valve_fill/command"
    start, stop = [orjson.loads(m.payload) for m in await mqtt_probe.wait_for(2, topic)]
    assert (start["cmd"], start["state"], stop["cmd"], stop["state"]) == ("set_relay", True, "set_relay", False)
    kinds = await events(db, world.zone)
    assert [k for k, _ in kinds] == ["FILL_STARTED", "FILL_FINISHED"]
    assert kinds[1][1]["status"] == "completed" and kinds[1][1]["stop_cmd_id"] == stop["cmd_id"]
    assert await db.fetchval("SELECT count(*) FROM commands WHERE status = 'sent'") == 2
    routine = await db.fetchrow("SELECT * FROM bridge_routines WHERE zone_id = $1", world.zone)
    assert (routine["kind"], routine["state"], routine["channel"]) == ("fill", "succeeded", "valve_fill")


async def test_drain_in_the_background_times_out_and_still_closes(bridge, valves, mqtt_probe, db):
    world = valves
    await set_level(db, world.zone, world.irr, 0.5)
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/drain?async=1",
                                      json={"target_level": 0.2, "max_duration_sec": 1})
    assert response.status_code == 202
    task = await finished_task(bridge, response.json()["data"]["task_id"])
    assert (task["kind"], task["zone_id"], task["state"]) == ("drain", world.zone, "failed")
    assert task["result"]["success"] is False and task["result"]["error"] == "timeout"
    assert task["result"]["final_level"] == 0.5 and task["result"]["elapsed_sec"] >= 1
    await mqtt_probe.wait_for(2, f"{bridge.root}/#")
    assert relay_commands(mqtt_probe, bridge.root) == [("valve_drain", "set_relay", True),
                                                       ("valve_drain", "set_relay", False)]
    kinds = await events(db, world.zone)
    assert [k for k, _ in kinds] == ["DRAIN_STARTED", "DRAIN_FINISHED"] and kinds[1][1]["status"] == "timeout"
    assert await db.fetchval("SELECT state FROM bridge_routines WHERE id = $1", task["task_id"]) == "failed"


@pytest.mark.parametrize("route, missing", [("fill", "fill valve"), ("drain", "drain valve")])
async def test_without_a_valve_the_routine_is_refused_up_front(bridge, world, mqtt_probe, db, route, missing):
    # The demo irrigation node: pump_in, flow_sensor and water_level, no valve (nor an offline one).
    for channel in ("flow_sensor", "water_level"):
        await insert_row(db, "node_channels", node_id=world.irr, channel=channel, type="sensor")
    await seed_node(db, "nd-off", world.zone, type="irrig", status="offline", channels=["valve_fill", "valve_drain"])
    for suffix in ("", "?async=1"):
        response = await bridge.http.post(f"/bridge/zones/{world.zone}/{route}{suffix}", json={"target_level": 0.5})
        assert response.status_code == 409, response.text
        detail = response.json()["detail"]
        assert f"no online {missing}" in detail and ("valve_fill" in detail or "valve_drain" in detail)
    await asyncio.sleep(0.2)
    assert await events(db, world.zone) == [] and mqtt_probe.received() == []


async def test_a_routine_running_on_another_bridge_is_409(bridge, valves, mqtt_probe, db):
    world = valves
    await db.execute("INSERT INTO bridge_routines (id, kind, zone_id, gh_uid, instance, started_at, alive_at)"
                     " VALUES ('elsewhere', 'drain', $1, 'gh-1', 'other-bridge', now(), now())", world.zone)
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/fill", json={"target_level": 0.5})
    assert response.status_code == 409 and "already running a drain routine" in response.json()["detail"]
    assert mqtt_probe.received() == []


@pytest.mark.parametrize("route, body, status, detail", [
    ("fill", {"target_level": 1.5}, 400, "target_level must be between 0.1 and 1.0"),
    ("fill", {"target_level": 0.05}, 400, "target_level must be between 0.1 and 1.0"),
    ("drain", {"target_level": 0.95}, 400, "target_level must be between 0.0 and 0.9"),
    ("calibrate-flow", {"node_id": 1, "channel": "pump_in", "pump_duration_sec": 3}, 400,
     "pump_duration_sec must be between 5 and 60"),
    ("fill", {"target_level": 0.5, "zone": "bare"}, 404, "Zone not found or has no greenhouse"),
    ("drain", {"target_level": 0.5, "zone": 999999}, 404, "Zone not found or has no greenhouse"),
    ("calibrate-flow", {"node_id": 999999, "channel": "pump_in"}, 404, "node 999999 with channel 'pump_in' not found"),
])
async def test_routine_requests_are_refused_before_anything_runs(bridge, world, mqtt_probe, db, route, body, status,
                                                                 detail):
    body = dict(body)  # the parameter is shared by every run of this test
    zone = body.pop("zone", world.zone)
    zone = world.bare_zone if zone == "bare" else zone
    for suffix in ("", "?async=1"):
        response = await bridge.http.post(f"/bridge/zones/{zone}/{route}{suffix}", json=body)
        assert response.status_code == status and response.json()["detail"].startswith(detail)
    assert await events(db, world.zone) == [] and mqtt_probe.received() == []


async def test_one_routine_per_zone_and_stopping_the_bridge_closes_the_valve(settings, valves, mqtt_probe, db):
    world = valves
    await set_level(db, world.zone, world.irr, 0.1)
    async with running_bridge(settings) as b:
        started = await b.http.post(f"/bridge/zones/{world.zone}/fill?async=1",
                                    json={"target_level": 0.9, "max_duration_sec": 600})
        assert started.status_code == 202
        busy = await b.http.post(f"/bridge/zones/{world.zone}/drain", json={"target_level": 0.2})
        assert busy.status_code == 409 and "already running a fill routine" in busy.json()["detail"]
        await mqtt_probe.wait_for(1, f"{b.root}/#")
    await mqtt_probe.wait_for(2, f"{settings.mqtt_topic_root}/#")
    assert relay_commands(mqtt_probe, settings.mqtt_topic_root) == [("valve_fill", "set_relay", True),
                                                                    ("valve_fill", "set_relay", False)]
    kinds = await events(db, world.zone)
    assert kinds[-1][0] == "FILL_FINISHED" and kinds[-1][1]["status"] == "cancelled"
    assert await db.fetchval("SELECT state FROM bridge_routines WHERE zone_id = $1", world.zone) == "cancelled"


async def test_flow_calibration_in_the_background_stores_k_in_the_channel_config(bridge, world, mqtt_probe, db):
    stop = asyncio.Event()

    async def flow_sensor():  # 2.4 L/min, 40 pulses per sample
        while not stop.is_set():
            await db.execute(
                "INSERT INTO telemetry_samples (zone_id, node_id, channel, metric_type, value, raw, ts)"
                " VALUES ($1, $2, 'flow_sensor', 'FLOW_RATE', 2.4, $3, now())", world.zone, world.irr, {"pulses": 40})
            await asyncio.sleep(0.5)
    sensor = asyncio.create_task(flow_sensor())
    try:
        response = await bridge.http.post(f"/bridge/zones/{world.zone}/calibrate-flow?async=1",
                                          json={"node_id": world.irr, "channel": "pump_in", "pump_duration_sec": 5})
        assert response.status_code == 202
        task = await finished_task(bridge, response.json()["data"]["task_id"], timeout=30)
    finally:
        stop.set()
        await sensor
    assert task["state"] == "succeeded", task
    result = task["result"]
    n = result["samples_count"]
    assert n >= 5 and result["avg_flow_l_per_min"] == pytest.approx(2.4)
    assert result["K"] == pytest.approx(2.4 / (40 * n / 5 * 60))
    [run] = [orjson.loads(m.payload) for m in await mqtt_probe.wait_for(1, f"{bridge.root}/#")]
    assert (run["cmd"], run["duration_ms"]) == ("run_pump", 5000)
    config = await db.fetchval("SELECT config FROM node_channels WHERE id = $1", world.channels["pump_in"])
    assert config["safe_limits"] == {"max_duration_ms": 5000, "min_off_ms": 3000}  # other keys kept
    assert config["flow_calibration"] == {k: result[k] for k in ("K", "calibrated_at", "avg_flow_l_per_min",
                                                                 "pump_duration_sec", "samples_count")}
    kinds = await events(db, world.zone)
    assert [k for k, _ in kinds] == ["FLOW_CALIBRATION_STARTED", "FLOW_CALIBRATION_FINISHED"]
    assert kinds[1][1]["K"] == result["K"]


async def test_flow_calibration_without_flow_data_fails_and_keeps_the_config(bridge, world, db):
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/calibrate-flow",
                                      json={"node_id": world.irr, "channel": "pump_in", "pump_duration_sec": 5})
    assert response.status_code == 200
    assert response.json()["data"] == {"success": False, "error": "insufficient_flow_data", "samples_count": 0,
                                       "pump_duration_sec": 5}
    config = await db.fetchval("SELECT config FROM node_channels WHERE id = $1", world.channels["pump_in"])
    assert "flow_calibration" not in config


async def test_calibration_beyond_the_channel_limit_is_422(bridge, world, db):
    response = await bridge.http.post(f"/bridge/zones/{world.zone}/calibrate-flow",
                                      json={"node_id": world.irr, "channel": "pump_in", "pump_duration_sec": 10})
    assert response.status_code == 422 and "max_duration_ms=5000" in response.json()["detail"]
    kinds = await events(db, world.zone)
    assert kinds[-1][0] == "FLOW_CALIBRATION_FINISHED" and kinds[-1][1]["status"] == "failed"


# -- against the simulated firmware, with real service processes ------------------------------
def simulate(settings, zone: int, uid: str, node_type: str, channels) -> Simulator:
    return simulator(settings, [NodeSpec(uid, node_type, hardware_id_for(uid), "gh-1", zone, channels)],
                     poll_ms=500, heartbeat_sec=2)


async def until(check, timeout: float = 30, message: str = "condition"):
    async def probe():
        return check()
    return await testing.eventually(probe, timeout, 0.1, message)


async def service_ready(base: str) -> None:
    async with httpx.AsyncClient(timeout=2) as client:
        async def ready():
            try:
                return (await client.get(f"{base}/ready")).status_code == 200
            except httpx.HTTPError:
                return False
        await testing.eventually(ready, 30, 0.2, f"{base}/ready")


async def test_a_bridge_killed_during_a_fill_closes_the_valve_after_its_restart(settings, valves, db):
    world = valves
    settings = settings.replace(bridge_port=testing.free_port(), py_api_token=TOKEN)
    sim = simulate(settings, world.zone, "nd-irr-1", "irrig", [actuator("valve_fill"), actuator("valve_drain")])
    node = sim.node("nd-irr-1")
    env = dict(testing.settings_env(settings), BRIDGE_ROUTINE_POLL_SEC="0.2")
    base = f"http://127.0.0.1:{settings.bridge_port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    bridge = testing.ServiceProcess("mqtt-bridge", env).start()
    try:
        await service_ready(base)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as client:
            started = await client.post(f"/bridge/zones/{world.zone}/fill?async=1",
                                        json={"target_level": 0.95, "max_duration_sec": 600})
            assert started.status_code == 202, started.text
            task_id = started.json()["data"]["task_id"]
        await until(lambda: node.open_relays() == ["valve_fill"], message="fill valve opened")
        bridge.kill()  # SIGKILL: no finally block runs, nothing is closed
        await asyncio.sleep(1)
        assert node.open_relays() == ["valve_fill"]
        assert await db.fetchval("SELECT state FROM bridge_routines WHERE id = $1", task_id) == "running"

        bridge = testing.ServiceProcess("mqtt-bridge", env).start()  # the same bridge (client id) again
        await until(lambda: node.open_relays() == [], message="fill valve closed by the restarted bridge")
        await service_ready(base)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as client:
            task = (await client.get(f"/bridge/tasks/{task_id}")).json()["data"]
    finally:
        code = bridge.terminate()
        sim.stop()
        sim.clear_retained()
    assert code == 0, bridge.log()[-3000:]
    assert (task["state"], task["result"]["error"]) == ("interrupted", "interrupted")
    kinds = await events(db, world.zone)
    assert [k for k, _ in kinds] == ["FILL_STARTED", "FILL_FINISHED"]
    finished = kinds[1][1]
    assert (finished["status"], finished["task_id"], finished["channel"]) == ("interrupted", task_id, "valve_fill")
    assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = $1", finished["stop_cmd_id"]) == "sent"
    routine = await db.fetchrow("SELECT * FROM bridge_routines WHERE id = $1", task_id)
    assert routine["state"] == "interrupted" and routine["finished_at"] is not None


async def test_a_refused_open_ends_the_routine_failed_at_once(settings, world, db):
    # The water valve sits on a node whose firmware has no set_relay handler: it answers unknown_command.
    await insert_row(db, "node_channels", node_id=world.ph, channel="valve_drain", type="actuator")
    await db.execute("UPDATE nodes SET validated = true, last_seen_at = now()")
    settings = settings.replace(bridge_port=testing.free_port(), history_logger_port=testing.free_port(),
                                history_logger_metrics_port=testing.free_port(), py_api_token=TOKEN)
    sim = simulate(settings, world.zone, "nd-ph-1", "ph", [actuator("valve_drain"), actuator("pump_acid", 0.5)])
    env = dict(testing.settings_env(settings), BRIDGE_ROUTINE_POLL_SEC="0.2")
    logger = testing.ServiceProcess("history-logger", env).start()
    await service_ready(f"http://127.0.0.1:{settings.history_logger_port}")  # subscribed: it hears the answer
    async with running_bridge(settings) as b:
        response = await b.http.post(f"/bridge/zones/{world.zone}/drain",
                                     json={"target_level": 0.2, "max_duration_sec": 300})
    logger.terminate()
    sim.stop()
    sim.clear_retained()
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["success"] is False and data["error"] == "refused" and data["error_code"] == "unknown_command"
    assert data["elapsed_sec"] < 60  # it did not wait out max_duration_sec (300)
    kinds = await events(db, world.zone)
    assert [k for k, _ in kinds] == ["DRAIN_STARTED", "DRAIN_FINISHED"]
    assert (kinds[1][1]["status"], kinds[1][1]["error_code"]) == ("failed", "unknown_command")
    assert kinds[1][1]["stop_cmd_id"]  # the close is still sent (the open may have half-worked)


async def test_a_valve_switched_on_for_a_duration_through_the_api_is_closed_even_across_a_restart(
        settings, world, db):
    # Laravel's valve test button: set_relay {state: true, duration_ms: 3000}; the firmware ignores duration_ms.
    await insert_row(db, "node_channels", node_id=world.irr, channel="valve_irrigation", type="actuator")
    sim = simulate(settings, world.zone, "nd-irr-1", "irrig", [actuator("valve_irrigation")])
    node = sim.node("nd-irr-1")
    try:
        async with running_bridge(settings) as b:
            response = await b.http.post("/bridge/nodes/nd-irr-1/commands", json={
                "type": "set_relay", "params": {"state": True, "duration_ms": 2500}, "greenhouse_uid": "gh-1",
                "zone_id": world.zone, "channel": "valve_irrigation"})
            assert response.status_code == 200, response.text
            await until(lambda: node.open_relays() == ["valve_irrigation"], message="valve opened")
        # that bridge stopped before the duration was over; the next one closes the valve when it is due
        await asyncio.sleep(1)
        assert node.open_relays() == ["valve_irrigation"]
        async with running_bridge(settings):
            await until(lambda: node.open_relays() == [], message="valve closed after the duration")
    finally:
        sim.stop()
        sim.clear_retained()
    close = await db.fetchrow("SELECT * FROM actuator_closes WHERE zone_id = $1", world.zone)
    assert (close["owner"], close["channel"], close["reason"]) == ("bridge", "valve_irrigation", "duration_ms")
    assert close["done_at"] is not None and close["done_at"] >= close["close_at"]  # not before it was due
