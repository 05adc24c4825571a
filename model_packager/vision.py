"""The image-classifier pipeline: an ONNX or HF image classifier into the contents of an
image-classification bundle (runtime "onnx").

Steps: read the calibration and evaluation images -> export the fp32 reference -> reference
outputs for the box's own check -> choose the quantization and recipe per CPU class
(`choose.py`) -> benchmark decode + preprocess + infer -> golden samples, drift baseline,
knowledge base -> manifest body, report and summary. `plan_vision` does this pipeline's cheap
checks (the knowledge base, the target hardware) before any of it. `model_packager.build` owns
everything around it: the option checks, signing and the atomic write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edge_bundle.bundle import SourceFile
from edge_bundle.knowledge import KNOWLEDGE_FILE, KnowledgeBase
from edge_bundle.manifest import BundleId, ClassEvaluation, Lineage, ManifestBody
from edge_bundle.profile_host import HostMatch, matches_host
from edge_bundle.profiles import HardwareProfile
from model_packager import recipes, references
from model_packager.benchmark import Timing, benchmark_record, measure_pipeline
from model_packager.choose import QuantizationChoice, choose_quantization
from model_packager.datasets import ImageSample, load_calibration, load_labelled
from model_packager.errors import GateError
from model_packager.evaluate import validation_record
from model_packager.export import export_reference
from model_packager.golden import (
    choose_golden,
    drift_baseline,
    golden_files,
    golden_record,
    write_golden,
)
from model_packager.inference import output_kind, predict_all, tensor_specs
from model_packager.knowledge import read_knowledge
from model_packager.onnx_tools import make_session, run_probs
from model_packager.options import BuildOptions
from model_packager.progress import Progress
from model_packager.report import ReportData, render_report
from model_packager.sources import Source


@dataclass(frozen=True)
class VisionPlan:
    """What the cheap checks established for an image classifier, before any slow step."""

    options: BuildOptions
    bundle_id: BundleId
    profile: HardwareProfile
    source: Source
    knowledge: KnowledgeBase | None
    warnings: list[str]
    host: HostMatch
    packager_version: str


@dataclass(frozen=True)
class VisionContents:
    """The bundle's files (report excluded), its manifest body, the report page and a summary."""

    files: dict[str, Path | SourceFile]
    body: ManifestBody
    report_html: str
    summary: tuple[str, ...]


def plan_vision(
    options: BuildOptions,
    source: Source,
    profile: HardwareProfile,
    bundle_id: BundleId,
    packager_version: str,
) -> VisionPlan:
    """Read the knowledge base and match the host: the image pipeline's cheap checks."""
    knowledge, warnings = read_knowledge(options.knowledge, source.labels)
    host = matches_host(profile)
    return VisionPlan(
        options, bundle_id, profile, source, knowledge, warnings, host, packager_version
    )


def package_vision(plan: VisionPlan, work: Path, progress: Progress) -> VisionContents:
    """Build the contents of an image-classification bundle; raise a `PackagerError` saying what
    to fix."""
    options, spec, labels = plan.options, plan.source.preprocessing, plan.source.labels
    calibration = _load(
        options.calibration, progress, "calibration", lambda d: load_calibration(d, spec)
    )
    evaluation = _load(
        options.eval_dir, progress, "evaluation", lambda d: load_labelled(d, spec, labels)
    )
    validation_set = evaluation or calibration
    progress.step(f"exporting {plan.source.describe()}")
    reference_path = export_reference(plan.source, work)
    reference = make_session(reference_path, plan.profile.onnx.intra_op_threads)
    reference_probs = predict_all(reference, validation_set, len(labels), progress.bar("reference"))
    progress.step("reference outputs for the box's own check")
    chosen = [validation_set[i] for i in references.choose(reference_probs)]
    reference_set = references.build(chosen, spec, lambda t: run_probs(reference, t))
    choice = choose_quantization(
        mode=options.quantization,
        profile=plan.profile,
        on_target=plan.host.matches,
        reference_path=reference_path,
        reference=reference,
        reference_probs=reference_probs,
        calibration=calibration,
        validation_set=validation_set,
        labels=labels,
        policy=options.policy,
        method=options.calibration_method,
        work=work,
        progress=progress,
        references=reference_set,
        recipe=recipes.by_name(options.recipe) if options.recipe else None,
    )
    progress.step("benchmarking decode + preprocess + infer")
    probe = validation_set[0].path.read_bytes()
    before = measure_pipeline(reference, probe, spec, samples=options.bench_samples)
    after = measure_pipeline(choice.candidate.session, probe, spec, samples=options.bench_samples)
    notes = [*choice.outcome.notes, *_latency_gate(plan, after)]
    progress.step("golden samples, drift baseline, report")
    files, body = _contents(
        plan, work, choice, calibration, evaluation, validation_set, before, after, notes, progress
    )
    files.update(references.write(reference_set, work / "bundle"))
    body = body.model_copy(
        update={
            "reference_check": references.record(
                reference_set,
                options.policy,
                choice.expected_on_references,
                choice.judged_class,
            )
        }
    )
    report = render_report(_report_data(plan, body, choice, reference_path, before, after, notes))
    summary = _summary(plan, reference_path, choice, before, after)
    return VisionContents(files, body, report, summary)


def _contents(
    plan: VisionPlan,
    work: Path,
    choice: QuantizationChoice,
    calibration: list[ImageSample],
    evaluation: list[ImageSample],
    validation_set: list[ImageSample],
    before: Timing,
    after: Timing,
    notes: list[str],
    progress: Progress,
) -> tuple[dict[str, Path | SourceFile], ManifestBody]:
    """The files of the bundle and its manifest body."""
    options, spec, labels = plan.options, plan.source.preprocessing, plan.source.labels
    candidate = choice.candidate
    files: dict[str, Path | SourceFile] = {"model.onnx": SourceFile(candidate.path, "model")}
    chosen = [validation_set[i] for i in choose_golden(candidate.probs, options.golden_count)]
    goldens = golden_files(chosen, spec)
    files.update(write_golden(goldens, work / "bundle"))
    golden = golden_record(goldens, spec, candidate.predict, labels, options.golden_tolerance)
    if calibration and calibration is not validation_set:
        baseline_probs = predict_all(
            candidate.session, calibration, len(labels), progress.bar("drift baseline")
        )
    else:
        baseline_probs = candidate.probs
    if plan.knowledge is not None:
        kb_path = work / "bundle" / KNOWLEDGE_FILE
        kb_path.write_bytes(plan.knowledge.to_bytes())
        files[KNOWLEDGE_FILE] = SourceFile(kb_path, "knowledge")
    base_sha, adapter_sha = plan.source.lineage_hashes()
    threads = plan.profile.onnx.intra_op_threads
    benchmark = benchmark_record(
        plan.profile.name,
        after,
        threads=threads,
        on_target=plan.host.matches,
        extra={
            "reference_p50_ms": round(before.p50, 3),
            "reference_p95_ms": round(before.p95, 3),
            "budget_p95_ms": float(plan.profile.budgets.latency_p95_ms),
            "speedup_p50": round(before.p50 / after.p50, 3),
        },
    )
    body = ManifestBody(
        name=plan.bundle_id.name,
        version=plan.bundle_id.version,
        created_at=datetime.now(UTC),
        task="image-classification",
        runtime="onnx",
        inputs=tensor_specs(candidate.session.get_inputs()),
        outputs=tensor_specs(candidate.session.get_outputs()),
        preprocessing=spec.model_dump(mode="json"),
        labels=labels,
        quantization=choice.record(),
        validation=validation_record(
            choice.comparison,
            choice.outcome,
            _dataset(evaluation, calibration),
            choice.classes,
            choice.judged_class,
        ),
        benchmarks=(benchmark,),
        compatible_profiles=(plan.profile.name,),
        lineage=Lineage(
            base_model_sha256=base_sha,
            adapter_sha256=adapter_sha,
            source=plan.source.describe(),
            packager_version=plan.packager_version,
        ),
        drift_baseline=drift_baseline(calibration or validation_set, baseline_probs),
        golden=golden,
        knowledge_path=KNOWLEDGE_FILE if plan.knowledge is not None else None,
        explainer=options.explainer,
        anomaly_gate=options.anomaly_gate,
        extra={
            "output_kind": output_kind(candidate.session, validation_set[0].tensor),
            "quantization_choice": choice.reason,
            "notes": notes,
            "warnings": plan.warnings,
        },
    )
    return files, body


def _report_data(
    plan: VisionPlan,
    body: ManifestBody,
    choice: QuantizationChoice,
    reference_path: Path,
    before: Timing,
    after: Timing,
    notes: list[str],
) -> ReportData:
    validation = body.validation
    assert validation is not None and body.golden is not None
    machine = body.benchmarks[0].machine
    comparison = choice.comparison
    accuracy = None
    if comparison.reference_accuracy is not None and comparison.candidate_accuracy is not None:
        accuracy = (comparison.reference_accuracy, comparison.candidate_accuracy)
    return ReportData(
        bundle_id=str(plan.bundle_id),
        source=plan.source.describe(),
        profile=plan.profile.name,
        created_at=body.created_at.isoformat(timespec="seconds"),
        quantization=choice.candidate.mode.value,
        quantization_reason=choice.reason,
        size_before=reference_path.stat().st_size,
        size_after=choice.candidate.path.stat().st_size,
        latency_before=(before.p50, before.p95),
        latency_after=(after.p50, after.p95),
        latency_samples=after.samples_ms,
        machine=f"{machine.cpu} ({machine.cores} cores)",
        threads=plan.profile.onnx.intra_op_threads,
        on_target=plan.host.matches,
        dataset=validation.dataset or "",
        metrics=validation.metrics,
        gates=validation.gates,
        waived=validation.waived_reason,
        notes=notes,
        labels=plan.source.labels,
        confusion=comparison.confusion,
        confusion_axis=comparison.confusion_axis,
        missing_knowledge=_missing_knowledge(plan),
        golden_count=len(body.golden.samples),
        golden_tolerance=body.golden.tolerance,
        golden_k=max((len(s.expected_topk) for s in body.golden.samples), default=0),
        accuracy=accuracy,
        judged_class=validation.judged_class,
        classes=validation.cpu_classes,
        trials=body.quantization.trials if body.quantization else (),
    )


def _missing_knowledge(plan: VisionPlan) -> list[str]:
    if plan.knowledge is None:
        return list(plan.source.labels)
    return [label for label in plan.source.labels if plan.knowledge.entry(label) is None]


def _load(
    directory: Path | None,
    progress: Progress,
    what: str,
    loader: Callable[[Path], list[ImageSample]],
) -> list[ImageSample]:
    if directory is None:
        return []
    progress.step(f"reading {what} images from {directory}")
    return loader(directory)


def _latency_gate(plan: VisionPlan, after: Timing) -> list[str]:
    budget = float(plan.profile.budgets.latency_p95_ms)
    if not plan.options.enforce_latency:
        return []
    if not plan.host.matches:
        reasons = "; ".join(plan.host.reasons)
        return [f"latency budget not enforced: this machine does not match the profile ({reasons})"]
    if after.p95 > budget:
        raise GateError(
            f"p95 latency {after.p95:.1f} ms is over the profile's budget of {budget:.0f} ms; "
            "try int8-static, a smaller model, or a profile for stronger hardware"
        )
    return [f"latency budget enforced: p95 {after.p95:.1f} ms <= {budget:.0f} ms"]


def _class_line(record: ClassEvaluation) -> str:
    if record.how == "not-evaluated":
        return f"{record.cpu_class}: not evaluated ({record.note})"
    metrics = record.metrics
    confident = metrics.get("confident_top1_agreement")
    figures = (
        f"confident top-1 {confident:.2%} of {metrics.get('confident_samples', 0):.0f}, "
        if confident is not None
        else ""
    )
    verdict = "passes" if all(g.passed for g in record.gates) else "FAILS"
    return (
        f"{record.cpu_class} ({record.how}): {figures}top-1 {metrics.get('top1_agreement', 0):.2%}, "
        f"top-5 {metrics.get('top5_containment', 0):.2%} of {metrics.get('samples', 0):.0f}: {verdict}"
    )


def _dataset(evaluation: list[ImageSample], calibration: list[ImageSample]) -> str:
    if evaluation:
        return f"{len(evaluation)} labelled evaluation images"
    return f"{len(calibration)} calibration images (no labels)"


def _summary(
    plan: VisionPlan,
    reference_path: Path,
    choice: QuantizationChoice,
    before: Timing,
    after: Timing,
) -> tuple[str, ...]:
    comparison = choice.comparison
    size_before = reference_path.stat().st_size
    size_after = choice.candidate.path.stat().st_size
    lines = [
        f"quantized   {choice.candidate.mode.value} ({choice.reason})",
        f"size        {size_before / 1e6:.2f} MB -> {size_after / 1e6:.2f} MB "
        f"({size_before / max(size_after, 1):.2f}x smaller)",
        f"latency     p50 {before.p50:.2f} -> {after.p50:.2f} ms, p95 {before.p95:.2f} -> "
        f"{after.p95:.2f} ms ({'on' if plan.host.matches else 'NOT on'} target hardware)",
        f"agreement   top-1 {comparison.agreement:.2%}, top-5 containment {comparison.top5_containment:.2%}",
    ]
    for record in choice.classes:
        lines.append(f"cpu class   {_class_line(record)}")
    if comparison.reference_accuracy is not None and comparison.candidate_accuracy is not None:
        lines.append(
            f"accuracy    {comparison.reference_accuracy:.2%} -> {comparison.candidate_accuracy:.2%}"
        )
    if choice.outcome.failed:
        lines.append(
            f"WAIVED      {len(choice.outcome.failed)} gate(s): {choice.outcome.waived_reason}"
        )
    return tuple(lines)
