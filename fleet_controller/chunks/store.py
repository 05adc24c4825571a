"""A content-addressed chunk store: bundles by sha256, their chunk manifests beside them.

    <directory>/<sha256>.bundle                 the bundle, added atomically and verified
    <directory>/<sha256>.<chunk_size>.chunks    its chunk manifest at that chunk size

Everything lives in the directory: a server that restarts (or a second one reading the same
directory) carries on with nothing to rebuild. A bundle is copied to a temporary name while its
sha256 is computed, fsynced, then renamed into place, so a reader never sees half a bundle and
a bundle is never stored under a digest it does not have. A manifest is computed the first time
it is asked for and written the same way; a cached manifest whose length does not fit the
bundle's size is thrown away and computed again.

Serving a chunk size nobody published costs a pass over the bundle and a file, so a request may
create a manifest only for a power-of-two chunk size (at most 13 per bundle); other sizes are
served once `publish` made their manifest.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edge_bundle.chunks import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_BYTES,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MIN_CHUNK_SIZE,
    ChunkedDelivery,
    build_manifest,
    chunk_count,
    manifest_page,
)
from edge_bundle.files import fsync_directory
from fleet_controller.errors import FleetError

_SHA = re.compile(r"^[0-9a-f]{64}$")
_COPY_BLOCK: Final = 1024 * 1024
#: Manifests kept in memory (a 4 GiB bundle in 256 KiB chunks has a 512 KiB manifest).
_CACHED_MANIFESTS: Final = 16


class UnknownBundleError(FleetError):
    """The store holds no bundle with that sha256."""

    status = 404


class ChunkRangeError(FleetError):
    """A chunk, manifest page or chunk size this bundle does not have."""


@dataclass(frozen=True)
class StoredBundle:
    sha256: str
    size: int
    path: Path


class ChunkStore:
    """The directory of bundles and manifests; safe to use from several threads."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._manifests: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def ensure(self) -> ChunkStore:
        """Create the directory if it is missing (`FleetError` if that is impossible)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FleetError(
                f"cannot create the chunk store {self.directory}: {exc.strerror}; give a "
                "writable directory in [chunks] store"
            ) from exc
        return self

    # ---- bundles ------------------------------------------------------------------------------
    def bundle_path(self, sha256: str) -> Path:
        if _SHA.fullmatch(sha256) is None:
            raise FleetError(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
        return self.directory / f"{sha256}.bundle"

    def get(self, sha256: str) -> StoredBundle:
        """The stored bundle `sha256` (`UnknownBundleError` when it is not here)."""
        path = self.bundle_path(sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise UnknownBundleError(
                f"bundle {sha256} is not in the chunk store {self.directory}; publish it with "
                '`fleet-controller chunks add BUNDLE` or a rollout plan with delivery = "mqtt"'
            ) from None
        return StoredBundle(sha256, size, path)

    def has(self, sha256: str) -> bool:
        return self.bundle_path(sha256).is_file()

    def add(self, source: Path, expected_sha256: str | None = None) -> StoredBundle:
        """Copy `source` in under its sha256 (a no-op when it is already there).

        With `expected_sha256`, a file whose content has another digest is refused and nothing
        is stored.
        """
        self.ensure()
        if expected_sha256 is not None and self.has(expected_sha256):
            return self.get(expected_sha256)
        digest = hashlib.sha256()
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".adding-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as target:
                try:
                    with source.open("rb") as stream:
                        while block := stream.read(_COPY_BLOCK):
                            digest.update(block)
                            target.write(block)
                except OSError as exc:
                    raise FleetError(f"cannot read the bundle {source}: {exc.strerror}") from exc
                target.flush()
                os.fsync(target.fileno())
            sha256 = digest.hexdigest()
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise FleetError(
                    f"{source} has sha256 {sha256}, not the expected {expected_sha256}; the file "
                    "changed or is not the bundle the plan names: publish the right file"
                )
            Path(temporary).replace(self.bundle_path(sha256))
            fsync_directory(self.directory)
        finally:
            Path(temporary).unlink(missing_ok=True)
        return self.get(sha256)

    # ---- manifests ----------------------------------------------------------------------------
    def manifest_path(self, sha256: str, chunk_size: int) -> Path:
        return self.directory / f"{sha256}.{chunk_size}.chunks"

    def published_sizes(self, sha256: str) -> list[int]:
        """The chunk sizes whose manifest of `sha256` is on disk."""
        sizes = []
        for path in self.directory.glob(f"{sha256}.*.chunks"):
            middle = path.name[len(sha256) + 1 : -len(".chunks")]
            if middle.isdigit():
                sizes.append(int(middle))
        return sorted(sizes)

    def manifest(self, sha256: str, chunk_size: int, *, create: bool = True) -> bytes:
        """The chunk manifest of `sha256` at `chunk_size`, computed and cached on first use.

        With `create` false, only a published size or a power of two may be computed (what a
        request from a box may cause); anything else raises `ChunkRangeError`.
        """
        bundle = self.get(sha256)
        _check_chunk_size(chunk_size)
        key = (sha256, chunk_size)
        with self._lock:
            cached = self._manifests.get(key)
            if cached is not None:
                self._manifests.move_to_end(key)
                return cached
        expected = chunk_count(bundle.size, chunk_size) * DIGEST_BYTES
        path = self.manifest_path(sha256, chunk_size)
        manifest = _read_if_fits(path, expected)
        if manifest is None:
            if not create and chunk_size & (chunk_size - 1):
                raise ChunkRangeError(
                    f"bundle {sha256} is not published in chunks of {chunk_size} bytes (it is in "
                    f"{self.published_sizes(sha256) or 'none'}); ask with the notice's chunk_size"
                )
            if expected // DIGEST_BYTES > MAX_CHUNKS:
                raise ChunkRangeError(
                    f"bundle {sha256} ({bundle.size} bytes) is more than {MAX_CHUNKS} chunks of "
                    f"{chunk_size} bytes; use a larger chunk size"
                )
            manifest = build_manifest(bundle.path, chunk_size)
            _write_atomically(path, manifest)
        with self._lock:
            self._manifests[key] = manifest
            while len(self._manifests) > _CACHED_MANIFESTS:
                self._manifests.popitem(last=False)
        return manifest

    def describe(self, sha256: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkedDelivery:
        """The `mqtt_chunks` extension of a stored bundle (its manifest made if missing)."""
        manifest = self.manifest(sha256, chunk_size)
        return ChunkedDelivery(
            chunk_size, len(manifest) // DIGEST_BYTES, hashlib.sha256(manifest).hexdigest()
        )

    def publish(
        self, source: Path, chunk_size: int = DEFAULT_CHUNK_SIZE, expected_sha256: str | None = None
    ) -> tuple[StoredBundle, ChunkedDelivery]:
        """Add a bundle and make its manifest: what `chunks add` and a rollout plan do."""
        bundle = self.add(source, expected_sha256)
        return bundle, self.describe(bundle.sha256, chunk_size)

    # ---- reads ----------------------------------------------------------------------------------
    def read_chunk(self, sha256: str, chunk_size: int, index: int) -> bytes:
        """Chunk `index` of bundle `sha256`: one positioned read."""
        bundle = self.get(sha256)
        _check_chunk_size(chunk_size)
        count = chunk_count(bundle.size, chunk_size)
        if not 0 <= index < count:
            raise ChunkRangeError(
                f"bundle {sha256} has chunks 0..{count - 1} at chunk_size {chunk_size}, not "
                f"{index}; ask only for chunks the manifest lists"
            )
        length = min(chunk_size, bundle.size - index * chunk_size)
        descriptor = os.open(bundle.path, os.O_RDONLY)
        try:
            data = os.pread(descriptor, length, index * chunk_size)
        finally:
            os.close(descriptor)
        if len(data) != length:
            raise FleetError(f"{bundle.path} is shorter than it was when it was stored")
        return data

    def read_manifest_page(self, sha256: str, chunk_size: int, page: int, *, create: bool) -> bytes:
        """Page `page` of the bundle's manifest, as boxes fetch it."""
        manifest = self.manifest(sha256, chunk_size, create=create)
        pages = chunk_count(len(manifest), chunk_size)
        if not 0 <= page < pages:
            raise ChunkRangeError(
                f"the manifest of bundle {sha256} at chunk_size {chunk_size} has pages "
                f"0..{pages - 1}, not {page}"
            )
        return manifest_page(manifest, page, chunk_size)


def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ChunkRangeError(
            f"chunk_size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes, not {chunk_size}"
        )


def _read_if_fits(path: Path, expected: int) -> bytes | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return data if len(data) == expected else None


def _write_atomically(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".writing-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as target:
            target.write(data)
            target.flush()
            os.fsync(target.fileno())
        Path(temporary).replace(path)
        fsync_directory(path.parent)
    finally:
        Path(temporary).unlink(missing_ok=True)
