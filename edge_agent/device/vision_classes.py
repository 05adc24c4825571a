"""Classification by a vision-language model: `POST /v1/models/{name}/predict` (and MQTT predict)
on a vision-language bundle packaged with labels.

The photo is decoded by the hardened decoder and scaled to the projector's side (`Texts.decode`,
within the decode pixel budget), then the bundle's pinned classification prompt is evaluated
with it on the llm thread and every label is scored by the model's own probabilities
(`edge_bundle.llama_vision.Projector.label_scores`): the answer is always one of the bundle's
labels. It is shaped like a classifier's answer (label, score, top-k, knowledge entry) and kept
in the records like one, so feedback and `GET /v1/requests/{id}` work the same. Drift and shadow
mode follow the image classifiers only.
"""

from __future__ import annotations

import time
from typing import Any, cast

from edge_agent.device.texts import Texts
from edge_agent.engine.core import InferenceCore
from edge_agent.engine.generation import GenerationService
from edge_agent.engine.generator import Generator
from edge_agent.engine.types import Prediction
from edge_agent.errors import BadRequestError
from edge_agent.runtimes.base import VisionSession
from edge_bundle.image_headers import read_header
from edge_bundle.knowledge import KnowledgeBase


class VisionClassifications:
    """Predictions answered by vision-language bundles that classify."""

    def __init__(self, generation: GenerationService, texts: Texts, core: InferenceCore) -> None:
        self.generation = generation
        self.texts = texts
        self.core = core
        self._knowledge: dict[tuple[str, int], KnowledgeBase | None] = {}

    def serves(self, name: str) -> bool:
        """Whether `name` is a vision-language model (of any state) rather than a classifier."""
        state = self.generation.models.get(name)
        return state is not None and name not in self.core.models

    async def predict(
        self, name: str, data: bytes, *, request_id: str, top_k: int, receive_s: float, keep: bool
    ) -> Prediction:
        generator = self.generation.generator(name)  # unknown or not ready: 404 / 503
        vision, labels = generator.vision, generator.bundle.manifest.labels
        if vision is None or vision.classify_prompt is None or not labels:
            raise BadRequestError(
                f"{name} is a language model that does not classify photos (it was packaged "
                "without --labels); ask it in POST /v1/chat/completions instead"
            )
        started = time.perf_counter()
        header = read_header(data)
        (pixels,) = await self.texts.decode(generator, (data,))
        decoded = time.perf_counter()
        session = cast(VisionSession, generator.session)
        prompt = vision.classify_prompt
        scores = await self.generation.call(lambda: session.label_scores(prompt, (pixels,), labels))
        scored = time.perf_counter()
        ranked = sorted(scores.items(), key=lambda item: -item[1])[: max(1, top_k)]
        label, score = ranked[0]
        entry = self._entry(generator, label)
        prediction = Prediction(
            request_id=request_id,
            model={
                "name": generator.name,
                "version": generator.version,
                "bundle_sha256": generator.bundle.bundle_sha256,
                "task": "vision-language",
            },
            label=label,
            score=score,
            top_k=tuple(ranked),
            knowledge=entry,
            image={
                "format": header.format,
                "width": header.width,
                "height": header.height,
                "scaled_to": [int(pixels.shape[1]), int(pixels.shape[0])],
            },
            timings_ms={
                "receive": receive_s * 1000,
                "decode": (decoded - started) * 1000,
                "classify": (scored - decoded) * 1000,
            },
        )
        if keep:
            self.core.keep(prediction, data)
        return prediction

    def _entry(self, generator: Generator, label: str) -> dict[str, Any] | None:
        key = (generator.name, generator.version)
        if key not in self._knowledge:
            path = generator.bundle.manifest.knowledge_path
            self._knowledge[key] = (
                KnowledgeBase.from_bytes(generator.bundle.path(path).read_bytes(), path)
                if path is not None
                else None
            )
        knowledge = self._knowledge[key]
        entry = knowledge.entry(label) if knowledge is not None else None
        return entry.model_dump(mode="json") if entry is not None else None
