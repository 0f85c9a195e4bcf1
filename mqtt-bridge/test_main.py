"""The bridge as a service: auth, body limit, ops routes, metrics, docs, Redis signal, broker outage,
and `python main.py` as a real process."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import orjson
import pytest

from common import testing
from common.redis_client import CONFIG_CHANGED_CHANNEL, key, redis_client

from testing import TOKEN, running_bridge

COMMAND = {"type": "stop_pump", "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1", "channel": "pump_in"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": TOKEN}])
async def test_wrong_or_missing_token_is_401_before_the_body_is_read(bridge, world, db, headers):
    async with httpx.AsyncClient(base_url=str(bridge.http.base_url), headers=headers) as anonymous:
        valid = await anonymous.post(f"/bridge/zones/{world.zone}/commands", json=COMMAND)
        broken = await anonymous.post(f"/bridge/zones/{world.zone}/commands", content=b"{not json")
        status = await anonymous.get("/bridge/commands/x")
    for response in (valid, broken, status):
        assert (response.status_code, response.json()) == (401, {"detail": "Unauthorized: invalid or missing token"})
    assert await db.fetchval("SELECT count(*) FROM commands") == 0
    metrics = (await bridge.http.get("/metrics")).text  # refused before routing, still counted by route
    assert 'bridge_requests_total{path="/bridge/commands/{cmd_id}",status="401"}' in metrics


async def test_no_token_configured_refuses_every_bridge_route(settings, world, db):
    async with running_bridge(settings, token="") as unconfigured:
        command = await unconfigured.http.post(f"/bridge/zones/{world.zone}/commands", json=COMMAND,
                                               headers={"Authorization": "Bearer anything"})
        routine = await unconfigured.http.post(f"/bridge/zones/{world.zone}/fill", json={"target_level": 0.5})
        health = await unconfigured.http.get("/health")
    for response in (command, routine):
        assert (response.status_code, response.json()) == (
            500, {"detail": "Server misconfiguration: PY_API_TOKEN must be set for security"})
    assert health.status_code == 200  # ops routes need no token
    assert await db.fetchval("SELECT count(*) FROM commands") == 0


async def test_body_over_64_kb_is_413(bridge, world, db):
    big = dict(COMMAND, params={"pad": "x" * 70_000})
    declared = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=big)

    async def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(70):
            yield b"x" * 1024
    streamed = await bridge.http.post(f"/bridge/zones/{world.zone}/commands", content=chunks())
    for response in (declared, streamed):
        assert (response.status_code, response.json()) == (413, {"detail": "request body is larger than 65536 bytes"})
    just_under = dict(COMMAND, params={"pad": "x" * 60_000})
    assert (await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=just_under)).status_code == 200
    assert await db.fetchval("SELECT count(*) FROM commands") == 1


async def test_health_ready_and_metrics(bridge, world):
    health = await bridge.http.get("/health", headers={"Authorization": ""})
    assert (health.status_code, health.json()) == (200, {"status": "ok", "data": {"mqtt": "ok", "db": "ok"}})
    assert (await bridge.http.get("/ready")).json()["data"] == {"mqtt": "ok", "db": "ok"}
    await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=COMMAND)
    await bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=dict(COMMAND, type="nope"))
    await bridge.http.get("/no/such/route")
    text = (await bridge.http.get("/metrics")).text
    assert 'bridge_requests_total{path="/bridge/zones/{zone_id}/commands",status="200"}' in text
    assert 'bridge_requests_total{path="/bridge/zones/{zone_id}/commands",status="422"}' in text
    assert 'bridge_requests_total{path="unmatched",status="404"}' in text
    assert 'bridge_request_duration_seconds_bucket{le="0.05",path="/bridge/zones/{zone_id}/commands"}' in text
    assert 'commands_published_total{cmd="stop_pump",source="bridge"}' in text
    assert "commands_failed_total" in text and "mqtt_publish_errors_total" in text


async def test_openapi_documents_every_endpoint_with_examples(bridge):
    async with httpx.AsyncClient(base_url=str(bridge.http.base_url)) as anonymous:  # the docs need no token
        docs = await anonymous.get("/docs")
        redoc = await anonymous.get("/redoc")
        spec = (await anonymous.get("/openapi.json")).json()
        assets = {asset: await anonymous.get(asset) for page in (docs, redoc)
                  for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text)}
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and redoc.status_code == 200
    assert "https://" not in docs.text + redoc.text  # scripts and styles come from the bridge, not a CDN
    assert "/static-offline-docs/swagger-ui-bundle.js" in assets and "/static-offline-docs/redoc.standalone.js" in assets
    assert all(answer.status_code == 200 for answer in assets.values()), {a: r.status_code for a, r in assets.items()}
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"  # the Authorize button
    metrics = (await bridge.http.get("/metrics")).text  # every asset under one bounded label
    assert 'bridge_requests_total{path="/static-offline-docs",status="200"}' in metrics
    assert "swagger-ui-bundle.js" not in metrics
    bridge_ops = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()
                  if path.startswith("/bridge/")]
    assert {(p, m) for p, m, _ in bridge_ops} >= {
        ("/bridge/zones/{zone_id}/commands", "post"), ("/bridge/nodes/{node_uid}/commands", "post"),
        ("/bridge/nodes/{node_uid}/config", "post"), ("/bridge/commands/{cmd_id}", "get"),
        ("/bridge/zones/{zone_id}/fill", "post"), ("/bridge/zones/{zone_id}/drain", "post"),
        ("/bridge/zones/{zone_id}/calibrate-flow", "post"), ("/bridge/tasks/{task_id}", "get"),
        ("/bridge/config/zone-updated", "post")}
    for path, method, op in bridge_ops:
        for code, answer in op["responses"].items():
            assert "example" in answer["content"]["application/json"], (path, method, code)
        if method == "post":
            assert op["requestBody"]["content"]["application/json"]["examples"], (path, method)
        assert op["security"] == [{"bearerAuth": []}], (path, method)
    assert "/health" in spec["paths"] and "/metrics" in spec["paths"]
    assert "security" not in spec["paths"]["/health"]["get"]


async def test_zone_updated_signals_the_automation_engine_over_redis(bridge):
    redis = redis_client(bridge.settings)
    pubsub = redis.pubsub()
    await pubsub.subscribe(key(bridge.settings, CONFIG_CHANGED_CHANNEL))
    try:
        response = await bridge.http.post("/bridge/config/zone-updated", json={"zone_id": 3, "greenhouse_uid": "gh-1"})
        assert response.status_code == 202
        assert response.json() == {"status": "ok", "data": {"zone_id": 3, "greenhouse_uid": "gh-1", "receivers": 1}}

        async def message():
            return await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        received = await testing.eventually(message, 10)
        assert orjson.loads(received["data"]) == {"zone_id": 3, "greenhouse_uid": "gh-1"}
        bad = await bridge.http.post("/bridge/config/zone-updated", json={"zone_id": 0})
        assert bad.status_code == 422
    finally:
        await pubsub.aclose()
        await redis.aclose()


async def test_broker_down_is_503_without_false_sent_and_recovers_without_restart(settings, world, db):
    with testing.PrivateMosquitto() as broker:
        private = settings.replace(mqtt_port=broker.port)
        async with running_bridge(private) as b:
            first = await b.http.post(f"/bridge/zones/{world.zone}/commands", json=dict(COMMAND, cmd_id="up-1"))
            assert first.status_code == 200
            broker.stop()
            await testing.eventually(lambda: _async(not b.service.mqtt.connected), 10, message="disconnect seen")
            down = await b.http.post(f"/bridge/zones/{world.zone}/commands", json=dict(COMMAND, cmd_id="down-1"))
            assert down.status_code == 503 and down.headers["Retry-After"] == "5"
            assert "not sent" in down.json()["detail"]
            assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = 'down-1'") == "pending"
            health = await b.http.get("/health")
            assert health.status_code == 503 and health.json()["data"] == {"mqtt": "down", "db": "ok"}
            config = await b.http.post("/bridge/nodes/nd-irr-1/config", json={"node_uid": "nd-irr-1", "config": {}})
            assert config.status_code == 503 and config.headers["Retry-After"] == "5"

            broker.start()
            probe = testing.MqttProbe("127.0.0.1", broker.port, f"{b.root}/#")
            try:
                async def retried():
                    answer = await b.http.post(f"/bridge/zones/{world.zone}/commands",
                                               json=dict(COMMAND, cmd_id="down-1"))
                    return answer.status_code == 200
                await testing.eventually(retried, 30, interval=0.5, message="publish after broker restart")
                assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = 'down-1'") == "sent"
                [message] = await probe.wait_for(1, f"{b.root}/gh-1/+/nd-irr-1/pump_in/command")
                assert orjson.loads(message.payload)["cmd_id"] == "down-1"
            finally:
                probe.close()
            assert (await b.http.get("/health")).status_code == 200


async def _async(value):
    return value


async def test_python_main_py_runs_and_stops_cleanly_on_sigterm(settings):
    port = testing.free_port()
    env = testing.settings_env(settings.replace(bridge_port=port, py_api_token="process-token"))
    process = testing.ServiceProcess("mqtt-bridge", env).start()
    try:
        async def healthy():
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200
            except httpx.HTTPError:
                return False
        await testing.eventually(healthy, 30, interval=0.2, message="bridge process healthy")
    finally:
        code = await asyncio.to_thread(process.terminate)
    assert code == 0, process.log_path.read_text()[-2000:]
    lines = [json.loads(line) for line in process.log_path.read_text().splitlines() if line.startswith("{")]
    assert "bridge_listening" in {line["event"] for line in lines}


async def test_production_without_py_api_token_refuses_to_start(settings):
    env = dict(testing.settings_env(settings), APP_ENV="production", PG_PASS="a-real-secret", PY_API_TOKEN="")
    process = testing.ServiceProcess("mqtt-bridge", env).start()
    code = await asyncio.to_thread(process.proc.wait, 30)
    assert code == 2
    assert "PY_API_TOKEN must be set to a real secret" in process.log_path.read_text()


async def test_database_unreachable_is_503_with_retry_after(settings):
    no_database = settings.replace(pg_port=testing.free_port())  # nothing listens there
    async with running_bridge(no_database) as b:
        command = await b.http.post("/bridge/zones/1/commands", json=COMMAND)
        assert command.status_code == 503 and command.headers["Retry-After"] == "5"
        assert command.json() == {"detail": "database unavailable, retry later"}
        assert str(no_database.pg_port) not in command.text and no_database.pg_host not in command.text
        health = await b.http.get("/health")
        assert health.status_code == 503 and health.json()["data"] == {"mqtt": "ok", "db": "down"}
