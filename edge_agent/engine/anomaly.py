"""An anomaly detector as the agent serves it: a classifier of normal / anomalous parts.

An anomaly-detection bundle (task "anomaly-detection", the packager's `build-anomaly`) is one
ONNX graph with two outputs: the image score `score` (N,) and the coarse score map `score_map`
(N, h, w), one cell per input_size / h pixels. `AnomalyDetector` is a `Classifier` whose labels
are `normal` and `anomalous`, so the core, the golden self-test, shadow runs, drift and the
updater serve it unchanged; only what differs is here:

- `infer` runs both outputs and packs them into one row per image: the score, then the map.
- `postprocess` says `anomalous` when the score is above the manifest's threshold, and finds
  the regions: the score map upsampled (bilinear) to the model's input size, the cells above the
  threshold grouped into connected components (8-neighbour), each one's box scaled to the
  ORIGINAL photo's coordinates (the preprocessing resizes the whole photo, no crop) with its
  peak score.
- Golden samples expect `[["score", s]]`: the self-test compares the score within the golden
  tolerance (score units).
- Drift: the bundle carries no input-statistics baseline, so the live scores are compared with
  the calibration (`score_drift_baseline`): below the held-out good median, between it and the
  threshold, above the threshold, in the shares calibration expects. A new lamp that makes good
  parts score higher shows up there first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import cv2
import numpy as np
from numpy.typing import NDArray

from edge_agent.engine.classifier import Classifier, Scored, load_classifier
from edge_agent.errors import InferenceError, RuntimeLoadError
from edge_agent.runtimes import runtime_for
from edge_agent.runtimes.base import TensorSession
from edge_bundle.bundle import VerifiedBundle
from edge_bundle.errors import BundleError
from edge_bundle.manifest import ANOMALY_GOLDEN_KEY, ANOMALY_LABELS, Anomaly
from edge_bundle.preprocess import load_spec
from edge_bundle.profiles import HardwareProfile

NORMAL, ANOMALOUS = ANOMALY_LABELS
TASK = "anomaly-detection"


class NamedOutputs(Protocol):
    """A session that can run named outputs (the ONNX runtime's)."""

    @property
    def output_names(self) -> tuple[str, ...]: ...

    def run_named(self, batch: NDArray[Any], names: list[str]) -> list[NDArray[np.float32]]: ...


@dataclass(frozen=True)
class Region:
    """A box of the photo where the part differs, in the photo's own pixels."""

    x: int
    y: int
    width: int
    height: int
    peak: float

    def to_json(self) -> dict[str, Any]:
        return {
            "x": self.x,
            "y": self.y,
            "width": self.width,
            "height": self.height,
            "peak": round(self.peak, 4),
        }


@dataclass(frozen=True)
class Detection:
    """What an anomaly detector found on one photo."""

    score: float
    threshold: float
    score_map: NDArray[np.float32]  # (h, w)
    regions: tuple[Region, ...]

    @property
    def verdict(self) -> str:
        return ANOMALOUS if self.score > self.threshold else NORMAL

    def to_json(self) -> dict[str, Any]:
        """The answer's anomaly fields: verdict, threshold, regions and the coarse map."""
        return {
            "score": round(self.score, 6),
            "verdict": self.verdict,
            "threshold": round(self.threshold, 6),
            "regions": [region.to_json() for region in self.regions],
            "score_map": {
                "size": list(self.score_map.shape),
                "values": np.round(self.score_map, 3).tolist(),
            },
        }


def find_regions(
    score_map: NDArray[np.float32],
    threshold: float,
    input_hw: tuple[int, int],
    image_size: tuple[int, int],
) -> tuple[Region, ...]:
    """Connected components of the map upsampled to the input size, above `threshold`, as boxes
    in a photo of `image_size` (width, height), largest peak first."""
    in_h, in_w = input_hw
    upsampled = cv2.resize(
        score_map.astype(np.float32), (in_w, in_h), interpolation=cv2.INTER_LINEAR
    )
    above = (upsampled > threshold).astype(np.uint8)
    if not above.any():
        return ()
    count, labels, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    width, height = image_size
    sx, sy = width / in_w, height / in_h
    regions = []
    for index in range(1, count):
        x, y, w, h, _area = (int(v) for v in stats[index])
        peak = float(upsampled[labels == index].max())
        left, top = math.floor(x * sx), math.floor(y * sy)
        right, bottom = min(width, math.ceil((x + w) * sx)), min(height, math.ceil((y + h) * sy))
        regions.append(Region(left, top, right - left, bottom - top, peak))
    return tuple(sorted(regions, key=lambda r: -r.peak))


def score_drift_baseline(anomaly: Anomaly) -> dict[str, Any]:
    """A drift baseline of the image score from the calibration: the shares of held-out good
    parts below their median, up to the threshold, and above it (the calibrated rate)."""
    calibration = anomaly.calibration
    rate = max(
        calibration.target_false_alarm_rate,
        calibration.false_alarms / max(calibration.held_out_good, 1),
    )
    median = min(calibration.good_score_p50, anomaly.threshold)
    return {
        "confidence": {
            "edges": [0.0, median, anomaly.threshold, math.inf],
            "fractions": [0.5, 0.5 - rate, rate],
        }
    }


@dataclass
class AnomalyDetector(Classifier):
    """A loaded anomaly-detection bundle: normal / anomalous against the manifest's threshold."""

    anomaly: Anomaly | None = None
    outputs: NamedOutputs | None = None

    @property
    def settings(self) -> Anomaly:
        assert self.anomaly is not None
        return self.anomaly

    @property
    def threshold(self) -> float:
        return self.settings.threshold

    def infer(self, tensor: NDArray[Any]) -> NDArray[np.float32]:
        """One row per image: the image score, then the score map (row-major)."""
        assert self.outputs is not None
        anomaly = self.settings
        scores, maps = self.outputs.run_named(
            tensor, [anomaly.score_output, anomaly.score_map_output]
        )
        h, w = anomaly.score_map_size
        if maps.shape[1:] != (h, w) or scores.shape != (maps.shape[0],):
            raise InferenceError(
                f"{self.bundle.bundle_id} produced a score map of {maps.shape[1:]} (expected "
                f"{(h, w)}) and scores of {scores.shape}; the bundle is inconsistent, rebuild it"
            )
        packed = np.concatenate([scores[:, None], maps.reshape(len(maps), h * w)], axis=1)
        if not np.isfinite(packed).all():
            raise InferenceError(
                f"{self.bundle.bundle_id} produced non-finite scores (NaN or infinity) for this "
                "input; the model is broken for it"
            )
        return packed

    def detection(
        self, output: NDArray[np.float32], image_size: tuple[int, int] | None
    ) -> Detection:
        anomaly = self.settings
        row = output[0]
        score_map = row[1:].reshape(anomaly.score_map_size)
        size = image_size or (anomaly.input_size[1], anomaly.input_size[0])
        regions = find_regions(score_map, anomaly.threshold, anomaly.input_size, size)
        return Detection(float(row[0]), anomaly.threshold, score_map, regions)

    def postprocess(
        self,
        probabilities: NDArray[np.float32],
        top_k: int,
        image_size: tuple[int, int] | None = None,
    ) -> Scored:
        found = self.detection(probabilities, image_size)
        verdict = found.verdict
        return Scored(verdict, found.score, ((verdict, found.score),), None, found)

    def golden_scores(self, row: NDArray[np.float32]) -> dict[str, float]:
        return {ANOMALY_GOLDEN_KEY: float(row[0])}

    def top_label(self, output: NDArray[np.float32]) -> str:
        return ANOMALOUS if float(output[0, 0]) > self.threshold else NORMAL

    def drift_baseline(self) -> dict[str, Any] | None:
        return score_drift_baseline(self.settings)

    def describe(self) -> dict[str, Any]:
        anomaly = self.settings
        return {
            **super().describe(),
            "threshold": anomaly.threshold,
            "input_size": list(anomaly.input_size),
            "score_map_size": list(anomaly.score_map_size),
        }


def load_detector(
    bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path
) -> AnomalyDetector:
    """Load an anomaly-detection bundle (runtime onnx) and check it has the outputs it names."""
    manifest = bundle.manifest
    anomaly = manifest.anomaly
    if manifest.task != TASK or anomaly is None or manifest.preprocessing is None:
        raise RuntimeLoadError(
            f"{bundle.bundle_id} is not an anomaly-detection bundle with its anomaly section; "
            "rebuild it with model-packager build-anomaly"
        )
    try:
        spec = load_spec(manifest.preprocessing)
    except BundleError as exc:
        raise RuntimeLoadError(f"{bundle.bundle_id}: {exc}") from exc
    session = runtime_for(manifest.runtime).load(bundle, profile, cache_dir)
    named = cast(NamedOutputs, session)
    wanted = {anomaly.score_output, anomaly.score_map_output}
    if not hasattr(session, "run_named") or not wanted <= set(named.output_names):
        session.close()
        raise RuntimeLoadError(
            f"{bundle.bundle_id}: the model lacks the outputs {sorted(wanted)} its manifest "
            "names; rebuild it with model-packager build-anomaly"
        )
    return AnomalyDetector(
        bundle=bundle,
        session=cast(TensorSession, session),
        spec=spec,
        labels=ANOMALY_LABELS,
        knowledge=None,
        output_kind=None,
        anomaly=anomaly,
        outputs=named,
    )


def load_served(bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path) -> Classifier:
    """The classifier or the anomaly detector a bundle is, by its task."""
    if bundle.manifest.task == TASK:
        return load_detector(bundle, profile, cache_dir)
    return load_classifier(bundle, profile, cache_dir)
