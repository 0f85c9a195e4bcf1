"""A simple model of one zone: its nutrient reservoir and the air around the plants.

pH creeps up slowly (plants take up nitrate); acid lowers it, base raises it; nutrient
solution raises EC, which plants slowly deplete; the water level falls with consumption.
Additions do not act at once: they mix in over `mix_sec` (exponentially). Climate and light
respond to the fan, heater and light actuators. All changes happen in `step(dt)`.
Thread-safe: one lock guards the state.
"""
from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass


@dataclass
class ReservoirParams:
    volume_l: float = 100.0
    ph_drift_per_min: float = 0.01     # upward drift of pH
    ec_drift_per_min: float = -0.002   # uptake by plants
    level_drift_per_min: float = -0.0005
    ph_per_ml: float = 0.1             # pH change of 1 ml acid/base in 100 L
    ec_per_ml: float = 0.02            # mS/cm of 1 ml nutrient concentrate in 100 L
    mix_sec: float = 4.0
    irrigation_flow_l_min: float = 1.5
    valve_flow_l_min: float = 10.0     # through an open fill or drain valve
    noise: bool = True


class Reservoir:
    def __init__(self, zone_id, ph: float = 6.3, ec: float = 1.1, water_level: float = 0.8,
                 params: ReservoirParams | None = None, seed: int | None = None):
        self.zone_id = zone_id
        self.params = params or ReservoirParams()
        self.ph = ph
        self.ec = ec
        self.water_level = water_level
        self.temp_water = 20.5
        self.temp_air = 23.0
        self.humidity = 65.0
        self.co2 = 650.0
        self._pending = {"acid_ml": 0.0, "base_ml": 0.0, "nutrient_ml": 0.0, "water_l": 0.0}
        self.dosed = {"acid_ml": 0.0, "base_ml": 0.0, "nutrient_ml": 0.0}
        self.irrigating_until = 0.0
        self.valves = {"fill": False, "drain": False, "irrigation": False}  # relay valves held open
        self.fan_on = False
        self.heater_on = False
        self.light_level = 0.0  # 0..1
        self._lock = threading.Lock()
        self._random = random.Random(seed if seed is not None else hash(zone_id))
        self._t0 = time.time()

    # -- inputs (from commands) -----------------------------------------------------------
    def add_acid(self, ml: float) -> None:
        with self._lock:
            self._pending["acid_ml"] += ml
            self.dosed["acid_ml"] += ml

    def add_base(self, ml: float) -> None:
        with self._lock:
            self._pending["base_ml"] += ml
            self.dosed["base_ml"] += ml

    def add_nutrient(self, ml: float) -> None:
        with self._lock:
            self._pending["nutrient_ml"] += ml
            self.dosed["nutrient_ml"] += ml

    def add_water(self, litres: float) -> None:
        with self._lock:
            self._pending["water_l"] += litres

    def irrigate(self, seconds: float) -> None:
        with self._lock:
            self.irrigating_until = max(self.irrigating_until, time.monotonic()) + seconds

    def stop_irrigation(self) -> None:
        with self._lock:
            self.irrigating_until = 0.0

    def set_valve(self, kind: str, open_: bool) -> None:
        """A fill / drain / irrigation valve held open (water moves) or closed."""
        with self._lock:
            self.valves[kind] = open_

    def set_fan(self, on: bool) -> None:
        with self._lock:
            self.fan_on = on

    def set_heater(self, on: bool) -> None:
        with self._lock:
            self.heater_on = on

    def set_light(self, level: float) -> None:
        with self._lock:
            self.light_level = max(0.0, min(1.0, level))

    # -- time -----------------------------------------------------------------------------
    def step(self, dt: float) -> None:
        p = self.params
        with self._lock:
            scale = 100.0 / max(p.volume_l * max(self.water_level, 0.05) / 0.8, 1.0)
            mixed = {k: v * min(1.0, dt / p.mix_sec) if p.mix_sec > 0 else v for k, v in self._pending.items()}
            for key, amount in mixed.items():
                self._pending[key] -= amount
            self.ph += p.ph_drift_per_min * dt / 60.0
            self.ph += (mixed["base_ml"] - mixed["acid_ml"]) * p.ph_per_ml * scale
            self.ec += p.ec_drift_per_min * dt / 60.0 + mixed["nutrient_ml"] * p.ec_per_ml * scale
            self.water_level += p.level_drift_per_min * dt / 60.0 + mixed["water_l"] / p.volume_l
            if self.is_irrigating():
                self.water_level -= p.irrigation_flow_l_min * 0.02 * dt / 60.0 / p.volume_l  # most returns
            valve_l = p.valve_flow_l_min * dt / 60.0
            self.water_level += (valve_l * self.valves["fill"] - valve_l * self.valves["drain"]) / p.volume_l
            self.ph = min(max(self.ph, 3.0), 9.5)
            self.ec = min(max(self.ec, 0.0), 6.0)
            self.water_level = min(max(self.water_level, 0.0), 1.0)
            # climate: relaxes towards a daily cycle, pushed by heater / fan / light
            hours = (time.time() - self._t0) / 3600.0
            base_temp = 22.5 + 1.5 * math.sin(2 * math.pi * hours / 24.0) + 1.5 * self.light_level
            base_temp += 3.0 if self.heater_on else 0.0
            base_temp -= 2.0 if self.fan_on else 0.0
            self.temp_air += (base_temp - self.temp_air) * min(1.0, dt / 120.0)
            base_rh = 66.0 - (8.0 if self.fan_on else 0.0)
            self.humidity += (base_rh - self.humidity) * min(1.0, dt / 180.0)
            base_co2 = 700.0 - 200.0 * self.light_level + (-80.0 if self.fan_on else 0.0)
            self.co2 += (base_co2 - self.co2) * min(1.0, dt / 300.0)
            self.temp_water += (20.0 + 0.3 * (self.temp_air - 22.5) - self.temp_water) * min(1.0, dt / 600.0)

    def is_irrigating(self) -> bool:
        return self.valves["irrigation"] or time.monotonic() < self.irrigating_until

    # -- outputs --------------------------------------------------------------------------
    def reading(self, metric: str) -> float | None:
        """What a sensor of this metric reads now (with a little noise); None for unknown metrics."""
        metric = metric.upper()
        with self._lock:
            noise = self._random.gauss if self.params.noise else (lambda mu, sigma: 0.0)
            values = {
                "PH": lambda: self.ph + noise(0, 0.005),
                "EC": lambda: self.ec + noise(0, 0.003),
                "WATER_LEVEL": lambda: self.water_level,
                "TEMP_WATER": lambda: self.temp_water + noise(0, 0.05),
                "TEMP_AIR": lambda: self.temp_air + noise(0, 0.1),
                "HUMIDITY": lambda: self.humidity + noise(0, 0.3),
                "CO2": lambda: self.co2 + noise(0, 5),
                "LUX": lambda: 18000.0 * self.light_level + 40.0 + abs(noise(0, 5)),
                "FLOW_RATE": lambda: self.params.irrigation_flow_l_min + noise(0, 0.02) if self.is_irrigating() else 0.0,
                "PUMP_CURRENT": lambda: 240.0 + noise(0, 5) if self.is_irrigating() else 0.0,
                "PUMP_STATE": lambda: 1.0 if self.is_irrigating() else 0.0,
            }
            fn = values.get(metric)
            if fn is None:
                return None
            value = fn()
        precision = {"PH": 3, "EC": 3, "WATER_LEVEL": 3, "CO2": 0, "LUX": 0}.get(metric, 2)
        return round(value, precision)

    def snapshot(self) -> dict:
        with self._lock:
            return {"zone_id": self.zone_id, "ph": round(self.ph, 4), "ec": round(self.ec, 4),
                    "water_level": round(self.water_level, 4), "temp_water": round(self.temp_water, 2),
                    "temp_air": round(self.temp_air, 2), "humidity": round(self.humidity, 2),
                    "co2": round(self.co2, 1), "light_level": self.light_level, "fan_on": self.fan_on,
                    "heater_on": self.heater_on, "irrigating": self.is_irrigating(), "valves": dict(self.valves),
                    "pending": {k: round(v, 4) for k, v in self._pending.items()},
                    "dosed": dict(self.dosed)}
