"""Synthetic part photos for anomaly tests: one station's part (shot-blasted steel under uneven
light), each defect drawn with its mask, and one defect type the demo classifier never saw.

The surface, light and defect drawers are demo/make_demo.py's (loaded through
`tests.demo_support.make_demo`); this module fixes the material (an anomaly model learns one
product, not every surface the classifier saw), draws at `DRAW` px and shrinks to the test side,
and returns the defect's mask: the pixels the defect drawer changed by more than `MASK_LEVEL`
grey levels before the light, noise and blur are applied. `chip` (a flake of material broken
out of the surface, showing bright metal inside a dark rim) is new: the classifier's labels are
ok, scratch, crack, pit and stain. A `lighting` shift (dimmer, warmer light) models a new lamp
at the station, for the update loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from tests.demo_support import make_demo

DRAW = 256
SIDE = 128
MASK_LEVEL = 12.0
SEEN_DEFECTS = ("scratch", "crack", "pit", "stain")
UNSEEN_DEFECTS = ("chip",)
DEFECTS = SEEN_DEFECTS + UNSEEN_DEFECTS
# Defects are drawn as on a part this many times the drawing's side: large enough to see at
# the small test resolution.
DEFECT_SCALE = 1.6
#: A new lamp: dimmer and warmer (BGR gains).
NEW_LAMP = (0.62, 0.78, 1.0)


@dataclass(frozen=True)
class PartPhoto:
    """One photo (BGR uint8, SIDE x SIDE), its defect label ('ok' for none) and mask."""

    label: str
    pixels: NDArray[np.uint8]
    mask: NDArray[np.bool_]  # all False for 'ok'

    def jpeg(self) -> bytes:
        ok, data = cv2.imencode(".jpg", self.pixels, [cv2.IMWRITE_JPEG_QUALITY, 92])
        assert ok
        return bytes(data.tobytes())


def part_photo(
    seed: int, label: str, index: int, *, side: int = SIDE, lamp: tuple[float, ...] | None = None
) -> PartPhoto:
    """Photo `index` of `label` drawn from its own stream of `seed`."""
    demo = make_demo()
    code = (("ok", *DEFECTS).index(label)) + 100
    rng = np.random.default_rng([seed, code, index])
    image = _casting(rng, DRAW, DRAW)
    mask = np.zeros((DRAW, DRAW), bool)
    if label != "ok":
        before = image.copy()
        light = rng.uniform(0, 2 * math.pi)
        scale = int(DRAW * DEFECT_SCALE)
        drawer = _chip if label == "chip" else demo._DEFECTS[label]
        drawer(rng, image, scale, light)
        mask = np.abs(image - before).max(axis=2) > MASK_LEVEL
    image *= demo._illumination(rng, DRAW, DRAW)[..., None]
    if lamp is not None:
        image *= np.asarray(lamp, np.float32)
    image += (rng.uniform(1.5, 4.0) * rng.standard_normal((DRAW, DRAW), np.float32))[..., None]
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 0.8))
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    small = cv2.resize(pixels, (side, side), interpolation=cv2.INTER_AREA)
    small_mask = cv2.resize(mask.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
    return PartPhoto(label, small, small_mask > 0.2)


def write_photos(
    folder: Path, seed: int, label: str, count: int, *, start: int = 0, **kwargs: object
) -> list[PartPhoto]:
    """`count` photos of `label` as JPEG files in `folder`; returns them (masks included)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for index in range(start, start + count):
        photo = part_photo(seed, label, index, **kwargs)  # type: ignore[arg-type]
        (folder / f"{label}-{seed}-{index:03d}.jpg").write_bytes(photo.jpeg())
        photos.append(photo)
    return photos


def _casting(rng: np.random.Generator, height: int, width: int) -> NDArray[np.float32]:
    """Shot-blasted steel, the one material of this station's part."""
    demo = make_demo()
    tone = rng.uniform(110, 135)
    steel = tone * rng.uniform(0.98, 1.02, 3).astype(np.float32)
    mottling = demo._noise(rng, height // 8, width // 8, 3)
    mottling = cv2.resize(mottling, (width, height), interpolation=cv2.INTER_CUBIC)
    texture = rng.uniform(8, 12) * demo._noise(rng, height, width, 0.8)
    texture += rng.uniform(3, 6) * mottling
    return np.asarray(steel + texture[..., None], np.float32)


def _chip(rng: np.random.Generator, image: NDArray[np.float32], scale: int, light: float) -> None:
    """A flake broken out of the surface: an irregular patch of bright bare metal, dark rim."""
    height, width = image.shape[:2]
    cx, cy = rng.uniform(0.25, 0.75, 2) * (width, height)
    radius = scale * rng.uniform(0.03, 0.06)
    angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(6, 11))))
    radii = radius * rng.uniform(0.55, 1.2, len(angles))
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    inside = np.zeros((height, width), np.float32)
    cv2.fillPoly(inside, [np.round(points * 16).astype(np.int32)], 1.0, cv2.LINE_AA, 4)
    rim = np.clip(cv2.dilate(inside, np.ones((3, 3), np.uint8), iterations=2) - inside, 0, 1)
    bare = rng.uniform(200, 235)
    image[:] = image * (1 - inside[..., None]) + bare * inside[..., None]
    image *= 1 - 0.6 * rim[..., None]
