"""Language-model bundles: a HF causal LM (+ LoRA) or a GGUF file into the contents of a signed
text-generation bundle (runtime "llama").

Steps: pick and check the chat template (cheap, first) -> choose the quantization -> convert HF
to GGUF f16 (the reference) -> quantize with llama.cpp -> validate the candidate against the
reference by perplexity on an evaluation text (gated) -> golden greedy completions -> benchmark at
the profile's threads -> manifest body and report (`bundle.py`). `model_packager.build` owns
everything around it: the option checks, signing and the atomic write.

An already-quantized GGUF has no reference: it is packaged as it is (its perplexity recorded, not
gated). Re-quantizing a quantized file is refused: a second rounding on top of the first loses
more than quantizing once from the original, so the user is sent back to the f16/HF model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edge_bundle.chat_template import as_parts, render_chat
from edge_bundle.gguf_fields import read_fields
from edge_bundle.llama_vision import IMAGE_MARKER
from edge_bundle.manifest import Gate, TextGolden, Validation
from model_packager.errors import GateError, PackagerError, QuantizationError, SourceError
from model_packager.gguf_header import GGUF_FILE_TYPES, GgufInfo, read_gguf_info
from model_packager.knowledge import read_knowledge
from model_packager.llm.bundle import LlmContents, LlmOutcome, bundle_contents
from model_packager.llm.eval import (
    DEFAULT_EVAL_TEXT,
    EVAL_WINDOW,
    GOLDEN_PROMPT,
    GOLDEN_TOKENS,
    Likelihood,
    golden_completion,
    likelihood,
    loaded,
    measure_generation,
)
from model_packager.llm.gguf import convert_to_gguf, merge_adapter, probe_load, quantize_gguf
from model_packager.llm.plan import GgufChoice, LlmPlan
from model_packager.llm.template import PinnedTemplate, choose_template
from model_packager.llm.vision import (
    check_labels,
    check_pair,
    golden_photos,
    kv_cache_mb,
    vision_outcome,
)
from model_packager.progress import Progress
from model_packager.sources import LlmSource

# Largest relative perplexity increase (percent) over the f16 reference, per quantization.
# llama.cpp's published tables for 7B models show about +0.01% for q8_0, +1% for q5_k_m and +3%
# for q4_k_m; models under 1B parameters lose two to three times more, so these leave that margin.
DEFAULT_MAX_PERPLEXITY_INCREASE = {"f16": 0.5, "q8_0": 1.0, "q5_k_m": 5.0, "q4_k_m": 10.0}
CHAT_GOLDEN_QUESTION = "Why do brackets from press 3 show burrs?"


def package_llm(plan: LlmPlan, work: Path, progress: Progress) -> LlmContents:
    """Build the contents of a text-generation bundle; raise a `PackagerError` saying what to fix."""
    template, notes = choose_template(plan.source, plan.chat_template)
    check_labels(plan.labels)
    knowledge, warnings = read_knowledge(plan.knowledge, plan.labels) if plan.labels else (None, [])
    notes += warnings
    choice = choose_quantization(plan)
    eval_text, dataset = _eval_text(plan.eval_text)
    reference, projector = prepare_reference(plan.source, work, progress)
    if choice.as_is:
        candidate = plan.source.path
    elif reference is not None and plan.source.kind == "hf" and choice.quantization == "f16":
        candidate = reference  # the converter already wrote f16
    else:
        assert reference is not None, "only an unquantized source is quantized"
        candidate, fallbacks = _quantized(reference, choice.quantization, plan, work, progress)
        notes += fallbacks
    info = read_gguf_info(candidate)
    context = _context_size(plan, info)
    pair = check_pair(candidate, projector) if projector is not None else None
    photos = golden_photos(plan.golden_images, pair.image_size) if pair is not None else []
    progress.step(f"validating on {dataset}")
    validation = _validate(plan, choice, (reference, candidate), context, eval_text, dataset, notes)
    if projector is not None:
        validation = _with_memory_gate(plan, validation, candidate, projector, context)
    threads = plan.profile.llama
    progress.step(f"golden completions and benchmark at {threads.threads} thread(s)")
    vision = None
    with loaded(
        candidate, context=context, threads=threads.threads, threads_batch=threads.threads_batch
    ) as llm:
        golden = _golden(llm, template, vision=projector is not None)
        timing = measure_generation(llm, eval_text, tokens=plan.bench_tokens)
        if projector is not None and pair is not None and template is not None:
            progress.step("golden completions with photos and the image benchmark")
            vision = vision_outcome(
                llm,
                projector,
                pair,
                template,
                photos,
                work,
                threads=threads.threads,
                labels=plan.labels,
            )
    outcome = LlmOutcome(
        candidate, info, reference, context, validation, golden, timing, notes, vision
    )
    return bundle_contents(plan, choice, template, outcome, work, knowledge)


def choose_quantization(plan: LlmPlan) -> GgufChoice:
    """The GGUF quantization to ship, refusing what the profile or the source rules out."""
    mode, source, profile = plan.quantization, plan.source, plan.profile
    allowed = [q for q in profile.quantization.allowed if q in GGUF_FILE_TYPES]
    if mode != "auto" and mode not in GGUF_FILE_TYPES:
        raise QuantizationError(
            f"--quantization {mode} is for ONNX models; a language model takes "
            f"auto, {', '.join(GGUF_FILE_TYPES)}"
        )
    if source.gguf is not None and source.gguf.quantized:
        current = source.gguf.file_type
        if mode not in ("auto", current):
            raise QuantizationError(
                f"{source.path.name} is already quantized ({current}); quantizing it again to "
                f"{mode} would add a second rounding error to the first. Package it as it is "
                f"(--quantization auto or {current}) or start from the f16 GGUF or HF model"
            )
        if current not in allowed:
            raise QuantizationError(
                f"{source.path.name} is {current}, which profile {profile.name} does not allow "
                f"(allowed: {', '.join(allowed) or 'no GGUF quantization'}); start from the "
                "f16 GGUF or HF model to build an allowed one"
            )
        return GgufChoice(current, True, "already quantized: packaged as it is")
    target = profile.quantization.preferred_gguf if mode == "auto" else mode
    if target not in allowed:
        raise QuantizationError(
            f"{target} is not allowed by profile {profile.name} "
            f"(allowed: {', '.join(allowed) or 'no GGUF quantization'}); pick one of those"
        )
    reason = "the profile's preferred GGUF quantization" if mode == "auto" else "requested"
    as_is = source.gguf is not None and source.gguf.file_type == target
    return GgufChoice(target, as_is, reason + (", the source already is" if as_is else ""))


def prepare_reference(
    source: LlmSource, work: Path, progress: Progress
) -> tuple[Path | None, Path | None]:
    """The unquantized GGUF every measurement compares with (None for a quantized GGUF), and
    for a vision-language model its projector (mmproj GGUF)."""
    if source.kind == "gguf":
        probe_load(source.path)
        return (None if source.quantized else source.path), source.projector
    model_dir = source.path
    if source.adapter is not None:
        progress.step(f"merging LoRA adapter {source.adapter.name}")
        model_dir = merge_adapter(
            source.path,
            source.adapter,
            work / "merged",
            allow_pickle=source.uses_pickle,
            vision=source.vision,
        )
    progress.step(f"converting {source.describe()} to GGUF f16 (llama.cpp's converter)")
    reference = convert_to_gguf(model_dir, work / "reference-f16.gguf")
    probe_load(reference)
    projector = None
    if source.vision:
        progress.step("converting the vision tower to a projector (mmproj, f16)")
        projector = convert_to_gguf(model_dir, work / "mmproj-f16.gguf", projector=True)
    if source.adapter is not None:
        shutil.rmtree(model_dir, ignore_errors=True)  # the GGUFs hold it now; free the disk
    return reference, projector


def _quantized(
    reference: Path, quantization: str, plan: LlmPlan, work: Path, progress: Progress
) -> tuple[Path, list[str]]:
    progress.step(f"quantizing to {quantization} (llama.cpp)")
    target = work / f"model-{quantization}.gguf"
    notes = quantize_gguf(reference, target, quantization, threads=plan.profile.llama.threads)
    return target, notes


def _eval_text(path: Path | None) -> tuple[str, str]:
    if path is None:
        return DEFAULT_EVAL_TEXT, "the built-in evaluation text"
    try:
        return path.read_text(encoding="utf-8"), f"evaluation text {path.name}"
    except (OSError, UnicodeDecodeError) as exc:
        raise PackagerError(f"--eval-text {path} is not readable UTF-8 text ({exc})") from exc


def _context_size(plan: LlmPlan, info: GgufInfo) -> int:
    trained = info.context_length or plan.source.context_length
    context = min(plan.profile.llama.context_size, trained or plan.profile.llama.context_size)
    if context < 128:
        raise SourceError(
            f"the model was trained for {trained} tokens of context; a text-generation bundle "
            "needs at least 128"
        )
    return context


def _validate(
    plan: LlmPlan,
    choice: GgufChoice,
    models: tuple[Path | None, Path],
    context: int,
    text: str,
    dataset: str,
    notes: list[str],
) -> Validation:
    """Perplexity of the candidate (and reference), the gates, and the refusal or waiver."""
    reference, candidate = models
    threads = plan.profile.llama.threads
    window = min(EVAL_WINDOW, context)
    measured = likelihood(candidate, text, context=window, threads=threads)
    metrics = {
        "eval_tokens": float(measured.tokens),
        "candidate_perplexity": measured.perplexity,
        "candidate_nll": measured.nll,
        "candidate_size_mb": candidate.stat().st_size / 1e6,
    }
    gates = [_size_gate(plan, candidate)]
    if reference is not None and reference != candidate:
        base = likelihood(reference, text, context=window, threads=threads)
        metrics.update(_comparison(base, measured, reference))
        limit = plan.max_perplexity_increase
        if limit is None:
            limit = DEFAULT_MAX_PERPLEXITY_INCREASE[choice.quantization]
        increase = metrics["perplexity_increase_pct"]
        gates.insert(0, _gate("perplexity_increase_pct", limit, increase, increase <= limit))
    elif reference is None:
        notes.append("no unquantized reference: perplexity recorded, not gated")
    else:
        notes.append("unquantized: the bundle's model is the reference itself")
    failed = [gate for gate in gates if not gate.passed]
    if failed and plan.waive_reason is None:
        raise GateError(_refusal(failed))
    return Validation(
        metrics={name: round(value, 6) for name, value in metrics.items()},
        gates=tuple(gates),
        waived_reason=plan.waive_reason if failed else None,
        dataset=f"{dataset} ({measured.tokens} tokens)",
    )


def _refusal(failed: list[Gate]) -> str:
    lines = ["the bundle was not written: validation gates failed"]
    lines += [f"  {g.name}: {g.value:.4f} (threshold {g.threshold:.4f})" for g in failed]
    lines.append(
        "try: a milder quantization (q5_k_m or q8_0), a profile with a larger bundle budget, "
        "--max-perplexity-increase PCT if the evaluation text is unrepresentative, or "
        "--waive-gate REASON to ship it anyway with the reason recorded"
    )
    return "\n".join(lines)


def _comparison(base: Likelihood, measured: Likelihood, reference: Path) -> dict[str, float]:
    return {
        "reference_perplexity": base.perplexity,
        "reference_nll": base.nll,
        "perplexity_increase_pct": 100.0 * (measured.perplexity / base.perplexity - 1.0),
        "top1_token_agreement": base.agreement(measured),
        "reference_size_mb": reference.stat().st_size / 1e6,
    }


def _size_gate(plan: LlmPlan, candidate: Path) -> Gate:
    size_mb = candidate.stat().st_size / 1e6
    budget = float(plan.profile.budgets.max_bundle_mb)
    return _gate("bundle_size_mb", budget, size_mb, size_mb <= budget)


def _with_memory_gate(
    plan: LlmPlan, validation: Validation, candidate: Path, projector: Path, context: int
) -> Validation:
    """Text model + projector + the KV cache of the context must fit the profile's memory."""
    fields, _ = read_fields(candidate)
    weights = (candidate.stat().st_size + projector.stat().st_size) / 1e6
    needed = weights + kv_cache_mb(fields, context)
    budget = float(plan.profile.budgets.memory_mb)
    gate = _gate("memory_mb", budget, needed, needed <= budget)
    if not gate.passed and plan.waive_reason is None:
        raise GateError(
            f"the bundle was not written: text model, projector and a {context}-token KV cache "
            f"need about {needed:.0f} MB, over profile {plan.profile.name}'s memory budget of "
            f"{budget:.0f} MB; pick a smaller quantization or a profile with more memory"
        )
    metrics = {**validation.metrics, "memory_mb": round(needed, 3)}
    waived = validation.waived_reason or (plan.waive_reason if not gate.passed else None)
    return validation.model_copy(
        update={"gates": (*validation.gates, gate), "metrics": metrics, "waived_reason": waived}
    )


def _gate(name: str, threshold: float, value: float, passed: bool) -> Gate:
    return Gate(name=name, threshold=float(threshold), value=float(value), passed=bool(passed))


def _golden(
    llm: object, template: PinnedTemplate | None, *, vision: bool = False
) -> tuple[TextGolden, ...]:
    """A plain-completion golden, plus one on a rendered chat prompt when a template is pinned.
    Each is generated twice: greedy decoding that differs run to run cannot be a self-test."""
    prompts = [GOLDEN_PROMPT]
    if template is not None:
        messages: list[dict[str, Any]] = [{"role": "user", "content": CHAT_GOLDEN_QUESTION}]
        if vision:  # a vision-language template reads contents as lists of parts
            messages = as_parts(messages, IMAGE_MARKER)
        prompts.append(render_chat(template.text, messages))
    goldens = []
    for prompt in prompts:
        text = golden_completion(llm, prompt, GOLDEN_TOKENS)
        again = golden_completion(llm, prompt, GOLDEN_TOKENS)
        if text != again:
            raise PackagerError(
                f"greedy decoding is not deterministic on this machine ({text!r} then "
                f"{again!r}); check the llama-cpp-python build before packaging"
            )
        goldens.append(TextGolden(prompt=prompt, max_tokens=GOLDEN_TOKENS, expected_text=text))
    return tuple(goldens)
