"""Optional forward of node_hello to Laravel /api/nodes/register, against a small real HTTP server."""
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from common import testing
from common.schemas import NodeHello
from common.service import HttpServer
from laravel import LaravelForwarder, register_body
from testing import FakeNode, make_zone, metric, start_registry, wait_node


class FakeLaravel:
    """Answers /api/nodes/register with the scripted status codes (the last one repeats)."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.requests: list[tuple[dict, dict]] = []
        self.port = testing.free_port()
        app = FastAPI()

        @app.post("/api/nodes/register")
        async def register(request: Request):
            self.requests.append((dict(request.headers), await request.json()))
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            if status == 201:
                return JSONResponse({"status": "ok", "data": {}}, status_code=201)
            return JSONResponse({"message": "nope"}, status_code=status)

        self.server = HttpServer(app, "127.0.0.1", self.port)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def laravel():
    servers = []

    async def start(*statuses):
        server = FakeLaravel(statuses)
        await server.server.start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        await server.server.stop()


HELLO = NodeHello.model_validate({"message_type": "node_hello", "hardware_id": "esp32-a1b2c3d4e5f6",
                                  "node_type": "ph", "provisioning_meta": {"greenhouse_token": "gh-1",
                                                                          "zone_id": "zn-3"}})


async def test_retries_server_errors_then_succeeds(settings, laravel):
    server = await laravel(500, 503, 201)
    s = settings.replace(laravel_api_url=server.url, laravel_api_token="api-token", laravel_register_token="")
    forwarder = LaravelForwarder(s, retries=3, retry_base_sec=0.01)
    try:
        assert await forwarder.forward(register_body(HELLO, 3)) is True
    finally:
        await forwarder.close()
    assert len(server.requests) == 3
    headers, body = server.requests[-1]
    assert headers["authorization"] == "Bearer api-token" and headers["x-api-token"] == "api-token"
    assert body == {"message_type": "node_hello", "hardware_id": "esp32-a1b2c3d4e5f6", "node_type": "ph",
                    "fw_version": None, "hardware_revision": None, "capabilities": [],
                    "provisioning_meta": {"node_name": None, "greenhouse_token": "gh-1", "zone_id": 3}}


async def test_client_error_is_not_retried_and_register_token_wins(settings, laravel):
    server = await laravel(422)
    s = settings.replace(laravel_api_url=server.url, laravel_api_token="api", laravel_register_token="reg")
    forwarder = LaravelForwarder(s, retries=3, retry_base_sec=0.01)
    refused = metric("registry_laravel_register_total", result="refused")
    try:
        assert await forwarder.forward(register_body(HELLO, None)) is False
    finally:
        await forwarder.close()
    assert len(server.requests) == 1 and server.requests[0][0]["authorization"] == "Bearer reg"
    assert metric("registry_laravel_register_total", result="refused") == refused + 1


async def test_unreachable_laravel_gives_up_after_the_retries(settings):
    s = settings.replace(laravel_api_url=f"http://127.0.0.1:{testing.free_port()}", laravel_http_timeout_sec=1.0)
    forwarder = LaravelForwarder(s, retries=2, retry_base_sec=0.01)
    before = metric("registry_laravel_register_total", result="unreachable")
    try:
        assert await forwarder.forward(register_body(HELLO, None)) is False
    finally:
        await forwarder.close()
    assert metric("registry_laravel_register_total", result="unreachable") == before + 1


async def test_registry_registers_itself_and_forwards_when_switched_on(settings, db, laravel):
    server = await laravel(500, 201)
    zone_id = await make_zone(db)
    service = await start_registry(settings.replace(laravel_api_url=server.url, laravel_register_token="reg"),
                                   {"REGISTRY_FORWARD_HELLO": "1", "REGISTRY_LARAVEL_RETRY_BASE_SEC": "0.01"})
    try:
        node = FakeNode(service.settings)
        node.hello(topic=f"{service.settings.mqtt_topic_root}/gh-1/zn-{zone_id}/node-temp/node_hello")
        row = await wait_node(db)  # registered in the database whatever Laravel answers
        assert row["zone_id"] == zone_id

        async def forwarded():
            return len(server.requests) == 2
        await testing.eventually(forwarded, 15, message="hello forwarded after one retry")
        assert server.requests[-1][1]["provisioning_meta"]["zone_id"] == zone_id
        assert server.requests[-1][1]["hardware_id"] == node.hardware_id
    finally:
        await service.stop()
