"""One ASGI middleware in front of every route of the registry.

Behind common.http_guard (HTTP_MAX_BODY_BYTES: an oversized body is refused before it is read). Order:
the bearer token is checked (common.http_api) before anything of the request is read (except /health,
/ready, /metrics and the docs pages); then the path and query are checked for control characters; then the body, when there
is one, is parsed and checked (common.schemas.json_problem_at) before any route sees it. Every refusal is counted by reason in
`registry_http_refused_total` and logged once per reason per minute; every answer is counted by route
and status in `registry_http_requests_total`.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl

import orjson

from common.http_api import bearer_refusal
from common.http_docs import is_docs_path
from common.http_guard import NotingSend, replay
from common.schemas import json_problem_at
import metrics
from refusal_log import RefusalLog

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

OPS_PATHS = frozenset({"/health", "/ready", "/metrics"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

log = logging.getLogger("device_registry.http")
_REFUSALS = RefusalLog(log)


class Refusal(Exception):
    def __init__(self, status: int, reason: str, detail: str, field: str | None = None, headers: tuple = ()):
        super().__init__(detail)
        self.status, self.reason, self.detail, self.field, self.headers = status, reason, detail, field, headers


class RegistryGuard:
    def __init__(self, app, *, token: str):
        self.app = app
        self.token = token.encode() if token else b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send_and_note = NotingSend(send)
        try:
            if scope["path"] not in OPS_PATHS and not is_docs_path(scope["path"]):
                try:
                    self._check_token(scope)
                    self._check_target(scope)
                    if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
                        receive = await self._checked_body(scope, receive)
                except Refusal as refusal:
                    await self.refuse(send_and_note, refusal, scope)
                    return
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            metrics.REQUESTS.labels(getattr(route, "path", None) or "unrouted",
                                    str(send_and_note.status or 500)).inc()

    async def refuse(self, send: Send, refusal: Refusal, scope: Scope) -> None:
        count_refusal(refusal.reason, scope, refusal.detail)
        body: dict[str, Any] = {"detail": refusal.detail}
        if refusal.field:
            body["field"] = refusal.field
        data = orjson.dumps(body)
        await send({"type": "http.response.start", "status": refusal.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *refusal.headers]})
        await send({"type": "http.response.body", "body": data})

    def _check_token(self, scope: Scope) -> None:
        refusal = bearer_refusal(scope, self.token)
        if refusal is not None:
            raise Refusal(refusal.status, refusal.reason, refusal.detail, headers=refusal.headers)

    @staticmethod
    def _check_target(scope: Scope) -> None:
        if _CONTROL.search(scope["path"]):
            raise Refusal(422, "invalid_path", "path: contains a control character", "path")
        try:
            query = parse_qsl(scope.get("query_string", b"").decode("utf-8"), keep_blank_values=True,
                              errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise Refusal(400, "invalid_query", "query: not UTF-8", "query") from None
        for name, value in query:
            if _CONTROL.search(name) or _CONTROL.search(value):
                field = f"query.{_CONTROL.sub('?', name)[:64]}"
                raise Refusal(422, "invalid_query", f"{field}: contains a control character", field)

    async def _checked_body(self, scope: Scope, receive: Receive) -> Receive:
        """The whole body (its size already bounded by common.http_guard), parsed and checked, handed on
        in one message."""
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return replay(message, receive)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body.strip():
            try:
                problem = json_problem_at(orjson.loads(body))
            except orjson.JSONDecodeError as exc:
                raise Refusal(400, "invalid_json", f"body: not valid JSON ({exc})"[:300], "body") from None
            if problem is not None:
                path, text = problem
                field = ".".join(["body", *map(str, path)])[:200]
                raise Refusal(422, "invalid_value", f"{field}: {text}", field)
        return replay({"type": "http.request", "body": body, "more_body": False}, receive)


def count_refusal(reason: str, scope: Scope, detail: str) -> None:
    metrics.REFUSED.labels(reason).inc()
    _REFUSALS.warning(reason, "http_request_refused", method=scope.get("method"), path=str(scope.get("path"))[:200],
                     detail=detail[:300])
