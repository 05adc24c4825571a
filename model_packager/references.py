"""Reference outputs that travel with a bundle, so the box can check what it computes.

At packaging, up to `REFERENCE_COUNT` validation images are chosen (the most confident half first,
then an even spread of the rest, so both confident agreement and top-5 containment can be
judged), stored as small JPEG thumbnails, and run through the fp32 reference model via the shared
decode + preprocessing path. Their probabilities go into the bundle as a float32 `.npy`; the box
runs the shipped model on the same thumbnails with its own kernels and refuses the bundle when
agreement is below the gates (`edge_agent.reference_check`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from edge_bundle.agreement import CONFIDENT
from edge_bundle.imaging import decode_image
from edge_bundle.manifest import ClassEvaluation, GateThreshold, ReferenceCheck
from edge_bundle.preprocess import PreprocessSpec, preprocess_bytes
from model_packager.datasets import ImageSample
from model_packager.evaluate import GatePolicy

REFERENCE_DIR = "reference"
OUTPUTS_FILE = f"{REFERENCE_DIR}/outputs.npy"
REFERENCE_COUNT = 64
JPEG_QUALITY = 95


@dataclass(frozen=True)
class ReferenceSet:
    """The thumbnails (arcname -> JPEG bytes), their preprocessed tensors and fp32 outputs."""

    files: dict[str, bytes]
    tensors: NDArray[np.float32]
    outputs: NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.files)


def choose(reference_probs: NDArray[np.float32], count: int = REFERENCE_COUNT) -> list[int]:
    """Indices of up to `count` inputs: the most confident half, then an even spread of the rest."""
    order = [int(i) for i in np.argsort(-reference_probs.max(axis=1), kind="stable")]
    if len(order) <= count:
        return sorted(order)
    head = order[: count // 2]
    rest = order[count // 2 :]
    picks = np.linspace(0, len(rest) - 1, count - len(head)).round().astype(int)
    return sorted({*head, *(rest[int(i)] for i in picks)})


def build(samples: Sequence[ImageSample], spec: PreprocessSpec, predict: Any) -> ReferenceSet:
    """Thumbnails of `samples` and `predict`'s (the fp32 model's) probabilities on them."""
    files: dict[str, bytes] = {}
    tensors = []
    for number, sample in enumerate(samples):
        data = _thumbnail(sample.path.read_bytes(), spec)
        files[f"{REFERENCE_DIR}/{number:03d}.jpg"] = data
        tensors.append(preprocess_bytes(data, spec).astype(np.float32))
    stacked = np.concatenate(tensors)
    outputs = np.stack([predict(stacked[i : i + 1])[0] for i in range(len(stacked))])
    return ReferenceSet(files, stacked, outputs.astype(np.float32))


def write(references: ReferenceSet, root: Path) -> dict[str, Path]:
    """Write the thumbnails and the outputs under `root`; arcname -> path for the bundle."""
    written: dict[str, Path] = {}
    for arcname, data in references.files.items():
        path = root / arcname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written[arcname] = path
    outputs = root / OUTPUTS_FILE
    outputs.parent.mkdir(parents=True, exist_ok=True)
    with outputs.open("wb") as handle:
        np.save(handle, references.outputs, allow_pickle=False)
    written[OUTPUTS_FILE] = outputs
    return written


def record(
    references: ReferenceSet,
    policy: GatePolicy,
    expected: Sequence[ClassEvaluation],
    judged_class: str | None,
) -> ReferenceCheck:
    """The manifest section: files, the gates the box re-applies, the build's own figures.

    Each gate's minimum is the policy's threshold, lowered to the figure the build itself saw on
    these thumbnails for the class it judged (a waived bundle, or a subset that happens to score
    lower, must not be refused for being what was validated); a box that computes clearly less
    than that is refused.
    """
    seen = next((e.metrics for e in expected if e.cpu_class == judged_class), {})
    gates = []
    for threshold in policy.thresholds():
        minimum = min(1.0, threshold.minimum, seen.get(threshold.name, threshold.minimum))
        gates.append(
            GateThreshold(name=threshold.name, minimum=minimum, min_count=threshold.min_count)  # type: ignore[arg-type]
        )
    return ReferenceCheck(
        inputs=tuple(references.files),
        outputs_path=OUTPUTS_FILE,
        confident=CONFIDENT,
        gates=tuple(gates),
        expected=tuple(expected),
    )


def _thumbnail(data: bytes, spec: PreprocessSpec) -> bytes:
    """The image scaled so its short side is the model's resize target (never up), as JPEG."""
    pixels = decode_image(data).pixels
    target = spec.decode_target()
    short = min(pixels.shape[:2])
    if target is not None and short > max(target):
        scale = max(target) / short
        size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
        pixels = np.asarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), np.uint8)
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise RuntimeError("OpenCV could not encode a reference thumbnail as JPEG")
    return bytes(encoded.tobytes())
