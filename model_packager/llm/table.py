"""A quantization table for one language model: size, speed and perplexity of every GGUF
quantization built from the same unquantized source, measured the same way the packager measures
a bundle. Used by bench/ to choose a profile's `preferred_gguf` from numbers, not folklore.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from model_packager.errors import SourceError
from model_packager.gguf_header import GGUF_FILE_TYPES
from model_packager.llm.eval import (
    DEFAULT_EVAL_TEXT,
    EVAL_WINDOW,
    likelihood,
    loaded,
    measure_generation,
)
from model_packager.llm.gguf import quantize_gguf
from model_packager.llm.package import prepare_reference
from model_packager.progress import Progress
from model_packager.sources import LlmSource, resolve_source


@dataclass(frozen=True)
class QuantizationRow:
    """One quantization of the model, measured."""

    quantization: str
    size_bytes: int
    perplexity: float
    perplexity_increase_pct: float  # over the f16 reference
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    ttft_ms: float


def quantization_table(
    source: Path,
    *,
    quantizations: Sequence[str] = ("f16", "q8_0", "q5_k_m", "q4_k_m"),
    threads: int = 2,
    context: int = 1024,
    eval_text: str = DEFAULT_EVAL_TEXT,
    bench_tokens: int = 32,
    adapter: Path | None = None,
    progress: Progress | None = None,
) -> list[QuantizationRow]:
    """Build each of `quantizations` from `source` (HF causal LM or f16/f32 GGUF) and measure it."""
    progress = progress or Progress(quiet=True)
    model = resolve_source(source, adapter=adapter)
    if not isinstance(model, LlmSource) or model.quantized:
        raise SourceError(
            f"{source} is not an unquantized language model; the table needs the HF model or "
            "an f16/f32 GGUF to quantize from"
        )
    unknown = sorted(set(quantizations) - set(GGUF_FILE_TYPES))
    if unknown:
        raise SourceError(f"unknown quantizations {unknown}; use {sorted(GGUF_FILE_TYPES)}")
    with tempfile.TemporaryDirectory(prefix="model-packager-table-") as tmp:
        work = Path(tmp)
        reference, _ = prepare_reference(model, work, progress)
        assert reference is not None
        window = min(EVAL_WINDOW, context)
        base = likelihood(reference, eval_text, context=window, threads=threads).perplexity
        rows = []
        for quantization in quantizations:
            progress.step(f"measuring {quantization}")
            path = work / f"{quantization}.gguf"
            quantize_gguf(reference, path, quantization, threads=threads)
            measured = likelihood(path, eval_text, context=window, threads=threads)
            with loaded(path, context=context, threads=threads) as llm:
                timing = measure_generation(llm, eval_text, tokens=bench_tokens)
            rows.append(
                QuantizationRow(
                    quantization=quantization,
                    size_bytes=path.stat().st_size,
                    perplexity=measured.perplexity,
                    perplexity_increase_pct=100.0 * (measured.perplexity / base - 1.0),
                    prompt_tokens_per_s=timing.prompt_tokens_per_s,
                    generation_tokens_per_s=timing.generation_tokens_per_s,
                    ttft_ms=timing.ttft_ms,
                )
            )
            path.unlink()
    return rows
