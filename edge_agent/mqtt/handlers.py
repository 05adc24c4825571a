"""What the MQTT transport does with each message, over the device API.

Routes a message by its topic (requests, event mappings, generation, feedback, release and trust
notices) and turns it into the messages that go back: the answer on the MQTT 5 response topic
(or the model's results topic) with the request's correlation data, a result of an event mapping
on its result topic, or an error reply with the same code and message as over HTTP. Predictions
and generations take the device's one predict and generate paths, so they hold an admission slot
and are checked against the model's context exactly as HTTP's are. No I/O of its own: the service
puts what this returns into the outbox.

Three questions the service asks before (or instead of) processing: `hold` waits, bounded by
`mqtt_model_wait_s` from the message's arrival, until the message's model serves or is known not
to (a backlog delivered at start-up waits for its model instead of being answered
`unknown_model`); `identify` names a message for answering a redelivered copy (its correlation
data or request id, else the packet itself); `refuse` shapes the error reply a message would get,
without processing it (a shed message's `overloaded`, a reused id).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from edge_agent.device.api import Device
from edge_agent.device.explain import Explanation
from edge_agent.device.predictions import Photo
from edge_agent.device.texts import TextAsk
from edge_agent.engine.types import new_request_id
from edge_agent.errors import (
    AgentError,
    BadRequestError,
    DrainingError,
    OverloadedError,
    PayloadTooLargeError,
    error_code,
)
from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt.link import Inbound
from edge_agent.mqtt.messages import (
    ImageRequest,
    Outgoing,
    carry,
    error_payload,
    json_or_none,
    parse_request,
    peek_request_id,
    to_json,
)
from edge_agent.mqtt.routes import Routes
from edge_agent.mqtt.service import Identity
from edge_agent.mqtt.topics import Topic
from edge_agent.settings import EventMapping
from edge_bundle.errors import BundleError

log = logging.getLogger(__name__)
#: First and longest pause before a worker asks a full device again.
OVERLOAD_PAUSE_S = 0.005
OVERLOAD_PAUSE_MAX_S = 0.1
_T = TypeVar("_T")
#: max_tokens of a generate request that names none.
DEFAULT_MAX_TOKENS = 128

#: Where release and trust notices go (the updater's `on_notice`).
NoticeHandler = Callable[[str, bytes], Awaitable[None]]
#: Puts messages made later (an explanation that follows its answer) into the outbox.
Send = Callable[[list[Outgoing]], Awaitable[None]]


class MqttHandlers:
    """Turns incoming messages into device calls and the messages that answer them."""

    def __init__(
        self,
        device: Device,
        routes: Routes,
        metrics: AgentMetrics,
        send: Send,
        *,
        notices: NoticeHandler | None = None,
    ) -> None:
        self.device = device
        self.routes = routes
        self.scheme = routes.scheme
        self.settings = routes.settings
        self.metrics = metrics
        self.send = send
        self.notices = notices

    async def process(self, message: Inbound) -> list[Outgoing]:
        """What to put into the outbox for `message` (raises `DrainingError` to leave it)."""
        if self.routes.is_notice(message.topic):
            if self.notices is not None:
                await self.notices(message.topic, message.payload)
            return []
        model = self.scheme.model_of_request(message.topic)
        if model is not None:
            return await self._request(message, model)
        if message.topic == self.routes.feedback_submit:
            return await self._feedback(message)
        text_model = self.scheme.model_of_generate(message.topic)
        if text_model is not None:
            return await self._generate(message, text_model)
        mapping = self.routes.mapping_for(message.topic)
        if mapping is not None:
            return await self._event(message, mapping)
        log.debug("ignoring a message on %s (no request topic, no mapping)", message.topic)
        return []

    # ---- before processing ---------------------------------------------------------------
    def model_of(self, message: Inbound) -> str | None:
        """The model a request, generation or event message is for (None for the others)."""
        if self.routes.is_notice(message.topic):
            return None
        model = self.scheme.model_of_request(message.topic) or self.scheme.model_of_generate(
            message.topic
        )
        if model is not None:
            return model
        mapping = self.routes.mapping_for(message.topic)
        return mapping.model if mapping is not None else None

    async def hold(self, message: Inbound) -> None:
        """Wait (bounded) until the message's model serves or is known not to."""
        model = self.model_of(message)
        if model is None:
            return
        remaining = message.received_at + self.settings.mqtt_model_wait_s - time.monotonic()
        if remaining <= 0:
            return
        if not await self.device.wait_settled(model, remaining):
            log.warning(
                "%s did not become ready within mqtt_model_wait_s (%.0f s); answering",
                model,
                self.settings.mqtt_model_wait_s,
            )

    def identify(self, message: Inbound) -> Identity | None:
        """A message's dedupe key: correlation data or request id, else the packet itself."""
        if self.routes.is_notice(message.topic):
            return None  # notices are idempotent by their sequence
        scope = message.response_topic or message.topic
        if message.correlation_data is not None:
            return Identity(f"cd|{scope}|{message.correlation_data.hex()}", always=True)
        request_id = (
            peek_request_id(message.payload)
            if message.topic != self.routes.feedback_submit
            else None  # a feedback's request_id names the prediction it is about
        )
        if request_id is not None:
            return Identity(f"id|{scope}|{request_id}", always=True)
        # A redelivery (DUP) keeps its packet identifier; identical photos sent as two messages
        # have two, and the service adds the payload's digest to the key.
        return Identity(f"pkt|{message.topic}|{message.mid}", always=False)

    def refuse(self, message: Inbound, error: AgentError) -> list[Outgoing]:
        """The error reply `message` would get for `error`, without processing it."""
        if self.routes.is_notice(message.topic):
            return []
        message_id = new_request_id()
        request_id = peek_request_id(message.payload)
        model = self.scheme.model_of_request(message.topic) or self.scheme.model_of_generate(
            message.topic
        )
        if model is not None:
            reply_to, properties, refused = self._route(message, model, message_id)
            if refused is not None:
                return [refused]
            return [self._error(reply_to, error, request_id, message_id, properties, message)]
        if message.topic == self.routes.feedback_submit:
            target = self.routes.reply_topic(message)
            if not isinstance(target, Topic):
                return []
            properties = self._correlation(message)
            return [self._error(target, error, None, message_id, properties, message)]
        mapping = self.routes.mapping_for(message.topic)
        if mapping is None:
            return []
        topic = self._result_topic(mapping)
        source = {"topic": message.topic}
        return [self._error(topic, error, request_id, message_id, {}, message, source=source)]

    @staticmethod
    def _correlation(message: Inbound) -> dict[str, Any]:
        if message.correlation_data is None:
            return {}
        return {"correlation_data": message.correlation_data.hex()}

    def _result_topic(self, mapping: EventMapping) -> Topic:
        return Topic(
            mapping.result_topic.format(
                site=self.settings.site, device=self.settings.device, model=mapping.model
            )
        )

    # ---- requests ------------------------------------------------------------------------
    def _route(
        self, message: Inbound, model: str, message_id: str
    ) -> tuple[Topic, dict[str, Any], Outgoing | None]:
        """Where a reply goes (the allowed response topic, else the results topic), the
        correlation data it carries, or the error to send instead when the topic is refused."""
        target = self.routes.reply_topic(message)
        properties = self._correlation(message)
        if isinstance(target, AgentError):
            request_id = peek_request_id(message.payload)
            error = self._error(
                self.scheme.errors(), target, request_id, message_id, properties, message
            )
            return self.scheme.errors(), properties, error
        return target or self.scheme.results(model), properties, None

    async def _request(self, message: Inbound, model: str) -> list[Outgoing]:
        message_id = new_request_id()
        reply_to, properties, refused = self._route(message, model, message_id)
        if refused is not None:
            return [refused]
        request: ImageRequest | None = None
        try:
            request = parse_request(
                message.payload,
                message.content_type,
                max_bytes=self.settings.mqtt_max_payload_bytes,
            )
            note = request.document.get("note") if request.document else None
            photo = Photo(request.image, note if isinstance(note, str) else None)
            wanted = request.document.get("explanation_format") if request.document else None
            if wanted not in (None, "text", "json"):
                raise BadRequestError("explanation_format must be 'text' or 'json'")
            answer = await self._patiently(
                message,
                functools.partial(
                    self.device.predict,
                    model,
                    photo,
                    transport="mqtt",
                    top_k=request.top_k,
                    explain=True,
                    listener=functools.partial(self._explained, reply_to, properties),
                    structured=wanted == "json",
                ),
            )
        except DrainingError:
            raise
        except (AgentError, BundleError) as exc:
            client_id = request.client_request_id if request else peek_request_id(message.payload)
            return [self._error(reply_to, exc, client_id, message_id, properties, message)]
        body = answer.prediction.to_json()
        body["message_id"] = message_id
        if request.client_request_id is not None:
            body["client_request_id"] = request.client_request_id
        if answer.explanation is not None:
            body["explanation"] = answer.explanation
        return [Outgoing(reply_to, to_json(body), "reply", message_id, properties)]

    async def _feedback(self, message: Inbound) -> list[Outgoing]:
        """Feedback over MQTT: the same JSON as POST /v1/feedback; a reply where one is asked."""
        message_id = new_request_id()
        target = self.routes.reply_topic(message)
        properties = self._correlation(message)
        reply_to = target if isinstance(target, Topic) else self.scheme.errors()
        try:
            if isinstance(target, AgentError):
                raise target
            document = json_or_none(message.payload)
            if document is None:
                raise BadRequestError("feedback must be a JSON object like POST /v1/feedback")
            stored = await self.device.submit_feedback(document)
        except (AgentError, BundleError) as exc:
            return [self._error(reply_to, exc, None, message_id, properties, message)]
        if not isinstance(target, Topic):
            return []
        body = {"feedback_id": stored["feedback_id"], "stored": True, "message_id": message_id}
        return [Outgoing(target, to_json(body), "reply", message_id, properties)]

    async def _explained(
        self, topic: Topic, properties: dict[str, Any], explanation: Explanation
    ) -> None:
        """The second tier: the explanation follows on the same topic, same correlation data."""
        message_id = new_request_id()
        body = {"kind": "explanation", **explanation.to_json(), "message_id": message_id}
        await self.send([Outgoing(topic, to_json(body), "reply", message_id, properties)])

    async def _generate(self, message: Inbound, model: str) -> list[Outgoing]:
        """Text generation over MQTT: JSON {"prompt"|"messages", "max_tokens", ...}; one reply.
        Messages may carry content parts with photos (base64 data: URLs), as on HTTP."""
        message_id = new_request_id()
        reply_to, properties, refused = self._route(message, model, message_id)
        if refused is not None:
            return [refused]
        client_id = peek_request_id(message.payload)
        try:
            limit = self.settings.mqtt_max_payload_bytes
            if len(message.payload) > limit:  # a request with photos is large, not unbounded
                raise PayloadTooLargeError(
                    f"the payload is {len(message.payload):,} bytes, over the limit of "
                    f"{limit:,}; publish smaller photos"
                )
            document = json_or_none(message.payload)
            if document is None:
                raise BadRequestError(
                    'the payload must be a JSON object: {"prompt": "..."} or {"messages": [...]}'
                )
            given_id = document.get("request_id")
            client_id = given_id if isinstance(given_id, str) else None
            ask = _text_ask(document, self.settings.max_generation_tokens)
            prepared = await self.device.prepare_text(model, ask)
            text, last = await self._patiently(
                message, functools.partial(self.device.complete_text, prepared)
            )
        except (AgentError, BundleError) as exc:
            return [self._error(reply_to, exc, client_id, message_id, properties, message)]
        body = {
            "model": model,
            "text": text,
            "finish_reason": last.finish_reason,
            "usage": {
                "prompt_tokens": last.prompt_tokens,
                "completion_tokens": last.completion_tokens,
            },
            "message_id": message_id,
        }
        if client_id is not None:
            body["client_request_id"] = client_id
        return [Outgoing(reply_to, to_json(body), "reply", message_id, properties)]

    # ---- events --------------------------------------------------------------------------
    async def _event(self, message: Inbound, mapping: EventMapping) -> list[Outgoing]:
        message_id = new_request_id()
        topic = self._result_topic(mapping)
        source: dict[str, Any] = {"topic": message.topic}
        if mapping.carry:
            source["carry"] = carry(json_or_none(message.payload), mapping.carry)
        try:
            path = "image" if mapping.image == "raw" else mapping.image
            request = parse_request(
                message.payload,
                None if mapping.image != "raw" else "application/octet-stream",
                max_bytes=self.settings.mqtt_max_payload_bytes,
                image_path=path,
                default_top_k=mapping.top_k,
            )
            answer = await self._patiently(
                message,
                functools.partial(
                    self.device.predict,
                    mapping.model,
                    Photo(request.image),
                    transport="mqtt",
                    top_k=request.top_k,
                ),
            )
        except DrainingError:
            raise
        except (AgentError, BundleError) as exc:
            return [self._error(topic, exc, None, message_id, {}, message, source=source)]
        body = answer.prediction.to_json()
        body["message_id"] = message_id
        body["source"] = source
        return [Outgoing(topic, to_json(body), "result", message_id, {})]

    # ---- shared ----------------------------------------------------------------------------
    async def _patiently(self, message: Inbound, call: Callable[[], Awaitable[_T]]) -> _T:
        """`call()`, tried again while the device is momentarily full (`OverloadedError`).

        The broker is the queue of an MQTT agent: a message a worker has taken waits for an
        inference slot (the workers bound how many wait) instead of being answered `overloaded`,
        which is for a flood beyond the inbound queue. After `mqtt_overload_wait_s` from the
        message's arrival the refusal goes back as it is.
        """
        deadline = message.received_at + self.settings.mqtt_overload_wait_s
        pause = OVERLOAD_PAUSE_S
        while True:
            try:
                return await call()
            except OverloadedError:
                if time.monotonic() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, OVERLOAD_PAUSE_MAX_S)

    def _error(
        self,
        topic: Topic,
        exc: Exception,
        client_request_id: str | None,
        message_id: str,
        properties: dict[str, Any],
        message: Inbound,
        source: dict[str, Any] | None = None,
    ) -> Outgoing:
        code = error_code(exc)
        text = getattr(exc, "message", None) or str(exc)
        self.metrics.mqtt_errors.labels(code).inc()
        extra: dict[str, Any] = {"source": source or {"topic": message.topic}}
        payload = error_payload(
            code, text, request_id=client_request_id, message_id=message_id, extra=extra
        )
        return Outgoing(topic, payload, "reply", message_id, properties)


def _text_ask(document: dict[str, Any], limit: int) -> TextAsk:
    """The generate request in a JSON payload, its shapes checked (the device checks the rest)."""
    messages = document.get("messages")
    if messages is not None and not (
        isinstance(messages, list)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str | list)
            for m in messages
        )
    ):
        raise BadRequestError(
            "messages must be a list of {role, content} objects (content: text, or a list of "
            "content parts as on HTTP)"
        )
    prompt = document.get("prompt")
    if messages is None and (not isinstance(prompt, str) or not prompt):
        raise BadRequestError("give a non-empty 'prompt' string (or 'messages')")
    max_tokens = document.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise BadRequestError(f"max_tokens must be 1 to {limit}")
    temperature = document.get("temperature", 0.0)
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise BadRequestError("temperature must be a number from 0 to 2")
    return TextAsk(
        prompt=prompt if messages is None else None,
        messages=tuple(messages) if messages is not None else None,
        max_tokens=max_tokens,
        temperature=float(temperature),
    )
