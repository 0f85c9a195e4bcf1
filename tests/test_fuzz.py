"""Hostile input on every surface, with valid traffic in between, against the five services as processes.

Property-based (hypothesis): each REST route's body, path and query of the bridge and the registry,
history-logger's `/ingest/telemetry`, and the payload of every MQTT message kind (telemetry, heartbeat,
status, lwt, command_response, node_hello, config_response, config_request) get generated hostile values — NUL
characters, integers beyond bigint, NaN/Infinity, ±1e308, over-deep JSON, Unicode digits as ids,
impossible dates, garbage bytes — mixed into valid traffic. The properties:

* no answer is a 5xx and no process dies;
* every valid item sent between the garbage lands (rows counted in PostgreSQL);
* every refusal is counted in a metric (HTTP: each 4xx answer is counted by the service; MQTT: every
  message is accounted for as stored or refused by reason).

Bounded for `make test`: a fixed number of examples per surface, no example database, derandomized
(the same inputs every run), no shrinking (a failure prints the input that caused it).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import time
import urllib.parse
from collections import Counter

import asyncpg
import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from common import testing
from common.db import Database
from tests.stack import (SERVICES, ServiceStack, create_database, tear_down, free_ports,
                         node_spec, run_with_db, seed_nodes)
from tests.test_e2e import SERVICE_ENV, TOKEN

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                print_blob=False)
FUZZ_ENV = {"REGISTRY_NEW_NODES_PER_MIN": "100000",  # hellos with fresh hardware ids are valid traffic here
            "REGISTRY_REPUBLISH_INTERVAL_SEC": "3600"}
BIG = 2**63
GH = "gh-fz"

# ---------------------------------------------------------------------------------------------
# Hostile values
# ---------------------------------------------------------------------------------------------
HOSTILE_TEXT = ["\x00", "a\x00b", "\ud800", "١٢", "zn-١", "٣", "", " ", "x" * 5000, "0001-01-01T00:00:00+14:00",
                "9999-12-31T23:59:59-14:00", "NaN", "Infinity", "-1", "PWNED", "'; DROP TABLE nodes; --",
                "nd-fz-a/../#", "+", "%00", "\u202e\u0007"]
HOSTILE_NUMBERS = [BIG, 2**64, 2**70, -BIG - 1, -(2**70), 2**31, -(2**31) - 1, 0, -1, float("nan"), float("inf"),
                   float("-inf"), 1e308, -1e308, 5e-324, -0.0]


def _deep(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


SCALARS = st.one_of(st.sampled_from(HOSTILE_TEXT), st.sampled_from(HOSTILE_NUMBERS),
                    st.integers(min_value=-(2**80), max_value=2**80), st.floats(), st.text(max_size=20),
                    st.booleans(), st.none())
HOSTILE = st.one_of(
    SCALARS,
    st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.one_of(st.text(max_size=6), st.sampled_from(["\x00", "١"])), inner, max_size=3), max_leaves=6),
    st.sampled_from([_deep(40), _deep(200), {"a": _deep(33)}]),
)
RAW_BODIES = st.one_of(st.binary(max_size=64), st.sampled_from([
    b"", b"{", b"[" * 3000 + b"]" * 3000, b"\xff\xfe\x00", b'{"a": NaN}', b'{"a": 1e999}', b"null", b"[]", b'"x"',
    b'{"a": "\\ud800"}', b"{" + b'"a":{' * 100 + b"}" * 101]))


def dumps(value) -> bytes:
    """JSON the way a careless client writes it: NaN/Infinity tokens and huge integers included."""
    return json.dumps(value, allow_nan=True).encode()


def mutations(template: dict) -> st.SearchStrategy[bytes]:
    """A valid body with one field replaced or one added, a hostile JSON value, or raw bytes."""
    keys = sorted(template)
    replaced = st.tuples(st.sampled_from(keys), HOSTILE).map(lambda kv: {**template, kv[0]: kv[1]})
    added = st.tuples(st.sampled_from(["x", "\x00", "extra", "١"]), HOSTILE).map(lambda kv: {**template, kv[0]: kv[1]})
    # Mostly one bad field in an otherwise valid body: that is what reaches the deep code paths.
    return st.one_of(replaced.map(dumps), replaced.map(dumps), replaced.map(dumps), added.map(dumps),
                     HOSTILE.map(dumps), RAW_BODIES)


PATH_IDS = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=30), st.integers().map(str),
                     st.sampled_from(["%00", "..", "١٢", "zn-١٢", str(BIG), "-1", "0", "x" * 300]))
# A wrong credential instead of the token now and then: refused (401) before anything is read, and counted.
WRONG_AUTH = st.one_of(st.none(), st.none(), st.none(), st.sampled_from(
    ["Bearer wrong", "Bearer", "Basic " + TOKEN, TOKEN, f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "bearer x"]))
QUERIES = st.dictionaries(st.sampled_from(["zone_id", "status", "lifecycle_state", "limit", "offset", "x", "\x00"]),
                          st.one_of(st.sampled_from(HOSTILE_TEXT), st.sampled_from(HOSTILE_NUMBERS).map(str)),
                          max_size=3)


def quoted(segment: str) -> str:
    return urllib.parse.quote(segment.encode("utf-8", "surrogatepass"), safe="")


def query_string(params: dict) -> str:
    return "&".join(f"{quoted(k)}={quoted(v)}" for k, v in params.items())


# ---------------------------------------------------------------------------------------------
# The stack: the five services as processes (the end-to-end machinery), a private broker
# ---------------------------------------------------------------------------------------------
async def _seed(db: Database) -> dict[str, int]:
    """A greenhouse with a zone of nodes (as Laravel writes them) and an empty zone."""
    gh = await testing.seed_greenhouse(db, GH, "Fuzz", timezone="UTC")
    ids = {name: await testing.seed_zone(db, gh, name, status="RUNNING") for name in ("Z", "E")}
    nodes = (("nd-fz-tel", "climate"), ("nd-fz-hb", "climate"), ("nd-fz-act", "climate"), ("nd-fz-reg", "ph"),
             ("nd-fz-cfg", "ph"))
    ids.update(await seed_nodes(db, [node_spec(uid, node_type, GH, ids["Z"]) for uid, node_type in nodes]))
    return ids


@pytest.fixture(scope="module")
def stack(pg_template):
    name = create_database(pg_template)
    broker = testing.PrivateMosquitto.like_deploy().start()
    s = ServiceStack(testing.isolated_settings(PG_DB=name, PY_API_TOKEN=TOKEN, MQTT_PORT=str(broker.port),
                                               LARAVEL_API_URL=f"http://127.0.0.1:{testing.free_port()}",
                                               **free_ports()), {**SERVICE_ENV, **FUZZ_ENV})
    s.ids = asyncio.run(run_with_db(s.settings, _seed))
    s.sql = Sql(s.settings)
    try:
        for service in SERVICES:
            s.start(service)
        asyncio.run(s.wait_ready())
        yield s
    finally:
        s.sql.close()
        codes = tear_down(s, name, broker)
    assert codes == {n: 0 for n in codes}, f"services did not stop cleanly: {codes}\n{s.logs()}"


class Sql:
    """One PostgreSQL connection for the module's sync tests (hypothesis drives sync functions)."""

    def __init__(self, settings_):
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(asyncpg.connect(
            host=settings_.pg_host, port=settings_.pg_port, user=settings_.pg_user,
            password=settings_.pg_pass or None, database=settings_.pg_db))

    def value(self, query: str, *args):
        return self.loop.run_until_complete(self.conn.fetchval(query, *args))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def sql(stack, query: str, *args):
    return stack.sql.value(query, *args)


def metrics(stack, port_field: str) -> Counter:
    """The service's counters: (name, sorted labels) → value."""
    text = httpx.get(stack.url(port_field, "/metrics"), timeout=10).text
    values: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def total(values: Counter, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in values.items()
               if n == name and all(dict(labels).get(k) == want for k, want in match.items()))


def delta(before: Counter, after: Counter, name: str, **match: str) -> float:
    return total(after, name, **match) - total(before, name, **match)


def wait_until(check, timeout: float, message: str, explain=None):
    """Poll `check()` until truthy; on timeout the failure says what `explain()` saw last."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            seen = explain() if explain else result
            raise AssertionError(f"{message} not reached within {timeout}s (last: {seen!r})")
        time.sleep(0.2)


def assert_alive(stack) -> None:
    dead = {n: p.proc.returncode for n, p in stack.processes.items() if p.proc is None or p.proc.poll() is not None}
    assert not dead, f"processes died: {dead}\n{stack.logs()}"


def status_counts(before: Counter, after: Counter, name: str, label: str) -> Counter:
    """Answers counted by the service between two scrapes, by status."""
    counts: Counter = Counter()
    for (n, labels), value in after.items():
        if n == name:
            counts[int(dict(labels)[label])] += value - before.get((n, labels), 0)
    return +counts


# ---------------------------------------------------------------------------------------------
# REST
# ---------------------------------------------------------------------------------------------
class HttpLog:
    """Every answer of one surface's fuzz run, for the assertions after it. Failures are collected
    (not raised) so that one run lists every input that failed, hostile or valid."""

    def __init__(self, client: httpx.Client):
        self.client = client
        self.statuses: Counter = Counter()
        self.failures: list[str] = []
        self.last = ""

    def hostile(self, method: str, path: str, body: bytes | None, authorization: str | None = None) -> None:
        self.last = what = f"{method} {path[:120]} {(body or b'')[:160]!r}" + (f" ({authorization!r})"
                                                                               if authorization else "")
        headers = {"Authorization": authorization} if authorization else None
        try:
            response = self.client.request(method, path, content=body, headers=headers)
        except httpx.TransportError as exc:
            self.failures.append(f"connection lost: {what}: {exc!r}")
            return
        self.statuses[response.status_code] += 1
        if response.status_code >= 500:
            self.failures.append(f"{response.status_code} {what}: {response.text[:300]}")
        elif response.status_code >= 400 and not response.json().get("detail"):  # the answer says what was wrong
            self.failures.append(f"{response.status_code} without a detail: {what}: {response.text[:300]}")

    def valid(self, method: str, path: str, body: dict, accept=(200,)) -> bool:
        """A valid request right after a hostile one: it must succeed on the same keep-alive client."""
        try:
            response = self.client.request(method, path, json=body)
        except httpx.TransportError as exc:
            self.failures.append(f"valid request lost its connection after {self.last}: {exc!r}")
            return False
        if response.status_code not in accept:
            self.failures.append(f"valid request answered {response.status_code} after {self.last}: "
                                 f"{response.text[:300]}")
            return False
        return True

    def check(self) -> None:
        tried = sum(self.statuses.values()) + len(self.failures)
        assert tried >= EXAMPLES // 2, f"only {tried} hostile requests were generated"  # the fuzzing ran
        assert not self.failures, f"{len(self.failures)} failures:\n" + "\n".join(self.failures[:30])


REGISTRY_ROUTES = [("GET", "/nodes"), ("GET", "/nodes/{uid}"), ("PATCH", "/nodes/{uid}"), ("PUT", "/nodes/{uid}/zone"),
                   ("DELETE", "/nodes/{uid}/zone"), ("GET", "/nodes/{uid}/config"), ("PUT", "/nodes/{uid}/config"),
                   ("POST", "/nodes/{uid}/config/publish")]


def registry_requests(zone_id: int):
    bodies = {"PATCH": {"name": "fuzzed"}, "PUT /zone": {"zone_id": zone_id},
              "PUT /config": {"channels": [{"name": "ph_sensor", "type": "SENSOR", "metric": "PH"}],
                              "wifi": {"ssid": "Farm"}}}

    @st.composite
    def request(draw):
        method, template = draw(st.sampled_from(REGISTRY_ROUTES))
        uid = draw(st.one_of(st.just("nd-fz-reg"), PATH_IDS))
        path = template.replace("{uid}", quoted(uid))
        query = draw(st.one_of(st.just({}), QUERIES))
        key = "PATCH" if method == "PATCH" else f"{method} /{template.rsplit('/', 1)[-1]}"
        body = draw(mutations(bodies[key])) if key in bodies else draw(st.one_of(st.none(), RAW_BODIES))
        return method, path + (f"?{query_string(query)}" if query else ""), body
    return request()


def test_registry_rest(stack):
    renames = []
    before = metrics(stack, "registry_port")
    counter = itertools.count()
    with httpx.Client(base_url=stack.url("registry_port", ""), timeout=20,
                      headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}) as client:
        seen = HttpLog(client)

        @FUZZ
        @given(registry_requests(stack.ids["Z"]), WRONG_AUTH)
        @example(("PUT", "/nodes/nd-fz-reg/zone", dumps({"zone_id": BIG})), None)
        @example(("PATCH", "/nodes/nd-fz-reg", dumps({"name": "a\x00"})), None)
        @example(("PUT", "/nodes/nd-fz-reg/config", dumps({"channels": _deep(200)})), None)
        @example(("GET", "/nodes?zone_id=%D9%A1", None), None)
        @example(("GET", "/nodes/nd%00x/config", None), None)
        def run(request, authorization):
            seen.hostile(*request, authorization)
            name = f"valid-{next(counter)}"  # valid traffic in between: it lands every time
            if seen.valid("PATCH", "/nodes/nd-fz-act", {"name": name}):
                renames.append(name)
        run()
    after = metrics(stack, "registry_port")
    seen.check()
    assert sql(stack, "SELECT name FROM nodes WHERE uid = 'nd-fz-act'") == renames[-1]
    counted = status_counts(before, after, "registry_http_requests_total", "status")
    assert counted[200] >= len(renames)
    for status in (s for s in seen.statuses if s >= 400):
        assert counted[status] == seen.statuses[status], (status, counted, seen.statuses)
    refusals = sum(seen.statuses[s] for s in (400, 401, 413, 422))
    assert delta(before, after, "registry_http_refused_total") == refusals, (refusals, seen.statuses)
    assert_alive(stack)


BRIDGE_ROUTES = ["zone_command", "node_command", "node_config", "command_status", "fill", "drain", "calibrate",
                 "task", "zone_updated"]


def bridge_requests(ids: dict[str, int]):
    zone = ids["Z"]
    command = {"type": "set_relay", "params": {"state": True}, "greenhouse_uid": GH, "node_uid": "nd-fz-act",
               "channel": "fan_A"}
    params = st.one_of(st.dictionaries(st.sampled_from(["state", "duration_ms", "x", "\x00"]), HOSTILE, max_size=2),
                       HOSTILE)

    @st.composite
    def request(draw):
        method, path, body = draw(route_request())
        query = draw(st.one_of(st.just({}), QUERIES, st.dictionaries(st.just("async"), st.sampled_from(
            ["1", "١", "yes\x00", str(BIG), ""]), max_size=1)))
        if query:  # routines keep async=1 first (a later duplicate does not override it): never a long wait
            path += ("&" if "?" in path else "?") + query_string(query)
        return method, path, body

    @st.composite
    def route_request(draw):
        route = draw(st.sampled_from(BRIDGE_ROUTES))
        path_id = draw(st.one_of(st.just(None), PATH_IDS))
        if route in ("zone_command", "node_command"):
            if draw(st.booleans()):
                body = dumps({**command, "params": draw(params), "cmd_id": f"fz-bad-{draw(st.uuids()).hex[:12]}"})
            else:
                body = draw(mutations(command))
            target = (f"zones/{quoted(path_id) if path_id is not None else zone}" if route == "zone_command"
                      else f"nodes/{quoted(path_id) if path_id is not None else 'nd-fz-act'}")
            return "POST", f"/bridge/{target}/commands", body
        if route == "node_config":
            uid = path_id if path_id is not None else "nd-fz-cfg"
            return "POST", f"/bridge/nodes/{quoted(uid)}/config", draw(mutations(
                {"node_uid": uid, "zone_id": zone, "greenhouse_uid": GH, "config": {"channels": [], "wifi": {}}}))
        if route == "command_status":
            return "GET", f"/bridge/commands/{quoted(path_id or 'fz-none')}", None
        if route == "task":
            return "GET", f"/bridge/tasks/{quoted(path_id or 'none')}", None
        if route == "zone_updated":
            return "POST", "/bridge/config/zone-updated", draw(mutations({"zone_id": zone, "greenhouse_uid": GH}))
        # Routines on the empty zone (nothing to run there) and always in the background: never a long wait.
        target = quoted(path_id) if path_id is not None else str(ids["E"])
        name, template = {"fill": ("fill", {"target_level": 0.8}), "drain": ("drain", {"target_level": 0.2}),
                          "calibrate": ("calibrate-flow", {"node_id": ids["nd-fz-act"], "channel": "fan_A"})}[route]
        return "POST", f"/bridge/zones/{target}/{name}?async=1", draw(mutations(template))
    return request()


def test_bridge_rest(stack):
    valid = []
    before = metrics(stack, "bridge_port")
    counter = itertools.count()
    with httpx.Client(base_url=stack.url("bridge_port", ""), timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}) as client:
        seen = HttpLog(client)

        zone, command = stack.ids["Z"], {"type": "set_relay", "greenhouse_uid": GH, "node_uid": "nd-fz-act",
                                          "channel": "fan_A"}

        @FUZZ
        @given(bridge_requests(stack.ids), WRONG_AUTH)
        @example(("POST", f"/bridge/zones/{zone}/commands", dumps({**command, "params": {"state": "a\x00"}})), None)
        @example(("POST", f"/bridge/zones/{zone}/commands", dumps({**command, "params": {"duration_ms": BIG}})), None)
        @example(("POST", f"/bridge/zones/{zone}/commands", dumps({**command, "params": {"x": _deep(200)}})), None)
        @example(("POST", "/bridge/nodes/nd-fz-act/commands", dumps({**command, "zone_id": BIG})), None)
        @example(("POST", f"/bridge/zones/{zone}/commands", b'{"type": "set_relay", "params": {"x": NaN}}'), None)
        @example(("POST", "/bridge/zones/%D9%A1/commands", dumps(command)), None)  # a Unicode digit as zone id
        @example(("GET", "/bridge/commands/a%00b", None), None)
        @example(("POST", f"/bridge/zones/{stack.ids['E']}/fill?async=1", b'{"target_level": NaN}'), None)
        def run(request, authorization):
            seen.hostile(*request, authorization)
            cmd_id = f"fz-valid-{next(counter)}"  # a valid command right after: recorded and published
            if seen.valid("POST", f"/bridge/zones/{stack.ids['Z']}/commands", {
                    "type": "set_relay", "params": {"state": False}, "greenhouse_uid": GH, "node_uid": "nd-fz-act",
                    "channel": "fan_A", "cmd_id": cmd_id}):
                valid.append(cmd_id)
        run()
    after = metrics(stack, "bridge_port")
    seen.check()
    recorded = sql(stack, "SELECT count(*) FROM commands WHERE cmd_id = ANY($1::text[]) AND status <> 'pending'", valid)
    assert recorded == len(valid)
    counted = status_counts(before, after, "bridge_requests_total", "status")
    for status in (s for s in seen.statuses if s >= 400):
        assert counted[status] == seen.statuses[status], (status, counted, seen.statuses)
    assert_alive(stack)


def ingest_bodies(zone_id: int):
    sample = {"node_uid": "nd-fz-tel", "zone_id": zone_id, "metric_type": "TEMP_AIR", "value": 21.5,
              "ts": int(time.time() * 1000), "channel": "temp_air"}
    one_bad = mutations(sample).map(lambda raw: b'{"samples": [' + raw + b"]}")
    return st.one_of(one_bad, mutations({"samples": [sample]}),
                     st.lists(HOSTILE, min_size=1, max_size=3).map(lambda xs: dumps({"samples": xs})))


def test_logger_ingest(stack):
    valid = []
    before = metrics(stack, "history_logger_port")
    base_ms = int(time.time() * 1000) - 600_000
    counter = itertools.count()
    with httpx.Client(base_url=stack.url("history_logger_port", ""), timeout=30,
                      headers={"content-type": "application/json"}) as client:
        seen = HttpLog(client)

        sample = {"node_uid": "nd-fz-tel", "zone_id": stack.ids["Z"], "metric_type": "TEMP_AIR", "value": 21.5}

        @FUZZ
        @given(ingest_bodies(stack.ids["Z"]), st.one_of(st.just({}), QUERIES))
        @example(dumps({"samples": [{**sample, "value": 1e308}]}), {})
        @example(dumps({"samples": [{**sample, "ts": "0001-01-01T00:00:00+14:00"}]}), {})
        @example(dumps({"samples": [{**sample, "zone_id": BIG}]}), {})
        @example(dumps({"samples": [{**sample, "node_uid": "nd\x00"}]}), {})
        @example(dumps({"samples": [{**sample, "zone_id": "١"}]}), {})
        @example(dumps({"samples": [{**sample, "metric_type": "PH", "value": -3}]}), {})
        @example(dumps({"samples": [{**sample, "raw": _deep(200)}]}), {})
        def run(body, query):
            seen.hostile("POST", "/ingest/telemetry" + (f"?{query_string(query)}" if query else ""), body)
            n = next(counter)
            if seen.valid("POST", "/ingest/telemetry", {"samples": [{
                    "node_uid": "nd-fz-hb", "zone_id": stack.ids["Z"], "metric_type": "HUMIDITY",
                    "channel": "humidity", "value": 40 + n / 1000, "ts": base_ms + n}]}):
                valid.append(n)
        run()
    seen.check()
    wait_until(lambda: sql(stack, "SELECT count(*) FROM telemetry_samples WHERE node_id = $1 AND metric_type ="
                                  " 'HUMIDITY'", stack.ids["nd-fz-hb"]) >= len(valid), 60, "valid ingested samples")
    after = metrics(stack, "history_logger_port")
    refused = seen.statuses[400] + seen.statuses[413] + seen.statuses[422]
    assert delta(before, after, "telemetry_invalid_total") >= refused  # each refusal counted by reason
    assert_alive(stack)


# ---------------------------------------------------------------------------------------------
# MQTT
# ---------------------------------------------------------------------------------------------
class Publisher:
    """One QoS 1 client: messages arrive in the order they were published."""

    def __init__(self, stack):
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=testing.unique_id("fuzz-"))
        self.client.connect(stack.settings.mqtt_host, stack.settings.mqtt_port)
        self.client.loop_start()
        self.pending = []
        self.sent = 0

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.pending.append(self.client.publish(topic, payload, qos=1, retain=retain))
        self.sent += 1

    def flush(self) -> None:
        for info in self.pending:
            info.wait_for_publish(30)
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()


def payloads(template: dict) -> st.SearchStrategy[list[bytes]]:
    return st.lists(mutations(template), min_size=1, max_size=4)


def _is_object(payload: bytes) -> bool:
    try:
        return isinstance(orjson.loads(payload), dict)
    except orjson.JSONDecodeError:
        return False


def test_mqtt_telemetry(stack):
    """Every telemetry message is stored or refused by reason; the valid readings between them land."""
    root, zone = stack.settings.mqtt_topic_root, stack.ids["Z"]
    topic = f"{root}/{GH}/zn-{zone}/nd-fz-tel/temp_air/telemetry"
    odd_topics = [f"{root}/{GH}/zn-١/nd-fz-tel/temp_air/telemetry", f"{root}/{GH}/zn-{zone}/nd-nobody/x/telemetry",
                  f"{root}/{GH}/zn-{zone}/nd-fz-tel/{'c' * 300}/telemetry", f"{root}/gh-temp/zn-temp/x/telemetry"]
    base_ms = int(time.time() * 1000) - 300_000
    template = {"metric_type": "TEMP_AIR", "value": 21.0, "ts": base_ms}
    before = metrics(stack, "history_logger_port")
    rows_before = sql(stack, "SELECT count(*) FROM telemetry_samples")
    pub, valid = Publisher(stack), []
    try:
        @FUZZ
        @given(payloads(template), st.sampled_from([None, *odd_topics]))
        @example([dumps({**template, "ts": "0001-01-01T00:00:00+14:00"})], None)  # a time before year 1
        @example([dumps({**template, "value": 1e308}), dumps({**template, "value": -1e308})], None)
        @example([dumps({**template, "metric_type": "PH", "value": 15.0})], None)  # outside pH's range
        @example([b'{"metric_type": "TEMP_AIR", "value": NaN}', dumps({**template, "value": BIG})], None)
        @example([dumps({**template, "metric_type": "a\x00"}), dumps({**template, "ts": 2**70})], None)
        def run(bad, odd_topic):
            for payload in bad:
                pub.publish(odd_topic or topic, payload)
            n = len(valid)
            # Told apart by value: a Laravel-built database keeps whole seconds of `ts`.
            pub.publish(topic, orjson.dumps({"metric_type": "TEMP_AIR", "value": 20 + n / 1000, "ts": base_ms + n}))
            valid.append(20 + n / 1000)
        run()
    finally:
        pub.close()

    def accounted():
        stored = sql(stack, "SELECT count(*) FROM telemetry_samples") - rows_before
        refused = delta(before, metrics(stack, "history_logger_port"), "telemetry_dropped_total")
        return stored + refused == pub.sent or f"stored {stored} + refused {refused} of {pub.sent}"
    assert pub.sent >= EXAMPLES, pub.sent  # the fuzzing ran
    wait_until(lambda: accounted() is True, 30, f"{pub.sent} telemetry messages stored or refused by reason",
               accounted)
    landed = sql(stack, "SELECT count(DISTINCT value) FROM telemetry_samples"
                        " WHERE node_id = $1 AND value = ANY($2::float8[])", stack.ids["nd-fz-tel"], valid)
    assert landed == len(valid)
    absurd = sql(stack, "SELECT count(*) FROM telemetry_samples WHERE node_id = $1 AND abs(value) > 1e6",
                 stack.ids["nd-fz-tel"])
    assert absurd == 0, "readings outside any physical range were stored (must be dead-lettered as out_of_range)"
    assert_alive(stack)


EVENT_KINDS = {  # kind → (valid template, counter of every message handled)
    "heartbeat": ({"uptime": 1200, "free_heap": 120_000, "rssi": -60}, ("heartbeat_received_total", {})),
    "status": ({"status": "ONLINE", "ts": 12}, ("history_logger_status_received_total", {"kind": "status"})),
    "lwt": ({"status": "offline"}, ("history_logger_status_received_total", {"kind": "lwt"})),
}


@pytest.mark.parametrize("kind", sorted(EVENT_KINDS))
def test_mqtt_life_signs(stack, kind):
    """heartbeat / status / lwt: every message is handled (and a non-object payload refused by reason);
    the valid one sent after the garbage is what the node row shows."""
    template, (handled, labels) = EVENT_KINDS[kind]
    topic = f"{stack.settings.mqtt_topic_root}/{GH}/zn-{stack.ids['Z']}/nd-fz-hb/{kind}"
    before = metrics(stack, "history_logger_port")
    pub, not_objects = Publisher(stack), 0
    if kind == "lwt":  # online first (status and lwt are handled by topic, not in one order across topics)
        testing.publish_sync(stack.settings.mqtt_host, stack.settings.mqtt_port,
                             [(topic.replace("/lwt", "/status"), b'{"status": "ONLINE"}', 1, False)])
        wait_until(lambda: sql(stack, "SELECT status = 'online' FROM nodes WHERE uid = 'nd-fz-hb'"), 30, "online")
    try:
        @FUZZ
        @given(payloads(template))
        @example([dumps({**template, "status": "PWNED"}), dumps({**template, "status": "\x00"})])
        @example([dumps({**template, "uptime": 2**31}), dumps({**template, "uptime": -5, "rssi": BIG})])
        @example([dumps({**template, "ts": "0001-01-01T00:00:00+14:00"}), dumps({**template, "free_heap": 1e308})])
        def run(bad):
            nonlocal not_objects
            for payload in bad:
                pub.publish(topic, payload)
                # status ignores an empty payload (it clears a retained copy); lwt is plain text
                not_objects += (kind == "heartbeat" or (kind == "status" and payload.strip() != b"")) \
                    and not _is_object(payload)
        run()
        last = {"heartbeat": {"uptime": 4321, "free_heap": 99_999, "rssi": -42}, "status": {"status": "ONLINE"},
                "lwt": {"status": "offline"}}[kind]
        pub.publish(topic, orjson.dumps(last))
    finally:
        pub.close()
    wait_until(lambda: delta(before, metrics(stack, "history_logger_port"), handled, **labels) >=
               pub.sent, 60, f"{pub.sent} {kind} messages handled")
    after = metrics(stack, "history_logger_port")
    if kind != "lwt":
        assert delta(before, after, "history_logger_events_invalid_total", kind=kind, reason="invalid_json") == \
            not_objects
    expected = {"heartbeat": ("SELECT free_heap_bytes = 99999 AND rssi = -42", ()),
                "status": ("SELECT status = 'online'", ()), "lwt": ("SELECT status = 'offline'", ())}[kind]
    wait_until(lambda: sql(stack, expected[0] + " FROM nodes WHERE uid = 'nd-fz-hb'"), 30, f"valid {kind} landed")
    assert_alive(stack)


def test_mqtt_command_response(stack):
    """Responses to commands of the node: garbage is refused by reason, each valid ACK settles its command."""
    root = stack.settings.mqtt_topic_root
    topic = f"{root}/{GH}/zn-{stack.ids['Z']}/nd-fz-act/fan_A/command_response"
    before = metrics(stack, "history_logger_port")
    pub, valid, not_objects = Publisher(stack), [], 0
    counter = itertools.count()
    try:
        @FUZZ
        @given(payloads({"cmd_id": "fz-cr", "status": "ACK", "ts": 12}))
        @example([dumps({"cmd_id": "fz-\x00", "status": "ACK"}), dumps({"cmd_id": "fz-cr", "status": "A\x00"})])
        @example([dumps({"cmd_id": "fz-cr", "status": "ERROR", "details": {"n": BIG, "s": "\x00"}})])
        def run(bad):
            nonlocal not_objects
            cmd_id = f"fz-cr-{next(counter)}"
            sql(stack, "INSERT INTO commands (zone_id, node_id, channel, cmd, params, status, cmd_id, source, sent_at,"
                       " created_at, updated_at) VALUES ($1, $2, 'fan_A', 'set_relay', '{}', 'sent', $3, 'fuzz',"
                       " now(), now(), now())", stack.ids["Z"], stack.ids["nd-fz-act"], cmd_id)
            for payload in bad:
                pub.publish(topic, payload)
                not_objects += not _is_object(payload)
            pub.publish(topic, orjson.dumps({"cmd_id": cmd_id, "status": "ACK", "ts": 12}))
            valid.append(cmd_id)
        run()
    finally:
        pub.close()
    wait_until(lambda: delta(before, metrics(stack, "history_logger_port"), "command_response_received_total")
               >= pub.sent, 60, f"{pub.sent} command responses handled")
    wait_until(lambda: sql(stack, "SELECT count(*) FROM commands WHERE cmd_id = ANY($1::text[]) AND status = 'ack'",
                           valid) == len(valid), 30, "valid responses settled their commands")
    after = metrics(stack, "history_logger_port")
    assert delta(before, after, "history_logger_events_invalid_total", kind="command_response",
                 reason="invalid_json") == not_objects
    assert_alive(stack)


def test_mqtt_node_hello(stack):
    """Every hello registers, updates or is refused by reason; each valid new node between them is created."""
    root = stack.settings.mqtt_topic_root
    template = {"message_type": "node_hello", "hardware_id": "esp32-fzfzfzfzfzfz", "node_type": "ph",
                "fw_version": "v1", "hardware_revision": "r1", "capabilities": ["ph"],
                "provisioning_meta": {"greenhouse_token": GH, "zone_id": stack.ids["Z"], "node_name": "n"}}
    meta = st.tuples(st.sampled_from(["greenhouse_token", "zone_id", "node_name"]), HOSTILE).map(
        lambda kv: dumps({**template, "provisioning_meta": {**template["provisioning_meta"], kv[0]: kv[1]}}))
    before = metrics(stack, "registry_port")
    pub, valid = Publisher(stack), []
    counter = itertools.count()
    try:
        @FUZZ
        @given(st.lists(st.one_of(mutations(template), meta), min_size=1, max_size=4),
               st.sampled_from([f"{root}/node_hello", f"{root}/{GH}/zn-١/nd-x/node_hello",
                                f"{root}/{GH}/zn-{BIG}/nd-x/node_hello"]))
        def run(bad, topic):
            for payload in bad:
                pub.publish(topic, payload)
            hardware_id = f"esp32-fzvalid{next(counter):05d}"
            pub.publish(f"{root}/node_hello", orjson.dumps({**template, "hardware_id": hardware_id}))
            valid.append(hardware_id)
        run()
    finally:
        pub.close()

    def accounted():
        after = metrics(stack, "registry_port")
        handled = (delta(before, after, "registry_registrations_total")
                   + delta(before, after, "registry_node_hello_invalid_total")
                   + delta(before, after, "registry_node_hello_rate_limited_total"))
        return delta(before, after, "node_hello_received_total") == pub.sent and handled == pub.sent and handled
    wait_until(accounted, 60, f"{pub.sent} hellos registered, updated or refused by reason")
    assert sql(stack, "SELECT count(*) FROM nodes WHERE hardware_id = ANY($1::text[])", valid) == len(valid)
    after = metrics(stack, "registry_port")
    assert total(after, "mqtt_handler_errors_total") == 0
    assert_alive(stack)


def test_mqtt_config_request(stack):
    """Every config_request re-sends a config or is ignored by reason; none makes a handler fail."""
    topic = f"{stack.settings.mqtt_topic_root}/{GH}/config_request"
    before = metrics(stack, "registry_port")
    pub = Publisher(stack)
    try:
        @FUZZ
        @given(payloads({"node_id": "nd-fz-cfg"}))
        @example([dumps({"node_id": "nd\x00"}), dumps({"hardware_id": BIG}), dumps({"uid": _deep(50)})])
        def run(bad):
            for payload in bad:
                pub.publish(topic, payload)
        run()
    finally:
        pub.close()
    assert pub.sent >= EXAMPLES, pub.sent

    def accounted():
        after = metrics(stack, "registry_port")
        return (delta(before, after, "registry_messages_ignored_total", kind="config_request")
                + delta(before, after, "registry_config_deliveries_total", trigger="config_request")
                + delta(before, after, "registry_configs_failed_total"))
    wait_until(lambda: accounted() == pub.sent, 60, f"{pub.sent} config requests answered or ignored by reason",
               accounted)
    assert total(metrics(stack, "registry_port"), "mqtt_handler_errors_total") == 0
    assert_alive(stack)


def test_mqtt_config_response(stack):
    """Garbage and forged config_responses change nothing; the node's own ACK of its version is recorded."""
    root, zone = stack.settings.mqtt_topic_root, stack.ids["Z"]
    with httpx.Client(base_url=stack.url("registry_port", ""), timeout=20,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        answer = client.post("/nodes/nd-fz-cfg/config/publish")
        assert answer.status_code == 200, answer.text
        version = answer.json()["data"]["version"]
    topic = f"{root}/{GH}/zn-{zone}/nd-fz-cfg/config_response"
    forged = [f"{root}/{GH}/zn-{stack.ids['E']}/nd-fz-cfg/config_response",
              f"{root}/gh-x/zn-{zone}/nd-fz-cfg/config_response",
              f"{root}/gh-temp/zn-temp/node-temp/config_response", f"{root}/{GH}/zn-{zone}/nd-nobody/config_response"]
    before = metrics(stack, "registry_port")
    pub = Publisher(stack)
    try:
        @FUZZ
        @given(payloads({"status": "ERROR", "error": "e", "version": version, "node_id": "nd-fz-cfg"}),
               st.sampled_from([topic, *forged]))
        def run(bad, where):
            for payload in bad:
                pub.publish(where, payload)
        run()
        pub.publish(topic, orjson.dumps({"status": "ACK", "version": version}))
    finally:
        pub.close()

    def accounted():
        after = metrics(stack, "registry_port")
        parsed = delta(before, after, "config_response_received_total")
        refused_early = sum(delta(before, after, "registry_config_response_invalid_total", reason=r)
                            for r in ("invalid_json", "invalid_value", "invalid_field"))
        return parsed + refused_early == pub.sent
    wait_until(accounted, 60, f"{pub.sent} config responses handled or refused by reason")
    wait_until(lambda: sql(stack, "SELECT applied_version FROM node_config_delivery WHERE node_id = $1",
                           stack.ids["nd-fz-cfg"]) == version, 30, "the node's own ACK recorded")
    assert sql(stack, "SELECT node_error FROM node_config_delivery WHERE node_id = $1", stack.ids["nd-fz-cfg"]) is None
    assert total(metrics(stack, "registry_port"), "mqtt_handler_errors_total") == 0
    assert_alive(stack)


@pytest.mark.parametrize("port_field, method, path", [
    ("bridge_port", "POST", "/bridge/zones/1/commands"),
    ("registry_port", "PUT", "/nodes/nd-fz-reg/config"),
    ("history_logger_port", "POST", "/ingest/telemetry"),
])
def test_oversized_body_is_refused_before_it_is_read(stack, port_field, method, path):
    """Content-Length alone decides: 413 while the client has sent no byte of its 60 MB body."""
    async def ask() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", getattr(stack.settings, port_field))
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\nAuthorization: Bearer {TOKEN}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 60000000\r\n\r\n".encode())
            await writer.drain()
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # an answer needs no body
        finally:
            writer.close()
    head = asyncio.run(ask())
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert_alive(stack)


def test_no_handler_failed_and_no_process_died(stack):
    """After all of it: every process runs, no MQTT handler raised, and every service still answers."""
    assert_alive(stack)
    for field in ("bridge_port", "history_logger_port", "automation_port", "scheduler_port", "registry_port"):
        values = metrics(stack, field)
        assert total(values, "mqtt_handler_errors_total") == 0, (field, {k: v for k, v in values.items()
                                                                         if k[0] == "mqtt_handler_errors_total"})
    asyncio.run(stack.wait_ready())
    assert math.isfinite(sql(stack, "SELECT coalesce(max(value), 0) FROM telemetry_last"))
