"""`make dev` for real: tools/dev/stack.py brings up the five services and the node simulator on
the shared servers (own database, topic root, Redis prefix, client ids and ports), sees telemetry
rows, /ready 200 everywhere, an automation correction and a command ACK, and stops everything;
every address it prints answers as printed."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import asyncpg
import pytest

from common import testing

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("mqtt-bridge", "history-logger", "automation-engine", "scheduler", "device-registry")


def _stack_env(tag: str, db_name: str) -> tuple[dict[str, str], dict[str, str]]:
    """The environment of a `make dev` run on the shared servers with its own names and ports."""
    ports = {name: str(testing.free_port()) for name in ("BRIDGE_PORT", "HISTORY_LOGGER_PORT",
             "HISTORY_LOGGER_METRICS_PORT", "AUTOMATION_PORT", "SCHEDULER_PORT", "REGISTRY_PORT")}
    shared = testing.SHARED_ENV
    env = dict(os.environ, **ports, PG_DB=db_name, PG_HOST=shared["PG_HOST"], PG_PORT=shared["PG_PORT"],
               PG_USER=shared["PG_USER"], PG_PASS=shared["PG_PASS"], MQTT_HOST=shared["MQTT_HOST"],
               MQTT_PORT=shared["MQTT_PORT"], REDIS_HOST=shared["REDIS_HOST"], REDIS_PORT=shared["REDIS_PORT"],
               MQTT_TOPIC_ROOT=f"hydro-{tag}", REDIS_KEY_PREFIX=f"test:{tag}:", MQTT_CLIENT_ID=f"test-{tag}",
               MQTT_CLEAN_SESSION="1", PYTHON=sys.executable)
    return env, ports


@pytest.mark.skipif(not all((ROOT / s / "main.py").exists() for s in SERVICES), reason="a service has no main.py yet")
def test_stack_comes_up_corrects_and_stops_cleanly(tmp_path):
    tag = testing.unique_id()
    db_name = f"hydro_stack_{tag}"
    env, ports = _stack_env(tag, db_name)
    try:
        result = subprocess.run([sys.executable, str(ROOT / "tools/dev/stack.py"), "--for", "90", "--check",
                                 "--logs", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=150)
        output = result.stdout + result.stderr
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))
        assert result.returncode == 0, output + logs
        assert "check: everything seen" in output
        assert "stopped: nothing left running" in output
        for port in ports.values():  # every service process is gone: nothing listens on its port
            with pytest.raises(TimeoutError):
                testing.wait_port(int(port), timeout=0.3)
    finally:
        asyncio.run(_drop(db_name))
        _clear_retained(f"hydro-{tag}")
        _clear_redis(f"test:{tag}:")


@pytest.mark.skipif(not all((ROOT / s / "main.py").exists() for s in SERVICES), reason="a service has no main.py yet")
def test_every_address_make_dev_prints_answers_as_printed(tmp_path):
    tag = testing.unique_id()
    db_name = f"hydro_stack_{tag}"
    env, ports = _stack_env(tag, db_name)
    lines: list[str] = []
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools/dev/stack.py"), "--no-sim", "--for", "150",
                             "--status-every", "5", "--logs", str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith("ready:") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        printed = "".join(lines)
        where = printed.split("where everything is:")[1].split("ready:")[0]
        urls = re.findall(r"https?://[^\s)]+", where)
        assert len(urls) >= 17 and all(f":{p}/" in " ".join(urls) for p in ports.values()), printed
        for link in urls:
            body = _get_200(link)
            if link.endswith(("/docs", "/redoc")):  # the pages explain the token; their assets are local
                base = link.rsplit("/", 1)[0]
                assert "Authorization: Bearer" in _get_200(f"{base}/openapi.json") and "cdn" not in body, link
                for asset in re.findall(r'(?:src|href)="(/[^"]+)"', body):
                    _get_200(base + asset)
        mqtt = re.search(r"mqtt://([\d.]+):(\d+)", where)
        testing.wait_port(int(mqtt.group(2)), timeout=5, host=mqtt.group(1))
        assert f"Authorization: Bearer {env.get('PY_API_TOKEN', 'dev-token')}" in where
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(10)
        asyncio.run(_drop(db_name))
        _clear_redis(f"test:{tag}:")
    assert "stopped: nothing left running" in "".join(lines), "".join(lines)


def _get_200(link: str, timeout: float = 60.0) -> str:
    """The body of GET `link` once it answers 200 (a service may still be getting ready); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(link, timeout=10) as answer:
                return answer.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{link}: {exc}") from None
            time.sleep(0.5)


async def _drop(name: str) -> None:
    shared = testing.SHARED_ENV
    conn = await asyncpg.connect(host=shared["PG_HOST"], port=int(shared["PG_PORT"]), user=shared["PG_USER"],
                                 password=shared["PG_PASS"] or None, database="postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _clear_retained(root: str) -> None:
    """Empty every retained message the simulated nodes left under this run's topic root."""
    import time

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    shared = testing.SHARED_ENV
    topics: set[str] = set()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=testing.unique_id("cleanup-"))
    client.on_message = lambda c, u, m: topics.add(m.topic) if m.retain and m.payload else None
    client.connect(shared["MQTT_HOST"], int(shared["MQTT_PORT"]))
    client.loop_start()
    client.subscribe(f"{root}/#", qos=1)
    time.sleep(1.0)
    for topic in topics:
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def _clear_redis(prefix: str) -> None:
    import redis

    shared = testing.SHARED_ENV
    client = redis.Redis(host=shared["REDIS_HOST"], port=int(shared["REDIS_PORT"]))
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
