"""The gate logic per CPU class, on every machine: which classes a build evaluates, which one the
gates judge, and what the manifest and the refusal say. Evaluations of the other classes are
injected where the point is the logic; one test runs the real emulator on a tiny model."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_bundle.bundle import verify_bundle
from edge_bundle.cpu_class import CpuClass
from edge_bundle.signing import TrustStore
from model_packager import choose, class_eval
from model_packager.class_eval import ClassPlan
from model_packager.cli import main
from tests import packaging

pytest.importorskip("optimum.exporters.onnx", reason="needs the packager role")
pytestmark = [pytest.mark.packager, pytest.mark.slow]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classes")
    keys = root / "keys"
    assert main(["keygen", "--role", "bundle", "--out", str(keys), "--name", "bundle"]) == 0
    packaging.write_images(root / "calibration", 24, seed=1)
    packaging.make_onnx_classifier(root / "model.onnx")
    (root / "model.yaml").write_text(packaging.ONNX_MODEL_CONFIG)
    text = Path("firmware_profiles/generic-x86-64-avx2.toml").read_text()
    (root / "avx2.toml").write_text(text.replace('"generic-x86-64-avx2"', '"avx2"'))
    vnni = text.replace('"generic-x86-64-avx2"', '"vnni"')
    vnni = re.sub(
        r"(?m)^features = \[.*\]$", 'features = ["avx2", "fma", "f16c", "avx_vnni"]', vnni
    )
    (root / "vnni.toml").write_text(vnni)
    arm = Path("firmware_profiles/rpi5-arm64.toml").read_text()
    (root / "arm.toml").write_text(arm.replace('name = "rpi5-arm64"', 'name = "arm"'))
    return {"root": root, "key": keys / "bundle.key", "pub": keys / "bundle.pub"}


def _build(ws: dict[str, Path], out: Path, profile: str, *extra: str) -> int:
    root = ws["root"]
    return main([
        "build", str(root / "model.onnx"), "--model-config", str(root / "model.yaml"),
        "--name", "defects", "--version", "1", "--profile", str(root / f"{profile}.toml"),
        "--key", str(ws["key"]), "--out", str(out), "--quiet", "--bench-samples", "3",
        "--calibration", str(root / "calibration"), "--quantization", "int8-static",
        "--min-speedup", "0", "--min-agreement", "0.5", "--min-top1-agreement", "0.5",
        "--min-top5-containment", "0.5", *extra,
    ])  # fmt: skip


def _pretend_host(monkeypatch: pytest.MonkeyPatch, host: CpuClass) -> None:
    monkeypatch.setattr(choose, "host_class", lambda: host)
    monkeypatch.setattr(class_eval.shutil, "which", lambda name: f"/usr/bin/{name}")


def _saturated_emulator(monkeypatch: pytest.MonkeyPatch) -> list[ClassPlan]:
    """An 'emulated AVX2' that answers with every row's classes rotated: it never agrees."""
    seen: list[ClassPlan] = []
    real = class_eval.run

    def run(plan: ClassPlan, model: Path, inputs: np.ndarray, threads: int) -> Any:
        seen.append(plan)
        if plan.how == "emulated":
            return np.roll(
                real(ClassPlan(plan.cpu_class, "native", ""), model, inputs, threads), 1, axis=1
            )
        return real(plan, model, inputs, threads)

    monkeypatch.setattr(class_eval, "run", run)
    return seen


def test_target_class_fails_while_build_class_passes_so_the_build_refuses(
    ws: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _pretend_host(monkeypatch, CpuClass.X86_VNNI)
    seen = _saturated_emulator(monkeypatch)
    assert _build(ws, tmp_path, "avx2") == 36
    err = capsys.readouterr().err
    assert "no int8-static recipe passed the gates on CPU class x86-64-avx2" in err
    assert "top1_agreement: 0.0000" in err and "--waive-gate" in err
    assert {plan.how for plan in seen} == {"emulated"}
    assert list(tmp_path.iterdir()) == []
    # Waived, the bundle records both classes and which one was judged.
    assert _build(ws, tmp_path, "avx2", "--waive-gate", "pilot, QA reviewed") == 0
    manifest = verify_bundle(tmp_path / "defects-1.bundle", TrustStore.from_files([ws["pub"]]))
    validation = manifest.validation
    assert validation is not None and validation.waived_reason == "pilot, QA reviewed"
    assert validation.judged_class == "x86-64-avx2"
    records = {r.cpu_class: r for r in validation.cpu_classes}
    assert records["x86-64-vnni"].how == "native" and all(
        g.passed for g in records["x86-64-vnni"].gates
    )
    assert records["x86-64-avx2"].how == "emulated"
    assert not all(g.passed for g in records["x86-64-avx2"].gates)
    assert manifest.quantization is not None and len(manifest.quantization.trials) == 3
    assert "x86-64-avx2" in (tmp_path / "defects-1.report.html").read_text()


def test_vnni_target_is_judged_with_exact_arithmetic_on_other_x86(
    ws: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pretend_host(monkeypatch, CpuClass.X86_AVX2)
    seen = _saturated_emulator(monkeypatch)
    assert _build(ws, tmp_path, "vnni") == 0
    manifest = verify_bundle(tmp_path / "defects-1.bundle", TrustStore.from_files([ws["pub"]]))
    assert manifest.validation is not None
    assert manifest.validation.judged_class == "x86-64-vnni"
    hows = {r.cpu_class: r.how for r in manifest.validation.cpu_classes}
    assert hows == {"x86-64-avx2": "native", "x86-64-vnni": "exact-arithmetic"}
    assert [plan.how for plan in seen] == ["exact-arithmetic"]
    assert manifest.quantization is not None and manifest.quantization.recipe is not None
    assert manifest.quantization.recipe.name == "plain"  # exact kernels take the fastest recipe
    assert manifest.reference_check is not None
    assert {e.cpu_class for e in manifest.reference_check.expected} == set(hows)


def test_a_class_that_cannot_run_here_is_recorded_not_passed(
    ws: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _pretend_host(monkeypatch, CpuClass.X86_AVX2)
    assert _build(ws, tmp_path, "arm") == 0
    manifest = verify_bundle(tmp_path / "defects-1.bundle", TrustStore.from_files([ws["pub"]]))
    assert manifest.validation is not None
    records = {r.cpu_class: r for r in manifest.validation.cpu_classes}
    assert records["arm64-dotprod"].how == "not-evaluated" and not records["arm64-dotprod"].gates
    assert manifest.validation.judged_class == "x86-64-avx2"
    assert "not evaluated on arm64-dotprod" in " ".join(manifest.extra["notes"])
    assert "arm64-dotprod: not evaluated" in capsys.readouterr().out
    assert "not evaluated" in (tmp_path / "defects-1.report.html").read_text()


@pytest.mark.skipif(shutil.which(class_eval.EMULATOR) is None, reason="needs Debian's qemu-user")
def test_emulated_avx2_runs_the_model_under_qemu(ws: dict[str, Path], tmp_path: Path) -> None:
    """The one real emulation in the suite: a tiny pair-safe model under qemu's Haswell computes
    what exact int8 arithmetic computes (pair-safe weights cannot saturate), on any x86 host."""
    from model_packager import recipes
    from model_packager.quantize import QuantizationMode, quantize_onnx

    rng = np.random.default_rng(3)
    inputs = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    model = tmp_path / "int8.onnx"
    quantize_onnx(
        ws["root"] / "model.onnx", model, QuantizationMode.INT8_STATIC,
        calibration=list(rng.normal(size=(8, 3, 32, 32)).astype(np.float32)),
        recipe=recipes.PAIR_SAFE,
    )  # fmt: skip
    plan = ClassPlan(CpuClass.X86_AVX2, "emulated", "test")
    emulated = class_eval._run_emulated(model, inputs, 1)
    exact = class_eval.run(ClassPlan(CpuClass.X86_VNNI, "exact-arithmetic", ""), model, inputs, 1)
    assert plan.how == "emulated"
    np.testing.assert_array_equal(emulated, exact)
