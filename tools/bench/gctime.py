"""Time the interpreter spends in garbage collection while a piece of code runs (gc.callbacks):
with thousands of zones in memory, full collections can cost as much as the work itself."""
from __future__ import annotations

import gc
import time


class GcTime:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0          # generation-2 collections (they walk every tracked object)
        self.longest = 0.0
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self.seconds += took
        self.longest = max(self.longest, took)
        self.full += info["generation"] == 2

    def __enter__(self) -> "GcTime":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def __str__(self) -> str:
        return (f"{self.seconds:.2f} s in garbage collection ({self.full} full collections, "
                f"longest {self.longest * 1000:.0f} ms)")
