"""Scheduler benchmark: the start-up tick (catch-up) and the steady minute tick.

    .venv/bin/python tools/bench/scheduler.py [--zones 2000,10000] [--ticks 15] [--startup-limit 120]
                                              [--issue-concurrency 32] [--profile FILE]

For each size in --zones, seeds a throwaway database (on the local PostgreSQL) with that many
zones, each with an online node (pump_in + white_light), 4 irrigation times spread over the day
and a lighting window (5 items per zone); commands go to the local Mosquitto under a private
topic root. Then, in the same run and on the same database:

- baseline: `common.commands.issue_command` alone, one command per zone, --issue-concurrency at
  a time (the rate at which this machine can issue commands at all);
- the start-up tick of a fresh scheduler (what a restart or a missed interval costs): every
  zone's light state asserted once, and the irrigation times in the catch-up window, each
  claimed, executed and recorded. Reported in firings/s against the baseline. A tick still
  running after --startup-limit seconds is stopped and its rate counted from the firings done.

On the first size only: the steady tick (median and worst of --ticks consecutive minute ticks)
and the quiet tick (nothing due) against the bare database read of the schedules.

Targets (issue 17): start-up ≥ 1,000 firings/s and ≥ 0.6 × issue_command alone; steady tick ≤ 0.5 s.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scheduler")]

from tools.bench import result, roundtrips, schema  # noqa: E402
from tools.bench.gctime import GcTime  # noqa: E402
from common import testing  # noqa: E402
from common.commands import issue_command  # noqa: E402
from common.db import Database, _init_connection  # noqa: E402
from common.mqtt import MqttClient  # noqa: E402
from common.topics import Topics  # noqa: E402
from actuators import CommandSender  # noqa: E402
from engine import Scheduler  # noqa: E402
from schedules import LOAD_SQL  # noqa: E402
from settings import ServiceSettings  # noqa: E402

TIMEZONES = ["Europe/Berlin", "America/New_York", "Asia/Tokyo", "UTC", "Europe/Moscow"]
NOW = dt.datetime(2026, 6, 1, 12, 0, 30, tzinfo=dt.timezone.utc)
STARTUP_RATE_TARGET = 1000.0   # firings/s
STARTUP_RATIO_TARGET = 0.6     # × issue_command alone
STEADY_TARGET_SEC = 0.5
# A firing is done once executed (run finished or waiting for its follow-up) or recorded as missed.
DONE_SQL = "SELECT count(*) FROM scheduler_runs WHERE status <> 'running' OR followup_at IS NOT NULL"
ROUND_TRIPS = roundtrips.install()


def admin_kwargs(database: str = "postgres") -> dict:
    env = testing.SHARED_ENV
    return dict(host=env["PG_HOST"], port=int(env["PG_PORT"]), user=env["PG_USER"],
                password=env["PG_PASS"] or None, database=database)


async def seed(conn: asyncpg.Connection, zones: int) -> int:
    await conn.execute("INSERT INTO greenhouses (uid, name, timezone) SELECT 'gh-' || i, 'GH ' || i, ($1::text[])[1 + i % 5]"
                       " FROM generate_series(1, 20) i", TIMEZONES)
    await conn.execute(
        "INSERT INTO zones (greenhouse_id, name, status, capabilities)"
        " SELECT 1 + i % 20, 'zone ' || i, 'RUNNING', '{\"irrigation_control\": true}' FROM generate_series(1, $1) i",
        zones)
    await conn.execute("INSERT INTO recipes (name) SELECT 'recipe ' || i FROM generate_series(1, $1) i", zones)
    items = 0
    rows = []
    for i in range(1, zones + 1):
        base = (i * 7) % 360  # irrigation every 6 h, offset per zone, spread over the day
        times = [f"{(base + k * 360) // 60 % 24:02d}:{(base + k * 360) % 60:02d}" for k in range(4)]
        start = (i * 11) % 1440
        window = f"{start // 60:02d}:{start % 60:02d}-{(start + 960) % 1440 // 60:02d}:{(start + 960) % 60:02d}"
        rows.append((i, 0, "vegetative", {"irrigation_schedule": times, "irrigation_duration_sec": 10,
                                          "lighting_schedule": window}))
        items += len(times) + 1
    await conn.executemany("INSERT INTO recipe_phases (recipe_id, phase_index, name, targets) VALUES ($1, $2, $3, $4)",
                           rows)
    await conn.execute("INSERT INTO zone_recipe_instances (zone_id, recipe_id, current_phase_index, started_at)"
                       " SELECT i, i, 0, now() FROM generate_series(1, $1) i", zones)
    await conn.execute("INSERT INTO nodes (uid, zone_id, type, status) SELECT 'nd-' || i, i, 'irrig', 'online'"
                       " FROM generate_series(1, $1) i", zones)
    await conn.execute("INSERT INTO node_channels (node_id, channel, type) SELECT i, c, 'actuator'"
                       " FROM generate_series(1, $1) i, unnest(ARRAY['pump_in', 'white_light']) c", zones)
    await conn.execute("ANALYZE")
    return items


async def issue_alone(db: Database, mqtt: MqttClient, topics: Topics, zones: int, concurrency: int) -> float:
    """Commands/s of issue_command alone: one `set_relay` to each zone's light, `concurrency` at a time."""
    todo = iter(range(1, zones + 1))

    async def worker() -> None:
        for zone in todo:
            await issue_command(db, mqtt, topics, gh_uid=f"gh-{1 + zone % 20}", zone_id=zone, node_uid=f"nd-{zone}",
                                channel="white_light", cmd="set_relay", params={"state": False}, source="bench")
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return zones / (time.perf_counter() - started)


async def startup_tick(sched: Scheduler, db: Database, limit: float, profile: str | None) -> dict:
    """The first tick of a fresh scheduler, stopped after `limit` seconds if still running."""
    profiler = cProfile.Profile() if profile else None
    trips = ROUND_TRIPS.count
    task = asyncio.ensure_future(sched.tick(NOW))
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    gc_time = GcTime().__enter__()
    try:
        claimed = len(await asyncio.wait_for(task, limit))
        finished = True
    except asyncio.TimeoutError:
        claimed = await db.fetchval("SELECT count(*) FROM scheduler_runs")
        finished = False
        sched.last_tick = NOW  # as if it had completed: the steady ticks go on from here
    finally:
        gc_time.__exit__()
        if profiler:
            profiler.disable()
    seconds = time.perf_counter() - t0
    trips = ROUND_TRIPS.count - trips
    if profiler:
        profiler.dump_stats(profile)
        print(f"profile of the start-up tick written to {profile}; by own time:")
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    done = await db.fetchval(DONE_SQL)
    return {"claimed": claimed, "done": done, "seconds": seconds, "finished": finished, "rate": done / seconds,
            "trips": trips / max(1, done), "gc": gc_time}


async def steady_ticks(sched: Scheduler, db: Database, ticks: int) -> dict:
    tick_times, read_times, fired = [], [], 0
    for k in range(1, ticks + 1):
        t0 = time.perf_counter()
        await db.fetch(LOAD_SQL)
        read_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fired += len(await sched.tick(NOW + dt.timedelta(minutes=k)))
        tick_times.append(time.perf_counter() - t0)
    quiet_times = []
    last = NOW + dt.timedelta(minutes=ticks)
    for _ in range(ticks):  # the same instant again: nothing falls due, pure evaluation
        t0 = time.perf_counter()
        await sched.tick(last)
        quiet_times.append(time.perf_counter() - t0)
    return {"tick": statistics.median(tick_times), "worst": max(tick_times), "read": statistics.median(read_times),
            "quiet": statistics.median(quiet_times), "fired": fired}


async def run_size(zones: int, args: argparse.Namespace, steady: bool) -> tuple[list[dict], list[str]]:
    name = f"hydro_bench_sched_{os.getpid()}_{zones}"
    admin = await asyncpg.connect(**admin_kwargs())
    await admin.execute(f'CREATE DATABASE "{name}"')
    lines: list[str] = []
    rows: list[dict] = []
    try:
        await schema.migrate(name, args.schema)
        conn = await asyncpg.connect(**admin_kwargs(name))
        try:
            await _init_connection(conn)  # jsonb as Python objects, as the services' pools
            items = await seed(conn, zones)
        finally:
            await conn.close()
        settings = testing.isolated_settings(PG_DB=name, LOG_LEVEL="error")
        db = Database(settings)
        await db.connect()  # its connections count their round trips (roundtrips.install)
        mqtt = MqttClient(settings, "-scheduler")
        await mqtt.start(wait=10)
        try:
            topics = Topics(settings.mqtt_topic_root)
            sched = Scheduler(settings, ServiceSettings(), db, CommandSender(db, mqtt, topics))
            for _ in range(3):
                await db.fetch(LOAD_SQL)  # warm the plan and the caches
            trips = ROUND_TRIPS.count
            alone = await issue_alone(db, mqtt, topics, zones, args.issue_concurrency)
            alone_trips = (ROUND_TRIPS.count - trips) / zones
            profile = f"{args.profile}.{zones}" if args.profile else None
            start = await startup_tick(sched, db, args.startup_limit, profile)
            if steady:
                st = await steady_ticks(sched, db, args.ticks)
        finally:
            await mqtt.stop()
            await db.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    ratio = start["rate"] / alone
    how = "" if start["finished"] else f" -- STOPPED after {args.startup_limit:g} s, {start['done']} done"
    lines.append(f"{zones} zones, {items} schedule items")
    lines.append(f"  baseline: issue_command alone, {zones} commands, {args.issue_concurrency} at a time: "
                 f"{alone:,.0f} commands/s, {alone_trips:.1f} database round trips per command")
    lines.append(f"  start-up tick: {start['claimed']} firings claimed (every zone's light state once, irrigation in "
                 f"the catch-up window) in {start['seconds']:.2f} s{how}: {start['rate']:,.0f} firings/s, "
                 f"{start['trips']:.2f} database round trips per firing, {start['gc']}; ratio {ratio:.2f}x (target >= {STARTUP_RATE_TARGET:,.0f}/s and >= {STARTUP_RATIO_TARGET}x)")
    met = start["finished"] and start["rate"] >= STARTUP_RATE_TARGET and ratio >= STARTUP_RATIO_TARGET
    rows.append(result.row(
        f"scheduler: start-up tick, {zones} zones ({start['claimed']} firings)",
        f"{start['rate']:,.0f} firings/s ({start['seconds']:.1f} s{'' if start['finished'] else ', stopped'}; "
        f"{start['trips']:.2f} round trips/firing)",
        f"{alone:,.0f} commands/s issue_command alone", ratio,
        f">= {STARTUP_RATE_TARGET:,.0f}/s and >= {STARTUP_RATIO_TARGET}x", met))
    if steady:
        lines.append(f"  baseline: bare read of the schedules, median {st['read'] * 1000:.1f} ms")
        lines.append(f"  steady tick, minute by minute: median {st['tick'] * 1000:.1f} ms, worst {st['worst'] * 1000:.1f} "
                     f"ms over {args.ticks} ticks ({st['fired']} firings executed); ratio {st['tick'] / st['read']:.2f}x")
        lines.append(f"  quiet tick, nothing due: median {st['quiet'] * 1000:.1f} ms; ratio {st['quiet'] / st['read']:.2f}x")
        lines.append(f"  target: a tick within {STEADY_TARGET_SEC} s -> "
                     f"{'met' if st['worst'] <= STEADY_TARGET_SEC else 'NOT met'}")
        rows.append(result.row(f"scheduler: steady tick over {items} items / {zones} zones (worst of {args.ticks})",
                               f"{st['worst'] * 1000:.1f} ms", f"{st['read'] * 1000:.1f} ms bare schedule read",
                               st["tick"] / st["read"], f"<= {STEADY_TARGET_SEC * 1000:.0f} ms",
                               st["worst"] <= STEADY_TARGET_SEC))
    return rows, lines


async def main(args: argparse.Namespace) -> None:
    sizes = [int(z) for z in args.zones.split(",")]
    print(f"schema: {args.schema}")
    rows: list[dict] = []
    for i, zones in enumerate(sizes):
        size_rows, lines = await run_size(zones, args, steady=i == 0)
        print("\n".join(lines), flush=True)
        rows += size_rows
    result.emit(*rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zones", default="2000,10000", help="comma-separated sizes; steady ticks on the first")
    parser.add_argument("--ticks", type=int, default=15)
    parser.add_argument("--startup-limit", type=float, default=120.0,
                        help="stop a start-up tick still running after this many seconds")
    parser.add_argument("--issue-concurrency", type=int, default=32,
                        help="commands in flight at once for the issue_command baseline")
    parser.add_argument("--profile", help="cProfile each start-up tick to FILE.<zones> and print the top")
    parser.add_argument("--schema", choices=schema.SCHEMAS, default=schema.default(), help="database schema")
    asyncio.run(main(parser.parse_args()))
