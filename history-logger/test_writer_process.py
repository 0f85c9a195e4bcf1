"""The telemetry writer runs in a process of its own: killed, it is started again and nothing is
lost or written twice; what it counts reaches the service's /metrics."""
import asyncio
import os
import signal

import httpx

from common import testing

import metrics as m
from testing import Publisher, assert_exactly, seed, telemetry_messages, wait_published, wait_rows


async def test_a_killed_writer_is_started_again_and_nothing_is_lost_or_doubled(logger, db):
    ids = await seed(db)
    restarts = m.WRITER_RESTARTS._value.get()
    first = logger.writer.proc.pid
    pub = Publisher(logger.settings, ids, 3000, chunk=100, pause=0.02)
    pub.start()
    await wait_rows(db, 500, 60)
    os.kill(first, signal.SIGKILL)  # anywhere between reading a batch, its COMMIT and its XACK
    await testing.eventually(lambda: _running_again(logger, first), 20)
    await wait_published(pub)
    await wait_rows(db, 3000, 60)
    await asyncio.sleep(1.0)  # anything still arriving would be a duplicate
    await assert_exactly(db, 3000)
    assert m.WRITER_RESTARTS._value.get() == restarts + 1
    assert (await logger.ready())["writer"] is True


async def _running_again(logger, old_pid: int) -> bool:
    return logger.writer.alive and logger.writer.proc.pid != old_pid


async def test_what_the_writer_counts_reaches_the_service_once(logger, db):
    ids = await seed(db)
    inserted, lag_count = m.INSERTED._value.get(), _histogram_count(m.COMMIT_LAG)
    unknown = m.DROPPED.labels("unknown_node")._value.get()
    s = logger.settings
    ghost = (f"{s.mqtt_topic_root}/gh-1/zn-{ids['zone_id']}/nd-ghost/ph_sensor/telemetry", b'{"metric":"PH","value":6}',
             1, False)
    await asyncio.to_thread(testing.publish_sync, s.mqtt_host, s.mqtt_port,
                            telemetry_messages(s, ids, 0, 50) + [ghost])
    await wait_rows(db, 50)
    await testing.eventually(lambda: _grown(m.INSERTED._value.get, inserted, 50), 10)
    await asyncio.sleep(1.5)  # three more reports: each is cumulative, none may count twice
    assert m.INSERTED._value.get() == inserted + 50
    assert _histogram_count(m.COMMIT_LAG) == lag_count + 50
    assert m.DROPPED.labels("unknown_node")._value.get() == unknown + 1
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{s.history_logger_metrics_port}/metrics")).text
    assert f"telemetry_inserted_total {inserted + 50}" in text
    assert f'telemetry_commit_lag_seconds_bucket{{le="+Inf"}} {lag_count + 50}' in text


async def _grown(read, before: float, by: float) -> bool:
    return read() >= before + by


def _histogram_count(histogram) -> float:
    [family] = histogram.collect()
    return next(s.value for s in family.samples if s.name.endswith("_count"))
