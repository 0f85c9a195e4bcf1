"""Which channels a firing drives, from a zone's online node channels (no servers)."""
from actuators import irrigation_targets


def row(uid, node_type, channel, channel_type="actuator", config=None):
    return {"uid": uid, "node_type": node_type, "channel": channel, "channel_type": channel_type, "config": config}


def test_each_irrigation_node_on_its_one_irrigation_channel():
    rows = [row("nd-both", "irrig", "valve_irrigation"), row("nd-both", "irrig", "pump_in", config={"k": 1}),
            row("nd-valve", "pump", "valve_irrigation"),
            row("nd-current", "irrig", "pump_current", "sensor"),          # no irrigation channel: left out
            row("nd-sensed", "irrig", "pump_in", "sensor"),                 # a sensor is never driven
            row("nd-ph", "ph", "pump_in")]                                  # not an irrigation node
    assert [(t.node_uid, t.channel, t.config) for t in irrigation_targets(rows)] == [
        ("nd-both", "pump_in", {"k": 1}), ("nd-valve", "valve_irrigation", {})]
