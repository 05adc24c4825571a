"""Ed25519 keys with roles, purpose-bound signatures, key files and the trust store.

Every signature is made over `purpose.prefix + stored_bytes`, where the prefix names the key role
and the purpose (e.g. b"lineside/v1/bundle/bundle-manifest\\n"), so a signature made for one
purpose never verifies for another. A key id is the first 16 hex digits of the sha256 of the raw
32-byte public key. `TrustStore` is an immutable value: `with_key` / `with_revoked` return new
stores, so the updater can apply signed key notices as pure state transitions.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_bundle.encoding import b64, canonical_json, strict_json, unb64
from edge_bundle.errors import (
    KeyFileError,
    RevokedKeyError,
    SignatureError,
    UntrustedKeyError,
    WrongRoleError,
)

ALGORITHM = "ed25519"
KEY_ID_CHARS = 16
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
MAX_SIGNATURES = 16
MAX_SMALL_FILE_BYTES = 64 * 1024
_KEY_ID = re.compile(rf"^[0-9a-f]{{{KEY_ID_CHARS}}}$")
_LABEL = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_RAW_KEY_BYTES = 32
_SIGNATURE_BYTES = 64


class KeyRole(StrEnum):
    """What a key may sign: bundles, release notices, or trust (key) notices."""

    BUNDLE = "bundle"
    RELEASE = "release"
    ROOT = "root"


@dataclass(frozen=True)
class Purpose:
    """A kind of signed document and the one key role allowed to sign it."""

    label: str
    role: KeyRole

    def __post_init__(self) -> None:
        if _LABEL.fullmatch(self.label) is None:
            raise ValueError(f"purpose label {self.label!r} must be a lowercase slug")

    @property
    def prefix(self) -> bytes:
        return f"lineside/v1/{self.role.value}/{self.label}\n".encode("ascii")

    def message(self, data: bytes) -> bytes:
        """The exact bytes that are signed and verified for `data` under this purpose."""
        return self.prefix + data


BUNDLE_MANIFEST = Purpose("bundle-manifest", KeyRole.BUNDLE)
RELEASE_NOTICE = Purpose("release-notice", KeyRole.RELEASE)
TRUST_NOTICE = Purpose("trust-notice", KeyRole.ROOT)


def key_id_for(public_raw: bytes) -> str:
    """The key id of a raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_raw).hexdigest()[:KEY_ID_CHARS]


def check_key_id(key_id: str) -> str:
    """Return `key_id` if it is 16 lowercase hex digits, else raise `KeyFileError`."""
    if _KEY_ID.fullmatch(key_id) is None:
        raise KeyFileError(f"{key_id!r} is not a key id; a key id is {KEY_ID_CHARS} lowercase hex")
    return key_id


@dataclass(frozen=True)
class PublicKey:
    """A trusted-or-not Ed25519 public key and the role it holds."""

    role: KeyRole
    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != _RAW_KEY_BYTES:
            raise KeyFileError(f"an Ed25519 public key is {_RAW_KEY_BYTES} bytes; check the key")

    @property
    def key_id(self) -> str:
        return key_id_for(self.raw)

    def verifies(self, signature: bytes, message: bytes) -> bool:
        """True when `signature` is this key's Ed25519 signature of `message`."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class Signature:
    """One entry of a signatures file: who signed (key id, claimed role) and the signature."""

    key_id: str
    role: KeyRole
    value: bytes


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key with its role. Its repr never shows the private bytes."""

    role: KeyRole
    private_raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.private_raw) != _RAW_KEY_BYTES:
            raise KeyFileError(f"an Ed25519 private key is {_RAW_KEY_BYTES} bytes")

    @classmethod
    def generate(cls, role: KeyRole) -> SigningKey:
        return cls(role, Ed25519PrivateKey.generate().private_bytes_raw())

    @property
    def public(self) -> PublicKey:
        private = Ed25519PrivateKey.from_private_bytes(self.private_raw)
        return PublicKey(self.role, private.public_key().public_bytes_raw())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes, purpose: Purpose) -> Signature:
        """Sign `data` for `purpose`; a key may only sign for its own role."""
        if purpose.role is not self.role:
            raise WrongRoleError(
                f"key {self.key_id} holds role {self.role.value!r} but a {purpose.label} must be "
                f"signed by a {purpose.role.value!r} key; use a key made with that role"
            )
        private = Ed25519PrivateKey.from_private_bytes(self.private_raw)
        return Signature(self.key_id, self.role, private.sign(purpose.message(data)))


def encode_signatures(signatures: Sequence[Signature]) -> bytes:
    """The canonical bytes of a signatures file (a JSON list, sorted keys, indent 2)."""
    entries = [
        {"key_id": s.key_id, "role": s.role.value, "signature": b64(s.value)} for s in signatures
    ]
    return canonical_json(entries)


def decode_signatures(data: bytes) -> tuple[Signature, ...]:
    """Parse a signatures file; anything malformed or non-canonical is a `SignatureError`."""
    if len(data) > MAX_SMALL_FILE_BYTES:
        raise SignatureError("the signatures file is larger than 64 KiB; re-sign the bundle")
    try:
        entries = strict_json(data)
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_SIGNATURES:
            raise ValueError(f"expected a list of 1 to {MAX_SIGNATURES} signatures")
        signatures = tuple(_signature_from_json(entry) for entry in entries)
    except (ValueError, KeyFileError) as exc:
        raise SignatureError(f"the signatures file is malformed: {exc}; re-sign it") from exc
    if encode_signatures(signatures) != data:
        raise SignatureError("the signatures file is not in canonical form; re-sign it")
    return signatures


def _signature_from_json(entry: Any) -> Signature:
    if not isinstance(entry, dict) or set(entry) != {"key_id", "role", "signature"}:
        raise ValueError("each signature must have exactly key_id, role and signature")
    value = unb64(entry["signature"], "signature")
    if len(value) != _SIGNATURE_BYTES:
        raise ValueError(f"an Ed25519 signature is {_SIGNATURE_BYTES} bytes")
    return Signature(check_key_id(_text(entry["key_id"])), KeyRole(entry["role"]), value)


@dataclass(frozen=True)
class TrustStore:
    """Trusted public keys (each with one role) and revoked key ids; revocation wins."""

    keys: tuple[PublicKey, ...] = ()
    revoked: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        roles: dict[str, KeyRole] = {}
        for key in self.keys:
            if roles.setdefault(key.key_id, key.role) is not key.role:
                raise KeyFileError(
                    f"key {key.key_id} is listed with two roles; one key holds one role"
                )
        for key_id in self.revoked:
            check_key_id(key_id)

    @classmethod
    def from_files(cls, paths: Iterable[Path], revoked: Iterable[str] = ()) -> TrustStore:
        return cls(tuple(read_public_key(p) for p in paths), frozenset(revoked))

    @classmethod
    def from_directory(cls, directory: Path, revoked: Iterable[str] = ()) -> TrustStore:
        """Trust every `*.pub` file in `directory`."""
        return cls.from_files(sorted(directory.glob(f"*{PUBLIC_SUFFIX}")), revoked)

    def key(self, key_id: str) -> PublicKey | None:
        return next((k for k in self.keys if k.key_id == key_id), None)

    def with_key(self, key: PublicKey) -> TrustStore:
        if self.key(key.key_id) == key:
            return self
        return TrustStore((*self.keys, key), self.revoked)

    def with_revoked(self, key_id: str) -> TrustStore:
        return TrustStore(self.keys, self.revoked | {check_key_id(key_id)})

    def verify(self, message: bytes, signatures: Sequence[Signature], purpose: Purpose) -> str:
        """The id of a trusted, unrevoked key of the right role whose signature holds.

        With several signatures one good one suffices; otherwise the most serious failure is
        raised: a bad signature, then a revoked key, a wrong role, and an untrusted key.
        """
        if not signatures:
            raise SignatureError(f"the {purpose.label} carries no signature; sign it")
        failures: list[SignatureError] = []
        for signature in signatures:
            try:
                self._check(message, signature, purpose)
            except SignatureError as exc:
                failures.append(exc)
            else:
                return signature.key_id
        raise min(failures, key=_seriousness)

    def _check(self, message: bytes, signature: Signature, purpose: Purpose) -> None:
        key_id = signature.key_id
        if key_id in self.revoked:
            raise RevokedKeyError(
                f"signed by key {key_id}, which is revoked; re-sign with a current "
                f"{purpose.role.value!r} key"
            )
        key = self.key(key_id)
        if key is None:
            raise UntrustedKeyError(
                f"signed by key {key_id}, which is not trusted here; add its .pub file to the "
                f"trusted keys or re-sign with a trusted {purpose.role.value!r} key"
            )
        if key.role is not purpose.role or signature.role is not key.role:
            raise WrongRoleError(
                f"signed by key {key_id}, which holds role {key.role.value!r}, but a "
                f"{purpose.label} needs a {purpose.role.value!r} key; re-sign with one"
            )
        if not key.verifies(signature.value, purpose.message(message)):
            raise SignatureError(
                f"the signature by key {key_id} does not match the {purpose.label}: it was "
                f"altered after signing or signed for another purpose; rebuild and re-sign it"
            )


def _seriousness(exc: SignatureError) -> int:
    order = (RevokedKeyError, WrongRoleError, UntrustedKeyError)
    return next((i + 1 for i, kind in enumerate(order) if isinstance(exc, kind)), 0)


def write_key_files(key: SigningKey, directory: Path, name: str) -> tuple[Path, Path]:
    """Write `NAME.key` (mode 0600) and `NAME.pub` (0644) atomically; never overwrite."""
    private_path = directory / f"{name}{PRIVATE_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; choose another name or move it away")
    directory.mkdir(parents=True, exist_ok=True)
    public = key.public
    document = {"algorithm": ALGORITHM, "key_id": public.key_id, "role": key.role.value}
    public_doc = {**document, "public_key": b64(public.raw)}
    _write_new_file(private_path, {**public_doc, "private_key": b64(key.private_raw)}, 0o600)
    try:
        _write_new_file(public_path, public_doc, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def read_public_key(path: Path) -> PublicKey:
    """Load a `.pub` key file; a private key file is refused (pass the public half)."""
    document = _read_key_document(path, private=False)
    return PublicKey(KeyRole(document["role"]), unb64(document["public_key"], "public_key"))


def read_signing_key(path: Path) -> SigningKey:
    """Load a `.key` file and check its private and public halves match."""
    document = _read_key_document(path, private=True)
    key = SigningKey(KeyRole(document["role"]), unb64(document["private_key"], "private_key"))
    if key.public.raw != unb64(document["public_key"], "public_key"):
        raise KeyFileError(f"{path}: the private and public halves do not match; regenerate it")
    return key


def _read_key_document(path: Path, *, private: bool) -> dict[str, str]:
    expected = {"algorithm", "key_id", "role", "public_key"}
    if private:
        expected.add("private_key")
    try:
        document = strict_json(_read_small(path))
        if not isinstance(document, dict) or set(document) != expected:
            hint = "a private .key file" if private else "a public .pub file"
            raise ValueError(f"expected {hint} with fields {', '.join(sorted(expected))}")
        if document["algorithm"] != ALGORITHM:
            raise ValueError(f"algorithm is {document['algorithm']!r}, expected {ALGORITHM!r}")
        KeyRole(document["role"])
        public_raw = unb64(document["public_key"], "public_key")
        if len(public_raw) != _RAW_KEY_BYTES or document["key_id"] != key_id_for(public_raw):
            raise ValueError("key_id does not match the public key")
        return {k: _text(v) for k, v in document.items()}
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a usable key file: {exc}") from exc


def _read_small(path: Path) -> bytes:
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_SMALL_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}; check the path") from exc
    if len(data) > MAX_SMALL_FILE_BYTES:
        raise KeyFileError(f"{path} is larger than a key file can be; check the path")
    return data


def _write_new_file(path: Path, document: dict[str, str], mode: int) -> None:
    """Write to a temp file, fsync, then hard-link into place (which refuses to overwrite)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(canonical_json(document))
            stream.flush()
            os.fsync(stream.fileno())
        tmp.chmod(mode)
        os.link(tmp, path)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; choose another name or move it away") from exc
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value
