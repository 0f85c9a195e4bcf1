"""Scheduler tick benchmark: 10,000 schedule items across 2,000 zones.

    .venv/bin/python tools/bench/scheduler.py [--zones 2000] [--ticks 15]

Seeds a throwaway database (on the local PostgreSQL) with 2,000 zones, each with an online node
(pump_in + white_light), 4 irrigation times spread over the day and a lighting window (5 items
per zone). Prints the duration of one steady tick (median and worst of --ticks consecutive
minute ticks, commands published to the local Mosquitto under a private topic root) against the
bare database read of those schedules in the same run, and the ratio. The start-up tick, which
asserts every zone's light state once, is printed separately.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scheduler")]

from tools.bench import result  # noqa: E402
from common import testing  # noqa: E402
from common.db import Database  # noqa: E402
from common.migrate import apply_migrations  # noqa: E402
from common.mqtt import MqttClient  # noqa: E402
from common.topics import Topics  # noqa: E402
from actuators import CommandSender  # noqa: E402
from config import SchedulerConfig  # noqa: E402
from engine import Scheduler  # noqa: E402
from schedules import LOAD_SQL  # noqa: E402

TIMEZONES = ["Europe/Berlin", "America/New_York", "Asia/Tokyo", "UTC", "Europe/Moscow"]


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


async def main(zones: int, ticks: int) -> None:
    name = f"hydro_bench_{os.getpid()}"
    admin = await asyncpg.connect(**admin_kwargs())
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(**admin_kwargs(name))
        try:
            await apply_migrations(conn)
            from common.db import _init_connection
            await _init_connection(conn)
            items = await seed(conn, zones)
        finally:
            await conn.close()
        settings = testing.isolated_settings(PG_DB=name, LOG_LEVEL="error")
        db = Database(settings)
        await db.connect()
        mqtt = MqttClient(settings, "-scheduler")
        await mqtt.start(wait=10)
        try:
            sched = Scheduler(settings, SchedulerConfig(), db, CommandSender(db, mqtt, Topics(settings.mqtt_topic_root)))
            for _ in range(3):
                await db.fetch(LOAD_SQL)  # warm the plan and the caches for the baseline
            now = dt.datetime(2026, 6, 1, 12, 0, 30, tzinfo=dt.timezone.utc)
            t0 = time.perf_counter()
            startup = await sched.tick(now)
            startup_sec = time.perf_counter() - t0

            tick_times, read_times, fired = [], [], 0
            for k in range(1, ticks + 1):
                t0 = time.perf_counter()
                await db.fetch(LOAD_SQL)
                read_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                fired += len(await sched.tick(now + dt.timedelta(minutes=k)))
                tick_times.append(time.perf_counter() - t0)
            quiet_times = []
            last = now + dt.timedelta(minutes=ticks)
            for _ in range(ticks):  # the same instant again: nothing falls due, pure evaluation
                t0 = time.perf_counter()
                await sched.tick(last)
                quiet_times.append(time.perf_counter() - t0)
        finally:
            await mqtt.stop()
            await db.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    tick, read, quiet = (statistics.median(x) for x in (tick_times, read_times, quiet_times))
    print(f"schedule items: {items} across {zones} zones")
    print(f"start-up tick (claims {len(startup)} firings: every zone's light state once, irrigation in the "
          f"catch-up window; publishes their commands): {startup_sec:.3f} s")
    print(f"baseline: bare read of the schedules, median {read * 1000:.1f} ms")
    print(f"steady tick, minute by minute: median {tick * 1000:.1f} ms, worst {max(tick_times) * 1000:.1f} ms "
          f"over {ticks} ticks ({fired} firings executed, commands published); ratio {tick / read:.2f}x")
    print(f"quiet tick, nothing due:       median {quiet * 1000:.1f} ms; ratio {quiet / read:.2f}x")
    print(f"target: a tick within 0.5 s -> {'met' if max(tick_times) <= 0.5 else 'NOT met'}")
    result.emit(result.row(f"scheduler: tick over {items} items / {zones} zones (worst of {ticks})",
                           f"{max(tick_times) * 1000:.1f} ms", f"{read * 1000:.1f} ms bare schedule read",
                           tick / read, "<= 500 ms", max(tick_times) <= 0.5))

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zones", type=int, default=2000)
    parser.add_argument("--ticks", type=int, default=15)
    args = parser.parse_args()
    asyncio.run(main(args.zones, args.ticks))
