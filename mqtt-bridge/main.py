"""mqtt-bridge: the REST → MQTT gateway Laravel calls (contract §7.1).

One FastAPI app on BRIDGE_PORT (API, offline /docs /redoc /openapi.json, /health, /ready, /metrics), one MQTT client
(`-bridge`), one PostgreSQL pool, one Redis client. Every command goes through
common.commands.issue_command. Start-up does not wait for the broker or the database: /health
says what is down, requests answer 503 with Retry-After until it is back.
"""
from __future__ import annotations

import logging
import sys

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from common.command_catalogue import CommandError
from common.commands import CommandConflict, CommandPublishError
from common.db import PG_UNAVAILABLE, Database
from common.env import Settings, settings_or_exit
from common.http_docs import docs_app
from common.mqtt import MqttClient
from common.redis_client import CONFIG_CHANGED_CHANNEL, key, redis_client
from common.service import HttpServer, add_ops_routes, ready_checks, run_service
from common.topics import Topics

from api import Deps, build_router
from http_guard import PROTECTED_PREFIX, BridgeGuard
from publisher import ApiError, Publisher
from routines import Routines
from settings import ServiceSettings
from tasks import TaskRegistry

log = logging.getLogger("bridge")


class BridgeService:
    def __init__(self, settings: Settings, options: ServiceSettings):
        self.settings = settings
        self.options = options
        self.retry_after = {"Retry-After": str(options.retry_after_sec)}
        self.db = Database(settings)
        self.mqtt = MqttClient(settings, "-bridge")
        self.redis = redis_client(settings)
        self.publisher = Publisher(self.db, self.mqtt, Topics(settings.mqtt_topic_root))
        self.tasks = TaskRegistry(options.task_keep_sec, options.max_tasks)
        self.routines = Routines(self.db, self.publisher, options, self.tasks, instance=self.mqtt.client_id)
        self.deps = Deps(db=self.db, mqtt=self.mqtt, redis=self.redis,
                         config_channel=key(settings, CONFIG_CHANGED_CHANNEL), publisher=self.publisher,
                         routines=self.routines, tasks=self.tasks, retry_after=self.retry_after)
        self.app = create_app(self)
        self.http = HttpServer(self.app, settings.http_host, settings.bridge_port)

    async def checks(self) -> dict[str, bool]:
        return await ready_checks(db=self.db, mqtt=self.mqtt)

    async def start(self) -> None:
        await self.db.connect(wait=False)  # lazy: a database that is down now is a 503 per request, not a crash
        await self.mqtt.start()            # connects (and reconnects) in the background
        try:
            await self.http.start()
        except BaseException:
            await self._close_clients()
            raise
        self.routines.start()  # routines a previous run of this bridge left running are stopped
        log.info("bridge_listening", extra={"port": self.settings.bridge_port,
                                            "auth": bool(self.settings.py_api_token)})

    async def stop(self) -> None:
        self.routines.stopping.set()  # running routines stop their pumps while MQTT and the database are up
        await self.tasks.stop()
        await self.routines.close()
        await self.http.stop()
        await self._close_clients()

    async def _close_clients(self) -> None:
        await self.mqtt.stop()
        await self.redis.aclose()
        await self.db.close()


def create_app(service: BridgeService) -> FastAPI:
    app = docs_app(title="hydro mqtt-bridge", version="2.0",
                   description="REST → MQTT gateway: node commands, NodeConfig publishing, zone water routines. "
                               "Every /bridge route needs the bearer token.",
                   protected=lambda path: path.startswith(PROTECTED_PREFIX))
    app.include_router(build_router(service.deps))
    retry = service.retry_after

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)

    @app.exception_handler(CommandError)
    async def command_error(request: Request, exc: CommandError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 422)

    @app.exception_handler(CommandConflict)
    async def command_conflict(request: Request, exc: CommandConflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 409)

    @app.exception_handler(CommandPublishError)
    async def publish_error(request: Request, exc: CommandPublishError) -> JSONResponse:
        log.warning("command_not_published", extra={"path": request.url.path, "error": str(exc)})
        return JSONResponse({"detail": str(exc)}, 503, headers=retry)

    async def db_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The cause (with the server's address) goes to the log only, never to the client.
        log.warning("db_unavailable", extra={"path": request.url.path, "error": repr(exc)})
        return JSONResponse({"detail": "database unavailable, retry later"}, 503, headers=retry)

    for kind in PG_UNAVAILABLE:
        app.add_exception_handler(kind, db_unavailable)

    add_ops_routes(app, service.checks)
    # Contract §7.1 [DECISION]: /health reports MQTT and the database (503 when either is down).
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]

    @app.get("/health", tags=["ops"], summary="MQTT and the database answer", responses={
        200: {"content": {"application/json": {"example": {"status": "ok", "data": {"mqtt": "ok", "db": "ok"}}}}},
        503: {"content": {"application/json": {"example": {"status": "unavailable",
                                                           "data": {"mqtt": "down", "db": "ok"}}}}}})
    async def health() -> JSONResponse:
        """MQTT connected and database answering; no token needed."""
        checks = await service.checks()
        healthy = all(checks.values())
        return JSONResponse({"status": "ok" if healthy else "unavailable",
                             "data": {k: "ok" if v else "down" for k, v in checks.items()}}, 200 if healthy else 503)

    app.add_middleware(BridgeGuard, router=app.router, token=service.settings.py_api_token,
                       max_body_bytes=service.options.max_body_bytes)
    return app


def build(settings: Settings, options: ServiceSettings | None = None) -> BridgeService:
    options = options or settings_or_exit(lambda: ServiceSettings.from_env(settings))
    return BridgeService(settings, options)


if __name__ == "__main__":
    sys.exit(run_service("mqtt-bridge", build))
