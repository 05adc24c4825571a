"""The two-tier defect answer: the classification first, then an explanation that streams after it.

A classifier bundle may name an explainer (a text-generation bundle). When a prediction has one,
the answer says `explanation: {"status": "pending", "url": ...}` at once and the explanation is
generated afterwards, grounded in the knowledge-base entry of the predicted label and the
technician's optional note, under the same request id. If the explainer is missing, not ready or
busy, the answer says the explanation is unavailable and why; the classification is never held
back for it. Explanations are kept (bounded) so a client can follow one while it streams
(server-sent events) or read it when done; listeners (the MQTT transport) hear when each ends.

When the explainer is a vision-language bundle, the explanation is grounded in the photo too: the
uploaded bytes are decoded once more at the projector's side (in a worker thread, after the
answer has gone) and shown to the model beside the facts. A caller may ask for a structured
explanation: decoding is then constrained to `EXPLANATION_SCHEMA` (llama.cpp's grammar for the
JSON schema), and the finished text is parsed and checked into `data`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.engine.generation import GenerationService
from edge_agent.engine.generator import Generator
from edge_agent.engine.types import Prediction
from edge_agent.errors import AgentError
from edge_agent.runtimes.base import TextRequest
from edge_agent.settings import AgentSettings
from edge_bundle.errors import BundleError

log = logging.getLogger(__name__)
KEEP = 256
SYSTEM = (
    "You explain manufacturing defects to line technicians. Use only the facts given. Answer "
    "in two or three short, plain sentences: what the defect is, its most likely cause, and "
    "what to do first."
)
SYSTEM_JSON = (
    "You explain manufacturing defects to line technicians. Use only the facts given and what "
    "the photo shows. Answer in JSON with root_cause (one sentence), actions (what to do, in "
    "order) and confidence_note (how sure the answer is and why)."
)


class StructuredExplanation(BaseModel):
    """What a structured explanation holds, for plant systems to consume."""

    model_config = ConfigDict(extra="forbid")

    root_cause: str = Field(min_length=1, max_length=500)
    actions: list[Annotated[str, Field(min_length=1, max_length=300)]] = Field(
        min_length=1, max_length=8
    )
    confidence_note: str = Field(max_length=500)


EXPLANATION_SCHEMA = json.dumps(StructuredExplanation.model_json_schema(), sort_keys=True)


@dataclass
class Explanation:
    request_id: str
    model: str
    status: str = "pending"  # pending, streaming, done, unavailable
    text: str = ""
    reason: str | None = None
    structured: bool = False
    data: dict[str, Any] | None = None  # the parsed structured explanation
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "status": self.status,
            "text": self.text,
        }
        if self.structured:
            body["format"] = "json"
            body["data"] = self.data
        if self.reason:
            body["reason"] = self.reason
        if self.finished is not None:
            body["ms"] = round((self.finished - self.started) * 1000, 1)
        return body


Listener = Callable[[Explanation], Awaitable[None]]


class Explainer:
    """Starts, keeps and streams explanations."""

    def __init__(self, settings: AgentSettings, generation: GenerationService) -> None:
        self.settings = settings
        self.generation = generation
        self.jobs: OrderedDict[str, Explanation] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(
        self,
        prediction: Prediction,
        explainer: str | None,
        note: str | None,
        listener: Listener | None = None,
        *,
        photo: bytes | None = None,
        structured: bool = False,
    ) -> dict[str, Any] | None:
        """The `explanation` field of an answer (None when the model has no explainer). A
        vision-language explainer is shown `photo`; `structured` asks for JSON."""
        if explainer is None:
            return None
        job = Explanation(prediction.request_id, explainer, structured=structured)
        try:
            generator = self.generation.generator(explainer)
            self.generation.admit()
        except AgentError as exc:
            job.status, job.reason = "unavailable", exc.message
            job.finished = time.monotonic()
            self._keep(job)
            return {"status": "unavailable", "reason": exc.message}
        self._keep(job)
        task = asyncio.create_task(self._run(job, generator, prediction, note, listener, photo))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"status": "pending", "url": f"/v1/requests/{prediction.request_id}/explanation"}

    def get(self, request_id: str) -> Explanation | None:
        return self.jobs.get(request_id)

    async def follow(self, request_id: str) -> AsyncIterator[dict[str, Any]]:
        """Events for one explanation: the text so far, each new piece, then the end."""
        job = self.jobs.get(request_id)
        if job is None:
            return
        sent = 0
        while True:
            if len(job.text) > sent:
                yield {"text": job.text[sent:]}
                sent = len(job.text)
            if job.status in ("done", "unavailable"):
                yield {"done": True, **{k: v for k, v in job.to_json().items() if k != "text"}}
                return
            job.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await job.changed.wait()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _keep(self, job: Explanation) -> None:
        self.jobs[job.request_id] = job
        while len(self.jobs) > KEEP:
            self.jobs.popitem(last=False)

    async def _run(
        self,
        job: Explanation,
        generator: Generator,
        prediction: Prediction,
        note: str | None,
        listener: Listener | None,
        photo: bytes | None,
    ) -> None:
        cancel = threading.Event()
        try:
            async with asyncio.timeout(self.settings.explanation_timeout_s):
                request = await self._request(job, generator, prediction, note, photo)
                async for chunk in self.generation.stream(generator, request, cancel):
                    if chunk.text:
                        job.status = "streaming"
                        job.text += chunk.text
                        job.changed.set()
            job.status = "done"
            job.text = job.text.strip()
            if job.structured:
                self._parse(job)
        except TimeoutError:
            cancel.set()
            job.status = "unavailable" if not job.text else "done"
            job.reason = f"cut off after {self.settings.explanation_timeout_s:.0f} s"
        except AgentError as exc:
            job.status, job.reason = "unavailable", exc.message
        except BundleError as exc:  # the photo cannot be shown to the explainer
            job.status, job.reason = "unavailable", f"the photo cannot be explained: {exc}"
        except Exception as exc:  # the explanation is optional: never let it hurt the agent
            log.exception("explanation for %s failed", job.request_id)
            job.status, job.reason = "unavailable", f"the explainer failed: {exc}"
        finally:
            job.finished = time.monotonic()
            job.changed.set()
        if listener is not None:
            try:
                await listener(job)
            except Exception:  # a transport problem must not break explanations
                log.exception("explanation listener failed for %s", job.request_id)

    async def _request(
        self,
        job: Explanation,
        generator: Generator,
        prediction: Prediction,
        note: str | None,
        photo: bytes | None,
    ) -> TextRequest:
        """What the explainer is asked: the facts, the photo for a vision-language explainer,
        and the JSON schema when a structured explanation was asked for."""
        images: tuple[Any, ...] = ()
        if generator.vision is not None and photo is not None:
            pixels = await asyncio.to_thread(
                generator.fit_photo,
                photo,
                max_pixels=self.settings.max_image_pixels,
                max_bytes=self.settings.max_body_bytes,
            )
            images = (pixels,)
        return TextRequest(
            prompt(generator, prediction, note, with_photo=bool(images), structured=job.structured),
            max_tokens=self.settings.explanation_max_tokens,
            temperature=0.0,
            stop=generator.stops(() if job.structured else ("\n\n",)),
            images=images,
            json_schema=EXPLANATION_SCHEMA if job.structured else None,
        )

    @staticmethod
    def _parse(job: Explanation) -> None:
        """The structured explanation checked against its schema, or why it is not."""
        try:
            job.data = StructuredExplanation.model_validate_json(job.text).model_dump()
        except ValidationError as exc:
            first = exc.errors()[0]
            job.reason = (
                f"the explanation is not the JSON asked for ({first['msg']}); it may have been "
                f"cut off at {job.text.count(' ') + 1} words: raise explanation_max_tokens"
            )


def facts(prediction: Prediction, note: str | None) -> str:
    """The grounded facts: the predicted class, its knowledge-base entry, the technician's note."""
    entry = prediction.knowledge or {}
    title = entry.get("title") or prediction.label
    lines = [
        f"Defect: {title} (class {prediction.label}, confidence {prediction.score:.0%}).",
        f"Severity: {entry.get('severity', 'unknown')}.",
    ]
    causes = entry.get("root_causes") or []
    actions = entry.get("corrective_actions") or []
    if causes:
        lines.append("Known root causes: " + "; ".join(causes) + ".")
    if actions:
        lines.append("Corrective actions: " + "; ".join(actions) + ".")
    if note:
        lines.append(f"Technician's note: {note.strip()[:500]}")
    return "\n".join(lines)


def prompt(
    generator: Generator,
    prediction: Prediction,
    note: str | None,
    *,
    with_photo: bool = False,
    structured: bool = False,
) -> str:
    """A chat prompt when the model has a template (the photo first when it is shown), else a
    plain completion prompt."""
    grounded = facts(prediction, note)
    if generator.chat:
        user: Any = grounded
        if with_photo:
            user = [{"type": "image"}, {"type": "text", "text": grounded}]
        system = SYSTEM_JSON if structured else SYSTEM
        return generator.chat_prompt(
            [{"role": "system", "content": system}, {"role": "user", "content": user}]
        )
    return f"Quality inspection report.\n{grounded}\nExplanation for the technician:"
