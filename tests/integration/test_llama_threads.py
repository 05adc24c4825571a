"""Why the agent loads language models on a thread of its own: a thread that has run llama.cpp
keeps its OpenMP (libgomp) workers while it lives, and with more such threads than CPUs libgomp
stops spinning at its barriers, which slows every generation (`edge_agent.engine.threads`).
With the real small GGUF: llama.cpp work run through `on_own_thread` leaves no thread behind, where
the same work on a pooled thread leaves its workers."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from edge_agent.engine.threads import on_own_thread

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="counts threads through /proc"
)


def _threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _new_threads(before: set[str], timeout_s: float = 10.0) -> set[str]:
    """Threads started since `before` that are still alive, once they have had `timeout_s` to
    exit (threads that were there before may come and go: they are not counted)."""
    deadline = time.monotonic() + timeout_s
    while (new := _threads() - before) and time.monotonic() < deadline:
        time.sleep(0.02)
    return new


@pytest.fixture(scope="module")
def llama(small_gguf: Path) -> Any:
    from llama_cpp import Llama

    model = Llama(model_path=str(small_gguf), n_ctx=256, n_threads=2, seed=0, verbose=False)
    yield model
    model.close()


def _generate(llama: Any) -> str:
    from edge_bundle.llama_state import clear_state

    clear_state(llama)
    out = llama.create_completion("The casting shows", max_tokens=4, temperature=0.0)
    return str(out["choices"][0]["text"])


def test_llama_work_on_its_own_thread_leaves_no_openmp_workers(llama: Any) -> None:
    before = _threads()
    text = asyncio.run(on_own_thread(lambda: _generate(llama)))
    assert text
    assert _new_threads(before) == set()


def test_the_same_work_on_a_pooled_thread_keeps_its_workers(llama: Any) -> None:
    """The contrast that makes the test above mean something: a pool thread that ran llama.cpp
    keeps the pool thread and its OpenMP worker until the pool shuts down."""
    if "libgomp" not in Path("/proc/self/maps").read_text():
        pytest.skip("this llama.cpp build does not use OpenMP (libgomp)")
    before = _threads()
    pool = ThreadPoolExecutor(1)
    try:
        assert pool.submit(_generate, llama).result()
        time.sleep(0.2)
        assert len(_threads() - before) >= 2  # the pool thread and its OpenMP worker
    finally:
        pool.shutdown()
    assert _new_threads(before) == set()
