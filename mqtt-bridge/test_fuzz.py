"""Property: whatever a client sends to the command routes — generated hostile values in any field,
mixed with valid commands at the same moment — the answer is never a 5xx, and every valid command
is recorded `sent` and published."""
from __future__ import annotations

import asyncio
import itertools
import json

from hypothesis import HealthCheck, given, settings, strategies as st

from common import testing


HOSTILE_TEXT = st.text(alphabet=st.sampled_from(["\x00", "\x7f", "/", "+", "#", "١", "٢", "１", "é", "a", "0",
                                                 "\n", " ", "\ud7ff", "\ud800", "💩"]), max_size=20)
SCALARS = st.one_of(
    st.none(), st.booleans(), HOSTILE_TEXT,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63, 2**63 - 1, -(2**63) - 1, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["0.8", "6.1", "2000", " 12 ", "١٢", "1e3", "NaN", "Infinity", "-0"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(HOSTILE_TEXT, inner, max_size=3)),
                      max_leaves=12)
FIELDS = ["type", "params", "node_uid", "channel", "greenhouse_uid", "zone_id", "cmd_id"]
COUNTER = itertools.count()


def encode(body: dict) -> bytes:
    """JSON as a hostile client writes it: NaN / Infinity literals, integers of any size, escaped lone
    surrogates ("\\ud800")."""
    return json.dumps(body, allow_nan=True).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=3),
       params=st.dictionaries(st.sampled_from(["duration_ms", "dose_ml", "state", "value", "x"]), VALUES, max_size=3),
       command=st.sampled_from(["run_pump", "stop_pump", "dose", "set_relay", "FORCE_IRRIGATION", "calibrate"]),
       route=st.sampled_from(["zones", "nodes"]))
async def test_no_input_gives_a_5xx_and_valid_commands_beside_it_land(bridge, world, mqtt_probe, db, changes,
                                                                        params, command, route):
    hostile = {"type": command, "params": params, "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1",
               "channel": "pump_in", "zone_id": world.zone, **changes}
    path = f"/bridge/zones/{world.zone}/commands" if route == "zones" else "/bridge/nodes/nd-irr-1/commands"
    good_id = f"fuzz-good-{next(COUNTER)}"
    good = {"type": "stop_pump", "greenhouse_uid": "gh-1", "node_uid": "nd-irr-1", "channel": "pump_in",
            "zone_id": world.zone, "cmd_id": good_id}
    answers = await asyncio.gather(
        bridge.http.post(path, content=encode(hostile), headers={"Content-Type": "application/json"}),
        bridge.http.post(path, json=good))
    assert answers[0].status_code < 500, (hostile, answers[0].text)
    assert "detail" in answers[0].json() or answers[0].json()["status"] == "ok"
    assert answers[1].status_code == 200, answers[1].text
    assert await db.fetchval("SELECT status FROM commands WHERE cmd_id = $1", good_id) == "sent"

    async def published():
        return any(p.get("cmd_id") == good_id for p in mqtt_probe.payloads(f"{bridge.root}/#"))
    await testing.eventually(published, 30, message=f"{good_id} published")
