"""OpenAPI request and response examples of every bridge endpoint (shown at /docs)."""
from __future__ import annotations

from typing import Any

CMD_ID = "5f0c3c1e-7d1a-4b7e-9a51-0b6f1b2a9c10"
TASK_ID = "4b1e0c1f9d8a4e7fb0c2a1d3e5f60718"


def _example(summary: str, value: Any) -> dict[str, Any]:
    return {"summary": summary, "value": value}


ZONE_COMMAND = {
    "run_pump": _example("Run a pump for 2.5 s (all facts given, Laravel's cmd_id)", {
        "type": "run_pump", "params": {"duration_ms": 2500}, "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1",
        "channel": "pump_in", "cmd_id": CMD_ID}),
    "looked_up": _example("Greenhouse and node looked up from the zone and channel", {
        "type": "set_relay", "params": {"state": True}, "channel": "fan_A"}),
    "force": _example("Zone-level UI command, passed through", {
        "type": "FORCE_IRRIGATION", "params": {"duration_sec": 60}, "greenhouse_uid": "gh-1",
        "node_uid": "nd-irr-1", "channel": "pump_in"}),
}
NODE_COMMAND = {
    "dose": _example("Dose 1.5 ml of acid", {
        "type": "dose", "params": {"dose_ml": 1.5}, "greenhouse_uid": "gh-1", "zone_id": 3, "channel": "pump_acid"}),
    "looked_up": _example("Zone and greenhouse taken from the node", {
        "type": "calibrate", "params": {"stage": 1, "known_ph": 7.0}, "channel": "ph_sensor"}),
}
FILL = {"fill": _example("Fill to 80 %, give up after 5 minutes", {"target_level": 0.8, "max_duration_sec": 300})}
DRAIN = {"drain": _example("Drain to 10 %", {"target_level": 0.1, "max_duration_sec": 300})}
CALIBRATE = {"calibrate": _example("Run pump_in of node 12 for 10 s", {
    "node_id": 12, "channel": "pump_in", "pump_duration_sec": 10})}
CONFIG = {"config": _example("A pH node's config (version is set by the bridge from the content hash)", {
    "node_uid": "nd-ph-esp32a1b", "zone_id": 3, "greenhouse_uid": "gh-1", "config": {
        "node_id": "nd-ph-esp32a1b", "version": 1, "type": "ph", "gh_uid": "gh-1", "zone_uid": "zn-3",
        "channels": [{"name": "ph_sensor", "type": "SENSOR", "metric": "PH", "poll_interval_ms": 3000},
                     {"name": "pump_acid", "type": "ACTUATOR", "metric": None, "actuator_type": "PUMP",
                      "safe_limits": {"max_duration_ms": 5000, "min_off_ms": 3000}, "ml_per_second": 0.5}],
        "wifi": {"ssid": "HydroFarm", "pass": "secret"}, "mqtt": {"host": "mqtt", "port": 1883, "keepalive": 30}}})}
ZONE_UPDATED = {"zone": _example("Zone 3 changed", {"zone_id": 3, "greenhouse_uid": "gh-1"})}

COMMAND_OK = {"status": "ok", "data": {"command_id": CMD_ID}}
COMMAND_STATUS_OK = {"status": "ok", "data": {
    "cmd_id": CMD_ID, "cmd": "run_pump", "status": "failed", "zone_id": 3, "node_uid": "nd-irr-1",
    "channel": "pump_in", "params": {"duration_ms": 2500}, "source": "bridge", "error_code": "current_not_detected",
    "error_message": "Pump started but no current detected", "created_at": "2025-11-20T08:00:00Z",
    "sent_at": "2025-11-20T08:00:00Z", "ack_at": None, "failed_at": "2025-11-20T08:00:03Z",
    "updated_at": "2025-11-20T08:00:03Z"}}
CONFIG_OK = {"status": "ok", "data": {
    "published": True, "topic": "hydro/gh-1/zn-3/nd-ph-esp32a1b/config", "version": 4,
    "config_hash": "9f2c...e1", "changed": True}}
LEVEL_OK = {"status": "ok", "data": {"success": True, "target_level": 0.8, "final_level": 0.81, "elapsed_sec": 42.1}}
CALIBRATION_OK = {"status": "ok", "data": {
    "success": True, "K": 0.0021, "avg_flow_l_per_min": 2.4, "samples_count": 10, "pump_duration_sec": 10,
    "calibrated_at": "2025-11-20T08:00:11Z"}}
TASK_OK = {"status": "ok", "data": {
    "task_id": TASK_ID, "kind": "fill", "zone_id": 3, "state": "succeeded", "created_at": "2025-11-20T08:00:00.000Z",
    "finished_at": "2025-11-20T08:00:42.100Z", "result": LEVEL_OK["data"], "error": None}}
ZONE_UPDATED_OK = {"status": "ok", "data": {"zone_id": 3, "greenhouse_uid": "gh-1", "receivers": 1}}

ERRORS: dict[int, tuple[str, Any]] = {
    400: ("A fact is missing, or a value outside the route's range",
          {"detail": "greenhouse_uid, node_uid and channel are required"}),
    401: ("Wrong or missing bearer token", {"detail": "Unauthorized: invalid or missing token"}),
    404: ("Unknown zone, node, command or task", {"detail": "zone 3 not found"}),
    409: ("The zone already runs a routine", {"detail": "zone 3 is already running a fill routine (task ...)"}),
    413: ("Body larger than BRIDGE_MAX_BODY_BYTES", {"detail": "request body is larger than 65536 bytes"}),
    422: ("Body invalid, or command outside the catalogue / its safety limits",
           {"detail": "run_pump: parameter duration_ms=61000 is outside the safe range 1..60000"}),
    500: ("PY_API_TOKEN is not configured (the bridge refuses every /bridge route)",
          {"detail": "Server misconfiguration: PY_API_TOKEN must be set for security"}),
    503: ("MQTT broker or database unreachable; retry after Retry-After seconds (the command is not `sent`)",
          {"detail": "command 5f0c3c1e-... not sent: MQTT broker is not connected"}),
}


def responses(success: dict, *codes: int, accepted: bool = False, ok_status: int = 200) -> dict[int, dict]:
    def content(example: Any) -> dict:
        return {"content": {"application/json": {"example": example}}}

    result = {ok_status: {"description": "Done", **content(success)}}
    if accepted:
        result[202] = {"description": "`?async=1`: started in the background",
                       **content({"status": "ok", "data": {"task_id": TASK_ID}})}
    for code in codes:
        description, example = ERRORS[code]
        result[code] = {"description": description, **content(example)}
    return result
