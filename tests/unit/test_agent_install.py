"""edge_agent.device.install and edge_agent.engine.selftest: a bundle is activated only once it fits this device,
loads, and reproduces its own golden outputs; a refused one does not stay in the store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import __version__
from edge_agent.device.install import check_fits, prepare, stage_and_prepare
from edge_agent.device.store import BundleStore
from edge_agent.engine.classifier import Classifier, load_classifier
from edge_agent.engine.selftest import run_selftest
from edge_agent.errors import BundleRejectedError, SelfTestError
from edge_bundle.profiles import HardwareProfile, load_profile
from tests.agent_support import Keys, build_bundle, make_keys
from tests.unit.agent_fixtures import GENERIC_PROFILE, resigned, store_for


@pytest.fixture(scope="module")
def profile() -> HardwareProfile:
    return load_profile(GENERIC_PROFILE)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def store(tmp_path: Path, keys: Keys) -> BundleStore:
    return store_for(tmp_path / "store", keys)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def classifiers() -> Iterator[list[Classifier]]:
    """Classifiers a test loaded; closed afterwards."""
    loaded: list[Classifier] = []
    yield loaded
    for classifier in loaded:
        classifier.close()


def test_a_good_bundle_becomes_a_candidate_with_a_passing_selftest(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    classifiers: list[Classifier],
) -> None:
    built = build_bundle(tmp_path, keys)
    candidate = stage_and_prepare(store, built.path, profile, cache)
    classifiers.append(candidate.classifier)
    assert candidate.selftest.passed
    assert candidate.selftest.failures == ()
    assert candidate.selftest.samples == 2
    assert candidate.selftest.max_deviation <= candidate.selftest.tolerance
    assert candidate.classifier.name == "defects"
    assert candidate.classifier.version == 1
    assert candidate.bundle.directory == store.root / "bundles" / "defects" / "1"
    assert store.versions("defects") == [1]
    assert store.active_version("defects") is None  # preparing never activates


def test_a_bundle_for_another_profile_is_refused_naming_both(
    tmp_path: Path, keys: Keys, store: BundleStore, profile: HardwareProfile, cache: Path
) -> None:
    built = build_bundle(tmp_path, keys, profiles=("rpi5-arm64", "jetson-orin-nano"))
    with pytest.raises(BundleRejectedError) as caught:
        stage_and_prepare(store, built.path, profile, cache)
    message = caught.value.message
    assert "'generic-x86-64-avx2'" in message
    assert "rpi5-arm64" in message
    assert "--profile generic-x86-64-avx2" in message
    assert store.versions("defects") == []


def test_a_bundle_listing_no_profile_fits_every_device(
    tmp_path: Path, keys: Keys, store: BundleStore, profile: HardwareProfile
) -> None:
    built = build_bundle(tmp_path, keys, profiles=())
    check_fits(store.stage(built.path), profile)  # does not raise


def test_a_bundle_needing_a_newer_agent_is_refused(
    tmp_path: Path, keys: Keys, store: BundleStore, profile: HardwareProfile, cache: Path
) -> None:
    built = build_bundle(tmp_path, keys)
    newer = resigned(built, tmp_path / "newer.bundle", min_agent_version="99.0.0")
    with pytest.raises(BundleRejectedError) as caught:
        stage_and_prepare(store, newer, profile, cache)
    assert "99.0.0" in caught.value.message
    assert __version__ in caught.value.message
    assert "update the agent" in caught.value.message
    assert store.versions("defects") == []


def test_a_bundle_over_the_profile_size_budget_is_refused(
    tmp_path: Path, keys: Keys, store: BundleStore, profile: HardwareProfile
) -> None:
    bundle = store.stage(build_bundle(tmp_path, keys).path)
    # Profiles validate max_bundle_mb >= 1; the tiny bundle is over a zero budget.
    tight = profile.model_copy(
        update={"budgets": profile.budgets.model_copy(update={"max_bundle_mb": 0})}
    )
    with pytest.raises(BundleRejectedError, match="max_bundle_mb"):
        check_fits(bundle, tight)


def test_a_bundle_failing_its_selftest_is_refused_and_removed(
    tmp_path: Path, keys: Keys, store: BundleStore, profile: HardwareProfile, cache: Path
) -> None:
    built = build_bundle(tmp_path, keys, golden_offset=0.05)
    with pytest.raises(BundleRejectedError) as caught:
        stage_and_prepare(store, built.path, profile, cache)
    message = caught.value.message
    assert "defects@1 failed its golden self-test" in message
    assert "golden/00.png" in message
    assert store.versions("defects") == []
    assert not (store.root / "bundles" / "defects" / "1.json").exists()


def test_a_refused_bundle_that_is_already_active_stays_installed(
    tmp_path: Path, keys: Keys, store: BundleStore, cache: Path
) -> None:
    built = build_bundle(tmp_path, keys)
    store.stage(built.path)
    store.activate("defects", 1)
    elsewhere = load_profile("rpi5-arm64")  # e.g. the box was re-profiled since
    with pytest.raises(BundleRejectedError):
        stage_and_prepare(store, built.path, elsewhere, cache)
    assert store.versions("defects") == [1]
    assert store.active_version("defects") == 1


def test_a_refused_version_leaves_the_active_one_alone(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    classifiers: list[Classifier],
) -> None:
    first = stage_and_prepare(store, build_bundle(tmp_path, keys).path, profile, cache)
    classifiers.append(first.classifier)
    store.activate("defects", 1)
    bad = build_bundle(tmp_path, keys, version=2, golden_offset=0.05)
    with pytest.raises(BundleRejectedError):
        stage_and_prepare(store, bad.path, profile, cache)
    assert store.versions("defects") == [1]
    assert store.active_version("defects") == 1


def test_prepare_an_installed_version_again(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    classifiers: list[Classifier],
) -> None:
    store.stage(build_bundle(tmp_path, keys).path)
    candidate = prepare(store.open("defects", 1), profile, cache)
    classifiers.append(candidate.classifier)
    assert candidate.selftest.passed


def test_selftest_report_of_a_passing_bundle(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    classifiers: list[Classifier],
) -> None:
    classifier = load_classifier(store.stage(build_bundle(tmp_path, keys).path), profile, cache)
    classifiers.append(classifier)
    report = run_selftest(classifier)
    assert report.bundle == "defects@1"
    assert report.samples == 2
    assert report.tolerance == pytest.approx(1e-4)
    assert 0 <= report.max_deviation <= 1e-4
    assert report.seconds > 0
    assert report.passed
    report.raise_for_failure()  # does not raise


def test_selftest_report_of_a_bundle_whose_expectations_are_off(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    classifiers: list[Classifier],
) -> None:
    built = build_bundle(tmp_path, keys, golden_offset=0.05)
    classifier = load_classifier(store.stage(built.path), profile, cache)
    classifiers.append(classifier)
    report = run_selftest(classifier)  # reports, never raises for a mismatch
    assert not report.passed
    assert report.samples == 2
    assert report.max_deviation == pytest.approx(0.05, abs=1e-4)
    # Every expected probability of both samples is off by 0.05, over the 1e-4 tolerance.
    assert len(report.failures) == 2 * 3
    assert {failure.split(":")[0] for failure in report.failures} == {
        "golden/00.png",
        "golden/01.png",
    }
    with pytest.raises(SelfTestError, match="rebuild the bundle for this profile"):
        report.raise_for_failure()


def test_selftest_of_a_bundle_without_golden_samples_fails(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    classifiers: list[Classifier],
) -> None:
    built = build_bundle(tmp_path, keys)
    without = resigned(built, tmp_path / "no-golden.bundle", golden=None)
    classifier = load_classifier(store.stage(without), profile, cache)
    classifiers.append(classifier)
    report = run_selftest(classifier)
    assert not report.passed
    assert report.samples == 0
    assert report.failures == ("the bundle has no golden samples",)


def test_a_bundle_whose_golden_sample_is_not_an_image_is_refused_and_removed(
    tmp_path: Path, keys: Keys, store: BundleStore, profile: HardwareProfile, cache: Path
) -> None:
    built = build_bundle(tmp_path, keys)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    broken = resigned(built, tmp_path / "broken.bundle", files={"golden/00.png": garbage})
    with pytest.raises(BundleRejectedError, match="golden"):
        stage_and_prepare(store, broken, profile, cache)
    assert store.versions("defects") == []


def test_memory_check_does_not_need_the_keys_of_other_active_bundles(tmp_path: Path) -> None:
    """An install trusting only its own key still sizes the other active bundles (each was
    verified at its own install and is verified again when it loads)."""
    from edge_agent.device.install import check_memory
    from edge_agent.device.store import BundleStore
    from edge_bundle.signing import TrustStore
    from tests.agent_support import build_bundle, make_keys

    first_keys, second_keys = make_keys(tmp_path / "k1", "one"), make_keys(tmp_path / "k2", "two")
    first = build_bundle(tmp_path / "a", first_keys, name="first")
    second = build_bundle(tmp_path / "b", second_keys, name="second")
    root = tmp_path / "store"
    store_one = BundleStore(root, TrustStore.from_files([first_keys.public]))
    store_one.stage(first.path)
    store_one.activate("first", 1)
    store_two = BundleStore(root, TrustStore.from_files([second_keys.public]))
    staged = store_two.stage(second.path)
    check_memory(store_two, staged, budget_mb=1000)
