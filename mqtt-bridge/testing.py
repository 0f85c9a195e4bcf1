"""Helpers the bridge's tests import: a running bridge on the test's settings, with its token."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import httpx

from common.testing import free_port

from main import build
from settings import ServiceSettings

TOKEN = "bridge-test-token"
FAST = ServiceSettings(max_body_bytes=65_536, retry_after_sec=5, routine_poll_sec=0.05, flow_settle_sec=0.3,
                       task_keep_sec=60, max_tasks=100)


@contextlib.asynccontextmanager
async def running_bridge(settings, token: str = TOKEN, options: ServiceSettings = FAST, wait_mqtt: bool = True):
    for attempt in range(5):  # another process may take the free port before uvicorn binds it
        settings = settings.replace(bridge_port=free_port(), py_api_token=token, http_host="127.0.0.1")
        service = build(settings, options)
        try:
            await service.start()
            break
        except RuntimeError:
            if attempt == 4:
                raise
    if wait_mqtt:
        await service.mqtt.wait_connected(10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.bridge_port}", headers=headers, timeout=30)
    try:
        yield SimpleNamespace(service=service, http=client, settings=settings,
                              root=settings.mqtt_topic_root)
    finally:
        await client.aclose()
        await service.stop()
