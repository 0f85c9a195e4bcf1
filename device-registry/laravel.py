"""Optional forward of a node_hello to Laravel `POST /api/nodes/register` (contract §5.4 step 4, §7.3).

Token: LARAVEL_REGISTER_TOKEN, else LARAVEL_API_TOKEN, sent as `Authorization: Bearer` and `X-API-TOKEN`.
Retries with exponential backoff after a 5xx, a timeout or a connection error; none after a 4xx.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

import metrics
from common.env import Settings
from common.schemas import NodeHello

log = logging.getLogger("device_registry.laravel")


def register_body(hello: NodeHello, zone_id: int | None) -> dict[str, Any]:
    meta = hello.provisioning_meta
    return {
        "message_type": "node_hello",
        "hardware_id": hello.hardware_id,
        "node_type": hello.node_type,
        "fw_version": hello.fw_version,
        "hardware_revision": hello.hardware_revision,
        "capabilities": list(hello.capabilities),
        # zone_id as the integer Laravel compares with zones.id (never the "zn-3" string)
        "provisioning_meta": {"node_name": meta.node_name, "greenhouse_token": meta.greenhouse_token,
                              "zone_id": zone_id},
    }


class LaravelForwarder:
    def __init__(self, settings: Settings, retries: int, retry_base_sec: float):
        token = settings.laravel_register_token or settings.laravel_api_token
        headers = {"Accept": "application/json"}
        if token:
            headers.update({"Authorization": f"Bearer {token}", "X-API-TOKEN": token})
        self.url = f"{settings.laravel_api_url}/api/nodes/register"
        self.retries = retries
        self.retry_base_sec = retry_base_sec
        self.client = httpx.AsyncClient(timeout=settings.laravel_http_timeout_sec, headers=headers)

    async def forward(self, body: dict[str, Any]) -> bool:
        """True when Laravel accepted the hello (2xx)."""
        hardware_id = body.get("hardware_id")
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry_base_sec * 2 ** (attempt - 1))
            try:
                response = await self.client.post(self.url, json=body)
            except httpx.HTTPError as exc:
                outcome, detail = "unreachable", f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    metrics.LARAVEL_FORWARDS.labels("ok").inc()
                    return True
                if response.status_code < 500:
                    metrics.LARAVEL_FORWARDS.labels("refused").inc()
                    log.warning("laravel_register_refused", extra={"hardware_id": hardware_id,
                                                                   "status": response.status_code,
                                                                   "body": response.text[:300]})
                    return False
                outcome, detail = "server_error", f"HTTP {response.status_code}"
            log.info("laravel_register_retry", extra={"hardware_id": hardware_id, "attempt": attempt + 1,
                                                      "error": detail})
        metrics.LARAVEL_FORWARDS.labels(outcome).inc()
        log.warning("laravel_register_failed", extra={"hardware_id": hardware_id, "error": detail})
        return False

    async def close(self) -> None:
        await self.client.aclose()
