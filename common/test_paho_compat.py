"""paho_compat touches paho-mqtt internals: these tests fail on a paho upgrade until someone has
checked the functions against the new version (then add it to SUPPORTED_VERSIONS and the pin)."""
import asyncio
import re
import struct
import threading
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt import _packet
from paho.mqtt import __version__ as installed
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common import paho_compat, testing


def _pinned() -> str:
    requirements = (Path(__file__).parent / "requirements.txt").read_text()
    return re.search(r"^paho-mqtt==(\S+)$", requirements, re.M).group(1)


def _client() -> paho.Client:
    return paho.Client(CallbackAPIVersion.VERSION2, client_id=testing.unique_id("compat-"), protocol=paho.MQTTv5)


def test_written_for_the_installed_and_pinned_paho():
    assert installed == _pinned()
    assert installed in paho_compat.SUPPORTED_VERSIONS


def test_the_private_attributes_used_exist_on_a_real_client():
    client = _client()
    for name in paho_compat.PRIVATE_ATTRIBUTES:
        assert hasattr(client, name), name
    assert isinstance(client._out_messages, dict)
    assert callable(client._packet_queue)
    with client._out_message_mutex:  # a lock
        pass


def test_forget_unacknowledged_drops_the_message_kept_for_resending():
    client = _client()
    kept = client.publish("t/kept", b"x", qos=1)  # not connected: paho keeps it to send after connecting
    dropped = client.publish("t/dropped", b"x", qos=1)
    paho_compat.forget_unacknowledged(client, dropped.mid)
    paho_compat.forget_unacknowledged(client, 999)  # unknown: nothing happens
    assert list(client._out_messages) == [kept.mid]


def test_send_pubacks_queues_one_write_for_all():
    client = _client()
    paho_compat.send_pubacks(client, [])
    paho_compat.send_pubacks(client, [1, 2, 300])
    [packet] = client._out_packet
    assert packet["packet"] == b"\x40\x02\x00\x01" b"\x40\x02\x00\x02" b"\x40\x02\x01\x2c"


async def test_a_forgotten_message_is_not_sent_after_connecting():
    settings = testing.isolated_settings()
    root = settings.mqtt_topic_root
    probe = testing.MqttProbe(settings.mqtt_host, settings.mqtt_port, f"{root}/#")
    client = _client()
    try:
        client.publish(f"{root}/kept", b"k", qos=1)
        forgotten = client.publish(f"{root}/forgotten", b"f", qos=1)
        paho_compat.forget_unacknowledged(client, forgotten.mid)
        client.connect(settings.mqtt_host, settings.mqtt_port)
        client.loop_start()
        await probe.wait_for(1, f"{root}/kept")
        marker = client.publish(f"{root}/marker", b"m", qos=1)
        await asyncio.to_thread(marker.wait_for_publish, 10)
        await probe.wait_for(1, f"{root}/marker")
        assert [m.topic for m in probe.received()] == [f"{root}/kept", f"{root}/marker"]
    finally:
        client.disconnect()
        client.loop_stop()
        probe.close()


def _publish_packet(topic: bytes, mid: int, properties: bytes, payload: bytes) -> bytes:
    return struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if mid else b"") + properties + payload


@pytest.mark.parametrize("header, mid, properties", [
    (0x32, 7, b"\x00"),                          # QoS1, no property
    (0x32, 7, b"\x02\x0b\x05"),                  # one subscription identifier
    (0x3a, 65535, b"\x05\x0b\x05\x0b\xac\x02"),  # DUP, two identifiers, one of two bytes (300)
    (0x31, 0, b"\x02\x0b\x01"),                  # QoS0 (no packet id), retained
])
def test_decode_publish_reads_what_paho_reads(header, mid, properties):
    packet = _publish_packet(b"hydro/gh/zn/nd/ph/telemetry", mid, properties, b'{"value":6.1}')
    topic, packet_id, encoded, payload = paho_compat.decode_publish(header, packet)
    theirs = _packet.decode_publish(header, packet, paho.MQTTv5)
    assert (topic, packet_id, payload) == (theirs.topic, theirs.mid, theirs.payload)
    ours = Properties(PacketTypes.PUBLISH)
    ours.unpack(encoded)
    assert ours.json() == theirs.properties.json()


def test_decode_publish_leaves_other_properties_and_malformed_packets_to_paho():
    user_property = b"\x07\x26\x00\x01k\x00\x01v"
    assert paho_compat.decode_publish(0x32, _publish_packet(b"t", 1, user_property, b"x")) is None
    with pytest.raises(ValueError):  # properties said to be longer than the packet
        paho_compat.decode_publish(0x32, _publish_packet(b"t", 1, b"\x09\x0b\x01", b""))
    with pytest.raises(IndexError):  # cut short inside the packet id
        paho_compat.decode_publish(0x32, b"\x00\x01t\x00")


async def test_the_buffered_client_receives_a_burst_whole_in_order_with_its_identifiers(settings):
    """Thousands of small messages and one larger than several reads, in one burst, through two
    overlapping subscriptions: each arrives whole, in order, acknowledged (else the broker would
    stop after its in-flight window), with the identifier of the subscription it matched."""
    root = settings.mqtt_topic_root
    received: list[tuple[str, bytes, tuple]] = []
    done = threading.Event()
    total = 3000 + 2  # the large one matches both subscriptions

    def on_message(client, userdata, msg):
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) or []
        received.append((msg.topic, msg.payload, tuple(ids)))
        if len(received) == total:
            done.set()

    client = paho_compat.BufferedReadClient(CallbackAPIVersion.VERSION2, client_id=testing.unique_id("buffered-"),
                                            protocol=paho.MQTTv5)
    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(settings.mqtt_host, settings.mqtt_port)
    client.loop_start()
    try:
        for ident, filter_ in ((7, f"{root}/burst/+"), (8, f"{root}/burst/large")):
            subscribed.clear()
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = ident
            client.subscribe(filter_, qos=1, properties=props)
            assert subscribed.wait(10)
        large = bytes(range(256)) * 1200  # 300 KB: several reads of READ_SIZE
        small = [(f"{root}/burst/m{i}", f"payload {i}".encode(), 1, False) for i in range(3000)]
        await asyncio.to_thread(testing.publish_sync, settings.mqtt_host, settings.mqtt_port,
                                small[:1500] + [(f"{root}/burst/large", large, 1, False)] + small[1500:])
        assert await asyncio.to_thread(done.wait, 30), f"{len(received)} of {total}"
        smalls = [(t, p) for t, p, ids in received if not t.endswith("/large")]
        assert smalls == [(t, p) for t, p, _, _ in small]
        assert all(ids == (7,) for t, _, ids in received if not t.endswith("/large"))
        larges = [(p, ids) for t, p, ids in received if t.endswith("/large")]
        assert sorted(ids for _, ids in larges) == [(7,), (8,)] and all(p == large for p, _ in larges)
    finally:
        client.disconnect()
        client.loop_stop()
