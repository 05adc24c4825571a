"""Measuring a GGUF language model with llama.cpp: mean negative log-likelihood (perplexity) of a
text, the greedy golden completion, and generation speed at a profile's thread counts.

Models are loaded in this process through llama-cpp-python, after `gguf.probe_load` has
checked in a child process that llama.cpp can read the file. Likelihood is measured in windows of
at most `EVAL_WINDOW` tokens, each starting after BOS, so memory stays bounded (llama.cpp keeps
one row of logits per token); reference and candidate see exactly the same windows.

The golden completion is produced the way the agent replays it: from an empty llama.cpp state
(`edge_bundle.llama_state.clear_state`, so no earlier request's prefix is reused), at the
profile's threads and the bundle's context, `create_completion(prompt, max_tokens,
temperature=0)` — greedy, no repetition penalty, no stop strings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_bundle.llama_state import clear_state
from model_packager.benchmark import Timing
from model_packager.errors import ExportError, PackagerError

# Our own prose, a few hundred tokens: what an explainer model on the line will be asked about.
DEFAULT_EVAL_TEXT = """\
Quality report, stamping line 3, night shift.

At the start of the shift the operator cleaned the lens of the inspection camera and checked the
lighting, as the procedure asks. The press ran at forty strokes a minute on cold rolled steel
brackets. Around two in the morning the camera began to flag burrs along the long edge of the
bracket. The operator stopped the press, measured ten parts with a gauge, and found that seven of
them had burrs higher than the drawing allows. The die had run for nine days since its last
change, which is within the normal interval, so the maintenance crew looked for another cause.
They found that the stripper plate was loose on one side and that the lubrication nozzle was
clogged. Both were fixed within forty minutes and the first fifty parts after the restart were
clean.

Later in the shift the paint booth reported fine scratches on three panels. The scratches ran in
the direction of travel, which points to contact on the conveyor rather than handling by people.
A guide rail near the transfer station showed bright marks where the panels had rubbed against
it. The rail was adjusted by two millimetres and wrapped with protective tape until a new one can
be fitted during the weekend stop.

Actions for the day shift: check the stripper plate bolts at every die change, add the nozzle to
the daily cleaning list, and order a replacement guide rail. The defect rate for the shift was
1.8 percent against a target of 1 percent; without the burr episode it would have been 0.6.
"""
GOLDEN_PROMPT = "The night shift found burrs on brackets from press 3. The first thing to check is"
GOLDEN_TOKENS = 16
EVAL_WINDOW = 512
MAX_EVAL_TOKENS = 8192
MIN_EVAL_TOKENS = 32
BENCH_PROMPT_TOKENS = 128
BENCH_ROUNDS = 3
_ROWS_AT_ONCE = 32  # rows of logits turned into log-probabilities at a time: bounded temporaries


@dataclass(frozen=True)
class Likelihood:
    """How well a model predicts a text: mean negative log-likelihood per token, in nats."""

    tokens: int
    nll: float
    predictions: tuple[int, ...]  # the most likely token at each predicted position

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll))

    def agreement(self, other: Likelihood) -> float:
        """Share of positions where both models' most likely next token is the same."""
        pairs = list(zip(self.predictions, other.predictions, strict=True))
        return sum(a == b for a, b in pairs) / max(len(pairs), 1)


@dataclass(frozen=True)
class GenerationTiming:
    """Speed at the profile's threads: prompt processing, first token, per-token generation."""

    prompt_tokens: int
    prompt_tokens_per_s: float
    ttft_ms: float
    per_token: Timing  # ms per generated token, every round pooled

    @property
    def generation_tokens_per_s(self) -> float:
        """From the median per-token latency: on a shared machine a few scheduler stalls would
        dominate a mean; the p95 latency shows those stalls separately."""
        return 1000.0 / self.per_token.p50


@contextmanager
def loaded(
    path: Path,
    *,
    context: int,
    threads: int,
    threads_batch: int | None = None,
    scores: bool = False,
) -> Iterator[Any]:
    """A `llama_cpp.Llama` for `path`, closed on exit; load failures raise `ExportError`."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise PackagerError(
            "language models need llama-cpp-python: scripts/install --role packager"
        ) from exc
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=context,
            n_threads=threads,
            n_threads_batch=threads_batch or threads,
            logits_all=scores,
            seed=0,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise ExportError(
            f"llama.cpp could not load {path.name} ({exc}); the file may need a newer "
            "llama-cpp-python, or the machine lacks memory for this context size"
        ) from exc
    try:
        yield llm
    finally:
        llm.close()


def likelihood(path: Path, text: str, *, context: int, threads: int) -> Likelihood:
    """Mean negative log-likelihood of `text` under the model at `path`."""
    window = min(EVAL_WINDOW, context)
    with loaded(path, context=window, threads=threads, scores=True) as llm:
        prefix = llm.tokenize(b"", add_bos=True)
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False)[:MAX_EVAL_TOKENS]
        if len(tokens) < MIN_EVAL_TOKENS:
            raise PackagerError(
                f"the evaluation text is {len(tokens)} tokens; give at least {MIN_EVAL_TOKENS} "
                "(a few paragraphs like what the model will see)"
            )
        total, count, predictions = 0.0, 0, []
        step = window - len(prefix)
        for start in range(0, len(tokens), step):
            chunk = [*prefix, *tokens[start : start + step]]
            if len(chunk) < 2:
                continue
            llm.reset()
            llm.eval(chunk)
            for first in range(0, len(chunk) - 1, _ROWS_AT_ONCE):
                rows = llm.scores[first : min(first + _ROWS_AT_ONCE, len(chunk) - 1)]
                targets = np.asarray(chunk[first + 1 : first + 1 + len(rows)])
                total -= float(_log_probabilities(rows, targets).sum())
                predictions += [int(i) for i in rows.argmax(axis=1)]
            count += len(chunk) - 1
    return Likelihood(count, total / count, tuple(predictions))


def _log_probabilities(
    rows: NDArray[np.float32], targets: NDArray[np.int64]
) -> NDArray[np.float64]:
    """log softmax(rows)[target] for each row, stable (max subtracted first)."""
    peak = rows.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(rows - peak).sum(axis=1, dtype=np.float64)) + peak[:, 0]
    picked = rows[np.arange(len(targets)), targets].astype(np.float64)
    result: NDArray[np.float64] = picked - log_norm
    return result


def golden_completion(llm: Any, prompt: str, max_tokens: int) -> str:
    """The greedy completion of `prompt`, as the agent's self-test replays it."""
    clear_state(llm)
    out = llm.create_completion(
        prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, stream=False
    )
    return str(out["choices"][0]["text"])


def measure_generation(llm: Any, text: str, *, tokens: int) -> GenerationTiming:
    """Prompt speed, time to first token and per-token latency, over `BENCH_ROUNDS` rounds."""
    prompt = llm.tokenize(text.encode("utf-8"), add_bos=True)[:BENCH_PROMPT_TOKENS]
    tokens = max(1, min(tokens, llm.n_ctx() - len(prompt) - 1))
    _generate(llm, prompt, 4)  # warm-up: first-call allocations are not what a request costs
    prompt_rates, first, per_token = [], [], []
    for _ in range(BENCH_ROUNDS):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prompt_rates.append(len(prompt) / (time.perf_counter() - start))
        intervals = _generate(llm, prompt, tokens + 1)
        first.append(intervals[0])
        per_token += intervals[1:]
    return GenerationTiming(
        prompt_tokens=len(prompt),
        prompt_tokens_per_s=float(np.median(prompt_rates)),
        ttft_ms=float(np.median(first)),
        per_token=Timing(tuple(per_token)),
    )


def _generate(llm: Any, prompt: list[int], count: int) -> list[float]:
    """Milliseconds before each of `count` greedily generated tokens (the first includes the
    prompt). EOS does not stop it: the benchmark wants a fixed amount of work. Like every request
    on the box, it starts from an empty state."""
    clear_state(llm)
    intervals = []
    last = time.perf_counter()
    for produced, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), start=1):
        now = time.perf_counter()
        intervals.append((now - last) * 1000.0)
        last = now
        if produced >= count:
            break
    return intervals
