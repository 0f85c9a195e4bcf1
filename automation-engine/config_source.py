"""Where zones' greenhouses come from: Laravel config/full, else the database, else the last
good configuration (contract §7.3). Targets and phases are never taken from here (§8.1, §8.2).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import httpx

import metrics as m
from common.db import Database
from common.env import Settings

log = logging.getLogger("automation.config")

SOURCES = ("laravel", "db", "last_good", "none")


@dataclass(frozen=True)
class GreenhouseInfo:
    uid: str
    timezone: str | None


@dataclass
class ConfigSnapshot:
    zones: dict[int, GreenhouseInfo] = field(default_factory=dict)  # zone id → its greenhouse
    source: str = "none"
    loaded_at: float = 0.0  # monotonic time of the load that produced it

    def age(self) -> float:
        return time.monotonic() - self.loaded_at if self.loaded_at else 0.0


class ConfigError(ValueError):
    pass


def parse_full_config(body: object) -> dict[int, GreenhouseInfo]:
    """`data.greenhouses[].zones[]` → zone id → greenhouse (uid, timezone). Raises ConfigError on garbage."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise ConfigError("response has no data object")
    greenhouses = body["data"].get("greenhouses")
    if not isinstance(greenhouses, list):
        raise ConfigError("data.greenhouses is not a list")
    zones: dict[int, GreenhouseInfo] = {}
    for gh in greenhouses:
        if not isinstance(gh, dict) or not isinstance(gh.get("uid"), str) or not gh["uid"]:
            raise ConfigError("a greenhouse has no uid")
        tz = gh.get("timezone") if isinstance(gh.get("timezone"), str) else None
        for zone in gh.get("zones") or []:
            zone_id = zone.get("id") if isinstance(zone, dict) else None
            if isinstance(zone_id, bool) or not isinstance(zone_id, int):
                raise ConfigError("a zone has no integer id")
            zones[zone_id] = GreenhouseInfo(gh["uid"], tz)
    return zones


class ConfigLoader:
    def __init__(self, settings: Settings, db: Database, client: httpx.AsyncClient | None = None):
        self.settings = settings
        self.db = db
        self.client = client
        self.last_good = ConfigSnapshot()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def _from_laravel(self) -> dict[int, GreenhouseInfo]:
        s = self.settings
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(s.laravel_http_timeout_sec))
        headers = {"Accept": "application/json"}
        if s.laravel_api_token:
            headers["Authorization"] = f"Bearer {s.laravel_api_token}"
        started = time.monotonic()
        outcome = "error"
        try:
            response = await self.client.get(f"{s.laravel_api_url}/api/system/config/full", headers=headers)
            if response.status_code != 200:
                raise ConfigError(f"HTTP {response.status_code}")
            try:
                body = response.json()
            except ValueError:
                raise ConfigError("response is not JSON") from None
            zones = parse_full_config(body)
            outcome = "ok"
            return zones
        finally:
            m.LARAVEL_REQUEST.labels(outcome).observe(time.monotonic() - started)

    async def _from_db(self) -> dict[int, GreenhouseInfo]:
        rows = await self.db.fetch(
            "SELECT z.id, g.uid, g.timezone FROM zones z JOIN greenhouses g ON g.id = z.greenhouse_id")
        return {r["id"]: GreenhouseInfo(r["uid"], r["timezone"]) for r in rows}

    async def load(self) -> ConfigSnapshot:
        """Laravel when configured and answering sensibly, else the database, else the last good one."""
        if self.settings.laravel_api_url:
            try:
                zones = await self._from_laravel()
                return self._accept(zones, "laravel")
            except (httpx.HTTPError, ConfigError) as exc:
                m.CONFIG_LOADS.labels("laravel", "failed").inc()
                log.warning("config_laravel_failed", extra={"error": str(exc) or type(exc).__name__})
        try:
            zones = await self._from_db()
            return self._accept(zones, "db")
        except Exception as exc:  # noqa: BLE001 - any DB failure: keep the last good configuration
            m.CONFIG_LOADS.labels("db", "failed").inc()
            log.warning("config_db_failed", extra={"error": str(exc)})
        snapshot = ConfigSnapshot(self.last_good.zones, "last_good" if self.last_good.loaded_at else "none",
                                  self.last_good.loaded_at)
        self._publish(snapshot)
        return snapshot

    def _accept(self, zones: dict[int, GreenhouseInfo], source: str) -> ConfigSnapshot:
        m.CONFIG_LOADS.labels(source, "ok").inc()
        self.last_good = ConfigSnapshot(zones, source, time.monotonic())
        self._publish(self.last_good)
        return self.last_good

    @staticmethod
    def _publish(snapshot: ConfigSnapshot) -> None:
        for name in SOURCES:
            m.CONFIG_SOURCE.labels(name).set(1 if name == snapshot.source else 0)
        m.CONFIG_AGE.set(snapshot.age())
