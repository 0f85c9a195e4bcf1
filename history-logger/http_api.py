"""HTTP on :9300 — `POST /ingest/telemetry` (contract §7.2) plus /health, /ready, /metrics.

Samples take the same path as MQTT telemetry: validated and normalised here, appended to the
Redis stream (answer 200 once they are durable there), written by the same writer.
"""
from __future__ import annotations

import asyncio
import time

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from common.schemas import IngestRequest, describe_error
from common.service import ReadyCheck, add_ops_routes

import metrics as m
import telemetry_parse as tp
from receiver import Receiver, Stopping

APPEND_TIMEOUT_SEC = 10.0
DEAD_LETTERED = {"out_of_range"}  # refused readings of a well-formed request: dead-lettered, not a 400


def build_app(receiver: Receiver, ready: ReadyCheck) -> FastAPI:
    app = FastAPI(title="history-logger", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/ingest/telemetry")
    async def ingest_telemetry(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            parsed = IngestRequest.model_validate_json(body)
        except ValidationError as exc:
            m.INVALID.labels("http_invalid").inc()
            return JSONResponse({"detail": describe_error(exc)}, status_code=400)
        received_at = time.time()
        m.RECEIVED.inc(len(parsed.samples))
        samples, dead, rejected = [], [], []
        for index, sample in enumerate(parsed.samples):
            try:
                samples.append(tp.from_ingest(sample, received_at))
            except tp.Rejected as exc:
                if exc.reason in DEAD_LETTERED:  # a reading that cannot be true: set aside, the others land
                    dead.append(receiver.dead_entry(exc, "http:/ingest/telemetry",
                                                    orjson.dumps(sample.model_dump(mode="json"))))
                    rejected.append({"index": index, "reason": exc.reason, "detail": exc.detail})
                    continue
                m.INVALID.labels(exc.reason).inc()
                return JSONResponse({"detail": f"samples.{index}: {exc.detail}"}, status_code=400)
        try:
            count = await asyncio.wait_for(asyncio.shield(receiver.append(samples, dead, [], [])), APPEND_TIMEOUT_SEC)
        except (asyncio.TimeoutError, Stopping):
            return JSONResponse({"detail": "telemetry queue unavailable, retry later"}, status_code=503)
        body = {"status": "ok", "count": count}
        if rejected:
            body["rejected"] = rejected
        return JSONResponse(body)

    return add_ops_routes(app, ready)
