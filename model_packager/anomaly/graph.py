"""The one ONNX graph of an anomaly bundle: the backbone's features graph with PatchCore's
scoring head appended, and the memory bank stored at a chosen precision.

Head, all matrix operations: 3x3 average pooling (count_include_pad=0) -> patches (N, h*w, C) ->
squared distances to every bank entry as ||a||^2 - 2 a.B^T + ||b||^2 -> minimum over the bank ->
sqrt -> `score_map` (N, h, w) -> its maximum, `score` (N,). The bank is an initializer
`memory_bank` (C, M), float32 or float16 (cast to float32 inside the graph, so only its storage
is smaller); ||b||^2 is computed from the stored values, so a float16 bank is scored exactly as
stored. `bank_from_model` reads the bank back (the update loop extends it), and
`with_features_output` exposes the aggregated patch features for that loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_packager.anomaly.backbone import FEATURES_OUTPUT
from model_packager.errors import ExportError

SCORE = "score"
SCORE_MAP = "score_map"
BANK = "memory_bank"
BANK_NORMS = "memory_bank_sq_norms"
PATCH_FEATURES = "patch_features"  # the aggregated (N, C, h, w) maps, inside the graph
PRECISIONS = {"float32": np.float32, "float16": np.float16}


def stored_bank(bank: NDArray[np.float32], precision: str, unsafe_bits: int | None = None) -> Any:
    """The bank (M, C) as it will be stored; `unsafe_bits` (tests only) rounds every value to
    that many mantissa bits first: a bank cast lower than the parity gate allows."""
    values = np.asarray(bank, np.float32)
    if unsafe_bits is not None:
        mantissa, exponent = np.frexp(values)
        values = np.ldexp(np.round(mantissa * 2**unsafe_bits) / 2**unsafe_bits, exponent)
    return values.astype(PRECISIONS[precision])


def append_head(features_model: Path, bank: Any, out: Path) -> Path:
    """Write `out`: the features graph at `features_model` followed by the scoring head over
    `bank` (M, C) in its stored dtype."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(features_model))
    graph = model.graph
    if [o.name for o in graph.output] != [FEATURES_OUTPUT]:
        raise ExportError(f"features graph must have the single output {FEATURES_OUTPUT!r}")
    transposed = np.ascontiguousarray(np.asarray(bank).T)  # (C, M)
    as_float = np.asarray(bank, np.float32)
    norms = np.einsum("ij,ij->i", as_float, as_float).astype(np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(transposed, BANK),
            numpy_helper.from_array(norms, BANK_NORMS),
            numpy_helper.from_array(np.array([0, transposed.shape[0], -1], np.int64), "ad_flat"),
            numpy_helper.from_array(np.array([0, 2, 3], np.int64), "ad_nhw"),
            numpy_helper.from_array(np.array(-2.0, np.float32), "ad_minus_two"),
            numpy_helper.from_array(np.array(0.0, np.float32), "ad_zero"),
        ]
    )
    bank_input = BANK
    nodes = []
    if transposed.dtype != np.float32:
        nodes.append(helper.make_node("Cast", [BANK], ["ad_bank32"], to=TensorProto.FLOAT))
        bank_input = "ad_bank32"
    nodes += [
        helper.make_node(
            "AveragePool",
            [FEATURES_OUTPUT],
            [PATCH_FEATURES],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[1, 1],
            count_include_pad=0,
        ),
        helper.make_node("Reshape", [PATCH_FEATURES, "ad_flat"], ["ad_cols"]),
        helper.make_node("Transpose", ["ad_cols"], ["ad_rows"], perm=[0, 2, 1]),
        helper.make_node("ReduceSumSquare", ["ad_rows"], ["ad_a2"], axes=[2], keepdims=1),
        helper.make_node("MatMul", ["ad_rows", bank_input], ["ad_ab"]),
        helper.make_node("Mul", ["ad_ab", "ad_minus_two"], ["ad_m2ab"]),
        helper.make_node("Add", ["ad_m2ab", "ad_a2"], ["ad_partial"]),
        helper.make_node("Add", ["ad_partial", BANK_NORMS], ["ad_d2"]),
        helper.make_node("ReduceMin", ["ad_d2"], ["ad_min"], axes=[2], keepdims=0),
        helper.make_node("Max", ["ad_min", "ad_zero"], ["ad_clamped"]),
        helper.make_node("Sqrt", ["ad_clamped"], ["ad_dist"]),
        helper.make_node("Shape", [PATCH_FEATURES], ["ad_shape"]),
        helper.make_node("Gather", ["ad_shape", "ad_nhw"], ["ad_map_shape"], axis=0),
        helper.make_node("Reshape", ["ad_dist", "ad_map_shape"], [SCORE_MAP]),
        helper.make_node("ReduceMax", [SCORE_MAP], [SCORE], axes=[1, 2], keepdims=0),
    ]
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info(SCORE_MAP, TensorProto.FLOAT, ["batch", "h", "w"]),
        ]
    )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the anomaly graph does not validate: {exc}") from exc
    onnx.save(model, str(out))
    return out


def replace_bank(model_path: Path, bank: Any, out: Path) -> Path:
    """`model_path` with its memory bank (and norms) replaced by `bank` (M, C), written to
    `out`: the update loop's export, no backbone export needed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    as_float = np.asarray(bank, np.float32)
    fresh = {
        BANK: numpy_helper.from_array(np.ascontiguousarray(np.asarray(bank).T), BANK),
        BANK_NORMS: numpy_helper.from_array(
            np.einsum("ij,ij->i", as_float, as_float).astype(np.float32), BANK_NORMS
        ),
    }
    kept = [init for init in model.graph.initializer if init.name not in fresh]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, *fresh.values()])
    _rewire_cast(model, np.asarray(bank).dtype != np.float32)
    onnx.save(model, str(out))
    return out


def _rewire_cast(model: Any, cast: bool) -> None:
    """Make the bank reach the MatMul through a Cast to float32 exactly when it is stored lower."""
    from onnx import TensorProto, helper

    nodes = [n for n in model.graph.node if not (n.op_type == "Cast" and list(n.input) == [BANK])]
    for node in nodes:
        if node.op_type == "MatMul" and node.input[1] in (BANK, "ad_bank32"):
            node.input[1] = "ad_bank32" if cast else BANK
    if cast:
        nodes.insert(0, helper.make_node("Cast", [BANK], ["ad_bank32"], to=TensorProto.FLOAT))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def bank_from_model(model_path: Path) -> NDArray[np.float32]:
    """The memory bank (M, C) stored in an anomaly model, as float32."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    for init in model.graph.initializer:
        if init.name == BANK:
            return np.ascontiguousarray(numpy_helper.to_array(init).T.astype(np.float32))
    raise ExportError(f"{model_path} holds no {BANK!r}: it is not an anomaly model")


def with_features_output(model_path: Path, out: Path) -> Path:
    """A copy of an anomaly model that also outputs the aggregated patch features."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path))
    model.graph.output.append(
        helper.make_tensor_value_info(PATCH_FEATURES, TensorProto.FLOAT, None)
    )
    onnx.save(model, str(out))
    return out
