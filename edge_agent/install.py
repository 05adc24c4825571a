"""Installing a bundle: verify, check it fits this device, load it, self-test it, then activate.

The one path for every way a bundle arrives: `edge-agent install`, the admin HTTP route, and (in
the update work) bundles pushed over MQTT. Nothing is activated until every check has passed; a
refused bundle leaves the active one untouched and says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edge_agent import __version__
from edge_agent.classifier import Classifier, load_classifier
from edge_agent.errors import AgentError, BundleRejectedError
from edge_agent.selftest import SelfTestReport, run_selftest
from edge_agent.store import BundleStore
from edge_bundle.bundle import VerifiedBundle
from edge_bundle.errors import BundleError
from edge_bundle.manifest import semver_tuple
from edge_bundle.profiles import HardwareProfile

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A bundle staged in the store, loaded and self-tested, not yet active."""

    bundle: VerifiedBundle
    classifier: Classifier
    selftest: SelfTestReport


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


def prepare(bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path) -> Candidate:
    """Load a verified bundle and run its golden self-test; raise `BundleRejectedError`."""
    check_fits(bundle, profile)
    try:
        classifier = load_classifier(bundle, profile, cache_dir)
    except AgentError as exc:
        raise BundleRejectedError(f"{bundle.bundle_id} cannot be loaded: {exc.message}") from exc
    try:
        report = run_selftest(classifier)
        report.raise_for_failure()
    except AgentError as exc:
        classifier.close()
        raise BundleRejectedError(exc.message) from exc
    except BundleError as exc:  # a golden sample the bundle's own pipeline cannot read
        classifier.close()
        raise BundleRejectedError(
            f"{bundle.bundle_id} failed its golden self-test: {exc}; the bundle is broken, "
            "rebuild it with model-packager"
        ) from exc
    return Candidate(bundle, classifier, report)


def stage_and_prepare(
    store: BundleStore, bundle_file: Path, profile: HardwareProfile, cache_dir: Path
) -> Candidate:
    """Verify and store `bundle_file`, then load and self-test it (not activated)."""
    bundle = store.stage(bundle_file)
    try:
        return prepare(bundle, profile, cache_dir)
    except BundleRejectedError:
        if store.active_version(bundle.manifest.name) != bundle.manifest.version:
            store.remove(bundle.manifest.name, bundle.manifest.version)
        raise
