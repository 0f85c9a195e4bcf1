"""Replicas in one MQTT shared-subscription group (MQTT_SHARED_GROUP): a replica's death neither
strands nor loses readings.

Mosquitto (2.0) keeps routing a shared subscription's share of the messages to a member whose
persistent session outlives it (stranded until that client id returns, dropped when its queue
fills), and it drops the in-flight (sent, unacknowledged) messages of a member whose session
ends — measured: with clean sessions a replica killed with -9 loses what it had in flight.
So every replica keeps a persistent session, holds a lease in Redis (`logger:lease:<id>`,
renewed every HISTORY_LOGGER_LEASE_SEC / 3) and is listed in `logger:members:<group>`. A member
whose lease expired is dead, and one live replica (lock `logger:rescue:<id>`) takes its session
over: it connects with the dead replica's client id, receives what was queued for it and what it
had not acknowledged (a redelivery the dead replica had already stored is recognised by that
client id's fingerprints, see receiver.py), stops the broker from routing more to it
(UNSUBSCRIBE), handles the rest, and ends the session (session expiry 0): the group has one
member less and the live replicas take all the traffic. A stopping replica ends its own session
the same way, unless it is the last one (then its session keeps queueing while all are down).
A replica that starts while its own session is being rescued waits for the rescue to finish.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable

import redis.asyncio as redis

from common.env import Settings
from common.lifecycle import cancel_tasks, every
from common.mqtt import MqttClient
from common.redis_client import REDIS_TRANSIENT, key

import metrics as m
from receiver import Receiver, subscribe
from settings import ServiceSettings
from streams import StreamKeys

log = logging.getLogger("history_logger.replicas")

QUIET_SEC = 1.0          # nothing received for this long (and all handled): the session is drained
RESCUE_MAX_SEC = 300     # a rescue lock outlives a rescuer that died during the rescue this long at most


class Replicas:
    def __init__(self, settings: Settings, options: ServiceSettings, client: redis.Redis, receiver: Receiver):
        """`receiver` is the service's own: a rescue starts from its view of the queue length."""
        self.settings = settings
        self.options = options
        self.me = settings.mqtt_client_id
        self.lease_sec = options.lease_sec
        self.redis = client
        self.receiver = receiver
        self.members_key = key(settings, f"logger:members:{settings.mqtt_shared_group}")
        self.tasks: list[asyncio.Task] = []
        self.stopping = False

    def _lease(self, member: str) -> str:
        return key(self.settings, f"logger:lease:{member}")

    def _rescue_lock(self, member: str) -> str:
        return key(self.settings, f"logger:rescue:{member}")

    async def start(self) -> None:
        # Alive first, then wait: a rescue of our old session that ends (or gives up) while we wait
        # must not be followed by another one, which would hold our client id when we connect.
        await self._renew()
        self.tasks = [asyncio.create_task(self._every(self._renew), name="replica-lease")]
        deadline = time.monotonic() + RESCUE_MAX_SEC
        while await self.redis.exists(self._rescue_lock(self.me)) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # another replica is draining our old session: do not take it back
        self.tasks.append(asyncio.create_task(self._every(self._rescue_dead), name="replica-rescue"))

    async def stop(self, session_ended: bool) -> None:
        self.stopping = True
        await cancel_tasks(self.tasks)
        self.tasks = []
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self._lease(self.me))
            if session_ended:  # else it stays listed, and a live replica rescues the session
                pipe.srem(self.members_key, self.me)
            await pipe.execute()
        except REDIS_TRANSIENT as exc:
            log.warning("replica_lease_not_released", extra={"error": str(exc)[:200]})

    async def others_alive(self) -> bool:
        for member in await self.redis.smembers(self.members_key):
            name = member.decode()
            if name != self.me and await self.redis.exists(self._lease(name)):
                return True
        return False

    async def _renew(self) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._lease(self.me), str(time.time()), px=int(self.lease_sec * 1000))
        pipe.sadd(self.members_key, self.me)
        await pipe.execute()

    def _every(self, job) -> Awaitable[None]:
        return every(self.lease_sec / 3, job, log, "replica_round_failed", lambda: not self.stopping)

    async def _rescue_dead(self) -> None:
        for member in await self._dead_members():
            await self.rescue(member)

    async def _dead_members(self) -> list[str]:
        dead = []
        for member in await self.redis.smembers(self.members_key):
            name = member.decode()
            if name != self.me and not await self.redis.exists(self._lease(name)):
                dead.append(name)
        return dead

    async def rescue(self, member: str) -> bool:
        """Take a dead member's session over, handle everything in it, end it. True when done."""
        lock = self._rescue_lock(member)
        if not await self.redis.set(lock, self.me, nx=True, ex=RESCUE_MAX_SEC):
            return False  # another replica is on it
        try:
            if await self.redis.exists(self._lease(member)):
                return False  # it came back
            log.info("replica_rescue_started", extra={"member": member})
            if not await self.take_over(member):
                return False
            await self.redis.srem(self.members_key, member)
            m.REPLICA_RESCUES.inc()
            log.info("replica_rescued", extra={"member": member})
            return True
        finally:
            await self.redis.delete(lock)

    async def take_over(self, member: str) -> bool:
        """Connect as `member`, drain its session, end it. False when it could not be finished."""
        s = self.settings.replace(mqtt_client_id=member)
        receiver = Receiver(s, self.options, self.redis, StreamKeys(s))
        receiver.queue_len = self.receiver.queue_len
        mqtt = MqttClient(s, "-logger", manual_ack=True, reconnect=False)
        await subscribe(mqtt, receiver)
        drained = False
        await mqtt.start()
        try:
            await mqtt.wait_connected(10)
            if await mqtt.quiet(QUIET_SEC) and not mqtt.lost:
                await mqtt.unsubscribe_all()
                drained = await mqtt.quiet(QUIET_SEC) and not mqtt.lost
        except (asyncio.TimeoutError, OSError) as exc:
            log.warning("replica_rescue_failed", extra={"member": member, "error": str(exc)[:200]})
        finally:  # (also when cancelled: the session is then left for the next rescue)
            await mqtt.stop(drain=True, end_session=drained)
        return drained
