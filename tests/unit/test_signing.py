"""Ed25519 signing: purposes, roles, trust and revocation, signature files and key files."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest

from edge_bundle.errors import (
    KeyFileError,
    RevokedKeyError,
    SignatureError,
    UntrustedKeyError,
    WrongRoleError,
)
from edge_bundle.signing import (
    BUNDLE_MANIFEST,
    RELEASE_NOTICE,
    KeyRole,
    PublicKey,
    Purpose,
    Signature,
    SigningKey,
    TrustStore,
    decode_signatures,
    encode_signatures,
    key_id_for,
    read_public_key,
    read_signing_key,
    write_key_files,
)

MESSAGE = b'{"name": "m", "version": 1}\n'


@pytest.fixture(scope="module")
def bundle_key() -> SigningKey:
    return SigningKey.generate(KeyRole.BUNDLE)


@pytest.fixture(scope="module")
def release_key() -> SigningKey:
    return SigningKey.generate(KeyRole.RELEASE)


def test_key_id_is_prefix_of_sha256_of_raw_public_key(bundle_key: SigningKey) -> None:
    raw = bundle_key.public.raw
    assert len(raw) == 32
    assert bundle_key.key_id == hashlib.sha256(raw).hexdigest()[:16] == key_id_for(raw)


def test_good_signature_verifies(bundle_key: SigningKey) -> None:
    trust = TrustStore((bundle_key.public,))
    signature = bundle_key.sign(MESSAGE, BUNDLE_MANIFEST)
    assert signature.key_id == bundle_key.key_id
    assert trust.verify(MESSAGE, [signature], BUNDLE_MANIFEST) == bundle_key.key_id


def test_altered_message_fails(bundle_key: SigningKey) -> None:
    trust = TrustStore((bundle_key.public,))
    signature = bundle_key.sign(MESSAGE, BUNDLE_MANIFEST)
    with pytest.raises(SignatureError, match="does not match") as info:
        trust.verify(MESSAGE + b" ", [signature], BUNDLE_MANIFEST)
    assert type(info.value) is SignatureError


def test_signature_for_one_purpose_never_verifies_for_another(bundle_key: SigningKey) -> None:
    other = Purpose("bundle-index", KeyRole.BUNDLE)
    assert other.prefix != BUNDLE_MANIFEST.prefix
    assert BUNDLE_MANIFEST.prefix == b"lineside/v1/bundle/bundle-manifest\n"
    trust = TrustStore((bundle_key.public,))
    signature = bundle_key.sign(MESSAGE, BUNDLE_MANIFEST)
    with pytest.raises(SignatureError, match="another purpose"):
        trust.verify(MESSAGE, [signature], other)
    # Nor does a raw signature over the bare bytes, without the domain prefix.
    assert not bundle_key.public.verifies(signature.value, MESSAGE)


def test_untrusted_key_is_refused(bundle_key: SigningKey) -> None:
    stranger = SigningKey.generate(KeyRole.BUNDLE)
    trust = TrustStore((bundle_key.public,))
    with pytest.raises(UntrustedKeyError, match=stranger.key_id):
        trust.verify(MESSAGE, [stranger.sign(MESSAGE, BUNDLE_MANIFEST)], BUNDLE_MANIFEST)


def test_revocation_wins_over_trust(bundle_key: SigningKey) -> None:
    trust = TrustStore((bundle_key.public,)).with_revoked(bundle_key.key_id)
    with pytest.raises(RevokedKeyError, match="revoked"):
        trust.verify(MESSAGE, [bundle_key.sign(MESSAGE, BUNDLE_MANIFEST)], BUNDLE_MANIFEST)


def test_key_of_another_role_is_refused(release_key: SigningKey) -> None:
    trust = TrustStore((release_key.public,))
    notice_signature = release_key.sign(MESSAGE, RELEASE_NOTICE)
    assert trust.verify(MESSAGE, [notice_signature], RELEASE_NOTICE) == release_key.key_id
    forged = Signature(release_key.key_id, KeyRole.BUNDLE, notice_signature.value)
    for candidate in (notice_signature, forged):
        with pytest.raises(WrongRoleError, match="holds role 'release'"):
            trust.verify(MESSAGE, [candidate], BUNDLE_MANIFEST)


def test_trusted_key_listed_with_other_role_is_refused(bundle_key: SigningKey) -> None:
    as_release = TrustStore((PublicKey(KeyRole.RELEASE, bundle_key.public.raw),))
    with pytest.raises(WrongRoleError):
        as_release.verify(MESSAGE, [bundle_key.sign(MESSAGE, BUNDLE_MANIFEST)], BUNDLE_MANIFEST)


def test_a_key_signs_only_for_its_role(release_key: SigningKey) -> None:
    with pytest.raises(WrongRoleError, match="'bundle' key"):
        release_key.sign(MESSAGE, BUNDLE_MANIFEST)


def test_one_good_signature_among_several_suffices(bundle_key: SigningKey) -> None:
    stranger = SigningKey.generate(KeyRole.BUNDLE)
    trust = TrustStore((bundle_key.public,))
    signatures = [
        stranger.sign(MESSAGE, BUNDLE_MANIFEST),
        bundle_key.sign(MESSAGE, BUNDLE_MANIFEST),
    ]
    assert trust.verify(MESSAGE, signatures, BUNDLE_MANIFEST) == bundle_key.key_id


def test_most_serious_failure_is_reported(bundle_key: SigningKey) -> None:
    stranger = SigningKey.generate(KeyRole.BUNDLE)
    trust = TrustStore((bundle_key.public,))
    tampered = bundle_key.sign(MESSAGE + b"x", BUNDLE_MANIFEST)
    untrusted = stranger.sign(MESSAGE, BUNDLE_MANIFEST)
    with pytest.raises(SignatureError) as info:
        trust.verify(MESSAGE, [untrusted, tampered], BUNDLE_MANIFEST)
    assert type(info.value) is SignatureError
    with pytest.raises(SignatureError, match="carries no signature"):
        trust.verify(MESSAGE, [], BUNDLE_MANIFEST)


def test_trust_store_is_an_immutable_value(bundle_key: SigningKey) -> None:
    empty = TrustStore()
    grown = empty.with_key(bundle_key.public)
    assert empty.key(bundle_key.key_id) is None
    assert grown.key(bundle_key.key_id) == bundle_key.public
    assert grown.with_key(bundle_key.public) is grown
    revoked = grown.with_revoked(bundle_key.key_id)
    assert bundle_key.key_id not in grown.revoked
    assert bundle_key.key_id in revoked.revoked
    with pytest.raises(KeyFileError, match="two roles"):
        grown.with_key(PublicKey(KeyRole.ROOT, bundle_key.public.raw))
    with pytest.raises(KeyFileError, match="not a key id"):
        grown.with_revoked("ABC")


def test_signatures_file_round_trip(bundle_key: SigningKey, release_key: SigningKey) -> None:
    signatures = (
        bundle_key.sign(MESSAGE, BUNDLE_MANIFEST),
        release_key.sign(MESSAGE, RELEASE_NOTICE),
    )
    data = encode_signatures(signatures)
    assert decode_signatures(data) == signatures
    entries = json.loads(data)
    assert entries[0] == {
        "key_id": bundle_key.key_id,
        "role": "bundle",
        "signature": base64.b64encode(signatures[0].value).decode(),
    }


def _sig_file(**overrides: object) -> bytes:
    entry: dict[str, object] = {"key_id": "0" * 16, "role": "bundle"}
    entry["signature"] = base64.b64encode(bytes(64)).decode()
    entry.update(overrides)
    return (json.dumps([entry], sort_keys=True, indent=2) + "\n").encode()


def _non_canonical_b64() -> str:
    text = base64.b64encode(bytes(64)).decode()  # ends in "AA==": low bits of the last A unused
    return text[:-3] + "B=="


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{}",
        b"[]\n",
        b"not json",
        _sig_file(role="admin"),
        _sig_file(key_id="xyz"),
        _sig_file(signature="!!!"),
        _sig_file(signature=base64.b64encode(bytes(63)).decode()),
        _sig_file(signature=_non_canonical_b64()),
        _sig_file(extra=1),
        _sig_file().replace(b"\n", b"\r\n"),
        _sig_file().rstrip(b"\n"),
        b"\n" * 70000,
    ],
)
def test_malformed_signature_files_are_refused(data: bytes) -> None:
    with pytest.raises(SignatureError):
        decode_signatures(data)


def test_well_formed_sig_file_parses() -> None:
    assert decode_signatures(_sig_file())[0].value == bytes(64)


def test_key_files_round_trip_with_modes(tmp_path: Path, bundle_key: SigningKey) -> None:
    private_path, public_path = write_key_files(bundle_key, tmp_path / "keys", "ci")
    assert (private_path.name, public_path.name) == ("ci.key", "ci.pub")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    assert read_signing_key(private_path) == bundle_key
    assert read_public_key(public_path) == bundle_key.public
    document = json.loads(public_path.read_text())
    assert document == {
        "algorithm": "ed25519",
        "key_id": bundle_key.key_id,
        "role": "bundle",
        "public_key": base64.b64encode(bundle_key.public.raw).decode(),
    }
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["ci.key", "ci.pub"]


def test_private_bytes_never_in_repr(bundle_key: SigningKey) -> None:
    secret = base64.b64encode(bundle_key.private_raw).decode()
    assert secret not in repr(bundle_key)
    assert bundle_key.private_raw.hex() not in repr(bundle_key)


def test_key_files_are_never_overwritten(tmp_path: Path, bundle_key: SigningKey) -> None:
    write_key_files(bundle_key, tmp_path, "k")
    before = (tmp_path / "k.key").read_bytes()
    other = SigningKey.generate(KeyRole.BUNDLE)
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_files(other, tmp_path, "k")
    (tmp_path / "k.pub").unlink()
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_files(other, tmp_path, "k")
    assert (tmp_path / "k.key").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]


def _rewrite(path: Path, **changes: object) -> None:
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


def test_bad_key_files_are_refused(tmp_path: Path, bundle_key: SigningKey) -> None:
    private_path, public_path = write_key_files(bundle_key, tmp_path, "k")
    with pytest.raises(KeyFileError, match=r"public \.pub file"):
        read_public_key(private_path)
    other = SigningKey.generate(KeyRole.BUNDLE)
    _rewrite(private_path, public_key=base64.b64encode(other.public.raw).decode())
    with pytest.raises(KeyFileError, match="key_id does not match"):
        read_signing_key(private_path)
    _rewrite(private_path, key_id=other.key_id)
    with pytest.raises(KeyFileError, match="halves do not match"):
        read_signing_key(private_path)
    for changes in ({"algorithm": "rsa"}, {"role": "admin"}, {"key_id": "0" * 16}):
        fresh = tmp_path / f"{len(list(tmp_path.iterdir()))}.pub"
        fresh.write_bytes(public_path.read_bytes())
        _rewrite(fresh, **changes)
        with pytest.raises(KeyFileError):
            read_public_key(fresh)
    with pytest.raises(KeyFileError, match="cannot read"):
        read_public_key(tmp_path / "missing.pub")


def test_trust_store_from_directory(tmp_path: Path, bundle_key: SigningKey) -> None:
    release = SigningKey.generate(KeyRole.RELEASE)
    write_key_files(bundle_key, tmp_path, "bundle")
    write_key_files(release, tmp_path, "release")
    trust = TrustStore.from_directory(tmp_path, revoked=[release.key_id])
    assert {k.key_id for k in trust.keys} == {bundle_key.key_id, release.key_id}
    assert trust.revoked == frozenset({release.key_id})
    with pytest.raises(RevokedKeyError):
        trust.verify(MESSAGE, [release.sign(MESSAGE, RELEASE_NOTICE)], RELEASE_NOTICE)
