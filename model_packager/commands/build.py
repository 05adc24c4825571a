"""`model-packager build`: a fine-tuned vision model or a small language model into a validated,
benchmarked, signed bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_packager.commands import Subparsers
from model_packager.evaluate import GatePolicy
from model_packager.recipes import recipe_names

ONNX_QUANTIZATIONS = ("int8-static", "int8-dynamic", "fp16", "none")
GGUF_QUANTIZATIONS = ("q4_k_m", "q5_k_m", "q8_0", "f16")
QUANTIZATIONS = ("auto", *ONNX_QUANTIZATIONS, *GGUF_QUANTIZATIONS)


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build a signed bundle from a HF checkpoint (+ LoRA adapter), an ONNX or a GGUF file",
        description=(
            "Export, quantize, validate against the unquantized reference, benchmark, and sign a "
            "bundle. Image classifiers come from HF image-classification checkpoints or ONNX "
            "files; language models from HF causal-LM checkpoints or GGUF files. Gates refuse a "
            "bundle that loses too much accuracy (or perplexity); nothing is written then."
        ),
    )
    source = parser.add_argument_group("source")
    source.add_argument(
        "source",
        type=Path,
        help="HF image-classification or causal-LM directory, .onnx or .gguf file",
    )
    source.add_argument(
        "--adapter", type=Path, help="PEFT LoRA adapter directory, merged before export"
    )
    source.add_argument(
        "--model-config", type=Path, help="YAML with 'labels' and 'preprocessing' (ONNX sources)"
    )
    source.add_argument("--labels", help="comma-separated labels in output order (ONNX sources)")
    source.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle checkpoints (.bin/.pt): they run code when loaded",
    )
    bundle = parser.add_argument_group("bundle")
    bundle.add_argument(
        "--name", required=True, help="bundle name (lowercase letters, digits, - and _)"
    )
    bundle.add_argument(
        "--version", required=True, type=int, help="bundle version, an integer that only grows"
    )
    bundle.add_argument("--profile", required=True, help="firmware profile name or .toml path")
    bundle.add_argument(
        "--key", required=True, type=Path, help="bundle-signing private key (keygen --role bundle)"
    )
    bundle.add_argument(
        "--out", required=True, type=Path, help="output folder for the bundle and its report"
    )
    bundle.add_argument(
        "--knowledge", type=Path, help="YAML: label -> root_causes, corrective_actions, severity"
    )
    bundle.add_argument(
        "--explainer",
        metavar="NAME",
        help="classifiers: the language-model bundle that explains predictions (two-tier answer)",
    )
    bundle.add_argument(
        "--anomaly-gate",
        metavar="NAME",
        help="classifiers: the anomaly-detection bundle (build-anomaly) the agent runs in front "
        "of this classifier; an anomalous part it calls ok is answered unknown_defect",
    )
    quant = parser.add_argument_group("quantization and validation")
    quant.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="auto",
        help=f"ONNX: {', '.join(ONNX_QUANTIZATIONS)}; GGUF: {', '.join(GGUF_QUANTIZATIONS)}; "
        "auto: the profile's choice (an already-quantized GGUF is kept as it is)",
    )
    quant.add_argument(
        "--calibration", type=Path, help="folder of representative images (int8-static)"
    )
    quant.add_argument(
        "--calibration-method", choices=("minmax", "entropy", "percentile"), default="minmax"
    )
    quant.add_argument(
        "--eval", dest="eval_dir", type=Path, help="labelled images: one folder per label"
    )
    quant.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=1.0,
        help="points of top-1 accuracy (default 1.0)",
    )
    quant.add_argument(
        "--min-agreement",
        type=float,
        default=0.97,
        help="top-1 agreement on inputs where fp32 is confident (default 0.97)",
    )
    quant.add_argument(
        "--min-top1-agreement",
        type=float,
        default=0.75,
        help="top-1 agreement on every input (default 0.75)",
    )
    quant.add_argument(
        "--min-top5-containment",
        type=float,
        default=0.99,
        help="share of inputs whose fp32 top-1 is in the candidate's top 5 (default 0.99)",
    )
    quant.add_argument(
        "--recipe",
        choices=recipe_names(),
        help="int8-static recipe (default: try the ones for the profile's CPU class in order)",
    )
    quant.add_argument(
        "--min-speedup",
        type=float,
        default=1.3,
        help="int8 vs fp32, on target hardware (default 1.3)",
    )
    quant.add_argument(
        "--waive-gate",
        metavar="REASON",
        help="write the bundle even if gates fail; REASON is recorded",
    )
    quant.add_argument(
        "--enforce-latency",
        action="store_true",
        help="refuse a bundle over the profile's p95 budget (on target hardware)",
    )
    quant.add_argument(
        "--bench-samples",
        type=int,
        default=50,
        help="latency samples; for a language model, generated tokens per round (default 50)",
    )
    quant.add_argument(
        "--golden-count", type=int, default=4, help="golden self-test samples (default 4)"
    )
    quant.add_argument(
        "--golden-tolerance", type=float, default=0.05, help="max probability difference on device"
    )
    llm = parser.add_argument_group("language models (GGUF bundles)")
    llm.add_argument(
        "--chat-template",
        metavar="FILE|NAME",
        help="Jinja chat template to pin (a file, or chatml / gemma); default: the model's own",
    )
    llm.add_argument(
        "--eval-text",
        type=Path,
        metavar="FILE",
        help="UTF-8 text for the perplexity check (default: a built-in shop-floor text)",
    )
    llm.add_argument(
        "--max-perplexity-increase",
        type=float,
        metavar="PCT",
        help="largest perplexity increase over f16, in percent "
        "(default: q8_0 1, q5_k_m 5, q4_k_m 10, f16 0.5)",
    )
    vlm = parser.add_argument_group("vision-language models (GGUF + projector bundles)")
    vlm.add_argument(
        "--mmproj",
        type=Path,
        metavar="FILE",
        help="the projector (mmproj GGUF) of a .gguf text model given as the source",
    )
    vlm.add_argument(
        "--golden-images",
        type=Path,
        metavar="DIR",
        help="2 to 4 photos for the golden multimodal completions (default: two built-in ones)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from model_packager.build import build
    from model_packager.errors import PackagerError
    from model_packager.options import BuildOptions
    from model_packager.progress import Progress

    if args.waive_gate is not None and not args.waive_gate.strip():
        raise PackagerError(
            "--waive-gate needs a reason, e.g. --waive-gate 'pilot line, reviewed by QA'"
        )
    for name in ("bench_samples", "golden_count"):
        if getattr(args, name) < 1:
            raise PackagerError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_perplexity_increase is not None and args.max_perplexity_increase < 0:
        raise PackagerError("--max-perplexity-increase is a percentage, 0 or more")
    options = BuildOptions(
        source=args.source,
        name=args.name,
        version=args.version,
        profile=args.profile,
        key=args.key,
        out=args.out,
        adapter=args.adapter,
        model_config=args.model_config,
        labels=tuple(v.strip() for v in args.labels.split(",")) if args.labels else None,
        quantization=args.quantization,
        calibration=args.calibration,
        calibration_method=args.calibration_method,
        eval_dir=args.eval_dir,
        policy=GatePolicy(
            args.max_accuracy_drop,
            args.min_agreement,
            args.min_speedup,
            args.waive_gate,
            min_top1_agreement=args.min_top1_agreement,
            min_top5_containment=args.min_top5_containment,
        ),
        recipe=args.recipe,
        enforce_latency=args.enforce_latency,
        knowledge=args.knowledge,
        explainer=args.explainer,
        anomaly_gate=args.anomaly_gate,
        golden_count=args.golden_count,
        golden_tolerance=args.golden_tolerance,
        allow_pickle=args.allow_pickle,
        bench_samples=args.bench_samples,
        chat_template=args.chat_template,
        eval_text=args.eval_text,
        max_perplexity_increase=args.max_perplexity_increase,
        mmproj=args.mmproj,
        golden_images=args.golden_images,
    )
    result = build(options, Progress(quiet=args.quiet))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print("\n".join(result.summary))
    return 0
