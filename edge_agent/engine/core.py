"""The inference core: classifying an image with an active model, the same for every caller.

Work is split so a 2-core box stays busy without oversubscribing: decoding and preprocessing
(OpenCV releases the GIL) run on `decode_threads` threads, while inference runs on the inference
lane's single thread (`lane`). Whoever calls `predict` holds an admission slot of the lane (the
device's one predict path does), which bounds everything the core can be asked to do at once, and
passes the slot's deadline on to the lane. Decoding also holds pixels of the decode memory budget
(`memory.PixelBudget`), and memory is given back to the system after a large decode.
Once an answer is ready the core calls its "after answer" hooks (shadow runs use one) and keeps
the request record and drift statistics off the request path (on a thread at nice 19). A tiny
prediction (a small photo to a model that answers such photos in about a millisecond) runs on the
event loop itself when nothing else is queued for inference (`_tiny`, `lane.InferenceLane.run`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from edge_agent.engine.anomaly import AnomalyDetector
from edge_agent.engine.chain import ChainPolicy, chain_answer, unavailable
from edge_agent.engine.classifier import Classifier, Scored
from edge_agent.engine.drift import DriftMonitor
from edge_agent.engine.lane import InferenceLane, lower_priority
from edge_agent.engine.memory import (
    LARGE_PIXELS,
    PixelBudget,
    give_memory_back,
    map_large_blocks,
)
from edge_agent.engine.records import RequestRecords
from edge_agent.engine.types import ModelState, Prediction
from edge_agent.errors import AgentError, NotReadyError, UnknownModelError
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings
from edge_bundle.imaging import DecodedImage, decode_image, decoded_pixels
from edge_bundle.preprocess import input_statistics

log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: Record writes waiting for the disk beyond this are kept without their image (bounded memory).
MAX_PENDING_RECORD_IMAGES = 16
#: Nice value added to the thread that writes records and drift statistics.
RECORDS_NICE = 19
LATENCY_WINDOW = 2048
#: Photos of at most this many pixels (decoded) may run on the event loop (`InferenceCore._tiny`).
INLINE_MAX_PIXELS = 320 * 320
#: How many small photos of a model chain are timed (on the inference thread at first) before
#: they may run on the event loop, and how many recent ones decide it.
SMALL_MIN_SEEN = 3
SMALL_WINDOW = 16

#: Called once an answer is ready: (model name, the decoded photo, the active model's label).
AfterAnswer = Callable[[str, DecodedImage, str], None]


@dataclasses.dataclass(frozen=True)
class Answered:
    """One photo through one or more models (a gate first): what each said, and the times."""

    models: tuple[Classifier, ...]
    image: DecodedImage
    scored: tuple[Scored, ...]
    timings: dict[str, float]


def decode_target(models: Sequence[Classifier]) -> tuple[int, int] | None:
    """The decode-time reduction target that serves every model (None: full size)."""
    targets = [model.spec.decode_target() for model in models]
    if any(target is None for target in targets):
        return None
    sides = [target for target in targets if target is not None]
    return max(h for h, _ in sides), max(w for _, w in sides)


def _infer(
    models: Sequence[Classifier], tensors: Sequence[NDArray[Any]]
) -> list[NDArray[np.float32]]:
    return [model.infer(tensor) for model, tensor in zip(models, tensors, strict=True)]


class InferenceCore:
    """Active classifiers by name, the pools that run them, and what they answered."""

    def __init__(
        self,
        settings: AgentSettings,
        metrics: AgentMetrics,
        records: RequestRecords,
        lane: InferenceLane | None = None,
        after_answer: Sequence[AfterAnswer] = (),
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.records = records
        self._owns_lane = lane is None
        self.lane = lane if lane is not None else InferenceLane.from_settings(settings, metrics)
        self.pixels = PixelBudget(settings.decode_pixel_budget)
        map_large_blocks()  # so that a large decode's blocks go back to the system when freed
        self.after_answer = tuple(after_answer)
        self.chain = ChainPolicy(settings.anomaly_good_labels, settings.anomaly_min_confidence)
        self.models: dict[str, ModelState] = {}
        self._decode_pool = ThreadPoolExecutor(
            settings.decode_threads, "decode", initializer=lower_priority(settings.inference_nice)
        )
        # Off the request path, below the decode and inference threads: under load a record or a
        # drift statistic waits, not the next photo.
        self._record_pool = ThreadPoolExecutor(
            1, "records", initializer=lower_priority(RECORDS_NICE)
        )
        self._pending_records = 0
        self._pending_lock = threading.Lock()
        self.drift: dict[tuple[str, int], DriftMonitor] = {}
        #: Recent server-side latencies (ms) of answered predictions, by transport, for telemetry.
        self.latencies: dict[str, deque[float]] = {}
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (transport, outcome) -> count
        self.model_outcomes: Counter[tuple[str, str]] = Counter()  # (model, outcome) -> count
        #: Recent pipeline times (ms, decode to postprocess) per model version, for probation.
        self.model_latencies: dict[tuple[str, int], deque[float]] = {}
        #: Recent pipeline times (ms) of small photos (`INLINE_MAX_PIXELS`) per model chain.
        self._small_ms: dict[tuple[tuple[str, int], ...], deque[float]] = {}
        #: Outcomes of the active version of each model since it became active, for telemetry
        #: (a fleet controller compares versions); only the active version of a model is kept.
        self.version_outcomes: dict[tuple[str, int], Counter[str]] = {}

    def record(
        self, model: str, transport: str, outcome: str, total_s: float | None = None
    ) -> None:
        """Count one prediction's outcome (and its latency when it was answered)."""
        known = model if model in self.models else "unknown"
        self.metrics.requests.labels(known, transport, outcome).inc()
        self.outcomes[(transport, outcome)] += 1
        self.model_outcomes[(known, outcome)] += 1
        state = self.models.get(model)
        if state is not None and state.classifier is not None:
            counts = self.version_outcomes.get((model, state.classifier.version))
            if counts is not None:
                counts[outcome] += 1
        if total_s is not None:
            self.latencies.setdefault(transport, deque(maxlen=LATENCY_WINDOW)).append(
                total_s * 1000
            )

    # ---- models ----------------------------------------------------------------------------
    def set_model(self, name: str, state: ModelState, *, close_previous: bool = True) -> None:
        """Publish a model's state; an in-flight request keeps the classifier it started with.

        The previous classifier is closed once the inference thread has finished what was queued
        for it, unless `close_previous` is False (an update keeps it for an instant rollback).
        """
        previous = self.models.get(name)
        self.models[name] = state
        if state.classifier is not None:
            self._track_version(name, state.classifier.version)
            info = state.classifier.describe()
            self.metrics.set_model(
                name,
                info["version"],
                info["bundle_sha256"],
                info["runtime"],
                ",".join(info["providers"]),
            )
        if (
            close_previous
            and previous is not None
            and previous.classifier not in (None, state.classifier)
        ):
            old = previous.classifier
            assert old is not None
            self.lane.close_later(old)

    def _track_version(self, name: str, version: int) -> None:
        """Count from zero for a version that becomes active; forget the model's other versions.

        The same version coming back (a reload after a failure) keeps counting.
        """
        if (name, version) in self.version_outcomes:
            return
        self._forget_versions(name)
        self.version_outcomes[(name, version)] = Counter()

    def _forget_versions(self, name: str) -> None:
        """Drop the per-version figures of `name` (only the active version's are kept)."""
        for figures in (self.version_outcomes, self.model_latencies):
            for key in [key for key in figures if key[0] == name]:
                del figures[key]
        for chain in [chain for chain in self._small_ms if any(n == name for n, _ in chain)]:
            del self._small_ms[chain]

    def remove_model(self, name: str) -> ModelState | None:
        """Stop serving `name`; its classifier is closed after what is queued for it."""
        self._forget_versions(name)
        state = self.models.pop(name, None)
        if state is not None and state.classifier is not None:
            self.lane.close_later(state.classifier)
        return state

    def classifier(self, name: str) -> Classifier:
        state = self.models.get(name)
        if state is None:
            raise UnknownModelError(
                f"no model called {name!r} is installed; installed: {sorted(self.models) or 'none'}"
                " (GET /v1/models lists them)"
            )
        if state.status != "ready" or state.classifier is None:
            raise NotReadyError(
                f"model {name!r} is {state.status}" + (f": {state.reason}" if state.reason else ""),
                retry_after_s=5.0,
            )
        return state.classifier

    # ---- running ---------------------------------------------------------------------------
    async def run_inference(self, function: Callable[[], _T]) -> _T:
        """Run `function` on the inference thread (self-tests use this too, to serialise)."""
        return await self.lane.run(function)

    async def predict(
        self,
        name: str,
        data: bytes,
        *,
        request_id: str,
        top_k: int = 3,
        receive_s: float = 0.0,
        keep: bool = True,
        deadline: float | None = None,
        gate: str | None = None,
    ) -> Prediction:
        """Classify `data` with model `name` (after the anomaly bundle `gate`, on the same
        decoded photo, when one is named). The caller holds an admission slot; work still
        waiting for the inference thread at `deadline` (the slot's) is dropped."""
        classifier = self.classifier(name)
        detector, gate_reason = self._gate(gate)
        models = (classifier,) if detector is None else (detector, classifier)
        target = decode_target(models)
        pixels = decoded_pixels(data, max_pixels=self.settings.max_image_pixels, target_hw=target)
        try:
            with self.lane.prediction():
                async with self.pixels.reserve(pixels, self._decode_wait_s(deadline)):
                    answered = await self._run(
                        models, target, data, receive_s, top_k, deadline, pixels
                    )
        finally:
            if pixels >= LARGE_PIXELS and self.pixels.large_held == 0:
                # After the record thread's pending work, which may still hold the pixels.
                self._record_pool.submit(give_memory_back)
        prediction = self._prediction(name, answered, request_id, gate_reason)
        if keep:
            self.keep(prediction, data)
        for model, scored in zip(models, answered.scored, strict=True):
            self._observe(model, answered.image, model.confidence(scored))
            for hook in self.after_answer:
                hook(model.name, answered.image, scored.label)
        return prediction

    def _gate(self, gate: str | None) -> tuple[AnomalyDetector | None, str | None]:
        """The gate's detector, or why it cannot run (the classifier then answers alone)."""
        if gate is None:
            return None, None
        try:
            model = self.classifier(gate)
        except AgentError as exc:
            return None, f"the anomaly gate {gate!r} cannot run: {exc.message}"
        if not isinstance(model, AnomalyDetector):
            return None, f"the anomaly gate {gate!r} is not an anomaly-detection bundle"
        return model, None

    def _tiny(self, models: tuple[Classifier, ...]) -> bool:
        """Whether a small photo to `models` is work for the event loop itself: their recent
        small photos took at most `inline_max_ms` (median), so the two thread hand-offs of the
        inference thread would cost about as much as the work (see `lane.InferenceLane.run`)."""
        recent = self._small_ms.get(_versions(models))
        if not recent or len(recent) < SMALL_MIN_SEEN or self.settings.inline_max_ms <= 0:
            return False
        return statistics.median(recent) <= self.settings.inline_max_ms

    def _decode_wait_s(self, deadline: float | None) -> float:
        wait_s = self.settings.decode_wait_ms / 1000
        if deadline is None:
            return wait_s
        return min(wait_s, deadline - time.monotonic())

    async def _run(
        self,
        models: tuple[Classifier, ...],
        target: tuple[int, int] | None,
        data: bytes,
        receive_s: float,
        top_k: int,
        deadline: float | None,
        pixels: int,
    ) -> Answered:
        """Decode once, prepare and infer each model, postprocess; timed by stage."""
        if self.lane.alone():
            # Nothing else to overlap with: one hop to the inference thread instead of two
            # (each thread hand-off costs ~1-4 ms on a busy 2-core box), or none for a tiny one.
            small = 0 < pixels <= INLINE_MAX_PIXELS
            image, tensors, decode_s, prepare_s, outputs, infer_s = await self.lane.run(
                lambda: self._whole_pipeline(models, target, data),
                deadline=deadline,
                inline=small and self._tiny(models),
            )
            if small:
                self._small_ms.setdefault(_versions(models), deque(maxlen=SMALL_WINDOW)).append(
                    (decode_s + prepare_s + infer_s) * 1000
                )
        else:
            loop = asyncio.get_running_loop()
            image, tensors, decode_s, prepare_s = await loop.run_in_executor(
                self._decode_pool, self._decode_and_prepare, models, target, data
            )
            started = time.perf_counter()
            outputs = await self.lane.run(lambda: _infer(models, tensors), deadline=deadline)
            infer_s = time.perf_counter() - started
        started = time.perf_counter()
        size = (image.width, image.height)
        scored = tuple(
            model.postprocess(output, top_k, size)
            for model, output in zip(models, outputs, strict=True)
        )
        post_s = time.perf_counter() - started
        timings = {
            "receive": receive_s,
            "decode": decode_s,
            "preprocess": prepare_s,
            "infer": infer_s,
            "postprocess": post_s,
        }
        return Answered(models, image, scored, timings)

    def _prediction(
        self, name: str, answered: Answered, request_id: str, gate_reason: str | None
    ) -> Prediction:
        """The answer of the last model (the one asked for), with the gate's findings."""
        timings = answered.timings
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(name, stage).observe(seconds)
        pipeline_ms = (sum(timings.values()) - timings["receive"]) * 1000
        classifier, scored, image = answered.models[-1], answered.scored[-1], answered.image
        key = (classifier.name, classifier.version)
        self.model_latencies.setdefault(key, deque(maxlen=LATENCY_WINDOW)).append(pipeline_ms)
        prediction = Prediction(
            request_id=request_id,
            model=classifier.identity(),
            label=scored.label,
            score=scored.score,
            top_k=scored.top_k,
            knowledge=scored.knowledge.model_dump(mode="json") if scored.knowledge else None,
            image={
                "format": image.format,
                "width": image.width,
                "height": image.height,
                "decoded_at_reduction": image.reduction,
            },
            timings_ms={stage: seconds * 1000 for stage, seconds in timings.items()},
            detection=scored.detection.to_json() if scored.detection is not None else None,
        )
        if len(answered.models) == 2:
            return chain_answer(
                self.chain, prediction, classifier, answered.models[0], answered.scored[0]
            )
        if gate_reason is not None:
            return dataclasses.replace(prediction, anomaly=unavailable(gate_reason))
        return prediction

    def _whole_pipeline(
        self, models: tuple[Classifier, ...], target: tuple[int, int] | None, data: bytes
    ) -> tuple[DecodedImage, list[NDArray[Any]], float, float, list[NDArray[np.float32]], float]:
        image, tensors, decode_s, prepare_s = self._decode_and_prepare(models, target, data)
        started = time.perf_counter()
        outputs = _infer(models, tensors)
        return image, tensors, decode_s, prepare_s, outputs, time.perf_counter() - started

    def _decode_and_prepare(
        self, models: tuple[Classifier, ...], target: tuple[int, int] | None, data: bytes
    ) -> tuple[DecodedImage, list[NDArray[Any]], float, float]:
        started = time.perf_counter()
        image = decode_image(
            data,
            max_pixels=self.settings.max_image_pixels,
            max_bytes=self.settings.max_body_bytes,
            target_hw=target,
        )
        decoded = time.perf_counter()
        tensors = [model.prepare(image) for model in models]
        return image, tensors, decoded - started, time.perf_counter() - decoded

    def drift_monitor(self, classifier: Classifier) -> DriftMonitor | None:
        """The drift monitor of this model version (made on first use), None without baseline."""
        baseline = classifier.drift_baseline()
        if not baseline:
            return None
        key = (classifier.name, classifier.version)
        monitor = self.drift.get(key)
        if monitor is None:
            monitor = DriftMonitor(
                baseline,
                window=self.settings.drift_window,
                min_samples=self.settings.drift_min_samples,
            )
            self.drift[key] = monitor
        return monitor

    def _observe(self, classifier: Classifier, image: DecodedImage, confidence: float) -> None:
        """Feed the drift monitor off the request path (skipped under a record backlog)."""
        monitor = self.drift_monitor(classifier)
        if monitor is None or self._pending_records >= MAX_PENDING_RECORD_IMAGES:
            return

        def observe() -> None:
            monitor.observe(input_statistics(image), confidence)

        self._record_pool.submit(observe)

    def keep(self, prediction: Prediction, data: bytes) -> None:
        """Write the record off the request path; under a backlog, keep the answer only."""
        if not self.records.enabled:
            return
        with self._pending_lock:
            image: bytes | None = (
                data if self._pending_records < MAX_PENDING_RECORD_IMAGES else None
            )
            self._pending_records += 1

        def write() -> None:
            try:
                self.records.put(prediction.request_id, prediction.to_json(), image)
            finally:
                with self._pending_lock:
                    self._pending_records -= 1

        self._record_pool.submit(write)

    def close(self) -> None:
        """Finish queued work and close every classifier (and the lane, when it is this core's)."""
        for pool in (self._decode_pool, self._record_pool):
            pool.shutdown(wait=True, cancel_futures=False)
        if self._owns_lane:
            self.lane.close()
        for state in self.models.values():
            if state.classifier is not None:
                state.classifier.close()


def _versions(models: tuple[Classifier, ...]) -> tuple[tuple[str, int], ...]:
    return tuple((model.name, model.version) for model in models)
