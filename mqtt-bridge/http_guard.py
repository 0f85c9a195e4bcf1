"""One ASGI middleware in front of every route: auth and body size for /bridge/*, metrics for all.

Order (contract §7.1 [DECISION]: auth first): the bearer token is checked before anything of the
body is read, then the body is read up to the size limit, then the route validates it.

* No PY_API_TOKEN configured → 500, wrong or missing token → 401 (common.http_api.bearer_refusal;
  the bridge fails closed, nothing under /bridge/ runs).
* Body larger than BRIDGE_MAX_BODY_BYTES → 413, decided from Content-Length or while reading
  (never more than the limit is buffered).
* A body that is not JSON every part of the system can carry → 422 naming the field, before any
  route: invalid JSON or UTF-8, NaN / Infinity, nesting deeper than 32 levels, NUL characters,
  integers outside 64 bits (common.schemas.json_problem_at). Nothing reaches a command batch that
  PostgreSQL or orjson would refuse.
"""
from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable

import orjson
from starlette.routing import Router

from common.http_api import bearer_refusal
from common.http_guard import NotingSend, replay, send_json
from common.schemas import json_problem_at

import metrics

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

PROTECTED_PREFIX = "/bridge/"


class BodyTooLarge(Exception):
    pass


class BridgeGuard:
    def __init__(self, app, *, router: Router, token: str, max_body_bytes: int):
        self.app = app
        self.router = router
        self.token = token.encode() if token else b""
        self.max_body = max_body_bytes
        self._templates: list | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        send_and_note = NotingSend(send)
        try:
            if scope["path"].startswith(PROTECTED_PREFIX):
                refusal = self._auth_refusal(scope)
                if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                    try:
                        receive, body = await self._buffered(scope, receive)
                    except BodyTooLarge:
                        metrics.REJECTED.labels("body_too_large").inc()
                        refusal = (413, f"request body is larger than {self.max_body} bytes", ())
                    else:
                        refusal = _unsafe_json(body)
                if refusal is not None:
                    code, detail, headers = refusal
                    await send_json(send_and_note, code, {"detail": detail}, headers)
                    return
            await self.app(scope, receive, send_and_note)
        finally:
            path = self._template(scope)
            metrics.REQUESTS.labels(path, str(send_and_note.status or 500)).inc()
            metrics.LATENCY.labels(path).observe(time.perf_counter() - started)

    def _auth_refusal(self, scope: Scope) -> tuple[int, str, tuple] | None:
        refusal = bearer_refusal(scope, self.token)
        if refusal is None:
            return None
        metrics.REJECTED.labels(refusal.reason).inc()
        return refusal.status, refusal.detail, refusal.headers

    async def _buffered(self, scope: Scope, receive: Receive) -> tuple[Receive, bytes]:
        """Read the whole body (at most max_body bytes) and hand it on in one message."""
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > self.max_body:
                        raise BodyTooLarge
                except ValueError:
                    pass
                break
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away: let the app see it
                first = message
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLarge
            chunks.append(chunk)
            more = message.get("more_body", False)
        else:
            first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return replay(first, receive), first.get("body", b"")

    def _template(self, scope: Scope) -> str:
        """The route template of the request (bounded label values), resolved by the router when it ran."""
        route = scope.get("route")
        if route is not None:
            return getattr(route, "path", None) or "unmatched"
        if self._templates is None:  # refused before routing: match the path against the route templates
            self._templates = [(r.path_regex, r.path) for r in _leaf_routes(self.router.routes)]
        for regex, template in self._templates:
            if regex.match(scope["path"]):
                return template
        return "unmatched"


def _leaf_routes(routes):
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI keeps an included router as one entry
        if inner is not None:
            yield from _leaf_routes(inner.routes)
        elif getattr(route, "path_regex", None) is not None and getattr(route, "path", None):
            yield route


def _unsafe_json(body: bytes) -> tuple[int, list, tuple] | None:
    """A 422 in FastAPI's shape for a body no part of the system could carry, else None."""
    if not body.strip():
        return None  # an empty body is the route's to judge (missing fields)
    try:
        data = orjson.loads(body)  # stricter than the json module: no NaN / Infinity, valid UTF-8
    except orjson.JSONDecodeError as exc:
        try:  # the json module reads NaN, Infinity and integers of any size: find the field to name
            data = json.loads(body, parse_constant=float)
        except (ValueError, RecursionError):
            metrics.REJECTED.labels("invalid_json").inc()
            return 422, [{"loc": ["body"], "msg": f"invalid JSON: {str(exc)[:200]}", "type": "json_invalid"}], ()
    found = json_problem_at(data)
    if found is None:
        return None
    metrics.REJECTED.labels("unsafe_json").inc()
    path, message = found
    return 422, [{"loc": ["body", *path], "msg": message, "type": "value_error"}], ()
