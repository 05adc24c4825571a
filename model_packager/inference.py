"""Running an ONNX classifier over many preprocessed images, and describing its tensors for the
manifest. Builds on the session helpers in `onnx_tools`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from edge_bundle.manifest import TensorSpec
from model_packager.datasets import ImageSample
from model_packager.errors import SourceError
from model_packager.onnx_tools import looks_like_probabilities, run_logits, run_probs

_T = TypeVar("_T")
Bar = Callable[[Sequence[_T]], Iterable[_T]]

_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def predict_all(
    session: Any, samples: Sequence[ImageSample], num_classes: int, bar: Bar[ImageSample]
) -> NDArray[np.float32]:
    """Class probabilities (N, classes) of `session` for every sample, one image at a time (as
    the device runs them)."""
    rows = [run_probs(session, sample.tensor)[0] for sample in bar(samples)]
    probs = np.stack(rows).astype(np.float32)
    if probs.shape[1] != num_classes:
        raise SourceError(
            f"the model outputs {probs.shape[1]} classes but has {num_classes} labels; "
            "give one label per output"
        )
    return probs


def output_kind(session: Any, tensor: NDArray[Any]) -> str:
    """'probabilities' when the model already ends in a softmax, else 'logits'."""
    return "probabilities" if looks_like_probabilities(run_logits(session, tensor)) else "logits"


def tensor_specs(nodes: Sequence[Any]) -> tuple[TensorSpec, ...]:
    """Manifest tensor specs from onnxruntime's NodeArg list."""
    specs = []
    for node in nodes:
        dtype = _DTYPES.get(node.type)
        if dtype is None:
            raise SourceError(f"tensor {node.name} has unsupported type {node.type}")
        shape = tuple(_dim(d, i) for i, d in enumerate(node.shape))
        specs.append(TensorSpec(name=node.name, dtype=dtype, shape=shape))  # type: ignore[arg-type]
    return tuple(specs)


def _dim(value: object, index: int) -> int | str:
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and value:
        return "".join(c if c.isalnum() or c in "_.:-" else "_" for c in value)[:64] or f"d{index}"
    return f"d{index}"
