"""What the device sends out, as interfaces the layers above implement.

The device never imports a transport: results of HTTP predictions, technicians' feedback, update
reports and telemetry leave through a `Publisher` (the MQTT service implements it; with MQTT off
there is none), and the HTTP side reads the updater's status through `UpdateStatus`. The updater
asks for bundle chunks through a `ChunkLink` (the MQTT side implements it too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from edge_agent.engine.types import Prediction


class Publisher(Protocol):
    """Messages that must reach central: each goes through the durable outbox."""

    async def publish_result(self, prediction: Prediction, source: dict[str, Any]) -> None:
        """A prediction made elsewhere (HTTP), to the model's results topic."""
        ...

    async def publish_feedback(self, record: dict[str, Any], image: bytes | None) -> None:
        """A stored feedback record (with its photo, where it fits a message)."""
        ...

    async def publish_update(self, report: dict[str, Any]) -> None:
        """An updater progress or outcome report."""
        ...

    async def publish_telemetry(self, figures: dict[str, Any]) -> None:
        """One telemetry snapshot."""
        ...

    def health(self) -> dict[str, Any]:
        """The connection, queue and outbox figures telemetry reports (sets their gauges too)."""
        ...


class UpdateStatus(Protocol):
    """What `GET /v1/updates` shows of the updater."""

    def describe(self) -> dict[str, Any]:
        """{"state": the persisted state as JSON, "reports": the recent reports}."""
        ...


class ChunkLink(Protocol):
    """How the updater fetches a bundle in chunks over MQTT (`edge_bundle.chunks`).

    Requests are cheap to send again, so they skip the durable outbox: they go straight to the
    broker when connected (QoS 1, with an MQTT 5 message expiry) and are simply lost otherwise;
    the updater sends again what stays unanswered. Replies arrive on `reply_topic`.
    """

    @property
    def reply_topic(self) -> str:
        """This box's chunk topic (`edge_bundle.chunks.reply_topic`), subscribed QoS 1."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up now."""
        ...

    @property
    def connection(self) -> int:
        """A number that changes with every new connection: requests sent before it may be
        lost (asked again at once)."""
        ...

    def request(self, payload: bytes) -> None:
        """Publish an encoded `ChunkRequest` to `REQUEST_TOPIC` (best effort)."""
        ...

    def listen(self, handler: Callable[[bytes], None]) -> None:
        """Hand every reply payload on `reply_topic` to `handler` (on the event loop)."""
        ...
