"""Installing a bundle: verify, check it fits this device, load it, self-test it (not activate).

The one path for every way a bundle arrives: `edge-agent install`, the admin HTTP route, and
bundles pushed over MQTT (the updater's staging). What it prepares is a candidate; making it the
active version is `models.Models.activate`'s job. Nothing is activated until every check has
passed; a refused bundle leaves the active one untouched and says why. A classifier arriving on
the box is also checked against the fp32 reference outputs it carries (`reference_check`), once:
loading an installed bundle again at start-up runs the golden self-test only. A vision-language
bundle whose projector was made for another text model is refused from the GGUF headers
(`check_projector`), before the store keeps anything and before llama.cpp loads a byte.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from edge_agent import __version__
from edge_agent.device.store import BundleStore
from edge_agent.engine.anomaly import load_served
from edge_agent.engine.classifier import Classifier
from edge_agent.engine.generator import (
    GENERATIVE_TASKS,
    Generator,
    load_generator,
    run_text_selftest,
)
from edge_agent.engine.reference_check import (
    ReferenceReport,
    not_carried_warning,
    run_reference_check,
)
from edge_agent.engine.selftest import SelfTestReport, run_selftest
from edge_agent.errors import AgentError, BundleRejectedError
from edge_bundle.bundle import VerifiedBundle
from edge_bundle.errors import BundleError
from edge_bundle.gguf_fields import ProjectorMismatchError, projector_pair
from edge_bundle.manifest import Manifest, semver_tuple
from edge_bundle.profiles import HardwareProfile

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A bundle staged in the store, loaded and self-tested, not yet active."""

    bundle: VerifiedBundle
    classifier: Classifier
    selftest: SelfTestReport
    # The reference check, when it ran (install, staging) and the bundle carries references.
    reference: ReferenceReport | None = None


def check_fits(bundle: VerifiedBundle, profile: HardwareProfile) -> None:
    """Refuse bundles built for other hardware, for a newer agent, or over the size budget."""
    manifest = bundle.manifest
    if manifest.compatible_profiles and profile.name not in manifest.compatible_profiles:
        raise BundleRejectedError(
            f"{bundle.bundle_id} was built for {list(manifest.compatible_profiles)}, not this "
            f"device's profile {profile.name!r}; rebuild it with --profile {profile.name}"
        )
    if semver_tuple(manifest.min_agent_version) > semver_tuple(__version__):
        raise BundleRejectedError(
            f"{bundle.bundle_id} needs edge-agent >= {manifest.min_agent_version}, this is "
            f"{__version__}; update the agent first"
        )
    size_mb = sum(entry.size for entry in manifest.files) / 1e6
    if size_mb > profile.budgets.max_bundle_mb:
        raise BundleRejectedError(
            f"{bundle.bundle_id} is {size_mb:.0f} MB, over the profile's max_bundle_mb "
            f"({profile.budgets.max_bundle_mb}); quantize it further"
        )


def check_projector(bundle: VerifiedBundle) -> None:
    """A vision-language bundle's projector (mmproj) must fit its text model: refused from the
    two GGUF headers, saying what differs. Other bundles pass."""
    generation = bundle.manifest.generation
    vision = generation.vision if generation is not None else None
    if vision is None:
        return
    models = [
        f.path for f in bundle.manifest.files if f.role == "model" and f.path.endswith(".gguf")
    ]
    if len(models) != 1:
        return  # the runtime refuses it at load, saying so
    try:
        projector_pair(bundle.path(models[0]), bundle.path(vision.projector))
    except ProjectorMismatchError as exc:
        raise BundleRejectedError(f"{bundle.bundle_id} refused: {exc}") from exc


class _Served(Protocol):
    def close(self) -> None: ...


_S = TypeVar("_S", bound=_Served)


def _load_and_test(
    bundle: VerifiedBundle,
    load: Callable[[], _S],
    selftest: Callable[[_S], SelfTestReport],
) -> tuple[_S, SelfTestReport]:
    """Load a verified bundle and run its self-test; any failure is a `BundleRejectedError`
    and leaves nothing loaded."""
    try:
        served = load()
    except AgentError as exc:
        raise BundleRejectedError(f"{bundle.bundle_id} cannot be loaded: {exc.message}") from exc
    try:
        report = selftest(served)
        report.raise_for_failure()
    except AgentError as exc:
        served.close()
        raise BundleRejectedError(exc.message) from exc
    except BundleError as exc:  # a golden sample the bundle's own pipeline cannot read
        served.close()
        raise BundleRejectedError(
            f"{bundle.bundle_id} failed its golden self-test: {exc}; the bundle is broken, "
            "rebuild it with model-packager"
        ) from exc
    return served, report


def prepare(
    bundle: VerifiedBundle,
    profile: HardwareProfile,
    cache_dir: Path,
    *,
    check_references: bool = False,
) -> Candidate:
    """Load a verified classifier bundle and run its golden self-test.

    `check_references` (a bundle arriving on this box: install, update staging) then also runs
    the reference check; a bundle that fails it, or carries a malformed one, is refused.
    """
    check_fits(bundle, profile)
    classifier, report = _load_and_test(
        bundle, lambda: load_served(bundle, profile, cache_dir), run_selftest
    )
    if not check_references:
        return Candidate(bundle, classifier, report)
    try:
        reference = run_reference_check(classifier, profile=profile.name)
        if reference is not None:
            reference.raise_for_failure()
    except AgentError:
        classifier.close()
        raise
    return Candidate(bundle, classifier, report, reference)


def record_reference(store: BundleStore, candidate: Candidate, *, warn: bool = True) -> None:
    """Keep a passed reference check's outcome in the store, for `GET /v1/models` later; `warn`
    logs a bundle that carries no references (the CLI prints that itself)."""
    if candidate.reference is None:
        if warn and candidate.bundle.manifest.reference_check is None:
            log.warning("%s", not_carried_warning(str(candidate.bundle.bundle_id)))
        return
    manifest = candidate.bundle.manifest
    try:
        store.save_reference_check(manifest.name, manifest.version, candidate.reference.to_json())
    except (AgentError, OSError) as exc:  # the check passed; only its record is missing
        log.warning("cannot record the reference check of %s: %s", manifest.bundle_id, exc)


@dataclass
class TextCandidate:
    """A language-model bundle staged, loaded and self-tested (golden completions), not active."""

    bundle: VerifiedBundle
    generator: Generator
    selftest: SelfTestReport


AnyCandidate = Candidate | TextCandidate


def prepare_text(
    bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path
) -> TextCandidate:
    """Load a verified text-generation (or vision-language) bundle and replay its golden
    completions."""
    check_fits(bundle, profile)
    check_projector(bundle)
    generator, report = _load_and_test(
        bundle, lambda: load_generator(bundle, profile, cache_dir), run_text_selftest
    )
    return TextCandidate(bundle, generator, report)


def prepare_any(
    bundle: VerifiedBundle,
    profile: HardwareProfile,
    cache_dir: Path,
    *,
    check_references: bool = False,
) -> AnyCandidate:
    """`prepare` or `prepare_text`, by the bundle's task."""
    if bundle.manifest.task in GENERATIVE_TASKS:
        return prepare_text(bundle, profile, cache_dir)
    return prepare(bundle, profile, cache_dir, check_references=check_references)


#: Per context token, an upper bound of the KV cache of the small models boxes run (f16).
KV_MB_PER_TOKEN = 0.05


def memory_estimate_mb(manifest: Manifest) -> float:
    """What a bundle needs in memory once loaded: its model files (mapped or copied, plus runtime
    arenas, +20%) and, for a language model, the KV cache of its context. Golden samples,
    reference inputs and outputs, knowledge and reports are read once at most, never kept."""
    weights = sum(f.size for f in manifest.files if f.role in ("model", "model-data", "mmproj"))
    estimate = weights / 1e6 * 1.2
    if manifest.generation is not None:
        estimate += manifest.generation.context_size * KV_MB_PER_TOKEN
    return estimate


def check_memory(store: BundleStore, bundle: VerifiedBundle, budget_mb: int) -> None:
    """All active bundles (the new one instead of its own older version) must fit `budget_mb`."""
    name = bundle.manifest.name
    needed = memory_estimate_mb(bundle.manifest)
    others = []
    for other in store.active_names():
        version = store.active_version(other)
        if other == name or version is None:
            continue
        # Only for the size: each active bundle was verified at its install and is again when
        # it loads, possibly with keys this command was not given.
        manifest = store.installed_manifest(other, version)
        if manifest is not None:
            others.append((other, memory_estimate_mb(manifest)))
    total = needed + sum(mb for _, mb in others)
    if total > budget_mb:
        listed = ", ".join(f"{n} {mb:.0f} MB" for n, mb in others) or "nothing else"
        raise BundleRejectedError(
            f"{bundle.bundle_id} needs about {needed:.0f} MB and the active bundles ({listed}) "
            f"about {total - needed:.0f} MB: {total:.0f} MB is over the memory budget of "
            f"{budget_mb} MB; remove a bundle, pick a smaller quantization, or raise "
            "memory_budget_mb for a box with more memory"
        )


def stage_and_prepare(
    store: BundleStore,
    bundle_file: Path,
    profile: HardwareProfile,
    cache_dir: Path,
    budget_mb: int | None = None,
    *,
    warn: bool = True,
) -> AnyCandidate:
    """Verify and store `bundle_file`, check it fits, load, self-test and reference-check it
    (not activated)."""
    bundle = store.stage(bundle_file, check=check_projector)
    try:
        check_memory(store, bundle, budget_mb or profile.budgets.memory_mb)
        candidate = prepare_any(bundle, profile, cache_dir, check_references=True)
    except BundleRejectedError:
        if store.active_version(bundle.manifest.name) != bundle.manifest.version:
            store.remove(bundle.manifest.name, bundle.manifest.version)
        raise
    if isinstance(candidate, Candidate):
        record_reference(store, candidate, warn=warn)
    return candidate
