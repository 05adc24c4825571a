"""Golden samples for the device's self-test, and the drift baseline of the calibration inputs.

Golden samples are stored as PNG (lossless, so every decoder yields the same pixels), scaled so
their short side is twice the model input, and carry the top-k probabilities the *shipped* model
gives for exactly those bytes through the shared preprocessing path; the agent checks them at
every load within a stated tolerance. The drift baseline records the distribution of the
calibration inputs' statistics and of the model's confidence, for the agent to compare live
traffic against (PSI).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from edge_bundle.imaging import decode_image
from edge_bundle.manifest import Golden, GoldenSample
from edge_bundle.preprocess import PreprocessSpec, preprocess_bytes
from model_packager.datasets import ImageSample

GOLDEN_DIR = "golden"
TOP_K = 3
DRIFT_FEATURES = ("brightness", "contrast", "sharpness", "width", "height")
DRIFT_BINS = 10


@dataclass(frozen=True)
class GoldenFile:
    arcname: str
    data: bytes


def choose_golden(probabilities: NDArray[np.float32], count: int) -> list[int]:
    """Indices of up to `count` inputs: the most confident one of each predicted class first."""
    top1 = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    chosen: list[int] = []
    seen: set[int] = set()
    for index in order:
        if int(top1[index]) not in seen:
            chosen.append(int(index))
            seen.add(int(top1[index]))
        if len(chosen) == count:
            return chosen
    chosen += [int(i) for i in order if int(i) not in chosen][: count - len(chosen)]
    return chosen


def golden_files(samples: Sequence[ImageSample], spec: PreprocessSpec) -> list[GoldenFile]:
    """The chosen samples re-encoded as PNG at a modest size."""
    files = []
    for number, sample in enumerate(samples):
        decoded = decode_image(sample.path.read_bytes())
        pixels = _shrink(decoded.pixels, spec)
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"could not encode golden sample {sample.path} as PNG")
        files.append(GoldenFile(f"{GOLDEN_DIR}/{number:02d}.png", encoded.tobytes()))
    return files


def golden_record(
    files: Sequence[GoldenFile],
    spec: PreprocessSpec,
    predict: Callable[[NDArray[Any]], NDArray[np.float32]],
    labels: Sequence[str],
    tolerance: float,
) -> Golden:
    """Expected top-k of the shipped model for each golden file's exact bytes."""
    samples = []
    for file in files:
        probabilities = predict(preprocess_bytes(file.data, spec))[0]
        top = np.argsort(-probabilities)[: min(TOP_K, len(labels))]
        expected = tuple((labels[int(i)], round(float(probabilities[i]), 6)) for i in top)
        samples.append(GoldenSample(input_path=file.arcname, expected_topk=expected))
    return Golden(tolerance=tolerance, samples=tuple(samples))


def drift_baseline(
    samples: Sequence[ImageSample], probabilities: NDArray[np.float32]
) -> dict[str, Any]:
    """Decile bins of each input statistic and a fixed-bin histogram of top-1 confidence."""
    features = {}
    for name in DRIFT_FEATURES:
        values = np.array([float(sample.stats[name]) for sample in samples])  # type: ignore[literal-required]
        features[name] = _quantile_bins(values)
    confidence = probabilities.max(axis=1)
    edges = np.linspace(0.0, 1.0, DRIFT_BINS + 1)
    counts, _ = np.histogram(confidence, bins=edges)
    return {
        "method": "psi",
        "samples": len(samples),
        "features": features,
        "confidence": {
            "edges": [round(float(e), 6) for e in edges],
            "fractions": _fractions(counts),
            "mean": round(float(confidence.mean()), 6),
        },
    }


def _quantile_bins(values: NDArray[np.float64]) -> dict[str, Any]:
    inner = np.unique(np.quantile(values, np.linspace(0, 1, DRIFT_BINS + 1)[1:-1]))
    edges = [-np.inf, *inner.tolist(), np.inf]
    counts, _ = np.histogram(values, bins=edges)
    return {
        # JSON has no infinity: the open ends are implied, only the inner cut points are stored.
        "cuts": [round(float(e), 6) for e in inner],
        "fractions": _fractions(counts),
        "mean": round(float(values.mean()), 6),
        "std": round(float(values.std()), 6),
    }


def _fractions(counts: NDArray[np.int64]) -> list[float]:
    total = max(int(counts.sum()), 1)
    return [round(int(c) / total, 6) for c in counts]


def _shrink(pixels: NDArray[np.uint8], spec: PreprocessSpec) -> NDArray[np.uint8]:
    target = spec.decode_target()
    if target is None:
        return pixels
    short = min(pixels.shape[:2])
    wanted = 2 * max(target)
    if short <= wanted:
        return pixels
    scale = wanted / short
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    return np.asarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def write_golden(files: Sequence[GoldenFile], root: Path) -> dict[str, Path]:
    """Write golden files under `root`; return arcname -> path for the bundle writer."""
    written = {}
    for file in files:
        path = root / file.arcname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(file.data)
        written[file.arcname] = path
    return written
