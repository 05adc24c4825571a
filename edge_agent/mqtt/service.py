"""The MQTT transport's plumbing: the link, the bounded queue, the workers, the durable outbox.

Messages leave the owner thread (`link.MqttLink`) into a bounded queue; a fixed number of workers
take them from there and hand each to the handler (`handlers.MqttHandlers.process`, over the
device API). A message that finds the queue full is shed at once: the sender gets an `overloaded`
error where it named a response topic, a counter goes up, and the message is acknowledged, so a
flood never builds an unbounded backlog anywhere.

Every answer, result and error reply goes through the durable outbox before the incoming message
is acknowledged, so an agent killed at any point either has the answer on disk or gets the message
again from the broker. Answers to messages from one source topic enter the outbox in the order
the messages arrived, even though several are processed at once. Work the device refuses because
it is shutting down is left unacknowledged, for the broker to deliver again.

The service is also the device's `Publisher`: results of HTTP predictions, feedback, update
reports and telemetry go out through the same outbox.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from edge_agent.engine.types import Prediction, new_request_id
from edge_agent.errors import AgentError, DrainingError
from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt.link import Inbound, MqttLink
from edge_agent.mqtt.messages import Outgoing, error_payload, to_json
from edge_agent.mqtt.outbox import Outbox, OutboxError
from edge_agent.mqtt.routes import Routes
from edge_agent.mqtt.topics import Topic, TopicFilter
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)
#: Feedback photos larger than this travel without the image (central can ask for an export).
FEEDBACK_IMAGE_MAX = 4 * 1024 * 1024

#: Turns one incoming message into what goes back (the handlers over the device API).
Handler = Callable[[Inbound], Awaitable[list[Outgoing]]]


class Link(Protocol):
    """What the service needs of the thread that owns the paho client (`MqttLink`)."""

    connected: bool

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def wake(self) -> None: ...

    def ack(self, message: Inbound) -> None: ...

    def publish_now(self, topic: Topic, payload: bytes, *, qos: int = 0) -> None: ...


LinkFactory = Callable[
    [
        AgentSettings,
        Outbox,
        list[TopicFilter],
        Topic,
        Callable[[Inbound], None],
        Callable[[bool], None],
    ],
    Link,
]


class MqttService:
    """One per agent, when `mqtt_enabled`."""

    def __init__(
        self,
        settings: AgentSettings,
        routes: Routes,
        metrics: AgentMetrics,
        *,
        link_factory: LinkFactory = MqttLink,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.scheme = routes.scheme
        self.metrics = metrics
        self.outbox = Outbox(
            settings.outbox_path,
            max_bytes=settings.outbox_max_bytes,
            max_messages=settings.outbox_max_messages,
        )
        self.link = link_factory(
            settings,
            self.outbox,
            routes.subscriptions(),
            self.scheme.status(),
            self._received,
            self._connection_changed,
        )
        self.queue: asyncio.Queue[Inbound] = asyncio.Queue(maxsize=settings.mqtt_inbound_queue)
        self.shed = 0
        self._handler: Handler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._tails: dict[str, asyncio.Future[None]] = {}
        self._accepting = True

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self, handler: Handler) -> None:
        """Connect, and hand every message to `handler` from now on."""
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self.link.start()
        for number in range(self.settings.mqtt_workers):
            self._workers.append(asyncio.create_task(self._work(), name=f"mqtt-worker-{number}"))

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
        self.metrics.mqtt_connected.set(1 if connected else 0)

    def _enqueue(self, message: Inbound) -> None:
        if not self._accepting:
            return  # not acknowledged: the broker delivers it again (here after a restart, or elsewhere)
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self._shed(message)
        self.metrics.mqtt_queued.set(self.queue.qsize())

    def _shed(self, message: Inbound) -> None:
        self.shed += 1
        self.metrics.mqtt_shed.inc()
        target = self.routes.reply_topic(message)
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
            self.metrics.mqtt_queued.set(self.queue.qsize())
            try:
                await self._handle(message)
            except Exception:  # a bug in one message must not stop the worker
                log.exception("MQTT message on %s failed", message.topic)
                self.link.ack(message)

    async def _handle(self, message: Inbound) -> None:
        assert self._handler is not None, "start() hands the service its handler"
        loop = asyncio.get_running_loop()
        previous = self._tails.get(message.topic)
        done: asyncio.Future[None] = loop.create_future()
        self._tails[message.topic] = done
        try:
            try:
                outgoing = await self._handler(message)
            except DrainingError:
                log.debug("draining: %s left for the broker to deliver again", message.topic)
                return
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
                self.metrics.outbox_dropped.labels(kind).inc(count)
        self.link.wake()

    async def send(self, outgoing: list[Outgoing]) -> None:
        """Put messages made outside a worker (explanations, publications) into the outbox."""
        await asyncio.to_thread(self._put, outgoing)

    # ---- the device's publisher ----------------------------------------------------------
    async def publish_result(self, prediction: Prediction, source: dict[str, Any]) -> None:
        """Publish a prediction made elsewhere (HTTP) to the model's results topic."""
        message_id = new_request_id()
        body = {**prediction.to_json(), "message_id": message_id, "source": source}
        topic = self.scheme.results(str(prediction.model["name"]))
        await self.send([Outgoing(topic, to_json(body), "result", message_id, {})])

    async def publish_feedback(self, record: dict[str, Any], image: bytes | None) -> None:
        """A feedback record (with its photo, if it fits a message) to .../feedback."""
        message_id = new_request_id()
        body = {**record, "message_id": message_id}
        if image is not None and len(image) <= FEEDBACK_IMAGE_MAX:
            body["image_base64"] = base64.b64encode(image).decode()
        topic = Topic(f"{self.scheme.base}/feedback")
        await self.send([Outgoing(topic, to_json(body), "feedback", message_id, {})])

    async def publish_update(self, report: dict[str, Any]) -> None:
        """An updater progress/outcome report, through the outbox, to .../update."""
        message_id = new_request_id()
        body = {**report, "message_id": message_id}
        topic = Topic(f"{self.scheme.base}/update")
        await self.send([Outgoing(topic, to_json(body), "update", message_id, {})])

    async def publish_telemetry(self, figures: dict[str, Any]) -> None:
        """One telemetry snapshot to .../telemetry."""
        message_id = new_request_id()
        body = {**figures, "message_id": message_id}
        topic = self.scheme.telemetry()
        await self.send([Outgoing(topic, to_json(body), "telemetry", message_id, {})])

    def health(self) -> dict[str, Any]:
        """Connection, queue and outbox figures (the outbox gauges are set here too)."""
        depth = self.outbox.depth()
        self.metrics.outbox_messages.set(depth["messages"])
        self.metrics.outbox_bytes.set(depth["bytes"])
        return {
            "connected": self.link.connected,
            "queued": self.queue.qsize(),
            "shed": self.shed,
            "outbox": depth,
        }
