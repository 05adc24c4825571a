"""Agreement of a quantized model with its fp32 reference, and the gates that judge it.

One implementation for both sides: the packager judges every candidate with it at build time,
and the box judges the bundle's reference outputs with it before it serves. Three figures are
counted, each over a stated number of inputs:

- `top1_agreement`: inputs where both models pick the same class, over all inputs;
- `confident_top1_agreement`: the same, over inputs where fp32 is confident (top-1 >= 0.5);
- `top5_containment`: inputs whose fp32 top-1 is among the candidate's top 5, over all inputs.

Confident agreement with too few confident inputs is judged on every input instead.

A gate passes when its value reaches the threshold. On fewer than `POINT_VERDICT_COUNT` inputs a
single image moves the value by several points, so there a gate passes while the threshold lies
inside the 95% Wilson interval of the value, and fails once the whole interval is below it. A
gate with fewer than its minimum count of inputs cannot judge at all; it says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

#: fp32 top-1 probability from which an input counts as confident.
CONFIDENT = 0.5
#: Inputs from which a gate is judged on its value alone rather than on its interval.
POINT_VERDICT_COUNT = 100
#: 95% two-sided normal quantile for the Wilson interval.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Count:
    """`hits` out of `total` inputs."""

    hits: int
    total: int

    @property
    def value(self) -> float | None:
        return self.hits / self.total if self.total else None

    def interval(self, z: float = Z95) -> tuple[float, float]:
        """The Wilson score interval of the proportion (0, 1 when there are no inputs)."""
        return wilson_interval(self.hits, self.total, z)


@dataclass(frozen=True)
class Figures:
    """The three agreement counts of one candidate against the reference."""

    top1: Count
    confident_top1: Count
    top5: Count

    def count(self, name: str) -> Count:
        return {
            "top1_agreement": self.top1,
            "confident_top1_agreement": self.confident_top1,
            "top5_containment": self.top5,
        }[name]

    def as_metrics(self) -> dict[str, float]:
        """The figures as the manifest's flat metrics (values and counts)."""
        metrics: dict[str, float] = {
            "samples": float(self.top1.total),
            "confident_samples": float(self.confident_top1.total),
        }
        for name in GATE_NAMES:
            value = self.count(name).value
            if value is not None:
                metrics[name] = value
        return metrics


GATE_NAMES = ("top1_agreement", "confident_top1_agreement", "top5_containment")


@dataclass(frozen=True)
class Threshold:
    """A gate's threshold and the fewest inputs it judges on."""

    name: str
    minimum: float
    min_count: int
    # Judged on this count instead when its own has too few inputs (confident agreement falls
    # back to agreement on every input, the stricter figure).
    fallback: str | None = None


@dataclass(frozen=True)
class Verdict:
    """One gate's decision, with everything needed to explain it."""

    name: str
    threshold: float
    count: Count
    judged: bool
    passed: bool
    basis: str

    @property
    def value(self) -> float:
        return self.count.value if self.count.value is not None else 0.0

    def describe(self) -> str:
        low, high = self.count.interval()
        return (
            f"{self.name} {self.value:.4f} ({self.count.hits}/{self.count.total}, 95% interval "
            f"{low:.3f}-{high:.3f}; threshold {self.threshold:.3f}; {self.basis})"
        )


def wilson_interval(hits: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for `hits` successes in `total` trials."""
    if total <= 0:
        return 0.0, 1.0
    p = hits / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def figures(
    reference: NDArray[np.floating],
    candidate: NDArray[np.floating],
    confident: float = CONFIDENT,
) -> Figures:
    """Count agreement of `candidate` with `reference` probabilities, both (N, classes)."""
    if reference.shape != candidate.shape or reference.ndim != 2 or reference.shape[0] == 0:
        raise ValueError(
            f"cannot compare outputs of shapes {reference.shape} and {candidate.shape}"
        )
    ref_top1 = reference.argmax(axis=1)
    agree = ref_top1 == candidate.argmax(axis=1)
    sure = reference.max(axis=1) >= confident
    k = min(5, reference.shape[1])
    top_k = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    contained = (top_k == ref_top1[:, None]).any(axis=1)
    total = int(reference.shape[0])
    return Figures(
        top1=Count(int(agree.sum()), total),
        confident_top1=Count(int(agree[sure].sum()), int(sure.sum())),
        top5=Count(int(contained.sum()), total),
    )


def judge(
    figures: Figures, thresholds: tuple[Threshold, ...], *, interval_only: bool = False
) -> tuple[Verdict, ...]:
    """Judge every threshold against `figures`.

    `interval_only` judges on the interval whatever the count (the box's check of a bundle: it
    refuses only what is clearly below the gate).
    """
    return tuple(_judge_one(figures, t, interval_only) for t in thresholds)


def _judge_one(figures: Figures, threshold: Threshold, interval_only: bool) -> Verdict:
    count = figures.count(threshold.name)
    if count.total < threshold.min_count and threshold.fallback is not None:
        verdict = _judge_one(
            figures, replace(threshold, name=threshold.fallback, fallback=None), interval_only
        )
        return replace(
            verdict,
            name=threshold.name,
            basis=f"on {threshold.fallback}: only {count.total} confident inputs; {verdict.basis}",
        )
    if count.total < threshold.min_count:
        return Verdict(
            threshold.name,
            threshold.minimum,
            count,
            judged=False,
            passed=False,
            basis=f"not judged: {count.total} inputs, fewer than the {threshold.min_count} it needs",
        )
    value = count.value or 0.0
    if value >= threshold.minimum:
        return Verdict(threshold.name, threshold.minimum, count, True, True, "value")
    if interval_only or count.total < POINT_VERDICT_COUNT:
        high = count.interval()[1]
        return Verdict(
            threshold.name,
            threshold.minimum,
            count,
            judged=True,
            passed=high >= threshold.minimum,
            basis=f"95% interval on {count.total} inputs",
        )
    return Verdict(threshold.name, threshold.minimum, count, True, False, "value")
