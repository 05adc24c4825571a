"""PatchCore's arithmetic, in numpy: the reference the exported graph is gated against.

Feature maps (N, C, h, w) from a backbone are aggregated over each patch's 3x3 neighbourhood
(average pooling, stride 1, edges averaged over the cells that exist, as ONNX's AveragePool with
count_include_pad=0 does), flattened to patches (N*h*w, C), subsampled to a memory bank by greedy
k-centre selection (on a random projection, for speed), and scored by the Euclidean distance of
each patch to its nearest bank entry: a score map per image and its maximum as the image score.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

PROJECTION_DIM = 128
_CHUNK = 4096

Floats = NDArray[np.float32]


def aggregate(features: NDArray[np.floating]) -> Floats:
    """3x3 average pooling of (N, C, h, w) maps, stride 1, padding excluded from the mean."""
    maps = np.asarray(features, np.float64)
    _, _, height, width = maps.shape
    padded = np.pad(maps, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ones = np.pad(np.ones((height, width)), 1)
    total = np.zeros_like(maps)
    count = np.zeros((height, width))
    for dy in range(3):
        for dx in range(3):
            total += padded[:, :, dy : dy + height, dx : dx + width]
            count += ones[dy : dy + height, dx : dx + width]
    return (total / count).astype(np.float32)


def patches(aggregated: Floats) -> Floats:
    """(N, C, h, w) -> (N, h*w, C): one row per patch, in the map's row-major order."""
    count, channels = aggregated.shape[:2]
    return np.ascontiguousarray(aggregated.reshape(count, channels, -1).transpose(0, 2, 1))


def greedy_coreset(
    candidates: Floats,
    size: int,
    *,
    seed: int = 0,
    existing: Floats | None = None,
    projection_dim: int = PROJECTION_DIM,
) -> NDArray[np.int64]:
    """Indices of `size` rows of `candidates` (P, C) chosen by greedy k-centre selection: each
    pick is the candidate farthest from everything chosen so far (and from `existing`, a bank
    being extended). Distances are taken on a random Gaussian projection to `projection_dim`
    dimensions, which keeps them within a small factor (Johnson-Lindenstrauss) at a fraction of
    the cost."""
    count, dim = candidates.shape
    size = min(size, count)
    rng = np.random.default_rng(seed)
    projection = _projection(dim, projection_dim, rng)
    points = candidates @ projection
    norms = np.einsum("ij,ij->i", points, points)
    chosen: list[int] = []
    if existing is not None and len(existing):
        nearest = _min_sq_distances(points, norms, existing @ projection)
    else:
        first = int(rng.integers(count))
        chosen.append(first)
        nearest = _sq_to(points, norms, points[first])
        size -= 1
    for _ in range(size):
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, _sq_to(points, norms, points[pick]))
    return np.array(chosen, np.int64)


def nearest_distances(patch_rows: Floats, bank: Floats) -> NDArray[np.float64]:
    """Distance of each patch row (..., C) to its nearest bank row (M, C), in float64."""
    flat = np.asarray(patch_rows, np.float64).reshape(-1, patch_rows.shape[-1])
    bank64 = np.asarray(bank, np.float64)
    bank_norms = np.einsum("ij,ij->i", bank64, bank64)
    out = np.empty(len(flat))
    for start in range(0, len(flat), _CHUNK):
        rows = flat[start : start + _CHUNK]
        squared = (
            np.einsum("ij,ij->i", rows, rows)[:, None] - 2 * rows @ bank64.T + bank_norms[None, :]
        )
        out[start : start + len(rows)] = np.sqrt(np.maximum(squared.min(axis=1), 0.0))
    return out.reshape(patch_rows.shape[:-1])


def score_maps(patch_rows: Floats, bank: Floats, map_hw: tuple[int, int]) -> NDArray[np.float64]:
    """(N, h*w, C) patches -> (N, h, w) score maps."""
    return nearest_distances(patch_rows, bank).reshape(len(patch_rows), *map_hw)


def image_scores(maps: NDArray[np.float64]) -> NDArray[np.float64]:
    """The image score: the highest patch score of each map."""
    return np.asarray(maps.reshape(len(maps), -1).max(axis=1))


def _projection(dim: int, target: int, rng: np.random.Generator) -> Floats:
    if dim <= target:
        return np.asarray(np.eye(dim), np.float32)
    scale = 1.0 / np.sqrt(target)
    return np.asarray(rng.standard_normal((dim, target)) * scale, np.float32)


def _sq_to(points: Floats, norms: Floats, point: Floats) -> Floats:
    return np.asarray(norms - 2 * (points @ point) + float(point @ point), np.float32)


def _min_sq_distances(points: Floats, norms: Floats, others: Floats) -> Floats:
    other_norms = np.einsum("ij,ij->i", others, others)
    out = np.empty(len(points), np.float32)
    for start in range(0, len(points), _CHUNK):
        block = points[start : start + _CHUNK]
        squared = norms[start : start + _CHUNK, None] - 2 * block @ others.T + other_norms[None]
        out[start : start + len(block)] = squared.min(axis=1)
    return out
