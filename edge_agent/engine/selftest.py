"""The golden self-test: the bundle's own samples must give the bundle's own answers, here.

Run whenever a bundle loads (the agent is not ready until it passes) and periodically while
serving, because a health check that only says "the process is alive" passes while a model
outputs garbage. Each sample goes through the served pipeline (decode, preprocess, infer); the
top-1 label must match and every expected top-k probability must be within the bundle's
tolerance (an anomaly bundle's samples expect one value, its image score). It also warms every stage, so the first real request pays no first-call cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edge_agent.engine.classifier import Classifier
from edge_agent.errors import SelfTestError
from edge_bundle.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class SelfTestReport:
    """What the self-test found; `passed` False carries the reasons in `failures`."""

    bundle: str
    samples: int
    max_deviation: float
    tolerance: float
    seconds: float
    failures: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.failures

    def raise_for_failure(self) -> None:
        if self.failures:
            raise SelfTestError(
                f"{self.bundle} failed its golden self-test: "
                + "; ".join(self.failures)
                + ". The model does not reproduce its packaged outputs on this device; check the "
                "runtime version and providers, or rebuild the bundle for this profile"
            )


def run_selftest(classifier: Classifier) -> SelfTestReport:
    """Run every golden sample of the bundle; never raises for a mismatch (see the report)."""
    golden = classifier.bundle.manifest.golden
    started = time.perf_counter()
    name = str(classifier.bundle.bundle_id)
    if golden is None or not golden.samples:
        return SelfTestReport(name, 0, 0.0, 0.0, 0.0, ("the bundle has no golden samples",))
    failures: list[str] = []
    worst = 0.0
    for sample in golden.samples:
        data = classifier.bundle.path(sample.input_path).read_bytes()
        image = classifier.decode(data, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES)
        scores = classifier.golden_scores(classifier.infer(classifier.prepare(image))[0])
        expected_top = sample.expected_topk[0][0]
        actual_top = max(scores, key=lambda label: scores[label])
        if actual_top != expected_top:
            failures.append(
                f"{sample.input_path}: top-1 is {actual_top!r}, expected {expected_top!r}"
            )
        for label, expected in sample.expected_topk:
            deviation = abs(scores.get(label, -1.0) - expected)
            worst = max(worst, deviation)
            if deviation > golden.tolerance:
                failures.append(
                    f"{sample.input_path}: p({label}) = {scores.get(label, float('nan')):.6f}, "
                    f"expected {expected:.6f} ± {golden.tolerance}"
                )
    return SelfTestReport(
        name,
        len(golden.samples),
        worst,
        golden.tolerance,
        time.perf_counter() - started,
        tuple(failures),
    )
