"""The service: ops HTTP, the loop, the config-changed signal, clean stop."""
import httpx

from common import testing
from common.redis_client import CONFIG_CHANGED_CHANNEL, key, redis_client
from main import build
from settings import ServiceSettings
from testing import automation_commands, seed_zone


async def test_service_runs_cycles_serves_ops_and_reloads_on_signal(settings, db):
    z = await seed_zone(db, telemetry={"PH": 6.3, "EC": 1.4})
    s = settings.replace(automation_port=testing.free_port(), laravel_api_url="")
    service = build(s, ServiceSettings.from_env(s, {}).replace(interval_sec=600, config_reload_min_sec=0))
    await service.start()
    try:
        await service.mqtt.wait_connected(10)
        await testing.eventually(lambda: _cycles(service, 1), 20, message="first cycle")
        assert len(await automation_commands(db, z.zone_id)) == 1
        base = f"http://127.0.0.1:{s.automation_port}"
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{base}/health")).json() == {"status": "ok"}
            ready = await client.get(f"{base}/ready")
            assert ready.status_code == 200 and ready.json()["data"] == {"db": "ok", "mqtt": "ok"}
            text = (await client.get(f"{base}/metrics")).text
            for name in ("optimal_concurrency_zones", "zone_processing_time_seconds", "automation_cycle_duration",
                         "automation_config_source", "automation_dosing_refusals_total"):
                assert name in text
        redis = redis_client(s)
        try:
            async def signalled():
                await redis.publish(key(s, CONFIG_CHANGED_CHANNEL), '{"zone_id": 1, "greenhouse_uid": "gh-1"}')
                return service._cycles_ok >= 2
            await testing.eventually(signalled, 20, interval=0.5, message="early cycle on config-changed")
        finally:
            await redis.aclose()
    finally:
        await service.stop()
    assert service._loop_task.done() and service.db.pool is None


async def _cycles(service, n):
    return service._cycles_ok >= n


async def test_service_process_doses_serves_ops_and_stops_cleanly(settings, db, mqtt_probe):
    settings = settings.replace(automation_port=testing.free_port(), laravel_api_url="")
    z = await seed_zone(db, telemetry={"PH": 6.3, "EC": 1.4})
    env = dict(testing.settings_env(settings), AUTOMATION_INTERVAL_SEC="1")
    proc = testing.ServiceProcess("automation-engine", env).start()
    try:
        [msg] = await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/+/+/pump_acid/command", timeout=30)
        base = f"http://127.0.0.1:{settings.automation_port}"
        async with httpx.AsyncClient(timeout=5) as client:
            async def ready():
                r = await client.get(f"{base}/ready")
                return r.status_code == 200
            await testing.eventually(ready, 15, message="automation-engine ready")
            text = (await client.get(f"{base}/metrics")).text
        assert 'automation_corrections_total{pump="pump_acid",reason="ph_high"} 1.0' in text
        assert 'automation_config_source{source="db"} 1.0' in text
        # later cycles refuse (command unanswered / settling) instead of dosing again
        await testing.eventually(lambda: _refused(base), 15, message="a refused cycle")
    finally:
        code = proc.terminate()
    assert code == 0, proc.log()[-3000:]
    assert len(await automation_commands(db, z.zone_id)) == 1
    assert b'"dose_ml":5.0' in msg.payload and b'"cmd":"dose"' in msg.payload
    assert '"service_stopped"' in proc.log().replace(": ", ":")


async def _refused(base):
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{base}/metrics")).text
    return 'automation_dosing_refusals_total{metric="PH",reason="pending_command"}' in text


async def test_cycles_go_on_without_redis(settings, db):
    await seed_zone(db, telemetry={"PH": 5.8, "EC": 1.4})
    s = settings.replace(automation_port=testing.free_port(), laravel_api_url="", redis_port=testing.free_port())
    service = build(s, ServiceSettings.from_env(s, {}).replace(interval_sec=0.2))
    await service.start()
    try:
        await testing.eventually(lambda: _cycles(service, 3), 20, message="cycles without Redis")
    finally:
        await service.stop()
    assert await db.fetchval("SELECT health_status FROM zones") is not None
