"""Physical ranges of the canonical telemetry metrics (contract §3.1 metric table).

A reading outside its metric's range is not a measurement (a broken sensor, a unit mix-up, an
attacker's ±1e308) and is refused as `out_of_range` before it reaches storage, so that no
reading can poison the statistics the controllers compute. Bounds are inclusive and generous:
they reject the impossible, not the unusual. Unknown metrics (stored upper-cased, §3.1) only
have to be finite and within ±UNKNOWN_METRIC_LIMIT.

| metric | range | unit | why |
|---|---|---|---|
| PH | 0 – 14 | pH | the pH scale |
| EC | 0 – 20 | mS/cm | nutrient solutions are 0.5–4; sensor probes end near 20 |
| TEMP_AIR | -40 – 80 | °C | climate sensors (DHT/SHT/BME) work down to -40; 80 is beyond any greenhouse |
| TEMP_WATER | -10 – 60 | °C | solution temperature; a little below 0 for a probe in ice |
| HUMIDITY | 0 – 100 | % | relative humidity |
| CO2 | 0 – 10000 | ppm | NDIR sensors (MH-Z19, SCD30) measure up to 5000–10000 |
| LUX | 0 – 200000 | lux | full sunlight is about 120000 |
| WATER_LEVEL | 0 – 1 | fraction | contract: fraction 0..1 |
| FLOW_RATE | 0 – 1000 | L/min | far above any hydroponic pump |
| PUMP_CURRENT | -100 – 50000 | mA | 50 A is beyond any pump a node drives; the INA209 reads a little below 0 at rest |
| PUMP_STATE | 0 or 1 | — | off / on |
| anything else | -1e9 – 1e9 | — | finite and not absurd |
"""
from __future__ import annotations

import math

RANGES: dict[str, tuple[float, float]] = {
    "PH": (0.0, 14.0),
    "EC": (0.0, 20.0),
    "TEMP_AIR": (-40.0, 80.0),
    "TEMP_WATER": (-10.0, 60.0),
    "HUMIDITY": (0.0, 100.0),
    "CO2": (0.0, 10_000.0),
    "LUX": (0.0, 200_000.0),
    "WATER_LEVEL": (0.0, 1.0),
    "FLOW_RATE": (0.0, 1_000.0),
    "PUMP_CURRENT": (-100.0, 50_000.0),
    "PUMP_STATE": (0.0, 1.0),
}
DISCRETE: dict[str, frozenset[float]] = {"PUMP_STATE": frozenset({0.0, 1.0})}
UNKNOWN_METRIC_LIMIT = 1e9


def out_of_range(metric: str, value: float) -> str | None:
    """Why `value` cannot be a reading of the canonical `metric`, or None when it can."""
    if not math.isfinite(value):
        return f"{metric} value {value!r} is not a finite number"
    low, high = RANGES.get(metric, (-UNKNOWN_METRIC_LIMIT, UNKNOWN_METRIC_LIMIT))
    if not low <= value <= high:
        return f"{metric} value {value:g} is outside {low:g}..{high:g}"
    allowed = DISCRETE.get(metric)
    if allowed is not None and value not in allowed:
        return f"{metric} value {value:g} is not one of {sorted(allowed)}"
    return None
