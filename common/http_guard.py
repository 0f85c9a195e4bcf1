"""Limits every HTTP server of ours applies before an app sees a request (common.service.HttpServer).

* Body larger than HTTP_MAX_BODY_BYTES (default 1 MiB; /ingest/telemetry is the largest body any
  service takes) → 413 `{"detail": "request body is larger than N bytes"}`, decided from
  Content-Length before a byte is read, or while reading a chunked body (never more is buffered).
* A request not fully received within HTTP_READ_TIMEOUT_SEC of its first byte (or a connection
  that sends nothing) → 408 and the connection is closed; uvicorn itself has no such deadline.
* An idle keep-alive connection is closed after HTTP_KEEP_ALIVE_SEC (uvicorn's timeout_keep_alive).
* An exception escaping the app → 500 `{"detail": "internal error"}` (logged with its traceback)
  on a connection that stays open: uvicorn closes the connection when an app raises.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

import orjson
from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .env import EnvReader

log = logging.getLogger("common.http")

REFUSED = Counter("http_guard_refused_total", "HTTP requests refused or cut by the server's limits",
                  ["reason"])  # body_too_large | read_timeout | internal_error

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 1_048_576
    read_timeout_sec: float = 15.0
    keep_alive_sec: int = 5

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "HttpLimits":
        env = EnvReader(environ)
        return cls(max_body_bytes=env.int("HTTP_MAX_BODY_BYTES", 1_048_576, 1024, 256 * 1024 * 1024),
                   read_timeout_sec=env.float("HTTP_READ_TIMEOUT_SEC", 15.0, 0.1, 3600),
                   keep_alive_sec=env.int("HTTP_KEEP_ALIVE_SEC", 5, 1, 3600))


class BodyTooLarge(Exception):
    pass


class NotingSend:
    """An ASGI `send` that remembers the status of the response it started (None until then)."""

    def __init__(self, send: Send):
        self.send = send
        self.status: int | None = None

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


class GuardedApp:
    """ASGI wrapper: body limit and exception containment (module docstring)."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body = max_body_bytes

    async def _buffered(self, receive: Receive) -> Receive:
        first, fitted = await _read_all(receive, self.max_body)
        if not fitted:
            raise BodyTooLarge
        return replay(first, receive)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_body:
            REFUSED.labels("body_too_large").inc()
            await send_json(send, 413, {"detail": f"request body is larger than {self.max_body} bytes"})
            return
        if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            try:  # chunked: read it here, up to the limit, and hand it on in one message
                receive = await self._buffered(receive)
            except BodyTooLarge:
                REFUSED.labels("body_too_large").inc()
                await send_json(send, 413, {"detail": f"request body is larger than {self.max_body} bytes"})
                return
        noting = NotingSend(send)
        try:
            await self.app(scope, receive, noting)
        except Exception:  # noqa: BLE001 - contained here so the client's connection stays usable
            REFUSED.labels("internal_error").inc()
            log.exception("http_internal_error", extra={"path": scope.get("path", "")[:200]})
            if noting.status is None:
                await send_json(send, 500, {"detail": "internal error"})


async def _read_all(receive: Receive, limit: int) -> tuple[dict, bool]:
    """The body's messages joined into one (at most `limit` bytes) and whether it fitted."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return message, True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return message, False
        chunks.append(chunk)
        if not message.get("more_body", False):
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}, True


async def validation_error(request, exc):
    """FastAPI's 422 `{"detail":[{loc,msg,type,input}]}`, always valid JSON: FastAPI's own handler
    fails with a 500 when the refused input is NaN or Infinity (which the json module parses)."""
    from starlette.responses import Response
    errors = [{k: _echoable(v) for k, v in e.items() if k in ("loc", "msg", "type", "input")} for e in exc.errors()]
    return Response(orjson.dumps({"detail": errors}, default=str), 422, media_type="application/json")


def _echoable(value: Any, depth: int = 0) -> Any:
    """`value` as orjson can write it: integers beyond 64 bits as text, deep structures cut short."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -2**63 <= value < 2**64 else str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")  # lone surrogates become "?"
    if depth > 16:
        return "…"
    if isinstance(value, dict):
        return {_echoable(str(k)): _echoable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_echoable(v, depth + 1) for v in value]
    return value


async def internal_error(request, exc: Exception):
    """FastAPI's last-resort handler as JSON; the exception still reaches GuardedApp to be logged."""
    from starlette.responses import JSONResponse
    return JSONResponse({"detail": "internal error"}, 500)


def replay(first: dict, receive: Receive) -> Receive:
    """A receive that hands out `first` (a body already read) once, then the client's own."""
    delivered = False

    async def next_message() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return first
        return await receive()
    return next_message


def declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def send_json(send: Send, status: int, body: Any, headers: tuple = ()) -> None:
    data = orjson.dumps(body, default=str)  # NaN / Infinity become null: the body is always valid JSON
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for receiving each request: armed when the
    connection opens and when a request's first byte arrives, disarmed once it is complete."""

    read_timeout_sec = 15.0
    _read_timer = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_read_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_read_timer()

    def on_message_complete(self) -> None:
        self._disarm_read_timer()
        super().on_message_complete()

    def _arm_read_timer(self) -> None:
        self._disarm_read_timer()
        self._read_timer = self.loop.call_later(self.read_timeout_sec, self._read_timed_out)

    def _disarm_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        REFUSED.labels("read_timeout").inc()
        if self.cycle is None or not self.cycle.response_started:
            body = b'{"detail":"request not received in time"}'
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
                                 + body)
        self.transport.close()


def protocol_with_timeout(read_timeout_sec: float) -> type[TimedHttpToolsProtocol]:
    return type("TimedHttpToolsProtocol", (TimedHttpToolsProtocol,), {"read_timeout_sec": read_timeout_sec})
