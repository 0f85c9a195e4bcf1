import asyncio

import orjson
import pytest

from common import testing
from common.mqtt import LeaveUnacknowledged, MqttClient, MqttError, Will


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
    """A message whose handler asked to leave it (LeaveUnacknowledged) is not PUBACKed: the
    persistent session hands it over again."""
    with testing.PrivateMosquitto() as broker:
        settings = testing.isolated_settings(MQTT_PORT=str(broker.port))
        seen, fail = [], {"on": True}

        async def handler(msgs):
            seen.extend(m.payload for m in msgs)
            if fail["on"]:
                raise LeaveUnacknowledged("store unavailable")

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


def _dropped(reason: str) -> float:
    from common import metrics
    return metrics.MQTT_DROPPED.labels(reason)._value.get()


async def test_poison_messages_never_hold_the_receive_maximum(settings):
    """A manual-ack handler that raises on some messages: the rest of each batch is handled and
    acknowledged, the poison is acknowledged and counted, and dispatch goes on. With a receive
    maximum of 5, five poison messages left unacknowledged would stop all delivery."""
    s = settings.replace(mqtt_receive_maximum=5)
    handled: list[bytes] = []

    async def on_batch(msgs):
        if any(m.payload.startswith(b"poison") for m in msgs):
            raise ValueError("cannot handle this one")
        handled.extend(m.payload for m in msgs)

    client = MqttClient(s, "-poison", manual_ack=True)
    await client.subscribe_batch(f"{s.mqtt_topic_root}/p/#", on_batch)
    await client.start(wait=10)
    before = _dropped("handler_error")
    topic = f"{s.mqtt_topic_root}/p/x"
    messages = [(topic, f"poison-{i}" if i % 3 == 0 else f"ok-{i}", 1, False) for i in range(60)]
    await asyncio.to_thread(testing.publish_sync, s.mqtt_host, s.mqtt_port, messages)
    expected = sorted(f"ok-{i}".encode() for i in range(60) if i % 3)
    await testing.eventually(lambda: asyncio.sleep(0, len(handled) >= len(expected)), 20)
    assert sorted(handled) == expected
    assert _dropped("handler_error") - before == 20
    assert client.dispatching
    await client.stop()


async def test_a_failing_acknowledgement_does_not_stop_dispatch(settings):
    class AckFailsOnce(MqttClient):
        failures = 0

        def ack(self, messages):
            if not self.failures:
                self.failures += 1
                raise RuntimeError("socket gone")
            super().ack(messages)

    handled: list[bytes] = []

    async def on_message(msg):
        handled.append(msg.payload)

    client = AckFailsOnce(settings, "-ackfail", manual_ack=True)
    await client.subscribe(f"{settings.mqtt_topic_root}/a/#", on_message)
    await client.start(wait=10)
    topic = f"{settings.mqtt_topic_root}/a/x"
    for i in range(3):  # one at a time: each is its own dispatch
        await asyncio.to_thread(testing.publish_sync, settings.mqtt_host, settings.mqtt_port,
                                [(topic, f"m{i}", 1, False)])
        await testing.eventually(lambda: asyncio.sleep(0, len(handled) > i), 10)
    assert handled == [b"m0", b"m1", b"m2"] and client.failures == 1 and client.dispatching
    await client.stop()
    assert not client.dispatching


async def test_unrouted_messages_are_acknowledged(settings):
    """A message the broker routes to us that no handler matches (here: a subscription identifier we
    no longer know) must not keep a receive-maximum slot."""
    s = settings.replace(mqtt_receive_maximum=2)
    got: list[bytes] = []

    async def on_message(msg):
        got.append(msg.payload)

    client = MqttClient(s, "-unrouted", manual_ack=True)
    await client.subscribe(f"{s.mqtt_topic_root}/u/#", on_message)
    await client.start(wait=10)
    await asyncio.sleep(0.3)
    client._subs.clear()  # the broker keeps the subscription (as a persistent session would): now unknown to us
    before = _dropped("unrouted")
    topic = f"{s.mqtt_topic_root}/u/x"
    await asyncio.to_thread(testing.publish_sync, s.mqtt_host, s.mqtt_port, [(topic, f"m{i}", 1, False) for i in range(5)])
    await testing.eventually(lambda: asyncio.sleep(0, _dropped("unrouted") - before >= 5), 10)
    assert got == [] and client.dispatching
    await client.stop()
