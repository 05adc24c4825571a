"""Signed release and trust notices: their schema, their signed envelope, and their topics.

A release notice tells one group of devices, or one device, that a bundle is available at a URL,
pinned by sha256 and size. A trust notice adds or revokes public keys and is signed by a root key.
Release notices come in two schema versions: version 1 (what `model-packager publish` writes, and
all that agents before 0.2.0 accept) and version 2, which adds the optional signed fields
`rollout` (which fleet rollout and wave sent it, echoed in the device's update reports) and
`extensions` (further signed fields; a reader keeps the keys it does not know and ignores them,
so later additions need no version 3). Because a reader ignores what it does not know, an
extension a reader must understand is named in `extensions.critical`: a reader refuses a notice
whose critical list names an extension it does not know (`unknown_critical`). The one such
extension so far is `shadow` (`{"max_s": N}`: install the version without activating it and shadow
the active model with it for at most N seconds; agents from 0.3.0). The second is `mqtt_chunks`
(`edge_bundle.chunks`: the bundle is fetched in chunks over MQTT, every chunk checked against a
signed manifest digest; agents from 0.4.0): a notice that carries it may leave out `url`, and must
then name it critical. Trust notices stay version 1.
Both travel as one envelope, `{"notice": "<base64 of the notice bytes>", "signatures": [...]}`:
the signatures cover the exact notice bytes, and `decode_notice` verifies them before it parses a
single field, so a stolen broker password is never enough to steer a device. Whether a notice has
expired, and whether its sequence and version are new, is the device's decision (the updater's
state machine); this module checks only that a notice is well formed and properly signed.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Final, Literal, Self, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
    model_validator,
)

from edge_bundle.chunks import MQTT_CHUNKS_EXTENSION, ChunkedDelivery
from edge_bundle.encoding import b64, canonical_json, strict_json, unb64
from edge_bundle.errors import (
    BundleError,
    NoticeError,
    RevokedKeyError,
    SignatureError,
    UntrustedKeyError,
    WrongRoleError,
)
from edge_bundle.manifest import BundleId, Name, Sha256Hex
from edge_bundle.signing import (
    KEY_ID_CHARS,
    RELEASE_NOTICE,
    TRUST_NOTICE,
    KeyRole,
    PublicKey,
    Purpose,
    Signature,
    SigningKey,
    TrustStore,
    decode_signatures,
    encode_signatures,
    key_id_for,
)

#: The schema version new notices get unless told otherwise: every agent reads it.
SCHEMA_VERSION: Final = 1
#: The newest release notice schema this code reads (agents from 0.2.0); trust notices stay 1.
NEWEST_SCHEMA_VERSION: Final = 2
MAX_WAVE = 100_000
MAX_NOTICE_BYTES = 64 * 1024
# "At most a year": 366 days, so a notice issued on 29 February may still run a full year.
MAX_VALIDITY = timedelta(days=366)
MAX_URL_CHARS = 2048
MAX_NOTES_CHARS = 2000
MAX_KEY_CHANGES = 64
#: `extensions.critical`: the extensions a reader must understand to act on the notice.
CRITICAL_EXTENSIONS: Final = "critical"
#: `extensions.shadow`: install without activating and shadow the active model (agent >= 0.3.0).
SHADOW_EXTENSION: Final = "shadow"
MAX_SHADOW_S = 7 * 24 * 3600
# Devices keep sequences in SQLite, whose integers are signed 64-bit.
MAX_SEQUENCE = 2**63 - 1
SEGMENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TRUST_TOPIC = "lineside/v1/fleet/trust"
_SEGMENT = re.compile(SEGMENT_PATTERN)
_RAW_PUBLIC_KEY_BYTES = 32


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("needs a timezone; give it in UTC, e.g. 2025-01-31T12:00:00Z")
    return value.astimezone(UTC)


def _url(value: str) -> str:
    scheme, _, rest = value.partition("://")
    if scheme not in ("http", "https") or not rest or rest[0] in "/?#":
        raise ValueError(
            "must be an http:// or https:// URL with a host, e.g. https://host/m.bundle"
        )
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("must not contain spaces or control characters; percent-encode them")
    if "@" in rest.split("/", 1)[0]:
        # The notice is retained on the broker and read by every device: no secrets in it.
        raise ValueError("must not carry a user name or password; every device can read it")
    return value


_SEGMENT_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"


def _segment(value: str) -> str:
    if _SEGMENT.fullmatch(value) is None:
        raise ValueError(f"{value!r} must be {_SEGMENT_RULE}")
    return value


def _device(value: str) -> str:
    parts = value.split("/")
    if len(parts) != 2 or not all(_SEGMENT.fullmatch(part) for part in parts):
        raise ValueError(f"{value!r} must be SITE/DEVICE, each {_SEGMENT_RULE}")
    return value


def _public_key(value: str) -> str:
    if len(unb64(value, "public_key")) != _RAW_PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {_RAW_PUBLIC_KEY_BYTES} bytes")
    return value


def _finite(value: JsonValue) -> JsonValue:
    """Refuse NaN and infinities anywhere in a JSON value: JSON has no spelling for them."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("must hold only finite numbers (JSON has no NaN or Infinity)")
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return value


Segment = Annotated[str, StringConstraints(max_length=64), AfterValidator(_segment)]
DeviceRef = Annotated[str, StringConstraints(max_length=129), AfterValidator(_device)]
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
Url = Annotated[str, StringConstraints(max_length=MAX_URL_CHARS), AfterValidator(_url)]
Notes = Annotated[str, StringConstraints(max_length=MAX_NOTES_CHARS)]
SequenceNumber = Annotated[StrictInt, Field(ge=1, le=MAX_SEQUENCE)]
KeyId = Annotated[str, StringConstraints(pattern=rf"^[0-9a-f]{{{KEY_ID_CHARS}}}$")]
Base64Key = Annotated[str, StringConstraints(max_length=64), AfterValidator(_public_key)]
FiniteJson = Annotated[JsonValue, AfterValidator(_finite)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @classmethod
    def create(cls, **fields: Any) -> Self:
        """Build from Python values; any field problem is a `NoticeError` in one line."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise NoticeError(f"invalid {cls.__name__}: {_describe(exc)}") from exc


class Target(_Strict):
    """Who a release is for: exactly one of a fleet group or one device (`SITE/DEVICE`)."""

    group: Segment | None = None
    device: DeviceRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.group is None) == (self.device is None):
            raise ValueError("give exactly one of group or device (SITE/DEVICE)")
        return self


class Rollout(_Strict):
    """Which fleet rollout, and which of its waves, a release notice belongs to."""

    id: Segment
    wave: Annotated[StrictInt, Field(ge=1, le=MAX_WAVE)]


class ShadowExtension(_Strict):
    """`extensions.shadow`: shadow the active model with this version for at most `max_s`."""

    max_s: Annotated[float, Field(gt=0, le=MAX_SHADOW_S)]

    @classmethod
    def parse(cls, value: Any) -> ShadowExtension:
        if not isinstance(value, dict):
            raise ValueError(
                f'extensions.shadow must be an object like {{"max_s": 600}}, not {value!r}'
            )
        try:
            # Strict types, but an integer number of seconds is a number too.
            fields = {k: float(v) if type(v) is int else v for k, v in value.items()}
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise ValueError(f"extensions.shadow: {_describe(exc)}") from exc


class _Notice(_Strict):
    """What every notice carries: schema version, sequence and its window of validity."""

    #: Fields left out of the signed bytes while they are None, so that a notice without them
    #: is byte for byte what a reader that never heard of them expects.
    _OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ()

    sequence: SequenceNumber
    issued_at: UtcDatetime
    expires_at: UtcDatetime

    @model_validator(mode="after")
    def _check_window(self) -> Self:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        if self.expires_at - self.issued_at > MAX_VALIDITY:
            raise ValueError(f"a notice may be valid for at most {MAX_VALIDITY.days} days")
        return self

    def to_bytes(self) -> bytes:
        """The canonical JSON of this notice (sorted keys, UTF-8, indent 2, final newline)."""
        document = self.model_dump(mode="json")
        for field in self._OMITTED_WHEN_NONE:
            if document.get(field) is None:
                document.pop(field, None)
        return canonical_json(document)


class ReleaseNotice(_Notice):
    """A signed statement that bundle `name@version` (this sha256, this size) is at `url`.

    Schema version 2 may also carry `rollout` and `extensions`; version 1 may carry neither.
    """

    _OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ("rollout", "extensions", "url")

    schema_version: Literal[1, 2] = SCHEMA_VERSION
    kind: Literal["release"] = "release"
    name: Name
    version: Annotated[StrictInt, Field(ge=1)]
    bundle_sha256: Sha256Hex
    bundle_size: Annotated[StrictInt, Field(gt=0)]
    # None only with the critical `mqtt_chunks` extension: the bundle comes over MQTT alone.
    url: Url | None = None
    target: Target
    # A signed permission to install an older version than the one running.
    rollback: StrictBool = False
    notes: Notes | None = None
    # Schema version 2.
    rollout: Rollout | None = None
    extensions: dict[Segment, FiniteJson] | None = None

    @model_validator(mode="after")
    def _fields_of_the_version(self) -> Self:
        if self.schema_version == 1:
            given = [f for f in ("rollout", "extensions") if getattr(self, f) is not None]
            if given:
                raise ValueError(
                    f"{' and '.join(given)} needs schema_version 2 (this notice says "
                    f"{self.schema_version}); publish it as version 2, which agents from 0.2.0 read"
                )
        extensions = self.extensions or {}
        critical = extensions.get(CRITICAL_EXTENSIONS)
        if critical is not None:
            if (
                not isinstance(critical, list)
                or not all(isinstance(n, str) and _SEGMENT.fullmatch(n) for n in critical)
                or len(set(critical)) != len(critical)
            ):
                raise ValueError(
                    "extensions.critical must be a list of distinct extension names, "
                    f'e.g. ["shadow"] ({critical!r} is not)'
                )
            absent = [n for n in critical if n not in extensions or n == CRITICAL_EXTENSIONS]
            if absent:
                raise ValueError(
                    f"extensions.critical names {absent[0]!r}, which this notice's extensions "
                    "do not carry; add it or leave it out of the critical list"
                )
        if MQTT_CHUNKS_EXTENSION in extensions:
            ChunkedDelivery.parse(extensions[MQTT_CHUNKS_EXTENSION], bundle_size=self.bundle_size)
        if self.url is None and (
            MQTT_CHUNKS_EXTENSION not in extensions or MQTT_CHUNKS_EXTENSION not in self.critical
        ):
            raise ValueError(
                "url is required unless the notice is delivered over MQTT: give a url, or "
                f"extensions.{MQTT_CHUNKS_EXTENSION} named in extensions.critical"
            )
        if SHADOW_EXTENSION in extensions:
            ShadowExtension.parse(extensions[SHADOW_EXTENSION])
            if self.rollback:
                raise ValueError(
                    "a shadow notice cannot be a rollback: a rollback is activated at once"
                )
        return self

    @property
    def critical(self) -> tuple[str, ...]:
        """The extensions a reader must understand to act on this notice."""
        names = (self.extensions or {}).get(CRITICAL_EXTENSIONS)
        return tuple(str(n) for n in names) if isinstance(names, list) else ()

    @property
    def shadow(self) -> ShadowExtension | None:
        """The shadow extension, when the notice asks to shadow rather than activate."""
        value = (self.extensions or {}).get(SHADOW_EXTENSION)
        return ShadowExtension.parse(value) if value is not None else None

    @property
    def chunked(self) -> ChunkedDelivery | None:
        """How to fetch the bundle in chunks over MQTT, when the notice offers that."""
        value = (self.extensions or {}).get(MQTT_CHUNKS_EXTENSION)
        return ChunkedDelivery.parse(value) if value is not None else None

    def unknown_critical(self, understood: frozenset[str]) -> tuple[str, ...]:
        """The critical extensions a reader that understands `understood` does not know."""
        return tuple(name for name in self.critical if name not in understood)

    @property
    def bundle_id(self) -> BundleId:
        return BundleId(self.name, self.version)


class PublicKeyEntry(_Strict):
    """A public key a trust notice adds: its id, its role, and the raw key in base64."""

    key_id: KeyId
    role: KeyRole
    public_key: Base64Key

    @model_validator(mode="after")
    def _id_matches_key(self) -> Self:
        if key_id_for(unb64(self.public_key, "public_key")) != self.key_id:
            raise ValueError(f"key_id {self.key_id} is not the id of this public key")
        return self

    @classmethod
    def of(cls, key: PublicKey) -> PublicKeyEntry:
        return cls(key_id=key.key_id, role=key.role, public_key=b64(key.raw))

    def to_public_key(self) -> PublicKey:
        return PublicKey(self.role, unb64(self.public_key, "public_key"))


class TrustNotice(_Notice):
    """A root-signed change to the trusted keys: keys to add, then key ids to revoke."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["trust"] = "trust"
    add: tuple[PublicKeyEntry, ...] = ()
    revoke: tuple[KeyId, ...] = ()
    notes: Notes | None = None

    @model_validator(mode="after")
    def _check_changes(self) -> Self:
        added = [entry.key_id for entry in self.add]
        if not added and not self.revoke:
            raise ValueError("a trust notice must add or revoke at least one key")
        if len(added) > MAX_KEY_CHANGES or len(self.revoke) > MAX_KEY_CHANGES:
            raise ValueError(f"add and revoke may list at most {MAX_KEY_CHANGES} keys each")
        if len(set(added)) != len(added) or len(set(self.revoke)) != len(self.revoke):
            raise ValueError("a key may be listed only once in add and once in revoke")
        both = sorted(set(added) & set(self.revoke))
        if both:
            raise ValueError(f"keys {both} are both added and revoked; list each in one place")
        return self


Notice: TypeAlias = ReleaseNotice | TrustNotice
_MODELS: dict[str, type[ReleaseNotice] | type[TrustNotice]] = {
    "release": ReleaseNotice,
    "trust": TrustNotice,
}
_PURPOSES: dict[str, Purpose] = {"release": RELEASE_NOTICE, "trust": TRUST_NOTICE}


def release_topic(target: Target) -> str:
    """The retained topic a release for `target` is published to."""
    if target.group is not None:
        return f"lineside/v1/fleet/{target.group}/release"
    assert target.device is not None  # Target holds exactly one of the two
    site, device = target.device.split("/")
    return f"lineside/v1/{site}/{device}/release"


def encode_notice(notice: Notice, key: SigningKey) -> bytes:
    """Sign `notice` with `key` and return the envelope's canonical bytes.

    A key may only sign its own kind of notice (`WrongRoleError` otherwise), and a root key may
    not sign its own revocation (devices would refuse it; see `apply_trust`).
    """
    if isinstance(notice, TrustNotice) and key.key_id in notice.revoke:
        raise NoticeError(_self_revocation(key.key_id))
    payload = notice.to_bytes()
    signature = key.sign(payload, _PURPOSES[notice.kind])
    envelope = {
        "notice": b64(payload),
        "signatures": json.loads(encode_signatures([signature])),
    }
    data = canonical_json(envelope)
    if len(data) > MAX_NOTICE_BYTES:
        raise NoticeError(
            f"the signed notice is {len(data)} bytes, over the {MAX_NOTICE_BYTES}-byte cap; "
            "shorten the notes or split the key changes over several notices"
        )
    return data


def decode_notice(data: bytes, trust: TrustStore) -> tuple[Notice, str]:
    """Verify and parse an envelope; return the notice and the id of the key that signed it.

    The notice's kind lives inside the signed bytes, so it cannot pick the purpose to verify
    against; instead every notice purpose is tried, and the parsed kind must be one whose
    purpose verified. Signature failures are raised as `TrustStore.verify` raises them.
    """
    payload, signatures = _open_envelope(data)
    verified: dict[str, str] = {}
    failures: list[SignatureError] = []
    for kind, purpose in _PURPOSES.items():
        try:
            verified[kind] = trust.verify(payload, signatures, purpose)
        except SignatureError as exc:
            failures.append(exc)
    if not verified:
        raise min(failures, key=_seriousness)
    notice = _parse_notice(payload)
    signer = verified.get(notice.kind)
    if signer is None:
        other_kind, other_signer = next(iter(verified.items()))
        needed = _PURPOSES[notice.kind].role.value
        raise WrongRoleError(
            f"the notice says it is a {notice.kind} notice but key {other_signer} signed it as "
            f"a {other_kind} notice; a {notice.kind} notice must be signed by a {needed!r} key"
        )
    return notice, signer


def peek_notice(data: bytes) -> dict[str, Any]:
    """What can be read of a notice WITHOUT verifying it, for reporting a refusal.

    Never raises and never trusts: the fields (kind, sequence, name, version, target, rollout)
    are copied only when they have the right type, so a refused notice can be tied to the
    release it claims to be. Nothing here may be acted on.
    """
    try:
        payload, _ = _open_envelope(data)
        document = strict_json(payload)
    except (BundleError, ValueError, RecursionError):
        return {}
    if not isinstance(document, dict):
        return {}
    seen: dict[str, Any] = {}
    for key, kind in (("kind", str), ("name", str), ("sequence", int), ("version", int)):
        value = document.get(key)
        if isinstance(value, kind) and not isinstance(value, bool):
            seen[key] = value[:128] if isinstance(value, str) else value
    target = document.get("target")
    if isinstance(target, dict):
        seen["target"] = {
            k: v[:128] for k, v in target.items() if k in ("device", "group") and isinstance(v, str)
        }
    rollout = document.get("rollout")
    if isinstance(rollout, dict):
        rollout_id, wave = rollout.get("id"), rollout.get("wave")
        if isinstance(rollout_id, str) and isinstance(wave, int) and not isinstance(wave, bool):
            seen["rollout"] = {"id": rollout_id[:128], "wave": wave}
    return seen


def apply_trust(trust: TrustStore, notice: TrustNotice, *, signer_key_id: str) -> TrustStore:
    """`trust` with the notice's keys added, then its key ids revoked.

    `signer_key_id` is what `decode_notice` returned for this notice; it must be a trusted,
    unrevoked root key of `trust`, which is what lets a notice add root keys at all. A revoked key
    is never trusted again, and a key keeps the one role it was first trusted with.
    """
    signer = trust.key(signer_key_id)
    if signer is None or signer.role is not KeyRole.ROOT or signer_key_id in trust.revoked:
        raise NoticeError(
            f"the trust notice is signed by key {signer_key_id}, which is not a trusted, "
            "unrevoked root key here; decode it with decode_notice against this trust store first"
        )
    if signer_key_id in notice.revoke:
        raise NoticeError(_self_revocation(signer_key_id))
    updated = trust
    for entry in notice.add:
        key = entry.to_public_key()
        if key.key_id in trust.revoked:
            raise NoticeError(
                f"the trust notice adds key {key.key_id}, which is revoked here; revocation is "
                "permanent: generate a new key and add that one"
            )
        existing = updated.key(key.key_id)
        if existing is not None and existing.role is not key.role:
            raise NoticeError(
                f"the trust notice adds key {key.key_id} as {key.role.value!r}, but it is trusted "
                f"here as {existing.role.value!r}; one key holds one role: generate a new key"
            )
        updated = updated.with_key(key)
    for key_id in notice.revoke:
        updated = updated.with_revoked(key_id)
    return updated


def _self_revocation(key_id: str) -> str:
    return (
        f"the trust notice revokes key {key_id}, the root key that signs it; a root key cannot "
        "revoke itself: sign the revocation with another root key"
    )


def _open_envelope(data: bytes) -> tuple[bytes, tuple[Signature, ...]]:
    """The notice bytes and the decoded signatures of an envelope; nothing else is read."""
    if len(data) > MAX_NOTICE_BYTES:
        raise NoticeError(
            f"the notice is {len(data)} bytes, over the {MAX_NOTICE_BYTES}-byte cap; "
            "it was not made by model-packager: ask the publisher to re-issue it"
        )
    try:
        envelope = strict_json(data)
        if not isinstance(envelope, dict) or set(envelope) != {"notice", "signatures"}:
            raise ValueError("expected an object with exactly 'notice' and 'signatures'")
        payload = unb64(envelope["notice"], "notice")
        # Re-serialised canonically so decode_signatures can check each entry strictly; the
        # signatures cover the notice bytes, not this list, so its layout carries no meaning.
        signatures = canonical_json(envelope["signatures"])
    except (ValueError, RecursionError) as exc:
        raise NoticeError(
            f"the notice envelope is malformed ({exc}); ask the publisher to re-issue it "
            "with model-packager publish or trust"
        ) from exc
    return payload, decode_signatures(signatures)


def _parse_notice(payload: bytes) -> Notice:
    try:
        document = strict_json(payload)
    except (ValueError, RecursionError) as exc:
        raise NoticeError(f"the signed notice is not UTF-8 JSON ({exc}); re-issue it") from exc
    if not isinstance(document, dict):
        raise NoticeError("the signed notice must be a JSON object; re-issue it")
    version = document.get("schema_version")
    newest = NEWEST_SCHEMA_VERSION
    if isinstance(version, int) and not isinstance(version, bool) and version > newest:
        raise NoticeError(
            f"notice schema_version {version} is newer than this code understands "
            f"({newest}); upgrade the agent"
        )
    kind = document.get("kind")
    model = _MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise NoticeError(
            f"the signed notice has kind {kind!r}; expected one of {sorted(_MODELS)}: "
            "it was made by an incompatible publisher, re-issue it"
        )
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise NoticeError(
            f"invalid {kind} notice: {_describe(exc)}; re-issue it with model-packager"
        ) from exc


def _describe(exc: ValidationError) -> str:
    """Pydantic errors as one line: `target.device: reason; url: reason`."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        reason = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {reason}" if where else reason)
    return "; ".join(problems)


def _seriousness(exc: SignatureError) -> int:
    """Same order as `TrustStore.verify`: a bad signature first, then revoked, role, untrusted."""
    order = (RevokedKeyError, WrongRoleError, UntrustedKeyError)
    return next((i + 1 for i, kind in enumerate(order) if isinstance(exc, kind)), 0)
