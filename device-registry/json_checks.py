"""Values a parsed JSON document may hold that PostgreSQL or our ids cannot take.

orjson already refuses NaN/Infinity, numbers beyond a double and nesting deeper than 1024; this adds
what parses but must not reach a query: NUL characters (text and jsonb refuse them), integers outside
bigint, and nesting deeper than MAX_DEPTH. The answer names the field, so a client can act on it.
"""
from __future__ import annotations

import math
from typing import Any

BIGINT_MIN, BIGINT_MAX = -2**63, 2**63 - 1
MAX_DEPTH = 32


def json_problem(value: Any, where: str = "body") -> tuple[str, str] | None:
    """(field path, problem) of the first value that cannot be stored, else None."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return path, "contains a NUL character"
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not BIGINT_MIN <= item <= BIGINT_MAX:
                return path, "integer out of range (64-bit signed)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return path, "must be a finite number"
        elif isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                return path, f"nested deeper than {MAX_DEPTH} levels"
            entries = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in entries:
                if isinstance(key, str) and "\x00" in key:
                    return path, "a key contains a NUL character"
                stack.append((child, f"{path}.{key}"[:200], depth + 1))
    return None
