"""The model lifecycle: which versions are installed, which one serves, and how that changes.

Loading the active bundles at start-up (and on reload), installing a bundle (verify, fit, load,
self-test, reference-check), activating a prepared candidate, rolling back, readiness and the
description `GET /v1/models` shows. Activation exists once (`activate`): `install` and the
updater's activate step both swap through it, and the updater's roll-back goes through
`roll_back`; both hold one lock, so two swaps of one box never interleave. The periodic golden
self-test and the figures the updater's probation watches live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent import __version__, faults
from edge_agent.device.install import (
    AnyCandidate,
    Candidate,
    TextCandidate,
    check_memory,
    prepare,
    prepare_any,
    stage_and_prepare,
)
from edge_agent.device.store import BundleStore
from edge_agent.disk import DiskWatch
from edge_agent.engine.classifier import Classifier
from edge_agent.engine.core import InferenceCore
from edge_agent.engine.generation import GenerationService
from edge_agent.engine.generator import GENERATIVE_TASKS
from edge_agent.engine.reference_check import ReferenceReport
from edge_agent.engine.reference_check import status as reference_status
from edge_agent.engine.selftest import SelfTestReport, run_selftest
from edge_agent.engine.threads import on_own_thread
from edge_agent.engine.types import GeneratorState, ModelState
from edge_agent.errors import AgentError, UnknownModelError
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings
from edge_bundle.cpu_class import host_class
from edge_bundle.profiles import HardwareProfile

log = logging.getLogger(__name__)


class Models:
    """Installed and served models of one device."""

    def __init__(
        self,
        settings: AgentSettings,
        profile: HardwareProfile,
        store: BundleStore,
        core: InferenceCore,
        generation: GenerationService,
        metrics: AgentMetrics,
        disk: DiskWatch | None = None,
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.store = store
        self.core = core
        self.generation = generation
        self.metrics = metrics
        self.disk = disk
        self.loading = True  # until the active bundles have been loaded once
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()  # set (and replaced) whenever what serves changes

    # ---- state -----------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not)."""
        reasons = []
        if self.core.lane.admission.draining:
            reasons.append("shutting down")
        if self.loading:
            reasons.append("loading the installed bundles")
        elif not self.core.models and not self.generation.models:
            reasons.append(
                "no model is installed: run `edge-agent install BUNDLE` or POST one to "
                "/v1/admin/bundles"
            )
        if self.disk is not None:
            full = self.disk.full()
            self.metrics.disk_full.set(1 if full else 0)
            if full:
                reasons.append(self.disk.reason())
        states = [(name, s.status, s.reason) for name, s in self.core.models.items()]
        states += [(name, s.status, s.reason) for name, s in self.generation.models.items()]
        for name, status, reason in sorted(states):
            if status != "ready":
                reasons.append(f"model {name} is {status}: {reason}")
        ready = not reasons
        self.metrics.ready.set(1 if ready else 0)
        return ready, reasons

    def settled(self, name: str) -> bool:
        """Whether `name` serves, or it is known that it will not (it failed, or it is not
        installed) once the start-up load is over; False while it may still come."""
        for state in (self.core.models.get(name), self.generation.models.get(name)):
            if state is not None:
                return state.status == "ready" or (state.status == "failed" and not self.loading)
        return not self.loading

    async def wait_settled(self, name: str, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `settled(name)`; False when the time ran out."""
        deadline = time.monotonic() + timeout
        while not self.settled(name):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            changed = self._changed
            # Woken by every change; the 1 s cap re-checks even if one is ever missed.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 1.0)):
                    await changed.wait()
        return True

    def finish_loading(self) -> None:
        """The start-up load is over: whatever did not load now answers not_ready/unknown."""
        self.loading = False
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def describe(self) -> list[dict[str, Any]]:
        """Every served model, classifiers first, as `GET /v1/models` lists them."""
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

    def describe_one(self, name: str) -> dict[str, Any]:
        for entry in self.describe():
            if entry["name"] == name:
                return entry
        raise UnknownModelError(
            f"no model called {name!r} is installed; installed: "
            f"{sorted([*self.core.models, *self.generation.models]) or 'none'}"
            " (GET /v1/models lists them)"
        )

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

    # ---- installing and activating ---------------------------------------------------------
    async def install(self, bundle_file: Path) -> dict[str, Any]:
        """Verify, load, self-test and activate a bundle; the old one serves until the swap."""
        async with self._lock:
            try:
                candidate = await on_own_thread(
                    functools.partial(
                        stage_and_prepare,
                        self.store,
                        bundle_file,
                        self.profile,
                        self.settings.cache_dir,
                        self.settings.memory_budget_mb,
                    ),
                    nice=self.settings.inference_nice,
                )
            except (AgentError, OSError) as exc:
                self.metrics.installs.labels("rejected").inc()
                if self.disk is not None:  # a full disk is not the bundle's fault: 507, not 422
                    self.disk.raise_if_full(exc, "install the bundle")
                raise
            await self._swap(candidate, by="install", keep_previous=False)
        self.metrics.installs.labels("activated").inc()
        manifest = candidate.bundle.manifest
        if isinstance(candidate, TextCandidate):
            return {
                "activated": candidate.generator.describe(),
                "selftest": selftest_json(candidate.selftest),
            }
        return {
            "activated": candidate.classifier.describe(),
            "selftest": selftest_json(candidate.selftest),
            "reference_check": self.core.models[manifest.name].reference_check,
        }

    async def activate(
        self, candidate: AnyCandidate, *, by: str, keep_previous: bool = False
    ) -> ModelState | None:
        """Make a prepared candidate the active version and serve it; returns the classifier
        state it replaced, kept open when `keep_previous` (for an instant roll-back)."""
        async with self._lock:
            return await self._swap(candidate, by=by, keep_previous=keep_previous)

    async def _swap(
        self, candidate: AnyCandidate, *, by: str, keep_previous: bool
    ) -> ModelState | None:
        """The one activation: the store's active link first (what a restart loads), then what
        serves. A crash between the two restarts into the new version."""
        manifest = candidate.bundle.manifest
        previous = self.core.models.get(manifest.name)
        await asyncio.to_thread(self.store.activate, manifest.name, manifest.version)
        faults.hit(f"{by}.swapped-store")
        self._serve(candidate, close_previous=not keep_previous)
        log.info(
            "activated %s (%s; self-test %.1f ms)",
            manifest.bundle_id,
            by,
            candidate.selftest.seconds * 1000,
        )
        return previous if isinstance(candidate, Candidate) else None

    async def roll_back(
        self, name: str, to_version: int | None, previous: ModelState | None
    ) -> None:
        """Serve `to_version` again (`previous` when it is still loaded, else loaded from the
        store), or nothing of `name` when there was no version before."""
        async with self._lock:
            if to_version is None:
                await asyncio.to_thread(self.store.deactivate, name)
                self.core.remove_model(name)
                self._notify()
                return
            await asyncio.to_thread(self.store.activate, name, to_version)
            kept = previous.classifier if previous is not None else None
            if previous is not None and kept is not None and kept.version == to_version:
                self.core.set_model(name, previous)
                self._notify()
                return
            candidate = await self.prepare(name, to_version)
            self._serve(candidate, close_previous=True)

    def retire(self, previous: ModelState | None) -> None:
        """Close a classifier kept for a roll-back that is no longer needed."""
        if previous is None or previous.classifier is None:
            return
        served = self.core.models.get(previous.classifier.name)
        if served is None or served.classifier is not previous.classifier:
            self.core.lane.close_later(previous.classifier)

    async def prepare(
        self, name: str, version: int, *, check_references: bool = False
    ) -> Candidate:
        """An installed classifier version, loaded and self-tested (not served)."""
        bundle = await asyncio.to_thread(self.store.open, name, version)
        return await asyncio.to_thread(
            prepare,
            bundle,
            self.profile,
            self.settings.cache_dir,
            check_references=check_references,
        )

    def _serve(self, candidate: AnyCandidate, *, close_previous: bool) -> None:
        try:
            self._set_serving(candidate, close_previous=close_previous)
        finally:
            self._notify()

    def _set_serving(self, candidate: AnyCandidate, *, close_previous: bool) -> None:
        name = candidate.bundle.manifest.name
        if isinstance(candidate, TextCandidate):
            self.generation.set_model(
                name,
                GeneratorState(
                    "ready",
                    generator=candidate.generator,
                    last_selftest=selftest_json(candidate.selftest),
                ),
            )
            return
        self.core.set_model(
            name,
            ModelState(
                "ready",
                classifier=candidate.classifier,
                last_selftest=selftest_json(candidate.selftest),
                reference_check=self.reference_check(candidate.classifier, candidate.reference),
            ),
            close_previous=close_previous,
        )

    # ---- loading ---------------------------------------------------------------------------
    async def reload(self) -> None:
        """Load whatever the store marks active now (after a CLI install; SIGHUP)."""
        async with self._lock:
            await self.load_active()

    async def load_active(self) -> None:
        """Serve every version the store marks active that is not served yet."""
        for name in self.store.active_names():
            version = self.store.active_version(name)
            if version is not None and self.serving_version(name) is None:
                self._show_loading(name, version)  # not_ready, not unknown_model, meanwhile
        for name in self.store.active_names():
            version = self.store.active_version(name)
            if version is None or self.serving_version(name) == version:
                continue
            try:
                candidate = await on_own_thread(
                    functools.partial(self._prepare_installed, name, version),
                    nice=self.settings.inference_nice,
                )
            except AgentError as exc:
                log.error("cannot serve %s@%s: %s", name, version, exc.message)
                self._failed(name, version, exc.message)
                continue
            except Exception as exc:  # never leave a model "loading" forever
                log.exception("cannot serve %s@%s", name, version)
                self._failed(name, version, f"load failed: {exc}")
                continue
            self._serve(candidate, close_previous=True)
            log.info("serving %s@%s", name, version)

    def serving_version(self, name: str) -> int | None:
        """The version of `name` that serves now, if any."""
        state = self.core.models.get(name)
        if state is not None and state.classifier is not None:
            return state.classifier.version
        text = self.generation.models.get(name)
        if text is not None and text.generator is not None:
            return text.generator.version
        return None

    def _show_loading(self, name: str, version: int) -> None:
        if name in self.core.models or name in self.generation.models:
            return
        reason = f"loading version {version}"
        if self.store.task_of(name, version) in GENERATIVE_TASKS:
            self.generation.set_model(name, GeneratorState("loading", reason))
        else:
            self.core.set_model(name, ModelState("loading", reason))

    def _failed(self, name: str, version: int, reason: str) -> None:
        """Show the model as failed, among the language models if that is what it was."""
        if name in self.generation.models or self.store.task_of(name, version) in GENERATIVE_TASKS:
            self.generation.set_model(name, GeneratorState("failed", reason))
        else:
            self.core.set_model(name, ModelState("failed", reason))
        self._notify()

    def _prepare_installed(self, name: str, version: int) -> AnyCandidate:
        faults.hit(f"models.load.{name}")
        bundle = self.store.open(name, version)
        check_memory(
            self.store, bundle, self.settings.memory_budget_mb or self.profile.budgets.memory_mb
        )
        return prepare_any(bundle, self.profile, self.settings.cache_dir)

    # ---- watching what serves --------------------------------------------------------------
    async def selftest(self, name: str) -> SelfTestReport | None:
        """Run the golden self-test of the classifier serving `name` (None when none serves)."""
        state = self.core.models.get(name)
        if state is None or state.classifier is None:
            return None
        return await self.core.run_inference(functools.partial(run_selftest, state.classifier))

    def failures(self, name: str) -> int:
        """Inference failures of `name` on live traffic so far."""
        return self.core.model_outcomes[(name, "inference_failed")]

    def latencies(self, name: str, version: int) -> Sequence[float] | None:
        """Recent pipeline times (ms) of one served version."""
        return self.core.model_latencies.get((name, version))

    async def periodic_selftest(self) -> None:
        """Every `selftest_interval_s`, self-test every ready classifier; fail those that fail."""
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


def selftest_json(report: SelfTestReport) -> dict[str, Any]:
    """A self-test report as `GET /v1/models` shows it."""
    return {
        "passed": report.passed,
        "samples": report.samples,
        "max_deviation": round(report.max_deviation, 6),
        "tolerance": report.tolerance,
        "ms": round(report.seconds * 1000, 1),
        "at": time.time(),
        "agent_version": __version__,
    }
