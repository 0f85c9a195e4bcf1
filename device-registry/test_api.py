"""REST API: token (fail closed), nodes listing and editing, configs (validation errors name the field)."""
import asyncio
import re

import httpx
import pytest

from common.testing import seed_zone
from testing import TOKEN, make_zone, metric, start_registry, wait_node


def url(service, path):
    return f"http://127.0.0.1:{service.settings.registry_port}{path}"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}])
async def test_missing_or_wrong_token_is_refused(registry, headers):
    async with httpx.AsyncClient() as client:
        for method, path in (("GET", "/nodes"), ("GET", "/nodes/x/config"), ("PUT", "/nodes/x/config"),
                             ("POST", "/nodes/x/config/publish"), ("PATCH", "/nodes/x")):
            response = await client.request(method, url(registry, path), headers=headers, content=b"{broken")
            assert response.status_code == 401, (method, path)  # before the body is even parsed
            assert response.json() == {"detail": "Unauthorized: invalid or missing token"}


async def test_no_token_configured_fails_closed(settings, db):
    service = await start_registry(settings, token="")
    try:
        async with httpx.AsyncClient() as client:
            for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer anything"}):
                response = await client.get(url(service, "/nodes"), headers=headers)
                assert response.status_code == 500 and "PY_API_TOKEN" in response.json()["detail"]
            assert (await client.get(url(service, "/health"))).status_code == 200
            ready = await client.get(url(service, "/ready"))
            assert ready.status_code == 200 and ready.json()["data"] == {"db": "ok", "mqtt": "ok"}
            metrics = await client.get(url(service, "/metrics"))
            assert "node_hello_received_total" in metrics.text and "config_response_received_total" in metrics.text
    finally:
        await service.stop()


async def test_list_filter_get_rename(settings, db, registry, api, node):
    zone_id = await make_zone(db)
    node.hello(meta={"greenhouse_token": "gh-1", "zone_id": zone_id})
    zoned = await wait_node(db)
    other = type(node)(settings, "esp32-ffffffffffff", node_type="ec")
    other.hello()
    await wait_node(db, other.hardware_id)
    await db.execute("UPDATE nodes SET status = 'online' WHERE id = $1", zoned["id"])

    everything = (await api.get("/nodes")).json()["data"]
    assert sorted(n["uid"] for n in everything) == ["nd-ec-esp32fff", "nd-ph-esp32a1b"]
    assert "config" not in everything[0]  # nodes.config may hold Wi-Fi passwords
    assert [n["uid"] for n in (await api.get("/nodes", params={"zone_id": zone_id})).json()["data"]] == \
        ["nd-ph-esp32a1b"]
    assert [n["uid"] for n in (await api.get("/nodes", params={"status": "ONLINE"})).json()["data"]] == \
        ["nd-ph-esp32a1b"]
    assert [n["uid"] for n in (await api.get("/nodes", params={"lifecycle_state": "registered_backend"})
                               ).json()["data"]] == ["nd-ec-esp32fff"]
    assert (await api.get("/nodes", params={"zone_id": "x"})).status_code == 422

    one = (await api.get("/nodes/nd-ph-esp32a1b")).json()["data"]
    assert one["zone_id"] == zone_id and one["config_version"] == 1 and one["can_receive_config"] is True
    assert (await api.get("/nodes/nd-missing")).status_code == 404

    response = await api.patch("/nodes/nd-ph-esp32a1b", json={"name": "  pH tank A "})
    assert response.status_code == 200 and response.json()["data"]["name"] == "pH tank A"
    assert (await api.patch("/nodes/nd-ph-esp32a1b", json={"name": ""})).status_code == 422
    assert (await api.patch("/nodes/nd-missing", json={"name": "x"})).status_code == 404


async def test_assign_and_unassign_zone(settings, db, registry, api, node, mqtt_probe):
    zone_a, zone_b = await make_zone(db), await make_zone(db)
    node.hello()
    uid = (await wait_node(db))["uid"]
    assert (await api.put(f"/nodes/{uid}/zone", json={"zone_id": 999999})).status_code == 404
    assert (await api.put(f"/nodes/{uid}/zone", json={"zone_id": "1"})).status_code == 422
    assert (await api.put("/nodes/nd-missing/zone", json={"zone_id": zone_a})).status_code == 404
    assert (await api.put(f"/nodes/{uid}/zone", json={"zone_id": zone_a})).status_code == 200
    topic_a = f"{settings.mqtt_topic_root}/gh-1/zn-{zone_a}/{uid}/config"
    await mqtt_probe.wait_for(1, topic_a)

    moved = (await api.put(f"/nodes/{uid}/zone", json={"zone_id": zone_b})).json()["data"]
    assert moved["config"]["version"] == 2  # zone_uid changed: a new version
    assert moved["config"]["topic"] == f"{settings.mqtt_topic_root}/gh-1/zn-{zone_b}/{uid}/config"
    (cleared,) = [m for m in await mqtt_probe.wait_for(2, topic_a) if m.payload == b""]  # old topic emptied
    assert cleared is not None

    gone = (await api.delete(f"/nodes/{uid}/zone")).json()["data"]["node"]
    assert gone["zone_id"] is None and gone["lifecycle_state"] == "REGISTERED_BACKEND"
    assert not gone["can_receive_config"]
    response = await api.post(f"/nodes/{uid}/config/publish")
    assert response.status_code == 400 and "zone" in response.json()["detail"]

    homeless = await seed_zone(db, None, "no greenhouse")
    response = await api.put(f"/nodes/{uid}/zone", json={"zone_id": homeless})
    assert response.status_code == 200 and response.json()["data"]["node"]["zone_id"] == homeless
    assert response.json()["data"]["config"] == {
        "published": False, "error": "greenhouse_uid is required (zone must have a greenhouse)"}

    await db.execute("UPDATE nodes SET lifecycle_state = 'DECOMMISSIONED' WHERE uid = $1", uid)
    assert (await api.put(f"/nodes/{uid}/zone", json={"zone_id": zone_a})).status_code == 409


@pytest.mark.parametrize("change, field", [
    (lambda c: c["channels"].append(dict(c["channels"][0])), "channels"),
    (lambda c: c["channels"][0].update(type="MOTOR"), "channels.0.type"),
    (lambda c: c["channels"][1].pop("safe_limits"), "channels.1"),
    (lambda c: c["channels"][1]["safe_limits"].update(max_duration_ms=10**7), "channels.1.safe_limits.max_duration_ms"),
    (lambda c: c.update(wifi=None), "wifi"),
    (lambda c: c.update(channels={"a": 1}), "channels"),
    (lambda c: c.update(node_id="nd-other"), "node_id"),
    (lambda c: c.update(blob="x" * 5000), "config"),
])
async def test_put_config_validation_errors_name_the_field(settings, db, registry, api, node, change, field):
    zone_id = await make_zone(db)
    node.hello(meta={"greenhouse_token": "gh-1", "zone_id": zone_id})
    uid = (await wait_node(db))["uid"]
    config = {"channels": [{"name": "ph_sensor", "type": "SENSOR", "metric": "PH"},
                           {"name": "pump_acid", "type": "ACTUATOR",
                            "safe_limits": {"max_duration_ms": 5000, "min_off_ms": 3000}}],
              "wifi": {"ssid": "Farm"}}
    change(config)
    response = await api.put(f"/nodes/{uid}/config", json=config)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and response.json()["detail"].startswith(f"{field}: ")
    state = (await api.get(f"/nodes/{uid}/config")).json()["data"]
    assert [v["version"] for v in state["versions"]] == [1]  # nothing stored


async def test_put_get_publish_config(settings, db, registry, api, node, mqtt_probe):
    zone_id = await make_zone(db)
    node.hello()
    uid = (await wait_node(db))["uid"]
    body = {"channels": [{"name": "pump_acid", "type": "actuator"}], "wifi": {"ssid": "Farm", "pass": "p"}}
    response = await api.put(f"/nodes/{uid}/config", json=body)
    assert response.status_code == 400  # no zone yet
    assert response.json()["detail"] == "zone_id is required (node must be assigned to a zone)"
    await db.execute("UPDATE nodes SET zone_id = $2 WHERE uid = $1", uid, zone_id)

    body["channels"][0]["safe_limits"] = {"max_duration_ms": 2000, "min_off_ms": 1000}
    response = await api.put(f"/nodes/{uid}/config", json={"config": body})  # wrapped form
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert (data["version"], data["changed"], data["published"]) == (1, True, True)
    same = (await api.put(f"/nodes/{uid}/config", json=body)).json()["data"]
    assert (same["version"], same["changed"]) == (1, False)

    state = (await api.get(f"/nodes/{uid}/config")).json()["data"]
    assert state["config"]["channels"][0]["type"] == "ACTUATOR"
    assert state["config"]["wifi"] == {"ssid": "Farm", "pass": "p"} and state["config"]["zone_uid"] == f"zn-{zone_id}"
    assert state["delivery"]["published_version"] == 1 and state["applied_version"] is None

    topic = f"{settings.mqtt_topic_root}/gh-1/zn-{zone_id}/{uid}/config"
    before = len(mqtt_probe.received(topic))
    response = await api.post(f"/nodes/{uid}/config/publish")
    assert response.status_code == 200 and response.json()["data"]["version"] == 1
    await mqtt_probe.wait_for(before + 1, topic)
    assert (await api.post("/nodes/nd-missing/config/publish")).status_code == 404
    assert (await api.get("/nodes/nd-missing/config")).status_code == 404
    assert (await api.put("/nodes/nd-missing/config", json=body)).status_code == 404
    assert (await api.put(f"/nodes/{uid}/config", json=[1, 2])).status_code == 422


async def test_docs_are_public_offline_and_every_route_has_examples_and_the_bearer_scheme(registry):
    async with httpx.AsyncClient() as client:  # no token: the docs pages and their assets are public
        pages = {path: await client.get(url(registry, path)) for path in ("/docs", "/redoc", "/openapi.json")}
        assert all(page.status_code == 200 for page in pages.values()), {p: r.status_code for p, r in pages.items()}
        for page in (pages["/docs"], pages["/redoc"]):
            assert "cdn" not in page.text and "https://" not in page.text  # nothing from the internet
            for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
                answer = await client.get(url(registry, asset))
                assert answer.status_code == 200 and len(answer.content) > 1000, asset
        assert (await client.get(url(registry, "/nodes"))).status_code == 401  # the API itself still is not
    spec = pages["/openapi.json"].json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "PY_API_TOKEN"}
    operations = {(method, path): op for path, item in spec["paths"].items() for method, op in item.items()}
    assert set(operations) >= {("get", "/nodes"), ("get", "/nodes/{uid}"), ("patch", "/nodes/{uid}"),
                               ("put", "/nodes/{uid}/zone"), ("delete", "/nodes/{uid}/zone"),
                               ("get", "/nodes/{uid}/config"), ("put", "/nodes/{uid}/config"),
                               ("post", "/nodes/{uid}/config/publish")}
    for (method, path), op in operations.items():
        if path in ("/health", "/ready", "/metrics"):
            assert "security" not in op, path
            continue
        assert op["security"] == [{"bearerAuth": []}] and op["summary"], (method, path)
        for code, answer in op["responses"].items():
            assert "example" in answer["content"]["application/json"], (method, path, code)
        if method in ("put", "patch"):
            assert op["requestBody"]["content"]["application/json"]["examples"], (method, path)


ARABIC_DIGITS = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


async def test_refused_tokens_are_counted_and_logged_once_per_reason(registry, caplog, monkeypatch):
    import http_guard
    from refusal_log import RefusalLog
    monkeypatch.setattr(http_guard, "_REFUSALS", RefusalLog(http_guard.log))  # no line of earlier tests counts
    before = metric("registry_http_refused_total", reason="unauthorized")
    caplog.set_level("WARNING", logger="device_registry.http")
    async with httpx.AsyncClient() as client:
        for i in range(5):
            response = await client.get(url(registry, "/nodes"), headers={"Authorization": f"Bearer guess-{i}"})
            assert response.status_code == 401
    assert metric("registry_http_refused_total", reason="unauthorized") == before + 5
    lines = [r for r in caplog.records if r.getMessage() == "http_request_refused" and r.reason == "unauthorized"]
    assert len(lines) == 1  # logged, and a guessing flood does not flood the log (one line per reason per minute)
    assert lines[0].path == "/nodes" and "guess-" not in str(vars(lines[0]))  # what was refused, never the token


async def test_hostile_values_get_a_4xx_naming_the_field_on_every_route(db, registry, api, node):
    zone_id = await make_zone(db)
    node.hello()
    uid = (await wait_node(db))["uid"]
    big = 2**63
    cases = [  # method, path, raw body or None, expected status, expected field
        ("GET", f"/nodes?zone_id={big}", None, 422, "query.zone_id"),
        ("GET", f"/nodes?zone_id={str(zone_id).translate(ARABIC_DIGITS)}", None, 422, "query.zone_id"),
        ("GET", f"/nodes?offset={big}", None, 422, "query.offset"),
        ("GET", "/nodes?status=on%00line", None, 422, "query.status"),
        ("GET", "/nodes?lifecycle_state=%01", None, 422, "query.lifecycle_state"),
        ("GET", "/nodes/nd%00x", None, 422, "path"),
        ("GET", "/nodes/" + "x" * 300, None, 422, "path.uid"),
        ("GET", "/nodes/nd%00x/config", None, 422, "path"),
        ("PATCH", f"/nodes/{uid}", b'{"name": "a\\u0000b"}', 422, "body.name"),
        ("PATCH", f"/nodes/{uid}", b'{"name": NaN}', 400, "body"),
        ("PUT", f"/nodes/{uid}/zone", b'{"zone_id": %d}' % big, 422, "body.zone_id"),
        ("PUT", f"/nodes/{uid}/zone", b'{"zone_id": Infinity}', 400, "body"),
        ("PUT", f"/nodes/{uid}/zone", b'{"zone_id": 1e999}', 400, "body"),
        ("PUT", f"/nodes/{uid}/zone", f'{{"zone_id": "{zone_id}"}}'.translate(ARABIC_DIGITS).encode(), 422,
         "body.zone_id"),
        ("PUT", f"/nodes/{uid}/config", b'{"channels": [{"name": "p\\u0000"}]}', 422, "body.channels.0.name"),
        ("PUT", f"/nodes/{uid}/config", b'{"blob": ' + b"[" * 40 + b"]" * 40 + b"}", 422, None),
        ("PUT", f"/nodes/{uid}/config", b"[" * 5000 + b"]" * 5000, 400, "body"),
        ("PUT", f"/nodes/{uid}/config", b'{"k\\u0000": 1}', 422, "body"),
        ("PUT", f"/nodes/{uid}/config", b'{"wifi": {"port": %d}}' % big, 422, "body.wifi.port"),
        ("POST", f"/nodes/{uid}/config/publish", b'"\\u0000"', 422, "body"),
        ("DELETE", "/nodes/%7F/zone", None, 422, "path"),
    ]
    before = sum(metric("registry_http_refused_total", reason=r) for r in
                 ("invalid_path", "invalid_query", "invalid_json", "invalid_value", "validation"))
    for method, path, body, status, field in cases:
        response = await api.request(method, path, content=body,
                                     headers={"content-type": "application/json"} if body else {})
        assert response.status_code == status, (method, path, body[:60] if body else None, response.text)
        answer = response.json()
        if field is not None:
            assert answer["field"] == field, (path, answer)
            assert answer["detail"].startswith(f"{field}: "), answer
    after = sum(metric("registry_http_refused_total", reason=r) for r in
                ("invalid_path", "invalid_query", "invalid_json", "invalid_value", "validation"))
    assert after == before + len(cases)  # every refusal counted by reason
    assert (await api.get(f"/nodes/{uid}")).status_code == 200  # and the service goes on


async def test_body_above_the_limit_is_refused_before_it_is_read(registry):
    """Content-Length alone decides: the 413 comes back while the client has sent no byte of the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", registry.settings.registry_port)
    try:
        writer.write(b"PUT /nodes/nd-x/config HTTP/1.1\r\nHost: registry\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert head.startswith(b"HTTP/1.1 413"), head
    finally:
        writer.close()
    async with httpx.AsyncClient() as client:  # a streamed body without Content-Length: refused past the limit
        async def chunks():
            for _ in range(1100):
                yield b" " * 1024
        response = await client.put(url(registry, "/nodes/nd-x/config"), content=chunks(),
                                    headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 413 and "1048576 bytes" in response.json()["detail"]
