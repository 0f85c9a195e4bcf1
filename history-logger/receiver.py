"""MQTT / HTTP input → Redis streams. Returns only once the input is durable in Redis.

Telemetry is validated here: valid samples go to the telemetry stream, bad ones to the
dead-letter stream with their reason. heartbeat / status / lwt / command_response go as they
came to the events stream. Everything of one MQTT batch is written in ONE MULTI/EXEC, which
also records a fingerprint of every message in a small per-client sorted set: the broker
redelivers (DUP) what we stored but could not acknowledge before a crash, and those are
recognised and acknowledged without being stored twice. The set keeps the last
2 x MQTT_RECEIVE_MAXIMUM fingerprints — the broker never has more messages unacknowledged.

Samples are written up to ENTRY_SAMPLES to a stream entry (a busy MQTT batch costs a few XADDs,
not one per reading); the queue length is counted in samples (`telemetry:queued`, incremented
here, decremented by the writer's acknowledgement). Queue capacity (contract §9.4): above 90 % keep 1 of TELEMETRY_SAMPLE_EVERY samples per
(node, channel, metric) — the others only refresh telemetry_last through a small hash —
and at 100 % hold the batch (no PUBACK: the broker keeps it) until the writer made room.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import orjson
import redis.asyncio as redis

from common.env import Settings
from common.mqtt import LeaveUnacknowledged, Message, MqttClient
from common.redis_client import REDIS_TRANSIENT
from common.topics import Topics

import metrics as m
import telemetry_parse as tp
from settings import ServiceSettings
from streams import Sample, StreamKeys, encode_entry
from telemetry_parse import Rejected

log = logging.getLogger("history_logger.receiver")

DEAD_PAYLOAD_MAX = 4096  # bytes of a rejected payload kept for inspection
ENTRY_SAMPLES = 100      # samples per stream entry at most (one XADD per entry, not per sample)
SEEN_EVERY_SEC = 5.0     # a node's telemetry is announced as a life sign at most this often


EVENT_KINDS = ("heartbeat", "status", "lwt", "command_response", "config_response")


async def subscribe(mqtt: MqttClient, receiver: "Receiver") -> None:
    """Every subscription of the service, always in this order (subscription identifiers follow
    it, and a session taken over by another replica must route the same way, see replicas.py)."""
    group = receiver.settings.mqtt_shared_group
    for filter_ in receiver.topics.filters("telemetry"):
        await mqtt.subscribe_batch(filter_, receiver.on_telemetry, qos=1, share_group=group)
    for kind in EVENT_KINDS:
        for filter_ in receiver.topics.filters(kind):
            await mqtt.subscribe_batch(filter_, receiver.on_events, qos=1, share_group=group)


class Stopping(LeaveUnacknowledged):
    """The service is stopping while Redis is unreachable: leave the input unacknowledged."""


class Receiver:
    def __init__(self, settings: Settings, options: ServiceSettings, client: redis.Redis, keys: StreamKeys):
        self.settings = settings
        self.options = options
        self.redis = client
        self.keys = keys
        self.topics = Topics(settings.mqtt_topic_root)
        self.capacity = settings.telemetry_queue_capacity
        self.entry_samples = max(1, min(ENTRY_SAMPLES, settings.telemetry_batch_size))
        self.keep_marks = 2 * settings.mqtt_receive_maximum + 1000
        self.queue_len = 0
        self.stopping = False
        self._sample_counts: dict[tuple, int] = {}
        self._reported: set[str] = set()
        self._announced: dict[str, float] = {}  # node uid → when its telemetry was last announced
        self.stalled_since: float | None = None  # input waits (queue full, Redis down) since then

    # -- MQTT handlers ------------------------------------------------------------------
    # The Redis work runs shielded: redis-py (8.1) can swallow a cancellation that lands inside a
    # pipeline's execute(), which would keep the MQTT dispatcher alive through stop(). Cancelled
    # here, the handler returns at once (no PUBACK); the write finishes on its own and a
    # redelivery of those messages is recognised by fingerprint.
    async def on_telemetry(self, messages: list[Message]) -> None:
        await asyncio.shield(self._telemetry(messages))

    async def on_events(self, messages: list[Message]) -> None:
        await asyncio.shield(self._events(messages))

    async def _telemetry(self, messages: list[Message]) -> None:
        m.RECEIVED.inc(len(messages))
        messages = await self._without_redeliveries(messages)
        samples: list[Sample] = []
        dead: list[dict] = []
        for msg in messages:
            try:
                samples.append(tp.from_mqtt(self.topics, msg.topic, msg.payload, msg.received_at,
                                            self.options.max_payload_bytes))
            except Rejected as exc:
                dead.append(self.dead_entry(exc, msg.topic, msg.payload))
            except Exception as exc:  # noqa: BLE001 - a message the parser did not foresee is dead-lettered, alone
                log.exception("telemetry_parse_failed", extra={"topic": msg.topic[:200]})
                dead.append(self.dead_entry(Rejected("parse_error", f"{type(exc).__name__}: {exc}"[:300]),
                                            msg.topic, msg.payload))
        await self.append(samples, dead, self._life_signs(messages), [fingerprint(msg) for msg in messages])

    def _life_signs(self, messages: list[Message]) -> list[dict]:
        """Telemetry says its node is alive: one events-stream entry per node at most every
        SEEN_EVERY_SEC (the events writer marks it online), not one per reading."""
        now = time.monotonic()
        announced = self._announced
        if len(announced) > 100_000:
            announced.clear()
        events = []
        for msg in messages:
            if msg.retain:
                continue  # a retained reading is old news
            try:
                node, _ = tp.telemetry_topic(self.topics, msg.topic)
            except Rejected:
                continue
            if now - announced.get(node, -SEEN_EVERY_SEC) >= SEEN_EVERY_SEC:
                announced[node] = now
                events.append({b"t": msg.topic.encode(), b"p": b"", b"ret": b"0",
                               b"at": repr(msg.received_at).encode()})
        return events

    async def _events(self, messages: list[Message]) -> None:
        messages = await self._without_redeliveries(messages)
        events = [{b"t": msg.topic.encode(), b"p": msg.payload, b"ret": b"1" if msg.retain else b"0",
                   b"at": repr(msg.received_at).encode()} for msg in messages]
        await self.append([], [], events, [fingerprint(msg) for msg in messages])

    async def _without_redeliveries(self, messages: list[Message]) -> list[Message]:
        dups = [msg for msg in messages if msg.dup]
        if not dups:
            return messages
        seen = await self._retry(lambda: self.redis.zmscore(self.keys.inflight, [fingerprint(d) for d in dups]))
        stored = {id(d) for d, score in zip(dups, seen) if score is not None}
        if stored:
            m.DUPLICATES.inc(len(stored))
            log.info("mqtt_redeliveries_skipped", extra={"count": len(stored)})
        return [msg for msg in messages if id(msg) not in stored]

    # -- writing ------------------------------------------------------------------------
    def dead_entry(self, exc: Rejected, topic: str, payload: bytes) -> dict:
        m.INVALID.labels(exc.reason).inc()
        m.DROPPED.labels(exc.reason).inc()
        if exc.reason not in self._reported:  # log each kind once; the metric counts them all
            self._reported.add(exc.reason)
            log.warning("telemetry_rejected", extra={"reason": exc.reason, "detail": exc.detail, "topic": topic[:200]})
        return {b"reason": exc.reason.encode(), b"detail": exc.detail[:500].encode(), b"topic": topic.encode(),
                b"size": str(len(payload)).encode(), b"payload": payload[:DEAD_PAYLOAD_MAX],
                b"at": repr(time.time()).encode()}

    async def append(self, samples: list[Sample], dead: list[dict], events: list[dict],
                     marks: list[bytes]) -> int:
        """Write to Redis (one MULTI/EXEC); returns how many samples went to the stream."""
        if samples:
            await self._wait_for_room(len(samples))
            samples, last_only = self._sample(samples)
        else:
            last_only = []
        token = os.urandom(16)  # names this write, to tell after a lost EXEC reply whether it happened
        marks = [*marks, token]
        attempt = 0
        while True:
            try:
                if attempt and await self._already_written(token):
                    break
                await self._write(samples, last_only, dead, events, marks)
                if samples:
                    m.QUEUED.inc(len(samples))
                break
            except REDIS_TRANSIENT as exc:
                attempt += 1
                self._stalled()
                await self._backoff(attempt, exc)
        self.stalled_since = None
        return len(samples)

    def _stalled(self) -> None:
        """Input is held (no PUBACK): life signs wait in the broker, so silence is not news (housekeeping)."""
        if self.stalled_since is None:
            self.stalled_since = time.time()

    async def _write(self, samples, last_only, dead, events, marks) -> None:
        k = self.keys
        pipe = self.redis.pipeline(transaction=True)
        step = self.entry_samples
        for start in range(0, len(samples), step):
            pipe.xadd(k.telemetry, encode_entry(samples[start:start + step]))
        for entry in dead:
            pipe.xadd(k.dead, entry, maxlen=self.options.dead_letter_max, approximate=True)
        for entry in events:
            pipe.xadd(k.events, entry)
        if last_only:
            pipe.hset(k.last, mapping={orjson.dumps(s.key): orjson.dumps(s.meta()) for s in last_only})
        now = time.time()
        pipe.zadd(k.inflight, {mark: now for mark in marks})
        pipe.zremrangebyrank(k.inflight, 0, -self.keep_marks - 1)
        pipe.incrby(k.queued, len(samples))
        results = await pipe.execute()
        self.queue_len = results[-1]
        m.QUEUE_SIZE.set(self.queue_len)

    async def _already_written(self, token: bytes) -> bool:
        """After a failed EXEC whose reply was lost: did the transaction happen? (it is atomic)"""
        return await self.redis.zscore(self.keys.inflight, token) is not None

    async def _wait_for_room(self, count: int) -> None:
        held = False
        while self.queue_len + count > self.capacity and self.queue_len > 0:
            if not held:
                held = True
                self._stalled()
                m.OVERFLOW.inc(count)
                log.warning("telemetry_queue_full", extra={"queue": self.queue_len, "capacity": self.capacity})
            if self.stopping:
                raise Stopping("stopping while the telemetry queue is full")
            await asyncio.sleep(0.2)
            try:
                self.queue_len = await self.queued()
            except REDIS_TRANSIENT:
                pass

    def _sample(self, samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
        if self.queue_len < 0.9 * self.capacity:
            if self._sample_counts:
                self._sample_counts.clear()
            return samples, []
        kept, last_only = [], []
        counts = self._sample_counts
        if len(counts) > 100_000:
            counts.clear()
        for sample in samples:
            n = counts.get(sample.key, 0)
            counts[sample.key] = n + 1
            if n % self.options.sample_every == 0:
                kept.append(sample)
            else:
                last_only.append(sample)
        if last_only:
            m.DROPPED.labels("sampled").inc(len(last_only))
        return kept, last_only

    async def _retry(self, call):
        attempt = 0
        while True:
            try:
                return await call()
            except REDIS_TRANSIENT as exc:
                attempt += 1
                self._stalled()
                await self._backoff(attempt, exc)

    async def _backoff(self, attempt: int, exc: Exception) -> None:
        m.WRITE_RETRIES.labels("redis").inc()
        if self.stopping:
            raise Stopping("stopping while Redis is unreachable") from exc
        delay = min(0.1 * 2 ** attempt, 5.0)
        if attempt in (1, 5) or attempt % 20 == 0:
            log.warning("redis_append_retry", extra={"attempt": attempt, "error": str(exc), "retry_in_sec": delay})
        await asyncio.sleep(delay)

    def note_queued(self, count: int) -> None:
        """The writer acknowledged entries; `count` samples are left in the stream."""
        self.queue_len = count
        m.QUEUE_SIZE.set(count)

    async def queued(self) -> int:
        return int(await self.redis.get(self.keys.queued) or 0)

    async def refresh_queue_len(self) -> int:
        self.queue_len = await self.queued()
        m.QUEUE_SIZE.set(self.queue_len)
        return self.queue_len


def fingerprint(msg: Message) -> bytes:
    return hashlib.blake2b(msg.topic.encode() + b"\0" + msg.payload, digest_size=16).digest()
