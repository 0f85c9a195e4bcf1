"""device-registry: node registration (node_hello), versioned NodeConfig storage and delivery.

MQTT: node_hello (both topics), config_response, status (re-deliver stale configs), config_request.
REST on REGISTRY_PORT (Bearer PY_API_TOKEN): nodes, zone assignment, rename, configs; /health /ready /metrics.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Awaitable

from api import build_app
from common.db import Database
from common.env import Settings, settings_or_exit
from common.mqtt import MqttClient
from common.lifecycle import drain_then_cancel
from common.service import HttpServer, ready_checks, run_service
from common.topics import Topics
from delivery import ConfigDelivery
from laravel import LaravelForwarder
from mqtt_handlers import RegistryHandlers
from registration import NewNodeLimit
from settings import ServiceSettings

log = logging.getLogger("device_registry")

STOP_GRACE_SEC = 15.0


class Registry:
    def __init__(self, settings: Settings, options: ServiceSettings):
        self.settings = settings
        self.options = options
        self.db = Database(settings)
        self.mqtt = MqttClient(settings, "-registry")
        self.topics = Topics(settings.mqtt_topic_root)
        self.delivery = ConfigDelivery(self.db, self.mqtt, self.topics, options.config_defaults(),
                                       options.republish_interval_sec, options.applied_events)
        self.forwarder = (LaravelForwarder(settings, options.laravel_retries, options.laravel_retry_base_sec)
                          if options.forward_hello else None)
        self.handlers = RegistryHandlers(self.db, self.mqtt, self.topics, self.delivery, self.forwarder, self.spawn,
                                         NewNodeLimit(options.new_nodes_per_min))
        self.app = build_app(self.db, self.delivery, settings.py_api_token, self.ready)
        self.http = HttpServer(self.app, settings.http_host, settings.registry_port)
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Background work (Laravel forwards) that stop() waits for."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", exc_info=task.exception())

    async def ready(self) -> dict[str, bool]:
        return await ready_checks(db=self.db, mqtt=self.mqtt)

    async def start(self) -> None:
        if not self.settings.py_api_token:
            log.warning("api_token_missing", extra={"detail": "PY_API_TOKEN is not set: the REST API refuses all"})
        await self.db.connect()
        await self.handlers.subscribe()
        await self.mqtt.start()
        await self.http.start()
        log.info("registry_started", extra={"port": self.settings.registry_port,
                                            "forward_hello": self.options.forward_hello})

    async def stop(self) -> None:
        await self.http.stop()
        await self.mqtt.stop(drain=True)
        await drain_then_cancel(set(self._tasks), STOP_GRACE_SEC)
        if self.forwarder is not None:
            await self.forwarder.close()
        await self.db.close()


def build(settings: Settings, options: ServiceSettings | None = None) -> Registry:
    options = options or settings_or_exit(lambda: ServiceSettings.from_env(settings))
    return Registry(settings, options)


if __name__ == "__main__":
    sys.exit(run_service("device-registry", build))
