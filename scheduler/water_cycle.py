"""Water-change cycle (contract §8.6) — off unless enabled per zone."""
from __future__ import annotations


def due(zone, after, now, horizon):
    return []


async def start(sched, firing, now) -> str:
    return "skipped"


async def advance(sched, zones, now) -> None:
    return None
