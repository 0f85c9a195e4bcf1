"""A Redis-stream consumer-group loop: read a batch, hand it to `handle`, XACK + XDEL after it returns.

Start-up first re-reads this consumer's own pending entries (a previous run died with them);
every min(15 s, claim_idle_ms / 4) it takes over entries another consumer left pending longer than
claim_idle_ms (XAUTOCLAIM). `handle` is retried with backoff on transient failures (the batch
stays pending meanwhile) and must be idempotent for entries it already committed — the
writers record entry ids in PostgreSQL in the same transaction (see ingest_log.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import redis.asyncio as redis
import redis.exceptions as rex

from common.redis_client import REDIS_TRANSIENT

import metrics as m

log = logging.getLogger("history_logger.consumer")

Entry = tuple[bytes, dict[bytes, bytes]]
Handler = Callable[[list[Entry]], Awaitable[None]]
CLAIM_EVERY_SEC = 15.0

# XACK + XDEL; the counter (samples queued) drops by the `n` of each entry this call acknowledged
# (an entry acknowledged twice, by two consumers after a claim, counts once); reset when empty.
_ACK_COUNTED = """
local freed = 0
for i = 2, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then freed = freed + tonumber(ARGV[i + 1]) end
  redis.call('XDEL', KEYS[1], ARGV[i])
end
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], 0)
  return 0
end
return redis.call('DECRBY', KEYS[2], freed)
"""


class Transient(Exception):
    """A failure worth retrying (database or Redis unreachable); the batch stays pending."""


class StreamConsumer:
    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str, handle: Handler, *,
                 count: int, block_ms: int, claim_idle_ms: int, name: str, counter_key: str | None = None,
                 on_queued: Callable[[int], None] | None = None):
        self.redis = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.handle = handle
        self.count = count
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.name = name
        self.counter_key = counter_key
        self.on_queued = on_queued  # told how many samples are left after each acknowledgement
        self._ack_counted = client.register_script(_ACK_COUNTED) if counter_key else None
        self.stopping = False
        self.task: asyncio.Task | None = None
        self._own_pending_done = False
        self.claim_every = max(0.5, min(CLAIM_EVERY_SEC, claim_idle_ms / 4000))
        self._next_claim = time.monotonic() + self.claim_every
        self._claim_cursor = "0-0"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except rex.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"consumer-{self.name}")

    async def stop(self) -> None:
        """Finish the batch in hand (write it, acknowledge it), then return."""
        self.stopping = True
        if self.task is not None:
            await self.task
            self.task = None

    async def run(self) -> None:
        attempt = 0
        group_ready = False
        while not self.stopping:
            try:
                if not group_ready:
                    await self.ensure_group()
                    group_ready = True
                entries = await self._next_batch()
                attempt = 0
                if entries:
                    await self._process(entries)
            except (Transient, *REDIS_TRANSIENT) as exc:
                attempt += 1
                await self._backoff(attempt, exc)
            except rex.ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis lost the stream (no persistence): start over
                    log.warning("stream_group_recreated", extra={"stream": self.stream})
                    await self.ensure_group()
                    self._own_pending_done = False
                    continue
                attempt += 1
                log.exception("stream_read_failed", extra={"stream": self.stream})
                await self._backoff(attempt, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must survive any one bad batch
                attempt += 1
                log.exception("stream_batch_failed", extra={"stream": self.stream})
                await self._backoff(attempt, exc)

    async def _next_batch(self) -> list[Entry]:
        if not self._own_pending_done:
            reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=self.count)
            entries = reply[0][1] if reply else []
            if entries:
                return entries
            self._own_pending_done = True
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.claim_every
            cursor, entries, *_ = await self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                                              self.claim_idle_ms, self._claim_cursor, count=self.count)
            self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
            if entries:
                log.info("stream_entries_claimed", extra={"stream": self.stream, "count": len(entries)})
                self._next_claim = time.monotonic()  # more may be waiting
                return entries
        reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.count,
                                            block=self.block_ms)
        return reply[0][1] if reply else []

    async def _process(self, entries: list[Entry]) -> None:
        live = [(eid, fields) for eid, fields in entries if fields]  # deleted entries come back empty
        attempt = 0
        while live:
            try:
                await self.handle(live)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the batch in hand and retry it, never skip it
                attempt += 1
                if not isinstance(exc, Transient) and attempt in (1, 5) or attempt % 50 == 0:
                    log.exception("stream_batch_failed", extra={"stream": self.stream, "attempt": attempt})
                if self.stopping:  # leave them pending: the next run re-reads them
                    log.warning("stream_batch_left_pending", extra={"stream": self.stream, "count": len(live)})
                    return
                await self._backoff(attempt, exc)
        ids = [eid for eid, _ in entries]
        while True:
            try:
                if self._ack_counted is not None:
                    args: list = [self.group]
                    for eid, fields in entries:
                        args += [eid, int(fields.get(b"n", 1)) if fields else 0]
                    left = await self._ack_counted(keys=[self.stream, self.counter_key], args=args)
                    if self.on_queued is not None:
                        self.on_queued(int(left))
                    return
                pipe = self.redis.pipeline(transaction=False)
                pipe.xack(self.stream, self.group, *ids)
                pipe.xdel(self.stream, *ids)
                await pipe.execute()
                return
            except REDIS_TRANSIENT as exc:  # committed but not acknowledged: redelivery is filtered
                attempt += 1
                if self.stopping:
                    return
                await self._backoff(attempt, exc)

    async def _backoff(self, attempt: int, exc: Exception) -> None:
        m.WRITE_RETRIES.labels(self.name).inc()
        delay = min(0.1 * 2 ** attempt, 5.0)
        if attempt in (1, 5) or attempt % 20 == 0:
            log.warning("stream_retry", extra={"stream": self.stream, "attempt": attempt, "error": str(exc)[:300],
                                               "retry_in_sec": delay})
        deadline = time.monotonic() + delay
        while not self.stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, delay))
