"""The simulator: a fleet of SimNodes, one reservoir model per zone, and a ticker thread.

Programmatic use (end-to-end tests, the dev stack):

    sim = Simulator(SimOptions(host="127.0.0.1", port=1883, topic_root="hydro"), synthetic_layout())
    sim.start(wait=10)              # every node connected, ONLINE, subscribed
    sim.reservoir(1).snapshot()     # {"ph": 6.3, "ec": 1.1, ...} of zone 1
    sim.node("nd-sim-ph-z1-1").go_offline()
    sim.stop()
"""
from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from typing import Callable

from .layout import NodeSpec, clone
from .node import SimNode
from .options import SimOptions
from .reservoir import Reservoir

log = logging.getLogger("node_sim")


class Simulator:
    def __init__(self, options: SimOptions, layout: list[NodeSpec]):
        self.options = options
        self.nodes: dict[str, SimNode] = {}
        self._by_hardware: dict[str, SimNode] = {}
        for spec in layout:
            node = SimNode(clone(spec), self)
            self.nodes[spec.uid] = node
            self._by_hardware[spec.hardware_id] = node
        self._reservoirs: dict[object, Reservoir] = {}
        self._res_lock = threading.Lock()
        self._stats: collections.Counter[str] = collections.Counter()
        self._stats_lock = threading.Lock()
        self._deferred: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._random = random.Random(options.seed)
        self._offline_until: dict[str, float] = {}
        self._next_offline = 0.0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, wait: float | None = 10.0) -> "Simulator":
        for node in self.nodes.values():
            node.start()
        self._stop.clear()
        self._ticker = threading.Thread(target=self._run, name="node-sim-ticker", daemon=True)
        self._ticker.start()
        if wait:
            self.wait_connected(wait)
        return self

    def add(self, spec: NodeSpec) -> SimNode:
        """A node that joins the running fleet (e.g. a new node powered up later)."""
        node = SimNode(clone(spec), self)
        self.reservoir_for(node)
        self.nodes[spec.uid] = node
        self._by_hardware[spec.hardware_id] = node
        node.start()
        return node

    def wait_connected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes.values():
            if not node.connected.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"node {node.uid} did not connect to {self.options.host}:{self.options.port} "
                                   f"within {timeout}s")

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(5)
            self._ticker = None
        for node in self.nodes.values():
            node.stop()

    def __enter__(self) -> "Simulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def clear_retained(self) -> None:
        """Remove the retained status / lwt / config messages of every node (test clean-up)."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        o = self.options
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{o.client_prefix}cleanup")
        if o.username:
            client.username_pw_set(o.username, o.password or None)
        client.connect(o.host, o.port)
        client.loop_start()
        try:
            infos = []
            for node in self.nodes.values():
                for segments in node.known_segments:
                    for kind in ("status", "lwt", "config"):
                        topic = node.topics.node_topic(*segments, kind)
                        infos.append(client.publish(topic, b"", qos=1, retain=True))
            for info in infos:
                info.wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()

    # -- access ---------------------------------------------------------------------------
    def node(self, uid_or_hardware_id: str) -> SimNode:
        node = self._by_hardware.get(uid_or_hardware_id)
        if node is not None:
            return node
        for node in self.nodes.values():  # a node may have been renamed by a config
            if node.uid == uid_or_hardware_id:
                return node
        raise KeyError(uid_or_hardware_id)

    def reservoir(self, zone_id) -> Reservoir:
        with self._res_lock:
            res = self._reservoirs.get(zone_id)
            if res is None:
                o = self.options
                res = Reservoir(zone_id, o.initial_ph, o.initial_ec, o.initial_level, o.reservoir,
                                seed=None if o.seed is None else o.seed + len(self._reservoirs))
                self._reservoirs[zone_id] = res
            return res

    def reservoir_for(self, node: SimNode) -> Reservoir:
        key = node.spec.zone_id if node.spec.registered else f"temp:{node.spec.hardware_id}"
        return self.reservoir(key)

    def reservoirs(self) -> dict:
        with self._res_lock:
            return dict(self._reservoirs)

    @property
    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            return dict(self._stats)

    def count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[name] += n

    def defer(self, action: Callable[[], None]) -> None:
        """Run `action` on the ticker thread (e.g. a reconnect requested from a network callback)."""
        self._deferred.put(action)

    # -- the ticker -----------------------------------------------------------------------
    def _run(self) -> None:
        last = time.monotonic()
        for node in self.nodes.values():  # zones get their reservoirs before the first reading
            self.reservoir_for(node)
        while not self._stop.wait(self.options.tick_sec):
            now = time.monotonic()
            dt, last = now - last, now
            while True:
                try:
                    action = self._deferred.get_nowait()
                except queue.Empty:
                    break
                try:
                    action()
                except Exception:  # noqa: BLE001
                    log.exception("deferred_action_failed")
            for res in self.reservoirs().values():
                res.step(dt)
            self._inject_outages(now)
            for node in list(self.nodes.values()):
                try:
                    node.tick(now)
                except Exception:  # noqa: BLE001 - one node's trouble must not stop the others
                    log.exception("node_tick_failed", extra={"node": node.uid})

    def _inject_outages(self, now: float) -> None:
        for uid, until in list(self._offline_until.items()):
            if now >= until:
                del self._offline_until[uid]
                self.node(uid).start()
        every = self.options.offline_every_sec
        if every <= 0:
            return
        if self._next_offline == 0.0:
            self._next_offline = now + every
        if now >= self._next_offline:
            self._next_offline = now + every
            candidates = [n for n in self.nodes.values() if n.online and n.spec.hardware_id not in self._offline_until]
            if candidates:
                node = self._random.choice(candidates)
                node.go_offline(abrupt=True)
                self._offline_until[node.spec.hardware_id] = now + self.options.offline_for_sec
