"""Gate figures: whether a rollout may go on, each verdict with the figures that gave it.

This module owns the arithmetic of docs/fleet.md "Gates", over every wave so far: the install gate
over the boxes' outcomes, and the quality gates (p95, errors, self-test, drift) over pairs of
telemetry samples per box, the old version's last one before its notice and the new version's
latest. It is pure: the runner gathers the figures, this module only judges them. A gate with less
than its minimum sample says `insufficient` and does not halt.

The shadow gates (docs/fleet.md "Shadow phase") judge a wave before anything is activated: the
candidate's agreement with the active model over every photo the wave's boxes compared (weighted
by photos), with the per-class disagreements in its figures, and optionally the candidate's p95.
Too few compared photos fail the shadow gate: without evidence nothing is activated.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from fleet_controller.plan import GatesSpec, ShadowSpec

GateName = Literal["install", "p95", "errors", "selftest", "drift", "shadow", "shadow_p95"]
GateStatus = Literal["pass", "fail", "insufficient"]
# Box outcomes that count as a finished install, and those of them that count as a failure.
FAILED_OUTCOMES = ("refused", "rolled_back")
FINISHED_OUTCOMES = ("committed", *FAILED_OUTCOMES)
# The prediction outcome the agent counts for an answered request; every other one is an error.
OK_OUTCOME = "ok"


class Sample(Protocol):
    """The fields of one model version's telemetry on one box that the gates read."""

    @property
    def version(self) -> object: ...

    @property
    def p95(self) -> float | None: ...

    @property
    def samples(self) -> int | None: ...

    @property
    def outcomes(self) -> Mapping[str, int] | None: ...

    @property
    def selftest_ok(self) -> bool | None: ...

    @property
    def drift_alert(self) -> bool | None: ...


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict: its figure, the threshold, how many items it rests on, and why."""

    name: GateName
    status: GateStatus
    value: float | None
    threshold: float
    sample: int
    needed: int
    detail: str
    figures: Mapping[str, Any] | None = None  # further figures (the shadow gate's per class)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.figures is None:
            del data["figures"]
        else:
            data["figures"] = dict(self.figures)
        return data


@dataclass(frozen=True)
class BoxPair:
    """One box's telemetry: the old version's last before its notice, and the new version's."""

    ref: str
    old: Sample | None
    new: Sample | None


def evaluate(
    outcomes: Mapping[str, int], pairs: Sequence[BoxPair], spec: GatesSpec
) -> list[GateResult]:
    """Every gate, in the order of docs/fleet.md."""
    return [install_gate(outcomes, spec), *quality_gates(pairs, spec)]


def failed(results: Sequence[GateResult]) -> list[GateResult]:
    """The gates that halt the rollout."""
    return [result for result in results if result.status == "fail"]


def install_gate(outcomes: Mapping[str, int], spec: GatesSpec) -> GateResult:
    """(refused + rolled_back) / finished installs; timed-out boxes are reported, not counted."""
    counts = {name: outcomes.get(name, 0) for name in (*FINISHED_OUTCOMES, "timed_out")}
    finished = sum(counts[name] for name in FINISHED_OUTCOMES)
    failures = sum(counts[name] for name in FAILED_OUTCOMES)
    ratio = failures / finished if finished else None
    limit = spec.max_failure_ratio
    figures = (
        f"{failures} of {finished} finished installs failed ({counts['refused']} refused, "
        f"{counts['rolled_back']} rolled back); {counts['timed_out']} timed out, not counted"
    )
    if ratio is None or finished < spec.min_installs:
        status: GateStatus = "insufficient"
        detail = f"{figures}; at least {spec.min_installs} finished installs are needed to judge"
    else:
        status = "fail" if ratio > limit else "pass"
        verdict = "over" if status == "fail" else "within"
        detail = f"{figures}: {ratio:.1%}, {verdict} the limit of {limit:.1%}"
    return GateResult("install", status, ratio, limit, finished, spec.min_installs, detail)


def quality_gates(pairs: Sequence[BoxPair], spec: GatesSpec) -> list[GateResult]:
    """The p95, errors, self-test and drift gates over the boxes' telemetry pairs."""
    return [
        p95_gate(pairs, spec),
        errors_gate(pairs, spec),
        selftest_gate(pairs, spec),
        drift_gate(pairs, spec),
    ]


def p95_gate(pairs: Sequence[BoxPair], spec: GatesSpec) -> GateResult:
    """Median over boxes of p95(new) / p95(old), on boxes with `min_samples` latencies of each."""
    ratios = [
        ratio
        for pair in pairs
        if (ratio := _p95_ratio(pair.old, pair.new, spec.min_samples)) is not None
    ]
    what = f"the median p95 of new / old version over {len(ratios)} boxes"
    return _median_gate("p95", ratios, spec.max_p95_ratio, spec, what, lambda v: f"{v:.2f}x")


def errors_gate(pairs: Sequence[BoxPair], spec: GatesSpec) -> GateResult:
    """Median over boxes of error rate(new) - error rate(old), on boxes with `min_samples`
    requests of each (requests, not answers: a version that fails every request still counts)."""
    increases = [
        increase
        for pair in pairs
        if (increase := _error_increase(pair.old, pair.new, spec.min_samples)) is not None
    ]
    what = f"the median error-rate increase over {len(increases)} boxes"
    limit = spec.max_error_rate_increase
    return _median_gate("errors", increases, limit, spec, what, lambda v: f"{v:+.1%}")


def selftest_gate(pairs: Sequence[BoxPair], spec: GatesSpec) -> GateResult:
    """Boxes whose new version's self-test failed."""
    reported = [pair for pair in pairs if pair.new is not None and pair.new.selftest_ok is not None]
    bad = [pair.ref for pair in reported if pair.new is not None and pair.new.selftest_ok is False]
    return _count_gate(
        "selftest", "failed its self-test", bad, len(reported), spec.max_selftest_failures
    )


def drift_gate(pairs: Sequence[BoxPair], spec: GatesSpec) -> GateResult:
    """Boxes reporting a drift alert on the new version."""
    reported = [pair for pair in pairs if pair.new is not None and pair.new.drift_alert is not None]
    bad = [pair.ref for pair in reported if pair.new is not None and pair.new.drift_alert is True]
    return _count_gate("drift", "raised a drift alert", bad, len(reported), spec.max_drift_alerts)


def error_rate(sample: Sample) -> float | None:
    """Requests not answered `ok` over all requests counted; None without requests."""
    outcomes = sample.outcomes or {}
    total = sum(outcomes.values())
    if total <= 0:
        return None
    return (total - outcomes.get(OK_OUTCOME, 0)) / total


def _p95_ratio(old: Sample | None, new: Sample | None, min_samples: int) -> float | None:
    if old is None or new is None:
        return None
    if (old.samples or 0) < min_samples or (new.samples or 0) < min_samples:
        return None
    if old.p95 is None or new.p95 is None or old.p95 <= 0:
        return None
    return new.p95 / old.p95


def _error_increase(old: Sample | None, new: Sample | None, min_samples: int) -> float | None:
    if old is None or new is None:
        return None
    if _requests(old) < min_samples or _requests(new) < min_samples:
        return None
    old_rate, new_rate = error_rate(old), error_rate(new)
    if old_rate is None or new_rate is None:
        return None
    return new_rate - old_rate


def _requests(sample: Sample) -> int:
    return sum((sample.outcomes or {}).values())


def _median_gate(
    name: GateName,
    values: Sequence[float],
    limit: float,
    spec: GatesSpec,
    what: str,
    show: Callable[[float], str],
) -> GateResult:
    needed = spec.min_boxes
    if len(values) < needed:
        value = statistics.median(values) if values else None
        detail = (
            f"{len(values)} boxes have enough telemetry of both versions (at least "
            f"{spec.min_samples} samples each); {needed} are needed to judge {name}"
        )
        return GateResult(name, "insufficient", value, limit, len(values), needed, detail)
    median = statistics.median(values)
    status: GateStatus = "fail" if median > limit else "pass"
    verdict = "over" if status == "fail" else "within"
    detail = f"{what} is {show(median)}, {verdict} the limit of {show(limit)}"
    return GateResult(name, status, median, limit, len(values), needed, detail)


def _count_gate(
    name: GateName, happened: str, refs: Sequence[str], reported: int, limit: int
) -> GateResult:
    status: GateStatus = "fail" if len(refs) > limit else "pass"
    listed = f" ({', '.join(sorted(refs)[:10])}{', ...' if len(refs) > 10 else ''})" if refs else ""
    detail = (
        f"{len(refs)} of {reported} boxes reporting on the new version {happened}{listed}; "
        f"at most {limit} allowed"
    )
    return GateResult(name, status, float(len(refs)), float(limit), reported, 0, detail)


# ---- shadow gates -------------------------------------------------------------------------
SHOWN_DISAGREEMENTS = 20


@dataclass(frozen=True)
class BoxShadow:
    """One box's latest shadow figures for the candidate, and its active version's p95."""

    ref: str
    compared: int
    agreement: float | None
    disagreements: tuple[tuple[str, str, int], ...]  # (active label, candidate label, photos)
    candidate_p95: float | None = None
    active_p95: float | None = None


def shadow_gates(boxes: Sequence[BoxShadow], spec: ShadowSpec) -> list[GateResult]:
    """The shadow gate, and the candidate p95 gate when the plan sets its limit."""
    results = [shadow_gate(boxes, spec)]
    if spec.max_candidate_p95_ratio is not None:
        results.append(shadow_p95_gate(boxes, spec.max_candidate_p95_ratio))
    return results


def shadow_gate(boxes: Sequence[BoxShadow], spec: ShadowSpec) -> GateResult:
    """Agreement over every compared photo of the boxes (weighted by photos), failing below
    `min_agreement` or with fewer than `min_compared` photos; per-class disagreements shown."""
    counted = [box for box in boxes if box.agreement is not None and box.compared > 0]
    compared = sum(box.compared for box in counted)
    agreed = sum(round((box.agreement or 0.0) * box.compared) for box in counted)
    classes: Counter[tuple[str, str]] = Counter()
    for box in counted:
        for active, candidate, count in box.disagreements:
            classes[(active, candidate)] += count
    ranked = classes.most_common(SHOWN_DISAGREEMENTS)
    figures = {
        "boxes": len(counted),
        "compared": compared,
        "agreed": agreed,
        "disagreements": [{"active": a, "candidate": c, "count": n} for (a, c), n in ranked],
        "per_box": [
            {"ref": box.ref, "compared": box.compared, "agreement": box.agreement}
            for box in sorted(counted, key=lambda box: box.ref)
        ],
    }
    agreement = agreed / compared if compared else None
    limit = spec.min_agreement
    shown = ", ".join(f"{a}->{c} {n}" for (a, c), n in ranked[:5]) or "none"
    if agreement is None or compared < spec.min_compared:
        detail = (
            f"only {compared} photos were compared on {len(counted)} boxes while shadowing; "
            f"at least {spec.min_compared} are needed before activating: lengthen [shadow] "
            "soak_s or send the boxes more traffic"
        )
        return GateResult(
            "shadow", "fail", agreement, limit, compared, spec.min_compared, detail, figures
        )
    status: GateStatus = "fail" if agreement < limit else "pass"
    verdict = "under" if status == "fail" else "at or above"
    detail = (
        f"the candidate agreed with the active model on {agreed} of {compared} photos "
        f"({agreement:.1%}) over {len(counted)} boxes, {verdict} the {limit:.1%} needed; "
        f"disagreements (active->candidate): {shown}"
    )
    return GateResult(
        "shadow", status, agreement, limit, compared, spec.min_compared, detail, figures
    )


def shadow_p95_gate(boxes: Sequence[BoxShadow], limit: float) -> GateResult:
    """Median over boxes of the candidate's shadow p95 over the active version's p95."""
    ratios = [
        box.candidate_p95 / box.active_p95
        for box in boxes
        if box.candidate_p95 is not None and box.active_p95 is not None and box.active_p95 > 0
    ]
    if not ratios:
        detail = "no box reported both the candidate's and the active version's p95 yet"
        return GateResult("shadow_p95", "insufficient", None, limit, 0, 1, detail)
    median = statistics.median(ratios)
    status: GateStatus = "fail" if median > limit else "pass"
    verdict = "over" if status == "fail" else "within"
    detail = (
        f"the median candidate p95 over the active version's p95 on {len(ratios)} boxes is "
        f"{median:.2f}x, {verdict} the limit of {limit:.2f}x"
    )
    return GateResult("shadow_p95", status, median, limit, len(ratios), 1, detail)
