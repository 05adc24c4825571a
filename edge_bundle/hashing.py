"""Streamed sha256 of files, byte strings and streams: the one way bundles hash content."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK_BYTES = 1 << 20
SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$"
_SHA256_HEX = re.compile(SHA256_HEX_PATTERN)


def sha256_bytes(data: bytes) -> str:
    """The lowercase hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """The lowercase hex sha256 of a file, read in 1 MiB chunks (never whole into memory)."""
    return sha256_and_size(path)[0]


def sha256_and_size(path: Path) -> tuple[str, int]:
    """The lowercase hex sha256 of a file and the number of bytes actually read."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ByteSink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class ByteSource(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def copy_hashed(source: ByteSource, sink: ByteSink, size: int) -> tuple[str, int]:
    """Copy at most `size` bytes (never reading past them); return their sha256 and count."""
    digest = hashlib.sha256()
    copied = 0
    while copied < size:
        chunk = source.read(min(CHUNK_BYTES, size - copied))
        if not chunk:
            break
        sink.write(chunk)
        digest.update(chunk)
        copied += len(chunk)
    return digest.hexdigest(), copied


def is_sha256_hex(value: str) -> bool:
    """True when `value` is 64 lowercase hex digits."""
    return _SHA256_HEX.fullmatch(value) is not None


class HashingWriter:
    """Writes through to a binary sink, hashing and counting every byte that passes."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes, /) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class HashingReader:
    """Reads through from a binary source, hashing every byte that passes."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._digest = hashlib.sha256()

    def read(self, size: int = -1, /) -> bytes:
        data = self._raw.read(size)
        self._digest.update(data)
        return data

    def seek(self, offset: int, /) -> int:
        """Forward-only: seeking would let bytes escape the hash."""
        raise io.UnsupportedOperation(f"cannot seek to {offset}: a hashing reader is forward-only")

    def drain_hexdigest(self) -> str:
        """Read (and hash) whatever is left, then return the digest of everything read."""
        while self.read(CHUNK_BYTES):
            pass
        return self._digest.hexdigest()
