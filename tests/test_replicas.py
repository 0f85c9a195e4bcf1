"""Two replicas of every service against one stack, and the SIGKILL of either replica of each.

One private Mosquitto, the shared PostgreSQL (a database of this module's own) and Redis (a key
prefix of its own), the node simulator, and ten service processes: `<service>-1` and
`<service>-2`, each with its own MQTT client id, HTTP ports and (history-logger) Redis consumer
name, as deploy/README.md prescribes. Each test owns one service's part and kills its
replicas; what must hold through the deaths: no reading lost or stored twice, one registration
per node, no command published twice, no dose given twice, no scheduled firing fired twice.
"""
from __future__ import annotations

import asyncio
import collections
import datetime as dt
import time

import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from common import testing
from common.db import Database
from tests.stack import (PORT_FIELDS, SERVICES, ServiceStack, create_database, tear_down,
                         free_ports, node_spec, run_with_db, seed_nodes)

TOKEN = "replicas-token"
PH_TARGET = {"min": 5.6, "max": 6.0}
PH_COOLDOWN_MIN = 0.2
SERVICE_ENV = {
    "AUTOMATION_INTERVAL_SEC": "2",
    "SCHEDULER_INTERVAL_SEC": "2",
    "COMMAND_TIMEOUT_SEC": "6",
    "COMMAND_TIMEOUT_SWEEP_SEC": "1",
    "TELEMETRY_FLUSH_MS": "200",
    "PH_MAX_RATE_PER_MIN": "14",      # the simulated reservoir mixes a dose within seconds
    "PH_COOLDOWN_MIN": str(PH_COOLDOWN_MIN),
    "MQTT_SHARED_GROUP": "history-logger",
    "TELEMETRY_CLAIM_IDLE_MS": "3000",  # a dead writer's pending stream entries are taken over soon
    "HISTORY_LOGGER_LEASE_SEC": "3",    # where a logger rescues a dead replica's MQTT session: soon
    "ZONE_LEASE_SEC": "6",              # a zone claimed by an engine killed mid-cycle is free again soon
}


def replicas(service: str) -> tuple[str, str]:
    return f"{service}-1", f"{service}-2"


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def _seed(db: Database) -> dict[str, int]:
    """Like Laravel: a dosing zone A, irrigated zones B and D (their schedule is set by the scheduler
    test), an empty zone C, and their nodes."""
    gh = await testing.seed_greenhouse(db, "gh-rep", "Rep", timezone="UTC")
    zones = {}
    for name, caps in (("A", {"ph_control": True}), ("B", None), ("C", None), ("D", None)):
        zones[name] = await testing.seed_zone(db, gh, name, status="RUNNING", capabilities=caps)
    await testing.seed_recipe(db, [(None, {"ph": PH_TARGET, "ec": {"min": 0.6, "max": 1.6}}),
                                   (None, {"irrigation_duration_sec": 2})],
                              {zones["A"]: 0, zones["B"]: 1, zones["D"]: 1}, started_hours_ago=0)
    await seed_nodes(db, _simulated(zones) + [node_spec("nd-rep-burst", "climate", "gh-rep", zones["B"])])
    return zones


def _simulated(zones: dict[str, int]):
    return [node_spec("nd-rep-ph", "ph", "gh-rep", zones["A"]), node_spec("nd-rep-irr", "irrig", "gh-rep", zones["B"]),
            node_spec("nd-rep-clim", "climate", "gh-rep", zones["B"]),
            node_spec("nd-rep-irr2", "irrig", "gh-rep", zones["D"])]


class Stack(ServiceStack):
    def __init__(self, settings, zones: dict[str, int]):
        super().__init__(settings, SERVICE_ENV)
        self.zones = zones

    def start_replicas(self, service: str) -> None:
        for i, name in enumerate(replicas(service), 1):
            self.start(name, service, MQTT_CLIENT_ID=f"{self.settings.mqtt_client_id}-{i}",
                       **free_ports(PORT_FIELDS[service]))

    async def restart(self, name: str) -> None:
        self.start(name)
        await self.wait_ready([name])

    async def revive(self) -> None:
        """Restart every replica a test left dead, so that one test's failure stays its own."""
        dead = [name for name, process in self.processes.items() if process.proc is None]
        for name in dead:
            self.start(name)
        if dead:
            await self.wait_ready(dead)


@pytest.fixture(scope="module")
def stack(pg_template):
    name = create_database(pg_template)
    broker = testing.PrivateMosquitto.like_deploy().start()
    settings = testing.isolated_settings(PG_DB=name, PY_API_TOKEN=TOKEN, COMMAND_TIMEOUT_SEC="6",
                                         MQTT_PORT=str(broker.port),
                                         LARAVEL_API_URL=f"http://127.0.0.1:{testing.free_port()}")
    s = Stack(settings, asyncio.run(run_with_db(settings, _seed)))
    try:
        for service in SERVICES:
            s.start_replicas(service)
        asyncio.run(s.wait_ready(timeout=90))
        s.start_simulator(_simulated(s.zones), poll_ms=500, heartbeat_sec=5, hello_interval_sec=2,
                          initial_ph=6.3, initial_ec=1.1, seed=11)
        yield s
    finally:
        codes = tear_down(s, name, broker)
    assert codes == {n: 0 for n in codes}, f"services did not stop cleanly: {codes}\n{s.logs()}"


@pytest.fixture
async def db(stack):
    database = Database(stack.settings)
    await database.connect()
    yield database
    await database.close()
    await stack.revive()


# ---------------------------------------------------------------------------------------------
async def test_automation_replica_death_doses_each_correction_once(stack, db):
    """Two engines share the zones; the engine holding the dosing zone is SIGKILLed after its
    first dose; the other takes the zone over. pH reaches the band, and no two doses of the
    zone's pump come closer than the cooldown (two engines acting at once would)."""
    zone = stack.zones["A"]
    reservoir = stack.sim.reservoir(zone)
    assert reservoir.snapshot()["ph"] > PH_TARGET["max"]

    async def doses():
        return await db.fetch("SELECT cmd_id, channel, created_at, status FROM commands WHERE zone_id = $1"
                              " AND source = 'automation' AND cmd = 'dose' ORDER BY created_at", zone)

    await testing.eventually(doses, 60, 0.3, "a first dose")
    owner = await db.fetchval("SELECT owner FROM automation_zone_runs WHERE zone_id = $1", zone)
    prefix = stack.settings.mqtt_client_id
    victim = next(n for i, n in enumerate(replicas("automation-engine"), 1) if owner.startswith(f"{prefix}-{i}-"))
    stack.kill(victim)
    survivor = next(f"{prefix}-{i}-" for i, n in enumerate(replicas("automation-engine"), 1) if n != victim)

    async def taken_over():
        owner = await db.fetchval("SELECT owner FROM automation_zone_runs WHERE zone_id = $1", zone)
        return owner.startswith(survivor)
    await testing.eventually(taken_over, 30, 0.3, "the other engine claims the zone")

    async def in_band():
        ph = reservoir.snapshot()["ph"]
        return PH_TARGET["min"] <= ph <= PH_TARGET["max"]
    try:
        await testing.eventually(in_band, 90, 0.5, "simulated pH inside the band")
    except AssertionError:
        raise AssertionError(f"{[dict(d) for d in await doses()]}\n{stack.logs()}") from None
    await stack.restart(victim)
    other = next(n for n in replicas("automation-engine") if n != victim)
    stack.kill(other)  # the other engine's death too: the restarted one carries on alone
    await asyncio.sleep(4)
    await stack.restart(other)

    given = await doses()
    assert given and len(given) <= 4  # MAX_DOSES_PER_PUMP_HOUR
    by_pump = collections.defaultdict(list)
    for d in given:
        by_pump[d["channel"]].append(d["created_at"])
    for channel, times in by_pump.items():
        gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
        assert all(g >= PH_COOLDOWN_MIN * 60 - 1 for g in gaps), (channel, gaps)
    runs = await db.fetch("SELECT DISTINCT owner FROM automation_zone_runs WHERE zone_id = $1", zone)
    assert runs  # the zone is still claimed by an engine after both deaths


# ---------------------------------------------------------------------------------------------
# Mosquitto keeps routing a dead shared-subscription member's share to its persistent session; the
# history-logger's rescue of a dead replica's session (history-logger/replicas.py) is what makes this pass.
async def test_history_logger_replica_death_loses_and_duplicates_no_reading(stack, db):
    """A burst of readings split between the two loggers (shared subscription); one logger is
    SIGKILLed in the middle and stays dead until every reading is stored by the other."""
    topic = stack.topics.channel_topic("gh-rep", f"zn-{stack.zones['B']}", "nd-rep-burst", "temp_air", "telemetry")
    count, total = 1500, 0
    base_ms = int(time.time() * 1000) - 120_000

    async def stored():
        return await db.fetchval("SELECT count(*) FROM telemetry_samples WHERE node_id ="
                                 " (SELECT id FROM nodes WHERE uid = 'nd-rep-burst')")

    for victim in replicas("history-logger"):
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=testing.unique_id("burst-"))
        client.connect(stack.settings.mqtt_host, stack.settings.mqtt_port)
        client.loop_start()
        try:
            infos = []
            for i in range(count):
                payload = orjson.dumps({"metric_type": "TEMP_AIR", "value": 20 + (total + i) / 1000, "ts": base_ms + total + i})
                infos.append(client.publish(topic, payload, qos=1))
                if i == count // 2:
                    stack.kill(victim)
                if i % 100 == 0:
                    await asyncio.sleep(0.05)
            for info in infos:
                info.wait_for_publish(30)
        finally:
            client.disconnect()
            client.loop_stop()
        total += count
        try:
            await testing.eventually(lambda: _at_least(stored, total), 30, 0.5,
                                     f"{total} readings stored while {victim} is dead")
        except AssertionError:
            raise AssertionError(f"stored {await stored()} of {total} while {victim} is dead") from None
        await stack.restart(victim)
    await asyncio.sleep(2)
    # Each reading has its own value (ts may keep whole seconds only, as on a Laravel-built database).
    rows = await db.fetchrow("SELECT count(*) AS n, count(DISTINCT value) AS distinct_values FROM telemetry_samples"
                             " WHERE node_id = (SELECT id FROM nodes WHERE uid = 'nd-rep-burst')")
    assert (rows["n"], rows["distinct_values"]) == (total, total)


async def _at_least(fetch, n):
    return (await fetch()) >= n


# ---------------------------------------------------------------------------------------------
async def test_bridge_replica_death_publishes_each_command_once(stack, db):
    """Laravel posts through either bridge; a bridge that died is retried on the other with the same
    cmd_id; the same cmd_id posted to both at once is published once."""
    zone = stack.zones["B"]
    probe = testing.MqttProbe(stack.settings.mqtt_host, stack.settings.mqtt_port,
                              f"{stack.settings.mqtt_topic_root}/+/+/nd-rep-clim/+/command")
    cmd_ids: list[str] = []
    try:
        async with httpx.AsyncClient(timeout=10, headers=_auth()) as client:
            async def post(name: str, cmd_id: str, state: bool) -> httpx.Response:
                return await client.post(stack.url_of(name, f"/bridge/zones/{zone}/commands"), json={
                    "type": "set_relay", "params": {"state": state}, "greenhouse_uid": "gh-rep",
                    "node_uid": "nd-rep-clim", "channel": "fan_A", "cmd_id": cmd_id})

            async def post_until_answered(name: str, cmd_id: str, state: bool) -> httpx.Response:
                """A 503 says the other replica is publishing this cmd_id right now: retry, as Retry-After asks."""
                for _ in range(40):
                    answer = await post(name, cmd_id, state)
                    if answer.status_code != 503:
                        break
                    await asyncio.sleep(0.25)
                return answer

            async def post_with_retry(cmd_id: str, state: bool) -> None:
                """Both replicas behind one address: a refused connection is retried on the next."""
                for name in replicas("mqtt-bridge"):
                    try:
                        answer = await post(name, cmd_id, state)
                    except httpx.TransportError:
                        continue
                    assert answer.status_code == 200, answer.text
                    return
                raise AssertionError(f"no bridge answered for {cmd_id}")

            for round_, victim in enumerate(replicas("mqtt-bridge")):
                for i in range(3):  # both alive: the same cmd_id to both replicas at once
                    cmd_id = f"rep-both-{round_}-{i}"
                    cmd_ids.append(cmd_id)
                    answers = await asyncio.gather(*(post_until_answered(n, cmd_id, i % 2 == 0)
                                                     for n in replicas("mqtt-bridge")))
                    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
                stack.kill(victim)
                for i in range(3):  # one dead: every post still lands once
                    cmd_id = f"rep-dead-{round_}-{i}"
                    cmd_ids.append(cmd_id)
                    await post_with_retry(cmd_id, i % 2 == 0)
                await stack.restart(victim)

        async def all_acked():
            rows = await db.fetch("SELECT cmd_id, status FROM commands WHERE cmd_id = ANY($1)", cmd_ids)
            return len(rows) == len(cmd_ids) and all(r["status"] == "ack" for r in rows)
        await testing.eventually(all_acked, 30, 0.3, "every command acknowledged")
        published = collections.Counter(p["cmd_id"] for p in probe.payloads())
        assert {c: published[c] for c in cmd_ids} == {c: 1 for c in cmd_ids}
    finally:
        probe.close()


# ---------------------------------------------------------------------------------------------
async def test_device_registry_replica_death_registers_each_node_once(stack, db):
    """New nodes say hello to both registries; either registry dies; each node gets one row, its
    config is applied, and no config version is made or recorded twice."""
    new = [node_spec(f"nd-rep-new{i}", "ph", None, None) for i in range(1, 5)]
    first, second = replicas("device-registry")
    async with httpx.AsyncClient(timeout=10, headers=_auth()) as client:
        async def uid_of(spec):
            return await db.fetchval("SELECT uid FROM nodes WHERE hardware_id = $1", spec.hardware_id)

        async def assign(name: str, spec, zone_key: str) -> None:
            uid = await testing.eventually(lambda: uid_of(spec), 30, 0.3, f"{spec.uid} registered")
            answer = await client.put(stack.url_of(name, f"/nodes/{uid}/zone"), json={"zone_id": stack.zones[zone_key]})
            assert answer.status_code == 200, answer.text

            async def applied():
                state = (await client.get(stack.url_of(name, f"/nodes/{uid}/config"))).json()["data"]
                node = stack.sim.node(spec.hardware_id)
                return (state["up_to_date"] and node.applied_config is not None
                        and node.applied_config["version"] == state["version"])
            try:
                await testing.eventually(applied, 30, 0.3, f"config of {uid} applied")
            except AssertionError:
                state = (await client.get(stack.url_of(name, f"/nodes/{uid}/config"))).json()["data"]
                node = stack.sim.node(spec.hardware_id)
                raise AssertionError(f"config of {uid} not applied: {state}\nnode: {node.applied_config}"
                                     f" {node.segments}\n{stack.logs()}") from None

        stack.sim.add(new[0])
        stack.kill(first)
        stack.sim.add(new[1])
        await assign(second, new[0], "C")
        await stack.restart(first)
        stack.kill(second)
        stack.sim.add(new[2])
        await assign(first, new[1], "C")
        await assign(first, new[2], "C")
        await stack.restart(second)
        stack.sim.add(new[3])  # both alive: its hellos and config_response reach both
        await assign(second, new[3], "C")
        await asyncio.sleep(3)

    rows = await db.fetch("SELECT hardware_id, count(*) AS n FROM nodes WHERE hardware_id = ANY($1) GROUP BY 1",
                          [s.hardware_id for s in new])
    assert {r["hardware_id"]: r["n"] for r in rows} == {s.hardware_id: 1 for s in new}
    versions = await db.fetch(
        "SELECT n.hardware_id, v.version, v.config_hash FROM node_config_versions v JOIN nodes n ON n.id = v.node_id"
        " WHERE n.hardware_id = ANY($1) ORDER BY 1, 2", [s.hardware_id for s in new])
    hashes = collections.defaultdict(list)
    for v in versions:
        hashes[v["hardware_id"]].append(v["config_hash"])
    assert all(len(h) == len(set(h)) for h in hashes.values()), versions  # no version made twice
    events = await db.fetch(
        "SELECT details->>'node_uid' AS uid, details->>'version' AS version, count(*) AS n FROM zone_events"
        " WHERE type = 'NODE_CONFIG_APPLIED' GROUP BY 1, 2")
    assert all(e["n"] == 1 for e in events), [dict(e) for e in events]


# ---------------------------------------------------------------------------------------------
def _fired_by(stack: Stack, item: str) -> list[str]:
    """The scheduler replicas whose log says they fired `item`."""
    found = []
    for name in replicas("scheduler"):
        for line in stack.processes[name].log().splitlines():
            if '"schedule_fired"' in line and item in line:
                found.append(name)
    return found


async def test_scheduler_replica_death_fires_each_time_once(stack, db):
    """Zones B and D irrigate at the next minute. Both schedulers race for the two firings; then the
    one that fired is SIGKILLed and restarted, and the other too: each restarted scheduler's first
    tick looks back over the fired minute (the catch-up window). Each firing happens exactly once."""
    due = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=70)).replace(second=0, microsecond=0)
    item = f"irrigation@{due:%H:%M}"
    await db.execute("UPDATE recipe_phases SET targets = $1 WHERE phase_index = 1",
                     {"irrigation_schedule": f"{due:%H:%M}", "irrigation_duration_sec": 2})
    zones = [stack.zones["B"], stack.zones["D"]]
    nodes = {stack.zones["B"]: "nd-rep-irr", stack.zones["D"]: "nd-rep-irr2"}

    async def commands():
        return await db.fetch("SELECT c.zone_id, c.cmd_id, c.status FROM commands c JOIN nodes n ON n.id = c.node_id"
                              " WHERE c.source = 'scheduler' AND n.uid = ANY($1) ORDER BY c.zone_id",
                              list(nodes.values()))

    async def runs():
        return await db.fetch("SELECT zone_id, id FROM scheduler_runs WHERE zone_id = ANY($1) AND item = $2",
                              zones, item)

    await testing.eventually(lambda: _count_at_least(runs, 2), 90, 0.3, f"{item} fired in both zones")
    await testing.eventually(lambda: _count_at_least(commands, 2), 20, 0.3, f"{item} commands")
    winners = await _wait_fired_by(stack, item, 2)
    for name in [winners[0], *[n for n in replicas("scheduler") if n != winners[0]]]:
        stack.kill(name)
        await stack.restart(name)
        await asyncio.sleep(3)  # ticks of the restarted scheduler pass over the fired minute

    assert sorted(r["zone_id"] for r in await runs()) == sorted(zones)
    sent = await commands()
    assert sorted(c["zone_id"] for c in sent) == sorted(zones), [dict(c) for c in sent]
    try:
        await testing.eventually(lambda: _all_acked(db, [c["cmd_id"] for c in sent]), 20, 0.3, "irrigation acks")
    except AssertionError:
        raise AssertionError(f"{[dict(c) for c in await commands()]}") from None
    for c in sent:
        answered = [r for r in stack.sim.node(nodes[c["zone_id"]]).responses if r.get("cmd_id") == c["cmd_id"]]
        assert len(answered) == 1, answered
    assert await db.fetchval("SELECT count(*) FROM zone_events WHERE zone_id = ANY($1) AND type = 'IRRIGATION_STARTED'",
                             zones) == 2


async def _count_at_least(fetch, n):
    return len(await fetch()) >= n


async def _wait_fired_by(stack: Stack, item: str, count: int) -> list[str]:
    """The replicas that fired the `count` firings of `item`, one name per firing."""
    async def named():
        found = _fired_by(stack, item)
        return found if len(found) >= count else None
    found = await testing.eventually(named, 10, 0.2, f"the scheduler logs naming {item}")
    assert len(found) == count, found
    return found


async def _all_acked(db: Database, cmd_ids: list[str]) -> bool:
    return await db.fetchval("SELECT bool_and(status = 'ack') FROM commands WHERE cmd_id = ANY($1)", cmd_ids)
