"""The agent's side of anomaly bundles, without a model (issue 20): the chained label, regions
in the photo's own pixels, the score's drift baseline, the heatmap overlay, the manifest's
`anomaly_gate` (absent from earlier manifests byte-for-byte), `--anomaly-gate` and the
`anomaly_gates` setting."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import cv2
import numpy as np
import pytest

from edge_agent.engine.anomaly import find_regions
from edge_agent.engine.chain import UNKNOWN_DEFECT, ChainPolicy, chained_label
from edge_agent.engine.drift import DriftMonitor
from edge_agent.engine.heatmap import render_heatmap
from edge_agent.settings import AgentSettings
from edge_bundle.manifest import FileEntry, Manifest, ManifestBody
from model_packager.cli import build_parser

POLICY = ChainPolicy(good_labels=("ok",), min_confidence=0.6)


@pytest.mark.parametrize(
    ("label", "score", "verdict", "answer"),
    [
        ("ok", 0.99, "anomalous", UNKNOWN_DEFECT),  # the classifier calls a new defect ok
        ("scratch", 0.4, "anomalous", UNKNOWN_DEFECT),  # unsure
        ("scratch", 0.9, "anomalous", "scratch"),  # a known defect, named
        ("ok", 0.99, "normal", "ok"),  # a normal part is answered as the classifier says
        ("scratch", 0.3, "normal", "scratch"),
    ],
)
def test_chained_label(label: str, score: float, verdict: str, answer: str) -> None:
    assert chained_label(POLICY, label, score, verdict) == answer


def test_regions_are_connected_cells_above_threshold_in_the_photos_pixels() -> None:
    score_map = np.ones((8, 8), np.float32)
    score_map[1:3, 1:3] = 5.0  # one blob, top left
    score_map[6, 6] = 4.0  # another, bottom right
    regions = find_regions(score_map, 2.0, (64, 64), (640, 320))
    assert len(regions) == 2
    first, second = regions
    assert first.peak == pytest.approx(5.0) and second.peak < first.peak
    # cells 1..2 of 8 over 640 x 320: x around 80..240, y around 40..120 (bilinear spreads a bit)
    assert 40 <= first.x <= 100 and first.x + first.width <= 280
    assert 20 <= first.y <= 50 and first.y + first.height <= 140
    assert second.x >= 400 and second.y >= 200
    assert find_regions(score_map, 9.0, (64, 64), (640, 320)) == ()


def test_drift_of_the_score_against_the_calibration() -> None:
    from edge_agent.engine.anomaly import score_drift_baseline
    from edge_bundle.manifest import AnomalyCalibration

    class _Anomaly:
        threshold = 10.0
        calibration = AnomalyCalibration(
            target_false_alarm_rate=0.01,
            held_out_good=20,
            false_alarms=0,
            false_alarm_interval=(0.0, 0.17),
            good_score_p50=6.0,
            good_score_max=9.5,
        )

    baseline = score_drift_baseline(_Anomaly())  # type: ignore[arg-type]
    assert baseline["confidence"]["edges"] == [0.0, 6.0, 10.0, math.inf]

    def psi(scores: list[float]) -> float:
        monitor = DriftMonitor(baseline, window=100, min_samples=5)
        stats = {"brightness": 0, "contrast": 0, "sharpness": 0, "width": 1, "height": 1}
        for score in scores:
            monitor.observe(stats, score)  # type: ignore[arg-type]
        result = monitor.scores()
        assert result is not None
        return float(result["psi"]["confidence"])

    assert psi([5.0, 7.0, 5.5, 8.0, 4.0, 7.5, 5.0, 8.5, 5.9, 6.5]) < 0.1  # as calibrated
    assert psi([11.0, 12.0, 8.0, 13.0, 11.5, 10.5, 9.0, 12.5, 11.0, 10.2]) > 0.25  # a new lamp


def test_heatmap_overlay_has_the_photos_size_and_outlines_its_regions() -> None:
    photo = np.full((90, 120, 3), 128, np.uint8)
    score_map = np.zeros((4, 4), np.float32)
    score_map[0, 0] = 3.0
    regions = [{"x": 0, "y": 0, "width": 30, "height": 20, "peak": 3.0}]
    png = render_heatmap(photo, score_map, 1.0, regions, (120, 90))
    overlay = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (90, 120, 3)
    assert (overlay[0, 10] == 255).all()  # the outline
    assert not (overlay[60, 100] == 255).all()


def _manifest(**extra: object) -> Manifest:
    body = ManifestBody(
        name="defects",
        version=1,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
        task="image-classification",
        runtime="onnx",
        **extra,  # type: ignore[arg-type]
    )
    return Manifest.from_body(
        body, (FileEntry(path="model.onnx", sha256="0" * 64, size=1, role="model"),)
    )


def test_the_manifest_names_the_gate_and_earlier_manifests_stay_as_they_were() -> None:
    assert b"anomaly_gate" not in _manifest().to_bytes()
    gated = _manifest(anomaly_gate="surface-ad")
    assert Manifest.from_bytes(gated.to_bytes()).anomaly_gate == "surface-ad"


def test_build_takes_anomaly_gate_and_the_setting_overrides_per_station() -> None:
    args = build_parser().parse_args(
        ["build", "m.onnx", "--name", "defects", "--version", "1", "--profile", "p", "--key",
         "k", "--out", "o", "--anomaly-gate", "surface-ad"]
    )  # fmt: skip
    assert args.anomaly_gate == "surface-ad"
    settings = AgentSettings(anomaly_gates={"defects": "surface-ad", "welds": ""})
    assert settings.anomaly_gates["welds"] == ""
    with pytest.raises(ValueError, match="not a model name"):
        AgentSettings(anomaly_gates={"defects": "bad name!"})
