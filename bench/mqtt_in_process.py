"""The agent's own work on one MQTT request, in process: from the link handing the message over to
the link being woken with its reply stored and its acknowledgement queued.

The service, the handlers and the device are wired as `edge-agent serve` wires them (the tests'
`make_device`), over the real ONNX runtime and the agent's outbox on disk; only the link is replaced, by one that records when
it is woken. No broker, no socket and no thread hand-off of the link is timed: what remains is the
agent's Python work on the message (routing, dedupe identity, admission, the pipeline, the reply's
JSON) and the reply's commit. `bench_mqtt` adds it to the bare peer's round trip for the floor of
the small round trip with the agent's work in it.

Each sample runs to completion on the calling thread's event loop, so it interleaves with the
other cases of a benchmark round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.device.api import Device
from edge_agent.engine.types import new_request_id
from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt.handlers import MqttHandlers
from edge_agent.mqtt.link import Inbound
from edge_agent.mqtt.outbox import Outbox
from edge_agent.mqtt.routes import Routes
from edge_agent.mqtt.service import MqttService
from edge_agent.mqtt.topics import Topic, TopicFilter
from edge_agent.settings import AgentSettings
from tests.agent_support import Keys
from tests.unit.agent_fixtures import agent_settings
from tests.unit.device_fakes import close_device, make_device


class _WokenLink:
    """The `Link` of the service: records when it is woken after a message's ack was queued."""

    def __init__(
        self,
        _settings: AgentSettings,
        outbox: Outbox,
        _subscriptions: list[TopicFilter],
        _status: Topic,
        on_message: Callable[[Inbound], None],
        _on_state: Callable[[bool], None],
    ) -> None:
        self.outbox = outbox
        self.on_message = on_message
        self.connected = True
        self.acked: Inbound | None = None
        self.woken: asyncio.Future[float] | None = None

    def start(self) -> None:
        return None

    async def stop(self, timeout: float = 5.0) -> None:
        return None

    def wake(self) -> None:
        if self.acked is not None and self.woken is not None and not self.woken.done():
            self.woken.set_result(time.perf_counter())

    def ack(self, message: Inbound, *, wake: bool = True) -> None:
        self.acked = message
        if wake:
            self.wake()

    def publish_now(
        self, topic: Topic, payload: bytes, *, qos: int = 0, expiry_s: int | None = None
    ) -> None:
        return None

    def published(self) -> None:
        """What the real link does once the broker has the replies: delete their rows (later,
        while the outbox's thread holds the outbox for a checkpoint)."""
        if not self.outbox.checkpointing:
            self.outbox.ack_many(message.row_id for message in self.outbox.pending(limit=1000))


class InProcessAgent:
    """The agent's MQTT path over `bundle`, on an event loop of its own (see the module)."""

    def __init__(self, state_dir: Path, bundle: Path, keys: Keys, site: str, device: str):
        self.loop = asyncio.new_event_loop()
        # The tests' in-process settings (one decode thread: a request alone never uses that
        # pool) with the agent's MQTT on.
        self.settings = agent_settings(
            state_dir,
            keys,
            mqtt_enabled=True,
            site=site,
            device=device,
            mqtt_response_topics=("bench/#",),
            telemetry_interval_s=0,
            keep_requests_count=0,
        )
        metrics = AgentMetrics()
        links: list[_WokenLink] = []

        def link_factory(*args: Any) -> _WokenLink:
            links.append(_WokenLink(*args))
            return links[-1]

        routes = Routes(self.settings)
        self.service = MqttService(self.settings, routes, metrics, link_factory=link_factory)
        self.link = links[0]
        self.device: Device = make_device(self.settings, self.service, metrics)
        handlers = MqttHandlers(self.device, routes, metrics, self.service.send)
        self.loop.run_until_complete(self._start(bundle, handlers))
        self._mid = 0

    async def _start(self, bundle: Path, handlers: MqttHandlers) -> None:
        await self.device.install(bundle)
        self.device.models.loading = False
        await self.service.start(handlers)

    def request(self, topic: str, payload: bytes, reply_topic: str) -> float:
        """Seconds from the hand-over of one request to the link's wake with its reply stored."""
        return self.loop.run_until_complete(self.ask(topic, payload, reply_topic))

    async def ask(self, topic: str, payload: bytes, reply_topic: str) -> float:
        """`request` on the agent's own loop, for a caller already running on it."""
        self._mid = self._mid % 65535 + 1
        message = Inbound(
            topic,
            payload,
            qos=1,
            mid=self._mid,
            generation=1,
            response_topic=reply_topic,
            correlation_data=new_request_id().encode(),
        )
        self.link.acked = None
        self.link.woken = self.loop.create_future()
        started = time.perf_counter()
        self.link.on_message(message)  # what the link calls, on the loop
        woken = await self.link.woken
        if self.link.acked is not message:
            raise RuntimeError(f"the in-process agent did not answer {topic}")
        self.link.published()
        return woken - started

    def close(self) -> None:
        self.loop.run_until_complete(self.service.stop())
        close_device(self.device)
        self.loop.close()
