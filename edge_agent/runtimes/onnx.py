"""ONNX Runtime backend, configured from the firmware profile.

- Execution providers are the profile's list, in order, keeping those this onnxruntime build
  offers; CPU is always the last fallback. If a session cannot be created with an accelerator
  (driver missing, out of memory), it is created again on the CPU and the fallback is logged.
- Threads, spinning and graph optimisation come from the profile (spinning off on small boxes:
  a spinning pool burns the other core and starves HTTP, MQTT and the SLM between requests).
- The optimised graph is cached under the agent's cache directory, keyed by the model's sha256,
  the onnxruntime version and the providers, so later loads skip graph optimisation. A cache file
  that fails to load is deleted and the original model is used.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.errors import InferenceError, RuntimeLoadError
from edge_bundle.bundle import VerifiedBundle
from edge_bundle.profiles import HardwareProfile, OnnxSpec

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


class OnnxSession:
    """One `onnxruntime.InferenceSession` with a single input."""

    def __init__(self, session: Any) -> None:
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise RuntimeLoadError(
                f"the model has {len(inputs)} inputs; image classifiers take exactly one tensor"
            )
        self._session = session
        self._input = str(inputs[0].name)
        self._output = str(session.get_outputs()[0].name)

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self._session.get_providers())

    def run(self, batch: NDArray[Any]) -> NDArray[np.float32]:
        try:
            outputs = self._session.run([self._output], {self._input: batch})
        except Exception as exc:  # onnxruntime raises untyped errors; translate them here
            raise InferenceError(f"ONNX Runtime failed to run the model: {exc}") from exc
        return np.asarray(outputs[0], dtype=np.float32)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(str(o.name) for o in self._session.get_outputs())

    def run_named(self, batch: NDArray[Any], names: list[str]) -> list[NDArray[np.float32]]:
        """The outputs `names` for `batch` (only what they need is computed)."""
        try:
            outputs = self._session.run(names, {self._input: batch})
        except Exception as exc:  # onnxruntime raises untyped errors; translate them here
            raise InferenceError(f"ONNX Runtime failed to run the model: {exc}") from exc
        return [np.asarray(output, dtype=np.float32) for output in outputs]

    def close(self) -> None:
        self._session = None


class OnnxRuntime:
    """Loads `runtime = "onnx"` bundles."""

    name = "onnx"

    def load(
        self, bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path
    ) -> OnnxSession:
        import onnxruntime as ort

        model = _model_file(bundle)
        providers = choose_providers(profile.onnx, ort.get_available_providers())
        options = session_options(profile.onnx)
        cache = _cache_path(cache_dir, bundle, model, providers, ort.__version__)
        try:
            return OnnxSession(
                self._create(ort, bundle.path(model), cache, options, providers, profile.onnx)
            )
        except RuntimeLoadError:
            raise
        except Exception as exc:
            if providers == [CPU]:
                raise RuntimeLoadError(
                    f"ONNX Runtime cannot load {bundle.bundle_id}: {exc}; rebuild the bundle for "
                    f"onnxruntime {ort.__version__}"
                ) from exc
            log.warning(
                "%s: %s failed (%s); falling back to the CPU", bundle.bundle_id, providers, exc
            )
            return OnnxSession(
                self._create(ort, bundle.path(model), cache, options, [CPU], profile.onnx)
            )

    def _create(
        self,
        ort: Any,
        model: Path,
        cache: Path,
        options: Any,
        providers: list[str],
        spec: OnnxSpec,
    ) -> Any:
        provider_options = [dict(spec.provider_options.get(p, {})) for p in providers]
        if cache.is_file():
            cached_options = session_options(spec)
            cached_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                return ort.InferenceSession(
                    str(cache),
                    cached_options,
                    providers=providers,
                    provider_options=provider_options,
                )
            except Exception as exc:  # a damaged cache file is not fatal: rebuild it
                log.warning("optimised-model cache %s unusable (%s); rebuilding it", cache, exc)
                cache.unlink(missing_ok=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(cache.name + ".partial")
        options.optimized_model_filepath = str(partial)
        # ORT warns that a fully optimised graph is hardware-specific; the cache key covers that.
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(model), options, providers=providers, provider_options=provider_options
        )
        if partial.is_file():
            partial.replace(cache)
        return session


def choose_providers(spec: OnnxSpec, available: list[str]) -> list[str]:
    """The profile's providers this build offers, in the profile's order; CPU always last."""
    chosen = [p for p in spec.execution_providers if p in available and p != CPU]
    skipped = [p for p in spec.execution_providers if p not in available]
    if skipped:
        log.warning(
            "execution providers %s are not in this onnxruntime build (it has %s); using %s",
            skipped,
            available,
            [*chosen, CPU],
        )
    return [*chosen, CPU]


def session_options(spec: OnnxSpec) -> Any:
    """`SessionOptions` from the profile's [onnx] section."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec.intra_op_threads
    options.inter_op_num_threads = spec.inter_op_threads
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if spec.inter_op_threads > 1
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    options.graph_optimization_level = levels[spec.graph_optimization]
    spinning = "1" if spec.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    return options


def _model_file(bundle: VerifiedBundle) -> str:
    models = [
        f.path for f in bundle.manifest.files if f.role == "model" and f.path.endswith(".onnx")
    ]
    if len(models) != 1:
        raise RuntimeLoadError(
            f"{bundle.bundle_id} lists {len(models)} ONNX model files ({models}); an ONNX bundle "
            "holds exactly one — rebuild it with model-packager"
        )
    return models[0]


def _cache_path(
    cache_dir: Path, bundle: VerifiedBundle, model: str, providers: list[str], version: str
) -> Path:
    entry = bundle.manifest.file(model)
    assert entry is not None
    # The optimised graph may hold CPU-specific kernels (NCHWc blocking): key it by the CPU too,
    # so a state directory copied to another box never loads a graph tuned for the first.
    identity = f"{entry.sha256}|{version}|{','.join(providers)}|{_cpu_identity()}"
    key = hashlib.sha256(identity.encode()).hexdigest()
    return cache_dir / "onnx" / f"{bundle.manifest.name}-{key[:24]}.onnx"


def _cpu_identity() -> str:
    """The CPU model and feature flags (Linux), or the machine type elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    first = text.split("\n\n", 1)[0]
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = [line for line in first.splitlines() if line.split(":", 1)[0].strip() in wanted]
    return platform.machine() + "|" + "|".join(lines)
