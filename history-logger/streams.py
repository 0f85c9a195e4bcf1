"""The Redis streams between the receiver and the telemetry writer: their keys, and how samples
travel in a telemetry entry (several to an entry: their metadata as compact JSON lists and their
full original payloads, which become `telemetry_samples.raw`)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import orjson

from common.env import Settings
from common.redis_client import key

EPOCH = dt.datetime(1970, 1, 1)


class StreamKeys:
    def __init__(self, settings: Settings):
        self.telemetry = key(settings, "telemetry:stream")
        self.events = key(settings, "events:stream")
        self.dead = key(settings, "telemetry:dead")
        self.last = key(settings, "telemetry:last")          # sampled-away samples: newest per key
        self.queued = key(settings, "telemetry:queued")      # samples in the stream not yet acknowledged
        self.inflight = key(settings, f"mqtt:inflight:{settings.mqtt_client_id}")
        self.group = "history-logger"


@dataclass(slots=True)
class Sample:
    node: str | None        # node uid (None: HTTP sample addressed by zone only)
    zone: int | None        # explicit zone id (HTTP ingest); MQTT samples take the node's zone
    channel: str | None
    metric: str
    value: float | None
    ts_ms: int
    stub: bool
    raw: bytes               # JSON text of the full payload

    def meta(self) -> list:
        return [self.node, self.zone, self.channel, self.metric, self.value, self.ts_ms, self.stub]

    @property
    def key(self) -> tuple:
        return (self.node, self.zone, self.channel, self.metric)


def from_meta(meta: list, raw: bytes = b"null") -> Sample:
    node, zone, channel, metric, value, ts_ms, stub = meta
    return Sample(node, zone, channel, metric, value, ts_ms, stub, raw)


def encode_entry(samples: list[Sample]) -> dict[bytes, bytes]:
    """Several samples in one stream entry: `n` count, `d` their metadata, `r` raw payloads joined
    by NUL (which valid JSON text never contains)."""
    return {b"n": str(len(samples)).encode(), b"d": orjson.dumps([s.meta() for s in samples]),
            b"r": b"\0".join(s.raw for s in samples)}


def decode_entry(fields: dict[bytes, bytes]) -> list[Sample]:
    metas = orjson.loads(fields[b"d"])
    raws = fields[b"r"].split(b"\0")
    if len(raws) != len(metas):
        raise ValueError("entry with mismatched d / r")
    return [from_meta(meta, raw) for meta, raw in zip(metas, raws)]


def to_ms(when: dt.datetime) -> int:
    return (when - EPOCH) // dt.timedelta(milliseconds=1)


def from_ms(ms: int) -> dt.datetime:
    return EPOCH + dt.timedelta(milliseconds=ms)
