import pytest

from common.topics import Topics, TopicError, check_segment, zone_id_from_segment

T = Topics("hydro")


def test_build_every_form():
    assert T.command("gh-1", 3, "nd-ph-1", "pump_acid") == "hydro/gh-1/zn-3/nd-ph-1/pump_acid/command"
    assert T.config("gh-1", 3, "nd-ph-1") == "hydro/gh-1/zn-3/nd-ph-1/config"
    assert T.temp_config("esp32-a1b2c3d4e5f6") == "hydro/gh-temp/zn-temp/esp32-a1b2c3d4e5f6/config"
    assert T.node_topic("gh-1", "zn-3", "nd-1", "status") == "hydro/gh-1/zn-3/nd-1/status"
    assert T.node_hello() == "hydro/node_hello"
    assert T.config_request("gh-1") == "hydro/gh-1/config_request"
    assert T.filters("telemetry") == ["hydro/+/+/+/+/telemetry", "hydro/+/+/+/telemetry/+", "hydro/+/+/+/telemetry"]


@pytest.mark.parametrize("topic, kind, node, channel, zone_id", [
    ("hydro/gh-1/zn-3/nd-1/ph_sensor/telemetry", "telemetry", "nd-1", "ph_sensor", 3),
    ("hydro/gh-1/zn-3/nd-1/telemetry/ph_sensor", "telemetry", "nd-1", "ph_sensor", 3),  # legacy I-1
    ("hydro/gh-1/3/nd-1/telemetry", "telemetry", "nd-1", None, 3),
    ("hydro/gh-1/zn-temp/nd-1/heartbeat", "heartbeat", "nd-1", None, None),
    ("hydro/gh-1/zn-3/nd-1/lwt", "lwt", "nd-1", None, 3),
    ("hydro/gh-1/zn-3/nd-1/pump_in/command_response", "command_response", "nd-1", "pump_in", 3),
    ("hydro/node_hello", "node_hello", None, None, None),
])
def test_parse(topic, kind, node, channel, zone_id):
    parsed = T.parse(topic)
    assert (parsed.kind, parsed.node, parsed.channel, parsed.zone_id) == (kind, node, channel, zone_id)


@pytest.mark.parametrize("topic", ["other/gh/zn-1/nd/status", "hydro/gh/zn-1/nd/x/y/telemetry",
                                   "hydro/gh/zn-1/nd/unknown", "hydro//zn-1/nd/status", "hydro"])
def test_parse_rejects_other_shapes(topic):
    with pytest.raises(TopicError):
        T.parse(topic)


@pytest.mark.parametrize("bad", ["a/b", "a+", "#", "x\x00y", "x\ny", "", "x" * 129, None, 5])
def test_unsafe_segments_raise(bad):
    with pytest.raises(TopicError):
        check_segment(bad, "node uid")
    with pytest.raises(TopicError):
        T.command("gh-1", 1, bad, "pump") if isinstance(bad, str) else check_segment(bad, "x")


def test_zone_segment_rule():
    assert zone_id_from_segment("zn-12") == 12 and zone_id_from_segment("7") == 7
    assert zone_id_from_segment("zn-temp") is None and zone_id_from_segment("zone-a") is None
    for unicode_or_padded in ("١٢", "zn-١٢", "１２", "12\n", " 12", "zn-12x"):
        assert zone_id_from_segment(unicode_or_padded) is None
    with pytest.raises(TopicError):
        T.command("gh", 0, "nd", "ch")
