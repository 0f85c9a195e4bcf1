"""history-logger: node → backend MQTT traffic into PostgreSQL, through a Redis stream.

MQTT (QoS1, persistent session, manual PUBACK) → receiver (validate, normalise) → Redis
streams (PUBACK only after the append) → writers (consumer groups; XACK only after COMMIT; the
telemetry writer is a process of its own, writer_process.py) → PostgreSQL. HTTP :9300 ingest +
ops, :9301 metrics. See README.md.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time

from common.db import Database
from common.env import Settings, settings_or_exit
from common.mqtt import MqttClient
from common.redis_client import REDIS_TRANSIENT, redis_client
from common.service import HttpServer, ops_app, ready_checks, run_service
from common.topics import Topics

import http_api
from housekeeping import Housekeeping, prune_streams
from node_events import NodeEvents
from receiver import Receiver, subscribe
from replicas import Replicas
from settings import ServiceSettings
from stream_consumer import StreamConsumer
from streams import StreamKeys
from writer_process import WriterProcess

log = logging.getLogger("history_logger")

EVENTS_BATCH = 500


class HistoryLogger:
    def __init__(self, settings: Settings, options: ServiceSettings):
        self.settings = settings
        self.options = options
        self.db = Database(settings)
        self.redis = redis_client(settings, resend=False)  # its appends retry themselves, exactly once
        self.keys = StreamKeys(settings)
        self.topics = Topics(settings.mqtt_topic_root)
        self.receiver = Receiver(settings, options, self.redis, self.keys)
        self.mqtt = MqttClient(settings, "-logger", manual_ack=True)
        self.writer = WriterProcess(settings, options, self.receiver.note_queued)
        self.events = NodeEvents(settings, self.db, self.keys.events, self.redis, self.keys.dead,
                                 options.dead_letter_max)
        self.events_consumer = StreamConsumer(
            self.redis, self.keys.events, self.keys.group, options.consumer, self.events.handle,
            count=EVENTS_BATCH, block_ms=settings.telemetry_flush_ms, claim_idle_ms=options.claim_idle_ms,
            name="events")
        self.housekeeping = Housekeeping(
            self.db, options, settings.command_timeout_sec, settings.node_offline_timeout_sec,
            lambda: prune_streams(self.db, self.redis, [self.keys.telemetry, self.keys.events], self.keys.group),
            self.listening)
        self.api = HttpServer(http_api.build_app(self.receiver, self.ready), settings.http_host,
                              settings.history_logger_port)
        self.replicas = Replicas(settings, options, self.redis, self.receiver) if settings.mqtt_shared_group else None
        self.metrics_http = HttpServer(ops_app(self.ready, "history-logger metrics"), settings.http_host,
                                       settings.history_logger_metrics_port)

    async def ready(self) -> dict[str, bool]:
        checks = await ready_checks(db=self.db, redis=self.redis)
        # connected is not enough: the dispatcher that hands messages to the receiver must run too
        return {**checks, "mqtt": self.mqtt.connected and self.mqtt.dispatching, "writer": self.writer.alive}

    async def _others_alive(self) -> bool:
        try:
            return await self.replicas.others_alive()
        except REDIS_TRANSIENT:
            return False  # cannot tell: keep the session (a live replica rescues it if needed)

    async def listening(self) -> tuple[float, float] | None:
        """(since, until): every message received from `since` (this MQTT connection) up to `until`
        is in PostgreSQL; None while not connected or while input is held (see housekeeping.py)."""
        since = self.mqtt.connected_since
        if since is None or not self.mqtt.dispatching or self.receiver.stalled_since is not None:
            return None
        until = time.time()
        for stream in (self.keys.events, self.keys.telemetry):  # acknowledged entries are deleted:
            first = await self.redis.xrange(stream, count=1)    # what is left is not written yet
            if first:
                until = min(until, int(first[0][0].split(b"-")[0]) / 1000)
        return since, until

    async def start(self) -> None:
        await self.db.connect(wait=False)  # lazy: telemetry keeps queueing in Redis while PostgreSQL is down
        try:
            await self.receiver.refresh_queue_len()
        except REDIS_TRANSIENT as exc:
            log.warning("redis_unavailable_at_start", extra={"error": str(exc)})
        self.writer.start()
        self.events_consumer.start()
        self.housekeeping.start()
        await self.api.start()
        await self.metrics_http.start()
        group = self.settings.mqtt_shared_group
        if self.replicas is not None:
            await self.replicas.start()
        await subscribe(self.mqtt, self.receiver)
        await self.mqtt.start()
        log.info("history_logger_started", extra={"consumer": self.options.consumer, "shared_group": group or None})

    async def stop(self) -> None:
        end_session = False
        if self.replicas is not None and self.mqtt.connected and await self._others_alive():
            # the others take our share from now on: no new message for us, handle what came, end the session
            try:
                await self.mqtt.unsubscribe_all()
                end_session = await self.mqtt.quiet(0.5, timeout=15)
            except asyncio.TimeoutError:  # keep the session: a live replica rescues it
                log.warning("replica_handover_failed")
        self.receiver.stopping = True
        await self.mqtt.stop(drain=True, end_session=end_session)  # what was received is appended and acknowledged
        if self.replicas is not None:
            await self.replicas.stop(session_ended=end_session)
        await self.api.stop()
        await self.writer.stop()                  # the batch in hand is written and acknowledged
        await self.events_consumer.stop()
        await self.housekeeping.stop()
        await self.metrics_http.stop()
        await self.redis.aclose()
        await self.db.close()


def build(settings: Settings, options: ServiceSettings | None = None) -> HistoryLogger:
    options = options or settings_or_exit(lambda: ServiceSettings.from_env(settings))
    return HistoryLogger(settings, options)


if __name__ == "__main__":
    sys.exit(run_service("history-logger", build))
