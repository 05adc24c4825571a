"""Per-box release notices: the bundle's facts, v2 or v1 by agent version, signing, the bytes.

This module owns what the controller signs for one box (docs/fleet.md "Notices for waves"): it
verifies the rollout's bundle with `edge_bundle` exactly as `model-packager publish` does and
keeps its name, version, sha256 and size; it picks schema version 2 (with the rollout id and
wave) for agents from 0.2.0 and version 1 for older or unknown ones; it builds the shadow notices
of a plan's shadow phase (version 2 with the critical `shadow` extension) for agents from 0.3.0,
the first that understand it; it adds the critical `mqtt_chunks` extension (the bundle in chunks
over MQTT, docs/mqtt-delivery.md) for agents from 0.4.0, and for any box when the rollout has no
URL (`delivery_for`); it allocates sequences that
grow with `model-packager publish`'s; and it signs. The same arguments always give the same bytes,
so a notice stored before publishing can be published again after a crash, byte for byte.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from edge_bundle.bundle import open_bundle
from edge_bundle.chunks import DEFAULT_CHUNK_SIZE, MQTT_CHUNKS_EXTENSION, ChunkedDelivery
from edge_bundle.errors import BundleError, SignatureError, UntrustedKeyError
from edge_bundle.hashing import sha256_and_size
from edge_bundle.release import (
    CRITICAL_EXTENSIONS,
    MAX_SEQUENCE,
    SHADOW_EXTENSION,
    ReleaseNotice,
    Rollout,
    Target,
    encode_notice,
    release_topic,
)
from edge_bundle.signing import KeyRole, SigningKey, TrustStore, read_signing_key
from fleet_controller.chunks.store import ChunkStore
from fleet_controller.errors import FleetError

V2_MIN_AGENT: Final = "0.2.0"
#: The first agent that understands the critical `shadow` extension (older ones ignore it and
#: would activate the version at once, so they are never sent a shadow notice).
SHADOW_MIN_AGENT: Final = "0.3.0"
#: The first agent that fetches bundles in chunks over MQTT (the critical `mqtt_chunks`).
MQTT_CHUNKS_MIN_AGENT: Final = "0.4.0"
_VERSION = re.compile(r"^v?(?P<release>\d+(?:\.\d+)*)(?P<rest>[a-z0-9._-]*)(?:\+[a-z0-9.]+)?$")
_FINAL_SUFFIX = re.compile(r"^(?:[-_.]?post[-_.]?\d*)?$")
_PRE_SUFFIX = re.compile(r"^(?:[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview|dev)[-_.]?\d*)+$")


def speaks_v2(agent_version: str | None) -> bool:
    """Whether an agent of this version reads release notice schema 2 (0.2.0 and later).

    Versions compare numerically (0.10.0 is after 0.9.0); a pre-release of 0.2.0 is before it;
    a missing or unparsable version is treated as an old agent, which gets version 1.
    """
    return _at_least(agent_version, V2_MIN_AGENT)


def understands_shadow(agent_version: str | None) -> bool:
    """Whether an agent of this version acts on shadow notices (0.3.0 and later); compared as
    `speaks_v2` compares."""
    return _at_least(agent_version, SHADOW_MIN_AGENT)


def understands_mqtt_chunks(agent_version: str | None) -> bool:
    """Whether an agent of this version fetches bundles over MQTT (0.4.0 and later)."""
    return _at_least(agent_version, MQTT_CHUNKS_MIN_AGENT)


def delivery_for(
    url: str | None, chunks: ChunkedDelivery | None, agent_version: str | None
) -> tuple[str | None, ChunkedDelivery | None]:
    """The (url, mqtt_chunks) a box's notice carries.

    A box that understands `mqtt_chunks` gets both when the rollout has both (it may use the
    URL where it reaches HTTP); an older box gets the URL alone, since it would refuse a notice
    naming an extension it does not know. Without a URL every box gets `mqtt_chunks`: rollout
    creation refused cohorts with older agents, so only a box downgraded since is refused.
    """
    if chunks is None or url is None or understands_mqtt_chunks(agent_version):
        return url, chunks
    return url, None


def stored_delivery(bundle: Mapping[str, Any]) -> tuple[str | None, ChunkedDelivery | None]:
    """(url, mqtt_chunks) of a rollout's stored bundle JSON (`"url": ""` means none)."""
    chunks = bundle.get(MQTT_CHUNKS_EXTENSION)
    return bundle.get("url") or None, ChunkedDelivery.parse(chunks) if chunks else None


def put_in_chunk_store(
    store: ChunkStore | None, path: Path, facts: BundleFacts, chunk_size: int | None
) -> dict[str, Any]:
    """Copy a verified bundle into the chunk store; `{"mqtt_chunks": ...}` for its stored JSON."""
    if store is None:
        raise FleetError(
            'the plan delivers over MQTT (delivery = "mqtt"), but this controller has no chunk '
            "store; set [chunks] store in its config (the directory its chunk servers serve)"
        )
    _, chunks = store.publish(path, chunk_size or DEFAULT_CHUNK_SIZE, expected_sha256=facts.sha256)
    return {MQTT_CHUNKS_EXTENSION: chunks.to_json()}


def refuse_agents_without_mqtt(devices: Iterable[Any], shown: int = 10) -> None:
    """A rollout delivered over MQTT alone (no url) needs every box on agent 0.4.0 or later."""
    old = sorted(
        f"{device.ref} (agent {device.agent_version or 'unknown'})"
        for device in devices
        if not understands_mqtt_chunks(device.agent_version)
    )
    if old:
        more = f" and {len(old) - shown} more" if len(old) > shown else ""
        raise FleetError(
            f'the plan delivers over MQTT alone (delivery = "mqtt", no url), but {len(old)} '
            f"boxes of the cohort run agents before {MQTT_CHUNKS_MIN_AGENT}, which cannot fetch "
            f"over MQTT: {', '.join(old[:shown])}{more}; upgrade their agents, exclude them "
            "from the cohort, or add a url they can download from"
        )


def _at_least(agent_version: str | None, minimum_text: str) -> bool:
    if agent_version is None:
        return False
    parsed = _parse_version(agent_version)
    minimum = _parse_version(minimum_text)
    assert minimum is not None
    return parsed is not None and parsed >= minimum


def _parse_version(text: str) -> tuple[tuple[int, ...], int] | None:
    """(release numbers without trailing zeros, 0 for a pre-release or 1 for a release)."""
    match = _VERSION.fullmatch(text.strip().lower())
    if match is None:
        return None
    numbers = [int(part) for part in match["release"].split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    rest = match["rest"]
    if _FINAL_SUFFIX.fullmatch(rest):
        return tuple(numbers), 1
    if _PRE_SUFFIX.fullmatch(rest):
        return tuple(numbers), 0
    return None


@dataclass(frozen=True)
class BundleFacts:
    """What a release notice pins of a verified bundle."""

    name: str
    version: int
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
        }


def inspect_bundle(path: Path, bundle_trust: TrustStore) -> BundleFacts:
    """Verify the bundle at `path` against `bundle_trust` (signature, manifest, every file) and
    return its facts; any problem is a `FleetError` saying what to do."""
    try:
        digest, size = sha256_and_size(path)
    except OSError as exc:
        raise FleetError(
            f"cannot read the bundle {path}: {exc.strerror}; check the plan's bundle path"
        ) from exc
    try:
        with tempfile.TemporaryDirectory(prefix="fleet-bundle-") as staging:
            verified = open_bundle(path, bundle_trust, Path(staging))
            verified.discard()
    except UntrustedKeyError as exc:
        raise FleetError(
            f"the bundle {path} is refused: {exc} (the controller trusts the keys of its "
            "bundle_keys setting)"
        ) from exc
    except SignatureError as exc:
        raise FleetError(f"the bundle {path} is refused: {exc}") from exc
    except BundleError as exc:
        raise FleetError(f"the bundle {path} is not a valid bundle: {exc}") from exc
    if verified.bundle_sha256 != digest:
        raise FleetError(f"{path} changed while it was read; start the rollout once it is stable")
    manifest = verified.manifest
    return BundleFacts(manifest.name, manifest.version, digest, size)


def next_sequence(last: int | None, now: datetime) -> int:
    """`max(now in ms, last + 1)`: grows with `model-packager publish`'s default sequences."""
    now_ms = int(now.timestamp() * 1000)
    sequence = now_ms if last is None else max(now_ms, last + 1)
    if sequence > MAX_SEQUENCE:
        raise FleetError(f"the notice sequence would pass {MAX_SEQUENCE}; it cannot grow further")
    return sequence


def build_notice(
    *,
    facts: BundleFacts,
    url: str | None,
    site: str,
    device: str,
    sequence: int,
    issued_at: datetime,
    expires_at: datetime,
    rollout_id: str,
    wave: int,
    rollback: bool,
    v2: bool,
    key: SigningKey,
    shadow_max_s: float | None = None,
    chunks: ChunkedDelivery | None = None,
) -> bytes:
    """The signed envelope of one box's release notice (target `SITE/DEVICE`).

    Version 2 carries `rollout: {id, wave}`; version 1 (for agents before 0.2.0) carries
    neither, and its update reports are tied to the rollout by (device, sequence). With
    `shadow_max_s` it is a shadow notice (version 2 only): `extensions` names `shadow` critical
    and asks the box to shadow the active model with the version for at most that long.
    With `chunks` (version 2 only; a version 1 notice with a URL leaves it out) it names
    `mqtt_chunks` critical: the box fetches the bundle in chunks over MQTT; `url` may then be
    None.
    """
    if chunks is not None and not v2:
        if url is None:
            raise FleetError(
                f"{site}/{device} reads only release notice schema 1 (agent before 0.2.0) and "
                "cannot fetch over MQTT, and the rollout has no url; upgrade its agent"
            )
        chunks = None
    if shadow_max_s is not None and (not v2 or rollback):
        raise FleetError(
            f"a shadow notice for {site}/{device} must be schema version 2 and not a rollback"
        )
    fields: dict[str, Any] = {
        "name": facts.name,
        "version": facts.version,
        "bundle_sha256": facts.sha256,
        "bundle_size": facts.size,
        "sequence": sequence,
        "issued_at": issued_at,
        "expires_at": expires_at,
        "rollback": rollback,
    }
    try:
        fields["target"] = Target.create(device=f"{site}/{device}")
        if v2:
            fields["schema_version"] = 2
            fields["rollout"] = Rollout.create(id=rollout_id, wave=wave)
        if url is not None:
            fields["url"] = url
        extensions: dict[str, Any] = {}
        if shadow_max_s is not None:
            extensions[SHADOW_EXTENSION] = {"max_s": shadow_max_s}
        if chunks is not None:
            extensions[MQTT_CHUNKS_EXTENSION] = chunks.to_json()
        if extensions:
            fields["extensions"] = {CRITICAL_EXTENSIONS: sorted(extensions), **extensions}
        return encode_notice(ReleaseNotice.create(**fields), key)
    except BundleError as exc:
        raise FleetError(f"cannot sign the release notice for {site}/{device}: {exc}") from exc


def notice_topic(site: str, device: str) -> str:
    """The retained topic of one box's release notices."""
    try:
        return release_topic(Target.create(device=f"{site}/{device}"))
    except BundleError as exc:
        raise FleetError(f"no release topic for {site}/{device}: {exc}") from exc


def load_release_key(path: Path) -> SigningKey:
    """The release-signing key in the `.key` file at `path`."""
    try:
        key = read_signing_key(path)
    except BundleError as exc:
        raise FleetError(f"cannot load the release key: {exc}") from exc
    if key.role is not KeyRole.RELEASE:
        raise FleetError(
            f"{path} holds a {key.role.value!r} key, but release notices are signed by a "
            "'release' key; make one with model-packager keygen --role release"
        )
    return key
