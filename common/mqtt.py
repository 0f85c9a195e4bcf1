"""MqttClient: paho-mqtt's network thread, asyncio handlers.

paho runs its own loop thread (it drains QoS1 traffic about twice as fast as aiomqtt here);
received messages are handed to the event loop in batches and dispatched to the handler of
every matching subscription. The client reconnects with backoff and re-subscribes every
filter after each (re)connect. MQTT v5 is used so that the client sets its own Receive
Maximum (how many unacknowledged QoS1 messages the broker may send) and session expiry.

Subscribe before `start()`: a persistent session may deliver queued messages right after
CONNACK, and they are routed by subscription identifier (assigned in subscription order).

Manual acknowledgement (`manual_ack=True`): a message is PUBACKed only after its handler has
returned. A handler that raises `LeaveUnacknowledged` leaves its messages unacknowledged on
purpose (the broker delivers them again after the next reconnect). Any other exception is a
poison message or a bug: the batch is retried message by message, and a message whose handler
still raises is acknowledged and counted (`mqtt_messages_dropped_total{reason="handler_error"}`),
so one message can never hold a Receive Maximum slot for ever nor stop dispatch. Messages that
match no subscription are acknowledged and counted too. Messages from an earlier connection are
never acknowledged on a newer one (their packet ids are no longer valid).

The dispatcher survives any exception (counted in `mqtt_dispatch_errors_total{stage}`);
`dispatching` says whether it still runs, for readiness checks.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from . import metrics, paho_compat
from .env import Settings

log = logging.getLogger("common.mqtt")

SESSION_EXPIRY_SEC = 7 * 24 * 3600  # a persistent session outlives a week of downtime


class MqttError(RuntimeError):
    """Publishing failed: not connected, refused, or not acknowledged in time."""


class LeaveUnacknowledged(Exception):
    """Raised by a manual-ack handler: do not acknowledge these messages (the broker keeps them)."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes | str
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    received_at: float  # epoch seconds when the client received it
    generation: int     # connection number it arrived on (for manual ack)
    sub_ids: tuple[int, ...] = ()  # subscription identifiers the broker says it matched
    dup: bool = False   # the broker redelivers it (sent before on an earlier connection, unacknowledged)


Handler = Callable[[Message], Awaitable[Any]]
BatchHandler = Callable[[list[Message]], Awaitable[Any]]


@dataclass(slots=True)
class _Subscription:
    ident: int           # MQTT v5 subscription identifier: the broker names the matching subscriptions
    filter: str          # what topics are matched against (when the broker sends no identifier)
    wire_filter: str     # what is sent to the broker ($share/group/filter for shared ones)
    qos: int
    handler: Callable
    batch: bool


def topic_matches(filter_: str, topic: str) -> bool:
    return paho.topic_matches_sub(filter_, topic)


class MqttClient:
    def __init__(
        self,
        settings: Settings,
        suffix: str,
        *,
        will: Will | None = None,
        manual_ack: bool = False,
        clean_session: bool | None = None,
        max_batch: int = 1000,
        publish_timeout: float = 5.0,
        reconnect: bool = True,
    ):
        self.settings = settings
        self.client_id = f"{settings.mqtt_client_id}{suffix}"
        self.manual_ack = manual_ack
        self.clean_session = settings.mqtt_clean_session if clean_session is None else clean_session
        self.max_batch = max_batch
        self.publish_timeout = publish_timeout
        self._will = will
        self._subs: list[_Subscription] = []
        self._match_cache: dict[str, tuple[_Subscription, ...]] = {}
        self._inbox: collections.deque[Message] = collections.deque()
        self._wake_pending = False
        self._generation = 0
        self._connected = False
        self.connected_since: float | None = None  # epoch seconds of the current connection's CONNACK
        self._connected_event: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: asyncio.Task | None = None
        self._pub_lock = threading.Lock()
        self._pub_waiters: dict[int, asyncio.Future] = {}
        self._pub_early: set[int] = set()
        self._client: paho.Client | None = None
        self._stopping = False
        self.reconnect = reconnect          # False: a lost connection stays lost (a session taken over once)
        self.lost = False                   # the connection dropped (with reconnect=False: for good)
        self._last_received = 0.0           # monotonic time of the last message received
        self._busy = False                  # the dispatcher is handling a batch
        self._unsubscribed: asyncio.Future | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, wait: float | None = None) -> None:
        """Start connecting in the background; with `wait`, wait that long for the first CONNACK."""
        self._loop = asyncio.get_running_loop()
        self._connected_event = asyncio.Event()
        self._wake = asyncio.Event()
        client = paho_compat.BufferedReadClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5,
            manual_ack=self.manual_ack,
            reconnect_on_failure=self.reconnect,
        )
        s = self.settings
        if s.mqtt_user:
            client.username_pw_set(s.mqtt_user, s.mqtt_pass or None)
        if s.mqtt_tls:
            client.tls_set(ca_certs=s.mqtt_ca_file or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self._will:
            client.will_set(self._will.topic, self._will.payload, self._will.qos, self._will.retain)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_unsubscribe = self._on_unsubscribe
        client.on_socket_open = _no_delay
        self._client = client
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = s.mqtt_receive_maximum
        props.SessionExpiryInterval = 0 if self.clean_session else SESSION_EXPIRY_SEC
        client.connect_async(s.mqtt_host, s.mqtt_port, keepalive=s.mqtt_keepalive,
                             clean_start=self.clean_session, properties=props)
        client.loop_start()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name=f"mqtt-dispatch{self.client_id}")
        if wait:
            await self.wait_connected(wait)

    async def stop(self, drain: bool = True, end_session: bool = False) -> None:
        """Disconnect cleanly (no LWT); with drain, handle what was already received first.
        With end_session the broker drops the session (session expiry 0 on DISCONNECT): it keeps
        nothing for this client id, and a shared subscription no longer counts it as a member."""
        self._stopping = True
        if drain and self._inbox:
            await self._drain_once()
        if self._dispatcher:
            self._dispatcher.cancel()
            try:
                await self._dispatcher
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            client, self._client = self._client, None
            props = None
            if end_session:
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0
            client.disconnect(properties=props)
            await asyncio.to_thread(client.loop_stop)
        self._connected = False

    async def quiet(self, for_sec: float, timeout: float = 60.0) -> bool:
        """Wait until nothing was received for `for_sec` and everything received is handled;
        False when `timeout` passed first (or the connection was lost)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.lost:
            if (not self._inbox and not self._busy and not self._wake_pending
                    and time.monotonic() - self._last_received >= for_sec):
                return True
            await asyncio.sleep(min(0.1, for_sec))
        return False

    async def unsubscribe_all(self, timeout: float = 10.0) -> None:
        """UNSUBSCRIBE every filter and wait for the broker's UNSUBACK: no new message is routed
        to this client afterwards (those already on their way still arrive)."""
        client = self._client
        if client is None or not self._subs:
            return
        self._unsubscribed = self._loop.create_future()
        client.unsubscribe([sub.wire_filter for sub in self._subs])
        await asyncio.wait_for(self._unsubscribed, timeout)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def dispatching(self) -> bool:
        """The dispatcher task runs (False before start() and after stop())."""
        return self._dispatcher is not None and not self._dispatcher.done()

    async def wait_connected(self, timeout: float) -> None:
        assert self._connected_event is not None, "start() first"
        await asyncio.wait_for(self._connected_event.wait(), timeout)

    # -- subscribing ----------------------------------------------------------------------
    async def subscribe(self, filter_: str, handler: Handler, qos: int = 1, share_group: str = "") -> None:
        """Call `handler(message)` for every message matching `filter_` (in arrival order)."""
        self._add_subscription(filter_, handler, qos, share_group, batch=False)

    async def subscribe_batch(self, filter_: str, handler: BatchHandler, qos: int = 1, share_group: str = "") -> None:
        """Call `handler(messages)` with every matching message received since the last call."""
        self._add_subscription(filter_, handler, qos, share_group, batch=True)

    def _add_subscription(self, filter_: str, handler, qos: int, share_group: str, batch: bool) -> None:
        wire = f"$share/{share_group}/{filter_}" if share_group else filter_
        sub = _Subscription(len(self._subs) + 1, filter_, wire, qos, handler, batch)
        self._subs.append(sub)
        self._match_cache.clear()
        if self._client is not None and self._connected:
            self._send_subscribe(self._client, sub)

    @staticmethod
    def _send_subscribe(client: paho.Client, sub: _Subscription) -> None:
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = sub.ident
        client.subscribe(sub.wire_filter, options=SubscribeOptions(qos=sub.qos), properties=props)

    # -- publishing -----------------------------------------------------------------------
    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS >= 1, wait until the broker acknowledged it.

        Raises MqttError when not connected, refused, or not acknowledged in time; a message that
        failed is withdrawn so that it is not sent later behind the caller's back."""
        client = self._client
        if client is None or not self._connected:
            metrics.MQTT_PUBLISH_ERRORS.labels("not_connected").inc()
            raise MqttError("MQTT broker is not connected")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self._withdraw(info.mid)
            metrics.MQTT_PUBLISH_ERRORS.labels("refused").inc()
            raise MqttError(f"publish refused: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        future = self._loop.create_future()
        with self._pub_lock:
            if info.mid in self._pub_early:
                self._pub_early.discard(info.mid)
                return
            self._pub_waiters[info.mid] = future
        try:
            await asyncio.wait_for(future, self.publish_timeout)
        except asyncio.TimeoutError:
            self._withdraw(info.mid)
            metrics.MQTT_PUBLISH_ERRORS.labels("timeout").inc()
            raise MqttError(f"broker did not acknowledge within {self.publish_timeout:g}s") from None
        finally:
            with self._pub_lock:
                self._pub_waiters.pop(info.mid, None)

    async def publish_json(self, topic: str, obj: Any, qos: int = 1, retain: bool = False) -> None:
        await self.publish(topic, orjson.dumps(obj), qos=qos, retain=retain)

    def _withdraw(self, mid: int) -> None:
        client = self._client
        if client is None:
            return
        paho_compat.forget_unacknowledged(client, mid)

    def ack(self, messages: list[Message]) -> None:
        """PUBACK messages (manual-ack mode) in one write; QoS 0 ones and those of a previous
        connection are skipped."""
        client, generation = self._client, self._generation
        mids = [m.mid for m in messages if m.qos == 1 and m.generation == generation]
        if client is None or not mids:
            return
        paho_compat.send_pubacks(client, mids)

    # -- paho thread callbacks ------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("mqtt_connect_refused", extra={"client_id": self.client_id, "reason": str(reason_code)})
            return
        self._generation += 1
        for sub in self._subs:  # one SUBSCRIBE each: a packet carries one subscription identifier
            self._send_subscribe(client, sub)
        self._connected = True
        self.lost = False
        self.connected_since = time.time()
        metrics.MQTT_CONNECTED.labels(self.client_id).set(1)
        log.info("mqtt_connected", extra={"client_id": self.client_id, "session_present": flags.session_present,
                                          "subscriptions": len(self._subs)})
        self._loop.call_soon_threadsafe(self._connected_event.set)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected = False
        self.connected_since = None
        self.lost = True
        metrics.MQTT_CONNECTED.labels(self.client_id).set(0)
        if not self._stopping:
            log.warning("mqtt_disconnected", extra={"client_id": self.client_id, "reason": str(reason_code)})
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._connected_event.clear)

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties else None
        self._last_received = time.monotonic()
        self._inbox.append(Message(msg.topic, msg.payload, msg.qos, bool(msg.retain), msg.mid,
                                   time.time(), self._generation, tuple(ids) if ids else (), bool(msg.dup)))
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._wake.set)

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        future = self._unsubscribed
        if future is not None:
            self._loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._pub_lock:
            future = self._pub_waiters.get(mid)
            if future is None:
                self._pub_early.add(mid)
                if len(self._pub_early) > 10_000:  # qos0/withdrawn mids nobody waits for
                    self._pub_early.clear()
                return
        self._loop.call_soon_threadsafe(_resolve, future, reason_code)

    # -- dispatching (event loop) ---------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            await self._drain_once()

    async def _drain_once(self) -> None:
        self._wake.clear()
        self._wake_pending = False
        self._busy = True
        try:
            while self._inbox:
                batch = []
                while self._inbox and len(batch) < self.max_batch:
                    batch.append(self._inbox.popleft())
                try:
                    await self._dispatch(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - a bug in routing must not end dispatch
                    metrics.MQTT_DISPATCH_ERRORS.labels("dispatch").inc()
                    log.exception("mqtt_dispatch_failed", extra={"messages": len(batch)})
                    self._ack_safely(batch)
        finally:
            self._busy = False

    def _matching(self, message: Message) -> tuple[_Subscription, ...]:
        if message.sub_ids:
            return tuple(self._subs[i - 1] for i in message.sub_ids if 0 < i <= len(self._subs))
        topic = message.topic
        subs = self._match_cache.get(topic)
        if subs is None:
            subs = tuple(s for s in self._subs if topic_matches(s.filter, topic))
            if len(self._match_cache) > 50_000:
                self._match_cache.clear()
            self._match_cache[topic] = subs
        return subs

    async def _dispatch(self, batch: list[Message]) -> None:
        grouped: dict[int, tuple[_Subscription, list[Message]]] = {}
        for message in batch:
            subs = self._matching(message)
            if not subs:  # nobody will ever handle it: acknowledged, so it holds no Receive Maximum slot
                metrics.MQTT_UNROUTED.inc()
                if self.manual_ack:
                    metrics.MQTT_DROPPED.labels("unrouted").inc()
                    self._ack_safely([message])
                continue
            for sub in subs:
                if sub.batch:
                    grouped.setdefault(id(sub), (sub, []))[1].append(message)
                else:
                    await self._call(sub, [message])
        for sub, messages in grouped.values():
            await self._call(sub, messages)

    async def _call(self, sub: _Subscription, messages: list[Message]) -> None:
        outcome = await self._handled(sub, messages)
        if outcome is None or not self.manual_ack:
            return
        if outcome:
            self._ack_safely(messages)
            return
        if len(messages) > 1:  # find the poison: the others of the batch are handled and acknowledged
            for message in messages:
                await self._call(sub, [message])
            return
        metrics.MQTT_DROPPED.labels("handler_error").inc()
        self._ack_safely(messages)

    async def _handled(self, sub: _Subscription, messages: list[Message]) -> bool | None:
        """True: handled; False: the handler raised; None: it asked to leave them unacknowledged."""
        try:
            if sub.batch:
                await sub.handler(messages)
            else:
                await sub.handler(messages[0])
            return True
        except asyncio.CancelledError:
            raise
        except LeaveUnacknowledged:
            return None
        except Exception:  # noqa: BLE001 - one bad handler call must not stop the dispatcher
            metrics.MQTT_HANDLER_ERRORS.labels(sub.filter).inc()
            log.exception("mqtt_handler_failed", extra={"filter": sub.filter, "messages": len(messages)})
            return False

    def _ack_safely(self, messages: list[Message]) -> None:
        if not self.manual_ack:
            return
        try:
            self.ack(messages)
        except Exception:  # noqa: BLE001 - an acknowledgement that failed is resent by the broker
            metrics.MQTT_DISPATCH_ERRORS.labels("ack").inc()
            log.exception("mqtt_ack_failed", extra={"messages": len(messages)})


def _no_delay(client, userdata, sock) -> None:
    """Send small packets at once: with Nagle's algorithm a burst of publishes waits on the
    broker's delayed ACK (about 40 ms) for every packet after the first."""
    if hasattr(sock, "setsockopt"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _resolve(future: asyncio.Future, reason_code) -> None:
    if future.done():
        return
    if getattr(reason_code, "is_failure", False):
        future.set_exception(MqttError(f"broker refused the publish: {reason_code}"))
    else:
        future.set_result(None)
