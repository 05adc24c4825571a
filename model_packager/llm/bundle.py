"""The contents of a language-model bundle from what `package.py` measured: the model
and pinned template files, the manifest body (generation section, validation, benchmark,
lineage), the report page and the command's summary lines."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from edge_bundle.bundle import SourceFile
from edge_bundle.knowledge import KNOWLEDGE_FILE, KnowledgeBase
from edge_bundle.manifest import (
    Benchmark,
    ChatTemplate,
    Generation,
    Lineage,
    ManifestBody,
    Quantization,
    TextGolden,
    Validation,
    Vision,
)
from model_packager.benchmark import machine_info
from model_packager.gguf_header import GgufInfo
from model_packager.llm.eval import GenerationTiming
from model_packager.llm.plan import GgufChoice, LlmPlan
from model_packager.llm.template import TEMPLATE_FILE, PinnedTemplate
from model_packager.llm.vision import VisionOutcome
from model_packager.report import LlmReportData, render_llm_report

MODEL_FILE = "model.gguf"
PROJECTOR_FILE = "mmproj.gguf"


@dataclass(frozen=True)
class LlmContents:
    """The bundle's files (report excluded), its manifest body, the report page and a summary."""

    files: dict[str, Path | SourceFile]
    body: ManifestBody
    report_html: str
    summary: tuple[str, ...]


@dataclass
class LlmOutcome:
    """What the build measured, for the manifest, the report and the summary."""

    candidate: Path
    info: GgufInfo
    reference: Path | None
    context: int
    validation: Validation
    golden: tuple[TextGolden, ...]
    timing: GenerationTiming
    notes: list[str] = field(default_factory=list)
    vision: VisionOutcome | None = None


def _benchmark(plan: LlmPlan, outcome: LlmOutcome) -> Benchmark:
    timing, llama = outcome.timing, plan.profile.llama
    machine = machine_info()
    versions = dict(machine.library_versions)
    with contextlib.suppress(metadata.PackageNotFoundError):
        versions["llama-cpp-python"] = metadata.version("llama_cpp_python")
    return Benchmark(
        profile=plan.profile.name,
        machine=machine.model_copy(update={"library_versions": versions}),
        measured_on_target=plan.host.matches,
        threads=llama.threads,
        p50_ms=round(timing.per_token.p50, 3),
        p95_ms=round(timing.per_token.p95, 3),
        samples=len(timing.per_token.samples_ms),
        metrics={
            **(outcome.vision.timing if outcome.vision is not None else {}),
            "prompt_tokens_per_s": round(timing.prompt_tokens_per_s, 2),
            "generation_tokens_per_s": round(timing.generation_tokens_per_s, 2),
            "ttft_ms": round(timing.ttft_ms, 3),
            "n_threads": float(llama.threads),
            "n_threads_batch": float(llama.threads_batch),
            "prompt_tokens": float(timing.prompt_tokens),
        },
    )


def bundle_contents(
    plan: LlmPlan,
    choice: GgufChoice,
    template: PinnedTemplate | None,
    outcome: LlmOutcome,
    work: Path,
    knowledge: KnowledgeBase | None = None,
) -> LlmContents:
    """The model (and pinned template) files, the manifest body, the report and the summary."""
    files: dict[str, Path | SourceFile] = {MODEL_FILE: SourceFile(outcome.candidate, "model")}
    pinned = None
    if template is not None:
        path = work / TEMPLATE_FILE
        path.write_bytes(template.text.encode("utf-8"))
        files[TEMPLATE_FILE] = SourceFile(path, "tokenizer")
        origin = template.origin[:200]  # the manifest's limit; a long file name is cut
        pinned = ChatTemplate(path=TEMPLATE_FILE, sha256=template.sha256, source=origin)
    vision = _vision(outcome, files)
    if knowledge is not None:
        path = work / KNOWLEDGE_FILE
        path.write_bytes(knowledge.to_bytes())
        files[KNOWLEDGE_FILE] = SourceFile(path, "knowledge")
    base_sha, adapter_sha = plan.source.lineage_hashes()
    benchmark = _benchmark(plan, outcome)
    body = ManifestBody(
        name=plan.bundle_id.name,
        version=plan.bundle_id.version,
        created_at=datetime.now(UTC),
        task="vision-language" if vision is not None else "text-generation",
        runtime="llama",
        labels=plan.labels if vision is not None and vision.classify_prompt else (),
        knowledge_path=KNOWLEDGE_FILE if knowledge is not None else None,
        quantization=Quantization(
            method=choice.quantization,
            weight_type=outcome.info.file_type,
            notes=choice.reason,
        ),
        validation=outcome.validation,
        benchmarks=(benchmark,),
        compatible_profiles=(plan.profile.name,),
        lineage=Lineage(
            base_model_sha256=base_sha,
            adapter_sha256=adapter_sha,
            source=plan.source.describe(),
            packager_version=plan.packager_version,
        ),
        generation=Generation(
            context_size=outcome.context,
            chat_template=pinned,
            golden=outcome.golden,
            stop=template.stop if template is not None else (),
            vision=vision,
        ),
        extra={
            "gguf": {
                "architecture": outcome.info.architecture,
                "file_type": outcome.info.file_type,
                "tensors": outcome.info.tensors,
                "trained_context": outcome.info.context_length,
            },
            "chat": "chat template pinned" if template else "plain completion only",
            **(_projector_extra(outcome.vision) if outcome.vision is not None else {}),
            "notes": outcome.notes,
        },
    )
    report = render_llm_report(_report_data(plan, choice, template, outcome, body, benchmark))
    return LlmContents(files, body, report, _summary(plan, choice, template, outcome))


def _vision(outcome: LlmOutcome, files: dict[str, Path | SourceFile]) -> Vision | None:
    """The projector and golden photos added to `files`, and the manifest's vision section."""
    measured = outcome.vision
    if measured is None:
        return None
    files[PROJECTOR_FILE] = SourceFile(measured.projector, "mmproj")
    for name, path in measured.golden_files.items():
        files[name] = SourceFile(path, "golden")
    return Vision(
        projector=PROJECTOR_FILE,
        projector_type=measured.pair.projector_type,
        embedding_width=measured.pair.embedding_width,
        image_side=measured.image_side,
        image_tokens=measured.image_tokens,
        golden=measured.golden,
        classify_prompt=measured.classify_prompt,
    )


def _projector_extra(measured: VisionOutcome) -> dict[str, object]:
    return {
        "projector": {
            "type": measured.pair.projector_type,
            "file_type": "f16 (as converted: no gate measures a quantized projector)",
            "size_bytes": measured.projector.stat().st_size,
            "image_side": measured.image_side,
            "image_tokens": measured.image_tokens,
        }
    }


def _projector_notes(measured: VisionOutcome | None) -> list[str]:
    if measured is None:
        return []
    timing = measured.timing
    return [
        f"projector {PROJECTOR_FILE}: {measured.pair.projector_type}, f16 as converted, "
        f"{measured.projector.stat().st_size / 1e6:.2f} MB; photos scaled to "
        f"{measured.image_side} px on the longer side, {measured.image_tokens} context tokens each",
        f"photo path: encode {timing['image_encode_ms']:.1f} ms, first token "
        f"{timing['ttft_image_ms']:.1f} ms after a photo (median of 3)",
    ]


def _report_data(
    plan: LlmPlan,
    choice: GgufChoice,
    template: PinnedTemplate | None,
    outcome: LlmOutcome,
    body: ManifestBody,
    benchmark: Benchmark,
) -> LlmReportData:
    validation = outcome.validation
    return LlmReportData(
        bundle_id=str(plan.bundle_id),
        source=plan.source.describe(),
        profile=plan.profile.name,
        created_at=body.created_at.isoformat(timespec="seconds"),
        quantization=choice.quantization,
        quantization_reason=choice.reason,
        size_reference=outcome.reference.stat().st_size if outcome.reference else None,
        size_bundle=outcome.candidate.stat().st_size,
        machine=f"{benchmark.machine.cpu} ({benchmark.machine.cores} cores)",
        threads=benchmark.threads,
        on_target=plan.host.matches,
        dataset=validation.dataset or "",
        metrics=validation.metrics,
        gates=validation.gates,
        waived=validation.waived_reason,
        notes=[*outcome.notes, *_projector_notes(outcome.vision)],
        context_size=outcome.context,
        template_origin=template.origin if template else None,
        template_sha256=template.sha256 if template else None,
        stop=template.stop if template else (),
        golden=tuple((g.prompt, g.expected_text) for g in outcome.golden)
        + tuple(
            (f"{g.prompt} [photo {', '.join(g.images)}]", g.expected_text)
            for g in (outcome.vision.golden if outcome.vision is not None else ())
        ),
        timing={
            **benchmark.metrics,
            "p50_ms": benchmark.p50_ms,
            "p95_ms": benchmark.p95_ms,
        },
        token_samples=outcome.timing.per_token.samples_ms,
    )


def _summary(
    plan: LlmPlan, choice: GgufChoice, template: PinnedTemplate | None, outcome: LlmOutcome
) -> tuple[str, ...]:
    metrics, timing = outcome.validation.metrics, outcome.timing
    size = outcome.candidate.stat().st_size / 1e6
    lines = [
        f"quantized   {choice.quantization} ({choice.reason}), {size:.2f} MB",
        f"context     {outcome.context} tokens",
        f"template    {template.origin if template else 'none: plain completion only'}",
        f"speed       {timing.generation_tokens_per_s:.1f} tokens/s generation, "
        f"{timing.prompt_tokens_per_s:.1f} tokens/s prompt, first token {timing.ttft_ms:.0f} ms "
        f"({'on' if plan.host.matches else 'NOT on'} target hardware)",
    ]
    if "reference_perplexity" in metrics:
        lines.append(
            f"perplexity  {metrics['reference_perplexity']:.3f} -> "
            f"{metrics['candidate_perplexity']:.3f} "
            f"({metrics['perplexity_increase_pct']:+.2f}%)"
        )
    else:
        lines.append(f"perplexity  {metrics['candidate_perplexity']:.3f} (no reference)")
    if outcome.vision is not None:
        measured = outcome.vision
        size = measured.projector.stat().st_size / 1e6
        lines.append(
            f"projector   {measured.pair.projector_type}, f16, {size:.2f} MB; photos scaled to "
            f"{measured.image_side} px, {measured.image_tokens} tokens each"
        )
        lines.append(
            f"photo       encode {measured.timing['image_encode_ms']:.0f} ms, first token "
            f"{measured.timing['ttft_image_ms']:.0f} ms after the photo; "
            f"{len(measured.golden)} golden completions with photos"
        )
    if outcome.validation.waived_reason:
        lines.append(f"WAIVED      {outcome.validation.waived_reason}")
    return tuple(lines)
