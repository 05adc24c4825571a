"""Bundles: build one signed archive from files and a manifest body, and open one defensively.

A bundle is a canonical tar (see `edge_bundle.archive`) holding `manifest.json`, `manifest.sig`
and exactly the files the manifest lists. `write_bundle` hashes the files, completes and signs the
manifest and writes the archive atomically. `open_bundle` extracts into a fresh staging directory,
verifies the signature over the exact stored manifest bytes before parsing them, then checks every
file's size and sha256 and that nothing unlisted is present; on any failure staging is removed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edge_bundle.archive import ArchiveLimits, ExtractedArchive, extract_archive, write_archive
from edge_bundle.errors import BundleError, IntegrityError, ManifestError, SignatureError
from edge_bundle.hashing import sha256_and_size
from edge_bundle.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    RESERVED_PATHS,
    SIGNATURES_FILE,
    BundleId,
    FileEntry,
    FileRole,
    Manifest,
    ManifestBody,
)
from edge_bundle.signing import (
    BUNDLE_MANIFEST,
    MAX_SMALL_FILE_BYTES,
    SigningKey,
    TrustStore,
    decode_signatures,
    encode_signatures,
)


@dataclass(frozen=True)
class SourceFile:
    """A file to put in a bundle, with the role the manifest records for it."""

    path: Path
    role: FileRole


@dataclass(frozen=True)
class VerifiedBundle:
    """An extracted bundle whose signature, manifest and every file have been verified."""

    directory: Path
    manifest: Manifest
    manifest_bytes: bytes = field(repr=False)
    signer_key_id: str | None  # None only for an unsigned bundle opened with allow_unsigned
    bundle_sha256: str

    @property
    def bundle_id(self) -> BundleId:
        return self.manifest.bundle_id

    def path(self, relative: str) -> Path:
        """Where a listed file lies in the staging directory."""
        if self.manifest.file(relative) is None:
            raise IntegrityError(f"{relative!r} is not a file of bundle {self.bundle_id}")
        return self.directory.joinpath(*relative.split("/"))

    def discard(self) -> None:
        """Remove the staging directory (when the bundle is not kept)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def guess_role(name: str) -> FileRole:
    """The manifest role for a file given as a bare path, from its name."""
    base = name.rsplit("/", 1)[-1].lower()
    if name.startswith("golden/"):
        return "golden"
    if name.startswith("reference/"):
        return "reference"
    if base.startswith("mmproj") and base.endswith(".gguf"):
        return "mmproj"
    if base.endswith((".onnx", ".gguf")):
        return "model"
    if base.endswith((".onnx.data", ".onnx_data", ".data")):
        return "model-data"
    if base.startswith(("tokenizer", "vocab", "merges", "special_tokens", "preprocessor_config")):
        return "tokenizer"
    if base.startswith("knowledge"):
        return "knowledge"
    if base.startswith("report"):
        return "report"
    return "other"


def write_bundle(
    out_path: Path,
    files: Mapping[str, Path | SourceFile],
    manifest: ManifestBody,
    signing_key: SigningKey,
    *,
    compress: bool = False,
) -> Path:
    """Hash `files` (archive name -> source), sign the completed manifest, write atomically.

    Any `files` already present in `manifest` are replaced by the hashed ones. Returns `out_path`.
    """
    sources = {name: _as_source(name, value) for name, value in files.items()}
    reserved = RESERVED_PATHS.intersection(sources)
    if reserved:
        raise ManifestError(f"{sorted(reserved)} are reserved for the bundle itself; rename them")
    entries = tuple(_hash_entry(name, sources[name]) for name in sorted(sources))
    full = Manifest.from_body(manifest, entries)
    manifest_bytes = full.to_bytes()
    signature = signing_key.sign(manifest_bytes, BUNDLE_MANIFEST)
    members: dict[str, Path | bytes] = {name: src.path for name, src in sources.items()}
    members[MANIFEST_FILE] = manifest_bytes
    members[SIGNATURES_FILE] = encode_signatures([signature])
    expected = {entry.path: entry.sha256 for entry in entries}
    write_archive(out_path, members, compress=compress, expected_sha256=expected)
    return out_path


def open_bundle(
    path: Path,
    trust: TrustStore,
    staging_root: Path,
    limits: ArchiveLimits | None = None,
    *,
    allow_unsigned: bool = False,
) -> VerifiedBundle:
    """Safely extract and fully verify the bundle at `path`; raise a `BundleError` otherwise.

    `allow_unsigned` (development only) accepts a bundle that carries no signature file at all;
    its files are still checked against the manifest. A signature that is present must verify.
    """
    extracted = extract_archive(path, staging_root, limits)
    try:
        return _verify_extracted(extracted, trust, allow_unsigned=allow_unsigned)
    except BaseException:
        shutil.rmtree(extracted.directory, ignore_errors=True)
        raise


def verify_bundle(
    path: Path,
    trust: TrustStore,
    *,
    limits: ArchiveLimits | None = None,
    staging_root: Path | None = None,
) -> Manifest:
    """Verify the bundle at `path` as `open_bundle` does, keep nothing, return its manifest."""
    with tempfile.TemporaryDirectory(prefix="lineside-verify-", dir=staging_root) as root:
        verified = open_bundle(path, trust, Path(root), limits)
        verified.discard()
        return verified.manifest


def verify_directory(
    directory: Path, trust: TrustStore, bundle_sha256: str, *, allow_unsigned: bool = False
) -> VerifiedBundle:
    """Verify a bundle extracted earlier (by `open_bundle`) again, in place.

    The signature is checked against `trust` as it is now (a key may have been revoked since),
    and every listed file is hashed again, so a bundle damaged on disk is never loaded.
    """
    manifest_bytes = _read_file(directory / MANIFEST_FILE, MAX_MANIFEST_BYTES, ManifestError)
    signer: str | None = None
    signature_path = directory / SIGNATURES_FILE
    if not (allow_unsigned and not signature_path.exists()):
        signatures = _read_file(signature_path, MAX_SMALL_FILE_BYTES, SignatureError)
        signer = trust.verify(manifest_bytes, decode_signatures(signatures), BUNDLE_MANIFEST)
    manifest = Manifest.from_bytes(manifest_bytes)
    present = {
        path.relative_to(directory).as_posix() for path in directory.rglob("*") if not path.is_dir()
    } - set(RESERVED_PATHS)
    listed = {entry.path: entry for entry in manifest.files}
    if present != set(listed):
        raise IntegrityError(
            f"{directory} holds {sorted(present - set(listed))} not in the manifest and lacks "
            f"{sorted(set(listed) - present)}; install the bundle again"
        )
    for path, entry in listed.items():
        digest, size = sha256_and_size(directory.joinpath(*path.split("/")))
        if (digest, size) != (entry.sha256, entry.size):
            raise IntegrityError(
                f"{path!r} in {directory} no longer matches the manifest (damaged on disk?); "
                "install the bundle again"
            )
    return VerifiedBundle(directory, manifest, manifest_bytes, signer, bundle_sha256)


def _read_file(path: Path, max_bytes: int, error: type[BundleError]) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise error(f"{path} is missing; install the bundle again") from None
    if size > max_bytes:
        raise error(f"{path} is {size} bytes, over its cap of {max_bytes}")
    return path.read_bytes()


def _as_source(name: str, value: Path | SourceFile) -> SourceFile:
    return value if isinstance(value, SourceFile) else SourceFile(Path(value), guess_role(name))


def _hash_entry(name: str, source: SourceFile) -> FileEntry:
    if not source.path.is_file():
        raise IntegrityError(f"{source.path} (for {name!r}) is not a file; check the path")
    digest, size = sha256_and_size(source.path)
    return FileEntry(path=name, sha256=digest, size=size, role=source.role)


def _verify_extracted(
    extracted: ExtractedArchive, trust: TrustStore, *, allow_unsigned: bool
) -> VerifiedBundle:
    manifest_bytes = _read_member(
        extracted,
        MANIFEST_FILE,
        MAX_MANIFEST_BYTES,
        ManifestError(f"the bundle has no {MANIFEST_FILE}; rebuild it with model-packager"),
    )
    signer: str | None = None
    if not (allow_unsigned and extracted.entry(SIGNATURES_FILE) is None):
        signatures = _read_member(
            extracted,
            SIGNATURES_FILE,
            MAX_SMALL_FILE_BYTES,
            SignatureError(
                f"the bundle is not signed (no {SIGNATURES_FILE}); sign it with model-packager "
                "(unsigned bundles are accepted only where a development setting allows them)"
            ),
        )
        # The signature covers the exact stored bytes; they are parsed only once it holds.
        signer = trust.verify(manifest_bytes, decode_signatures(signatures), BUNDLE_MANIFEST)
    manifest = Manifest.from_bytes(manifest_bytes)
    _check_files(manifest, extracted)
    return VerifiedBundle(
        directory=extracted.directory,
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        signer_key_id=signer,
        bundle_sha256=extracted.sha256,
    )


def _read_member(
    extracted: ExtractedArchive, name: str, max_bytes: int, missing: BundleError
) -> bytes:
    entry = extracted.entry(name)
    if entry is None:
        raise missing
    if entry.size > max_bytes:
        raise type(missing)(
            f"{name} is {entry.size} bytes, over its cap of {max_bytes}; rebuild the bundle"
        )
    return extracted.directory.joinpath(name).read_bytes()


def _check_files(manifest: Manifest, extracted: ExtractedArchive) -> None:
    """Sizes and sha256 were measured on the bytes written into staging during extraction."""
    present = {m.name: m for m in extracted.members if m.name not in RESERVED_PATHS}
    listed = {entry.path: entry for entry in manifest.files}
    extra = sorted(set(present) - set(listed))
    if extra:
        raise IntegrityError(f"the bundle holds files its manifest does not list: {extra}")
    missing = sorted(set(listed) - set(present))
    if missing:
        raise IntegrityError(f"the bundle lacks files its manifest lists: {missing}")
    for path, entry in listed.items():
        found = present[path]
        if found.size != entry.size:
            raise IntegrityError(
                f"{path!r} is {found.size} bytes but the manifest says {entry.size}; the bundle "
                f"is damaged, fetch or rebuild it"
            )
        if found.sha256 != entry.sha256:
            raise IntegrityError(
                f"{path!r} does not match its sha256 in the manifest; the bundle is damaged, "
                f"fetch or rebuild it"
            )
