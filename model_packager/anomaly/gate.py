"""The parity gate of an anomaly bundle, and the memory bank precision chosen by it.

The bundle's scores (ONNX Runtime, the shipped graph) are compared with the reference scorer's
(the backbone in torch, PatchCore's arithmetic in float64 numpy) on the same inputs: the golden
and validation images. It passes when every image score is within `tolerance` x threshold of
the reference, every pair of images the reference tells apart by more than twice that keeps its
order, and no image the reference puts clearly on one side of the threshold changes side.
Otherwise the build is refused and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from model_packager.errors import GateError


@dataclass(frozen=True)
class Parity:
    """How far the bundle's image scores are from the reference's, relative to the threshold."""

    count: int
    max_difference: float  # max |bundle - reference| / threshold
    swapped_pairs: int
    flipped_verdicts: int
    tolerance: float

    @property
    def passed(self) -> bool:
        return (
            self.max_difference <= self.tolerance
            and self.swapped_pairs == 0
            and self.flipped_verdicts == 0
        )

    def line(self) -> str:
        return (
            f"{self.count} images: max |bundle - reference| {100 * self.max_difference:.3f} % of "
            f"the threshold (tolerance {100 * self.tolerance:.2f} %), {self.swapped_pairs} pair(s) "
            f"out of order, {self.flipped_verdicts} verdict(s) changed"
        )


def compare(
    reference: NDArray[np.floating],
    bundle: NDArray[np.floating],
    threshold: float,
    tolerance: float,
) -> Parity:
    """The parity of `bundle` scores with `reference` scores (same images, same order)."""
    ref, got = np.asarray(reference, np.float64), np.asarray(bundle, np.float64)
    margin = tolerance * threshold
    difference = float(np.abs(got - ref).max()) / threshold if len(ref) else 0.0
    apart = (ref[:, None] - ref[None, :]) > 2 * margin
    swapped = int((apart & (got[:, None] <= got[None, :])).sum())
    clear = np.abs(ref - threshold) > margin
    flipped = int(((ref > threshold) != (got > threshold))[clear].sum())
    return Parity(len(ref), difference, swapped, flipped, tolerance)


def require(parity: Parity, what: str) -> None:
    """Refuse the build unless `parity` passed."""
    if not parity.passed:
        raise GateError(
            f"parity gate refused the bundle: {what} scores differ from the reference scorer's\n"
            f"  {parity.line()}\n"
            "nothing was written; keep the memory bank at float32 (--bank-precision float32) "
            "or report the export problem"
        )


def choose_precision(requested: str, parities: dict[str, Parity]) -> tuple[str, str]:
    """The bank precision and why: float16 when asked or when it passes with half the
    tolerance to spare (storage halves; the arithmetic stays float32), else float32."""
    if requested != "auto":
        return requested, f"--bank-precision {requested}"
    half = parities["float16"]
    if half.passed and half.max_difference <= half.tolerance / 2:
        return "float16", (
            f"float16 measured within {100 * half.max_difference:.3f} % of the threshold "
            f"(half the tolerance is {50 * half.tolerance:.2f} %): half the size"
        )
    return "float32", f"float16 measured {100 * half.max_difference:.3f} % of the threshold off"
