"""The anomaly section of the manifest and its rules, the threshold's uncertainty, PatchCore's
arithmetic against a direct computation, and the ONNX head against the numpy reference."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from edge_bundle.errors import ManifestError
from edge_bundle.manifest import ManifestBody
from model_packager.anomaly import calibrate, gate, patchcore


def _anomaly() -> dict[str, Any]:
    return {
        "backbone": "efficientnet-lite0",
        "backbone_sha256": "a" * 64,
        "feature_layers": ["blocks.4", "blocks.10"],
        "input_size": [128, 128],
        "score_map_size": [16, 16],
        "threshold": 40.0,
        "memory_bank": {
            "precision": "float16",
            "size": 100,
            "dim": 152,
            "patches_seen": 1000,
            "images": 10,
        },
        "calibration": {
            "target_false_alarm_rate": 0.01,
            "held_out_good": 20,
            "false_alarms": 0,
            "false_alarm_interval": [0.0, 0.168],
            "good_score_p50": 30.0,
            "good_score_max": 40.0,
        },
        "parity_tolerance": 0.005,
        "parity_max_difference": 0.0001,
    }


def _body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "parts",
        "version": 1,
        "created_at": datetime.now(UTC),
        "task": "anomaly-detection",
        "runtime": "onnx",
        "preprocessing": {"resize": "exact", "height": 128, "width": 128},
        "labels": ["normal", "anomalous"],
        "golden": {
            "tolerance": 0.2,
            "samples": [{"input_path": "golden/00.png", "expected_topk": [["score", 31.5]]}],
        },
        "anomaly": _anomaly(),
    }
    body.update(changes)
    return body


def test_an_anomaly_manifest_validates() -> None:
    body = ManifestBody.from_data(_body())
    assert body.anomaly is not None and body.anomaly.memory_bank.precision == "float16"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"anomaly": None}, "has an 'anomaly' section"),
        ({"task": "image-classification"}, "has an 'anomaly' section"),
        ({"runtime": "llama"}, "runs on runtime 'onnx'"),
        ({"preprocessing": None}, "needs its preprocessing"),
        ({"labels": ["ok", "bad"]}, "labels are"),
        (
            {
                "golden": {
                    "tolerance": 0.1,
                    "samples": [{"input_path": "g.png", "expected_topk": [["ok", 0.9]]}],
                }
            },
            "exactly one ('score', value)",
        ),
        ({"anomaly": {**_anomaly(), "score_map_size": [256, 16]}}, "cannot exceed input_size"),
        (
            {
                "anomaly": {
                    **_anomaly(),
                    "calibration": {**_anomaly()["calibration"], "false_alarms": 30},
                }
            },
            "cannot exceed held_out_good",
        ),
    ],
)
def test_anomaly_rules(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ManifestBody.from_data(_body(**changes))


def test_clopper_pearson_matches_known_values() -> None:
    low, high = calibrate.clopper_pearson(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1684, abs=1e-4)
    low, high = calibrate.clopper_pearson(2, 50)
    assert low == pytest.approx(0.00489, abs=1e-4) and high == pytest.approx(0.13714, abs=1e-4)


def test_the_threshold_keeps_the_target_on_held_out_scores() -> None:
    scores = np.arange(1, 201, dtype=np.float64)
    threshold = calibrate.threshold_for(scores, 0.05)
    assert np.mean(scores > threshold) <= 0.05
    assert calibrate.threshold_for(scores[:20], 0.01) == 20


def test_nearest_distances_and_coreset() -> None:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((50, 8)).astype(np.float32)
    rows = rng.standard_normal((3, 10, 8)).astype(np.float32)
    direct = np.sqrt(((rows[..., None, :] - bank) ** 2).sum(-1)).min(-1)
    assert np.allclose(patchcore.nearest_distances(rows, bank), direct, atol=1e-6)
    chosen = patchcore.greedy_coreset(bank, 10, seed=1)
    assert len(set(chosen.tolist())) == 10
    extra = patchcore.greedy_coreset(bank, 5, existing=bank[chosen])
    assert not set(extra.tolist()) & set(chosen.tolist())


def test_the_parity_gate_counts_order_and_verdicts() -> None:
    reference = np.array([10.0, 20.0, 30.0, 41.0])
    assert gate.compare(reference, reference + 0.01, 40.0, 0.005).passed
    swapped = gate.compare(reference, np.array([10.0, 30.0, 20.0, 41.0]), 40.0, 0.005)
    assert swapped.swapped_pairs == 1 and not swapped.passed
    flipped = gate.compare(reference, np.array([10.0, 20.0, 30.0, 39.0]), 40.0, 0.01)
    assert flipped.flipped_verdicts == 1 and not flipped.passed


def test_the_int8_record_needs_int8_asked_for() -> None:
    from pydantic import ValidationError

    from edge_bundle.manifest import AnomalyQuantization
    from model_packager.anomaly import int8

    assert int8.not_requested().backbone == "float32"
    with pytest.raises(ValidationError, match="needs --quantization int8 or auto"):
        AnomalyQuantization(backbone="int8", requested="none", reason="x")
