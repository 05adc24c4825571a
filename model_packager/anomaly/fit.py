"""What a fresh build or an update hands to the shared finishing steps (`finish`): the bank,
the held-out good features, the defects, and how to export and score."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_bundle.manifest import BundleId, Manifest, MemoryBank
from edge_bundle.preprocess import PreprocessSpec
from edge_bundle.profiles import HardwareProfile
from model_packager.anomaly.images import Photo

PatchRows = Callable[[NDArray[np.float32]], NDArray[np.float32]]  # tensors -> (N, h*w, C)


@dataclass(frozen=True)
class Fit:
    """A fitted memory bank and everything needed to export, calibrate and gate it."""

    bundle_id: BundleId
    profile: HardwareProfile
    spec: PreprocessSpec
    backbone: str
    backbone_sha256: str
    layers: tuple[str, ...]
    source_size: tuple[int, int]
    map_hw: tuple[int, int]
    bank: NDArray[np.float32]  # (M, C)
    bank_record: MemoryBank  # precision filled in by `finish`
    held_out: NDArray[np.float32]  # (H, h*w, C): held-out good patch features
    held_out_photos: list[Photo]  # the held-out images still at hand (new ones in an update)
    defects: list[Photo]
    reference_rows: PatchRows  # the reference features of a batch (backbone + aggregation)
    export: Callable[[Any, Path], Path]  # (stored bank, path) -> the one ONNX graph
    golden_sources: list[tuple[str, bytes]]  # earlier golden files kept by an update
    previous: Manifest | None = None
    # A fresh build's float32 features graph and its calibration images (the bank's good
    # images, preprocessed), from which an int8 backbone can be made; None in an update.
    features_graph: Path | None = None
    calibration: NDArray[np.float32] | None = None
    notes: tuple[str, ...] = ()
