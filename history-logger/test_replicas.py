"""Two replicas in one shared-subscription group (MQTT_SHARED_GROUP) on a private Mosquitto: one is
killed with -9 while readings keep coming; every reading lands exactly once (replicas.py)."""
import asyncio

import pytest

from common import testing
from common.redis_client import key, redis_client
from common.testing import drop_redis_keys

from testing import Publisher, assert_exactly, fast_settings, seed, wait_published, wait_rows


def replica_env(settings, name: str) -> dict[str, str]:
    return dict(testing.settings_env(settings), MQTT_CLIENT_ID=f"{settings.mqtt_client_id}-{name}",
                MQTT_SHARED_GROUP="loggers", HISTORY_LOGGER_LEASE_SEC="2", TELEMETRY_CLAIM_IDLE_MS="2000",
                TELEMETRY_FLUSH_MS="50", HISTORY_LOGGER_PORT=str(testing.free_port()),
                HISTORY_LOGGER_METRICS_PORT=str(testing.free_port()))


async def members(settings, client) -> set[str]:
    return {m.decode() for m in await client.smembers(key(settings, "logger:members:loggers"))}


async def both_members(settings, client, ids_of) -> bool:
    return await members(settings, client) == set(ids_of.values())


async def only_b(settings, client, b) -> bool:
    return await members(settings, client) == {b}


@pytest.mark.parametrize("death", ["kill", "terminate"])
async def test_a_replica_gone_mid_stream_strands_and_loses_nothing(settings, db, death):
    """kill: SIGKILL, its session is rescued by the other; terminate: SIGTERM, it hands over itself."""
    with testing.PrivateMosquitto() as broker:
        s = fast_settings(settings, mqtt_port=broker.port)
        ids = await seed(db)
        envs = {name: replica_env(s, name) for name in ("a", "b")}
        procs = {name: testing.ServiceProcess("history-logger", env).start() for name, env in envs.items()}
        client = redis_client(s)
        try:
            for env in envs.values():
                await asyncio.to_thread(testing.wait_port, int(env["HISTORY_LOGGER_PORT"]), 30)
            ids_of = {name: env["MQTT_CLIENT_ID"] for name, env in envs.items()}
            await testing.eventually(lambda: both_members(s, client, ids_of), 30, message="both replicas")
            await asyncio.sleep(1.0)  # both subscribed (the lease is taken before connecting)
            pub = Publisher(s, ids, 3000, chunk=50, pause=0.03)
            pub.start()
            await wait_rows(db, 500, 60)
            if death == "kill":
                procs["a"].kill()  # its in-flight and queued share must reach PostgreSQL through b
            else:
                assert await asyncio.to_thread(procs["a"].terminate) == 0, procs["a"].log()[-2000:]
            await wait_published(pub, 120)
            try:
                await wait_rows(db, 3000, 90)
            except AssertionError:
                print(procs["b"].log()[-4000:])
                raise
            await asyncio.sleep(1.0)  # anything still arriving would be a duplicate
            await assert_exactly(db, 3000)
            # a's session was taken over, drained and ended: b is the group's only member now
            await testing.eventually(lambda: only_b(s, client, ids_of["b"]), 30, message="a's session ended")
            assert ("replica_rescued" in procs["b"].log()) == (death == "kill")
            assert procs["b"].terminate() == 0, procs["b"].log()[-2000:]
        finally:
            for proc in procs.values():
                proc.kill()
            await client.aclose()
            await drop_redis_keys(s)


