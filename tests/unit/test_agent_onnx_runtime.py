"""The ONNX Runtime backend: providers from the profile with fallback, session options, the
optimised-model cache, and the lazily imported runtime table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import RuntimeLoadError
from edge_agent.runtimes import RUNTIMES, runtime_for
from edge_agent.runtimes.onnx import CPU, OnnxRuntime, choose_providers, session_options
from edge_bundle.bundle import open_bundle
from edge_bundle.profiles import load_profile
from edge_bundle.signing import TrustStore
from tests.agent_support import build_bundle, make_keys


def test_providers_follow_the_profile_and_keep_cpu_last() -> None:
    spec = load_profile("x86-t4-server").onnx
    assert spec.execution_providers[0] != CPU
    assert choose_providers(spec, ["CPUExecutionProvider"]) == [CPU]
    offered = [*spec.execution_providers]
    assert choose_providers(spec, offered) == [*[p for p in offered if p != CPU], CPU]


def test_session_options_come_from_the_profile() -> None:
    spec = load_profile("generic-x86-64-avx2").onnx
    options = session_options(spec)
    assert options.intra_op_num_threads == spec.intra_op_threads
    assert options.inter_op_num_threads == spec.inter_op_threads
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_unknown_runtime_is_a_clear_error() -> None:
    assert set(RUNTIMES) >= {"onnx"}
    with pytest.raises(RuntimeLoadError, match="no 'tensorrt' runtime"):
        runtime_for("tensorrt")


def test_optimised_model_is_cached_and_a_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    built = build_bundle(tmp_path / "dist", keys)
    bundle = open_bundle(built.path, TrustStore.from_files([keys.public]), tmp_path / "staging")
    profile = load_profile("generic-x86-64-avx2")
    cache = tmp_path / "cache"
    batch = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)

    first = OnnxRuntime().load(bundle, profile, cache)
    cached = list((cache / "onnx").glob("*.onnx"))
    assert len(cached) == 1 and cached[0].stat().st_size > 0
    expected = first.run(batch)

    second = OnnxRuntime().load(bundle, profile, cache)  # loads the cached, optimised graph
    np.testing.assert_allclose(second.run(batch), expected, rtol=1e-5, atol=1e-6)

    cached[0].write_bytes(b"not an onnx model")
    third = OnnxRuntime().load(bundle, profile, cache)
    np.testing.assert_allclose(third.run(batch), expected, rtol=1e-5, atol=1e-6)
    assert cached[0].read_bytes() != b"not an onnx model"
    assert third.providers == (CPU,)
