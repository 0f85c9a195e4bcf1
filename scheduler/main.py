"""scheduler: irrigation and lighting from recipe-phase time specs, and the water-change cycle.

`python main.py` from this folder with the repository root on PYTHONPATH. Ops HTTP (/health,
/ready, /metrics) on SCHEDULER_PORT (9402). One MQTT client (`-scheduler`), publish only.
"""
from __future__ import annotations

import asyncio
import logging
import sys

from common.db import Database
from common.env import Settings, settings_or_exit
from common.mqtt import MqttClient
from common.lifecycle import drain_then_cancel
from common.service import HttpServer, ops_app, ready_checks, run_service
from common.topics import Topics
from actuators import CommandSender
from engine import Scheduler
from settings import ServiceSettings

log = logging.getLogger("scheduler")

STOP_GRACE_SEC = 30.0   # for the tick in progress to execute what it claimed


class SchedulerService:
    def __init__(self, settings: Settings, options: ServiceSettings):
        self.settings, self.options = settings, options
        self.db = Database(settings)
        self.mqtt = MqttClient(settings, "-scheduler")
        self.scheduler = Scheduler(settings, options, self.db,
                                   CommandSender(self.db, self.mqtt, Topics(settings.mqtt_topic_root)))
        self.http = HttpServer(ops_app(self.ready, "scheduler"), settings.http_host, settings.scheduler_port)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def ready(self) -> dict[str, bool]:
        return await ready_checks(db=self.db, mqtt=self.mqtt)

    async def start(self) -> None:
        await self.db.connect()
        await self.mqtt.start()
        await self.http.start()
        self._tasks = [asyncio.create_task(self.scheduler.tick_loop(self._stopping), name="scheduler-tick"),
                       asyncio.create_task(self.scheduler.followup_loop(self._stopping), name="scheduler-followups")]
        log.info("scheduler_started", extra={"interval_sec": self.options.interval_sec,
                                             "catchup_sec": self.options.catchup_sec})

    async def stop(self) -> None:
        """Let the tick in progress finish (its claimed firings are executed), then close."""
        self._stopping.set()
        await drain_then_cancel(self._tasks, STOP_GRACE_SEC)
        self._tasks = []
        await self.http.stop()
        await self.mqtt.stop()
        await self.db.close()


def build(settings: Settings, options: ServiceSettings | None = None) -> SchedulerService:
    options = options or settings_or_exit(lambda: ServiceSettings.from_env(settings))
    return SchedulerService(settings, options)


if __name__ == "__main__":
    sys.exit(run_service("scheduler", build))
