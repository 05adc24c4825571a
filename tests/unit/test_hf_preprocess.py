"""Translating preprocessor_config.json into a PreprocessSpec, without transformers installed."""

from __future__ import annotations

from typing import Any

import pytest

from edge_bundle.errors import PreprocessError
from model_packager.hf_preprocess import spec_from_hf_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESNET_50 = {  # microsoft/resnet-50, as published
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_processor_type": "ConvNextImageProcessor",
    "image_std": list(IMAGENET_STD),
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}


def test_resnet_style_crop_pct_becomes_resize_then_crop() -> None:
    spec = spec_from_hf_config(RESNET_50)
    assert spec.resize == "shortest_edge" and spec.shortest_edge == 256  # int(224 / 0.875)
    assert spec.center_crop is not None
    assert (spec.center_crop.height, spec.center_crop.width) == (224, 224)
    assert spec.interpolation == "bicubic"
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
    assert (spec.channel_order, spec.layout, spec.dtype) == ("RGB", "NCHW", "float32")


def test_convnext_from_384_warps_without_crop() -> None:
    spec = spec_from_hf_config({"image_processor_type": "ConvNextImageProcessor"})
    assert (spec.resize, spec.height, spec.width, spec.center_crop) == ("exact", 384, 384, None)
    assert spec.interpolation == "bilinear" and spec.mean == (0.5, 0.5, 0.5)


def test_vit_defaults_and_legacy_int_size() -> None:
    spec = spec_from_hf_config({"feature_extractor_type": "ViTFeatureExtractor", "size": 384})
    assert (spec.resize, spec.height, spec.width) == ("exact", 384, 384)
    assert spec.rescale_factor == pytest.approx(1 / 255)
    fast = spec_from_hf_config({"image_processor_type": "ViTImageProcessorFast"})
    assert (fast.height, fast.width, fast.interpolation) == (224, 224, "bilinear")


def test_mobilenet_int_size_is_a_shortest_edge() -> None:
    spec = spec_from_hf_config({"image_processor_type": "MobileNetV2ImageProcessor", "size": 320})
    assert (spec.resize, spec.shortest_edge) == ("shortest_edge", 320)
    assert spec.center_crop is not None and spec.center_crop.height == 224


def test_efficientnet_offset_and_include_top_fold_into_mean_and_std() -> None:
    spec = spec_from_hf_config(
        {
            "image_processor_type": "EfficientNetImageProcessor",
            "rescale_offset": True,
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
        }
    )
    assert spec.interpolation == "nearest" and (spec.height, spec.width) == (346, 346)
    assert spec.mean == pytest.approx([m + 1 for m in IMAGENET_MEAN])
    assert spec.std == pytest.approx([s * s for s in IMAGENET_STD])
    assert spec.center_crop is None


def test_mobilevit_flips_to_bgr_without_normalising() -> None:
    spec = spec_from_hf_config({"image_processor_type": "MobileViTImageProcessor"})
    assert spec.channel_order == "BGR"
    assert spec.mean == (0, 0, 0) and spec.std == (1, 1, 1)
    rgb = spec_from_hf_config(
        {"image_processor_type": "MobileViTImageProcessor", "do_flip_channel_order": False}
    )
    assert rgb.channel_order == "RGB"


def test_switches_that_are_off_are_honoured() -> None:
    spec = spec_from_hf_config(
        {
            "image_processor_type": "DeiTImageProcessor",
            "do_resize": False,
            "do_center_crop": False,
            "do_rescale": False,
            "do_normalize": False,
            "do_pad": False,  # unknown to us, but off: harmless
        }
    )
    assert (spec.resize, spec.center_crop, spec.rescale_factor) == ("none", None, 1.0)
    assert spec.mean == (0, 0, 0) and spec.std == (1, 1, 1)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"do_reduce_labels": True}, "do_reduce_labels"),
        ({"resample": 5}, "resample"),
        ({"resample": "bilinear"}, "resample"),
        ({"size": {"shortest_edge": 800, "longest_edge": 1333}}, "size.longest_edge"),
        ({"do_pad": True}, "do_pad"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"crop_size": {"height": -3, "width": 224}}, "center_crop.height"),
        ({"image_std": [0.5, 0.0, 0.5]}, "std"),
    ],
)
def test_unsupported_or_invalid_options_are_refused_by_name(
    change: dict[str, Any], named: str
) -> None:
    config = {"image_processor_type": "BeitImageProcessor", **change}
    with pytest.raises(PreprocessError, match=named.replace(".", r"\.")):
        spec_from_hf_config(config)


def test_unknown_processor_type_is_refused_with_the_supported_list() -> None:
    with pytest.raises(
        PreprocessError, match=r"DetrImageProcessor.*supported: .*ViTImageProcessor"
    ):
        spec_from_hf_config({"image_processor_type": "DetrImageProcessor"})
    with pytest.raises(PreprocessError, match="names no image_processor_type"):
        spec_from_hf_config({"size": 224})


def test_convnext_needs_a_shortest_edge_and_a_sane_crop_pct() -> None:
    with pytest.raises(PreprocessError, match="shortest_edge"):
        spec_from_hf_config(
            {"image_processor_type": "ConvNextImageProcessor", "size": {"height": 1, "width": 1}}
        )
    with pytest.raises(PreprocessError, match="crop_pct"):
        spec_from_hf_config(
            {
                "image_processor_type": "ConvNextImageProcessor",
                "size": {"shortest_edge": 224},
                "crop_pct": -1,
            }
        )
