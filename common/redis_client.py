"""The Redis connection every service uses (telemetry stream, config-changed signal)."""
from __future__ import annotations

import redis.asyncio as redis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .env import Settings

# Worth retrying (the write is held, the broker keeps the messages), never a reason to drop input:
# Redis unreachable, loading, out of memory (maxmemory) or a read-only replica.
REDIS_TRANSIENT = (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, rex.OutOfMemoryError,
                   rex.ReadOnlyError, ConnectionError, OSError)

CONFIG_CHANGED_CHANNEL = "config:changed"  # + key prefix: bridge → automation-engine reload signal


def redis_client(settings: Settings, resend: bool = True) -> redis.Redis:
    """resend=False: a command (or MULTI/EXEC) is never sent again by the client after a connection
    broke. redis-py resends by default, which applies a write twice when only its reply was lost;
    callers whose writes are not idempotent retry themselves and can tell whether it happened."""
    return redis.Redis(
        host=settings.redis_host,
        port=settings.redis_port,
        db=settings.redis_db,
        password=settings.redis_pass or None,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=15,
        **({} if resend else {"retry": Retry(NoBackoff(), 0)}),
    )


def key(settings: Settings, name: str) -> str:
    """A Redis key or channel under the configured prefix."""
    return f"{settings.redis_key_prefix}{name}"
