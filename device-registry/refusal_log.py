"""One log line per refusal reason per interval: a flood of bad input must not flood the log.

Every refusal is counted in a metric anyway; the log says what the first one of a burst looked like
and how many like it were left out since the last line.
"""
from __future__ import annotations

import logging
import time
from typing import Any


class RefusalLog:
    def __init__(self, logger: logging.Logger, interval_sec: float = 60.0):
        self.logger = logger
        self.interval_sec = interval_sec
        self._last: dict[str, tuple[float, int]] = {}  # reason → (monotonic time of the last line, left out since)

    def warning(self, reason: str, event: str, **fields: Any) -> bool:
        """Log `event` unless `reason` was logged less than interval_sec ago; True when it was logged."""
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last[0] < self.interval_sec:
            self._last[reason] = (last[0], last[1] + 1)
            return False
        self._last[reason] = (now, 0)
        self.logger.warning(event, extra={"reason": reason, "suppressed": last[1] if last else 0, **fields})
        return True
