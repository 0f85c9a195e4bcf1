"""Sensor faults: what a broken probe reports instead of the reservoir's true value.

    node.sensor_faults["ph_sensor"] = SensorFault.stuck(6.6)                 # frozen from now on
    node.sensor_faults["ph_sensor"] = SensorFault.stuck(6.6, after_sec=20)  # varies, then freezes
    node.sensor_faults["ph_sensor"] = SensorFault.spikes(-1.9, every=10)    # two spikes in a row every 10 readings

A fault only changes the value a channel publishes; the reservoir, and so the other channels, go on.
On the command line (`--sensor-fault`, repeatable): `NODE/CHANNEL=stuck[:VALUE][@AFTER_SEC]` or
`NODE/CHANNEL=spikes:OFFSET[/EVERY]`, e.g. `nd-sim-ph-z1-1/ph_sensor=stuck:6.6@60`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class SensorFault:
    mode: str                      # "stuck" | "spikes"
    value: float | None = None     # stuck: the value it freezes at (None: the reading when it freezes)
    after_sec: float = 0.0         # stuck: freezes this long after the fault is set
    offset: float = 0.0            # spikes: added to the true value
    every: int = 10                # spikes: one burst every `every` readings
    burst: int = 2                 # spikes: readings in a row that spike
    since: float = field(default_factory=time.monotonic)
    stuck_at: float | None = None  # monotonic time it froze (None while it still follows the truth)
    readings: int = 0
    spiked: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def stuck(cls, value: float | None = None, after_sec: float = 0.0) -> "SensorFault":
        return cls("stuck", value=value, after_sec=after_sec)

    @classmethod
    def spikes(cls, offset: float, every: int = 10, burst: int = 2) -> "SensorFault":
        return cls("spikes", offset=offset, every=max(every, burst + 1), burst=burst)

    @classmethod
    def parse(cls, text: str) -> tuple[str, str, "SensorFault"]:
        """(node, channel, fault) from the command-line form; ValueError naming what is wrong."""
        target, _, spec = text.partition("=")
        node, _, channel = target.partition("/")
        if not node or not channel or not spec:
            raise ValueError(f"sensor fault {text!r}: expected NODE/CHANNEL=stuck[:VALUE][@SEC] or "
                             "NODE/CHANNEL=spikes:OFFSET[/EVERY]")
        spec, _, after = spec.partition("@")
        mode, _, rest = spec.partition(":")
        try:
            if mode == "stuck":
                return node, channel, cls.stuck(float(rest) if rest else None, float(after) if after else 0.0)
            if mode == "spikes" and rest and not after:
                offset, _, every = rest.partition("/")
                return node, channel, cls.spikes(float(offset), int(every) if every else 10)
        except ValueError:
            pass
        raise ValueError(f"sensor fault {text!r}: expected stuck[:VALUE][@SEC] or spikes:OFFSET[/EVERY] after '='")

    def apply(self, true_value: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.readings += 1
            if self.mode == "stuck":
                if self.stuck_at is None and now - self.since >= self.after_sec:
                    self.stuck_at = now
                    if self.value is None:
                        self.value = true_value
                return self.value if self.stuck_at is not None else true_value
            if self.readings % self.every < self.burst:
                self.spiked += 1
                return round(true_value + self.offset, 3)
            return true_value
