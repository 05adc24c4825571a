"""The steps a fresh build and an update share once a bank is fitted: reference scores and the
threshold, both bank precisions exported and measured, the parity gate, golden samples,
evaluation on defect folders, benchmark, manifest body and report.

Everything is written under `work`; the caller signs and writes the bundle only after this
returns, so a refused gate leaves nothing behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from edge_bundle.bundle import SourceFile
from edge_bundle.imaging import decode_image
from edge_bundle.manifest import (
    ANOMALY_GOLDEN_KEY,
    ANOMALY_LABELS,
    Anomaly,
    AnomalyCalibration,
    AnomalyEvaluation,
    AnomalyQuantization,
    Golden,
    GoldenSample,
    Lineage,
    ManifestBody,
)
from edge_bundle.preprocess import preprocess_bytes
from edge_bundle.profile_host import matches_host
from model_packager.anomaly import calibrate, gate, graph, int8, patchcore, report, scoring
from model_packager.anomaly.fit import Fit
from model_packager.anomaly.images import Photo, batch
from model_packager.anomaly.options import AnomalyOptions
from model_packager.benchmark import benchmark_record, machine_info, measure_pipeline
from model_packager.inference import tensor_specs
from model_packager.onnx_tools import make_session
from model_packager.progress import Progress

CALIBRATION_FEATURES = "anomaly/held_out_features.npy"
GOLDEN_DIR = "golden"
HEATMAPS = 6


@dataclass(frozen=True)
class Contents:
    """The bundle's files (report excluded), manifest body, report page and summary lines."""

    files: dict[str, Path | SourceFile]
    body: ManifestBody
    report_html: str
    summary: tuple[str, ...]


@dataclass(frozen=True)
class _Scored:
    tensors: NDArray[np.float32]
    reference: NDArray[np.float64]
    reference_maps: NDArray[np.float64]


def finish(
    fit: Fit,
    options: AnomalyOptions,
    work: Path,
    progress: Progress,
    packager_version: str,
    started: float,
) -> Contents:
    """Calibrate, export, gate and describe `fit`; raise `GateError` when parity fails."""
    progress.step("reference scores and the threshold")
    held_scores = patchcore.image_scores(patchcore.score_maps(fit.held_out, fit.bank, fit.map_hw))
    threshold = calibrate.threshold_for(held_scores, options.target_false_alarm_rate)
    checked = [*fit.held_out_photos, *fit.defects]
    validation = _reference(fit, batch(checked)) if checked else None
    golden = _choose_golden(fit, validation, options.golden_count)
    golden_set = _reference(fit, _tensors(fit, [data for _, data in golden]))
    scored = [s for s in (validation, golden_set) if s is not None]
    progress.step("exporting the graph; measuring the memory bank's precision")
    threads = fit.profile.onnx.intra_op_threads
    candidates: dict[str, tuple[Path, Any]] = {}
    parities: dict[str, gate.Parity] = {}
    for precision in ("float32", "float16"):
        path = fit.export(graph.stored_bank(fit.bank, precision), work / f"model-{precision}.onnx")
        session = make_session(path, threads)
        parities[precision] = _parity(session, scored, threshold, options.parity_tolerance)
        candidates[precision] = (path, session)
    precision, reason = gate.choose_precision(options.bank_precision, parities)
    path, session = candidates[precision]
    if options.unsafe_bank_bits is not None:
        stored = graph.stored_bank(fit.bank, precision, options.unsafe_bank_bits)
        path = fit.export(stored, work / "model-unsafe.onnx")
        session = make_session(path, threads)
    progress.step("parity gate: the bundle against the reference scorer")
    parity = _parity(session, scored, threshold, options.parity_tolerance)
    gate.require(parity, f"the {precision} bank's")
    quantization, path, session = _backbone(
        fit, options, scored, threshold, graph.stored_bank(fit.bank, precision), (path, session),
        work, progress,
    )  # fmt: skip
    notes = fit.notes + ((quantization.reason,) if quantization is not None else ())
    files: dict[str, Path | SourceFile] = {"model.onnx": SourceFile(path, "model")}
    golden_record = _write_golden(
        golden, session, fit, work, files, options.parity_tolerance * threshold
    )
    features_path = work / "held_out_features.npy"
    np.save(features_path, fit.held_out.astype(np.float16), allow_pickle=False)
    files[CALIBRATION_FEATURES] = SourceFile(features_path, "other")
    shipped = scoring.bundle_scores(session, validation.tensors) if validation else None
    alarms = int((held_scores > threshold).sum())
    anomaly = Anomaly(
        backbone=fit.backbone,
        backbone_sha256=fit.backbone_sha256,
        feature_layers=fit.layers,
        input_size=_input_size(fit),
        source_size=fit.source_size,
        score_map_size=fit.map_hw,
        threshold=round(threshold, 6),
        memory_bank=fit.bank_record.model_copy(update={"precision": precision}),
        calibration=AnomalyCalibration(
            target_false_alarm_rate=options.target_false_alarm_rate,
            held_out_good=len(held_scores),
            false_alarms=alarms,
            false_alarm_interval=_rounded(calibrate.clopper_pearson(alarms, len(held_scores))),
            good_score_p50=round(float(np.median(held_scores)), 6),
            good_score_max=round(float(held_scores.max()), 6),
        ),
        evaluation=_evaluation(fit, shipped, threshold),
        parity_tolerance=options.parity_tolerance,
        parity_max_difference=round(parity.max_difference, 8),
        calibration_features=CALIBRATION_FEATURES,
        updated_from=fit.previous.version if fit.previous is not None else None,
        quantization=quantization,
    )
    progress.step("benchmarking decode + preprocess + infer")
    timing = measure_pipeline(session, golden[0][1], fit.spec, samples=options.bench_samples)
    host = matches_host(fit.profile)
    body = ManifestBody(
        name=fit.bundle_id.name,
        version=fit.bundle_id.version,
        created_at=datetime.now(UTC),
        task="anomaly-detection",
        runtime="onnx",
        inputs=tensor_specs(session.get_inputs()),
        outputs=tensor_specs(session.get_outputs()),
        preprocessing=fit.spec.model_dump(mode="json"),
        labels=ANOMALY_LABELS,
        benchmarks=(
            benchmark_record(
                fit.profile.name,
                timing,
                threads=threads,
                on_target=host.matches,
                extra={"budget_p95_ms": float(fit.profile.budgets.latency_p95_ms)},
            ),
        ),
        compatible_profiles=(fit.profile.name,),
        lineage=Lineage(
            base_model_sha256=fit.backbone_sha256,
            source=f"PatchCore on {fit.backbone}",
            packager_version=packager_version,
        ),
        golden=golden_record,
        anomaly=anomaly,
        extra={"bank_precision_choice": reason, "notes": list(notes)},
    )
    seconds = time.perf_counter() - started
    page = report.render(
        report.AnomalyReport(
            bundle_id=str(fit.bundle_id),
            profile=fit.profile.name,
            created_at=body.created_at.isoformat(timespec="seconds"),
            anomaly=anomaly,
            precision_reason=reason,
            parity=parity.line(),
            model_size=path.stat().st_size,
            latency=(timing.p50, timing.p95),
            threads=threads,
            machine=machine_info().cpu,
            build_seconds=seconds,
            good_scores=tuple(float(v) for v in held_scores),
            defect_scores=_defect_scores(fit, shipped),
            heatmaps=_heatmaps(fit, checked, shipped, threshold),
            notes=notes,
        )
    )
    summary = _summary(anomaly, reason, parity, timing.p50, timing.p95, seconds)
    return Contents(files, body, page, summary)


def _backbone(
    fit: Fit,
    options: AnomalyOptions,
    scored: list[_Scored],
    threshold: float,
    stored: Any,
    fp32: tuple[Path, Any],
    work: Path,
    progress: Progress,
) -> tuple[AnomalyQuantization | None, Path, Any]:
    """The backbone's precision: an update keeps the earlier one's (its bank was learnt from
    those features); a build asked for int8 or auto measures an int8 backbone against `fp32`
    (the float32 graph that passed the parity gate) and ships it when it passes."""
    path, session = fp32
    if fit.previous is not None or fit.features_graph is None or fit.calibration is None:
        earlier = fit.previous.anomaly if fit.previous is not None else None
        if earlier is None or earlier.quantization is None:
            return None, path, session
        kept = earlier.quantization.inherited_from or fit.previous.version  # type: ignore[union-attr]
        return earlier.quantization.model_copy(update={"inherited_from": kept}), path, session
    if options.quantization == "none":
        return int8.not_requested(), path, session
    progress.step("int8 backbone: quantizing and measuring it against the float32 graph")
    features = int8.quantize_features(
        fit.features_graph, fit.calibration, work / "features-int8.onnx"
    )
    int8_path = graph.append_head(features, stored, work / "model-int8.onnx")
    int8_session = make_session(int8_path, fit.profile.onnx.intra_op_threads)
    tensors = np.concatenate([s.tensors for s in scored])
    fp32_scores = scoring.bundle_scores(session, tensors)[0]
    int8_scores = scoring.bundle_scores(int8_session, tensors)[0]
    good, validation = len(fit.held_out_photos), len(scored[0].tensors) if fit.defects else 0
    judged = int8.judge(
        options.quantization,
        (fp32_scores, session),
        (int8_scores, int8_session),
        (good, validation) if fit.defects and good else None,
        threshold,
        options.int8_tolerance,
        tensors[:1],
        min(len(fit.calibration), int8.MAX_CALIBRATION),
        per_round=max(2, options.bench_samples // 3),
    )
    if judged.chosen:
        return judged.record, int8_path, int8_session
    return judged.record, path, session


def _reference(fit: Fit, tensors: NDArray[np.float32]) -> _Scored:
    maps = patchcore.score_maps(fit.reference_rows(tensors), fit.bank, fit.map_hw)
    return _Scored(tensors, patchcore.image_scores(maps), maps)


def _parity(session: Any, scored: list[_Scored], threshold: float, tolerance: float) -> gate.Parity:
    reference = np.concatenate([s.reference for s in scored])
    shipped = np.concatenate([scoring.bundle_scores(session, s.tensors)[0] for s in scored])
    return gate.compare(reference, shipped, threshold, tolerance)


def _tensors(fit: Fit, images: list[bytes]) -> NDArray[np.float32]:
    return np.concatenate([preprocess_bytes(data, fit.spec) for data in images]).astype(np.float32)


def _choose_golden(fit: Fit, validation: _Scored | None, count: int) -> list[tuple[str, bytes]]:
    """Earlier golden files first (an update keeps them), then the lowest- and highest-scoring
    held-out good image and the highest-scoring defects, as lossless PNGs."""
    chosen = list(fit.golden_sources)
    if validation is not None:
        good = len(fit.held_out_photos)
        order = np.argsort(validation.reference)
        picks = [int(order[0]), int(order[-1])] if good else []
        picks = [i for i in picks if i < good]
        picks += [int(i) for i in order[::-1] if i >= good]
        photos = [*fit.held_out_photos, *fit.defects]
        for index in dict.fromkeys(picks):
            if len(chosen) >= max(count, len(fit.golden_sources)):
                break
            chosen.append(("", _png(photos[index].path)))
    return [(f"{GOLDEN_DIR}/{n:02d}.png", data) for n, (_, data) in enumerate(chosen)]


def _png(path: Path) -> bytes:
    pixels = decode_image(path.read_bytes()).pixels
    ok, data = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"could not encode golden sample {path} as PNG")
    return bytes(data.tobytes())


def _write_golden(
    golden: list[tuple[str, bytes]],
    session: Any,
    fit: Fit,
    work: Path,
    files: dict[str, Path | SourceFile],
    tolerance: float,
) -> Golden:
    """Write the golden PNGs; expect the shipped graph's score for each one's exact bytes."""
    scores, _ = scoring.bundle_scores(session, _tensors(fit, [data for _, data in golden]))
    samples = []
    for (arcname, data), score in zip(golden, scores, strict=True):
        target = work / "bundle" / arcname
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        files[arcname] = SourceFile(target, "golden")
        samples.append(
            GoldenSample(
                input_path=arcname, expected_topk=((ANOMALY_GOLDEN_KEY, round(float(score), 6)),)
            )
        )
    # The box's kernels may differ slightly: the parity tolerance, in score units.
    return Golden(tolerance=round(tolerance, 6), samples=tuple(samples))


def _evaluation(
    fit: Fit, shipped: tuple[NDArray[np.float64], NDArray[np.float32]] | None, threshold: float
) -> AnomalyEvaluation | None:
    good = len(fit.held_out_photos)
    if shipped is None or not fit.defects or not good:
        return None
    scores, maps = shipped
    good_scores, bad_scores = scores[:good], scores[good:]
    recall: dict[str, float] = {}
    for name in sorted({photo.label for photo in fit.defects}):
        mine = [s for s, p in zip(bad_scores, fit.defects, strict=True) if p.label == name]
        recall[name] = round(float(np.mean(np.asarray(mine) > threshold)), 6)
    masked = [
        (m, p.mask) for m, p in zip(maps[good:], fit.defects, strict=True) if p.mask is not None
    ]
    peaks = [calibrate.peak_on_mask(m, mask) for m, mask in masked if mask.any()]
    return AnomalyEvaluation(
        good_images=good,
        defect_images=len(fit.defects),
        image_auroc=round(calibrate.auroc(good_scores, bad_scores), 6),
        recall=recall,
        peak_on_mask=round(float(np.mean(peaks)), 6) if peaks else None,
        masked_images=len(peaks),
    )


def _defect_scores(
    fit: Fit, shipped: tuple[NDArray[np.float64], NDArray[np.float32]] | None
) -> dict[str, tuple[float, ...]]:
    if shipped is None:
        return {}
    bad = shipped[0][len(fit.held_out_photos) :]
    out: dict[str, tuple[float, ...]] = {}
    for score, photo in zip(bad, fit.defects, strict=True):
        out[photo.label] = (*out.get(photo.label, ()), float(score))
    return out


def _heatmaps(
    fit: Fit,
    photos: list[Photo],
    shipped: tuple[NDArray[np.float64], NDArray[np.float32]] | None,
    threshold: float,
) -> tuple[report.Heatmap, ...]:
    if shipped is None:
        return ()
    scores, maps = shipped
    good = len(fit.held_out_photos)
    picks = [int(i) for i in np.argsort(-scores[:good])[:2]]
    picks += [good + int(i) for i in np.argsort(-scores[good:])[: HEATMAPS - len(picks)]]
    side = _input_size(fit)
    out = []
    for index in picks:
        photo = photos[index]
        pixels = decode_image(photo.path.read_bytes()).pixels
        small = np.asarray(cv2.resize(pixels, side[::-1], interpolation=cv2.INTER_AREA), np.uint8)
        title = f"{photo.label} · {photo.path.name} · {scores[index]:.3f}"
        out.append(report.Heatmap(title, small, maps[index], threshold))
    return tuple(out)


def _input_size(fit: Fit) -> tuple[int, int]:
    assert fit.spec.height is not None and fit.spec.width is not None
    return fit.spec.height, fit.spec.width


def _rounded(interval: tuple[float, float]) -> tuple[float, float]:
    return round(interval[0], 6), round(interval[1], 6)


def _summary(
    anomaly: Anomaly, reason: str, parity: gate.Parity, p50: float, p95: float, seconds: float
) -> tuple[str, ...]:
    calibration, bank = anomaly.calibration, anomaly.memory_bank
    low, high = calibration.false_alarm_interval
    lines = [
        f"threshold   {anomaly.threshold:.4f} (target false-alarm rate "
        f"{100 * calibration.target_false_alarm_rate:.1f} %: {calibration.false_alarms} of "
        f"{calibration.held_out_good} held out above, 95 % interval {100 * low:.1f}-{100 * high:.1f} %)",
        f"bank        {bank.size} x {bank.dim} {bank.precision} from {bank.patches_seen} patches "
        f"of {bank.images} images ({reason})",
        f"parity      {parity.line()}",
        *(
            (f"backbone    {anomaly.quantization.backbone}: {anomaly.quantization.reason}",)
            if anomaly.quantization is not None
            else ()
        ),
        f"latency     p50 {p50:.2f} ms, p95 {p95:.2f} ms",
        f"time        {seconds:.1f} s",
    ]
    evaluation = anomaly.evaluation
    if evaluation is not None:
        recall = ", ".join(f"{k} {100 * v:.0f} %" for k, v in sorted(evaluation.recall.items()))
        lines.append(f"evaluation  image AUROC {evaluation.image_auroc:.4f}; recall {recall}")
        if evaluation.peak_on_mask is not None:
            lines.append(
                f"localised   peak on the mask for {100 * evaluation.peak_on_mask:.0f} % of "
                f"{evaluation.masked_images}"
            )
    return tuple(lines)
