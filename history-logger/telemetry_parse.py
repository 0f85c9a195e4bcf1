"""Telemetry input → one normalised sample (contract §2.4, §3.1, §7.2), or a rejection with a reason."""
from __future__ import annotations

import re

import orjson
from pydantic import ValidationError

from common.metric_ranges import out_of_range
from common.schemas import (MAX_FUTURE_SEC, MIN_EPOCH_SEC, MS_THRESHOLD, IngestSample, Telemetry, describe_error,
                            normalise_metric, normalise_timestamp)
from common.topics import Topics, TopicError, check_segment, zone_id_from_segment

import metrics as m
from streams import Sample, to_ms
_NON_FINITE = re.compile(rb'(?<![\w".])[-+]?(nan|inf(inity)?)(?![\w"])', re.IGNORECASE)


class Rejected(Exception):
    """Input that cannot be stored; `reason` is the metric label and dead-letter reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_json(payload: bytes) -> object:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        if "infinity" in str(exc) or _NON_FINITE.search(payload):
            raise Rejected("nan", "NaN or Infinity is not a number") from None
        raise Rejected("invalid_json", str(exc)[:200]) from None


_topic_cache: dict[str, tuple[str, str | None] | str] = {}


def telemetry_topic(topics: Topics, topic: str) -> tuple[str, str | None]:
    """(node uid, channel or None) of a telemetry topic; Rejected unknown_topic otherwise. Cached."""
    cached = _topic_cache.get(topic)
    if cached is None:
        try:
            parsed = topics.parse(topic)
            if parsed.kind != "telemetry":
                raise TopicError(f"{parsed.kind} is not telemetry")
            check_segment(parsed.node, "node uid")
            if parsed.channel is not None:
                check_segment(parsed.channel, "channel")
            cached = (parsed.node, parsed.channel)
        except TopicError as exc:
            cached = str(exc)
        if len(_topic_cache) > 100_000:
            _topic_cache.clear()
        _topic_cache[topic] = cached
    if isinstance(cached, str):
        raise Rejected("unknown_topic", cached)
    return cached


def _plain_fields(data: dict) -> tuple | None:
    """The common payload shape checked by hand, as Telemetry would accept it; None → let pydantic decide."""
    metric = data["metric_type"] if "metric_type" in data else data.get("metric")
    value = data.get("value", _MISSING)
    ts = data["ts"] if "ts" in data else data.get("timestamp")
    stub = data.get("stub", False)
    channel = data.get("channel")
    node_id = data.get("node_id")
    if (type(metric) is str and 0 < len(metric) <= 64 and type(stub) is bool
            and (value is None or type(value) in (int, float))
            and (ts is None or type(ts) in (int, float) or type(ts) is str and len(ts) <= 64)
            and (channel is None or type(channel) is str and len(channel) <= 128)
            and (node_id is None or type(node_id) is str and len(node_id) <= 128)):
        return metric, (float(value) if type(value) is int else value), ts, stub, channel
    return None


_MISSING = object()


def timestamp_ms(value, received_at: float) -> int:
    """normalise_timestamp (contract §3.1) in epoch milliseconds, without datetimes for numbers."""
    if type(value) in (int, float):
        if value >= MS_THRESHOLD:
            seconds = value / 1000.0
        elif value >= MIN_EPOCH_SEC:
            seconds = float(value)
        else:
            seconds = received_at
        if seconds > received_at + MAX_FUTURE_SEC:
            seconds = received_at
        return int(seconds * 1000)
    return to_ms(normalise_timestamp(value, received_at))


def from_mqtt(topics: Topics, topic: str, payload: bytes, received_at: float, max_bytes: int) -> Sample:
    if len(payload) > max_bytes:
        raise Rejected("too_large", f"{len(payload)} bytes > {max_bytes}")
    node, topic_channel = telemetry_topic(topics, topic)
    data = load_json(payload)
    if not isinstance(data, dict):
        raise Rejected("invalid_payload", "not a JSON object")
    if b"\\u0000" in payload:
        raise Rejected("invalid_payload", "NUL character in a string")
    plain = _plain_fields(data)
    if plain is not None:
        metric_type, value, ts, stub, channel = plain
    else:
        try:
            t = Telemetry.model_validate(data)
        except ValidationError as exc:
            if any(e["type"] == "finite_number" for e in exc.errors()):
                raise Rejected("nan", describe_error(exc)) from None
            raise Rejected("invalid_payload", describe_error(exc)) from None
        metric_type, value, ts, stub, channel = t.metric_type, t.value, t.ts, t.stub, t.channel
    metric = _metric(metric_type, value)
    return Sample(node, None, topic_channel or channel, metric, value, timestamp_ms(ts, received_at), stub, payload)


def _metric(metric_type: str, value: float | None) -> str:
    """The canonical metric name; Rejected out_of_range for a value it cannot have (common.metric_ranges)."""
    metric, known = normalise_metric(metric_type)
    if value is not None:
        problem = out_of_range(metric, value)
        if problem is not None:
            raise Rejected("out_of_range", problem)
    if not known:
        m.UNKNOWN_METRIC.inc()
    return metric


def from_ingest(sample: IngestSample, received_at: float) -> Sample:
    """One sample of `POST /ingest/telemetry` (contract §7.2): node_uid, or a zone (id / `zn-{id}`)."""
    zone = sample.zone_id
    if zone is None and sample.zone_uid:
        zone = zone_id_from_segment(sample.zone_uid)
    if not sample.node_uid and zone is None:
        raise Rejected("invalid_payload", "a sample needs node_uid, zone_id or zone_uid")
    metric = _metric(sample.metric_type, sample.value)
    when = normalise_timestamp(sample.ts, received_at)
    raw = orjson.dumps(sample.model_dump(mode="json"))
    if b"\\u0000" in raw:
        raise Rejected("invalid_payload", "NUL character in a string")
    return Sample(sample.node_uid or None, zone, sample.channel, metric, sample.value, to_ms(when), False, raw)
