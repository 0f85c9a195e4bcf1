"""Settings from environment variables: one frozen, typed object per process.

Every variable is documented in README.md with its default. A bad value stops start-up
with one line naming the variable and what it accepts (`settings_or_exit`).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

T = TypeVar("T")

# Values that count as "still a default" for a secret in production.
PLACEHOLDER_SECRETS = {"", "hydro", "changeme", "change-me", "secret", "password", "test", "dev"}
PRODUCTION_ENVS = {"production", "prod"}
# Bearer tokens shown in README, docker-compose.dev.yml, tools/dev and the tests: never accepted in production.
EXAMPLE_TOKENS = {"dev-token", "bench-token", "bridge-test-token", "process-token", "token", "your-token",
                  "api-token", "changeme-token"}
MIN_TOKEN_LENGTH = 16


class SettingsError(ValueError):
    """A configuration problem, described in one line that names the variable."""


class EnvReader:
    """Typed access to an environment mapping; every error names the variable."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        self.environ = os.environ if environ is None else environ

    def raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        return None if value is None else value.strip()

    def str(self, name: str, default: str = "", max_len: int = 4096) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if len(value) > max_len:
            raise SettingsError(f"{name} is too long: at most {max_len} characters")
        return value

    def int(self, name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        value = self.raw(name)
        accepts = _range_text("an integer", lo, hi)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise SettingsError(f"{name}={value!r} is not valid: expected {accepts}") from None
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            raise SettingsError(f"{name}={value!r} is out of range: expected {accepts}")
        return number

    def float(self, name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        value = self.raw(name)
        accepts = _range_text("a number", lo, hi)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"{name}={value!r} is not valid: expected {accepts}") from None
        if number != number or (lo is not None and number < lo) or (hi is not None and number > hi):
            raise SettingsError(f"{name}={value!r} is out of range: expected {accepts}")
        return number

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None or value == "":
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={value!r} is not valid: expected 1/0, true/false, yes/no or on/off")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is None or value == "":
            return default
        if value.lower() not in choices:
            raise SettingsError(f"{name}={value!r} is not valid: expected one of {', '.join(choices)}")
        return value.lower()


def _range_text(kind: str, lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"{kind} from {lo} to {hi}"
    if lo is not None:
        return f"{kind} >= {lo}"
    if hi is not None:
        return f"{kind} <= {hi}"
    return kind


@dataclass(frozen=True)
class Settings:
    app_env: str
    log_level: str
    http_host: str
    # MQTT
    mqtt_host: str
    mqtt_port: int
    mqtt_user: str
    mqtt_pass: str
    mqtt_tls: bool
    mqtt_ca_file: str
    mqtt_client_id: str
    mqtt_clean_session: bool
    mqtt_keepalive: int
    mqtt_topic_root: str
    mqtt_receive_maximum: int
    mqtt_shared_group: str
    mqtt_zone_format: str
    # PostgreSQL
    pg_host: str
    pg_port: int
    pg_db: str
    pg_user: str
    pg_pass: str
    db_pool_min: int
    db_pool_max: int
    db_command_timeout_sec: float
    # Redis
    redis_host: str
    redis_port: int
    redis_db: int
    redis_pass: str
    redis_key_prefix: str
    # Laravel and inbound auth
    laravel_api_url: str
    laravel_api_token: str
    laravel_register_token: str
    laravel_http_timeout_sec: float
    py_api_token: str
    # Telemetry and node life signs
    telemetry_batch_size: int
    telemetry_flush_ms: int
    telemetry_queue_capacity: int
    telemetry_max_age_min: int
    command_timeout_sec: int
    node_offline_timeout_sec: int
    heartbeat_uptime_ms: bool
    # Ports
    bridge_port: int
    history_logger_port: int
    history_logger_metrics_port: int
    automation_port: int
    scheduler_port: int
    registry_port: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = EnvReader(environ)
        port = lambda name, default: env.int(name, default, 1, 65535)  # noqa: E731
        settings = cls(
            app_env=env.str("APP_ENV", "local").lower(),
            log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            http_host=env.str("HTTP_HOST", "0.0.0.0"),
            mqtt_host=env.str("MQTT_HOST", "mqtt"),
            mqtt_port=port("MQTT_PORT", 1883),
            mqtt_user=env.str("MQTT_USER"),
            mqtt_pass=env.str("MQTT_PASS"),
            mqtt_tls=env.bool("MQTT_TLS", False),
            mqtt_ca_file=env.str("MQTT_CA_FILE"),
            mqtt_client_id=env.str("MQTT_CLIENT_ID", "hydro-core", max_len=48),
            mqtt_clean_session=env.bool("MQTT_CLEAN_SESSION", False),
            mqtt_keepalive=env.int("MQTT_KEEPALIVE", 30, 5, 3600),
            mqtt_topic_root=env.str("MQTT_TOPIC_ROOT", "hydro", max_len=64),
            mqtt_receive_maximum=env.int("MQTT_RECEIVE_MAXIMUM", 1000, 1, 65535),
            mqtt_shared_group=env.str("MQTT_SHARED_GROUP", max_len=64),
            mqtt_zone_format=env.choice("MQTT_ZONE_FORMAT", "id", ("id",)),
            pg_host=env.str("PG_HOST", "db"),
            pg_port=port("PG_PORT", 5432),
            pg_db=env.str("PG_DB", "hydro_dev"),
            pg_user=env.str("PG_USER", "hydro"),
            pg_pass=env.str("PG_PASS", "hydro"),
            db_pool_min=env.int("DB_POOL_MIN", 1, 0, 100),
            db_pool_max=env.int("DB_POOL_MAX", 10, 1, 200),
            db_command_timeout_sec=env.float("DB_COMMAND_TIMEOUT_SEC", 10.0, 0.1, 3600),
            redis_host=env.str("REDIS_HOST", "redis"),
            redis_port=port("REDIS_PORT", 6379),
            redis_db=env.int("REDIS_DB", 0, 0, 15),
            redis_pass=env.str("REDIS_PASS"),
            redis_key_prefix=env.str("REDIS_KEY_PREFIX", "hydro:", max_len=128),
            laravel_api_url=env.str("LARAVEL_API_URL", "http://laravel").rstrip("/"),
            laravel_api_token=env.str("LARAVEL_API_TOKEN"),
            laravel_register_token=env.str("LARAVEL_REGISTER_TOKEN"),
            laravel_http_timeout_sec=env.float("LARAVEL_HTTP_TIMEOUT_SEC", 10.0, 0.1, 300),
            py_api_token=env.str("PY_API_TOKEN"),
            telemetry_batch_size=env.int("TELEMETRY_BATCH_SIZE", 200, 1, 100_000),
            telemetry_flush_ms=env.int("TELEMETRY_FLUSH_MS", 500, 1, 600_000),
            telemetry_queue_capacity=env.int("TELEMETRY_QUEUE_CAPACITY", 100_000, 100, 100_000_000),
            telemetry_max_age_min=env.int("TELEMETRY_MAX_AGE_MIN", 30, 1, 10_080),
            command_timeout_sec=env.int("COMMAND_TIMEOUT_SEC", 30, 1, 86_400),
            node_offline_timeout_sec=env.int("NODE_OFFLINE_TIMEOUT_SEC", 90, 5, 86_400),
            heartbeat_uptime_ms=env.bool("HEARTBEAT_UPTIME_MS", True),
            bridge_port=port("BRIDGE_PORT", 9000),
            history_logger_port=port("HISTORY_LOGGER_PORT", env.int("SERVICE_PORT", 9300, 1, 65535)),
            history_logger_metrics_port=port("HISTORY_LOGGER_METRICS_PORT", 9301),
            automation_port=port("AUTOMATION_PORT", 9401),
            scheduler_port=port("SCHEDULER_PORT", 9402),
            registry_port=port("REGISTRY_PORT", 9404),
        )
        if settings.db_pool_min > settings.db_pool_max:
            raise SettingsError(f"DB_POOL_MIN={settings.db_pool_min} is larger than DB_POOL_MAX={settings.db_pool_max}")
        if settings.mqtt_tls and settings.mqtt_ca_file and not os.path.isfile(settings.mqtt_ca_file):
            raise SettingsError(f"MQTT_CA_FILE={settings.mqtt_ca_file!r} does not exist")
        return settings

    @property
    def is_production(self) -> bool:
        return self.app_env in PRODUCTION_ENVS

    def require_secrets(self, *names: str) -> None:
        """In production, refuse to start while a named secret is missing or a placeholder.

        PG_PASS is always required; each service adds the secrets it uses (the bridge PY_API_TOKEN, ...).
        """
        if not self.is_production:
            return
        for name in ("PG_PASS", *names):
            value = getattr(self, name.lower())
            if value.strip().lower() in PLACEHOLDER_SECRETS:
                raise SettingsError(
                    f"{name} must be set to a real secret when APP_ENV={self.app_env} (it is missing or a default)"
                )
            if name == "PY_API_TOKEN" and (value.strip().lower() in EXAMPLE_TOKENS
                                           or len(value.strip()) < MIN_TOKEN_LENGTH):
                raise SettingsError(
                    f"PY_API_TOKEN must be a real secret of at least {MIN_TOKEN_LENGTH} characters when "
                    f"APP_ENV={self.app_env} (an example token or a short one is refused)")

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def pg_dsn(self) -> str:
        return f"postgresql://{self.pg_user}@{self.pg_host}:{self.pg_port}/{self.pg_db}"


def get_settings(environ: Mapping[str, str] | None = None) -> Settings:
    return Settings.from_env(environ)


def settings_or_exit(load: Callable[[], T] = get_settings) -> T:
    """Run a settings loader; on a configuration error print one line and exit 2 (no traceback)."""
    try:
        return load()
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
