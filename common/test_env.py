import subprocess
import sys

import pytest

from common.env import Settings, SettingsError

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_defaults_match_the_contract():
    s = Settings.from_env({})
    assert (s.mqtt_host, s.mqtt_port, s.mqtt_tls, s.mqtt_client_id, s.mqtt_clean_session) == (
        "mqtt", 1883, False, "hydro-core", False)
    assert (s.pg_host, s.pg_port, s.pg_db, s.pg_user) == ("db", 5432, "hydro_dev", "hydro")
    assert (s.telemetry_batch_size, s.telemetry_flush_ms, s.command_timeout_sec) == (200, 500, 30)
    assert (s.bridge_port, s.history_logger_port, s.history_logger_metrics_port) == (9000, 9300, 9301)
    assert (s.automation_port, s.scheduler_port, s.registry_port) == (9401, 9402, 9404)
    assert s.node_offline_timeout_sec == 90 and s.heartbeat_uptime_ms is True


@pytest.mark.parametrize("env, words", [
    ({"MQTT_PORT": "abc"}, ["MQTT_PORT", "integer"]),
    ({"MQTT_PORT": "70000"}, ["MQTT_PORT", "1 to 65535"]),
    ({"TELEMETRY_BATCH_SIZE": "0"}, ["TELEMETRY_BATCH_SIZE", "from 1 to"]),
    ({"MQTT_TLS": "maybe"}, ["MQTT_TLS", "true/false"]),
    ({"MQTT_ZONE_FORMAT": "uid"}, ["MQTT_ZONE_FORMAT", "id"]),
    ({"DB_POOL_MIN": "20", "DB_POOL_MAX": "5"}, ["DB_POOL_MIN", "DB_POOL_MAX"]),
])
def test_bad_values_name_the_variable(env, words):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    for word in words:
        assert word in str(err.value)


def test_production_refuses_default_secrets():
    s = Settings.from_env({"APP_ENV": "production", "PY_API_TOKEN": "t0ken-real"})
    with pytest.raises(SettingsError, match="PG_PASS"):
        s.require_secrets("PY_API_TOKEN")
    s = Settings.from_env({"APP_ENV": "production", "PG_PASS": "s3cret-db"})
    with pytest.raises(SettingsError, match="PY_API_TOKEN"):
        s.require_secrets("PY_API_TOKEN")
    Settings.from_env({"APP_ENV": "prod", "PG_PASS": "s3cret-db", "PY_API_TOKEN": "x9" * 8}).require_secrets(
        "PY_API_TOKEN")
    Settings.from_env({"APP_ENV": "local"}).require_secrets("PY_API_TOKEN")  # not production: allowed


def test_start_up_error_is_one_line_without_traceback():
    code = "from common.env import settings_or_exit; settings_or_exit()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"MQTT_PORT": "abc", "PATH": "/usr/bin"},
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "configuration error: MQTT_PORT='abc' is not valid: expected an integer from 1 to 65535"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("token", ["dev-token", "DEV-TOKEN", "bench-token", "x", "fifteen-chars-x"])
def test_production_refuses_example_and_short_api_tokens(token):
    s = Settings.from_env({"APP_ENV": "production", "PG_PASS": "s3cret-db", "PY_API_TOKEN": token})
    with pytest.raises(SettingsError, match="PY_API_TOKEN must be a real secret of at least 16 characters"):
        s.require_secrets("PY_API_TOKEN")
    Settings.from_env({"APP_ENV": "local", "PY_API_TOKEN": token}).require_secrets("PY_API_TOKEN")  # dev: allowed


@pytest.mark.parametrize("service", ["history-logger", "automation-engine", "scheduler", "mqtt-bridge",
                                     "device-registry"])
def test_every_service_exits_2_with_one_line_on_a_missing_production_secret(service):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "APP_ENV": "production", "PG_PASS": "",
           "PY_API_TOKEN": "a-long-enough-real-token", "PG_HOST": "127.0.0.1", "PG_PORT": "1",
           "MQTT_HOST": "127.0.0.1", "MQTT_PORT": "1", "REDIS_HOST": "127.0.0.1", "REDIS_PORT": "1"}
    proc = subprocess.run([sys.executable, "main.py"], cwd=ROOT / service, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("configuration error:")]
    assert errors == ["configuration error: PG_PASS must be set to a real secret when APP_ENV=production "
                      "(it is missing or a default)"], proc.stderr[-2000:]
