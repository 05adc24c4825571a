"""The interface every runtime implements, and nothing else: the core depends on this module only.

A runtime turns a verified bundle into a session configured for the firmware profile. Sessions
translate their library's exceptions into `InferenceError`, so the core never sees onnxruntime or
llama.cpp types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from edge_bundle.bundle import VerifiedBundle
from edge_bundle.profiles import HardwareProfile


class TensorSession(Protocol):
    """A loaded model that maps one input tensor to its first output."""

    @property
    def providers(self) -> tuple[str, ...]:
        """Where it runs, best first (e.g. CUDAExecutionProvider, CPUExecutionProvider)."""
        ...

    def run(self, batch: NDArray[Any]) -> NDArray[np.float32]:
        """The first output for `batch`; raises `InferenceError` on failure."""
        ...

    def close(self) -> None:
        """Release the model's memory; the session is not used afterwards."""
        ...


@dataclass(frozen=True)
class TextRequest:
    """One completion: the prompt text and how to sample (temperature 0 = greedy). For a
    vision-language model, `images` are RGB pixels (H x W x 3, already decoded and fitted to the
    projector's side), one per image marker in `prompt`, in order."""

    prompt: str
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None
    images: tuple[NDArray[np.uint8], ...] = ()
    # A JSON schema (as JSON text) the output must follow: decoding is constrained to it.
    json_schema: str | None = None


@dataclass(frozen=True)
class TextChunk:
    """A piece of generated text; the last one carries the finish reason and token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TextSession(Protocol):
    """A loaded language model. Not thread-safe: one generation at a time."""

    def count_tokens(self, text: str) -> int: ...

    def check_json_schema(self, schema: str) -> None:
        """Raise `BadRequestError` when decoding cannot be constrained to `schema` (JSON text)."""
        ...

    def stream(
        self,
        request: TextRequest,
        *,
        cancelled: Callable[[], bool],
        between_tokens: Callable[[], None],
    ) -> Iterator[TextChunk]:
        """Generate; stops early when `cancelled()`; `between_tokens()` may pause (yield the CPU)."""
        ...

    def close(self) -> None: ...


class VisionSession(TextSession, Protocol):
    """A loaded vision-language model: a `TextSession` whose requests may carry images."""

    @property
    def image_positions(self) -> int:
        """Context positions one image takes, its wrapper tokens included (measured at load)."""
        ...

    def label_scores(
        self, prompt: str, images: tuple[NDArray[np.uint8], ...], labels: tuple[str, ...]
    ) -> dict[str, float]:
        """Each label's probability as the answer to `prompt` (normalised over the labels)."""
        ...


class Runtime(Protocol):
    """Loads bundles of one runtime kind (the manifest's `runtime`)."""

    name: str

    def load(
        self, bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path
    ) -> TensorSession | TextSession:
        """A session for the bundle's model; raises `RuntimeLoadError` when it cannot load."""
        ...
