"""Benchmark of the bridge's command route against a bare FastAPI baseline in the same server process.

    .venv/bin/python tools/bench/bridge.py [--seconds 10] [--clients 32] [--pool 10]

Starts the real bridge (`mqtt-bridge/main.py` build, on a scratch database of the local PostgreSQL and
the local Mosquitto) in a child process, with one extra route `POST /bench/baseline` that validates
the same `CommandRequest` body and answers the same shape without doing anything else. Then keeps
`--clients` keep-alive HTTP/1.1 connections busy for `--seconds` on each route and prints requests/s,
p50 / p99 latency of both and the ratio. Every bridge request is a real command: catalogue check,
`commands` row, QoS 1 publish with PUBACK, row `sent`.

Targets (issue 4): bridge ≥ 0.6 × baseline requests/s, bridge p99 ≤ 50 ms at 32 clients.
"""
import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = ROOT / "mqtt-bridge"
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import orjson  # noqa: E402

from tools.bench import result  # noqa: E402
from common import testing  # noqa: E402
from common.migrate import apply_migrations  # noqa: E402

TOKEN = "bench-token"
BODY = {"type": "run_pump", "params": {"duration_ms": 1000}, "greenhouse_uid": "gh-bench",
        "node_uid": "nd-bench-1", "channel": "pump_in"}


# ---------------------------------------------------------------------------------------------
# Server side (child process)
# ---------------------------------------------------------------------------------------------
def serve() -> None:
    sys.path.insert(0, str(BRIDGE))
    from typing import Annotated

    from fastapi import Body

    from common.env import settings_or_exit
    from common.logs import setup_logging
    from common.schemas import CommandRequest
    from common.service import serve_until_signalled

    from api import ok
    from main import build

    settings = settings_or_exit()
    setup_logging("mqtt-bridge-bench", "warning")
    service = build(settings)

    @service.app.post("/bench/baseline")
    async def baseline(body: Annotated[CommandRequest, Body()]):
        return ok({"command_id": body.cmd_id or str(uuid.uuid4())})

    asyncio.run(serve_until_signalled(service))


# ---------------------------------------------------------------------------------------------
# Load side (parent process)
# ---------------------------------------------------------------------------------------------
async def client(port: int, request: bytes, stop_at: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def drive(port: int, path: str, seconds: float, clients: int) -> dict:
    body = orjson.dumps(BODY)
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    await asyncio.gather(*[client(port, request, started + seconds, latencies, errors) for _ in range(clients)])
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")
    return {"rps": len(latencies) / elapsed, "p50": pct(0.50), "p99": pct(0.99), "n": len(latencies),
            "errors": len(errors), "statuses": sorted(set(errors))}


async def prepare_database(name: str) -> None:
    env = testing.SHARED_ENV
    admin_kwargs = dict(host=env["PG_HOST"], port=int(env["PG_PORT"]), user=env["PG_USER"],
                        password=env["PG_PASS"] or None, database="postgres")
    admin = await asyncpg.connect(**admin_kwargs)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(**dict(admin_kwargs, database=name))
    try:
        await apply_migrations(conn)
        gh = await conn.fetchval("INSERT INTO greenhouses (uid, name) VALUES ('gh-bench', 'bench') RETURNING id")
        zone = await conn.fetchval("INSERT INTO zones (greenhouse_id, name) VALUES ($1, 'bench') RETURNING id", gh)
        node = await conn.fetchval("INSERT INTO nodes (uid, zone_id, type, status) VALUES ('nd-bench-1', $1,"
                                   " 'irrig', 'online') RETURNING id", zone)
        await conn.execute("INSERT INTO node_channels (node_id, channel, type, config) VALUES ($1, 'pump_in',"
                           " 'actuator', '{\"safe_limits\": {\"max_duration_ms\": 5000, \"min_off_ms\": 3000}}')",
                           node)
        BODY["zone_id"] = zone
    finally:
        await conn.close()


async def drop_database(name: str) -> None:
    env = testing.SHARED_ENV
    admin = await asyncpg.connect(host=env["PG_HOST"], port=int(env["PG_PORT"]), user=env["PG_USER"],
                                  password=env["PG_PASS"] or None, database="postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def issue_command_alone(settings, seconds: float, clients: int) -> float:
    """Commands/s of common.commands.issue_command with no HTTP in front (where the bridge's time goes)."""
    from common.commands import issue_command
    from common.db import Database
    from common.mqtt import MqttClient
    from common.topics import Topics

    db, mqtt = Database(settings), MqttClient(settings, "-bench")
    await db.connect()
    await mqtt.start(wait=10)
    topics, done = Topics(settings.mqtt_topic_root), 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await issue_command(db, mqtt, topics, gh_uid=BODY["greenhouse_uid"], zone_id=BODY["zone_id"],
                                node_uid=BODY["node_uid"], channel=BODY["channel"], cmd=BODY["type"],
                                params=BODY["params"])
            done += 1
    started = time.perf_counter()
    try:
        await asyncio.gather(*[worker() for _ in range(clients)])
    finally:
        await mqtt.stop()
        await db.close()
    return done / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> int:
    db_name = f"hydro_bench_{os.getpid()}"
    await prepare_database(db_name)
    zone = BODY["zone_id"]
    port = testing.free_port()
    # A private broker configured like deploy/ (TCP_NODELAY: PUBACK bursts are not held by Nagle).
    broker = testing.PrivateMosquitto.like_deploy().start()
    settings = testing.isolated_settings(PG_DB=db_name, DB_POOL_MAX=str(args.pool), MQTT_PORT=str(broker.port))
    env = dict(os.environ, **testing.settings_env(settings.replace(bridge_port=port, py_api_token=TOKEN)))
    env.update(PYTHONPATH=str(ROOT), LOG_LEVEL="warning", DB_POOL_MAX=str(args.pool))
    server = subprocess.Popen([sys.executable, __file__, "--serve"], cwd=BRIDGE, env=env)
    try:
        testing.wait_port(port, 30)
        routes = {"baseline": "/bench/baseline", "bridge": f"/bridge/zones/{zone}/commands"}
        for path in routes.values():  # warm-up: connections, pools, first-request work
            await drive(port, path, 1.0, args.clients)
        results = {name: await drive(port, path, args.seconds, args.clients) for name, path in routes.items()}
        alone = await issue_command_alone(settings, args.seconds, args.clients)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        await drop_database(db_name)
        broker.close()
    print(f"POST, {args.clients} concurrent keep-alive clients, {args.seconds:g} s per route, one server process "
          f"(DB_POOL_MAX={settings.db_pool_max})")
    for name, r in results.items():
        print(f"  {name:8s} {r['rps']:8.0f} req/s   p50 {r['p50']:6.1f} ms   p99 {r['p99']:6.1f} ms   "
              f"({r['n']} requests, {r['errors']} non-200 {r['statuses']})")
    ratio = results["bridge"]["rps"] / results["baseline"]["rps"]
    print(f"  ratio bridge / baseline = {ratio:.2f}  (target >= 0.60; bridge p99 target <= 50 ms)")
    print(f"  for reference: common.commands.issue_command alone, no HTTP, {args.clients} concurrent in one "
          f"process: {alone:.0f} commands/s")
    bridge, baseline = results["bridge"], results["baseline"]
    result.emit(
        result.row(f"bridge: POST commands, {args.clients} clients", f"{bridge['rps']:.0f} req/s",
                   f"{baseline['rps']:.0f} req/s bare FastAPI", ratio, ">= 0.6x baseline", ratio >= 0.6),
        result.row("bridge: p99 latency", f"{bridge['p99']:.1f} ms", f"{baseline['p99']:.1f} ms bare FastAPI",
                   bridge["p99"] / baseline["p99"], "<= 50 ms", bridge["p99"] <= 50))
    return 0


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve()
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--pool", type=int, default=10, help="the bridge's DB_POOL_MAX (service default 10)")
    sys.exit(asyncio.run(main(parser.parse_args())))
