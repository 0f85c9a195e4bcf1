"""One simulated ESP32 node: its MQTT session, its channels and how it answers the backend.

Behaviour follows the firmware as the contract describes it (§2.2, §3, §4.1, §5.1):
the will (`offline`, QoS1, retained) is set on `…/lwt`; after CONNACK the node publishes a retained
`{"status":"ONLINE"}`, then subscribes to its `config` and `+/command` topics; an unregistered
node publishes `node_hello` on `<root>/node_hello`. Every command with a cmd_id is answered with a
command_response (ACK / ERROR + error_code / NO_EFFECT for a repeated cmd_id); commands without
a cmd_id are dropped silently, as firmware does. A valid NodeConfig is applied and acknowledged;
an invalid one is refused with `ERROR` and the old one kept.

Commands are handled as strictly as the firmware does (byYorick/hydro2.0 firmware/, contract §4.1):
each node type knows only the commands its firmware registers (others: `unknown_command`);
`set_relay` reads only a boolean `state` and ignores `duration_ms` — a relay stays as set until the
next set_relay; `run_pump` (and `dose`, `set_state 1`) is clamped to the channel's
`safe_limits.max_duration_ms`, refused `pump_busy` while running or in its min-off cooldown;
`dose` needs the channel's `ml_per_second`; `set_pwm` takes 0–100 as percent and 101–255 as an
8-bit value (above 255 clamped), only on PWM outputs (lights, fans).
"""
from __future__ import annotations

import collections
import logging
import random
import socket
import threading
import time
from typing import Any, Callable, Protocol

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from common.schemas import NodeConfig, describe_error
from common.topics import TEMP_GH, TEMP_ZONE, Topics

from .faults import SensorFault
from .layout import ChannelSpec, NodeSpec
from .options import SimOptions
from .reservoir import Reservoir

log = logging.getLogger("node_sim")

CMD_ID_CACHE = 64            # firmware keeps a small ring of recent cmd_ids
SET_STATE_MAX_MS = 300_000   # set_state 1 runs a pump for at most this long
PUMP_COMMANDS = {"run_pump", "stop_pump", "dose", "set_state"}
KNOWN_COMMANDS = PUMP_COMMANDS | {"set_relay", "set_pwm", "calibrate"}
# The handlers each node type's firmware registers (contract §4.1 "Accepted on"); a node type not
# listed here (a layout read from a database may hold any) accepts every known command.
NODE_COMMANDS = {
    "ph": {"run_pump", "stop_pump", "dose", "set_state", "calibrate"},
    "ec": {"run_pump", "stop_pump", "calibrate"},
    "irrig": {"run_pump", "set_relay"},   # pump node: run_pump; valves on relays
    "pump": {"run_pump", "set_relay"},
    "climate": {"set_relay", "set_pwm"},
    "light": {"set_relay", "set_pwm"},
    "relay": {"set_relay"},
}
PWM_WORDS = ("light", "led", "fan", "pwm")


class CommandRefused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class NodeHost(Protocol):
    """What a node uses of the fleet it runs in (fleet.Simulator)."""

    options: SimOptions

    def reservoir_for(self, node: SimNode) -> Reservoir:
        """The water the node's sensors read and its pumps change."""

    def count(self, name: str, n: int = 1) -> None:
        """Add to one of the fleet's statistics."""

    def defer(self, action: Callable[[], None]) -> None:
        """Run `action` later, outside the node's network callbacks (e.g. a restart)."""


class SimNode:
    def __init__(self, spec: NodeSpec, host: NodeHost):
        self.spec = spec
        self.host = host
        self.topics = Topics(host.options.topic_root)
        self.config_version = 0
        self.applied_config: dict | None = None
        self.boot = time.monotonic()
        self.connected = threading.Event()  # set once subscribed (SUBACK): commands and configs reach it
        self.online = False           # False while taken offline on purpose
        self.drop_responses = 0       # answer nothing to the next N commands
        self.sensor_faults: dict[str, SensorFault] = {}  # channel → what it reports instead of the truth
        self.responses: collections.deque[dict] = collections.deque(maxlen=500)  # recent answers sent
        self._cmd_ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.relays: dict[str, bool] = {}   # relay channel → state last set (firmware keeps it until told)
        self._pump_until: dict[str, float] = {}
        self._pump_off_at: dict[str, float] = {}
        self._next_poll: dict[str, float] = {}
        self._next_heartbeat = 0.0
        self._next_hello = 0.0
        self._pending_config_response: dict | None = None
        self._lock = threading.RLock()
        self._client: paho.Client | None = None
        self._random = random.Random(spec.uid)
        self.known_segments: list[tuple[str, str, str]] = []  # every id set this node has used
        self._subscribe_mid: int | None = None

    # -- identity -------------------------------------------------------------------------
    @property
    def uid(self) -> str:
        return self.spec.uid

    @property
    def segments(self) -> tuple[str, str, str]:
        """(gh, zone, node) topic segments: real ids, or temporary ones with the hardware id."""
        if self.spec.registered:
            return self.spec.gh, f"zn-{self.spec.zone_id}", self.spec.uid
        return TEMP_GH, TEMP_ZONE, self.spec.hardware_id

    def node_topic(self, kind: str) -> str:
        return self.topics.node_topic(*self.segments, kind)

    def channel_topic(self, channel: str, kind: str) -> str:
        return self.topics.channel_topic(*self.segments, channel, kind)

    @property
    def reservoir(self) -> Reservoir:
        return self.host.reservoir_for(self)

    def channel(self, name: str) -> ChannelSpec | None:
        return next((c for c in self.spec.channels if c.name == name), None)

    def open_relays(self) -> list[str]:
        """The relay channels (valves, …) this node holds switched on."""
        with self._lock:
            return sorted(name for name, on in self.relays.items() if on)

    def uptime_ms(self) -> int:
        return int((time.monotonic() - self.boot) * 1000)

    # -- connection -----------------------------------------------------------------------
    def start(self) -> None:
        """Connect (in paho's network thread); returns at once."""
        with self._lock:
            if self._client is not None:
                return
            o = self.host.options
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{o.client_prefix}{self.spec.hardware_id}",
                                 protocol=paho.MQTTv311, clean_session=True)
            if o.username:
                client.username_pw_set(o.username, o.password or None)
            if o.tls:
                client.tls_set(ca_certs=o.ca_file or None)
            if self.segments not in self.known_segments:
                self.known_segments.append(self.segments)
            client.will_set(self.node_topic("lwt"), b"offline", qos=1, retain=True)
            client.reconnect_delay_set(1, 5)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_message = self._on_message
            client.on_subscribe = self._on_subscribe
            self._client = client
            self.online = True
            client.connect_async(o.host, o.port, keepalive=o.keepalive)
            client.loop_start()

    def stop(self) -> None:
        """A clean disconnect (the broker does not publish the will)."""
        with self._lock:
            client, self._client = self._client, None
            self.online = False
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self.connected.clear()

    def go_offline(self, abrupt: bool = True) -> None:
        """Lose the connection; abrupt=True drops the TCP socket without DISCONNECT, so the broker
        publishes the node's will (`offline` on …/lwt), as when a node loses power."""
        if not abrupt:
            self.stop()
            return
        with self._lock:
            client, self._client = self._client, None
            self.online = False
        self.connected.clear()
        if client is None:
            return
        client.loop_stop()
        sock = client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.host.count("offline_events")

    def restart(self) -> None:
        """Reconnect with the current ids (after a config changed them): a fresh session and will."""
        self.stop()
        self.start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("node_connect_refused", extra={"node": self.uid, "reason": str(reason_code)})
            return
        uptime_s = self.uptime_ms() // 1000
        client.publish(self.node_topic("status"), orjson.dumps({"status": "ONLINE", "ts": uptime_s}), qos=1,
                       retain=True)
        now = time.monotonic()
        self._next_heartbeat = now + 1.0
        self._next_hello = now
        _, self._subscribe_mid = client.subscribe([(self.node_topic("config"), 1), (self._command_filter(), 1)])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        """SUBACK: from now on the broker delivers this node's config and commands."""
        if mid != self._subscribe_mid:
            return
        self.connected.set()
        self.host.count("connects")
        with self._lock:
            pending, self._pending_config_response = self._pending_config_response, None
        if pending is not None:  # the answer to the config that gave this node its new ids
            self._publish_response(self.node_topic("config_response"), pending, config=True)

    def _command_filter(self) -> str:
        gh, zone, node = self.segments
        return f"{self.topics.root}/{gh}/{zone}/{node}/+/command"

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        client = self._client
        if client is None or not self.connected.is_set():
            return False
        return client.publish(topic, payload, qos=qos, retain=retain).rc == paho.MQTT_ERR_SUCCESS

    # -- periodic traffic (called by the simulator's ticker thread) -----------------------
    def tick(self, now: float) -> None:
        if not self.connected.is_set():
            return
        self._stop_expired_pumps(now)
        o = self.host.options
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + o.heartbeat_sec
            self._send_heartbeat()
        if not self.spec.registered and now >= self._next_hello:
            self._next_hello = now + o.hello_interval_sec
            self._send_hello()
        for ch in self.spec.channels:
            if not ch.is_sensor:
                continue
            due = self._next_poll.get(ch.name)
            interval = (o.poll_ms or ch.poll_interval_ms) / 1000.0
            if due is None:  # spread the first readings so nodes do not publish in lock-step
                self._next_poll[ch.name] = now + self._random.uniform(0, min(interval, 1.0))
                continue
            if now >= due:
                self._next_poll[ch.name] = max(due + interval, now)
                self._send_telemetry(ch)

    def _send_heartbeat(self) -> None:
        payload = {"uptime": self.uptime_ms(), "free_heap": 100_000 + self._random.randint(-4000, 4000),
                   "rssi": -55 - self._random.randint(0, 15), "ts": int(time.time())}
        data = self._maybe_malformed(orjson.dumps(payload))
        if self.publish(self.node_topic("heartbeat"), data, qos=1):
            self.host.count("heartbeats_sent")

    def _send_hello(self) -> None:
        o = self.host.options
        payload = {"message_type": "node_hello", "hardware_id": self.spec.hardware_id, "node_type": self.spec.type,
                   "fw_version": self.spec.fw_version, "hardware_revision": "sim",
                   "capabilities": sorted({c.metric.lower() for c in self.spec.channels if c.is_sensor}),
                   "provisioning_meta": {"greenhouse_token": o.hello_greenhouse or None,
                                         "zone_id": o.hello_zone_id, "node_name": None}}
        if self.publish(self.topics.node_hello(), orjson.dumps(payload), qos=1):
            self.host.count("hellos_sent")

    def _send_telemetry(self, ch: ChannelSpec) -> None:
        value = self.reservoir.reading(ch.metric)
        if value is None:
            value = round(self._random.uniform(0, 100), 2)
        fault = self.sensor_faults.get(ch.name)
        if fault is not None:
            value = fault.apply(value)
        payload = {"node_id": self.uid, "channel": ch.name, "metric_type": ch.metric.upper(), "value": value,
                   "raw": int(value * 1000), "ts": round(time.time(), 3), "stable": True}
        data = self._maybe_malformed(orjson.dumps(payload))
        if self.publish(self.channel_topic(ch.name, "telemetry"), data, qos=1):
            self.host.count("telemetry_sent")

    def _maybe_malformed(self, data: bytes) -> bytes:
        rate = self.host.options.malformed_rate
        if rate <= 0 or self._random.random() >= rate:
            return data
        self.host.count("malformed_sent")
        return self._random.choice(MALFORMED)

    # -- incoming -------------------------------------------------------------------------
    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        try:
            parsed = self.topics.parse(msg.topic)
        except ValueError:
            return
        try:
            if parsed.kind == "config":
                self._handle_config(msg.payload)
            elif parsed.kind == "command":
                self._handle_command(parsed.channel, msg.payload)
        except Exception:  # noqa: BLE001 - a bad message must never kill the network thread
            log.exception("node_message_failed", extra={"node": self.uid, "topic": msg.topic})

    # commands ----------------------------------------------------------------------------
    def _handle_command(self, channel: str, payload: bytes) -> None:
        self.host.count("commands_received")
        try:
            cmd = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.host.count("commands_dropped")
            return
        if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd_id"), str) or not cmd["cmd_id"]:
            self.host.count("commands_dropped")  # firmware drops commands without cmd_id, no answer
            return
        cmd_id = cmd["cmd_id"]
        with self._lock:
            repeated = cmd_id in self._cmd_ids
            if not repeated:
                self._cmd_ids[cmd_id] = None
                while len(self._cmd_ids) > CMD_ID_CACHE:
                    self._cmd_ids.popitem(last=False)
        if repeated:
            response = {"cmd_id": cmd_id, "status": "NO_EFFECT"}
        else:
            try:
                details = self._execute(channel, str(cmd.get("cmd", "")), _params(cmd))
                response = {"cmd_id": cmd_id, "status": "ACK", "details": {"channel": channel, **details}}
            except CommandRefused as exc:
                response = {"cmd_id": cmd_id, "status": "ERROR", "error_code": exc.code,
                            "error_message": str(exc), "details": {"channel": channel}}
        response["ts"] = self.uptime_ms() // 1000
        if self._should_drop():
            self.host.count("responses_dropped")
            return
        self._publish_response(self.channel_topic(channel, "command_response"), response)

    def _should_drop(self) -> bool:
        with self._lock:
            if self.drop_responses > 0:
                self.drop_responses -= 1
                return True
        rate = self.host.options.drop_rate
        return rate > 0 and self._random.random() < rate

    def _publish_response(self, topic: str, response: dict, config: bool = False) -> None:
        self.responses.append({"topic": topic, **response})
        if self.publish(topic, orjson.dumps(response), qos=1):
            self.host.count(("config_response_" if config else "response_") + response["status"].lower())

    def _execute(self, channel: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Carry a command out; returns details for the ACK or raises CommandRefused."""
        accepted = NODE_COMMANDS.get(self.spec.type, KNOWN_COMMANDS)
        if name not in KNOWN_COMMANDS or name not in accepted:
            raise CommandRefused("unknown_command", f"unknown command {name[:64]!r}")
        ch = self.channel(channel)
        if ch is None:
            raise CommandRefused("unknown_channel", f"no channel {channel!r} on this node")
        now = time.monotonic()
        if name in PUMP_COMMANDS:
            if not ch.is_pump:
                raise CommandRefused("pump_not_found", f"{channel} is not a pump")
            if name == "stop_pump" or (name == "set_state" and _int(params, "state", 0, 1) == 0):
                self._stop_pump(ch, now)
                return {"state": 0}
            limits = ch.safe_limits or {}
            if name == "run_pump":
                duration_ms = _int(params, "duration_ms", 1, 2**32 - 1)
            elif name == "dose":
                dose_ml = _float(params, "dose_ml", 0.0, 1e6)
                if dose_ml <= 0:
                    raise CommandRefused("invalid_parameter", "dose_ml must be positive")
                if not ch.ml_per_second or ch.ml_per_second <= 0:
                    raise CommandRefused("pump_error", f"{channel} is not calibrated (no ml_per_second)")
                duration_ms = max(1, int(dose_ml / ch.ml_per_second * 1000))
            else:  # set_state 1
                duration_ms = SET_STATE_MAX_MS
            # The pump driver limits every run to the channel's max_duration_ms (it does not refuse).
            max_ms = limits.get("max_duration_ms")
            if isinstance(max_ms, (int, float)) and max_ms > 0:
                duration_ms = min(duration_ms, int(max_ms))
            self._check_pump_free(ch, now, limits)
            self._run_pump(ch, now, duration_ms)
            details = {"duration_ms": duration_ms}
            if name == "dose":
                details["dose_ml"] = round(duration_ms / 1000.0 * ch.ml_per_second, 3)
            return details
        if name == "set_relay":
            state = params.get("state")
            if not isinstance(state, bool):  # the firmware takes a JSON boolean only
                raise CommandRefused("invalid_parameter", "state must be true or false")
            if ch.type != "ACTUATOR" or ch.is_pump:
                raise CommandRefused("relay_driver_failed", f"{channel} is not a relay")
            # duration_ms is not read: the relay stays as set until the next set_relay.
            with self._lock:
                self.relays[ch.name] = state
            self._switch(ch, 1.0 if state else 0.0)
            return {"state": int(state)}
        if name == "set_pwm":
            value = params.get("value")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise CommandRefused("invalid_parameter", "value must be a number")
            value = int(value)  # the firmware truncates to an integer
            if value < 0:
                raise CommandRefused("invalid_parameter", "value must be 0-100 (percent) or 101-255")
            percent = float(value) if value <= 100 else min(value, 255) / 255.0 * 100.0
            if ch.type != "ACTUATOR" or ch.is_pump or not any(w in ch.name.lower() for w in PWM_WORDS):
                raise CommandRefused("pwm_failed", f"{channel} has no PWM output")
            self._switch(ch, percent / 100.0)
            return {"value": value, "duty_percent": round(percent, 1)}
        # calibrate
        if ch.metric not in ("PH", "EC") and "ph" not in channel and "ec" not in channel:
            raise CommandRefused("calibration_failed", f"{channel} cannot be calibrated")
        _int(params, "stage", 0, 10)
        if "known_ph" not in params and "tds_value" not in params:
            raise CommandRefused("invalid_parameter", "known_ph or tds_value is required")
        return {"stage": params["stage"]}

    def _check_pump_free(self, ch: ChannelSpec, now: float, limits: dict) -> None:
        if self._pump_until.get(ch.name, 0) > now:
            raise CommandRefused("pump_busy", f"{ch.name} is running")
        min_off = limits.get("min_off_ms", 0) / 1000.0 / self.host.options.cooldown_divisor
        if now - self._pump_off_at.get(ch.name, -1e9) < min_off:
            raise CommandRefused("pump_busy", f"{ch.name} is in its min-off cooldown")

    def _run_pump(self, ch: ChannelSpec, now: float, duration_ms: int) -> None:
        seconds = duration_ms / 1000.0
        self._pump_until[ch.name] = now + seconds
        ml = seconds * (ch.ml_per_second or 0.0)
        res = self.reservoir
        name = ch.name.lower()
        if "acid" in name:
            res.add_acid(ml)
        elif "base" in name:
            res.add_base(ml)
        elif "nutrient" in name:
            res.add_nutrient(ml)
        else:  # irrigation / recirculation pumps move water; flow and current show while they run
            res.irrigate(seconds)
        self.host.count("pump_runs")

    def _stop_pump(self, ch: ChannelSpec, now: float) -> None:
        if self._pump_until.get(ch.name, 0) > now:
            self._pump_until[ch.name] = now
            self._pump_off_at[ch.name] = now
            if not any(k in ch.name.lower() for k in ("acid", "base", "nutrient")):
                self.reservoir.stop_irrigation()

    def _stop_expired_pumps(self, now: float) -> None:
        for name, until in list(self._pump_until.items()):
            if until and until <= now:
                self._pump_until[name] = 0
                self._pump_off_at[name] = until

    def _switch(self, ch: ChannelSpec, level: float) -> None:
        res = self.reservoir
        name = ch.name.lower()
        if "fan" in name:
            res.set_fan(level > 0)
        elif "heater" in name:
            res.set_heater(level > 0)
        elif "light" in name or "led" in name:
            res.set_light(level)
        elif "fill" in name or name == "valve_in":
            res.set_valve("fill", level > 0)
        elif "drain" in name or name == "valve_out":
            res.set_valve("drain", level > 0)
        elif "valve" in name or "relay" in name:  # irrigation / recirculation valves: water flows while open
            res.set_valve("irrigation", level > 0)

    # config ------------------------------------------------------------------------------
    def _handle_config(self, payload: bytes) -> None:
        if not payload:  # a retained copy being cleared
            return
        self.host.count("configs_received")
        try:
            raw = orjson.loads(payload)
            config = NodeConfig.model_validate(raw)
        except orjson.JSONDecodeError:
            self._refuse_config("invalid_json: config is not JSON", None)
            return
        except ValidationError as exc:
            version = raw.get("version") if isinstance(raw, dict) else None
            self._refuse_config(f"Invalid config structure: {describe_error(exc)}", version)
            return
        new_zone = _zone_id(config.zone_uid)
        channels = [_channel_from_config(c.model_dump()) for c in config.channels]
        ids_changed = (config.node_id != self.spec.uid or config.gh_uid != (self.spec.gh or TEMP_GH)
                       or new_zone != self.spec.zone_id)
        response = {"status": "ACK", "node_id": config.node_id, "version": config.version,
                    "applied_at": self.uptime_ms() / 1000.0, "restarted": ["mqtt"] if ids_changed else [],
                    "ts": int(time.time())}
        with self._lock:
            self.spec.channels = channels
            self.spec.type = config.type or self.spec.type
            self.config_version = config.version
            self.applied_config = raw
            self._next_poll.clear()
        self.host.count("configs_applied")
        if not ids_changed:
            self._publish_response(self.node_topic("config_response"), response, config=True)
            return
        # New ids: reconnect with the new will and topics, then answer on the real topic.
        with self._lock:
            self.spec.uid, self.spec.gh, self.spec.zone_id = config.node_id, config.gh_uid, new_zone
            self._pending_config_response = response
        self.host.defer(self.restart)

    def _refuse_config(self, error: str, version: Any) -> None:
        self.host.count("configs_refused")
        response = {"status": "ERROR", "error": error[:300], "node_id": self.uid,
                    "version": version if isinstance(version, int) else None, "ts": int(time.time())}
        self._publish_response(self.node_topic("config_response"), response, config=True)


MALFORMED = (
    b"{not json",
    b'{"metric_type":"PH","value":"high"}',
    b"[1,2,3]",
    b'{"value":1.0}',
    b"\xff\xfe\x00garbage",
    b'{"metric_type":"PH","value":NaN}',
    b"",
)


def _params(cmd: dict) -> dict[str, Any]:
    """Flat parameters win; the nested `params` object fills what is missing (contract I-6)."""
    nested = cmd.get("params") if isinstance(cmd.get("params"), dict) else {}
    merged = dict(nested)
    merged.update({k: v for k, v in cmd.items() if k not in ("cmd", "cmd_id", "params", "ts")})
    return merged


def _int(params: dict, name: str, lo: int, hi: int) -> int:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not lo <= value <= hi:
        raise CommandRefused("invalid_parameter", f"{name} must be an integer from {lo} to {hi}")
    return int(value)


def _float(params: dict, name: str, lo: float, hi: float) -> float:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not lo <= value <= hi:
        raise CommandRefused("invalid_parameter", f"{name} must be a number from {lo:g} to {hi:g}")
    return float(value)


def _zone_id(zone_uid: str) -> int | None:
    from common.topics import zone_id_from_segment
    return zone_id_from_segment(zone_uid)


def _channel_from_config(entry: dict) -> ChannelSpec:
    kind = entry.get("type", "SENSOR")
    limits = entry.get("safe_limits") or {}
    mlps = entry.get("ml_per_second")
    return ChannelSpec(
        name=entry["name"], type=kind, metric=(entry.get("metric") or None) if kind == "SENSOR" else None,
        poll_interval_ms=int(entry.get("poll_interval_ms") or 3000),
        actuator_type=entry.get("actuator_type"),
        safe_limits={k: v for k, v in limits.items() if v is not None} if limits else {},
        ml_per_second=float(mlps) if isinstance(mlps, (int, float)) and not isinstance(mlps, bool) else None)
