"""Channel names that say what an actuator does, shared by the services that drive them.

Valves (and other relays) are switched with `set_relay {state}`; the firmware ignores
`duration_ms` on set_relay, so whoever opens one must close it (common.actuator_closes).
"""
from __future__ import annotations

FILL_CHANNELS = ("valve_fill", "fill_valve", "valve_in")
DRAIN_CHANNELS = ("valve_drain", "drain_valve", "valve_out")


def is_valve(channel: str) -> bool:
    """A channel switched by set_relay and left as set: valves and plain relays."""
    name = channel.lower()
    return "valve" in name or "relay" in name
