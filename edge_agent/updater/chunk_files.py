"""The files of a chunked fetch, and what survives a SIGKILL or a power cut of them.

Beside the `.part` file the HTTP download would grow (`download.part_path`), a chunked fetch keeps:

- `.manifest`: the chunk manifest, written (atomically) only after it matched the signed digest;
- `.have`: the record of the chunks written *and* fsynced: a 12-byte header (`LSC1`, chunk size,
  chunk count) and then one 4-byte index per chunk, appended only after the `.part` file was
  fsynced with those chunks in it. A torn last record is ignored.

Chunks are written at their offsets (`pwrite`) into a `.part` file sized to the bundle up front.
After a restart the chunks in `.have` are kept and only the others are asked for; a `.have` that
does not fit the release (another chunk size, another count) starts the fetch over. Chunks written
but not yet recorded are simply fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from pathlib import Path

from edge_agent import faults
from edge_agent.updater.download import part_path
from edge_agent.updater.machine import Release
from edge_bundle.chunks import ChunkedDelivery, ChunkError
from edge_bundle.files import write_atomically

MAGIC = b"LSC1"
_HEADER = struct.Struct(">4sII")
_INDEX = struct.Struct(">I")
READ_BLOCK = 1024 * 1024


def side_files(part: Path) -> tuple[Path, Path]:
    """(`.manifest`, `.have`) of a `.part` file."""
    return part.with_suffix(".manifest"), part.with_suffix(".have")


class ChunkFiles:
    """One release's `.part`, `.manifest` and `.have`; open with `open()`, then `close()`."""

    def __init__(self, directory: Path, release: Release, delivery: ChunkedDelivery) -> None:
        self.release = release
        self.delivery = delivery
        self.part = part_path(directory, release)
        self.manifest_path, self.have_path = side_files(self.part)
        self._fd: int | None = None
        self._have_fd: int | None = None
        self.held: set[int] = set()  # chunks written and recorded as fsynced
        self._unflushed: list[int] = []  # written, not yet fsynced and recorded

    # ---- the manifest --------------------------------------------------------------------
    def saved_manifest(self) -> bytes | None:
        """The manifest saved by an earlier run, if it is still the signed one."""
        try:
            manifest = self.manifest_path.read_bytes()
            self.delivery.check_manifest(manifest)
        except (OSError, ChunkError):
            return None
        return manifest

    def save_manifest(self, manifest: bytes) -> None:
        """Keep a manifest that matched the signed digest (before any chunk is written)."""
        self.part.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.manifest_path, manifest)

    # ---- the part file and its record ----------------------------------------------------
    def open(self, *, resume: bool) -> set[int]:
        """Open the `.part` file; returns the chunks already held (none unless `resume` and the
        record fits this release)."""
        self.part.parent.mkdir(parents=True, exist_ok=True)
        # An HTTP download's note would take this sparse file for a prefix of the bundle.
        self.part.with_suffix(".json").unlink(missing_ok=True)
        held = self._read_record() if resume and self.part.exists() else None
        self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        if held is None:
            os.ftruncate(self._fd, 0)
            held = set()
            self._write_record(held)
        os.ftruncate(self._fd, self.release.size)
        self._have_fd = os.open(self.have_path, os.O_WRONLY | os.O_APPEND)
        self.held = held
        return set(held)

    def write(self, index: int, data: bytes) -> None:
        """Write chunk `index` at its offset (recorded at the next `flush`)."""
        assert self._fd is not None
        faults.hit("download.write")
        os.pwrite(self._fd, data, index * self.delivery.chunk_size)
        self._unflushed.append(index)

    @property
    def unflushed(self) -> int:
        return len(self._unflushed)

    def flush(self) -> None:
        """fsync the chunks written since the last flush, then record them as held."""
        if not self._unflushed:
            return
        assert self._fd is not None and self._have_fd is not None
        os.fsync(self._fd)
        os.write(self._have_fd, b"".join(_INDEX.pack(index) for index in self._unflushed))
        os.fsync(self._have_fd)
        self.held.update(self._unflushed)
        self._unflushed.clear()

    def forget(self, indices: set[int]) -> None:
        """Drop chunks from the record (they failed the final check): they are fetched again."""
        self.held -= indices
        self._write_record(self.held)
        if self._have_fd is not None:
            os.close(self._have_fd)
        self._have_fd = os.open(self.have_path, os.O_WRONLY | os.O_APPEND)

    def scan(self, manifest: bytes) -> tuple[set[int], str]:
        """Read the whole `.part` once: the chunks that do not match the manifest, and the
        file's sha256."""
        assert self._fd is not None
        bad: set[int] = set()
        digest = hashlib.sha256()
        size = self.release.size
        for index in range(self.delivery.chunks):
            length = self.delivery.chunk_length(index, size)
            data = os.pread(self._fd, length, index * self.delivery.chunk_size)
            digest.update(data)
            if not self.delivery.chunk_ok(manifest, index, data, size):
                bad.add(index)
        return bad, digest.hexdigest()

    def close(self) -> None:
        """Record what was written (best effort: the fetch may have failed for the disk), then
        close."""
        if self._fd is not None and self._have_fd is not None:
            with contextlib.suppress(OSError):
                self.flush()
        for fd in (self._fd, self._have_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._have_fd = None

    def _read_record(self) -> set[int] | None:
        try:
            data = self.have_path.read_bytes()
        except OSError:
            return None
        if len(data) < _HEADER.size:
            return None
        magic, chunk_size, chunks = _HEADER.unpack_from(data)
        if (magic, chunk_size, chunks) != (MAGIC, self.delivery.chunk_size, self.delivery.chunks):
            return None
        body = data[_HEADER.size :]
        whole = len(body) - len(body) % _INDEX.size  # a torn last record is ignored
        held = {index for (index,) in _INDEX.iter_unpack(body[:whole])}
        if any(index >= chunks for index in held):
            return None
        return held

    def _write_record(self, held: set[int]) -> None:
        header = _HEADER.pack(MAGIC, self.delivery.chunk_size, self.delivery.chunks)
        body = b"".join(_INDEX.pack(index) for index in sorted(held))
        write_atomically(self.have_path, header + body)


def read_record(part: Path) -> set[int]:
    """The chunks a `.have` record lists (for tests and diagnostics); empty when unreadable."""
    try:
        data = side_files(part)[1].read_bytes()
    except OSError:
        return set()
    body = data[_HEADER.size :]
    whole = len(body) - len(body) % _INDEX.size
    return {index for (index,) in _INDEX.iter_unpack(body[:whole])}
