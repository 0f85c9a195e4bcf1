"""What the REST APIs Laravel calls (mqtt-bridge, device-registry) share: the bearer token check and
the success envelope `{"status": "ok", "data": …}`.

* No PY_API_TOKEN configured → 500 "Server misconfiguration: PY_API_TOKEN must be set for security"
  (the contract's answer: the API fails closed).
* Wrong or missing token → 401 "Unauthorized: invalid or missing token" with `WWW-Authenticate: Bearer`;
  the token is compared in constant time.
Each service's ASGI guard decides which paths are protected, and counts and answers the refusal.
"""
from __future__ import annotations

import hmac
from typing import Any, NamedTuple

import orjson
from starlette.responses import Response

NO_TOKEN = "Server misconfiguration: PY_API_TOKEN must be set for security"
UNAUTHORIZED = "Unauthorized: invalid or missing token"


class AuthRefusal(NamedTuple):
    status: int
    reason: str  # no_token_configured | unauthorized (the services' metric label)
    detail: str
    headers: tuple = ()


def bearer_refusal(scope: dict[str, Any], token: bytes) -> AuthRefusal | None:
    """None when the request's `Authorization: Bearer …` is `token`, else why it is refused."""
    if not token:
        return AuthRefusal(500, "no_token_configured", NO_TOKEN)
    given = b""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() == b"bearer":
                given = credentials.strip()
            break
    if not hmac.compare_digest(given, token):
        return AuthRefusal(401, "unauthorized", UNAUTHORIZED, ((b"www-authenticate", b"Bearer"),))
    return None


def ok(data: Any, status_code: int = 200) -> Response:
    """A success answer: `{"status":"ok","data":data}` (orjson: the rows' jsonb was decoded by orjson too)."""
    return Response(orjson.dumps({"status": "ok", "data": data}), status_code=status_code,
                    media_type="application/json")
