"""Prometheus metrics shared by every service (defined once: one registry per process).

Service-specific metrics live in each service with names of their own (contract §9.3).
Labels are bounded: never a node uid or cmd_id on a counter.
"""
from prometheus_client import Counter, Gauge

MQTT_CONNECTED = Gauge("mqtt_connected", "1 while the MQTT client is connected", ["client_id"])
MQTT_PUBLISH_ERRORS = Counter("mqtt_publish_errors_total", "MQTT publishes that failed", ["reason"])
MQTT_HANDLER_ERRORS = Counter("mqtt_handler_errors_total", "MQTT message handlers that raised", ["filter"])
DB_REACHABLE = Gauge("db_reachable", "1 while the service's database answers (common.infra_watch)")
MQTT_UNROUTED = Counter("mqtt_unrouted_messages_total", "Messages that matched no subscription")
MQTT_DROPPED = Counter("mqtt_messages_dropped_total",
                       "Messages acknowledged without being handled (manual-ack clients), by reason", ["reason"])
MQTT_DISPATCH_ERRORS = Counter("mqtt_dispatch_errors_total", "Failures inside the MQTT dispatcher itself, by stage",
                               ["stage"])

COMMANDS_TOTAL = Counter("commands_total", "Commands issued (one per new cmd_id)", ["cmd", "source"])
COMMANDS_PUBLISHED = Counter("commands_published_total", "Commands published to MQTT", ["cmd", "source"])
COMMANDS_REJECTED = Counter("commands_rejected_total", "Commands refused by validation", ["reason"])
COMMANDS_FAILED = Counter("commands_failed_total", "Commands whose publish failed or node answered failure",
                          ["stage"])
COMMANDS_DEADLOCK_RETRIES = Counter("commands_deadlock_retries_total",
                                    "Batch updates of commands rows chosen as a deadlock victim and retried", ["step"])
