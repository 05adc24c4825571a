"""The threshold and the figures that judge an anomaly model.

Threshold: the (1 - target) quantile of the held-out good images' reference scores (numpy's
"higher" method, so at least (1 - target) of them score at or below it; with fewer than
1 / target images this is their maximum). An image is anomalous when its score is above the
threshold. Its uncertainty is the Clopper-Pearson interval of the false-alarm rate given the
alarms counted on the held-out images: with 20 held out and none above, the true rate may still
be up to 17 % (95 %). With labelled defects: image AUROC (Mann-Whitney), recall per defect type
at the threshold, and with masks, the share of defective images whose score map peaks on a cell
that overlaps the drawn mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

CONFIDENCE = 0.95


def threshold_for(good_scores: NDArray[np.float64], target: float) -> float:
    """The threshold that keeps the held-out false-alarm rate at or under `target`."""
    return float(np.quantile(good_scores, 1.0 - target, method="higher"))


def clopper_pearson(hits: int, count: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact binomial interval of a rate observed as `hits` of `count`."""
    alpha = 1.0 - confidence
    low = 0.0 if hits == 0 else _beta_quantile(alpha / 2, hits, count - hits + 1)
    high = 1.0 if hits == count else _beta_quantile(1 - alpha / 2, hits + 1, count - hits)
    return low, high


def auroc(
    good: Sequence[float] | NDArray[np.floating], bad: Sequence[float] | NDArray[np.floating]
) -> float:
    """P(a defective image scores above a good one), ties counted half."""
    good_arr, bad_arr = np.asarray(good, np.float64), np.asarray(bad, np.float64)
    above = (bad_arr[:, None] > good_arr[None, :]).sum()
    ties = (bad_arr[:, None] == good_arr[None, :]).sum()
    return float((above + 0.5 * ties) / (len(good_arr) * len(bad_arr)))


def peak_on_mask(score_map: NDArray[np.floating], mask: NDArray[np.bool_]) -> bool:
    """Whether the map's highest cell covers any pixel of `mask` (the map spans the image)."""
    rows, cols = score_map.shape
    row, col = np.unravel_index(int(np.argmax(score_map)), score_map.shape)
    height, width = mask.shape
    top, bottom = row * height // rows, -(-(row + 1) * height // rows)
    left, right = col * width // cols, -(-(col + 1) * width // cols)
    return bool(mask[top:bottom, left:right].any())


def _beta_quantile(p: float, a: int, b: int) -> float:
    """The p-quantile of Beta(a, b), by bisection on its CDF."""
    low, high = 0.0, 1.0
    for _ in range(80):
        middle = (low + high) / 2
        if _beta_cdf(middle, a, b) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _beta_cdf(x: float, a: int, b: int) -> float:
    """The regularized incomplete beta function for integer-valued a, b (a binomial tail)."""
    # I_x(a, b) = P(Binomial(a + b - 1, x) >= a) for integer a, b.
    n = a + b - 1
    k = a
    return sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(k, n + 1))
