"""Value types the engine hands upwards: request ids, a prediction, and the state of a model.

Plain data with no behaviour beyond shaping itself for the wire, so every layer above the engine
(the device API, both transports, the updater) can use them without reaching into the engine.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.engine.classifier import Classifier
    from edge_agent.engine.generator import Generator

#: What a request id looks like: 32 lowercase hex digits (a uuid4 without dashes).
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Prediction:
    """One classification (or anomaly verdict), shaped for every transport (and for an
    explanation to follow)."""

    request_id: str
    model: dict[str, Any]
    label: str
    score: float
    top_k: tuple[tuple[str, float], ...]
    knowledge: dict[str, Any] | None
    image: dict[str, Any]
    timings_ms: dict[str, float]
    created_at: float = field(default_factory=time.time)
    #: An anomaly bundle's own findings (score, verdict, threshold, regions, score_map): top level.
    detection: dict[str, Any] | None = None
    #: A chained classifier's gate: the anomaly bundle's findings (and its model), nested.
    anomaly: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        body = {
            "request_id": self.request_id,
            "model": self.model,
            "label": self.label,
            "score": round(self.score, 6),
            "top_k": [{"label": label, "score": round(score, 6)} for label, score in self.top_k],
            "knowledge": self.knowledge,
            "image": self.image,
            "timings_ms": {stage: round(ms, 3) for stage, ms in self.timings_ms.items()},
            "created_at": self.created_at,
        }
        if self.detection is not None:
            body.update(self.detection)
        if self.anomaly is not None:
            body["anomaly"] = self.anomaly
        return body


@dataclass
class ModelState:
    """Whether a classifier may serve, and why not."""

    status: str  # "loading", "ready" or "failed"
    reason: str = ""
    classifier: Classifier | None = None
    last_selftest: dict[str, Any] | None = None
    # What GET /v1/models says of the reference check (`reference_check.status`).
    reference_check: dict[str, Any] | None = None


@dataclass
class GeneratorState:
    """Whether a language model may serve, and why not."""

    status: str  # "loading", "ready" or "failed"
    reason: str = ""
    generator: Generator | None = None
    last_selftest: dict[str, Any] | None = None
