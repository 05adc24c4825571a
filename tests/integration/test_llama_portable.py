"""The llama-cpp-python that scripts/install builds is portable and works: it loads a real GGUF and
generates text, deterministically under greedy decoding, without the AVX-512/AMX code paths that
crashed on virtualised CPUs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="install with scripts/install (builds llama)")

pytestmark = [pytest.mark.llama, pytest.mark.slow]


@pytest.fixture(scope="module")
def llm(small_gguf: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(small_gguf), n_ctx=256, n_threads=2, seed=0, verbose=False
    )


def test_build_is_portable() -> None:
    info = llama_cpp.llama_print_system_info().decode()
    native = re.findall(r"\b(AVX512\w*|AMX\w*) = 1", info)
    assert not native, f"built with {native}: not portable ({info})"


def test_generates_real_text_deterministically(llm: llama_cpp.Llama) -> None:
    prompt = "The capital of France is"
    first = llm.create_completion(prompt, max_tokens=8, temperature=0.0, top_k=1)
    second = llm.create_completion(prompt, max_tokens=8, temperature=0.0, top_k=1)
    text = first["choices"][0]["text"]
    assert first["usage"]["completion_tokens"] > 0
    assert text.strip(), "the model produced no text"
    assert text == second["choices"][0]["text"]
    assert re.search(r"[A-Za-z]{2,}", text), f"no words in {text!r}"
