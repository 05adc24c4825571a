"""No MQTT answer lost or given twice (#14), without a broker: the service and the real handlers
over a fake device, with the real outbox in a temporary directory.

- a message for a model that is still loading is held unacknowledged, then answered with a result;
  past `mqtt_model_wait_s` it is answered as before (not_ready), so the broker's window frees;
- an answer the outbox cannot store (a full disk) keeps its message unacknowledged until it is
  stored; nothing is acknowledged that is not stored;
- a redelivered copy gets the very same answer (same message_id), computed once, even when the
  first copy is still being processed; a reused id with another payload is refused; two identical
  photos as two (not redelivered) events are two events;
- a shed message's `overloaded` reply carries its correlation data and request id, and is in the
  outbox before the message is acknowledged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge_agent.device.predictions import Answer, Photo
from edge_agent.errors import NotReadyError
from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt.handlers import MqttHandlers
from edge_agent.mqtt.link import Inbound
from edge_agent.mqtt.messages import to_json
from edge_agent.mqtt.outbox import Answered, Draft, OutboxDiskFullError, PutResult
from edge_agent.mqtt.routes import Routes
from edge_agent.mqtt.service import BROKER_SLACK, DIGEST_INLINE_BYTES, MqttService
from edge_agent.settings import AgentSettings, EventMapping
from tests.unit.agent_fixtures import agent_settings, clean_environment
from tests.unit.device_fakes import FakeLink, FakeLinks, outbox_rows, wait_until
from tests.unit.test_mqtt_service import FakeDevice

BASE = "lineside/v1/plant/box1"
REQUEST = f"{BASE}/infer/defects"
EVENTS = "plant/line1/camera"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AgentSettings:
    clean_environment(monkeypatch)
    return agent_settings(
        tmp_path / "state",
        mqtt_enabled=True,
        site="plant",
        device="box1",
        mqtt_response_topics=("replies/#",),
        mqtt_events=(EventMapping(topic=EVENTS, model="defects", image="raw"),),
        telemetry_interval_s=0,
    )


@dataclass
class SlowDevice(FakeDevice):
    """A fake device whose model may still be loading, and whose predictions may wait."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event | None = None
    not_ready_after: bool = False

    async def wait_settled(self, name: str, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def predict(self, name: str, photo: Photo, **options: Any) -> Answer:
        if not self.ready.is_set():
            self.predictions.append({"name": name, "photo": photo, **options})
            raise NotReadyError(f"model {name!r} is loading")
        if self.gate is not None:
            await self.gate.wait()
        return await super().predict(name, photo, **options)


async def started(
    settings: AgentSettings, device: SlowDevice
) -> tuple[MqttService, FakeLink, AgentMetrics]:
    links = FakeLinks()
    metrics = AgentMetrics()
    routes = Routes(settings)
    service = MqttService(settings, routes, metrics, link_factory=links)
    handlers = MqttHandlers(device, routes, metrics, service.send)  # type: ignore[arg-type]
    await service.start(handlers)
    assert links.link is not None
    return service, links.link, metrics


def bodies(service: MqttService) -> list[dict[str, Any]]:
    return [json.loads(payload) for _, _, payload, _ in outbox_rows(service.outbox)]


def request(image: bytes = b"hello", request_id: str | None = None, note: str = "") -> bytes:
    document: dict[str, Any] = {"image": "aGVsbG8=" if image == b"hello" else "d29ybGQ="}
    if request_id is not None:
        document["request_id"] = request_id
    if note:
        document["note"] = note
    return to_json(document)


#: Small payloads are digested on the event loop, large ones in a thread: both paths.
PADDING = pytest.mark.parametrize(
    "padding", [0, DIGEST_INLINE_BYTES + 1], ids=["small payload", "large payload"]
)


def test_a_backlog_waits_for_its_model_and_gets_results(settings: AgentSettings) -> None:
    async def scenario() -> None:
        device = SlowDevice()
        service, link, metrics = await started(settings, device)
        for n in range(5):
            link.deliver(REQUEST, request(request_id=f"r{n}"), response_topic="replies/a")
            link.deliver(EVENTS, b"\xff\xd8event")
        await asyncio.sleep(0.2)
        assert link.acked == [] and outbox_rows(service.outbox) == []  # held, not answered
        assert device.predictions == []  # not even asked
        assert metrics.registry.get_sample_value("lineside_mqtt_held", {"reason": "model"}) == 10
        device.ready.set()
        await wait_until(lambda: len(link.acked) == 10, "the backlog answered")
        assert all("label" in body for body in bodies(service))
        assert sorted(
            b["client_request_id"] for b in bodies(service) if "client_request_id" in b
        ) == [f"r{n}" for n in range(5)]
        await service.stop(timeout=1)

    asyncio.run(scenario())


def test_a_model_that_never_loads_is_answered_not_ready_after_the_wait(
    settings: AgentSettings,
) -> None:
    short = settings.model_copy(update={"mqtt_model_wait_s": 0.3})

    async def scenario() -> None:
        device = SlowDevice()
        service, link, _ = await started(short, device)
        sent = link.deliver(REQUEST, request(request_id="late"), response_topic="replies/a")
        await asyncio.sleep(0.1)
        assert link.acked == []
        await wait_until(lambda: link.acked == [sent], "answered after the wait")
        [body] = bodies(service)
        assert body["error"]["code"] == "not_ready" and body["error"]["request_id"] == "late"
        await service.stop(timeout=1)

    asyncio.run(scenario())


def test_nothing_is_acknowledged_until_its_answer_is_stored(settings: AgentSettings) -> None:
    async def scenario() -> None:
        device = SlowDevice()
        device.ready.set()
        service, link, metrics = await started(settings, device)
        failures = {"left": 3}
        real_put_many = service.outbox.put_many

        def put_many(drafts: list[Draft], **options: Any) -> list[PutResult]:
            if failures["left"] > 0:
                failures["left"] -= 1
                raise OutboxDiskFullError("could not store a message: the disk is full")
            return real_put_many(drafts, **options)

        service.outbox.put_many = put_many  # type: ignore[method-assign]
        sent = link.deliver(REQUEST, request(), response_topic="replies/a")
        await wait_until(
            lambda: (
                metrics.registry.get_sample_value("lineside_mqtt_held", {"reason": "disk"}) == 1
            ),
            "the answer held for disk space",
        )
        assert link.acked == []
        await wait_until(lambda: link.acked == [sent], "stored once space came back", timeout=10)
        [body] = bodies(service)
        assert body["label"] == "scratch"
        assert len(device.predictions) == 1  # computed once, stored on a later try
        await service.stop(timeout=1)

    asyncio.run(scenario())


def test_an_answer_still_unstored_at_stop_leaves_its_message_for_the_broker(
    settings: AgentSettings,
) -> None:
    async def scenario() -> None:
        device = SlowDevice()
        device.ready.set()
        service, link, _ = await started(settings, device)

        def put_many(drafts: list[Draft], **options: Any) -> list[PutResult]:
            raise OutboxDiskFullError("could not store a message: the disk is full")

        service.outbox.put_many = put_many  # type: ignore[method-assign]
        link.deliver(REQUEST, request(), response_topic="replies/a")
        await asyncio.sleep(0.3)
        await service.stop(timeout=0.5)
        assert link.acked == []

    asyncio.run(scenario())


def redelivered(link: FakeLink, message: Inbound) -> Inbound:
    """The broker's second delivery of `message` (after a reconnect: DUP set, the same packet
    identifier, as MQTT requires of a resend)."""
    copy = Inbound(
        message.topic,
        message.payload,
        qos=1,
        mid=message.mid,
        generation=2,
        dup=True,
        response_topic=message.response_topic,
        correlation_data=message.correlation_data,
    )
    link.on_message(copy)
    return copy


def answered_ids(service: MqttService) -> Callable[[], list[str]]:
    recorded: list[str] = []
    real = service.outbox.put_many

    def put_many(drafts: list[Draft], *, answered: Answered | None = None, **options: Any) -> Any:
        recorded.extend(d.message_id for d in drafts)
        return real(drafts, answered=answered, **options)

    service.outbox.put_many = put_many  # type: ignore[method-assign]
    return lambda: list(recorded)


@pytest.mark.parametrize(
    "identity",
    [{"correlation_data": b"\x07\x08"}, {"request_id": "r-9"}, {}],
    ids=["correlation-data", "request-id", "packet"],
)
def test_a_redelivered_message_gets_the_same_answer_computed_once(
    settings: AgentSettings, identity: dict[str, Any]
) -> None:
    async def scenario() -> None:
        device = SlowDevice()
        device.ready.set()
        service, link, metrics = await started(settings, device)
        ids = answered_ids(service)
        payload = request(request_id=identity.get("request_id"))
        first = link.deliver(
            REQUEST,
            payload,
            response_topic="replies/a",
            correlation_data=identity.get("correlation_data"),
        )
        await wait_until(lambda: link.acked == [first], "the first copy answered")
        [(_, _, answer, _)] = outbox_rows(service.outbox)
        service.outbox.ack(service.outbox.pending()[0].row_id)  # the broker took the answer
        second = redelivered(link, first)
        await wait_until(lambda: len(link.acked) == 2 and link.acked[1] == second, "the copy")
        assert len(device.predictions) == 1  # computed once
        assert len(ids()) == 2 and ids()[0] == ids()[1]  # the same answer, the same message_id
        assert [p for _, _, p, _ in outbox_rows(service.outbox)] == [answer]
        assert metrics.registry.get_sample_value("lineside_mqtt_redelivered_total") == 1
        await service.stop(timeout=1)

    asyncio.run(scenario())


def test_a_copy_arriving_while_the_first_is_processed_waits_for_its_answer(
    settings: AgentSettings,
) -> None:
    async def scenario() -> None:
        device = SlowDevice(gate=asyncio.Event())
        device.ready.set()
        service, link, _ = await started(settings, device)
        first = link.deliver(REQUEST, request(), response_topic="replies/a", correlation_data=b"1")
        await asyncio.sleep(0.05)
        second = redelivered(link, first)
        await asyncio.sleep(0.05)
        assert device.gate is not None
        device.gate.set()
        await wait_until(lambda: len(link.acked) == 2, "both copies acknowledged")
        assert {m.mid for m in link.acked} == {first.mid, second.mid}
        assert len(device.predictions) == 1
        assert len(outbox_rows(service.outbox)) == 1  # the answer is still pending: not re-sent
        await service.stop(timeout=1)

    asyncio.run(scenario())


@PADDING
def test_a_reused_id_with_another_payload_is_refused(settings: AgentSettings, padding: int) -> None:
    async def scenario() -> None:
        device = SlowDevice()
        device.ready.set()
        service, link, _ = await started(settings, device)
        pad = "x" * padding
        link.deliver(REQUEST, request(request_id="same", note=pad), response_topic="replies/a")
        link.deliver(
            REQUEST, request(b"world", request_id="same", note=pad), response_topic="replies/a"
        )
        await wait_until(lambda: len(link.acked) == 2, "both answered")
        first, second = bodies(service)
        assert first["label"] == "scratch"
        assert second["error"]["code"] == "bad_request"
        assert second["error"]["request_id"] == "same"
        assert "already used for a different request" in second["error"]["message"]
        assert len(device.predictions) == 1
        await service.stop(timeout=1)

    asyncio.run(scenario())


@PADDING
def test_two_identical_photos_as_two_events_are_two_events(
    settings: AgentSettings, padding: int
) -> None:
    async def scenario() -> None:
        device = SlowDevice()
        device.ready.set()
        service, link, _ = await started(settings, device)
        photo = b"\xff\xd8same photo" + bytes(padding)
        first = link.deliver(EVENTS, photo)
        second = link.deliver(EVENTS, photo)
        await wait_until(lambda: len(link.acked) == 2, "both answered")
        results = bodies(service)
        assert len(results) == 2 and results[0]["message_id"] != results[1]["message_id"]
        for row in service.outbox.pending():
            service.outbox.ack(row.row_id)  # the broker took both answers
        # The first redelivered (DUP) after a reconnect gets its own answer again, not the
        # second's, although the photos are the same.
        assert second.mid != first.mid
        redelivered(link, first)
        await wait_until(lambda: len(link.acked) == 3, "the copy answered")
        assert [b["message_id"] for b in bodies(service)] == [results[0]["message_id"]]
        assert len(device.predictions) == 2
        await service.stop(timeout=1)

    asyncio.run(scenario())


def test_a_shed_reply_carries_correlation_data_and_request_id(settings: AgentSettings) -> None:
    small = settings.model_copy(update={"mqtt_inbound_queue": 1, "mqtt_workers": 1})

    async def scenario() -> None:
        device = SlowDevice(gate=asyncio.Event())
        device.ready.set()
        service, link, metrics = await started(small, device)
        link.deliver(REQUEST, request(request_id="r1"), response_topic="replies/1")
        link.deliver(REQUEST, request(request_id="r2"), response_topic="replies/2")
        at_ack: list[int] = []
        original = link.ack
        link.ack = lambda m, **kw: (
            at_ack.append(len(outbox_rows(service.outbox))),
            original(m, **kw),
        )[1]  # type: ignore[method-assign]
        shed = link.deliver(
            REQUEST,
            request(request_id="r3"),
            qos=0,  # a flood; QoS 1 gets slack for a broker that overshoots its window
            response_topic="replies/3",
            correlation_data=b"\x03",
        )
        await wait_until(lambda: link.acked == [shed], "the shed message acknowledged")
        assert at_ack == [1]  # its reply was stored first
        [(topic, kind, payload, properties)] = outbox_rows(service.outbox)
        assert (topic, kind, properties) == ("replies/3", "reply", {"correlation_data": "03"})
        error = json.loads(payload)["error"]
        assert (error["code"], error["request_id"]) == ("overloaded", "r3")
        assert metrics.registry.get_sample_value("lineside_mqtt_shed_total") == 1
        assert link.published == []  # nothing bypasses the outbox
        assert device.gate is not None
        device.gate.set()
        await wait_until(lambda: len(link.acked) == 3, "the others answered")
        await service.stop(timeout=1)

    asyncio.run(scenario())


def test_qos1_beyond_capacity_waits_unless_far_beyond(settings: AgentSettings) -> None:
    """A broker that overshoots the Receive Maximum gets slack: QoS 1 messages beyond capacity
    wait unacknowledged; only far beyond it (BROKER_SLACK times) are they shed."""
    small = settings.model_copy(update={"mqtt_inbound_queue": 1, "mqtt_workers": 1})

    async def scenario() -> None:
        device = SlowDevice(gate=asyncio.Event())
        device.ready.set()
        service, link, _ = await started(small, device)
        for number in range(2 * BROKER_SLACK + 1):
            link.deliver(REQUEST, request(request_id=f"q{number}"), response_topic="replies/q")
        await wait_until(lambda: service.shed == 1, "the one far beyond capacity shed")
        assert device.gate is not None
        device.gate.set()
        await wait_until(lambda: len(link.acked) == 2 * BROKER_SLACK + 1, "all answered")
        codes = [b.get("error", {}).get("code", "ok") for b in bodies(service)]
        assert sorted(codes) == ["ok"] * (2 * BROKER_SLACK) + ["overloaded"]
        await service.stop(timeout=1)

    asyncio.run(scenario())


def test_deeply_nested_json_gets_an_error_reply(settings: AgentSettings) -> None:
    async def scenario() -> None:
        device = SlowDevice()
        device.ready.set()
        service, link, metrics = await started(settings, device)
        bomb = b"{" + b'"a":[' * 100_000 + b"]" * 100_000 + b"}"
        link.deliver(REQUEST, bomb, response_topic="replies/a", content_type="application/json")
        link.deliver(f"{BASE}/generate/completer", b"[" * 100_000, response_topic="replies/g")
        await wait_until(lambda: len(link.acked) == 2, "both answered")
        assert [b["error"]["code"] for b in bodies(service)] == ["bad_request", "bad_request"]
        assert (
            metrics.registry.get_sample_value("lineside_mqtt_errors_total", {"code": "bad_request"})
            == 2
        )
        await service.stop(timeout=1)

    asyncio.run(scenario())
