"""The llm thread's hand-off to the event loop: every chunk arrives, in order, with one wake-up per
batch rather than per token, merged text chunks keep the finish chunk apart, and a stream ends at
its finish chunk."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edge_agent.engine.generation import _END, GenerationService, _Handoff, merged
from edge_agent.engine.lane import InferenceLane
from edge_agent.metrics import AgentMetrics
from edge_agent.runtimes.base import TextChunk, TextRequest
from tests.unit.agent_fixtures import agent_settings, clean_environment


def test_every_item_arrives_in_order_with_fewer_wake_ups_than_items() -> None:
    async def run() -> tuple[list[object], int]:
        handoff = _Handoff(asyncio.get_running_loop())
        started = threading.Event()

        def produce() -> None:
            started.set()
            for number in range(2000):
                handoff.put(number)
            handoff.put(_END)

        thread = threading.Thread(target=produce)
        thread.start()
        started.wait()
        received: list[object] = []
        takes = 0
        while not received or received[-1] is not _END:
            await asyncio.sleep(0.001)  # a loop busy elsewhere: the thread runs ahead
            received += await handoff.take()
            takes += 1
        thread.join()
        return received, takes

    received, takes = asyncio.run(run())
    assert received[:-1] == list(range(2000))
    assert takes < 2000


def test_a_take_after_a_late_wake_up_returns_nothing_rather_than_hanging() -> None:
    async def run() -> list[object]:
        handoff = _Handoff(asyncio.get_running_loop())
        handoff.put("a")
        await asyncio.sleep(0)  # the wake-up runs
        first = await handoff.take()
        handoff.put("b")
        second = await asyncio.wait_for(handoff.take(), 1.0)
        return first + second

    assert asyncio.run(run()) == ["a", "b"]


def test_merged_joins_text_and_keeps_the_last_chunk_and_errors_apart() -> None:
    error = RuntimeError("llama failed")
    items: list[object] = [
        TextChunk("a"),
        TextChunk("b"),
        error,
        TextChunk("c"),
        TextChunk("", "stop", 3, 4),
        _END,
    ]
    out = list(merged(items))
    assert out[0] == TextChunk("ab")
    assert out[1] is error
    assert out[2] == TextChunk("c")
    assert out[3] == TextChunk("", "stop", 3, 4)
    assert out[4] is _END


def test_a_stream_ends_at_its_finish_chunk_while_the_session_tidies_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer does not wait for what the session does after its last chunk (the llama
    session empties llama.cpp's state there); the llm thread finishes it afterwards."""
    clean_environment(monkeypatch)
    lane = InferenceLane(4, AgentMetrics())
    service = GenerationService(agent_settings(tmp_path / "state"), lane)
    tidy, tidied = threading.Event(), threading.Event()

    class Session:
        def stream(
            self, request: TextRequest, *, cancelled: Any, between_tokens: Any
        ) -> Iterator[TextChunk]:
            yield TextChunk("hello")
            yield TextChunk("", "stop", 1, 1)
            tidy.wait(10)
            tidied.set()

    async def run() -> list[TextChunk]:
        generator: Any = SimpleNamespace(session=Session())
        request = TextRequest("p", max_tokens=2)
        return [chunk async for chunk in service.stream(generator, request, threading.Event())]

    try:
        chunks = asyncio.run(run())
        assert [(c.text, c.finish_reason) for c in chunks] == [("hello", None), ("", "stop")]
        assert service.in_flight == 0
        assert not tidied.is_set()
        tidy.set()
        assert tidied.wait(5)
    finally:
        tidy.set()
        service.close()
        lane.close()
