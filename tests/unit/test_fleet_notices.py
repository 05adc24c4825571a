"""Per-box notices: v2 or v1 by agent version, byte-identical re-signing, decoding with the
box's own code path, bundle verification (unsigned and foreign-key bundles refused), and keys."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_bundle.archive import extract_archive, write_archive
from edge_bundle.hashing import sha256_and_size
from edge_bundle.manifest import SIGNATURES_FILE
from edge_bundle.release import ReleaseNotice, Rollout, Target, decode_notice
from edge_bundle.signing import KeyRole, SigningKey, TrustStore, write_key_files
from fleet_controller.errors import FleetError
from fleet_controller.notices import (
    V2_MIN_AGENT,
    BundleFacts,
    build_notice,
    inspect_bundle,
    load_release_key,
    next_sequence,
    notice_topic,
    speaks_v2,
)
from tests.agent_support import BuiltBundle, Keys, build_bundle, make_keys

ISSUED = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
FACTS = BundleFacts("defects", 4, "ab" * 32, 123_456)


@dataclass(frozen=True)
class Bundles:
    good: BuiltBundle
    foreign: BuiltBundle
    unsigned: Path
    keys: Keys


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    work = tmp_path_factory.mktemp("fleet-bundles")
    keys = make_keys(work / "keys", "plant")
    good = build_bundle(work, keys, name="defects", version=4)
    foreign = build_bundle(work / "foreign", make_keys(work / "keys", "stranger"), version=5)
    return Bundles(good, foreign, _without_signature(good.path, work / "unsigned.bundle"), keys)


def _without_signature(bundle: Path, out: Path) -> Path:
    """The same bundle with its manifest.sig left out."""
    extracted = extract_archive(bundle, out.parent / "unsigned-staging")
    members: dict[str, Path | bytes] = {
        path.relative_to(extracted.directory).as_posix(): path
        for path in sorted(extracted.directory.rglob("*"))
        if path.is_file() and path.name != SIGNATURES_FILE
    }
    return write_archive(out, members).path


@pytest.fixture(scope="module")
def release_key() -> SigningKey:
    return SigningKey.generate(KeyRole.RELEASE)


def notice_args(key: SigningKey, **changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "facts": FACTS,
        "url": "https://files.plant.example/defects-4.bundle",
        "site": "plant-a",
        "device": "box1",
        "sequence": 1_740_830_400_000,
        "issued_at": ISSUED,
        "expires_at": ISSUED + timedelta(days=7),
        "rollout_id": "defects-4",
        "wave": 2,
        "rollback": False,
        "v2": True,
        "key": key,
    }
    return {**args, **changes}


# --- agent versions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "v2"),
    [
        (V2_MIN_AGENT, True),
        ("0.2", True),
        ("0.2.1", True),
        ("0.10.0", True),  # numeric, not string, order
        ("1.0.0", True),
        ("v0.3.0", True),
        ("0.2.0.post1", True),
        ("0.2.0+local.7", True),
        ("0.2.1rc1", True),
        ("0.1.0", False),
        ("0.1.99", False),
        ("0.0.9", False),
        ("0.2.0rc1", False),  # a pre-release of 0.2.0 comes before it
        ("0.2.0.dev3", False),
        ("0.2.0-beta", False),
        (None, False),
        ("", False),
        ("unknown", False),
        ("0.2.x", False),
        ("latest", False),
    ],
)
def test_speaks_v2_by_agent_version(version: str | None, v2: bool) -> None:
    assert speaks_v2(version) is v2


# --- notices --------------------------------------------------------------------------------


def test_a_v2_notice_decodes_on_the_box_with_its_rollout(release_key: SigningKey) -> None:
    data = build_notice(**notice_args(release_key))
    notice, signer = decode_notice(data, TrustStore((release_key.public,)))
    assert signer == release_key.key_id
    assert isinstance(notice, ReleaseNotice)
    assert notice.schema_version == 2
    assert notice.rollout == Rollout(id="defects-4", wave=2)
    assert notice.target == Target(device="plant-a/box1")
    assert (notice.name, notice.version) == ("defects", 4)
    assert (notice.bundle_sha256, notice.bundle_size) == (FACTS.sha256, FACTS.size)
    assert notice.sequence == 1_740_830_400_000
    assert (notice.issued_at, notice.expires_at) == (ISSUED, ISSUED + timedelta(days=7))
    assert notice.rollback is False


def test_a_v1_notice_carries_no_rollout_fields(release_key: SigningKey) -> None:
    data = build_notice(**notice_args(release_key, v2=False, rollback=True))
    notice, _ = decode_notice(data, TrustStore((release_key.public,)))
    assert isinstance(notice, ReleaseNotice)
    assert (notice.schema_version, notice.rollout, notice.rollback) == (1, None, True)
    payload = json.loads(notice.to_bytes())
    assert "rollout" not in payload and "extensions" not in payload
    assert payload["schema_version"] == 1


def test_notices_are_byte_identical_for_the_same_arguments(release_key: SigningKey) -> None:
    for v2 in (True, False):
        first = build_notice(**notice_args(release_key, v2=v2))
        again = build_notice(**notice_args(release_key, v2=v2))
        assert first == again
    assert build_notice(**notice_args(release_key)) != build_notice(
        **notice_args(release_key, sequence=1_740_830_400_001)
    )


def test_a_notice_names_only_its_box(release_key: SigningKey) -> None:
    trust = TrustStore((release_key.public,))
    one = decode_notice(build_notice(**notice_args(release_key, device="box1")), trust)[0]
    two = decode_notice(build_notice(**notice_args(release_key, device="box2")), trust)[0]
    assert isinstance(one, ReleaseNotice) and isinstance(two, ReleaseNotice)
    assert (one.target.device, two.target.device) == ("plant-a/box1", "plant-a/box2")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rollout_id": "bad id"}, r"Rollout: id: 'bad id'"),
        ({"wave": 0}, r"Rollout: wave: .*greater than or equal to 1"),
        ({"device": "a/b"}, "SITE/DEVICE"),
        ({"url": "ftp://x/y"}, "url"),
        ({"expires_at": ISSUED}, "expires_at must be after issued_at"),
    ],
)
def test_bad_notice_fields_are_fleet_errors(
    release_key: SigningKey, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(FleetError, match=message) as caught:
        build_notice(**notice_args(release_key, **changes))
    assert "cannot sign the release notice for plant-a/" in caught.value.message


def test_only_a_release_key_signs_notices() -> None:
    with pytest.raises(FleetError, match="'release' key"):
        build_notice(**notice_args(SigningKey.generate(KeyRole.BUNDLE)))


def test_notice_topic_is_the_boxs_release_topic() -> None:
    assert notice_topic("plant-a", "box1") == "lineside/v1/plant-a/box1/release"
    with pytest.raises(FleetError, match="SITE/DEVICE"):
        notice_topic("plant a", "box1")


def test_sequences_grow_with_the_clock_and_past_the_last() -> None:
    now_ms = int(ISSUED.timestamp() * 1000)
    assert next_sequence(None, ISSUED) == now_ms
    assert next_sequence(now_ms - 5, ISSUED) == now_ms
    assert next_sequence(now_ms + 10, ISSUED) == now_ms + 11
    with pytest.raises(FleetError, match="cannot grow"):
        next_sequence(2**63 - 1, ISSUED)


# --- bundles --------------------------------------------------------------------------------


def test_inspect_bundle_verifies_and_reports_the_facts(bundles: Bundles) -> None:
    trust = TrustStore.from_files([bundles.keys.public])
    facts = inspect_bundle(bundles.good.path, trust)
    digest, size = sha256_and_size(bundles.good.path)
    assert facts == BundleFacts("defects", 4, digest, size)
    assert facts.to_json() == {"name": "defects", "version": 4, "sha256": digest, "size": size}


def test_a_bundle_signed_by_a_foreign_key_is_refused(bundles: Bundles) -> None:
    trust = TrustStore.from_files([bundles.keys.public])
    with pytest.raises(FleetError, match=r"not trusted here.*bundle_keys") as caught:
        inspect_bundle(bundles.foreign.path, trust)
    assert str(bundles.foreign.path) in caught.value.message


def test_an_unsigned_bundle_is_refused(bundles: Bundles) -> None:
    trust = TrustStore.from_files([bundles.keys.public])
    with pytest.raises(FleetError, match=r"refused: the bundle is not signed"):
        inspect_bundle(bundles.unsigned, trust)


def test_a_damaged_or_missing_bundle_is_refused(bundles: Bundles, tmp_path: Path) -> None:
    trust = TrustStore.from_files([bundles.keys.public])
    damaged = tmp_path / "damaged.bundle"
    damaged.write_bytes(bundles.good.path.read_bytes()[:-4000])
    with pytest.raises(FleetError, match="is not a valid bundle"):
        inspect_bundle(damaged, trust)
    with pytest.raises(FleetError, match=r"cannot read the bundle .*check the plan's bundle path"):
        inspect_bundle(tmp_path / "missing.bundle", trust)


# --- keys -----------------------------------------------------------------------------------


def test_load_release_key_reads_a_release_key_file(tmp_path: Path) -> None:
    key = SigningKey.generate(KeyRole.RELEASE)
    private, _ = write_key_files(key, tmp_path, "release")
    assert load_release_key(private) == key


def test_load_release_key_refuses_other_roles_and_bad_files(
    tmp_path: Path, bundles: Bundles
) -> None:
    with pytest.raises(FleetError, match=r"holds a 'bundle' key.*keygen --role release"):
        load_release_key(bundles.keys.private)
    with pytest.raises(FleetError, match="cannot load the release key"):
        load_release_key(bundles.keys.public)
    with pytest.raises(FleetError, match="cannot load the release key"):
        load_release_key(tmp_path / "absent.key")
