"""The image preprocessing spec stored in a bundle, and its one implementation.

The packager (calibration, validation, golden samples) and the agent (every request) both turn
pixels into a model input through `preprocess`, so what was validated is what the device computes.
The steps, in Hugging Face image-processor order:

1. resize (Pillow-compatible filters, see `edge_bundle.resample`):
   "shortest_edge" scales so the shorter side equals `shortest_edge`, keeping the aspect ratio (the
   longer side is truncated to an integer, as HF does); "exact" resizes to `height` x `width`;
   "none" keeps the size;
2. optional centre crop (HF's arithmetic: offsets floor((size - crop) / 2), zero padding when the
   image is smaller than the crop);
3. rescale by `rescale_factor`, then normalise per channel: (x * rescale_factor - mean) / std, with
   `mean` and `std` given in RGB order whatever `channel_order` says;
4. channel order (RGB or BGR), layout (NCHW or NHWC) with a batch dimension of 1, dtype.

ConvNext-style `crop_pct` is not a field: the HF translator (model_packager.hf_preprocess) folds
it into a shortest-edge resize plus a centre crop, which is what ConvNext computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Self, TypedDict

import cv2
import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_bundle.errors import PreprocessError
from edge_bundle.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DecodedImage, decode_image
from edge_bundle.resample import Interpolation, resize

MAX_SIDE = 8192
_STATS_SHORT_SIDE = 256


class CenterCrop(BaseModel):
    """A centre crop to `height` x `width` pixels, applied after the resize."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    height: int = Field(gt=0, le=MAX_SIDE, description="crop height in pixels")
    width: int = Field(gt=0, le=MAX_SIDE, description="crop width in pixels")


class PreprocessSpec(BaseModel):
    """How an RGB uint8 image becomes the model's input tensor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resize: Literal["shortest_edge", "exact", "none"] = Field(description="resize mode")
    shortest_edge: int | None = Field(
        default=None, gt=0, le=MAX_SIDE, description="target short side for 'shortest_edge'"
    )
    height: int | None = Field(default=None, gt=0, le=MAX_SIDE, description="height for 'exact'")
    width: int | None = Field(default=None, gt=0, le=MAX_SIDE, description="width for 'exact'")
    interpolation: Interpolation = Field(default="bilinear", description="resize filter")
    center_crop: CenterCrop | None = Field(default=None, description="crop after the resize")
    rescale_factor: float = Field(
        default=1 / 255, gt=0, allow_inf_nan=False, description="pixel multiplier, e.g. 1/255"
    )
    mean: tuple[float, ...] = Field(default=(0.0, 0.0, 0.0), description="per channel, RGB order")
    std: tuple[float, ...] = Field(default=(1.0, 1.0, 1.0), description="per channel, RGB order")
    channel_order: Literal["RGB", "BGR"] = Field(default="RGB", description="tensor channel order")
    layout: Literal["NCHW", "NHWC"] = Field(default="NCHW", description="tensor layout")
    dtype: Literal["float32", "float16", "uint8"] = Field(default="float32", description="dtype")

    @field_validator("mean", "std")
    @classmethod
    def _three_finite_values(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) != 3:
            raise ValueError(f"needs 3 values, one per channel in RGB order (got {len(value)})")
        if not all(math.isfinite(v) for v in value):
            raise ValueError(f"values must be finite numbers (got {list(value)})")
        return value

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v <= 0 for v in value):
            raise ValueError(f"every std must be > 0 (got {list(value)})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        needed = {"shortest_edge": {"shortest_edge"}, "exact": {"height", "width"}, "none": set()}
        given = {name for name in ("shortest_edge", "height", "width") if getattr(self, name)}
        problems = [f"needs '{name}'" for name in sorted(needed[self.resize] - given)]
        problems += [f"does not take '{name}'" for name in sorted(given - needed[self.resize])]
        if problems:
            raise ValueError(f"resize: mode {self.resize!r} " + " and ".join(problems))
        identity = self.rescale_factor == 1 and self.mean == (0, 0, 0) and self.std == (1, 1, 1)
        if self.dtype == "uint8" and not identity:
            raise ValueError(
                "dtype: 'uint8' output carries raw pixels; set rescale_factor to 1, mean to "
                "[0, 0, 0] and std to [1, 1, 1], or choose a float dtype"
            )
        return self

    def resize_hw(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) after the resize step, for an input of this size."""
        if self.resize == "exact":
            assert self.height is not None and self.width is not None
            return self.height, self.width
        if self.resize == "none":
            return height, width
        assert self.shortest_edge is not None
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)  # HF truncates, it does not round
        if width <= height:
            return new_long, self.shortest_edge
        return self.shortest_edge, new_long

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of the model input for an input image of this size."""
        if self.center_crop is not None:
            return self.center_crop.height, self.center_crop.width
        return self.resize_hw(height, width)

    def fixed_output_hw(self) -> tuple[int, int] | None:
        """The model input (height, width) when it does not depend on the image, else None."""
        if self.center_crop is not None:
            return self.center_crop.height, self.center_crop.width
        if self.resize == "exact":
            assert self.height is not None and self.width is not None
            return self.height, self.width
        return None

    def decode_target(self) -> tuple[int, int] | None:
        """The resize target that decode-time reduction must preserve; None means full size."""
        if self.resize == "exact":
            assert self.height is not None and self.width is not None
            return self.height, self.width
        if self.resize == "shortest_edge":
            assert self.shortest_edge is not None
            return self.shortest_edge, self.shortest_edge
        return None


class InputStatistics(TypedDict):
    """Cheap per-image statistics, the inputs of drift baselines."""

    brightness: float
    contrast: float
    sharpness: float
    width: int
    height: int


def load_spec(data: Mapping[str, Any]) -> PreprocessSpec:
    """Validate a spec read from a manifest or config; PreprocessError names the bad fields."""
    try:
        return PreprocessSpec.model_validate(data)
    except ValidationError as exc:
        raise PreprocessError(describe_spec_error(exc)) from None


def describe_spec_error(
    exc: ValidationError,
    fix: str = "Fix the 'preprocessing' section of the bundle manifest (or the processor config "
    "it was built from)",
) -> str:
    """A readable message for a spec validation error: every field, what was wrong, what to do."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}" if field else message)
    return "invalid preprocessing spec: " + "; ".join(problems) + f". {fix}"


def preprocess(image: NDArray[np.uint8], spec: PreprocessSpec) -> NDArray[Any]:
    """Turn an HxWx3 RGB uint8 image into a contiguous model input with a batch dimension."""
    _check_image(image)
    height, width = image.shape[:2]
    resized_hw = spec.resize_hw(height, width)
    window = _crop_window(resized_hw, spec.center_crop)
    if window is None or _inside(window, resized_hw):
        pixels = resize(image, resized_hw, spec.interpolation, window)
    else:
        pixels = _padded_crop(resize(image, resized_hw, spec.interpolation), window)
    return _to_tensor(pixels, spec)


def preprocess_bytes(
    data: bytes,
    spec: PreprocessSpec,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    reduce: bool = True,
) -> NDArray[Any]:
    """Decode image bytes (reduced when the spec's target is much smaller) and preprocess them."""
    target = spec.decode_target() if reduce else None
    decoded = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes, target_hw=target)
    return preprocess(decoded.pixels, spec)


def input_statistics(image: NDArray[np.uint8] | DecodedImage) -> InputStatistics:
    """Brightness (mean luma), contrast (luma std) and sharpness (variance of the Laplacian), all
    on a 0..255 luma scale, plus the full-resolution width and height.

    The statistics are computed on a copy whose short side is 256 pixels (INTER_AREA), so they do
    not depend on the upload resolution or on decode-time reduction, and cost little.
    """
    if isinstance(image, DecodedImage):
        pixels, width, height = image.pixels, image.width, image.height
    else:
        pixels, width, height = image, image.shape[1], image.shape[0]
    _check_image(pixels)
    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    short = min(gray.shape)
    if short > _STATS_SHORT_SIDE:
        factor = _STATS_SHORT_SIDE / short
        size = (max(1, round(gray.shape[1] * factor)), max(1, round(gray.shape[0] * factor)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    mean, std = cv2.meanStdDev(gray)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_32F))
    return InputStatistics(
        brightness=float(mean[0, 0]),
        contrast=float(std[0, 0]),
        sharpness=float(lap_std[0, 0]) ** 2,
        width=int(width),
        height=int(height),
    )


def _check_image(image: NDArray[Any]) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PreprocessError(
            f"preprocess expects an HxWx3 RGB uint8 image, got shape {image.shape} {image.dtype}; "
            "decode images with edge_bundle.imaging.decode_image"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise PreprocessError(f"the image is empty ({image.shape}); send a real photo")


def _crop_window(
    resized_hw: tuple[int, int], crop: CenterCrop | None
) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of HF's centre crop; top/left are negative when padding."""
    if crop is None:
        return None
    top = (resized_hw[0] - crop.height) // 2
    left = (resized_hw[1] - crop.width) // 2
    return top, left, crop.height, crop.width


def _inside(window: tuple[int, int, int, int], hw: tuple[int, int]) -> bool:
    top, left, height, width = window
    return top >= 0 and left >= 0 and top + height <= hw[0] and left + width <= hw[1]


def _padded_crop(pixels: NDArray[np.uint8], window: tuple[int, int, int, int]) -> NDArray[np.uint8]:
    """HF's centre crop of an image smaller than the crop: centred on black, then cropped."""
    height, width = pixels.shape[:2]
    top, left, crop_h, crop_w = window
    canvas_h, canvas_w = max(crop_h, height), max(crop_w, width)
    pad_top, pad_left = math.ceil((canvas_h - height) / 2), math.ceil((canvas_w - width) / 2)
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
    canvas[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = max(0, top + pad_top), max(0, left + pad_left)
    return np.ascontiguousarray(canvas[top : top + crop_h, left : left + crop_w])


def _to_tensor(pixels: NDArray[np.uint8], spec: PreprocessSpec) -> NDArray[Any]:
    values: NDArray[Any] = pixels
    if spec.dtype != "uint8":
        std = np.asarray(spec.std, dtype=np.float64)
        scale = (spec.rescale_factor / std).astype(np.float32)
        offset = (-np.asarray(spec.mean, dtype=np.float64) / std).astype(np.float32)
        values = pixels.astype(np.float32)
        values *= scale
        values += offset
    if spec.channel_order == "BGR":
        values = values[..., ::-1]
    if spec.layout == "NCHW":
        values = values.transpose(2, 0, 1)
    return np.ascontiguousarray(values[np.newaxis], dtype=np.dtype(spec.dtype))
