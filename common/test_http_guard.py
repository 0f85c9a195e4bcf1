"""common.http_guard on a real service process: history-logger's /ingest/telemetry refuses a body
above HTTP_MAX_BODY_BYTES before reading it (declared or chunked), and keeps serving."""
from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from common import testing
from common.http_guard import HttpLimits
from common.env import SettingsError
from pydantic import BaseModel


class Named(BaseModel):
    name: str


@pytest.fixture
async def logger_process(settings):
    port = testing.free_port()
    env = dict(testing.settings_env(settings.replace(history_logger_port=port,
                                                     history_logger_metrics_port=testing.free_port())),
               HTTP_MAX_BODY_BYTES="100000")
    process = testing.ServiceProcess("history-logger", env).start()

    async def healthy():
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        await testing.eventually(healthy, 60, interval=0.2, message="history-logger healthy")
        yield f"http://127.0.0.1:{port}", process
    finally:
        await asyncio.to_thread(process.terminate)


async def test_ingest_refuses_a_body_above_the_limit_before_reading_it(logger_process):
    base, process = logger_process
    sample = {"node_uid": "nd-x", "zone_id": 1, "metric_type": "PH", "value": 6.1}
    big = orjson.dumps({"samples": [sample] * 3000})  # ~190 kB
    assert len(big) > 100_000

    async def chunks():  # no Content-Length: refused while reading
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        declared = await client.post("/ingest/telemetry", content=big, headers={"Content-Type": "application/json"})
        streamed = await client.post("/ingest/telemetry", content=chunks(),
                                     headers={"Content-Type": "application/json"})
        for response in (declared, streamed):
            assert (response.status_code, response.json()) == (
                413, {"detail": "request body is larger than 100000 bytes"})
        small = await client.post("/ingest/telemetry", json={"samples": [sample]})
        assert small.status_code != 413 and small.status_code < 500, small.text
        metrics = (await client.get("/metrics")).text
    assert 'http_guard_refused_total{reason="body_too_large"} 2.0' in metrics
    assert process.proc.poll() is None


@pytest.mark.parametrize("sample, field", [
    ({"metric_type": "PH", "value": 6.1, "zone_id": 2**63}, "samples.0.zone_id"),
    ({"metric_type": "PH\x00", "value": 6.1, "zone_id": 1}, "samples.0.metric_type"),
    ({"metric_type": "PH", "value": 6.1, "zone_id": 1, "node_uid": "nd\x00"}, "samples.0.node_uid"),
    ({"metric_type": "PH", "value": 6.1, "zone_id": 1, "raw": {"a": "\x00"}}, "samples.0.raw"),
    ({"metric_type": "PH", "value": 6.1, "zone_id": 1, "raw": {"n": 2**64}}, "samples.0.raw"),
])
async def test_ingest_refuses_values_postgresql_cannot_store_naming_the_field(logger_process, sample, field):
    base, process = logger_process
    import json
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        response = await client.post("/ingest/telemetry", content=json.dumps({"samples": [sample]}),
                                     headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["detail"].startswith(field)
        assert (await client.get("/health")).status_code == 200
    assert process.proc.poll() is None


def test_limits_come_from_the_environment_and_name_a_bad_value():
    assert HttpLimits.from_env({}) == HttpLimits(1_048_576, 15.0, 5)
    assert HttpLimits.from_env({"HTTP_MAX_BODY_BYTES": "2048", "HTTP_READ_TIMEOUT_SEC": "2.5",
                                "HTTP_KEEP_ALIVE_SEC": "30"}) == HttpLimits(2048, 2.5, 30)
    with pytest.raises(SettingsError, match="HTTP_MAX_BODY_BYTES"):
        HttpLimits.from_env({"HTTP_MAX_BODY_BYTES": "lots"})


async def test_any_fastapi_app_behind_http_server_answers_nan_with_a_json_422_and_bugs_with_a_kept_500():
    """The shared pieces every service gets (the registry's and the logger's apps included)."""
    from fastapi import FastAPI

    from common.service import HttpServer

    app = FastAPI()

    @app.post("/named")
    async def named(body: Named) -> dict:
        return {"name": body.name}

    @app.get("/bug")
    async def bug() -> dict:
        raise RuntimeError("a bug")

    port = testing.free_port()
    server = HttpServer(app, "127.0.0.1", port, HttpLimits(max_body_bytes=4096))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for raw in (b'{"name": NaN}', b'{"name": Infinity}', b'{"name": -Infinity}'):
                response = await client.post("/named", content=raw, headers={"Content-Type": "application/json"})
                assert response.status_code == 422, response.text
                assert response.json()["detail"][0]["loc"] == ["body", "name"]
            bug = await client.get("/bug")
            assert (bug.status_code, bug.json()) == (500, {"detail": "internal error"})
            assert (await client.post("/named", json={"name": "x" * 5000})).status_code == 413
            assert (await client.post("/named", json={"name": "ok"})).json() == {"name": "ok"}
    finally:
        await server.stop()
