"""The canonical tar layout that bundle archives follow, and the writer that produces it.

One member is its PAX header as `canonical_header` renders it (regular file, mtime 0, uid/gid 0,
mode 0644, empty owner names), its data, and zero padding to a 512-byte block; the archive ends
with exactly two zero blocks (no padding to a 10240-byte tape record: readers do not need it). The
reader in `edge_bundle.archive` demands exactly these bytes, so nothing can hide outside the data
that the manifest pins. `member_name_problem` is the one rule for safe relative member paths.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edge_bundle.errors import ArchiveError, UnsafeMemberError
from edge_bundle.hashing import ByteSink, HashingWriter, copy_hashed

ENCODING = "utf-8"
MAX_NAME_BYTES = 255
_BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = bytes(2 * _BLOCK)


@dataclass(frozen=True)
class ArchiveEntry:
    """A member as actually written or extracted: name, byte count and sha256 of its data."""

    name: str
    size: int
    sha256: str


def member_name_problem(name: str) -> str | None:
    """Why `name` is not a safe relative POSIX member path, or None when it is."""
    if not name:
        return "is empty"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return "contains a control character"
    try:
        encoded = name.encode(ENCODING)
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(encoded) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if not unicodedata.is_normalized("NFC", name):
        return "is not NFC-normalised Unicode"
    parts = name.split("/")
    if ".." in parts:
        return "climbs out of the archive with '..'"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' path component"
    return None


def check_no_file_dir_clash(names: Sequence[str]) -> None:
    files = set(names)
    for name in names:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            if prefix in files:
                raise UnsafeMemberError(
                    f"member {prefix!r} is a file but {name!r} needs it to be a directory; "
                    f"rename one of them"
                )


def canonical_header(name: str, size: int) -> bytes:
    """The exact header bytes the writer emits for a regular file `name` of `size` bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, ENCODING, "strict")


def padding(size: int) -> int:
    return -size % _BLOCK


def write_members(
    raw: HashingWriter, names: Sequence[str], members: Mapping[str, Path | bytes], compress: bool
) -> tuple[ArchiveEntry, ...]:
    """Write the canonical archive of `members` (in `names` order) to `raw`, gzipped or not."""
    if not compress:
        return _write_tar(raw, names, members)
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
        return _write_tar(gz, names, members)


def _write_tar(
    sink: ByteSink, names: Sequence[str], members: Mapping[str, Path | bytes]
) -> tuple[ArchiveEntry, ...]:
    entries: list[ArchiveEntry] = []
    for name in names:
        entries.append(_write_member(sink, name, members[name]))
    sink.write(END_OF_ARCHIVE)
    return tuple(entries)


def _write_member(sink: ByteSink, name: str, source: Path | bytes) -> ArchiveEntry:
    with _open_source(source) as stream:
        size = os.fstat(stream.fileno()).st_size if isinstance(source, Path) else len(source)
        sink.write(canonical_header(name, size))
        digest, copied = copy_hashed(stream, sink, size)
        if copied != size or stream.read(1):
            raise ArchiveError(f"{name!r} changed size while being archived; build again")
    sink.write(bytes(padding(size)))
    return ArchiveEntry(name, size, digest)


def _open_source(source: Path | bytes) -> BinaryIO:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if not source.is_file():
        raise UnsafeMemberError(f"cannot archive {source}: not a regular file; pass files only")
    return source.open("rb")
