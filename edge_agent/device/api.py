"""The device API: the one narrow surface HTTP and MQTT call.

Thin on purpose: every method hands over to the piece that owns the use case (the model
lifecycle in `models`, the predict path in `predictions`, the generate path in `texts`, feedback,
explanations, telemetry) so that this class never grows into a second agent. The updater does not
use it: it is handed the model lifecycle itself (`models`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from edge_agent.device.explain import Explainer, Explanation, Listener
from edge_agent.device.feedback import FeedbackDesk
from edge_agent.device.heatmaps import Heatmaps
from edge_agent.device.models import Models
from edge_agent.device.predictions import Answer, PhotoSource, Predictions
from edge_agent.device.telemetry import Telemetry
from edge_agent.device.texts import Prepared, TextAsk, Texts
from edge_agent.disk import is_disk_full
from edge_agent.engine.records import RequestRecords
from edge_agent.engine.shadow import ShadowRunner
from edge_agent.errors import (
    BadRequestError,
    DiskFullError,
    UnknownModelError,
    UnknownRequestError,
)
from edge_agent.metrics import AgentMetrics
from edge_agent.runtimes.base import TextChunk
from edge_agent.settings import AgentSettings
from edge_bundle.profiles import HardwareProfile

#: An inference running longer than this means the runtime is wedged: stop feeding the watchdog.
WEDGED_AFTER_S = 60.0


class Device:
    """What one box offers its transports."""

    def __init__(
        self,
        *,
        settings: AgentSettings,
        metrics: AgentMetrics,
        models: Models,
        predictions: Predictions,
        texts: Texts,
        explainer: Explainer,
        feedback: FeedbackDesk,
        records: RequestRecords,
        shadow: ShadowRunner,
        telemetry: Telemetry,
        heatmaps: Heatmaps | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models = models
        self.predictions = predictions
        self.texts = texts
        self.explainer = explainer
        self.feedback = feedback
        self.records = records
        self.shadow = shadow
        self.telemetry = telemetry
        self.heatmaps = heatmaps or Heatmaps(settings, records, models.core.pixels)

    # ---- state -----------------------------------------------------------------------------
    @property
    def profile(self) -> HardwareProfile:
        return self.models.profile

    def uptime_s(self) -> float:
        return time.time() - self.telemetry.started_at

    def readiness(self) -> tuple[bool, list[str]]:
        return self.models.readiness()

    def raise_if_disk_full(self, exc: BaseException, doing: str) -> None:
        """Raise `DiskFullError` (507) from `exc` when it says the disk is full; else return."""
        if self.models.disk is not None:
            self.models.disk.raise_if_full(exc, doing)
        elif is_disk_full(exc):
            raise DiskFullError(
                f"could not {doing}: the disk is full; free space and retry"
            ) from exc

    async def wait_settled(self, name: str, timeout: float) -> bool:
        """Wait up to `timeout` s until model `name` serves or is known not to (it failed, or it
        is not installed once start-up loading is over); False when the time ran out."""
        return await self.models.wait_settled(name, timeout)

    def healthy(self) -> bool:
        """False when the inference thread has been stuck on one call (feeds the watchdog)."""
        return not self.models.core.lane.wedged(WEDGED_AFTER_S)

    def describe_models(self) -> list[dict[str, Any]]:
        return self.models.describe()

    def describe_model(self, name: str) -> dict[str, Any]:
        return self.models.describe_one(name)

    def metrics_text(self) -> bytes:
        self.telemetry.refresh_gauges()
        return self.metrics.render()

    def drift(self) -> dict[str, Any]:
        return self.telemetry.drift_scores()

    # ---- models ----------------------------------------------------------------------------
    async def install(self, bundle_file: Path) -> dict[str, Any]:
        return await self.models.install(bundle_file)

    async def start_shadow(self, name: str, version: int) -> dict[str, Any]:
        """Shadow the active model `name` with its installed version `version`."""
        self.models.core.classifier(name)  # the active model must exist and be ready
        if version == self.models.store.active_version(name):
            raise BadRequestError(f"{name}@{version} is the active version; shadow another one")
        candidate = (await self.models.prepare(name, version)).classifier
        self.shadow.start(name, candidate)
        return {"shadowing": name, "candidate": candidate.describe()}

    def stop_shadow(self, name: str) -> dict[str, Any]:
        shadow = self.shadow.stop(name)
        if shadow is None:
            raise UnknownModelError(f"nothing shadows {name!r}")
        return {"stopped": name, "result": shadow.describe()}

    def shadows(self) -> dict[str, Any]:
        return self.shadow.describe()

    # ---- predictions -----------------------------------------------------------------------
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
        return await self.predictions.predict(
            name,
            photo,
            transport=transport,
            request_id=request_id,
            top_k=top_k,
            explain=explain,
            listener=listener,
            client_request_id=client_request_id,
            structured=structured,
        )

    def request_record(self, request_id: str) -> dict[str, Any]:
        record = self.records.get(request_id)
        if record is None:
            raise UnknownRequestError(
                f"no record of request {request_id}: unknown, or older than the keep limits"
            )
        return record

    def request_image(self, request_id: str) -> bytes:
        data = self.records.image(request_id)
        if data is None:
            raise UnknownRequestError(f"no image kept for request {request_id}")
        return data

    async def request_heatmap(self, request_id: str) -> bytes:
        """The heatmap overlay (PNG) of a kept anomaly answer."""
        return await self.heatmaps.render(request_id)

    def explanation(self, request_id: str) -> Explanation:
        job = self.explainer.get(request_id)
        if job is None:
            raise UnknownRequestError(
                f"no explanation for request {request_id}: unknown, expired, or its model has "
                "no explainer"
            )
        return job

    def follow_explanation(self, request_id: str) -> AsyncIterator[dict[str, Any]]:
        return self.explainer.follow(request_id)

    # ---- text ------------------------------------------------------------------------------
    def text_request(self, model: str, ask: TextAsk) -> Prepared:
        return self.texts.request(model, ask)

    async def prepare_text(self, model: str, ask: TextAsk) -> Prepared:
        """`text_request`, photos included (decoded before any answer starts)."""
        return await self.texts.prepare(model, ask)

    def stream_text(self, prepared: Prepared) -> AsyncIterator[TextChunk]:
        return self.texts.stream(prepared)

    async def complete_text(self, prepared: Prepared) -> tuple[str, TextChunk]:
        return await self.texts.complete(prepared)

    # ---- feedback --------------------------------------------------------------------------
    async def submit_feedback(self, submitted: dict[str, Any]) -> dict[str, Any]:
        return await self.feedback.submit(submitted)

    async def recent_feedback(self, limit: int) -> dict[str, Any]:
        return await self.feedback.recent(limit)
