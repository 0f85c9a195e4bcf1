"""The service run for real: `python main.py`, ops HTTP, a first tick, clean SIGTERM."""
import httpx

from common import testing
from testing import add_node, make_zone


async def test_service_process_ticks_serves_ops_and_stops_cleanly(settings, db, mqtt_probe):
    settings = settings.replace(scheduler_port=testing.free_port())
    zone = await make_zone(db, targets={"lighting_schedule": "00:00-00:00"}, tz="UTC")  # lights on all day
    await add_node(db, zone, "nd-light", "light", [("white_light", "actuator", None)])
    env = dict(testing.settings_env(settings), SCHEDULER_INTERVAL_SEC="1", SCHEDULER_FOLLOWUP_POLL_SEC="0.2")
    proc = testing.ServiceProcess("scheduler", env).start()
    try:
        [msg] = await mqtt_probe.wait_for(1, f"{settings.mqtt_topic_root}/+/+/nd-light/white_light/command",
                                          timeout=30)
        base = f"http://127.0.0.1:{settings.scheduler_port}"
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(f"{base}/health")).json() == {"status": "ok"}

            async def ready():
                r = await client.get(f"{base}/ready")
                return r.status_code == 200 and r.json()["data"] == {"db": "ok", "mqtt": "ok"}
            await testing.eventually(ready, 15, message="scheduler ready")
            text = (await client.get(f"{base}/metrics")).text
        assert "active_schedules 1.0" in text and "scheduler_tick_seconds_count" in text
        assert 'schedule_executions_total{task_type="lighting",zone_id="%d"} 1.0' % zone in text
    finally:
        code = proc.terminate()
    assert code == 0, proc.log()[-3000:]
    assert b'"cmd":"set_relay"' in msg.payload
    assert '"event": "service_stopped"' in proc.log() or '"event":"service_stopped"' in proc.log()
