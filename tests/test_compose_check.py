"""`make compose-check` runs the compose files through a copy: the copy must differ from the original
only where the check says it does (host side of published ports, the generated password file's path),
or the check would prove something about a file no operator runs. No Docker engine needed: both
files go through docker-compose's own `config`. The engine run itself is `make compose-check`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools/compose_check"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import check  # noqa: E402
from test_deploy import COMPOSE_FILES, compose_config, tool  # noqa: E402


def port(spec) -> dict:
    """docker-compose config writes a port long ({published, target}) or short (ip:published:target/tcp)."""
    if isinstance(spec, dict):
        return {"host_ip": spec.get("host_ip", ""), "published": int(spec["published"]), "target": int(spec["target"])}
    ip, published, target = spec.split("/")[0].split(":")
    return {"host_ip": ip, "published": int(published), "target": int(target)}


def split_ports(config: dict) -> dict[str, list]:
    return {name: [port(p) for p in service.pop("ports", [])] for name, service in config["services"].items()}


def volume_target(volume) -> str:
    return volume["target"] if isinstance(volume, dict) else volume.split(":")[1]


def volume_source(volume) -> str:
    return volume["source"] if isinstance(volume, dict) else volume.split(":")[0]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_copy_changes_only_published_ports_and_the_password_file(name, tmp_path):
    tool("docker-compose")
    kind = name.split(".")[1]
    passwd = tmp_path / "passwd"
    stack = check.Stack(kind, check.Report(), mounts={"./deploy/mosquitto/passwd": str(passwd)})
    try:
        original, copy = compose_config(name), compose_config(stack.file.name)
    finally:
        stack.file.unlink(missing_ok=True)
    original_ports, copy_ports = split_ports(original), split_ports(copy)
    assert original_ports.keys() == copy_ports.keys()
    for service, ports in original_ports.items():
        assert [p["target"] for p in ports] == [p["target"] for p in copy_ports[service]], service
        for port in copy_ports[service]:
            assert port["host_ip"] == "127.0.0.1", f"{service}: the copy publishes only on loopback"
            assert stack.ports[(service, port["target"])] == int(port["published"])
    if kind == "prod":
        mounted = [v for v in copy["services"]["mqtt"]["volumes"] if volume_target(v) == "/mosquitto/config/passwd"]
        assert [volume_source(v) for v in mounted] == [str(passwd)]
        for config in (original, copy):
            config["services"]["mqtt"]["volumes"] = [
                v for v in config["services"]["mqtt"]["volumes"] if volume_target(v) != "/mosquitto/config/passwd"]
    assert copy == original


def test_services_without_a_stand_in_are_left_out_and_named():
    tool("docker-compose")
    stack = check.Stack("dev", check.Report())
    stack.file.unlink(missing_ok=True)
    assert stack.left_out == ["grafana"]
    assert {"mqtt", "db", "redis", "prometheus", "node-sim", *check.SERVICES} <= set(stack.services)


def test_make_passwd_hands_the_file_to_the_brokers_user(tmp_path):
    """Mosquitto in the container reads the password file after dropping root, as uid 1883: a file
    private to root kept the prod broker restarting (found by `make compose-check`)."""
    import os
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("only root can hand the file to uid 1883 (the script warns otherwise)")
    tool("mosquitto_passwd")
    passwd = tmp_path / "passwd"
    env = dict(os.environ, PASSWD_FILE=str(passwd), MQTT_BRIDGE_PASS="b", HISTORY_LOGGER_MQTT_PASS="h",
               AUTOMATION_MQTT_PASS="a", SCHEDULER_MQTT_PASS="s", REGISTRY_MQTT_PASS="r")
    made = subprocess.run(["bash", str(ROOT / "deploy/mosquitto/make_passwd.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    st = passwd.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1883, 1883, 0o600)
