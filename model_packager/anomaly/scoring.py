"""Patch features and scores for a list of photos: the reference (backbone + numpy) and the
bundle's (ONNX Runtime on the shipped graph), batched so memory stays flat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_packager.anomaly import patchcore
from model_packager.anomaly.graph import PATCH_FEATURES, SCORE, SCORE_MAP

BATCH = 16
FeatureMaps = Callable[[NDArray[np.float32]], NDArray[np.float32]]


def patch_rows(
    features: FeatureMaps, tensors: NDArray[np.float32]
) -> tuple[NDArray[np.float32], tuple[int, int]]:
    """Aggregated patch features (N, h*w, C) of `tensors` (N, 3, H, W), and the map size."""
    rows, map_hw = [], (0, 0)
    for start in range(0, len(tensors), BATCH):
        aggregated = patchcore.aggregate(features(tensors[start : start + BATCH]))
        map_hw = (aggregated.shape[2], aggregated.shape[3])
        rows.append(patchcore.patches(aggregated))
    return np.concatenate(rows), map_hw


def bundle_scores(
    session: Any, tensors: NDArray[np.float32]
) -> tuple[NDArray[np.float64], NDArray[np.float32]]:
    """The shipped graph's image scores (N,) and score maps (N, h, w)."""
    name = session.get_inputs()[0].name
    scores, maps = [], []
    for start in range(0, len(tensors), BATCH):
        score, score_map = session.run([SCORE, SCORE_MAP], {name: tensors[start : start + BATCH]})
        scores.append(np.asarray(score, np.float64))
        maps.append(np.asarray(score_map, np.float32))
    return np.concatenate(scores), np.concatenate(maps)


def onnx_patch_rows(
    session: Any, tensors: NDArray[np.float32]
) -> tuple[NDArray[np.float32], tuple[int, int]]:
    """Aggregated patch features (N, h*w, C) as the shipped graph computes them."""
    name = session.get_inputs()[0].name
    rows, map_hw = [], (0, 0)
    for start in range(0, len(tensors), BATCH):
        (aggregated,) = session.run([PATCH_FEATURES], {name: tensors[start : start + BATCH]})
        map_hw = (aggregated.shape[2], aggregated.shape[3])
        rows.append(patchcore.patches(np.asarray(aggregated, np.float32)))
    return np.concatenate(rows), map_hw
