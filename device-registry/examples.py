"""OpenAPI request and response examples of every registry route (shown at /docs and /redoc)."""
from __future__ import annotations

from typing import Any

UID = "nd-ph-esp32a1b"


def _example(summary: str, value: Any) -> dict[str, Any]:
    return {"summary": summary, "value": value}


NODE = {
    "id": 12, "uid": UID, "hardware_id": "esp32-a1b2c3d4e5f6", "name": "pH Zone A", "type": "ph",
    "fw_version": "2.0.1", "hardware_revision": "rev-b", "capabilities": ["ph", "pump_acid", "pump_base"],
    "zone_id": 3, "status": "online", "lifecycle_state": "ACTIVE", "validated": True,
    "first_seen_at": "2025-11-20T08:00:00Z", "last_seen_at": "2025-11-20T09:15:02Z",
    "created_at": "2025-11-20T08:00:00Z", "updated_at": "2025-11-20T09:15:02Z",
    "config_version": 4, "applied_version": 4, "published_version": 4, "can_receive_config": True}
CONFIG = {
    "node_id": UID, "version": 4, "type": "ph", "gh_uid": "gh-1", "zone_uid": "zn-3",
    "channels": [{"name": "ph_sensor", "type": "SENSOR", "metric": "PH", "poll_interval_ms": 3000},
                 {"name": "pump_acid", "type": "ACTUATOR", "metric": None, "actuator_type": "PUMP",
                  "safe_limits": {"max_duration_ms": 5000, "min_off_ms": 3000}, "ml_per_second": 0.5}],
    "wifi": {"ssid": "HydroFarm", "pass": "secret"}, "mqtt": {"host": "mqtt", "port": 1883, "keepalive": 30}}
PUBLISHED = {"published": True, "topic": f"hydro/gh-1/zn-3/{UID}/config", "version": 4, "changed": True,
             "config_hash": "9f2c...e1", "error": None}

RENAME = {"rename": _example("Give the node a name operators recognise", {"name": "pH Zone A"})}
ZONE = {"zone": _example("Bind the node to zone 3", {"zone_id": 3})}
PUT_CONFIG = {
    "channels": _example("Only the channels (other top-level keys are filled from the database)", {
        "channels": CONFIG["channels"]}),
    "wrapped": _example("The NodeConfig wrapped in `config`", {"config": CONFIG}),
}

LIST_OK = {"status": "ok", "data": [NODE]}
NODE_OK = {"status": "ok", "data": NODE}
ZONE_OK = {"status": "ok", "data": {"node": NODE, "config": PUBLISHED}}
UNASSIGN_OK = {"status": "ok", "data": {"node": dict(NODE, zone_id=None, lifecycle_state="REGISTERED_BACKEND",
                                                     can_receive_config=False)}}
CONFIG_STATE_OK = {"status": "ok", "data": {
    "node_uid": UID, "version": 4, "config_hash": "9f2c...e1", "config": CONFIG, "applied_version": 4,
    "up_to_date": True, "delivery": {
        "published_version": 4, "published_at": "2025-11-20T09:00:00Z", "published_topic": PUBLISHED["topic"],
        "publish_error": None, "publish_error_at": None, "applied_version": 4, "applied_at": "2025-11-20T09:00:01Z",
        "node_error": None, "node_error_version": None, "node_error_at": None, "temp_topics_pending": False},
    "versions": [{"version": 4, "config_hash": "9f2c...e1", "source": "registry",
                  "created_at": "2025-11-20T09:00:00Z"}]}}
PUBLISH_OK = {"status": "ok", "data": PUBLISHED}

ERRORS: dict[int, tuple[str, Any]] = {
    202: ("Stored, but the broker did not take it: re-sent when the node comes ONLINE",
          {"status": "ok", "data": dict(PUBLISHED, published=False, changed=False,
                                        error="MQTT broker is not connected")}),
    400: ("The node has no zone, or its zone no greenhouse",
          {"detail": "zone_id is required (node must be assigned to a zone)"}),
    401: ("Wrong or missing bearer token", {"detail": "Unauthorized: invalid or missing token"}),
    404: ("Unknown node or zone", {"detail": "node 'nd-ph-esp32a1b' not found"}),
    409: ("The node is DECOMMISSIONED or in MAINTENANCE",
          {"detail": "node 'nd-ph-esp32a1b' is MAINTENANCE; it cannot be assigned a zone"}),
    422: ("Invalid body or query; a config problem names its field",
          {"detail": "config: must be a JSON object", "field": "config"}),
    500: ("PY_API_TOKEN is not configured (every API route answers this; docs and ops routes still work)",
          {"detail": "Server misconfiguration: PY_API_TOKEN must be set for security"}),
}


def responses(success: dict, *codes: int) -> dict[int, dict]:
    def content(example: Any) -> dict:
        return {"content": {"application/json": {"example": example}}}

    result = {200: {"description": "Done", **content(success)}}
    for code in (*codes, 401, 500):
        description, example = ERRORS[code]
        result[code] = {"description": description, **content(example)}
    return result
