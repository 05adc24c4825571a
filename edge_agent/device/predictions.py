"""The one predict path, whatever transport brought the photo.

A prediction is admitted or refused by the inference lane before anything else (overloaded,
draining), checks the model can serve before a byte of the photo is read, receives the photo, and
only then takes its admission slot (so text generation yields to it and the in-flight gauge counts
it): a slow upload holds no slot. Inside the slot it classifies; it counts the outcome under its
transport, and then (outside the slot) publishes an HTTP result to MQTT when configured and starts
the explanation when asked. HTTP hands over how to read its upload (`receive`), MQTT the photo it
already parsed. A classifier with an anomaly gate (`gate_for`: the `anomaly_gates` setting over
the manifest's `anomaly_gate`) runs the gate first on the same decoded photo (engine.chain).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.device.explain import Explainer, Listener
from edge_agent.device.ports import Publisher
from edge_agent.device.vision_classes import VisionClassifications
from edge_agent.engine.core import InferenceCore
from edge_agent.engine.types import Prediction, new_request_id
from edge_agent.errors import AgentError, error_code
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings
from edge_bundle.errors import BundleError


@dataclass(frozen=True)
class Photo:
    """What a prediction classifies, and the technician's optional note (for the explanation)."""

    image: bytes
    note: str | None = None


@dataclass(frozen=True)
class Answer:
    """A prediction, and the `explanation` field of the answer (None: no explanation)."""

    prediction: Prediction
    explanation: dict[str, Any] | None = None


#: The photo itself, or how to receive it (an HTTP upload, read after admission, before the slot).
PhotoSource = Photo | Callable[[], Awaitable[Photo]]


class Predictions:
    """Classification as every transport asks for it."""

    def __init__(
        self,
        settings: AgentSettings,
        core: InferenceCore,
        explainer: Explainer,
        metrics: AgentMetrics,
        publisher: Publisher | None,
        vision: VisionClassifications | None = None,
    ) -> None:
        self.settings = settings
        self.core = core
        self.explainer = explainer
        self.metrics = metrics
        self.publisher = publisher
        self.vision = vision

    async def predict(
        self,
        name: str,
        photo: PhotoSource,
        *,
        transport: str,
        request_id: str | None = None,
        top_k: int = 3,
        explain: bool = False,
        listener: Listener | None = None,
        client_request_id: str | None = None,
        structured: bool = False,
    ) -> Answer:
        """Classify a photo with model `name`; `explain` starts the explanation (when the model
        names an explainer; `structured` asks it for JSON), `listener` hears when it ends. A
        vision-language model that classifies answers like a classifier."""
        request_id = request_id or new_request_id()
        admission = self.core.lane.admission
        arrived = time.perf_counter()
        outcome = "error"
        try:
            with admission.admit() as entry:
                if self.vision is not None and self.vision.serves(name):
                    received, prediction, explainer = await self._with_vision(
                        name, photo, request_id, top_k
                    )
                    outcome = "ok"
                    # Not a classifier slot: the work queues on the llm thread, admitted there.
                    return await self._answered(
                        prediction, received, transport, client_request_id, explain, explainer,
                        listener, structured,
                    )  # fmt: skip
                # Unknown or not-ready models fail before the upload.
                gate = self.gate_for(name)
                started = time.perf_counter()
                received = photo if isinstance(photo, Photo) else await photo()
                receive_s = time.perf_counter() - started
                with entry.slot() as slot:
                    self.metrics.in_flight.set(admission.in_flight)
                    prediction = await self.core.predict(
                        name,
                        received.image,
                        request_id=request_id,
                        top_k=top_k,
                        receive_s=receive_s,
                        deadline=slot.deadline,
                        gate=gate,
                    )
            outcome = "ok"
        except (AgentError, BundleError) as exc:
            outcome = error_code(exc)
            raise
        finally:
            elapsed = time.perf_counter() - arrived if outcome == "ok" else None
            self.core.record(name, transport, outcome, elapsed)
            self.metrics.in_flight.set(admission.in_flight)
        explainer = self.core.classifier(name).bundle.manifest.explainer
        return await self._answered(
            prediction, received, transport, client_request_id, explain, explainer, listener,
            structured,
        )  # fmt: skip

    def gate_for(self, name: str) -> str | None:
        """The anomaly bundle run in front of classifier `name`: the `anomaly_gates` setting,
        else its manifest's `anomaly_gate` (None: no gate). Raises when `name` cannot serve."""
        manifest = self.core.classifier(name).bundle.manifest
        if name in self.settings.anomaly_gates:
            return self.settings.anomaly_gates[name] or None
        return manifest.anomaly_gate

    async def _with_vision(
        self, name: str, photo: PhotoSource, request_id: str, top_k: int
    ) -> tuple[Photo, Prediction, str | None]:
        """The photo, its prediction by a vision-language model, and that model's explainer."""
        assert self.vision is not None
        # Unknown or not-ready models fail before the upload is read.
        explainer = self.vision.generation.generator(name).bundle.manifest.explainer
        started = time.perf_counter()
        received = photo if isinstance(photo, Photo) else await photo()
        prediction = await self.vision.predict(
            name,
            received.image,
            request_id=request_id,
            top_k=top_k,
            receive_s=time.perf_counter() - started,
            keep=True,
        )
        return received, prediction, explainer

    async def _answered(
        self,
        prediction: Prediction,
        received: Photo,
        transport: str,
        client_request_id: str | None,
        explain: bool,
        explainer: str | None,
        listener: Listener | None,
        structured: bool,
    ) -> Answer:
        """Publish an HTTP result to MQTT when configured, and start the explanation."""
        if (
            transport == "http"
            and self.publisher is not None
            and self.settings.mqtt_publish_http_results
        ):
            source: dict[str, Any] = {"transport": transport}
            if client_request_id is not None:  # what the HTTP answer carries, the result carries
                source["client_request_id"] = client_request_id
            await self.publisher.publish_result(prediction, source)
        if not explain:
            return Answer(prediction)
        started = self.explainer.start(
            prediction,
            explainer,
            received.note,
            listener,
            photo=received.image,
            structured=structured,
        )
        return Answer(prediction, started)
