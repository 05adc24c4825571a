"""ONNX quantization for the packager: int8 static (QDQ), int8 dynamic, fp16, or none.

Owns the choice of quantizer settings and the record of what was done (`QuantizationResult`, which
goes into the manifest). The settings are the ones measured to be fast on x86 CPUs with ONNX
Runtime: QDQ format, uint8 activations, per-channel int8 weights, after `quant_pre_process`; see
docs/quantization.md for the measurements. Calibration arrays come from the shared decode and
preprocessing path (`edge_bundle.preprocess`), so the quantizer sees what the device will feed.
onnxruntime and onnx are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from model_packager.errors import CalibrationError, QuantizationError, SourceError
from model_packager.recipes import (
    PLAIN,
    REDUCE_RANGE,
    Recipe,
    float_nodes,
    pair_safe_overrides,
)

_E = TypeVar("_E", bound=StrEnum)


class QuantizationMode(StrEnum):
    """How the weights (and activations) of a model are stored and computed."""

    INT8_STATIC = "int8-static"
    INT8_DYNAMIC = "int8-dynamic"
    FP16 = "fp16"
    NONE = "none"


class CalibrationMethod(StrEnum):
    """How activation ranges are chosen from the calibration data (int8-static only)."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


#: Measured best for top-1 agreement on a real EfficientNet-Lite0 (docs/quantization.md).
DEFAULT_METHOD = CalibrationMethod.MINMAX
#: Percentile kept by the percentile calibrator (ONNX Runtime's own default).
CALIBRATION_PERCENTILE = 99.999
#: Entropy calibration: histogram bins collected, and bins of the quantized candidate ranges.
ENTROPY_HISTOGRAM_BINS = 2048
ENTROPY_QUANTIZED_BINS = 128


@dataclass(frozen=True)
class QuantizationResult:
    """What `quantize_onnx` did, in the terms the manifest records."""

    mode: QuantizationMode
    method: CalibrationMethod | None
    activation_type: str
    weight_type: str
    per_channel: bool
    calibration_sha256: str | None
    calibration_count: int
    size_bytes: int
    notes: tuple[str, ...] = ()
    recipe: Recipe | None = None
    float_nodes: tuple[str, ...] = ()


def quantize_onnx(
    src: Path,
    dst: Path,
    mode: QuantizationMode | str,
    *,
    calibration: Sequence[np.ndarray] | None = None,
    method: CalibrationMethod | str = DEFAULT_METHOD,
    per_channel: bool = True,
    reduce_range: bool = False,
    recipe: Recipe | None = None,
    ranges: Path | None = None,
) -> QuantizationResult:
    """Write a `mode`-quantized copy of the ONNX model `src` to `dst` and describe it.

    `calibration` holds preprocessed inputs, each (C, H, W) or (N, C, H, W) float32, exactly as
    the device will feed them; int8-static needs it and the other modes ignore it. `recipe`
    (int8-static only; default: plain, or reduce-range when `reduce_range`) chooses the weight
    scales and the layers kept in float (`model_packager.recipes`); `ranges` reuses activation
    ranges from `calibration_ranges` instead of calibrating again. Raises `CalibrationError` when it is missing,
    empty or does not fit the model, `SourceError` when `src` is not a usable ONNX model and
    `QuantizationError` when the quantizer fails.
    """
    mode = _parse(QuantizationMode, mode, "quantization mode")
    method = _parse(CalibrationMethod, method, "calibration method")
    if not src.is_file():
        raise SourceError(f"ONNX model {src} does not exist; run the export step first")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode is QuantizationMode.INT8_STATIC:
        if recipe is None:
            recipe = REDUCE_RANGE if reduce_range else PLAIN
        if not per_channel:
            recipe = replace(recipe, per_channel=False)
        result = _quantize_static(src, dst, calibration, method, recipe, ranges)
    elif mode is QuantizationMode.INT8_DYNAMIC:
        result = _quantize_dynamic(src, dst, per_channel)
    elif mode is QuantizationMode.FP16:
        result = _convert_fp16(src, dst)
    else:
        shutil.copyfile(src, dst)
        result = _result(mode, dst, activation_type="float32", weight_type="float32")
    _check_loads(dst, mode)
    return result


def calibration_sha256(arrays: Sequence[np.ndarray]) -> str:
    """A sha256 over the calibration arrays, in order: dtype, shape and raw bytes of each."""
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        digest.update(contiguous.tobytes())
    return digest.hexdigest()


def _parse(enum: type[_E], value: _E | str, what: str) -> _E:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(item.value for item in enum)
        raise QuantizationError(f"unknown {what} {value!r}; choose one of: {choices}") from None


def _result(
    mode: QuantizationMode,
    dst: Path,
    *,
    activation_type: str,
    weight_type: str,
    per_channel: bool = False,
    method: CalibrationMethod | None = None,
    calibration: Sequence[np.ndarray] = (),
    notes: tuple[str, ...] = (),
    recipe: Recipe | None = None,
    float_nodes: tuple[str, ...] = (),
) -> QuantizationResult:
    return QuantizationResult(
        mode=mode,
        method=method,
        activation_type=activation_type,
        weight_type=weight_type,
        per_channel=per_channel,
        calibration_sha256=calibration_sha256(calibration) if calibration else None,
        calibration_count=len(calibration),
        size_bytes=dst.stat().st_size,
        notes=notes,
        recipe=recipe,
        float_nodes=float_nodes,
    )


def _quantize_static(
    src: Path,
    dst: Path,
    calibration: Sequence[np.ndarray] | None,
    method: CalibrationMethod,
    recipe: Recipe,
    ranges: Path | None,
) -> QuantizationResult:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    name, shape = _single_input(src)
    reader = _ArrayReader(name, _calibration_batches(calibration, shape))
    with tempfile.TemporaryDirectory(prefix="lineside-quant-") as tmp:
        prepared = _pre_process(src, Path(tmp) / "prepared.onnx")
        if ranges is None and method is CalibrationMethod.ENTROPY:
            ranges = _entropy_ranges(prepared, reader, Path(tmp))
        model = _load_onnx(prepared)
        in_float = float_nodes(model, recipe)
        extra = _calibration_options(method)
        if recipe.symmetric_activations:
            extra["ActivationSymmetric"] = True
        if recipe.pair_safe:
            extra["TensorQuantOverrides"] = pair_safe_overrides(model, skip=in_float)
        _call_quantizer(
            "int8-static",
            quantize_static,
            str(prepared),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            nodes_to_exclude=in_float,
            calibrate_method=_ort_method(method),
            extra_options=extra,
            calibration_cache_path=None if ranges is None else str(ranges),
        )
    assert calibration is not None  # checked by _calibration_batches
    weights = "int8 (7-bit range)" if recipe.reduce_range else "int8"
    if recipe.pair_safe:
        weights = "int8 (pair-safe scales)"
    return _result(
        QuantizationMode.INT8_STATIC,
        dst,
        activation_type="uint8",
        weight_type=weights,
        per_channel=recipe.per_channel,
        method=method,
        calibration=calibration,
        notes=(_recipe_note(recipe, in_float),),
        recipe=recipe,
        float_nodes=tuple(in_float),
    )


def _recipe_note(recipe: Recipe, in_float: Sequence[str]) -> str:
    note = f"recipe {recipe.name}: QDQ format, asymmetric uint8 activations, symmetric int8 weights"
    if recipe.reduce_range:
        note += " in a 7-bit range"
    if recipe.pair_safe:
        note += (
            ", scaled per channel so that no two adjacent same-sign weights sum past 127 "
            "(exact on CPUs without VNNI, whose kernels add products in 16-bit pairs)"
        )
    if in_float:
        note += f"; kept in float: {', '.join(in_float)}"
    return note


def calibration_ranges(
    src: Path, calibration: Sequence[np.ndarray], method: CalibrationMethod | str, work: Path
) -> Path:
    """Activation ranges of `src` over `calibration`, saved as ONNX Runtime's calibration cache,
    so that several recipes can be quantized from one calibration pass."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    method = _parse(CalibrationMethod, method, "calibration method")
    name, shape = _single_input(src)
    reader = _ArrayReader(name, _calibration_batches(calibration, shape))
    work.mkdir(parents=True, exist_ok=True)
    prepared = _pre_process(src, work / "ranges-prepared.onnx")
    if method is CalibrationMethod.ENTROPY:
        return _entropy_ranges(prepared, reader, work)

    def calibrate() -> Path:
        extra: dict[str, Any] = {}
        if method is CalibrationMethod.PERCENTILE:
            extra = {"percentile": CALIBRATION_PERCENTILE}
        calibrator = create_calibrator(
            prepared,
            None,
            augmented_model_path=str(work / "ranges-augmented.onnx"),
            calibrate_method=_ort_method(method),
            extra_options=extra,
        )
        calibrator.collect_data(reader)
        cache = work / f"{method.value}-ranges.json"
        save_tensors_data(calibrator.compute_data(), cache)
        return cache

    result: Path = _call_quantizer(f"{method.value} calibration for int8-static", calibrate)
    return result


def _quantize_dynamic(src: Path, dst: Path, per_channel: bool) -> QuantizationResult:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="lineside-quant-") as tmp:
        prepared = _pre_process(src, Path(tmp) / "prepared.onnx")
        # ONNX Runtime's CPU ConvInteger kernel takes uint8 weights only, so int8 weights would
        # produce a model that conv nets cannot run.
        _call_quantizer(
            "int8-dynamic",
            quantize_dynamic,
            str(prepared),
            str(dst),
            per_channel=per_channel,
            weight_type=QuantType.QUInt8,
        )
    return _result(
        QuantizationMode.INT8_DYNAMIC,
        dst,
        activation_type="uint8 (computed per run)",
        weight_type="uint8",
        per_channel=per_channel,
        notes=(
            "dynamic quantization: activation ranges are computed at every run; "
            "on CPU conv nets this is usually slower than fp32, prefer int8-static",
        ),
    )


def _convert_fp16(src: Path, dst: Path) -> QuantizationResult:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = _load_onnx(src)
    # Inputs and outputs stay float32 so the preprocessing spec and callers do not change.
    converted = _call_quantizer("fp16", convert_float_to_float16, model, keep_io_types=True)
    onnx.save(converted, str(dst))
    return _result(
        QuantizationMode.FP16,
        dst,
        activation_type="float16",
        weight_type="float16",
        notes=("inputs and outputs stay float32; fp16 is slower than fp32 on most CPUs",),
    )


def _entropy_ranges(prepared: Path, reader: _ArrayReader, work: Path) -> Path:
    """Entropy (KL) activation ranges over a fine histogram, saved as ORT's calibration cache.

    `quantize_static` builds its entropy calibrator with 128 histogram bins and 128 quantized
    bins and offers no option to change them; with equal counts the only candidate threshold is
    the full range, so "entropy" silently equals minmax. Running the calibrator here with a fine
    histogram and handing the ranges over as a cache gives the real method.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    def calibrate() -> Path:
        calibrator = create_calibrator(
            prepared,
            None,
            augmented_model_path=str(work / "augmented.onnx"),
            calibrate_method=_ort_method(CalibrationMethod.ENTROPY),
            extra_options={
                "num_bins": ENTROPY_HISTOGRAM_BINS,
                "num_quantized_bins": ENTROPY_QUANTIZED_BINS,
            },
        )
        calibrator.collect_data(reader)
        cache = work / "entropy-ranges.json"
        save_tensors_data(calibrator.compute_data(), cache)
        reader.rewind()
        return cache

    result: Path = _call_quantizer("entropy calibration for int8-static", calibrate)
    return result


def _call_quantizer(what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an onnxruntime/onnx quantizer, translating its untyped failures into ours."""
    try:
        return function(*args, **kwargs)
    except (CalibrationError, QuantizationError):
        raise
    except Exception as exc:
        raise QuantizationError(
            f"{what} quantization failed: {type(exc).__name__}: {exc}; check that the model "
            "runs in ONNX Runtime as exported, or choose another quantization mode"
        ) from exc


def _pre_process(src: Path, out: Path) -> Path:
    """Shape inference and graph optimisation that ONNX Runtime asks for before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _call_quantizer("pre-processing for", quant_pre_process, str(src), str(out))
    return out


def _load_onnx(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise SourceError(
            f"{path} is not a readable ONNX model ({exc}); re-export it or check the file"
        ) from exc


def _single_input(path: Path) -> tuple[str, tuple[int | None, ...]]:
    """Name and shape of the model's one input; dynamic dimensions are None."""
    graph = _load_onnx(path).graph
    initializers = {item.name for item in graph.initializer}
    inputs = [item for item in graph.input if item.name not in initializers]
    if len(inputs) != 1:
        raise SourceError(
            f"{path} has {len(inputs)} inputs; int8-static calibration supports models with "
            "exactly one image input"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in dims)
    return str(inputs[0].name), shape


def _calibration_batches(
    calibration: Sequence[np.ndarray] | None, shape: tuple[int | None, ...]
) -> list[np.ndarray]:
    if not calibration:
        raise CalibrationError(
            "int8-static quantization needs calibration images and got none; pass a directory "
            "of representative photos with --calibration DIR (a few dozen to a few hundred)"
        )
    return [_calibration_batch(index, array, shape) for index, array in enumerate(calibration)]


def _calibration_batch(index: int, array: np.ndarray, shape: tuple[int | None, ...]) -> np.ndarray:
    batch = array[np.newaxis] if array.ndim == len(shape) - 1 else array
    if batch.ndim != len(shape) or not np.issubdtype(batch.dtype, np.floating):
        raise CalibrationError(
            f"calibration array {index} has shape {array.shape} and dtype {array.dtype}; the "
            f"model expects float arrays shaped {_describe(shape)}; produce them with the "
            "bundle's preprocessing spec"
        )
    for actual, expected in zip(batch.shape[1:], shape[1:], strict=True):
        if expected is not None and actual != expected:
            raise CalibrationError(
                f"calibration array {index} has shape {array.shape} but the model expects "
                f"{_describe(shape)}; check the preprocessing spec's size and channels"
            )
    if not np.all(np.isfinite(batch)):
        raise CalibrationError(
            f"calibration array {index} contains NaN or infinite values; check the images and "
            "the preprocessing spec (a zero std?)"
        )
    return np.ascontiguousarray(batch, dtype=np.float32)


def _describe(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("N" if dim is None else str(dim) for dim in shape) + ")"


def _ort_method(method: CalibrationMethod) -> Any:
    from onnxruntime.quantization import CalibrationMethod as OrtMethod

    table = {
        CalibrationMethod.MINMAX: OrtMethod.MinMax,
        CalibrationMethod.ENTROPY: OrtMethod.Entropy,
        CalibrationMethod.PERCENTILE: OrtMethod.Percentile,
    }
    return table[method]


def _calibration_options(method: CalibrationMethod) -> dict[str, Any]:
    if method is CalibrationMethod.PERCENTILE:
        return {"CalibPercentile": CALIBRATION_PERCENTILE}
    return {}


def _check_loads(dst: Path, mode: QuantizationMode) -> None:
    """The written model must load in ONNX Runtime; fail here rather than on a device."""
    from model_packager.onnx_tools import make_session

    try:
        make_session(dst, threads=1)
    except SourceError as exc:
        raise QuantizationError(
            f"the {mode.value} model written to {dst} does not load in ONNX Runtime ({exc}); "
            "choose another quantization mode and report the model"
        ) from exc


class _ArrayReader:
    """An ONNX Runtime calibration data reader over in-memory batches (duck-typed on get_next)."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._input_name = input_name
        self._batches = list(batches)
        self._iterator: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iterator, None)
        return None if batch is None else {self._input_name: batch}

    def rewind(self) -> None:
        self._iterator = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)
