"""The images of an anomaly build: the good folder, optional defect folders (one per defect
type, for calibration and evaluation only) and optional masks, read through the shared decode +
preprocessing path (`edge_bundle.preprocess`) that the device runs.

Refused with a message naming what to fix, before anything slow: a missing or empty folder,
fewer than `MIN_GOOD` good images, a file that is not a decodable image, and images of more than
one size. Mixed sizes are refused rather than resized: one station's camera gives one size, and
a memory bank learnt from photos squeezed by different ratios would call every unusual ratio an
anomaly; resize them to one size yourself if they really are the same view.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from edge_bundle.errors import ImageError
from edge_bundle.imaging import decode_image
from edge_bundle.preprocess import PreprocessSpec, preprocess
from model_packager.datasets import image_files
from model_packager.errors import CalibrationError

#: Good images needed: MIN_BANK for the memory bank plus MIN_HELD_OUT held out for the threshold.
MIN_BANK = 8
MIN_HELD_OUT = 4
MIN_GOOD = MIN_BANK + MIN_HELD_OUT
MASK_SUFFIXES = (".png", ".bmp")


@dataclass(frozen=True)
class Photo:
    """One image: its file, the model input, its size (h, w) and, for defects, the folder's
    name and an optional mask (h, w) bool."""

    path: Path
    tensor: NDArray[Any]
    size: tuple[int, int]
    label: str = "good"
    mask: NDArray[np.bool_] | None = None


def load_good(directory: Path, spec: PreprocessSpec, *, minimum: int = MIN_GOOD) -> list[Photo]:
    """Every image under `directory` (sorted, recursive); at least `minimum` of them."""
    files = image_files(directory, "good")
    if len(files) < minimum:
        raise CalibrationError(
            f"good folder {directory} holds {len(files)} images; an anomaly bundle needs at "
            f"least {minimum} ({MIN_BANK} for the memory bank, {MIN_HELD_OUT} held out to set "
            "the threshold); a few dozen give a much tighter threshold"
        )
    return [_photo(path, spec) for path in files]


def load_defects(directory: Path, spec: PreprocessSpec, masks: Path | None = None) -> list[Photo]:
    """`directory/TYPE/*.jpg`; with `masks`, `masks/TYPE/STEM.png` where one exists."""
    if not directory.is_dir():
        raise CalibrationError(f"defect folder {directory} does not exist")
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = [p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not folders or stray:
        raise CalibrationError(
            f"lay out defect images as {directory}/TYPE/image.jpg, one folder per defect type"
            + (f" (files {stray[:5]} lie directly in {directory})" if stray else "")
        )
    photos = []
    for folder in folders:
        for path in image_files(folder, "defect"):
            mask = _mask(masks / folder.name, path) if masks is not None else None
            photos.append(_photo(path, spec, folder.name, mask))
    return photos


def check_one_size(photos: list[Photo], expected: tuple[int, int] | None = None) -> tuple[int, int]:
    """The one (h, w) of every photo (and `expected`, from an earlier version); refuse a mix."""
    sizes: dict[tuple[int, int], list[Path]] = {}
    for photo in photos:
        sizes.setdefault(photo.size, []).append(photo.path)
    if expected is not None and set(sizes) != {expected}:
        sizes.setdefault(expected, [])
    if len(sizes) > 1:
        listed = "; ".join(
            f"{w}x{h}: {len(paths)} image(s), e.g. {paths[0].name if paths else 'the bundle'}"
            for (h, w), paths in sorted(sizes.items())
        )
        raise CalibrationError(
            f"the images come in more than one size ({listed}); an anomaly model learns one "
            "camera view, so give photos of one size (crop or resize them all the same way)"
        )
    return next(iter(sizes))


def batch(photos: list[Photo]) -> NDArray[np.float32]:
    return np.concatenate([photo.tensor for photo in photos]).astype(np.float32)


def _photo(
    path: Path, spec: PreprocessSpec, label: str = "good", mask: NDArray[np.bool_] | None = None
) -> Photo:
    try:
        decoded = decode_image(path.read_bytes())
    except ImageError as exc:
        raise CalibrationError(
            f"{path} is not a usable image: {exc}; remove or replace it"
        ) from exc
    size = (decoded.pixels.shape[0], decoded.pixels.shape[1])
    if mask is not None and mask.shape != size:
        raise CalibrationError(f"the mask of {path} is {mask.shape[::-1]}, the image {size[::-1]}")
    return Photo(path, preprocess(decoded.pixels, spec), size, label, mask)


def _mask(folder: Path, image: Path) -> NDArray[np.bool_] | None:
    for suffix in MASK_SUFFIXES:
        candidate = folder / f"{image.stem}{suffix}"
        if candidate.is_file():
            pixels = cv2.imread(str(candidate), cv2.IMREAD_GRAYSCALE)
            if pixels is None:
                raise CalibrationError(f"mask {candidate} is not a readable image")
            return np.asarray(pixels > 127)
    return None
