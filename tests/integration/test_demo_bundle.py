"""The committed demo bundle (demo/bundle/defects-1.bundle, rebuilt by demo/rebuild-bundle): it
verifies with the committed public key, carries the five demo labels with a knowledge-base entry
for each, and its int8 model classifies fresh synthetic photos — drawn by demo/make_demo.py with a
seed that training, calibration and evaluation never used — through the device's decode and
preprocessing path, at >= 90% accuracy."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from edge_bundle.bundle import VerifiedBundle, open_bundle, verify_bundle
from edge_bundle.knowledge import KnowledgeBase
from edge_bundle.preprocess import load_spec, preprocess_bytes
from edge_bundle.signing import TrustStore

ort = pytest.importorskip("onnxruntime", reason="install the device role: scripts/install")

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "demo" / "bundle" / "defects-1.bundle"
PUBLIC_KEY = ROOT / "demo" / "keys" / "demo.pub"
LABELS = ("ok", "scratch", "crack", "pit", "stain")
TEST_SEED = 5  # make_demo draws training, validation, calibration and eval photos with seeds 1-4
PER_LABEL = 20  # 100 photos: drawing them takes most of the ~20 s

pytestmark = pytest.mark.skipif(
    not BUNDLE.is_file() or not PUBLIC_KEY.is_file(),
    reason="the demo bundle is not in this checkout: run demo/rebuild-bundle",
)


def _make_demo() -> ModuleType:
    """demo/make_demo.py as a module (demo/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("make_demo", ROOT / "demo" / "make_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_demo", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VerifiedBundle]:
    verified = open_bundle(
        BUNDLE, TrustStore.from_files([PUBLIC_KEY]), tmp_path_factory.mktemp("demo-bundle")
    )
    yield verified
    verified.discard()


def test_committed_bundle_verifies_with_committed_key() -> None:
    manifest = verify_bundle(BUNDLE, TrustStore.from_files([PUBLIC_KEY]))
    assert manifest.name == "defects" and manifest.version == 1
    assert manifest.quantization is not None and manifest.quantization.method == "int8-static"
    assert manifest.validation is not None and manifest.validation.waived_reason is None
    assert all(gate.passed for gate in manifest.validation.gates)


def test_labels_and_knowledge(bundle: VerifiedBundle) -> None:
    manifest = bundle.manifest
    assert manifest.labels == LABELS
    assert manifest.knowledge_path is not None
    knowledge = KnowledgeBase.from_bytes(bundle.path(manifest.knowledge_path).read_bytes())
    for label in LABELS:
        entry = knowledge.entry(label)
        assert entry is not None, f"no knowledge-base entry for {label!r}"
        assert entry.title and entry.corrective_actions
        assert label == "ok" or entry.root_causes


@pytest.mark.slow
def test_classifies_fresh_synthetic_photos(bundle: VerifiedBundle) -> None:
    make_demo = _make_demo()
    assert tuple(make_demo.LABELS) == LABELS
    manifest = bundle.manifest
    assert manifest.preprocessing is not None
    spec = load_spec(manifest.preprocessing)
    model = next(entry for entry in manifest.files if entry.role == "model")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        str(bundle.path(model.path)), options, providers=["CPUExecutionProvider"]
    )
    confusion = np.zeros((len(LABELS), len(LABELS)), np.int64)
    for label in range(len(LABELS)):
        for index in range(PER_LABEL):
            photo = make_demo.seeded_photo(TEST_SEED, label, index)
            tensor = preprocess_bytes(photo, spec)
            logits = session.run(None, {session.get_inputs()[0].name: tensor})[0]
            confusion[label, int(np.argmax(logits[0]))] += 1
    accuracy = np.trace(confusion) / confusion.sum()
    assert accuracy >= 0.90, f"accuracy {accuracy:.1%}; confusion (rows: truth):\n{confusion}"
