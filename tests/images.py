"""Photo-like test images made on the fly (no files, no network): smooth gradients, texture, noise
and solid shapes with hard edges, so resize filters see both flat areas and detail."""

from __future__ import annotations

import io

import cv2
import numpy as np
from numpy.typing import NDArray


def natural_image(height: int, width: int, seed: int = 0) -> NDArray[np.uint8]:
    """An RGB uint8 image that looks more like a photo than random noise does."""
    rng = np.random.default_rng(seed)
    scale = max(height, width) / 400.0
    x = np.arange(width, dtype=np.float32) / scale
    y = np.arange(height, dtype=np.float32)[:, None] / scale
    channels = []
    for c in range(3):
        # sin(a + b) = sin a cos b + cos a sin b keeps every term an outer product: cheap
        waves = 70 * np.sin(x / 37 + c + seed) * np.cos(y / 53 - c)
        ripples = np.sin(x / 11 + 2 * c) * np.cos(y / 11) + np.cos(x / 11 + 2 * c) * np.sin(y / 11)
        channels.append(128 + waves + 40 * ripples)
    image = np.stack(channels, axis=-1)
    for _ in range(25):
        color = tuple(float(v) for v in rng.integers(0, 256, 3))
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        radius = int(rng.integers(3, max(4, min(height, width) // 5)))
        if rng.random() < 0.5:
            cv2.circle(image, center, radius, color, -1, lineType=cv2.LINE_AA)
        else:
            corner = (center[0] + radius, center[1] + radius // 2)
            cv2.rectangle(image, center, corner, color, -1)
    image += 6.0 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.asarray(np.clip(image, 0, 255), dtype=np.uint8)


def encode(image_rgb: NDArray[np.uint8], fmt: str, quality: int = 92) -> bytes:
    """Encode an RGB image with OpenCV: fmt is "jpeg", "png", "webp" or "bmp"."""
    ext = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "bmp": ".bmp"}[fmt]
    params = {"jpeg": [cv2.IMWRITE_JPEG_QUALITY, quality], "png": [cv2.IMWRITE_PNG_COMPRESSION, 1]}
    params.setdefault(fmt, [])
    ok, buffer = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params[fmt])
    assert ok
    return bytes(buffer.tobytes())


def jpeg_with_orientation(image_rgb: NDArray[np.uint8], orientation: int) -> bytes:
    """A JPEG written by Pillow carrying an EXIF orientation tag (needs pillow)."""
    from PIL import Image

    picture = Image.fromarray(image_rgb)
    exif = picture.getexif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def large_flat_png(side: int = 7000, seed: int = 0) -> bytes:
    """A `side` x `side` PNG (49 megapixels by default, under the agent's 50 MP cap) of flat shapes
    and lines that compresses to a few hundred KB: a small upload that decodes to ~150 MB."""
    rng = np.random.default_rng(seed)
    image = np.full((side, side, 3), 235, np.uint8)
    for _ in range(60):
        centre = (int(rng.integers(0, side)), int(rng.integers(0, side)))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.circle(image, centre, int(rng.integers(side // 40, side // 6)), colour, -1)
    for _ in range(40):
        start = (int(rng.integers(0, side)), int(rng.integers(0, side)))
        end = (int(rng.integers(0, side)), int(rng.integers(0, side)))
        cv2.line(image, start, end, (20, 20, 20), int(rng.integers(2, 12)))
    ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    assert ok
    return bytes(buffer.tobytes())
