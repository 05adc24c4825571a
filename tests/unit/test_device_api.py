"""The device API against fake runtimes, without an agent process or a transport: the one predict
path (admission slot, in-flight gauge, outcome per transport, HTTP results published), the one
generate path (token limit, the model's context, admission), feedback, and describing models."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge_agent.device.api import Device
from edge_agent.device.predictions import Photo
from edge_agent.device.texts import TextAsk
from edge_agent.engine.types import ModelState
from edge_agent.errors import (
    BadRequestError,
    NotReadyError,
    OverloadedError,
    UnknownModelError,
    UnknownRequestError,
)
from edge_agent.metrics import AgentMetrics
from tests.agent_support import Keys, build_bundle, jpeg, make_keys
from tests.unit.agent_fixtures import agent_settings, clean_environment
from tests.unit.device_fakes import (
    FakeLlamaRuntime,
    FakePublisher,
    GatedOnnxRuntime,
    build_fake_text_bundle,
    close_device,
    fake_runtimes,  # noqa: F401  (a fixture)
    fake_text,
    gauge,
    make_device,
    wait_until,
)

PHOTO = jpeg(7)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


def device_for(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch, **overrides: object
) -> tuple[Device, AgentMetrics, FakePublisher]:
    clean_environment(monkeypatch)
    settings = agent_settings(tmp_path / "state", keys, **overrides)
    metrics, publisher = AgentMetrics(), FakePublisher()
    return make_device(settings, publisher, metrics), metrics, publisher


async def installed(device: Device, tmp_path: Path, keys: Keys, *, context: int = 128) -> None:
    await device.install(build_bundle(tmp_path / "dist", keys).path)
    await device.install(build_fake_text_bundle(tmp_path / "dist", keys, context=context).path)
    device.models.loading = False
    FakeLlamaRuntime.pauses.clear()  # forget the self-test's generation


@pytest.mark.usefixtures("fake_runtimes")
def test_a_prediction_holds_an_admission_slot_while_in_flight(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, metrics, _ = device_for(tmp_path, keys, monkeypatch)
    lane = device.models.core.lane

    async def scenario() -> None:
        await installed(device, tmp_path, keys)
        GatedOnnxRuntime.gate.clear()
        task = asyncio.create_task(device.predict("defects", Photo(PHOTO), transport="mqtt"))
        await wait_until(GatedOnnxRuntime.waiting.is_set, "the inference reaching the runtime")
        assert lane.admission.in_flight == 1
        assert lane.classifying()
        assert gauge(metrics, "lineside_in_flight") == 1
        GatedOnnxRuntime.gate.set()
        answer = await task
        assert answer.prediction.label in ("ok", "scratch", "dent")
        assert answer.explanation is None  # not asked for
        assert lane.admission.in_flight == 0
        assert gauge(metrics, "lineside_in_flight") == 0

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)
    assert device.models.core.outcomes[("mqtt", "ok")] == 1


@pytest.mark.usefixtures("fake_runtimes")
def test_a_full_lane_refuses_at_once_and_counts_the_refusal(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, _, _ = device_for(tmp_path, keys, monkeypatch, max_in_flight=1)

    async def scenario() -> None:
        await installed(device, tmp_path, keys)
        GatedOnnxRuntime.gate.clear()
        held = asyncio.create_task(device.predict("defects", Photo(PHOTO), transport="http"))
        await wait_until(GatedOnnxRuntime.waiting.is_set, "the first prediction in flight")
        with pytest.raises(OverloadedError):
            await device.predict("defects", Photo(PHOTO), transport="mqtt")
        GatedOnnxRuntime.gate.set()
        await held

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)
    outcomes = device.models.core.outcomes
    assert outcomes[("http", "ok")] == 1
    assert outcomes[("mqtt", "overloaded")] == 1


@pytest.mark.usefixtures("fake_runtimes")
def test_the_model_is_checked_before_the_photo_is_received(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, _, _ = device_for(tmp_path, keys, monkeypatch)
    received = []

    async def receive() -> Photo:
        received.append(True)
        return Photo(PHOTO)

    async def scenario() -> None:
        await installed(device, tmp_path, keys)
        with pytest.raises(UnknownModelError):
            await device.predict("nothing", receive, transport="http")
        assert received == []
        answer = await device.predict("defects", receive, transport="http")
        assert answer.prediction.timings_ms["receive"] >= 0
        assert received == [True]

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)
    assert device.models.core.outcomes[("http", "unknown_model")] == 1


@pytest.mark.usefixtures("fake_runtimes")
def test_http_results_are_published_when_configured(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, _, publisher = device_for(tmp_path, keys, monkeypatch, mqtt_publish_http_results=True)

    async def scenario() -> None:
        await installed(device, tmp_path, keys)
        await device.predict("defects", Photo(PHOTO), transport="http")
        await device.predict("defects", Photo(PHOTO), transport="mqtt")
        await device.predict("defects", Photo(PHOTO), transport="http", client_request_id="scan-42")

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)
    assert [r["source"] for r in publisher.results] == [
        {"transport": "http"},
        {"transport": "http", "client_request_id": "scan-42"},  # as the HTTP answer carries it
    ]


@pytest.mark.usefixtures("fake_runtimes")
def test_the_generate_path_checks_limit_context_and_admission(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, _, _ = device_for(
        tmp_path, keys, monkeypatch, max_generation_tokens=200, max_generations=1
    )

    async def scenario() -> None:
        await installed(device, tmp_path, keys, context=128)
        with pytest.raises(BadRequestError, match="over this agent's limit of 200"):
            device.text_request("completer", TextAsk(prompt="hi", max_tokens=201))
        with pytest.raises(BadRequestError, match="the prompt is 4 tokens; with max_tokens 125"):
            device.text_request("completer", TextAsk(prompt="one two three four", max_tokens=125))
        device.text_request("completer", TextAsk(prompt="one two three four", max_tokens=124))
        with pytest.raises(BadRequestError, match="non-empty 'prompt'"):
            device.text_request("completer", TextAsk(prompt=""))
        with pytest.raises(BadRequestError, match="no chat template"):
            device.text_request("completer", TextAsk(messages=({"role": "user", "content": "x"},)))
        with pytest.raises(UnknownModelError):
            device.text_request("nothing", TextAsk(prompt="hi"))
        prepared = device.text_request("completer", TextAsk(prompt="one two", max_tokens=3))
        assert prepared.request.max_tokens == 3
        text, last = await device.complete_text(prepared)
        assert text == fake_text(3)
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 2, 3)
        # One generation admitted at most: a second is refused while the first streams.
        stream = device.stream_text(
            device.text_request("completer", TextAsk(prompt="a", max_tokens=4))
        )
        await anext(stream)
        with pytest.raises(OverloadedError):
            device.text_request("completer", TextAsk(prompt="b", max_tokens=4))
        await stream.aclose()

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)


@pytest.mark.usefixtures("fake_runtimes")
def test_feedback_is_stored_forwarded_and_counted(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, _, publisher = device_for(tmp_path, keys, monkeypatch)

    async def scenario() -> str:
        await installed(device, tmp_path, keys)
        answer = await device.predict("defects", Photo(PHOTO), transport="http")
        request_id = answer.prediction.request_id
        await wait_until(lambda: device.records.get(request_id) is not None, "the record kept")
        with pytest.raises(UnknownRequestError):
            await device.submit_feedback({"request_id": "0" * 32, "verdict": "confirmed"})
        stored = await device.submit_feedback({"request_id": request_id, "verdict": "confirmed"})
        return str(stored["feedback_id"])

    try:
        feedback_id = asyncio.run(scenario())
    finally:
        close_device(device)
    assert [r["feedback_id"] for r in publisher.feedback] == [feedback_id]
    recent = asyncio.run(device.recent_feedback(5))
    assert recent["stored"] == 1
    assert recent["feedback"][0]["forwarded"] is True


@pytest.mark.usefixtures("fake_runtimes")
def test_readiness_and_descriptions(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, _, _ = device_for(tmp_path, keys, monkeypatch)
    assert device.readiness() == (False, ["loading the installed bundles"])
    try:
        asyncio.run(installed(device, tmp_path, keys))
        assert device.readiness() == (True, [])
        names = [(m["name"], m["status"]) for m in device.describe_models()]
        assert names == [("defects", "ready"), ("completer", "ready")]
        assert device.describe_model("completer")["context_size"] == 128
        with pytest.raises(UnknownModelError, match="installed: \\['completer', 'defects'\\]"):
            device.describe_model("nothing")
        device.models.core.set_model("defects", ModelState("failed", "broken"))
        with pytest.raises(NotReadyError):
            asyncio.run(device.predict("defects", Photo(PHOTO), transport="http"))
        assert device.readiness() == (False, ["model defects is failed: broken"])
        assert device.healthy()
    finally:
        close_device(device)
