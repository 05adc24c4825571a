"""The interface every runtime implements, and nothing else: the core depends on this module only.

A runtime turns a verified bundle into a session configured for the firmware profile. Sessions
translate their library's exceptions into `InferenceError`, so the core never sees onnxruntime or
llama.cpp types.
"""

from __future__ import annotations

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


class Runtime(Protocol):
    """Loads bundles of one runtime kind (the manifest's `runtime`)."""

    name: str

    def load(
        self, bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path
    ) -> TensorSession:
        """A session for the bundle's model; raises `RuntimeLoadError` when it cannot load."""
        ...
