"""Every quantization mode on a tiny conv net built with onnx.helper (fast, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from model_packager.errors import CalibrationError, QuantizationError, SourceError  # noqa: E402
from model_packager.onnx_tools import (  # noqa: E402
    looks_like_probabilities,
    make_session,
    run_logits,
    run_probs,
    softmax,
)
from model_packager.quantize import (  # noqa: E402
    CalibrationMethod,
    QuantizationMode,
    QuantizationResult,
    calibration_sha256,
    quantize_onnx,
)

SIDE = 32
CLASSES = 10


def _conv(name: str, rng: np.random.Generator, cin: int, cout: int) -> list[TensorProto]:
    weight = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
    # Per-channel scales only matter when channels differ: give each output channel its own range.
    weight *= np.linspace(0.2, 3.0, cout, dtype=np.float32)[:, None, None, None]
    bias = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    return [
        numpy_helper.from_array(weight, f"{name}.w"),
        numpy_helper.from_array(bias, f"{name}.b"),
    ]


def build_tiny_convnet(path: Path, *, softmax_output: bool = False) -> Path:
    """conv3x3(3->32) relu conv3x3(32->64, stride 2) relu gap flatten gemm(64->10) [softmax]."""
    rng = np.random.default_rng(7)
    fc_w = (rng.standard_normal((CLASSES, 64)) * 0.2).astype(np.float32)
    fc_b = np.zeros(CLASSES, dtype=np.float32)
    initializers = [
        *_conv("c1", rng, 3, 32),
        *_conv("c2", rng, 32, 64),
        numpy_helper.from_array(fc_w, "fc.w"),
        numpy_helper.from_array(fc_b, "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["h2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    output = "logits"
    if softmax_output:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        output = "probs"
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _images(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1.0, 1.0, (1, 3, SIDE, SIDE)).astype(np.float32) for _ in range(count)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_convnet(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="module")
def static_int8(
    tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, QuantizationResult]:
    out = tmp_path_factory.mktemp("static") / "int8.onnx"
    result = quantize_onnx(tiny, out, QuantizationMode.INT8_STATIC, calibration=_images(16, 1))
    return out, result


def _initializers(path: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path)).graph
    return {item.name: numpy_helper.to_array(item) for item in graph.initializer}


def _nodes(path: Path, op_type: str) -> list[Any]:
    return [node for node in onnx.load(str(path)).graph.node if node.op_type == op_type]


def _batch(count: int = 4) -> np.ndarray:
    return np.concatenate(_images(count, 99))


def test_int8_static_is_qdq_with_uint8_activations_and_per_channel_int8_weights(
    tiny: Path, static_int8: tuple[Path, QuantizationResult]
) -> None:
    path, result = static_int8
    inits = _initializers(path)
    quantize_nodes = _nodes(path, "QuantizeLinear")
    assert quantize_nodes, "a QDQ model quantizes activations with QuantizeLinear"
    for node in quantize_nodes:
        assert inits[node.input[2]].dtype == np.uint8, f"activation {node.input[0]} is not uint8"
    conv_weights = {node.input[1] for node in _nodes(tiny, "Conv")}
    weight_dq = [
        n for n in _nodes(path, "DequantizeLinear") if n.input[0].startswith(("c1.w", "c2.w"))
    ]
    assert len(weight_dq) == len(conv_weights)
    for node in weight_dq:
        quantized, scale = inits[node.input[0]], inits[node.input[1]]
        assert quantized.dtype == np.int8
        assert scale.shape == (quantized.shape[0],), "weights must be quantized per output channel"
        assert len(np.unique(scale)) == quantized.shape[0]
    assert result.mode is QuantizationMode.INT8_STATIC
    assert result.method is CalibrationMethod.MINMAX
    assert (result.activation_type, result.weight_type, result.per_channel) == (
        "uint8",
        "int8",
        True,
    )
    assert result.calibration_count == 16
    assert result.calibration_sha256 == calibration_sha256(_images(16, 1))
    assert result.size_bytes == path.stat().st_size
    assert result.size_bytes < tiny.stat().st_size * 0.5


def test_int8_static_outputs_track_fp32(
    tiny: Path, static_int8: tuple[Path, QuantizationResult]
) -> None:
    batch = _batch(8)
    reference = run_logits(make_session(tiny, 1), batch)
    quantized = run_logits(make_session(static_int8[0], 1), batch)
    assert quantized.shape == reference.shape == (8, CLASSES)
    spread = float(reference.max() - reference.min())
    assert float(np.abs(quantized - reference).max()) < 0.1 * spread
    assert np.corrcoef(reference.ravel(), quantized.ravel())[0, 1] > 0.98


def _activation_scales(path: Path) -> list[float]:
    inits = _initializers(path)
    return sorted(float(inits[node.input[1]]) for node in _nodes(path, "QuantizeLinear"))


@pytest.mark.parametrize(
    "method", [pytest.param("entropy", marks=pytest.mark.slow), pytest.param("percentile")]
)
def test_other_calibration_methods_choose_other_ranges(
    tiny: Path, tmp_path: Path, method: str
) -> None:
    calibration = _images(8, 2)
    minmax = quantize_onnx(tiny, tmp_path / "minmax.onnx", "int8-static", calibration=calibration)
    out = tmp_path / f"{method}.onnx"
    result = quantize_onnx(tiny, out, "int8-static", calibration=calibration, method=method)
    assert result.method == CalibrationMethod(method)
    assert result.calibration_sha256 == minmax.calibration_sha256
    # ONNX Runtime's own entropy settings collapse to the min-max range; ours must not.
    assert _activation_scales(out) != _activation_scales(tmp_path / "minmax.onnx")
    assert run_probs(make_session(out, 1), _batch(2)).shape == (2, CLASSES)


def test_int8_dynamic_quantizes_weights_to_uint8(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "dynamic.onnx"
    result = quantize_onnx(tiny, out, QuantizationMode.INT8_DYNAMIC)
    assert _nodes(out, "DynamicQuantizeLinear"), "dynamic quantization computes ranges per run"
    assert any(value.dtype == np.uint8 for value in _initializers(out).values())
    assert result.weight_type == "uint8" and result.calibration_sha256 is None
    assert result.method is None
    assert run_logits(make_session(out, 1), _batch(3)).shape == (3, CLASSES)


def test_fp16_halves_weights_and_keeps_float32_io(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16.onnx"
    result = quantize_onnx(tiny, out, "fp16")
    weights = [v for k, v in _initializers(out).items() if k.endswith(".w")]
    assert weights and all(v.dtype == np.float16 for v in weights)
    session = make_session(out, 1)
    assert session.get_inputs()[0].type == "tensor(float)"
    assert session.get_outputs()[0].type == "tensor(float)"
    batch = _batch(4)
    np.testing.assert_allclose(
        run_logits(session, batch), run_logits(make_session(tiny, 1), batch), atol=2e-2
    )
    assert result.size_bytes < tiny.stat().st_size * 0.6


def test_none_copies_the_model(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "none.onnx"
    result = quantize_onnx(tiny, out, "none", calibration=_images(2, 3))
    assert out.read_bytes() == tiny.read_bytes()
    assert (result.activation_type, result.weight_type) == ("float32", "float32")
    assert result.calibration_sha256 is None


def test_empty_calibration_is_refused_with_what_to_do(tiny: Path, tmp_path: Path) -> None:
    empty: list[np.ndarray] = []
    for calibration in (None, empty):
        with pytest.raises(CalibrationError, match="--calibration DIR"):
            quantize_onnx(tiny, tmp_path / "x.onnx", "int8-static", calibration=calibration)
    assert not (tmp_path / "x.onnx").exists()


def test_mismatched_calibration_names_the_expected_shape(tiny: Path, tmp_path: Path) -> None:
    wrong = [np.zeros((1, 3, SIDE + 1, SIDE), dtype=np.float32)]
    with pytest.raises(CalibrationError, match=r"expects \(N, 3, 32, 32\)"):
        quantize_onnx(tiny, tmp_path / "x.onnx", "int8-static", calibration=wrong)
    with pytest.raises(CalibrationError, match="NaN"):
        bad = [np.full((3, SIDE, SIDE), np.nan, dtype=np.float32)]
        quantize_onnx(tiny, tmp_path / "x.onnx", "int8-static", calibration=bad)


def test_unknown_mode_and_method_list_the_choices(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="int8-static, int8-dynamic, fp16, none"):
        quantize_onnx(tiny, tmp_path / "x.onnx", "int4")
    with pytest.raises(QuantizationError, match="minmax, entropy, percentile"):
        quantize_onnx(
            tiny, tmp_path / "x.onnx", "int8-static", calibration=_images(1, 1), method="mse"
        )


def test_missing_or_broken_model_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        quantize_onnx(tmp_path / "absent.onnx", tmp_path / "x.onnx", "none")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(SourceError, match="cannot load"):
        make_session(broken, 1)


def test_calibration_hash_depends_on_order_and_content() -> None:
    images = _images(3, 5)
    assert calibration_sha256(images) == calibration_sha256([a.copy() for a in images])
    assert calibration_sha256(images) != calibration_sha256(images[::-1])
    assert calibration_sha256(images[:2]) != calibration_sha256(images)


def test_session_is_pinned_without_spinning(tiny: Path) -> None:
    options = make_session(tiny, 2).get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = make_session(tiny, 1, spinning=True).get_session_options()
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_run_probs_applies_softmax_only_to_logits(tiny: Path, tmp_path: Path) -> None:
    batch = _batch(3)
    logits = run_logits(make_session(tiny, 1), batch)
    assert not looks_like_probabilities(logits)
    np.testing.assert_allclose(run_probs(make_session(tiny, 1), batch), softmax(logits), rtol=1e-5)
    with_softmax = build_tiny_convnet(tmp_path / "probs.onnx", softmax_output=True)
    probs = run_probs(make_session(with_softmax, 1), batch)
    np.testing.assert_allclose(probs, softmax(logits), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
