"""Channel names that say what an actuator does, shared by the services that drive them.

Valves (and other relays) are switched with `set_relay {state}`; the firmware ignores
`duration_ms` on set_relay, so whoever opens one must close it (common.actuator_closes).
"""
from __future__ import annotations

from typing import Iterable

FILL_CHANNELS = ("valve_fill", "fill_valve", "valve_in")
DRAIN_CHANNELS = ("valve_drain", "drain_valve", "valve_out")


def is_valve(channel: str) -> bool:
    """A channel switched by set_relay and left as set: valves and plain relays."""
    name = channel.lower()
    return "valve" in name or "relay" in name


# Irrigation, one rule for the scheduler and the automation engine, as the contract has it: irrigation
# runs on `irrig` / `pump` nodes (§2 node_type, §8.6), on "the irrigation pump (`pump_in`/`pump_irrigation`/
# `valve_irrigation` via `set_relay`)" (§4.2), in that order — the pump the firmware's irrigation node has
# first; a pump also stops by itself after duration_ms, a valve only when closed. No other channel is taken:
# a name merely containing "pump" on such a node may be a sensor (`pump_current`), and these names on a
# node of another type (a dosing node) are not its irrigation.
IRRIGATION_NODE_TYPES = ("irrig", "pump")
IRRIGATION_CHANNELS = ("pump_in", "pump_irrigation", "valve_irrigation")


def irrigation_channel(node_type: str | None, channels: Iterable[str]) -> str | None:
    """The channel of a node that irrigation commands go to, or None when the node does not irrigate."""
    if (node_type or "").lower() not in IRRIGATION_NODE_TYPES:
        return None
    names = set(channels)
    return next((name for name in IRRIGATION_CHANNELS if name in names), None)
