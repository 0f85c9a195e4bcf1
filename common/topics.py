"""Build and parse every MQTT topic form of contract.md §2 (root `hydro` unless configured).

Segments that come from users are checked: no `/`, `+`, `#`, NUL or control characters,
not empty, at most MAX_SEGMENT_LEN characters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_SEGMENT_LEN = 128
NODE_KINDS = frozenset({"status", "lwt", "heartbeat", "config", "config_response", "node_hello", "telemetry"})
CHANNEL_KINDS = frozenset({"telemetry", "command", "command_response"})
TEMP_GH, TEMP_ZONE, TEMP_NODE = "gh-temp", "zn-temp", "node-temp"

_UNSAFE = re.compile(r"[/+#\x00-\x1f\x7f]")
_ZONE = re.compile(r"(?:zn-)?([0-9]{1,18})")  # ASCII digits only ("١٢" is not 12), whole segment


class TopicError(ValueError):
    """A topic or segment that is not of the contract's form."""


def check_segment(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise TopicError(f"{what} must be a non-empty string")
    if len(value) > MAX_SEGMENT_LEN:
        raise TopicError(f"{what} is longer than {MAX_SEGMENT_LEN} characters")
    if _UNSAFE.search(value):
        raise TopicError(f"{what} {value[:40]!r} contains '/', '+', '#' or a control character")
    return value


def zone_segment(zone_id: int) -> str:
    """The `{zone}` segment: always `zn-{id}` (contract I-2)."""
    if isinstance(zone_id, bool) or not isinstance(zone_id, int) or zone_id < 1:
        raise TopicError(f"zone id must be a positive integer, got {zone_id!r}")
    return f"zn-{zone_id}"


def zone_id_from_segment(segment: str) -> int | None:
    """`zn-3` or `3` → 3; anything else (zn-temp, a uid) → None (use the node's DB zone)."""
    match = _ZONE.fullmatch(segment)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    kind: str
    gh: str | None = None
    zone: str | None = None
    node: str | None = None
    channel: str | None = None

    @property
    def zone_id(self) -> int | None:
        return zone_id_from_segment(self.zone) if self.zone else None


class Topics:
    def __init__(self, root: str = "hydro"):
        self.root = check_segment(root, "topic root")

    # -- building -------------------------------------------------------------------------
    def node_topic(self, gh: str, zone: str, node: str, kind: str) -> str:
        if kind not in NODE_KINDS:
            raise TopicError(f"unknown node topic type {kind!r}")
        return "/".join((self.root, check_segment(gh, "greenhouse uid"), check_segment(zone, "zone"),
                         check_segment(node, "node uid"), kind))

    def channel_topic(self, gh: str, zone: str, node: str, channel: str, kind: str) -> str:
        if kind not in CHANNEL_KINDS:
            raise TopicError(f"unknown channel topic type {kind!r}")
        return "/".join((self.root, check_segment(gh, "greenhouse uid"), check_segment(zone, "zone"),
                         check_segment(node, "node uid"), check_segment(channel, "channel"), kind))

    def command(self, gh: str, zone_id: int, node: str, channel: str) -> str:
        return self.channel_topic(gh, zone_segment(zone_id), node, channel, "command")

    def config(self, gh: str, zone_id: int, node: str) -> str:
        return self.node_topic(gh, zone_segment(zone_id), node, "config")

    def temp_config(self, node_or_hardware_id: str) -> str:
        """Config topic of a node still on temporary ids (contract §5.5, I-9)."""
        return self.node_topic(TEMP_GH, TEMP_ZONE, node_or_hardware_id, "config")

    def node_hello(self) -> str:
        return f"{self.root}/node_hello"

    def config_request(self, gh: str) -> str:
        return f"{self.root}/{check_segment(gh, 'greenhouse uid')}/config_request"

    # -- subscribing ----------------------------------------------------------------------
    def filters(self, kind: str) -> list[str]:
        """Wildcard subscriptions for one message type (contract §2.3)."""
        r = self.root
        if kind == "telemetry":
            return [f"{r}/+/+/+/+/telemetry", f"{r}/+/+/+/telemetry/+", f"{r}/+/+/+/telemetry"]
        if kind == "command_response":
            return [f"{r}/+/+/+/+/command_response"]
        if kind == "node_hello":
            return [f"{r}/node_hello", f"{r}/+/+/+/node_hello"]
        if kind == "config_request":
            return [f"{r}/+/config_request"]
        if kind in NODE_KINDS:
            return [f"{r}/+/+/+/{kind}"]
        raise TopicError(f"no subscription for topic type {kind!r}")

    # -- parsing (contract §2.4) ----------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic:
        parts = topic.split("/")
        if parts[0] != self.root or any(p == "" for p in parts):
            raise TopicError(f"topic {topic[:120]!r} is not under {self.root}/")
        n = len(parts)
        if n == 2 and parts[1] == "node_hello":
            return ParsedTopic("node_hello")
        if n == 3 and parts[2] == "config_request":
            return ParsedTopic("config_request", gh=parts[1])
        if n == 5 and parts[4] in NODE_KINDS:
            return ParsedTopic(parts[4], gh=parts[1], zone=parts[2], node=parts[3])
        if n == 6 and parts[4] == "telemetry":  # legacy form hydro/gh/zone/node/telemetry/{channel}
            return ParsedTopic("telemetry", gh=parts[1], zone=parts[2], node=parts[3], channel=parts[5])
        if n == 6 and parts[5] in CHANNEL_KINDS:
            return ParsedTopic(parts[5], gh=parts[1], zone=parts[2], node=parts[3], channel=parts[4])
        raise TopicError(f"topic {topic[:120]!r} has no known shape")
