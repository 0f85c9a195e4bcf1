"""Zone health (contract §8.9): weighted score of seven parts; the engine writes all zones'
scores in one statement at the end of the cycle."""
from __future__ import annotations

from actions import ZoneContext
from targets import target

WEIGHTS = {"ph": 0.20, "ec": 0.20, "climate": 0.15, "alerts": 0.20, "nodes": 0.15, "water": 0.05, "flow": 0.05}


def _stability(stats: tuple | None, steps: tuple[float, ...]) -> float:
    if not stats or stats[1] < 2 or stats[0] is None:
        return 50.0
    sd = stats[0]
    for limit, score in zip(steps, (100.0, 80.0, 60.0, 40.0)):
        if sd < limit:
            return score
    return 20.0


def parts(ctx: ZoneContext) -> dict[str, float]:
    zone = ctx.zone
    climate = 100.0
    temp, temp_target = ctx.fresh("TEMP_AIR"), target(ctx.targets, "temp_air")
    if temp is not None and temp_target is not None:
        off = abs(temp - temp_target.value)
        climate -= 30 if off > 3 else 20 if off > 2 else 10 if off > 1 else 0
    humidity, humidity_target = ctx.fresh("HUMIDITY"), target(ctx.targets, "humidity_air")
    if humidity is not None and humidity_target is not None:
        off = abs(humidity - humidity_target.value)
        climate -= 30 if off > 20 else 20 if off > 15 else 10 if off > 10 else 0
    level = ctx.fresh("WATER_LEVEL")
    return {
        "ph": _stability(zone.stats.get("PH"), (0.1, 0.2, 0.3, 0.5)),
        "ec": _stability(zone.stats.get("EC"), (0.05, 0.1, 0.15, 0.2)),
        "climate": max(climate, 0.0),
        "alerts": max(100.0 - 15 * len(zone.active_alerts()), 0.0),
        "nodes": 100.0 * sum(n.online for n in zone.nodes) / len(zone.nodes) if zone.nodes else 50.0,
        "water": 30.0 if level is not None and level < 0.2 else 100.0,
        "flow": 100.0 if ctx.fresh("FLOW_RATE") is not None else 50.0,
    }


def score(ctx: ZoneContext) -> tuple[float, str]:
    value = round(sum(WEIGHTS[k] * v for k, v in parts(ctx).items()), 2)
    return value, "ok" if value >= 80 else "warning" if value >= 50 else "alarm"


async def run(ctx: ZoneContext) -> None:
    ctx.health = score(ctx)
