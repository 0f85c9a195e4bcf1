"""Every payload example of contract.md validates; broken variants fail with a usable message."""
import datetime as dt
import time

import pytest
from pydantic import ValidationError

from common import schemas as s

NOW = time.time()
EXAMPLES = [
    (s.Telemetry, '{"node_id":"nd-ph-1","channel":"ph_sensor","metric_type":"PH","value":5.86,"raw":1465,'
                  '"timestamp":1710001234,"stub":false,"stable":true}'),
    (s.Status, '{"status":"ONLINE","ts":1710001555}'),
    (s.Heartbeat, '{"uptime":35555,"free_heap":102000,"rssi":-62,"ts":1710012900}'),
    (s.NodeHello, '{"message_type":"node_hello","hardware_id":"esp32-a1b2c3d4e5f6","node_type":"ph",'
                  '"fw_version":"v5.1.2","hardware_revision":"v1.0","capabilities":["ph","temperature"],'
                  '"provisioning_meta":{"greenhouse_token":"gh-1","zone_id":null,"node_name":null}}'),
    (s.ConfigResponse, '{"status":"ACK","applied_at":12.5,"restarted":["mqtt"]}'),
    (s.ConfigResponse, '{"status":"OK","node_id":"nd-ph-1","applied":true,"timestamp":1710002222}'),
    (s.ConfigResponse, '{"status":"ERROR","error":"Invalid config structure","version":3,"hash":"abc",'
                       '"timestamp":1710002223}'),
    (s.CommandPayload, '{"cmd":"run_pump","cmd_id":"5f0c3c1e-7d1a-4b7e-9a51-0b6f1b2a9c10","duration_ms":2500,'
                       '"params":{"duration_ms":2500},"ts":1732086455}'),
    (s.CommandResponse, '{"cmd_id":"5f0c","status":"ERROR","ts":12,"error_code":"current_not_detected",'
                        '"error_message":"Pump started but no current detected","details":{"channel":"pump_in"}}'),
    (s.NodeConfig, '{"node_id":"nd-ph-esp32a1b","version":3,"type":"ph","gh_uid":"gh-1","zone_uid":"zn-3",'
                   '"channels":[{"name":"ph_sensor","type":"SENSOR","metric":"PH","poll_interval_ms":3000},'
                   '{"name":"pump_acid","type":"ACTUATOR","metric":null,"actuator_type":"PUMP",'
                   '"safe_limits":{"max_duration_ms":5000,"min_off_ms":3000},"ml_per_second":0.5}],'
                   '"wifi":{"ssid":"HydroFarm","pass":"secret"},"mqtt":{"host":"mqtt","port":1883,"keepalive":30}}'),
    (s.IngestRequest, '{"samples":[{"node_uid":"nd-ph-1","zone_id":3,"zone_uid":null,"metric_type":"PH",'
                      '"value":5.9,"ts":"2025-11-20T08:00:00+00:00","channel":"ph_sensor","raw":null}]}'),
    (s.CommandRequest, '{"type":"run_pump","params":{"duration_ms":3000},"node_uid":"nd-1","channel":"pump_in",'
                       '"greenhouse_uid":"gh-1","zone_id":3}'),
    (s.ConfigPublishRequest, '{"node_uid":"nd-1","zone_id":3,"config":{"node_id":"nd-1"}}'),
    (s.FillRequest, '{"target_level":0.8}'),
    (s.CalibrateFlowRequest, '{"node_id":12,"channel":"pump_in","pump_duration_sec":10}'),
    (s.ZoneUpdatedRequest, '{"zone_id":3,"greenhouse_uid":"gh-1"}'),
]


@pytest.mark.parametrize("model, raw", EXAMPLES)
def test_contract_examples_validate(model, raw):
    model.model_validate_json(raw)


BROKEN = [
    (s.Telemetry, '{"metric_type":"PH","value":NaN}', "value"),
    (s.Telemetry, '{"metric_type":"PH","value":Infinity}', "value"),
    (s.Telemetry, '{"metric_type":"PH","value":"5.8"}', "value"),
    (s.Telemetry, '{"metric_type":"PH"}', "value: Field required"),
    (s.Telemetry, '{"value":5.8}', "metric_type: Field required"),
    (s.Telemetry, '{"metric_type":"' + "X" * 65 + '","value":1}', "metric_type"),
    (s.NodeHello, '{"message_type":"hello","hardware_id":"esp32-1"}', "message_type"),
    (s.NodeHello, '{"message_type":"node_hello","hardware_id":"a/b"}', "hardware_id"),
    (s.NodeHello, '{"message_type":"node_hello"}', "hardware_id: Field required"),
    (s.ConfigResponse, '{"status":"MAYBE"}', "status"),
    (s.CommandResponse, '{"status":"ACK"}', "cmd_id: Field required"),
    (s.CommandResponse, '{"cmd_id":"x","status":"WHATEVER"}', "status"),
    (s.NodeConfig, '{"node_id":"n","version":0,"type":"ph","gh_uid":"g","zone_uid":"z","channels":[],'
                   '"wifi":{},"mqtt":{}}', "version"),
    (s.NodeConfig, '{"node_id":"n","version":1,"type":"ph","gh_uid":"g","zone_uid":"z",'
                   '"channels":[{"name":"a","type":"SENSOR"},{"name":"a","type":"SENSOR"}],"wifi":{},"mqtt":{}}',
     "unique"),
    (s.NodeConfig, '{"node_id":"n","version":1,"type":"ph","gh_uid":"g","zone_uid":"z",'
                   '"channels":[{"name":"p","type":"ACTUATOR"}],"wifi":{},"mqtt":{}}', "safe_limits"),
    (s.NodeConfig, '{"node_id":"n","version":1,"type":"ph","gh_uid":"g","zone_uid":"z",'
                   '"channels":[{"name":"p","type":"MOTOR"}],"wifi":{},"mqtt":{}}', "SENSOR or ACTUATOR"),
    (s.CommandRequest, '{"params":{}}', "type: Field required"),
    (s.CommandRequest, '{"type":"run_pump","zone_id":0}', "zone_id"),
    (s.IngestRequest, '{"samples":[]}', "samples"),
]


@pytest.mark.parametrize("model, raw, words", BROKEN)
def test_broken_variants_are_rejected_with_a_reason(model, raw, words):
    with pytest.raises(ValidationError) as err:
        model.model_validate_json(raw)
    assert words in s.describe_error(err.value)


def test_aliases():
    t = s.Telemetry.model_validate_json('{"metric":"temperature","value":21.5,"ts":1710001234}')
    assert t.metric_type == "temperature" and t.ts == 1710001234
    assert s.normalise_metric(t.metric_type) == ("TEMP_AIR", True)
    assert s.normalise_metric("Humidity_Air") == ("HUMIDITY", True)
    assert s.normalise_metric("soil_moisture") == ("SOIL_MOISTURE", False)
    hb = s.Heartbeat.model_validate_json('{"uptime":35555,"heap":5000,"rssi":"bad"}')
    assert (hb.uptime_seconds(True), hb.uptime_seconds(False), hb.free_heap_bytes, hb.rssi_dbm) == (35, 35555, 5000, None)
    assert s.Heartbeat.model_validate_json('{"uptime_ms":90000}').uptime_seconds(False) == 90
    assert s.CommandResponse.model_validate_json('{"cmd_id":"a","status":"no_effect"}').command_status == "ack"
    assert s.CommandResponse.model_validate_json('{"cmd_id":"a","status":"rejected","error":"x"}').error_message == "x"
    assert s.ConfigResponse.model_validate_json('{"status":"ack"}').ok
    assert s.CommandRequest.model_validate_json('{"type":"x","params":[]}').params == {}
    assert s.ChannelConfig.model_validate({"name": "p", "type": "actuator",
                                           "safe_limits": {"max_duration_ms": 1, "min_off_ms": 0}}).type == "ACTUATOR"


def utc(seconds):
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(tzinfo=None)


@pytest.mark.parametrize("value, expected", [
    (1710001234, utc(1710001234)),                 # seconds
    (1710001234567, utc(1710001234.567)),          # milliseconds
    (1710001234.5, utc(1710001234.5)),
    (35555, utc(NOW)),                             # uptime since boot -> receive time
    (None, utc(NOW)),
    ("garbage", utc(NOW)),
    (True, utc(NOW)),
    (NOW + 2 * 86400, utc(NOW)),                   # far future -> clamped
    ("0001-01-01T00:00:00+14:00", utc(NOW)),       # before year 1 in UTC -> receive time, no error
    ("0001-01-01T00:00:00", utc(NOW)),             # before 2017 (like a number) -> receive time
    ("9999-12-31T23:59:59-14:00", utc(NOW)),       # beyond year 9999 in UTC -> clamped
    ("2025-13-45T99:00:00", utc(NOW)),
    ("2025-11-20T08:00:00Z", dt.datetime(2025, 11, 20, 8, 0, 0)),
    ("2025-11-20T10:00:00+02:00", dt.datetime(2025, 11, 20, 8, 0, 0)),
])
def test_timestamp_normalisation(value, expected):
    assert s.normalise_timestamp(value, NOW) == expected
