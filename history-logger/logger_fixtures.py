"""Test helpers of history-logger: a running service on the test's settings, seed rows, publishing."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from common import testing
from common.db import Database
from common.env import Settings
from common.redis_client import redis_client
from common.testing import drop_redis_keys  # noqa: F401 - the tests take it from here

import logger_metrics as m
from logger_settings import LoggerSettings
from main import HistoryLogger


def fast_settings(settings: Settings, **changes) -> Settings:
    return settings.replace(history_logger_port=testing.free_port(), history_logger_metrics_port=testing.free_port(),
                            telemetry_flush_ms=50, **changes)


async def start_logger(settings: Settings, **env: str) -> HistoryLogger:
    service = HistoryLogger(settings, LoggerSettings.from_env(settings, env))
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


@pytest.fixture
async def logger(settings):
    s = fast_settings(settings)
    service = await start_logger(s)
    yield service
    await service.stop()
    await drop_redis_keys(s)


async def seed(db: Database, *, node_uid: str = "nd-ph-1", zone: bool = True, validated: bool = True,
               status: str = "online", last_seen_sql: str = "now()") -> dict:
    gh = await db.fetchval("INSERT INTO greenhouses (uid, name) VALUES ($1, 'GH') ON CONFLICT (uid) DO UPDATE"
                           " SET name = EXCLUDED.name RETURNING id", "gh-1")
    zone_id = await db.fetchval("INSERT INTO zones (greenhouse_id, name) VALUES ($1, 'Zone') RETURNING id", gh) \
        if zone else None
    node_id = await db.fetchval(
        f"INSERT INTO nodes (uid, zone_id, validated, status, last_seen_at, lifecycle_state)"
        f" VALUES ($1, $2, $3, $4, {last_seen_sql}, 'ACTIVE') RETURNING id", node_uid, zone_id, validated, status)
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
