"""The MQTT transport over the inference core: requests, event mappings, results, telemetry.

Messages leave the owner thread (`link.MqttLink`) into a bounded queue; a fixed number of workers
take them from there. A message that finds the queue full is shed at once: the sender gets an
`overloaded` error where it named a response topic, a counter goes up, and the message is
acknowledged, so a flood never builds an unbounded backlog anywhere.

Every answer, result and error reply goes through the durable outbox before the incoming message
is acknowledged, so an agent killed at any point either has the answer on disk or gets the message
again from the broker. Answers to messages from one source topic enter the outbox in the order
the messages arrived, even though several are processed at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.core import Prediction, new_request_id
from edge_agent.errors import AgentError, BadRequestError, error_code
from edge_agent.explain import Explanation
from edge_agent.mqtt.link import Inbound, MqttLink
from edge_agent.mqtt.messages import ImageRequest, carry, error_payload, parse_request
from edge_agent.mqtt.outbox import Kind, Outbox, OutboxError
from edge_agent.mqtt.topics import Topic, TopicFilter, TopicScheme
from edge_agent.runtimes.base import TextRequest
from edge_agent.settings import EventMapping
from edge_bundle.errors import BundleError
from edge_bundle.release import TRUST_TOPIC

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)
#: Client request ids remembered to refuse replays.
REPLAY_WINDOW = 4096
#: Feedback photos larger than this travel without the image (central can ask for an export).
FEEDBACK_IMAGE_MAX = 4 * 1024 * 1024


@dataclass(frozen=True)
class Outgoing:
    topic: Topic
    payload: bytes
    kind: Kind
    message_id: str
    properties: dict[str, Any]


class MqttService:
    """One per agent, when `mqtt_enabled`."""

    def __init__(self, agent: Agent) -> None:
        settings = agent.settings
        self.agent = agent
        self.settings = settings
        self.scheme = TopicScheme(settings.site, settings.device)
        self.outbox = Outbox(
            settings.outbox_path,
            max_bytes=settings.outbox_max_bytes,
            max_messages=settings.outbox_max_messages,
        )
        self.mappings = [(TopicFilter(m.topic), m) for m in settings.mqtt_events]
        self.allowed_replies = [TopicFilter(f) for f in settings.mqtt_response_topics]
        subscriptions = [
            self.scheme.infer_filter(),
            TopicFilter(f"{self.scheme.base}/feedback/submit"),
            self.scheme.generate_filter(),
            *(f for f, _ in self.mappings),
        ]
        if settings.mqtt_shared_group:
            subscriptions.append(self.scheme.shared_infer_filter(settings.mqtt_shared_group))
        self.release_filters: list[TopicFilter] = []
        if settings.release_keys:
            self.release_filters = [
                TopicFilter(f"{self.scheme.base}/release"),
                TopicFilter(TRUST_TOPIC),
                *(
                    TopicFilter(f"lineside/v1/fleet/{group}/release")
                    for group in settings.update_groups
                ),
            ]
            subscriptions += self.release_filters
        self.link = MqttLink(
            settings,
            self.outbox,
            subscriptions,
            self.scheme.status(),
            self._received,
            self._connection_changed,
        )
        self.queue: asyncio.Queue[Inbound] = asyncio.Queue(maxsize=settings.mqtt_inbound_queue)
        self.shed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._tails: dict[str, asyncio.Future[None]] = {}
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._accepting = True

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.link.start()
        for number in range(self.settings.mqtt_workers):
            self._workers.append(asyncio.create_task(self._work(), name=f"mqtt-worker-{number}"))
        if self.settings.telemetry_interval_s > 0:
            self._workers.append(asyncio.create_task(self._telemetry(), name="telemetry"))

    def start_draining(self) -> None:
        """Take no new messages; unacknowledged ones are delivered again by the broker later."""
        self._accepting = False

    async def stop(self, timeout: float = 5.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + timeout
        while not self.queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.link.stop, max(0.5, deadline - time.monotonic()))
        self.outbox.close()

    # ---- from the owner thread -----------------------------------------------------------
    def _received(self, message: Inbound) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._enqueue, message)

    def _connection_changed(self, connected: bool) -> None:
        self.agent.metrics.mqtt_connected.set(1 if connected else 0)

    def _enqueue(self, message: Inbound) -> None:
        if not self._accepting:
            return  # not acknowledged: the broker delivers it again (here after a restart, or elsewhere)
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self._shed(message)
        self.agent.metrics.mqtt_queued.set(self.queue.qsize())

    def _shed(self, message: Inbound) -> None:
        self.shed += 1
        self.agent.metrics.mqtt_shed.inc()
        target = self._reply_topic(message)
        if target is not None and not isinstance(target, AgentError):
            payload = error_payload(
                "overloaded",
                "the agent is at capacity and dropped this message; publish it again later",
                request_id=None,
                message_id=new_request_id(),
                extra={},
            )
            self.link.publish_now(target, payload)
        self.link.ack(message)

    # ---- workers -------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            message = await self.queue.get()
            self.agent.metrics.mqtt_queued.set(self.queue.qsize())
            try:
                await self._handle(message)
            except Exception:  # a bug in one message must not stop the worker
                log.exception("MQTT message on %s failed", message.topic)
                self.link.ack(message)

    async def _handle(self, message: Inbound) -> None:
        loop = asyncio.get_running_loop()
        previous = self._tails.get(message.topic)
        done: asyncio.Future[None] = loop.create_future()
        self._tails[message.topic] = done
        try:
            outgoing = await self._process(message)
            if previous is not None:
                await asyncio.shield(previous)  # keep arrival order per source topic
            if outgoing and all(item.kind == "reply" for item in outgoing):
                # Replies are committed without an fsync (~0.1 ms): a thread hop would cost more.
                self._put(outgoing)
            elif outgoing:
                await asyncio.to_thread(self._put, outgoing)
            self.link.ack(message)
        finally:
            done.set_result(None)
            if self._tails.get(message.topic) is done:
                del self._tails[message.topic]

    def _put(self, outgoing: list[Outgoing]) -> None:
        for item in outgoing:
            try:
                result = self.outbox.put(
                    str(item.topic),
                    item.payload,
                    kind=item.kind,
                    properties=item.properties,
                    message_id=item.message_id,
                )
            except OutboxError as exc:
                log.error("outbox refused a %s for %s: %s", item.kind, item.topic, exc)
                continue
            for kind, count in result.dropped.items():
                self.agent.metrics.outbox_dropped.labels(kind).inc(count)
        self.link.wake()

    async def _process(self, message: Inbound) -> list[Outgoing]:
        if any(f.matches(message.topic) for f in self.release_filters):
            updater = self.agent.updater
            if updater is not None:
                await updater.on_notice(message.topic, message.payload)
            return []
        model = self.scheme.model_of_request(message.topic)
        if model is not None:
            return await self._request(message, model)
        if message.topic == f"{self.scheme.base}/feedback/submit":
            return await self._feedback(message)
        text_model = self.scheme.model_of_generate(message.topic)
        if text_model is not None:
            return await self._generate(message, text_model)
        for topic_filter, mapping in self.mappings:
            if topic_filter.matches(message.topic):
                return await self._event(message, mapping)
        log.debug("ignoring a message on %s (no request topic, no mapping)", message.topic)
        return []

    # ---- requests ------------------------------------------------------------------------
    def _route(
        self, message: Inbound, model: str, message_id: str
    ) -> tuple[Topic, dict[str, Any], Outgoing | None]:
        """Where a reply goes (the allowed response topic, else the results topic), the
        correlation data it carries, or the error to send instead when the topic is refused."""
        target = self._reply_topic(message)
        properties: dict[str, Any] = {}
        if isinstance(target, AgentError):
            error = self._error(self.scheme.errors(), target, None, message_id, properties, message)
            return self.scheme.errors(), properties, error
        if message.correlation_data is not None:
            properties["correlation_data"] = message.correlation_data.hex()
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
            self._check_replay(message, request)
            prediction = await self._predict(model, request)
        except (AgentError, BundleError) as exc:
            client_id = request.client_request_id if request else None
            return [self._error(reply_to, exc, client_id, message_id, properties, message)]
        body = prediction.to_json()
        body["message_id"] = message_id
        if request.client_request_id is not None:
            body["client_request_id"] = request.client_request_id
        explainer = self.agent.core.classifier(model).bundle.manifest.explainer
        note = request.document.get("note") if request.document else None
        explanation = self.agent.explainer.start(
            prediction,
            explainer,
            note if isinstance(note, str) else None,
            listener=functools.partial(self._explained, reply_to, properties),
        )
        if explanation is not None:
            body["explanation"] = explanation
        return [Outgoing(reply_to, _json(body), "reply", message_id, properties)]

    async def _feedback(self, message: Inbound) -> list[Outgoing]:
        """Feedback over MQTT: the same JSON as POST /v1/feedback; a reply where one is asked."""
        message_id = new_request_id()
        target = self._reply_topic(message)
        properties: dict[str, Any] = {}
        if message.correlation_data is not None:
            properties["correlation_data"] = message.correlation_data.hex()
        reply_to = target if isinstance(target, Topic) else self.scheme.errors()
        try:
            if isinstance(target, AgentError):
                raise target
            document = _json_or_none(message.payload)
            if document is None:
                raise BadRequestError("feedback must be a JSON object like POST /v1/feedback")
            stored = await self.agent.submit_feedback(document)
        except (AgentError, BundleError) as exc:
            return [self._error(reply_to, exc, None, message_id, properties, message)]
        if not isinstance(target, Topic):
            return []
        body = {"feedback_id": stored["feedback_id"], "stored": True, "message_id": message_id}
        return [Outgoing(target, _json(body), "reply", message_id, properties)]

    async def _explained(
        self, topic: Topic, properties: dict[str, Any], explanation: Explanation
    ) -> None:
        """The second tier: the explanation follows on the same topic, same correlation data."""
        message_id = new_request_id()
        body = {"kind": "explanation", **explanation.to_json(), "message_id": message_id}
        outgoing = Outgoing(topic, _json(body), "reply", message_id, properties)
        await asyncio.to_thread(self._put, [outgoing])

    async def _generate(self, message: Inbound, model: str) -> list[Outgoing]:
        """Text generation over MQTT: JSON {"prompt"|"messages", "max_tokens", ...}; one reply."""
        message_id = new_request_id()
        reply_to, properties, refused = self._route(message, model, message_id)
        if refused is not None:
            return [refused]
        client_id: str | None = None
        try:
            document = _json_or_none(message.payload)
            if document is None:
                raise BadRequestError(
                    'the payload must be a JSON object: {"prompt": "..."} or {"messages": [...]}'
                )
            client_id = (
                document.get("request_id") if isinstance(document.get("request_id"), str) else None
            )
            text, finish, usage = await self._complete(model, document)
        except (AgentError, BundleError) as exc:
            return [self._error(reply_to, exc, client_id, message_id, properties, message)]
        body = {
            "model": model,
            "text": text,
            "finish_reason": finish,
            "usage": usage,
            "message_id": message_id,
        }
        if client_id is not None:
            body["client_request_id"] = client_id
        return [Outgoing(reply_to, _json(body), "reply", message_id, properties)]

    async def _complete(
        self, model: str, document: dict[str, Any]
    ) -> tuple[str, str | None, dict[str, int]]:
        generation = self.agent.generation
        generator = generation.generator(model)
        messages = document.get("messages")
        if messages is not None:
            if not isinstance(messages, list) or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise BadRequestError("messages must be a list of {role, content} objects")
            prompt = generator.chat_prompt(messages)
        else:
            given = document.get("prompt")
            if not isinstance(given, str) or not given:
                raise BadRequestError("give a non-empty 'prompt' string (or 'messages')")
            prompt = given
        max_tokens = document.get("max_tokens", 128)
        if (
            not isinstance(max_tokens, int)
            or not 1 <= max_tokens <= self.settings.max_generation_tokens
        ):
            raise BadRequestError(f"max_tokens must be 1 to {self.settings.max_generation_tokens}")
        temperature = document.get("temperature", 0.0)
        if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
            raise BadRequestError("temperature must be a number from 0 to 2")
        request = TextRequest(
            prompt, max_tokens=max_tokens, temperature=float(temperature), stop=generator.stops()
        )
        text, last = "", None
        async for chunk in generation.stream(generator, request, threading.Event()):
            text += chunk.text
            last = chunk
        usage = {
            "prompt_tokens": last.prompt_tokens if last else 0,
            "completion_tokens": last.completion_tokens if last else 0,
        }
        return text, last.finish_reason if last else None, usage

    def _reply_topic(self, message: Inbound) -> Topic | AgentError | None:
        """The MQTT 5 response topic if allowed; an error if not; None if there is none."""
        if message.response_topic is None:
            return None
        if message.correlation_data is not None and (
            len(message.correlation_data) > self.settings.mqtt_max_correlation_bytes
        ):
            return BadRequestError(
                f"the correlation data is {len(message.correlation_data)} bytes, over the limit "
                f"of {self.settings.mqtt_max_correlation_bytes}"
            )
        try:
            topic = Topic(message.response_topic)
        except ValueError as exc:
            return BadRequestError(f"the response topic is not usable: {exc}")
        if not any(allowed.matches(topic.value) for allowed in self.allowed_replies):
            return BadRequestError(
                f"response topic {topic.value!r} is not allowed; use one matching "
                f"{[str(a) for a in self.allowed_replies]} (setting mqtt_response_topics)"
            )
        return topic

    def _check_replay(self, message: Inbound, request: ImageRequest) -> None:
        key = request.client_request_id or (
            message.correlation_data.hex() if message.correlation_data else None
        )
        if key is None:
            return
        key = f"{message.response_topic or message.topic}|{key}"
        if key in self._seen:
            raise BadRequestError(
                "this request id was already answered (a replay); give each request a new id"
            )
        self._seen[key] = time.monotonic()
        while len(self._seen) > REPLAY_WINDOW:
            self._seen.popitem(last=False)

    # ---- events --------------------------------------------------------------------------
    async def _event(self, message: Inbound, mapping: EventMapping) -> list[Outgoing]:
        message_id = new_request_id()
        topic = Topic(
            mapping.result_topic.format(
                site=self.settings.site, device=self.settings.device, model=mapping.model
            )
        )
        source: dict[str, Any] = {"topic": message.topic}
        if mapping.carry:
            source["carry"] = carry(_json_or_none(message.payload), mapping.carry)
        try:
            path = "image" if mapping.image == "raw" else mapping.image
            request = parse_request(
                message.payload,
                None if mapping.image != "raw" else "application/octet-stream",
                max_bytes=self.settings.mqtt_max_payload_bytes,
                image_path=path,
                default_top_k=mapping.top_k,
            )
            prediction = await self._predict(mapping.model, request)
        except (AgentError, BundleError) as exc:
            return [self._error(topic, exc, None, message_id, {}, message, source=source)]
        body = prediction.to_json()
        body["message_id"] = message_id
        body["source"] = source
        return [Outgoing(topic, _json(body), "result", message_id, {})]

    # ---- shared ----------------------------------------------------------------------------
    async def _predict(self, model: str, request: ImageRequest) -> Prediction:
        started = time.perf_counter()
        outcome = "error"
        try:
            prediction = await self.agent.core.predict(
                model, request.image, request_id=new_request_id(), top_k=request.top_k
            )
            outcome = "ok"
            return prediction
        except (AgentError, BundleError) as exc:
            outcome = error_code(exc)
            raise
        finally:
            elapsed = time.perf_counter() - started if outcome == "ok" else None
            self.agent.core.record(model, "mqtt", outcome, elapsed)

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
        self.agent.metrics.mqtt_errors.labels(code).inc()
        extra: dict[str, Any] = {"source": source or {"topic": message.topic}}
        payload = error_payload(
            code, text, request_id=client_request_id, message_id=message_id, extra=extra
        )
        return Outgoing(topic, payload, "reply", message_id, properties)

    async def publish_result(self, prediction: Prediction, source: dict[str, Any]) -> None:
        """Publish a prediction made elsewhere (HTTP) to the model's results topic."""
        message_id = new_request_id()
        body = prediction.to_json()
        body["message_id"] = message_id
        body["source"] = source
        topic = self.scheme.results(str(prediction.model["name"]))
        await asyncio.to_thread(self._put, [Outgoing(topic, _json(body), "result", message_id, {})])

    async def publish_feedback(self, record: dict[str, Any], image: bytes | None) -> None:
        """A feedback record (with its photo, if it fits a message) to .../feedback."""
        message_id = new_request_id()
        body = {**record, "message_id": message_id}
        if image is not None and len(image) <= FEEDBACK_IMAGE_MAX:
            body["image_base64"] = base64.b64encode(image).decode()
        topic = Topic(f"{self.scheme.base}/feedback")
        await asyncio.to_thread(
            self._put, [Outgoing(topic, _json(body), "feedback", message_id, {})]
        )

    async def publish_update(self, report: dict[str, Any]) -> None:
        """An updater progress/outcome report, through the outbox, to .../update."""
        message_id = new_request_id()
        body = {**report, "message_id": message_id}
        topic = Topic(f"{self.scheme.base}/update")
        await asyncio.to_thread(self._put, [Outgoing(topic, _json(body), "update", message_id, {})])

    async def _telemetry(self) -> None:
        from edge_agent.telemetry import snapshot

        while True:
            await asyncio.sleep(self.settings.telemetry_interval_s)
            message_id = new_request_id()
            figures = await asyncio.to_thread(snapshot, self.agent)
            figures["message_id"] = message_id
            outgoing = Outgoing(
                self.scheme.telemetry(), _json(figures), "telemetry", message_id, {}
            )
            await asyncio.to_thread(self._put, [outgoing])


def _json_or_none(payload: bytes) -> dict[str, Any] | None:
    """The payload as a JSON object, or None (for carrying metadata over even into errors)."""
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return document if isinstance(document, dict) else None


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
