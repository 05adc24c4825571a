"""Drift: live traffic compared with the inputs the bundle was calibrated on.

The packager records, in the manifest's `drift_baseline`, decile bins of each input statistic
(brightness, contrast, sharpness, width, height) and a histogram of the model's top-1 confidence
over its calibration images. The agent bins the same statistics of recent live requests (a
rolling window) the same way and scores each with the population stability index,
PSI = sum((live - base) * ln(live / base)) over the bins. The drift score is the largest PSI;
by common practice below 0.1 is stable, 0.1-0.25 a shift worth watching, above 0.25 a real
change (`drift_alert_psi`). Statistics are computed off the request path.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any

import numpy as np

from edge_bundle.preprocess import InputStatistics

FEATURES = ("brightness", "contrast", "sharpness", "width", "height")
EPSILON = 1e-4  # a floor for empty bins, so ln() stays finite


def psi(base: list[float], live: list[float]) -> float:
    total = 0.0
    for expected, observed in zip(base, live, strict=True):
        expected, observed = max(expected, EPSILON), max(observed, EPSILON)
        total += (observed - expected) * math.log(observed / expected)
    return total


class DriftMonitor:
    """Rolling live statistics of one model version against its baseline."""

    def __init__(self, baseline: dict[str, Any], *, window: int, min_samples: int) -> None:
        self.baseline = baseline
        self.min_samples = min_samples
        self._values: dict[str, deque[float]] = {
            name: deque(maxlen=window) for name in (*FEATURES, "confidence")
        }
        self._lock = threading.Lock()

    def observe(self, stats: InputStatistics, confidence: float) -> None:
        with self._lock:
            for name in FEATURES:
                self._values[name].append(float(stats[name]))  # type: ignore[literal-required]
            self._values["confidence"].append(float(confidence))

    def scores(self) -> dict[str, Any] | None:
        """PSI per feature and for confidence, and the overall score; None before min_samples."""
        with self._lock:
            samples = len(self._values["confidence"])
            if samples < self.min_samples:
                return None
            values = {name: np.array(list(window)) for name, window in self._values.items()}
        per_feature: dict[str, float] = {}
        for name, bins in self.baseline.get("features", {}).items():
            if name not in values:
                continue
            edges = [-np.inf, *bins["cuts"], np.inf]
            per_feature[name] = round(psi(bins["fractions"], _fractions(values[name], edges)), 4)
        confidence = self.baseline.get("confidence")
        if confidence is not None:
            per_feature["confidence"] = round(
                psi(confidence["fractions"], _fractions(values["confidence"], confidence["edges"])),
                4,
            )
        score = max(per_feature.values(), default=0.0)
        return {"score": score, "psi": per_feature, "samples": samples}


def _fractions(values: np.ndarray, edges: list[float]) -> list[float]:
    counts, _ = np.histogram(values, bins=np.asarray(edges, dtype=np.float64))
    total = max(int(counts.sum()), 1)
    return [int(c) / total for c in counts]
