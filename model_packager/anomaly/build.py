"""A fresh anomaly model: good images split into the memory bank's and the held-out ones, the
backbone's reference features, and the greedy coreset. `finish` does the rest."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edge_bundle.manifest import BundleId, MemoryBank
from edge_bundle.profiles import HardwareProfile
from model_packager.anomaly import graph, patchcore, scoring
from model_packager.anomaly.backbone import Backbone
from model_packager.anomaly.fit import Fit
from model_packager.anomaly.images import (
    MIN_BANK,
    MIN_HELD_OUT,
    Photo,
    batch,
    check_one_size,
    load_defects,
    load_good,
)
from model_packager.anomaly.options import AnomalyOptions
from model_packager.progress import Progress


def fit_new(
    options: AnomalyOptions,
    backbone: Backbone,
    bundle_id: BundleId,
    profile: HardwareProfile,
    work: Path,
    progress: Progress,
) -> Fit:
    """Read the images, fit the bank; raise a `PackagerError` naming a bad input."""
    spec = backbone.preprocessing(options.input_size)
    progress.step(f"reading good images from {options.good}")
    good = load_good(options.good, spec)
    defects = load_defects(options.defects, spec, options.masks) if options.defects else []
    source_size = check_one_size([*good, *defects])
    bank_photos, held_out = split(good, options.hold_out, options.seed)
    progress.step(f"features of {len(good)} good images ({backbone.name})")

    def reference_rows(tensors: Any) -> Any:
        return scoring.patch_rows(backbone.features, tensors)[0]

    bank_tensors = batch(bank_photos)
    rows, map_hw = scoring.patch_rows(backbone.features, bank_tensors)
    candidates = rows.reshape(-1, rows.shape[-1])
    size = min(options.max_bank, max(1, math.ceil(options.coreset_ratio * len(candidates))))
    progress.step(f"greedy coreset: {size} of {len(candidates)} patches")
    chosen = patchcore.greedy_coreset(candidates, size, seed=options.seed)
    features_graph = backbone.export(work / "features.onnx", options.input_size)

    def export(stored: Any, path: Path) -> Path:
        return graph.append_head(features_graph, stored, path)

    return Fit(
        bundle_id=bundle_id,
        profile=profile,
        spec=spec,
        backbone=backbone.name,
        backbone_sha256=backbone.weights_sha256,
        layers=backbone.layers,
        source_size=source_size,
        map_hw=map_hw,
        bank=np.ascontiguousarray(candidates[chosen]),
        bank_record=MemoryBank(
            precision="float32",
            size=len(chosen),
            dim=candidates.shape[1],
            patches_seen=len(candidates),
            images=len(bank_photos),
            projection_dim=min(patchcore.PROJECTION_DIM, candidates.shape[1]),
        ),
        held_out=reference_rows(batch(held_out)),
        held_out_photos=held_out,
        defects=defects,
        reference_rows=reference_rows,
        export=export,
        golden_sources=[],
        features_graph=features_graph,
        calibration=bank_tensors,
    )


def split(
    photos: list[Photo], fraction: float, seed: int, min_bank: int = MIN_BANK
) -> tuple[list[Photo], list[Photo]]:
    """(bank, held out): a seeded shuffle, `fraction` held out (at least MIN_HELD_OUT), at
    least `min_bank` kept for the bank."""
    held = min(max(MIN_HELD_OUT, round(fraction * len(photos))), len(photos) - min_bank)
    order = np.random.default_rng(seed).permutation(len(photos))
    held_set = {int(i) for i in order[:held]}
    bank = [p for i, p in enumerate(photos) if i not in held_set]
    return bank, [p for i, p in enumerate(photos) if i in held_set]
