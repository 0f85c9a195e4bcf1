"""Schedule time specs (contract §8.11) and when they fall, in a greenhouse's timezone.

    time       "08:00"            (HH 00-23, MM 00-59, leading zero of HH optional)
    time-list  "12:00,18:00"      or a JSON array of times
    window     "06:00-22:00"      end < start crosses midnight

Local times become instants with zoneinfo, DST-safe: a local time that does not exist on a
spring-forward day falls at the same distance after the gap (02:30 → 03:30); a local time that
exists twice on a fall-back day is taken once, at its first occurrence. Each occurrence is keyed
by its *local* wall time, so one local time is one firing whatever the offset.
"""
from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass
from typing import Any, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

UTC = dt.timezone.utc
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")


class SpecError(ValueError):
    """A time spec that cannot be used; the message says why."""


def parse_time(text: Any) -> dt.time:
    if not isinstance(text, str):
        raise SpecError(f"time must be a string like '08:00', got {type(text).__name__}")
    match = _TIME.match(text.strip())
    if not match:
        raise SpecError(f"{text.strip()[:40]!r} is not a time HH:MM")
    hour, minute = int(match.group(1)), int(match.group(2))
    if hour > 23:
        raise SpecError(f"{text.strip()!r}: hour must be 00-23")
    if minute > 59:
        raise SpecError(f"{text.strip()!r}: minute must be 00-59")
    return dt.time(hour, minute)


def parse_times(spec: Any) -> tuple[dt.time, ...]:
    """`irrigation_schedule`: "HH:MM", "HH:MM,HH:MM" or a list of "HH:MM"; sorted, without repeats."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("["):
            import orjson
            try:
                spec = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise SpecError("not a valid JSON list of times") from None
        else:
            spec = text.split(",")
    if not isinstance(spec, list):
        raise SpecError(f"expected a time, a comma-separated list or a list of times, got {type(spec).__name__}")
    if not spec:
        raise SpecError("the list of times is empty")
    times = {parse_time(item) for item in spec}
    return tuple(sorted(times))


@dataclass(frozen=True, slots=True)
class Window:
    start: dt.time
    end: dt.time

    @property
    def crosses_midnight(self) -> bool:
        return self.end < self.start

    @property
    def always_on(self) -> bool:
        return self.start == self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def parse_window(spec: Any) -> Window:
    """`lighting_schedule`: "HH:MM-HH:MM"; end < start crosses midnight; start == end is all day."""
    if isinstance(spec, dict) and set(spec) >= {"start", "end"}:
        return Window(parse_time(spec["start"]), parse_time(spec["end"]))
    if not isinstance(spec, str):
        raise SpecError(f"expected a window 'HH:MM-HH:MM', got {type(spec).__name__}")
    parts = spec.split("-")
    if len(parts) != 2:
        raise SpecError(f"{spec.strip()[:40]!r} is not a window HH:MM-HH:MM")
    return Window(parse_time(parts[0]), parse_time(parts[1]))


@functools.lru_cache(maxsize=512)
def zone_info(name: str | None) -> tuple[dt.tzinfo, bool]:
    """(the greenhouse timezone, known?): UTC when unset; UTC and False when unknown (contract §8.11)."""
    if not name or not name.strip():
        return UTC, True
    try:
        return ZoneInfo(name.strip()), True
    except (ZoneInfoNotFoundError, ValueError):
        return UTC, False


def local_to_utc(day: dt.date, at: dt.time, tz: dt.tzinfo) -> dt.datetime:
    """The instant of local wall time `day at` (fold=0: first occurrence; a time in a gap moves past it)."""
    return dt.datetime.combine(day, at, tzinfo=tz).astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Occurrence:
    local: dt.datetime  # naive local wall time: the firing's identity
    at: dt.datetime     # aware UTC instant


def occurrences(times: tuple[dt.time, ...], tz: dt.tzinfo, after: dt.datetime,
                until: dt.datetime) -> Iterator[Occurrence]:
    """Each local time of `times` whose instant is in (after, until], once per local date."""
    first = after.astimezone(tz).date()
    last = until.astimezone(tz).date()
    day = first
    while day <= last:
        for at in times:
            instant = local_to_utc(day, at, tz)
            if after < instant <= until:
                yield Occurrence(dt.datetime.combine(day, at), instant)
        day += dt.timedelta(days=1)


def latest_occurrence(at: dt.time, tz: dt.tzinfo, now: dt.datetime) -> Occurrence:
    """The most recent occurrence of local time `at` no later than `now`."""
    day = now.astimezone(tz).date()
    for back in range(3):
        candidate = day - dt.timedelta(days=back)
        instant = local_to_utc(candidate, at, tz)
        if instant <= now:
            return Occurrence(dt.datetime.combine(candidate, at), instant)
    raise AssertionError("a local time occurs at least once in three days")


def next_instant(times: tuple[dt.time, ...], tz: dt.tzinfo, now: dt.datetime) -> dt.datetime:
    """The earliest instant strictly after `now` at which one of `times` falls."""
    day = now.astimezone(tz).date()
    best = None
    for ahead in range(3):
        for at in times:
            instant = local_to_utc(day + dt.timedelta(days=ahead), at, tz)
            if instant > now and (best is None or instant < best):
                best = instant
        if best is not None:
            return best
    raise AssertionError("a local time occurs at least once in three days")


def light_edge(window: Window, tz: dt.tzinfo, now: dt.datetime) -> tuple[bool, Occurrence]:
    """Whether the light should be on at `now`, and the switching edge that made it so.

    The window switches on at `start` and off at `end` (so the off edge is the end time).
    """
    on = latest_occurrence(window.start, tz, now)
    if window.always_on:
        return True, on
    off = latest_occurrence(window.end, tz, now)
    return (True, on) if on.at > off.at else (False, off)
