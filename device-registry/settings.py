"""device-registry settings beyond the common ones (every variable is in README.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from common.env import EnvReader, Settings
from common.nodeconfig import ConfigDefaults


@dataclass(frozen=True)
class ServiceSettings:
    forward_hello: bool              # also POST each node_hello to Laravel /api/nodes/register
    laravel_retries: int             # retries after a 5xx / timeout / connection error (none after a 4xx)
    laravel_retry_base_sec: float    # first retry delay; doubles each time
    applied_events: bool             # zone_event NODE_CONFIG_APPLIED on a successful config_response
    republish_interval_sec: float    # at most one automatic re-send of the same version per node in this time
    new_nodes_per_min: int           # node_hello may create at most this many new nodes per minute
    node_wifi_ssid: str
    node_wifi_pass: str
    node_mqtt_host: str
    node_mqtt_port: int
    node_mqtt_keepalive: int

    def config_defaults(self) -> ConfigDefaults:
        wifi = {"ssid": self.node_wifi_ssid, "pass": self.node_wifi_pass} if self.node_wifi_ssid else {}
        mqtt = {"host": self.node_mqtt_host, "port": self.node_mqtt_port, "keepalive": self.node_mqtt_keepalive}
        return ConfigDefaults(wifi=wifi, mqtt=mqtt)

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> "ServiceSettings":
        settings.require_secrets("PY_API_TOKEN")  # every REST route needs it
        env = EnvReader(environ)
        return cls(
            forward_hello=env.bool("REGISTRY_FORWARD_HELLO", False),
            laravel_retries=env.int("REGISTRY_LARAVEL_RETRIES", 3, 0, 10),
            laravel_retry_base_sec=env.float("REGISTRY_LARAVEL_RETRY_BASE_SEC", 1.0, 0.0, 60.0),
            applied_events=env.bool("REGISTRY_CONFIG_APPLIED_EVENTS", True),
            republish_interval_sec=env.float("REGISTRY_REPUBLISH_INTERVAL_SEC", 30.0, 0.0, 86_400.0),
            new_nodes_per_min=env.int("REGISTRY_NEW_NODES_PER_MIN", 20, 1, 100_000),
            node_wifi_ssid=env.str("NODE_WIFI_SSID", max_len=64),
            node_wifi_pass=env.str("NODE_WIFI_PASS", max_len=128),
            node_mqtt_host=env.str("NODE_MQTT_HOST", settings.mqtt_host, max_len=255),
            node_mqtt_port=env.int("NODE_MQTT_PORT", settings.mqtt_port, 1, 65535),
            node_mqtt_keepalive=env.int("NODE_MQTT_KEEPALIVE", 30, 5, 3600),
        )
