"""Choosing the quantization of a bundle, and judging a candidate against the fp32 reference.

An explicit `--quantization` is built and judged by the gates. `auto` measures when the build
machine matches the profile's hardware: every ONNX quantization the profile allows is built,
validated and timed against fp32 in interleaved rounds, and the fastest one that passes the gates
wins. On other hardware, timing would say nothing about the target, so `auto` takes the profile's
preferred quantization and records that it was not measured there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_bundle.manifest import Quantization
from edge_bundle.profiles import HardwareProfile
from model_packager.benchmark import measure_speedup
from model_packager.datasets import ImageSample, labels_of
from model_packager.errors import CalibrationError, GateError, QuantizationError
from model_packager.evaluate import Comparison, GateOutcome, GatePolicy, apply_gates, compare
from model_packager.inference import predict_all
from model_packager.onnx_tools import make_session, run_probs
from model_packager.progress import Progress
from model_packager.quantize import (
    QuantizationMode,
    QuantizationResult,
    needs_reduce_range,
    quantize_onnx,
)

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
class QuantizationChoice:
    candidate: Candidate
    comparison: Comparison
    outcome: GateOutcome
    reason: str

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
) -> QuantizationChoice:
    """Build, validate and (on target hardware) time the quantization(s); return the winner."""
    inputs = _Inputs(profile, on_target, reference_path, reference, reference_probs, calibration,
                     validation_set, labels, method, work, progress)  # fmt: skip
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
        return _judge(inputs, _candidate(inputs, QuantizationMode(mode)), policy, "asked for")
    if not on_target:
        preferred = QuantizationMode(profile.quantization.preferred_onnx or "none")
        reason = "the profile's preferred quantization; not measured on the target hardware"
        return _judge(inputs, _candidate(inputs, preferred), policy, reason)
    return _fastest_passing(inputs, [QuantizationMode(m) for m in allowed], policy)


def _fastest_passing(
    inputs: _Inputs, modes: list[QuantizationMode], policy: GatePolicy
) -> QuantizationChoice:
    passing: list[tuple[float, QuantizationChoice]] = []
    tried = []
    strict = GatePolicy(policy.max_accuracy_drop, policy.min_agreement, policy.min_speedup, None)
    for mode in modes:
        if mode is QuantizationMode.INT8_STATIC and not inputs.calibration:
            tried.append(f"{mode.value}: skipped (no --calibration)")
            continue
        candidate = _candidate(inputs, mode)
        try:
            choice = _judge(inputs, candidate, strict, "")
        except GateError as exc:
            tried.append(f"{mode.value}: refused ({str(exc).splitlines()[1].strip()})")
            continue
        speedup = _speedup(inputs, candidate) if mode is not QuantizationMode.NONE else 1.0
        tried.append(f"{mode.value}: {speedup:.2f}x fp32")
        passing.append((speedup, choice))
    if not passing:
        raise GateError("no quantization the profile allows passed the gates: " + "; ".join(tried))
    speedup, best = max(passing, key=lambda item: item[0])
    reason = f"fastest passing on target hardware ({'; '.join(tried)})"
    return QuantizationChoice(best.candidate, best.comparison, best.outcome, reason)


def _judge(
    inputs: _Inputs, candidate: Candidate, policy: GatePolicy, reason: str
) -> QuantizationChoice:
    comparison = compare(
        inputs.reference_probs,
        candidate.probs,
        labels_of(inputs.validation_set),
        len(inputs.labels),
    )
    int8 = candidate.mode in INT8_MODES
    speedup = _speedup(inputs, candidate) if (int8 and inputs.on_target) else None
    outcome = apply_gates(comparison, policy, speedup, quantized=int8)
    return QuantizationChoice(candidate, comparison, outcome, reason)


def _candidate(inputs: _Inputs, mode: QuantizationMode) -> Candidate:
    if mode is QuantizationMode.INT8_STATIC and not inputs.calibration:
        raise CalibrationError(
            "int8-static needs --calibration DIR: a few hundred images like the line's photos"
        )
    inputs.progress.step(f"quantizing: {mode.value}")
    path = inputs.work / f"model-{mode.value}.onnx"
    result = quantize_onnx(
        inputs.reference_path,
        path,
        mode,
        calibration=[sample.tensor for sample in inputs.calibration] or None,
        method=inputs.method,
        reduce_range=needs_reduce_range(inputs.profile.cpu.features, inputs.profile.cpu.arch),
    )
    session = make_session(path, inputs.profile.onnx.intra_op_threads)
    probs = predict_all(
        session, inputs.validation_set, len(inputs.labels), inputs.progress.bar(mode.value)
    )
    return Candidate(mode, path, session, probs, result)


def _speedup(inputs: _Inputs, candidate: Candidate) -> float:
    tensor = inputs.validation_set[0].tensor
    ratio, _, _ = measure_speedup(inputs.reference, candidate.session, tensor)
    return ratio
