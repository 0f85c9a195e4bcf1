"""paho_compat touches paho-mqtt internals: these tests fail on a paho upgrade until someone has
checked the functions against the new version (then add it to SUPPORTED_VERSIONS and the pin)."""
import asyncio
import re
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt import __version__ as installed
from paho.mqtt.enums import CallbackAPIVersion

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
