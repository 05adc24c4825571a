"""Translate a Hugging Face image processor config (preprocessor_config.json) into our spec.

Only the config is read; transformers is not imported. Each supported processor family has a row in
`_FAMILIES` with the defaults its class uses when a key is absent (transformers 4.x), and a style
for the steps that are not plain resize/crop/rescale/normalise:

- "convnext" (ConvNext, ConvNextV2, ResNet, ...): with shortest_edge < 384 the image is resized so
  its short side is int(shortest_edge / crop_pct), then centre-cropped to shortest_edge squared;
  from 384 on it is warped to shortest_edge squared with no crop;
- "efficientnet": `rescale_offset` (x * factor - 1) and `include_top` (a second division by std)
  are folded into mean and std, since (x*f - 1 - m) / s / s = (x*f - (m + 1)) / s**2;
- "mobilevit": no normalisation, channels flipped to BGR when `do_flip_channel_order`.

We reproduce the Pillow-based ("slow") processors; a "...Fast" processor type is read as its slow
twin. An option we do not know is accepted only when it is off (false, null, 0, empty); anything
else, like `do_reduce_labels: true`, a `longest_edge` size or a HAMMING `resample`, is refused with
a PreprocessError naming the option, because silently ignoring it would change the model's input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from edge_bundle.errors import PreprocessError
from edge_bundle.preprocess import PreprocessSpec, describe_spec_error

Style = Literal["plain", "convnext", "efficientnet", "mobilevit"]

STANDARD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PILImageResampling codes -> our interpolation names; 5 (HAMMING) is refused.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "area"}
_CONVNEXT_WARP_FROM = 384
_BASE_KEYS = frozenset(
    {"do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize"}
    | {"image_mean", "image_std", "do_convert_rgb"}
)
_IGNORED_KEYS = frozenset(
    {"image_processor_type", "feature_extractor_type", "processor_class", "_processor_class"}
    | {"auto_map", "data_format", "input_data_format", "return_tensors", "default_to_square"}
)
_STYLE_KEYS: dict[Style, frozenset[str]] = {
    "plain": frozenset({"do_center_crop", "crop_size", "do_reduce_labels"}),
    "convnext": frozenset({"crop_pct"}),
    "efficientnet": frozenset({"do_center_crop", "crop_size", "rescale_offset", "include_top"}),
    "mobilevit": frozenset({"do_center_crop", "crop_size", "do_flip_channel_order"})
    | {"do_reduce_labels"},
}


@dataclass(frozen=True)
class _Family:
    """A processor class's defaults, as in its __init__."""

    size: Mapping[str, int]
    resample: int
    mean: tuple[float, ...] = STANDARD
    std: tuple[float, ...] = STANDARD
    crop: Mapping[str, int] | None = None
    square_default: bool = True  # how a bare int `size` is read (get_size_dict default_to_square)
    style: Style = "plain"
    extra: Mapping[str, Any] = field(default_factory=dict)


_HW = {"height": 224, "width": 224}
_VIT = _Family({"height": 224, "width": 224}, 2)
_CONVNEXT = _Family({"shortest_edge": 384}, 2, square_default=False, style="convnext")
_MOBILENET = _Family(
    {"shortest_edge": 256}, 2, crop=_HW, square_default=False, extra={"do_center_crop": True}
)
_DEIT = _Family({"height": 256, "width": 256}, 3, crop=_HW, extra={"do_center_crop": True})
_CLIP = _Family(
    {"shortest_edge": 224},
    3,
    CLIP_MEAN,
    CLIP_STD,
    crop=_HW,
    square_default=False,
    extra={"do_center_crop": True},
)
_EFFICIENTNET = _Family(
    {"height": 346, "width": 346},
    0,
    crop={"height": 289, "width": 289},
    style="efficientnet",
    extra={"do_center_crop": False, "include_top": True, "rescale_offset": False},
)
_MOBILEVIT = _Family(
    {"shortest_edge": 224},
    2,
    crop={"height": 256, "width": 256},
    square_default=False,
    style="mobilevit",
    extra={"do_center_crop": True, "do_flip_channel_order": True},
)
_FAMILIES: dict[str, _Family] = {
    "ViTImageProcessor": _VIT,
    "ViTFeatureExtractor": _VIT,
    "ConvNextImageProcessor": _CONVNEXT,
    "ConvNextFeatureExtractor": _CONVNEXT,
    "MobileNetV1ImageProcessor": _MOBILENET,
    "MobileNetV1FeatureExtractor": _MOBILENET,
    "MobileNetV2ImageProcessor": _MOBILENET,
    "MobileNetV2FeatureExtractor": _MOBILENET,
    "DeiTImageProcessor": _DEIT,
    "DeiTFeatureExtractor": _DEIT,
    "BeitImageProcessor": _DEIT,
    "BeitFeatureExtractor": _DEIT,
    "BitImageProcessor": _CLIP,
    "CLIPImageProcessor": _CLIP,
    "CLIPFeatureExtractor": _CLIP,
    "EfficientNetImageProcessor": _EFFICIENTNET,
    "MobileViTImageProcessor": _MOBILEVIT,
    "MobileViTFeatureExtractor": _MOBILEVIT,
}
SUPPORTED_PROCESSORS = tuple(sorted(_FAMILIES))


def spec_from_hf_config(cfg: Mapping[str, Any]) -> PreprocessSpec:
    """The PreprocessSpec equivalent to the Hugging Face image processor this config describes."""
    name, family = _family(cfg)
    _refuse_unknown_options(cfg, name, family)
    settings: dict[str, Any] = {"resample": family.resample, **family.extra, **cfg}
    fields: dict[str, Any] = {"interpolation": _interpolation(settings["resample"])}
    fields.update(_geometry(settings, family))
    fields.update(_value_mapping(settings, family))
    if family.style == "mobilevit" and settings["do_flip_channel_order"]:
        fields["channel_order"] = "BGR"
    try:
        return PreprocessSpec.model_validate(fields)
    except ValidationError as exc:
        fix = f"Correct preprocessor_config.json ({name}) and build again"
        raise PreprocessError(describe_spec_error(exc, fix)) from None


def _family(cfg: Mapping[str, Any]) -> tuple[str, _Family]:
    name = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
    if not isinstance(name, str):
        raise PreprocessError(
            "preprocessor_config.json names no image_processor_type; add the processor class "
            '(e.g. "image_processor_type": "ViTImageProcessor")'
        )
    family = _FAMILIES.get(name.removesuffix("Fast"))
    if family is None:
        raise PreprocessError(
            f"image_processor_type {name!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_PROCESSORS)}. Write the 'preprocessing' spec by hand instead"
        )
    return name, family


def _refuse_unknown_options(cfg: Mapping[str, Any], name: str, family: _Family) -> None:
    known = _BASE_KEYS | _IGNORED_KEYS | _STYLE_KEYS[family.style]
    for key, value in cfg.items():
        if key not in known and value:
            raise PreprocessError(
                f"option {key!r} = {value!r} of {name} is not supported by lineside's "
                "preprocessing; remove it from preprocessor_config.json if the model does not "
                "need it, or preprocess with a supported processor"
            )
    if cfg.get("do_reduce_labels"):
        raise PreprocessError(
            f"option 'do_reduce_labels' = true of {name} is for segmentation labels, which "
            "lineside does not serve; use an image-classification checkpoint"
        )


def _interpolation(code: Any) -> str:
    if isinstance(code, bool) or not isinstance(code, int) or code not in _RESAMPLE:
        raise PreprocessError(
            f"option 'resample' = {code!r} is not supported; use 0 (nearest), 1 (lanczos), "
            "2 (bilinear), 3 (bicubic) or 4 (box)"
        )
    return _RESAMPLE[code]


def _geometry(settings: Mapping[str, Any], family: _Family) -> dict[str, Any]:
    """Resize mode, target size and centre crop."""
    if not settings.get("do_resize", True):
        return {"resize": "none", **_crop(settings, family)}
    size = _size(_given(settings, "size", family.size), family.square_default, "size")
    if family.style == "convnext":
        return _convnext_geometry(size, _given(settings, "crop_pct", 224 / 256))
    return {**size, **_crop(settings, family)}


def _given(settings: Mapping[str, Any], key: str, default: Any) -> Any:
    """The configured value, or the class default where the key is absent or null."""
    value = settings.get(key)
    return default if value is None else value


def _convnext_geometry(size: Mapping[str, Any], crop_pct: Any) -> dict[str, Any]:
    edge = size.get("shortest_edge")
    if edge is None:
        raise PreprocessError(
            "option 'size' of a ConvNext-style processor must be {\"shortest_edge\": N}; "
            "fix preprocessor_config.json"
        )
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, int | float) or crop_pct <= 0:
        raise PreprocessError(f"option 'crop_pct' = {crop_pct!r} must be a number > 0, e.g. 0.875")
    if edge >= _CONVNEXT_WARP_FROM:
        return {"resize": "exact", "height": edge, "width": edge}
    return {
        "resize": "shortest_edge",
        "shortest_edge": int(edge / crop_pct),
        "center_crop": {"height": edge, "width": edge},
    }


def _crop(settings: Mapping[str, Any], family: _Family) -> dict[str, Any]:
    if family.crop is None or not settings.get("do_center_crop"):
        return {}
    crop = _size(_given(settings, "crop_size", family.crop), True, "crop_size")
    return {"center_crop": {"height": crop["height"], "width": crop["width"]}}


def _size(value: Any, square_default: bool, key: str) -> dict[str, Any]:
    """HF's get_size_dict, as spec fields: {'resize': ..., 'height'/'width' or 'shortest_edge'}."""
    if isinstance(value, int) and not isinstance(value, bool):
        if square_default:
            return {"resize": "exact", "height": value, "width": value}
        return {"resize": "shortest_edge", "shortest_edge": value}
    if isinstance(value, list | tuple) and len(value) == 2:
        return {"resize": "exact", "height": value[0], "width": value[1]}
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"height", "width"}:
            return {"resize": "exact", "height": value["height"], "width": value["width"]}
        if keys == {"shortest_edge"}:
            return {"resize": "shortest_edge", "shortest_edge": value["shortest_edge"]}
        if "longest_edge" in keys:
            raise PreprocessError(
                f"option '{key}.longest_edge' is not supported (only shortest_edge or "
                "height/width); fix preprocessor_config.json"
            )
    raise PreprocessError(
        f'option \'{key}\' = {value!r} is not understood; use {{"height": H, "width": W}} or '
        '{"shortest_edge": N}'
    )


def _value_mapping(settings: Mapping[str, Any], family: _Family) -> dict[str, Any]:
    """rescale_factor, mean and std (RGB order), with EfficientNet's extras folded in."""
    rescale = settings.get("do_rescale", True)
    factor = settings.get("rescale_factor", 1 / 255) if rescale else 1.0
    normalize = settings.get("do_normalize", True) and family.style != "mobilevit"
    mean = _channels(settings.get("image_mean"), family.mean, "image_mean") if normalize else None
    std = _channels(settings.get("image_std"), family.std, "image_std") if normalize else None
    mean, std = mean or (0.0, 0.0, 0.0), std or (1.0, 1.0, 1.0)
    if family.style == "efficientnet":
        offset = 1.0 if rescale and settings.get("rescale_offset") else 0.0
        mean = tuple(m + offset for m in mean)
        if settings.get("include_top"):
            top_std = _channels(settings.get("image_std"), family.std, "image_std")
            std = tuple(s * t for s, t in zip(std, top_std, strict=True))
    return {"rescale_factor": factor, "mean": mean, "std": std}


def _channels(value: Any, default: tuple[float, ...], key: str) -> tuple[float, ...]:
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, list | tuple) and len(value) == 3:
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            pass
    raise PreprocessError(
        f"option '{key}' = {value!r} must be one number or 3 numbers (RGB); "
        "fix preprocessor_config.json"
    )
