"""device-registry metrics (names used by no other service; contract §9.3 names where it has them)."""
from prometheus_client import Counter

HELLO_RECEIVED = Counter("node_hello_received_total", "node_hello messages received")
HELLO_REGISTERED = Counter("node_hello_registered_total", "node_hello messages that created a new node")
HELLO_INVALID = Counter("registry_node_hello_invalid_total", "node_hello messages refused", ["reason"])
REGISTRATIONS = Counter("registry_registrations_total", "Nodes registered or updated from node_hello", ["result"])
CONFIG_RESPONSES = Counter("config_response_received_total", "config_response messages received", ["status"])
CONFIG_RESPONSES_INVALID = Counter("registry_config_response_invalid_total", "config_response messages refused",
                                   ["reason"])
CONFIGS_APPLIED = Counter("registry_configs_applied_total", "Config versions a node reported applied")
CONFIGS_FAILED = Counter("registry_configs_failed_total", "Config deliveries that failed", ["reason"])
CONFIG_DELIVERIES = Counter("registry_config_deliveries_total", "Automatic config deliveries", ["trigger"])
MESSAGES_IGNORED = Counter("registry_messages_ignored_total", "status / config_request messages not acted on",
                           ["kind", "reason"])
LARAVEL_FORWARDS = Counter("registry_laravel_register_total", "node_hello forwards to Laravel", ["result"])
HELLO_RATE_LIMITED = Counter("registry_node_hello_rate_limited_total",
                             "node_hello messages of unknown hardware refused: over REGISTRY_NEW_NODES_PER_MIN")
REFUSED = Counter("registry_http_refused_total", "REST requests refused before or by validation", ["reason"])
REQUESTS = Counter("registry_http_requests_total", "REST answers by route template and status", ["route", "status"])
