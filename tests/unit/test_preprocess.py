"""The preprocessing spec, its validation, the Pillow-compatible resize, and the tensor it makes."""

from __future__ import annotations

import numpy as np
import pytest

from edge_bundle import resample
from edge_bundle.errors import PreprocessError
from edge_bundle.imaging import decode_image
from edge_bundle.preprocess import (
    PreprocessSpec,
    input_statistics,
    load_spec,
    preprocess,
    preprocess_bytes,
)
from edge_bundle.resample import nearest_index, resize
from tests.images import encode, natural_image

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
CLASSIFIER = {
    "resize": "shortest_edge",
    "shortest_edge": 256,
    "center_crop": {"height": 224, "width": 224},
    **IMAGENET,
}
PIL_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "area": 4}


@pytest.fixture(autouse=True)
def numpy_resize(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test the numpy reference here; Pillow's fast path is compared with it separately."""
    monkeypatch.setattr(resample, "_PILLOW", None)


def test_pillow_fast_path_equals_the_numpy_reference(photo: np.ndarray) -> None:
    fast = resample._pillow()
    if fast is None:
        pytest.skip("Pillow 13 or newer is not installed")
    windows = [None, (3, 5, 200, 150), (0, 0, 224, 224)]
    for name in ("bilinear", "bicubic", "area", "lanczos"):
        for out_hw, window in zip(((224, 298), (240, 320), (224, 224)), windows, strict=True):
            reference = resize(photo, out_hw, name, window)  # type: ignore[arg-type]
            resample._PILLOW = fast
            try:
                quick = resize(photo, out_hw, name, window)  # type: ignore[arg-type]
            finally:
                resample._PILLOW = None
            assert np.array_equal(quick, reference), (name, out_hw, window)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return natural_image(300, 400, seed=11)


def pillow_resize(image: np.ndarray, out_hw: tuple[int, int], name: str) -> np.ndarray:
    image_module = pytest.importorskip("PIL.Image")
    picture = image_module.fromarray(image).resize(out_hw[::-1], resample=PIL_CODES[name])
    return np.asarray(picture).astype(np.int16)


def assert_like_pillow(ours: np.ndarray, expected: np.ndarray) -> None:
    """Bit-identical to Pillow >= 13; older Pillow ran its passes in another order for images
    whose height shrinks much more than their width, which moves a few pixels by one level."""
    import PIL

    if int(PIL.__version__.split(".")[0]) >= 13:
        np.testing.assert_array_equal(ours, expected)
    else:
        assert np.abs(ours.astype(np.int16) - expected).max() <= 1


@pytest.mark.parametrize("name", sorted(PIL_CODES))
@pytest.mark.parametrize("out_hw", [(100, 133), (224, 224), (450, 620), (300, 150), (60, 390)])
def test_resize_matches_pillow(photo: np.ndarray, name: str, out_hw: tuple[int, int]) -> None:
    # Same fixed-point weights, same pass order, same rounding: bit-exact, not merely close.
    assert_like_pillow(resize(photo, out_hw, name), pillow_resize(photo, out_hw, name))  # type: ignore[arg-type]


def test_resize_matches_pillow_on_random_shapes() -> None:
    rng = np.random.default_rng(21)
    for case in range(40):
        in_h, in_w, out_h, out_w = (int(v) for v in rng.integers(1, 160, 4))
        name = sorted(PIL_CODES)[case % len(PIL_CODES)]
        image = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        ours = resize(image, (out_h, out_w), name)  # type: ignore[arg-type]
        assert_like_pillow(ours, pillow_resize(image, (out_h, out_w), name))


def test_nearest_picks_the_same_source_pixels_as_pillow() -> None:
    # 1600 -> 224 puts some sample points exactly on integers, where only Pillow's running sum
    # (not a plain product) lands on the lower pixel.
    pytest.importorskip("PIL")
    row = np.arange(1600, dtype=np.uint16)
    ramp = np.stack([row % 256, row // 256, np.zeros_like(row)], axis=-1).astype(np.uint8)[None]
    picked = resize(ramp, (1, 224), "nearest")[0].astype(int)
    expected = pillow_resize(ramp, (1, 224), "nearest")[0].astype(int)
    np.testing.assert_array_equal(picked, expected)
    assert nearest_index(1600, 224)[17] == 124


def test_a_resize_window_equals_a_crop_of_the_full_resize(photo: np.ndarray) -> None:
    for name in ("bilinear", "bicubic", "nearest"):
        full = resize(photo, (256, 341), name)
        window = resize(photo, (256, 341), name, window=(16, 58, 224, 224))
        np.testing.assert_array_equal(window, full[16:240, 58:282])


@pytest.mark.parametrize(
    ("image_hw", "expected"),
    [((480, 640), (224, 298)), ((500, 300), (373, 224)), ((224, 224), (224, 224))],
)
def test_shortest_edge_truncates_the_long_side_like_hugging_face(
    image_hw: tuple[int, int], expected: tuple[int, int]
) -> None:
    spec = PreprocessSpec(resize="shortest_edge", shortest_edge=224)
    assert spec.resize_hw(*image_hw) == expected
    assert spec.output_hw(*image_hw) == expected
    assert spec.fixed_output_hw() is None


def test_tensor_layout_dtype_and_normalisation(photo: np.ndarray) -> None:
    spec = load_spec(CLASSIFIER)
    tensor = preprocess(photo, spec)
    assert tensor.shape == (1, 3, 224, 224) and tensor.dtype == np.float32
    assert tensor.flags["C_CONTIGUOUS"]
    assert spec.fixed_output_hw() == (224, 224)

    white = np.full((50, 70, 3), 255, dtype=np.uint8)
    values = preprocess(white, spec)[0, :, 0, 0]
    expected = (1.0 - np.array(IMAGENET["mean"])) / np.array(IMAGENET["std"])
    np.testing.assert_allclose(values, expected, rtol=1e-6)

    nhwc = preprocess(photo, spec.model_copy(update={"layout": "NHWC"}))
    np.testing.assert_array_equal(nhwc, tensor.transpose(0, 2, 3, 1))
    bgr = preprocess(photo, spec.model_copy(update={"channel_order": "BGR"}))
    np.testing.assert_array_equal(bgr, tensor[:, ::-1])
    half = preprocess(photo, spec.model_copy(update={"dtype": "float16"}))
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, tensor, atol=1e-2)


def test_uint8_output_carries_raw_pixels(photo: np.ndarray) -> None:
    spec = PreprocessSpec(
        resize="exact", height=300, width=400, rescale_factor=1, layout="NHWC", dtype="uint8"
    )
    raw = preprocess(photo, spec)
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw[0], photo)


def test_crop_larger_than_the_image_pads_with_black_like_hugging_face() -> None:
    spec = load_spec(
        {"resize": "none", "center_crop": {"height": 10, "width": 6}, "rescale_factor": 1}
        | {"dtype": "uint8"}
    )
    image = np.full((4, 8, 3), 200, dtype=np.uint8)
    out = preprocess(image, spec.model_copy(update={"layout": "NHWC"}))[0]
    assert out.shape == (10, 6, 3)
    assert (out[3:7] == 200).all()  # HF centres with ceil((10 - 4) / 2) = 3 rows of padding
    assert (out[:3] == 0).all() and (out[7:] == 0).all()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"shortest_edge": -5}, "shortest_edge"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"resize": "exact"}, "height"),
        ({"center_crop": {"height": 0, "width": 4}}, "center_crop.height"),
        ({"dtype": "uint8"}, "dtype"),
        ({"interpolation": "hamming"}, "interpolation"),
        ({"colour": "RGB"}, "colour"),
        ({"rescale_factor": float("nan")}, "rescale_factor"),
    ],
)
def test_nonsense_specs_name_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(PreprocessError, match="invalid preprocessing spec") as caught:
        load_spec({**CLASSIFIER, **change})
    assert field in str(caught.value)
    assert "Fix the 'preprocessing' section" in str(caught.value)


def test_spec_is_frozen_and_round_trips_through_json() -> None:
    spec = load_spec(CLASSIFIER)
    assert load_spec(spec.model_dump(mode="json")) == spec
    with pytest.raises(ValueError, match="frozen"):
        spec.shortest_edge = 3


def test_wrong_pixel_arrays_are_refused() -> None:
    spec = load_spec(CLASSIFIER)
    with pytest.raises(PreprocessError, match="HxWx3 RGB uint8"):
        preprocess(np.zeros((10, 10, 3), dtype=np.float32), spec)
    with pytest.raises(PreprocessError, match="HxWx3 RGB uint8"):
        preprocess(np.zeros((10, 10), dtype=np.uint8), spec)


def test_reduced_decoding_stays_close_to_full_decoding() -> None:
    data = encode(natural_image(1200, 1600, seed=12), "jpeg")
    spec = load_spec(CLASSIFIER)
    reduced = preprocess_bytes(data, spec)
    full = preprocess_bytes(data, spec, reduce=False)
    pixel_error = np.abs(reduced - full) * np.array(IMAGENET["std"])[:, None, None] * 255
    assert pixel_error.mean() < 1.0  # in 0..255 levels
    assert decode_image(data, target_hw=spec.decode_target()).reduction == 2


def test_input_statistics_track_brightness_contrast_and_sharpness(photo: np.ndarray) -> None:
    import cv2

    stats = input_statistics(photo)
    assert (stats["width"], stats["height"]) == (400, 300)
    darker = input_statistics((photo // 2).astype(np.uint8))
    assert darker["brightness"] < stats["brightness"] * 0.6
    assert darker["contrast"] < stats["contrast"] * 0.6
    blurred = input_statistics(np.asarray(cv2.GaussianBlur(photo, (0, 0), 3), dtype=np.uint8))
    assert blurred["sharpness"] < stats["sharpness"] * 0.2
    flat = input_statistics(np.full((20, 30, 3), 77, dtype=np.uint8))
    assert flat["contrast"] == pytest.approx(0) and flat["sharpness"] == pytest.approx(0)
    assert flat["brightness"] == pytest.approx(77)


def test_input_statistics_do_not_depend_on_decode_reduction() -> None:
    data = encode(natural_image(1200, 1600, seed=13), "jpeg")
    reduced = input_statistics(decode_image(data, target_hw=(224, 224)))
    full = input_statistics(decode_image(data))
    assert (reduced["width"], reduced["height"]) == (full["width"], full["height"]) == (1600, 1200)
    assert reduced["brightness"] == pytest.approx(full["brightness"], rel=0.02)
    assert reduced["contrast"] == pytest.approx(full["contrast"], rel=0.05)
    assert reduced["sharpness"] == pytest.approx(full["sharpness"], rel=0.25)
