"""Serving language models: one generation at a time, bounded waiting, and the CPU yielded to
classifications.

llama.cpp already spreads one generation over the profile's threads, and a `Llama` object is not
thread-safe, so generations run one after another on a single thread; at most
`max_generations` are admitted (running or waiting), beyond which callers get 503. Between two
tokens the generator pauses while classifications are in flight (for at most
`generation_pause_ms` per token), so on a 2-core box the fast answer keeps its budget and the
explanation simply streams a little later.

The llm thread runs `generation_nice` steps below the event loop (its OpenMP workers inherit
that), under the decode and inference threads (`inference_nice`): a classification that arrives
while a token is being computed takes the CPU at once instead of waiting for the pause between
tokens. Without contention the nice value changes nothing. Nothing else keeps a thread that has
run llama.cpp (`engine.threads`).

Chunks cross from the llm thread to the event loop through a `_Handoff`: the thread wakes the
loop once per batch, not once per token, and whatever arrived by the time the loop runs is
merged into one chunk. When the loop keeps up, that is one token per chunk as before; when it
falls behind (a slow client, a busy CPU), it catches up in one write instead of one per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from edge_agent.engine.generator import Generator
from edge_agent.engine.lane import InferenceLane, lower_priority
from edge_agent.engine.types import GeneratorState
from edge_agent.errors import NotReadyError, OverloadedError, UnknownModelError
from edge_agent.runtimes.base import TextChunk, TextRequest
from edge_agent.settings import AgentSettings

_END = object()
T = TypeVar("T")


class _Handoff:
    """Items from one producer thread to the event loop, with one wake-up per batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[object] = deque()
        self._lock = threading.Lock()
        self._pending = False  # a wake-up is scheduled and has not been taken yet
        self._ready = asyncio.Event()

    def put(self, item: object) -> None:
        """From the producer thread."""
        with self._lock:
            self._items.append(item)
            if self._pending:
                return
            self._pending = True
        # A closed loop has nobody waiting: the consumer ended (at its finish chunk) and the
        # agent stopped while the llm thread was still tidying up.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._ready.set)

    async def take(self) -> list[object]:
        """On the loop: everything put since the last take (waits for at least a wake-up)."""
        await self._ready.wait()
        self._ready.clear()
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._pending = False
        return items


def merged(items: list[object]) -> Iterator[object]:
    """Consecutive text chunks without a finish reason as one chunk; anything else as it is."""
    text: list[str] = []
    for item in items:
        if isinstance(item, TextChunk) and item.finish_reason is None:
            text.append(item.text)
            continue
        if text:
            yield TextChunk("".join(text))
            text = []
        yield item
    if text:
        yield TextChunk("".join(text))


class GenerationService:
    """Text models by name, the thread that runs them, and their admission."""

    def __init__(self, settings: AgentSettings, lane: InferenceLane) -> None:
        self.settings = settings
        self.lane = lane
        self.models: dict[str, GeneratorState] = {}
        self.in_flight = 0
        # llama.cpp's OpenMP workers are started by this thread and inherit its priority.
        self._pool = ThreadPoolExecutor(
            1, "llm", initializer=lower_priority(settings.generation_nice)
        )

    def set_model(self, name: str, state: GeneratorState) -> None:
        previous = self.models.get(name)
        self.models[name] = state
        old = previous.generator if previous is not None else None
        if old is not None and old is not state.generator:
            self._pool.submit(old.close)  # after the generation running on it, if any

    def generator(self, name: str) -> Generator:
        state = self.models.get(name)
        if state is None:
            raise UnknownModelError(
                f"no language model called {name!r} is installed; installed: "
                f"{sorted(self.models) or 'none'}"
            )
        if state.status != "ready" or state.generator is None:
            raise NotReadyError(
                f"language model {name!r} is {state.status}"
                + (f": {state.reason}" if state.reason else ""),
                retry_after_s=5.0,
            )
        return state.generator

    def admit(self) -> None:
        if self.in_flight >= self.settings.max_generations:
            raise OverloadedError(
                f"{self.in_flight} generations are running or waiting (the limit); retry shortly",
                retry_after_s=2.0,
            )

    async def stream(
        self, generator: Generator, request: TextRequest, cancel: threading.Event
    ) -> AsyncIterator[TextChunk]:
        """Generate on the llm thread; chunks arrive as they are made. Setting `cancel`, or
        closing this iterator (a client that went away), stops the generation."""
        self.admit()
        self.in_flight += 1
        loop = asyncio.get_running_loop()
        handoff = _Handoff(loop)
        put = handoff.put

        def work() -> None:
            try:
                if cancel.is_set():
                    return
                for chunk in generator.session.stream(
                    request, cancelled=cancel.is_set, between_tokens=self._yield_cpu
                ):
                    put(chunk)
            except Exception as exc:  # handed to the consumer, raised there
                put(exc)
            finally:
                put(_END)

        loop.run_in_executor(self._pool, work)
        try:
            ended = False
            while not ended:
                for item in merged(await handoff.take()):
                    if item is _END:
                        ended = True
                        break
                    if isinstance(item, Exception):
                        raise item
                    assert isinstance(item, TextChunk)
                    yield item
                    # The last chunk: the llm thread may still tidy up (the session empties
                    # llama.cpp's state), which the answer need not wait for.
                    ended = item.finish_reason is not None
                    if ended:
                        break
        finally:
            cancel.set()
            self.in_flight -= 1

    async def call(self, work: Callable[[], T]) -> T:
        """Run `work` on the llm thread (a classification with a vision-language model), admitted
        and counted like a generation."""
        self.admit()
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)
        finally:
            self.in_flight -= 1

    def _yield_cpu(self) -> None:
        """Between tokens: wait while classifications are in flight (bounded)."""
        limit = self.settings.generation_pause_ms / 1000
        if limit <= 0:
            return
        deadline = time.monotonic() + limit
        while self.lane.classifying() and time.monotonic() < deadline:
            time.sleep(0.002)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for state in self.models.values():
            if state.generator is not None:
                state.generator.close()
