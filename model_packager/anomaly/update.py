"""The update loop: an earlier anomaly bundle's memory bank extended with new good images.

The new images go through the earlier bundle's own graph (its validated features, read from an
extra output), so no backbone is exported again. Their patches are added to the bank by the same
greedy k-centre selection, started from the existing bank (only what the bank does not already
cover is added). The threshold is recalibrated on the earlier held-out features (carried in the
bundle) together with the new held-out images, so it holds for the old condition and the new one.
The graph is re-exported by replacing its bank initializer, then measured and gated as a build.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edge_bundle.bundle import VerifiedBundle
from edge_bundle.manifest import BundleId
from edge_bundle.preprocess import PreprocessSpec
from edge_bundle.profiles import HardwareProfile
from model_packager.anomaly import graph, patchcore, scoring
from model_packager.anomaly.build import split
from model_packager.anomaly.fit import Fit
from model_packager.anomaly.images import (
    MIN_HELD_OUT,
    batch,
    check_one_size,
    load_defects,
    load_good,
)
from model_packager.anomaly.options import AnomalyOptions
from model_packager.errors import SourceError
from model_packager.onnx_tools import make_session
from model_packager.progress import Progress

MIN_UPDATE_BANK = 2
MIN_UPDATE = MIN_UPDATE_BANK + MIN_HELD_OUT


def fit_update(
    options: AnomalyOptions,
    old: VerifiedBundle,
    bundle_id: BundleId,
    profile: HardwareProfile,
    work: Path,
    progress: Progress,
) -> Fit:
    """Extend `old`'s bank with `options.good`; raise a `PackagerError` naming a bad input."""
    manifest = old.manifest
    anomaly = manifest.anomaly
    if anomaly is None or manifest.preprocessing is None or anomaly.calibration_features is None:
        raise SourceError(
            f"{options.update} is a {manifest.task} bundle; --update takes an anomaly bundle "
            "built by build-anomaly"
        )
    spec = PreprocessSpec.model_validate(manifest.preprocessing)
    progress.step(f"reading new good images from {options.good}")
    good = load_good(options.good, spec, minimum=MIN_UPDATE)
    defects = load_defects(options.defects, spec, options.masks) if options.defects else []
    source_size = check_one_size([*good, *defects], anomaly.source_size)
    bank_photos, held_out = split(good, options.hold_out, options.seed, MIN_UPDATE_BANK)
    model = old.path("model.onnx")
    session = make_session(graph.with_features_output(model, work / "features.onnx"), 1)

    def reference_rows(tensors: Any) -> Any:
        return scoring.onnx_patch_rows(session, tensors)[0]

    progress.step(f"features of {len(good)} new good images (the bundle's own graph)")
    rows, map_hw = scoring.onnx_patch_rows(session, batch(bank_photos))
    candidates = rows.reshape(-1, rows.shape[-1])
    old_bank = graph.bank_from_model(model)
    room = max(0, options.max_bank - len(old_bank))
    size = min(room, max(1, math.ceil(options.coreset_ratio * len(candidates))))
    progress.step(f"greedy coreset: {size} of {len(candidates)} new patches beside {len(old_bank)}")
    chosen = patchcore.greedy_coreset(candidates, size, seed=options.seed, existing=old_bank)
    bank = np.concatenate([old_bank, candidates[chosen]])
    old_held = np.load(old.path(anomaly.calibration_features), allow_pickle=False)
    record = anomaly.memory_bank
    notes = (
        f"update of version {manifest.version}: {len(good)} new good images "
        f"({len(bank_photos)} offered to the bank, {len(held_out)} held out), {len(chosen)} "
        f"patch features added to {len(old_bank)}",
    )

    def export(stored: Any, path: Path) -> Path:
        return graph.replace_bank(model, stored, path)

    return Fit(
        bundle_id=bundle_id,
        profile=profile,
        spec=spec,
        backbone=anomaly.backbone,
        backbone_sha256=anomaly.backbone_sha256,
        layers=anomaly.feature_layers,
        source_size=source_size,
        map_hw=map_hw,
        bank=np.ascontiguousarray(bank, np.float32),
        bank_record=record.model_copy(
            update={
                "size": len(bank),
                "patches_seen": record.patches_seen + len(candidates),
                "images": record.images + len(bank_photos),
            }
        ),
        held_out=np.concatenate([old_held.astype(np.float32), reference_rows(batch(held_out))]),
        held_out_photos=held_out,
        defects=defects,
        reference_rows=reference_rows,
        export=export,
        golden_sources=[
            (s.input_path, old.path(s.input_path).read_bytes())
            for s in (manifest.golden.samples if manifest.golden else ())
        ],
        previous=manifest,
        notes=notes,
    )
