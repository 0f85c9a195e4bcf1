"""The closed loop under faults: the node simulator (fault-injecting), the history-logger as a real
process, the engine cycling every second, all on the real PostgreSQL, Redis and Mosquitto.

Five zones, one fault each; the test counts the doses given while a gate should have held:

* stuck      — the pH probe reads 6.6 from the start: one dose (nothing shows it stuck before), none after;
* stuck-later— it follows the true pH (in band), then freezes at 6.6: at most one dose after it froze;
* jumping    — true pH in band, bursts of two spikes of −1.9 in a row: no dose at all;
* offline    — the pump node loses its connection (will → offline): no dose until it is back;
* dropped    — the pump node never answers: no dose while an earlier one is unanswered.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import time

import httpx
import pytest

from common import testing
from engine import utcnow
from tools.node_sim import NodeSpec, ReservoirParams, SensorFault, SimOptions, Simulator
from tools.node_sim.layout import actuator, hardware_id_for, sensor

STUCK_MIN_MINUTES = 0.25   # 15 s
MARGIN = dt.timedelta(seconds=4)   # logger flush + one cycle + clock granularity
SCENARIOS = ("stuck", "later", "jump", "offline", "dropped")
TRUE_PH = {"stuck": 6.6, "later": 5.8, "jump": 5.8, "offline": 6.6, "dropped": 6.6}
LOGGER_ENV = {"COMMAND_TIMEOUT_SEC": "4", "COMMAND_TIMEOUT_SWEEP_SEC": "1", "TELEMETRY_FLUSH_MS": "200"}


def _specs(zones: dict[str, int]) -> list[NodeSpec]:
    specs = []
    for name, zone_id in zones.items():
        for uid, channels in ((f"cl-sens-{name}", [sensor("ph_sensor", "PH", 500)]),
                              (f"cl-pump-{name}", [actuator("pump_acid", 0.5, min_off_ms=500),
                                                   actuator("pump_base", 0.5, min_off_ms=500)])):
            specs.append(NodeSpec(uid, "ph", hardware_id_for(uid), "gh-cl", zone_id, channels))
    return specs


async def _seed(db) -> dict[str, int]:
    """As Laravel leaves it: nodes offline with last_seen_at NULL until they are heard from."""
    gh = await testing.seed_greenhouse(db, "gh-cl", "CL", timezone="UTC")
    zones = {name: await testing.seed_zone(db, gh, name, targets={"ph": {"min": 5.6, "max": 6.0}},
                                           started_hours_ago=0, status="RUNNING", capabilities={"ph_control": True})
             for name in SCENARIOS}
    for spec in _specs(zones):
        channels = [testing.Channel(ch.name, None if ch.is_sensor else {"safe_limits": ch.safe_limits,
                                                                          "ml_per_second": ch.ml_per_second},
                                    type=ch.type.lower(), metric=ch.metric) for ch in spec.channels]
        await testing.seed_node(db, spec.uid, spec.zone_id, channels=channels, hardware_id=spec.hardware_id,
                                type="ph", status="offline", validated=True)
    return zones


def _utc_of(monotonic_at: float) -> dt.datetime:
    return utcnow() - dt.timedelta(seconds=time.monotonic() - monotonic_at)


async def _node_status(db, uid: str) -> str:
    return await db.fetchval("SELECT status FROM nodes WHERE uid = $1", uid)


async def _doses(db, zone_id: int) -> list:
    return await db.fetch("SELECT cmd_id, channel, status, created_at, updated_at FROM commands"
                          " WHERE zone_id = $1 AND source = 'automation' AND cmd = 'dose' ORDER BY id", zone_id)


async def _skipped(db, zone_id: int, reason: str) -> int:
    return await db.fetchval("SELECT count(*) FROM zone_events WHERE zone_id = $1 AND type = 'PH_CORRECTION_SKIPPED'"
                             " AND details->>'reason' = $2", zone_id, reason)


@pytest.fixture
async def logger(settings):
    env = dict(testing.settings_env(settings), **LOGGER_ENV, HISTORY_LOGGER_PORT=str(testing.free_port()),
               HISTORY_LOGGER_METRICS_PORT=str(testing.free_port()))
    process = testing.ServiceProcess("history-logger", env).start()
    url = f"http://127.0.0.1:{env['HISTORY_LOGGER_PORT']}/ready"

    async def ready():
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                return (await client.get(url)).status_code == 200
        except httpx.HTTPError:
            return False
    # ready = subscribed: the nodes' first (not retained) ONLINE reaches it
    await testing.eventually(ready, 30, 0.2, f"history-logger ready\n{process.log()[-2000:]}")
    await asyncio.sleep(0.5)
    yield process
    assert process.terminate() == 0, process.log()[-3000:]


@pytest.mark.timeout(360)  # about 70 s alone; servers start slower on a loaded machine
async def test_no_dose_while_a_gate_should_hold(db, settings, logger, make_engine):
    zones = await _seed(db)
    sim = Simulator(SimOptions(host=settings.mqtt_host, port=settings.mqtt_port, topic_root=settings.mqtt_topic_root,
                               client_prefix=f"{settings.mqtt_client_id}-sim-", heartbeat_sec=1.0, seed=11,
                               reservoir=ReservoirParams(ph_drift_per_min=0.0, mix_sec=2.0)),
                    _specs(zones))
    for name, ph in TRUE_PH.items():
        sim.reservoir(zones[name]).ph = ph
    faults = {"stuck": SensorFault.stuck(6.6), "later": SensorFault.stuck(6.6, after_sec=20),
              "jump": SensorFault.spikes(-1.9, every=8, burst=2)}
    for name, fault in faults.items():
        sim.node(f"cl-sens-{name}").sensor_faults["ph_sensor"] = fault
    sim.node("cl-pump-dropped").drop_responses = 10_000
    engine = make_engine(ph_cooldown_min=0.05, max_doses_per_pump_hour=1000, ph_max_ml_per_hour=100_000,
                         stuck_min_minutes=STUCK_MIN_MINUTES, stuck_min_samples=6, refusal_alert_cycles=1000)
    sim.start(wait=20)
    try:
        await testing.eventually(lambda: db.fetchval("SELECT bool_and(status = 'online') FROM nodes"), 30, 0.2,
                                 "every node online")
        sim.node("cl-pump-offline").go_offline(abrupt=True)
        await testing.eventually(lambda: _is(_node_status(db, "cl-pump-offline"), "offline"), 30, 0.2,
                                 "the pump node offline")
        offline_from = utcnow()
        back_at = time.monotonic() + 30
        back_online = None
        cycles = 0
        deadline = time.monotonic() + 55
        while time.monotonic() < deadline:
            result = await engine.run_cycle()
            cycles += 1
            assert result.failed == 0, result
            if back_online is None and time.monotonic() >= back_at:
                sim.node("cl-pump-offline").start()
                await testing.eventually(lambda: _is(_node_status(db, "cl-pump-offline"), "online"), 30, 0.2,
                                         "the pump node back")
                back_online = utcnow()
            await asyncio.sleep(1.0)
        await testing.eventually(lambda: _positive(_doses(db, zones["offline"])), 20, 0.5,
                                 "a dose once the pump node is back")
        # the node cannot answer after the simulator stops: let the open dose time out before counting
        await asyncio.sleep(1)
    finally:
        sim.stop()
        sim.clear_retained()

    stuck_window = dt.timedelta(minutes=STUCK_MIN_MINUTES)
    report = {}
    # stuck from the start: the gate holds once the window is full
    stuck_since = _utc_of(faults["stuck"].stuck_at)
    doses = await _doses(db, zones["stuck"])
    late = [d for d in doses if d["created_at"] > stuck_since + stuck_window + MARGIN]
    report["stuck"] = (len(doses), len(late))
    assert late == [], report
    assert len(doses) <= 1, report  # the probe did not move through the first dose: stuck from then on
    assert await _skipped(db, zones["stuck"], "stuck_sensor") >= 1
    # stuck after varying (in band first: no dose; out of band once frozen)
    frozen = _utc_of(faults["later"].stuck_at)
    doses = await _doses(db, zones["later"])
    late = [d for d in doses if d["created_at"] > frozen + stuck_window + MARGIN]
    report["later"] = (len(doses), len(late))
    assert late == [] and len(doses) <= 1, report
    assert [d for d in doses if d["created_at"] < frozen] == []
    assert await _skipped(db, zones["later"], "stuck_sensor") >= 1
    # jumping: never a dose, and the spikes were really sent and refused
    assert await _doses(db, zones["jump"]) == [], report
    assert faults["jump"].spiked >= 6
    assert await _skipped(db, zones["jump"], "implausible_rate") >= 1
    # offline pump node: nothing while it was offline, a dose once it was back
    doses = await _doses(db, zones["offline"])
    report["offline"] = [d["created_at"] for d in doses]
    assert [d for d in doses if offline_from <= d["created_at"] < back_online] == [], report
    assert await _skipped(db, zones["offline"], "node_offline") >= 1
    # dropped responses: a dose only once the one before is closed (timed out)
    doses = await _doses(db, zones["dropped"])
    report["dropped"] = [(d["status"], d["created_at"], d["updated_at"]) for d in doses]
    assert len(doses) >= 2, report
    for earlier, later_dose in zip(doses, doses[1:]):
        assert earlier["status"] == "timeout" and later_dose["created_at"] >= earlier["updated_at"], report
    assert cycles >= 30


async def _is(value, wanted):
    return (await value) == wanted


async def _positive(rows):
    return bool(await rows)
