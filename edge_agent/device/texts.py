"""The one generate path, whatever transport asked: the request checked, then streamed.

`request` turns what a caller asked for (a prompt, or a conversation rendered with the model's
pinned template) into a `TextRequest`: the token limit of this agent, the model's context window
(prompt tokens + max_tokens must fit), the model's stop strings, and admission (refused at once
when `max_generations` are running or waiting). Only then does `stream` or `complete` run it, so
an oversized or refused request fails before any answer has started, on HTTP and MQTT alike.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from edge_agent.engine.generation import GenerationService
from edge_agent.engine.generator import Generator
from edge_agent.errors import BadRequestError
from edge_agent.runtimes.base import TextChunk, TextRequest
from edge_agent.settings import AgentSettings


@dataclass(frozen=True)
class TextAsk:
    """What a caller asks for: `prompt`, or `messages` for a chat model."""

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    max_tokens: int | None = None  # None: this agent's limit
    temperature: float = 0.0
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Prepared:
    """A checked, admitted request and the model that will run it."""

    generator: Generator
    request: TextRequest


class Texts:
    """Text generation as every transport asks for it."""

    def __init__(self, settings: AgentSettings, generation: GenerationService) -> None:
        self.settings = settings
        self.generation = generation

    def request(self, model: str, ask: TextAsk) -> Prepared:
        """Check `ask` against model `model` and this agent; raise what is wrong with it."""
        generator = self.generation.generator(model)
        if ask.messages is not None:
            prompt = generator.chat_prompt(list(ask.messages))
        elif ask.prompt:
            prompt = ask.prompt
        else:
            raise BadRequestError("give a non-empty 'prompt' string (or 'messages')")
        limit = self.settings.max_generation_tokens
        max_tokens = limit if ask.max_tokens is None else ask.max_tokens
        if max_tokens < 1:
            raise BadRequestError(f"max_tokens must be 1 to {limit}")
        if max_tokens > limit:
            raise BadRequestError(f"max_tokens {max_tokens} is over this agent's limit of {limit}")
        context = generator.generation.context_size
        prompt_tokens = generator.session.count_tokens(prompt)
        if prompt_tokens + max_tokens > context:
            raise BadRequestError(
                f"the prompt is {prompt_tokens} tokens; with max_tokens {max_tokens} that is over "
                f"the model's context of {context}; shorten the prompt or ask for fewer tokens"
            )
        self.generation.admit()
        request = TextRequest(
            prompt,
            max_tokens=max_tokens,
            temperature=ask.temperature,
            top_p=ask.top_p,
            stop=generator.stops(ask.stop),
            seed=ask.seed,
        )
        return Prepared(generator, request)

    def stream(
        self, prepared: Prepared, cancel: threading.Event | None = None
    ) -> AsyncIterator[TextChunk]:
        """The chunks as they are made; closing the iterator (or `cancel`) stops generating."""
        return self.generation.stream(
            prepared.generator, prepared.request, cancel or threading.Event()
        )

    async def complete(self, prepared: Prepared) -> tuple[str, TextChunk]:
        """The whole text, and the last chunk (finish reason and token counts)."""
        text, last = "", TextChunk("")
        async for chunk in self.stream(prepared):
            text += chunk.text
            last = chunk
        return text, last
