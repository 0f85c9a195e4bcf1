"""Deployment files checked without a Docker engine: both compose files through docker-compose's own
validator, service ↔ folder ↔ port ↔ environment consistency, Dockerfiles, a real Mosquitto on the
dev and prod configs (ACL enforced), promtool on the Prometheus config, and the Grafana dashboard's
metrics and SQL against our sources and schema.

The validators come from Debian packages installed by tools/dev/ensure_tools.sh (`make test`);
a check whose tool is missing is skipped with the reason.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from common import testing
from common.env import Settings

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("mqtt-bridge", "history-logger", "automation-engine", "scheduler", "device-registry")
# which Settings field holds each service's HTTP port (the one /health answers on)
API_PORT = {"mqtt-bridge": "bridge_port", "history-logger": "history_logger_port",
            "automation-engine": "automation_port", "scheduler": "scheduler_port", "device-registry": "registry_port"}
METRICS_PORT = dict(API_PORT, **{"history-logger": "history_logger_metrics_port"})
PROD_SECRETS = {"PG_PASS": "pg-secret", "REDIS_PASS": "redis-secret", "PY_API_TOKEN": "api-secret",
                "MQTT_BRIDGE_PASS": "p1", "HISTORY_LOGGER_MQTT_PASS": "p2", "AUTOMATION_MQTT_PASS": "p3",
                "SCHEDULER_MQTT_PASS": "p4", "REGISTRY_MQTT_PASS": "p5", "GRAFANA_ADMIN_PASSWORD": "p6",
                "LARAVEL_API_TOKEN": "p7"}
COMPOSE_FILES = ("docker-compose.dev.yml", "docker-compose.prod.yml")
DASHBOARD = ROOT / "deploy/grafana/dashboards/hydro-overview.json"


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        pytest.skip(f"{name} is not installed (tools/dev/ensure_tools.sh installs it when run as root)")
    return path


def compose_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROD_SECRETS}
    env.update(extra)
    return env


def compose_config(name: str) -> dict:
    """The file as docker-compose resolves it (anchors merged, variables interpolated), as a dict."""
    compose = tool("docker-compose")
    result = subprocess.run([compose, "-f", name, "config"], cwd=ROOT, capture_output=True, text=True,
                            env=compose_env(**PROD_SECRETS), timeout=60)
    assert result.returncode == 0, result.stderr
    # docker-compose is a Python program with PyYAML: its own interpreter turns the YAML into JSON
    shebang = Path(compose).read_text(errors="replace").splitlines()[0]
    interpreter = shebang[2:].strip().split()[0] if shebang.startswith("#!") else "python3"
    converted = subprocess.run([interpreter, "-c", "import sys, json, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
                               input=result.stdout, capture_output=True, text=True, timeout=30)
    if converted.returncode != 0:
        pytest.skip(f"cannot read docker-compose's output as YAML: {converted.stderr.strip()[:200]}")
    return json.loads(converted.stdout)


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    return {name: compose_config(name) for name in COMPOSE_FILES}


# ---------------------------------------------------------------------------------------
# Compose files
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_is_valid(name):
    compose = tool("docker-compose")
    result = subprocess.run([compose, "-f", name, "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                            env=compose_env(**PROD_SECRETS), timeout=60)
    assert result.returncode == 0, result.stderr


def test_prod_compose_has_no_default_secrets():
    compose = tool("docker-compose")
    for missing in PROD_SECRETS:
        env = compose_env(**{k: v for k, v in PROD_SECRETS.items() if k != missing})
        result = subprocess.run([compose, "-f", "docker-compose.prod.yml", "config", "-q"], cwd=ROOT,
                                capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode != 0 and missing in result.stderr, f"{missing} has a default: {result.stderr}"


def test_every_service_folder_has_its_compose_service_and_dockerfile(configs):
    folders = {p.parent.name for p in ROOT.glob("*/main.py")} | set(SERVICES)
    for name, config in configs.items():
        services = config["services"]
        for folder in sorted(folders):
            assert folder in services, f"{name}: no service {folder}"
            build = services[folder].get("build") or {}
            assert Path(build.get("context", "")).resolve() == ROOT, f"{name}: {folder} builds from the repo root"
            assert build.get("dockerfile") == f"{folder}/Dockerfile", f"{name}: {folder} uses its own Dockerfile"
        assert services["migrate"]["command"] == ["python", "-m", "common.migrate"]
        for folder in folders:
            depends = services[folder]["depends_on"]
            assert depends["migrate"]["condition"] == "service_completed_successfully"
            for infra in ("mqtt", "db", "redis"):
                assert depends[infra]["condition"] == "service_healthy", f"{name}: {folder} → {infra}"


def test_every_long_running_service_has_a_healthcheck(configs):
    for name, config in configs.items():
        for service, spec in config["services"].items():
            if spec.get("restart") == "no":  # one-shot (migrate, seed): done when it exits 0
                continue
            check = spec.get("healthcheck") or {}
            assert check.get("test") and not check.get("disable"), f"{name}: {service} has no healthcheck"
        for folder in SERVICES:
            settings = Settings.from_env({k: str(v) for k, v in config["services"][folder]["environment"].items()})
            test = " ".join(config["services"][folder]["healthcheck"]["test"])
            assert f"127.0.0.1:{getattr(settings, API_PORT[folder])}/health" in test, f"{name}: {folder}: {test}"


def env_names_read(paths: list[Path]) -> set[str]:
    """Variables read through EnvReader (`env.int("NAME", …)`, `env.str("NAME")`, …) in these files."""
    pattern = re.compile(r"(?:\.(?:str|int|float|bool|choice|raw)|\bport|environ\.get|getenv)\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']")
    names = set()
    for path in paths:
        names |= set(pattern.findall(path.read_text()))
    return names


def service_sources(folder: str) -> list[Path]:
    return [p for p in (ROOT / folder).rglob("*.py") if not p.name.startswith("test_")]


def test_environment_names_and_ports_match_the_settings(configs):
    common_names = env_names_read([ROOT / "common/env.py"])
    assert {"MQTT_HOST", "PG_PASS", "BRIDGE_PORT", "HISTORY_LOGGER_METRICS_PORT"} <= common_names
    for name, config in configs.items():
        services = config["services"]
        for folder in SERVICES:
            spec = services[folder]
            env = {k: str(v) for k, v in spec["environment"].items()}
            unknown = set(env) - common_names - env_names_read(service_sources(folder))
            assert not unknown, f"{name}: {folder} sets variables nothing reads: {sorted(unknown)}"
            settings = Settings.from_env(env)
            assert settings.mqtt_host == "mqtt" and settings.pg_host == "db" and settings.redis_host == "redis"
            published = {int(str(p["target"] if isinstance(p, dict) else p).split(":")[-1].split("/")[0])
                         for p in spec.get("ports", [])}
            api = getattr(settings, API_PORT[folder])
            if folder in ("automation-engine", "scheduler") and name.endswith("prod.yml"):
                assert not published, f"{name}: {folder} needs no published port"
            else:
                assert api in published, f"{name}: {folder} listens on {api}, publishes {sorted(published)}"
        if name.endswith("prod.yml"):
            assert not services["db"].get("ports") and not services["redis"].get("ports"), \
                "prod: PostgreSQL and Redis stay inside the compose network"
            for folder in SERVICES:
                assert services[folder]["environment"]["APP_ENV"] == "production"
                assert services[folder]["restart"] == "unless-stopped"
                assert services[folder]["logging"]["options"]["max-size"]
                assert services[folder]["deploy"]["resources"]["limits"]["memory"]
                assert services[folder]["environment"]["MQTT_USER"], f"prod: {folder} has its own broker user"


def test_dockerfiles():
    for folder in SERVICES:
        path = ROOT / folder / "Dockerfile"
        assert path.is_file(), f"{folder} has no Dockerfile"
        text = path.read_text()
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        assert lines[0] == "FROM python:3.11-slim"
        copies = [line.split()[1] for line in lines if line.startswith("COPY ")]
        assert copies and all(src.startswith(("common/", f"{folder}/")) for src in copies), copies
        assert any(line.startswith("RUN pip install -r") and f"{folder}/requirements.txt" in line for line in lines)
        user = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert user and user[-1] not in ("root", "0")
        workdirs = [line.split()[1] for line in lines if line.startswith("WORKDIR ")]
        assert workdirs[-1] == f"/app/{folder}"
        assert "PYTHONPATH=/app" in text
        assert re.search(r"HEALTHCHECK .*\n?.*CMD .*?/health", text), f"{folder}: no HEALTHCHECK on /health"
        assert lines[-1] == 'CMD ["python", "main.py"]'
        pip_at = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install"))
        copied_before = {line.split()[1] for line in lines[:pip_at] if line.startswith("COPY ")}
        pending = [ROOT / folder / "requirements.txt"]
        while pending:  # every requirements file pip reads is in the image before `pip install`
            req = pending.pop()
            assert str(req.relative_to(ROOT)) in copied_before, f"{folder}: {req.relative_to(ROOT)} not copied first"
            for line in req.read_text().splitlines():
                line = line.split("#")[0].strip()
                if line.startswith("-r"):
                    pending.append((req.parent / line[2:].strip()).resolve())
                elif line:
                    assert "==" in line, f"{req.relative_to(ROOT)}: {line} is not pinned"


# ---------------------------------------------------------------------------------------
# Mosquitto with the real configs
# ---------------------------------------------------------------------------------------
def adapt_mosquitto_conf(text: str, port: int, workdir: Path, extra: dict[str, str] | None = None) -> str:
    """The config for a local run: our listener port and data dir; TLS / include lines aside."""
    out = []
    for line in text.splitlines():
        key = line.split()[0] if line.split() else ""
        if key == "listener":
            line = f"listener {port} 127.0.0.1"
        elif key == "persistence_location":
            line = f"persistence_location {workdir}/"
        elif key in ("include_dir", "certfile", "keyfile", "cafile", "log_dest"):
            continue
        elif extra and key in extra:
            line = f"{key} {extra[key]}"
        out.append(line)
    if os.geteuid() == 0:  # else mosquitto drops to user `mosquitto`, who cannot read a pytest tmp dir
        out.append("user root")
    return "\n".join(out) + "\n"


class Mosquitto:
    def __init__(self, conf: str, workdir: Path, port: int):
        (workdir / "mosquitto.conf").write_text(conf)
        self.port = port
        self.log = open(workdir / "mosquitto.log", "wb")
        self.proc = subprocess.Popen([tool("mosquitto"), "-c", str(workdir / "mosquitto.conf")],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            testing.wait_port(port, 10)
        except TimeoutError:
            self.close()
            raise AssertionError(f"mosquitto did not start: {(workdir / 'mosquitto.log').read_text()}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


class Client:
    """A paho client that records what it receives."""

    def __init__(self, port: int, user: str | None = None, password: str | None = None, subscribe: tuple = ()):
        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.refused = None
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=testing.unique_id("deploy-"))
        if user:
            self.client.username_pw_set(user, password)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_connect = self._on_connect
        self._subscribe = subscribe
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.refused = str(reason_code)
            return
        if self._subscribe:
            client.subscribe([(f, 1) for f in self._subscribe])
        else:
            self.subscribed.set()
        self.connected.set()

    def wait(self) -> "Client":
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (self.subscribed.is_set() or self.refused):
            time.sleep(0.02)
        return self

    def publish(self, topic: str, payload: bytes = b"x") -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_mosquitto_dev_config_runs_and_relays(tmp_path):
    text = (ROOT / "deploy/mosquitto/mosquitto.dev.conf").read_text()
    queued = re.search(r"^max_queued_messages\s+(\d+)", text, re.M)
    assert queued and int(queued.group(1)) >= 10_000, "max_queued_messages must be raised well above 1000"
    assert re.search(r"^persistence\s+true", text, re.M)
    port = testing.free_port()
    broker = Mosquitto(adapt_mosquitto_conf(text, port, tmp_path), tmp_path, port)
    try:
        sub = Client(port, subscribe=("hydro/#",)).wait()
        pub = Client(port).wait()
        pub.publish("hydro/gh-1/zn-1/nd-1/ph_sensor/telemetry", b'{"metric_type":"PH","value":5.8}')
        assert until(lambda: sub.messages), "a message published on the dev broker was not delivered"
        sub.close()
        pub.close()
    finally:
        broker.close()
    assert (tmp_path / "mosquitto.db").exists(), "persistence: the broker saves its state on shutdown"


def test_mosquitto_prod_config_enforces_passwords_and_acl(tmp_path):
    tool("mosquitto_passwd")
    text = (ROOT / "deploy/mosquitto/mosquitto.prod.conf").read_text()
    assert re.search(r"^allow_anonymous\s+false", text, re.M)
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("nd-ph-1 node-one\nnd-ph-2 node-two\n")
    passwd = tmp_path / "passwd"
    env = dict(os.environ, PASSWD_FILE=str(passwd), MQTT_BRIDGE_PASS="b", HISTORY_LOGGER_MQTT_PASS="h",
               AUTOMATION_MQTT_PASS="a", SCHEDULER_MQTT_PASS="s", REGISTRY_MQTT_PASS="r")
    made = subprocess.run(["bash", str(ROOT / "deploy/mosquitto/make_passwd.sh"), str(nodes)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert "node-one" not in passwd.read_text(), "passwords are stored hashed"
    port = testing.free_port()
    conf = adapt_mosquitto_conf(text, port, tmp_path, {"password_file": str(passwd),
                                                       "acl_file": str(ROOT / "deploy/mosquitto/acl")})
    broker = Mosquitto(conf, tmp_path, port)
    clients = []
    try:
        anonymous = Client(port).wait()
        clients.append(anonymous)
        assert anonymous.refused, "anonymous clients must be refused"
        logger = Client(port, "history_logger", "h", ("hydro/+/+/+/+/telemetry", "hydro/+/+/+/status")).wait()
        registry = Client(port, "device_registry", "r", ("hydro/node_hello", "hydro/+/+/+/config_response")).wait()
        node = Client(port, "nd-ph-1", "node-one", ("hydro/+/+/+/+/command", "hydro/+/+/+/config")).wait()
        scheduler = Client(port, "scheduler", "s", ("hydro/#",)).wait()
        clients += [logger, registry, node, scheduler]
        assert all(c.connected.is_set() for c in (logger, registry, node, scheduler))
        # a node publishes under its own id only
        node.publish("hydro/gh-1/zn-1/nd-ph-1/ph_sensor/telemetry", b"own")
        node.publish("hydro/gh-1/zn-1/nd-ph-2/ph_sensor/telemetry", b"forged")
        node.publish("hydro/node_hello", b"hello")
        assert until(lambda: (("hydro/gh-1/zn-1/nd-ph-1/ph_sensor/telemetry", b"own") in logger.messages
                              and registry.messages))
        # services reach the node only through the topics they own
        Client(port, "scheduler", "s").wait().publish("hydro/gh-1/zn-1/nd-ph-1/pump_in/command", b"cmd")
        Client(port, "mqtt_bridge", "b").wait().publish("hydro/gh-1/zn-1/nd-ph-1/config", b"cfg")
        Client(port, "mqtt_bridge", "b").wait().publish("hydro/gh-1/zn-1/nd-ph-2/pump_in/command", b"other")
        assert until(lambda: {p for _, p in node.messages} >= {b"cmd", b"cfg"})
        time.sleep(0.5)
        assert b"forged" not in {p for _, p in logger.messages}, "a node wrote under another node's id"
        assert b"other" not in {p for _, p in node.messages}, "a node read another node's commands"
        assert not any(t.endswith("/telemetry") for t, _ in scheduler.messages), "scheduler may not read telemetry"
    finally:
        for client in clients:
            client.close()
        broker.close()


# ---------------------------------------------------------------------------------------
# Prometheus and Grafana
# ---------------------------------------------------------------------------------------
def test_promtool_accepts_the_prometheus_config():
    promtool = tool("promtool")
    result = subprocess.run([promtool, "check", "config", "deploy/prometheus/prometheus.yml"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_all_five_on_their_metrics_ports():
    text = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    targets = set(re.findall(r'"([a-z-]+):(\d+)"', text))
    defaults = Settings.from_env({})
    for folder in SERVICES:
        assert (folder, str(getattr(defaults, METRICS_PORT[folder]))) in targets, f"{folder} not scraped"
    assert ("history-logger", "9301") in targets


def defined_metrics() -> set[str]:
    """Every sample name our prometheus_client metrics expose (defined anywhere in our sources)."""
    pattern = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\s*[(,]\s*[\"']([a-zA-Z_:][a-zA-Z0-9_:]*)[\"']")
    exposed: set[str] = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).parts
        if rel[0] in (".venv", "tests") or path.name.startswith("test_"):
            continue
        for kind, name in pattern.findall(path.read_text(errors="replace")):
            if kind == "Counter":
                base = name[:-6] if name.endswith("_total") else name
                exposed |= {f"{base}_total", f"{base}_created"}
            elif kind == "Gauge":
                exposed.add(name)
            elif kind == "Histogram":
                exposed |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
            else:
                exposed |= {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
    return exposed


PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                "bool", "inf", "nan", "le"}
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def promql_metrics(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![0-9.])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        if text[match.end():].lstrip().startswith("(") or match.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(match.group(0))
    return names


def test_promql_metric_extraction():
    assert promql_metrics('histogram_quantile(0.95, sum by (le) (rate(zone_processing_time_seconds_bucket[5m])))') \
        == {"zone_processing_time_seconds_bucket"}
    assert promql_metrics('sum(up{job=~"a|b"}) or x_total > 0.1') == {"up", "x_total"}


def dashboard_targets() -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_dashboard_queries_only_metrics_we_export():
    exposed = defined_metrics()
    assert {"telemetry_received_total", "zone_processing_time_seconds_bucket", "telemetry_queue_size"} <= exposed
    exprs = [t["expr"] for t in dashboard_targets() if "expr" in t]
    exprs += re.findall(r"^\s*expr:\s*(.+)$", (ROOT / "deploy/prometheus/alerts.yml").read_text(), re.M)
    assert len(exprs) >= 10
    unknown = {name: expr for expr in exprs for name in promql_metrics(expr) if name not in exposed | PROMETHEUS_OWN}
    assert not unknown, f"queried but defined nowhere in our sources: {unknown}"


def test_dashboard_has_the_panels_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in ("telemetry ingest rate", "queue", "dropped", "overflow", "commands by status",
                   "zone processing time", "zone processing errors", "nodes online", "ph per zone", "ec per zone"):
        assert needed in titles, f"no panel for {needed}"
    provisioned = (ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text()
    for target in dashboard_targets():
        assert f"uid: {target['datasource']['uid']}" in provisioned


def grafana_sql(sql: str) -> str:
    """Grafana's PostgreSQL macros, expanded the way Grafana does for a one-hour range."""
    sql = re.sub(r"\$__timeGroupAlias\(([^,]+),\s*'?(\w+)'?\)", r"date_trunc('minute', \1) AS time", sql)
    return re.sub(r"\$__timeFilter\(([^)]+)\)", r"\1 BETWEEN now() - interval '1 hour' AND now()", sql)


async def test_dashboard_sql_runs_on_the_schema(db):
    zone = await testing.seed_zone(db, "gh-1", "Zone A")
    await db.execute("INSERT INTO telemetry_samples (zone_id, metric_type, value, ts) VALUES ($1, 'PH', 5.9,"
                     " now() - interval '1 second')",  # Laravel's ts keeps whole seconds: never after now()
                     zone)
    sqls = [t["rawSql"] for t in dashboard_targets() if "rawSql" in t]
    assert len(sqls) >= 4
    for sql in sqls:
        await db.fetch(grafana_sql(sql))
    ph = next(s for s in sqls if "'PH'" in s)
    rows = await db.fetch(grafana_sql(ph))
    assert [(r["metric"], r["value"]) for r in rows] == [("Zone A", 5.9)]
