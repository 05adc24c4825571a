"""edge_agent.engine.reference_check at install: a classifier bundle must agree with the fp32 reference
outputs it carries, computed on this box; one that does not, or whose reference is malformed, is
refused and removed, and a bundle without references installs with a warning."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.app.cli import EXIT_REFUSED, main
from edge_agent.device.install import Candidate, memory_estimate_mb, prepare, stage_and_prepare
from edge_agent.device.store import BundleStore
from edge_agent.engine.classifier import Classifier
from edge_agent.engine.reference_check import load_reference_outputs, status
from edge_agent.errors import BundleRejectedError
from edge_bundle.cpu_class import host_class
from edge_bundle.manifest import ClassEvaluation
from edge_bundle.profiles import HardwareProfile, load_profile
from tests.agent_support import Keys, build_bundle, make_keys
from tests.unit.agent_fixtures import (
    GENERIC_PROFILE,
    clean_environment,
    store_for,
    with_references,
)

HERE = str(host_class())


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
    loaded: list[Classifier] = []
    yield loaded
    for classifier in loaded:
        classifier.close()


def install(store: BundleStore, bundle: Path, profile: HardwareProfile, cache: Path) -> Candidate:
    candidate = stage_and_prepare(store, bundle, profile, cache)
    assert isinstance(candidate, Candidate)
    return candidate


def refusal(store: BundleStore, bundle: Path, profile: HardwareProfile, cache: Path) -> str:
    """The refusal's message; the refused version must have left the store entirely."""
    with pytest.raises(BundleRejectedError) as caught:
        stage_and_prepare(store, bundle, profile, cache)
    assert store.versions("defects") == []
    assert store.active_version("defects") is None
    assert list((store.root / "bundles" / "defects").glob("1.*")) == []
    return caught.value.message


def test_a_bundle_agreeing_with_its_references_installs_with_its_figures(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    classifiers: list[Classifier],
) -> None:
    bundle = with_references(build_bundle(tmp_path, keys), tmp_path / "checked.bundle")
    candidate = install(store, bundle, profile, cache)
    classifiers.append(candidate.classifier)
    report = candidate.reference
    assert report is not None and report.passed
    assert report.cpu_class == HERE
    assert report.samples == 12 and report.seconds > 0
    verdicts = {v.name: v for v in report.verdicts}
    assert (verdicts["top1_agreement"].count.hits, verdicts["top1_agreement"].count.total) == (
        12,
        12,
    )
    assert verdicts["top5_containment"].passed
    # Too few confident inputs for that gate: reported as not judged, and not a failure.
    assert not verdicts["confident_top1_agreement"].judged
    shown = report.to_json()
    assert shown["status"] == "passed" and shown["cpu_class"] == HERE
    assert shown["figures"]["top1_agreement"]["value"] == 1.0
    assert shown["figures"]["top1_agreement"]["count"] == 12
    assert shown["figures"]["confident_top1_agreement"]["judged"] is False
    assert "not judged" in shown["figures"]["confident_top1_agreement"]["basis"]
    assert store.reference_check("defects", 1) == shown  # kept for GET /v1/models
    assert f"reference check passed on CPU class {HERE}" in report.summary()
    assert store.active_version("defects") is None  # preparing never activates


def test_a_bundle_disagreeing_with_its_references_is_refused_with_the_figure(
    tmp_path: Path, keys: Keys, store: BundleStore, profile: HardwareProfile, cache: Path
) -> None:
    expected = (ClassEvaluation(cpu_class=HERE, how="native", metrics={"top1_agreement": 0.99}),)
    bundle = with_references(
        build_bundle(tmp_path, keys),
        tmp_path / "permuted.bundle",
        outputs=lambda probs: np.roll(probs, 1, axis=1),  # every reference top-1 moved
        expected=expected,
    )
    message = refusal(store, bundle, profile, cache)
    assert message.startswith("defects@1 disagrees with its fp32 reference outputs")
    assert f"CPU class {HERE}" in message
    assert "top1_agreement 0.0000 (0/12, 95% interval 0.000-0.242; threshold 0.900" in message
    assert f"the build measured 0.9900 on {HERE} (native)" in message
    assert "confident_top1_agreement" not in message  # not judged, so not failed
    assert f"rebuild the bundle with model-packager for this box's profile ({GENERIC_PROFILE})" in (
        message
    )
    assert f"on or for CPU class {HERE}" in message


def test_a_refusal_says_when_the_build_did_not_evaluate_this_class(
    tmp_path: Path, keys: Keys, store: BundleStore, profile: HardwareProfile, cache: Path
) -> None:
    other = "arm64" if HERE != "arm64" else "x86-64-vnni"
    expected = (
        ClassEvaluation(cpu_class=other, how="native", metrics={"top1_agreement": 1.0}),
        ClassEvaluation(cpu_class=HERE, how="not-evaluated", note="no such runner"),
    )
    bundle = with_references(
        build_bundle(tmp_path, keys),
        tmp_path / "permuted.bundle",
        outputs=lambda probs: np.roll(probs, 2, axis=1),
        expected=expected,
    )
    message = refusal(store, bundle, profile, cache)
    assert "where the build did not evaluate this class (no such runner)" in message


def test_a_refused_new_version_leaves_the_active_one_serving(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    classifiers: list[Classifier],
) -> None:
    classifiers.append(install(store, build_bundle(tmp_path, keys).path, profile, cache).classifier)
    store.activate("defects", 1)
    second = build_bundle(tmp_path, keys, version=2)
    bad = with_references(second, tmp_path / "bad.bundle", outputs=lambda p: np.roll(p, 1, axis=1))
    with pytest.raises(BundleRejectedError, match="disagrees"):
        stage_and_prepare(store, bad, profile, cache)
    assert store.versions("defects") == [1]
    assert store.active_version("defects") == 1


def _object_array(path: Path) -> Path:
    np.save(path, np.array([{"label": "ok"}] * 12, dtype=object), allow_pickle=True)
    return path


def _pickle_file(path: Path) -> Path:
    path.write_bytes(pickle.dumps(np.zeros((12, 3), dtype=np.float32)))
    return path


def _npz(path: Path) -> Path:
    with path.open("wb") as handle:
        np.savez(handle, outputs=np.full((12, 3), 1 / 3, dtype=np.float32))
    return path


@pytest.mark.parametrize(
    ("outputs", "words"),
    [
        (lambda p: p[:, :2], "shape (12, 2), expected (12, 3)"),
        (lambda p: p[:11], "shape (11, 3), expected (12, 3)"),
        (lambda p: p.reshape(-1), "shape (36,), expected (12, 3)"),
        (lambda p: p.astype(np.float64), "are float64, not float32"),
        (lambda p: np.where(np.arange(3) == 1, np.nan, p).astype(np.float32), "NaN or infinite"),
        (lambda p: (p * 10).astype(np.float32), "are not probabilities"),
    ],
    ids=["columns", "rows", "1-D", "float64", "NaN", "logits"],
)
def test_malformed_reference_outputs_are_refused(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    outputs: object,
    words: str,
) -> None:
    bundle = with_references(
        build_bundle(tmp_path, keys),
        tmp_path / "malformed.bundle",
        outputs=outputs,  # type: ignore[arg-type]
    )
    message = refusal(store, bundle, profile, cache)
    assert message.startswith("defects@1: the reference outputs reference/outputs.npy")
    assert words in message
    assert "rebuild it with model-packager" in message


@pytest.mark.parametrize(
    ("write", "words"),
    [
        (_object_array, "cannot be read as a .npy array without pickle"),
        (_pickle_file, "cannot be read as a .npy array without pickle"),
        (_npz, "an .npz archive"),
    ],
    ids=["object-array", "pickle", "npz"],
)
def test_reference_files_that_need_pickle_or_are_no_npy_are_refused(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    write: object,
    words: str,
) -> None:
    outputs_file = write(tmp_path / "outputs.npy")  # type: ignore[operator]
    bundle = with_references(
        build_bundle(tmp_path, keys), tmp_path / "malformed.bundle", outputs_file=outputs_file
    )
    message = refusal(store, bundle, profile, cache)
    assert words in message


def test_loading_reference_outputs_never_unpickles(tmp_path: Path) -> None:
    path = tmp_path / "evil.npy"
    np.save(path, np.array([_Trap()], dtype=object), allow_pickle=True)
    with pytest.raises(BundleRejectedError, match="without pickle"):
        load_reference_outputs(path, rows=1, columns=1, what="x")
    assert not _Trap.sprung


class _Trap:
    sprung = False

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return _spring, ()


def _spring() -> None:
    _Trap.sprung = True


def test_an_undecodable_reference_input_is_refused(
    tmp_path: Path, keys: Keys, store: BundleStore, profile: HardwareProfile, cache: Path
) -> None:
    bundle = with_references(
        build_bundle(tmp_path, keys), tmp_path / "broken.bundle", garbled=("reference/03.jpg",)
    )
    message = refusal(store, bundle, profile, cache)
    assert message.startswith("defects@1: the reference input reference/03.jpg cannot be run")
    assert "rebuild it with model-packager" in message


def test_start_up_loading_does_not_run_the_check(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    classifiers: list[Classifier],
) -> None:
    """`prepare` without the flag (an installed bundle loading again) runs the golden self-test
    only; the check belongs to install and update staging."""
    bundle = with_references(
        build_bundle(tmp_path, keys),
        tmp_path / "bad.bundle",
        outputs=lambda p: np.roll(p, 1, axis=1),
    )
    candidate = prepare(store.stage(bundle), profile, cache)
    classifiers.append(candidate.classifier)
    assert candidate.selftest.passed
    assert candidate.reference is None


def test_a_bundle_without_references_installs_unchecked(
    tmp_path: Path,
    keys: Keys,
    store: BundleStore,
    profile: HardwareProfile,
    cache: Path,
    classifiers: list[Classifier],
    caplog: pytest.LogCaptureFixture,
) -> None:
    candidate = install(store, build_bundle(tmp_path, keys).path, profile, cache)
    classifiers.append(candidate.classifier)
    assert candidate.reference is None
    assert store.reference_check("defects", 1) is None
    assert "defects@1 carries no fp32 reference outputs" in caplog.text
    shown = status(candidate.bundle.manifest, None, HERE)
    assert shown["status"] == "not-carried"
    assert "carries no fp32 reference outputs" in shown["warning"]


def test_status_of_a_check_recorded_on_another_cpu_class(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    bundle = store.stage(with_references(build_bundle(tmp_path, keys), tmp_path / "c.bundle"))
    recorded = {"status": "passed", "cpu_class": "x86-64-avx2", "figures": {}}
    assert status(bundle.manifest, recorded, "x86-64-avx2") == recorded
    moved = status(bundle.manifest, recorded, "x86-64-vnni")
    assert moved["status"] == "passed"
    assert "checked on CPU class x86-64-avx2, but this box is x86-64-vnni" in moved["warning"]
    assert status(bundle.manifest, None, "x86-64-avx2")["status"] == "not-run"


def test_reference_files_do_not_count_as_model_memory(tmp_path: Path, keys: Keys) -> None:
    built = build_bundle(tmp_path, keys)
    store = store_for(tmp_path / "store", keys)
    plain = store.stage(built.path).manifest
    bigger = build_bundle(tmp_path / "v2", keys, version=2)
    checked = store.stage(with_references(bigger, tmp_path / "checked.bundle", count=40)).manifest
    assert any(f.role == "reference" for f in checked.files)
    assert sum(f.size for f in checked.files) > sum(f.size for f in plain.files)
    assert memory_estimate_mb(checked) == pytest.approx(memory_estimate_mb(plain))


def test_cli_install_prints_the_check_or_warns_without_references(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_environment(monkeypatch)
    state = tmp_path / "state"
    common = ["--state-dir", str(state), "--trusted-key", str(keys.public)]
    common += ["--profile", GENERIC_PROFILE]

    plain = build_bundle(tmp_path, keys)
    assert main(["install", str(plain.path), *common]) == 0
    out, err = capsys.readouterr()
    assert "activated defects@1" in out
    assert "edge-agent: warning: defects@1 carries no fp32 reference outputs" in err

    checked = with_references(build_bundle(tmp_path, keys, version=2), tmp_path / "c.bundle")
    assert main(["install", str(checked), *common]) == 0
    out, err = capsys.readouterr()
    assert "reference check passed on CPU class" in out
    assert "top1_agreement 1.0000 (12/12" in out
    assert "warning" not in err

    bad = build_bundle(tmp_path, keys, version=3)
    permuted = with_references(bad, tmp_path / "p.bundle", outputs=lambda p: np.roll(p, 1, axis=1))
    assert main(["install", str(permuted), *common]) == EXIT_REFUSED
    out, err = capsys.readouterr()
    assert "edge-agent: refused: defects@3 disagrees with its fp32 reference outputs" in err
    assert store_for(state / "store", keys).versions("defects") == [1, 2]
