"""Greedy text through the agent is a function of the prompt alone (issue #12).

llama-cpp-python reuses the previous request's KV cache for a common prompt prefix, which changes
the numbers and so the greedy text; the agent's `LlamaSession` starts every request from an empty
state. Here, on the real small GGUF (Gemma 3 270M, Q4_K_M), through the agent's own generation
path (`load_generator` -> `LlamaSession.stream`): 64-token greedy completions equal a freshly
constructed `Llama` with the same context, batch and threads, and stay the same over repeats
interleaved with prompts that share a long prefix with them (the case where reuse changed text).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.engine.generator import Generator, load_generator, run_text_selftest
from edge_agent.runtimes.base import TextRequest
from edge_bundle.bundle import open_bundle
from edge_bundle.profiles import HardwareProfile, load_profile
from edge_bundle.signing import TrustStore
from tests.agent_support import GOLDEN_PROMPT, build_text_bundle, make_keys

llama_cpp = pytest.importorskip("llama_cpp", reason="install llama-cpp-python: scripts/install")

pytestmark = [pytest.mark.llama, pytest.mark.slow]

TOKENS = 64
CONTEXT = 512  # the bundle's context; the generic profile allows 2048, so the agent uses this
BATCH = 512  # llama-cpp-python's default n_batch, which the agent keeps
CASTING = (
    "Quality inspection report. The most common causes of porosity in an aluminium casting are"
)
BURRS = "The night shift found burrs on brackets from press 3. The first thing to check is"


@pytest.fixture(scope="module")
def profile() -> HardwareProfile:
    return load_profile("generic-x86-64-avx2")


@pytest.fixture(scope="module")
def generator(
    tmp_path_factory: pytest.TempPathFactory, small_gguf: Path, profile: HardwareProfile
) -> Iterator[Generator]:
    work = tmp_path_factory.mktemp("determinism")
    keys = make_keys(work / "keys")
    built = build_text_bundle(work / "bundle", keys, small_gguf, name="completer", context=CONTEXT)
    bundle = open_bundle(built.path, TrustStore.from_files([keys.public]), work / "staging")
    loaded = load_generator(bundle, profile, work / "cache")
    yield loaded
    loaded.close()


def fresh_llama(gguf: Path, profile: HardwareProfile, prompt: str, tokens: int = TOKENS) -> str:
    """llama-cpp-python's own greedy text from a newly constructed `Llama` (nothing cached)."""
    llama = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=CONTEXT,
        n_batch=BATCH,
        n_threads=profile.llama.threads,
        n_threads_batch=profile.llama.threads_batch,
        seed=0,
        verbose=False,
    )
    try:
        out = llama.create_completion(prompt, max_tokens=tokens, temperature=0.0, stream=False)
        return str(out["choices"][0]["text"])
    finally:
        llama.close()


def through_agent(generator: Generator, prompt: str, tokens: int = TOKENS) -> str:
    request = TextRequest(prompt, max_tokens=tokens, temperature=0.0)
    chunks = generator.session.stream(request, cancelled=lambda: False, between_tokens=lambda: None)
    return "".join(chunk.text for chunk in chunks)


@pytest.fixture(scope="module")
def expected(small_gguf: Path, profile: HardwareProfile) -> dict[str, str]:
    """Three prompts and their fresh-`Llama` texts. The last continues the casting prompt's
    answer, as a follow-up question would: after the casting request, all of it but its tail is
    a cached prefix."""
    casting = fresh_llama(small_gguf, profile, CASTING)
    follow_up = CASTING + casting[:40]
    prompts = (BURRS, CASTING, follow_up)
    return {prompt: fresh_llama(small_gguf, profile, prompt) for prompt in prompts}


def test_greedy_text_equals_a_fresh_llama_on_three_prompts(
    generator: Generator, expected: dict[str, str]
) -> None:
    for prompt, text in expected.items():  # in order: each one follows a related request
        assert generator.session.count_tokens(text) > TOKENS // 2, f"too short to tell: {text!r}"
        assert through_agent(generator, prompt) == text, f"differs for {prompt!r}"


def test_the_same_text_on_every_repeat_interleaved_with_other_prompts(
    generator: Generator, expected: dict[str, str]
) -> None:
    burrs, casting, follow_up = expected
    texts = []
    for repeat in range(10):
        texts.append(through_agent(generator, follow_up))
        # The casting prompt leaves a cache that the follow-up's prompt almost entirely matches;
        # the burrs prompt leaves one that shares only the BOS token.
        through_agent(generator, casting if repeat % 2 == 0 else burrs)
    assert texts == [expected[follow_up]] * 10


def test_the_golden_self_test_passes_after_other_requests(generator: Generator) -> None:
    through_agent(generator, GOLDEN_PROMPT, 16)  # its prompt and more, cached before the replay
    report = run_text_selftest(generator)
    assert not report.failures, report.failures


def test_the_state_is_emptied_after_each_answer_not_before_the_next(
    generator: Generator, expected: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emptying llama.cpp's state (4.5 ms at a 2048-token context) is off the next request's
    path; a consumer that stops at the last chunk leaves it to the next request instead."""
    from edge_agent.runtimes import llama as runtime

    events: list[str] = []
    real = runtime.clear_state

    def clear_state(llama: object) -> None:
        events.append("clear")
        real(llama)

    monkeypatch.setattr(runtime, "clear_state", clear_state)
    burrs, casting, follow_up = expected
    through_agent(generator, casting)
    events.clear()
    request = TextRequest(follow_up, max_tokens=TOKENS, temperature=0.0)
    text = []
    for chunk in generator.session.stream(
        request, cancelled=lambda: False, between_tokens=lambda: None
    ):
        events.append("finish" if chunk.finish_reason else "text")
        text.append(chunk.text)
    assert "".join(text) == expected[follow_up]
    assert events[0] == "text" and events[-2:] == ["finish", "clear"]
    assert events.count("clear") == 1

    stream = generator.session.stream(
        TextRequest(burrs, max_tokens=TOKENS, temperature=0.0),
        cancelled=lambda: False,
        between_tokens=lambda: None,
    )
    for chunk in stream:
        if chunk.finish_reason is not None:
            break  # as the generation service does: the answer is complete
    stream.close()
    events.clear()
    assert through_agent(generator, follow_up) == expected[follow_up]
    assert events == ["clear", "clear"]  # before it (left over), and after it

    # Emptying after an answer fails: logged, and the next request empties it first.
    def failing(llama: object) -> None:
        events.append("failed")
        raise RuntimeError("llama.cpp refused")

    monkeypatch.setattr(runtime, "clear_state", failing)
    assert through_agent(generator, burrs) == expected[burrs]
    monkeypatch.setattr(runtime, "clear_state", clear_state)
    events.clear()
    assert through_agent(generator, follow_up) == expected[follow_up]
    assert events == ["clear", "clear"]
