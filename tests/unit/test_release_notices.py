"""Release and trust notices: field rules, the signed envelope, every way a notice is refused,
and trust changes applied to a trust store."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edge_bundle.errors import (
    NoticeError,
    RevokedKeyError,
    SignatureError,
    UntrustedKeyError,
    WrongRoleError,
)
from edge_bundle.manifest import BundleId
from edge_bundle.release import (
    MAX_NOTICE_BYTES,
    TRUST_TOPIC,
    PublicKeyEntry,
    ReleaseNotice,
    Rollout,
    Target,
    TrustNotice,
    apply_trust,
    decode_notice,
    encode_notice,
    peek_notice,
    release_topic,
)
from edge_bundle.signing import (
    BUNDLE_MANIFEST,
    RELEASE_NOTICE,
    TRUST_NOTICE,
    KeyRole,
    Signature,
    SigningKey,
    TrustStore,
    encode_signatures,
)

ISSUED = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SHA = "0123456789abcdef" * 4


def release_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "sequence": 1_740_830_400_000,
        "issued_at": ISSUED,
        "expires_at": ISSUED + timedelta(days=30),
        "name": "weld",
        "version": 3,
        "bundle_sha256": SHA,
        "bundle_size": 123_456,
        "url": "https://models.plant.local/weld-3.bundle",
        "target": Target(group="line3"),
    }
    return {**fields, **changes}


def trust_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "sequence": 7,
        "issued_at": ISSUED,
        "expires_at": ISSUED + timedelta(days=365),
    }
    return {**fields, **changes}


def envelope(payload: bytes, *signatures: Signature) -> bytes:
    """An envelope around arbitrary bytes, for notices the encoder would refuse to make."""
    document = {
        "notice": base64.b64encode(payload).decode(),
        "signatures": json.loads(encode_signatures(signatures)),
    }
    return json.dumps(document).encode()


@pytest.fixture(scope="module")
def release_key() -> SigningKey:
    return SigningKey.generate(KeyRole.RELEASE)


@pytest.fixture(scope="module")
def root_key() -> SigningKey:
    return SigningKey.generate(KeyRole.ROOT)


@pytest.fixture(scope="module")
def bundle_key() -> SigningKey:
    return SigningKey.generate(KeyRole.BUNDLE)


@pytest.fixture(scope="module")
def trust(release_key: SigningKey, root_key: SigningKey, bundle_key: SigningKey) -> TrustStore:
    return TrustStore((release_key.public, root_key.public, bundle_key.public))


@pytest.fixture(scope="module")
def notice() -> ReleaseNotice:
    return ReleaseNotice.create(**release_fields(notes="fixes false 'crack' on shiny parts"))


# --- the envelope --------------------------------------------------------------------------


def test_release_round_trip(
    notice: ReleaseNotice, release_key: SigningKey, trust: TrustStore
) -> None:
    data = encode_notice(notice, release_key)
    decoded, signer = decode_notice(data, trust)
    assert decoded == notice
    assert signer == release_key.key_id
    assert str(decoded.bundle_id) == "weld@3"
    # Canonical and deterministic: the same notice and key always give the same bytes.
    assert encode_notice(notice, release_key) == data
    document = json.loads(data)
    assert set(document) == {"notice", "signatures"}
    assert base64.b64decode(document["notice"]) == notice.to_bytes()
    assert document["signatures"][0]["role"] == "release"


def test_notice_json_is_canonical_and_utc(notice: ReleaseNotice) -> None:
    document = json.loads(notice.to_bytes())
    assert list(document) == sorted(document)
    assert document["kind"] == "release"
    assert document["schema_version"] == 1
    assert document["issued_at"] == "2025-03-01T12:00:00Z"
    assert document["rollback"] is False


def test_tampered_payload_fails(
    notice: ReleaseNotice, release_key: SigningKey, trust: TrustStore
) -> None:
    document = json.loads(encode_notice(notice, release_key))
    payload = base64.b64decode(document["notice"]).replace(b'"version": 3', b'"version": 4')
    assert payload != notice.to_bytes()
    document["notice"] = base64.b64encode(payload).decode()
    with pytest.raises(SignatureError, match="does not match") as info:
        decode_notice(json.dumps(document).encode(), trust)
    assert type(info.value) is SignatureError


def test_tampered_signature_fails(
    notice: ReleaseNotice, release_key: SigningKey, trust: TrustStore
) -> None:
    document = json.loads(encode_notice(notice, release_key))
    value = bytearray(base64.b64decode(document["signatures"][0]["signature"]))
    value[10] ^= 1
    document["signatures"][0]["signature"] = base64.b64encode(bytes(value)).decode()
    with pytest.raises(SignatureError, match="does not match"):
        decode_notice(json.dumps(document).encode(), trust)


def test_untrusted_key_fails(notice: ReleaseNotice, release_key: SigningKey) -> None:
    with pytest.raises(UntrustedKeyError, match="not trusted"):
        decode_notice(encode_notice(notice, release_key), TrustStore())


def test_revoked_key_fails(notice: ReleaseNotice, release_key: SigningKey) -> None:
    revoked = TrustStore((release_key.public,), frozenset({release_key.key_id}))
    with pytest.raises(RevokedKeyError, match="revoked"):
        decode_notice(encode_notice(notice, release_key), revoked)


def test_a_bundle_key_cannot_sign_a_release(
    notice: ReleaseNotice, bundle_key: SigningKey, trust: TrustStore
) -> None:
    with pytest.raises(WrongRoleError, match="'release' key"):
        encode_notice(notice, bundle_key)
    # Forged by hand: a trusted bundle key's signature over the notice is still refused.
    data = envelope(notice.to_bytes(), bundle_key.sign(notice.to_bytes(), BUNDLE_MANIFEST))
    with pytest.raises(WrongRoleError, match="holds role 'bundle'"):
        decode_notice(data, trust)


def test_a_root_key_cannot_pass_off_a_release_as_a_trust_notice(
    notice: ReleaseNotice, root_key: SigningKey, trust: TrustStore
) -> None:
    """The kind is inside the signed bytes: a root signature verifies as a trust notice, but the
    payload says release, which needs a release key."""
    data = envelope(notice.to_bytes(), root_key.sign(notice.to_bytes(), TRUST_NOTICE))
    with pytest.raises(WrongRoleError, match="must be signed by a 'release' key"):
        decode_notice(data, trust)


def test_a_release_key_cannot_sign_a_trust_notice(
    release_key: SigningKey, root_key: SigningKey, trust: TrustStore
) -> None:
    change = TrustNotice.create(**trust_fields(revoke=("0123456789abcdef",)))
    with pytest.raises(WrongRoleError):
        encode_notice(change, release_key)
    data = envelope(change.to_bytes(), release_key.sign(change.to_bytes(), RELEASE_NOTICE))
    with pytest.raises(WrongRoleError, match="must be signed by a 'root' key"):
        decode_notice(data, trust)
    # With a root signature beside the release one, the notice is accepted as the root's.
    both = envelope(
        change.to_bytes(),
        release_key.sign(change.to_bytes(), RELEASE_NOTICE),
        root_key.sign(change.to_bytes(), TRUST_NOTICE),
    )
    assert decode_notice(both, trust) == (change, root_key.key_id)


def test_expiry_is_not_checked_here(release_key: SigningKey, trust: TrustStore) -> None:
    old = ReleaseNotice.create(
        **release_fields(
            issued_at=datetime(2020, 1, 1, tzinfo=UTC), expires_at=datetime(2020, 1, 2, tzinfo=UTC)
        )
    )
    assert decode_notice(encode_notice(old, release_key), trust)[0] == old


def test_oversize_notice_is_refused_before_parsing(trust: TrustStore) -> None:
    with pytest.raises(NoticeError, match="over the 65536-byte cap"):
        decode_notice(b" " * (MAX_NOTICE_BYTES + 1), trust)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "malformed .*utf-8"),
        (b"[]", "exactly 'notice' and 'signatures'"),
        (b'{"notice": "", "signatures": [], "extra": 1}', "exactly 'notice' and 'signatures'"),
        (b'{"notice": "e30", "signatures": []}', "base64"),
        (b'{"notice": 5, "signatures": []}', "base64 string"),
        (b"[" * 30_000 + b"]" * 30_000, "malformed"),
    ],
)
def test_malformed_envelopes_are_refused(data: bytes, reason: str, trust: TrustStore) -> None:
    with pytest.raises(NoticeError, match=reason):
        decode_notice(data, trust)


def test_malformed_signature_list_is_a_signature_error(
    notice: ReleaseNotice, trust: TrustStore
) -> None:
    document = {"notice": base64.b64encode(notice.to_bytes()).decode(), "signatures": [{}]}
    with pytest.raises(SignatureError, match="malformed"):
        decode_notice(json.dumps(document).encode(), trust)


def test_duplicate_keys_are_refused(
    notice: ReleaseNotice, release_key: SigningKey, trust: TrustStore
) -> None:
    data = encode_notice(notice, release_key)
    doubled = data.replace(b'"notice":', b'"notice": "x", "notice":', 1)
    with pytest.raises(NoticeError, match="duplicate keys"):
        decode_notice(doubled, trust)
    # Inside the signed bytes too: two parsers could read two different versions.
    payload = notice.to_bytes().replace(b'"version": 3', b'"version": 3, "version": 9')
    signed = envelope(payload, release_key.sign(payload, RELEASE_NOTICE))
    with pytest.raises(NoticeError, match="duplicate keys"):
        decode_notice(signed, trust)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"schema_version": 3}, "newer than this code understands"),
        ({"kind": "firmware"}, "kind 'firmware'"),
        ({"version": "3"}, "version"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_signed_but_invalid_notices_are_refused(
    notice: ReleaseNotice,
    release_key: SigningKey,
    trust: TrustStore,
    changes: dict[str, Any],
    reason: str,
) -> None:
    payload = json.dumps({**json.loads(notice.to_bytes()), **changes}).encode()
    with pytest.raises(NoticeError, match=reason):
        decode_notice(envelope(payload, release_key.sign(payload, RELEASE_NOTICE)), trust)


# --- field rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"version": 0}, "version"),
        ({"version": True}, "version"),
        ({"sequence": 0}, "sequence"),
        ({"sequence": 2**63}, "sequence"),
        ({"bundle_size": 0}, "bundle_size"),
        ({"bundle_sha256": SHA.upper()}, "bundle_sha256"),
        ({"bundle_sha256": SHA[:-1]}, "bundle_sha256"),
        ({"name": "Weld Line"}, "name"),
        ({"url": "ftp://models/weld-3.bundle"}, "http:// or https://"),
        ({"url": "file:///srv/weld-3.bundle"}, "http:// or https://"),
        ({"url": "https:///weld-3.bundle"}, "with a host"),
        ({"url": "https://ci:hunter2@models/weld-3.bundle"}, "password"),
        ({"url": "https://models/weld 3.bundle"}, "spaces"),
        ({"url": "https://models/" + "a" * 2048}, "2048"),
        ({"issued_at": datetime(2025, 3, 1)}, "timezone"),
        ({"expires_at": ISSUED}, "after issued_at"),
        ({"expires_at": ISSUED + timedelta(days=367)}, "at most 366 days"),
        ({"notes": "n" * 2001}, "notes"),
        ({"rollback": "yes"}, "rollback"),
        ({"schema_version": 3}, "schema_version"),
        ({"schema_version": 0}, "schema_version"),
        ({"signed_by": "me"}, "signed_by"),
    ],
)
def test_release_field_rules(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(NoticeError, match=reason):
        ReleaseNotice.create(**release_fields(**changes))


def test_a_year_of_validity_and_rollback_are_allowed() -> None:
    notice = ReleaseNotice.create(
        **release_fields(expires_at=ISSUED + timedelta(days=366), rollback=True)
    )
    assert notice.rollback is True


@pytest.mark.parametrize(
    ("fields", "topic"),
    [
        ({"group": "line3"}, "lineside/v1/fleet/line3/release"),
        ({"group": "Line_3.a-b"}, "lineside/v1/fleet/Line_3.a-b/release"),
        ({"device": "plant/box1"}, "lineside/v1/plant/box1/release"),
        ({"device": "site.a/box_1-2"}, "lineside/v1/site.a/box_1-2/release"),
    ],
)
def test_release_topics(fields: dict[str, str], topic: str) -> None:
    assert release_topic(Target.create(**fields)) == topic


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"group": "line3", "device": "plant/box1"},
        {"group": "line/3"},
        {"group": "+"},
        {"group": "#"},
        {"group": ".hidden"},
        {"group": "g" * 65},
        {"group": ""},
        {"device": "box1"},
        {"device": "plant/line/box1"},
        {"device": "plant/+"},
        {"device": "plant/"},
        {"device": "../box1"},
    ],
)
def test_target_rules(fields: dict[str, str]) -> None:
    with pytest.raises(NoticeError, match=r"group|device"):
        Target.create(**fields)


def test_trust_topic() -> None:
    assert TRUST_TOPIC == "lineside/v1/fleet/trust"


# --- trust notices -------------------------------------------------------------------------


def test_trust_notice_round_trip_and_apply(
    root_key: SigningKey, release_key: SigningKey, notice: ReleaseNotice
) -> None:
    new_release = SigningKey.generate(KeyRole.RELEASE)
    new_root = SigningKey.generate(KeyRole.ROOT)
    change = TrustNotice.create(
        **trust_fields(
            add=(PublicKeyEntry.of(new_release.public), PublicKeyEntry.of(new_root.public)),
            revoke=(release_key.key_id,),
            notes="rotate the CI release key",
        )
    )
    store = TrustStore((root_key.public, release_key.public))
    decoded, signer = decode_notice(encode_notice(change, root_key), store)
    assert decoded == change and signer == root_key.key_id
    assert isinstance(decoded, TrustNotice)
    updated = apply_trust(store, decoded, signer_key_id=signer)
    assert updated.key(new_release.key_id) == new_release.public
    assert updated.key(new_root.key_id) == new_root.public
    assert release_key.key_id in updated.revoked
    # The old release key is now refused, the new one accepted; the input store is unchanged.
    with pytest.raises(RevokedKeyError):
        decode_notice(encode_notice(notice, release_key), updated)
    assert decode_notice(encode_notice(notice, new_release), updated)[1] == new_release.key_id
    assert release_key.key_id not in store.revoked
    # The new root key may sign the next trust notice.
    follow_up = TrustNotice.create(**trust_fields(sequence=8, revoke=(root_key.key_id,)))
    decoded, signer = decode_notice(encode_notice(follow_up, new_root), updated)
    assert root_key.key_id in apply_trust(updated, decoded, signer_key_id=signer).revoked  # type: ignore[arg-type]


def test_a_root_key_cannot_revoke_itself(root_key: SigningKey) -> None:
    change = TrustNotice.create(**trust_fields(revoke=(root_key.key_id,)))
    with pytest.raises(NoticeError, match="cannot revoke itself"):
        encode_notice(change, root_key)
    # Made by hand, it verifies, but applying it is refused.
    store = TrustStore((root_key.public,))
    data = envelope(change.to_bytes(), root_key.sign(change.to_bytes(), TRUST_NOTICE))
    decoded, signer = decode_notice(data, store)
    with pytest.raises(NoticeError, match="cannot revoke itself"):
        apply_trust(store, decoded, signer_key_id=signer)  # type: ignore[arg-type]


def test_apply_trust_needs_a_trusted_root_signer(
    root_key: SigningKey, release_key: SigningKey
) -> None:
    change = TrustNotice.create(**trust_fields(add=(PublicKeyEntry.of(root_key.public),)))
    store = TrustStore((release_key.public,))
    for signer in (release_key.key_id, root_key.key_id):
        with pytest.raises(NoticeError, match="not a trusted, unrevoked root key"):
            apply_trust(store, change, signer_key_id=signer)
    revoked_root = TrustStore((root_key.public,), frozenset({root_key.key_id}))
    with pytest.raises(NoticeError, match="not a trusted, unrevoked root key"):
        apply_trust(revoked_root, change, signer_key_id=root_key.key_id)


def test_apply_trust_never_reinstates_a_revoked_key_or_changes_a_role(
    root_key: SigningKey, release_key: SigningKey
) -> None:
    store = TrustStore((root_key.public, release_key.public), frozenset({release_key.key_id}))
    readd = TrustNotice.create(**trust_fields(add=(PublicKeyEntry.of(release_key.public),)))
    with pytest.raises(NoticeError, match="revocation is permanent"):
        apply_trust(store, readd, signer_key_id=root_key.key_id)
    other = SigningKey.generate(KeyRole.BUNDLE)
    as_release = SigningKey(KeyRole.RELEASE, other.private_raw)
    store = TrustStore((root_key.public, other.public))
    change = TrustNotice.create(**trust_fields(add=(PublicKeyEntry.of(as_release.public),)))
    with pytest.raises(NoticeError, match="one key holds one role"):
        apply_trust(store, change, signer_key_id=root_key.key_id)
    # Adding a key that is already trusted with the same role changes nothing.
    same = TrustNotice.create(**trust_fields(add=(PublicKeyEntry.of(other.public),)))
    assert apply_trust(store, same, signer_key_id=root_key.key_id) == store


def test_trust_notice_field_rules(release_key: SigningKey) -> None:
    entry = PublicKeyEntry.of(release_key.public)
    key_id, raw = release_key.key_id, release_key.public.raw
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "add or revoke at least one key"),
        ({"add": (entry, entry)}, "only once"),
        ({"revoke": (key_id, key_id)}, "only once"),
        ({"add": (entry,), "revoke": (key_id,)}, "both added and revoked"),
        ({"revoke": ("NOT-A-KEY-ID",)}, "revoke"),
        ({"revoke": tuple(f"{i:016x}" for i in range(65))}, "at most 64"),
    ]
    for changes, reason in cases:
        with pytest.raises(NoticeError, match=reason):
            TrustNotice.create(**trust_fields(**changes))
    bad_entries: list[tuple[dict[str, Any], str]] = [
        ({"key_id": "0" * 16}, "not the id of this public key"),
        ({"public_key": base64.b64encode(raw[:31]).decode()}, "32 bytes"),
        ({"public_key": base64.b64encode(raw).decode().rstrip("=")}, "base64"),
        ({"role": "admin"}, "role"),
    ]
    for changes, reason in bad_entries:
        fields = {"key_id": key_id, "role": KeyRole.RELEASE, "public_key": entry.public_key}
        with pytest.raises(NoticeError, match=reason):
            PublicKeyEntry.create(**{**fields, **changes})


def test_peek_reads_what_a_notice_claims_without_trusting_it(
    notice: ReleaseNotice, release_key: SigningKey
) -> None:
    seen = peek_notice(encode_notice(notice, release_key))
    assert seen == {
        "kind": "release",
        "name": "weld",
        "sequence": notice.sequence,
        "version": 3,
        "target": {k: v for k, v in notice.target.model_dump().items() if v is not None},
    }
    for junk in (b"", b"{", b"[" * 100_000, b'{"notice": "!!", "signatures": []}'):
        assert peek_notice(junk) == {}


# --- schema version 2: rollout and extensions ----------------------------------------------


def v2_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "schema_version": 2,
        "target": Target(device="plant-a/box1"),
        "rollout": Rollout(id="defects-4", wave=2),
        "extensions": {"canary": True, "hold": {"minutes": 15, "why": ["soak", 1.5, None]}},
    }
    return release_fields(**{**fields, **changes})


def test_v2_round_trip_keeps_rollout_and_extensions(
    release_key: SigningKey, trust: TrustStore
) -> None:
    notice = ReleaseNotice.create(**v2_fields())
    data = encode_notice(notice, release_key)
    decoded, _ = decode_notice(data, trust)
    assert decoded == notice
    assert isinstance(decoded, ReleaseNotice)
    assert decoded.schema_version == 2
    assert decoded.rollout == Rollout(id="defects-4", wave=2)
    assert decoded.extensions == {
        "canary": True,
        "hold": {"minutes": 15, "why": ["soak", 1.5, None]},
    }
    # Ed25519 is deterministic: the same notice and key give byte-identical envelopes, which is
    # what lets a controller re-publish a stored notice after a crash and a box tell it is the same.
    again = ReleaseNotice.create(**v2_fields())
    assert encode_notice(again, release_key) == data
    assert json.loads(decoded.to_bytes())["rollout"] == {"id": "defects-4", "wave": 2}


def test_v1_bytes_never_mention_the_v2_fields(notice: ReleaseNotice) -> None:
    # Agents before 0.2.0 refuse unknown fields, even null ones.
    document = json.loads(notice.to_bytes())
    assert document["schema_version"] == 1
    assert "rollout" not in document
    assert "extensions" not in document
    plain_v2 = ReleaseNotice.create(**release_fields(schema_version=2))
    assert set(json.loads(plain_v2.to_bytes())) == set(document)


@pytest.mark.parametrize("field", ["rollout", "extensions"])
def test_a_v1_notice_may_carry_no_v2_field(field: str) -> None:
    fields = v2_fields(schema_version=1)
    del fields["rollout" if field == "extensions" else "extensions"]
    with pytest.raises(NoticeError, match=f"{field} needs schema_version 2"):
        ReleaseNotice.create(**fields)


def test_a_signed_v1_notice_with_a_rollout_is_refused(
    notice: ReleaseNotice, release_key: SigningKey, trust: TrustStore
) -> None:
    payload = json.dumps(
        {**json.loads(notice.to_bytes()), "rollout": {"id": "r1", "wave": 1}}
    ).encode()
    with pytest.raises(NoticeError, match="rollout needs schema_version 2"):
        decode_notice(envelope(payload, release_key.sign(payload, RELEASE_NOTICE)), trust)


def test_unknown_extension_keys_are_kept_and_ignored(
    release_key: SigningKey, trust: TrustStore
) -> None:
    # What a later controller might send: fields this agent has never heard of, still signed.
    document = json.loads(ReleaseNotice.create(**v2_fields()).to_bytes())
    document["extensions"] = {"future.field": {"deep": [1, 2, {"x": "y"}]}, "n": 7}
    payload = json.dumps(document).encode()
    decoded, _ = decode_notice(envelope(payload, release_key.sign(payload, RELEASE_NOTICE)), trust)
    assert isinstance(decoded, ReleaseNotice)
    assert decoded.extensions == {"future.field": {"deep": [1, 2, {"x": "y"}]}, "n": 7}
    assert decoded.bundle_id == BundleId("weld", 3)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"rollout": {"id": "bad id", "wave": 1}}, "rollout.id"),
        ({"rollout": {"id": "r1", "wave": 0}}, "rollout.wave"),
        ({"rollout": {"id": "r1", "wave": 100_001}}, "rollout.wave"),
        ({"rollout": {"id": "r1", "wave": 1, "extra": 1}}, "rollout.extra"),
        ({"extensions": {"has space": 1}}, "has space"),
        ({"extensions": {"k" * 65: 1}}, "extensions"),
        ({"extensions": ["not", "an", "object"]}, "extensions"),
        ({"extensions": {"x": float("inf")}}, "finite"),
    ],
)
def test_v2_field_rules(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(NoticeError, match=reason):
        ReleaseNotice.create(**v2_fields(**changes))


def test_a_non_finite_number_in_signed_extensions_is_refused(
    release_key: SigningKey, trust: TrustStore
) -> None:
    document = json.loads(ReleaseNotice.create(**v2_fields()).to_bytes())
    payload = json.dumps(document).encode().replace(b'"minutes": 15', b'"minutes": NaN')
    with pytest.raises(NoticeError, match="finite"):
        decode_notice(envelope(payload, release_key.sign(payload, RELEASE_NOTICE)), trust)


def test_schema_version_3_asks_for_an_upgrade(
    notice: ReleaseNotice, release_key: SigningKey, trust: TrustStore
) -> None:
    payload = json.dumps({**json.loads(notice.to_bytes()), "schema_version": 3}).encode()
    with pytest.raises(NoticeError, match=r"schema_version 3 is newer .*\(2\); upgrade the agent"):
        decode_notice(envelope(payload, release_key.sign(payload, RELEASE_NOTICE)), trust)


def test_trust_notices_stay_version_1(root_key: SigningKey, release_key: SigningKey) -> None:
    entry = PublicKeyEntry.of(release_key.public)
    with pytest.raises(NoticeError, match="schema_version"):
        TrustNotice.create(**trust_fields(add=(entry,), schema_version=2))


def test_peek_reads_a_claimed_rollout(release_key: SigningKey) -> None:
    seen = peek_notice(encode_notice(ReleaseNotice.create(**v2_fields()), release_key))
    assert seen["rollout"] == {"id": "defects-4", "wave": 2}


# ---- critical extensions and the shadow extension -----------------------------------------
def test_a_shadow_notice_names_its_critical_extension(
    release_key: SigningKey, trust: TrustStore
) -> None:
    extensions = {"critical": ["shadow"], "shadow": {"max_s": 600}}
    notice = ReleaseNotice.create(**release_fields(schema_version=2, extensions=extensions))
    decoded, _ = decode_notice(encode_notice(notice, release_key), trust)
    assert isinstance(decoded, ReleaseNotice)
    assert decoded.critical == ("shadow",)
    assert decoded.shadow is not None and decoded.shadow.max_s == 600.0
    assert decoded.unknown_critical(frozenset({"shadow"})) == ()
    assert decoded.unknown_critical(frozenset()) == ("shadow",)


@pytest.mark.parametrize(
    ("extensions", "reason"),
    [
        ({"critical": ["quorum"]}, "extensions.critical names 'quorum'"),
        ({"critical": "shadow", "shadow": {"max_s": 1}}, "list of distinct extension names"),
        ({"critical": ["shadow", "shadow"], "shadow": {"max_s": 1}}, "distinct"),
        ({"shadow": {"max_s": 0}}, "extensions.shadow: max_s"),
        ({"shadow": {"max_s": 1, "min_s": 0}}, "extensions.shadow: min_s"),
        ({"shadow": 5}, 'must be an object like {"max_s": 600}'),
    ],
)
def test_critical_and_shadow_extension_rules(extensions: dict[str, Any], reason: str) -> None:
    with pytest.raises(NoticeError, match="invalid ReleaseNotice") as caught:
        ReleaseNotice.create(**release_fields(schema_version=2, extensions=extensions))
    assert reason in str(caught.value)


def test_a_shadow_notice_cannot_be_a_rollback() -> None:
    extensions = {"critical": ["shadow"], "shadow": {"max_s": 60}}
    with pytest.raises(NoticeError, match="cannot be a rollback"):
        ReleaseNotice.create(
            **release_fields(schema_version=2, extensions=extensions, rollback=True)
        )
