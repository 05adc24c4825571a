"""The heatmap overlay of an anomaly answer: the photo, its score map colour-mapped and blended
over it, and the regions outlined. Pure pixels in, PNG bytes out (the device's `heatmaps` reads
the kept request and decodes its photo).

Colours: the map is upsampled (bilinear) over the whole photo, as the preprocessing resized the
whole photo; the threshold sits in the middle of the colour scale (green), the map's lowest cell
at its blue end, and its peak (at least 1.25 x the threshold) at its red end. The overlay is at
most `MAX_SIDE` pixels on its long side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

MAX_SIDE = 1024
ALPHA = 0.45
OUTLINE_BGR = (255, 255, 255)


def render_heatmap(
    pixels: NDArray[np.uint8],
    score_map: NDArray[np.float32],
    threshold: float,
    regions: Sequence[dict[str, Any]],
    image_size: tuple[int, int],
) -> bytes:
    """PNG bytes of the overlay. `pixels` is the photo (RGB, any reduction of `image_size`,
    its full width and height, in which `regions` are given)."""
    height, width = pixels.shape[:2]
    scale = min(1.0, MAX_SIDE / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        pixels = np.asarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), np.uint8)
    out_h, out_w = pixels.shape[:2]
    heat = cv2.resize(score_map.astype(np.float32), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    low = min(float(score_map.min()), threshold * 0.999)
    high = max(float(score_map.max()), threshold * 1.25)
    level = np.interp(heat, [low, threshold, high], [0.0, 0.5, 1.0])
    colours = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    photo = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    blended = cv2.addWeighted(photo, 1 - ALPHA, colours, ALPHA, 0)
    full_w, full_h = image_size
    sx, sy = out_w / max(full_w, 1), out_h / max(full_h, 1)
    thickness = max(1, round(max(out_h, out_w) / 256))
    for region in regions:
        x, y = region["x"] * sx, region["y"] * sy
        right, bottom = x + region["width"] * sx, y + region["height"] * sy
        cv2.rectangle(
            blended,
            (round(x), round(y)),
            (round(right) - 1, round(bottom) - 1),
            OUTLINE_BGR,
            thickness,
        )
    ok, png = cv2.imencode(".png", blended)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise RuntimeError("OpenCV could not encode the heatmap as PNG")
    return bytes(png.tobytes())
