"""What a text bundle's golden completions mean: llama.cpp run from an empty state.

The packager records golden completions and the agent serves (and self-tests) the same model, so
both must compute a completion the same way. llama-cpp-python keeps the tokens and KV cache of
the previous request in a `Llama` object and reuses the longest common prefix: the new request
then evaluates only the rest of its prompt, in different batches, and the logits (hence greedy
text) change with whatever was asked before. `clear_state` empties that state, so every request
evaluates its prompt from token 0 exactly as a newly constructed `Llama` with the same `n_ctx`,
`n_batch` and threads would.
"""

from __future__ import annotations

from typing import Any


def clear_state(llama: Any) -> None:
    """Forget every earlier request of `llama` (a `llama_cpp.Llama`): its token history, so that
    no prefix is matched, and its KV cache (cells, positions and data), so that the next prompt
    lands in the same cells of a zeroed cache as in a fresh `Llama`."""
    import llama_cpp

    llama.reset()
    memory = llama_cpp.llama_get_memory(llama.ctx)
    if memory is not None:  # models without a KV cache (embeddings) have nothing to clear
        llama_cpp.llama_memory_clear(memory, True)
