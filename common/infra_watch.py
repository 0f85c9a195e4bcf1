"""Infra alerts a service writes about its own connections (contract §8.7: `MQTT_DOWN`, `DB_UNREACHABLE`).

* `MQTT_DOWN` — the broker connection has been down for `after_sec`: the alert is opened (the database
  is usually still reachable) and resolved once the client is connected again. One per service
  replica (`details.service`, `details.client_id`).
* `DB_UNREACHABLE` — nothing can be written to a database nobody reaches, so the outage is recorded
  after the fact: once the database answers again after `after_sec` or more, one alert row is written
  already RESOLVED, `created_at` at the outage's start, `resolved_at` at its end, the span in details.
  Paging while it lasts is Prometheus' job (gauge `db_reachable`, rule `DatabaseUnreachable`).

`ConnectionWatch.run()` checks every `every_sec`; `check()` is one observation.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Callable

from . import metrics
from .alerts import alert_code, ensure_alert, resolve_alerts
from .db import Database
from .mqtt import MqttClient

log = logging.getLogger("common.infra_watch")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class ConnectionWatch:
    def __init__(self, service: str, db: Database, mqtt: MqttClient | None, *, after_sec: float = 60.0,
                 every_sec: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.service = service
        self.db = db
        self.mqtt = mqtt
        self.after_sec = after_sec
        self.every_sec = every_sec
        self.clock = clock
        self.db_down: tuple[float, dt.datetime] | None = None    # (monotonic, UTC) when first seen down
        self.mqtt_down: tuple[float, dt.datetime] | None = None
        self.mqtt_alert_maybe_open = True  # a previous process may have left it open: resolve on the first check

    @property
    def match(self) -> dict[str, str]:
        return {"service": self.service, "client_id": self.mqtt.client_id if self.mqtt else ""}

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - watching must outlive whatever it watches
                log.exception("connection_watch_failed")
            await asyncio.sleep(self.every_sec)

    async def check(self) -> None:
        now, wall = self.clock(), _utcnow()
        reachable = await self.db.ping()
        metrics.DB_REACHABLE.set(1 if reachable else 0)
        if not reachable:
            if self.db_down is None:
                self.db_down = (now, wall)
                log.warning("db_unreachable", extra={"service": self.service})
            return  # nowhere to write anything to
        if self.db_down is not None:
            (since, since_wall), self.db_down = self.db_down, None
            if now - since >= self.after_sec:
                await self._record_db_outage(since_wall, wall, now - since)
        if self.mqtt is not None:
            await self._check_mqtt(now, wall)

    async def _record_db_outage(self, since: dt.datetime, until: dt.datetime, seconds: float) -> None:
        details = {"service": self.service, "down_since": since.isoformat(), "down_until": until.isoformat(),
                   "down_sec": round(seconds, 1),
                   "message": f"{self.service} could not reach the database for {seconds:.0f} s"}
        await self.db.execute(
            "INSERT INTO alerts (zone_id, source, code, type, details, status, created_at, resolved_at)"
            " VALUES (NULL, 'infra', $1, 'DB_UNREACHABLE', $2, 'RESOLVED', $3, now())",
            alert_code("DB_UNREACHABLE"), details, since)
        log.warning("db_outage_recorded", extra={"service": self.service, "down_sec": round(seconds, 1)})

    async def _check_mqtt(self, now: float, wall: dt.datetime) -> None:
        if self.mqtt.connected:
            if self.mqtt_down is not None or self.mqtt_alert_maybe_open:
                async with self.db.pool.acquire() as conn:
                    await resolve_alerts(conn, zone_id=None, alert_type="MQTT_DOWN", match=self.match)
            self.mqtt_down, self.mqtt_alert_maybe_open = None, False
            return
        if self.mqtt_down is None:
            self.mqtt_down = (now, wall)
        since, since_wall = self.mqtt_down
        if now - since >= self.after_sec:
            details = {**self.match, "down_since": since_wall.isoformat(), "down_sec": round(now - since, 1),
                       "message": f"{self.service} has not been connected to the MQTT broker for {now - since:.0f} s"}
            async with self.db.pool.acquire() as conn:
                await ensure_alert(conn, zone_id=None, alert_type="MQTT_DOWN", details=details, match=self.match)
            self.mqtt_alert_maybe_open = True
