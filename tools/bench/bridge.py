"""Benchmark of the bridge's command route against a minimal route doing the same work, same run.

    .venv/bin/python tools/bench/bridge.py [--seconds 10] [--clients 32] [--pool 10] [--profile FILE]

Two server processes on a scratch database of the local PostgreSQL and a private Mosquitto set up
like deploy/:

- the real bridge (`mqtt-bridge/main.py` build): `POST /bridge/zones/{id}/commands`, i.e. body
  validation, catalogue check, `commands` row, QoS 1 publish with PUBACK, row `sent`;
- the baseline, a minimal FastAPI app with one route that does only the irreducible part of that
  work with plain asyncpg and paho calls: validate the same `CommandRequest` body, insert the
  `commands` row (node id looked up inside the INSERT), publish QoS 1 and wait for the PUBACK,
  mark the row `sent`. Same uvicorn settings, same pool size: the limit for this work here.

`--clients` keep-alive HTTP/1.1 connections keep each route busy; the measured time is split in
two halves in the order baseline, bridge, bridge, baseline so that a change of the machine's load
during the run weighs on both alike. Prints requests/s, p50 / p99 of both and the ratio.

Targets (issue 17): bridge ≥ 0.8 × the minimal route's requests/s, bridge p99 ≤ 50 ms at 32 clients.
"""
import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = ROOT / "mqtt-bridge"
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import orjson  # noqa: E402

from tools.bench import result, roundtrips, schema  # noqa: E402
from common import testing  # noqa: E402

TOKEN = "bench-token"
# stop_pump: the same path as any command, and never refused by the pump's min_off_ms when repeated.
BODY = {"type": "stop_pump", "params": {}, "greenhouse_uid": "gh-bench", "node_uid": "nd-bench-1",
        "channel": "pump_in"}
RATIO_TARGET = 0.8
P99_TARGET_MS = 50.0
REQUEST_TIMEOUT = 30.0


# ---------------------------------------------------------------------------------------------
# Server side (child processes)
# ---------------------------------------------------------------------------------------------
def serve_bridge() -> None:
    sys.path.insert(0, str(BRIDGE))
    from common.env import settings_or_exit
    from common.logs import setup_logging
    from common.lifecycle import serve_until_signalled

    from main import build

    settings = settings_or_exit()
    setup_logging("mqtt-bridge-bench", "warning")
    counter = roundtrips.install()
    service = build(settings)

    @service.app.get("/bench/round-trips")
    async def round_trips() -> dict:
        return {"count": counter.count}
    profile = os.environ.get("BENCH_PROFILE")
    if not profile:
        asyncio.run(serve_until_signalled(service))
        return
    import cProfile
    profiler = cProfile.Profile()  # the event loop's thread, from start-up to SIGTERM
    profiler.enable()
    try:
        asyncio.run(serve_until_signalled(service))
    finally:
        profiler.disable()
        profiler.dump_stats(profile)


MINIMAL_INSERT = """
INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, source, created_at, updated_at)
SELECT $1, n.id, $3, $4, $5::jsonb, 'pending', $6, 'bridge', now(), now() FROM nodes n WHERE n.uid = $2
RETURNING id
"""
MINIMAL_SENT = "UPDATE commands SET status = 'sent', sent_at = now(), updated_at = now() WHERE id = $1"


def serve_minimal() -> None:
    """The baseline server: one route, plain asyncpg pool and paho client, nothing else."""
    import socket
    import threading
    import uuid
    from typing import Annotated

    import paho.mqtt.client as paho
    import uvicorn
    from fastapi import Body, FastAPI, Header
    from fastapi.responses import Response
    from paho.mqtt.enums import CallbackAPIVersion

    from common.env import settings_or_exit
    from common.schemas import CommandRequest

    settings = settings_or_exit()
    app = FastAPI()
    counter = roundtrips.RoundTrips()
    state: dict = {}
    waiters: dict[int, asyncio.Future] = {}
    acked_early: set[int] = set()
    lock = threading.Lock()

    def on_publish(client, userdata, mid, reason_code, properties) -> None:  # paho's thread
        with lock:
            future = waiters.pop(mid, None)
            if future is None:
                acked_early.add(mid)
                return
        future.get_loop().call_soon_threadsafe(lambda: future.done() or future.set_result(None))

    def no_delay(client, userdata, sock) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def publish_qos1(topic: str, payload: bytes) -> None:
        client: paho.Client = state["mqtt"]
        future = asyncio.get_running_loop().create_future()
        # Not under `lock`: paho calls on_publish holding its own message lock, which publish() takes.
        info = client.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise RuntimeError(paho.error_string(info.rc))
        with lock:  # the PUBACK may have arrived already
            if info.mid in acked_early:
                acked_early.discard(info.mid)
                return
            waiters[info.mid] = future
        await asyncio.wait_for(future, 5)

    @app.post("/minimal/zones/{zone_id}/commands")
    async def minimal(zone_id: int, body: Annotated[CommandRequest, Body()],
                      authorization: Annotated[str, Header()] = "") -> Response:
        if authorization != f"Bearer {settings.py_api_token}":
            return Response(status_code=401)
        cmd_id = body.cmd_id or str(uuid.uuid4())
        row_id = await state["pool"].fetchval(MINIMAL_INSERT, zone_id, body.node_uid, body.channel, body.type,
                                              orjson.dumps(body.params).decode(), cmd_id)
        if row_id is None:
            return Response(status_code=404)
        payload = {**body.params, "cmd": body.type, "cmd_id": cmd_id, "params": body.params, "ts": int(time.time())}
        await publish_qos1(f"{settings.mqtt_topic_root}/{body.greenhouse_uid}/zn-{zone_id}/{body.node_uid}/"
                           f"{body.channel}/command", orjson.dumps(payload))
        await state["pool"].execute(MINIMAL_SENT, row_id)
        return Response(orjson.dumps({"status": "ok", "data": {"command_id": cmd_id}}),
                        media_type="application/json")

    @app.get("/bench/round-trips")
    async def round_trips() -> dict:
        return {"count": counter.count}

    async def count_round_trips(conn) -> None:
        conn.add_query_logger(counter)

    async def run() -> None:
        state["pool"] = await asyncpg.create_pool(init=count_round_trips,
            host=settings.pg_host, port=settings.pg_port, user=settings.pg_user, password=settings.pg_pass or None,
            database=settings.pg_db, min_size=settings.db_pool_max, max_size=settings.db_pool_max,
            server_settings={"timezone": "UTC"})
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{settings.mqtt_client_id}-minimal",
                             protocol=paho.MQTTv5)
        client.max_inflight_messages_set(1000)  # as common.mqtt: paho's default of 20 would be the limit
        client.max_queued_messages_set(0)
        client.on_publish = on_publish
        client.on_socket_open = no_delay
        client.connect(settings.mqtt_host, settings.mqtt_port)
        client.loop_start()
        state["mqtt"] = client
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.bridge_port, log_config=None,
                                               access_log=False, lifespan="off"))
        try:
            await server.serve()  # uvicorn's own SIGTERM handling ends it
        finally:
            client.disconnect()
            client.loop_stop()
            await state["pool"].close()

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# Load side (parent process)
# ---------------------------------------------------------------------------------------------
async def client(port: int, request: bytes, stop_at: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)  # a hung server fails
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


class Load:
    """Requests and latencies of one route, summed over the periods it was driven."""

    def __init__(self, port: int, path: str):
        body = orjson.dumps(BODY)
        self.port = port
        self.request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        self.latencies: list[float] = []
        self.errors: list[int] = []
        self.elapsed = 0.0
        self.trips = 0

    async def round_trips(self) -> int:
        """Database round trips the server has made so far (its /bench/round-trips)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"GET /bench/round-trips HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            response = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT)
        finally:
            writer.close()
        return orjson.loads(response.split(b"\r\n\r\n", 1)[1])["count"]

    async def drive(self, seconds: float, clients: int, record: bool = True) -> None:
        latencies: list[float] = []
        errors: list[int] = []
        trips = await self.round_trips()
        started = time.perf_counter()
        await asyncio.gather(*[client(self.port, self.request, started + seconds, latencies, errors)
                               for _ in range(clients)])
        if record:
            self.elapsed += time.perf_counter() - started
            self.latencies += latencies
            self.errors += errors
            self.trips += await self.round_trips() - trips

    def summary(self) -> dict:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
        return {"rps": len(lat) / self.elapsed if self.elapsed else 0.0, "p50": pct(0.50), "p99": pct(0.99),
                "trips": self.trips / max(1, len(lat)),
                "n": len(lat), "errors": len(self.errors), "statuses": sorted(set(self.errors))}


async def prepare_database(name: str, schema_name: str) -> None:
    env = testing.SHARED_ENV
    admin_kwargs = dict(host=env["PG_HOST"], port=int(env["PG_PORT"]), user=env["PG_USER"],
                        password=env["PG_PASS"] or None, database="postgres")
    admin = await asyncpg.connect(**admin_kwargs)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    await schema.migrate(name, schema_name)
    conn = await asyncpg.connect(**dict(admin_kwargs, database=name))
    try:
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


async def database_counts(name: str) -> tuple[int, int]:
    env = testing.SHARED_ENV
    conn = await asyncpg.connect(host=env["PG_HOST"], port=int(env["PG_PORT"]), user=env["PG_USER"],
                                 password=env["PG_PASS"] or None, database=name)
    try:
        row = await conn.fetchrow("SELECT count(*) AS n, count(*) FILTER (WHERE status <> 'sent') AS open"
                                  " FROM commands")
        return row["n"], row["open"]
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


async def issue_command_alone(settings, seconds: float, clients: int) -> tuple[float, float]:
    """Commands/s of common.commands.issue_command with no HTTP in front, and its round trips per command."""
    from common.commands import issue_command
    from common.db import Database
    from common.mqtt import MqttClient
    from common.topics import Topics

    db, mqtt = Database(settings), MqttClient(settings, "-bench")
    counter = roundtrips.install()
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
    started, trips = time.perf_counter(), counter.count
    try:
        await asyncio.gather(*[worker() for _ in range(clients)])
        elapsed, trips = time.perf_counter() - started, counter.count - trips
    finally:
        await mqtt.stop()
        await db.close()
    return done / elapsed, trips / max(1, done)


def start_server(mode: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, mode], cwd=BRIDGE, env=env)


def stop_server(server: subprocess.Popen) -> None:
    try:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    finally:  # also when interrupted: never leave a server behind
        if server.poll() is None:
            server.kill()
            server.wait(10)


async def main(args: argparse.Namespace) -> int:
    db_name = f"hydro_bench_{os.getpid()}"
    await prepare_database(db_name, args.schema)
    zone = BODY["zone_id"]
    # A private broker configured like deploy/ (TCP_NODELAY: PUBACK bursts are not held by Nagle).
    broker = testing.PrivateMosquitto.like_deploy().start()
    settings = testing.isolated_settings(PG_DB=db_name, DB_POOL_MAX=str(args.pool), MQTT_PORT=str(broker.port))
    ports = {"bridge": testing.free_port(), "minimal": testing.free_port()}
    servers: list[subprocess.Popen] = []
    try:
        for name, mode in (("bridge", "--serve"), ("minimal", "--serve-minimal")):
            env = dict(os.environ, **testing.settings_env(settings.replace(bridge_port=ports[name],
                                                                           py_api_token=TOKEN)))
            env.update(PYTHONPATH=str(ROOT), LOG_LEVEL="warning", DB_POOL_MAX=str(args.pool))
            if name == "bridge" and args.profile:
                env["BENCH_PROFILE"] = args.profile
            servers.append(start_server(mode, env))
        for port in ports.values():
            testing.wait_port(port, 30)
        loads = {"minimal": Load(ports["minimal"], f"/minimal/zones/{zone}/commands"),
                 "bridge": Load(ports["bridge"], f"/bridge/zones/{zone}/commands")}
        for load in loads.values():  # warm-up: connections, pools, first-request work
            await load.drive(1.0, args.clients, record=False)
        for name in ("minimal", "bridge", "bridge", "minimal"):
            await loads[name].drive(args.seconds / 2, args.clients)
        alone, alone_trips = await issue_command_alone(settings, args.seconds / 2, args.clients)
        rows, still_open = await database_counts(db_name)
    finally:
        for server in servers:
            stop_server(server)
        await drop_database(db_name)
        broker.close()
    results = {name: load.summary() for name, load in loads.items()}
    print(f"schema: {args.schema}")
    print(f"POST, {args.clients} concurrent keep-alive clients, {args.seconds:g} s per route (two halves, "
          f"baseline-bridge-bridge-baseline), one server process each (DB_POOL_MAX={settings.db_pool_max})")
    labels = {"minimal": "minimal route (plain asyncpg + paho: insert, publish QoS1, PUBACK, mark sent)",
              "bridge": "bridge POST /bridge/zones/{id}/commands"}
    for name, r in results.items():
        print(f"  {name:8s} {r['rps']:8.0f} req/s   p50 {r['p50']:6.1f} ms   p99 {r['p99']:6.1f} ms   "
              f"{r['trips']:4.1f} round trips/request ({r['n']} requests, {r['errors']} non-200 {r['statuses']})  "
              f"{labels[name]}")
    bridge, baseline = results["bridge"], results["minimal"]
    ratio = bridge["rps"] / baseline["rps"] if baseline["rps"] else 0.0
    print(f"  ratio bridge / minimal route = {ratio:.2f}  (target >= {RATIO_TARGET}; bridge p99 target "
          f"<= {P99_TARGET_MS:g} ms)")
    print(f"  commands rows written: {rows}, not 'sent': {still_open}")
    print(f"  for reference: common.commands.issue_command alone, no HTTP, {args.clients} concurrent in one "
          f"process: {alone:.0f} commands/s, {alone_trips:.1f} round trips/command")
    ok = not bridge["errors"] and not baseline["errors"]
    result.emit(
        result.row(f"bridge: POST commands, {args.clients} clients", f"{bridge['rps']:.0f} req/s",
                   f"{baseline['rps']:.0f} req/s minimal route, same work (asyncpg + paho)", ratio,
                   f">= {RATIO_TARGET}x baseline", ok and ratio >= RATIO_TARGET),
        result.row(f"bridge: p99 latency, {args.clients} clients", f"{bridge['p99']:.1f} ms",
                   f"{baseline['p99']:.1f} ms minimal route", bridge["p99"] / baseline["p99"],
                   f"<= {P99_TARGET_MS:g} ms", ok and bridge["p99"] <= P99_TARGET_MS))
    return 0


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve_bridge()
        sys.exit(0)
    if "--serve-minimal" in sys.argv:
        serve_minimal()
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per route")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--pool", type=int, default=10, help="DB_POOL_MAX of both servers (service default 10)")
    parser.add_argument("--schema", choices=schema.SCHEMAS, default=schema.default(), help="database schema")
    parser.add_argument("--profile", help="cProfile the bridge server process to this file")
    sys.exit(asyncio.run(main(parser.parse_args())))
