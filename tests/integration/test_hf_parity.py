"""Parity with Hugging Face image processors: our decode + preprocess against the processor of the
same configuration, on photo-like JPEG and PNG images of several sizes, at full-size decoding.

The requirement is a mean absolute error of at most 2/255 in pixel units (the difference of the
normalised tensors multiplied back by std / rescale_factor). Because the decoders are the same
libjpeg-turbo / libpng and the resize reproduces Pillow's fixed-point arithmetic, the measured error
is zero up to float rounding; the test asserts the requirement and, more tightly, the maximum.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from edge_bundle.preprocess import PreprocessSpec, preprocess, preprocess_bytes
from model_packager.hf_preprocess import spec_from_hf_config
from tests.images import encode, natural_image

pytestmark = pytest.mark.packager
transformers = pytest.importorskip("transformers", reason="needs the packager role")
image_module = pytest.importorskip("PIL.Image", reason="needs pillow (packager role)")

IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}

# name -> (processor class name, constructor arguments); all built from configs, no hub
PROCESSORS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("ViTImageProcessor", {}),
    "vit-lanczos": ("ViTImageProcessor", {"resample": 1, "size": {"height": 192, "width": 256}}),
    "vit-box": ("ViTImageProcessor", {"resample": 4, **IMAGENET}),
    "convnext-crop-pct": (
        "ConvNextImageProcessor",
        {"size": {"shortest_edge": 288}, "crop_pct": 0.95, "resample": 2},
    ),
    "convnext-384-warp": ("ConvNextImageProcessor", {}),
    "resnet": (  # microsoft/resnet-50 uses ConvNextImageProcessor
        "ConvNextImageProcessor",
        {"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3, **IMAGENET},
    ),
    "mobilenet-v2": ("MobileNetV2ImageProcessor", {}),
    "mobilenet-v2-odd-crop": (
        "MobileNetV2ImageProcessor",
        {"size": {"shortest_edge": 200}, "crop_size": {"height": 224, "width": 240}},
    ),
    "efficientnet": ("EfficientNetImageProcessor", {"size": {"height": 224, "width": 224}}),
    "efficientnet-offset": ("EfficientNetImageProcessor", {"rescale_offset": True}),
    "deit": ("DeiTImageProcessor", IMAGENET),
    "beit": ("BeitImageProcessor", {}),
    "bit": ("BitImageProcessor", {}),
    "clip": ("CLIPImageProcessor", {}),
    "mobilevit-bgr": ("MobileViTImageProcessor", {}),
}
# (height, width): large, portrait, square at the target size, small (upscaled), extreme aspect
SIZES = [(1200, 1600), (500, 300), (224, 224), (100, 150), (90, 640)]
PNG_SIZES = [(500, 300), (90, 640)]  # PNG checks the lossless path; JPEG covers every size
TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    encoded = {}
    for height, width in SIZES:
        image = natural_image(height, width, seed=height + width)
        for fmt in ("jpeg", "png") if (height, width) in PNG_SIZES else ("jpeg",):
            encoded[f"{fmt}-{width}x{height}"] = encode(image, fmt)
    return encoded


def pixel_error(ours: np.ndarray, theirs: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """|ours - theirs| in pixel units (0..1 of full scale), channel by channel."""
    std = np.asarray(spec.std, dtype=np.float64)
    if spec.channel_order == "BGR":
        std = std[::-1]
    per_level = spec.rescale_factor / std[:, None, None]  # tensor units per pixel level
    return np.abs(ours.astype(np.float64) - theirs.astype(np.float64)) / per_level / 255


def test_pixel_error_counts_pixel_levels() -> None:
    spec = spec_from_hf_config(hf_processor("deit").to_dict())  # type: ignore[attr-defined]
    image = natural_image(256, 256, seed=3) // 2  # already 256x256: only crop and normalise
    brighter = preprocess(image + 1, spec)
    error = pixel_error(brighter, preprocess(image, spec), spec)
    np.testing.assert_allclose(error, 1 / 255, rtol=1e-4)


def hf_processor(name: str) -> Callable[..., Any]:
    class_name, arguments = PROCESSORS[name]
    processor: Callable[..., Any] = getattr(transformers, class_name)(**arguments)
    return processor


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_matches_the_hugging_face_processor(name: str, photos: dict[str, bytes]) -> None:
    processor = hf_processor(name)
    spec = spec_from_hf_config(processor.to_dict())  # type: ignore[attr-defined]
    worst_mean, worst_max = 0.0, 0.0
    for label, data in photos.items():
        picture = image_module.open(io.BytesIO(data)).convert("RGB")
        theirs = processor(images=picture, return_tensors="np")["pixel_values"]
        ours = preprocess_bytes(data, spec, reduce=False)
        assert ours.shape == theirs.shape, label
        assert ours.dtype == np.float32
        error = pixel_error(ours, theirs, spec)
        worst_mean, worst_max = max(worst_mean, error.mean()), max(worst_max, error.max())
        assert error.mean() <= TOLERANCE, f"{label}: mean error {error.mean() * 255:.3f}/255"
    print(f"{name}: worst mean {worst_mean * 255:.4f}/255, worst max {worst_max * 255:.4f}/255")
    assert worst_max < 0.01 / 255  # same decoders, same fixed-point resize: equal up to float noise


def test_reduced_decoding_stays_within_budget_of_the_reference(photos: dict[str, bytes]) -> None:
    """What the device computes on a large photo (reduced JPEG decode) against HF at full size."""
    processor = hf_processor("resnet")
    spec = spec_from_hf_config(processor.to_dict())  # type: ignore[attr-defined]
    data = encode(natural_image(1500, 2000, seed=7), "jpeg")  # decoded at 1/2
    picture = image_module.open(io.BytesIO(data)).convert("RGB")
    theirs = processor(images=picture, return_tensors="np")["pixel_values"]
    error = pixel_error(preprocess_bytes(data, spec), theirs, spec)
    print(
        f"reduced decode vs HF: mean {error.mean() * 255:.3f}/255, max {error.max() * 255:.1f}/255"
    )
    assert error.mean() <= TOLERANCE
