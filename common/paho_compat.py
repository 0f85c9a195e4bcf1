"""The two things common.mqtt needs that paho-mqtt has no public API for, in one place.

Both reach into paho's private client state, which may change in any release: this module
refuses to load with a paho-mqtt version it was not written for (update the pin in
common/requirements.txt, re-check these functions against the new paho source and
`test_paho_compat.py`, then add the version here).
"""
from __future__ import annotations

import struct

import paho.mqtt.client as paho
from paho.mqtt import __version__ as PAHO_VERSION

SUPPORTED_VERSIONS = ("2.2.0",)

if PAHO_VERSION not in SUPPORTED_VERSIONS:
    raise ImportError(
        f"common.paho_compat uses paho-mqtt internals checked for version(s) {', '.join(SUPPORTED_VERSIONS)}; "
        f"paho-mqtt {PAHO_VERSION} is installed (install the version pinned in common/requirements.txt)")

PUBACK = 0x40
_PUBACK = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id

# What the functions below touch on a paho Client (test_paho_compat checks they exist).
PRIVATE_ATTRIBUTES = ("_out_message_mutex", "_out_messages", "_packet_queue")


def forget_unacknowledged(client: paho.Client, mid: int) -> None:
    """Drop an outgoing message paho keeps to resend after a reconnect (its publish failed or
    timed out, and the caller was told so: it must not be sent later behind the caller's back)."""
    with client._out_message_mutex:
        client._out_messages.pop(mid, None)


def send_pubacks(client: paho.Client, mids: list[int]) -> None:
    """PUBACK these packet ids in one write: paho's own ack() wakes its network thread and sends
    once per message, which costs more than the rest of receiving a message."""
    if not mids:
        return
    packet = b"".join(_PUBACK.pack(PUBACK, 2, mid) for mid in mids)
    client._packet_queue(PUBACK, packet, mids[-1], 1)
