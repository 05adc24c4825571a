"""Model outputs -> class probabilities, the same way on the packager and on the device.

A classifier's first output is either logits or probabilities (a model that ends in a softmax).
The packager records which in the manifest (`extra.output_kind`); golden samples, validation and
the agent's answers all go through `to_probabilities`, so they agree to the last bit.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray

#: Rows whose values lie in [0, 1] and sum to 1 within this tolerance are taken as probabilities.
PROBABILITY_SUM_TOLERANCE = 1e-3

OutputKind = Literal["logits", "probabilities"]


def looks_like_probabilities(scores: NDArray[np.floating]) -> bool:
    """True when every row is already a probability distribution."""
    if scores.size == 0 or scores.min() < 0.0 or scores.max() > 1.0:
        return False
    sums = scores.sum(axis=-1)
    return bool(np.all(np.abs(sums - 1.0) <= PROBABILITY_SUM_TOLERANCE))


def softmax(scores: NDArray[np.floating]) -> NDArray[np.float32]:
    """Row-wise softmax, computed stably in float64 and returned as float32."""
    shifted = scores.astype(np.float64) - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True), dtype=np.float32)


def to_probabilities(
    scores: NDArray[np.floating], kind: OutputKind | None = None
) -> NDArray[np.float32]:
    """Probabilities (N, classes) from a model's first output; `kind` None means detect per call."""
    flat = np.asarray(scores, dtype=np.float32).reshape(scores.shape[0], -1)
    if kind == "probabilities" or (kind is None and looks_like_probabilities(flat)):
        return flat
    return softmax(flat)
