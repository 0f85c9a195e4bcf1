"""common.http_api: the bearer check and the success envelope both REST services answer with."""
from __future__ import annotations

import orjson

from common.http_api import NO_TOKEN, UNAUTHORIZED, AuthRefusal, bearer_refusal, ok


def scope(*headers: tuple[bytes, bytes]) -> dict:
    return {"type": "http", "headers": list(headers)}


def test_the_configured_token_passes_whatever_the_scheme_case_and_spacing():
    for value in (b"Bearer s3cret", b"bearer s3cret", b"BEARER  s3cret "):
        assert bearer_refusal(scope((b"authorization", value)), b"s3cret") is None


def test_a_missing_or_wrong_token_is_401_with_a_bearer_challenge():
    refused = AuthRefusal(401, "unauthorized", UNAUTHORIZED, ((b"www-authenticate", b"Bearer"),))
    for headers in ((), ((b"authorization", b"Bearer wrong"),), ((b"authorization", b"Basic s3cret"),),
                    ((b"authorization", b"s3cret"),), ((b"authorization", b"Bearer "),)):
        assert bearer_refusal(scope(*headers), b"s3cret") == refused


def test_only_the_first_authorization_header_counts():
    twice = scope((b"authorization", b"Bearer wrong"), (b"authorization", b"Bearer s3cret"))
    assert bearer_refusal(twice, b"s3cret").status == 401


def test_no_token_configured_refuses_everything_with_a_500():
    refused = AuthRefusal(500, "no_token_configured", NO_TOKEN)
    assert bearer_refusal(scope((b"authorization", b"Bearer ")), b"") == refused
    assert bearer_refusal(scope(), b"") == refused


def test_ok_wraps_the_data_in_the_envelope_with_its_status():
    response = ok({"zone": "é", "n": [1, 2.5, None]}, 202)
    assert response.status_code == 202 and response.media_type == "application/json"
    assert response.body == b'{"status":"ok","data":{"zone":"\xc3\xa9","n":[1,2.5,null]}}'
    assert orjson.loads(ok([]).body) == {"status": "ok", "data": []} and ok(None).status_code == 200
