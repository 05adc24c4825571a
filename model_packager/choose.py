"""Choosing the quantization of a bundle, and judging a candidate against the fp32 reference.

An explicit `--quantization` is built and judged by the gates. `auto` measures when the build
machine matches the profile's hardware: every ONNX quantization the profile allows is built,
validated and timed against fp32 in interleaved rounds, and the fastest one that passes the gates
wins. On other hardware, timing would say nothing about the target, so `auto` takes the profile's
preferred quantization and records that it was not measured there.

int8-static is judged per CPU class (`edge_bundle.cpu_class`): the build machine's class natively,
the profile's class where it can be reproduced here (`model_packager.class_eval`). The recipes
for the profile's class (`model_packager.recipes`) are tried in order from one calibration pass;
the first that passes every gate on the profile's class wins (or on this machine's class, when
the profile's cannot be run here, which the manifest then says). Every trial's figures go into
the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_bundle.cpu_class import CpuClass, classify, host_class
from edge_bundle.manifest import ClassEvaluation, Quantization, RecipeTrial
from edge_bundle.profiles import HardwareProfile
from model_packager import class_eval
from model_packager.benchmark import measure_speedup
from model_packager.class_eval import ClassPlan
from model_packager.datasets import ImageSample, labels_of
from model_packager.errors import CalibrationError, GateError, QuantizationError
from model_packager.evaluate import (
    Comparison,
    GateOutcome,
    GatePolicy,
    apply_gates,
    class_evaluation,
    compare,
    describe_gate,
)
from model_packager.inference import predict_all
from model_packager.onnx_tools import make_session, run_probs
from model_packager.progress import Progress
from model_packager.quantize import (
    QuantizationMode,
    QuantizationResult,
    calibration_ranges,
    quantize_onnx,
)
from model_packager.recipes import Recipe, candidates_for
from model_packager.references import ReferenceSet

ONNX_MODES = tuple(mode.value for mode in QuantizationMode)
INT8_MODES = (QuantizationMode.INT8_STATIC, QuantizationMode.INT8_DYNAMIC)


@dataclass(frozen=True)
class Candidate:
    """One quantized model: its file, a pinned session, and its outputs on the validation set."""

    mode: QuantizationMode
    path: Path
    session: Any
    probs: NDArray[np.float32]
    result: QuantizationResult

    def predict(self, tensor: NDArray[Any]) -> NDArray[np.float32]:
        return run_probs(self.session, tensor)


@dataclass(frozen=True)
class ClassResult:
    """A candidate on one CPU class: on the validation set, and on the reference thumbnails."""

    plan: ClassPlan
    comparison: Comparison | None
    on_references: Comparison | None

    @property
    def evaluated(self) -> bool:
        return self.comparison is not None


@dataclass(frozen=True)
class QuantizationChoice:
    candidate: Candidate
    comparison: Comparison
    outcome: GateOutcome
    reason: str
    classes: tuple[ClassEvaluation, ...] = ()
    judged_class: str | None = None
    expected_on_references: tuple[ClassEvaluation, ...] = ()
    trials: tuple[RecipeTrial, ...] = field(default=())

    def record(self) -> Quantization:
        result = self.candidate.result
        notes = "; ".join(result.notes) or None
        return Quantization(
            method=result.mode.value,
            weight_type=result.weight_type,
            activation_type=result.activation_type,
            per_channel=result.per_channel,
            calibration_set_sha256=result.calibration_sha256,
            calibration_method=result.method.value if result.method else None,
            notes=notes,
            recipe=result.recipe.record(result.float_nodes) if result.recipe else None,
            trials=self.trials,
        )


@dataclass(frozen=True)
class _Inputs:
    profile: HardwareProfile
    on_target: bool
    reference_path: Path
    reference: Any
    reference_probs: NDArray[np.float32]
    calibration: Sequence[ImageSample]
    validation_set: Sequence[ImageSample]
    labels: tuple[str, ...]
    method: str
    work: Path
    progress: Progress
    references: ReferenceSet | None
    recipe: Recipe | None
    plans: tuple[ClassPlan, ...]

    @property
    def target(self) -> CpuClass:
        return self.plans[-1].cpu_class


def choose_quantization(
    *,
    mode: str,
    profile: HardwareProfile,
    on_target: bool,
    reference_path: Path,
    reference: Any,
    reference_probs: NDArray[np.float32],
    calibration: Sequence[ImageSample],
    validation_set: Sequence[ImageSample],
    labels: tuple[str, ...],
    policy: GatePolicy,
    method: str,
    work: Path,
    progress: Progress,
    references: ReferenceSet | None = None,
    recipe: Recipe | None = None,
    host: CpuClass | None = None,
) -> QuantizationChoice:
    """Build, validate and (on target hardware) time the quantization(s); return the winner."""
    target = classify(profile.cpu.arch, profile.cpu.features)
    plans = tuple(class_eval.plan(target, host or host_class()))
    inputs = _Inputs(profile, on_target, reference_path, reference, reference_probs, calibration,
                     validation_set, labels, method, work, progress, references, recipe,
                     plans)  # fmt: skip
    allowed = [m for m in profile.quantization.allowed if m in ONNX_MODES]
    if mode != "auto":
        if mode not in ONNX_MODES:
            raise QuantizationError(
                f"unknown quantization {mode!r}; choose auto or one of {ONNX_MODES}"
            )
        if mode not in allowed:
            raise QuantizationError(
                f"profile {profile.name} does not allow {mode} (allowed: {allowed}); "
                "pick one of those or another --profile"
            )
        return _choose_mode(inputs, QuantizationMode(mode), policy, "asked for")
    if not on_target:
        preferred = QuantizationMode(profile.quantization.preferred_onnx or "none")
        reason = "the profile's preferred quantization; not measured on the target hardware"
        return _choose_mode(inputs, preferred, policy, reason)
    return _fastest_passing(inputs, [QuantizationMode(m) for m in allowed], policy)


def _choose_mode(
    inputs: _Inputs, mode: QuantizationMode, policy: GatePolicy, reason: str
) -> QuantizationChoice:
    if mode is QuantizationMode.INT8_STATIC:
        return _choose_recipe(inputs, policy, reason)
    return _judge(inputs, _candidate(inputs, mode), policy, reason)


def _fastest_passing(
    inputs: _Inputs, modes: list[QuantizationMode], policy: GatePolicy
) -> QuantizationChoice:
    passing: list[tuple[float, QuantizationChoice]] = []
    tried = []
    strict = policy.strict()
    for mode in modes:
        if mode is QuantizationMode.INT8_STATIC and not inputs.calibration:
            tried.append(f"{mode.value}: skipped (no --calibration)")
            continue
        try:
            choice = _choose_mode(inputs, mode, strict, "")
        except GateError as exc:
            tried.append(f"{mode.value}: refused ({str(exc).splitlines()[1].strip()})")
            continue
        candidate = choice.candidate
        speedup = _speedup(inputs, candidate) if mode is not QuantizationMode.NONE else 1.0
        tried.append(f"{mode.value}: {speedup:.2f}x fp32")
        passing.append((speedup, choice))
    if not passing:
        raise GateError("no quantization the profile allows passed the gates: " + "; ".join(tried))
    speedup, best = max(passing, key=lambda item: item[0])
    reason = f"fastest passing on target hardware ({'; '.join(tried)})"
    return QuantizationChoice(
        best.candidate, best.comparison, best.outcome, reason, best.classes, best.judged_class,
        best.expected_on_references, best.trials,
    )  # fmt: skip


def _choose_recipe(inputs: _Inputs, policy: GatePolicy, reason: str) -> QuantizationChoice:
    """Try the recipes for the target's class in order; the first that passes wins."""
    if not inputs.calibration:
        raise CalibrationError(
            "int8-static needs --calibration DIR: a few hundred images like the line's photos"
        )
    recipes = (inputs.recipe,) if inputs.recipe else candidates_for(inputs.target)
    ranges = None
    if len(recipes) > 1:
        inputs.progress.step("calibrating activation ranges (shared by every recipe)")
        tensors = [sample.tensor for sample in inputs.calibration]
        ranges = calibration_ranges(inputs.reference_path, tensors, inputs.method, inputs.work)
    trials: list[RecipeTrial] = []
    tried: list[tuple[QuantizationChoice, str]] = []
    for recipe in recipes:
        candidate = _candidate(inputs, QuantizationMode.INT8_STATIC, recipe, ranges)
        results = _evaluate(inputs, candidate)
        judged = _judged(results)
        speedup = _speedup(inputs, candidate)
        gated_speed = speedup if inputs.on_target else None
        assert judged.comparison is not None
        try:
            outcome = apply_gates(
                judged.comparison, policy.strict(), gated_speed, True, judged.plan.cpu_class.value
            )
            error = None
        except GateError as exc:
            outcome = GateOutcome((), None, [])
            error = exc
        trials.append(_trial(recipe, results, policy, speedup, error))
        why = f"{reason + '; ' if reason else ''}recipe {recipe.name}"
        choice = _choice(inputs, candidate, results, policy, why, trials)
        if error is None:
            return _with_outcome(choice, outcome, results)
        tried.append((choice, str(error)))
    if policy.waive_reason is not None:
        best, _ = max(tried, key=lambda item: _score(item[0].comparison))
        outcome = apply_gates(
            best.comparison, policy, _speedup_if(inputs, best.candidate), True, best.judged_class
        )
        return _with_outcome(best, outcome, None, trials=tuple(trials))
    raise GateError(_no_recipe_message(inputs, tried))


def _score(comparison: Comparison) -> tuple[float, float]:
    return (comparison.confident_agreement or 0.0, comparison.top5_containment)


def _speedup_if(inputs: _Inputs, candidate: Candidate) -> float | None:
    return _speedup(inputs, candidate) if inputs.on_target else None


def _no_recipe_message(inputs: _Inputs, tried: list[tuple[QuantizationChoice, str]]) -> str:
    judged = tried[0][0].judged_class if tried else inputs.target.value
    lines = [
        f"the bundle was not written: no int8-static recipe passed the gates on CPU class {judged}"
    ]
    for choice, error in tried:
        failed = [line.strip() for line in error.splitlines()[1:] if line.startswith("  ")]
        lines.append(
            f"  recipe {choice.candidate.result.recipe.name if choice.candidate.result.recipe else '?'}: "
            + "; ".join(failed)
        )
    lines.append(
        "try: more representative --calibration images (a few hundred from the line), "
        "--quantization none (fp32), or --waive-gate REASON to ship the best recipe anyway "
        "with the reason recorded"
    )
    return "\n".join(lines)


def _choice(
    inputs: _Inputs,
    candidate: Candidate,
    results: list[ClassResult],
    policy: GatePolicy,
    reason: str,
    trials: list[RecipeTrial],
) -> QuantizationChoice:
    judged = _judged(results)
    assert judged.comparison is not None
    classes = tuple(_class_record(r, policy, on_references=False) for r in results)
    expected = tuple(
        _class_record(r, policy, on_references=True) for r in results if r.on_references
    )
    return QuantizationChoice(
        candidate, judged.comparison, GateOutcome(()), reason, classes,
        judged.plan.cpu_class.value, expected, tuple(trials),
    )  # fmt: skip


def _with_outcome(
    choice: QuantizationChoice,
    outcome: GateOutcome,
    results: list[ClassResult] | None,
    trials: tuple[RecipeTrial, ...] | None = None,
) -> QuantizationChoice:
    notes = list(outcome.notes)
    for record in choice.classes:
        failed = [g for g in record.gates if not g.passed]
        if record.cpu_class != choice.judged_class and failed:
            notes.append(
                f"on CPU class {record.cpu_class} ({record.how}) this bundle fails "
                + "; ".join(describe_gate(g) for g in failed)
                + ": boxes of that class will refuse it at install"
            )
        if record.how == "not-evaluated":
            notes.append(f"not evaluated on {record.cpu_class}: {record.note}")
    outcome = GateOutcome(outcome.gates, outcome.waived_reason, notes)
    return QuantizationChoice(
        choice.candidate, choice.comparison, outcome, choice.reason, choice.classes,
        choice.judged_class, choice.expected_on_references,
        choice.trials if trials is None else trials,
    )  # fmt: skip


def _class_record(
    result: ClassResult, policy: GatePolicy, *, on_references: bool
) -> ClassEvaluation:
    comparison = result.on_references if on_references else result.comparison
    return class_evaluation(
        result.plan.cpu_class.value, result.plan.how, comparison, policy, result.plan.note
    )


def _trial(
    recipe: Recipe,
    results: list[ClassResult],
    policy: GatePolicy,
    speedup: float,
    error: GateError | None,
) -> RecipeTrial:
    return RecipeTrial(
        recipe=recipe.name,
        evaluations=tuple(_class_record(r, policy, on_references=False) for r in results),
        speedup_vs_fp32=round(speedup, 3),
        passed=error is None,
        note=None if error is None else " ".join(str(error).split())[:1000],
    )


def _judged(results: list[ClassResult]) -> ClassResult:
    """The target's class when it was evaluated, else this machine's own."""
    target = results[-1]
    return target if target.evaluated else results[0]


def _evaluate(inputs: _Inputs, candidate: Candidate) -> list[ClassResult]:
    """The candidate on every planned class: validation set and reference thumbnails."""
    stacked = np.concatenate([sample.tensor for sample in inputs.validation_set]).astype(np.float32)
    count = len(stacked)
    references = inputs.references
    if references is not None:
        stacked = np.concatenate([stacked, references.tensors])
    results = []
    for plan in inputs.plans:
        if plan.how == "not-evaluated":
            results.append(ClassResult(plan, None, None))
            continue
        if plan is inputs.plans[0]:
            validation = candidate.probs
            on_refs = (
                np.concatenate([candidate.predict(t[None]) for t in references.tensors])
                if references is not None
                else None
            )
        else:
            inputs.progress.step(f"evaluating on {plan.cpu_class.value} ({plan.how})")
            probs = class_eval.run(
                plan, candidate.path, stacked, inputs.profile.onnx.intra_op_threads
            )
            validation, on_refs = probs[:count], (probs[count:] if references is not None else None)
        comparison = compare(
            inputs.reference_probs, validation, labels_of(inputs.validation_set), len(inputs.labels)
        )
        on_references = (
            compare(references.outputs, on_refs, None, len(inputs.labels))
            if references is not None and on_refs is not None
            else None
        )
        results.append(ClassResult(plan, comparison, on_references))
    return results


def _judge(
    inputs: _Inputs, candidate: Candidate, policy: GatePolicy, reason: str
) -> QuantizationChoice:
    """A float or dynamic-int8 candidate: judged on this machine (its arithmetic does not
    depend on the CPU class)."""
    comparison = compare(
        inputs.reference_probs,
        candidate.probs,
        labels_of(inputs.validation_set),
        len(inputs.labels),
    )
    int8 = candidate.mode in INT8_MODES
    speedup = _speedup(inputs, candidate) if (int8 and inputs.on_target) else None
    host = inputs.plans[0].cpu_class.value
    outcome = apply_gates(comparison, policy, speedup, quantized=int8, cpu_class=host)
    on_refs = None
    if inputs.references is not None:
        probs = np.concatenate([candidate.predict(t[None]) for t in inputs.references.tensors])
        on_refs = compare(inputs.references.outputs, probs, None, len(inputs.labels))
    plan = ClassPlan(inputs.plans[0].cpu_class, "native", "this machine's own kernels")
    result = ClassResult(plan, comparison, on_refs)
    classes = (_class_record(result, policy, on_references=False),)
    expected = (_class_record(result, policy, on_references=True),) if on_refs else ()
    return QuantizationChoice(candidate, comparison, outcome, reason, classes, host, expected)


def _candidate(
    inputs: _Inputs,
    mode: QuantizationMode,
    recipe: Recipe | None = None,
    ranges: Path | None = None,
) -> Candidate:
    if mode is QuantizationMode.INT8_STATIC and not inputs.calibration:
        raise CalibrationError(
            "int8-static needs --calibration DIR: a few hundred images like the line's photos"
        )
    label = f"{mode.value} ({recipe.name})" if recipe else mode.value
    inputs.progress.step(f"quantizing: {label}")
    stem = f"model-{mode.value}" + (f"-{_slug(recipe.name)}" if recipe else "")
    path = inputs.work / f"{stem}.onnx"
    result = quantize_onnx(
        inputs.reference_path,
        path,
        mode,
        calibration=[sample.tensor for sample in inputs.calibration] or None,
        method=inputs.method,
        recipe=recipe,
        ranges=ranges,
    )
    session = make_session(path, inputs.profile.onnx.intra_op_threads)
    probs = predict_all(
        session, inputs.validation_set, len(inputs.labels), inputs.progress.bar(label)
    )
    return Candidate(mode, path, session, probs, result)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _speedup(inputs: _Inputs, candidate: Candidate) -> float:
    tensor = inputs.validation_set[0].tensor
    ratio, _, _ = measure_speedup(inputs.reference, candidate.session, tensor)
    return ratio
