"""The telemetry writer (Redis stream → PostgreSQL) in a process of its own.

Receiving (paho's thread, validation, the Redis append) and writing (decoding entries, building
the batch, asyncpg) each keep one interpreter busy under a backlog: in one process they share a
GIL, here each gets a core. The guarantees do not move: the receiver still PUBACKs after the
Redis append, the writer still XACKs after the COMMIT, and the entry ids recorded with the rows
make a batch written twice (a writer killed between COMMIT and XACK) land once.

The service starts the writer (`python writer_process.py`) with its own settings and watches it: a
writer that dies is started again after WRITER_RESTART_SEC (`history_logger_writer_restarts_total`)
and, under the same consumer name, re-reads what it held pending. A writer whose service died
(its parent changed) stops by itself after the batch in hand. The writer's metrics reach the
service's /metrics over a socket pair (the one that brought it its settings): every
RELAY_EVERY_SEC it sends its counters and histograms (cumulative), and the service adds what grew
since that writer's last report.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from prometheus_client import Counter, Histogram

from common.db import Database
from common.env import Settings
from common.logs import setup_logging
from common.redis_client import redis_client
from common.lifecycle import cancel_tasks, every, serve_until_signalled

import metrics as m
from node_cache import NodeCache
from streams import StreamKeys
from settings import ServiceSettings
from stream_consumer import StreamConsumer
from telemetry_writer import TelemetryWriter

log = logging.getLogger("history_logger.writer_process")

RELAY_EVERY_SEC = 0.5
WRITER_RESTART_SEC = 1.0
STOP_TIMEOUT_SEC = 30.0
PARENT_CHECK_SEC = 0.5

# What the writer process counts (the service owns every other metric).
RELAYED: tuple[Counter | Histogram, ...] = (m.PROCESSED, m.INSERTED, m.DROPPED, m.WRITE_RETRIES, m.BATCH_SIZE,
                                            m.FLUSH_SECONDS, m.COMMIT_LAG)


# -- the service's side ---------------------------------------------------------------------
class WriterProcess:
    """Starts the writer process, keeps it running, relays its metrics."""

    def __init__(self, settings: Settings, options: ServiceSettings, on_queued):
        self.settings = settings
        self.options = options
        self.on_queued = on_queued  # told the queue length the writer last saw
        self.proc: subprocess.Popen | None = None
        self.relay: Connection | None = None
        self.task: asyncio.Task | None = None
        self.stopping = False
        self._seen: list = []  # the current writer's last report

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.stopping = False
        self._spawn()
        self.task = asyncio.create_task(self._watch(), name="writer-process")

    async def stop(self) -> None:
        """SIGTERM: the writer finishes the batch in hand (written and acknowledged) and exits."""
        self.stopping = True
        if self.task is not None:
            await cancel_tasks([self.task])
            self.task = None
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT_SEC
            while proc.poll() is None and time.monotonic() < deadline:
                self._read_reports()
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                log.error("writer_process_killed", extra={"pid": proc.pid, "after_sec": STOP_TIMEOUT_SEC})
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._read_reports()
        self._close()

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # finds common/ as we do
        try:
            self.proc = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                         env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
        finally:
            theirs.close()  # the writer holds the only other end: its exit ends the pair
        self.relay = Connection(ours.detach())
        self.relay.send((self.settings, self.options))
        self._seen = []
        log.info("writer_process_started", extra={"pid": self.proc.pid})

    async def _watch(self) -> None:
        while not self.stopping:
            self._read_reports()
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                self._read_reports()
                self._close()
                log.error("writer_process_exited", extra={"exit_code": code, "restart_in_sec": WRITER_RESTART_SEC})
                m.WRITER_RESTARTS.inc()
                await asyncio.sleep(WRITER_RESTART_SEC)
                if self.stopping:
                    return
                self._spawn()
            await asyncio.sleep(RELAY_EVERY_SEC / 2)

    def _read_reports(self) -> None:
        relay = self.relay
        if relay is None:
            return
        try:
            while relay.poll():
                report = relay.recv()
                self._seen = apply_report(report, self._seen)
                if report["queued"] is not None:
                    self.on_queued(report["queued"])
        except (EOFError, OSError):  # the writer exited (a report cut short by a kill is lost)
            pass

    def _close(self) -> None:
        if self.relay is not None:
            self.relay.close()
            self.relay = None


def apply_report(report: dict, seen: list) -> list:
    """Add to this process's metrics what a writer's cumulative report grew by since `seen`."""
    for metric, now, before in zip(RELAYED, report["metrics"], seen or [{}] * len(RELAYED)):
        for labels, value in now.items():
            if isinstance(metric, Histogram):
                _add_histogram(metric, value, before.get(labels))
            elif value > before.get(labels, 0):
                child = metric.labels(*labels) if labels else metric
                child.inc(value - before.get(labels, 0))
    return report["metrics"]


def _add_histogram(metric: Histogram, value: tuple[list[float], float], before) -> None:
    """prometheus_client has no public way to add counts to a histogram's buckets: this uses its
    `_buckets` and `_sum` (test_writer_process reads the relayed histogram back)."""
    counts, total = value
    old_counts, old_total = before if before else ([0.0] * len(counts), 0.0)
    for bucket, new, old in zip(metric._buckets, counts, old_counts):
        if new > old:
            bucket.inc(new - old)
    if total != old_total:
        metric._sum.inc(total - old_total)


def report(queued: int | None) -> dict:
    """This process's relayed metrics (in RELAYED order), cumulative: counters by label values,
    histograms as (count per bucket, sum); `queued` is the queue length after the latest
    acknowledgement, None when nothing was acknowledged since the last report."""
    out: list[dict] = []
    for metric in RELAYED:
        values: dict = {}
        for family in metric.collect():
            buckets: list[float] = []
            total = 0.0
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    values[tuple(sample.labels.values())] = sample.value
                elif sample.name.endswith("_bucket"):
                    buckets.append(sample.value)
                elif sample.name.endswith("_sum"):
                    total = sample.value
            if isinstance(metric, Histogram):  # (relayed histograms have no labels) cumulative → per bucket
                values[()] = ([b - a for a, b in zip([0.0, *buckets], buckets)], total)
        out.append(values)
    return {"metrics": out, "queued": queued}


# -- the writer's side ----------------------------------------------------------------------
def run_writer(fd: int) -> None:
    """The writer process: runs until SIGTERM / SIGINT, or until the service that started it died."""
    relay = Connection(fd)
    settings, options = relay.recv()
    setup_logging("history-logger-writer", settings.log_level)
    asyncio.run(serve_until_signalled(WriterService(settings, options, relay, os.getppid())))


class WriterService:
    def __init__(self, settings: Settings, options: ServiceSettings, relay: Connection, parent: int):
        self.db = Database(settings)
        self.redis = redis_client(settings, resend=False)  # the acknowledgement script runs once
        self.keys = StreamKeys(settings)
        self.writer = TelemetryWriter(self.db, self.redis, self.keys, NodeCache(self.db), options.dead_letter_max,
                                      settings.telemetry_batch_size)
        self.queued: int | None = None
        self.consumer = StreamConsumer(
            self.redis, self.keys.telemetry, self.keys.group, options.consumer, self.writer.handle,
            count=settings.telemetry_batch_size, block_ms=settings.telemetry_flush_ms,
            claim_idle_ms=options.claim_idle_ms, name="telemetry", counter_key=self.keys.queued,
            on_queued=self._note_queued)
        self.relay = relay
        self.parent = parent
        self.tasks: list[asyncio.Task] = []

    def _note_queued(self, count: int) -> None:
        self.queued = count

    async def start(self) -> None:
        await self.db.connect(wait=False)  # the backlog waits in Redis while PostgreSQL is down
        self.consumer.start()
        self.tasks = [asyncio.create_task(every(period, job, log, "writer_job_failed"), name=job.__name__)
                      for period, job in ((RELAY_EVERY_SEC, self._report), (1.0, self.writer.flush_sampled),
                                          (PARENT_CHECK_SEC, self._parent_alive))]

    async def stop(self) -> None:
        await self.consumer.stop()  # the batch in hand is written and acknowledged
        await cancel_tasks(self.tasks)
        await self._report()  # the last counts
        self.relay.close()
        await self.redis.aclose()
        await self.db.close()

    async def _report(self) -> None:
        try:
            self.relay.send(report(self.queued))
        except OSError:  # the service is gone
            pass
        self.queued = None  # (a stale length would overwrite the receiver's fresher one)

    async def _parent_alive(self) -> None:
        if os.getppid() != self.parent:
            log.warning("writer_parent_gone", extra={"parent": self.parent})
            os.kill(os.getpid(), signal.SIGTERM)  # stop as if told to: the batch in hand is finished


if __name__ == "__main__":
    run_writer(int(sys.argv[1]))
