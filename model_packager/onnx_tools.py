"""Small ONNX Runtime helpers the packager's steps share: pinned sessions and class probabilities.

Sessions are pinned the way the device runs them (intra-op threads from the profile, one inter-op
thread, spinning off by default, every graph optimisation) so that what the packager measures and
validates is what a box will see. onnxruntime is imported lazily: importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_bundle.scores import looks_like_probabilities, softmax, to_probabilities
from model_packager.errors import SourceError


def make_session(path: Path, threads: int, spinning: bool = False, exact: bool = False) -> Any:
    """An `onnxruntime.InferenceSession` on CPU for `path` with `threads` intra-op threads.

    Spinning is off unless asked for: on a 2-core box a spinning pool burns the other core between
    runs and slows everything else on the machine. `exact` asks for exact int8 sums on x86
    (`session.x64quantprecision`), which is what VNNI and AMX kernels compute.
    """
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if not path.is_file():
        raise SourceError(
            f"ONNX model {path} does not exist; check the path or run the export step first"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if exact:
        options.add_session_config_entry("session.x64quantprecision", "1")
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors; translate them here
        raise SourceError(
            f"ONNX Runtime cannot load {path}: {exc}; re-export the model or check that it is "
            "a valid ONNX file for this onnxruntime version"
        ) from exc


def input_name(session: Any) -> str:
    """The name of the session's single input (classification models have exactly one)."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = [item.name for item in inputs]
        raise SourceError(
            f"expected a model with exactly one input, found {len(inputs)} ({names}); "
            "image classifiers must take one NCHW image tensor"
        )
    return str(inputs[0].name)


def run_logits(session: Any, batch: np.ndarray) -> np.ndarray:
    """The first output of the session for `batch`, as float32 of shape (N, classes)."""
    outputs = session.run(None, {input_name(session): batch.astype(np.float32, copy=False)})
    scores = np.asarray(outputs[0], dtype=np.float32)
    return scores.reshape(scores.shape[0], -1)


def run_probs(session: Any, batch: np.ndarray) -> np.ndarray:
    """Class probabilities (N, classes) for `batch`; softmax is applied when outputs are logits."""
    return to_probabilities(run_logits(session, batch))


__all__ = [
    "input_name",
    "looks_like_probabilities",
    "make_session",
    "run_logits",
    "run_probs",
    "softmax",
]
