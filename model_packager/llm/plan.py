"""What a language-model build works from: `LlmPlan` (the build's options for a language model,
after the cheap checks) and `GgufChoice` (the quantization to ship and why). Plain data, so every
module of `model_packager.llm` can take them without importing the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_bundle.manifest import BundleId
from edge_bundle.profile_host import HostMatch
from edge_bundle.profiles import HardwareProfile
from model_packager.options import BuildOptions
from model_packager.sources import LlmSource


@dataclass(frozen=True)
class LlmPlan:
    """What `model-packager build` asked for a language model, after the cheap checks."""

    source: LlmSource
    profile: HardwareProfile
    bundle_id: BundleId
    host: HostMatch
    packager_version: str
    quantization: str = "auto"
    chat_template: str | None = None
    eval_text: Path | None = None
    max_perplexity_increase: float | None = None  # percent; None: the quantization's default
    waive_reason: str | None = None
    bench_tokens: int = 50
    golden_images: Path | None = None
    labels: tuple[str, ...] = ()  # a vision-language model that classifies
    knowledge: Path | None = None

    @classmethod
    def from_options(
        cls,
        options: BuildOptions,
        source: LlmSource,
        profile: HardwareProfile,
        bundle_id: BundleId,
        host: HostMatch,
        packager_version: str,
    ) -> LlmPlan:
        return cls(
            source=source,
            profile=profile,
            bundle_id=bundle_id,
            host=host,
            packager_version=packager_version,
            quantization=options.quantization,
            chat_template=options.chat_template,
            eval_text=options.eval_text,
            max_perplexity_increase=options.max_perplexity_increase,
            waive_reason=options.policy.waive_reason,
            bench_tokens=options.bench_samples,
            golden_images=options.golden_images,
            labels=options.labels or (),
            knowledge=options.knowledge,
        )


@dataclass(frozen=True)
class GgufChoice:
    """The quantization to ship and why."""

    quantization: str
    as_is: bool  # the source file is shipped unchanged
    reason: str
