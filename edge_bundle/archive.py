"""Safe tar archives: atomic canonical writing, and defensive reading into a staging directory.

`write_archive` writes the canonical layout of `edge_bundle.tar_layout` (same inputs, same bytes)
to a temporary file beside the target, fsyncs it and `os.replace`s it into place.

Reading takes passes over one open file descriptor. First, before anything is written, every
member is inspected with the stdlib parser (links, devices, FIFOs, unsafe names, duplicates and
anything over the caps of `ArchiveLimits` are refused), then the whole archive is checked to be
byte-for-byte the canonical layout outside member data. Only then is each member streamed into a
fresh staging directory (never `tarfile.extractall`), reading no more than its declared size; on
any failure the staging directory is removed.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edge_bundle.errors import ArchiveError, ArchiveLimitError, IntegrityError, UnsafeMemberError
from edge_bundle.files import fsync_directory
from edge_bundle.hashing import (
    CHUNK_BYTES,
    ByteSource,
    HashingReader,
    HashingWriter,
    copy_hashed,
)
from edge_bundle.tar_layout import (
    ENCODING,
    END_OF_ARCHIVE,
    ArchiveEntry,
    canonical_header,
    check_no_file_dir_clash,
    member_name_problem,
    padding,
    write_members,
)

__all__ = [
    "ArchiveEntry",
    "ArchiveLimits",
    "ExtractedArchive",
    "MemberInfo",
    "WrittenArchive",
    "extract_archive",
    "inspect_archive",
    "member_name_problem",
    "write_archive",
]

GiB = 1 << 30
MiB = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
_REBUILD = "rebuild the bundle with model-packager"
_KIND_PROBLEMS = {
    tarfile.SYMTYPE: "is a symbolic link",
    tarfile.LNKTYPE: "is a hard link",
    tarfile.CHRTYPE: "is a character device",
    tarfile.BLKTYPE: "is a block device",
    tarfile.FIFOTYPE: "is a FIFO",
    tarfile.DIRTYPE: "is a directory entry",
}


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps applied while reading an archive; any breach raises `ArchiveLimitError`."""

    max_members: int = 256
    max_total_bytes: int = 4 * GiB
    max_member_bytes: int = 4 * GiB
    # Uncompressed/compressed ratio allowed for gzip archives, judged once the declared total
    # passes `ratio_floor_bytes` (tiny archives of text legitimately compress very well).
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 1 * MiB


@dataclass(frozen=True)
class MemberInfo:
    """A member as declared by its header: name and size."""

    name: str
    size: int


@dataclass(frozen=True)
class WrittenArchive:
    """The result of `write_archive`: where it is, its own sha256 and size, and its members."""

    path: Path
    sha256: str
    size: int
    members: tuple[ArchiveEntry, ...]


@dataclass(frozen=True)
class ExtractedArchive:
    """The result of `extract_archive`: the fresh staging directory and what was written there."""

    directory: Path
    members: tuple[ArchiveEntry, ...]
    sha256: str

    def entry(self, name: str) -> ArchiveEntry | None:
        """The extracted member called `name`, or None."""
        return next((m for m in self.members if m.name == name), None)


def write_archive(
    out_path: Path,
    members: Mapping[str, Path | bytes],
    *,
    compress: bool = False,
    expected_sha256: Mapping[str, str] | None = None,
) -> WrittenArchive:
    """Write `members` (name -> source file or bytes) as a canonical tar, atomically.

    With `expected_sha256`, a member whose written bytes hash differently (a source file that
    changed after it was hashed) raises `IntegrityError` and nothing is left at `out_path`.
    """
    names = sorted(members)
    for name in names:
        problem = member_name_problem(name)
        if problem is not None:
            raise UnsafeMemberError(f"cannot archive {name!r}: the name {problem}; rename it")
    check_no_file_dir_clash(names)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent
    )
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            sink = HashingWriter(raw)
            entries = write_members(sink, names, members, compress)
            _check_expected(entries, expected_sha256 or {})
            raw.flush()
            os.fsync(raw.fileno())
        tmp.chmod(0o644)
        tmp.replace(out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(out_path.parent)
    return WrittenArchive(out_path, sink.hexdigest(), sink.size, entries)


def _check_expected(entries: Sequence[ArchiveEntry], expected: Mapping[str, str]) -> None:
    for entry in entries:
        if entry.name in expected and expected[entry.name] != entry.sha256:
            raise IntegrityError(
                f"{entry.name!r} changed while the archive was written; build again once the "
                f"sources are stable"
            )


def inspect_archive(path: Path, limits: ArchiveLimits | None = None) -> tuple[MemberInfo, ...]:
    """Check every member of the archive at `path` against the safety rules; write nothing."""
    with _open_archive(path) as raw:
        return _inspect(raw, path, limits or ArchiveLimits())


def extract_archive(
    path: Path, staging_root: Path, limits: ArchiveLimits | None = None
) -> ExtractedArchive:
    """Inspect, then stream the archive into a fresh directory under `staging_root`."""
    with _open_archive(path) as raw:
        members = _inspect(raw, path, limits or ArchiveLimits())
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="extract-", dir=staging_root))
        try:
            entries, digest = _walk(raw, members, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return ExtractedArchive(staging, entries, digest)


def _open_archive(path: Path) -> BinaryIO:
    if path.exists() and not path.is_file():
        raise ArchiveError(f"{path} is not a regular file; pass the path of a .bundle file")
    try:
        return path.open("rb")
    except OSError as exc:
        raise ArchiveError(f"cannot read archive {path}: {exc.strerror}; check the path") from exc


def _is_gzip(raw: BinaryIO) -> bool:
    raw.seek(0)
    magic = raw.read(len(GZIP_MAGIC))
    raw.seek(0)
    return magic == GZIP_MAGIC


def _inspect(raw: BinaryIO, path: Path, limits: ArchiveLimits) -> tuple[MemberInfo, ...]:
    compressed = _is_gzip(raw)
    stored_size = os.fstat(raw.fileno()).st_size
    try:
        with tarfile.open(
            fileobj=raw,
            mode="r:gz" if compressed else "r:",
            encoding=ENCODING,
            errors="surrogateescape",
        ) as tar:
            members = _scan(tar, stored_size if compressed else None, limits)
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as exc:
        raise ArchiveError(f"{path} is not a readable tar archive ({exc}); {_REBUILD}") from exc
    if not members:
        raise ArchiveError(f"{path} holds no files; {_REBUILD}")
    check_no_file_dir_clash([m.name for m in members])
    _walk(raw, members, None)
    return members


def _scan(
    tar: tarfile.TarFile, compressed_size: int | None, limits: ArchiveLimits
) -> tuple[MemberInfo, ...]:
    """Check each member as the parser yields it, before the parser reads past its data."""
    members: list[MemberInfo] = []
    seen: set[str] = set()
    total = 0
    for info in tar:
        _check_member(info, limits)
        if len(members) >= limits.max_members:
            raise ArchiveLimitError(
                f"member {info.name!r} is past the cap of {limits.max_members} members "
                f"(max_members); {_REBUILD} with fewer files"
            )
        if info.name in seen:
            raise UnsafeMemberError(f"member {info.name!r} appears twice; {_REBUILD}")
        seen.add(info.name)
        total += info.size
        _check_total(info.name, total, compressed_size, limits)
        members.append(MemberInfo(info.name, info.size))
    return tuple(members)


def _check_member(info: tarfile.TarInfo, limits: ArchiveLimits) -> None:
    kind = _kind_problem(info)
    if kind is not None:
        raise UnsafeMemberError(
            f"member {info.name!r} {kind}; bundles hold only regular files, {_REBUILD}"
        )
    problem = member_name_problem(info.name)
    if problem is not None:
        raise UnsafeMemberError(f"member {info.name!r}: the name {problem}; {_REBUILD}")
    if info.size > limits.max_member_bytes:
        raise ArchiveLimitError(
            f"member {info.name!r} declares {info.size} bytes, over the cap of "
            f"{limits.max_member_bytes} (max_member_bytes); raise the limit only if you trust it"
        )


def _kind_problem(info: tarfile.TarInfo) -> str | None:
    if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return None
    return _KIND_PROBLEMS.get(info.type, f"has unsupported tar type {info.type!r}")


def _check_total(name: str, total: int, compressed_size: int | None, limits: ArchiveLimits) -> None:
    if total > limits.max_total_bytes:
        raise ArchiveLimitError(
            f"member {name!r} brings the total to {total} bytes, over the cap of "
            f"{limits.max_total_bytes} (max_total_bytes)"
        )
    if compressed_size is None or total <= limits.ratio_floor_bytes:
        return
    if total > limits.max_ratio * max(compressed_size, 1):
        raise ArchiveLimitError(
            f"member {name!r} brings the uncompressed size to {total} bytes, "
            f"{total / max(compressed_size, 1):.0f}x the {compressed_size}-byte file, over the "
            f"{limits.max_ratio:g}x cap (max_ratio): refusing a likely decompression bomb"
        )


def _walk(
    raw: BinaryIO, members: Sequence[MemberInfo], staging: Path | None
) -> tuple[tuple[ArchiveEntry, ...], str]:
    """Read the archive to its end, checking every byte outside member data against the
    canonical layout. With `staging`, stream member data into files there (and return their
    entries and the archive's sha256); without, skip the data and write nothing."""
    raw.seek(0)
    compressed = _is_gzip(raw)
    hashing = HashingReader(raw)
    try:
        if compressed:
            with gzip.GzipFile(fileobj=hashing, mode="rb") as gz:
                entries = _walk_tar(gz, members, staging)
        else:
            entries = _walk_tar(raw if staging is None else hashing, members, staging)
        return entries, hashing.drain_hexdigest()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ArchiveError(f"archive cannot be read to its end ({exc}); {_REBUILD}") from exc


def _walk_tar(
    stream: ByteSource, members: Sequence[MemberInfo], staging: Path | None
) -> tuple[ArchiveEntry, ...]:
    entries: list[ArchiveEntry] = []
    for member in members:
        header = canonical_header(member.name, member.size)
        _expect(stream, header, f"the header of {member.name!r}")
        if staging is None:
            _skip(stream, member.size)
        else:
            entries.append(_extract_member(stream, member, staging))
        _expect(stream, bytes(padding(member.size)), f"the padding after {member.name!r}")
    _expect(stream, END_OF_ARCHIVE, "the end-of-archive blocks")
    if stream.read(1):
        raise ArchiveError(f"data follows the end of the archive; {_REBUILD}")
    return tuple(entries)


def _skip(stream: ByteSource, size: int) -> None:
    """Move past member data; a short archive shows up at the next `_expect`."""
    if isinstance(stream, io.BufferedReader):
        stream.seek(size, os.SEEK_CUR)
        return
    remaining = size
    while remaining and (chunk := stream.read(min(CHUNK_BYTES, remaining))):
        remaining -= len(chunk)


def _extract_member(stream: ByteSource, member: MemberInfo, staging: Path) -> ArchiveEntry:
    target = staging.joinpath(*member.name.split("/"))
    if "/" in member.name:
        target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
        # Never more than the declared size is read, so a lying header cannot beat the caps.
        digest, copied = copy_hashed(stream, out, member.size)
    if copied != member.size:
        raise ArchiveError(f"archive is truncated inside {member.name!r}; {_REBUILD}")
    return ArchiveEntry(member.name, member.size, digest)


def _expect(stream: ByteSource, expected: bytes, what: str) -> None:
    got = _read_exact(stream, len(expected))
    if len(got) < len(expected):
        raise ArchiveError(f"archive is truncated in {what}; {_REBUILD}")
    if got != expected:
        raise ArchiveError(
            f"archive is not in canonical form: {what} differs from what the writer emits; "
            f"{_REBUILD}"
        )


def _read_exact(stream: ByteSource, size: int) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)
