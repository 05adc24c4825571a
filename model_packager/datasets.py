"""Calibration and evaluation images, read through the shared decode + preprocessing path.

Calibration is a folder of images (subfolders allowed); evaluation is one folder per label. Every
file is decoded with `edge_bundle.preprocess` — the code the device runs — so the numbers the
packager records are the numbers the device will see. Hidden files are ignored; anything else that
is not an image is an error naming the file (a stray PDF in a calibration folder is a mistake
worth hearing about, not something to skip silently).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_bundle.errors import ImageError
from edge_bundle.imaging import decode_image
from edge_bundle.preprocess import InputStatistics, PreprocessSpec, input_statistics, preprocess
from model_packager.errors import CalibrationError

MAX_IMAGES = 5000


@dataclass(frozen=True)
class ImageSample:
    """One image: its file, model input, input statistics and (for eval) label index."""

    path: Path
    tensor: NDArray[Any]
    stats: InputStatistics
    label: int | None = None


def load_calibration(
    directory: Path, spec: PreprocessSpec, *, limit: int | None = None
) -> list[ImageSample]:
    """Every image under `directory` (sorted, recursive), preprocessed with `spec`."""
    files = image_files(directory, "calibration")
    if limit is not None:
        files = files[:limit]
    return [_sample(path, spec) for path in files]


def load_labelled(
    directory: Path, spec: PreprocessSpec, labels: Sequence[str]
) -> list[ImageSample]:
    """An evaluation set laid out as `directory/LABEL/*.jpg`; every folder must be a model label."""
    if not directory.is_dir():
        raise CalibrationError(f"evaluation folder {directory} does not exist")
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise CalibrationError(
            f"evaluation folder {directory} has no label folders; lay it out as {directory}/LABEL/image.jpg"
        )
    unknown = [p.name for p in folders if p.name not in labels]
    if unknown:
        raise CalibrationError(
            f"evaluation folders {unknown} are not labels of the model ({list(labels)}); "
            "rename the folders or check you are packaging the right model"
        )
    stray = [p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")]
    if stray:
        raise CalibrationError(
            f"files {stray[:5]} lie directly in {directory}; put each image in its label's folder"
        )
    samples = []
    for folder in folders:
        index = labels.index(folder.name)
        samples += [_sample(path, spec, index) for path in image_files(folder, "evaluation")]
    return samples


def stack(samples: Sequence[ImageSample]) -> list[NDArray[Any]]:
    """The model inputs of `samples`, one batch-of-one array each."""
    return [sample.tensor for sample in samples]


def labels_of(samples: Sequence[ImageSample]) -> NDArray[np.int64] | None:
    """The label indices of `samples`, or None when any sample is unlabelled."""
    if any(sample.label is None for sample in samples):
        return None
    return np.array([sample.label for sample in samples], dtype=np.int64)


def image_files(directory: Path, what: str) -> list[Path]:
    """The image files under `directory` (hidden ones left out), sorted; `CalibrationError` when
    the folder is missing, empty or holds over `MAX_IMAGES` files."""
    if not directory.is_dir():
        raise CalibrationError(f"{what} folder {directory} does not exist")
    files = sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )
    if not files:
        raise CalibrationError(
            f"{what} folder {directory} holds no images; add JPEG/PNG/WebP/BMP photos like the "
            "ones the line will send"
        )
    if len(files) > MAX_IMAGES:
        raise CalibrationError(
            f"{what} folder {directory} holds {len(files)} files; use at most {MAX_IMAGES}"
        )
    return files


def _sample(path: Path, spec: PreprocessSpec, label: int | None = None) -> ImageSample:
    try:
        data = path.read_bytes()
        decoded = decode_image(data, target_hw=spec.decode_target())
    except ImageError as exc:
        raise CalibrationError(
            f"{path} is not a usable image: {exc}; remove it or replace it"
        ) from exc
    except OSError as exc:
        raise CalibrationError(f"{path} cannot be read: {exc}") from exc
    tensor = preprocess(decoded.pixels, spec)
    return ImageSample(path, tensor, input_statistics(decoded), label)
