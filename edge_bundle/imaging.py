"""Image bytes -> RGB pixels: the one decoder used by the agent and the packager alike.

`decode_image` checks everything it can before a decoder runs (byte count, format by magic bytes,
pixel count from the header, file completeness), then decodes with OpenCV into 8-bit RGB:

- EXIF orientation is honoured: `cv2.imdecode` rotates/flips by the EXIF tag for IMREAD_COLOR and
  the IMREAD_REDUCED_COLOR_* flags (only IMREAD_UNCHANGED or IMREAD_IGNORE_ORIENTATION skip it).
- grayscale and palette images become three equal channels; 16-bit images are reduced to 8 bits
  (the high byte, i.e. value // 256); an alpha channel is dropped, not composited, which is what
  Pillow's `convert("RGB")` does in the Hugging Face processors a model was trained with.
- a JPEG far larger than the model input is decoded at 1/2, 1/4 or 1/8 size by libjpeg's DCT
  scaling (IMREAD_REDUCED_COLOR_*), several times faster than a full decode plus resize. The factor
  is the largest that keeps the reduced image's short side at least twice the largest target side,
  so the final antialiased resize still has detail to work from.

Every failure is an `ImageError` whose message says what was wrong and what to send instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from edge_bundle.errors import ImageError, ImageTooLargeError
from edge_bundle.image_headers import (
    ACCEPTED_FORMATS,
    HeaderInfo,
    is_complete,
    read_dimensions,
    read_header,
    sniff_format,
)

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "choose_reduction",
    "decode_image",
    "decoded_pixels",
    "read_dimensions",
    "sniff_format",
]

DEFAULT_MAX_PIXELS = 50_000_000  # a 48-megapixel phone photo fits; a decompression bomb does not
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
MIN_REDUCED_RATIO = 2.0  # reduced short side >= this x the largest target side

_REDUCED_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


@dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels and what is known about where they came from.

    `pixels` is HxWx3 RGB uint8 in display orientation (EXIF applied), at 1/`reduction` of the full
    size. `width` and `height` are the full-resolution size in display orientation.
    """

    pixels: NDArray[np.uint8]
    format: str
    width: int
    height: int
    reduction: int


def choose_reduction(
    width: int,
    height: int,
    target_hw: tuple[int, int] | None,
    min_ratio: float = MIN_REDUCED_RATIO,
) -> int:
    """The JPEG decode reduction (1, 2, 4 or 8) for an image of this size and a resize target.

    The reduced short side must stay >= `min_ratio` x the larger target side; orientation
    does not matter because only the short side is compared.
    """
    if target_hw is None:
        return 1
    needed = min_ratio * max(target_hw)
    for factor in (8, 4, 2):
        if min(math.ceil(width / factor), math.ceil(height / factor)) >= needed:
            return factor
    return 1


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    target_hw: tuple[int, int] | None = None,
    min_ratio: float = MIN_REDUCED_RATIO,
) -> DecodedImage:
    """Decode JPEG, PNG, WebP or BMP bytes into RGB uint8 pixels.

    `target_hw` is the (height, width) the caller will resize to; when given, large JPEGs are
    decoded at a reduced size (see `choose_reduction`, which `min_ratio` is passed to). None
    decodes at full size.
    """
    _check_byte_count(data, max_bytes)
    info = read_header(data)
    _check_pixel_count(info, max_pixels)
    if not is_complete(data, info):
        raise ImageError(
            f"the {info.format.upper()} data ends before the image does (a truncated upload?); "
            "send the whole file again"
        )
    reduction = (
        choose_reduction(info.width, info.height, target_hw, min_ratio)
        if info.format == "jpeg"
        else 1
    )
    bgr = _imdecode(data, _REDUCED_FLAGS[reduction], info.format)
    width, height = _display_size(info, bgr.shape[:2], reduction)
    # In place: a second full-size buffer would double the peak memory of a large decode.
    rgb = np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr), dtype=np.uint8)
    return DecodedImage(rgb, info.format, width, height, reduction)


def decoded_pixels(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, target_hw: tuple[int, int] | None = None
) -> int:
    """How many pixels `decode_image` would allocate for `data` (after any JPEG reduction), read
    from the header alone; 0 when it would refuse before decoding (unreadable or too large)."""
    try:
        info = read_header(data)
    except ImageError:
        return 0
    if info.width * info.height > max_pixels:
        return 0
    reduction = choose_reduction(info.width, info.height, target_hw) if info.format == "jpeg" else 1
    return math.ceil(info.width / reduction) * math.ceil(info.height / reduction)


def _check_byte_count(data: bytes, max_bytes: int) -> None:
    if not data:
        raise ImageError("the image is empty (0 bytes); attach a photo and send again")
    if len(data) > max_bytes:
        raise ImageTooLargeError(
            f"the image is {len(data):,} bytes, over the limit of {max_bytes:,}; "
            "send a smaller or more compressed photo"
        )


def _check_pixel_count(info: HeaderInfo, max_pixels: int) -> None:
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise ImageTooLargeError(
            f"the image is {info.width}x{info.height} = {pixels:,} pixels, over the limit of "
            f"{max_pixels:,}; scale it down (e.g. to 4000x3000) before sending"
        )


def _imdecode(data: bytes, flags: int, fmt: str) -> NDArray[np.uint8]:
    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error:
        decoded = None
    if decoded is None or decoded.size == 0:
        raise ImageError(
            f"the {fmt.upper()} image could not be decoded (corrupt data or an unsupported "
            "variant); re-save it as a standard JPEG or PNG and send again"
        )
    if decoded.ndim != 3 or decoded.shape[2] != 3 or decoded.dtype != np.uint8:
        raise ImageError(
            f"the {fmt.upper()} image decoded to an unexpected layout {decoded.shape} "
            f"{decoded.dtype}; re-save it as a standard JPEG or PNG and send again"
        )
    return np.asarray(decoded, dtype=np.uint8)


def _display_size(info: HeaderInfo, decoded_hw: tuple[int, ...], reduction: int) -> tuple[int, int]:
    """Full-resolution (width, height) in display orientation, after checking that the decoder
    produced the size the header promised (rotated by EXIF or not)."""
    stored_hw = (math.ceil(info.height / reduction), math.ceil(info.width / reduction))
    if tuple(decoded_hw) == stored_hw:
        return info.width, info.height
    if tuple(decoded_hw) == stored_hw[::-1]:
        return info.height, info.width
    raise ImageError(
        f"the {info.format.upper()} image decoded to {decoded_hw[1]}x{decoded_hw[0]} but its "
        f"header says {info.width}x{info.height} (damaged or crafted file); send the original photo"
    )
