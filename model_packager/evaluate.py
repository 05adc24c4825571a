"""Validation of a candidate (quantized) model against its fp32 reference, and the gates.

`compare` turns two probability matrices (and labels, when the evaluation set has them) into the
numbers the manifest records; `apply_gates` decides, from a `GatePolicy`, whether the bundle may be
written. Agreement is counted on every input and judged by three gates (overall top-1, top-1 on
confident inputs, top-5 containment), each with a minimum count and, on small counts, a 95%
interval rather than a point value (`edge_bundle.agreement`). A refused gate raises `GateError`
with the numbers and what to try, unless the user waived the gates with a reason, which is then
recorded in the manifest and the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray

from edge_bundle.agreement import CONFIDENT, Figures, Threshold, Verdict, figures, judge
from edge_bundle.manifest import ClassEvaluation, Gate, Validation
from model_packager.errors import GateError

MIN_SAMPLES = 10


@dataclass(frozen=True)
class Comparison:
    """Reference vs candidate on the same inputs."""

    samples: int
    agreement: float
    confident_samples: int
    confident_agreement: float | None
    top5_containment: float
    max_probability_difference: float
    reference_accuracy: float | None
    candidate_accuracy: float | None
    confusion: list[list[int]]
    confusion_axis: str
    figures: Figures

    def metrics(self) -> dict[str, float]:
        values: dict[str, float | None] = {
            "samples": float(self.samples),
            "top1_agreement": self.agreement,
            "confident_samples": float(self.confident_samples),
            "confident_top1_agreement": self.confident_agreement,
            "top5_containment": self.top5_containment,
            "max_probability_difference": self.max_probability_difference,
            "reference_accuracy": self.reference_accuracy,
            "candidate_accuracy": self.candidate_accuracy,
        }
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of the validation gates (accuracy in percentage points)."""

    max_accuracy_drop: float = 1.0
    min_agreement: float = 0.97  # top-1 agreement on inputs where fp32 is confident
    min_speedup: float = 1.3
    waive_reason: str | None = None
    # Top-1 agreement on every input. Where fp32 itself hesitates between near-tied classes,
    # exact int8 still flips some answers: 79% overall on a real 1000-class EfficientNet-Lite0
    # whose confident agreement is 99% (docs/quantization.md), while the saturated AVX2 build
    # the accuracy issue found scored 69%.
    min_top1_agreement: float = 0.75
    min_top5_containment: float = 0.99
    min_count: int = MIN_SAMPLES

    def thresholds(self) -> tuple[Threshold, ...]:
        return (
            Threshold(
                "confident_top1_agreement",
                self.min_agreement,
                self.min_count,
                fallback="top1_agreement",
            ),
            Threshold("top1_agreement", self.min_top1_agreement, self.min_count),
            Threshold("top5_containment", self.min_top5_containment, self.min_count),
        )

    def strict(self) -> GatePolicy:
        """The same thresholds with no waiver."""
        return replace(self, waive_reason=None)


@dataclass(frozen=True)
class GateOutcome:
    gates: tuple[Gate, ...]
    waived_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> tuple[Gate, ...]:
        return tuple(gate for gate in self.gates if not gate.passed)


def compare(
    reference: NDArray[np.float32],
    candidate: NDArray[np.float32],
    labels: NDArray[np.int64] | None,
    num_classes: int,
) -> Comparison:
    """Agreement, top-5 containment, probability differences and accuracies of both models."""
    if reference.shape != candidate.shape or reference.shape[0] == 0:
        raise ValueError(
            f"cannot compare outputs of shapes {reference.shape} and {candidate.shape}"
        )
    ref_top1 = reference.argmax(axis=1)
    cand_top1 = candidate.argmax(axis=1)
    agree = ref_top1 == cand_top1
    confident = reference.max(axis=1) >= CONFIDENT
    k = min(5, num_classes)
    cand_top5 = np.argsort(-candidate, axis=1)[:, :k]
    contained = (cand_top5 == ref_top1[:, None]).any(axis=1)
    truth, axis = (labels, "label") if labels is not None else (ref_top1, "reference")
    counted = figures(reference, candidate, CONFIDENT)
    return Comparison(
        samples=int(reference.shape[0]),
        agreement=float(agree.mean()),
        confident_samples=int(confident.sum()),
        confident_agreement=float(agree[confident].mean()) if confident.any() else None,
        top5_containment=float(contained.mean()),
        max_probability_difference=float(np.abs(reference - candidate).max()),
        reference_accuracy=float((ref_top1 == labels).mean()) if labels is not None else None,
        candidate_accuracy=float((cand_top1 == labels).mean()) if labels is not None else None,
        confusion=_confusion(truth, cand_top1, num_classes),
        confusion_axis=axis,
        figures=counted,
    )


def apply_gates(
    comparison: Comparison,
    policy: GatePolicy,
    speedup: float | None,
    quantized: bool,
    cpu_class: str | None = None,
) -> GateOutcome:
    """Evaluate every gate; raise `GateError` when one fails and nothing waives it."""
    gates: list[Gate] = []
    notes: list[str] = []
    if comparison.reference_accuracy is not None and comparison.candidate_accuracy is not None:
        drop = 100.0 * (comparison.reference_accuracy - comparison.candidate_accuracy)
        gates.append(
            _gate(
                "accuracy_drop_points",
                policy.max_accuracy_drop,
                drop,
                drop <= policy.max_accuracy_drop,
            )
        )
    verdicts = judge(comparison.figures, policy.thresholds())
    gates += [gate_of(verdict) for verdict in verdicts]
    where = f" on {cpu_class}" if cpu_class else ""
    notes += [f"{v.name} not judged{where}: {v.basis}" for v in verdicts if not v.judged]
    if not any(v.judged for v in verdicts):
        gates.append(
            _gate("validation_samples", float(policy.min_count), comparison.samples, False)
        )
    if speedup is not None and quantized:
        gates.append(
            _gate("speedup_vs_fp32", policy.min_speedup, speedup, speedup >= policy.min_speedup)
        )
    elif quantized:
        notes.append("speed gate not applied: not measured on the profile's hardware")
    outcome = GateOutcome(tuple(gates), policy.waive_reason, notes)
    if outcome.failed and policy.waive_reason is None:
        raise GateError(refusal_message(outcome.failed, cpu_class))
    return outcome


def class_gates(comparison: Comparison, policy: GatePolicy) -> tuple[Gate, ...]:
    """The agreement gates on one CPU class's figures, without raising."""
    return tuple(gate_of(v) for v in judge(comparison.figures, policy.thresholds()))


def gate_of(verdict: Verdict) -> Gate:
    """A judged threshold as the manifest records it."""
    return Gate(
        name=verdict.name,
        threshold=float(verdict.threshold),
        value=float(verdict.value),
        passed=bool(verdict.passed or not verdict.judged),
        hits=verdict.count.hits,
        count=verdict.count.total,
        interval=verdict.count.interval(),
        judged=verdict.judged,
        basis=verdict.basis,
    )


def class_evaluation(
    cpu_class: str, how: str, comparison: Comparison | None, policy: GatePolicy, note: str
) -> ClassEvaluation:
    """One CPU class's record for the manifest (`comparison` None: not evaluated)."""
    if comparison is None:
        return ClassEvaluation(cpu_class=cpu_class, how="not-evaluated", note=note)
    return ClassEvaluation(
        cpu_class=cpu_class,
        how=how,  # type: ignore[arg-type]
        metrics=comparison.metrics(),
        gates=class_gates(comparison, policy),
        note=note,
    )


def validation_record(
    comparison: Comparison,
    outcome: GateOutcome,
    dataset: str,
    classes: Sequence[ClassEvaluation] = (),
    judged_class: str | None = None,
) -> Validation:
    return Validation(
        metrics=comparison.metrics(),
        gates=outcome.gates,
        waived_reason=outcome.waived_reason if outcome.failed else None,
        dataset=dataset,
        cpu_classes=tuple(classes),
        judged_class=judged_class,
    )


def refusal_message(failed: Sequence[Gate], cpu_class: str | None = None) -> str:
    where = f" on CPU class {cpu_class}" if cpu_class else ""
    lines = [f"the bundle was not written: validation gates failed{where}"]
    for gate in failed:
        lines.append(f"  {describe_gate(gate)}")
    lines.append(
        "try: more representative --calibration images (a few hundred from the line), "
        "--calibration-method entropy or percentile, another --quantization (none keeps fp32), "
        "or --waive-gate REASON to ship it anyway with the reason recorded"
    )
    return "\n".join(lines)


def describe_gate(gate: Gate) -> str:
    """One line: the gate, its value, what it was counted on, and its threshold."""
    counted = ""
    if gate.count is not None and gate.hits is not None:
        counted = f" ({gate.hits}/{gate.count}"
        if gate.interval is not None:
            counted += f", 95% interval {gate.interval[0]:.3f}-{gate.interval[1]:.3f}"
        counted += ")"
    return f"{gate.name}: {gate.value:.4f}{counted} (threshold {gate.threshold:.4f})"


def _gate(name: str, threshold: float, value: float, passed: bool) -> Gate:
    return Gate(name=name, threshold=float(threshold), value=float(value), passed=bool(passed))


def _confusion(
    truth: NDArray[np.int64], predicted: NDArray[np.int64], classes: int
) -> list[list[int]]:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return [[int(v) for v in row] for row in matrix]
