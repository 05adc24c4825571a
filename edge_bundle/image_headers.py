"""Image formats recognised by their bytes, and their pixel size read from the header alone.

Nothing here decodes pixels: the parsers read a few header fields with bounds checks, so a
decompression bomb (a small file that claims a huge image) is refused before any decoder sees it.
Accepted: JPEG, PNG, WebP (still images) and BMP. Everything else is refused with a message naming
what was found, when we can tell, and what is accepted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from edge_bundle.errors import ImageError, UnsupportedImageError

ACCEPTED_FORMATS = ("jpeg", "png", "webp", "bmp")
_ACCEPTED_TEXT = "JPEG, PNG, WebP or BMP"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}
# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic variants)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_JPEG_SOS = 0xDA
_JPEG_EOI = 0xD9
_WEBP_ANIMATION_FLAG = 0x02

# Formats we can name but do not accept, so the message can say what the file is.
_KNOWN_REFUSED: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF8", 0, "GIF"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"%PDF", 0, "PDF"),
)


@dataclass(frozen=True)
class HeaderInfo:
    """What the header says: format, stored size (before EXIF orientation), and for JPEG where
    the first scan starts (used to check that the file is complete)."""

    format: str
    width: int
    height: int
    scan_offset: int = 0


def sniff_format(data: bytes) -> str:
    """The image format of `data` by its magic bytes: "jpeg", "png", "webp" or "bmp"."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM" and len(data) >= 18 and _u32le(data, 14) in _BMP_HEADER_SIZES:
        return "bmp"
    raise UnsupportedImageError(f"{_describe_unknown(data)}; send the photo as {_ACCEPTED_TEXT}")


def read_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) as stored in the header, without decoding any pixels."""
    info = read_header(data)
    return info.width, info.height


def read_header(data: bytes) -> HeaderInfo:
    """Format and stored size of the image in `data`; ImageError if the header is unreadable."""
    fmt = sniff_format(data)
    parser = {"jpeg": _jpeg_header, "png": _png_header, "webp": _webp_header, "bmp": _bmp_header}
    try:
        info = parser[fmt](data)
    except (struct.error, IndexError):
        raise ImageError(
            f"the {fmt.upper()} header is truncated or malformed; send the original file again"
        ) from None
    if info.width <= 0 or info.height <= 0:
        raise ImageError(
            f"the {fmt.upper()} header gives an empty size ({info.width}x{info.height}); "
            "the file is damaged, send the original again"
        )
    return info


def is_complete(data: bytes, info: HeaderInfo) -> bool:
    """Whether the file carries its end marker, so a truncated upload is refused, not decoded
    into a half-grey picture (libjpeg only warns on a premature end)."""
    try:
        return _has_end(data, info)
    except (struct.error, IndexError):
        return False


def _has_end(data: bytes, info: HeaderInfo) -> bool:
    if info.format == "jpeg":
        # Entropy-coded data never contains FF D9 (0xFF is stuffed as FF 00), so any EOI after
        # the first scan ends the main image; embedded thumbnails sit before it, in APP1.
        # A complete file nearly always ends with EOI (maybe followed by a little padding): look
        # there first, so a 3 MB photo is not searched from the start.
        tail = max(info.scan_offset, len(data) - 64)
        return data.find(b"\xff\xd9", tail) != -1 or data.find(b"\xff\xd9", info.scan_offset) != -1
    if info.format == "png":
        return data.rfind(b"IEND") != -1
    if info.format == "webp":
        return _u32le(data, 4) + 8 <= len(data)
    return _bmp_pixel_end(data, info) <= len(data)


def _describe_unknown(data: bytes) -> str:
    if not data:
        return "the image is empty (0 bytes)"
    for magic, offset, name in _KNOWN_REFUSED:
        if data[offset : offset + len(magic)] == magic:
            return f"{name} images are not accepted"
    return "the data is not a recognised image (the first bytes match no accepted format)"


def _u16be(data: bytes, offset: int) -> int:
    return int(struct.unpack_from(">H", data, offset)[0])


def _u16le(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", data, offset)[0])


def _u32be(data: bytes, offset: int) -> int:
    return int(struct.unpack_from(">I", data, offset)[0])


def _u32le(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def _u24le(data: bytes, offset: int) -> int:
    low, high = struct.unpack_from("<HB", data, offset)
    return int(low) | (int(high) << 16)


def _jpeg_header(data: bytes) -> HeaderInfo:
    """Walk the marker segments to the first start-of-frame, then on to the first scan."""
    pos, size = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageError("the JPEG header is corrupt (a marker was expected); send it again")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == _JPEG_EOI:
            break
        length = _u16be(data, pos + 2)
        if length < 2:
            raise ImageError("the JPEG header is corrupt (bad segment length); send it again")
        if marker in _JPEG_SOF and size is None:
            size = (_u16be(data, pos + 7), _u16be(data, pos + 5))  # (width, height)
        if marker == _JPEG_SOS:
            if size is None:
                break
            return HeaderInfo("jpeg", size[0], size[1], pos + 2 + length)
        pos += 2 + length
    raise ImageError(
        "the JPEG has no frame header or no image data (truncated or damaged); send it again"
    )


def _png_header(data: bytes) -> HeaderInfo:
    if data[12:16] != b"IHDR":
        raise ImageError("the PNG does not start with an IHDR chunk (damaged file); send it again")
    return HeaderInfo("png", _u32be(data, 16), _u32be(data, 20))


def _webp_header(data: bytes) -> HeaderInfo:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageError("the WebP (lossy) frame header is corrupt; send the file again")
        return HeaderInfo("webp", _u16le(data, 26) & 0x3FFF, _u16le(data, 28) & 0x3FFF)
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise ImageError("the WebP (lossless) header is corrupt; send the file again")
        bits = _u32le(data, 21)
        return HeaderInfo("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        if data[20] & _WEBP_ANIMATION_FLAG:
            raise ImageError("animated WebP images are not accepted; send a still photo")
        return HeaderInfo("webp", _u24le(data, 24) + 1, _u24le(data, 27) + 1)
    raise ImageError("the WebP file has an unknown first chunk (damaged file); send it again")


def _bmp_header(data: bytes) -> HeaderInfo:
    if _u32le(data, 14) == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return HeaderInfo("bmp", _u16le(data, 18), _u16le(data, 20))
    width, height = struct.unpack_from("<ii", data, 18)
    return HeaderInfo("bmp", int(width), abs(int(height)))


def _bmp_pixel_end(data: bytes, info: HeaderInfo) -> int:
    """Offset just past the pixel array of an uncompressed BMP (0 when it cannot be computed)."""
    header_size = _u32le(data, 14)
    if header_size == 12:
        bits, compression = _u16le(data, 24), 0
    else:
        bits, compression = _u16le(data, 28), _u32le(data, 30)
    if compression not in (0, 3) or bits == 0:  # RLE etc.: the decoder checks the length
        return 0
    row_bytes = (info.width * bits + 31) // 32 * 4
    return _u32le(data, 10) + row_bytes * info.height
