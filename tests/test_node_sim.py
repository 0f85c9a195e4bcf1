"""The node simulator against the real Mosquitto: what it publishes, how it answers commands
and configs, and how its reservoir responds to doses."""
from __future__ import annotations

import ast
import collections
import time
from pathlib import Path

import orjson
import pytest

from common import testing
from common.commands import build_payload, new_cmd_id
from common.testing import MqttProbe, eventually, publish_sync
from tools.node_sim import Reservoir, ReservoirParams, SimOptions, Simulator, synthetic_layout
from tools.node_sim import node as sim_node
from tools.node_sim.layout import actuator

PH_NODE = "nd-sim-ph-z1-1"
EC_NODE = "nd-sim-ec-z1-2"


@pytest.fixture
def env():
    settings = testing.isolated_settings()
    root = settings.mqtt_topic_root
    probe = MqttProbe(settings.mqtt_host, settings.mqtt_port, f"{root}/#")
    sims: list[Simulator] = []

    def make(**overrides) -> Simulator:
        layout = overrides.pop("layout", None) or synthetic_layout(1, 1, 2, node_types=("ph", "ec"))
        options = dict(host=settings.mqtt_host, port=settings.mqtt_port, topic_root=root,
                       client_prefix=f"{settings.mqtt_client_id}-", poll_ms=200, heartbeat_sec=0.5,
                       reservoir=ReservoirParams(ph_drift_per_min=0.0, ec_drift_per_min=0.0, mix_sec=0.5,
                                                 noise=False))
        options.update(overrides)
        sim = Simulator(SimOptions(**options), layout).start(wait=15)
        sims.append(sim)
        return sim

    yield settings, probe, make
    for sim in sims:
        sim.stop()
        sim.clear_retained()
    probe.close()


def command(settings, node: str, channel: str, cmd: str, cmd_id: str | None = None, zone: int = 1, **params) -> str:
    cmd_id = cmd_id or new_cmd_id()
    topic = f"{settings.mqtt_topic_root}/gh-1/zn-{zone}/{node}/{channel}/command"
    publish_sync(settings.mqtt_host, settings.mqtt_port, [(topic, orjson.dumps(build_payload(cmd, cmd_id, params)), 1, False)])
    return cmd_id


async def response_for(probe: MqttProbe, cmd_id: str, timeout: float = 10.0) -> dict:
    async def found():
        return next((p for p in probe.payloads("+/+/+/+/+/command_response") if p.get("cmd_id") == cmd_id), None)
    return await eventually(found, timeout, message=f"command_response for {cmd_id}")


async def test_status_lwt_heartbeat_and_telemetry(env):
    settings, probe, make = env
    root = settings.mqtt_topic_root
    sim = make()
    base = f"{root}/gh-1/zn-1/{PH_NODE}"
    ph = (await probe.wait_for(2, f"{base}/ph_sensor/telemetry"))[0]
    sample = orjson.loads(ph.payload)
    assert sample["metric_type"] == "PH" and sample["channel"] == "ph_sensor" and sample["node_id"] == PH_NODE
    assert abs(sample["ts"] - time.time()) < 30 and sample["value"] == pytest.approx(6.3, abs=0.01)
    beat = orjson.loads((await probe.wait_for(1, f"{base}/heartbeat"))[0].payload)
    assert isinstance(beat["uptime"], int) and beat["free_heap"] > 0 and beat["rssi"] < 0
    # ONLINE is retained: a subscriber arriving later still gets it, flagged as retained
    late = MqttProbe(settings.mqtt_host, settings.mqtt_port, f"{base}/status")
    try:
        status = (await late.wait_for(1, f"{base}/status"))[0]
        assert status.retain and orjson.loads(status.payload)["status"] == "ONLINE"
    finally:
        late.close()
    # losing the connection abruptly makes the broker publish the will: retained `offline`
    sim.node(PH_NODE).go_offline(abrupt=True)
    lwt = (await probe.wait_for(1, f"{base}/lwt", timeout=15))[0]
    assert lwt.payload == b"offline"
    late = MqttProbe(settings.mqtt_host, settings.mqtt_port, f"{base}/lwt")
    try:
        assert (await late.wait_for(1, f"{base}/lwt"))[0].retain
    finally:
        late.close()
    sim.node(PH_NODE).start()  # comes back: ONLINE again
    await eventually(lambda: _async(sum(orjson.loads(m.payload)["status"] == "ONLINE"
                                        for m in probe.received(f"{base}/status")) >= 2), 10)


async def _async(value):
    return value


async def test_commands_are_answered_per_firmware_rules(env):
    settings, probe, make = env
    sim = make()
    ack = await response_for(probe, command(settings, PH_NODE, "pump_acid", "dose", dose_ml=1.0))
    assert ack["status"] == "ACK"
    repeated = command(settings, PH_NODE, "pump_base", "dose", dose_ml=1.0)
    assert (await response_for(probe, repeated))["status"] == "ACK"
    command(settings, PH_NODE, "pump_base", "dose", cmd_id=repeated, dose_ml=1.0)

    async def no_effect():
        return [p for p in probe.payloads("+/+/+/+/+/command_response") if p["cmd_id"] == repeated][1:]
    assert (await eventually(no_effect, 10))[0]["status"] == "NO_EFFECT"

    unknown = await response_for(probe, command(settings, PH_NODE, "pump_acid", "adjust_ph", amount=3))
    assert (unknown["status"], unknown["error_code"]) == ("ERROR", "unknown_command")
    channel = await response_for(probe, command(settings, PH_NODE, "pump_foo", "run_pump", duration_ms=100))
    assert (channel["status"], channel["error_code"]) == ("ERROR", "unknown_channel")
    bad = await response_for(probe, command(settings, EC_NODE, "pump_nutrient", "run_pump", duration_ms="long"))
    assert (bad["status"], bad["error_code"]) == ("ERROR", "invalid_parameter")
    too_long = await response_for(probe, command(settings, EC_NODE, "pump_nutrient", "run_pump", duration_ms=9000))
    # the pump driver limits a run to safe_limits.max_duration_ms (5000); it does not refuse it
    assert (too_long["status"], too_long["details"]["duration_ms"]) == ("ACK", 5000)
    not_pump = await response_for(probe, command(settings, PH_NODE, "ph_sensor", "run_pump", duration_ms=100))
    assert not_pump["error_code"] == "pump_not_found"
    # a command without cmd_id is dropped silently, as firmware does
    topic = f"{settings.mqtt_topic_root}/gh-1/zn-1/{PH_NODE}/pump_acid/command"
    before = sim.stats.get("commands_dropped", 0)
    publish_sync(settings.mqtt_host, settings.mqtt_port, [(topic, b'{"cmd":"dose","dose_ml":1}', 1, False)])
    await eventually(lambda: _async(sim.stats.get("commands_dropped", 0) > before), 10)
    # fault injection: the next response is dropped, the one after is sent
    sim.node(EC_NODE).drop_responses = 1
    dropped = command(settings, EC_NODE, "pump_nutrient", "stop_pump")
    answered = command(settings, EC_NODE, "pump_nutrient", "stop_pump")
    assert (await response_for(probe, answered))["status"] == "ACK"
    assert not [p for p in probe.payloads("+/+/+/+/+/command_response") if p["cmd_id"] == dropped]


async def test_reservoir_responds_to_doses(env):
    settings, probe, make = env
    sim = make()
    res = sim.reservoir(1)
    start = res.snapshot()
    assert (await response_for(probe, command(settings, PH_NODE, "pump_acid", "dose", dose_ml=2.0)))["status"] == "ACK"
    await eventually(lambda: _async(res.snapshot()["ph"] < start["ph"] - 0.19), 10, message="pH falls after acid")
    # the reported PH telemetry follows
    ph_topic = f"{settings.mqtt_topic_root}/gh-1/zn-1/{PH_NODE}/ph_sensor/telemetry"
    await eventually(lambda: _async(probe.payloads(ph_topic)[-1]["value"] < start["ph"] - 0.19), 10)
    low = res.snapshot()["ph"]
    assert (await response_for(probe, command(settings, PH_NODE, "pump_base", "dose", dose_ml=1.0)))["status"] == "ACK"
    await eventually(lambda: _async(res.snapshot()["ph"] > low + 0.09), 10, message="pH rises after base")
    ec = res.snapshot()["ec"]
    ack = await response_for(probe, command(settings, EC_NODE, "pump_nutrient", "run_pump", duration_ms=3000))
    assert ack["status"] == "ACK"  # 3 s × 1 ml/s = 3 ml → +0.06 mS/cm in 100 L
    await eventually(lambda: _async(res.snapshot()["ec"] > ec + 0.05), 10, message="EC rises after nutrient")
    # a pump still running refuses another run
    busy = await response_for(probe, command(settings, EC_NODE, "pump_nutrient", "run_pump", duration_ms=3000))
    assert busy["error_code"] == "pump_busy"


def node_config(node: str, version: int, zone: int = 1, **extra) -> dict:
    config = {"node_id": node, "version": version, "type": "ph", "gh_uid": "gh-1", "zone_uid": f"zn-{zone}",
              "channels": [{"name": "ph_sensor", "type": "SENSOR", "metric": "PH", "poll_interval_ms": 300},
                           {"name": "orp_sensor", "type": "SENSOR", "metric": "ORP", "poll_interval_ms": 300},
                           {"name": "pump_acid", "type": "ACTUATOR", "metric": None, "actuator_type": "PUMP",
                            "safe_limits": {"max_duration_ms": 2000, "min_off_ms": 100}, "ml_per_second": 0.5}],
              "wifi": {"ssid": "HydroFarm", "pass": "x"}, "mqtt": {"host": "mqtt", "port": 1883, "keepalive": 30}}
    config.update(extra)
    return config


async def test_config_applied_or_refused(env):
    settings, probe, make = env
    root = settings.mqtt_topic_root
    make(poll_ms=0)
    base = f"{root}/gh-1/zn-1/{PH_NODE}"
    publish_sync(settings.mqtt_host, settings.mqtt_port,
                 [(f"{base}/config", orjson.dumps(node_config(PH_NODE, 4)), 1, False)])
    ok = orjson.loads((await probe.wait_for(1, f"{base}/config_response"))[0].payload)
    assert ok["status"] == "ACK" and ok["version"] == 4 and ok["node_id"] == PH_NODE
    await probe.wait_for(2, f"{base}/orp_sensor/telemetry")  # the new channel reports at its poll interval
    # pump_base is gone with the new config; limits come from the config
    gone = await response_for(probe, command(settings, PH_NODE, "pump_base", "dose", dose_ml=1.0))
    assert gone["error_code"] == "unknown_channel"
    invalid = node_config(PH_NODE, 5)
    del invalid["channels"][2]["safe_limits"]
    publish_sync(settings.mqtt_host, settings.mqtt_port, [(f"{base}/config", orjson.dumps(invalid), 1, False),
                                                          (f"{base}/config", b"{broken", 1, False)])
    responses = await probe.wait_for(3, f"{base}/config_response")
    refused = [orjson.loads(m.payload) for m in responses[1:]]
    assert [r["status"] for r in refused] == ["ERROR", "ERROR"]
    assert refused[0]["version"] == 5 and "safe_limits" in refused[0]["error"]
    # the old config stays: pump_acid still exists
    assert (await response_for(probe, command(settings, PH_NODE, "pump_acid", "dose", dose_ml=0.5)))["status"] == "ACK"


async def test_unregistered_node_says_hello_and_takes_its_ids_from_config(env):
    settings, probe, make = env
    root = settings.mqtt_topic_root
    sim = make(layout=synthetic_layout(1, 1, 0, node_types=("ph",), unregistered=1), hello_greenhouse="gh-1",
               hello_interval_sec=1.0)
    node = next(iter(sim.nodes.values()))
    hw = node.spec.hardware_id
    hello = orjson.loads((await probe.wait_for(1, f"{root}/node_hello"))[0].payload)
    assert hello["message_type"] == "node_hello" and hello["hardware_id"] == hw
    assert hello["node_type"] == "ph" and hello["provisioning_meta"]["greenhouse_token"] == "gh-1"
    await probe.wait_for(1, f"{root}/gh-temp/zn-temp/{hw}/status")
    publish_sync(settings.mqtt_host, settings.mqtt_port,
                 [(f"{root}/gh-temp/zn-temp/{hw}/config", orjson.dumps(node_config("nd-ph-new", 1, zone=7)), 1, True)])
    real = f"{root}/gh-1/zn-7/nd-ph-new"
    ack = orjson.loads((await probe.wait_for(1, f"{real}/config_response", timeout=15))[0].payload)
    assert ack["status"] == "ACK" and ack["restarted"] == ["mqtt"]
    assert orjson.loads((await probe.wait_for(1, f"{real}/status"))[0].payload)["status"] == "ONLINE"
    await probe.wait_for(1, f"{real}/ph_sensor/telemetry")
    assert node.spec.registered and sim.node("nd-ph-new") is node
    hellos = len(probe.received(f"{root}/node_hello"))
    time.sleep(1.5)
    assert len(probe.received(f"{root}/node_hello")) == hellos  # a registered node stops saying hello


async def test_malformed_payload_injection(env):
    settings, probe, make = env
    sim = make(malformed_rate=1.0)
    messages = await probe.wait_for(5, f"{settings.mqtt_topic_root}/+/+/+/+/telemetry")

    def valid(payload: bytes) -> bool:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        return isinstance(data, dict) and "metric_type" in data and isinstance(data.get("value"), (int, float))
    assert not any(valid(m.payload) for m in messages)
    assert sim.stats["malformed_sent"] >= 5


async def test_relays_pwm_and_calibration(env):
    settings, probe, make = env
    layout = synthetic_layout(1, 1, 5)  # ph, ec, climate, irrig, light
    sim = make(layout=layout)
    uid = {n.type: n.uid for n in layout}
    res = sim.reservoir(1)
    ok = await response_for(probe, command(settings, uid["light"], "white_light", "set_pwm", value=80))
    assert ok["status"] == "ACK" and res.snapshot()["light_level"] == pytest.approx(0.8)
    lux = f"{settings.mqtt_topic_root}/gh-1/zn-1/{uid['light']}/light_sensor/telemetry"
    await eventually(lambda: _async(probe.payloads(lux) and probe.payloads(lux)[-1]["value"] > 10_000), 10)
    assert (await response_for(probe, command(settings, uid["climate"], "fan_A", "set_relay", state=True)))["status"] == "ACK"
    assert res.snapshot()["fan_on"] is True
    bad = await response_for(probe, command(settings, uid["climate"], "fan_A", "set_relay", state="on"))
    assert bad["error_code"] == "invalid_parameter"
    assert (await response_for(probe, command(settings, uid["irrig"], "pump_in", "run_pump", duration_ms=2000)))["status"] == "ACK"
    flow = f"{settings.mqtt_topic_root}/gh-1/zn-1/{uid['irrig']}/flow_sensor/telemetry"
    await eventually(lambda: _async(any(p["value"] > 1.0 for p in probe.payloads(flow))), 10, message="flow while irrigating")
    cal = await response_for(probe, command(settings, uid["ph"], "ph_sensor", "calibrate", stage=1, known_ph=7.0))
    assert cal["status"] == "ACK"
    no_cal = await response_for(probe, command(settings, uid["ec"], "pump_nutrient", "calibrate", stage=1, tds_value=1.0))
    assert no_cal["error_code"] == "calibration_failed"
    # a climate node's firmware registers no calibrate handler
    climate = await response_for(probe, command(settings, uid["climate"], "temp_air", "calibrate", stage=1, known_ph=7.0))
    assert climate["error_code"] == "unknown_command"


async def test_commands_are_as_strict_as_the_firmware(env):
    settings, probe, make = env
    layout = synthetic_layout(1, 1, 5)  # ph, ec, climate, irrig, light
    for spec in layout:
        if spec.type == "irrig":
            spec.channels.append(actuator("valve_irrigation"))
        if spec.type == "ph":
            spec.channels.append(actuator("pump_spare"))  # a pump without ml_per_second
    sim = make(layout=layout)
    uid = {n.type: n.uid for n in layout}
    irrig, res = sim.node(uid["irrig"]), sim.reservoir(1)

    async def answer(node, channel, cmd, **params):
        return await response_for(probe, command(settings, uid[node], channel, cmd, **params))

    # set_relay reads only `state`: a valve opened "for 200 ms" stays open until it is closed
    opened = await answer("irrig", "valve_irrigation", "set_relay", state=True, duration_ms=200)
    assert opened["status"] == "ACK"
    time.sleep(0.6)
    assert irrig.open_relays() == ["valve_irrigation"] and res.snapshot()["irrigating"] is True
    assert (await answer("irrig", "valve_irrigation", "set_relay", state=False))["status"] == "ACK"
    assert irrig.open_relays() == [] and res.snapshot()["irrigating"] is False
    # state must be a JSON boolean (1 / "on" are refused), and a pump is not a relay
    assert (await answer("irrig", "valve_irrigation", "set_relay", state=1))["error_code"] == "invalid_parameter"
    assert (await answer("irrig", "pump_in", "set_relay", state=True))["error_code"] == "relay_driver_failed"
    # an irrigation (pump) node has no stop_pump, dose or set_state handler; a ph node no set_relay
    for node, channel, cmd, params in [("irrig", "pump_in", "stop_pump", {}), ("irrig", "pump_in", "dose", {"dose_ml": 1}),
                                       ("ec", "pump_nutrient", "dose", {"dose_ml": 1}),
                                       ("ph", "pump_acid", "set_relay", {"state": False})]:
        refused = await answer(node, channel, cmd, **params)
        assert (refused["status"], refused["error_code"]) == ("ERROR", "unknown_command"), (node, cmd)
    # dose needs the channel's calibration and is limited by max_duration_ms like run_pump
    assert (await answer("ph", "pump_spare", "dose", dose_ml=1.0))["error_code"] == "pump_error"
    big = await answer("ph", "pump_acid", "dose", dose_ml=5.0)  # 0.5 ml/s: 10 s wanted, 5 s allowed
    assert (big["status"], big["details"]["duration_ms"], big["details"]["dose_ml"]) == ("ACK", 5000, 2.5)
    assert (await answer("ph", "pump_acid", "dose", dose_ml=0.5))["error_code"] == "pump_busy"  # running
    # set_state 1 runs for up to 300 s: the driver's max_duration_ms still applies
    on = await answer("ph", "pump_base", "set_state", state=1)
    assert (on["status"], on["details"]["duration_ms"]) == ("ACK", 5000)
    assert (await answer("ph", "pump_base", "set_state", state=0))["status"] == "ACK"
    assert (await answer("ph", "pump_base", "run_pump", duration_ms=100))["error_code"] == "pump_busy"  # min-off
    # set_pwm: 0-100 percent, 101-255 an 8-bit value, above 255 clamped, negative refused; PWM outputs only
    assert (await answer("light", "white_light", "set_pwm", value=300))["details"]["duty_percent"] == 100.0
    assert res.snapshot()["light_level"] == pytest.approx(1.0)
    assert (await answer("light", "white_light", "set_pwm", value=-5))["error_code"] == "invalid_parameter"
    assert (await answer("climate", "heater_1", "set_pwm", value=50))["error_code"] == "pwm_failed"


async def test_sensor_faults_change_only_what_the_channel_reports(env):
    from tools.node_sim import SensorFault
    settings, probe, make = env
    sim = make()
    node = sim.node(PH_NODE)
    node.sensor_faults["ph_sensor"] = SensorFault.stuck(7.7, after_sec=1.0)
    topic = f"{settings.mqtt_topic_root}/gh-1/zn-1/{PH_NODE}/ph_sensor/telemetry"
    await eventually(lambda: _async(len([p for p in probe.payloads(topic) if p["value"] == 7.7]) >= 3), 15,
                     message="the probe freezes at 7.7")
    values = [p["value"] for p in probe.payloads(topic)]
    assert values[0] == pytest.approx(6.3, abs=0.01)  # it followed the truth first
    frozen = values[values.index(7.7):]
    assert set(frozen) == {7.7} and sim.reservoir(1).snapshot()["ph"] == pytest.approx(6.3, abs=0.01)
    node.sensor_faults["ph_sensor"] = SensorFault.spikes(-2.0, every=4, burst=2)
    seen = len(probe.payloads(topic))
    await eventually(lambda: _async(len(probe.payloads(topic)) >= seen + 8), 15)
    fresh = [p["value"] for p in probe.payloads(topic)[seen:]]
    spikes = [v for v in fresh if v == pytest.approx(4.3, abs=0.02)]
    assert spikes and len(spikes) <= len(fresh) // 2 + 1
    assert all(v == pytest.approx(6.3, abs=0.02) or v == pytest.approx(4.3, abs=0.02) for v in fresh)


def test_sensor_fault_command_line_forms():
    from tools.node_sim import SensorFault
    node, channel, fault = SensorFault.parse("nd-1/ph_sensor=stuck:6.6@60")
    assert (node, channel, fault.mode, fault.value, fault.after_sec) == ("nd-1", "ph_sensor", "stuck", 6.6, 60.0)
    assert SensorFault.parse("nd-1/ph_sensor=stuck")[2].value is None
    assert SensorFault.parse("nd-1/ph_sensor=stuck@30")[2].after_sec == 30.0
    spikes = SensorFault.parse("nd-1/ec_sensor=spikes:-0.5/6")[2]
    assert (spikes.mode, spikes.offset, spikes.every, spikes.burst) == ("spikes", -0.5, 6, 2)
    for bad in ("nd-1=stuck", "nd-1/ph_sensor=melted", "nd-1/ph_sensor=stuck:high", "nd-1/ph_sensor=spikes"):
        with pytest.raises(ValueError, match="sensor fault"):
            SensorFault.parse(bad)


def test_a_node_runs_on_a_host_of_its_own_not_only_the_fleet():
    """SimNode takes options, its reservoir, counters and deferred work from a NodeHost; it never
    imports the fleet (which imports it)."""
    imported = [n.module for n in ast.walk(ast.parse(Path(sim_node.__file__).read_text()))
                if isinstance(n, ast.ImportFrom)]
    assert "fleet" not in imported

    settings = testing.isolated_settings()

    class Host:
        options = SimOptions(host=settings.mqtt_host, port=settings.mqtt_port, topic_root=settings.mqtt_topic_root,
                             client_prefix=f"{settings.mqtt_client_id}-", poll_ms=100)
        reservoir = Reservoir(1)
        counts: collections.Counter[str] = collections.Counter()

        def reservoir_for(self, node):
            return self.reservoir

        def count(self, name, n=1):
            self.counts[name] += n

        def defer(self, action):
            action()

    host = Host()
    [spec] = synthetic_layout(1, 1, 1, node_types=("ph",))
    node = sim_node.SimNode(spec, host)
    node.start()
    try:
        assert node.connected.wait(10)
        deadline = time.monotonic() + 10
        while not host.counts["telemetry_sent"] and time.monotonic() < deadline:
            node.tick(time.monotonic())
            time.sleep(0.05)
    finally:
        node.stop()
        publish_sync(settings.mqtt_host, settings.mqtt_port,  # its retained status / lwt
                     [(node.node_topic(kind), b"", 1, True) for kind in ("status", "lwt")])
    assert host.counts["connects"] == 1 and host.counts["telemetry_sent"] > 0
