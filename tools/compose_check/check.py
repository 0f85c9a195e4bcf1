"""`make compose-check`: both compose stacks run on a real Docker engine, checked from outside.

    python tools/compose_check/check.py [--only dev|prod] [--keep-logs]

1. The engine runs (installs docker.io / docker-compose / debootstrap with apt and starts dockerd when
   needed) and the stand-in base images exist (engine.py: built once from Debian packages, reused).
2. Dev stack: `up -d --build`; every service healthy within a bound; the simulator's telemetry in
   telemetry_samples inside the database container; a command sent to the bridge's published port
   acknowledged by a simulated node; Prometheus scraping all five services; `down -v` leaves nothing.
3. Prod stack: a generated .env of throwaway secrets and a generated broker password file; refused
   without the secrets; every service on the broker as its own user; a node's credentials cannot
   publish under another node or read `#`, while its own telemetry lands in the database and its own
   command reaches it; data survives a restart and a re-creation of the db and redis containers.
4. One line per check (PASS / FAIL / SKIP); exit status 1 when any check failed.

What is specific to this machine stays here, never in the compose files: the stand-in images, and a
copy of each compose file (.compose-check.<stack>.yml beside it, removed afterwards) whose only
changes are the host side of published ports (free ports on 127.0.0.1, so nothing clashes with the
servers this machine already runs on 1883 / 5432 / 6379) and, for prod, the password file's path.
Services without a stand-in (Grafana) are left out of `up` and reported as SKIP.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import engine  # noqa: E402

LOG_DIR = Path(os.environ.get("COMPOSE_CHECK_LOGS", "/tmp/hydro-compose-check"))
HEALTH_BOUND_SEC = float(os.environ.get("COMPOSE_CHECK_HEALTH_SEC", "300"))
WAIT_SEC = 120.0            # bound for data to show up (telemetry, acks, scrapes)
SERVICES = ("mqtt-bridge", "history-logger", "automation-engine", "scheduler", "device-registry")
MQTT_USERS = {"mqtt-bridge": "mqtt_bridge", "history-logger": "history_logger",
              "automation-engine": "automation_engine", "scheduler": "scheduler",
              "device-registry": "device_registry"}
NODE_A, NODE_B = "nd-ph-demo-a", "nd-ec-demo-a"   # seeded demo nodes (tools/dev/stack.py), both zone A
SECRET_VARS = ("PG_PASS", "REDIS_PASS", "PY_API_TOKEN", "MQTT_BRIDGE_PASS", "HISTORY_LOGGER_MQTT_PASS",
               "AUTOMATION_MQTT_PASS", "SCHEDULER_MQTT_PASS", "REGISTRY_MQTT_PASS", "GRAFANA_ADMIN_PASSWORD",
               "LARAVEL_API_TOKEN")


class Report:
    def __init__(self) -> None:
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def line(self, verdict: str, name: str, detail: str = "") -> bool:
        self.counts[verdict] += 1
        print(f"{verdict}  {name}" + (f": {detail}" if detail else ""), flush=True)
        return verdict != "FAIL"

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        return self.line("PASS" if ok else "FAIL", name, detail)

    def summary(self) -> str:
        return f"{self.counts['PASS']} passed, {self.counts['FAIL']} failed, {self.counts['SKIP']} skipped"


def free_port() -> int:
    """A free port below the kernel's ephemeral range: the engine binds it a little later, and a port
    from that range can be taken meanwhile by any process's outgoing connection (or a test's port 0)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(20000, max(low, 20001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found below the ephemeral range")


def poll(fn, bound: float, every: float = 2.0):
    """fn() until it returns something truthy or the bound passes; returns the last result."""
    deadline = time.monotonic() + bound
    while True:
        result = fn()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(every)


def docker(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([engine.docker_cli(), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])}: {proc.stderr.strip()[-500:]}")
    return proc


def http(method: str, url: str, token: str = "", body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return 0, {"error": str(exc)}


class Stack:
    """One compose file run as its own project, through a copy that only moves published ports."""

    def __init__(self, kind: str, report: Report, mounts: dict[str, str] | None = None,
                 env_file: Path | None = None) -> None:
        self.kind, self.report, self.env_file = kind, report, env_file
        self.source = ROOT / f"docker-compose.{kind}.yml"
        self.file = ROOT / f".compose-check.{kind}.yml"
        self.project = f"hydrocheck{kind}"
        self.ports: dict[tuple[str, int], int] = {}
        self.mounts = mounts or {}
        self.config = self._derive(self.mounts)
        self.services = [s for s, spec in self.config["services"].items() if spec.get("image") not in engine.NO_STANDIN]
        self.left_out = [s for s in self.config["services"] if s not in self.services]

    def _derive(self, mounts: dict[str, str]) -> dict:
        # docker-compose's own interpreter has PyYAML; JSON is YAML, so the copy is written as JSON.
        python = Path(shutil.which("docker-compose")).read_text(errors="replace").splitlines()[0][2:].strip()
        loaded = subprocess.run(python.split() + ["-c", "import json, sys, yaml; "
                                "json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)", str(self.source)],
                                capture_output=True, text=True, check=True)
        config = json.loads(loaded.stdout)
        for name, service in config["services"].items():
            if service.get("ports"):
                moved = []
                for spec in service["ports"]:
                    target = str(spec).rsplit(":", 1)[-1]
                    port = free_port()
                    self.ports[(name, int(target.split("/")[0]))] = port
                    moved.append(f"127.0.0.1:{port}:{target}")
                service["ports"] = moved
            service["volumes"] = [mounts.get(v.split(":")[0], v.split(":")[0]) + v[len(v.split(":")[0]):]
                                  if isinstance(v, str) else v for v in service.get("volumes", [])]
            if not service["volumes"]:
                del service["volumes"]
        self.file.write_text(json.dumps(config, indent=1))
        return config

    def compose(self, *args: str, timeout: float = 900, env_file: Path | None = None,
                log: str | None = None) -> subprocess.CompletedProcess:
        env_file = env_file or self.env_file
        cmd = ["docker-compose", "-p", self.project, "-f", str(self.file)]
        if env_file:
            cmd += ["--env-file", str(env_file)]
        # Nothing of the caller's environment reaches the interpolation but what a shell always has.
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "DOCKER_HOST") if k in os.environ}
        proc = subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        if log:
            (LOG_DIR / f"{self.kind}-{log}.log").write_text(f"$ {' '.join(cmd + list(args))}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def container(self, service: str) -> str:
        ids = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}",
                     "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        return ids[0] if ids else ""

    def state(self, service: str) -> tuple[str, str, int]:
        cid = self.container(service)
        if not cid:
            return "absent", "none", -1
        out = docker("inspect", "-f", "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}"
                     "{{else}}none{{end}} {{.State.ExitCode}}", cid).stdout.split()
        return (out[0], out[1], int(out[2])) if len(out) == 3 else ("unknown", "none", -1)

    def wait_healthy(self, services: list[str], label: str) -> bool:
        """Each service healthy (one-shots: exited 0) within HEALTH_BOUND_SEC; one line each."""
        start = time.monotonic()
        pending = {s: self.config["services"][s] for s in services}
        done: dict[str, float] = {}
        failed = False   # a one-shot that exited non-zero will not recover
        while pending and not failed and time.monotonic() - start < HEALTH_BOUND_SEC:
            for name in list(pending):
                status, health, code = self.state(name)
                one_shot = pending[name].get("restart") == "no"
                if (one_shot and status == "exited" and code == 0) or (not one_shot and health == "healthy"):
                    done[name] = time.monotonic() - start
                    del pending[name]
                elif one_shot and status == "exited":
                    failed = True
            if pending and not failed:
                time.sleep(2)
        ok = True
        for name in services:
            if name in done:
                what = "one-shot exited 0" if self.config["services"][name].get("restart") == "no" else "healthy"
                self.report.check(f"{self.kind}: {name} {label}", True, f"{what} (waited {done[name]:.0f}s)")
            else:
                status, health, code = self.state(name)
                logs = docker("logs", "--tail", "15", self.container(name)) if self.container(name) else None
                tail = (logs.stdout + logs.stderr)[-600:] if logs else ""
                ok = self.report.check(f"{self.kind}: {name} {label}", False,
                                       f"{status}/{health}/exit {code} within {HEALTH_BOUND_SEC:.0f}s; last log: {tail!r}")
        return ok and not pending

    def sql(self, query: str, db: str, user: str = "hydro") -> str:
        proc = docker("exec", self.container("db"), "psql", "-U", user, "-d", db, "-tAc", query, timeout=60)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def leftovers(self) -> list[str]:
        found = []
        for kind in ("ps -a", "network ls", "volume ls"):
            out = docker(*kind.split(), "-q", "--filter", f"label=com.docker.compose.project={self.project}").stdout.split()
            found += [f"{kind.split()[0]} {x[:12]}" for x in out]
        return found

    def down(self) -> bool:
        proc = self.compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout=300, log="down")
        left = self.leftovers()
        return self.report.check(f"{self.kind}: down -v leaves no container, network or volume",
                                 proc.returncode == 0 and not left,
                                 f"exit {proc.returncode}" + (f", left: {', '.join(left)}" if left else ""))

    def cleanup(self) -> None:
        if self.leftovers():
            self.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300)
        self.file.unlink(missing_ok=True)

    def up(self, services: list[str] | None = None, label: str = "up -d --build") -> bool:
        if self.leftovers():   # an earlier run was interrupted before its `down`
            self.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300, log="stale-down")
        proc = self.compose("up", "-d", "--build", *(services or self.services), timeout=1800, log="up")
        if proc.returncode != 0 and "address already in use" in proc.stderr:
            # Another process took a chosen port in the meantime: new ports, once more.
            self.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300, log="port-retry-down")
            self.ports.clear()
            self.config = self._derive(self.mounts)
            proc = self.compose("up", "-d", "--build", *(services or self.services), timeout=1800, log="up")
        return self.report.check(f"{self.kind}: {label}", proc.returncode == 0,
                                 f"exit {proc.returncode}" + ("" if proc.returncode == 0 else
                                                             f", see {LOG_DIR}/{self.kind}-up.log: {proc.stderr.strip()[-400:]!r}"))

    def skip_left_out(self) -> None:
        for name in self.left_out:
            image = self.config["services"][name]["image"]
            self.report.line("SKIP", f"{self.kind}: {name}", f"not started: no stand-in for {image} "
                             f"({engine.NO_STANDIN[image]})")


# ---------------------------------------------------------------------------------------------
def check_engine(report: Report) -> bool:
    try:
        installed = engine.ensure_host_packages()
        report.check("engine: host packages", True, f"installed {', '.join(installed)}" if installed
                     else "docker.io, docker-compose, debootstrap present")
        report.check("engine: dockerd answers", True, engine.start_engine())
        report.check("engine: stand-in base image", True, engine.ensure_base())
        for image, name in engine.STANDIN_IMAGES.items():
            report.check(f"engine: image {image}", True, engine.ensure_standin(image, name, LOG_DIR))
    except (engine.EngineError, subprocess.TimeoutExpired) as exc:
        return report.check("engine", False, str(exc))
    return True


def check_prometheus(stack: Stack) -> None:
    port = stack.ports.get(("prometheus", 9090))
    if "prometheus" not in stack.services or port is None:
        return

    def targets():
        status, body = http("GET", f"http://127.0.0.1:{port}/api/v1/targets")
        health = {t["labels"].get("job"): t.get("health") for t in body.get("data", {}).get("activeTargets", [])}
        return health if all(health.get(s) == "up" for s in SERVICES) else None
    health = poll(targets, WAIT_SEC, 5)
    stack.report.check(f"{stack.kind}: Prometheus scrapes all five services", bool(health),
                       json.dumps(health or http("GET", f"http://127.0.0.1:{port}/api/v1/targets")[1])[:400])


def run_dev(report: Report) -> None:
    stack = Stack("dev", report)
    try:
        stack.skip_left_out()
        if not stack.up():
            return
        if not stack.wait_healthy(stack.services, "up"):
            return
        rows = poll(lambda: int(stack.sql("SELECT count(*) FROM telemetry_samples", "hydro_dev") or 0), WAIT_SEC)
        report.check("dev: simulator telemetry in telemetry_samples (db container)", rows > 0, f"{rows} rows")

        bridge = f"http://127.0.0.1:{stack.ports[('mqtt-bridge', 9000)]}"
        status, body = http("POST", f"{bridge}/bridge/nodes/{NODE_A}/commands", "dev-token",
                            {"type": "calibrate", "channel": "ph_sensor", "params": {"stage": 1, "known_ph": 7.0}})
        cmd_id = body.get("data", {}).get("command_id")
        if report.check("dev: command accepted on the bridge's published port", status == 200 and bool(cmd_id),
                        f"HTTP {status} {json.dumps(body)[:200]}"):
            final = poll(lambda: (lambda s: s if s in ("ack", "failed", "timeout") else None)(
                http("GET", f"{bridge}/bridge/commands/{cmd_id}", "dev-token")[1].get("data", {}).get("status")), WAIT_SEC)
            report.check("dev: command acknowledged by a simulated node", final == "ack", f"{cmd_id} status {final}")
        check_prometheus(stack)
    finally:
        stack.down()
        stack.cleanup()


# ---------------------------------------------------------------------------------------------
class MqttProbe:
    """A client on the published broker port that records what reaches it (MQTT 5: reason codes)."""

    def __init__(self, port: int, user: str, password: str, name: str) -> None:
        import paho.mqtt.client as paho
        self.messages: list[tuple[str, bytes]] = []
        self.suback: dict[int, list[int]] = {}
        self.puback: dict[int, int] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"compose-check-{name}",
                                  protocol=paho.MQTTv5)
        self.client.username_pw_set(user, password)
        self.client.on_message = lambda c, u, m: self._record(m.topic, m.payload)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.suback.__setitem__(mid, [int(x.value) for x in codes])
        self.client.on_publish = lambda c, u, mid, code, p: self.puback.__setitem__(mid, int(code.value))
        self.connected = threading.Event()
        self.connect_code: int | None = None

        def on_connect(c, u, flags, code, props):
            self.connect_code = int(code.value)
            self.connected.set()
        self.client.on_connect = on_connect
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self.connected.wait(20)

    def _record(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.messages.append((topic, payload))

    def subscribe(self, topic: str) -> list[int]:
        _, mid = self.client.subscribe(topic, qos=1)
        poll(lambda: mid in self.suback, 20, 0.1)
        return self.suback.get(mid, [-1])

    def publish(self, topic: str, payload: dict) -> int:
        info = self.client.publish(topic, json.dumps(payload), qos=1)
        poll(lambda: info.mid in self.puback, 20, 0.1)
        return self.puback.get(info.mid, -1)

    def seen(self, predicate) -> list[tuple[str, bytes]]:
        with self.lock:
            return [m for m in self.messages if predicate(m)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def prod_secrets(tmp: Path) -> tuple[Path, Path, dict[str, str], dict[str, str]]:
    """A throwaway .env and broker password file (deploy/mosquitto/make_passwd.sh) with two nodes."""
    values = {name: secrets.token_urlsafe(18) for name in SECRET_VARS}
    values["HYDRO_VERSION"] = "compose-check"   # our images get their own tag, never :latest
    env_file = tmp / "prod.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    nodes = {NODE_A: secrets.token_urlsafe(12), NODE_B: secrets.token_urlsafe(12)}
    nodes_file = tmp / "nodes.txt"
    nodes_file.write_text("".join(f"{u} {p}\n" for u, p in nodes.items()))
    passwd = tmp / "passwd"
    subprocess.run(["bash", str(ROOT / "deploy/mosquitto/make_passwd.sh"), str(nodes_file)], check=True,
                   capture_output=True, env={**os.environ, **values, "PASSWD_FILE": str(passwd)}, timeout=120)
    return env_file, passwd, values, nodes


def run_prod(report: Report) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hydro-compose-check-prod-"))
    try:
        env_file, passwd, values, nodes = prod_secrets(tmp)
    except subprocess.CalledProcessError as exc:
        report.check("prod: broker password file (make_passwd.sh)", False, exc.stderr.decode(errors="replace")[-400:])
        return
    report.check("prod: throwaway secrets and broker password file", True,
                 f"{len(values) - 1} secrets, {len(passwd.read_text().splitlines())} broker users (5 services, 2 nodes)")
    stack = Stack("prod", report, mounts={"./deploy/mosquitto/passwd": str(passwd)}, env_file=env_file)
    try:
        stack.skip_left_out()
        empty = tmp / "empty.env"
        empty.write_text("")
        proc = stack.compose("up", "-d", "--no-build", *stack.services, env_file=empty, timeout=300, log="refused")
        left = stack.leftovers()
        named = re.search(r"set (\w+)", proc.stderr)
        report.check("prod: refuses to start without the secrets", proc.returncode != 0 and not left
                     and bool(named) and named.group(1) in SECRET_VARS,
                     f"exit {proc.returncode}, names {named.group(1) if named else proc.stderr.strip()[-200:]!r}, "
                     f"{'created ' + ', '.join(left) if left else 'nothing created'}")

        if not stack.up() or not stack.wait_healthy(stack.services, "up"):
            return
        check_broker_users(stack)
        check_prometheus(stack)
        check_no_test_code(stack)
        seeded = stack.compose("run", "--rm", "--no-deps", "-v", f"{ROOT}/tools:/app/tools:ro", "migrate",
                               "python", "tools/dev/stack.py", "--seed-only", timeout=300, log="seed")
        if not report.check("prod: demo greenhouse seeded (tools/dev/stack.py --seed-only in the stack)",
                            seeded.returncode == 0, f"exit {seeded.returncode}"
                            + ("" if seeded.returncode == 0 else f" {seeded.stderr.strip()[-300:]!r}")):
            return
        check_prod_broker(stack, values, nodes)
        check_prod_persistence(stack, values)
    finally:
        stack.down()
        stack.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def check_no_test_code(stack: Stack) -> None:
    """What the images ship is the product: no test modules, fixtures or test helpers (.dockerignore)."""
    for service in SERVICES:
        found = docker("exec", stack.container(service), "find", "/app", "-name", "test_*.py", "-o",
                       "-name", "conftest.py", "-o", "-name", "testing.py")
        stack.report.check(f"{stack.kind}: {service} image holds no test code", found.returncode == 0
                           and not found.stdout.strip(), found.stdout.strip()[:300] or found.stderr.strip()[:300])


def check_broker_users(stack: Stack) -> None:
    """Each service's own connection (from its container's address) logged with its own user name.
    The broker's health check logs in as device_registry from inside the broker: not counted."""
    mqtt_id = stack.container("mqtt")

    def seen() -> dict[str, bool]:
        logs = docker("logs", mqtt_id)
        text = logs.stdout + logs.stderr
        found = {}
        for service, user in MQTT_USERS.items():
            ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                        stack.container(service)).stdout.split()
            found[service] = bool(ip) and re.search(
                rf"New client connected from {re.escape(ip[0])}:\d+ as \S+ \(.*u'{re.escape(user)}'\)", text) is not None
        return found
    result = poll(lambda: (lambda f: f if all(f.values()) else None)(seen()), WAIT_SEC) or seen()
    for service, user in MQTT_USERS.items():
        stack.report.check(f"prod: {service} connects to the broker as {user}", result[service],
                           "its container's connection logged with this user" if result[service]
                           else "no connection from its container with this user in the broker log")


def check_prod_broker(stack: Stack, values: dict[str, str], nodes: dict[str, str]) -> None:
    report, port = stack.report, stack.ports[("mqtt", 1883)]
    where = dict(line.split("|") for line in stack.sql(
        "SELECT n.uid, 'hydro/' || g.uid || '/zn-' || z.id || '/' || n.uid FROM nodes n JOIN zones z ON z.id = n.zone_id "
        f"JOIN greenhouses g ON g.id = z.greenhouse_id WHERE n.uid IN ('{NODE_A}', '{NODE_B}')", "hydro").splitlines())
    probes: list[MqttProbe] = []
    try:
        observer = MqttProbe(port, "history_logger", values["HISTORY_LOGGER_MQTT_PASS"], "observer")
        node = MqttProbe(port, NODE_A, nodes[NODE_A], NODE_A)
        probes += [observer, node]
        report.check("prod: a node connects with its own credentials", node.connect_code == 0,
                     f"CONNACK {node.connect_code}")
        observer.subscribe("hydro/+/+/+/+/telemetry")

        # Forged first, own second: the broker keeps one publisher's order, so once the own message
        # has reached the observer, a forged one let through would have reached it before.
        value = round(6.0 + secrets.randbelow(900) / 1000, 3)
        reading = {"channel": "ph_sensor", "metric_type": "PH", "value": value, "raw": int(value * 1000),
                   "ts": round(time.time(), 3), "stable": True}
        forged = node.publish(f"{where[NODE_B]}/ec_sensor/telemetry", {**reading, "node_id": NODE_B,
                                                                       "channel": "ec_sensor", "metric_type": "EC"})
        node.publish(f"{where[NODE_A]}/ph_sensor/telemetry", {**reading, "node_id": NODE_A})
        arrived = poll(lambda: observer.seen(lambda m: m[0].startswith(where[NODE_A])), 30, 0.2)
        leaked = observer.seen(lambda m: m[0].startswith(where[NODE_B]))
        report.check("prod: ACL: a node cannot publish under another node's topics", bool(arrived) and not leaked,
                     f"own message delivered: {bool(arrived)}, forged delivered: {bool(leaked)}, PUBACK reason {forged}")
        rows = poll(lambda: int(stack.sql(
            "SELECT count(*) FROM telemetry_samples t JOIN nodes n ON n.id = t.node_id "
            f"WHERE n.uid = '{NODE_A}' AND abs(t.value - {value}) < 1e-6", "hydro") or 0), WAIT_SEC)
        report.check("prod: a node's telemetry lands in telemetry_samples (history-logger via the ACL)", rows > 0,
                     f"{rows} rows with value {value}")

        # Mosquitto's ACL file does not refuse a subscription (SUBACK grants it): it filters what is
        # delivered. So `#` must bring the node nothing but what it may read. A service user publishes,
        # in this order, another node's command and config, then this node's command.
        wildcard = node.subscribe("#")
        bridge_user = MqttProbe(port, "mqtt_bridge", values["MQTT_BRIDGE_PASS"], "bridge-user")
        probes.append(bridge_user)
        marker = secrets.token_hex(6)
        bridge_user.publish(f"{where[NODE_B]}/ec_sensor/command", {"cmd_id": f"other-{marker}", "cmd": "calibrate"})
        bridge_user.publish(f"{where[NODE_B]}/config", {"node_id": NODE_B, "marker": marker})
        bridge_user.publish(f"{where[NODE_A]}/ph_sensor/command", {"cmd_id": f"own-{marker}", "cmd": "calibrate"})
        own = poll(lambda: node.seen(lambda m: f"own-{marker}".encode() in m[1]), 30, 0.2)
        foreign = sorted({t for t, _ in node.seen(lambda m: not m[0].startswith(where[NODE_A] + "/"))})
        report.check("prod: ACL: a node subscribed to # receives only its own topics", bool(own) and not foreign,
                     f"SUBACK {wildcard}, own command delivered: {bool(own)}, other topics delivered: {foreign[:3]}")

        bridge, token = f"http://127.0.0.1:{stack.ports[('mqtt-bridge', 9000)]}", values["PY_API_TOKEN"]
        other = http("POST", f"{bridge}/bridge/nodes/{NODE_B}/commands", token,
                     {"type": "calibrate", "channel": "ec_sensor", "params": {"stage": 1, "tds_value": 1000}})
        mine = http("POST", f"{bridge}/bridge/nodes/{NODE_A}/commands", token,
                    {"type": "calibrate", "channel": "ph_sensor", "params": {"stage": 1, "known_ph": 7.0}})
        cmd_id = mine[1].get("data", {}).get("command_id")
        got = poll(lambda: node.seen(lambda m: m[0].endswith("/command") and cmd_id and cmd_id.encode() in m[1]), 30, 0.2)
        stray = node.seen(lambda m: not m[0].startswith(where[NODE_A] + "/"))
        report.check("prod: ACL: a node receives its own command and not another node's",
                     other[0] == 200 and bool(got) and not stray,
                     f"bridge HTTP {other[0]}/{mine[0]}, own command delivered: {bool(got)}, other's delivered: {bool(stray)}")
        if got:
            node.publish(f"{where[NODE_A]}/ph_sensor/command_response",
                         {"cmd_id": cmd_id, "status": "ACK", "details": {"channel": "ph_sensor"}, "ts": 1})
        final = poll(lambda: (lambda s: s if s in ("ack", "failed", "timeout") else None)(
            http("GET", f"{bridge}/bridge/commands/{cmd_id}", token)[1].get("data", {}).get("status")), WAIT_SEC)
        report.check("prod: command on the bridge's published port acknowledged by the node", final == "ack",
                     f"{cmd_id} status {final}")
    finally:
        for probe in probes:
            probe.close()


def check_prod_persistence(stack: Stack, values: dict[str, str]) -> None:
    report, token = stack.report, secrets.token_hex(8)
    stack.sql(f"CREATE TABLE compose_check_marker (token text); INSERT INTO compose_check_marker VALUES ('{token}')", "hydro")
    docker("exec", stack.container("redis"), "redis-cli", "SET", "compose-check:marker", token, check=True)

    def markers() -> tuple[bool, bool]:
        pg = stack.sql("SELECT token FROM compose_check_marker", "hydro") == token
        rd = docker("exec", stack.container("redis"), "redis-cli", "GET", "compose-check:marker").stdout.strip() == token
        return pg, rd
    report.check("prod: markers written to PostgreSQL and Redis", markers() == (True, True), f"token {token}")
    for how, args in (("restart", ("restart", "db", "redis")), ("re-creation", None)):
        if args:
            proc = stack.compose(*args, timeout=300, log="restart")
        else:   # new containers: only the named volumes carry the data over
            proc = stack.compose("rm", "-s", "-f", "db", "redis", timeout=300, log="rm")
            if proc.returncode == 0:
                proc = stack.compose("up", "-d", "--no-deps", "db", "redis", timeout=300, log="recreate")
        if not report.check(f"prod: {how} of db and redis", proc.returncode == 0, f"exit {proc.returncode}"):
            continue
        stack.wait_healthy(["db", "redis"], f"up after {how}")
        pg, rd = markers()
        report.check(f"prod: PostgreSQL data survives the {how}", pg, "marker row read back" if pg else "marker row lost")
        report.check(f"prod: Redis data survives the {how}", rd, "marker key read back" if rd else "marker key lost")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("dev", "prod"), help="run one stack's checks")
    args = p.parse_args(argv)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    report = Report()
    started = time.monotonic()
    if check_engine(report):
        if args.only in (None, "dev"):
            run_dev(report)
        if args.only in (None, "prod"):
            run_prod(report)
    print(f"took {time.monotonic() - started:.0f}s; compose output in {LOG_DIR}")
    print(f"compose-check: {report.summary()}", flush=True)
    return 1 if report.counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
