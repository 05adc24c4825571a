"""What `model-packager build` was asked to do: `BuildOptions`, where the build writes
(`OutputPaths`), and the checks of the options against the kind of source, run before any slow
step. Both pipelines (`vision`, `llm`) read these options; neither owns them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_bundle.manifest import BundleId
from model_packager.errors import CalibrationError, PackagerError, QuantizationError
from model_packager.evaluate import GatePolicy
from model_packager.gguf_header import GGUF_FILE_TYPES
from model_packager.sources import AnySource, LlmSource, Source


@dataclass(frozen=True)
class BuildOptions:
    """Everything `model-packager build` was asked to do."""

    source: Path
    name: str
    version: int
    profile: str
    key: Path
    out: Path
    adapter: Path | None = None
    model_config: Path | None = None
    labels: tuple[str, ...] | None = None
    quantization: str = "auto"
    calibration: Path | None = None
    calibration_method: str = "minmax"
    eval_dir: Path | None = None
    policy: GatePolicy = field(default_factory=GatePolicy)
    enforce_latency: bool = False
    knowledge: Path | None = None
    explainer: str | None = None  # a text-generation bundle that explains the predictions
    anomaly_gate: str | None = None  # an anomaly-detection bundle run in front of the classifier
    recipe: str | None = None  # an int8-static recipe by name; None tries the profile class's
    golden_count: int = 4
    golden_tolerance: float = 0.05
    allow_pickle: bool = False
    bench_samples: int = 50
    # Language models (GGUF bundles) only.
    chat_template: str | None = None
    eval_text: Path | None = None
    max_perplexity_increase: float | None = None
    # Vision-language models only.
    mmproj: Path | None = None  # the projector of a GGUF text model
    golden_images: Path | None = None  # photos for the golden multimodal completions


@dataclass(frozen=True)
class OutputPaths:
    """Where a build writes: the bundle and the report beside it."""

    out: Path
    bundle_id: BundleId

    @property
    def bundle(self) -> Path:
        return self.out / self.bundle_id.file_name

    @property
    def report(self) -> Path:
        return self.out / f"{self.bundle_id.name}-{self.bundle_id.version}.report.html"


def check_options(options: BuildOptions, source: AnySource) -> None:
    """Refuse the options that the other kind of source takes, and a missing image folder."""
    if isinstance(source, LlmSource):
        _check_language_model(options, source)
    else:
        _check_image_classifier(options, source)


def _check_language_model(options: BuildOptions, source: LlmSource) -> None:
    vision_only: dict[str, object] = {
        "--calibration": options.calibration,
        "--eval": options.eval_dir,
    }
    if not source.vision:  # a vision-language model may classify: labels and knowledge
        vision_only |= {"--knowledge": options.knowledge, "--labels": options.labels}
    elif options.knowledge is not None and not options.labels:
        raise PackagerError("--knowledge needs --labels: the entries are looked up by label")
    given = [name for name, value in vision_only.items() if value is not None]
    if given:
        raise PackagerError(
            f"{', '.join(given)} only apply to image classifiers; {source.describe()} is a "
            "language model (use --eval-text FILE to validate it on your own text)"
        )
    if options.golden_images is not None and not source.vision:
        raise PackagerError(
            f"--golden-images is for vision-language models; {source.describe()} reads text only"
        )


def _check_image_classifier(options: BuildOptions, source: Source) -> None:
    if options.calibration is None and options.eval_dir is None:
        raise CalibrationError(
            "give --calibration DIR (images like the line's) and/or --eval DIR (one folder per label)"
        )
    llm_only = {
        "--chat-template": options.chat_template,
        "--eval-text": options.eval_text,
        "--max-perplexity-increase": options.max_perplexity_increase,
        "--mmproj": options.mmproj,
        "--golden-images": options.golden_images,
    }
    given = [name for name, value in llm_only.items() if value is not None]
    if given:
        raise PackagerError(
            f"{', '.join(given)} only apply to language models; {source.describe()} is "
            "an image classifier"
        )
    if options.quantization in GGUF_FILE_TYPES:
        raise QuantizationError(
            f"--quantization {options.quantization} is for language models (GGUF); an "
            "image classifier takes auto, int8-static, int8-dynamic, fp16 or none"
        )
