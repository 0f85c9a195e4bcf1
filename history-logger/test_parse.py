"""Telemetry parsing: the hand-checked fast path agrees with the pydantic model on every variant."""
import time

import orjson
import pytest

from common.topics import Topics
import streams
import telemetry_parse as tp

NOW = time.time()
TOPICS = Topics("hydro")
TOPIC = "hydro/gh-1/zn-3/nd-1/ph_sensor/telemetry"

PAYLOADS = [
    {"metric_type": "PH", "value": 5.86, "timestamp": 1710001234, "stub": False, "raw": 1465},
    {"metric": "ec", "value": 2, "ts": 1710001234567},
    {"metric": "temperature", "value": None, "ts": 12.5, "error": "sensor"},
    {"metric_type": "ph", "metric": "ec", "value": 1.0, "ts": None, "timestamp": 1710001234},
    {"metric": "lux", "value": 1.5, "ts": "2026-01-02T03:04:05Z", "channel": "light", "node_id": "nd-1"},
    {"metric": "co2", "value": 400.0, "stub": True, "ts": NOW + 3 * 86400},
]
BAD = [
    ({"metric": "PH", "value": "5.5"}, "invalid_payload"),
    ({"metric": "PH", "value": True}, "invalid_payload"),
    ({"metric": "", "value": 1.0}, "invalid_payload"),
    ({"value": 1.0}, "invalid_payload"),
    ({"metric": "PH"}, "invalid_payload"),
    ({"metric": "PH", "value": 1.0, "stub": "yes"}, "invalid_payload"),
    ({"metric": "PH", "value": 1.0, "channel": 5}, "invalid_payload"),
    ({"metric": "x" * 65, "value": 1.0}, "invalid_payload"),
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_fast_path_matches_the_model(payload, monkeypatch):
    raw = orjson.dumps(payload)
    fast = tp.from_mqtt(TOPICS, TOPIC, raw, NOW, 65536)
    monkeypatch.setattr(tp, "_plain_fields", lambda data: None)
    slow = tp.from_mqtt(TOPICS, TOPIC, raw, NOW, 65536)
    assert fast.meta()[:5] == slow.meta()[:5] and fast.stub == slow.stub
    assert abs(fast.ts_ms - slow.ts_ms) <= 1


@pytest.mark.parametrize("payload,reason", BAD)
def test_bad_payloads_rejected_with_reason(payload, reason):
    with pytest.raises(tp.Rejected) as exc:
        tp.from_mqtt(TOPICS, TOPIC, orjson.dumps(payload), NOW, 65536)
    assert exc.value.reason == reason


def test_topic_forms_and_unknown_shapes():
    assert tp.telemetry_topic(TOPICS, "hydro/gh/zn-1/nd-1/ph/telemetry") == ("nd-1", "ph")
    assert tp.telemetry_topic(TOPICS, "hydro/gh/zn-1/nd-1/telemetry/ph") == ("nd-1", "ph")
    assert tp.telemetry_topic(TOPICS, "hydro/gh/zn-1/nd-1/telemetry") == ("nd-1", None)
    for bad in ("hydro/gh//nd-1/ph/telemetry", "hydro/gh/zn-1/nd-1/ph/status", "other/gh/zn/nd/ph/telemetry",
                "hydro/gh/zn-1/" + "n" * 200 + "/ph/telemetry"):
        with pytest.raises(tp.Rejected) as exc:
            tp.telemetry_topic(TOPICS, bad)
        assert exc.value.reason == "unknown_topic"


def test_timestamps_seconds_ms_iso_and_uptime():
    assert tp.timestamp_ms(1710001234, NOW) == 1710001234000
    assert tp.timestamp_ms(1710001234567, NOW) == 1710001234567
    assert tp.timestamp_ms("2026-01-02T03:04:05Z", NOW) == 1767323045000
    assert tp.timestamp_ms(35.5, NOW) == int(NOW * 1000)           # uptime → receive time
    assert tp.timestamp_ms(NOW + 3 * 86400, NOW) == int(NOW * 1000)  # far future → receive time


def test_entry_round_trip():
    samples = [streams.Sample("nd-1", None, "ph", "PH", 5.5, 1, False, b'{"a":1}'),
               streams.Sample(None, 3, None, "EC", None, 2, True, b'{"b":"x\\ny"}')]
    assert streams.decode_entry(streams.encode_entry(samples)) == samples
