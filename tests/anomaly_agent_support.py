"""Anomaly bundles for the agent's tests: a small one built by the real packager (14 good
synthetic parts at 128 px, the pretrained EfficientNet-Lite0; a few seconds), its update with
more good parts, and a classifier that always says "ok" to chain it in front of.

The classifier is tests/agent_support's tiny one with a bias towards "ok": whatever the photo,
it calls the part good, as a classifier trained on last year's defects does with a new one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_packager.cli import main as packager
from tests.agent_support import LABELS, SIDE, BuiltBundle, Keys, build_bundle
from tests.anomaly_parts import write_photos

PROFILE = "generic-x86-64-avx2"
GOOD_SEED, MORE_SEED = 31, 32
GOOD = 14


def build_anomaly(root: Path, keys: Keys, *, name: str = "surface-ad") -> Path:
    """`model-packager build-anomaly` on GOOD good parts at 128 px: NAME-1.bundle."""
    write_photos(root / "good", GOOD_SEED, "ok", GOOD)
    code = packager(
        ["build-anomaly", "--good", str(root / "good"), "--name", name, "--profile", PROFILE,
         "--key", str(keys.private), "--out", str(root / "out"), "--input-size", "128",
         "--bench-samples", "3", "--quiet"]
    )  # fmt: skip
    assert code == 0
    return root / "out" / f"{name}-1.bundle"


def update_anomaly(root: Path, keys: Keys, old: Path, count: int = 8) -> Path:
    """`build-anomaly --update OLD --good MORE`: the next version."""
    write_photos(root / "more", MORE_SEED, "ok", count)
    code = packager(
        ["build-anomaly", "--update", str(old), "--good", str(root / "more"), "--profile",
         PROFILE, "--key", str(keys.private), "--out", str(root / "out"), "--bench-samples", "3",
         "--quiet"]
    )  # fmt: skip
    assert code == 0
    bundles = sorted((root / "out").glob("*.bundle"), key=lambda p: p.stat().st_mtime)
    return bundles[-1]


def says_ok(path: Path, seed: int) -> Path:
    """A tiny classifier whose logits favour "ok" by a wide margin, whatever the photo."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((4, 3, 3, 3)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((len(LABELS), 4)) * 0.1).astype(np.float32)
    bias = np.array([6.0] + [0.0] * (len(LABELS) - 1), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("GlobalAveragePool", ["h"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "w2", "b"], ["logits"], transB=1),
        ],
        "says-ok",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (bias, "b"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def build_chained_classifier(
    out: Path, keys: Keys, *, gate: str | None = "surface-ad", name: str = "defects"
) -> BuiltBundle:
    """The "ok"-saying classifier, its manifest naming `gate` as its anomaly gate."""
    return build_bundle(out, keys, name=name, model_builder=says_ok, anomaly_gate=gate)
