import asyncio

import orjson
import pytest

from common import testing
from common.mqtt import MqttClient, MqttError, Will


async def started(settings, suffix, **kw) -> MqttClient:
    client = MqttClient(settings, suffix, **kw)
    await client.start(wait=10)
    return client


async def test_round_trip_with_plus_and_hash_filters(settings):
    root = settings.mqtt_topic_root
    got_plus, got_hash, got_batch = [], [], []

    async def on_plus(msg):
        got_plus.append(msg.topic)

    async def on_hash(msg):
        got_hash.append(msg.topic)

    async def on_batch(msgs):
        got_batch.extend(m.topic for m in msgs)

    client = await started(settings, "-rt")
    await client.subscribe(f"{root}/+/+/+/+/telemetry", on_plus)
    await client.subscribe(f"{root}/gh-1/#", on_hash)
    await client.subscribe_batch(f"{root}/+/+/+/status", on_batch)
    await asyncio.sleep(0.3)
    for topic in (f"{root}/gh-1/zn-1/nd-1/ph/telemetry", f"{root}/gh-2/zn-1/nd-1/ph/telemetry",
                  f"{root}/gh-1/zn-1/nd-1/status", f"{root}/gh-2/zn-1/nd-1/other"):
        await client.publish_json(topic, {"v": 1})
    await testing.eventually(lambda: asyncio.sleep(0, len(got_hash) == 2 and len(got_plus) == 2 and got_batch))
    assert sorted(got_plus) == [f"{root}/gh-1/zn-1/nd-1/ph/telemetry", f"{root}/gh-2/zn-1/nd-1/ph/telemetry"]
    assert sorted(got_hash) == [f"{root}/gh-1/zn-1/nd-1/ph/telemetry", f"{root}/gh-1/zn-1/nd-1/status"]
    assert got_batch == [f"{root}/gh-1/zn-1/nd-1/status"]
    await client.stop()


async def test_publish_json_qos_retain_reach_a_subscriber(settings, mqtt_probe):
    client = await started(settings, "-pub")
    topic = f"{settings.mqtt_topic_root}/gh/zn-1/nd/config"
    await client.publish_json(topic, {"a": 1}, qos=1, retain=True)
    [msg] = await mqtt_probe.wait_for(1, topic)
    assert (orjson.loads(msg.payload), msg.qos) == ({"a": 1}, 1)
    await client.publish(topic, b"", qos=1, retain=True)  # clear the retained copy
    await client.stop()


async def test_publish_when_disconnected_raises():
    settings = testing.isolated_settings(MQTT_PORT=str(testing.free_port()))
    client = MqttClient(settings, "-down")
    await client.start()
    with pytest.raises(MqttError, match="not connected"):
        await client.publish_json("hydro/x", {})
    await client.stop()


async def test_reconnects_and_resubscribes_after_broker_restart():
    with testing.PrivateMosquitto() as broker:
        settings = testing.isolated_settings(MQTT_PORT=str(broker.port))
        got = []

        async def on_msg(msg):
            got.append(msg.payload)

        client = await started(settings, "-re")
        await client.subscribe("hydro/a/#", on_msg)
        await client.subscribe("hydro/+/b", on_msg)
        await asyncio.sleep(0.2)
        broker.restart()  # no persistence: the broker forgot the session and its subscriptions
        await client.wait_connected(20)
        await asyncio.sleep(0.3)
        testing.publish_sync("127.0.0.1", broker.port, [("hydro/a/1", b"one", 1, False), ("hydro/z/b", b"two", 1, False)])
        await testing.eventually(lambda: asyncio.sleep(0, len(got) == 2), 10)
        assert sorted(got) == [b"one", b"two"]
        await client.stop()


async def test_manual_ack_redelivers_what_the_handler_did_not_finish():
    """A message whose handler raised is not PUBACKed: the persistent session hands it over again."""
    with testing.PrivateMosquitto() as broker:
        settings = testing.isolated_settings(MQTT_PORT=str(broker.port))
        seen, fail = [], {"on": True}

        async def handler(msgs):
            seen.extend(m.payload for m in msgs)
            if fail["on"]:
                raise RuntimeError("store unavailable")

        client = MqttClient(settings, "-ack", manual_ack=True)
        await client.subscribe_batch("hydro/t/#", handler)
        await client.start(wait=10)
        await asyncio.sleep(0.2)
        testing.publish_sync("127.0.0.1", broker.port, [("hydro/t/1", b"m1", 1, False)])
        await testing.eventually(lambda: asyncio.sleep(0, seen == [b"m1"]))
        await client.stop()
        fail["on"] = False
        client = MqttClient(settings, "-ack", manual_ack=True)
        await client.subscribe_batch("hydro/t/#", handler)
        await client.start(wait=10)
        await testing.eventually(lambda: asyncio.sleep(0, seen == [b"m1", b"m1"]), message="redelivery")
        await client.stop()
        # acknowledged now: a third session gets nothing
        client = MqttClient(settings, "-ack", manual_ack=True)
        await client.subscribe_batch("hydro/t/#", handler)
        await client.start(wait=10)
        await asyncio.sleep(0.5)
        assert seen == [b"m1", b"m1"]
        await client.stop()


async def test_will_is_published_when_the_client_dies(settings, mqtt_probe):
    topic = f"{settings.mqtt_topic_root}/gh/zn-1/nd/lwt"
    client = await started(settings, "-will", will=Will(topic, "offline"))
    client._client._sock.close()  # vanish without DISCONNECT
    [msg] = await mqtt_probe.wait_for(1, topic, timeout=60)
    assert msg.payload == b"offline"
    await client.stop()
    testing.publish_sync(settings.mqtt_host, settings.mqtt_port, [(topic, b"", 1, True)])
