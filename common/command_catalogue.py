"""What commands to nodes are: the catalogue of names and parameters, their validation, the
kinds of channel each is for and the channel's safe limits (contract §4.1–§4.3, §5.1).

No I/O here: common.commands issues and records commands, checked against these rules.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .schemas import DEFAULT_SAFE_LIMITS, as_number, json_problem


class CommandError(ValueError):
    """A command that must not be sent; the message says why."""


# ---------------------------------------------------------------------------------------
# Channels (contract §4.1 "Accepted on", §5.1 channel types)
# ---------------------------------------------------------------------------------------
SENSOR, PUMP, RELAY, UNKNOWN = "sensor", "pump", "relay", "unknown"
_RELAY_ACTUATOR_TYPES = ("VALVE", "RELAY", "LIGHT", "FAN", "HEATER", "PWM")
_RELAY_NAMES = ("valve", "solenoid", "fan", "heater", "light", "led", "relay", "vent", "humidifier", "cooler",
                "mist")
# The bridge's fill / drain control channel drives the node's water pumps (stopped with stop_pump).
_PUMP_NAMES = ("pump", "water_control")
_SENSOR_NAMES = ("sensor", "level", "temp", "humidity", "co2", "lux", "flow", "current", "rh")


def channel_kind(name: str, db_type: str | None, config: Any) -> str:
    """pump / relay / sensor / unknown, from `node_channels.type` (sensor / actuator, any case),
    the channel's `actuator_type`, else the firmware's naming (pump_* pumps; valves, fans, heaters,
    lights are relays; *_sensor and measured quantities are sensors). Type and name both unknown:
    unknown, and nothing that moves is sent to it."""
    kind = (db_type or "").strip().lower()
    lname = name.lower()
    actuator_type = str((config or {}).get("actuator_type") or "").strip().upper() if isinstance(config, dict) else ""
    if kind in ("sensor", "s"):
        return SENSOR
    if kind in ("actuator", "a") or actuator_type:
        pump_named = any(word in lname for word in _PUMP_NAMES)
        if actuator_type == "PUMP" or (actuator_type not in _RELAY_ACTUATOR_TYPES and pump_named):
            return PUMP
        return RELAY
    if any(word in lname for word in _PUMP_NAMES) and not lname.endswith(("_current", "_sensor")):
        return PUMP
    if any(word in lname for word in _RELAY_NAMES):
        return RELAY
    if any(word in lname for word in _SENSOR_NAMES) or lname in ("ph", "ec"):
        return SENSOR
    return UNKNOWN


def safe_limits(config: Any) -> dict[str, int]:
    """The limits the channel's config states (`safe_limits.max_duration_ms` / `min_off_ms`).

    Which §4.3 default applies where a limit is not stated is the checker's choice: min_off always
    (the node holds it too), max_duration only for `set_state`, since a backend `run_pump` may run
    1–60 s unless the channel says less (§4.3)."""
    given = config.get("safe_limits") if isinstance(config, dict) else None
    limits: dict[str, int] = {}
    if isinstance(given, dict):
        for name in DEFAULT_SAFE_LIMITS:
            value = given.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                limits[name] = value
    return limits


# ---------------------------------------------------------------------------------------
# The catalogue (contract §4.1 firmware commands, §4.2 UI pass-through, §4.3 limits)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    kind: str  # "int" | "float" | "bool"
    required: bool = True
    lo: float | None = None
    hi: float | None = None
    aliases: tuple[str, ...] = ()  # other spellings callers send (Laravel's dose {ml})


@dataclass(frozen=True)
class CommandSpec:
    params: dict[str, Param] = field(default_factory=dict)
    one_of: tuple[str, ...] = ()      # at least one of these optional params is required
    on: tuple[str, ...] = ()          # channel kinds it may be sent to
    passthrough: bool = False         # UI zone command: params forwarded exactly as given (§4.2)


SET_STATE_RUN_MS = 300_000  # firmware: set_state 1 runs the pump up to this long, whatever the limits
RUN_PUMP_MAX_MS = 60_000
CATALOGUE: dict[str, CommandSpec] = {
    "run_pump": CommandSpec({"duration_ms": Param("int", True, 1, RUN_PUMP_MAX_MS)}, on=(PUMP,)),
    "stop_pump": CommandSpec(on=(PUMP,)),
    "dose": CommandSpec({"dose_ml": Param("float", True, 0.1, 5.0, aliases=("ml",))}, on=(PUMP,)),
    "set_state": CommandSpec({"state": Param("int", True, 0, 1)}, on=(PUMP,)),
    "set_relay": CommandSpec({"state": Param("bool"), "duration_ms": Param("int", False, 1, 3_600_000)},
                             on=(RELAY,)),
    "set_pwm": CommandSpec({"value": Param("float", True, 0, 255)}, on=(RELAY,)),
    "calibrate": CommandSpec({"stage": Param("int", True, 0, 10), "known_ph": Param("float", False, 0, 14),
                              "tds_value": Param("float", False, 0, 100_000)}, one_of=("known_ph", "tds_value"),
                             on=(SENSOR,)),
    # No firmware support yet (contract §4.2): kept for the bridge's fill/drain routines.
    "fill": CommandSpec({"target_level": Param("float", True, 0.1, 1.0)}, on=(PUMP, RELAY)),
    "drain": CommandSpec({"target_level": Param("float", True, 0.0, 0.9)}, on=(PUMP, RELAY)),
    # Zone-level UI commands (the zone page's buttons), passed through verbatim, `{}` included.
    **{name: CommandSpec(passthrough=True) for name in (
        "FORCE_IRRIGATION", "FORCE_PH_CONTROL", "FORCE_EC_CONTROL", "FORCE_CLIMATE", "FORCE_LIGHTING")},
}

# A numeric string as Laravel's `numeric` rule accepts it ("0.8", " 6.1", "-2", "1e3"); ASCII only.
_NUMERIC = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*", re.ASCII)


def _coerce(cmd: str, name: str, spec: Param, value: Any) -> Any:
    """The parameter as the firmware needs it (numeric strings become numbers), checked."""
    kind = {"int": "an integer", "float": "a number", "bool": "true or false"}[spec.kind]
    if spec.kind in ("int", "float") and isinstance(value, str) and _NUMERIC.fullmatch(value):
        number = as_number(value)
        if number is not None and spec.kind == "int" and number.is_integer():
            value = int(number)
        elif number is not None and spec.kind == "float":
            value = int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    ok_type = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
    }[spec.kind]
    if not ok_type:
        raise CommandError(f"{cmd}: parameter {name} must be {kind}")
    if spec.lo is not None and value < spec.lo or spec.hi is not None and value > spec.hi:
        raise CommandError(f"{cmd}: parameter {name}={value} is outside the safe range {spec.lo:g}..{spec.hi:g}")
    return value


def normalise_params(cmd: str, params: Any) -> dict[str, Any]:
    """`params` as stored and published: `[]` / null (Laravel's empty params) are `{}`; catalogue
    parameters are coerced (numeric strings, aliases) and checked; pass-through commands and unknown
    keys are kept as given. Raises CommandError."""
    spec = CATALOGUE.get(cmd)
    if spec is None:
        raise CommandError(f"unknown command {cmd!r}; known: {', '.join(sorted(CATALOGUE))}")
    if params is None or params == []:
        params = {}
    if not isinstance(params, dict):
        raise CommandError(f"{cmd}: params must be an object")
    problem = json_problem(params, "params")
    if problem:
        raise CommandError(f"{cmd}: {problem}")
    if spec.passthrough:
        return dict(params)
    out = dict(params)
    for name, pspec in spec.params.items():
        if name not in out:
            alias = next((a for a in pspec.aliases if a in out), None)
            if alias is not None:
                out[name] = out.pop(alias)
        if name in out:
            out[name] = _coerce(cmd, name, pspec, out[name])
        elif pspec.required:
            raise CommandError(f"{cmd}: parameter {name} is required")
    if spec.one_of and not any(name in out for name in spec.one_of):
        raise CommandError(f"{cmd}: one of {', '.join(spec.one_of)} is required")
    return out


def validate_command(cmd: str, params: Any, channel_config: dict | None = None) -> dict[str, Any]:
    """The normalised params of `cmd` (see normalise_params), also checked against a channel's
    `safe_limits.max_duration_ms` when its config is given. Raises CommandError (counted)."""
    try:
        out = normalise_params(cmd, params)
    except CommandError as exc:
        reason = "unknown_command" if str(exc).startswith("unknown command") else "invalid_params"
        metrics.COMMANDS_REJECTED.labels(reason).inc()
        raise
    if channel_config is not None:
        problem = limit_problem(cmd, out, channel_config)
        if problem:
            metrics.COMMANDS_REJECTED.labels("safe_limits").inc()
            raise CommandError(problem)
    return out


def run_ms(cmd: str, params: dict[str, Any], config: Any) -> int | None:
    """How long a command keeps an actuator on (ms), None when it does not switch one on."""
    if cmd == "run_pump":
        return params.get("duration_ms")
    if cmd == "set_state" and params.get("state") == 1:
        return SET_STATE_RUN_MS
    if cmd == "dose":
        rate = config.get("ml_per_second") if isinstance(config, dict) else None
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
            return math.ceil(params["dose_ml"] / rate * 1000)
        return 0  # duration unknown here: the node computes it; min_off still applies
    if cmd == "set_relay" and params.get("state") is True:
        return params.get("duration_ms", 0)
    return None


def limit_problem(cmd: str, params: dict[str, Any], config: Any) -> str | None:
    """Why the run `cmd` asks for exceeds the channel's max_duration_ms (None: within it)."""
    ms = run_ms(cmd, params, config)
    max_ms = safe_limits(config).get("max_duration_ms")
    if cmd == "set_state" and max_ms is None:  # a 300 s run is beyond any pump's default limit (§4.3)
        max_ms = DEFAULT_SAFE_LIMITS["max_duration_ms"]
    if ms is None or max_ms is None or ms <= max_ms:
        return None
    if cmd == "set_state":
        return (f"set_state 1 runs the pump for up to {SET_STATE_RUN_MS} ms, beyond the channel's "
                f"safe_limits.max_duration_ms={max_ms}; use run_pump or dose")
    if cmd == "dose":
        return f"dose: {params['dose_ml']} ml takes {ms} ms, beyond the channel's safe_limits.max_duration_ms={max_ms}"
    return f"{cmd}: duration_ms={ms} exceeds the channel's safe_limits.max_duration_ms={max_ms}"
