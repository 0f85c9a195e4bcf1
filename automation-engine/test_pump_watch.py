"""PUMP_STUCK_ON: water moving (flow / pump current) while no command runs a pump or valve."""
from testing import FULL_CAPS, PUMP_LIMITS, alerts, automation_commands, later, seed_zone, set_telemetry

NODES = {"nd-ph": ("ph", {"ph_sensor": {}, "pump_acid": dict(PUMP_LIMITS), "pump_base": dict(PUMP_LIMITS)}),
         "nd-irr": ("irrig", {"flow_sensor": {}, "pump_current": {}, "pump_in": dict(PUMP_LIMITS),
                              "valve_irrigation": {}}),
         "nd-clim": ("climate", {"temp_air": {}, "fan_A": {}})}


async def _command(db, z, node: str, channel: str, cmd: str, params: dict, seconds_ago: float, status="ack"):
    await db.execute("INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, source, created_at)"
                     " VALUES ($1, $2, $3, $4, $5, $6, $7, 'scheduler',"
                     " (now() AT TIME ZONE 'UTC')::timestamp - make_interval(secs => $8))",
                     z.zone_id, z.nodes[node], channel, cmd, params, status, f"c-{channel}-{seconds_ago}",
                     float(seconds_ago))


async def test_flow_with_no_pump_running_raises_pump_stuck_on_and_blocks_the_zones_pumps(db, make_engine):
    z = await seed_zone(db, telemetry={"PH": 6.4}, nodes=NODES)
    await _command(db, z, "nd-clim", "fan_A", "set_relay", {"state": True}, 300)  # a fan moves no water
    await _command(db, z, "nd-irr", "pump_in", "run_pump", {"duration_ms": 20_000}, 200)  # long over
    await set_telemetry(db, z.zone_id, "FLOW_RATE", 1.4, node_id=z.nodes["nd-irr"])
    result = await make_engine().run_cycle()
    assert result.failed == 0
    [alert] = await alerts(db, "PUMP_STUCK_ON", z.zone_id)
    assert alert["code"] == "biz_pump_stuck_on" and alert["source"] == "biz"
    assert alert["details"]["metric"] == "FLOW_RATE" and alert["details"]["value"] == 1.4
    log = result.contexts[z.zone_id].log
    assert "refused:PH:pump_fault_alert" in log  # the dose in the same cycle waits
    assert await automation_commands(db, z.zone_id) == []


async def test_current_of_a_pump_that_was_told_to_run_is_no_alert_and_a_quiet_reading_resolves(db, make_engine):
    z = await seed_zone(db, telemetry={}, nodes=NODES)
    await _command(db, z, "nd-irr", "pump_in", "run_pump", {"duration_ms": 60_000}, 10)
    await set_telemetry(db, z.zone_id, "PUMP_CURRENT", 240.0, node_id=z.nodes["nd-irr"])
    engine = make_engine()
    await engine.run_cycle()
    assert await alerts(db, "PUMP_STUCK_ON", z.zone_id) == []
    # the run ended 95 s before this reading and the current is still there: stuck on
    await set_telemetry(db, z.zone_id, "PUMP_CURRENT", 240.0, age_sec=-140, node_id=z.nodes["nd-irr"])
    r = await engine.run_cycle(later(seconds=150))
    assert "alert:PUMP_STUCK_ON" in r.contexts[z.zone_id].log
    assert len(await alerts(db, "PUMP_STUCK_ON", z.zone_id)) == 1
    await set_telemetry(db, z.zone_id, "PUMP_CURRENT", 0.0, age_sec=-160, node_id=z.nodes["nd-irr"])
    r = await engine.run_cycle(later(seconds=165))
    assert "resolved:PUMP_STUCK_ON" in r.contexts[z.zone_id].log
    assert await alerts(db, "PUMP_STUCK_ON", z.zone_id) == []
    assert len(await alerts(db, "PUMP_STUCK_ON", z.zone_id, status="RESOLVED")) == 1


async def test_an_open_valve_explains_the_flow_until_it_is_closed(db, make_engine):
    z = await seed_zone(db, telemetry={}, nodes=NODES, capabilities=None)  # observed even without capabilities
    await _command(db, z, "nd-irr", "valve_irrigation", "set_relay", {"state": True}, 1200)
    await set_telemetry(db, z.zone_id, "FLOW_RATE", 1.4, node_id=z.nodes["nd-irr"])
    engine = make_engine()
    await engine.run_cycle()
    assert await alerts(db, "PUMP_STUCK_ON", z.zone_id) == []
    await _command(db, z, "nd-irr", "valve_irrigation", "set_relay", {"state": False}, 120)  # closed 2 min ago
    await engine.run_cycle(later(seconds=15))
    assert len(await alerts(db, "PUMP_STUCK_ON", z.zone_id)) == 1


async def test_no_alert_without_fresh_evidence(db, make_engine):
    z = await seed_zone(db, telemetry={}, nodes=NODES, capabilities=FULL_CAPS)
    await set_telemetry(db, z.zone_id, "FLOW_RATE", 1.4, age_sec=300, node_id=z.nodes["nd-irr"])  # old news
    await make_engine().run_cycle()
    assert await alerts(db, "PUMP_STUCK_ON", z.zone_id) == []
