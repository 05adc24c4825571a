"""Fakes for testing the agent's middle (the device API, the MQTT service, the updater runner)
without an agent process, a broker or a real language model.

- `GatedOnnxRuntime` is the real ONNX runtime with a gate in front of every inference, so a test
  can hold a prediction in flight; `FakeLlamaRuntime` generates numbered words, counts a token per
  word, and records how long each pause between two tokens lasted. Both are swapped into the
  runtime table (`edge_agent.runtimes.RUNTIMES`), the seam the agent itself chooses runtimes by.
- `FakeLink` stands in for the paho link: a test delivers messages through it and sees
  what was acknowledged and what was published outside the outbox.
- `FakePublisher` records what the device or the updater sent out.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest

from edge_agent import faults
from edge_agent.app.agent import build_device, build_profile, build_store
from edge_agent.device.api import Device
from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt.link import Inbound
from edge_agent.mqtt.outbox import Outbox
from edge_agent.mqtt.topics import Topic, TopicFilter
from edge_agent.runtimes.base import TextChunk, TextRequest
from edge_agent.settings import AgentSettings
from edge_bundle.bundle import SourceFile, VerifiedBundle, write_bundle
from edge_bundle.manifest import Generation, ManifestBody, TextGolden
from edge_bundle.profiles import HardwareProfile
from tests.agent_support import BuiltBundle, Keys

GOLDEN_PROMPT = "say something"


# ---- runtimes ------------------------------------------------------------------------------
class GatedOnnxRuntime:
    """The ONNX runtime, with every inference waiting for `gate` (open unless a test closes it)."""

    name = "onnx"
    gate = threading.Event()
    waiting = threading.Event()  # set when an inference reached a closed gate

    def load(self, bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path) -> Any:
        from edge_agent.runtimes.onnx import OnnxRuntime

        return _GatedSession(OnnxRuntime().load(bundle, profile, cache_dir))


class _GatedSession:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self.inner.providers)

    def run(self, batch: Any) -> Any:
        if not GatedOnnxRuntime.gate.is_set():
            GatedOnnxRuntime.waiting.set()
            assert GatedOnnxRuntime.gate.wait(30), "the test never opened the gate"
        return self.inner.run(batch)

    def close(self) -> None:
        self.inner.close()


class FakeLlamaRuntime:
    """A language model that says " w0 w1 w2 ..." and counts one token per word."""

    name = "llama"
    pauses: ClassVar[list[float]] = []  # seconds spent in each between-tokens pause, all sessions

    def load(self, bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path) -> Any:
        return FakeTextSession()


class FakeTextSession:
    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def check_json_schema(self, schema: str) -> None:
        return None

    def stream(
        self,
        request: TextRequest,
        *,
        cancelled: Callable[[], bool],
        between_tokens: Callable[[], None],
    ) -> Iterator[TextChunk]:
        prompt_tokens = self.count_tokens(request.prompt)
        made = 0
        for index in range(request.max_tokens):
            if cancelled():
                break
            started = time.monotonic()
            between_tokens()
            FakeLlamaRuntime.pauses.append(time.monotonic() - started)
            made += 1
            yield TextChunk(f" w{index}")
        yield TextChunk("", "length", prompt_tokens, made)

    def close(self) -> None:
        pass


def fake_text(max_tokens: int) -> str:
    return "".join(f" w{index}" for index in range(max_tokens))


@pytest.fixture
def fake_runtimes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Serve ONNX bundles through `GatedOnnxRuntime` and llama bundles through the fake."""
    from edge_agent import runtimes

    monkeypatch.setitem(runtimes.RUNTIMES, "onnx", f"{__name__}:GatedOnnxRuntime")
    monkeypatch.setitem(runtimes.RUNTIMES, "llama", f"{__name__}:FakeLlamaRuntime")
    GatedOnnxRuntime.gate.set()
    GatedOnnxRuntime.waiting.clear()
    FakeLlamaRuntime.pauses.clear()
    yield
    GatedOnnxRuntime.gate.set()


def build_fake_text_bundle(
    out_dir: Path, keys: Keys, *, name: str = "completer", context: int = 128
) -> BuiltBundle:
    """A signed text-generation bundle for `FakeLlamaRuntime` (its golden completion included)."""
    work = out_dir / f"{name}-src"
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.gguf"
    model.write_bytes(b"GGUF not a real model, served by FakeLlamaRuntime")
    body = ManifestBody(
        name=name,
        version=1,
        created_at=datetime.now(UTC),
        task="text-generation",
        runtime="llama",
        compatible_profiles=("generic-x86-64-avx2",),
        generation=Generation(
            context_size=context,
            golden=(TextGolden(prompt=GOLDEN_PROMPT, max_tokens=8, expected_text=fake_text(8)),),
        ),
    )
    files: dict[str, Path | SourceFile] = {"model.gguf": SourceFile(model, "model")}
    path = write_bundle(out_dir / f"{name}-1.bundle", files, body, keys.key)
    return BuiltBundle(path, keys, name, 1)


# ---- the device ----------------------------------------------------------------------------
def make_device(
    settings: AgentSettings, publisher: Any = None, metrics: AgentMetrics | None = None
) -> Device:
    """The device as the agent wires it, without the agent (no transports, no updater)."""
    return build_device(
        settings,
        build_profile(settings),
        build_store(settings),
        metrics or AgentMetrics(),
        publisher,
    )


def close_device(device: Device) -> None:
    """Stop what `make_device` started: the inference thread, the pools, the models."""
    core = device.models.core
    core.lane.close()
    core.close()
    device.models.generation.close()


def gauge(metrics: AgentMetrics, name: str) -> float:
    """The value of an unlabelled gauge."""
    value = metrics.registry.get_sample_value(name)
    assert value is not None, f"no gauge {name}"
    return float(value)


async def wait_until(probe: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout} s")
        await asyncio.sleep(0.01)


# ---- MQTT ----------------------------------------------------------------------------------
@dataclass
class FakeLink:
    """What `MqttService` is given instead of `MqttLink`."""

    settings: AgentSettings
    outbox: Outbox
    subscriptions: list[TopicFilter]
    status_topic: Topic
    on_message: Callable[[Inbound], None]
    on_state: Callable[[bool], None]
    connected: bool = True
    started: bool = False
    acked: list[Inbound] = field(default_factory=list)
    published: list[tuple[Topic, bytes]] = field(default_factory=list)
    wakes: int = 0
    _mid: int = 0

    def start(self) -> None:
        self.started = True

    async def stop(self, timeout: float = 5.0) -> None:
        self.started = False

    def wake(self) -> None:
        self.wakes += 1

    def ack(self, message: Inbound, *, wake: bool = True) -> None:
        self.acked.append(message)

    def publish_now(self, topic: Topic, payload: bytes, *, qos: int = 0) -> None:
        self.published.append((topic, payload))

    def deliver(self, topic: str, payload: bytes, qos: int = 1, **properties: Any) -> Inbound:
        """A message from the broker (QoS 1 unless told), as the link hands it over."""
        self._mid += 1
        message = Inbound(topic, payload, qos=qos, mid=self._mid, generation=1, **properties)
        self.on_message(message)
        return message


class FakeLinks:
    """A link factory that keeps the link it made."""

    def __init__(self) -> None:
        self.link: FakeLink | None = None

    def __call__(self, *args: Any) -> FakeLink:
        self.link = FakeLink(*args)
        return self.link


class HeldCheckpoint:
    """An outbox checkpoint started in a thread and held at its fault point (the outbox's lock
    taken, `checkpointing` True) until `release()`: what a slow disk's fsyncs would do, for as
    long as the test needs, whatever the machine's load. The hold gives up after `limit_s`, so
    code that wrongly waits for the checkpoint on the test's own thread fails instead of
    hanging."""

    def __init__(self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch, limit_s: float = 30.0):
        self._released = threading.Event()
        original = faults.hit

        def hit(point: str) -> None:
            if point == "outbox.checkpoint":
                self._released.wait(limit_s)
            else:
                original(point)

        monkeypatch.setattr(faults, "hit", hit)
        self.outbox = outbox
        self._thread = threading.Thread(target=outbox.checkpoint)
        self._thread.start()

    def release(self) -> None:
        self._released.set()

    def join(self) -> None:
        self.release()
        self._thread.join()


def outbox_rows(outbox: Outbox) -> list[tuple[str, str, bytes, dict[str, Any]]]:
    """(topic, kind, payload, properties) of every row waiting in the outbox, in order."""
    return [(m.topic, m.kind, m.payload, m.properties) for m in outbox.pending(limit=1000)]


# ---- publishing ----------------------------------------------------------------------------
@dataclass
class FakePublisher:
    results: list[dict[str, Any]] = field(default_factory=list)
    feedback: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    telemetry: list[dict[str, Any]] = field(default_factory=list)

    async def publish_result(self, prediction: Any, source: dict[str, Any]) -> None:
        self.results.append({**prediction.to_json(), "source": source})

    async def publish_feedback(self, record: dict[str, Any], image: bytes | None) -> None:
        self.feedback.append(record)

    async def publish_update(self, report: dict[str, Any]) -> None:
        self.updates.append(report)

    async def publish_telemetry(self, figures: dict[str, Any]) -> None:
        self.telemetry.append(figures)

    def health(self) -> dict[str, Any]:
        return {"connected": True, "queued": 0, "shed": 0, "outbox": {}}
