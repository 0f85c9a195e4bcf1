"""history-logger's Prometheus metrics (contract §9.3 names; defined once per process)."""
from prometheus_client import Counter, Gauge, Histogram

QUEUE_SIZE = Gauge("telemetry_queue_size", "Telemetry entries waiting in the Redis stream")
RECEIVED = Counter("telemetry_received_total", "Telemetry messages received (MQTT and HTTP)")
QUEUED = Counter("telemetry_queued_total", "Telemetry samples appended to the Redis stream")
INSERTED = Counter("telemetry_inserted_total", "Rows inserted into telemetry_samples")
PROCESSED = Counter("telemetry_processed_total", "Stream entries the writer finished (stored or dead-lettered)")
DROPPED = Counter("telemetry_dropped_total", "Telemetry not stored, by reason (invalid input, sampling, unknown node)",
                  ["reason"])
INVALID = Counter("telemetry_invalid_total", "Telemetry rejected as invalid, by reason", ["reason"])
OVERFLOW = Counter("telemetry_queue_overflow_total",
                   "Messages held back (not acknowledged to the broker) because the stream was at capacity")
UNKNOWN_METRIC = Counter("telemetry_unknown_metric_total", "Samples with a metric name outside the catalogue")
DUPLICATES = Counter("telemetry_redelivered_duplicates_total",
                     "MQTT redeliveries (DUP) of messages already in Redis, acknowledged without storing again")
BATCH_SIZE = Histogram("telemetry_batch_size", "Stream entries per writer batch",
                       buckets=(1, 5, 10, 25, 50, 100, 200, 500, 1000, 2000, 5000))
FLUSH_SECONDS = Histogram("telemetry_flush_seconds", "Time to write one batch to PostgreSQL (one transaction)",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
COMMIT_LAG = Histogram("telemetry_commit_lag_seconds", "From a reading's timestamp to its commit in PostgreSQL",
                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600))
WRITER_RESTARTS = Counter("history_logger_writer_restarts_total",
                          "Telemetry writer processes that exited unexpectedly and were started again")
WRITE_RETRIES = Counter("history_logger_write_retries_total", "Retries after a transient failure", ["target"])

HEARTBEATS = Counter("heartbeat_received_total", "Heartbeats received")
STATUS = Counter("history_logger_status_received_total", "status / lwt messages received", ["kind"])
COMMAND_RESPONSES = Counter("command_response_received_total", "command_response messages received")
COMMAND_RESPONSE_UNKNOWN = Counter("history_logger_command_response_unknown_total",
                                   "command_response for an unknown or already closed cmd_id")
COMMAND_TIMEOUTS = Counter("history_logger_command_timeouts_total", "Commands marked timeout by the sweeper")
EVENTS_INVALID = Counter("history_logger_events_invalid_total", "Life-sign messages rejected, by kind and reason",
                         ["kind", "reason"])
NODES_ONLINE = Counter("history_logger_nodes_online_total", "Nodes that came back online (heard from after offline)")
CONFIG_RESPONSES = Counter("history_logger_config_response_received_total",
                           "config_response messages received (a life sign here; device-registry applies them)")
HEARTBEAT_FIELDS_REJECTED = Counter("history_logger_heartbeat_fields_rejected_total",
                                    "Heartbeat fields refused (not an integer, or outside their bounds), by field",
                                    ["field"])
NODES_OFFLINE = Counter("history_logger_nodes_offline_total", "Nodes marked offline, by reason", ["reason"])
REPLICA_RESCUES = Counter("history_logger_replica_rescues_total",
                          "Sessions of dead replicas taken over, drained and ended (MQTT_SHARED_GROUP)")
