"""The composition root: builds the agent's objects from settings and runs their lifecycle.

One `Agent` per process owns the profile, the trust store, the bundle store, the metrics, the
request records and the inference core; transports get it passed in (no module-level state).
Loading happens in the background after start-up, so `/healthz` answers while a model loads and
`/readyz` turns ready only once every active model has passed its golden self-test.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.classifier import Classifier
from edge_agent.core import InferenceCore, ModelState
from edge_agent.errors import AgentError, ConfigError, UnknownRequestError
from edge_agent.explain import Explainer
from edge_agent.feedback import FeedbackStore, make_record
from edge_agent.generation import GenerationService, GeneratorState
from edge_agent.install import (
    AnyCandidate,
    TextCandidate,
    check_memory,
    prepare,
    prepare_any,
    stage_and_prepare,
)
from edge_agent.metrics import AgentMetrics
from edge_agent.records import RequestRecords
from edge_agent.reference_check import ReferenceReport
from edge_agent.reference_check import status as reference_status
from edge_agent.selftest import run_selftest
from edge_agent.settings import AgentSettings
from edge_agent.store import BundleStore
from edge_bundle.cpu_class import host_class
from edge_bundle.errors import BundleError
from edge_bundle.profiles import HardwareProfile, load_profile
from edge_bundle.signing import TrustStore

if TYPE_CHECKING:
    from edge_agent.mqtt.service import MqttService
    from edge_agent.updater.runner import Updater

log = logging.getLogger(__name__)
#: An inference running longer than this means the runtime is wedged: stop feeding the watchdog.
WEDGED_AFTER_S = 60.0


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


class Agent:
    """Everything one running agent owns."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.profile = build_profile(settings)
        self.store = build_store(settings)
        self.metrics = AgentMetrics()
        self.records = RequestRecords(
            settings.requests_dir,
            max_age_s=settings.keep_requests_s,
            max_bytes=settings.keep_requests_bytes,
            max_count=settings.keep_requests_count,
        )
        self.core = InferenceCore(settings, metrics=self.metrics, records=self.records)
        self.feedback = FeedbackStore(
            settings.feedback_dir,
            max_bytes=settings.feedback_max_bytes,
            max_count=settings.feedback_max_count,
        )
        self.generation = GenerationService(settings, self.core)
        self.explainer = Explainer(settings, self.generation)
        self.mqtt: MqttService | None = None
        if settings.mqtt_enabled:
            from edge_agent.mqtt.service import MqttService

            self.mqtt = MqttService(self)
        self.updater: Updater | None = None
        if settings.release_keys:
            if not settings.mqtt_enabled:
                raise ConfigError(
                    "release_keys are set but mqtt_enabled is false: updates arrive over MQTT, "
                    "so enable MQTT (or remove release_keys)"
                )
            from edge_agent.updater.runner import Updater

            self.updater = Updater(self, _keys(settings.release_keys), _keys(settings.root_keys))
        self.started_at = time.time()
        self.loading = True
        self._install_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin loading the active bundles in the background; returns at once."""
        self.store.clear_staging()
        if self.mqtt is not None:
            await self.mqtt.start()
        self._tasks.append(asyncio.create_task(self._load_active(), name="load-models"))
        if self.settings.selftest_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._periodic_selftest(), name="selftest"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.updater is not None:
            await self.updater.stop()
        await self.explainer.stop()
        if self.mqtt is not None:
            await self.mqtt.stop()
        await asyncio.to_thread(self.core.close)
        await asyncio.to_thread(self.generation.close)

    def start_draining(self) -> None:
        self.core.admission.start_draining()
        if self.mqtt is not None:
            self.mqtt.start_draining()
        self.metrics.ready.set(0)

    # ---- state ---------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not)."""
        reasons = []
        if self.core.admission.draining:
            reasons.append("shutting down")
        if self.loading:
            reasons.append("loading the installed bundles")
        elif not self.core.models and not self.generation.models:
            reasons.append(
                "no model is installed: run `edge-agent install BUNDLE` or POST one to "
                "/v1/admin/bundles"
            )
        states: list[tuple[str, str, str]] = [
            (name, state.status, state.reason) for name, state in self.core.models.items()
        ]
        states += [
            (name, state.status, state.reason) for name, state in self.generation.models.items()
        ]
        for name, status, reason in sorted(states):
            if status != "ready":
                reasons.append(f"model {name} is {status}: {reason}")
        ready = not reasons
        self.metrics.ready.set(1 if ready else 0)
        return ready, reasons

    def healthy(self) -> bool:
        """False when the inference thread has been stuck on one call (feeds the watchdog)."""
        busy = self.core.busy_since
        return busy is None or time.monotonic() - busy < WEDGED_AFTER_S

    def describe_models(self) -> list[dict[str, Any]]:
        described = []
        for name, state in sorted(self.core.models.items()):
            entry: dict[str, Any] = {"name": name, "status": state.status}
            if state.reason:
                entry["reason"] = state.reason
            if state.classifier is not None:
                entry.update(state.classifier.describe())
            entry["selftest"] = state.last_selftest
            if state.reference_check is not None:
                entry["reference_check"] = state.reference_check
            entry["installed_versions"] = self.store.versions(name)
            described.append(entry)
        for name, text_state in sorted(self.generation.models.items()):
            entry = {"name": name, "status": text_state.status}
            if text_state.reason:
                entry["reason"] = text_state.reason
            if text_state.generator is not None:
                entry.update(text_state.generator.describe())
            entry["selftest"] = text_state.last_selftest
            entry["installed_versions"] = self.store.versions(name)
            described.append(entry)
        return described

    @functools.cached_property
    def cpu_class(self) -> str:
        """This box's CPU class (how its int8 kernels compute; see `edge_bundle.cpu_class`)."""
        return str(host_class())

    def reference_check(
        self, classifier: Classifier, report: ReferenceReport | None = None
    ) -> dict[str, Any]:
        """What GET /v1/models says of a classifier's reference check: `report` when it just ran,
        else the outcome the store recorded at install."""
        manifest = classifier.bundle.manifest
        recorded = (
            report.to_json()
            if report is not None
            else self.store.reference_check(manifest.name, manifest.version)
        )
        return reference_status(manifest, recorded, self.cpu_class)

    def prepare_candidate(self, name: str, version: int) -> Classifier:
        """An installed (not active) classifier version, loaded and self-tested, for shadowing."""
        candidate = prepare(self.store.open(name, version), self.profile, self.settings.cache_dir)
        return candidate.classifier

    # ---- feedback ------------------------------------------------------------------------
    async def submit_feedback(self, submitted: dict[str, Any]) -> dict[str, Any]:
        """Store a technician's verdict on a kept prediction and forward it to central."""
        request_id = submitted.get("request_id")
        request = self.records.get(request_id) if isinstance(request_id, str) else None
        if request is None:
            raise UnknownRequestError(
                f"no kept prediction with request_id {request_id!r}: it is unknown or older than "
                "the keep limits (keep_requests_s); feedback must refer to a recent prediction"
            )
        state = self.core.models.get(request["model"]["name"])
        labels = state.classifier.labels if state is not None and state.classifier else ()
        record = make_record(request, submitted, labels)
        image = self.records.image(request["request_id"])
        stored = await asyncio.to_thread(self.feedback.add, record, image)
        if self.mqtt is not None:
            await self.mqtt.publish_feedback(stored, image)
            await asyncio.to_thread(self.feedback.mark_forwarded, stored["feedback_id"])
        self.metrics.feedback.labels(stored["verdict"]).inc()
        return stored

    # ---- installing ----------------------------------------------------------------------
    async def install(self, bundle_file: Path) -> dict[str, Any]:
        """Verify, load, self-test and activate a bundle; the old one serves until the swap."""
        async with self._install_lock:
            try:
                candidate = await asyncio.to_thread(
                    stage_and_prepare,
                    self.store,
                    bundle_file,
                    self.profile,
                    self.settings.cache_dir,
                    self.settings.memory_budget_mb,
                )
            except AgentError:
                self.metrics.installs.labels("rejected").inc()
                raise
            manifest = candidate.bundle.manifest
            await asyncio.to_thread(self.store.activate, manifest.name, manifest.version)
            self._publish(candidate)
            self.metrics.installs.labels("activated").inc()
            log.info(
                "activated %s (self-test %.1f ms)",
                manifest.bundle_id,
                candidate.selftest.seconds * 1000,
            )
            if isinstance(candidate, TextCandidate):
                return {
                    "activated": candidate.generator.describe(),
                    "selftest": _selftest_json(candidate),
                }
            return {
                "activated": candidate.classifier.describe(),
                "selftest": _selftest_json(candidate),
                "reference_check": self.core.models[manifest.name].reference_check,
            }

    async def reload(self) -> None:
        """Load whatever the store marks active now (after a CLI install; SIGHUP)."""
        async with self._install_lock:
            await self._load_active()

    def _publish(self, candidate: AnyCandidate) -> None:
        name = candidate.bundle.manifest.name
        if isinstance(candidate, TextCandidate):
            self.generation.set_model(
                name,
                GeneratorState(
                    "ready", generator=candidate.generator, last_selftest=_selftest_json(candidate)
                ),
            )
            return
        self.core.set_model(
            name,
            ModelState(
                "ready",
                classifier=candidate.classifier,
                last_selftest=_selftest_json(candidate),
                reference_check=self.reference_check(candidate.classifier, candidate.reference),
            ),
        )

    async def _load_active(self) -> None:
        try:
            for name in self.store.active_names():
                version = self.store.active_version(name)
                if version is None or self._serving(name) == version:
                    continue
                try:
                    candidate = await asyncio.to_thread(self._prepare_installed, name, version)
                except AgentError as exc:
                    log.error("cannot serve %s@%s: %s", name, version, exc.message)
                    self._failed(name, version, exc.message)
                    continue
                except Exception as exc:  # never leave a model "loading" forever
                    log.exception("cannot serve %s@%s", name, version)
                    self._failed(name, version, f"load failed: {exc}")
                    continue
                self._publish(candidate)
                log.info("serving %s@%s", name, version)
        finally:
            if self.loading and self.updater is not None:
                await self.updater.start()  # resume an update once the active models are loaded
            self.loading = False

    def _serving(self, name: str) -> int | None:
        state = self.core.models.get(name)
        if state is not None and state.classifier is not None:
            return state.classifier.version
        text = self.generation.models.get(name)
        if text is not None and text.generator is not None:
            return text.generator.version
        return None

    def _failed(self, name: str, version: int, reason: str) -> None:
        """Show the model as failed, among the language models if that is what it was."""
        if name in self.generation.models or self.store.task_of(name, version) == "text-generation":
            self.generation.set_model(name, GeneratorState("failed", reason))
        else:
            self.core.set_model(name, ModelState("failed", reason))

    def _prepare_installed(self, name: str, version: int) -> AnyCandidate:
        bundle = self.store.open(name, version)
        check_memory(
            self.store, bundle, self.settings.memory_budget_mb or self.profile.budgets.memory_mb
        )
        return prepare_any(bundle, self.profile, self.settings.cache_dir)

    async def _periodic_selftest(self) -> None:
        while True:
            await asyncio.sleep(self.settings.selftest_interval_s)
            for name, state in list(self.core.models.items()):
                classifier = state.classifier
                if classifier is None or state.status != "ready":
                    continue
                report = await self.core.run_inference(functools.partial(run_selftest, classifier))
                self.metrics.selftests.labels(name, "passed" if report.passed else "failed").inc()
                if not report.passed and self.core.models.get(name) is state:
                    log.error("periodic self-test of %s failed: %s", name, report.failures)
                    self.core.set_model(
                        name,
                        ModelState(
                            "failed",
                            "periodic golden self-test failed: " + "; ".join(report.failures),
                            classifier=None,
                        ),
                    )


def _selftest_json(candidate: AnyCandidate) -> dict[str, Any]:
    report = candidate.selftest
    return {
        "passed": report.passed,
        "samples": report.samples,
        "max_deviation": round(report.max_deviation, 6),
        "tolerance": report.tolerance,
        "ms": round(report.seconds * 1000, 1),
        "at": time.time(),
        "agent_version": __version__,
    }
