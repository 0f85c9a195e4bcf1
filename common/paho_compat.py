"""The things common.mqtt needs that paho-mqtt has no public API for, in one place.

They reach into paho's private client state, which may change in any release: this module
refuses to load with a paho-mqtt version it was not written for (update the pin in
common/requirements.txt, re-check these functions against the new paho source and
`test_paho_compat.py`, then add the version here).
"""
from __future__ import annotations

import struct

import paho.mqtt.client as paho
from paho.mqtt import __version__ as PAHO_VERSION
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SUPPORTED_VERSIONS = ("2.2.0",)

if PAHO_VERSION not in SUPPORTED_VERSIONS:
    raise ImportError(
        f"common.paho_compat uses paho-mqtt internals checked for version(s) {', '.join(SUPPORTED_VERSIONS)}; "
        f"paho-mqtt {PAHO_VERSION} is installed (install the version pinned in common/requirements.txt)")

PUBACK = 0x40
_PUBACK = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id

# What the functions below touch on a paho Client (test_paho_compat checks they exist).
PRIVATE_ATTRIBUTES = ("_out_message_mutex", "_out_messages", "_packet_queue", "_sock", "_sock_recv", "_in_packet",
                      "_handle_publish", "_handle_on_message", "_send_puback", "_manual_ack", "_protocol")


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


class BufferedReadClient(paho.Client):
    """A paho Client that reads the socket READ_SIZE bytes at a time and decodes the common
    PUBLISH without building its properties anew.

    paho reads every packet with three or more recv() calls (the type byte, the length byte by
    byte, the rest) and selects once per packet: under a backlog of small messages those system
    calls are most of what receiving costs. Here one recv() fills a buffer, paho's parser takes
    its small reads from it, and loop_read() goes on while whole or partial packets are buffered
    (select() cannot see them). The buffer belongs to one socket: a reconnect starts empty.

    A QoS 0/1 MQTT v5 PUBLISH whose only properties are subscription identifiers (what our own
    subscriptions bring) is decoded by `decode_publish`, and its properties object is the one
    paho decoded for the same identifiers before (a handful exist); anything else goes to paho."""

    READ_SIZE = 65536

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock = None
        self._publish_props: dict[bytes, Properties] = {}  # encoded properties → decoded

    def _buffered(self) -> bool:
        return self._rpos < len(self._rbuf) and self._rsock is self._sock

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self._buffered():
            data = super()._sock_recv(self.READ_SIZE)  # raises as paho expects (would block, lost)
            if len(data) <= bufsize:
                return data
            self._rbuf, self._rpos, self._rsock = data, 0, self._sock
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start:self._rpos]

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == paho.MQTTErrorCode.MQTT_ERR_SUCCESS and self._buffered():
            rc = super().loop_read(max_packets)
        return rc

    def _handle_publish(self) -> paho.MQTTErrorCode:
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        if qos == 2 or self._protocol != paho.MQTTv5:
            return super()._handle_publish()
        try:
            decoded = decode_publish(header, packet)
        except (IndexError, ValueError):
            decoded = None  # malformed: paho's decoder says so in its own way
        if decoded is None:
            return super()._handle_publish()
        topic, mid, props, payload = decoded
        message = paho.MQTTMessage(mid, topic)
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.payload = payload
        message.properties = self._publish_properties(props)
        message.timestamp = paho.time_func()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _publish_properties(self, encoded: bytes) -> Properties:
        cache = self._publish_props
        props = cache.get(encoded)
        if props is None:
            if len(cache) > 1000:
                cache.clear()
            props = Properties(PacketTypes.PUBLISH)
            props.unpack(encoded)
            cache[encoded] = props
        return props


SUBSCRIPTION_IDENTIFIER = 0x0B


def decode_publish(header: int, packet: bytes | bytearray) -> tuple[bytes, int, bytes, bytes] | None:
    """(topic, packet id, encoded properties, payload) of an MQTT v5 PUBLISH (QoS 0/1) whose
    properties are subscription identifiers only; None for one with any other property.
    Raises IndexError / ValueError on a malformed packet."""
    pos = 2 + int.from_bytes(packet[0:2], "big")
    topic = bytes(packet[2:pos])
    mid = 0
    if header & 0x06:
        mid = int.from_bytes(packet[pos:pos + 2], "big")
        pos += 2
    start = pos
    length, pos = _variable_int(packet, pos)
    end = pos + length
    if end > len(packet):
        raise ValueError("properties longer than the packet")
    while pos < end:
        if packet[pos] != SUBSCRIPTION_IDENTIFIER:
            return None
        _, pos = _variable_int(packet, pos + 1)
    if pos != end:
        raise ValueError("properties overrun their length")
    return topic, mid, bytes(packet[start:end]), bytes(packet[end:])


def _variable_int(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ValueError("variable byte integer longer than 4 bytes")
