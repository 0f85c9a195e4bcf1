"""Readings outside their metric's physical range (common.metric_ranges) are dead-lettered as
out_of_range on both input paths, MQTT and POST /ingest/telemetry; the valid ones beside them land."""
import httpx
import pytest

from common.metric_ranges import RANGES, out_of_range

import metrics as m
from testing import apublish, dead_letters, seed, wait_rows

IMPOSSIBLE = [("PH", 1e308), ("PH", -1e308), ("PH", 14.5), ("EC", 25.0), ("HUMIDITY", 101.0),
              ("WATER_LEVEL", 1.2), ("PUMP_STATE", 0.5), ("TEMP_AIR", -60.0), ("SOIL_MOISTURE", 1e300)]
POSSIBLE = [("PH", 0.0), ("PH", 14.0), ("EC", 1.4), ("HUMIDITY", 100.0), ("WATER_LEVEL", 1.0), ("PUMP_STATE", 1.0),
            ("TEMP_WATER", -2.0), ("CO2", 9999.0), ("LUX", 120_000.0), ("SOIL_MOISTURE", 31.0)]


def test_the_table_in_the_contracts_words():
    assert RANGES["PH"] == (0.0, 14.0) and RANGES["EC"] == (0.0, 20.0) and RANGES["HUMIDITY"] == (0.0, 100.0)
    assert RANGES["WATER_LEVEL"] == (0.0, 1.0)
    for metric, value in IMPOSSIBLE:
        assert out_of_range(metric, value), (metric, value)
    for metric, value in POSSIBLE:
        assert out_of_range(metric, value) is None, (metric, value)
    assert out_of_range("PH", float("nan")) and out_of_range("X", float("inf"))


def out_of_range_count() -> float:
    return m.DROPPED.labels("out_of_range")._value.get()


async def test_mqtt_readings_out_of_range_are_dead_lettered(logger, db):
    s = logger.settings
    ids = await seed(db)
    topic = f"{s.mqtt_topic_root}/gh-1/zn-{ids['zone_id']}/nd-ph-1/sensor/telemetry"
    before = out_of_range_count()
    items = []
    for (bad_metric, bad_value), (metric, value) in zip(IMPOSSIBLE, POSSIBLE):
        items += [(topic, {"metric": bad_metric, "value": bad_value}), (topic, {"metric": metric, "value": value})]
    await apublish(s, items)
    await wait_rows(db, len(IMPOSSIBLE))
    rows = await db.fetch("SELECT metric_type, value FROM telemetry_samples ORDER BY id")
    assert sorted((r["metric_type"], r["value"]) for r in rows) == sorted(POSSIBLE[:len(IMPOSSIBLE)])
    dead = [d for d in await dead_letters(s) if d["reason"] == b"out_of_range"]
    assert len(dead) == len(IMPOSSIBLE) and out_of_range_count() - before == len(IMPOSSIBLE)
    assert await db.fetchval("SELECT max(abs(value)) FROM telemetry_last") <= 120_000


@pytest.mark.parametrize("metric, value", IMPOSSIBLE[:3])
async def test_http_readings_out_of_range_are_dead_lettered(logger, db, metric, value):
    s = logger.settings
    ids = await seed(db)
    before = out_of_range_count()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.history_logger_port}", timeout=10) as http:
        reply = await http.post("/ingest/telemetry", json={"samples": [
            {"node_uid": "nd-ph-1", "metric_type": "PH", "value": 6.2},
            {"node_uid": "nd-ph-1", "metric_type": metric, "value": value},
            {"zone_id": ids["zone_id"], "metric_type": "EC", "value": 1.5},
        ]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["count"] == 2 and [r["index"] for r in body["rejected"]] == [1]
    assert body["rejected"][0]["reason"] == "out_of_range"
    await wait_rows(db, 2)
    assert sorted(r["value"] for r in await db.fetch("SELECT value FROM telemetry_samples")) == [1.5, 6.2]
    assert out_of_range_count() - before == 1
    assert [d["reason"] for d in await dead_letters(s)] == [b"out_of_range"]
