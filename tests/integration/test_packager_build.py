"""`model-packager build` end to end on tiny random models: every source kind, every quantization,
gates that refuse and waivers that are recorded, and bad inputs that fail with a message and leave
nothing behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from edge_bundle.bundle import verify_bundle
from edge_bundle.signing import TrustStore
from model_packager.cli import main
from tests import packaging

pytest.importorskip("optimum.exporters.onnx", reason="needs the packager role")
pytestmark = [pytest.mark.packager, pytest.mark.slow]

WAIVE = ["--waive-gate", "random test model"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packager")
    keys = root / "keys"
    assert main(["keygen", "--role", "bundle", "--out", str(keys), "--name", "bundle"]) == 0
    assert main(["keygen", "--role", "release", "--out", str(keys), "--name", "release"]) == 0
    packaging.write_images(root / "calibration", 24, seed=1)
    packaging.write_eval_set(root / "eval", per_label=6, seed=10)
    packaging.make_onnx_classifier(root / "model.onnx")
    (root / "model.yaml").write_text(packaging.ONNX_MODEL_CONFIG)
    (root / "knowledge.yaml").write_text(packaging.KNOWLEDGE)
    packaging.make_hf_vit(root / "vit")
    packaging.make_lora_adapter(root / "vit", root / "adapter")
    # A profile allowing every ONNX quantization (the shipped x86 profile refuses fp16 on CPU).
    text = Path("firmware_profiles/generic-x86-64-avx2.toml").read_text()
    text = text.replace('name = "generic-x86-64-avx2"', 'name = "test-any"')
    text = re.sub(
        r"(?m)^allowed = \[.*\]$",
        'allowed = ["int8-static", "int8-dynamic", "fp16", "none", "q4_k_m"]',
        text,
    )
    (root / "test-any.toml").write_text(text)
    return {
        "root": root,
        "key": keys / "bundle.key",
        "pub": keys / "bundle.pub",
        "release_key": keys / "release.key",
        "profile": root / "test-any.toml",
    }


def _build(ws: dict[str, Path], out: Path, *extra: str, source: str | None = None) -> int:
    root = ws["root"]
    args = [
        "build",
        source or str(root / "model.onnx"),
        "--name",
        "defects",
        "--version",
        "1",
        "--profile",
        str(ws["profile"]),
        "--key",
        str(ws["key"]),
        "--out",
        str(out),
        "--quiet",
        "--bench-samples",
        "5",
        "--calibration",
        str(root / "calibration"),
        "--eval",
        str(root / "eval"),
        "--knowledge",
        str(root / "knowledge.yaml"),
    ]
    if source is None:
        args += ["--model-config", str(root / "model.yaml")]
    return main([*args, *extra])


def _verified(ws: dict[str, Path], out: Path):  # type: ignore[no-untyped-def]
    bundle = out / "defects-1.bundle"
    return verify_bundle(bundle, TrustStore.from_files([ws["pub"]]))


@pytest.mark.parametrize("mode", ["int8-static", "int8-dynamic", "fp16", "none"])
def test_onnx_source_every_quantization(
    ws: dict[str, Path], tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _build(ws, tmp_path, "--quantization", mode, *WAIVE) == 0
    manifest = _verified(ws, tmp_path)
    assert manifest.quantization is not None and manifest.quantization.method == mode
    assert manifest.labels == packaging.LABELS
    assert manifest.preprocessing is not None and manifest.preprocessing["height"] == 32
    assert manifest.golden is not None and len(manifest.golden.samples) == 4
    assert {f.path for f in manifest.files} >= {"model.onnx", "knowledge.json", "report.html"}
    assert manifest.validation is not None
    assert {
        "top1_agreement",
        "top5_containment",
        "max_probability_difference",
        "reference_accuracy",
        "candidate_accuracy",
    } <= set(manifest.validation.metrics)
    bench = manifest.benchmarks[0]
    assert bench.p50_ms > 0 and bench.p95_ms >= bench.p50_ms and bench.machine.cores >= 1
    baseline = manifest.drift_baseline
    assert baseline is not None and set(baseline["features"]) >= {
        "brightness",
        "contrast",
        "sharpness",
    }
    report = (tmp_path / "defects-1.report.html").read_text()
    assert (
        "Confusion matrix" in report
        and "<svg" in report
        and "http" not in report.split("<body>")[1]
    )
    out = capsys.readouterr()
    assert "no knowledge base entry for label: ok" in out.err
    if mode == "none":
        assert manifest.validation.metrics["top1_agreement"] == 1.0
    if mode == "int8-static":
        assert manifest.quantization.calibration_set_sha256 is not None
        assert manifest.quantization.activation_type == "uint8"


def test_hf_checkpoint_with_and_without_lora(ws: dict[str, Path], tmp_path: Path) -> None:
    root = ws["root"]
    plain, merged = tmp_path / "plain", tmp_path / "merged"
    assert _build(ws, plain, "--quantization", "int8-static", *WAIVE, source=str(root / "vit")) == 0
    assert (
        _build(
            ws,
            merged,
            "--quantization",
            "int8-static",
            *WAIVE,
            "--adapter",
            str(root / "adapter"),
            source=str(root / "vit"),
        )
        == 0
    )
    first, second = _verified(ws, plain), _verified(ws, merged)
    assert first.lineage is not None and first.lineage.adapter_sha256 is None
    assert second.lineage is not None and second.lineage.adapter_sha256 is not None
    assert first.lineage.base_model_sha256 == second.lineage.base_model_sha256
    assert "LoRA" in (second.lineage.source or "")
    # The adapter changes the weights, so the shipped models differ.
    assert first.file("model.onnx").sha256 != second.file("model.onnx").sha256  # type: ignore[union-attr]


def test_gate_refuses_and_waiver_is_recorded(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strict = ["--quantization", "int8-dynamic", "--min-agreement", "1.01"]
    assert _build(ws, tmp_path, *strict) != 0
    err = capsys.readouterr().err
    assert "gates failed" in err and "top1_agreement" in err and "--waive-gate" in err
    assert list(tmp_path.iterdir()) == []
    assert _build(ws, tmp_path, *strict, "--waive-gate", "pilot line, reviewed by QA") == 0
    manifest = _verified(ws, tmp_path)
    assert manifest.validation is not None
    assert manifest.validation.waived_reason == "pilot line, reviewed by QA"
    assert any(not gate.passed for gate in manifest.validation.gates)
    assert "pilot line, reviewed by QA" in (tmp_path / "defects-1.report.html").read_text()


def test_inspect_readable_and_json(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _build(ws, tmp_path, "--quantization", "none", *WAIVE) == 0
    capsys.readouterr()
    bundle = str(tmp_path / "defects-1.bundle")
    assert main(["inspect", bundle, "--key", str(ws["pub"])]) == 0
    text = capsys.readouterr().out
    assert "defects@1" in text and "verified" in text and "model.onnx" in text
    assert main(["inspect", bundle, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["manifest"]["name"] == "defects" and "NOT verified" in document["status"]


def _bad(
    ws: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    *args: str,
    source: str | None = None,
    expect: str,
) -> None:
    out = tmp_path / "out"
    assert _build(ws, out, *args, source=source) != 0
    err = capsys.readouterr().err
    assert expect in err, err
    assert not out.exists() or list(out.iterdir()) == [], "a failed build left files behind"


def test_bad_sources(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ws["root"]
    _bad(ws, tmp_path, capsys, source=str(tmp_path / "missing"), expect="does not exist")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "vit", corrupt)
    (corrupt / "config.json").write_text("{not json")
    _bad(ws, tmp_path, capsys, source=str(corrupt), expect="not readable JSON")
    text_model = tmp_path / "bert"
    text_model.mkdir()
    (text_model / "config.json").write_text(
        json.dumps({"architectures": ["BertForSequenceClassification"]})
    )
    _bad(ws, tmp_path, capsys, source=str(text_model), expect="image-classification")
    pickled = tmp_path / "pickled"
    shutil.copytree(root / "vit", pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    _bad(ws, tmp_path, capsys, source=str(pickled), expect="--allow-pickle")
    broken_onnx = tmp_path / "broken.onnx"
    broken_onnx.write_bytes(b"\x08\x07garbage")
    _bad(ws, tmp_path, capsys, source=str(broken_onnx), expect="not a valid ONNX model")


def test_bad_data_and_keys(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ws["root"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(ws, tmp_path, capsys, "--calibration", str(empty), expect="holds no images")
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "calibration", mixed)
    (mixed / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    _bad(
        ws, tmp_path, capsys, "--calibration", str(mixed), expect="notes.pdf is not a usable image"
    )
    wrong_labels = tmp_path / "wrong"
    packaging.write_images(wrong_labels / "crack", 2, seed=3)
    _bad(ws, tmp_path, capsys, "--eval", str(wrong_labels), expect="are not labels of the model")
    kb = tmp_path / "kb.yaml"
    kb.write_text(packaging.KNOWLEDGE + "crack:\n  root_causes: [x]\n")
    _bad(ws, tmp_path, capsys, "--knowledge", str(kb), expect="not labels of the model")
    garbage_key = tmp_path / "garbage.key"
    garbage_key.write_text("not a key")
    _bad(ws, tmp_path, capsys, "--key", str(garbage_key), expect="garbage.key")
    _bad(ws, tmp_path, capsys, "--key", str(ws["release_key"]), expect="keygen --role bundle")


def test_existing_version_is_not_overwritten(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "defects-1.bundle").write_bytes(b"released")
    assert _build(ws, tmp_path, "--quantization", "none", *WAIVE) != 0
    assert "--version 2" in capsys.readouterr().err
    assert (tmp_path / "defects-1.bundle").read_bytes() == b"released"
