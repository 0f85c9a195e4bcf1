"""Test helpers of history-logger: a running service on the test's settings, seed rows, publishing."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import orjson

from common import testing
from common.db import Database
from common.env import Settings
from common.redis_client import redis_client
from common.testing import Sql, seed_greenhouse, seed_node, seed_zone

import metrics as m
from main import HistoryLogger
from settings import ServiceSettings


def fast_settings(settings: Settings, **changes) -> Settings:
    return settings.replace(history_logger_port=testing.free_port(), history_logger_metrics_port=testing.free_port(),
                            telemetry_flush_ms=50, **changes)


async def start_logger(settings: Settings, **env: str) -> HistoryLogger:
    service = HistoryLogger(settings, ServiceSettings.from_env(settings, env))
    await service.start()
    await service.mqtt.wait_connected(15)
    await wait_subscribed(service)
    return service


async def wait_subscribed(service: HistoryLogger, timeout: float = 10.0) -> None:
    """Publish a harmless status for an unknown node until the service has seen one."""
    s = service.settings
    topic = f"{s.mqtt_topic_root}/gh-warm/zn-0/warmup-{testing.unique_id('')}/status"
    before = _count(service)
    deadline = time.monotonic() + timeout
    while _count(service) == before:
        if time.monotonic() > deadline:
            raise AssertionError("history-logger did not receive anything after subscribing")
        await asyncio.to_thread(testing.publish_sync, s.mqtt_host, s.mqtt_port, [(topic, b'{"status":"ONLINE"}', 1, False)])
        await asyncio.sleep(0.2)


def _count(service: HistoryLogger) -> float:
    return m.STATUS.labels("status")._value.get()


async def seed(db: Database, *, node_uid: str = "nd-ph-1", zone: bool = True, validated: bool = True,
               status: str = "online", last_seen_sql: str = "now()") -> dict:
    """Greenhouse gh-1, a new zone in it (unless zone=False) and an active node there."""
    gh = await seed_greenhouse(db)
    zone_id = await seed_zone(db, gh) if zone else None
    node_id = await seed_node(db, node_uid, zone_id, validated=validated, status=status,
                              last_seen_at=Sql(last_seen_sql), lifecycle_state="ACTIVE")
    return {"gh_id": gh, "zone_id": zone_id, "node_id": node_id, "node_uid": node_uid}


async def dead_letters(settings: Settings) -> list[dict]:
    """The dead-letter stream's entries, field names decoded."""
    client = redis_client(settings)
    try:
        entries = await client.xrange(f"{settings.redis_key_prefix}telemetry:dead")
    finally:
        await client.aclose()
    return [{k.decode(): v for k, v in fields.items()} for _, fields in entries]


def publish(settings: Settings, items: list[tuple[str, object]], retain: bool = False) -> None:
    msgs = [(t, p if isinstance(p, (bytes, str)) else orjson.dumps(p), 1, retain) for t, p in items]
    testing.publish_sync(settings.mqtt_host, settings.mqtt_port, msgs)


async def apublish(settings: Settings, items: list[tuple[str, object]], retain: bool = False) -> None:
    await asyncio.to_thread(publish, settings, items, retain)


async def count_rows(db: Database, sql: str = "SELECT count(*) FROM telemetry_samples", *args) -> int:
    return await db.fetchval(sql, *args)


async def wait_rows(db: Database, n: int, timeout: float = 20.0, sql: str = "SELECT count(*) FROM telemetry_samples",
                    *args) -> int:
    async def enough():
        got = await db.fetchval(sql, *args)
        return got if got >= n else None
    return await testing.eventually(enough, timeout, 0.1, message=f"{n} rows ({sql})")


def telemetry_messages(settings, ids, start: int, count: int) -> list[tuple[str, bytes, int, bool]]:
    topic = f"{settings.mqtt_topic_root}/gh-1/zn-{ids['zone_id']}/{ids['node_uid']}/ph_sensor/telemetry"
    now_ms = int(time.time() * 1000)
    return [(topic, orjson.dumps({"metric": "PH", "value": 6.0, "seq": i, "ts": now_ms + i}), 1, False)
            for i in range(start, start + count)]


class Publisher(threading.Thread):
    """Publishes `total` numbered readings in chunks, each chunk acknowledged by the broker."""

    def __init__(self, settings, ids, total: int, chunk: int = 100, pause: float = 0.05):
        super().__init__(daemon=True)
        self.settings, self.ids, self.total, self.chunk, self.pause = settings, ids, total, chunk, pause
        self.sent = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while self.sent < self.total:
                n = min(self.chunk, self.total - self.sent)
                testing.publish_sync(self.settings.mqtt_host, self.settings.mqtt_port,
                                     telemetry_messages(self.settings, self.ids, self.sent, n))
                self.sent += n
                time.sleep(self.pause)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


async def assert_exactly(db, total: int) -> None:
    row = await db.fetchrow("SELECT count(*) AS n, count(DISTINCT (raw->>'seq')::int) AS d,"
                            " min((raw->>'seq')::int) AS lo, max((raw->>'seq')::int) AS hi FROM telemetry_samples")
    assert (row["n"], row["d"], row["lo"], row["hi"]) == (total, total, 0, total - 1)


async def wait_published(pub: Publisher, timeout: float = 60) -> None:
    await asyncio.to_thread(pub.join, timeout)
    assert pub.error is None and pub.sent == pub.total


def writer_pid(service_pid: int) -> int | None:
    """The telemetry writer process of the service process `service_pid` (None while it has none)."""
    for child in testing.child_pids(service_pid):
        try:
            if b"writer_process.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except FileNotFoundError:  # exited meanwhile
            pass
    return None
