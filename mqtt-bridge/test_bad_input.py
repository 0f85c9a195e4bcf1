"""Hostile input on every bridge route: a clear 4xx naming the field, never a 5xx, never a closed
keep-alive connection, and valid commands sent at the same moment all land and get published."""
from __future__ import annotations

import asyncio

import orjson
import pytest

from testing import TOKEN, running_bridge

DEEP = b"[" * 100 + b"]" * 100
VERY_DEEP = b"[" * 5000 + b"]" * 5000
HOSTILE = {  # raw bodies, each with the field (loc after "body") it must name, [] for the body itself
    "nul_in_params": (b'{"type":"stop_pump","channel":"pump_in","params":{"note":"a\\u0000b"}}', ["params"]),
    "nul_in_key": (b'{"type":"stop_pump","channel":"pump_in","params":{"a\\u0000":1}}', ["params"]),
    "nul_in_type": (b'{"type":"stop\\u0000pump","channel":"pump_in"}', ["type"]),
    "bigint_zone": (b'{"type":"stop_pump","channel":"pump_in","zone_id":9223372036854775808}', ["zone_id"]),
    "bigint_param": (b'{"type":"stop_pump","channel":"pump_in","params":{"n":9223372036854775808}}', ["params"]),
    "huge_int": (b'{"type":"stop_pump","channel":"pump_in","zone_id":' + b"9" * 400 + b"}", ["zone_id"]),
    "nan": (b'{"type":"stop_pump","channel":"pump_in","params":{"x":NaN},"target_level":NaN}', []),
    "infinity": (b'{"target_level":Infinity,"zone_id":-Infinity,"type":"x","node_id":1,"channel":"c"}', []),
    "overflow_float": (b'{"target_level":1e400,"type":"x"}', []),
    "deep": (b'{"type":"stop_pump","channel":"pump_in","params":{"d":' + DEEP + b"}}", ["params"]),
    "very_deep": (b'{"params":' + VERY_DEEP + b"}", []),
    "bad_utf8": (b'{"type":"stop_pump\xff","channel":"pump_in"}', []),
    "lone_surrogate": (b'{"type":"stop_pump","channel":"pump\\ud800in"}', ["channel"]),
    "int_beyond_u64": (b'{"type":"stop_pump","channel":"pump_in","zone_id":1180591620717411303424}', []),
}
ROUTES = ["/bridge/zones/{zone}/commands", "/bridge/nodes/nd-irr-1/commands", "/bridge/nodes/nd-irr-1/config",
          "/bridge/zones/{zone}/fill", "/bridge/zones/{zone}/drain", "/bridge/zones/{zone}/calibrate-flow",
          "/bridge/config/zone-updated"]


def server_errors(metrics_text: str) -> float:
    """bridge_requests_total summed over 5xx statuses (metrics are per process: compare before / after)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("bridge_requests_total{") and ',status="5' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("route", ROUTES)
async def test_hostile_bodies_are_4xx_naming_the_field_on_every_route(bridge, world, db, route):
    path = route.format(zone=world.zone)
    errors_before = server_errors((await bridge.http.get("/metrics")).text)
    for name, (body, field) in HOSTILE.items():
        response = await bridge.http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 422), (name, response.status_code, response.text)
        detail = response.json()["detail"]  # the error body itself is valid JSON
        if field:
            locs = [e["loc"] for e in detail] if isinstance(detail, list) else []
            assert any(loc[:2] == ["body", *field] for loc in locs), (name, detail)
    assert await db.fetchval("SELECT count(*) FROM commands") == 0
    metrics = (await bridge.http.get("/metrics")).text
    assert 'bridge_requests_rejected_total{reason="unsafe_json"}' in metrics
    assert 'bridge_requests_rejected_total{reason="invalid_json"}' in metrics
    assert server_errors(metrics) == errors_before


@pytest.mark.parametrize("path, status", [
    ("/bridge/zones/%D9%A1%D9%A2/commands", 422),  # Arabic-Indic "١٢" is not zone 12
    ("/bridge/zones/%EF%BC%91/commands", 422),     # fullwidth "１"
    ("/bridge/zones/99999999999999999999/commands", 422),
    ("/bridge/zones/999999999999999999/commands", 200),  # fits bigint; the body names everything needed
    ("/bridge/zones/zn-1%0A/commands", 422),
    ("/bridge/nodes/nd%00x/commands", 422),
])
async def test_hostile_path_params(bridge, world, db, path, status):
    response = await bridge.http.post(path, json={"type": "stop_pump", "channel": "pump_in", "node_uid": "nd-irr-1",
                                                  "greenhouse_uid": "gh-1", "zone_id": world.zone})
    assert response.status_code == status, response.text
    assert await db.fetchval("SELECT count(*) FROM commands") == (1 if status == 200 else 0)


@pytest.mark.parametrize("cmd_id", ["a%00b", "%F0%9F%92%A9", "x" * 255, "%25s%25s"])
async def test_command_status_with_hostile_ids_is_404_not_500(bridge, cmd_id):
    response = await bridge.http.get(f"/bridge/commands/{cmd_id}")
    assert response.status_code in (404, 422), response.text
    assert "detail" in response.json()


async def test_valid_commands_sent_with_bad_ones_all_land_and_get_published(bridge, world, mqtt_probe, db):
    """Each command succeeds or fails alone: 30 valid commands interleaved with 30 hostile ones,
    all at once on one bridge (so they share the group commit's batches)."""
    valid = [{"type": "stop_pump", "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1", "channel": "pump_in",
              "cmd_id": f"good-{i}"} for i in range(30)]
    bad = [
        {"type": "stop_pump", "channel": "pump_in", "params": {"s": "\x00"}},
        {"type": "stop_pump", "channel": "pump_in", "zone_id": 2**63},
        {"type": "stop_pump", "channel": "pump_in", "params": {"n": 2**63}},
        {"type": "set_relay", "channel": "pump_in", "params": {"state": True}},
        {"type": "run_pump", "channel": "ph_sensor", "node_uid": "nd-ph-1", "params": {"duration_ms": 100}},
        {"type": "stop_pump", "channel": "pump_nowhere"},
    ]
    requests = []
    for i in range(30):
        requests.append(bridge.http.post(f"/bridge/zones/{world.zone}/commands", json=valid[i]))
        hostile = dict({"greenhouse_uid": "gh-1", "node_uid": "nd-irr-1"}, **bad[i % len(bad)])
        requests.append(bridge.http.post(f"/bridge/zones/{world.zone}/commands",
                                         content=orjson.dumps(hostile, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
                                         if hostile.get("zone_id", 0) < 2**63 and not _has_big(hostile)
                                         else _raw(hostile), headers={"Content-Type": "application/json"}))
    answers = await asyncio.gather(*requests)
    assert [a.status_code for a in answers[0::2]] == [200] * 30, [a.text for a in answers[0::2] if a.status_code != 200]
    assert all(a.status_code == 422 for a in answers[1::2]), [a.text for a in answers[1::2]]
    await mqtt_probe.wait_for(30, f"{bridge.root}/#")
    published = {p["cmd_id"] for p in mqtt_probe.payloads(f"{bridge.root}/#")}
    assert published == {f"good-{i}" for i in range(30)}
    assert await db.fetchval("SELECT count(*) FROM commands WHERE status = 'sent'") == 30
    assert await db.fetchval("SELECT count(*) FROM commands") == 30


def _has_big(body: dict) -> bool:
    return any(isinstance(v, int) and abs(v) >= 2**63 for v in [*body.values(), *body.get("params", {}).values()])


def _raw(body: dict) -> bytes:
    """JSON with integers beyond 64 bits (which orjson will not write)."""
    import json
    return json.dumps(body).encode()


# -- the connection itself ------------------------------------------------------------------------
async def raw_exchange(port: int, request: bytes, reader=None, writer=None):
    if reader is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    body = await asyncio.wait_for(reader.readexactly(length), 30)
    return status, body, reader, writer


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: bridge\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()


async def test_a_500_keeps_the_keep_alive_connection_open(bridge):
    async def boom():
        raise RuntimeError("a bug")
    bridge.service.app.add_api_route("/bridge/boom", boom)
    status, body, reader, writer = await raw_exchange(bridge.settings.bridge_port, get("/bridge/boom"))
    assert (status, orjson.loads(body)) == (500, {"detail": "internal error"})
    status, body, reader, writer = await raw_exchange(bridge.settings.bridge_port, get("/health"), reader, writer)
    assert status == 200 and orjson.loads(body)["status"] == "ok"  # same connection, still served
    writer.close()
    metrics = (await bridge.http.get("/metrics")).text
    assert 'http_guard_refused_total{reason="internal_error"}' in metrics


async def closed_by_server(reader: asyncio.StreamReader, deadline: float = 30) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does)."""
    return await asyncio.wait_for(reader.read(), deadline)


async def test_silent_half_sent_and_idle_connections_are_closed(settings, world, monkeypatch):
    monkeypatch.setenv("HTTP_READ_TIMEOUT_SEC", "1")
    monkeypatch.setenv("HTTP_KEEP_ALIVE_SEC", "1")
    async with running_bridge(settings) as b:
        port = b.settings.bridge_port
        silent = await asyncio.open_connection("127.0.0.1", port)
        half_headers = await asyncio.open_connection("127.0.0.1", port)
        half_headers[1].write(b"POST /bridge/zones/1/commands HTTP/1.1\r\nHost: bridge\r\n")
        half_body = await asyncio.open_connection("127.0.0.1", port)
        half_body[1].write(f"POST /bridge/zones/{world.zone}/commands HTTP/1.1\r\nHost: bridge\r\n"
                           f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: 200\r\n\r\n{{\"type\":".encode())
        assert (await closed_by_server(silent[0])).startswith(b"HTTP/1.1 408")
        assert (await closed_by_server(half_headers[0])).startswith(b"HTTP/1.1 408")
        assert (await closed_by_server(half_body[0])).startswith(b"HTTP/1.1 408")
        # an idle keep-alive connection is closed after its answer
        status, _, reader, writer = await raw_exchange(port, get("/health"))
        assert status == 200 and await closed_by_server(reader) == b""
        # the server still serves everyone else
        assert (await b.http.get("/health")).status_code == 200
        assert 'http_guard_refused_total{reason="read_timeout"}' in (await b.http.get("/metrics")).text
        for _, w in (silent, half_headers, half_body):
            w.close()
        writer.close()
