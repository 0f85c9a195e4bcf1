"""Machinery of the cross-service tests: a database of their own, the services as real processes
(`python main.py`, as the Dockerfiles run them), Laravel-like seeding of nodes, the node simulator.

A process is known by a name ("scheduler", or "scheduler-2" for a second replica); the stack
remembers each name's service folder and environment, so `start(name)` after `kill(name)`
brings back the same replica (same client id, consumer name and ports).
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import asyncpg
import httpx

from common import testing
from common.db import Database
from common.topics import Topics
from tools.node_sim import ChannelSpec, NodeSpec, SimOptions, Simulator, default_channels
from tools.node_sim.layout import hardware_id_for

SERVICES = ("history-logger", "device-registry", "mqtt-bridge", "automation-engine", "scheduler")
# Every port a service listens on, and the one whose /ready says it is up.
PORT_FIELDS = {
    "mqtt-bridge": ("BRIDGE_PORT",),
    "history-logger": ("HISTORY_LOGGER_PORT", "HISTORY_LOGGER_METRICS_PORT"),
    "automation-engine": ("AUTOMATION_PORT",),
    "scheduler": ("SCHEDULER_PORT",),
    "device-registry": ("REGISTRY_PORT",),
}
ALL_PORT_FIELDS = tuple(f for fields in PORT_FIELDS.values() for f in fields)


# -- a database of the test's own, copied from the migrated template -------------------------------
def _admin():
    env = testing.SHARED_ENV
    return asyncpg.connect(host=env["PG_HOST"], port=int(env["PG_PORT"]), user=env["PG_USER"],
                           password=env["PG_PASS"] or None, database="postgres")


async def _create_database(name: str, template: str) -> None:
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()


async def _drop_database(name: str) -> None:
    admin = await _admin()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def create_database(template: str) -> str:
    """A copy of the template, named so that the root harness drops it if this run dies."""
    name = f"hydro_t_{os.getpid()}_{testing.unique_id('')}"
    asyncio.run(_create_database(name, template))
    return name


def drop_database(name: str) -> None:
    asyncio.run(_drop_database(name))


def simulator(settings, specs: list[NodeSpec], wait: float = 15, **options) -> Simulator:
    """The simulated firmware of `specs` on the settings' broker and topic root, started."""
    return Simulator(SimOptions(host=settings.mqtt_host, port=settings.mqtt_port, topic_root=settings.mqtt_topic_root,
                                client_prefix=f"{settings.mqtt_client_id}-sim-", **options), specs).start(wait=wait)


def tear_down(stack: "ServiceStack", database: str, broker: testing.PrivateMosquitto) -> dict[str, int]:
    """Stop the stack's services, drop its database, Redis keys and broker; the services' exit codes."""
    codes = stack.stop()
    drop_database(database)
    asyncio.run(testing.drop_redis_keys(stack.settings))
    broker.close()
    return codes


def free_ports(fields=ALL_PORT_FIELDS) -> dict[str, str]:
    return {field: str(testing.free_port()) for field in fields}


async def run_with_db(settings, work):
    """`await work(db)` on a connected Database of `settings`, closed afterwards."""
    db = Database(settings)
    await db.connect()
    try:
        return await work(db)
    finally:
        await db.close()


# -- Laravel-like seeding ---------------------------------------------------------------------------
def node_spec(uid: str, node_type: str, gh: str | None, zone_id: int | None) -> NodeSpec:
    return NodeSpec(uid=uid, type=node_type, hardware_id=hardware_id_for(uid), gh=gh, zone_id=zone_id,
                    channels=default_channels(node_type))


async def seed_nodes(db: Database, specs: list[NodeSpec]) -> dict[str, int]:
    """Nodes as Laravel registers them (offline, never seen) with their channels; uid → node id."""
    ids = {}
    for spec in specs:
        ids[spec.uid] = await testing.seed_node(
            db, spec.uid, spec.zone_id, channels=[_channel(ch) for ch in spec.channels], hardware_id=spec.hardware_id,
            type=spec.type, status="offline", lifecycle_state="ACTIVE", validated=True)
    return ids


def _channel(ch: ChannelSpec) -> testing.Channel:
    """A simulated channel as Laravel stores it: an actuator's config holds its limits (and dose rate)."""
    if ch.type == "SENSOR":
        return testing.Channel(ch.name, type="sensor", metric=ch.metric)
    config = {"safe_limits": ch.safe_limits}
    if ch.ml_per_second:
        config["ml_per_second"] = ch.ml_per_second
    return testing.Channel(ch.name, config, type=ch.type.lower(), metric=ch.metric)


# -- the services as processes ----------------------------------------------------------------------
class ServiceStack:
    """The services of one test module, on one broker, database and Redis prefix."""

    def __init__(self, settings, service_env: dict[str, str]):
        self.settings = settings
        self.service_env = service_env
        self.topics = Topics(settings.mqtt_topic_root)
        self.processes: dict[str, testing.ServiceProcess] = {}
        self._folders: dict[str, str] = {}
        self._env: dict[str, dict[str, str]] = {}
        self.sim: Simulator | None = None

    def url(self, port_field: str, path: str) -> str:
        """URL on the port `settings` names (the first replica's)."""
        return f"http://127.0.0.1:{getattr(self.settings, port_field)}{path}"

    def port(self, name: str, field: str) -> int:
        return int(self._env.get(name, {}).get(field) or getattr(self.settings, field.lower()))

    def url_of(self, name: str, path: str) -> str:
        """URL on the main HTTP port of the process `name`."""
        folder = self._folders.get(name, name)  # a process started under its folder's name
        return f"http://127.0.0.1:{self.port(name, PORT_FIELDS[folder][0])}{path}"

    def start(self, name: str, service: str | None = None, **env: str) -> None:
        """Start process `name` (a service folder, or a replica name with `service` given)."""
        if name not in self._folders:
            self._folders[name] = service or name
            self._env[name] = env
        full = dict(testing.settings_env(self.settings), **self.service_env, **self._env[name])
        self.processes[name] = testing.ServiceProcess(self._folders[name], full).start()

    def kill(self, name: str) -> None:
        """SIGKILL: no drain, no clean disconnect, no lease release."""
        self.processes[name].kill()

    async def wait_ready(self, names: list[str] | None = None, timeout: float = 60) -> None:
        names = list(self.processes) if names is None else names
        async with httpx.AsyncClient(timeout=2) as client:
            async def all_ready():
                for name in names:
                    try:
                        if (await client.get(self.url_of(name, "/ready"))).status_code != 200:
                            return False
                    except httpx.HTTPError:
                        return False
                return True
            try:
                await testing.eventually(all_ready, timeout, 0.25, f"/ready of {', '.join(names)}")
            except AssertionError:
                raise AssertionError(self.logs()) from None

    def start_simulator(self, specs: list[NodeSpec], **options) -> Simulator:
        self.sim = simulator(self.settings, specs, wait=20, **options)
        return self.sim

    def stop(self) -> dict[str, int]:
        """Stop the simulator and SIGTERM every process; returns each process's exit code."""
        if self.sim is not None:
            self.sim.stop()
        running = [p for p in self.processes.values() if p.proc is not None and p.proc.poll() is None]
        for process in running:  # all drain at once; one SIGTERM each (a second could land after the handler)
            process.proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            proc, process.proc = process.proc, None
            if proc is None:
                codes[name] = 0
                continue
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            codes[name] = proc.returncode
        return codes

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {n}\n{p.log()[-tail:]}" for n, p in self.processes.items())
