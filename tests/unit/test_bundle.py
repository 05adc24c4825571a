"""Bundles: build, open and verify; every kind of tampering, down to any single flipped byte."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_bundle.archive import write_archive
from edge_bundle.bundle import (
    SourceFile,
    guess_role,
    open_bundle,
    verify_bundle,
    write_bundle,
)
from edge_bundle.errors import (
    BundleError,
    IntegrityError,
    ManifestError,
    RevokedKeyError,
    SignatureError,
    UnsupportedSchemaError,
    UntrustedKeyError,
    WrongRoleError,
)
from edge_bundle.manifest import FileEntry, Manifest, ManifestBody
from edge_bundle.signing import (
    BUNDLE_MANIFEST,
    KeyRole,
    PublicKey,
    SigningKey,
    TrustStore,
    encode_signatures,
)

BODY = ManifestBody(
    name="weld",
    version=3,
    created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    task="image-classification",
    runtime="onnx",
    labels=("ok", "crack"),
    knowledge_path="knowledge.json",
)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate(KeyRole.BUNDLE)


@pytest.fixture(scope="module")
def trust(key: SigningKey) -> TrustStore:
    return TrustStore((key.public,))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path | SourceFile]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.onnx").write_bytes(b"onnx" * 25)
    (src / "kb.json").write_bytes(b'{"crack": ["reweld"]}')
    return {
        "model.onnx": src / "model.onnx",
        "knowledge.json": SourceFile(src / "kb.json", "knowledge"),
    }


@pytest.fixture
def bundle(tmp_path: Path, files: dict[str, Path | SourceFile], key: SigningKey) -> Path:
    return write_bundle(tmp_path / "weld-3.bundle", files, BODY, key)


def test_open_bundle_verifies_and_exposes_everything(
    tmp_path: Path, bundle: Path, trust: TrustStore, key: SigningKey
) -> None:
    verified = open_bundle(bundle, trust, tmp_path / "staging")
    assert verified.signer_key_id == key.key_id
    assert verified.bundle_sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert str(verified.bundle_id) == "weld@3"
    manifest = verified.manifest
    assert manifest.labels == ("ok", "crack")
    assert verified.manifest_bytes == manifest.to_bytes()
    assert (verified.directory / "manifest.json").read_bytes() == verified.manifest_bytes
    assert manifest.file("model.onnx") == FileEntry(
        path="model.onnx",
        sha256=hashlib.sha256(b"onnx" * 25).hexdigest(),
        size=100,
        role="model",
    )
    assert manifest.file("knowledge.json") is not None
    assert verified.path("model.onnx").read_bytes() == b"onnx" * 25
    with pytest.raises(IntegrityError):
        verified.path("manifest.sig")
    verified.discard()
    assert list((tmp_path / "staging").iterdir()) == []


def test_builds_are_reproducible(
    tmp_path: Path, files: dict[str, Path | SourceFile], key: SigningKey, bundle: Path
) -> None:
    again = write_bundle(tmp_path / "again.bundle", files, BODY, key)
    assert again.read_bytes() == bundle.read_bytes()


def test_verify_bundle_returns_manifest_and_keeps_nothing(
    tmp_path: Path, bundle: Path, trust: TrustStore
) -> None:
    root = tmp_path / "verify-root"
    root.mkdir()
    assert verify_bundle(bundle, trust, staging_root=root).bundle_id == BODY.bundle_id
    assert list(root.iterdir()) == []


def test_gzip_bundle_opens(
    tmp_path: Path, files: dict[str, Path | SourceFile], key: SigningKey, trust: TrustStore
) -> None:
    path = write_bundle(tmp_path / "weld-3.bundle", files, BODY, key, compress=True)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert verify_bundle(path, trust).version == 3


@pytest.mark.parametrize(
    ("trust_of", "error"),
    [
        (lambda k: TrustStore((SigningKey.generate(KeyRole.BUNDLE).public,)), UntrustedKeyError),
        (lambda k: TrustStore((k.public,), frozenset({k.key_id})), RevokedKeyError),
        (lambda k: TrustStore((PublicKey(KeyRole.RELEASE, k.public.raw),)), WrongRoleError),
    ],
    ids=["untrusted", "revoked", "wrong-role"],
)
def test_signature_trust_failures_clean_up(
    tmp_path: Path, bundle: Path, key: SigningKey, trust_of: object, error: type[Exception]
) -> None:
    staging = tmp_path / "staging"
    with pytest.raises(error):
        open_bundle(bundle, trust_of(key), staging)  # type: ignore[operator]
    assert list(staging.iterdir()) == []


def test_building_refuses_reserved_names_and_wrong_role(
    tmp_path: Path, files: dict[str, Path | SourceFile], key: SigningKey
) -> None:
    with pytest.raises(ManifestError, match="reserved"):
        write_bundle(
            tmp_path / "x.bundle", {**files, "manifest.json": files["model.onnx"]}, BODY, key
        )
    release = SigningKey.generate(KeyRole.RELEASE)
    with pytest.raises(WrongRoleError):
        write_bundle(tmp_path / "x.bundle", files, BODY, release)
    with pytest.raises(IntegrityError, match="not a file"):
        write_bundle(tmp_path / "x.bundle", {"model.onnx": tmp_path / "nope"}, BODY, key)
    assert not (tmp_path / "x.bundle").exists()


def test_guess_role() -> None:
    assert guess_role("model.onnx") == "model"
    assert guess_role("model.onnx.data") == "model-data"
    assert guess_role("weights/model-q4_k_m.gguf") == "model"
    assert guess_role("mmproj-f16.gguf") == "mmproj"
    assert guess_role("tokenizer.json") == "tokenizer"
    assert guess_role("golden/ok-1.jpg") == "golden"
    assert guess_role("knowledge.json") == "knowledge"
    assert guess_role("report.html") == "report"
    assert guess_role("README.txt") == "other"


def _forge(
    tmp_path: Path,
    key: SigningKey,
    manifest_bytes: bytes,
    files: dict[str, bytes],
    *,
    signed: bool = True,
) -> Path:
    members: dict[str, Path | bytes] = {"manifest.json": manifest_bytes, **files}
    if signed:
        members["manifest.sig"] = encode_signatures([key.sign(manifest_bytes, BUNDLE_MANIFEST)])
    return write_archive(tmp_path / "forged.bundle", members).path


def _manifest_for(files: dict[str, bytes], **changes: object) -> Manifest:
    entries = tuple(
        FileEntry(path=n, sha256=hashlib.sha256(d).hexdigest(), size=len(d), role="model")
        for n, d in files.items()
    )
    body = BODY.model_copy(update={"knowledge_path": None, **changes})
    return Manifest.from_body(body, entries)


def test_extra_missing_and_altered_files_are_integrity_errors(
    tmp_path: Path, key: SigningKey, trust: TrustStore
) -> None:
    content = {"m.onnx": b"model"}
    manifest = _manifest_for(content).to_bytes()
    cases = [
        ({"m.onnx": b"model", "extra.bin": b"x"}, "does not list"),
        ({}, "lacks"),
        ({"m.onnx": b"MODEL"}, "sha256"),
        ({"m.onnx": b"model!"}, "bytes but the manifest says"),
    ]
    for shipped, reason in cases:
        forged = _forge(tmp_path, key, manifest, shipped)
        with pytest.raises(IntegrityError, match=reason):
            open_bundle(forged, trust, tmp_path / "staging")
        assert list((tmp_path / "staging").iterdir()) == []


def test_unsigned_or_manifestless_bundles_are_refused(
    tmp_path: Path, key: SigningKey, trust: TrustStore
) -> None:
    content = {"m.onnx": b"model"}
    unsigned = _forge(tmp_path, key, _manifest_for(content).to_bytes(), content, signed=False)
    with pytest.raises(SignatureError, match="not signed"):
        verify_bundle(unsigned, trust)
    bare = write_archive(tmp_path / "bare.bundle", {"m.onnx": b"model"}).path
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        verify_bundle(bare, trust)


def test_signature_is_checked_before_the_manifest_is_parsed(
    tmp_path: Path, key: SigningKey, trust: TrustStore
) -> None:
    content = {"m.onnx": b"model"}
    document = json.loads(_manifest_for(content).to_bytes())
    document["schema_version"] = 99
    newer = json.dumps(document).encode()
    stranger = SigningKey.generate(KeyRole.BUNDLE)
    with pytest.raises(UntrustedKeyError):
        verify_bundle(_forge(tmp_path, stranger, newer, content), trust)
    with pytest.raises(UnsupportedSchemaError, match="upgrade the agent"):
        verify_bundle(_forge(tmp_path, key, newer, content), trust)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A memory-backed directory when the machine has one (thousands of small writes)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm) as name:
        yield Path(name)


def test_every_flipped_byte_fails_verification(
    scratch: Path, bundle: Path, trust: TrustStore
) -> None:
    """Flip each byte of a whole small bundle in turn: every variant must be refused."""
    original = bundle.read_bytes()
    assert len(original) <= 8 * 1024  # keeps the exhaustive loop fast
    staging = scratch / "staging"
    tampered = scratch / "tampered.bundle"
    accepted: list[int] = []
    for position in range(len(original)):
        data = bytearray(original)
        data[position] ^= 0x01 if position % 2 else 0x80
        tampered.write_bytes(bytes(data))
        try:
            open_bundle(tampered, trust, staging).discard()
        except BundleError:
            continue
        accepted.append(position)
    assert accepted == []
    assert list(staging.iterdir()) == []
    assert verify_bundle(bundle, trust).version == 3  # the original is still fine
