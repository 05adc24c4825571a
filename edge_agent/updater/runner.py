"""The updater's runner: feeds events to the pure state machine and performs its actions.

It is handed what it needs and nothing more: the settings, the device's model lifecycle (the
store, the profile, and the one activation and roll-back path it shares with installs), the
publisher its reports leave through, the metrics, and its trusted keys.

Every new state is persisted (atomically) before its actions run, and every action can be run
again after a crash with the same result, so a SIGKILL or power cut at any point resumes cleanly:
the store swaps versions with one rename, so the box serves the old version or the new one, never
neither and never a partial bundle. Long steps (download, staging, shadowing, probation) run as
tasks and report back with an event; one lock keeps events in order.

A shadow notice's version is installed into the store without being activated and shadows the
active model through the device's `ShadowRunner`; a later notice for the very same bundle (same
sha256) finds it in the store and is verified from there instead of being downloaded again.

A bundle comes over HTTP(S) (`download`) or in chunks over MQTT (`chunked`, through the
`ChunkLink` port the MQTT side implements), as `machine.fetch_path` decides from the notice and
the setting `update_fetch`; verification, staging and activation do not care which.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np

from edge_agent import faults
from edge_agent.device.install import Candidate, check_fits, prepare, record_reference
from edge_agent.device.models import Models
from edge_agent.device.ports import ChunkLink, Publisher
from edge_agent.engine.shadow import ShadowRunner
from edge_agent.engine.types import ModelState
from edge_agent.errors import AgentError
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings
from edge_agent.updater import persist
from edge_agent.updater.chunked import ChunkFetcher, FetchOptions
from edge_agent.updater.download import DownloadError, discard, download, part_path
from edge_agent.updater.machine import (
    Action,
    Activate,
    Commit,
    Discard,
    Download,
    Event,
    NoticeReceived,
    Probation,
    Release,
    Report,
    Restarted,
    Resubmit,
    RollBack,
    RolloutRef,
    Stage,
    StartShadow,
    StepDone,
    StepFailed,
    StopShadow,
    Verify,
    fetch_path,
    no_path_reason,
    transition,
)
from edge_bundle.errors import BundleError
from edge_bundle.files import write_atomically
from edge_bundle.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from edge_bundle.release import (
    ReleaseNotice,
    TrustNotice,
    apply_trust,
    decode_notice,
    peek_notice,
)
from edge_bundle.signing import TrustStore

log = logging.getLogger(__name__)
RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TRUST_FILE = "trust-notice.json"
STAGING_LATENCY_RUNS = 10


@dataclass
class _Swap:
    """What probation needs: the state to roll back to and the latency before the swap."""

    previous: ModelState | None
    baseline_p95_ms: float | None
    errors_before: int
    started: float


class Updater:
    """One per agent when updates are configured."""

    def __init__(
        self,
        settings: AgentSettings,
        models: Models,
        publisher: Publisher | None,
        metrics: AgentMetrics,
        release_trust: TrustStore,
        root_trust: TrustStore,
        *,
        transport: httpx.BaseTransport | None = None,
        after_outcome: Callable[[], None] | None = None,
        shadow: ShadowRunner | None = None,
        chunks: ChunkLink | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.store = models.store
        self.publisher = publisher
        self.metrics = metrics
        self.transport = transport  # None: the network (tests hand in an httpx.MockTransport)
        # Called once an update is committed or rolled back, or starts shadowing (the agent sends
        # telemetry then).
        self.after_outcome = after_outcome
        self.shadow = shadow  # None: shadow notices are refused when they reach shadowing
        # None: bundles come only by URL (notices offering them only over MQTT are refused).
        self.fetcher = (
            ChunkFetcher(chunks, FetchOptions.from_settings(settings), metrics) if chunks else None
        )
        if chunks is not None:
            chunks.listen(self.on_chunk)
        self.directory = settings.updater_dir
        self.state_path = self.directory / "state.json"
        self.downloads = self.directory / "downloads"
        # One store for both: the purpose of each notice pins the role that may sign it, and a
        # trust notice's signer must be a root key of this very store.
        self.trust = TrustStore(
            release_trust.keys + root_trust.keys, release_trust.revoked | root_trust.revoked
        )
        self.state = persist.load(self.state_path)
        self.reports: list[dict[str, Any]] = []  # recent reports, for /v1/updates
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._candidate: Candidate | None = None
        self._swap: _Swap | None = None
        self._retries = 0
        self._started = asyncio.Event()
        self._steps: dict[str, asyncio.Task[None]] = {}  # the running task of each step
        self._trust_sequence = 0
        self._restore_trust()

    # ---- inputs --------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume what a previous run left in progress; notices wait until this is done."""
        await self.handle(Restarted())
        self._started.set()

    def describe(self) -> dict[str, Any]:
        """The persisted state and the recent reports (`GET /v1/updates`)."""
        return {"state": self.state.to_json(), "reports": self.reports}

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def on_notice(self, topic: str, payload: bytes) -> None:
        """A retained notice arrived on a release or trust topic."""
        if not payload:
            return  # a cleared retained message
        # A retained notice arrives as soon as MQTT connects, maybe before the active models are
        # loaded and the interrupted update resumed: handle it only after that.
        await self._started.wait()
        try:
            notice, signer = decode_notice(payload, self.trust)
        except BundleError as exc:
            # Tie the refusal to the release it claims to be, marked unverified.
            claimed = peek_notice(payload)
            sequence = claimed.get("sequence", 0)
            await self._report(
                Report(
                    "idle",
                    "refused",
                    sequence,
                    f"notice on {topic} refused: {exc}",
                    claimed.get("name"),
                    claimed.get("version"),
                    extra={"verified": False, "claimed": claimed},
                )
            )
            return
        if isinstance(notice, TrustNotice):
            await self._apply_trust(notice, signer, payload)
            return
        release = _release_of(notice)
        if not self._targets_me(notice):
            reason = f"for another target ({notice.target})"
            await self._report(Report.about(release, "idle", "ignored", reason))
            return
        await self.handle(self._notice_event(release))

    def on_chunk(self, payload: bytes) -> None:
        """A message on this box's chunk topic (a reply to a chunk request)."""
        if self.fetcher is not None:
            self.fetcher.on_reply(payload)

    def _notice_event(self, release: Release) -> NoticeReceived:
        return NoticeReceived(
            release,
            datetime.now(UTC),
            self.store.active_version(release.name),
            fetch=self.settings.update_fetch,
            mqtt_chunks=self.fetcher is not None,
        )

    def _restore_trust(self) -> None:
        """Re-apply the last trust notice (verified again) so key rotations survive restarts."""
        path = self.directory / TRUST_FILE
        if not path.exists():
            return
        try:
            notice, signer = decode_notice(path.read_bytes(), self.trust)
            if isinstance(notice, TrustNotice):
                self.trust = apply_trust(self.trust, notice, signer_key_id=signer)
                self._trust_sequence = notice.sequence
        except (BundleError, OSError) as exc:
            log.error("the saved trust notice %s is no longer valid (%s); ignoring it", path, exc)

    def _targets_me(self, notice: ReleaseNotice) -> bool:
        target = notice.target
        device = f"{self.settings.site}/{self.settings.device}"
        return (target.device is not None and target.device == device) or (
            target.group is not None and target.group in self.settings.update_groups
        )

    async def _apply_trust(self, notice: TrustNotice, signer: str, payload: bytes) -> None:
        if notice.sequence <= self._trust_sequence:
            return  # the retained notice again, or an older one replayed: never re-add a key
        try:
            self.trust = apply_trust(self.trust, notice, signer_key_id=signer)
        except BundleError as exc:
            await self._report(
                Report("idle", "refused", notice.sequence, f"trust notice refused: {exc}")
            )
            return
        self._trust_sequence = notice.sequence
        self.directory.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(write_atomically, self.directory / TRUST_FILE, payload)
        await self._report(
            Report("idle", "progress", notice.sequence, f"release keys updated by {signer}",
                   extra={"added": [k.key_id for k in notice.add], "revoked": list(notice.revoke)})
        )  # fmt: skip

    # ---- the loop ------------------------------------------------------------------------
    async def handle(self, event: Event) -> None:
        async with self._lock:
            new, actions = transition(self.state, event)
            if new != self.state:
                faults.hit(f"update.{new.phase}")
                try:
                    await asyncio.to_thread(persist.save, self.state_path, new)
                except OSError as exc:
                    # Not persisted, so not acted on: the old state stays true on disk and here.
                    log.error("cannot persist the updater state (%s); the update step waits", exc)
                    about = event.release if isinstance(event, NoticeReceived) else new.release
                    await self._report(
                        Report(
                            self.state.phase,
                            "progress",
                            new.last_sequence,
                            f"state not saved: {exc}",
                            rollout=about.rollout if about is not None else None,
                        )
                    )
                    self._later(event, 5.0)
                    return
                self.state = new
            for action in actions:
                await self._perform(action)

    def _later(self, event: Event, delay: float) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            await self.handle(event)

        self._spawn(run())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_step(self, phase: str, work: Any, release: Release) -> None:
        """Run a step unless the same step is already running (never two writers of one file)."""
        running = self._steps.get(phase)
        if running is not None and not running.done():
            return
        task = asyncio.create_task(self._step(phase, work, release))
        self._steps[phase] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _perform(self, action: Action) -> None:
        if isinstance(action, Report):
            await self._report(action)
        elif isinstance(action, Download):
            self._start_step("downloading", self._download, action.release)
        elif isinstance(action, Verify):
            self._start_step("verifying", self._verify, action.release)
        elif isinstance(action, Stage):
            self._start_step("staging", self._stage, action.release)
        elif isinstance(action, StartShadow):
            self._start_step("shadowing", self._shadow, action.release)
        elif isinstance(action, StopShadow):
            self._stop_shadow(action.release)
        elif isinstance(action, Activate):
            self._start_step("activating", self._activate, action.release)
        elif isinstance(action, Probation):
            self._start_step("probation", self._probation, action.release)
        elif isinstance(action, RollBack):
            await self._roll_back(action)
        elif isinstance(action, Commit):
            await self._commit(action.release)
        elif isinstance(action, Discard):
            await asyncio.to_thread(self._discard, action.release)
        elif isinstance(action, Resubmit):
            await self.handle(self._notice_event(action.release))

    async def _step(self, phase: str, work: Any, release: Release) -> None:
        event: Event
        try:
            await work(release)
        except DownloadError as exc:
            if exc.retry:
                delay = RETRY_DELAYS_S[min(self._retries, len(RETRY_DELAYS_S) - 1)]
                self._retries += 1
                await asyncio.sleep(delay)
            event = StepFailed(phase, str(exc), retry=exc.retry)  # type: ignore[arg-type]
        except (AgentError, BundleError, OSError) as exc:
            reason = getattr(exc, "message", None) or str(exc)
            event = StepFailed(phase, reason)  # type: ignore[arg-type]
        else:
            self._retries = 0
            event = StepDone(phase)  # type: ignore[arg-type]
        # This step's work is over: a retry or the next step may start a task of its own.
        if self._steps.get(phase) is asyncio.current_task():
            del self._steps[phase]
        current = self.state.release
        if current != release:
            # Superseded while it ran: its outcome is moot, and the newer release's same step,
            # which could not start beside this one, starts now.
            if current is not None and self.state.phase == phase:
                self._start_step(phase, work, current)
            return
        await self.handle(event)

    # ---- steps ---------------------------------------------------------------------------
    def _in_store(self, release: Release) -> bool:
        """Whether the store already holds exactly this bundle (a shadowed version, say)."""
        store = self.store
        if release.version not in store.versions(release.name):
            return False
        try:
            return store.record(release.name, release.version).bundle_sha256 == release.sha256
        except AgentError:
            return False

    async def _download(self, release: Release) -> None:
        if await asyncio.to_thread(self._in_store, release):
            log.info("%s@%s is in the store already: no download", release.name, release.version)
            return
        free = shutil.disk_usage(self.settings.state_dir).free
        needed = 2 * release.size + self.settings.update_min_free_mb * 2**20
        if free < needed:
            raise DownloadError(
                f"not enough disk space: {free / 2**20:.0f} MB free, {needed / 2**20:.0f} MB "
                "needed (twice the bundle plus the reserve); free space or raise nothing",
                retry=False,
            )
        path = fetch_path(release, self.settings.update_fetch, self.fetcher is not None)
        if path is None:
            reason = no_path_reason(release, self.settings.update_fetch, self.fetcher is not None)
            raise DownloadError(reason, retry=False)
        if path == "http":
            await asyncio.to_thread(download, release, self.downloads, transport=self.transport)
            return
        assert self.fetcher is not None

        async def progress(held: int, total: int, held_bytes: int, note: str) -> None:
            report = Report.about(release, "downloading", "progress", note)
            extra = {"chunks": held, "chunks_total": total, "bytes": held_bytes}
            await self._report(dataclasses.replace(report, extra=extra))

        await self.fetcher.fetch(
            release,
            self.downloads,
            progress=progress,
            wanted=lambda: self.state.release == release and self.state.phase == "downloading",
        )

    async def _verify(self, release: Release) -> None:
        def work() -> None:
            if self._in_store(release):
                bundle = self.store.open(release.name, release.version)  # verified again
            else:
                bundle = self.store.stage(part_path(self.downloads, release))
            manifest = bundle.manifest
            if (manifest.name, manifest.version) != (release.name, release.version):
                raise AgentError(
                    f"the bundle is {manifest.bundle_id} but the notice announced "
                    f"{release.name}@{release.version}"
                )
            check_fits(bundle, self.models.profile)

        await asyncio.to_thread(work)

    async def _stage(self, release: Release) -> None:
        def work() -> Candidate:
            bundle = self.store.open(release.name, release.version)
            candidate = prepare(
                bundle, self.models.profile, self.settings.cache_dir, check_references=True
            )
            try:
                self._check_latency(candidate)
            except AgentError:
                candidate.classifier.close()
                raise
            record_reference(self.store, candidate)
            return candidate

        self._candidate = await asyncio.to_thread(work)

    def _check_latency(self, candidate: Candidate) -> None:
        classifier = candidate.classifier
        golden = classifier.bundle.manifest.golden
        assert golden is not None  # prepare() refused bundles without golden samples
        inputs = [classifier.bundle.path(s.input_path).read_bytes() for s in golden.samples]
        times = []
        for run in range(STAGING_LATENCY_RUNS):
            data = inputs[run % len(inputs)]
            started = time.perf_counter()
            image = classifier.decode(
                data, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES
            )
            classifier.infer(classifier.prepare(image))
            times.append((time.perf_counter() - started) * 1000)
        p95 = float(np.percentile(times, 95))
        budget = self.models.profile.budgets.latency_p95_ms
        if p95 > budget:
            raise AgentError(
                f"staged latency p95 {p95:.1f} ms is over the profile's budget of {budget} ms"
            )

    async def _shadow(self, release: Release) -> None:
        """Shadow the active model with the staged version for `release.shadow_s` seconds."""
        staged, self._candidate = self._candidate, None
        if self.shadow is None or self.models.serving_version(release.name) is None:
            if staged is not None:
                staged.classifier.close()
            if self.shadow is None:
                raise AgentError("this agent cannot shadow (no shadow runner); upgrade the agent")
            raise AgentError(
                f"nothing to shadow: no version of {release.name} serves on this box; "
                "install one first or send an ordinary notice"
            )
        candidate = staged
        if candidate is not None and candidate.bundle.manifest.version != release.version:
            candidate.classifier.close()
            candidate = None
        if candidate is None:
            # After a restart the staged classifier is gone: load and test it again.
            candidate = await self.models.prepare(release.name, release.version)
        self.shadow.start(release.name, candidate.classifier)
        log.info(
            "shadowing %s with version %s for %.0f s",
            release.name,
            release.version,
            release.shadow_s or 0.0,
        )
        if self.after_outcome is not None:
            self.after_outcome()
        await asyncio.sleep(release.shadow_s or 0.0)

    def _stop_shadow(self, release: Release) -> None:
        running = self._steps.get("shadowing")
        if running is not None and running is not asyncio.current_task():
            running.cancel()
            del self._steps["shadowing"]
        if self.shadow is None:
            return
        shadow = self.shadow.shadows.get(release.name)
        if shadow is not None and shadow.candidate.version == release.version:
            self.shadow.stop(release.name)
            log.info("stopped shadowing %s with version %s", release.name, release.version)

    async def _activate(self, release: Release) -> None:
        candidate = self._candidate
        self._candidate = None
        if candidate is None or candidate.bundle.manifest.version != release.version:
            # After a restart the staged classifier is gone: load and test it again.
            candidate = await self.models.prepare(release.name, release.version)
        serving = self.models.serving_version(release.name)
        baseline = (
            _p95(self.models.latencies(release.name, serving)) if serving is not None else None
        )
        previous = await self.models.activate(candidate, by="update", keep_previous=True)
        self._swap = _Swap(previous, baseline, self.models.failures(release.name), time.monotonic())
        log.info(
            "activated %s@%s; probation for %.0f s",
            release.name,
            release.version,
            self.settings.probation_s,
        )

    async def _probation(self, release: Release) -> None:
        models = self.models
        settings = self.settings
        swap = self._swap
        if swap is None:  # resumed after a restart: watch from now, roll back from the store
            swap = _Swap(None, None, models.failures(release.name), time.monotonic())
            self._swap = swap
        deadline = swap.started + settings.probation_s
        next_selftest = time.monotonic() + settings.probation_selftest_s
        while time.monotonic() < deadline:
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            errors = models.failures(release.name) - swap.errors_before
            if errors >= settings.probation_max_errors:
                raise AgentError(f"{errors} inference failures on live traffic during probation")
            samples = models.latencies(release.name, release.version)
            if swap.baseline_p95_ms and samples and len(samples) >= settings.probation_min_samples:
                p95 = _p95(samples)
                assert p95 is not None
                if p95 > settings.probation_latency_factor * swap.baseline_p95_ms:
                    raise AgentError(
                        f"p95 latency {p95:.1f} ms on live traffic is over "
                        f"{settings.probation_latency_factor}x the previous version's "
                        f"{swap.baseline_p95_ms:.1f} ms"
                    )
            if time.monotonic() >= next_selftest:
                next_selftest = time.monotonic() + settings.probation_selftest_s
                report = await models.selftest(release.name)
                if report is not None and not report.passed:
                    raise AgentError(
                        "golden self-test failed during probation: " + "; ".join(report.failures)
                    )

    async def _roll_back(self, action: RollBack) -> None:
        release = action.release
        swap, self._swap = self._swap, None
        previous = swap.previous if swap is not None else None
        await self.models.roll_back(release.name, action.to_version, previous)
        with contextlib.suppress(AgentError, OSError):
            if self.store.active_version(release.name) != release.version:
                await asyncio.to_thread(self.store.remove, release.name, release.version)
        log.warning("rolled back %s@%s: %s", release.name, release.version, action.reason)

    async def _commit(self, release: Release) -> None:
        swap, self._swap = self._swap, None
        if swap is not None:
            self.models.retire(swap.previous)
        removed = await asyncio.to_thread(
            self.store.prune, release.name, self.settings.keep_versions
        )
        await asyncio.to_thread(discard, self.downloads, release)
        log.info(
            "committed %s@%s (removed old versions %s)", release.name, release.version, removed
        )

    def _discard(self, release: Release) -> None:
        discard(self.downloads, release)
        store = self.store
        if (
            release.version in store.versions(release.name)
            and store.active_version(release.name) != release.version
        ):
            with contextlib.suppress(AgentError, OSError):
                store.remove(release.name, release.version)

    # ---- reports -------------------------------------------------------------------------
    async def _report(self, report: Report) -> None:
        message = {
            "phase": report.phase,
            "outcome": report.outcome,
            "sequence": report.sequence,
            "reason": report.reason,
            "name": report.name,
            "version": report.version,
            "device": f"{self.settings.site}/{self.settings.device}",
            "at": time.time(),
            **report.extra,
        }
        if report.rollout is not None:
            message["rollout"] = report.rollout.to_json()
        self.reports.append(message)
        del self.reports[:-50]
        level = logging.WARNING if report.outcome in ("refused", "rolled_back") else logging.INFO
        log.log(level, "update %s: %s", report.outcome, message)
        self.metrics.updates.labels(report.outcome).inc()
        if self.publisher is not None:
            await self.publisher.publish_update(message)
        if report.outcome in ("committed", "rolled_back") and self.after_outcome is not None:
            self.after_outcome()


def _release_of(notice: ReleaseNotice) -> Release:
    """What the state machine keeps of a verified release notice."""
    rollout = notice.rollout
    return Release(
        name=notice.name,
        version=notice.version,
        sha256=notice.bundle_sha256,
        size=notice.bundle_size,
        url=notice.url,
        chunked=notice.chunked,
        sequence=notice.sequence,
        issued_at=notice.issued_at,
        expires_at=notice.expires_at,
        rollback=notice.rollback,
        rollout=RolloutRef(rollout.id, rollout.wave) if rollout is not None else None,
        critical=notice.critical,
        shadow_s=shadow.max_s if (shadow := notice.shadow) is not None else None,
    )


def _p95(samples: Any) -> float | None:
    if not samples:
        return None
    return float(np.percentile(np.fromiter(samples, dtype=np.float64), 95))
