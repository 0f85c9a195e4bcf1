"""No valve left open by interval irrigation or recirculation: the firmware ignores set_relay's duration_ms,
so the engine writes the close before it opens and sends it when due — also from an engine started
afresh (a restart). Against the node simulator, which holds a relay as set, as the firmware does."""
import asyncio

import pytest

from common import testing
from testing import automation_commands, events, heartbeat, later, seed_zone
from tools.node_sim import SimOptions, Simulator
from tools.node_sim.layout import NodeSpec, actuator, hardware_id_for


def simulate(settings, zone: int, uid: str, node_type: str, channel: str) -> Simulator:
    spec = NodeSpec(uid, node_type, hardware_id_for(uid), "gh-1", zone, [actuator(channel)])
    return Simulator(SimOptions(host=settings.mqtt_host, port=settings.mqtt_port, topic_root=settings.mqtt_topic_root,
                                client_prefix=f"{settings.mqtt_client_id}-sim-", heartbeat_sec=2),
                     [spec]).start(wait=15)


async def until(check, message: str):
    async def probe():
        return check()
    return await testing.eventually(probe, 15, 0.05, message)


@pytest.mark.parametrize("kind, node_type, channel, caps, targets, event", [
    ("irrigation", "irrig", "valve_irrigation", {"irrigation_control": True},
     {"irrigation_interval_sec": 900, "irrigation_duration_sec": 8}, "IRRIGATION_STARTED"),
    ("recirculation", "recirculation", "valve_recirculation", {"recirculation": True},
     {"recirculation_enabled": True, "recirculation_interval_min": 30, "recirculation_duration_sec": 8},
     "RECIRCULATION_CYCLE"),
])
async def test_a_valve_opened_for_a_duration_is_closed_by_a_restarted_engine(db, make_engine, settings, kind,
                                                                             node_type, channel, caps, targets,
                                                                             event):
    z = await seed_zone(db, capabilities=caps, targets=targets, nodes={"nd-valve": (node_type, {channel: {}})},
                        telemetry={"WATER_LEVEL": 0.8})
    sim = simulate(settings, z.zone_id, "nd-valve", node_type, channel)
    node = sim.node("nd-valve")
    try:
        await make_engine().run_cycle()
        [opened] = [(r["cmd"], r["params"]) for r in await automation_commands(db, z.zone_id)]
        assert opened == ("set_relay", {"state": True, "duration_ms": 8000})
        assert len(await events(db, z.zone_id, event)) == 1
        await until(lambda: node.open_relays() == [channel], f"{channel} opened")

        # A fresh engine (nothing in memory) before the duration is over: the valve stays open.
        await heartbeat(db, minutes_ahead=0.1)
        await make_engine().run_cycle(later(seconds=5))
        assert len(await automation_commands(db, z.zone_id)) == 1
        await asyncio.sleep(0.3)
        assert node.open_relays() == [channel]

        # Once the duration is over the next cycle of any engine closes it.
        await heartbeat(db, minutes_ahead=0.2)
        await make_engine().run_cycle(later(seconds=9))
        await until(lambda: node.open_relays() == [], f"{channel} closed")
    finally:
        sim.stop()
        sim.clear_retained()
    closing = [(r["cmd"], r["params"], r["source"]) for r in await automation_commands(db, z.zone_id)][1:]
    assert closing == [("set_relay", {"state": False}, "automation")]
    close = await db.fetchrow("SELECT * FROM actuator_closes WHERE zone_id = $1", z.zone_id)
    assert (close["owner"], close["reason"], close["channel"]) == ("automation", kind, channel)
    assert close["done_at"] is not None and close["error"] is None
    assert len(await events(db, z.zone_id, event)) == 1  # closing is not a new cycle
