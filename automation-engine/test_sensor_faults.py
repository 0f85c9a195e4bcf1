"""Lying sensors and poisoned data: a stuck, jumping or absurd reading never doses, and one zone's
data never fails another zone's cycle."""

from testing import add_samples, automation_commands, later, metric_value, seed_zone, set_telemetry


async def _cycle_log(engine, zone_id, at=None):
    result = await engine.run_cycle(at)
    return result, result.contexts[zone_id].log


# -- stuck sensor (the readings stayed within a tolerance for STUCK_MIN_MINUTES) ---------------
async def test_identical_float_readings_are_a_stuck_sensor(db, make_engine):
    """99 readings of 6.6: PostgreSQL's stddev_samp of them is 6.86e-15, not 0."""
    z = await seed_zone(db, telemetry={"PH": 6.6}, history=0)
    assert await db.fetchval("SELECT stddev_samp(6.6::float8) FROM generate_series(1, 99)") != 0
    await add_samples(db, z.zone_id, "PH", [(6.6, 10 + 45 * k) for k in range(99)])  # the last 74 min
    result, log = await _cycle_log(make_engine(), z.zone_id)
    assert "refused:PH:stuck_sensor" in log
    assert await automation_commands(db, z.zone_id) == []


async def test_a_sensor_that_sticks_after_varying_is_caught_after_stuck_min_minutes(db, make_engine):
    z = await seed_zone(db, telemetry={"PH": 6.6}, history=0)
    varying = [(6.2 + 0.1 * (k % 5), 3900 + 60 * k) for k in range(40)]  # 65 .. 105 min ago, moving
    stuck = [(6.6, 10 + 60 * k) for k in range(63)]                        # the last 63 min: one value
    await add_samples(db, z.zone_id, "PH", varying + stuck)
    result, log = await _cycle_log(make_engine(), z.zone_id)
    assert "refused:PH:stuck_sensor" in log
    assert await automation_commands(db, z.zone_id) == []


async def test_a_live_sensor_and_a_young_flat_one_are_not_stuck(db, make_engine):
    live = await seed_zone(db, name="live", telemetry={"PH": 6.6}, history=0)
    noisy = [(6.6 + (0.01 if k % 2 else -0.01), 10 + 60 * k) for k in range(70)]
    await add_samples(db, live.zone_id, "PH", noisy[1:])
    young = await seed_zone(db, name="young", gh_uid="gh-2", telemetry={"PH": 6.6}, history=0)
    await add_samples(db, young.zone_id, "PH", [(6.6, 10 + 60 * k) for k in range(30)])  # 30 min of history only
    await make_engine().run_cycle()
    assert [c["cmd"] for c in await automation_commands(db, live.zone_id)] == ["dose"]
    assert [c["cmd"] for c in await automation_commands(db, young.zone_id)] == ["dose"]


async def test_a_probe_that_does_not_move_through_a_dose_is_stuck_without_waiting_an_hour(db, make_engine):
    still = await seed_zone(db, name="still", telemetry={"PH": 6.6}, history=0)
    moving = await seed_zone(db, name="moving", gh_uid="gh-2", telemetry={"PH": 6.6}, history=0)
    for z, wobble in ((still, 0.0), (moving, 0.01)):
        await add_samples(db, z.zone_id, "PH", [(6.6 + (wobble if k % 2 else 0.0), 10 + 30 * k) for k in range(24)])
        await db.execute(  # an acid dose 11 min ago (the settling time is 10 min); 12 min of samples around it
            "INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, source, created_at)"
            " VALUES ($1, $2, 'pump_acid', 'dose', '{\"dose_ml\": 2.0}', 'ack', $3, 'automation',"
            " (now() AT TIME ZONE 'UTC')::timestamp - interval '11 minutes')",
            z.zone_id, z.nodes[f"nd-ph-{z.zone_id}"], f"dose-{z.zone_id}")
    result = await make_engine().run_cycle()
    assert "refused:PH:stuck_sensor" in result.contexts[still.zone_id].log
    assert [c["cmd_id"] for c in await automation_commands(db, still.zone_id)] == [f"dose-{still.zone_id}"]
    assert "command:dose:pump_acid" in result.contexts[moving.zone_id].log


# -- jumps: judged against the median of the samples before, and confirmed ------------------------
async def test_two_spikes_in_a_row_do_not_dose(db, make_engine):
    """True pH about 6.7 (in band); two readings of 4.78 in a row must not give a base dose."""
    z = await seed_zone(db, telemetry={}, targets={"ph": {"min": 6.5, "max": 6.9}})
    node = z.nodes[f"nd-ph-{z.zone_id}"]
    await add_samples(db, z.zone_id, "PH", [(6.7 + 0.01 * (k % 3), 9 + 3 * k) for k in range(10)])
    await set_telemetry(db, z.zone_id, "PH", 4.78, history=1, node_id=node)  # 3 s ago and now
    before = metric_value("automation_dosing_refusals_total", metric="PH", reason="implausible_rate")
    result, log = await _cycle_log(make_engine(), z.zone_id)
    assert "refused:PH:implausible_rate" in log
    assert metric_value("automation_dosing_refusals_total", metric="PH", reason="implausible_rate") == before + 1
    assert await automation_commands(db, z.zone_id) == []


async def test_a_reading_is_acted_on_only_once_confirmed(db, make_engine):
    z = await seed_zone(db, telemetry={"PH": 6.3}, history=-1)  # no sample before it: nothing to judge it by
    engine = make_engine()
    result, log = await _cycle_log(engine, z.zone_id)
    assert "refused:PH:unconfirmed_reading" in log
    node = z.nodes[f"nd-ph-{z.zone_id}"]
    await add_samples(db, z.zone_id, "PH", [(6.05, 10 + 5 * k) for k in range(5)])
    await set_telemetry(db, z.zone_id, "PH", 6.3, history=0, node_id=node)  # 0.25 away from the one before
    result, log = await _cycle_log(engine, z.zone_id, later(seconds=15))
    assert "refused:PH:unconfirmed_reading" in log and await automation_commands(db, z.zone_id) == []
    await set_telemetry(db, z.zone_id, "PH", 6.31, age_sec=-3, history=0, node_id=node)  # the next one agrees
    await engine.run_cycle(later(seconds=30))
    assert [c["cmd"] for c in await automation_commands(db, z.zone_id)] == ["dose"]


# -- absurd values and one zone's poisoned data ----------------------------------------------------
async def test_absurd_readings_neither_overflow_nor_stop_other_zones(db, make_engine):
    poisoned = await seed_zone(db, name="poisoned", telemetry={"PH": 6.3, "EC": 1.4})
    await add_samples(db, poisoned.zone_id, "PH", [(1e308, 20), (-1e308, 15), (1e308, 12)])
    await add_samples(db, poisoned.zone_id, "EC", [(-1e308, 20), (1e308, 15)])
    healthy = await seed_zone(db, name="healthy", gh_uid="gh-2", telemetry={"PH": 6.3, "EC": 1.4})
    engine = make_engine()
    result = await engine.run_cycle()
    assert result.failed == 0 and result.processed == 2
    # absurd samples are left out of the statistics: the poisoned zone's reading is judged and dosed normally
    assert [c["cmd"] for c in await automation_commands(db, healthy.zone_id)] == ["dose"]
    assert [c["cmd"] for c in await automation_commands(db, poisoned.zone_id)] == ["dose"]
    await set_telemetry(db, poisoned.zone_id, "PH", 1e308, node_id=poisoned.nodes[f"nd-ph-{poisoned.zone_id}"])
    result, log = await _cycle_log(engine, poisoned.zone_id, later(seconds=15))
    assert result.failed == 0 and "refused:PH:implausible_value" in log


async def test_a_zone_whose_data_cannot_be_read_fails_alone(db, make_engine):
    """A channel config PostgreSQL stores but no decoder can read (a number beyond float) fails the
    batched read; the zone is read alone, counted as failed, and every other zone runs."""
    poisoned = await seed_zone(db, name="poisoned", telemetry={"PH": 6.3, "EC": 1.4})
    await db.execute("UPDATE node_channels SET config = '{\"ml_per_second\": 1e400}'::jsonb"
                     " WHERE node_id = $1 AND channel = 'pump_acid'", poisoned.nodes[f"nd-ph-{poisoned.zone_id}"])
    healthy = await seed_zone(db, name="healthy", gh_uid="gh-2", telemetry={"PH": 6.3, "EC": 1.4})
    before = metric_value("zone_processing_errors_total", zone_id=str(poisoned.zone_id),
                          error_type="read:JSONDecodeError")
    result = await make_engine().run_cycle()
    assert (result.processed, result.failed) == (2, 1)
    assert metric_value("zone_processing_errors_total", zone_id=str(poisoned.zone_id),
                        error_type="read:JSONDecodeError") == before + 1
    assert [c["cmd"] for c in await automation_commands(db, healthy.zone_id)] == ["dose"]
    assert await automation_commands(db, poisoned.zone_id) == []


async def test_a_zone_whose_recipe_or_settings_cannot_be_read_fails_alone(db, make_engine):
    bad_recipe = await seed_zone(db, name="bad recipe", telemetry={"PH": 6.3})
    await db.execute("UPDATE recipe_phases SET targets = '{\"ph\": 5.8, \"ec\": 1e400}'::jsonb WHERE recipe_id = $1",
                     bad_recipe.recipe_id)
    bad_settings = await seed_zone(db, name="bad settings", gh_uid="gh-2", telemetry={"PH": 6.3})
    await db.execute("UPDATE zones SET settings = '{\"water_cycle\": {\"x\": -1e999}}'::jsonb WHERE id = $1",
                     bad_settings.zone_id)
    healthy = await seed_zone(db, name="healthy", gh_uid="gh-3", telemetry={"PH": 6.3})
    result = await make_engine().run_cycle()
    assert (result.processed, result.failed) == (3, 2)
    assert result.contexts[bad_recipe.zone_id].log == ["read_failed:ValueError"]
    assert result.contexts[bad_settings.zone_id].log == ["read_failed:ValueError"]
    assert [c["cmd"] for c in await automation_commands(db, healthy.zone_id)] == ["dose"]
