"""Climate, lighting, irrigation, recirculation, health and the full per-zone order (contract §8.4–8.10)."""
import datetime as dt

import pytest

from common.db import Database
from targets import in_window, light_window
from testing import (FULL_CAPS, PUMP_LIMITS, add_samples, alerts, automation_commands, events, heartbeat, later,
                           seed_zone, set_telemetry)

CLIMATE_NODES = {"nd-clim": ("climate", {"temp_sensor": {}, "heater_1": {}, "fan_A": {}})}
LONG_PUMP = {"safe_limits": {"max_duration_ms": 30000, "min_off_ms": 3000}}


def cmds(rows):
    return [(r["channel"], r["cmd"], r["params"]) for r in rows]


def hhmm(delta_hours: float, tz: str = "UTC") -> str:
    import zoneinfo
    moment = dt.datetime.now(zoneinfo.ZoneInfo(tz)) + dt.timedelta(hours=delta_hours)
    return moment.strftime("%H:%M")


# -- climate -----------------------------------------------------------------------------
async def test_cold_air_turns_the_heater_on_once_with_hysteresis(db, make_engine, mqtt_probe, settings):
    z = await seed_zone(db, capabilities={"climate_control": True}, targets={"temp_air": 23, "humidity_air": 60},
                        nodes=CLIMATE_NODES, telemetry={"TEMP_AIR": 22.2})
    engine = make_engine()
    await engine.run_cycle()
    assert cmds(await automation_commands(db)) == [("heater_1", "set_relay", {"state": True}),
                                                   ("fan_A", "set_relay", {"state": False})]
    await mqtt_probe.wait_for(2, f"{settings.mqtt_topic_root}/+/+/+/+/command")
    heater_msg = mqtt_probe.payloads(f"{settings.mqtt_topic_root}/+/+/nd-clim/heater_1/command")[0]
    assert heater_msg["cmd"] == "set_relay" and heater_msg["state"] is True
    [event] = await events(db, z.zone_id, "CLIMATE_HEATING_ON")
    assert event["details"]["temp_air"] == 22.2 and event["details"]["target_temp_air"] == 23
    # unchanged state: no command, no event
    await engine.run_cycle(later(seconds=15))
    assert len(await automation_commands(db)) == 2
    # warmer but still under the target: the heater stays on (hysteresis), nothing is sent
    await set_telemetry(db, z.zone_id, "TEMP_AIR", 22.8, node_id=z.nodes["nd-clim"])
    await engine.run_cycle(later(seconds=30))
    assert len(await automation_commands(db)) == 2
    # back at the target: heater off
    await set_telemetry(db, z.zone_id, "TEMP_AIR", 23.0, node_id=z.nodes["nd-clim"])
    await engine.run_cycle(later(seconds=45))
    assert cmds(await automation_commands(db))[2:] == [("heater_1", "set_relay", {"state": False})]
    assert len(await events(db, z.zone_id, "CLIMATE_HEATING_ON")) == 1
    assert await alerts(db, "TEMP_LOW", z.zone_id) == []


async def test_an_unchanged_state_is_reasserted_after_ten_minutes_without_new_events(db, make_engine):
    z = await seed_zone(db, capabilities={"climate_control": True}, targets={"temp_air": 23},
                        nodes=CLIMATE_NODES, telemetry={"TEMP_AIR": 22.0})
    engine = make_engine()
    await engine.run_cycle()
    await db.execute("UPDATE commands SET status = 'ack'")
    await set_telemetry(db, z.zone_id, "TEMP_AIR", 22.0, age_sec=-11 * 60, node_id=z.nodes["nd-clim"])
    await engine.run_cycle(later(minutes=11))
    assert cmds(await automation_commands(db))[2:] == [("heater_1", "set_relay", {"state": True}),
                                                       ("fan_A", "set_relay", {"state": False})]
    assert len(await events(db, z.zone_id, "CLIMATE_HEATING_ON")) == 1
    assert len(await events(db, z.zone_id, "FAN_OFF")) == 1


async def test_overheat_humidity_and_co2(db, make_engine):
    z = await seed_zone(db, capabilities={"climate_control": True}, targets={"temp_air": 23, "humidity_air": 60},
                        nodes=CLIMATE_NODES, telemetry={"TEMP_AIR": 25.5, "HUMIDITY": 80, "CO2": 350})
    engine = make_engine()
    await engine.run_cycle()
    assert cmds(await automation_commands(db)) == [("heater_1", "set_relay", {"state": False}),
                                                   ("fan_A", "set_relay", {"state": True}),
                                                   ("fan_A", "set_pwm", {"value": 100})]
    for event_type in ("CLIMATE_COOLING_ON", "CLIMATE_OVERHEAT", "FAN_ON", "CO2_LOW"):
        assert len(await events(db, z.zone_id, event_type)) == 1, event_type
    [fan_on] = await events(db, z.zone_id, "FAN_ON")
    assert fan_on["details"]["mode"] == "increase_ventilation"
    assert [a["code"] for a in await alerts(db, "TEMP_HIGH", z.zone_id)] == ["biz_high_temp"]
    assert [a["code"] for a in await alerts(db, "HUMIDITY_HIGH", z.zone_id)] == ["biz_high_humidity"]
    await engine.run_cycle(later(seconds=15))
    assert len(await automation_commands(db)) == 3
    assert len(await events(db, z.zone_id, "CO2_LOW")) == 1
    assert len(await events(db, z.zone_id, "ALERT_CREATED")) == 2
    await set_telemetry(db, z.zone_id, "HUMIDITY", 59, node_id=z.nodes["nd-clim"])
    await engine.run_cycle(later(seconds=30))
    assert cmds(await automation_commands(db))[3:] == [("fan_A", "set_pwm", {"value": 50})]
    assert await alerts(db, "HUMIDITY_HIGH", z.zone_id) == []


# -- lighting ----------------------------------------------------------------------------
def test_light_windows():
    assert light_window({"light_hours": 16}) == (dt.time(6), dt.time(22))
    assert light_window({"photoperiod": "20:00-04:00"}) == (dt.time(20), dt.time(4))
    assert light_window({"light_hours": {"start": "07:30", "end": "19:00"}}) == (dt.time(7, 30), dt.time(19))
    assert light_window({"light_hours": "25:00-26:00"}) is None
    night = light_window({"light_hours": "22:00-06:00"})
    assert in_window(night, dt.time(23, 30)) and in_window(night, dt.time(6, 0)) and not in_window(night, dt.time(12))
    assert not in_window(light_window({"light_hours": 0}), dt.time(12))


async def test_light_follows_the_photoperiod_in_the_greenhouse_timezone(db, make_engine, mqtt_probe, settings):
    window = {"start": hhmm(-1, "Asia/Tokyo"), "end": hhmm(1, "Asia/Tokyo")}
    nodes = {"nd-light": ("light", {"white_light": {}})}
    tokyo = await seed_zone(db, gh_uid="gh-tokyo", timezone="Asia/Tokyo", capabilities={"light_control": True},
                            targets={"light_hours": window, "light_intensity": 80}, nodes=nodes)
    utc = await seed_zone(db, gh_uid="gh-utc", timezone="UTC", capabilities={"light_control": True},
                          targets={"light_hours": window}, nodes={"nd-light-2": ("light", {"white_light": {}})})
    engine = make_engine()
    await engine.run_cycle()
    assert cmds(await automation_commands(db, tokyo.zone_id)) == [("white_light", "set_pwm", {"value": 80})]
    assert cmds(await automation_commands(db, utc.zone_id)) == [("white_light", "set_relay", {"state": False})]
    [msg] = await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/gh-tokyo/+/nd-light/white_light/command")
    payload = mqtt_probe.payloads(msg.topic)[0]
    assert payload["cmd"] == "set_pwm" and payload["value"] == 80 and payload["cmd_id"]
    assert len(await events(db, tokyo.zone_id, "LIGHT_ON")) == 1
    assert len(await events(db, utc.zone_id, "LIGHT_OFF")) == 1
    await engine.run_cycle(later(seconds=15))
    assert len(await automation_commands(db)) == 2  # no repeat


async def test_light_failure_when_lux_stays_low_and_scheduler_owned_zones_are_left_alone(db, make_engine):
    window = {"start": hhmm(-1), "end": hhmm(1)}
    z = await seed_zone(db, capabilities={"light_control": True}, targets={"light_hours": window},
                        nodes={"nd-light": ("light", {"white_light": {}})})
    owned = await seed_zone(db, capabilities={"light_control": True},
                            targets={"light_hours": window, "lighting_schedule": "06:00-22:00"},
                            nodes={"nd-light-s": ("light", {"white_light": {}})})
    engine = make_engine()
    await engine.run_cycle()
    await set_telemetry(db, z.zone_id, "LUX", 3.0, age_sec=-120, node_id=z.nodes["nd-light"])
    await engine.run_cycle(later(minutes=2))
    [alert] = await alerts(db, "LIGHT_FAILURE", z.zone_id)
    assert alert["code"] == "biz_light_failure" and alert["details"]["lux"] == 3.0
    assert len(await events(db, z.zone_id, "LIGHT_FAILURE")) == 1
    assert await automation_commands(db, owned.zone_id) == []
    await set_telemetry(db, z.zone_id, "LUX", 900.0, age_sec=-180, node_id=z.nodes["nd-light"])
    await engine.run_cycle(later(minutes=3))
    assert await alerts(db, "LIGHT_FAILURE", z.zone_id) == []


# -- irrigation and recirculation ---------------------------------------------------------
IRRIGATION = {"nd-irr": ("irrig", {"pump_in": LONG_PUMP, "flow_sensor": {}})}


async def test_interval_irrigation_fires_at_once_then_every_interval(db, make_engine, mqtt_probe, settings):
    z = await seed_zone(db, capabilities={"irrigation_control": True},
                        targets={"irrigation_interval_sec": 900, "irrigation_duration_sec": 8},
                        nodes=IRRIGATION, telemetry={"WATER_LEVEL": 0.8})
    engine = make_engine()
    await engine.run_cycle()
    assert cmds(await automation_commands(db)) == [("pump_in", "run_pump", {"duration_ms": 8000})]
    [msg] = await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/+/nd-irr/pump_in/command")
    assert mqtt_probe.payloads(msg.topic)[0]["duration_ms"] == 8000
    [event] = await events(db, z.zone_id, "IRRIGATION_STARTED")
    assert event["details"]["interval_sec"] == 900 and event["details"]["last_irrigation_time"] is None
    await db.execute("UPDATE commands SET status = 'ack'")
    await engine.run_cycle(later(seconds=60))
    assert len(await automation_commands(db)) == 1
    await heartbeat(db, minutes_ahead=16)
    await set_telemetry(db, z.zone_id, "WATER_LEVEL", 0.8, age_sec=-16 * 60, node_id=z.nodes["nd-irr"])
    await db.execute("UPDATE commands SET sent_at = sent_at - interval '16 minutes'")  # the pump's min_off, in the same time
    await engine.run_cycle(later(minutes=16))
    assert len(await automation_commands(db)) == 2
    assert (await events(db, z.zone_id, "IRRIGATION_STARTED"))[1]["details"]["elapsed_sec"] >= 900


async def _offline(db, z):
    await db.execute("UPDATE nodes SET status = 'offline'")


async def _low_water(db, z):
    await set_telemetry(db, z.zone_id, "WATER_LEVEL", 0.1, node_id=z.nodes["nd-irr"])


async def _fault(db, z):
    await db.execute("INSERT INTO alerts (zone_id, source, code, type, details, status)"
                     " VALUES ($1, 'biz', 'biz_no_flow', 'NO_FLOW', '{\"pump_channel\": \"pump_in\"}', 'ACTIVE')",
                     z.zone_id)


async def _silent(db, z):
    await db.execute("UPDATE nodes SET last_seen_at = now() - interval '1 hour'")
    await db.execute("UPDATE telemetry_last SET updated_at = now() - interval '20 minutes'")


@pytest.mark.parametrize("gate", [_offline, _low_water, _fault, _silent], ids=lambda g: g.__name__.strip("_"))
async def test_irrigation_respects_every_pump_gate(db, make_engine, gate):
    z = await seed_zone(db, capabilities={"irrigation_control": True}, targets={"irrigation_interval_sec": 600},
                        nodes=IRRIGATION, telemetry={"WATER_LEVEL": 0.8})
    await gate(db, z)
    engine = make_engine()
    await engine.run_cycle()
    assert await automation_commands(db) == []
    assert await events(db, z.zone_id, "IRRIGATION_STARTED") == []
    if gate is _low_water:
        assert len(await alerts(db, "WATER_LEVEL_LOW", z.zone_id)) == 1
        assert [a["code"] for a in await alerts(db, "DRY_RUN", z.zone_id)] == ["biz_dry_run"]
        assert len(await events(db, z.zone_id, "WATER_LEVEL_LOW")) == 1
        await set_telemetry(db, z.zone_id, "WATER_LEVEL", 0.7, node_id=z.nodes["nd-irr"])
        await engine.run_cycle(later(seconds=15))
        assert await alerts(db, "WATER_LEVEL_LOW", z.zone_id) == [] and await alerts(db, "DRY_RUN", z.zone_id) == []
        assert len(await automation_commands(db)) == 1  # and irrigation goes ahead


async def test_recirculation_runs_when_enabled_and_due(db, make_engine):
    nodes = {"nd-rec": ("recirculation", {"recirculation_pump": {}})}
    on = await seed_zone(db, capabilities={"recirculation": True}, nodes=nodes, telemetry={"WATER_LEVEL": 0.9},
                         targets={"recirculation_enabled": True, "recirculation_interval_min": 30})
    off = await seed_zone(db, capabilities={"recirculation": True}, telemetry={"WATER_LEVEL": 0.9},
                          nodes={"nd-rec-2": ("recirculation", {"recirculation_pump": {}})},
                          targets={"recirculation_enabled": False, "recirculation_interval_min": 30})
    engine = make_engine()
    await engine.run_cycle()
    assert cmds(await automation_commands(db, on.zone_id)) == [("recirculation_pump", "run_pump",
                                                                {"duration_ms": 60000})]
    [event] = await events(db, on.zone_id, "RECIRCULATION_CYCLE")
    assert event["details"]["duration_sec"] == 300 and event["details"]["commanded_duration_ms"] == 60000
    assert await automation_commands(db, off.zone_id) == []
    await db.execute("UPDATE commands SET status = 'ack'")
    await engine.run_cycle(later(minutes=5))
    assert len(await automation_commands(db, on.zone_id)) == 1


# -- health ------------------------------------------------------------------------------
async def test_health_score_and_status_are_written(db, make_engine):
    calm = await seed_zone(db, telemetry={"PH": 5.8, "EC": 1.4})
    await add_samples(db, calm.zone_id, "PH", [(5.8, 600), (5.82, 300), (5.81, 100)])
    await add_samples(db, calm.zone_id, "EC", [(1.40, 600), (1.41, 300), (1.40, 100)])
    troubled = await seed_zone(db, telemetry={"PH": 5.8, "EC": 1.4, "WATER_LEVEL": 0.1}, node_status="offline",
                               history=-1)  # no samples at all
    for alert_type in ("TEMP_HIGH", "NODE_OFFLINE", "CONFIG_ERROR"):
        await db.execute("INSERT INTO alerts (zone_id, type, details) VALUES ($1, $2, '{}')", troubled.zone_id,
                         alert_type)
    await make_engine().run_cycle()
    rows = {r["id"]: (float(r["health_score"]), r["health_status"])
            for r in await db.fetch("SELECT id, health_score, health_status FROM zones")}
    # calm: ph 100, ec 100, climate 100, alerts 100, nodes 100, water 100, flow none 50
    assert rows[calm.zone_id] == (97.5, "ok")
    # troubled: ph 50, ec 50, climate 100, alerts 100-15*3 = 55, nodes 0, water 30, flow 50
    assert rows[troubled.zone_id] == (50.0, "warning")


# -- the whole zone ----------------------------------------------------------------------
FULL_NODES = {
    "nd-ph": ("ph", {"ph_sensor": {}, "pump_acid": PUMP_LIMITS, "pump_base": PUMP_LIMITS}),
    "nd-ec": ("ec", {"ec_sensor": {}, "pump_nutrient": PUMP_LIMITS}),
    "nd-clim": ("climate", {"heater_1": {}, "fan_A": {}}),
    "nd-light": ("light", {"white_light": {}}),
    "nd-irr": ("irrig", {"pump_in": LONG_PUMP}),
    "nd-rec": ("recirculation", {"recirculation_pump": {}}),
}
FULL_TARGETS = {"ph": 5.8, "ec": 1.4, "temp_air": 23, "humidity_air": 60, "light_hours": 24,
                "irrigation_interval_sec": 900, "irrigation_duration_sec": 5, "recirculation_enabled": True,
                "recirculation_interval_min": 60}


class CountingDatabase(Database):
    fetches = 0

    async def fetch(self, sql, *args, timeout=None):
        # Controller reads only: common.commands batches its own queries per group of commands.
        statement = sql.lstrip().upper()
        issuing = statement.startswith(("UPDATE", "WITH LOCKED", "WITH INSERTED")) or "WHERE n.uid = ANY($1::text[])" in sql
        if not issuing:
            CountingDatabase.fetches += 1
        return await super().fetch(sql, *args, timeout=timeout)


async def test_a_zone_with_every_capability_runs_every_controller_in_order_from_one_batched_read(
        db, settings, make_engine):
    async def full_zone(i):
        return await seed_zone(db, gh_uid=f"gh-{i}", name=f"Z{i}", capabilities=FULL_CAPS, targets=FULL_TARGETS,
                               nodes={f"{uid}-{i}": spec for uid, spec in FULL_NODES.items()},
                               telemetry={"PH": 5.8, "EC": 1.0, "TEMP_AIR": 20.0, "HUMIDITY": 60,
                                          "WATER_LEVEL": 0.9})
    counting = CountingDatabase(settings)
    await counting.connect()
    try:
        z = await full_zone(0)
        engine = make_engine()
        engine.services.db = counting
        engine.config.db = counting
        CountingDatabase.fetches = 0
        result = await engine.run_cycle()
        order = [entry.split(":")[2] for entry in result.contexts[z.zone_id].log if entry.startswith("command:")]
        assert order == ["white_light", "heater_1", "fan_A", "fan_A", "pump_in", "recirculation_pump", "pump_nutrient"]
        assert result.contexts[z.zone_id].health is not None
        CountingDatabase.fetches = 0
        await engine.run_cycle(later(seconds=15))  # now with a recent dose: its after-dose read too
        reads_for_one = CountingDatabase.fetches
        for i in (1, 2, 3):
            await full_zone(i)
        CountingDatabase.fetches = 0
        result = await engine.run_cycle(later(seconds=30))
        assert result.processed == 4 and result.failed == 0
        assert CountingDatabase.fetches == reads_for_one  # the same queries, whatever the number of zones
    finally:
        await counting.close()


async def test_every_fan_of_the_zone_is_driven(db, make_engine):
    nodes = {"nd-clim": ("climate", {"fan_A": {}, "fan_B": {}, "exhaust_fan": {}})}
    await seed_zone(db, capabilities={"climate_control": True}, targets={"humidity_air": 60}, nodes=nodes,
                    telemetry={"HUMIDITY": 70})
    await make_engine().run_cycle()
    assert cmds(await automation_commands(db)) == [("fan_A", "set_pwm", {"value": 100}),
                                                   ("fan_B", "set_pwm", {"value": 100}),
                                                   ("exhaust_fan", "set_pwm", {"value": 100})]
