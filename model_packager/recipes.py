"""int8-static quantization recipes, and the candidates tried for each CPU class.

A recipe is the set of quantizer knobs that decide whether an int8 model computes what fp32 does
on a given class of CPU (`edge_bundle.cpu_class`):

- **plain**: per-channel symmetric int8 weights over the full range, asymmetric uint8
  activations. Exact on VNNI/AMX and ARM dot-product kernels, and the fastest.
- **pair-safe**: the same, but each output channel's weight scale is chosen so that no two
  weights that the AVX2 kernel adds in one 16-bit lane (adjacent along the reduction axis, with
  the same sign) sum past 127 in magnitude: then 255·(|a|+|b|) never saturates, and the CPU
  without VNNI computes exactly what VNNI does. Depthwise convolutions keep plain scales: their
  AVX2 kernel widens to 32 bits before adding. Costs a fraction of a bit on a few channels.
- **reduce-range**: 7-bit weights everywhere (ONNX Runtime's own remedy): safe on AVX2 but
  loses accuracy on networks with wide weight ranges.

Each can keep the stem convolution (the first, fed by the 3-channel image) and the classifier
head in float. Only those two can be kept out of int8 in practice: ONNX Runtime re-quantizes a
float convolution that sits between int8 neighbours when it loads the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_bundle.cpu_class import CpuClass
from edge_bundle.manifest import QuantRecipe

#: Largest |a| + |b| of two same-sign int8 weights in one lane: 255 * 128 = 32640 <= 32767 even
#: after rounding (each weight rounds by at most 0.5, so 127 before rounding is at most 128).
PAIR_BUDGET = 127.0
INT8_MAX = 127.0


@dataclass(frozen=True)
class Recipe:
    """The knobs of one int8-static quantization."""

    name: str
    per_channel: bool = True
    reduce_range: bool = False
    symmetric_activations: bool = False
    pair_safe: bool = False
    float_stem: bool = False
    float_head: bool = False

    def with_float(self, *, stem: bool, head: bool) -> Recipe:
        suffix = "+".join(p for p, on in (("stem", stem), ("head", head)) if on)
        name = f"{self.name} ({suffix} in float)" if suffix else self.name
        return replace(self, name=name, float_stem=stem, float_head=head)

    def record(self, float_nodes: Iterable[str] = ()) -> QuantRecipe:
        return QuantRecipe(
            name=self.name,
            per_channel=self.per_channel,
            reduce_range=self.reduce_range,
            symmetric_activations=self.symmetric_activations,
            pair_safe_scales=self.pair_safe,
            float_nodes=tuple(float_nodes),
        )


PLAIN = Recipe("plain")
PAIR_SAFE = Recipe("pair-safe", pair_safe=True)
REDUCE_RANGE = Recipe("reduce-range", reduce_range=True)

#: Candidates per target class, in order of preference (fastest first, each one measured at
#: build time; the first that passes every gate on the classes it is judged on wins). The order
#: comes from the measurements in docs/quantization.md.
_SATURATING = (
    PAIR_SAFE.with_float(stem=True, head=False),
    PAIR_SAFE.with_float(stem=True, head=True),
    REDUCE_RANGE.with_float(stem=True, head=False),
)
_EXACT = (
    PLAIN,
    PLAIN.with_float(stem=True, head=False),
    PAIR_SAFE.with_float(stem=True, head=True),
)


def candidates_for(target: CpuClass) -> tuple[Recipe, ...]:
    """The recipes tried, in order, for a bundle whose profile is of class `target`."""
    return _SATURATING if target.saturates or target is CpuClass.X86_BASELINE else _EXACT


def by_name(name: str) -> Recipe:
    """A recipe by its name (`--recipe`), with or without float layers."""
    for recipe in {*_SATURATING, *_EXACT, PLAIN, PAIR_SAFE, REDUCE_RANGE}:
        if recipe.name == name:
            return recipe
    known = sorted({r.name for r in (*_SATURATING, *_EXACT, PLAIN, PAIR_SAFE, REDUCE_RANGE)})
    raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(known)}")


def recipe_names() -> list[str]:
    """Every recipe name `--recipe` accepts."""
    return sorted({r.name for r in (*_SATURATING, *_EXACT, PLAIN, PAIR_SAFE, REDUCE_RANGE)})


def float_nodes(model: Any, recipe: Recipe) -> list[str]:
    """Names of the nodes the recipe keeps in float: the stem conv and/or the classifier head."""
    nodes = []
    if recipe.float_stem and (stem := _stem(model)) is not None:
        nodes.append(stem)
    if recipe.float_head and (head := _head(model)) is not None:
        nodes.append(head)
    return nodes


def pair_safe_overrides(model: Any, skip: Iterable[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Per-channel weight scales (ONNX Runtime `TensorQuantOverrides`) for every non-depthwise
    Conv and every Gemm/MatMul weight, so that no same-sign pair of adjacent weights along the
    reduction axis exceeds `PAIR_BUDGET` once quantized."""
    from onnx import numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    skipped = set(skip)
    overrides: dict[str, list[dict[str, Any]]] = {}
    for node in model.graph.node:
        if node.name in skipped or len(node.input) < 2 or node.input[1] not in weights:
            continue
        array = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        rows = _reduction_rows(node, array)
        if rows is None:
            continue
        scales = [_pair_safe_scale(row) for row in rows]
        axis = 0 if node.op_type == "Conv" else _channel_axis(node)
        overrides[node.input[1]] = [
            {"axis": axis, "scale": np.float32(s), "zero_point": np.int8(0)} if i == 0
            else {"scale": np.float32(s), "zero_point": np.int8(0)}
            for i, s in enumerate(scales)
        ]  # fmt: skip
    return overrides


def _reduction_rows(
    node: Any, weight: NDArray[np.float64]
) -> list[list[NDArray[np.float64]]] | None:
    """For each output channel, its weights in every order an int8 kernel may reduce them."""
    if node.op_type == "Conv":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if weight.ndim < 3 or (group > 1 and weight.shape[1] == 1):  # depthwise: widened kernel
            return None
        # (C_out, C_in, kh, kw): reduced as (kh, kw, C_in) by the NHWC kernels, (C_in, kh, kw)
        # by im2col; guard both.
        channels_last = np.moveaxis(weight, 1, -1)
        return [
            [weight[c].reshape(-1), channels_last[c].reshape(-1)] for c in range(weight.shape[0])
        ]
    if node.op_type in ("Gemm", "MatMul") and weight.ndim == 2:
        transposed = node.op_type == "Gemm" and any(
            a.name == "transB" and a.i == 1 for a in node.attribute
        )
        matrix = weight if transposed else weight.T  # rows: output features, along K
        return [[matrix[n]] for n in range(matrix.shape[0])]
    return None


def _channel_axis(node: Any) -> int:
    transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    return 0 if transposed else 1


def _pair_safe_scale(orders: list[NDArray[np.float64]]) -> float:
    """The smallest scale that keeps every weight in int8 and every same-sign adjacent pair, in
    each reduction order, within the pair budget."""
    largest = max(float(np.abs(order).max()) for order in orders)
    pair = 0.0
    for order in orders:
        if order.size > 1:
            a, b = order[:-1], order[1:]
            same_sign = np.sign(a) == np.sign(b)
            if same_sign.any():
                pair = max(pair, float((np.abs(a) + np.abs(b))[same_sign].max()))
    scale = max(largest / INT8_MAX, pair / PAIR_BUDGET)
    return scale if scale > 0 else 1.0


def _stem(model: Any) -> str | None:
    """The first Conv fed directly by a graph input (the image)."""
    inputs = {item.name for item in model.graph.input}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input and node.input[0] in inputs:
            return str(node.name)
    return None


def _head(model: Any) -> str | None:
    """The last Gemm/MatMul with a constant weight (the classifier)."""
    weights = {init.name for init in model.graph.initializer}
    heads = [
        n for n in model.graph.node
        if n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in weights
    ]  # fmt: skip
    return str(heads[-1].name) if heads else None
