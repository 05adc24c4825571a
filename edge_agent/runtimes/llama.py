"""llama.cpp backend (llama-cpp-python), configured from the firmware profile's [llama] section.

Imported only when a bundle's runtime is "llama", so a box without llama-cpp-python still serves
ONNX bundles. Threads, batch threads, GPU layers and the context size come from the profile (the
context is also capped by the bundle's own `generation.context_size`). One `Llama` object is not
thread-safe: the caller runs one generation at a time per session.

Every request starts from an empty llama.cpp state (`edge_bundle.llama_state.clear_state`): no
prompt prefix is reused from an earlier request, so a greedy completion is a function of the
prompt and the loaded model alone and equals the golden completion the packager recorded. The
state is emptied right after each answer's last chunk (off the next request's path), and again
before a request only when that did not happen.

A vision-language bundle (`generation.vision`) also opens its projector (mmproj) beside the text
model, through `edge_bundle.llama_vision` (the same code the packager recorded its goldens with):
the pair is checked from the GGUF headers before anything loads, and the image path is warmed at
load (one mid-grey photo encoded, one token generated), because llama.cpp's own warm-up never
encodes an image and the first real photo would pay for the encoder's first-call allocations.

llama.cpp's CPU threads are OpenMP's (libgomp). At each of a token's ~70 barriers a thread that
arrives first spins `GOMP_SPINCOUNT` turns before it sleeps, and after the token its workers
spin as long again; libgomp's default (300,000, about 3 ms by its own estimate) keeps a core
busy for that long after every token, which is when a classification waiting for the pause
between tokens should get it. `OPENMP_SPIN_COUNT` (30,000) still covers the wait at a barrier
inside a token, and is set before llama.cpp is first imported, unless the environment names its
own. Measured on a 2-core AMD EPYC (Zen 4), with the llm thread niced (`generation_nice`), in
A/B runs of 8-12 rounds: tokens/s within the run-to-run noise of the default spin count, and
the classifier's p95 while generating 0.9-1.1x its idle p95, against about 1.5x.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.errors import BadRequestError, InferenceError, RuntimeLoadError
from edge_agent.runtimes.base import TextChunk, TextRequest
from edge_bundle.bundle import VerifiedBundle
from edge_bundle.errors import BundleError
from edge_bundle.gguf_fields import ProjectorMismatchError, projector_pair
from edge_bundle.llama_state import clear_state
from edge_bundle.llama_vision import IMAGE_MARKER, EndsWithImageError, Projector
from edge_bundle.manifest import Vision
from edge_bundle.profiles import HardwareProfile

log = logging.getLogger(__name__)

#: libgomp's spin count at a barrier for this process, unless GOMP_SPINCOUNT is already set.
OPENMP_SPIN_COUNT = 30_000


def tune_openmp() -> None:
    """Set GOMP_SPINCOUNT before libgomp reads it (when llama_cpp is first imported)."""
    if "GOMP_SPINCOUNT" in os.environ:
        return
    if "llama_cpp" in sys.modules:
        log.debug(
            "llama.cpp was imported before its OpenMP spin count was set; generation keeps "
            "libgomp's default (GOMP_SPINCOUNT), which holds the CPU longer after each token"
        )
        return
    os.environ["GOMP_SPINCOUNT"] = str(OPENMP_SPIN_COUNT)


@functools.lru_cache(maxsize=8)
def _grammar(schema: str | None) -> Any:
    """llama.cpp's grammar for a JSON schema (None: unconstrained); built once per schema."""
    if schema is None:
        return None
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(schema, verbose=False)
    except Exception as exc:  # the converter raises whatever the schema trips over
        raise BadRequestError(f"the JSON schema cannot be turned into a grammar: {exc}") from exc


class LlamaSession:
    """One loaded GGUF model, with its projector for a vision-language bundle."""

    def __init__(
        self, llama: Any, projector: Projector | None = None, image_positions: int = 0
    ) -> None:
        self._llama = llama
        self._projector = projector
        self._image_positions = image_positions
        #: Whether llama.cpp's state is empty: emptied after each answer (off the next request's
        #: path: 4.5 ms at a 2048-token context), and again before a text request if not.
        self._clean = False

    @property
    def image_positions(self) -> int:
        """Context positions one image takes (its wrapper tokens included); 0 without vision."""
        return self._image_positions

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def check_json_schema(self, schema: str) -> None:
        _grammar(schema)  # built (and cached) now, so a bad schema is refused before answering

    def _evaluate(self, request: TextRequest) -> tuple[str | list[int], int]:
        """The prompt `create_completion` continues from, and how many positions it takes."""
        if not request.images:
            # Reusing the previous request's prefix would make this text depend on it.
            if not self._clean:
                clear_state(self._llama)
            self._clean = False
            return request.prompt, self.count_tokens(request.prompt)
        if self._projector is None:
            raise InferenceError("this model takes no images (it has no projector)")
        self._clean = False
        evaluated = self._projector.evaluate(self._llama, request.prompt, request.images)
        try:
            return evaluated.completion_prompt(), len(evaluated.tokens)
        except EndsWithImageError as exc:
            raise BadRequestError(str(exc)) from exc

    def stream(
        self,
        request: TextRequest,
        *,
        cancelled: Callable[[], bool],
        between_tokens: Callable[[], None],
    ) -> Iterator[TextChunk]:
        prompt_tokens = completion_tokens = 0
        try:
            prompt, prompt_tokens = self._evaluate(request)
            pieces = self._llama.create_completion(
                prompt,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                repeat_penalty=1.0,  # as the packager's golden completions (no penalty)
                stop=list(request.stop),
                seed=request.seed,
                grammar=_grammar(request.json_schema),
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
        except (InferenceError, BadRequestError):
            raise
        except Exception as exc:  # llama-cpp-python raises untyped errors; translate them here
            raise InferenceError(f"llama.cpp failed while generating: {exc}") from exc
        yield TextChunk("", finish or "length", prompt_tokens, completion_tokens)
        # The answer is out (the service ends a stream at its finish reason): empty the state
        # now rather than at the start of the next request. A consumer that stops at the last
        # chunk leaves it for the next request, as does a failure here.
        try:
            clear_state(self._llama)
        except Exception:  # llama-cpp-python raises untyped errors
            log.warning("could not empty llama.cpp's state after an answer", exc_info=True)
            return
        self._clean = True

    def label_scores(
        self, prompt: str, images: tuple[NDArray[np.uint8], ...], labels: tuple[str, ...]
    ) -> dict[str, float]:
        if self._projector is None:
            raise InferenceError("this model takes no images (it has no projector)")
        self._clean = False
        try:
            return self._projector.label_scores(self._llama, prompt, images, labels)
        except EndsWithImageError as exc:
            raise BadRequestError(str(exc)) from exc
        except Exception as exc:  # llama-cpp-python and the projector raise untyped errors
            raise InferenceError(f"llama.cpp failed while scoring the labels: {exc}") from exc

    def close(self) -> None:
        projector, self._projector = self._projector, None
        if projector is not None:  # before the text model it was opened for
            projector.close()
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()


class LlamaRuntime:
    """Loads `runtime = "llama"` bundles."""

    name = "llama"

    def load(
        self, bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path
    ) -> LlamaSession:
        tune_openmp()
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
        vision = generation.vision if generation is not None else None
        if vision is not None:
            try:
                projector_pair(bundle.path(models[0]), bundle.path(vision.projector))
            except ProjectorMismatchError as exc:
                raise RuntimeLoadError(f"{bundle.bundle_id}: {exc}") from exc
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
        if vision is None:
            return LlamaSession(llama)
        return _with_projector(bundle, llama, vision, profile)


def _with_projector(
    bundle: VerifiedBundle, llama: Any, vision: Vision, profile: HardwareProfile
) -> LlamaSession:
    """A session with the bundle's projector opened beside `llama` and its image path warmed;
    on failure nothing stays open."""
    projector: Projector | None = None
    try:
        projector = Projector(
            llama,
            bundle.path(vision.projector),
            threads=profile.llama.threads,
            use_gpu=profile.llama.gpu_layers != 0,
        )
        positions = _warm_image_path(llama, projector, vision.image_side)
    except Exception as exc:  # VisionError, or llama.cpp failing on the warm-up photo
        if projector is not None:
            projector.close()
        llama.close()
        what = exc if isinstance(exc, BundleError) else f"llama.cpp failed: {exc}"
        raise RuntimeLoadError(f"{bundle.bundle_id}: the projector cannot serve ({what})") from exc
    return LlamaSession(llama, projector, positions)


#: What follows the warm-up photo: a projector whose layout ends with the image (LLaVA's) would
#: leave no text to generate from.
_AFTER_WARM_UP_PHOTO = "\n"


def _warm_image_path(llama: Any, projector: Projector, side: int) -> int:
    """Encode one mid-grey photo of `side` and generate one token after it, then forget it;
    return the context positions the photo took (image and wrapper tokens)."""
    grey = np.full((side, side, 3), 128, dtype=np.uint8)
    evaluated = projector.evaluate(llama, IMAGE_MARKER + _AFTER_WARM_UP_PHOTO, [grey])
    llama.create_completion(
        prompt=evaluated.completion_prompt(), max_tokens=1, temperature=0.0, repeat_penalty=1.0
    )
    clear_state(llama)
    text = llama.tokenize(_AFTER_WARM_UP_PHOTO.encode(), add_bos=True, special=True)
    return len(evaluated.tokens) - len(text)
