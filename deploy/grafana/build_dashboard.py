"""Writes dashboards/hydro-overview.json (the provisioned Grafana dashboard) from the panel list below.

    python deploy/grafana/build_dashboard.py

Every Prometheus expression may use only metrics our services define (tests/test_deploy.py checks it);
every PostgreSQL query runs against the migrated schema in the same test.
"""
from __future__ import annotations

import json
from pathlib import Path

PROM = {"type": "prometheus", "uid": "prometheus"}
PG = {"type": "postgres", "uid": "hydro-postgres"}
SERVICES = "mqtt-bridge|history-logger|automation-engine|scheduler|device-registry"


def prom(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": PROM, "expr": expr, "legendFormat": legend, "refId": ref}


def sql(query: str, ref: str = "A", fmt: str = "time_series") -> dict:
    return {"datasource": PG, "rawQuery": True, "editorMode": "code", "format": fmt, "rawSql": query.strip(),
            "refId": ref}


def panel(pid: int, title: str, kind: str, targets: list[dict], x: int, y: int, w: int = 8, h: int = 8,
          unit: str = "short", description: str = "") -> dict:
    return {"id": pid, "type": kind, "title": title, "description": description,
            "datasource": targets[0]["datasource"], "targets": targets,
            "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {}}


def zone_metric_sql(metric: str) -> str:
    return f"""
SELECT $__timeGroupAlias(s.ts, '1m'), z.name AS metric, avg(s.value) AS value
FROM telemetry_samples s JOIN zones z ON z.id = s.zone_id
WHERE s.metric_type = '{metric}' AND s.value IS NOT NULL AND $__timeFilter(s.ts)
GROUP BY 1, 2
ORDER BY 1"""


PANELS = [
    panel(1, "Nodes online", "stat", [sql(
        "SELECT count(*) FILTER (WHERE status = 'online') AS online, count(*) AS registered "
        "FROM nodes WHERE lifecycle_state <> 'DECOMMISSIONED'", fmt="table")], 0, 0, 6, 4,
        description="nodes.status as history-logger keeps it (status / LWT / housekeeping)"),
    panel(2, "Services up", "stat", [prom(f'sum(up{{job=~"{SERVICES}"}})', "up", "A")], 6, 0, 6, 4),
    panel(3, "Telemetry queue size", "stat", [prom("sum(telemetry_queue_size)", "queued", "A")], 12, 0, 6, 4),
    panel(4, "Commands by status (last hour)", "bargauge", [sql(
        "SELECT now() AS time, status AS metric, count(*) AS value FROM commands "
        "WHERE created_at > now() - interval '1 hour' GROUP BY status ORDER BY status")], 18, 0, 6, 4),
    panel(5, "Telemetry ingest rate", "timeseries", [
        prom("sum(rate(telemetry_received_total[1m]))", "received", "A"),
        prom("sum(rate(telemetry_inserted_total[1m]))", "inserted", "B"),
        prom("sum(rate(heartbeat_received_total[1m]))", "heartbeats", "C")], 0, 4, 12, 8, "reqps"),
    panel(6, "Telemetry queue: size, dropped, overflow", "timeseries", [
        prom("sum(telemetry_queue_size)", "queue size", "A"),
        prom("sum by (reason) (rate(telemetry_dropped_total[5m]))", "dropped {{reason}}", "B"),
        prom("sum(rate(telemetry_queue_overflow_total[5m]))", "overflow", "C")], 12, 4, 12, 8),
    panel(7, "Commands", "timeseries", [
        prom("sum by (source) (rate(commands_published_total[5m]))", "published by {{source}}", "A"),
        prom("sum(rate(command_response_received_total[5m]))", "responses", "B"),
        prom("sum by (stage) (rate(commands_failed_total[5m]))", "failed ({{stage}})", "C"),
        prom("sum(rate(history_logger_command_timeouts_total[5m]))", "timeouts", "D")], 0, 12, 12, 8, "reqps"),
    panel(8, "Commands by status", "timeseries", [sql(
        "SELECT $__timeGroupAlias(created_at, '1m'), status AS metric, count(*) AS value FROM commands "
        "WHERE $__timeFilter(created_at) GROUP BY 1, 2 ORDER BY 1")], 12, 12, 12, 8),
    panel(9, "Zone processing time", "timeseries", [
        prom("histogram_quantile(0.5, sum by (le) (rate(zone_processing_time_seconds_bucket[5m])))", "p50", "A"),
        prom("histogram_quantile(0.95, sum by (le) (rate(zone_processing_time_seconds_bucket[5m])))", "p95", "B"),
        prom("max(optimal_concurrency_zones)", "concurrency", "C")], 0, 20, 12, 8, "s"),
    panel(10, "Zone processing errors", "timeseries", [
        prom("sum by (error_type) (rate(zone_processing_errors_total[5m]))", "{{error_type}}", "A"),
        prom("sum(rate(zone_checks_total[5m]))", "zones checked", "B")], 12, 20, 12, 8),
    panel(11, "pH per zone", "timeseries", [sql(zone_metric_sql("PH"))], 0, 28, 12, 9, "none"),
    panel(12, "EC per zone", "timeseries", [sql(zone_metric_sql("EC"))], 12, 28, 12, 9, "none"),
]

DASHBOARD = {
    "uid": "hydro-overview",
    "title": "hydro — overview",
    "tags": ["hydro"],
    "timezone": "browser",
    "schemaVersion": 38,
    "version": 1,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "editable": False,
    "panels": PANELS,
    "templating": {"list": []},
    "annotations": {"list": []},
}

if __name__ == "__main__":
    path = Path(__file__).with_name("dashboards") / "hydro-overview.json"
    path.write_text(json.dumps(DASHBOARD, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")
