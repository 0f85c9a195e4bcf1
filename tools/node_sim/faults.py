"""Sensor faults: what a broken probe reports instead of the reservoir's true value.

    node.sensor_faults["ph_sensor"] = SensorFault.stuck(6.6)                 # frozen from now on
    node.sensor_faults["ph_sensor"] = SensorFault.stuck(6.6, after_sec=20)  # varies, then freezes
    node.sensor_faults["ph_sensor"] = SensorFault.spikes(-1.9, every=10)    # two spikes in a row every 10 readings

A fault only changes the value a channel publishes; the reservoir, and so the other channels, go on.
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
