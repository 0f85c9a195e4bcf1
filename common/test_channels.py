"""The irrigation channel of a node: one rule for the scheduler and the automation engine."""
import pytest

from common.channels import irrigation_channel


@pytest.mark.parametrize("node_type, channels, expected", [
    ("irrig", ["flow_sensor", "pump_in"], "pump_in"),
    ("pump", ["pump_irrigation"], "pump_irrigation"),
    ("IRRIG", ["valve_irrigation", "water_level"], "valve_irrigation"),
    # the contract's order: pump_in, then pump_irrigation, then valve_irrigation
    ("irrig", ["valve_irrigation", "pump_irrigation", "pump_in"], "pump_in"),
    ("irrig", ["valve_irrigation", "pump_irrigation"], "pump_irrigation"),
    # nothing else on an irrigation node, not even a name with "pump" in it (a current sensor)
    ("irrig", ["pump_current", "flow_sensor"], None),
    ("pump", ["recirculation_pump"], None),
    # the names on a node of another type are not irrigation
    ("ph", ["pump_in", "pump_acid"], None),
    ("irrigation", ["pump_in"], None),
    (None, ["pump_in"], None),
    ("irrig", [], None),
])
def test_irrigation_channel(node_type, channels, expected):
    assert irrigation_channel(node_type, channels) == expected


def test_any_iterable_of_names():
    assert irrigation_channel("pump", {"valve_irrigation": {}, "pump_in": {}}) == "pump_in"  # a node's channel dict
