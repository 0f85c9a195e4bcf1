import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from common.timespec import SpecError, Window, light_edge, occurrences, parse_time, parse_times, parse_window, zone_info

T = dt.time
UTC = dt.timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize("spec, expected", [
    ("08:00", (T(8, 0),)),
    ("8:05", (T(8, 5),)),
    (" 12:00 , 18:00 ", (T(12, 0), T(18, 0))),
    ("18:00,12:00,18:00", (T(12, 0), T(18, 0))),
    (["08:00", "14:00"], (T(8, 0), T(14, 0))),
    ('["23:59", "00:00"]', (T(0, 0), T(23, 59))),
])
def test_time_forms_parse(spec, expected):
    assert parse_times(spec) == expected


@pytest.mark.parametrize("spec, reason", [
    ("25:00", "hour must be 00-23"),
    ("12:60", "minute must be 00-59"),
    ("invalid", "not a time HH:MM"),
    ("08:00,", "not a time HH:MM"),
    ("8", "not a time HH:MM"),
    ([], "empty"),
    (42, "expected a time"),
    (["08:00", 5], "must be a string"),
    ("[08:00", "not a valid JSON list"),
    ({"at": "08:00"}, "expected a time"),
])
def test_malformed_times_are_rejected_with_a_reason(spec, reason):
    with pytest.raises(SpecError, match=reason):
        parse_times(spec)


def test_windows_parse():
    assert parse_window("06:00-22:00") == Window(T(6), T(22))
    night = parse_window(" 22:00 - 06:00 ")
    assert night == Window(T(22), T(6)) and night.crosses_midnight
    assert parse_window({"start": "05:30", "end": "19:00"}) == Window(T(5, 30), T(19))
    assert parse_window("06:00-06:00").always_on


@pytest.mark.parametrize("spec, reason", [
    ("06:00", "not a window"), ("06:00-22:00-23:00", "not a window"), ("06:00-24:00", "hour must be"),
    (16, "expected a window"), ("-", "not a time"),
])
def test_malformed_windows_are_rejected(spec, reason):
    with pytest.raises(SpecError, match=reason):
        parse_window(spec)


def test_timezone_fallback_is_utc_and_flagged():
    assert zone_info(None) == (UTC, True)
    assert zone_info("Europe/Berlin") == (BERLIN, True)
    assert zone_info("Mars/Olympus") == (UTC, False)


def test_occurrences_are_half_open_and_per_local_date():
    times = (T(8, 0),)
    at8 = dt.datetime(2026, 6, 1, 6, 0, tzinfo=UTC)  # 08:00 CEST
    assert [o.at for o in occurrences(times, BERLIN, at8 - dt.timedelta(minutes=1), at8)] == [at8]
    assert list(occurrences(times, BERLIN, at8, at8 + dt.timedelta(minutes=1))) == []
    two_days = list(occurrences(times, BERLIN, at8 - dt.timedelta(minutes=1), at8 + dt.timedelta(days=1)))
    assert [o.local for o in two_days] == [dt.datetime(2026, 6, 1, 8), dt.datetime(2026, 6, 2, 8)]


def _minute_ticks(tz, day: dt.date, times):
    """Tick once a minute across a whole local day (plus margins); collect every firing."""
    start = dt.datetime.combine(day, T(0), tzinfo=tz).astimezone(UTC) - dt.timedelta(hours=2)
    fired = []
    prev = start
    for minute in range(1, 28 * 60):
        now = start + dt.timedelta(minutes=minute, seconds=17)
        fired += list(occurrences(times, tz, prev, now))
        prev = now
    return [o for o in fired if o.local.date() == day]


def test_spring_forward_day_fires_each_local_time_once():
    day = dt.date(2026, 3, 29)  # Berlin: 02:00 CET → 03:00 CEST, 02:30 does not exist
    fired = _minute_ticks(BERLIN, day, (T(1, 30), T(2, 30), T(3, 30)))
    assert [o.local.time() for o in fired] == [T(1, 30), T(2, 30), T(3, 30)]
    nonexistent = fired[1]
    assert nonexistent.at == dt.datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # = 03:30 CEST, once


def test_fall_back_day_fires_each_local_time_once():
    day = dt.date(2026, 10, 25)  # Berlin: 03:00 CEST → 02:00 CET, 02:30 exists twice
    fired = _minute_ticks(BERLIN, day, (T(1, 30), T(2, 30), T(3, 30)))
    assert [o.local.time() for o in fired] == [T(1, 30), T(2, 30), T(3, 30)]
    assert fired[1].at == dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # the first 02:30 (CEST)


def test_us_dst_days_too():
    ny = ZoneInfo("America/New_York")
    for day in (dt.date(2026, 3, 8), dt.date(2026, 11, 1)):
        fired = _minute_ticks(ny, day, (T(1, 30), T(2, 30)))
        assert [o.local.time() for o in fired] == [T(1, 30), T(2, 30)], day


def _at(hour, minute=0, day=1):
    return dt.datetime(2026, 6, day, hour, minute, tzinfo=BERLIN).astimezone(UTC)


def test_light_edge_day_window():
    window = Window(T(6), T(22))
    assert light_edge(window, BERLIN, _at(5, 59)) [0] is False
    on, edge = light_edge(window, BERLIN, _at(6, 0))
    assert on and edge.local == dt.datetime(2026, 6, 1, 6)
    assert light_edge(window, BERLIN, _at(21, 59))[1].local == dt.datetime(2026, 6, 1, 6)
    on, edge = light_edge(window, BERLIN, _at(22, 0))
    assert not on and edge.local == dt.datetime(2026, 6, 1, 22)


def test_light_edge_across_midnight():
    window = Window(T(20), T(6))
    on, edge = light_edge(window, BERLIN, _at(23))
    assert on and edge.local == dt.datetime(2026, 6, 1, 20)
    on, edge = light_edge(window, BERLIN, _at(5, day=2))
    assert on and edge.local == dt.datetime(2026, 6, 1, 20)
    on, edge = light_edge(window, BERLIN, _at(7, day=2))
    assert not on and edge.local == dt.datetime(2026, 6, 2, 6)


def test_always_on_window_is_on():
    on, edge = light_edge(Window(T(6), T(6)), BERLIN, _at(3))
    assert on and edge.local == dt.datetime(2026, 5, 31, 6)
