"""The one generate path, whatever transport asked: the request checked, then streamed.

`request` turns what a caller asked for (a prompt, or a conversation rendered with the model's
pinned template) into a `TextRequest`: the token limit of this agent, the model's context window
(prompt tokens + max_tokens must fit), the model's stop strings, and admission (refused at once
when `max_generations` are running or waiting). Only then does `stream` or `complete` run it, so
an oversized or refused request fails before any answer has started, on HTTP and MQTT alike.

A conversation may carry photos (content parts, `content.read_conversation`) for a
vision-language model: `prepare` checks them like the text (a text-only model refuses them, at
most `MAX_IMAGES`, each photo counted in the context), then decodes them with the hardened
decoder off the event loop, within the decode pixel budget the classifier path uses, before any
answer starts: a bad photo is an error answer (the same status as on the predict route), never a
broken stream.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from edge_agent.device.content import read_conversation
from edge_agent.engine.generation import GenerationService
from edge_agent.engine.generator import Generator
from edge_agent.engine.memory import LARGE_PIXELS, PixelBudget, give_memory_back
from edge_agent.errors import BadRequestError
from edge_agent.runtimes.base import TextChunk, TextRequest
from edge_agent.settings import AgentSettings
from edge_bundle.imaging import decoded_pixels
from edge_bundle.llama_vision import Pixels


@dataclass(frozen=True)
class TextAsk:
    """What a caller asks for: `prompt`, or `messages` for a chat model (a message's content a
    string or a list of OpenAI content parts, photos as base64 data: URLs)."""

    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    max_tokens: int | None = None  # None: this agent's limit
    temperature: float = 0.0
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None
    json_schema: str | None = None  # the output must follow this JSON schema (JSON text)


@dataclass(frozen=True)
class Prepared:
    """A checked, admitted request and the model that will run it."""

    generator: Generator
    request: TextRequest


class Texts:
    """Text generation as every transport asks for it."""

    def __init__(
        self,
        settings: AgentSettings,
        generation: GenerationService,
        pixels: PixelBudget | None = None,
    ) -> None:
        self.settings = settings
        self.generation = generation
        self.pixels = pixels or PixelBudget(settings.decode_pixel_budget)

    def request(self, model: str, ask: TextAsk) -> Prepared:
        """Check `ask` (text only) against model `model` and this agent; raise what is wrong
        with it. A conversation with photos goes through `prepare`."""
        prepared, photos = self._checked(model, ask)
        if photos:
            raise BadRequestError("a conversation with photos must be prepared with its photos")
        return prepared

    async def prepare(self, model: str, ask: TextAsk) -> Prepared:
        """`request`, for a conversation with photos too: they are decoded and scaled here."""
        prepared, photos = self._checked(model, ask)
        if not photos:
            return prepared
        images = await self.decode(prepared.generator, photos)
        return replace(prepared, request=replace(prepared.request, images=images))

    def _checked(self, model: str, ask: TextAsk) -> tuple[Prepared, tuple[bytes, ...]]:
        generator = self.generation.generator(model)
        photos: tuple[bytes, ...] = ()
        if ask.messages is not None:
            conversation = read_conversation(ask.messages)
            photos = conversation.images
            if photos and generator.vision is None:
                raise BadRequestError(
                    f"{model} takes no images (it is a text-only model); send the conversation "
                    "as text, or ask a vision-language model"
                )
            messages = conversation.messages if generator.vision else conversation.text_only()
            prompt = generator.chat_prompt(list(messages))
        elif ask.prompt:
            prompt = ask.prompt
        else:
            raise BadRequestError("give a non-empty 'prompt' string (or 'messages')")
        marker = generator.vision.marker if generator.vision else None
        if photos and marker is not None and prompt.count(marker) != len(photos):
            raise BadRequestError(
                f"the text must not contain the image marker {marker}; send photos as "
                "image_url parts"
            )
        limit = self.settings.max_generation_tokens
        max_tokens = limit if ask.max_tokens is None else ask.max_tokens
        if max_tokens < 1:
            raise BadRequestError(f"max_tokens must be 1 to {limit}")
        if max_tokens > limit:
            raise BadRequestError(f"max_tokens {max_tokens} is over this agent's limit of {limit}")
        context = generator.generation.context_size
        prompt_tokens = generator.prompt_positions(prompt, len(photos))
        if prompt_tokens + max_tokens > context:
            with_photos = f" with its {len(photos)} photo(s)" if photos else ""
            raise BadRequestError(
                f"the prompt{with_photos} is {prompt_tokens} tokens; with max_tokens "
                f"{max_tokens} that is over the model's context of {context}; shorten the "
                "prompt, send fewer photos or ask for fewer tokens"
            )
        if ask.json_schema is not None:
            generator.session.check_json_schema(ask.json_schema)
        self.generation.admit()
        request = TextRequest(
            prompt,
            max_tokens=max_tokens,
            temperature=ask.temperature,
            top_p=ask.top_p,
            stop=generator.stops(ask.stop),
            seed=ask.seed,
            json_schema=ask.json_schema,
        )
        return Prepared(generator, request), photos

    async def decode(self, generator: Generator, photos: tuple[bytes, ...]) -> tuple[Pixels, ...]:
        """The photos decoded (hardened decoder) and fitted, on a worker thread, one after the
        other, while their pixels hold the decode budget."""
        side = generator.vision.image_side if generator.vision else 0
        max_pixels, max_bytes = self.settings.max_image_pixels, self.settings.max_body_bytes
        largest = max(
            decoded_pixels(photo, max_pixels=max_pixels, target_hw=(side, side)) for photo in photos
        )

        def work() -> tuple[Pixels, ...]:
            return tuple(
                generator.fit_photo(photo, max_pixels=max_pixels, max_bytes=max_bytes)
                for photo in photos
            )

        try:
            async with self.pixels.reserve(largest, self.settings.decode_wait_ms / 1000):
                return await asyncio.to_thread(work)
        finally:
            if largest >= LARGE_PIXELS and self.pixels.large_held == 0:
                give_memory_back()

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
