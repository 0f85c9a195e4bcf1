"""pH / EC corrections: direction, size, caps, events (contract §8.3)."""
import pytest

from testing import (add_samples, alerts, automation_commands, events, heartbeat, later, metric_value,
                           seed_zone, set_telemetry)


async def test_ph_high_doses_acid_with_a_dose_sized_to_the_error(db, make_engine, mqtt_probe, settings):
    z = await seed_zone(db, telemetry={"PH": 6.1, "EC": 1.4})
    before = metric_value("automation_corrections_total", pump="pump_acid", reason="ph_high")
    result = await make_engine().run_cycle()
    assert result.processed == 1 and result.failed == 0
    [cmd] = await automation_commands(db, z.zone_id)
    assert (cmd["channel"], cmd["cmd"], cmd["params"], cmd["status"]) == ("pump_acid", "dose", {"dose_ml": 3.0}, "sent")
    [msg] = await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/+/+/+/command")
    assert msg.topic == f"{settings.mqtt_topic_root}/gh-1/zn-{z.zone_id}/nd-ph-{z.zone_id}/pump_acid/command"
    payload = mqtt_probe.payloads(msg.topic)[0]
    assert payload["cmd"] == "dose" and payload["dose_ml"] == 3.0 and payload["cmd_id"] == cmd["cmd_id"]
    [event] = await events(db, z.zone_id, "PH_CORRECTED")
    assert event["details"]["current_ph"] == 6.1 and event["details"]["target_ph"] == 5.8
    assert event["details"]["dose_ml"] == 3.0 and event["details"]["correction_type"] == "add_acid"
    assert len(await events(db, z.zone_id, "DOSING")) == 1
    assert await db.fetchval("SELECT count(*) FROM ai_logs WHERE zone_id = $1 AND action = 'recommend'", z.zone_id) == 1
    assert metric_value("automation_corrections_total", pump="pump_acid", reason="ph_high") == before + 1


async def test_ph_low_doses_base(db, make_engine):
    z = await seed_zone(db, telemetry={"PH": 5.35, "EC": 1.4})
    await make_engine().run_cycle()
    [cmd] = await automation_commands(db, z.zone_id)
    assert (cmd["channel"], cmd["cmd"], cmd["params"]) == ("pump_base", "dose", {"dose_ml": 4.5})


@pytest.mark.parametrize("ph, dose", [(6.05, 2.5), (6.25, 4.5), (7.0, 5.0)])
async def test_ph_dose_follows_the_error_and_never_exceeds_the_cap(db, make_engine, ph, dose):
    z = await seed_zone(db, telemetry={"PH": ph})
    await make_engine().run_cycle()
    [cmd] = await automation_commands(db, z.zone_id)
    assert cmd["params"]["dose_ml"] == dose


async def test_ph_dose_is_capped_by_the_channel_safe_limits(db, make_engine):
    limits = {"ml_per_second": 0.5, "safe_limits": {"max_duration_ms": 4000, "min_off_ms": 1000}}
    z = await seed_zone(db, telemetry={"PH": 7.0},
                        nodes={"nd-ph": ("ph", {"ph_sensor": {}, "pump_acid": limits, "pump_base": limits})})
    await make_engine().run_cycle()
    [cmd] = await automation_commands(db, z.zone_id)
    assert cmd["params"]["dose_ml"] == 2.0  # 4 s at 0.5 ml/s


async def test_ec_low_runs_the_nutrient_pump_for_a_time_sized_to_the_error(db, make_engine, mqtt_probe, settings):
    config = {"ml_per_second": 20.0, "safe_limits": {"max_duration_ms": 5000, "min_off_ms": 3000}}
    z = await seed_zone(db, telemetry={"EC": 1.1, "PH": 5.8},
                        nodes={"nd-ec": ("ec", {"ec_sensor": {}, "pump_nutrient": config})})
    await make_engine().run_cycle()
    [cmd] = await automation_commands(db, z.zone_id)
    assert (cmd["channel"], cmd["cmd"], cmd["params"]) == ("pump_nutrient", "run_pump", {"duration_ms": 1500})
    [msg] = await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/#")
    assert mqtt_probe.payloads(msg.topic)[0]["duration_ms"] == 1500
    [event] = await events(db, z.zone_id, "EC_DOSING")
    assert event["details"]["current_ec"] == 1.1 and event["details"]["dose_ml"] == 30.0


async def test_ec_pump_time_never_exceeds_the_channel_limit(db, make_engine):
    z = await seed_zone(db, telemetry={"EC": 0.5})  # 90 ml at 1 ml/s would be 90 s
    await make_engine().run_cycle()
    [cmd] = await automation_commands(db, z.zone_id)
    assert cmd["params"] == {"duration_ms": 5000}
    assert [a["details"]["current_ec"] for a in await alerts(db, "EC_LOW", z.zone_id)] == [0.5]


async def test_inside_the_dead_band_nothing_happens(db, make_engine, mqtt_probe, settings):
    z = await seed_zone(db, targets={"ph": {"min": 5.6, "max": 6.0}, "ec": 1.4}, telemetry={"PH": 5.95, "EC": 1.55})
    result = await make_engine().run_cycle()
    assert result.processed == 1
    assert await automation_commands(db) == []
    assert await db.fetchval("SELECT count(*) FROM zone_events WHERE zone_id = $1", z.zone_id) == 0
    assert mqtt_probe.received(f"{settings.mqtt_topic_root}/#") == []
    assert await db.fetchval("SELECT health_status FROM zones WHERE id = $1", z.zone_id) is not None


async def test_ec_high_has_no_actuator_and_raises_an_alert_once(db, make_engine):
    z = await seed_zone(db, telemetry={"EC": 2.0, "PH": 5.8})
    engine = make_engine()
    await engine.run_cycle()
    await engine.run_cycle(later(seconds=20))
    assert await automation_commands(db) == []
    [alert] = await alerts(db, "EC_HIGH", z.zone_id)
    assert alert["code"] == "biz_high_ec" and alert["details"]["current_ec"] == 2.0
    assert len(await events(db, z.zone_id, "ALERT_CREATED")) == 1
    await set_telemetry(db, z.zone_id, "EC", 1.45, age_sec=-20, node_id=z.nodes[f"nd-ph-{z.zone_id}"])
    await engine.run_cycle(later(seconds=40))
    assert await alerts(db, "EC_HIGH", z.zone_id) == []
    assert len(await events(db, z.zone_id, "ALERT_RESOLVED")) == 1


async def test_ec_is_corrected_first_and_ph_waits_for_the_nutrient_to_settle(db, make_engine):
    z = await seed_zone(db, telemetry={"EC": 1.0, "PH": 6.3})
    engine = make_engine()
    await engine.run_cycle()
    assert [c["channel"] for c in await automation_commands(db, z.zone_id)] == ["pump_nutrient"]
    [skipped] = await events(db, z.zone_id, "PH_CORRECTION_SKIPPED")
    assert skipped["details"]["reason"] == "waiting_for_ec"
    await db.execute("UPDATE commands SET status = 'ack'")
    await engine.run_cycle(later(minutes=5))  # still settling
    assert len(await automation_commands(db, z.zone_id)) == 1
    await set_telemetry(db, z.zone_id, "EC", 1.35, node_id=z.nodes[f"nd-ph-{z.zone_id}"])
    await heartbeat(db, minutes_ahead=11)
    await engine.run_cycle(later(minutes=11))
    assert [c["channel"] for c in await automation_commands(db, z.zone_id)] == ["pump_nutrient", "pump_acid"]


async def test_trend_improving_skips_the_correction(db, make_engine):
    z = await seed_zone(db, telemetry={"PH": 6.1}, history=0)
    await add_samples(db, z.zone_id, "PH", [(6.4, 300), (6.25, 200), (6.15, 100)])
    await make_engine().run_cycle()
    assert await automation_commands(db) == []
    [skipped] = await events(db, z.zone_id, "PH_CORRECTION_SKIPPED")
    assert skipped["details"]["reason"] == "trend_improving"


async def test_alerts_open_beyond_the_threshold_but_never_inside_the_band(db, make_engine):
    wide = await seed_zone(db, targets={"ph": {"min": 5.5, "max": 6.5}, "ec": 1.4}, telemetry={"PH": 6.45, "EC": 1.4})
    narrow = await seed_zone(db, targets={"ph": 5.8, "ec": 1.4}, telemetry={"PH": 5.45, "EC": 1.4})
    await make_engine().run_cycle()
    assert await alerts(db, "PH_HIGH", wide.zone_id) == []
    assert await automation_commands(db, wide.zone_id) == []
    [low] = await alerts(db, "PH_LOW", narrow.zone_id)
    assert low["code"] == "biz_low_ph" and low["details"]["current_ph"] == 5.45
    assert len(await events(db, narrow.zone_id, "PH_TOO_LOW_DETECTED")) == 1
