"""Interactive REST docs that work on a greenhouse network without internet.

Swagger UI (/docs), ReDoc (/redoc) and the OpenAPI document (/openapi.json) are served with the
scripts and stylesheet bundled in the `fastapi-offline` package (under /static-offline-docs/),
never from a CDN. These pages are public; the calls made from them carry the bearer token the
operator enters with the page's Authorize button, because the OpenAPI document declares an HTTP
bearer scheme on every protected operation. The declaration only describes the API: each service
keeps checking the token its own way.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OPENAPI_URL = "/openapi.json"
STATIC_URL = "/static-offline-docs"
PUBLIC_PATHS = frozenset({DOCS_URL, f"{DOCS_URL}/oauth2-redirect", REDOC_URL, OPENAPI_URL})
REDOC_CSP = "img-src 'self' data:"
BEARER_SCHEME = "bearerAuth"
TOKEN_HELP = ("Send `Authorization: Bearer <PY_API_TOKEN>` (`make dev` prints it: `dev-token` unless set). "
              "In /docs: **Authorize**, paste the token, then **Try it out** on a route.")


def is_docs_path(path: str) -> bool:
    """A path of the docs pages or their assets: answered without a token."""
    return path in PUBLIC_PATHS or path.startswith(f"{STATIC_URL}/")


def docs_app(*, title: str, version: str, description: str, protected: Callable[[str], bool],
             tags: Sequence[str] = ()) -> FastAPI:
    """A FastAPI app with offline /docs, /redoc, /openapi.json; `protected(path)` marks the routes
    that need the bearer token in the OpenAPI document; `tags` orders the pages' sections."""
    app = FastAPIOffline(title=title, version=version, description=f"{description}\n\n{TOKEN_HELP}",
                         openapi_tags=[{"name": tag} for tag in tags] or None,
                         docs_url=DOCS_URL, redoc_url=None, openapi_url=OPENAPI_URL, static_url=STATIC_URL)

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        page = get_redoc_html(openapi_url=OPENAPI_URL, title=f"{title} - ReDoc", with_google_fonts=False,
                              redoc_js_url=f"{STATIC_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{STATIC_URL}/favicon.png")
        # ReDoc always shows its maker's logo from the internet: images come from this service only, so
        # the browser never tries to leave an offline network for it.
        page.headers["Content-Security-Policy"] = REDOC_CSP
        return page

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # built once and cached by FastAPI; the additions below are idempotent
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER_SCHEME] = {
            "type": "http", "scheme": "bearer", "description": "PY_API_TOKEN"}
        for path, operations in schema.get("paths", {}).items():
            if protected(path):
                for operation in operations.values():
                    operation["security"] = [{BEARER_SCHEME: []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
