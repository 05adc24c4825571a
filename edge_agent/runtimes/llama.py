"""llama.cpp backend (llama-cpp-python), configured from the firmware profile's [llama] section.

Imported only when a bundle's runtime is "llama", so a box without llama-cpp-python still serves
ONNX bundles. Threads, batch threads, GPU layers and the context size come from the profile (the
context is also capped by the bundle's own `generation.context_size`). One `Llama` object is not
thread-safe: the caller runs one generation at a time per session.

Every request starts from an empty llama.cpp state (`edge_bundle.llama_state.clear_state`): no
prompt prefix is reused from an earlier request, so a greedy completion is a function of the
prompt and the loaded model alone and equals the golden completion the packager recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edge_agent.errors import InferenceError, RuntimeLoadError
from edge_agent.runtimes.base import TextChunk, TextRequest
from edge_bundle.bundle import VerifiedBundle
from edge_bundle.llama_state import clear_state
from edge_bundle.profiles import HardwareProfile

log = logging.getLogger(__name__)


class LlamaSession:
    """One loaded GGUF model."""

    def __init__(self, llama: Any) -> None:
        self._llama = llama

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def stream(
        self,
        request: TextRequest,
        *,
        cancelled: Callable[[], bool],
        between_tokens: Callable[[], None],
    ) -> Iterator[TextChunk]:
        prompt_tokens = self.count_tokens(request.prompt)
        completion_tokens = 0
        try:
            # Reusing the previous request's prefix would make this text depend on it.
            clear_state(self._llama)
            pieces = self._llama.create_completion(
                request.prompt,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                repeat_penalty=1.0,  # as the packager's golden completions (no penalty)
                stop=list(request.stop),
                seed=request.seed,
                stream=True,
            )
            finish: str | None = None
            for piece in pieces:
                choice = piece["choices"][0]
                completion_tokens += 1
                finish = choice.get("finish_reason")
                if choice.get("text"):
                    yield TextChunk(choice["text"])
                if finish is not None:
                    break
                if cancelled():
                    finish = "cancelled"
                    break
                between_tokens()
            pieces.close()
        except Exception as exc:  # llama-cpp-python raises untyped errors; translate them here
            raise InferenceError(f"llama.cpp failed while generating: {exc}") from exc
        yield TextChunk("", finish or "length", prompt_tokens, completion_tokens)

    def close(self) -> None:
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()


class LlamaRuntime:
    """Loads `runtime = "llama"` bundles."""

    name = "llama"

    def load(
        self, bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path
    ) -> LlamaSession:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise RuntimeLoadError(
                f"{bundle.bundle_id} needs llama-cpp-python, which is not installed ({exc}); "
                "install it with scripts/install --role device"
            ) from exc
        models = [
            f.path for f in bundle.manifest.files if f.role == "model" and f.path.endswith(".gguf")
        ]
        if len(models) != 1:
            raise RuntimeLoadError(
                f"{bundle.bundle_id} lists {len(models)} GGUF model files; a text bundle holds one"
            )
        generation = bundle.manifest.generation
        context = profile.llama.context_size
        if generation is not None:
            context = min(context, generation.context_size)
        try:
            llama = Llama(
                model_path=str(bundle.path(models[0])),
                n_ctx=context,
                n_threads=profile.llama.threads,
                n_threads_batch=profile.llama.threads_batch,
                n_gpu_layers=profile.llama.gpu_layers,
                seed=0,
                verbose=False,
            )
        except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError untyped
            raise RuntimeLoadError(f"llama.cpp cannot load {bundle.bundle_id}: {exc}") from exc
        return LlamaSession(llama)
