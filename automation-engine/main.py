"""automation-engine: the periodic zone controller (contract §8).

Every AUTOMATION_INTERVAL_SEC: configuration (Laravel → DB → last good), eligible zones, one
batched read, controllers per zone in parallel (engine.py). A message on the Redis channel
`<prefix>config:changed` (published by the bridge on Laravel's zone-updated call) starts the
next cycle early. Ops HTTP on AUTOMATION_PORT: /health, /ready, /metrics.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time

from common.db import Database
from common.env import Settings, settings_or_exit
from common.infra_watch import ConnectionWatch
from common.mqtt import MqttClient
from common.redis_client import CONFIG_CHANGED_CHANNEL, key, redis_client
from common.lifecycle import cancel_tasks
from common.service import HttpServer, ops_app, ready_checks, run_service
from common.topics import Topics
from actions import Services
from config_source import ConfigLoader
from engine import Engine
import metrics as m
from settings import ServiceSettings

log = logging.getLogger("automation.main")


class AutomationService:
    def __init__(self, settings: Settings, options: ServiceSettings):
        self.settings = settings
        self.options = options
        self.db = Database(settings)
        self.mqtt = MqttClient(settings, "-auto")
        self.services = Services(self.db, self.mqtt, Topics(settings.mqtt_topic_root), settings, options)
        self.config = ConfigLoader(settings, self.db)
        self.engine = Engine(self.services, self.config)
        self.http = HttpServer(ops_app(self.ready, "automation-engine"), settings.http_host, settings.automation_port)
        self.redis = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task | None = None
        self._listen_task: asyncio.Task | None = None
        self.watch = ConnectionWatch("automation-engine", self.db, self.mqtt, after_sec=options.infra_alert_after_sec)
        self._watch_task: asyncio.Task | None = None
        self._cycles_ok = 0

    async def ready(self) -> dict[str, bool]:
        return await ready_checks(db=self.db, mqtt=self.mqtt)

    async def start(self) -> None:
        await self.db.connect()
        await self.mqtt.start(wait=None)
        await self.http.start()
        self.redis = redis_client(self.settings)
        self._listen_task = asyncio.create_task(self._listen(), name="automation-config-signal")
        self._loop_task = asyncio.create_task(self._loop(), name="automation-loop")
        self._watch_task = asyncio.create_task(self.watch.run(), name="automation-connection-watch")
        gc.collect()
        gc.freeze()  # what start-up built lives as long as the service: collections need not walk it again

    async def stop(self) -> None:
        """Let the running cycle finish (in-flight commands and writes), then close everything."""
        self._stopping = True
        self._wake.set()
        if self._loop_task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await cancel_tasks([t for t in (self._listen_task, self._watch_task) if t])
        if self.redis is not None:
            await self.redis.aclose()
        await self.config.close()
        await self.http.stop()
        await self.mqtt.stop()
        await self.db.close()

    async def _loop(self) -> None:
        interval = self.options.interval_sec
        with contextlib.suppress(asyncio.TimeoutError):  # a first cycle without the broker would only refuse
            await self.mqtt.wait_connected(5.0)
        while not self._stopping:
            started = time.monotonic()
            self._wake.clear()
            try:
                await self.engine.run_cycle()
                self._cycles_ok += 1
            except Exception:  # noqa: BLE001 - a failed cycle (DB down, ...) is retried next interval
                m.CYCLES.labels("failed").inc()
                log.exception("cycle_failed")
            remaining = interval - (time.monotonic() - started)
            if self._stopping:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(remaining, 0.0))
            if self._wake.is_set() and not self._stopping:
                # early reload: no faster than CONFIG_RELOAD_MIN_SEC after the last cycle began
                gap = self.options.config_reload_min_sec - (time.monotonic() - started)
                if gap > 0:
                    await asyncio.sleep(gap)

    async def _listen(self) -> None:
        """Wake the loop on every config-changed message; resubscribe after Redis errors."""
        channel = key(self.settings, CONFIG_CHANGED_CHANNEL)
        warned = False
        while not self._stopping:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(channel)
                if warned:
                    log.info("config_signal_available")
                warned = False
                while not self._stopping:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        m.CONFIG_RELOAD_SIGNALS.inc()
                        log.info("config_changed_signal", extra={"payload": str(message.get("data"))[:200]})
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down: the loop still runs on its interval
                if not warned:
                    log.warning("config_signal_unavailable", extra={"error": str(exc)})
                    warned = True
                await asyncio.sleep(2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


def build(settings: Settings, options: ServiceSettings | None = None) -> AutomationService:
    options = options or settings_or_exit(lambda: ServiceSettings.from_env(settings))
    return AutomationService(settings, options)


if __name__ == "__main__":
    sys.exit(run_service("automation-engine", build))
