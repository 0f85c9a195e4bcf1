"""MQTT side of the registry: node_hello, config_response, status and config_request (contract §2.3, §5.5).

Every handler parses and validates first; bad input is counted by reason, logged in one line and
dropped, so it never stops the message loop.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import orjson
from pydantic import ValidationError

import metrics
from common.db import Database
from common.mqtt import Message, MqttClient
from common.schemas import ConfigResponse, NodeHello, Status, describe_error, json_problem_at
from common.topics import ParsedTopic, Topics, TopicError
from delivery import ConfigDelivery, find_node
from laravel import LaravelForwarder, register_body
from refusal_log import RefusalLog
from registration import NewNodeLimit, register_hello

log = logging.getLogger("device_registry.mqtt")


def _json_object(payload: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the payload's JSON object, None), or (None, reason): `invalid_json` (not a JSON object) or
    `invalid_value` (a NUL character, an integer beyond bigint, nesting too deep: json_problem_at)."""
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, "invalid_json"
    if not isinstance(value, dict):
        return None, "invalid_json"
    if json_problem_at(value) is not None:
        return None, "invalid_value"
    return value, None


def _hello_reason(exc: ValidationError) -> str:
    """A bounded metric label for the first problem of an invalid hello."""
    loc = exc.errors()[0]["loc"]
    field = str(loc[0]) if loc else "payload"
    return field if field in ("message_type", "hardware_id", "node_type", "fw_version", "hardware_revision",
                              "capabilities", "provisioning_meta") else "invalid_field"


class RegistryHandlers:
    def __init__(self, db: Database, mqtt: MqttClient, topics: Topics, delivery: ConfigDelivery,
                 forwarder: LaravelForwarder | None, spawn: Callable[[Awaitable[Any]], None],
                 new_node_limit: NewNodeLimit):
        self.db = db
        self.mqtt = mqtt
        self.topics = topics
        self.delivery = delivery
        self.forwarder = forwarder
        self.spawn = spawn
        self.new_node_limit = new_node_limit
        self.refusals = RefusalLog(log)

    async def subscribe(self) -> None:
        for kind, handler in (("node_hello", self.on_hello), ("config_response", self.on_config_response),
                              ("status", self.on_status), ("config_request", self.on_config_request)):
            for filter_ in self.topics.filters(kind):
                await self.mqtt.subscribe(filter_, handler)

    def _parse(self, message: Message, kind: str) -> ParsedTopic | None:
        try:
            parsed = self.topics.parse(message.topic)
        except TopicError:
            parsed = None
        if parsed is None or parsed.kind != kind:
            metrics.MESSAGES_IGNORED.labels(kind, "bad_topic").inc()
            return None
        return parsed

    # -- node_hello ---------------------------------------------------------------------------
    async def on_hello(self, message: Message) -> None:
        metrics.HELLO_RECEIVED.inc()
        parsed = self._parse(message, "node_hello")
        if parsed is None:
            return
        data, reason = _json_object(message.payload)
        if data is None:
            return self._refuse_hello(message, reason, "payload is not a JSON object PostgreSQL can store")
        if data.get("message_type") != "node_hello":
            return self._refuse_hello(message, "message_type", "message_type must be node_hello")
        try:
            hello = NodeHello.model_validate(data)
        except ValidationError as exc:
            return self._refuse_hello(message, _hello_reason(exc), describe_error(exc))
        reg = await register_hello(self.db, hello, topic_gh=parsed.gh, topic_zone=parsed.zone,
                                   may_create=self.new_node_limit.allow)
        if reg is None:
            metrics.HELLO_RATE_LIMITED.inc()
            self.refusals.warning("rate_limited", "node_hello_rate_limited", hardware_id=hello.hardware_id,
                                  limit_per_min=self.new_node_limit.per_minute)
            return
        metrics.REGISTRATIONS.labels("created" if reg.created else "updated").inc()
        if reg.created:
            metrics.HELLO_REGISTERED.inc()
        log.info("node_registered" if reg.created else "node_hello_known",
                 extra={"node_uid": reg.uid, "hardware_id": hello.hardware_id, "zone_id": reg.zone_id,
                        "lifecycle_state": reg.lifecycle_state})
        if self.forwarder is not None:
            self.spawn(self.forwarder.forward(register_body(hello, reg.zone_from_hello)))
        if reg.zone_id is not None:
            await self.delivery.deliver(reg.uid, "node_hello")

    def _refuse_hello(self, message: Message, reason: str, detail: str) -> None:
        metrics.HELLO_INVALID.labels(reason).inc()
        self.refusals.warning(f"hello_{reason}", "node_hello_refused", topic=message.topic[:300], error=detail[:300])

    # -- config_response ----------------------------------------------------------------------
    async def on_config_response(self, message: Message) -> None:
        parsed = self._parse(message, "config_response")
        if parsed is None:
            return
        data, reason = _json_object(message.payload)
        try:
            response = ConfigResponse.model_validate(data) if data is not None else None
        except ValidationError as exc:
            metrics.CONFIG_RESPONSES_INVALID.labels("invalid_field").inc()
            self.refusals.warning("config_response_invalid_field", "config_response_refused",
                                  topic=message.topic[:300], error=describe_error(exc)[:300])
            return
        if response is None:
            metrics.CONFIG_RESPONSES_INVALID.labels(reason).inc()
            self.refusals.warning(f"config_response_{reason}", "config_response_refused",
                                  topic=message.topic[:300], error="not a JSON object PostgreSQL can store")
            return
        metrics.CONFIG_RESPONSES.labels("ok" if response.ok else "error").inc()
        await self.delivery.on_config_response(parsed, response)

    # -- status -------------------------------------------------------------------------------
    async def on_status(self, message: Message) -> None:
        parsed = self._parse(message, "status")
        if parsed is None:
            return
        data, _ = _json_object(message.payload)
        try:
            status = Status.model_validate(data) if data is not None else None
        except ValidationError:
            status = None
        if status is None:
            metrics.MESSAGES_IGNORED.labels("status", "invalid").inc()
            return
        if status.normalised == "online":
            await self.delivery.on_status_online(parsed)

    # -- config_request -----------------------------------------------------------------------
    async def on_config_request(self, message: Message) -> None:
        parsed = self._parse(message, "config_request")
        if parsed is None:
            return
        data, reason = _json_object(message.payload)
        if data is None:
            metrics.MESSAGES_IGNORED.labels("config_request", reason).inc()
            self.refusals.warning(f"config_request_{reason}", "config_request_refused", topic=message.topic[:300])
            return
        ident = next((data[k] for k in ("node_id", "node_uid", "uid", "hardware_id")
                      if isinstance(data.get(k), str)), None)
        node = await find_node(self.db, ident)
        if node is None:
            metrics.MESSAGES_IGNORED.labels("config_request", "unknown_node").inc()
            self.refusals.warning("config_request_unknown_node", "config_request_unknown_node",
                                  topic=message.topic[:300], node=str(ident)[:128])
            return
        await self.delivery.deliver(node["uid"], "config_request")
