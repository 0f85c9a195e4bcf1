"""Alerts and zone events shared by every service (contract §8.7, §8.8).

One ACTIVE alert per (zone, type) — or per (zone, type, `match` keys of details), e.g. one
NODE_OFFLINE per node. `type` always holds the machine code; prose goes in details.message.
Creating writes ALERT_CREATED, resolving writes ALERT_RESOLVED (zone alerts only).
"""
from __future__ import annotations

from typing import Any

import asyncpg
import orjson

ALERT_CODES = {
    "PH_HIGH": "biz_high_ph", "PH_LOW": "biz_low_ph",
    "EC_HIGH": "biz_high_ec", "EC_LOW": "biz_low_ec",
    "TEMP_HIGH": "biz_high_temp", "TEMP_LOW": "biz_low_temp",
    "HUMIDITY_HIGH": "biz_high_humidity", "HUMIDITY_LOW": "biz_low_humidity",
    "WATER_LEVEL_LOW": "biz_dry_run", "DRY_RUN": "biz_dry_run",
    "NO_FLOW": "biz_no_flow", "PUMP_STUCK_ON": "biz_pump_stuck_on",
    "OVERCURRENT": "biz_overcurrent", "LIGHT_FAILURE": "biz_light_failure",
    "NODE_OFFLINE": "biz_node_offline", "CONFIG_ERROR": "biz_config_error",
    "MQTT_DOWN": "infra_mqtt_down", "DB_UNREACHABLE": "infra_db_unreachable", "SERVICE_DOWN": "infra_service_down",
}
INFRA_TYPES = {"MQTT_DOWN", "DB_UNREACHABLE", "SERVICE_DOWN"}


def alert_code(alert_type: str) -> str:
    return ALERT_CODES.get(alert_type, "biz_config_error")  # contract §8.7: the fallback code


async def add_zone_event(conn: asyncpg.Connection, zone_id: int, event_type: str,
                         details: dict[str, Any] | None = None) -> None:
    await conn.execute(
        "INSERT INTO zone_events (zone_id, type, details, created_at) VALUES ($1, $2, $3, now())",
        zone_id, event_type, details or {})


# Many zone events in one statement, in the order given: $1 zone ids, $2 types, $3 details as JSON text.
ZONE_EVENTS_INSERT = """
INSERT INTO zone_events (zone_id, type, details, created_at)
SELECT e.zone_id, e.type, e.details::jsonb, now()
  FROM unnest($1::bigint[], $2::text[], $3::text[]) WITH ORDINALITY e(zone_id, type, details, n) ORDER BY e.n"""


async def add_zone_events(conn: asyncpg.Connection, events: list[tuple[int, str, dict[str, Any]]]) -> None:
    if events:
        await conn.execute(ZONE_EVENTS_INSERT, [e[0] for e in events], [e[1] for e in events],
                           [orjson.dumps(e[2]).decode() for e in events])


async def ensure_alert(conn: asyncpg.Connection, *, zone_id: int | None, alert_type: str,
                       details: dict[str, Any], match: dict[str, Any] | None = None,
                       source: str | None = None) -> tuple[int, bool]:
    """Open the alert, or refresh the details of the one already ACTIVE. Returns (id, created)."""
    source = source or ("infra" if alert_type in INFRA_TYPES else "biz")
    async with conn.transaction():
        # Serialise ensure/resolve of one (zone, type) so two writers never open it twice.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"alert:{zone_id}:{alert_type}")
        existing = await conn.fetchval(
            "SELECT id FROM alerts WHERE zone_id IS NOT DISTINCT FROM $1 AND type = $2 AND status = 'ACTIVE'"
            " AND details @> $3 ORDER BY id LIMIT 1", zone_id, alert_type, match or {})
        if existing is not None:
            await conn.execute("UPDATE alerts SET details = $2 WHERE id = $1", existing, details)
            return existing, False
        alert_id = await conn.fetchval(
            "INSERT INTO alerts (zone_id, source, code, type, details, status, created_at)"
            " VALUES ($1, $2, $3, $4, $5, 'ACTIVE', now()) RETURNING id",
            zone_id, source, alert_code(alert_type), alert_type, details)
        if zone_id is not None:
            await add_zone_event(conn, zone_id, "ALERT_CREATED", {"alert_id": alert_id, "alert_type": alert_type,
                                                                  "details": details})
        return alert_id, True


async def resolve_alerts(conn: asyncpg.Connection, *, zone_id: int | None, alert_type: str,
                         match: dict[str, Any] | None = None) -> list[int]:
    """Resolve the ACTIVE alerts of (zone, type[, match]); returns their ids."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"alert:{zone_id}:{alert_type}")
        ids = [r["id"] for r in await conn.fetch(
            "UPDATE alerts SET status = 'RESOLVED', resolved_at = now()"
            " WHERE zone_id IS NOT DISTINCT FROM $1 AND type = $2 AND status = 'ACTIVE' AND details @> $3"
            " RETURNING id", zone_id, alert_type, match or {})]
        if zone_id is not None:
            for alert_id in ids:
                await add_zone_event(conn, zone_id, "ALERT_RESOLVED", {"alert_id": alert_id, "alert_type": alert_type})
        return ids
