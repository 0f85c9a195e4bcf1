"""scheduler: irrigation and lighting from recipe-phase time specs, and the water-change cycle.

`python main.py` from this folder with the repository root on PYTHONPATH. Ops HTTP (/health,
/ready, /metrics) on SCHEDULER_PORT (9402). One MQTT client (`-scheduler`), publish only.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from common.db import Database
from common.env import Settings, settings_or_exit
from common.mqtt import MqttClient
from common.service import HttpServer, ops_app, run_service
from common.topics import Topics
from actuators import CommandSender
from settings import SchedulerConfig
from engine import Clock, Scheduler, system_clock

log = logging.getLogger("scheduler")


class SchedulerService:
    def __init__(self, settings: Settings, config: SchedulerConfig, clock: Clock = system_clock,
                 run_loops: bool = True):
        self.settings, self.config = settings, config
        self.db = Database(settings)
        self.mqtt = MqttClient(settings, "-scheduler")
        self.scheduler = Scheduler(settings, config, self.db, CommandSender(self.db, self.mqtt,
                                                                            Topics(settings.mqtt_topic_root)),
                                   clock=clock)
        self.http = HttpServer(ops_app(self.ready, "scheduler"), settings.http_host, settings.scheduler_port)
        self.run_loops = run_loops
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def ready(self) -> dict[str, bool]:
        return {"db": await self.db.ping(), "mqtt": self.mqtt.connected}

    async def start(self) -> None:
        self.settings.require_secrets()
        await self.db.connect()
        await self.mqtt.start()
        await self.http.start()
        if self.run_loops:
            self._tasks = [asyncio.create_task(self.scheduler.tick_loop(self._stopping), name="scheduler-tick"),
                           asyncio.create_task(self.scheduler.followup_loop(self._stopping),
                                               name="scheduler-followups")]
        log.info("scheduler_started", extra={"interval_sec": self.config.interval_sec,
                                             "catchup_sec": self.config.catchup_sec})

    async def stop(self) -> None:
        """Let the tick in progress finish (its claimed firings are executed), then close."""
        self._stopping.set()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=30)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._tasks = []
        await self.http.stop()
        await self.mqtt.stop()
        await self.db.close()


def build(settings: Settings) -> SchedulerService:
    return SchedulerService(settings, settings_or_exit(SchedulerConfig.from_env))


if __name__ == "__main__":
    sys.exit(run_service("scheduler", build))
