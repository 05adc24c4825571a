"""The MQTT transport without a broker: the service against a fake link (what the paho owner
thread would do) and the handlers against a fake device API. The outbox is the real one, in a
temporary directory, so "in the outbox before acknowledged" is checked on what would be sent."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge_agent.device.predictions import Answer, Photo
from edge_agent.device.texts import Prepared, TextAsk
from edge_agent.engine.types import Prediction
from edge_agent.errors import BadRequestError, DrainingError, NotReadyError
from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt.handlers import MqttHandlers
from edge_agent.mqtt.link import Inbound
from edge_agent.mqtt.messages import Outgoing, to_json
from edge_agent.mqtt.routes import Routes
from edge_agent.mqtt.service import MqttService
from edge_agent.mqtt.topics import Topic
from edge_agent.runtimes.base import TextChunk
from edge_agent.settings import AgentSettings
from tests.unit.agent_fixtures import agent_settings, clean_environment
from tests.unit.device_fakes import (
    FakeLink,
    FakeLinks,
    HeldCheckpoint,
    outbox_rows,
    wait_until,
)

BASE = "lineside/v1/plant/box1"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AgentSettings:
    clean_environment(monkeypatch)
    return agent_settings(
        tmp_path / "state",
        mqtt_enabled=True,
        site="plant",
        device="box1",
        mqtt_response_topics=("replies/#",),
        telemetry_interval_s=0,
    )


Handler = Callable[[Inbound], Awaitable[list[Outgoing]]]


async def started(
    settings: AgentSettings, handler: Handler, metrics: AgentMetrics | None = None
) -> tuple[MqttService, FakeLink]:
    links = FakeLinks()
    service = MqttService(settings, Routes(settings), metrics or AgentMetrics(), link_factory=links)
    await service.start(handler)
    assert links.link is not None and links.link.started
    return service, links.link


def reply(message: Inbound, text: str) -> list[Outgoing]:
    topic = Topic(message.response_topic or "replies/none")
    return [Outgoing(topic, text.encode(), "reply", f"{text:0>32}"[:32], {})]


# ---- the service ---------------------------------------------------------------------------
def test_an_answer_is_in_the_outbox_before_its_message_is_acknowledged(
    settings: AgentSettings,
) -> None:
    async def handler(message: Inbound) -> list[Outgoing]:
        return reply(message, "answer")

    async def scenario() -> None:
        service, link = await started(settings, handler)
        at_ack: list[int] = []
        original = link.ack
        link.ack = lambda m, **kw: (
            at_ack.append(len(outbox_rows(service.outbox))),
            original(m, **kw),
        )[1]  # type: ignore[method-assign]
        sent = link.deliver(f"{BASE}/infer/defects", b"x", response_topic="replies/1")
        await wait_until(lambda: link.acked == [sent], "the message acknowledged")
        assert at_ack == [1]
        assert [(t, k, p) for t, k, p, _ in outbox_rows(service.outbox)] == [
            ("replies/1", "reply", b"answer")
        ]
        assert link.wakes >= 1
        await service.stop(timeout=1)

    asyncio.run(scenario())


def test_a_reply_made_during_a_checkpoint_waits_for_it_off_the_event_loop(
    settings: AgentSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply is committed on the event loop (cheaper than a thread hop), except while the
    outbox's thread holds the outbox for a checkpoint: then the reply waits in a thread, and
    the loop goes on serving (here it wakes from a sleep while the checkpoint is still held)."""

    async def handler(message: Inbound) -> list[Outgoing]:
        return reply(message, "answer")

    async def scenario() -> None:
        service, link = await started(settings, handler)
        stores: list[int] = []  # the threads the reply's commit was made on
        store = service._store
        monkeypatch.setattr(
            service, "_store", lambda *args: (stores.append(threading.get_ident()), store(*args))
        )
        checkpoint = HeldCheckpoint(service.outbox, monkeypatch)
        await wait_until(lambda: service.outbox.checkpointing, "the checkpoint running")
        sent = link.deliver(f"{BASE}/infer/defects", b"x", response_topic="replies/1")
        await wait_until(lambda: bool(stores), "the reply's commit begun")
        assert stores != [threading.get_ident()], "the reply was committed on the event loop"
        await asyncio.sleep(0.01)  # the loop turns while the commit waits for the checkpoint
        assert service.outbox.checkpointing, "the event loop waited for the checkpoint"
        assert link.acked == []  # not before its reply is stored
        checkpoint.release()
        await wait_until(lambda: link.acked == [sent], "acknowledged after the checkpoint")
        assert [p for _, _, p, _ in outbox_rows(service.outbox)] == [b"answer"]
        checkpoint.join()
        await service.stop(timeout=1)

    asyncio.run(scenario())


def test_answers_keep_the_arrival_order_of_their_source_topic(settings: AgentSettings) -> None:
    async def handler(message: Inbound) -> list[Outgoing]:
        if message.payload == b"slow":
            await asyncio.sleep(0.2)
        return reply(message, message.payload.decode())

    async def scenario() -> None:
        service, link = await started(settings, handler)
        link.deliver(f"{BASE}/infer/defects", b"slow", response_topic="replies/a")
        link.deliver(f"{BASE}/infer/defects", b"fast", response_topic="replies/a")
        await wait_until(lambda: len(link.acked) == 2, "both acknowledged")
        assert [p for _, _, p, _ in outbox_rows(service.outbox)] == [b"slow", b"fast"]
        await service.stop(timeout=1)

    asyncio.run(scenario())


def test_work_the_draining_device_refuses_is_left_for_the_broker(
    settings: AgentSettings,
) -> None:
    async def handler(message: Inbound) -> list[Outgoing]:
        raise DrainingError("the agent is shutting down")

    async def scenario() -> None:
        service, link = await started(settings, handler)
        link.deliver(f"{BASE}/infer/defects", b"x", response_topic="replies/1")
        await wait_until(lambda: service.waiting == 0, "the message taken")
        await asyncio.sleep(0.05)
        assert link.acked == []
        assert outbox_rows(service.outbox) == []
        service.start_draining()
        link.deliver(f"{BASE}/infer/defects", b"y")
        await asyncio.sleep(0.05)
        assert service.waiting == 0 and link.acked == []  # not even taken
        await service.stop(timeout=1)

    asyncio.run(scenario())


def test_the_service_is_the_devices_publisher(settings: AgentSettings) -> None:
    async def handler(message: Inbound) -> list[Outgoing]:
        return []

    async def scenario() -> None:
        metrics = AgentMetrics()
        service, _ = await started(settings, handler, metrics)
        await service.publish_update({"phase": "idle"})
        await service.publish_telemetry({"ready": True})
        await service.publish_feedback({"feedback_id": "f"}, b"jpeg bytes")
        rows = outbox_rows(service.outbox)
        assert [(t, k) for t, k, _, _ in rows] == [
            (f"{BASE}/update", "update"),
            (f"{BASE}/telemetry", "telemetry"),
            (f"{BASE}/feedback", "feedback"),
        ]
        assert "image_base64" in json.loads(rows[2][2])
        health = service.health()
        assert health["connected"] is True and health["outbox"]["messages"] == 3
        assert metrics.registry.get_sample_value("lineside_outbox_messages") == 3
        await service.stop(timeout=1)

    asyncio.run(scenario())


# ---- the handlers over a fake device -------------------------------------------------------
def prediction(request_id: str = "a" * 32) -> Prediction:
    return Prediction(
        request_id=request_id,
        model={"name": "defects", "version": 1, "bundle_sha256": "0" * 64},
        label="scratch",
        score=0.9,
        top_k=(("scratch", 0.9), ("ok", 0.1)),
        knowledge=None,
        image={"format": "jpeg", "width": 4, "height": 4, "decoded_at_reduction": 1},
        timings_ms={"infer": 1.0},
    )


@dataclass
class FakeDevice:
    """The part of the device API the MQTT handlers call, recording each call."""

    fail: Exception | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)
    asks: list[tuple[str, TextAsk]] = field(default_factory=list)
    feedback: list[dict[str, Any]] = field(default_factory=list)

    async def predict(self, name: str, photo: Photo, **options: Any) -> Answer:
        self.predictions.append({"name": name, "photo": photo, **options})
        if self.fail is not None:
            raise self.fail
        explanation = {"status": "pending"} if options.get("explain") else None
        return Answer(prediction(), explanation)

    def text_request(self, model: str, ask: TextAsk) -> Prepared:
        self.asks.append((model, ask))
        if self.fail is not None:
            raise self.fail
        return Prepared(None, None)  # type: ignore[arg-type]

    async def prepare_text(self, model: str, ask: TextAsk) -> Prepared:
        return self.text_request(model, ask)

    async def complete_text(self, prepared: Prepared) -> tuple[str, TextChunk]:
        return " hello", TextChunk("", "length", 3, 1)

    async def submit_feedback(self, submitted: dict[str, Any]) -> dict[str, Any]:
        self.feedback.append(submitted)
        return {"feedback_id": "f" * 32}


async def sent_later(outgoing: list[Outgoing]) -> None:
    pass


def handlers_for(settings: AgentSettings, device: FakeDevice) -> MqttHandlers:
    return MqttHandlers(device, Routes(settings), AgentMetrics(), sent_later)  # type: ignore[arg-type]


def inbound(topic: str, payload: bytes, **properties: Any) -> Inbound:
    return Inbound(topic, payload, qos=1, mid=1, generation=1, **properties)


def test_a_request_takes_the_devices_predict_path(settings: AgentSettings) -> None:
    device = FakeDevice()
    handlers = handlers_for(settings, device)
    payload = to_json({"image": "aGVsbG8=", "top_k": 2, "request_id": "r-1", "note": "by hand"})
    message = inbound(
        f"{BASE}/infer/defects",
        payload,
        response_topic="replies/x",
        correlation_data=b"\x01\x02",
        content_type="application/json",
    )
    [out] = asyncio.run(handlers.process(message))
    [call] = device.predictions
    assert call["name"] == "defects" and call["transport"] == "mqtt" and call["top_k"] == 2
    assert call["photo"] == Photo(b"hello", "by hand") and call["explain"] is True
    assert str(out.topic) == "replies/x" and out.kind == "reply"
    assert out.properties == {"correlation_data": "0102"}
    body = json.loads(out.payload)
    assert body["label"] == "scratch" and body["client_request_id"] == "r-1"
    assert body["explanation"] == {"status": "pending"} and body["message_id"] == out.message_id


def test_device_errors_go_back_with_their_code(settings: AgentSettings) -> None:
    device = FakeDevice(fail=NotReadyError("model 'defects' is loading"))
    handlers = handlers_for(settings, device)
    [out] = asyncio.run(
        handlers.process(
            inbound(f"{BASE}/infer/defects", b"\xff\xd8raw", response_topic="replies/e")
        )
    )
    error = json.loads(out.payload)["error"]
    assert (str(out.topic), error["code"]) == ("replies/e", "not_ready")
    assert error["message"] == "model 'defects' is loading"
    # A draining device leaves the message for the broker instead of answering it.
    device.fail = DrainingError("shutting down")
    with pytest.raises(DrainingError):
        asyncio.run(handlers.process(inbound(f"{BASE}/infer/defects", b"raw")))


def test_a_response_topic_outside_the_allowed_ones_is_refused(settings: AgentSettings) -> None:
    device = FakeDevice()
    handlers = handlers_for(settings, device)
    [out] = asyncio.run(
        handlers.process(inbound(f"{BASE}/infer/defects", b"raw", response_topic="elsewhere/x"))
    )
    assert str(out.topic) == f"{BASE}/errors"
    assert "not allowed" in json.loads(out.payload)["error"]["message"]
    assert device.predictions == []


def test_generation_takes_the_devices_generate_path(settings: AgentSettings) -> None:
    device = FakeDevice()
    handlers = handlers_for(settings, device)
    document = {"prompt": "Hello", "max_tokens": 5, "temperature": 0.5, "request_id": "g-1"}
    topic = f"{BASE}/generate/completer"
    [out] = asyncio.run(
        handlers.process(inbound(topic, to_json(document), response_topic="replies/g"))
    )
    assert device.asks == [("completer", TextAsk(prompt="Hello", max_tokens=5, temperature=0.5))]
    body = json.loads(out.payload)
    assert body["text"] == " hello" and body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1}
    assert body["client_request_id"] == "g-1"
    # What the device refuses goes back as an error reply.
    device.fail = BadRequestError("the prompt is 900 tokens; ...")
    [refused] = asyncio.run(
        handlers.process(inbound(topic, to_json(document), response_topic="replies/g"))
    )
    assert json.loads(refused.payload)["error"]["code"] == "bad_request"
    # Malformed payloads never reach the device.
    asked = len(device.asks)
    for bad in ({"prompt": ""}, {"messages": "hi"}, {"prompt": "x", "temperature": 9}):
        [out] = asyncio.run(handlers.process(inbound(topic, to_json(bad))))
        assert json.loads(out.payload)["error"]["code"] == "bad_request"
    assert len(device.asks) == asked


def test_feedback_and_notices_are_routed(settings: AgentSettings) -> None:
    device = FakeDevice()
    notices: list[tuple[str, bytes]] = []

    async def on_notice(topic: str, payload: bytes) -> None:
        notices.append((topic, payload))

    with_updates = settings.model_copy(update={"release_keys": (Path("release.pub"),)})
    handlers = MqttHandlers(
        device,  # type: ignore[arg-type]
        Routes(with_updates),
        AgentMetrics(),
        sent_later,
        notices=on_notice,
    )
    feedback = to_json({"request_id": "a" * 32, "verdict": "confirmed"})
    [out] = asyncio.run(
        handlers.process(inbound(f"{BASE}/feedback/submit", feedback, response_topic="replies/f"))
    )
    assert json.loads(out.payload)["stored"] is True
    assert device.feedback == [{"request_id": "a" * 32, "verdict": "confirmed"}]
    assert asyncio.run(handlers.process(inbound(f"{BASE}/release", b"notice"))) == []
    assert notices == [(f"{BASE}/release", b"notice")]
    assert asyncio.run(handlers.process(inbound("somewhere/else", b"x"))) == []
