"""The backbone in int8, chosen by measurement (`build-anomaly --quantization int8|auto|none`).

Only the backbone's part of the one graph is quantized: ONNX Runtime static quantization (QDQ,
uint8 activations calibrated on the memory bank's good images, per-channel int8 weights) of the
features graph, with the project's `pair-safe` recipe and the stem convolution kept in float
(`model_packager.recipes`). That recipe computes the same numbers on every x86 class (AVX2
without VNNI, VNNI, AMX: no 16-bit pair of products can saturate), so what the build measures is
what any box computes. The scoring head (pooling, distances, minimum, maximum) and the memory
bank stay float.

The int8 graph is judged against the float32 graph it replaces, on the held-out good images,
the defect images and the golden samples:

- every image score within `tolerance` x threshold of the float32 graph's, every pair the
  float32 graph separates by more than twice that kept in order, and no image clearly on one
  side of the threshold moved to the other (`gate.compare`);
- with labelled defects, image AUROC (held-out good against every defect) no more than
  `MAX_AUROC_DROP` below the float32 graph's.

`int8` refuses the build when it fails; `auto` falls back to the float32 backbone and says why.
Both graphs' latencies are measured in interleaved rounds on this machine and recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_bundle.manifest import AnomalyQuantization
from model_packager.anomaly import calibrate, gate
from model_packager.benchmark import measure_speedup
from model_packager.errors import GateError
from model_packager.quantize import QuantizationMode, quantize_onnx
from model_packager.recipes import PAIR_SAFE

MODES = ("none", "int8", "auto")
#: Largest image-AUROC drop of the int8 graph against the float32 one (issue #20's target).
MAX_AUROC_DROP = 0.01
#: Default largest |int8 - float32| image score difference, as a share of the threshold.
DEFAULT_TOLERANCE = 0.03
RECIPE = PAIR_SAFE.with_float(stem=True, head=False)
#: Calibration images at most (the bank's good images, in order).
MAX_CALIBRATION = 64


@dataclass(frozen=True)
class Judged:
    """The int8 candidate's measurements and the decision taken on them."""

    record: AnomalyQuantization
    chosen: bool


def quantize_features(features_graph: Path, calibration: NDArray[np.float32], out: Path) -> Path:
    """The features graph with its backbone in int8 (pair-safe, stem in float), calibrated on
    `calibration` (N, 3, H, W) preprocessed good images."""
    images = [calibration[i : i + 1] for i in range(min(len(calibration), MAX_CALIBRATION))]
    single = _batch_dim(features_graph, out.with_name(f"{out.stem}-batch1.onnx"), 1)
    quantized = out.with_name(f"{out.stem}-quantized.onnx")
    quantize_onnx(
        single, quantized, QuantizationMode.INT8_STATIC, calibration=images, recipe=RECIPE
    )
    return _batch_dim(quantized, out, None)


def _batch_dim(src: Path, out: Path, size: int | None) -> Path:
    """`src` with its input's and outputs' batch dimension fixed to `size`, or made dynamic
    again (None, with the inferred intermediate shapes dropped). ONNX Runtime's shape inference
    before quantization cannot follow the backbone's padding arithmetic under a symbolic batch;
    at batch 1 it can, and the quantized graph's operations do not depend on the batch."""
    import onnx

    model = onnx.load(str(src))
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if size is None:
            dim.ClearField("dim_value")
            dim.dim_param = "batch"
        else:
            dim.dim_value = size
    if size is None:
        del model.graph.value_info[:]
    onnx.save(model, str(out))
    return out


def judge(
    requested: str,
    fp32: tuple[NDArray[np.float64], Any],
    int8: tuple[NDArray[np.float64], Any],
    auroc_split: tuple[int, int] | None,
    threshold: float,
    tolerance: float,
    timing_tensor: NDArray[np.float32],
    calibration_images: int,
    rounds: int = 5,
    per_round: int = 10,
) -> Judged:
    """Compare the int8 graph's scores with the float32 graph's (same images, same order; the
    images [0, good) are held-out good ones and [good, end) defects, `auroc_split` = (good, end),
    None when there are no defects) and decide. Raise `GateError` when `requested` is int8 and
    the gate fails."""
    (fp32_scores, fp32_session), (int8_scores, int8_session) = fp32, int8
    parity = gate.compare(fp32_scores, int8_scores, threshold, tolerance)
    auroc_fp32 = auroc_int8 = None
    if auroc_split is not None:
        auroc_fp32 = _auroc(fp32_scores, auroc_split)
        auroc_int8 = _auroc(int8_scores, auroc_split)
    drop_ok = auroc_fp32 is None or auroc_int8 is None or auroc_fp32 - auroc_int8 <= MAX_AUROC_DROP
    speedup, fp32_timing, int8_timing = measure_speedup(
        fp32_session, int8_session, timing_tensor, rounds=rounds, per_round=per_round
    )
    passed = parity.passed and drop_ok
    figures = _figures(parity, auroc_fp32, auroc_int8)
    if passed:
        reason = f"int8 backbone passed the gate: {figures}"
    elif requested == "auto":
        reason = f"int8 backbone refused by the gate, float32 kept: {figures}"
    else:
        raise GateError(
            "int8 gate refused the bundle: the int8 backbone's scores differ from the float32 "
            f"graph's\n  {figures}\nnothing was written; build with --quantization auto (falls "
            "back to float32) or none, or widen --int8-tolerance if the figures allow"
        )
    record = AnomalyQuantization(
        backbone="int8" if passed else "float32",
        requested=requested,  # type: ignore[arg-type]
        recipe=RECIPE.name,
        calibration_images=calibration_images,
        compared_images=parity.count,
        tolerance=tolerance,
        max_difference=round(parity.max_difference, 6),
        swapped_pairs=parity.swapped_pairs,
        flipped_verdicts=parity.flipped_verdicts,
        max_auroc_drop=MAX_AUROC_DROP,
        auroc_float32=None if auroc_fp32 is None else round(auroc_fp32, 6),
        auroc_int8=None if auroc_int8 is None else round(auroc_int8, 6),
        p50_ms_float32=round(fp32_timing.p50, 3),
        p50_ms_int8=round(int8_timing.p50, 3),
        speedup=round(speedup, 3),
        reason=reason,
    )
    return Judged(record, passed)


def not_requested() -> AnomalyQuantization:
    """The record of a build asked for no quantization."""
    return AnomalyQuantization(
        backbone="float32", requested="none", reason="--quantization none: float32 backbone"
    )


def _auroc(scores: NDArray[np.float64], split: tuple[int, int]) -> float:
    good, end = split
    return calibrate.auroc(scores[:good], scores[good:end])


def _figures(parity: gate.Parity, auroc_fp32: float | None, auroc_int8: float | None) -> str:
    line = parity.line().replace("reference", "float32").replace("bundle", "int8")
    if auroc_fp32 is None or auroc_int8 is None:
        return f"{line}; no defect folders, so no AUROC measured"
    return (
        f"{line}; image AUROC {auroc_fp32:.4f} float32, {auroc_int8:.4f} int8 (drop "
        f"{auroc_fp32 - auroc_int8:+.4f}, limit {MAX_AUROC_DROP})"
    )
