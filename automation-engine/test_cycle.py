"""The cycle: configuration sources, phases, errors per zone, two engines, adaptive concurrency."""
import asyncio
import datetime as dt

import pytest

from common.db import Database
from config_source import ConfigLoader
from engine import CONTROLLERS
from testing import alerts, automation_commands, events, later, metric_value, seed_zone


async def test_laravel_config_gives_each_zone_its_greenhouse(db, make_engine, laravel, mqtt_probe, settings):
    z1 = await seed_zone(db, gh_uid="gh-a", telemetry={"PH": 6.3, "EC": 1.4})
    z2 = await seed_zone(db, gh_uid="gh-b", telemetry={"PH": 6.3, "EC": 1.4})
    laravel.greenhouses = [{"id": 1, "uid": "gh-a", "zones": [{"id": z1.zone_id}]},
                           {"id": 2, "uid": "gh-b", "zones": [{"id": z2.zone_id}]}]
    result = await make_engine(laravel.url).run_cycle()
    assert result.config_source == "laravel"
    assert laravel.requests[-1]["authorization"] == "Bearer 1|secret"
    await mqtt_probe.wait_for(2, f"{settings.mqtt_topic_root}/+/+/+/+/command")
    topics = sorted(m.topic.split("/")[1:3] for m in mqtt_probe.received(f"{settings.mqtt_topic_root}/#"))
    assert topics == [["gh-a", f"zn-{z1.zone_id}"], ["gh-b", f"zn-{z2.zone_id}"]]
    assert metric_value("automation_config_source", source="laravel") == 1


@pytest.mark.parametrize("mode", ["down", "garbage", "wrong_shape"])
async def test_laravel_down_or_garbage_falls_back_to_the_database(db, make_engine, laravel, mode):
    z = await seed_zone(db, telemetry={"PH": 6.3, "EC": 1.4})
    laravel.mode = mode
    result = await make_engine(laravel.url).run_cycle()
    assert result.config_source == "db" and result.processed == 1
    assert len(await automation_commands(db, z.zone_id)) == 1
    assert metric_value("automation_config_source", source="db") == 1


async def test_laravel_unreachable_falls_back_too(db, make_engine):
    z = await seed_zone(db, telemetry={"PH": 6.3, "EC": 1.4})
    from common.testing import free_port
    result = await make_engine(f"http://127.0.0.1:{free_port()}").run_cycle()
    assert result.config_source == "db" and len(await automation_commands(db, z.zone_id)) == 1


async def test_last_good_configuration_is_kept_when_laravel_and_the_database_fail(settings, laravel):
    laravel.set_zones("gh-x", [7])
    s = settings.replace(laravel_api_url=laravel.url, laravel_api_token="1|secret")
    closed = Database(s)  # never connected: every query raises
    loader = ConfigLoader(s, closed)
    try:
        first = await loader.load()
        assert first.source == "laravel" and first.zones[7].uid == "gh-x"
        laravel.mode = "garbage"
        kept = await loader.load()
        assert kept.source == "last_good" and kept.zones[7].uid == "gh-x"
    finally:
        await loader.close()


async def test_phase_advances_by_elapsed_time_and_open_ended_phases_never_end(db, make_engine):
    phases = [(24, {"ph": 6.5}), (48, {"ph": 5.8}), (None, {"ph": 5.5})]
    z = await seed_zone(db, phases=phases, started_hours_ago=30, telemetry={"PH": 5.8, "EC": 1.4})
    engine = make_engine()
    await engine.run_cycle()
    assert await db.fetchval("SELECT current_phase_index FROM zone_recipe_instances WHERE zone_id = $1",
                             z.zone_id) == 1
    [event] = await events(db, z.zone_id, "PHASE_TRANSITION")
    assert event["details"] == {"from_phase": 0, "to_phase": 1}
    assert await automation_commands(db) == []  # phase 1 targets (5.8) were used, not phase 0's (6.5)
    await engine.run_cycle(later(minutes=60 * 24 * 400))
    assert await db.fetchval("SELECT current_phase_index FROM zone_recipe_instances WHERE zone_id = $1",
                             z.zone_id) == 2
    assert len(await events(db, z.zone_id, "PHASE_TRANSITION")) == 2


def _failing_for(zone_ids):
    async def boom(ctx):
        if ctx.zone.id in zone_ids:
            raise RuntimeError("controller bug")
    return boom


async def test_a_failing_zone_does_not_stop_the_others(db, make_engine):
    zones = [await seed_zone(db, name=f"Z{i}", telemetry={"PH": 6.3, "EC": 1.4}) for i in range(11)]
    bad = zones[3].zone_id
    before = metric_value("zone_processing_errors_total", zone_id=str(bad), error_type="boom:RuntimeError")
    engine = make_engine(controllers=[("boom", _failing_for({bad}))] + CONTROLLERS)
    result = await engine.run_cycle()
    assert result.processed == 11 and result.failed == 1
    assert len(await automation_commands(db)) == 11  # the failing zone's own other controllers ran too
    assert metric_value("zone_processing_errors_total", zone_id=str(bad), error_type="boom:RuntimeError") == before + 1
    assert await alerts(db, "SERVICE_DOWN") == []  # 1 of 11 is under 10 %


async def test_more_than_ten_percent_failing_raises_an_infra_alert_and_resolves(db, make_engine):
    zones = [await seed_zone(db, name=f"Z{i}", telemetry={"PH": 5.8, "EC": 1.4}) for i in range(5)]
    failing = {zones[0].zone_id}
    engine = make_engine(controllers=[("boom", _failing_for(failing))] + CONTROLLERS)
    await engine.run_cycle()
    [alert] = await alerts(db, "SERVICE_DOWN")
    assert (alert["source"], alert["code"]) == ("infra", "infra_service_down")
    assert alert["details"]["failed"] == 1 and alert["details"]["processed"] == 5
    failing.clear()
    await engine.run_cycle(later(seconds=15))
    assert await alerts(db, "SERVICE_DOWN") == []
    assert len(await alerts(db, "SERVICE_DOWN", status="RESOLVED")) == 1


async def test_two_engines_on_one_database_dose_each_zone_at_most_once(db, make_engine):
    zones = [await seed_zone(db, name=f"Z{i}", telemetry={"PH": 6.3, "EC": 1.4}) for i in range(6)]
    a, b = make_engine(owner="engine-a"), make_engine(owner="engine-b")
    now = later()
    ra, rb = await asyncio.gather(a.run_cycle(now), b.run_cycle(now))
    assert ra.processed + rb.processed == 6 and ra.skipped + rb.skipped == 6
    # and the other engine's next cycle, moments later, doses nothing again
    await asyncio.gather(a.run_cycle(now + dt.timedelta(seconds=1)), b.run_cycle(now + dt.timedelta(seconds=1)))
    per_zone = [len(await automation_commands(db, z.zone_id)) for z in zones]
    assert per_zone == [1] * 6


async def test_zone_status_and_capabilities_decide_what_runs(db, make_engine):
    paused = await seed_zone(db, status="PAUSED", telemetry={"PH": 6.3, "EC": 1.4})
    bare = await seed_zone(db, capabilities=None, telemetry={"PH": 6.3, "EC": 1.4}, started_hours_ago=100,
                           phases=[(24, {"ph": 5.8}), (None, {"ph": 5.5})])
    result = await make_engine().run_cycle()
    assert set(result.contexts) == {bare.zone_id}
    assert result.contexts[bare.zone_id].log == [] and result.contexts[bare.zone_id].health is not None
    assert await automation_commands(db) == []
    assert await db.fetchval("SELECT count(*) FROM zone_events") == 0  # not even a phase transition
    assert await db.fetchval("SELECT health_score FROM zones WHERE id = $1", bare.zone_id) is not None
    assert await db.fetchval("SELECT health_score FROM zones WHERE id = $1", paused.zone_id) is None


def test_adaptive_concurrency_follows_zone_count_and_time(make_engine):
    engine = make_engine()
    assert engine.concurrency(1000) == 50  # nothing measured yet
    engine.avg_zone_time = 0.3
    assert engine.concurrency(1000) == 20  # 1000 × 0.3 / 15
    assert engine.concurrency(10) == 5
    engine.avg_zone_time = 5
    assert engine.concurrency(1000) == 50
    fixed = make_engine(adaptive_concurrency=False, max_concurrent_zones=12)
    fixed.avg_zone_time = 0.3
    assert fixed.concurrency(1000) == 12


def _unwritable_event_for(zone_ids):
    async def note(ctx):
        if ctx.zone.id in zone_ids:
            await ctx.event("NOTE", {"text": "\u0000"})  # jsonb cannot hold it: PostgreSQL refuses the row
    return note


async def test_an_event_the_database_refuses_loses_only_itself(db, make_engine):
    zones = [await seed_zone(db, name=f"Z{i}", telemetry={"PH": 6.3, "EC": 1.4}) for i in range(4)]
    bad = zones[1].zone_id
    engine = make_engine(controllers=CONTROLLERS + [("note", _unwritable_event_for({bad}))])
    result = await engine.run_cycle()
    assert result.processed == 4 and result.failed == 1
    for z in zones:  # the bad zone's other events of the cycle were written all the same
        assert len(await events(db, z.zone_id, "PH_CORRECTED")) == 1
    assert await events(db, bad, "NOTE") == []
    assert await db.fetchval("SELECT count(*) FROM ai_logs") == 4


async def test_events_of_many_zones_share_a_write_and_a_refused_row_fails_its_zone_only(db, make_engine):
    good, bad = [await seed_zone(db, name=name) for name in ("G", "B")]
    writer = make_engine().services.events
    outcomes = await asyncio.gather(  # both submitted before the first write starts: one batch
        writer.submit([(good.zone_id, "NOTE", '{"n": 1}')], [(good.zone_id, "recommend", "{}")]),
        writer.submit([(bad.zone_id, "NOTE", '{"text": "\\u0000"}'), (bad.zone_id, "NOTE", '{"n": 2}')], []),
        return_exceptions=True)
    assert outcomes[0] is None and isinstance(outcomes[1], Exception)
    assert [e["details"] for e in await events(db, good.zone_id, "NOTE")] == [{"n": 1}]
    assert [e["details"] for e in await events(db, bad.zone_id, "NOTE")] == [{"n": 2}]
    assert await db.fetchval("SELECT count(*) FROM ai_logs WHERE zone_id = $1", good.zone_id) == 1


async def test_an_alert_whose_details_did_not_change_is_not_rewritten(db, make_engine):
    z = await seed_zone(db, telemetry={"PH": 6.3, "EC": 1.4})
    engine = make_engine()
    await engine.run_cycle()
    [alert] = await alerts(db, "PH_HIGH", z.zone_id)
    version = await db.fetchval("SELECT xmin::text FROM alerts WHERE id = $1", alert["id"])
    result = await engine.run_cycle(later(seconds=15))
    assert "alert:PH_HIGH" in result.contexts[z.zone_id].log  # still out of band: the alert stays open
    assert await db.fetchval("SELECT xmin::text FROM alerts WHERE id = $1", alert["id"]) == version
    assert len(await alerts(db, "PH_HIGH", z.zone_id)) == 1
