"""Language-model routes: our own `generate`, the OpenAI-compatible completions and chat
completions (so the `openai` client works against the box), and the explanation stream of a
prediction. Each route only validates its body and shapes the answer: the request is checked
(token limit, the model's context, admission) by the device's one generate path before any answer
starts. Streaming answers are server-sent events; a client that goes away cancels its generation.

Chat messages may carry OpenAI content parts, photos among them as base64 `data:` URLs, for a
vision-language model; the device reads, decodes and checks them (`device.content`, `texts`), so
a remote URL is refused unfetched and a hostile photo gets the status the predict route gives it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.device.api import Device
from edge_agent.device.texts import TextAsk
from edge_agent.errors import BadRequestError
from edge_agent.http.openapi import BODY, error_responses
from edge_agent.runtimes.base import TextChunk

CHAT_DESCRIPTION = (
    "The conversation is rendered with the model's pinned chat template. A message's content is "
    'a string or a list of parts: `{"type": "text", "text": ...}` and, for a '
    'vision-language model, `{"type": "image_url", "image_url": {"url": '
    '"data:image/jpeg;base64,..."}}` (at most 4 photos). Only base64 `data:` URLs are '
    "accepted: a remote URL (http, https, file, ...) is refused with 400 and never fetched. A "
    "photo is decoded by the same hardened decoder as the predict route (same 413/415/422 for a "
    "bomb, an unknown format or a damaged file) and scaled to the model's image side; the request "
    "body limit caps what a request carries."
)
Stop = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=4)]
MAX_SCHEMA_CHARS = 16_000


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(default="answer", max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: `text`, `json_object` (any JSON object) or `json_schema`
    (decoding constrained to the schema with llama.cpp's grammar)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_text(self) -> str | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.json_schema is None:
            raise BadRequestError(
                'response_format json_schema needs {"json_schema": {"schema": {...}}}'
            )
        text = json.dumps(self.json_schema.schema_, sort_keys=True)
        if len(text) > MAX_SCHEMA_CHARS:
            raise BadRequestError(
                f"the JSON schema is {len(text)} characters; keep it under {MAX_SCHEMA_CHARS}"
            )
        return text


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    stop: Stop | str | None = None
    seed: int | None = None
    stream: bool = False
    response_format: ResponseFormat | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def ask(
        self, *, prompt: str | None = None, messages: list[dict[str, Any]] | None = None
    ) -> TextAsk:
        return TextAsk(
            prompt=prompt,
            messages=tuple(messages) if messages is not None else None,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stops(),
            seed=self.seed,
            json_schema=self.response_format.schema_text() if self.response_format else None,
        )


class GenerateBody(_Body):
    prompt: str = Field(min_length=1, max_length=32_000)
    stream: bool = True


class CompletionBody(_Body):
    model: str
    prompt: str = Field(min_length=1, max_length=32_000)
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. OpenAI's "detail"

    url: str = Field(
        description="a base64 data: URL (data:image/jpeg;base64,...); any other is refused"
    )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=32_000)


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl | str = Field(description="{'url': 'data:...'} or the data: URL itself")


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: (
        Annotated[str, Field(max_length=32_000)]
        | Annotated[list[ContentPart], Field(min_length=1, max_length=64)]
    ) = Field(
        description="text, or a list of content parts: text, and photos (image_url, base64 data: "
        "URLs, at most 4 per request) for a vision-language model"
    )


class ChatBody(_Body):
    model: str
    messages: list[Message] = Field(min_length=1, max_length=64)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)


def add_generation_routes(app: FastAPI, device: Device) -> None:
    @app.post(
        "/v1/models/{name}/generate",
        tags=["language models"],
        summary="Generate text",
        responses=error_responses(*BODY, 404, 503),
    )
    async def generate(name: str, body: GenerateBody) -> Any:
        prepared = device.text_request(name, body.ask(prompt=body.prompt))
        if not body.stream:
            started = time.perf_counter()
            text, last = await device.complete_text(prepared)
            return {
                "model": prepared.generator.describe(),
                "text": text,
                "finish_reason": last.finish_reason,
                "usage": _usage(last),
                "ms": round((time.perf_counter() - started) * 1000, 1),
            }

        async def events() -> AsyncIterator[str]:
            async for chunk in device.stream_text(prepared):
                if chunk.text:
                    yield _sse({"text": chunk.text})
                if chunk.finish_reason is not None:
                    yield _sse(
                        {"done": True, "finish_reason": chunk.finish_reason, "usage": _usage(chunk)}
                    )

        return _stream(events())

    @app.post(
        "/v1/completions",
        tags=["language models"],
        summary="OpenAI-compatible completions",
        responses=error_responses(*BODY, 404, 503),
    )
    async def completions(body: CompletionBody) -> Any:
        prepared = device.text_request(body.model, body.ask(prompt=body.prompt))
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            text, last = await device.complete_text(prepared)
            return {
                "id": ident, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": text, "finish_reason": _finish(last), "logprobs": None}],
                "usage": _usage(last),
            }  # fmt: skip

        async def events() -> AsyncIterator[str]:
            async for chunk in device.stream_text(prepared):
                finish = _finish(chunk) if chunk.finish_reason is not None else None
                if chunk.text or finish:
                    yield _sse({
                        "id": ident, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [{"index": 0, "text": chunk.text, "finish_reason": finish, "logprobs": None}],
                    })  # fmt: skip
            yield "data: [DONE]\n\n"

        return _stream(events())

    @app.post(
        "/v1/chat/completions",
        tags=["language models"],
        summary="OpenAI-compatible chat (with photos, for a vision-language model)",
        description=CHAT_DESCRIPTION,
        responses=error_responses(*BODY, 404, 415, 422, 503),
    )
    async def chat_completions(body: ChatBody) -> Any:
        messages = [m.model_dump() for m in body.messages]
        prepared = await device.prepare_text(body.model, body.ask(messages=messages))
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            text, last = await device.complete_text(prepared)
            return {
                "id": ident, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": _finish(last)}],
                "usage": _usage(last),
            }  # fmt: skip

        async def events() -> AsyncIterator[str]:
            first = True
            async for chunk in device.stream_text(prepared):
                delta: dict[str, str] = {"role": "assistant"} if first else {}
                first = False
                if chunk.text:
                    delta["content"] = chunk.text
                finish = _finish(chunk) if chunk.finish_reason is not None else None
                if delta or finish:
                    yield _sse({
                        "id": ident, "object": "chat.completion.chunk", "created": created,
                        "model": body.model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    })  # fmt: skip
            yield "data: [DONE]\n\n"

        return _stream(events())

    @app.get(
        "/v1/requests/{request_id}/explanation",
        tags=["requests"],
        summary="The explanation of a prediction (server-sent events, or JSON when done)",
        responses=error_responses(404),
    )
    async def explanation(request_id: str, request: Request) -> Any:
        job = device.explanation(request_id)
        if "text/event-stream" not in request.headers.get("accept", ""):
            return JSONResponse(job.to_json())

        async def events() -> AsyncIterator[str]:
            async for event in device.follow_explanation(request_id):
                yield _sse(event)

        return _stream(events())


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _usage(chunk: TextChunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


def _finish(chunk: TextChunk) -> str:
    return "stop" if chunk.finish_reason in ("stop", "cancelled") else "length"
