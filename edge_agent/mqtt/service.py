"""The MQTT transport's plumbing: the link, admission of messages, the durable outbox.

Messages leave the link (`link.MqttLink`, on the event loop) and each becomes a task here; at most
`mqtt_workers` of them are processed at once, and at most `mqtt_inbound_queue` more wait (the link
announces their sum to the broker as its MQTT 5 Receive Maximum, so a backlog waits at the broker).
A message beyond that (a QoS 0 flood, or QoS 1 far beyond what the broker was told) is shed at once: the sender gets an `overloaded` error reply carrying its
request's correlation data and request id (through the outbox, like every answer), a counter goes
up, and the message is acknowledged, so a flood never builds an unbounded backlog anywhere.

No answer is lost or given twice:

- **Held for its model.** A message for a model that is still loading (the backlog a broker
  delivers right after a restart) is held, unacknowledged and without a worker, until the model
  serves or is known not to (`Handling.hold`), at most `mqtt_model_wait_s`; then it is answered,
  with a result or with `not_ready` / `unknown_model` as before. The bound keeps the broker's
  in-flight window from filling forever.
- **Durable before acknowledged.** Every answer goes into the outbox before the incoming message is
  acknowledged, so an agent killed at any point either has the answer on disk or gets the message
  again. When the outbox cannot store it (a full disk), the answer is kept in memory and stored
  again every few seconds, and the message stays unacknowledged meanwhile: after a restart the
  broker delivers it again. Nothing is acknowledged that is not stored.
- **Computed once.** A message's identity (`Handling.identify`: its request id or correlation
  data, else the packet itself when the broker marks it a redelivery) is stored with its answers in
  the same transaction. A redelivered copy is answered with the very same messages (same
  `message_id`s), re-published only if they have already left the outbox.

Answers to messages from one source topic enter the outbox in the order the messages arrived,
even though several are processed at once. Work the device refuses because it is shutting down is
left unacknowledged, for the broker to deliver again.

The service is also the device's `Publisher`: results of HTTP predictions, feedback, update
reports and telemetry go out through the same outbox.

Messages on a *direct* topic (`direct`: the replies to the updater's chunk requests) skip all of
that: they are acknowledged at once and handed to their callback. A lost one is simply asked for
again, they are never answered, and the updater bounds how many it asks for at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from edge_agent.disk import DiskWatch
from edge_agent.engine.types import Prediction, new_request_id
from edge_agent.errors import (
    AgentError,
    BadRequestError,
    DiskFullError,
    DrainingError,
    OverloadedError,
)
from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt.link import Inbound, MqttLink
from edge_agent.mqtt.messages import Outgoing, to_json
from edge_agent.mqtt.outbox import (
    Answered,
    Draft,
    Outbox,
    OutboxDiskFullError,
    OutboxError,
    Recalled,
)
from edge_agent.mqtt.routes import Routes
from edge_agent.mqtt.topics import Topic, TopicFilter
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)
#: Feedback photos larger than this travel without the image (central can ask for an export).
FEEDBACK_IMAGE_MAX = 4 * 1024 * 1024
#: How long an answer the outbox could not store waits before the next try (doubling up to max).
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 5.0

#: How many times its capacity the service keeps of QoS 1 messages a broker sends beyond the
#: Receive Maximum it was given (mosquitto 2.0.11 overshoots it: eclipse-mosquitto#2301).
BROKER_SLACK = 4

#: Turns one incoming message into what goes back (the handlers over the device API).
Handler = Callable[[Inbound], Awaitable[list[Outgoing]]]


@dataclass(frozen=True)
class Identity:
    """Who a message is, for answering a redelivered copy from what was already answered.

    `key` names the message. `always` keys (a request id, correlation data) are looked up for
    every message, and the digest of what the message carried is kept beside them: the same key
    with another digest is a reused id, not a redelivery. A packet key (`always` False: topic and
    packet id) is looked up only when the broker marks the message a redelivery, and the service
    appends the digest to it, so identical photos sent as two messages stay two.
    """

    key: str
    always: bool


#: Payloads up to this size are digested on the event loop (microseconds); larger ones (photos)
#: in a thread, beside their processing: SHA-256 of a 3.8 MB photo takes 2 ms.
DIGEST_INLINE_BYTES = 64 * 1024


def payload_digest(payload: bytes) -> str:
    """What a message carried, for telling a redelivery from a reused id."""
    return hashlib.sha256(payload).hexdigest()[:32]


class Handling(Protocol):
    """What the service needs of the handlers (`handlers.MqttHandlers`)."""

    async def process(self, message: Inbound) -> list[Outgoing]: ...

    async def hold(self, message: Inbound) -> None: ...

    def identify(self, message: Inbound) -> Identity | None: ...

    def refuse(self, message: Inbound, error: AgentError) -> list[Outgoing]: ...


class _Plain:
    """A bare handler as `Handling`: nothing held, nothing identified, refusals unanswered."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    async def process(self, message: Inbound) -> list[Outgoing]:
        return await self._handler(message)

    async def hold(self, message: Inbound) -> None:
        return None

    def identify(self, message: Inbound) -> Identity | None:
        return None

    def refuse(self, message: Inbound, error: AgentError) -> list[Outgoing]:
        return []


class Link(Protocol):
    """What the service needs of the owner of the paho client (`MqttLink`). It calls
    `on_message` and `on_state` on the event loop that called `start`."""

    connected: bool

    def start(self) -> None: ...

    async def stop(self, timeout: float = 5.0) -> None: ...

    def wake(self) -> None: ...

    def ack(self, message: Inbound, *, wake: bool = True) -> None: ...

    def publish_now(
        self, topic: Topic, payload: bytes, *, qos: int = 0, expiry_s: int | None = None
    ) -> None: ...


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


class _AbandonedError(Exception):
    """Internal: the agent stops before an answer could be stored; leave the message unacked."""


class MqttService:
    """One per agent, when `mqtt_enabled`."""

    def __init__(
        self,
        settings: AgentSettings,
        routes: Routes,
        metrics: AgentMetrics,
        *,
        link_factory: LinkFactory = MqttLink,
        disk: DiskWatch | None = None,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.scheme = routes.scheme
        self.metrics = metrics
        self.disk = disk
        self.outbox = Outbox(
            settings.outbox_path,
            max_bytes=settings.outbox_max_bytes,
            max_messages=settings.outbox_max_messages,
            answered_window_s=settings.mqtt_dedupe_window_s,
            answered_max=settings.mqtt_dedupe_max,
        )
        self.link = link_factory(
            settings,
            self.outbox,
            routes.subscriptions(),
            self.scheme.status(),
            self._received,
            self._connection_changed,
        )
        self.capacity = settings.mqtt_workers + settings.mqtt_inbound_queue
        self.shed = 0
        self.redelivered = 0
        self._handling: Handling | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tails: dict[str, asyncio.Future[None]] = {}
        self._claims: dict[str, asyncio.Future[None]] = {}
        self._held = {"model": 0, "disk": 0}
        self._to_shed: list[tuple[Inbound, list[Outgoing]]] = []
        self._shedder: asyncio.Task[None] | None = None
        self._accepting = True
        self._stopping = False
        #: Called on the event loop each time the link (re)connects.
        self.on_connected: list[Callable[[], None]] = []
        #: Topics whose messages go straight to a callback (on the event loop), acknowledged at
        #: once, outside the workers, the outbox and the dedupe (chunk replies).
        self.direct: dict[str, Callable[[bytes], None]] = {}

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self, handling: Handling | Handler) -> None:
        """Connect, and hand every message to `handling` from now on."""
        self._handling = _Plain(handling) if callable(handling) else handling
        self._loop = asyncio.get_running_loop()
        self._workers = asyncio.Semaphore(self.settings.mqtt_workers)
        self.link.start()

    def start_draining(self) -> None:
        """Take no new messages; unacknowledged ones are delivered again by the broker later."""
        self._accepting = False

    async def stop(self, timeout: float = 5.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self._tasks), timeout=max(0.01, deadline - time.monotonic()))
        self._stopping = True  # answers still waiting for disk space are left to the broker
        for task in [*self._tasks, *([self._shedder] if self._shedder else [])]:
            task.cancel()
        for task in [*self._tasks, *([self._shedder] if self._shedder else [])]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.link.stop(max(0.5, deadline - time.monotonic()))
        self.outbox.close()

    @property
    def waiting(self) -> int:
        """Messages taken and not yet finished (held, waiting for a worker, or in one)."""
        return len(self._tasks)

    # ---- from the link (on the event loop) ----------------------------------------------
    def _received(self, message: Inbound) -> None:
        if self._loop is not None:
            self._take(message)

    def _connection_changed(self, connected: bool) -> None:
        self.metrics.mqtt_connected.set(1 if connected else 0)
        loop = self._loop
        if connected and loop is not None:
            for callback in self.on_connected:
                loop.call_soon(callback)  # after the link's callback, not inside paho's

    def _take(self, message: Inbound) -> None:
        if not self._accepting:
            return  # not acknowledged: the broker delivers it again (here after a restart, or elsewhere)
        direct = self.direct.get(message.topic)
        if direct is not None:
            self.link.ack(message)
            try:
                direct(message.payload)
            except Exception:  # a bug there must never take the loop down
                log.exception("handling a message on %s failed", message.topic)
            return
        # QoS 0 beyond capacity is a flood: shed it. QoS 1 beyond it means the broker overshot
        # the Receive Maximum the link announced (mosquitto 2.0 does, under load): keep up to
        # BROKER_SLACK times more, unacknowledged, before shedding those too.
        limit = self.capacity if message.qos == 0 else self.capacity * BROKER_SLACK
        if len(self._tasks) >= limit:
            self._shed(message)
            return
        # The order chain is extended here, in arrival order, before the task first runs.
        previous = self._tails.get(message.topic)
        assert self._loop is not None
        done: asyncio.Future[None] = self._loop.create_future()
        self._tails[message.topic] = done
        task = asyncio.create_task(self._handle(message, previous, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.metrics.mqtt_queued.set(len(self._tasks))

    def _shed(self, message: Inbound) -> None:
        """Refuse a message beyond capacity: an `overloaded` reply it can be matched by, stored
        (in batches, off the event loop) before the message is acknowledged."""
        self.shed += 1
        self.metrics.mqtt_shed.inc()
        assert self._handling is not None
        error = OverloadedError(
            "the agent is at capacity and dropped this message; publish it again later",
            retry_after_s=1.0,
        )
        try:
            refusal = self._handling.refuse(message, error)
        except Exception:  # a refusal must never take the loop down
            log.exception("could not shape the overloaded reply for %s", message.topic)
            refusal = []
        self._to_shed.append((message, refusal))
        if self._shedder is None or self._shedder.done():
            self._shedder = asyncio.create_task(self._flush_shed())

    async def _flush_shed(self) -> None:
        while self._to_shed:
            batch, self._to_shed = self._to_shed, []
            outgoing = [item for _, refusal in batch for item in refusal]
            try:
                await self._commit(outgoing, None)
            except _AbandonedError:
                return  # stopping: the shed messages stay unacknowledged, for the broker
            for message, _ in batch:
                self.link.ack(message)

    # ---- one message ---------------------------------------------------------------------
    async def _handle(
        self, message: Inbound, previous: asyncio.Future[None] | None, done: asyncio.Future[None]
    ) -> None:
        assert self._handling is not None and self._workers is not None
        handling = self._handling
        try:
            identity = handling.identify(message)
            # Only a message with an identity needs its digest (a notice has none).
            digest = self._digest(message.payload) if identity is not None else None
            if identity is not None and not identity.always:
                assert digest is not None
                identity = Identity(f"{identity.key}|{await digest}", always=False)
            self._held["model"] += 1
            self._show_held()
            try:
                await handling.hold(message)
            finally:
                self._held["model"] -= 1
                self._show_held()
            async with self._claim(identity):
                async with self._workers:
                    outgoing, fresh = await self._answer(message, identity, digest)
                if previous is not None:
                    await asyncio.shield(previous)  # keep arrival order per source topic
                answered = (
                    Answered(identity.key, await digest)
                    if fresh and identity is not None and digest is not None
                    else None
                )
                await self._commit(outgoing, answered, ack=message)
        except DrainingError:
            log.debug("draining: %s left for the broker to deliver again", message.topic)
        except _AbandonedError:
            log.info("stopping: %s left unacknowledged for the broker", message.topic)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in one message must not stop the others
            log.exception("MQTT message on %s failed", message.topic)
            self.link.ack(message)
        finally:
            done.set_result(None)
            if self._tails.get(message.topic) is done:
                del self._tails[message.topic]
            self.metrics.mqtt_queued.set(len(self._tasks) - 1)

    def _digest(self, payload: bytes) -> asyncio.Future[str]:
        """The payload's digest: at once for a small payload, else computed in a thread."""
        if len(payload) > DIGEST_INLINE_BYTES:
            return asyncio.ensure_future(asyncio.to_thread(payload_digest, payload))
        assert self._loop is not None
        done: asyncio.Future[str] = self._loop.create_future()
        done.set_result(payload_digest(payload))
        return done

    async def _answer(
        self, message: Inbound, identity: Identity | None, digest: asyncio.Future[str] | None
    ) -> tuple[list[Outgoing], bool]:
        """(what goes back, whether it was computed now rather than recalled)."""
        assert self._handling is not None
        if (
            identity is not None
            and digest is not None  # given with every identity
            and (identity.always or message.dup)
            and self.outbox.might_have(identity.key)
        ):
            recalled = await asyncio.to_thread(self.outbox.recall, identity.key)
            if recalled is not None:
                return await self._again(message, await digest, recalled), False
        return await self._handling.process(message), True

    async def _again(self, message: Inbound, digest: str, recalled: Recalled) -> list[Outgoing]:
        """A copy of a message answered before: the same answers, or a refusal of a reused id."""
        assert self._handling is not None
        if recalled.digest != digest:
            return self._handling.refuse(
                message,
                BadRequestError(
                    "this request id (or correlation data) was already used for a different "
                    "request in the last "
                    f"{self.settings.mqtt_dedupe_window_s:.0f} s; give each request a new one"
                ),
            )
        self.redelivered += 1
        self.metrics.mqtt_redelivered.inc()
        log.info("%s delivered again: answering with the answers already given", message.topic)
        pending = await asyncio.to_thread(
            lambda: [d for d in recalled.answers if not self.outbox.holds(d.message_id)]
        )
        return [
            Outgoing(Topic(d.topic), d.payload, d.kind, d.message_id, d.properties) for d in pending
        ]

    @contextlib.asynccontextmanager
    async def _claim(self, identity: Identity | None) -> Any:
        """One copy of a message at a time: a second copy waits until the first one's answers
        are stored, then recalls them."""
        if identity is None:
            yield
            return
        while (busy := self._claims.get(identity.key)) is not None:
            await asyncio.shield(busy)
        assert self._loop is not None
        mine: asyncio.Future[None] = self._loop.create_future()
        self._claims[identity.key] = mine
        try:
            yield
        finally:
            del self._claims[identity.key]
            mine.set_result(None)

    async def _commit(
        self, outgoing: list[Outgoing], answered: Answered | None, ack: Inbound | None = None
    ) -> None:
        """Store the answers (and the identity they answer), then acknowledge `ack`, the message
        they answer, with the same wake of the link; keep trying while the disk is full.

        Raises `_AbandonedError` when the agent stops before they could be stored."""
        if not outgoing and answered is None:
            if ack is not None:
                self.link.ack(ack)
            return
        drafts = self._drafts(outgoing)
        delay = RETRY_FIRST_S
        held = False
        try:
            while True:
                try:
                    if (
                        all(item.kind == "reply" for item in outgoing)
                        and len(drafts) <= 1
                        and not self.outbox.checkpointing
                    ):
                        # A reply is committed without an fsync (~0.1 ms): a thread hop costs
                        # more, unless the outbox is held for a checkpoint (~10 ms of fsyncs).
                        self._store(drafts, answered, ack)
                    else:
                        await asyncio.to_thread(self._store, drafts, answered, ack)
                    return
                except OutboxError as exc:
                    if isinstance(exc, OutboxDiskFullError) and self.disk is not None:
                        self.disk.failed("store an MQTT answer")
                    if not held:
                        held = True
                        self._held["disk"] += 1
                        self._show_held()
                        log.error("cannot store an MQTT answer (kept unacknowledged): %s", exc)
                    if self._stopping:
                        raise _AbandonedError from exc
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
        finally:
            if held:
                self._held["disk"] -= 1
                self._show_held()

    def _drafts(self, outgoing: list[Outgoing]) -> list[Draft]:
        """The outbox drafts of `outgoing`, less any larger than the whole outbox (logged)."""
        drafts = []
        for item in outgoing:
            draft = Draft(
                str(item.topic), item.payload, item.kind, item.message_id, item.properties
            )
            if self.outbox.fits(draft):
                drafts.append(draft)
            else:
                log.error(
                    "a %s of %d bytes for %s is larger than the whole outbox; not sent",
                    item.kind,
                    len(item.payload),
                    item.topic,
                )
        return drafts

    def _store(
        self, drafts: list[Draft], answered: Answered | None, ack: Inbound | None = None
    ) -> None:
        for result in self.outbox.put_many(drafts, answered=answered):
            for kind, count in result.dropped.items():
                self.metrics.outbox_dropped.labels(kind).inc(count)
        if ack is not None:
            self.link.ack(ack, wake=False)
        self.link.wake()  # one wake: the link publishes the answers, then acknowledges

    def _show_held(self) -> None:
        for reason, count in self._held.items():
            self.metrics.mqtt_held.labels(reason).set(count)

    async def send(self, outgoing: list[Outgoing]) -> None:
        """Put messages made outside a message's handling (explanations, publications) into the
        outbox; a full disk raises `DiskFullError` (nothing is held for these)."""
        drafts = self._drafts(outgoing)
        if not drafts:
            return
        try:
            await asyncio.to_thread(self._store, drafts, None)
        except OutboxDiskFullError as exc:
            if self.disk is not None:
                self.disk.failed("queue a message for the broker")
            raise DiskFullError(
                "could not queue the message for the broker: the disk of the agent's state "
                "directory is full; free space there",
                retry_after_s=30,
            ) from exc

    # ---- the device's publisher ----------------------------------------------------------
    async def publish_result(self, prediction: Prediction, source: dict[str, Any]) -> None:
        """Publish a prediction made elsewhere (HTTP) to the model's results topic."""
        message_id = new_request_id()
        body = {**prediction.to_json(), "message_id": message_id, "source": source}
        if "client_request_id" in source:
            body["client_request_id"] = source["client_request_id"]
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
            "queued": len(self._tasks),
            "held": dict(self._held),
            "shed": self.shed,
            "redelivered": self.redelivered,
            "outbox": depth,
        }
