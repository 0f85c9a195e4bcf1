"""The one machine-readable line every benchmark prints last, read by `make bench` (run_all.py)."""
from __future__ import annotations

import orjson

PREFIX = "RESULT "


def row(figure: str, value: str, baseline: str, ratio: float | None, target: str, met: bool) -> dict:
    return {"figure": figure, "value": value, "baseline": baseline,
            "ratio": None if ratio is None else round(ratio, 2), "target": target, "met": met}


def emit(*rows: dict) -> None:
    print(PREFIX + orjson.dumps(list(rows)).decode(), flush=True)
