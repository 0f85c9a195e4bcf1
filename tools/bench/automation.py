"""automation-engine cycle benchmark: 1,000 and 10,000 active zones with telemetry, 10 % out of band.

    .venv/bin/python tools/bench/automation.py [--zones 1000,10000] [--out-of-band 0.1] [--samples 12]
                                               [--profile FILE]

For each size in --zones, seeds a throwaway database (on the local PostgreSQL) with N zones
(pH + EC control), each with
a pH node (ph_sensor, pump_acid, pump_base) and an EC node (ec_sensor, pump_nutrient),
telemetry_last rows (PH, EC, WATER_LEVEL) and a few PH/EC samples per zone, 30 s apart, with a little
noise (a live sensor: the jump, confirmation and stuck gates pass).
A tenth of the zones read pH 6.3 against 5.8, so one cycle publishes that many `dose` commands
(to the local Mosquitto under a private topic root) with their events.

Prints per size: one full cycle with the doses (first), one steady cycle (every gate closed
again), and the bare database reads the cycle needs (the same queries, no processing), plus the
ratios; then the cost per zone of the largest size against the smallest (it should stay flat).

Targets (issue 17): 10,000 zones < 3 s; cost per zone flat (≤ 1.2 × from the smallest size to the
largest); 1,000 zones ≤ 2 s.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "automation-engine")]

from tools.bench import result, roundtrips, schema  # noqa: E402
from tools.bench.gctime import GcTime  # noqa: E402
from common import testing  # noqa: E402
from common.db import Database  # noqa: E402
from common.mqtt import MqttClient  # noqa: E402
from common.topics import Topics  # noqa: E402
from actions import Services  # noqa: E402
from config_source import ConfigLoader  # noqa: E402
from engine import Engine, utcnow  # noqa: E402
from settings import ServiceSettings  # noqa: E402
from snapshot import load_facts, load_zones  # noqa: E402
import datetime as dt  # noqa: E402

ROUND_TRIPS = roundtrips.install()  # counts on the Database pools opened from here on
LIMITS = '{"safe_limits": {"max_duration_ms": 5000, "min_off_ms": 3000}}'
TARGET_10K_SEC = 3.0      # the largest size (10,000 zones)
TARGET_1K_SEC = 2.0       # 1,000 zones
FLAT_TARGET = 1.2         # cost per zone, largest size / smallest size


def admin_kwargs(database: str = "postgres") -> dict:
    env = testing.SHARED_ENV
    return dict(host=env["PG_HOST"], port=int(env["PG_PORT"]), user=env["PG_USER"],
                password=env["PG_PASS"] or None, database=database)


async def seed(conn: asyncpg.Connection, zones: int, out_of_band: float, samples: int) -> int:
    every = max(1, round(1 / out_of_band)) if out_of_band > 0 else zones + 1
    await conn.execute("INSERT INTO greenhouses (uid, name, timezone) SELECT 'gh-' || i, 'GH', 'UTC'"
                       " FROM generate_series(1, 10) i")
    await conn.execute(
        "INSERT INTO zones (greenhouse_id, name, status, capabilities)"
        " SELECT 1 + i % 10, 'zone ' || i, 'RUNNING', '{\"ph_control\": true, \"ec_control\": true}'"
        " FROM generate_series(1, $1) i", zones)
    await conn.execute("INSERT INTO recipes (name) VALUES ('lettuce')")
    await conn.execute("INSERT INTO recipe_phases (recipe_id, phase_index, name, duration_hours, targets)"
                       " VALUES (1, 0, 'grow', NULL, '{\"ph\": {\"min\": 5.6, \"max\": 6.0}, \"ec\": 1.4}')")
    await conn.execute("INSERT INTO zone_recipe_instances (zone_id, recipe_id, current_phase_index, started_at)"
                       " SELECT id, 1, 0, now() - interval '3 days' FROM zones")
    for kind, channels in (("ph", ["ph_sensor", "pump_acid", "pump_base"]), ("ec", ["ec_sensor", "pump_nutrient"])):
        await conn.execute("INSERT INTO nodes (uid, zone_id, type, status, validated, last_seen_at)"
                           " SELECT 'nd-' || $1 || '-' || id, id, $1, 'online', true, now() FROM zones", kind)
        await conn.execute(
            "INSERT INTO node_channels (node_id, channel, type, config)"
            " SELECT n.id, c, CASE WHEN c LIKE '%sensor' THEN 'sensor' ELSE 'actuator' END,"
            "        CASE WHEN c LIKE 'pump%' THEN $2::jsonb ELSE '{}'::jsonb END"
            " FROM nodes n CROSS JOIN unnest($3::text[]) c WHERE n.type = $1", kind, LIMITS, channels)
    await conn.execute(
        "INSERT INTO telemetry_last (zone_id, node_id, metric_type, value, updated_at)"
        " SELECT z.id, n.id, 'PH', CASE WHEN z.id % $1 = 0 THEN 6.3 ELSE 5.8 END, now() - interval '5 seconds'"
        " FROM zones z JOIN nodes n ON n.zone_id = z.id AND n.type = 'ph'", every)
    await conn.execute(
        "INSERT INTO telemetry_last (zone_id, node_id, metric_type, value, updated_at)"
        " SELECT z.id, n.id, m, CASE WHEN m = 'EC' THEN 1.4 ELSE 0.8 END, now() - interval '5 seconds'"
        " FROM zones z JOIN nodes n ON n.zone_id = z.id AND n.type = 'ec' CROSS JOIN unnest(ARRAY['EC','WATER_LEVEL']) m")
    await conn.execute(
        "INSERT INTO telemetry_samples (zone_id, node_id, metric_type, value, ts)"
        " SELECT z.id, NULL, m, CASE WHEN m = 'EC' THEN 1.4 + (k % 3) * 0.01"
        "                            WHEN z.id % $2 = 0 THEN 6.3 + (k % 3) * 0.01 ELSE 5.8 + (k % 3) * 0.01 END,"
        "        now() - make_interval(secs => k * 30)"
        " FROM zones z CROSS JOIN unnest(ARRAY['PH','EC']) m CROSS JOIN generate_series(1, $1) k", samples, every)
    await conn.execute("ANALYZE")
    return await conn.fetchval("SELECT count(*) FROM zones WHERE id % $1 = 0", every)


async def bare_reads(db: Database, options: ServiceSettings) -> float:
    started = time.perf_counter()
    await ConfigLoader(db.settings, db)._from_db()
    zones = await load_zones(db)
    await load_facts(db, zones, utcnow(), command_window=dt.timedelta(minutes=60),
                     fault_window=dt.timedelta(minutes=30), sample_count=10,
                     stuck_window=dt.timedelta(minutes=options.stuck_min_minutes))
    return time.perf_counter() - started


async def run_size(zones: int, args: argparse.Namespace) -> dict:
    name = f"hydro_bench_auto_{os.getpid()}_{zones}"
    admin = await asyncpg.connect(**admin_kwargs())
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    settings = testing.isolated_settings(PG_DB=name, LARAVEL_API_URL="", DB_POOL_MAX="10", LOG_LEVEL="warning")
    db, mqtt = Database(settings), MqttClient(settings, "-auto")
    try:
        await schema.migrate(name, args.schema)
        conn = await asyncpg.connect(**admin_kwargs(name))
        out_of_band = await seed(conn, zones, args.out_of_band, args.samples)
        await conn.close()
        await db.connect()
        await mqtt.start(wait=10)
        options = ServiceSettings.from_env(settings, {})
        engine = Engine(Services(db, mqtt, Topics(settings.mqtt_topic_root), settings, options), ConfigLoader(settings, db))

        baseline_before = statistics.median([await bare_reads(db, options) for _ in range(args.repeat)])
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        trips = ROUND_TRIPS.count
        with GcTime() as first_gc:
            first = await engine.run_cycle()
        first_trips = ROUND_TRIPS.count - trips
        if profiler:
            profiler.disable()
            path = f"{args.profile}.{zones}"
            profiler.dump_stats(path)
            print(f"profile of the first {zones}-zone cycle written to {path}; by own time:")
            pstats.Stats(path).sort_stats("tottime").print_stats(25)
        doses = await db.fetchval("SELECT count(*) FROM commands WHERE source = 'automation'")
        trips = ROUND_TRIPS.count
        with GcTime() as steady_gc:
            steady = [await engine.run_cycle(utcnow() + dt.timedelta(seconds=15 * (i + 1))) for i in range(3)]
        steady_trips = (ROUND_TRIPS.count - trips) / 3
        baseline_after = statistics.median([await bare_reads(db, options) for _ in range(args.repeat)])
    finally:
        await mqtt.stop()
        await db.close()
        admin = await asyncpg.connect(**admin_kwargs())
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    baseline = statistics.median([baseline_before, baseline_after])
    steady_sec = statistics.median(r.duration for r in steady)
    print(f"{zones} zones: {first.processed} processed ({out_of_band} out of band), failed {first.failed}, "
          f"concurrency {first.concurrency}, commands published {doses}")
    print(f"  first cycle (with the doses):    {first.duration:.3f} s = {first.duration / zones * 1000:.3f} ms/zone, "
          f"{first_trips} database round trips ({first_trips / zones:.2f} per zone, "
          f"{first_trips / max(1, doses):.1f} per dose); {first_gc}")
    print(f"  steady cycle (median of 3):      {steady_sec:.3f} s = {steady_sec / zones * 1000:.3f} ms/zone, "
          f"{steady_trips:.0f} database round trips; the 3 cycles: {steady_gc}")
    print(f"  baseline: bare database reads:   {baseline:.3f} s (median of {2 * args.repeat})")
    print(f"  ratio first / baseline:          {first.duration / baseline:.1f}x")
    print(f"  ratio steady / baseline:         {steady_sec / baseline:.1f}x", flush=True)
    return {"zones": zones, "first": first.duration, "trips": first_trips / zones, "steady": steady_sec, "baseline": baseline, "doses": doses,
            "failed": first.failed, "processed": first.processed}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zones", default="1000,10000", help="comma-separated sizes, smallest first")
    parser.add_argument("--out-of-band", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=12, help="PH and EC samples per zone, 30 s apart")
    parser.add_argument("--repeat", type=int, default=5, help="baseline repetitions (median)")
    parser.add_argument("--profile", help="cProfile the first cycle of each size to FILE.<zones> and print the top")
    parser.add_argument("--schema", choices=schema.SCHEMAS, default=schema.default(), help="database schema")
    args = parser.parse_args()
    print(f"schema: {args.schema}")

    runs = [await run_size(int(z), args) for z in args.zones.split(",")]
    rows = []
    for r in runs:
        target = TARGET_10K_SEC if r["zones"] >= 10_000 else TARGET_1K_SEC if r["zones"] >= 1000 else None
        met = r["failed"] == 0 and r["processed"] == r["zones"] and (target is None or r["first"] < target)
        rows.append(result.row(f"automation: {r['zones']}-zone cycle (with {r['doses']} doses)",
                               f"{r['first']:.3f} s ({r['trips']:.2f} round trips/zone)",
                               f"{r['baseline']:.3f} s bare DB reads", r["first"] / r["baseline"],
                               f"< {target:g} s" if target else "", met))
    if len(runs) > 1:
        small, large = runs[0], runs[-1]
        per_small, per_large = small["first"] / small["zones"], large["first"] / large["zones"]
        flat = per_large / per_small
        print(f"cost per zone: {per_large * 1000:.3f} ms at {large['zones']} zones, {per_small * 1000:.3f} ms at "
              f"{small['zones']} zones: {flat:.2f}x (target <= {FLAT_TARGET}x: flat)")
        rows.append(result.row(f"automation: cost per zone, {large['zones']} vs {small['zones']} zones",
                               f"{per_large * 1000:.3f} ms/zone", f"{per_small * 1000:.3f} ms/zone at {small['zones']}",
                               flat, f"<= {FLAT_TARGET}x (flat)", flat <= FLAT_TARGET))
    result.emit(*rows)


if __name__ == "__main__":
    asyncio.run(main())
