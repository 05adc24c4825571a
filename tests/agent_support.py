"""Helpers for the agent's tests: small signed bundles built without torch, and a real agent
process (`edge-agent serve` under uvicorn) on a free port.

The bundle's model is a tiny random conv net written with `onnx.helper`; its golden samples are
recorded through the shared preprocessing path and `edge_bundle.scores`, exactly as the packager
records them, so the agent's self-test passes (or, with `golden_offset`, deliberately fails).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cv2
import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_bundle.bundle import write_bundle
from edge_bundle.knowledge import KnowledgeBase
from edge_bundle.manifest import Golden, GoldenSample, ManifestBody
from edge_bundle.preprocess import load_spec, preprocess_bytes
from edge_bundle.scores import to_probabilities
from edge_bundle.signing import KeyRole, SigningKey, write_key_files

LABELS = ("ok", "scratch", "dent")
SIDE = 32
SPEC = {
    "resize": "exact",
    "height": SIDE,
    "width": SIDE,
    "interpolation": "bilinear",
    "rescale_factor": 1 / 255,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}
KNOWLEDGE = {
    "ok": {"title": "No defect", "severity": "info", "corrective_actions": ["Release the part."]},
    "scratch": {
        "title": "Surface scratch",
        "severity": "minor",
        "root_causes": ["Worn guide rail"],
        "corrective_actions": ["Dress the guide rail."],
    },
    "dent": {"title": "Dent", "severity": "major", "root_causes": ["Dropped part"]},
}


@dataclass(frozen=True)
class Keys:
    key: SigningKey
    private: Path
    public: Path


def make_keys(directory: Path, name: str = "test") -> Keys:
    key = SigningKey.generate(KeyRole.BUNDLE)
    private, public = write_key_files(key, directory, name)
    return Keys(key, private, public)


def tiny_model(path: Path, seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32)
    w2 = (rng.standard_normal((len(LABELS), 8)) * 0.8).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "w2"], ["logits"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def photo(seed: int, size: tuple[int, int] = (120, 160)) -> np.ndarray:
    """A BGR test photo: gradient, noise and a blob."""
    rng = np.random.default_rng(seed)
    height, width = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = rng.uniform(40, 200, 3) + x[..., None] * rng.uniform(-1, 1, 3) * 200 / width
    image = image + y[..., None] * rng.uniform(-1, 1, 3) * 200 / height
    image += rng.normal(0, 6, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    cv2.circle(
        image,
        (width // 2, height // 2),
        height // 4,
        tuple(int(c) for c in rng.integers(0, 255, 3)),
        -1,
    )
    return image


def jpeg(seed: int = 0, size: tuple[int, int] = (120, 160)) -> bytes:
    ok, data = cv2.imencode(".jpg", photo(seed, size), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


@dataclass
class BuiltBundle:
    path: Path
    keys: Keys
    name: str
    version: int
    files: dict[str, Path] = field(default_factory=dict)


def build_bundle(
    out_dir: Path,
    keys: Keys,
    *,
    name: str = "defects",
    version: int = 1,
    seed: int = 3,
    golden_offset: float = 0.0,
    profiles: tuple[str, ...] = ("generic-x86-64-avx2",),
    model_builder: Callable[[Path, int], Path] | None = None,
    model_bytes: bytes | None = None,
    explainer: str | None = None,
    anomaly_gate: str | None = None,
) -> BuiltBundle:
    """A signed image-classification bundle; `golden_offset` shifts the recorded expectations.

    `model_builder(path, seed)` writes another ONNX model (the golden outputs are recorded with
    it); `model_bytes` replaces the model file after the golden outputs were recorded (a model
    that does not load).
    """
    import onnxruntime as ort

    work = out_dir / f"{name}-{version}-src"
    (work / "golden").mkdir(parents=True, exist_ok=True)
    model = (model_builder or tiny_model)(work / "model.onnx", seed)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    spec = load_spec(SPEC)
    samples = []
    files: dict[str, Path] = {"model.onnx": model}
    for index in range(2):
        ok, data = cv2.imencode(".png", photo(100 + index, (64, 64)))
        assert ok
        arcname = f"golden/{index:02d}.png"
        (work / arcname).write_bytes(data.tobytes())
        files[arcname] = work / arcname
        probs = to_probabilities(
            session.run(None, {"x": preprocess_bytes(data.tobytes(), spec)})[0], "logits"
        )[0]
        order = np.argsort(-probs)
        expected = tuple((LABELS[int(i)], round(float(probs[i]) + golden_offset, 6)) for i in order)
        samples.append(GoldenSample(input_path=arcname, expected_topk=expected))
    if model_bytes is not None:
        model.write_bytes(model_bytes)
    knowledge = work / "knowledge.json"
    knowledge.write_bytes(KnowledgeBase.from_mapping(KNOWLEDGE).to_bytes())
    files["knowledge.json"] = knowledge
    body = ManifestBody(
        name=name,
        version=version,
        created_at=datetime.now(UTC),
        task="image-classification",
        runtime="onnx",
        preprocessing=SPEC,
        labels=LABELS,
        compatible_profiles=profiles,
        golden=Golden(tolerance=1e-4, samples=tuple(samples)),
        knowledge_path="knowledge.json",
        explainer=explainer,
        anomaly_gate=anomaly_gate,
        extra={"output_kind": "logits"},
    )
    path = write_bundle(out_dir / f"{name}-{version}.bundle", files, body, keys.key)
    return BuiltBundle(path, keys, name, version, files)


def install_bundle(state_dir: Path, bundle: Path, trusted_key: Path) -> None:
    """`edge-agent install` a bundle into `state_dir`, as an operator would (fails loudly)."""
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.app.cli", "install", str(bundle),
         "--state-dir", str(state_dir), "--trusted-key", str(trusted_key)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class AgentProcess:
    """A real `edge-agent serve` child process."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                response = httpx.get(f"{self.url}/readyz", timeout=5, verify=False)
                last = response.json()
                if response.status_code == 200:
                    return dict(response.json())
            time.sleep(0.1)
        raise AssertionError(f"agent not ready after {timeout}s: {last}\n{self.log()}")

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def spawn_agent(
    state_dir: Path, *args: str, env: dict[str, str] | None = None, scheme: str = "http"
) -> AgentProcess:
    """Start `edge-agent serve` on a free port without waiting for it (it may die on purpose)."""
    port = free_port()
    log_path = state_dir.parent / f"agent-{port}.log"
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [
        sys.executable, "-m", "edge_agent.app.cli", "serve", "--state-dir", str(state_dir),
        "--port", str(port), "--host", "127.0.0.1", *args,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    return AgentProcess(process, f"{scheme}://127.0.0.1:{port}", log_path)


@contextlib.contextmanager
def run_agent(
    state_dir: Path, *args: str, env: dict[str, str] | None = None, scheme: str = "http"
) -> Iterator[AgentProcess]:
    """Start `edge-agent serve` on a free port, wait until it is alive; SIGTERM it afterwards.

    The port `free_port` found can be taken before the agent binds it (the kernel hands the
    same range to outgoing connections): an agent that exits for that reason is started again
    on another port, up to `PORT_ATTEMPTS` times."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        agent = spawn_agent(state_dir, *args, env=env, scheme=scheme)
        try:
            _wait_alive(agent)
        except _PortTakenError:
            if attempt == PORT_ATTEMPTS:
                raise AssertionError(f"no free port in {attempt} tries:\n{agent.log()}") from None
            continue
        except BaseException:
            agent.stop()
            raise
        break
    try:
        yield agent
    finally:
        agent.stop()


PORT_ATTEMPTS = 3


class _PortTakenError(Exception):
    """The agent exited because its port was taken between `free_port` and its bind."""


def _wait_alive(agent: AgentProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if agent.process.poll() is not None:
            log = agent.log()
            if "address already in use" in log:
                raise _PortTakenError()
            raise AssertionError(f"agent exited with {agent.process.returncode}:\n{log}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{agent.url}/healthz", timeout=2, verify=False).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"agent did not start:\n{agent.log()}")
        time.sleep(0.1)


GOLDEN_PROMPT = "The most common cause of a surface scratch on a machined part is"
CHAT_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def greedy(gguf: Path, prompt: str, max_tokens: int, context: int = 512) -> str:
    """llama-cpp-python's own greedy completion, with the generic profile's settings."""
    from llama_cpp import Llama

    llama = Llama(
        model_path=str(gguf), n_ctx=context, n_threads=2, n_threads_batch=2, seed=0, verbose=False
    )
    try:
        out = llama.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=False)
        return str(out["choices"][0]["text"])  # type: ignore[index]
    finally:
        llama.close()


def build_text_bundle(
    out_dir: Path,
    keys: Keys,
    gguf: Path,
    *,
    name: str = "explainer",
    version: int = 1,
    template: str | None = None,
    context: int = 512,
) -> BuiltBundle:
    """A signed text-generation bundle around `gguf`, its golden completion recorded here."""
    import hashlib

    from edge_bundle.bundle import SourceFile
    from edge_bundle.manifest import ChatTemplate, Generation, TextGolden

    work = out_dir / f"{name}-{version}-src"
    work.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path | SourceFile] = {"model.gguf": SourceFile(gguf, "model")}
    pinned = None
    if template is not None:
        (work / "chat_template.jinja").write_text(template)
        files["chat_template.jinja"] = SourceFile(work / "chat_template.jinja", "tokenizer")
        pinned = ChatTemplate(
            path="chat_template.jinja",
            sha256=hashlib.sha256(template.encode()).hexdigest(),
            source="test",
        )
    expected = greedy(gguf, GOLDEN_PROMPT, 8, context)
    body = ManifestBody(
        name=name,
        version=version,
        created_at=datetime.now(UTC),
        task="text-generation",
        runtime="llama",
        compatible_profiles=("generic-x86-64-avx2",),
        generation=Generation(
            context_size=context,
            chat_template=pinned,
            golden=(TextGolden(prompt=GOLDEN_PROMPT, max_tokens=8, expected_text=expected),),
            stop=("<end_of_turn>",) if template else (),
        ),
    )
    path = write_bundle(out_dir / f"{name}-{version}.bundle", files, body, keys.key)
    return BuiltBundle(path, keys, name, version)
