"""The composition root: builds the agent's objects from settings and runs their lifecycle.

One `Agent` per process wires the engine (the inference lane, the classification core, shadow
runs, text generation), the device (its model lifecycle and the one API both transports use),
the MQTT service (which is also the device's publisher), the updater (handed the model
lifecycle, the publisher, the metrics, its keys and the MQTT chunk link its bundles may come
through) and the HTTP app over the device. Nothing
imports this module but the server and the CLI. Loading happens in the background after start-up,
so `/healthz` answers while a model loads and `/readyz` turns ready only once every active model
has passed its golden self-test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from edge_agent.device.api import Device
from edge_agent.device.explain import Explainer
from edge_agent.device.feedback import FeedbackDesk, FeedbackStore
from edge_agent.device.models import Models
from edge_agent.device.ports import Publisher
from edge_agent.device.predictions import Predictions
from edge_agent.device.store import BundleStore
from edge_agent.device.telemetry import Telemetry
from edge_agent.device.texts import Texts
from edge_agent.device.vision_classes import VisionClassifications
from edge_agent.disk import DiskWatch
from edge_agent.engine.core import InferenceCore
from edge_agent.engine.generation import GenerationService
from edge_agent.engine.lane import InferenceLane
from edge_agent.engine.records import RequestRecords
from edge_agent.engine.shadow import ShadowRunner
from edge_agent.errors import ConfigError
from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt.chunk_link import MqttChunkLink
from edge_agent.mqtt.handlers import MqttHandlers
from edge_agent.mqtt.routes import Routes
from edge_agent.mqtt.service import MqttService
from edge_agent.settings import MIB, AgentSettings
from edge_agent.updater.runner import Updater
from edge_bundle.errors import BundleError
from edge_bundle.profiles import HardwareProfile, load_profile
from edge_bundle.signing import TrustStore

log = logging.getLogger(__name__)


def build_trust(settings: AgentSettings) -> TrustStore:
    try:
        return TrustStore.from_files(settings.key_files(), revoked=settings.revoked_key_ids)
    except BundleError as exc:
        raise ConfigError(f"cannot read the trusted keys: {exc}") from exc


def _keys(paths: tuple[Path, ...]) -> TrustStore:
    try:
        return TrustStore.from_files(paths)
    except BundleError as exc:
        raise ConfigError(f"cannot read a release or root key: {exc}") from exc


def build_store(settings: AgentSettings) -> BundleStore:
    trust = build_trust(settings)
    if not trust.keys and not settings.allow_unsigned_bundles:
        log.warning(
            "no trusted public keys are configured (trusted_keys / trusted_keys_dir): every "
            "bundle will be refused"
        )
    if settings.allow_unsigned_bundles:
        log.warning("allow_unsigned_bundles is on: DEVELOPMENT ONLY, never on a production box")
    return BundleStore(settings.store_dir, trust, allow_unsigned=settings.allow_unsigned_bundles)


def build_profile(settings: AgentSettings) -> HardwareProfile:
    try:
        return load_profile(settings.profile)
    except BundleError as exc:
        raise ConfigError(str(exc)) from exc


def build_device(
    settings: AgentSettings,
    profile: HardwareProfile,
    store: BundleStore,
    metrics: AgentMetrics,
    publisher: Publisher | None = None,
    disk: DiskWatch | None = None,
) -> Device:
    """The engine and the device over it; `publisher` carries what the device sends out, `disk`
    watches the state directory's free space."""
    records = RequestRecords(
        settings.requests_dir,
        max_age_s=settings.keep_requests_s,
        max_bytes=settings.keep_requests_bytes,
        max_count=settings.keep_requests_count,
    )
    lane = InferenceLane.from_settings(settings, metrics)
    shadow = ShadowRunner(lane, metrics)
    core = InferenceCore(settings, metrics, records, lane, after_answer=(shadow.after_answer,))
    generation = GenerationService(settings, lane)
    explainer = Explainer(settings, generation)
    models = Models(settings, profile, store, core, generation, metrics, disk)
    feedback = FeedbackStore(
        settings.feedback_dir,
        max_bytes=settings.feedback_max_bytes,
        max_count=settings.feedback_max_count,
    )
    texts = Texts(settings, generation, core.pixels)
    vision = VisionClassifications(generation, texts, core)
    return Device(
        settings=settings,
        metrics=metrics,
        models=models,
        predictions=Predictions(settings, core, explainer, metrics, publisher, vision),
        texts=texts,
        explainer=explainer,
        feedback=FeedbackDesk(feedback, records, core, metrics, publisher, disk),
        records=records,
        shadow=shadow,
        telemetry=Telemetry(settings, models, core, shadow, metrics, publisher),
    )


class Agent:
    """Everything one running agent owns, and their start and stop."""

    def __init__(self, settings: AgentSettings) -> None:
        if settings.release_keys and not settings.mqtt_enabled:
            raise ConfigError(
                "release_keys are set but mqtt_enabled is false: updates arrive over MQTT, "
                "so enable MQTT (or remove release_keys)"
            )
        self.settings = settings
        self.profile = build_profile(settings)
        self.store = build_store(settings)
        self.metrics = AgentMetrics()
        self.disk = DiskWatch(settings.state_dir, reserve_bytes=int(settings.disk_reserve_mb * MIB))
        routes = Routes(settings)
        self.mqtt = (
            MqttService(settings, routes, self.metrics, disk=self.disk)
            if settings.mqtt_enabled
            else None
        )
        self.device = build_device(
            settings, self.profile, self.store, self.metrics, self.mqtt, self.disk
        )
        self.updater: Updater | None = None
        if settings.release_keys:
            self.updater = Updater(
                settings,
                self.device.models,
                self.mqtt,
                self.metrics,
                _keys(settings.release_keys),
                _keys(settings.root_keys),
                after_outcome=self.device.telemetry.publish_soon,
                shadow=self.device.shadow,
                chunks=MqttChunkLink(self.mqtt) if self.mqtt is not None else None,
            )
        self.handlers: MqttHandlers | None = None
        if self.mqtt is not None:
            self.handlers = MqttHandlers(
                self.device,
                routes,
                self.metrics,
                self.mqtt.send,
                notices=self.updater.on_notice if self.updater is not None else None,
            )
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def models(self) -> Models:
        return self.device.models

    @property
    def lane(self) -> InferenceLane:
        return self.device.models.core.lane

    # ---- lifecycle ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        """Start on entry, stop on exit (the HTTP app's lifespan)."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        """Begin loading the active bundles in the background; returns at once."""
        self.store.clear_staging()
        if self.mqtt is not None and self.handlers is not None:
            self.mqtt.on_connected.append(self.device.telemetry.publish_soon)
            await self.mqtt.start(self.handlers)
            if self.settings.telemetry_interval_s > 0:
                self._spawn(self.device.telemetry.loop(self.mqtt), "telemetry")
        self._spawn(self._load(), "load-models")
        if self.settings.selftest_interval_s > 0:
            self._spawn(self.models.periodic_selftest(), "selftest")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.updater is not None:
            await self.updater.stop()
        await self.device.explainer.stop()
        if self.mqtt is not None:
            await self.mqtt.stop()
        await asyncio.to_thread(self.lane.close)
        await asyncio.to_thread(self.models.core.close)
        await asyncio.to_thread(self.models.generation.close)

    def start_draining(self) -> None:
        self.lane.admission.start_draining()
        if self.mqtt is not None:
            self.mqtt.start_draining()
        self.metrics.ready.set(0)

    async def reload(self) -> None:
        """Load whatever the store marks active now (after a CLI install; SIGHUP)."""
        await self.models.reload()

    def _spawn(self, work: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(work, name=name))

    async def _load(self) -> None:
        try:
            await self.models.load_active()
        finally:
            if self.updater is not None:
                await self.updater.start()  # resume an update once the active models are loaded
            self.models.finish_loading()
            self.device.telemetry.publish_soon()  # central learns the loaded versions at once
