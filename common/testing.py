"""Test and benchmark helpers: settings for isolated runs, private servers, an MQTT probe.

Private servers run on a free port in a temporary directory, so fault tests can stop, kill
and restart them without touching the shared PostgreSQL, Redis and Mosquitto.
"""
from __future__ import annotations

import asyncio
import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from .env import Settings
from .redis_client import redis_client

SHARED_ENV = {
    "MQTT_HOST": os.environ.get("TEST_MQTT_HOST", "127.0.0.1"),
    "MQTT_PORT": os.environ.get("TEST_MQTT_PORT", "1883"),
    "PG_HOST": os.environ.get("TEST_PG_HOST", "127.0.0.1"),
    "PG_PORT": os.environ.get("TEST_PG_PORT", "5432"),
    "PG_USER": os.environ.get("TEST_PG_USER", "postgres"),
    "PG_PASS": os.environ.get("TEST_PG_PASS", ""),
    "PG_DB": "postgres",
    "REDIS_HOST": os.environ.get("TEST_REDIS_HOST", "127.0.0.1"),
    "REDIS_PORT": os.environ.get("TEST_REDIS_PORT", "6379"),
    "LOG_LEVEL": "info",
}


async def drop_redis_keys(settings: Settings) -> None:
    """The streams and keys a test's services left under its own prefix on the shared Redis."""
    client = redis_client(settings)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_key_prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def unique_id(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def isolated_settings(**env: str) -> Settings:
    """Settings on the shared servers with a topic root, Redis prefix and client id of their own."""
    tag = unique_id()
    values = dict(SHARED_ENV, MQTT_TOPIC_ROOT=f"hydro-{tag}", REDIS_KEY_PREFIX=f"test:{tag}:",
                  MQTT_CLIENT_ID=f"test-{tag}")
    values.update(env)
    return Settings.from_env(values)


_handed_out: set[int] = set()


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free port for a server to listen on. Never the same one twice in a process (a port just
    closed is free again, so two calls could both get it), and outside the kernel's ephemeral range:
    a port from that range can be taken by any outgoing connection before the server binds it.
    Parallel test runs (TEST_PORT_SLOT=k/n) each draw from their own share of the range."""
    low, high = _ephemeral_ports()
    candidates = range(10000, low) if low > 11000 else range(high + 1, 65536)
    slot, slots = map(int, os.environ.get("TEST_PORT_SLOT", "0/1").split("/"))
    candidates = candidates[slot::slots]  # test runs side by side never pick the same port
    for _ in range(500):
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {candidates.start}-{candidates.stop - 1}")


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def child_pids(pid: int) -> list[int]:
    """The child processes of process `pid` (from /proc; a thread that ends meanwhile is skipped)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return children


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.05,
                     message: str = "condition") -> Any:
    """Poll `check()` until it returns something truthy; fail with `message` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)


class PrivateServer:
    """A server process of our own on a free port; stop / kill / restart keep the port and data."""

    name = "server"

    def __init__(self):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"hydro-{self.name}-"))
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> "PrivateServer":
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                         preexec_fn=self._preexec())
        wait_port(self.port)
        return self

    def _preexec(self):
        return None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class ReplyLosingProxy:
    """A TCP proxy in front of a server that, when armed, lets the next request containing `marker`
    through and then breaks the connection instead of passing the server's reply on: the request
    was applied, the client only cannot know. Later connections pass everything."""

    def __init__(self, host: str, port: int, marker: bytes):
        self.target, self.marker = (host, port), marker
        self.armed = False
        self.dropped = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "ReplyLosingProxy":
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        losing = asyncio.Event()

        async def requests() -> None:
            while data := await client_r.read(65536):
                if self.armed and self.marker in data:
                    self.armed = False
                    losing.set()
                server_w.write(data)
                await server_w.drain()

        async def replies() -> None:
            while data := await server_r.read(65536):
                if losing.is_set():
                    self.dropped += 1
                    return
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(requests()), asyncio.create_task(replies())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (client_w, server_w):
            writer.close()


class PrivateMosquitto(PrivateServer):
    name = "mosquitto"

    def __init__(self, extra_conf: str = "max_queued_messages 0\nmax_inflight_messages 0\n", persistence: bool = False):
        super().__init__()
        conf = f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{extra_conf}"
        if persistence:
            conf += f"persistence true\npersistence_location {self.dir}/\n"
        (self.dir / "mosquitto.conf").write_text(conf)

    def command(self) -> list[str]:
        return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.dir / "mosquitto.conf")]

    DEPLOY_KEYS = ("max_queued_messages", "max_queued_bytes", "max_inflight_messages", "max_packet_size",
                   "set_tcp_nodelay")

    @classmethod
    def like_deploy(cls) -> "PrivateMosquitto":
        """A private broker with the queue and socket settings of deploy/mosquitto/mosquitto.dev.conf
        (the stock config keeps only 1,000 queued messages per offline session)."""
        conf = (Path(__file__).resolve().parents[1] / "deploy/mosquitto/mosquitto.dev.conf").read_text()
        return cls(extra_conf="".join(f"{line}\n" for line in conf.splitlines() if line.startswith(cls.DEPLOY_KEYS)))


class PrivateRedis(PrivateServer):
    name = "redis"

    def __init__(self, appendonly: bool = True):
        super().__init__()
        self.appendonly = appendonly

    def command(self) -> list[str]:
        return [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(self.port),
                "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"]


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {tool} is not installed (/usr/lib/postgresql/*/bin)")
    return found[-1]


class PrivatePostgres(PrivateServer):
    """A throwaway cluster (initdb); as root it runs as the `postgres` user, which initdb requires."""

    name = "postgres"

    def __init__(self):
        super().__init__()
        self.data = self.dir / "data"
        self._user = None
        if os.geteuid() == 0:
            import pwd
            self._user = pwd.getpwnam("postgres")
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run([_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True, preexec_fn=self._preexec(), cwd=self.dir)

    def _preexec(self):
        user = self._user
        if user is None:
            return None

        def drop_privileges():
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        return drop_privileges

    def command(self) -> list[str]:
        return [_pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]

    def settings_env(self) -> dict[str, str]:
        return {"PG_HOST": "127.0.0.1", "PG_PORT": str(self.port), "PG_USER": "postgres", "PG_PASS": "",
                "PG_DB": "postgres"}


class MqttProbe:
    """A plain paho subscriber for assertions: what was published, with QoS and retain flags."""

    def __init__(self, host: str, port: int, *filters: str):
        self.messages: list[paho.MQTTMessage] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=unique_id("probe-"))
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe([(f, 1) for f in filters])
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("probe could not subscribe")

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append(msg)

    def received(self, topic_filter: str = "#") -> list[paho.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if paho.topic_matches_sub(topic_filter, m.topic)]

    def payloads(self, topic_filter: str = "#") -> list[Any]:
        return [orjson.loads(m.payload) if m.payload else None for m in self.received(topic_filter)]

    async def wait_for(self, count: int, topic_filter: str = "#", timeout: float = 10.0) -> list[paho.MQTTMessage]:
        async def enough():
            found = self.received(topic_filter)
            return found if len(found) >= count else None
        return await eventually(enough, timeout, message=f"{count} message(s) on {topic_filter}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_sync(host: str, port: int, messages: list[tuple[str, bytes | str, int, bool]]) -> None:
    """Publish (topic, payload, qos, retain) tuples from a plain client and wait for every PUBACK."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=unique_id("pub-"))
    client.connect(host, port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=q, retain=r) for t, p, q, r in messages]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


ROOT = Path(__file__).resolve().parents[1]
# Laravel migrates production databases before our services start: exactly the schema it creates.
LARAVEL_SCHEMA = ROOT.parent / "shared" / "fixtures" / "laravel-schema.sql"


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that reproduces `settings` in a service process."""
    env = {
        "APP_ENV": settings.app_env, "LOG_LEVEL": settings.log_level, "HTTP_HOST": "127.0.0.1",
        "MQTT_HOST": settings.mqtt_host, "MQTT_PORT": str(settings.mqtt_port),
        "MQTT_CLIENT_ID": settings.mqtt_client_id, "MQTT_TOPIC_ROOT": settings.mqtt_topic_root,
        "MQTT_CLEAN_SESSION": "1" if settings.mqtt_clean_session else "0",
        "PG_HOST": settings.pg_host, "PG_PORT": str(settings.pg_port), "PG_DB": settings.pg_db,
        "PG_USER": settings.pg_user, "PG_PASS": settings.pg_pass,
        "REDIS_HOST": settings.redis_host, "REDIS_PORT": str(settings.redis_port),
        "REDIS_KEY_PREFIX": settings.redis_key_prefix, "PY_API_TOKEN": settings.py_api_token,
        "LARAVEL_API_URL": settings.laravel_api_url, "LARAVEL_API_TOKEN": settings.laravel_api_token,
        "TELEMETRY_BATCH_SIZE": str(settings.telemetry_batch_size),
        "TELEMETRY_FLUSH_MS": str(settings.telemetry_flush_ms),
        "COMMAND_TIMEOUT_SEC": str(settings.command_timeout_sec),
        "NODE_OFFLINE_TIMEOUT_SEC": str(settings.node_offline_timeout_sec),
        "BRIDGE_PORT": str(settings.bridge_port), "HISTORY_LOGGER_PORT": str(settings.history_logger_port),
        "HISTORY_LOGGER_METRICS_PORT": str(settings.history_logger_metrics_port),
        "AUTOMATION_PORT": str(settings.automation_port), "SCHEDULER_PORT": str(settings.scheduler_port),
        "REGISTRY_PORT": str(settings.registry_port),
    }
    return env


class ServiceProcess:
    """A service run for real: `python main.py` in its folder, as the Dockerfiles and `make dev` do."""

    def __init__(self, folder: str, env: dict[str, str], log_dir: Path | None = None):
        self.folder = folder
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), **env)
        self.log_path = (log_dir or Path(tempfile.mkdtemp(prefix="hydro-svc-"))) / f"{folder}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServiceProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([os.environ.get("PYTHON", sys.executable), "main.py"], cwd=ROOT / self.folder,
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# ---------------------------------------------------------------------------------------
# Seeding: the rows Laravel writes (greenhouses, zones, recipes, nodes, channels), one way
# ---------------------------------------------------------------------------------------
class Sql(str):
    """A column value written as SQL, e.g. Sql("now() - interval '1 hour'")."""


@dataclass
class Channel:
    name: str
    config: dict | None = None
    type: str | None = None  # by default "sensor" when the name says so, else "actuator"
    metric: str | None = None


async def insert_row(db, table: str, returning: str = "id", **columns: Any) -> Any:
    """INSERT one row of `columns` (Sql values inlined) and return its `returning` column."""
    names, values, params = [], [], []
    for name, value in columns.items():
        names.append(name)
        if isinstance(value, Sql):
            values.append(f"({value})")
        else:
            params.append(value)
            values.append(f"${len(params)}")
    return await db.fetchval(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(values)})"
                             f" RETURNING {returning}", *params)


async def seed_greenhouse(db, uid: str = "gh-1", name: str = "GH", **columns: Any) -> int:
    """The greenhouse `uid`, created or (same uid) updated with `columns`."""
    found = await db.fetchval("SELECT id FROM greenhouses WHERE uid = $1", uid)
    if found is None:
        return await insert_row(db, "greenhouses", uid=uid, name=name, **columns)
    if columns:
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(columns, start=2))
        await db.execute(f"UPDATE greenhouses SET {sets} WHERE id = $1", found, *columns.values())
    return found


async def seed_zone(db, greenhouse: str | int | None = "gh-1", name: str = "Zone", *,
                    phases: list[tuple[float | None, dict]] | None = None, targets: dict | None = None,
                    started_hours_ago: float = 1.0, **columns: Any) -> int:
    """A zone in `greenhouse` (a uid, created if missing, an id, or None); with `targets` (one phase) or
    `phases` it runs a recipe of its own (seed_recipe)."""
    gh_id = await seed_greenhouse(db, greenhouse) if isinstance(greenhouse, str) else greenhouse
    zone_id = await insert_row(db, "zones", greenhouse_id=gh_id, name=name, **columns)
    if targets is not None or phases:
        await seed_recipe(db, phases or [(None, targets)], {zone_id: 0}, started_hours_ago)
    return zone_id


async def seed_recipe(db, phases: list[tuple[float | None, dict]], zones: dict[int, int],
                      started_hours_ago: float = 1.0) -> int:
    """A recipe of `phases` ([(duration_hours or None, targets)]) that each zone runs at its phase index
    (zone id → index), begun `started_hours_ago`."""
    recipe = await insert_row(db, "recipes", name=f"recipe of zone {min(zones)}")
    for index, (hours, phase_targets) in enumerate(phases):
        await insert_row(db, "recipe_phases", recipe_id=recipe, phase_index=index, name=f"P{index}",
                         duration_hours=hours, targets=phase_targets)
    for zone_id, phase in zones.items():
        await insert_row(db, "zone_recipe_instances", zone_id=zone_id, recipe_id=recipe, current_phase_index=phase,
                         started_at=Sql(f"now() - make_interval(secs => {float(started_hours_ago) * 3600.0})"))
    return recipe


async def seed_node(db, uid: str, zone_id: int | None = None, *, channels: list[Channel | str] = (),
                    **columns: Any) -> int:
    """A node (columns as given, e.g. type, status, validated) and its channels."""
    node_id = await insert_row(db, "nodes", uid=uid, zone_id=zone_id, **columns)
    for channel in channels:
        channel = Channel(channel) if isinstance(channel, str) else channel
        kind = channel.type or ("sensor" if "sensor" in channel.name else "actuator")
        await insert_row(db, "node_channels", node_id=node_id, channel=channel.name, type=kind,
                         metric=channel.metric, config=channel.config)
    return node_id
