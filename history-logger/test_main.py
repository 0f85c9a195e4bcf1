"""Telemetry ingest end to end: MQTT → Redis → PostgreSQL, on the shared servers."""
import datetime as dt
import time

import httpx

from common import testing

from testing import apublish, seed, wait_rows

NOW = int(time.time())


def t(settings, *parts):
    return "/".join((settings.mqtt_topic_root, *parts))


async def test_both_topic_forms_payload_variants_and_timestamps(logger, db):
    s = logger.settings
    ids = await seed(db)
    await apublish(s, [
        (t(s, "gh-1", f"zn-{ids['zone_id']}", "nd-ph-1", "ph_sensor", "telemetry"),
         {"node_id": "nd-ph-1", "metric_type": "PH", "value": 5.86, "raw": 1465, "timestamp": NOW - 100,
          "stub": False, "stable": True}),
        (t(s, "gh-1", f"zn-{ids['zone_id']}", "nd-ph-1", "telemetry"),           # 5-level: channel in payload
         {"channel": "ec_sensor", "metric": "ec", "value": 1.4, "ts": (NOW - 90) * 1000}),
        (t(s, "gh-1", "zn-temp", "nd-ph-1", "telemetry", "climate"),              # legacy type-before-channel
         {"metric_type": "temperature", "value": 22.5, "ts": 12.5}),               # uptime → receive time
        (t(s, "gh-1", f"zn-{ids['zone_id']}", "nd-ph-1", "ph_sensor", "telemetry"),
         {"metric_type": "PH", "value": None, "error": "sensor_fail"}),           # null: sample only
        (t(s, "gh-1", f"zn-{ids['zone_id']}", "nd-ph-1", "ph_sensor", "telemetry"),
         {"metric_type": "PH", "value": 6.5, "stub": True, "ts": NOW}),           # stub: sample only
        (t(s, "gh-1", f"zn-{ids['zone_id']}", "nd-ph-1", "aux", "telemetry"),
         {"metric_type": "Soil_Moisture", "value": 31, "ts": "2026-01-02T03:04:05Z"}),
    ])
    await wait_rows(db, 6)
    rows = await db.fetch("SELECT channel, metric_type, value, raw, ts, zone_id, node_id FROM telemetry_samples"
                          " ORDER BY id")
    by_metric = {}
    for r in rows:
        by_metric.setdefault(r["metric_type"], []).append(r)
    assert {r["zone_id"] for r in rows} == {ids["zone_id"]} and {r["node_id"] for r in rows} == {ids["node_id"]}
    ph = by_metric["PH"]
    assert [(r["channel"], r["value"]) for r in ph] == [("ph_sensor", 5.86), ("ph_sensor", None), ("ph_sensor", 6.5)]
    assert ph[0]["ts"] == dt.datetime.utcfromtimestamp(NOW - 100) and ph[0]["raw"]["stable"] is True
    assert ph[0]["raw"]["raw"] == 1465
    [ec] = by_metric["EC"]
    assert (ec["channel"], ec["value"], ec["ts"]) == ("ec_sensor", 1.4, dt.datetime.utcfromtimestamp(NOW - 90))
    [temp] = by_metric["TEMP_AIR"]
    assert temp["channel"] == "climate" and abs((temp["ts"] - dt.datetime.utcnow()).total_seconds()) < 60
    [soil] = by_metric["SOIL_MOISTURE"]
    assert soil["ts"] == dt.datetime(2026, 1, 2, 3, 4, 5) and soil["value"] == 31
    last = {r["metric_type"]: r for r in await db.fetch("SELECT * FROM telemetry_last")}
    assert last["PH"]["value"] == 5.86  # null and stub never reach telemetry_last
    assert last["EC"]["value"] == 1.4 and last["EC"]["node_id"] == ids["node_id"]
    assert set(last) == {"PH", "EC", "TEMP_AIR", "SOIL_MOISTURE"}


async def test_telemetry_last_keeps_newest_under_out_of_order_arrival(logger, db):
    s = logger.settings
    ids = await seed(db)
    topic = t(s, "gh-1", f"zn-{ids['zone_id']}", "nd-ph-1", "ph_sensor", "telemetry")
    # one burst (one batch) with the newest in the middle, then a late older one on its own
    await apublish(s, [(topic, {"metric": "PH", "value": v, "ts": NOW - age}) for v, age in
                       ((5.0, 30), (5.5, 10), (5.2, 20))])
    await wait_rows(db, 3)
    await apublish(s, [(topic, {"metric": "PH", "value": 4.0, "ts": NOW - 60})])
    await wait_rows(db, 4)
    row = await db.fetchrow("SELECT value, updated_at FROM telemetry_last WHERE metric_type = 'PH'")
    assert row["value"] == 5.5 and row["updated_at"] == dt.datetime.utcfromtimestamp(NOW - 10)
    await apublish(s, [(topic, {"metric": "PH", "value": 6.1, "ts": NOW})])
    await wait_rows(db, 5)
    await testing.eventually(lambda: db.fetchval("SELECT value = 6.1 FROM telemetry_last WHERE metric_type = 'PH'"))


async def test_node_without_zone_gets_samples_only(logger, db):
    s = logger.settings
    ids = await seed(db, zone=False)
    await apublish(s, [(t(s, "gh-1", "zn-5", "nd-ph-1", "ph_sensor", "telemetry"), {"metric": "PH", "value": 6.0})])
    await wait_rows(db, 1)
    row = await db.fetchrow("SELECT zone_id, node_id FROM telemetry_samples")
    assert (row["zone_id"], row["node_id"]) == (None, ids["node_id"])
    assert await db.fetchval("SELECT count(*) FROM telemetry_last") == 0


async def test_http_ingest_same_validation_and_write_path(logger, db):
    s = logger.settings
    ids = await seed(db)
    url = f"http://127.0.0.1:{s.history_logger_port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        ok = await http.post("/ingest/telemetry", json={"samples": [
            {"node_uid": "nd-ph-1", "zone_id": ids["zone_id"], "zone_uid": None, "metric_type": "ph", "value": 5.9,
             "ts": "2025-11-20T08:00:00+00:00", "channel": "ph_sensor", "raw": None},
            {"zone_id": ids["zone_id"], "metric_type": "EC", "value": 1.1, "ts": NOW * 1000},
        ]})
        assert ok.status_code == 200 and ok.json() == {"status": "ok", "count": 2}
        bad = await http.post("/ingest/telemetry", json={"samples": [{"node_uid": "nd-ph-1", "value": 1}]})
        assert bad.status_code == 400 and "metric_type" in bad.json()["detail"]
        bad_json = await http.post("/ingest/telemetry", content=b"{not json")
        assert bad_json.status_code == 400
        no_target = await http.post("/ingest/telemetry", json={"samples": [{"metric_type": "PH", "value": 1.0}]})
        assert no_target.status_code == 400
        assert (await http.get("/health")).json() == {"status": "ok"}
        ready = await http.get("/ready")
        assert ready.status_code == 200, ready.text
        metrics = await httpx.AsyncClient(timeout=10).get(f"http://127.0.0.1:{s.history_logger_metrics_port}/metrics")
        assert "telemetry_queue_size" in metrics.text and "telemetry_dropped_total" in metrics.text
    await wait_rows(db, 2)
    rows = {r["metric_type"]: r for r in await db.fetch("SELECT * FROM telemetry_samples")}
    assert rows["PH"]["node_id"] == ids["node_id"] and rows["PH"]["ts"] == dt.datetime(2025, 11, 20, 8, 0)
    assert rows["EC"]["node_id"] is None and rows["EC"]["zone_id"] == ids["zone_id"]
    last = {(r["metric_type"], r["node_id"]) for r in await db.fetch("SELECT * FROM telemetry_last")}
    assert last == {("PH", ids["node_id"]), ("EC", -1)}


async def test_bad_input_burst_dead_letters_each_with_reason_and_keeps_valid(logger, db):
    s = logger.settings
    ids = await seed(db)
    await seed(db, node_uid="nd-unvalidated", validated=False)
    good = t(s, "gh-1", f"zn-{ids['zone_id']}", "nd-ph-1", "ph_sensor", "telemetry")
    bad = [
        (good, b"{not json", "invalid_json"),
        (good, b'{"metric":"PH","value":"5.5"}', "invalid_payload"),
        (good, b'{"metric":"PH","value":NaN}', "nan"),
        (good, b'{"metric":"PH","value":1e999}', "nan"),
        (good, b'[1,2]', "invalid_payload"),
        (t(s, "gh-1", "", "nd-ph-1", "ph", "telemetry"), b'{"metric":"PH","value":1}', "unknown_topic"),
        (good, b'{"metric":"PH","value":1,"pad":"' + b"x" * 1_000_000 + b'"}', "too_large"),
        (t(s, "gh-1", "zn-1", "nd-ghost", "ph_sensor", "telemetry"), b'{"metric":"PH","value":1}', "unknown_node"),
        (t(s, "gh-1", "zn-1", "nd-unvalidated", "ph", "telemetry"), b'{"metric":"PH","value":1}', "unvalidated_node"),
    ]
    items = []
    for i, (topic, payload, _) in enumerate(bad):
        items.append((topic, payload))
        items.append((good, {"metric": "PH", "value": 5.0 + i / 100, "ts": NOW - 100 + i}))
    await apublish(s, items)
    await wait_rows(db, len(bad))
    client = logger.redis

    async def dead_reasons():
        entries = await client.xrange(logger.keys.dead)
        reasons = sorted(e[1][b"reason"].decode() for e in entries)
        return reasons if len(reasons) >= len(bad) else None
    reasons = await testing.eventually(dead_reasons, 20)
    assert reasons == sorted(r for _, _, r in bad)
    values = sorted(r["value"] for r in await db.fetch("SELECT value FROM telemetry_samples"))
    assert values == [5.0 + i / 100 for i in range(len(bad))]
    # still running: a later valid message is stored
    await apublish(s, [(good, {"metric": "PH", "value": 7.0})])
    await wait_rows(db, len(bad) + 1)
    assert logger.writer.alive
