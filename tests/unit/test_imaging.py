"""Decoding: formats by magic bytes, header-only size checks, EXIF, reduction, odd pixel formats."""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest

from edge_bundle.errors import ImageError
from edge_bundle.imaging import choose_reduction, decode_image, read_dimensions, sniff_format
from tests.images import encode, jpeg_with_orientation, natural_image

FORMATS = ["jpeg", "png", "webp", "bmp"]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return natural_image(120, 160, seed=1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_are_recognised_by_their_bytes(photo: np.ndarray, fmt: str) -> None:
    data = encode(photo, fmt)
    assert sniff_format(data) == fmt
    assert read_dimensions(data) == (160, 120)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"GIF89a" + b"\x00" * 40, "GIF"),
        (b"II*\x00" + b"\x00" * 40, "TIFF"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40, "HEIC"),
        (b"hello, this is text, not a picture", "not a recognised image"),
        (b"BM" + b"\x00" * 40, "not a recognised image"),
    ],
)
def test_other_formats_are_refused_with_what_is_accepted(data: bytes, named: str) -> None:
    with pytest.raises(ImageError, match=named) as caught:
        decode_image(data)
    assert "JPEG, PNG, WebP or BMP" in str(caught.value)


def test_empty_and_oversize_bytes_are_refused(photo: np.ndarray) -> None:
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    data = encode(photo, "png")
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(data, max_bytes=len(data) - 1)


@pytest.mark.parametrize(("width", "height"), [(1, 1), (333, 77), (77, 333), (601, 257)])
def test_header_sizes_match_the_decoder(width: int, height: int) -> None:
    image = natural_image(height, width, seed=width)
    for fmt in FORMATS:
        data = encode(image, fmt)
        assert read_dimensions(data) == (width, height), fmt
        assert decode_image(data).pixels.shape == (height, width, 3), fmt


def test_header_sizes_of_progressive_jpeg_and_webp_variants() -> None:
    image = natural_image(90, 130, seed=2)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    progressive = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    lossless = cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()
    with_alpha = cv2.imencode(".webp", cv2.cvtColor(image, cv2.COLOR_RGB2BGRA))[1].tobytes()
    assert lossless[12:16] == b"VP8L"
    assert with_alpha[12:16] in (b"VP8X", b"VP8L")
    for data in (progressive, lossless, with_alpha):
        assert read_dimensions(data) == (130, 90)
        assert decode_image(data).pixels.shape == (90, 130, 3)


def test_pixels_come_back_rgb(photo: np.ndarray) -> None:
    decoded = decode_image(encode(photo, "png"))
    assert decoded.format == "png"
    assert (decoded.width, decoded.height, decoded.reduction) == (160, 120, 1)
    np.testing.assert_array_equal(decoded.pixels, photo)


def test_decompression_bomb_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\x00" * 64

    def no_decoding(*args: object) -> None:
        raise AssertionError("the decoder must not run")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(ImageError, match=r"100000x100000 = 10,000,000,000 pixels"):
        decode_image(bomb, max_pixels=50_000_000)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_are_refused(photo: np.ndarray, fmt: str) -> None:
    data = encode(photo, fmt)
    for cut in (len(data) // 2, len(data) - 3):
        with pytest.raises(ImageError, match=r"truncated|damaged|corrupt"):
            decode_image(data[:cut])


@pytest.mark.parametrize("fmt", FORMATS)
def test_cut_headers_are_refused(photo: np.ndarray, fmt: str) -> None:
    data = encode(photo, fmt)
    for cut in (3, 12, 20, 26):
        with pytest.raises(ImageError):
            decode_image(data[:cut])


def test_corrupt_image_data_is_an_image_error(photo: np.ndarray) -> None:
    data = bytearray(encode(photo, "png"))
    data[60:400] = b"\x13" * 340  # inside the compressed pixel data; CRCs no longer match
    with pytest.raises(ImageError, match="could not be decoded"):
        decode_image(bytes(data))


def test_animated_webp_is_refused() -> None:
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x02, 0, 0, 0]) + b"\x09\x00\x00\x09\x00\x00"
    data = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    with pytest.raises(ImageError, match="animated"):
        decode_image(data)


# EXIF orientation -> where the stored top-left corner ends up when displayed (row, col)
ORIENTED_CORNER = {1: ("top", "left"), 3: ("bottom", "right"), 6: ("top", "right")}
ORIENTED_CORNER[8] = ("bottom", "left")


@pytest.mark.parametrize("orientation", sorted(ORIENTED_CORNER))
@pytest.mark.parametrize("target", [None, (224, 224)])
def test_exif_orientation_is_honoured(orientation: int, target: tuple[int, int] | None) -> None:
    pytest.importorskip("PIL")
    stored = np.full((1200, 1600, 3), 40, dtype=np.uint8)
    stored[:200, :200] = (250, 10, 10)  # a red block in the stored top-left corner
    decoded = decode_image(jpeg_with_orientation(stored, orientation), target_hw=target)
    rotated = orientation in (6, 8)
    assert (decoded.width, decoded.height) == ((1200, 1600) if rotated else (1600, 1200))
    assert decoded.reduction == (1 if target is None else 2)
    pixels = decoded.pixels
    assert pixels.shape[:2] == (
        decoded.height // decoded.reduction,
        decoded.width // decoded.reduction,
    )
    vertical, horizontal = ORIENTED_CORNER[orientation]
    row = 5 if vertical == "top" else pixels.shape[0] - 6
    col = 5 if horizontal == "left" else pixels.shape[1] - 6
    assert pixels[row, col, 0] > 200 and pixels[row, col, 1] < 60


def test_reduction_keeps_twice_the_target_short_side() -> None:
    assert choose_reduction(4000, 3000, (224, 224)) == 4  # 1000x750 >= 448
    assert choose_reduction(1600, 1200, (224, 224)) == 2  # 800x600
    assert choose_reduction(640, 480, (224, 224)) == 1
    assert choose_reduction(8000, 6000, (224, 224)) == 8
    assert choose_reduction(4000, 3000, (384, 384)) == 2  # 2000x1500; /4 gives 750 < 768
    assert choose_reduction(4000, 3000, None) == 1


def test_a_smaller_margin_allows_a_larger_reduction() -> None:
    # bench/bench_decode_margin.py measures what the margin costs on the real model.
    assert choose_reduction(4000, 3000, (256, 256), min_ratio=1.0) == 8  # 500x375 >= 256
    assert choose_reduction(4000, 3000, (256, 256)) == 4
    assert choose_reduction(1600, 1200, (256, 256), min_ratio=1.0) == 4  # 400x300
    assert choose_reduction(1600, 1200, (256, 256)) == 2


def test_large_jpeg_is_decoded_reduced_and_png_never(photo: np.ndarray) -> None:
    big = natural_image(1200, 1600, seed=4)
    decoded = decode_image(encode(big, "jpeg"), target_hw=(224, 224))
    assert decoded.reduction == 2 and decoded.pixels.shape == (600, 800, 3)
    assert (decoded.width, decoded.height) == (1600, 1200)
    full = cv2.resize(big, (800, 600), interpolation=cv2.INTER_AREA)
    assert np.abs(decoded.pixels.astype(int) - full).mean() < 4.0
    png = decode_image(encode(big, "png"), target_hw=(224, 224))
    assert png.reduction == 1 and png.pixels.shape == (1200, 1600, 3)


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = natural_image(40, 60, seed=5)[..., 0]
    for ext in (".png", ".jpg"):
        pixels = decode_image(cv2.imencode(ext, gray)[1].tobytes()).pixels
        assert pixels.shape == (40, 60, 3)
        assert np.array_equal(pixels[..., 0], pixels[..., 1])
        assert np.array_equal(pixels[..., 1], pixels[..., 2])
    png = decode_image(cv2.imencode(".png", gray)[1].tobytes()).pixels
    np.testing.assert_array_equal(png[..., 0], gray)


def test_alpha_is_dropped_not_composited() -> None:
    bgra = np.zeros((8, 8, 4), dtype=np.uint8)
    bgra[..., :3] = (30, 20, 10)  # B, G, R
    bgra[..., 3] = 0  # fully transparent
    pixels = decode_image(cv2.imencode(".png", bgra)[1].tobytes()).pixels
    assert pixels.shape == (8, 8, 3)
    assert tuple(pixels[0, 0]) == (10, 20, 30)  # the stored colour, RGB; not white


def test_sixteen_bit_images_become_eight_bit() -> None:
    gray16 = np.full((6, 6), 40_000, dtype=np.uint16)
    pixels = decode_image(cv2.imencode(".png", gray16)[1].tobytes()).pixels
    assert pixels.dtype == np.uint8 and tuple(pixels[0, 0]) == (156, 156, 156)  # 40000 // 256
    bgr16 = np.zeros((6, 6, 3), dtype=np.uint16)
    bgr16[..., 2] = 65_535  # red
    bgr16[..., 1] = 32_768
    pixels = decode_image(cv2.imencode(".png", bgr16)[1].tobytes()).pixels
    assert tuple(pixels[0, 0]) == (255, 128, 0)


def test_pillow_written_files_decode_like_pillow_reads_them() -> None:
    image_module = pytest.importorskip("PIL.Image")
    image = natural_image(64, 96, seed=6)
    for fmt in ("PNG", "BMP", "WEBP"):
        out = io.BytesIO()
        image_module.fromarray(image).save(out, fmt, lossless=True)
        data = out.getvalue()
        expected = np.asarray(image_module.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(decode_image(data).pixels, expected)
