"""How every service runs: settings, JSON logs, one event loop, HTTP servers, clean SIGTERM.

A service implements `Service`: `start()` brings it up (servers and loops as tasks),
`stop()` drains in-flight work and closes its connections. `run_service` does the rest and
exits 0 after SIGTERM or SIGINT.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .env import Settings, settings_or_exit
from .http_guard import GuardedApp, HttpLimits, internal_error, protocol_with_timeout, validation_error
from .lifecycle import Service, serve_until_signalled
from .logs import setup_logging
from .redis_client import REDIS_TRANSIENT

log = logging.getLogger("common.service")

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]
METRICS_EXAMPLE = '# HELP mqtt_connected 1 while the MQTT client is connected\n# TYPE mqtt_connected gauge\n' \
                  'mqtt_connected{client_id="hydro-registry"} 1.0\n'


def add_ops_routes(app: FastAPI, ready: ReadyCheck, metrics: bool = True) -> FastAPI:
    """/health (the process is alive), /ready (dependencies answer), /metrics (Prometheus)."""

    @app.get("/health", tags=["ops"], summary="The process is alive", responses=_example(200, {"status": "ok"}))
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], summary="Every dependency answers", responses={
        **_example(200, {"status": "ok", "data": {"db": "ok", "mqtt": "ok"}}),
        **_example(503, {"status": "unavailable", "data": {"db": "ok", "mqtt": "down"}}, "A dependency is down")})
    async def ready_endpoint() -> JSONResponse:
        checks = await ready()
        ok = all(checks.values())
        body = {"status": "ok" if ok else "unavailable", "data": {k: "ok" if v else "down" for k, v in checks.items()}}
        return JSONResponse(body, status_code=200 if ok else 503)

    if metrics:
        @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=PlainTextResponse,
                 responses=_example(200, METRICS_EXAMPLE, media="text/plain"))
        async def metrics_endpoint() -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _example(status: int, value: object, description: str = "OK", media: str = "application/json") -> dict:
    """An OpenAPI response with its example, for /docs."""
    return {status: {"description": description, "content": {media: {"example": value}}}}


def ops_app(ready: ReadyCheck, title: str) -> FastAPI:
    return add_ops_routes(FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None), ready)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: run_service owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """A uvicorn server running as a task on the service's event loop, behind common.http_guard's
    limits (body size, request read deadline, keep-alive, contained exceptions)."""

    def __init__(self, app: FastAPI, host: str, port: int, limits: HttpLimits | None = None):
        limits = limits or HttpLimits.from_env()
        if isinstance(app, FastAPI):
            if Exception not in app.exception_handlers:
                app.add_exception_handler(Exception, internal_error)  # JSON 500 (the guard keeps the connection)
            if app.exception_handlers.get(RequestValidationError) is request_validation_exception_handler:
                app.add_exception_handler(RequestValidationError, validation_error)  # 422 even for NaN inputs
        config = uvicorn.Config(GuardedApp(app, limits.max_body_bytes), host=host, port=port, log_config=None,
                                access_log=False, lifespan="off", http=protocol_with_timeout(limits.read_timeout_sec),
                                timeout_keep_alive=limits.keep_alive_sec)
        self.server = _QuietServer(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises why it could not start (port in use, ...)
                raise RuntimeError("HTTP server exited during start-up")
            await asyncio.sleep(0.02)

    async def _serve(self) -> None:
        # uvicorn calls sys.exit() when it cannot bind; a SystemExit escaping a task stops the whole
        # event loop, so it is turned into an ordinary error that start() raises.
        try:
            await self.server.serve()
        except SystemExit as exc:
            config = self.server.config
            raise RuntimeError(f"HTTP server could not start on {config.host}:{config.port} "
                               f"(exit code {exc.code}; port in use?)") from None

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None


async def ready_checks(db=None, mqtt=None, redis=None) -> dict[str, bool]:
    """The answer of every service's /ready: each connection it was given answers (Redis within 2 s)."""
    checks: dict[str, bool] = {}
    if db is not None:
        checks["db"] = await db.ping()
    if redis is not None:
        try:
            checks["redis"] = bool(await asyncio.wait_for(redis.ping(), 2))
        except (asyncio.TimeoutError, *REDIS_TRANSIENT):
            checks["redis"] = False
    if mqtt is not None:
        checks["mqtt"] = mqtt.connected
    return checks


def run_service(name: str, build: Callable[[Settings], Service], load: Callable[[], Settings] | None = None) -> int:
    """Entry point of every `main.py`: load settings, run, exit 0. A configuration error found while
    loading or building (a bad value, a missing production secret: each service's settings check
    the secrets it uses as they load) prints one line and exits 2, the same for every service."""
    settings = settings_or_exit(load) if load else settings_or_exit()
    setup_logging(name, settings.log_level)

    def run() -> None:
        asyncio.run(serve_until_signalled(build(settings)))
    settings_or_exit(run)
    return 0
