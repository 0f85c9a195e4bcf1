"""REST API of the registry (FastAPI). Every route except /health, /ready and /metrics needs
`Authorization: Bearer {PY_API_TOKEN}`, checked (constant time) before anything else; with no
PY_API_TOKEN configured those routes refuse every request (fail closed).
Answers: `{"status": "ok", "data": …}`; errors `{"detail": "<message>"}`.
"""
from __future__ import annotations

from typing import Annotated, Any, Awaitable, Callable

from fastapi import Body, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from common.db import Database
from common.http_api import ok
from common.http_docs import docs_app
from common.nodeconfig import ConfigError, NodeConfigFailure, PublishResult
from common.schemas import BIGINT_MAX
from common.service import add_ops_routes
from delivery import ConfigDelivery, config_state
from http_guard import OPS_PATHS, RegistryGuard, count_refusal
import examples as ex
import nodes

# Control characters in the uid are refused by the guard before any route.
Uid = Annotated[str, Path(description="nodes.uid", examples=[ex.UID], min_length=1, max_length=128)]


def publish_data(result: PublishResult) -> dict[str, Any]:
    return {"published": result.published, "topic": result.topic, "version": result.version,
            "changed": result.changed, "config_hash": result.config_hash, "error": result.error}


def build_app(db: Database, delivery: ConfigDelivery, token: str,
              ready: Callable[[], Awaitable[dict[str, bool]]]) -> FastAPI:
    app = docs_app(title="hydro device-registry", version="2.0", protected=lambda path: path not in OPS_PATHS,
                   description="Node registration, zone assignment, versioned NodeConfigs and their delivery.",
                   tags=("nodes", "configs", "ops"))
    add_ops_routes(app, ready)

    app.add_middleware(RegistryGuard, token=token)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming the first field that is wrong (never echoing the input back)."""
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())) or "request"
        detail = f"{field}: {first.get('msg', 'invalid')}"[:500]
        count_refusal("validation", request.scope, detail)
        return JSONResponse({"detail": detail, "field": field[:200]}, status_code=422)

    @app.exception_handler(NodeConfigFailure)
    async def config_failure(request: Request, exc: NodeConfigFailure) -> JSONResponse:
        body: dict[str, Any] = {"detail": str(exc)}
        if isinstance(exc, ConfigError):
            body["field"] = exc.field
        if exc.status_code in (400, 422):  # the request cannot be carried out as sent
            count_refusal(f"config_{exc.reason}", request.scope, str(exc))
        return JSONResponse(body, status_code=exc.status_code)

    async def node_or_404(uid: str) -> dict[str, Any]:
        node = await nodes.get_node(db, uid)
        if node is None:
            raise HTTPException(404, f"node {uid!r} not found")
        return node

    @app.get("/nodes", tags=["nodes"], summary="List nodes", responses=ex.responses(ex.LIST_OK, 422))
    async def list_nodes(zone_id: int | None = Query(None, ge=1, le=BIGINT_MAX),
                         status: str | None = Query(None, max_length=64),
                         lifecycle_state: str | None = Query(None, max_length=32),
                         limit: int = Query(500, ge=1, le=5000),
                         offset: int = Query(0, ge=0, le=BIGINT_MAX)) -> Response:
        return ok(await nodes.list_nodes(db, zone_id=zone_id, status=status, lifecycle_state=lifecycle_state,
                                         limit=limit, offset=offset))

    @app.get("/nodes/{uid}", tags=["nodes"], summary="A node", responses=ex.responses(ex.NODE_OK, 404, 422))
    async def get_node(uid: Uid) -> Response:
        return ok(await node_or_404(uid))

    @app.patch("/nodes/{uid}", tags=["nodes"], summary="Rename a node", responses=ex.responses(ex.NODE_OK, 404, 422))
    async def rename(uid: Uid, body: Annotated[nodes.RenameBody, Body(openapi_examples=ex.RENAME)]) -> Response:
        if not await nodes.rename(db, uid, body.name):
            raise HTTPException(404, f"node {uid!r} not found")
        return ok(await node_or_404(uid))

    @app.put("/nodes/{uid}/zone", tags=["nodes"], summary="Assign a node to a zone and send it its config",
             responses=ex.responses(ex.ZONE_OK, 404, 409, 422))
    async def assign_zone(uid: Uid, body: Annotated[nodes.ZoneBody, Body(openapi_examples=ex.ZONE)]) -> Response:
        await nodes.assign_zone(db, delivery, uid, body.zone_id)
        node = await node_or_404(uid)
        config = None
        if node["can_receive_config"]:
            try:  # the zone is assigned either way; a config that cannot go out is reported, not raised
                config = publish_data(await delivery.publish(uid))
            except NodeConfigFailure as exc:
                config = {"published": False, "error": str(exc)}
        return ok({"node": node, "config": config})

    @app.delete("/nodes/{uid}/zone", tags=["nodes"], summary="Take a node out of its zone",
                responses=ex.responses(ex.UNASSIGN_OK, 404, 422))
    async def unassign_zone(uid: Uid) -> Response:
        await nodes.unassign_zone(db, delivery, uid)
        return ok({"node": await node_or_404(uid)})

    @app.get("/nodes/{uid}/config", tags=["configs"], summary="A node's config, versions and delivery state",
             responses=ex.responses(ex.CONFIG_STATE_OK, 404, 422))
    async def get_config(uid: Uid) -> Response:
        state = await config_state(db, uid)
        if state is None:
            raise HTTPException(404, f"node {uid!r} not found")
        return ok(state)

    @app.put("/nodes/{uid}/config", tags=["configs"], summary="Store a node's config and publish it",
             responses=ex.responses(ex.PUBLISH_OK, 202, 400, 404, 422))
    async def put_config(uid: Uid, body: Any = Body(..., openapi_examples=ex.PUT_CONFIG)) -> Response:
        config = body.get("config") if isinstance(body, dict) and isinstance(body.get("config"), dict) \
            and "channels" not in body else body
        if not isinstance(config, dict):
            raise ConfigError("config", "must be a JSON object")
        result = await delivery.publish(uid, config)
        return ok(publish_data(result), status_code=200 if result.published else 202)

    @app.post("/nodes/{uid}/config/publish", tags=["configs"], summary="Send a node its current config again",
              responses=ex.responses(ex.PUBLISH_OK, 202, 400, 404, 422))
    async def republish(uid: Uid) -> Response:
        result = await delivery.publish(uid)
        return ok(publish_data(result), status_code=200 if result.published else 202)

    return app

