"""Every safety gate in front of a dose: no command published, the refusal counted by reason."""
import pytest

from testing import (add_samples, alerts, automation_commands, events, later, metric_value, seed_zone,
                           set_telemetry)


async def _ph_node(db, z):
    return z.nodes[f"nd-ph-{z.zone_id}"]


async def stale_reading(db, z):
    await set_telemetry(db, z.zone_id, "PH", 6.3, age_sec=31 * 60, node_id=await _ph_node(db, z))


async def implausible_value(db, z):
    await set_telemetry(db, z.zone_id, "PH", 15.2, node_id=await _ph_node(db, z))


async def implausible_rate(db, z):
    await add_samples(db, z.zone_id, "PH", [(5.8, 60)])
    await set_telemetry(db, z.zone_id, "PH", 7.5, node_id=await _ph_node(db, z))


async def stuck_sensor(db, z):
    await add_samples(db, z.zone_id, "PH", [(6.3, age) for age in (4200, 3000, 2000, 1200, 600, 30)])


async def node_offline(db, z):
    await db.execute("UPDATE nodes SET status = 'offline' WHERE id = $1", await _ph_node(db, z))


async def node_silent(db, z):
    await db.execute("UPDATE nodes SET last_seen_at = now() - interval '10 minutes'")
    await db.execute("UPDATE telemetry_last SET updated_at = updated_at - interval '400 seconds'")
    await db.execute("UPDATE telemetry_samples SET ts = ts - interval '400 seconds'")


async def pending_command(db, z):
    await db.execute("INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, created_at)"
                     " VALUES ($1, $2, 'pump_acid', 'dose', '{\"dose_ml\": 1.0}', 'sent', 'c-open',"
                     " now() - interval '2 hours')", z.zone_id, await _ph_node(db, z))


async def settling(db, z):
    await db.execute("INSERT INTO zone_events (zone_id, type, details, created_at)"
                     " VALUES ($1, 'PH_CORRECTED', '{}', now() - interval '3 minutes')", z.zone_id)


async def hourly_cap(db, z):
    for i, minutes in enumerate((50, 40, 30, 20)):
        await db.execute(
            "INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, source, created_at)"
            " VALUES ($1, $2, 'pump_acid', 'dose', '{\"dose_ml\": 0.5}', 'ack', $3, 'automation',"
            " now() - make_interval(mins => $4))", z.zone_id, await _ph_node(db, z), f"c-{i}", minutes)


async def waiting_for_ec(db, z):
    await db.execute("INSERT INTO zone_events (zone_id, type, details, created_at)"
                     " VALUES ($1, 'EC_DOSING', '{}', now() - interval '4 minutes')", z.zone_id)


async def water_level_low(db, z):
    await set_telemetry(db, z.zone_id, "WATER_LEVEL", 0.18, node_id=await _ph_node(db, z))


async def pump_fault_alert(db, z):
    await db.execute("INSERT INTO alerts (zone_id, source, code, type, details, status)"
                     " VALUES ($1, 'biz', 'biz_overcurrent', 'OVERCURRENT', '{}', 'ACTIVE')", z.zone_id)


async def pump_fault_count(db, z):
    for _ in range(3):
        await db.execute("INSERT INTO alerts (zone_id, source, code, type, details, status, created_at)"
                         " VALUES ($1, 'biz', 'biz_no_flow', 'NO_FLOW', '{\"pump_channel\": \"pump_acid\"}',"
                         " 'RESOLVED', now() - interval '10 minutes')", z.zone_id)


async def no_actuator(db, z):
    await db.execute("DELETE FROM node_channels WHERE channel IN ('pump_acid', 'pump_base')")


GATES = [stale_reading, implausible_value, implausible_rate, stuck_sensor, node_offline, node_silent, pending_command, settling,
         hourly_cap, waiting_for_ec, water_level_low, pump_fault_alert, pump_fault_count, no_actuator]


@pytest.mark.parametrize("gate", GATES, ids=[g.__name__ for g in GATES])
async def test_gate_refuses_the_dose_and_counts_the_reason(db, make_engine, mqtt_probe, settings, gate):
    z = await seed_zone(db, telemetry={"PH": 6.3, "EC": 1.4})
    await gate(db, z)
    reason = gate.__name__
    before = metric_value("automation_dosing_refusals_total", metric="PH", reason=reason)
    commands_before = await db.fetchval("SELECT count(*) FROM commands")
    result = await make_engine().run_cycle()
    assert result.failed == 0
    assert f"refused:PH:{reason}" in result.contexts[z.zone_id].log
    assert metric_value("automation_dosing_refusals_total", metric="PH", reason=reason) == before + 1
    assert await db.fetchval("SELECT count(*) FROM commands") == commands_before
    assert mqtt_probe.received(f"{settings.mqtt_topic_root}/+/+/+/+/command") == []
    [skipped] = await events(db, z.zone_id, "PH_CORRECTION_SKIPPED")
    assert skipped["details"]["reason"] == reason


async def test_a_persistent_refusal_opens_an_alert_and_clears_when_dosing_can_resume(db, make_engine):
    z = await seed_zone(db, telemetry={"PH": 6.3}, age_sec=40 * 60)
    await set_telemetry(db, z.zone_id, "EC", 1.4, node_id=z.nodes[f"nd-ec-{z.zone_id}"])
    engine = make_engine()  # REFUSAL_ALERT_CYCLES = 3 in these tests
    for cycle in range(2):
        await engine.run_cycle(later(seconds=15 * cycle))
    assert await alerts(db, "DOSING_BLOCKED", z.zone_id) == []
    await engine.run_cycle(later(seconds=30))
    await engine.run_cycle(later(seconds=45))
    [alert] = await alerts(db, "DOSING_BLOCKED", z.zone_id)
    assert alert["details"]["reason"] == "stale_reading" and alert["details"]["metric"] == "PH"
    assert alert["details"]["cycles"] == 4
    assert len(await events(db, z.zone_id, "PH_CORRECTION_SKIPPED")) == 1  # only on a change of reason
    await set_telemetry(db, z.zone_id, "PH", 5.85, node_id=z.nodes[f"nd-ph-{z.zone_id}"])
    await engine.run_cycle(later(seconds=60))
    assert await alerts(db, "DOSING_BLOCKED", z.zone_id) == []
    assert [a["type"] for a in await alerts(db, "DOSING_BLOCKED", z.zone_id, status="RESOLVED")] == ["DOSING_BLOCKED"]


async def test_an_answered_command_no_longer_blocks_and_a_second_dose_waits_for_the_cooldown(db, make_engine):
    z = await seed_zone(db, telemetry={"PH": 6.3, "EC": 1.4})
    engine = make_engine()
    await engine.run_cycle()
    [first] = await automation_commands(db, z.zone_id)
    r = await engine.run_cycle(later(seconds=15))
    assert "refused:PH:pending_command" in r.contexts[z.zone_id].log
    await db.execute("UPDATE commands SET status = 'ack' WHERE cmd_id = $1", first["cmd_id"])
    r = await engine.run_cycle(later(seconds=30))
    assert "refused:PH:settling" in r.contexts[z.zone_id].log
    assert len(await automation_commands(db, z.zone_id)) == 1


async def test_broker_down_refuses_without_leaving_a_command_row(db, settings, make_engine):
    from common.mqtt import MqttClient
    z = await seed_zone(db, telemetry={"PH": 6.3, "EC": 1.4})
    engine = make_engine()
    engine.services.mqtt = MqttClient(settings, "-never-started")
    result = await engine.run_cycle()
    assert result.failed == 0 and "refused:PH:publish_failed" in result.contexts[z.zone_id].log
    assert await db.fetchval("SELECT count(*) FROM commands") == 0
