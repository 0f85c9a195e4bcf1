"""The bridge's own Prometheus metrics (names no other service uses).

Commands published by name and publish failures are the shared `commands_published_total{cmd,source}`,
`commands_failed_total{stage="publish"}` and `mqtt_publish_errors_total{reason}` of common.metrics.
`path` is a route template (or "unmatched"), so its values are bounded.
"""
from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("bridge_requests_total", "HTTP requests answered by the bridge", ["path", "status"])
LATENCY = Histogram("bridge_request_duration_seconds", "HTTP request latency by route", ["path"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 300))
REJECTED = Counter("bridge_requests_rejected_total", "Requests refused before reaching a route",
                   ["reason"])  # unauthorized | no_token_configured | body_too_large | invalid_json | unsafe_json
ROUTINES = Counter("bridge_routines_total", "fill / drain / calibrate-flow runs by outcome", ["kind", "result"])
ROUTINES_RUNNING = Gauge("bridge_routines_running", "fill / drain / calibrate-flow runs in progress")
