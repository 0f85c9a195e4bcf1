"""Pydantic v2 models for every payload and REST body of contract.md, with its aliases.

Models reject NaN/Infinity, wrong types, over-long strings and missing required fields;
`describe_error` turns a ValidationError into one line a person can act on.
Normalisation rules (metric names, timestamps, statuses) live here beside the models.
"""
from __future__ import annotations

import datetime as dt
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

Str64 = Annotated[str, StringConstraints(max_length=64)]
Str128 = Annotated[str, StringConstraints(max_length=128)]
Str255 = Annotated[str, StringConstraints(max_length=255)]
Number = StrictFloat  # accepts JSON ints and floats, never strings or booleans
MAX_CONFIG_BYTES = 4096  # NVS limit of the node (contract §5.1)


class Payload(BaseModel):
    """Base for node payloads: unknown fields are kept (they go to `raw`), NaN is refused."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)


class Body(BaseModel):
    """Base for REST bodies."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


# ---------------------------------------------------------------------------------------
# JSON that PostgreSQL, orjson and the firmware can all take (bodies, params, configs)
# ---------------------------------------------------------------------------------------
BIGINT_MIN, BIGINT_MAX = -2**63, 2**63 - 1
MAX_JSON_DEPTH = 32  # far below what PostgreSQL's jsonb and orjson refuse; no payload of ours nests deeper


def _text_problem(text: str) -> tuple[list, str] | None:
    if "\x00" in text:
        return [], "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): JSON can escape it, UTF-8 cannot hold it
        return [], "contains an invalid character (a lone surrogate)"
    return None


def json_problem_at(value: Any, depth: int = 0, max_depth: int = MAX_JSON_DEPTH) -> tuple[list, str] | None:
    """Where and why `value` cannot be stored as jsonb / sent as JSON, or None when it can.

    Refused: NUL characters (PostgreSQL text and jsonb reject them), integers outside bigint,
    NaN / Infinity, nesting deeper than `max_depth`, and anything that is not a JSON value."""
    if depth > max_depth:
        return [], f"nested deeper than {max_depth} levels"
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return _text_problem(value)
    if isinstance(value, int):
        return None if BIGINT_MIN <= value <= BIGINT_MAX else ([], "integer outside the 64-bit range")
    if isinstance(value, float):
        return None if math.isfinite(value) else ([], "must be a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return [], "keys must be strings"
            problem = _text_problem(key)
            if problem:
                return [], f"a key {problem[1]}"
            found = json_problem_at(item, depth + 1, max_depth)
            if found:
                return [key[:64], *found[0]][:max_depth], found[1]
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = json_problem_at(item, depth + 1, max_depth)
            if found:
                return [index, *found[0]][:max_depth], found[1]
        return None
    return [], f"{type(value).__name__} is not a JSON value"


def json_problem(value: Any, where: str = "body", max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """json_problem_at as one line: "params.a.b: contains a NUL character"."""
    found = json_problem_at(value, 0, max_depth)
    if found is None:
        return None
    path, message = found
    return f"{'.'.join([where, *map(str, path)])}: {message}"


def describe_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------
# Metric names and timestamps (contract §3.1)
# ---------------------------------------------------------------------------------------
METRIC_ALIASES: dict[str, str] = {}
for _canonical, _aliases in {
    "PH": ("ph",),
    "EC": ("ec",),
    "TEMP_AIR": ("temp_air", "temperature", "temp"),
    "TEMP_WATER": ("temp_water", "water_temp"),
    "HUMIDITY": ("humidity", "humidity_air", "rh"),
    "CO2": ("co2",),
    "LUX": ("lux", "light"),
    "WATER_LEVEL": ("water_level", "level"),
    "FLOW_RATE": ("flow_rate", "flow"),
    "PUMP_CURRENT": ("pump_current", "current", "current_ma"),
    "PUMP_STATE": ("pump_state",),
}.items():
    for _alias in _aliases:
        METRIC_ALIASES[_alias] = _canonical
KNOWN_METRICS = frozenset(METRIC_ALIASES.values())


def normalise_metric(name: str) -> tuple[str, bool]:
    """Canonical upper-case metric name and whether it is a known metric."""
    canonical = METRIC_ALIASES.get(name.strip().lower())
    if canonical is not None:
        return canonical, True
    return name.strip().upper(), False


def as_number(value: Any) -> float | None:
    """A finite number from a number or a numeric string (recipe targets accept both, contract
    §8.1), else None; booleans are not numbers."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


MS_THRESHOLD = 1e12
MIN_EPOCH_SEC = 1.5e9
MAX_FUTURE_SEC = 86_400


def normalise_timestamp(value: Any, received_at: float) -> dt.datetime:
    """A node timestamp → naive UTC datetime (the schema's convention).

    Numbers ≥ 1e12 are milliseconds; 1.5e9..now+1 day are seconds; anything else (uptime since
    boot, garbage, missing) is replaced by the receive time. ISO-8601 strings are parsed.
    A result more than a day in the future, or before 1.5e9 (2017), is replaced by the receive
    time. Total: no input raises (a node's timestamp must never stop a batch)."""
    seconds: float | None = None
    if isinstance(value, bool) or value is None:
        seconds = None
    elif isinstance(value, (int, float)) and math.isfinite(value):
        if value >= MS_THRESHOLD:
            seconds = value / 1000.0
        elif MIN_EPOCH_SEC <= value:
            seconds = float(value)
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.timezone.utc)
            seconds = parsed.timestamp()
        except (ValueError, OverflowError):  # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
            seconds = None
    if seconds is None or not MIN_EPOCH_SEC <= seconds <= received_at + MAX_FUTURE_SEC:
        seconds = received_at
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(tzinfo=None)


# ---------------------------------------------------------------------------------------
# Node → backend payloads (contract §3)
# ---------------------------------------------------------------------------------------
class Telemetry(Payload):
    node_id: Str128 | None = None
    channel: Str128 | None = None
    metric_type: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        validation_alias=AliasChoices("metric_type", "metric"))
    value: Number | None
    raw: Any = None
    ts: Number | Str64 | None = Field(default=None, validation_alias=AliasChoices("ts", "timestamp"))
    stub: StrictBool = False


class Status(Payload):
    status: Str64 = "ONLINE"
    ts: Number | None = None

    @property
    def normalised(self) -> str:
        return self.status.strip().lower() or "online"


class Heartbeat(Payload):
    """Values are validated one by one (a bad field is skipped, not the whole heartbeat)."""

    uptime: Any = None
    uptime_ms: Any = None
    free_heap: Any = Field(default=None, validation_alias=AliasChoices("free_heap", "free_heap_bytes", "heap"))
    rssi: Any = None
    ts: Any = None

    def uptime_seconds(self, uptime_in_ms: bool) -> int | None:
        if _as_int(self.uptime_ms) is not None:
            return _as_int(self.uptime_ms) // 1000
        uptime = _as_int(self.uptime)
        if uptime is None:
            return None
        return uptime // 1000 if uptime_in_ms else uptime

    @property
    def free_heap_bytes(self) -> int | None:
        return _as_int(self.free_heap)

    @property
    def rssi_dbm(self) -> int | None:
        return _as_int(self.rssi)


INT32_MAX = 2**31 - 1


def _as_int(value: Any) -> int | None:
    """An integer that fits the `integer` columns, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and -INT32_MAX <= value <= INT32_MAX:
        return value
    return None


class ProvisioningMeta(Payload):
    greenhouse_token: Str128 | None = None
    zone_id: StrictInt | Str64 | None = None
    node_name: Str255 | None = None


class NodeHello(Payload):
    message_type: Literal["node_hello"]
    hardware_id: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^/+#\x00-\x1f\x7f]+$")]
    node_type: Str64 | None = None
    fw_version: Str64 | None = None
    hardware_revision: Str64 | None = None
    capabilities: list[Str64] = Field(default_factory=list, max_length=64)
    provisioning_meta: ProvisioningMeta = Field(default_factory=ProvisioningMeta)


class ConfigResponse(Payload):
    status: Str64
    error: Annotated[str, StringConstraints(max_length=1024)] | None = None
    node_id: Str128 | None = None
    applied: StrictBool | None = None
    version: StrictInt | None = None
    hash: Str128 | None = None
    restarted: list[Str64] | None = None

    @property
    def ok(self) -> bool:
        return self.status.strip().upper() in ("OK", "ACK")

    @field_validator("status")
    @classmethod
    def _known_status(cls, value: str) -> str:
        if value.strip().upper() not in ("OK", "ACK", "ERROR"):
            raise ValueError("must be OK, ACK or ERROR")
        return value


# command_response status → commands.status (contract §3.9)
RESPONSE_STATUS = {
    "ACK": "ack", "OK": "ack", "ACCEPTED": "ack", "COMPLETED": "ack", "NO_EFFECT": "ack",
    "ERROR": "failed", "FAILED": "failed", "REJECTED": "failed", "TIMEOUT": "failed",
}


class CommandResponse(Payload):
    cmd_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    status: Str64
    error_code: Str128 | None = None
    error_message: Annotated[str, StringConstraints(max_length=2048)] | None = Field(
        default=None, validation_alias=AliasChoices("error_message", "error"))
    details: dict[str, Any] | None = None
    ts: Number | None = None

    @field_validator("status")
    @classmethod
    def _known_status(cls, value: str) -> str:
        if value.strip().upper() not in RESPONSE_STATUS:
            raise ValueError(f"must be one of {', '.join(sorted(RESPONSE_STATUS))}")
        return value

    @property
    def command_status(self) -> str:
        return RESPONSE_STATUS[self.status.strip().upper()]


# ---------------------------------------------------------------------------------------
# Backend → node payloads
# ---------------------------------------------------------------------------------------
class CommandPayload(Payload):
    cmd: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    cmd_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    params: dict[str, Any] = Field(default_factory=dict)
    ts: StrictInt | None = None


CHANNEL_TYPES = {"sensor": "SENSOR", "s": "SENSOR", "actuator": "ACTUATOR", "a": "ACTUATOR"}


# Contract §4.3: what NodeConfig carries for an actuator channel that states no limits of its own.
DEFAULT_SAFE_LIMITS = {"max_duration_ms": 5000, "min_off_ms": 3000}


class SafeLimits(Payload):
    max_duration_ms: StrictInt = Field(ge=1, le=300_000)
    min_off_ms: StrictInt = Field(ge=0, le=3_600_000)


class ChannelConfig(Payload):
    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^/+#\x00-\x1f\x7f]+$")]
    type: Str64
    metric: Str64 | None = None
    poll_interval_ms: StrictInt | None = Field(default=None, ge=100, le=86_400_000)
    actuator_type: Str64 | None = None
    safe_limits: SafeLimits | None = None

    @field_validator("type")
    @classmethod
    def _channel_type(cls, value: str) -> str:
        canonical = CHANNEL_TYPES.get(value.strip().lower())
        if canonical is None:
            raise ValueError("must be SENSOR or ACTUATOR")
        return canonical

    @model_validator(mode="after")
    def _actuator_limits(self) -> "ChannelConfig":
        if self.type == "ACTUATOR" and self.safe_limits is None:
            raise ValueError(f"actuator channel {self.name!r} needs safe_limits {{max_duration_ms, min_off_ms}}")
        return self


class NodeConfig(Payload):
    """The firmware shape of contract §5.1 (extra blocks are kept and sent as they are)."""

    node_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    version: StrictInt = Field(ge=1)
    type: Str64
    gh_uid: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    zone_uid: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    channels: list[ChannelConfig] = Field(max_length=64)
    wifi: dict[str, Any]
    mqtt: dict[str, Any]

    @model_validator(mode="after")
    def _unique_channels(self) -> "NodeConfig":
        names = [c.name for c in self.channels]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"channel names must be unique, repeated: {', '.join(duplicates)}")
        return self


# ---------------------------------------------------------------------------------------
# REST bodies (contract §7)
# ---------------------------------------------------------------------------------------
# Laravel validates numbers with its `numeric` / `integer` rules, which pass numeric strings
# ("0.8", "120") through to us: those are numbers here too. ASCII digits only ("١٢" is not a number).
_NUMERIC_TEXT = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*", re.ASCII)
_INTEGER_TEXT = re.compile(r"\s*[+-]?\d{1,19}\s*", re.ASCII)


def _number_from_text(value: Any) -> Any:
    if isinstance(value, str) and _NUMERIC_TEXT.fullmatch(value):
        return float(value)
    return value


def _integer_from_text(value: Any) -> Any:
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value):
        return int(value)
    return value


def _no_nul(value: str) -> str:
    problem = _text_problem(value)
    if problem:
        raise ValueError(f"must not be text that {problem[1]}")
    return value


def _storable_json(value: Any) -> Any:
    problem = json_problem(value, "value")
    if problem:
        raise ValueError(problem[len("value"):].lstrip(".").removeprefix(": "))
    return value


LaxNumber = Annotated[StrictFloat, BeforeValidator(_number_from_text)]
BigInt = Annotated[StrictInt, BeforeValidator(_integer_from_text), Field(ge=BIGINT_MIN, le=BIGINT_MAX)]
Id = Annotated[StrictInt, BeforeValidator(_integer_from_text), Field(ge=1, le=BIGINT_MAX)]
Text = Annotated[str, AfterValidator(_no_nul)]
StorableJson = Annotated[Any, AfterValidator(_storable_json)]


class CommandRequest(Body):
    type: Annotated[Text, StringConstraints(min_length=1, max_length=64)]
    params: Annotated[dict[str, Any], AfterValidator(_storable_json)] = Field(default_factory=dict)
    node_uid: Annotated[Text, StringConstraints(max_length=128)] | None = None
    channel: Annotated[Text, StringConstraints(max_length=64)] | None = None
    greenhouse_uid: Annotated[Text, StringConstraints(max_length=128)] | None = None
    zone_id: Id | None = None
    cmd_id: Annotated[Text, StringConstraints(min_length=1, max_length=64)] | None = None

    @field_validator("params", mode="before")
    @classmethod
    def _empty_list_is_empty_params(cls, value: Any) -> Any:
        return {} if value in (None, []) else value


class ConfigPublishRequest(Body):
    node_uid: Annotated[Text, StringConstraints(min_length=1, max_length=128)]
    zone_id: Id | None = None
    greenhouse_uid: Annotated[Text, StringConstraints(max_length=128)] | None = None
    config: Annotated[dict[str, Any], AfterValidator(_storable_json)]


class FillRequest(Body):
    target_level: LaxNumber
    max_duration_sec: Annotated[StrictInt, BeforeValidator(_integer_from_text)] = Field(default=300, ge=1, le=3600)


class CalibrateFlowRequest(Body):
    node_id: Id
    channel: Annotated[Text, StringConstraints(min_length=1, max_length=64)]
    pump_duration_sec: Annotated[StrictInt, BeforeValidator(_integer_from_text), Field(ge=-2**31, le=2**31)] = 10


class ZoneUpdatedRequest(Body):
    zone_id: Id
    greenhouse_uid: Annotated[Text, StringConstraints(max_length=128)] | None = None


class IngestSample(Body):
    node_uid: Annotated[Text, StringConstraints(max_length=128)] | None = None
    zone_id: BigInt | None = None
    zone_uid: Annotated[Text, StringConstraints(max_length=64)] | None = None
    metric_type: Annotated[Text, StringConstraints(min_length=1, max_length=64)]
    value: Number | None
    ts: Number | Annotated[Text, StringConstraints(max_length=64)] | None = None
    channel: Annotated[Text, StringConstraints(max_length=64)] | None = None
    raw: StorableJson = None


class IngestRequest(Body):
    samples: list[IngestSample] = Field(min_length=1, max_length=10_000)
