"""The reference check: a classifier bundle must agree with its fp32 reference here, before it serves.

ONNX Runtime's int8 kernels compute different numbers on different CPU classes (see
`edge_bundle.cpu_class`), so a bundle validated where it was built can be wrong on this box. A
bundle may carry fp32 class probabilities for a few small images (`manifest.reference_check`);
this module owns checking them: it reads the reference outputs without pickle and refuses a
malformed array, runs every reference input through the served pipeline (`decode`, `prepare`,
`infer`, exactly as the golden self-test does), and judges agreement with the bundle's gates
(`edge_bundle.agreement`, interval only: the box refuses only what is clearly below a gate). It
also describes the outcome for `edge-agent install` and `GET /v1/models`.

It runs at install and at update staging, not at every start-up: the golden self-test runs at
every load, and this check costs one inference per reference input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.engine.classifier import Classifier
from edge_agent.errors import AgentError, BundleRejectedError
from edge_bundle.agreement import Threshold, Verdict, figures, judge
from edge_bundle.cpu_class import host_class
from edge_bundle.errors import BundleError
from edge_bundle.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from edge_bundle.manifest import ClassEvaluation, Manifest, ReferenceCheck
from edge_bundle.scores import looks_like_probabilities

REBUILD = "the bundle is broken; rebuild it with model-packager"


@dataclass(frozen=True)
class ReferenceReport:
    """What the check found on this box: every gate's verdict, on which CPU class, how fast."""

    bundle: str
    cpu_class: str
    verdicts: tuple[Verdict, ...]
    samples: int
    confident_samples: int
    seconds: float
    expected: ClassEvaluation | None  # the build's own figures for this CPU class, if any
    profile: str | None = None
    at: float = field(default_factory=time.time)  # when it ran (epoch seconds)

    @property
    def failed(self) -> tuple[Verdict, ...]:
        """Gates clearly below their threshold (a gate that could not judge never fails)."""
        return tuple(v for v in self.verdicts if v.judged and not v.passed)

    @property
    def passed(self) -> bool:
        return not self.failed

    def raise_for_failure(self) -> None:
        if not self.failed:
            return
        problems = "; ".join(f"{v.describe()}, {self._build_figure(v.name)}" for v in self.failed)
        profile = f" ({self.profile})" if self.profile else ""
        raise BundleRejectedError(
            f"{self.bundle} disagrees with its fp32 reference outputs on this box, CPU class "
            f"{self.cpu_class}: {problems}. Its model computes different answers here than "
            f"where it was validated (int8 kernels differ by CPU class); rebuild the bundle with "
            f"model-packager for this box's profile{profile}, validated on or for CPU class "
            f"{self.cpu_class}"
        )

    def _build_figure(self, gate: str) -> str:
        expected = self.expected
        if expected is None or expected.how == "not-evaluated":
            note = f" ({expected.note})" if expected is not None and expected.note else ""
            return f"where the build did not evaluate this class{note}"
        value = expected.metrics.get(gate)
        if value is None:
            return f"where the build recorded no {gate} for this class"
        return f"where the build measured {value:.4f} on {self.cpu_class} ({expected.how})"

    def summary(self) -> str:
        """One line for `edge-agent install`."""
        gates = "; ".join(v.describe() for v in self.verdicts)
        return (
            f"reference check passed on CPU class {self.cpu_class} ({self.samples} inputs, "
            f"{self.seconds:.2f} s): {gates}"
        )

    def to_json(self) -> dict[str, Any]:
        """The outcome as `GET /v1/models` shows it (and the store keeps it)."""
        return {
            "status": "passed" if self.passed else "failed",
            "cpu_class": self.cpu_class,
            "samples": self.samples,
            "confident_samples": self.confident_samples,
            "seconds": round(self.seconds, 3),
            "figures": {v.name: _verdict_json(v) for v in self.verdicts},
            "at": self.at,
        }


def _verdict_json(verdict: Verdict) -> dict[str, Any]:
    low, high = verdict.count.interval()
    value = verdict.count.value
    return {
        "value": round(value, 6) if value is not None else None,
        "hits": verdict.count.hits,
        "count": verdict.count.total,
        "interval": [round(low, 6), round(high, 6)],
        "threshold": verdict.threshold,
        "judged": verdict.judged,
        "passed": verdict.passed,
        "basis": verdict.basis,
    }


def run_reference_check(
    classifier: Classifier, *, cpu_class: str | None = None, profile: str | None = None
) -> ReferenceReport | None:
    """Judge `classifier` against the reference outputs its bundle carries (None if it carries
    none). A malformed reference is a `BundleRejectedError`; a failing gate is reported (see
    `ReferenceReport.raise_for_failure`)."""
    manifest = classifier.bundle.manifest
    check = manifest.reference_check
    if check is None:
        return None
    started = time.perf_counter()
    name = str(classifier.bundle.bundle_id)
    reference = load_reference_outputs(
        classifier.bundle.path(check.outputs_path),
        rows=len(check.inputs),
        columns=len(classifier.labels),
        what=f"{name}: the reference outputs {check.outputs_path}",
    )
    computed = _compute(classifier, check)
    counted = figures(reference, computed, check.confident)
    thresholds = tuple(Threshold(g.name, g.minimum, g.min_count) for g in check.gates)
    here = cpu_class or str(host_class())
    return ReferenceReport(
        bundle=name,
        cpu_class=here,
        verdicts=judge(counted, thresholds, interval_only=True),
        samples=counted.top1.total,
        confident_samples=counted.confident_top1.total,
        seconds=time.perf_counter() - started,
        expected=next((e for e in check.expected if e.cpu_class == here), None),
        profile=profile,
    )


def _compute(classifier: Classifier, check: ReferenceCheck) -> NDArray[np.float32]:
    """This box's probabilities for every reference input, through the served pipeline."""
    rows = []
    for relative in check.inputs:
        try:
            data = classifier.bundle.path(relative).read_bytes()
            image = classifier.decode(
                data, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES
            )
            rows.append(classifier.infer(classifier.prepare(image))[0])
        except (AgentError, BundleError, OSError) as exc:
            reason = exc.message if isinstance(exc, AgentError) else str(exc)
            raise BundleRejectedError(
                f"{classifier.bundle.bundle_id}: the reference input {relative} cannot be run "
                f"({reason}); {REBUILD}"
            ) from exc
    return np.stack(rows).astype(np.float32, copy=False)


def load_reference_outputs(
    path: Path, *, rows: int, columns: int, what: str
) -> NDArray[np.float32]:
    """A (rows, columns) float32 array of finite probabilities from a .npy file, never unpickled;
    anything else is a `BundleRejectedError` that starts with `what`."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BundleRejectedError(
            f"{what} cannot be read as a .npy array without pickle ({exc}); {REBUILD}"
        ) from exc
    if not isinstance(loaded, np.ndarray):
        loaded.close()  # an .npz archive
        raise BundleRejectedError(f"{what} are an .npz archive, not one .npy array; {REBUILD}")
    array: NDArray[Any] = loaded
    if array.dtype.kind != "f" or array.dtype.itemsize != 4:
        raise BundleRejectedError(f"{what} are {array.dtype}, not float32; {REBUILD}")
    if array.shape != (rows, columns):
        raise BundleRejectedError(
            f"{what} have shape {array.shape}, expected ({rows}, {columns}): one row per "
            f"reference input, one column per label; {REBUILD}"
        )
    if not np.isfinite(array).all():
        raise BundleRejectedError(f"{what} hold NaN or infinite values; {REBUILD}")
    if not looks_like_probabilities(array):
        raise BundleRejectedError(
            f"{what} are not probabilities (every row must lie in [0, 1] and sum to 1); {REBUILD}"
        )
    return array.astype(np.float32)


def not_carried_warning(bundle: str) -> str:
    return (
        f"{bundle} carries no fp32 reference outputs, so whether its int8 kernels agree with "
        "fp32 on this box's CPU class was not checked; rebuild it with a current model-packager "
        "to have it checked at install"
    )


def status(
    manifest: Manifest, report: dict[str, Any] | None, cpu_class: str | None = None
) -> dict[str, Any]:
    """What `GET /v1/models` says about a classifier's reference check: `report` is the outcome
    recorded at install (None when there is none), `cpu_class` this box's class."""
    bundle = str(manifest.bundle_id)
    if manifest.reference_check is None:
        return {"status": "not-carried", "warning": not_carried_warning(bundle)}
    if report is None:
        return {
            "status": "not-run",
            "warning": f"{bundle} carries reference outputs but no check of them is on record "
            "here (installed by an older agent?); install it again to check it on this box",
        }
    described = dict(report)
    here = cpu_class or str(host_class())
    if described.get("cpu_class") != here:
        described["warning"] = (
            f"checked on CPU class {described.get('cpu_class')}, but this box is {here}; "
            "install the bundle again to check it here"
        )
    return described
