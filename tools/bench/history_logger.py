"""history-logger benchmark: backlog drain rate vs a bare paho subscriber, latency at 1,000 msg/s, RSS.

    PYTHONPATH=. .venv/bin/python tools/bench/history_logger.py [--n 100000] [--rate 1000] [--seconds 15]

A private Mosquitto (max_queued_messages 0: the stock config keeps only 1,000 queued QoS1
messages per client and drops the rest) holds N QoS1 telemetry messages for a stopped
persistent session; we time until the last one is committed in PostgreSQL (history-logger run
as a real process, `python main.py`) and, in the same run, until a bare paho subscriber with a
persistent session has drained the same N (the baseline; for reference also one reading the
socket as the service does, `paho_compat.BufferedReadClient`). The drain's end is seen by polling
count(*) every POLL_SEC. Then a steady publisher at --rate msg/s: publish→commit latency per
reading (commit seen by polling every 10 ms). Peak RSS is the VmHWM of the service and its writer
process. Uses the local PostgreSQL (a throwaway database) and Redis (own prefix).

Target (issue 17): drain ≥ 0.75 × the bare drain with every row stored once (the drain waits for
all N rows; duplicates are counted by `seq`).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import asyncpg
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import paho_compat, testing  # noqa: E402
from tools.bench import result, schema  # noqa: E402
from common.redis_client import redis_client  # noqa: E402

NODES = 20
POLL_SEC = 0.2  # count(*) of up to N rows: more often, and the poll takes CPU from the service it measures
DRAIN_TARGET = 0.75  # × the bare paho drain (issue 17; was 0.5 with 0.75 as a stretch)
CHANNELS = ("ph_sensor", "ec_sensor", "temp_sensor")
METRICS = ("PH", "EC", "TEMP_WATER")


def payloads(root: str, zone_ids: list[int], start: int, count: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(start, start + count):
        node = i % NODES
        ch = (i // NODES) % len(CHANNELS)
        topic = f"{root}/gh-1/zn-{zone_ids[node]}/nd-bench-{node}/{CHANNELS[ch]}/telemetry"
        out.append((topic, orjson.dumps({"metric_type": METRICS[ch], "value": 6.0 + (i % 100) / 100, "seq": i,
                                         "ts": int(time.time() * 1000)})))
    return out


def publish_all(port: int, messages: list[tuple[str, bytes]]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=testing.unique_id("bench-pub-"))
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for start in range(0, len(messages), 10_000):  # packet ids wrap at 65535: bounded windows
            infos = [client.publish(t, p, qos=1) for t, p in messages[start:start + 10_000]]
            for info in infos:
                info.wait_for_publish(60)
    finally:
        client.disconnect()
        client.loop_stop()


class BareSubscriber:
    """The baseline: a paho MQTT v5 subscriber with a persistent session and automatic PUBACK
    (`client_class` BufferedReadClient: the same with the service's socket reads and decoding)."""

    def __init__(self, port: int, filter_: str, client_class: type[paho.Client] = paho.Client):
        self.port, self.filter, self.client_class = port, filter_, client_class
        self.count = 0
        self.done = threading.Event()
        self.target = 0
        self.client_id = testing.unique_id("bench-bare-")

    def _client(self) -> paho.Client:
        client = self.client_class(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        client.max_inflight_messages_set(1000)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = 1000
        client.on_message = self._on_message
        client.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        return client

    def _on_message(self, client, userdata, msg) -> None:
        self.count += 1
        if self.count >= self.target:
            self.done.set()

    def register(self) -> None:
        client = self._client()
        client.loop_start()
        subscribed = threading.Event()
        client.on_subscribe = lambda *a: subscribed.set()
        client.subscribe(self.filter, qos=1)
        subscribed.wait(10)
        client.disconnect()
        client.loop_stop()

    def drain(self, n: int) -> float:
        self.target, self.count = n, 0
        self.done.clear()
        started = time.perf_counter()
        client = self._client()
        client.loop_start()
        if not self.done.wait(600):
            raise RuntimeError(f"bare subscriber got {self.count} of {n}")
        elapsed = time.perf_counter() - started
        client.disconnect()
        client.loop_stop()
        return elapsed


def peak_rss_mb(pid: int) -> float:
    """VmHWM of the service, plus that of its child processes (a writer of its own, if any)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            total += int(line.split()[1]) / 1024
    for child in testing.child_pids(pid):
        try:
            total += peak_rss_mb(child)
        except FileNotFoundError:  # exited meanwhile
            pass
    return total


def cpu_seconds(pid: int) -> list[float]:
    """User + system CPU seconds of the process (all its threads), then of each child process."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out = [(int(fields[11]) + int(fields[12])) / ticks]
    for child in testing.child_pids(pid):
        try:
            out += cpu_seconds(child)
        except FileNotFoundError:  # exited meanwhile
            pass
    return out


async def wait_count(conn: asyncpg.Connection, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await conn.fetchval("SELECT count(*) FROM telemetry_samples") < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {await conn.fetchval('SELECT count(*) FROM telemetry_samples')} of {n} rows")
        await asyncio.sleep(0.05)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--batch", type=int, default=200, help="TELEMETRY_BATCH_SIZE")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the service (repeatable), e.g. MQTT_RECEIVE_MAXIMUM=5000")
    ap.add_argument("--profile", help="write a py-spy profile (collapsed stacks) of the drain to this file")
    ap.add_argument("--schema", choices=schema.SCHEMAS, default=schema.default(), help="database schema")
    args = ap.parse_args()

    broker = testing.PrivateMosquitto()
    broker.start()
    dbname = f"hydro_bench_{os.getpid()}"
    env = testing.SHARED_ENV
    admin = await asyncpg.connect(host=env["PG_HOST"], port=int(env["PG_PORT"]), user=env["PG_USER"],
                                  database="postgres")
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await schema.migrate(dbname, args.schema)
    print(f"schema: {args.schema}")
    proc = None
    settings = testing.isolated_settings(PG_DB=dbname, MQTT_PORT=str(broker.port)).replace(
        history_logger_port=testing.free_port(), history_logger_metrics_port=testing.free_port())
    conn = await asyncpg.connect(host=env["PG_HOST"], port=int(env["PG_PORT"]), user=env["PG_USER"], database=dbname)
    try:
        gh = await conn.fetchval("INSERT INTO greenhouses (uid, name) VALUES ('gh-1', 'bench') RETURNING id")
        zone_ids = []
        for i in range(NODES):
            zone = await conn.fetchval("INSERT INTO zones (greenhouse_id, name) VALUES ($1, $2) RETURNING id",
                                       gh, f"z{i}")
            zone_ids.append(zone)
            await conn.execute("INSERT INTO nodes (uid, zone_id, validated, status) VALUES ($1, $2, true, 'online')",
                               f"nd-bench-{i}", zone)
        root = settings.mqtt_topic_root
        service_env = dict(testing.settings_env(settings), TELEMETRY_BATCH_SIZE=str(args.batch),
                           TELEMETRY_QUEUE_CAPACITY=str(max(100_000, 2 * args.n)), LOG_LEVEL="warning")
        service_env.update(item.split("=", 1) for item in args.env)
        proc = testing.ServiceProcess("history-logger", service_env)

        # register both persistent sessions, then stop them
        bare = BareSubscriber(broker.port, f"{root}/+/+/+/+/telemetry")
        bare.register()
        buffered = BareSubscriber(broker.port, f"{root}/+/+/+/+/telemetry", paho_compat.BufferedReadClient)
        buffered.register()
        proc.start()
        await asyncio.to_thread(testing.wait_port, settings.history_logger_port, 30)
        deadline = time.monotonic() + 30
        while not await conn.fetchval("SELECT count(*) FROM telemetry_samples"):  # until it is subscribed
            if time.monotonic() > deadline:
                raise RuntimeError("history-logger stored nothing:\n" + proc.log()[-3000:])
            await asyncio.to_thread(publish_all, broker.port, payloads(root, zone_ids, -1, 1))
            await asyncio.sleep(0.5)
        proc.terminate()
        await conn.execute("TRUNCATE telemetry_samples, telemetry_last")

        # preload N into both stopped sessions
        t0 = time.perf_counter()
        await asyncio.to_thread(publish_all, broker.port, payloads(root, zone_ids, 0, args.n))
        print(f"preloaded {args.n} QoS1 messages in {time.perf_counter() - t0:.1f}s")

        bare_sec = await asyncio.to_thread(bare.drain, args.n)
        bare_rate = args.n / bare_sec
        buffered_rate = args.n / await asyncio.to_thread(buffered.drain, args.n)

        started = time.perf_counter()
        proc.start()
        spy = None
        if args.profile:  # py-spy must be installed (pip install py-spy); it samples the drain only (writer too)
            import subprocess
            spy_bin = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            spy = subprocess.Popen([spy_bin, "record", "-p", str(proc.proc.pid), "--subprocesses",
                                    "-r", "200", "-f", "raw", "-o", args.profile, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rclient = redis_client(settings)
        queued_key = f"{settings.redis_key_prefix}telemetry:queued"
        max_backlog, received_all_at = 0, None
        while (rows := await conn.fetchval("SELECT count(*) FROM telemetry_samples")) < args.n:
            backlog = int(await rclient.get(queued_key) or 0)
            max_backlog = max(max_backlog, backlog)
            if received_all_at is None and rows + backlog >= args.n:
                received_all_at = time.perf_counter() - started
            if time.perf_counter() - started > 900:
                raise RuntimeError(f"only {rows} of {args.n} rows")
            await asyncio.sleep(POLL_SEC)
        await rclient.aclose()
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        logger_sec = time.perf_counter() - started
        drain_cpu = cpu_seconds(proc.proc.pid)
        logger_rate = args.n / logger_sec
        dup = await conn.fetchval("SELECT count(*) - count(DISTINCT (raw->>'seq')::int) FROM telemetry_samples")

        # steady rate: publish→commit latency
        await conn.execute("TRUNCATE telemetry_samples")
        latencies = []
        stop = threading.Event()

        def steady() -> None:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=testing.unique_id("bench-rate-"))
            client.max_inflight_messages_set(1000)
            client.connect("127.0.0.1", broker.port)
            client.loop_start()
            i, begin = 0, time.perf_counter()
            total = int(args.rate * args.seconds)
            while i < total and not stop.is_set():
                due = begin + i / args.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                topic, payload = payloads(root, zone_ids, i, 1)[0]
                data = orjson.loads(payload)
                data["ts"] = int(time.time() * 1000)
                client.publish(topic, orjson.dumps(data), qos=1)
                i += 1
            time.sleep(0.5)
            client.disconnect()
            client.loop_stop()

        total = int(args.rate * args.seconds)
        pub = threading.Thread(target=steady, daemon=True)
        pub.start()
        last_id = 0
        deadline = time.monotonic() + args.seconds + 60
        while len(latencies) < total and time.monotonic() < deadline:
            rows = await conn.fetch("SELECT id, (raw->>'ts')::bigint AS ts FROM telemetry_samples WHERE id > $1",
                                    last_id)
            seen = time.time() * 1000
            for r in rows:
                latencies.append((seen - r["ts"]) / 1000)
                last_id = max(last_id, r["id"])
            await asyncio.sleep(0.01)
        stop.set()
        pub.join(10)
        rss = peak_rss_mb(proc.proc.pid)
        proc.terminate()

        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"bare paho drain:        {args.n} msgs in {bare_sec:.2f}s = {bare_rate:,.0f} msg/s (baseline)")
        print(f"history-logger drain:   {args.n} rows committed in {logger_sec:.2f}s = {logger_rate:,.0f} msg/s"
              f"  (duplicates: {dup}, TELEMETRY_BATCH_SIZE={args.batch})")
        print(f"  (all {args.n} in Redis after {received_all_at or logger_sec:.2f}s; largest stream backlog"
              f" {max_backlog} samples)")
        print(f"  (CPU seconds of the service during the drain: {' + '.join(f'{c:.2f}' for c in drain_cpu)}"
              f" (main process, then child processes))")
        print(f"ratio logger/bare:      {logger_rate / bare_rate:.2f}  (target >= {DRAIN_TARGET}, with 0 lost and 0 duplicates)")
        print(f"  (for reference: the bare subscriber reading and decoding as the service does (paho_compat."
              f"BufferedReadClient) drains {buffered_rate:,.0f} msg/s; logger / that: {logger_rate / buffered_rate:.2f})")
        print(f"steady {args.rate} msg/s for {args.seconds:g}s: {len(latencies)}/{total} committed,"
              f" publish->commit p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (target p99 <= 1000 ms)")
        print(f"peak RSS of the service (with its child processes): {rss:.0f} MB (target <= 150 MB)")
        ratio = logger_rate / bare_rate
        result.emit(
            result.row(f"history-logger: drain {args.n} preloaded QoS1 messages to PostgreSQL",
                       f"{logger_rate:,.0f} msg/s ({dup} duplicates)", f"{bare_rate:,.0f} msg/s bare paho drain",
                       ratio, f">= {DRAIN_TARGET}x, 0 lost, 0 duplicates", ratio >= DRAIN_TARGET and dup == 0),
            result.row(f"history-logger: publish->commit p99 at {args.rate} msg/s", f"{p99 * 1000:.0f} ms",
                       f"p50 {p50 * 1000:.0f} ms", None, "<= 1000 ms", p99 <= 1.0),
            result.row("history-logger: peak RSS", f"{rss:.0f} MB", "", None, "<= 150 MB", rss <= 150))
        return 0
    finally:
        if proc is not None:
            proc.kill()
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()
        client = redis_client(settings)
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_key_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        broker.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
