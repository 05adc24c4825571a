"""MQTT over the real device API (fake runtimes, a fake link, no broker): an MQTT prediction takes
the one predict path, so it holds an admission slot (generation pauses for it, the in-flight
gauge counts it), and an MQTT generate request takes the one generate path, so a prompt over the
model's context is refused with the very error HTTP gives."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from edge_agent.device.api import Device
from edge_agent.device.texts import TextAsk
from edge_agent.http.app import create_app
from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt.handlers import MqttHandlers
from edge_agent.mqtt.routes import Routes
from edge_agent.mqtt.service import MqttService
from edge_agent.settings import AgentSettings
from tests.agent_support import Keys, build_bundle, jpeg, make_keys
from tests.unit.agent_fixtures import agent_settings, clean_environment
from tests.unit.device_fakes import (
    FakeLink,
    FakeLinks,
    FakeLlamaRuntime,
    GatedOnnxRuntime,
    build_fake_text_bundle,
    close_device,
    fake_runtimes,  # noqa: F401  (a fixture)
    gauge,
    make_device,
    outbox_rows,
    wait_until,
)

BASE = "lineside/v1/plant/box1"
PAUSE_MS = 400


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def settings(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> AgentSettings:
    clean_environment(monkeypatch)
    return agent_settings(
        tmp_path / "state",
        keys,
        mqtt_enabled=True,
        site="plant",
        device="box1",
        mqtt_response_topics=("replies/#",),
        telemetry_interval_s=0,
        generation_pause_ms=PAUSE_MS,
    )


async def mqtt_over_device(
    settings: AgentSettings, tmp_path: Path, keys: Keys
) -> tuple[Device, MqttService, FakeLink, AgentMetrics]:
    """The device as the agent wires it, with the MQTT service (and its handlers) over it."""
    metrics, links, routes = AgentMetrics(), FakeLinks(), Routes(settings)
    service = MqttService(settings, routes, metrics, link_factory=links)
    device = make_device(settings, service, metrics)
    handlers = MqttHandlers(device, routes, metrics, service.send)
    await device.install(build_bundle(tmp_path / "dist", keys).path)
    await device.install(build_fake_text_bundle(tmp_path / "dist", keys).path)
    device.models.loading = False
    await service.start(handlers.process)
    assert links.link is not None
    FakeLlamaRuntime.pauses.clear()  # forget the self-test's generation
    return device, service, links.link, metrics


@pytest.mark.usefixtures("fake_runtimes")
def test_an_mqtt_prediction_holds_an_admission_slot(
    settings: AgentSettings, tmp_path: Path, keys: Keys
) -> None:
    async def scenario() -> Device:
        device, service, link, metrics = await mqtt_over_device(settings, tmp_path, keys)
        lane = device.models.core.lane
        GatedOnnxRuntime.gate.clear()
        link.deliver(f"{BASE}/infer/defects", jpeg(7), response_topic="replies/p")
        await wait_until(GatedOnnxRuntime.waiting.is_set, "the MQTT prediction in the runtime")
        assert lane.admission.in_flight == 1
        assert gauge(metrics, "lineside_in_flight") == 1
        # A generation now waits between its tokens while the prediction is in flight.
        prepared = device.text_request("completer", TextAsk(prompt="hello", max_tokens=3))
        generating = asyncio.create_task(device.complete_text(prepared))
        await wait_until(lambda: len(FakeLlamaRuntime.pauses) >= 1, "the first token's pause")
        assert FakeLlamaRuntime.pauses[0] >= PAUSE_MS / 1000 * 0.9
        GatedOnnxRuntime.gate.set()
        await generating
        await wait_until(lambda: len(link.acked) == 1, "the prediction answered")
        [(topic, kind, payload, _)] = outbox_rows(service.outbox)
        assert (topic, kind) == ("replies/p", "reply")
        assert json.loads(payload)["label"] in ("ok", "scratch", "dent")
        assert lane.admission.in_flight == 0
        assert gauge(metrics, "lineside_in_flight") == 0
        await service.stop(timeout=1)
        return device

    device = asyncio.run(scenario())
    close_device(device)
    assert device.models.core.outcomes[("mqtt", "ok")] == 1


@pytest.mark.usefixtures("fake_runtimes")
def test_an_mqtt_generate_request_over_the_context_is_refused_as_over_http(
    settings: AgentSettings, tmp_path: Path, keys: Keys
) -> None:
    words = " ".join(f"word{index}" for index in range(100))  # 100 tokens for the fake model
    request = {"prompt": words, "max_tokens": 40}  # 140 > the context of 128

    async def scenario() -> tuple[Device, dict[str, str], dict[str, str]]:
        device, service, link, _ = await mqtt_over_device(settings, tmp_path, keys)
        app = create_app(device)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://box"
        ) as client:
            response = await client.post(
                "/v1/models/completer/generate", json={**request, "stream": False}
            )
        assert response.status_code == 400
        over_http = response.json()["error"]
        link.deliver(
            f"{BASE}/generate/completer",
            json.dumps(request).encode(),
            response_topic="replies/g",
            correlation_data=b"g1",
        )
        await wait_until(lambda: len(link.acked) == 1, "the generate request answered")
        [(topic, _, payload, properties)] = outbox_rows(service.outbox)
        assert (topic, properties) == ("replies/g", {"correlation_data": "6731"})
        over_mqtt = json.loads(payload)["error"]
        await service.stop(timeout=1)
        return device, over_http, over_mqtt

    device, over_http, over_mqtt = asyncio.run(scenario())
    close_device(device)
    assert over_mqtt["code"] == over_http["code"] == "bad_request"
    assert over_mqtt["message"] == over_http["message"]
    assert "the prompt is 100 tokens; with max_tokens 40" in over_mqtt["message"]
    assert "context of 128" in over_mqtt["message"]
    assert FakeLlamaRuntime.pauses == []  # refused before anything was generated
