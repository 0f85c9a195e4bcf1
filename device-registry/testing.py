"""Helpers the registry's tests import: the service on the test's own settings, a test "node", zones.

The node is a plain paho publisher (what a firmware node sends); what the registry publishes is seen
through the root `mqtt_probe` fixture, subscribed to the whole topic root.
"""
from __future__ import annotations

import asyncio
import json

import orjson
from prometheus_client import REGISTRY

import main
from common import testing
from settings import ServiceSettings

TOKEN = "registry-test-token"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class FakeNode:
    """A firmware node: node_hello, status, config_response, config_request."""

    def __init__(self, settings, hardware_id: str = "esp32-a1b2c3d4e5f6", node_type: str = "ph"):
        self.settings = settings
        self.root = settings.mqtt_topic_root
        self.hardware_id = hardware_id
        self.node_type = node_type

    def publish(self, topic: str, payload, retain: bool = False) -> None:
        if isinstance(payload, (bytes, str)):
            data = payload
        else:
            try:
                data = orjson.dumps(payload)
            except TypeError:  # integers beyond 64 bits, which nodes may send
                data = json.dumps(payload).encode()
        testing.publish_sync(self.settings.mqtt_host, self.settings.mqtt_port, [(topic, data, 1, retain)])

    def hello_payload(self, **changes) -> dict:
        meta = changes.pop("meta", {})
        payload = {"message_type": "node_hello", "hardware_id": self.hardware_id, "node_type": self.node_type,
                   "fw_version": "v5.1.2", "hardware_revision": "v1.0", "capabilities": ["ph", "temperature"],
                   "provisioning_meta": {"greenhouse_token": None, "zone_id": None, "node_name": None, **meta}}
        payload.update(changes)
        return payload

    def hello(self, topic: str | None = None, **changes) -> None:
        self.publish(topic or f"{self.root}/node_hello", self.hello_payload(**changes))

    def node_topic(self, gh: str, zone_id: int | str, uid: str, kind: str) -> str:
        zone = zone_id if isinstance(zone_id, str) else f"zn-{zone_id}"
        return f"{self.root}/{gh}/{zone}/{uid}/{kind}"

    def status(self, gh: str, zone_id, uid: str, status: str = "ONLINE") -> None:
        self.publish(self.node_topic(gh, zone_id, uid, "status"), {"status": status, "ts": 12}, retain=True)

    def config_response(self, gh: str, zone_id, uid: str, status: str = "OK", **fields) -> None:
        self.publish(self.node_topic(gh, zone_id, uid, "config_response"), {"status": status, **fields})


async def wait_subscribed(settings) -> None:
    """Subscriptions are sent in order; once the last one (config_request) answers, all are active."""
    node = FakeNode(settings)
    label = dict(kind="config_request", reason="unknown_node")

    async def answered():
        before = metric("registry_messages_ignored_total", **label)
        node.publish(f"{settings.mqtt_topic_root}/gh-probe/config_request", {"node_id": "nobody"})
        for _ in range(20):
            if metric("registry_messages_ignored_total", **label) > before:
                return True
            await asyncio.sleep(0.05)
        return False

    await testing.eventually(answered, timeout=20, message="registry subscriptions active")


async def start_registry(settings, environ: dict | None = None, token: str = TOKEN):
    s = settings.replace(registry_port=testing.free_port(), py_api_token=token, mqtt_clean_session=True,
                         http_host="127.0.0.1")
    service = main.build(s, ServiceSettings.from_env(s, environ or {}))
    await service.start()
    await service.mqtt.wait_connected(15)
    await wait_subscribed(s)
    return service


async def make_zone(db, gh_uid: str = "gh-1") -> int:
    return await testing.seed_zone(db, await testing.seed_greenhouse(db, gh_uid, "Main"), "Zone")


async def node_row(db, hardware_id: str = "esp32-a1b2c3d4e5f6"):
    return await db.fetchrow("SELECT * FROM nodes WHERE hardware_id = $1", hardware_id)


async def wait_node(db, hardware_id: str = "esp32-a1b2c3d4e5f6", check=lambda row: True, timeout: float = 15):
    async def found():
        row = await node_row(db, hardware_id)
        return row if row is not None and check(row) else None
    return await testing.eventually(found, timeout, message=f"node {hardware_id}")
