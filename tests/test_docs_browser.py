"""The REST docs as an operator opens them on a greenhouse network without internet.

The bridge and the registry run for real (`python main.py`); headless Chromium (Debian's
`chromium`), with every address but 127.0.0.1 / localhost unreachable, opens their /docs and
/redoc. From the rendered page: the operations are listed, every request the page made went to
the service itself, and Swagger UI's Authorize + "Try it out" with the dev token sends a command
that the bridge accepts (commands row `sent`, the command published on MQTT) and lists the
registry's nodes. Screenshots of the pages are left in the test's tmp_path.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import pytest

from common import testing
from tests.browser import BrowserError, Chromium, Page, chromium_binary

pytestmark = pytest.mark.skipif(
    chromium_binary() is None,
    reason="no chromium: tools/dev/ensure_tools.sh installs Debian's chromium when run as root (make test does); "
           "without it the docs pages cannot be opened in a browser")

TOKEN = "dev-token"
COMMAND_OP = "#operations-bridge-zone_command_bridge_zones__zone_id__commands_post"
NODES_OP = "#operations-nodes-list_nodes_nodes_get"


@pytest.fixture
async def world(db):
    """As Laravel leaves it: greenhouse gh-1, a zone, an irrigation node with its pump channel."""
    now = testing.Sql("now()")
    gh_id = await testing.seed_greenhouse(db, "gh-1", "Greenhouse 1", created_at=now, updated_at=now)
    zone = await testing.seed_zone(db, gh_id, "Zone A", created_at=now, updated_at=now)
    await testing.seed_node(db, "nd-irr-1", zone, type="irrig", status="online", created_at=now, updated_at=now,
                            channels=[testing.Channel("pump_in", {"safe_limits": {"max_duration_ms": 5000,
                                                                                  "min_off_ms": 3000}})])
    return SimpleNamespace(zone=zone, node="nd-irr-1")


@pytest.fixture
async def services(settings, world, tmp_path):
    """mqtt-bridge and device-registry as processes, with the dev token, both /ready."""
    ports = {"BRIDGE_PORT": testing.free_port(), "REGISTRY_PORT": testing.free_port()}
    env = dict(testing.settings_env(settings), PY_API_TOKEN=TOKEN, **{k: str(v) for k, v in ports.items()})
    procs = [testing.ServiceProcess(folder, env, tmp_path).start() for folder in ("mqtt-bridge", "device-registry")]
    bases = {"bridge": f"http://127.0.0.1:{ports['BRIDGE_PORT']}",
             "registry": f"http://127.0.0.1:{ports['REGISTRY_PORT']}"}
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            for base in bases.values():
                async def ready(base=base) -> bool:
                    try:
                        return (await client.get(f"{base}/ready")).status_code == 200
                    except httpx.HTTPError:
                        return False
                await testing.eventually(ready, 60, 0.2, f"{base}/ready 200")
        yield SimpleNamespace(**bases)
    finally:
        for proc in procs:
            proc.terminate()


@pytest.fixture
def browser(tmp_path):
    """Chromium, once it has shown that it cannot reach anything off this machine."""
    chromium = Chromium(chromium_binary(), tmp_path / "profile", tmp_path / "chromium.log")
    try:
        with pytest.raises(BrowserError, match="ERR_"):  # no name resolves, no proxy answers
            chromium.new_page().goto("http://example.com/")
        yield chromium
    finally:
        chromium.close()


def open_offline(browser: Chromium, url: str) -> Page:
    page = browser.new_page()
    page.goto(url)
    return page


def assert_only_from(page: Page, base: str) -> None:
    """Every request the page made (scripts, styles, the OpenAPI document, API calls) went to `base`;
    any other was refused by the page's Content-Security-Policy before it reached the network."""
    deadline = time.monotonic() + 30
    while True:
        requests = page.requests()
        elsewhere = [(u, outcome) for u, outcome in requests if not u.startswith((f"{base}/", "data:", "blob:"))]
        if all(outcome for _, outcome in elsewhere) or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # a refused request's failure event may still be on its way
    assert any(u.startswith(f"{base}/") for u, _ in requests), requests
    assert all(outcome == "csp" for _, outcome in elsewhere), elsewhere


def shoot(page: Page, path: Path) -> None:
    page.screenshot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def swagger_operations(page: Page, expected: set[str]) -> set[str]:
    """The operation paths Swagger UI rendered, once all of `expected` are there."""
    script = "[...document.querySelectorAll('.opblock-summary-path')].map(e => e.dataset.path)"
    page.wait_for(f"(s => {json.dumps(sorted(expected))}.every(p => s.includes(p)))({script})", 90,
                  f"operations {sorted(expected)} rendered")
    return set(page.js(script))


def authorize(page: Page, token: str) -> None:
    page.click(".auth-wrapper button.authorize")
    page.type_into(".modal-ux input#auth-bearer-value", token)
    page.click(".modal-ux button.authorize")
    page.wait_for("document.querySelector('.modal-ux').innerText.includes('Authorized')", 30,
                  "the Authorize dialog took the token")
    page.click(".modal-ux button.btn-done")


def try_it_out(page: Page, op: str, params: dict[str, str], body: dict | None = None) -> tuple[int, dict]:
    """Expand the operation, Try it out, fill parameters and body, Execute; the live answer."""
    page.click(f"{op} .opblock-summary-control")
    page.click(f"{op} button.try-out__btn")
    for name, value in params.items():
        page.type_into(f'{op} tr[data-param-name="{name}"] input', value)
    if body is not None:
        page.type_into(f"{op} textarea.body-param__text", json.dumps(body))
    return execute(page, op)


def execute(page: Page, op: str) -> tuple[int, dict]:
    """Execute (after Clear, when an earlier answer is shown); the live answer's status and body."""
    if page.js(f"!!document.querySelector('{op} button.btn-clear')"):
        page.click(f"{op} button.btn-clear")
        page.wait_for(f"!document.querySelector('{op} .live-responses-table')", 30, "earlier answer cleared")
    page.click(f"{op} button.execute")
    status = page.wait_for(f"(e => e && e.innerText.trim())(document.querySelector("
                           f"'{op} .live-responses-table tr.response .response-col_status'))", 60, f"{op} answered")
    text = page.js(f"document.querySelector('{op} .live-responses-table tr.response .highlight-code pre')"
                   f".innerText")
    page.js(f"document.querySelector('{op} .responses-wrapper').scrollIntoView()")  # request and answer in view
    return int(status), json.loads(text)


async def test_bridge_swagger_ui_offline_lists_operations_and_try_it_out_sends_a_command(
        services, browser, world, db, settings, mqtt_probe, tmp_path):
    page = open_offline(browser, f"{services.bridge}/docs")
    operations = swagger_operations(page, {"/bridge/zones/{zone_id}/commands", "/bridge/nodes/{node_uid}/commands",
                                           "/bridge/commands/{cmd_id}", "/bridge/nodes/{node_uid}/config"})
    assert {"/bridge/zones/{zone_id}/fill", "/bridge/tasks/{task_id}", "/health"} <= operations
    assert_only_from(page, services.bridge)
    shoot(page, tmp_path / "bridge-docs.png")

    authorize(page, TOKEN)
    status, answer = try_it_out(page, COMMAND_OP, {"zone_id": str(world.zone)},
                                {"type": "run_pump", "params": {"duration_ms": 1000}, "channel": "pump_in"})
    shoot(page, tmp_path / "bridge-docs-try-it-out.png")
    assert status == 200, answer
    cmd_id = answer["data"]["command_id"]
    row = await db.fetchrow("SELECT cmd, channel, status, sent_at FROM commands WHERE cmd_id = $1", cmd_id)
    assert row is not None and (row["cmd"], row["channel"]) == ("run_pump", "pump_in")
    assert row["status"] != "pending" and row["sent_at"] is not None
    topic = f"{settings.mqtt_topic_root}/gh-1/zn-{world.zone}/{world.node}/pump_in/command"
    published = await mqtt_probe.wait_for(1, topic, timeout=30)
    assert orjson.loads(published[0].payload)["cmd_id"] == cmd_id
    assert_only_from(page, services.bridge)


async def test_registry_swagger_ui_offline_lists_operations_and_try_it_out_lists_nodes(services, browser, world,
                                                                                      tmp_path):
    page = open_offline(browser, f"{services.registry}/docs")
    swagger_operations(page, {"/nodes", "/nodes/{uid}", "/nodes/{uid}/zone", "/nodes/{uid}/config",
                              "/nodes/{uid}/config/publish"})
    assert_only_from(page, services.registry)
    shoot(page, tmp_path / "registry-docs.png")

    status, answer = try_it_out(page, NODES_OP, {"zone_id": str(world.zone)})  # the page is public, the API not
    assert (status, answer) == (401, {"detail": "Unauthorized: invalid or missing token"})
    authorize(page, TOKEN)
    status, answer = execute(page, NODES_OP)
    assert status == 200, answer
    assert [node["uid"] for node in answer["data"]] == [world.node]
    assert_only_from(page, services.registry)


@pytest.mark.parametrize("service, summaries", [
    ("bridge", ["Send a command to a node of a zone", "Publish a node its NodeConfig", "A command's lifecycle"]),
    ("registry", ["List nodes", "Assign a node to a zone and send it its config",
                  "Store a node's config and publish it"]),
])
async def test_redoc_renders_offline(services, browser, tmp_path, service, summaries):
    base = getattr(services, service)
    page = open_offline(browser, f"{base}/redoc")
    text = "(document.body && document.body.innerText) || ''"
    page.wait_for(f"(t => {json.dumps(summaries)}.every(s => t.includes(s)))({text})", 90, f"ReDoc shows {summaries}")
    assert "Authorization: Bearer <PY_API_TOKEN>" in page.text() and "bearerAuth" in page.text()  # token explained
    assert_only_from(page, base)
    shoot(page, tmp_path / f"{service}-redoc.png")
