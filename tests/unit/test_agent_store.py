"""edge_agent.device.store.BundleStore: verified installs, atomic activation, immutable versions, and
re-verification of what is on disk each time a version is opened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.device.store import BundleStore
from edge_agent.errors import BundleRejectedError, ConfigError, UnknownModelError
from edge_bundle.manifest import MANIFEST_FILE
from tests.agent_support import Keys, build_bundle, make_keys
from tests.unit.agent_fixtures import (
    files_under,
    flip_byte,
    store_for,
    trust,
    unsigned_copy,
)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def store(tmp_path: Path, keys: Keys) -> BundleStore:
    return store_for(tmp_path / "store", keys)


def test_stage_adds_a_version_with_its_install_record(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    built = build_bundle(tmp_path, keys)
    staged = store.stage(built.path)
    assert staged.bundle_id.name == "defects"
    assert staged.signer_key_id == keys.key.key_id
    assert staged.directory == store.root / "bundles" / "defects" / "1"
    assert (staged.directory / "model.onnx").read_bytes() == built.files["model.onnx"].read_bytes()
    assert store.versions("defects") == [1]
    assert store.active_version("defects") is None
    assert store.active_names() == []
    record = store.record("defects", 1)
    assert record.bundle_sha256 == staged.bundle_sha256
    assert record.signer_key_id == keys.key.key_id
    assert files_under(store.root / "staging") == []


def test_activate_points_active_at_the_version_and_swaps_it(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    store.stage(build_bundle(tmp_path, keys, version=1).path)
    store.stage(build_bundle(tmp_path, keys, version=2, seed=4).path)
    store.activate("defects", 1)
    assert store.active_version("defects") == 1
    assert store.active_names() == ["defects"]
    store.activate("defects", 2)
    assert store.active_version("defects") == 2
    link = store.root / "active" / "defects"
    assert link.is_symlink()
    assert link.resolve() == (store.root / "bundles" / "defects" / "2").resolve()
    assert [p.name for p in (store.root / "active").iterdir()] == ["defects"]  # no temp links


def test_activate_a_version_that_is_not_installed(store: BundleStore) -> None:
    with pytest.raises(UnknownModelError, match="install it first"):
        store.activate("defects", 3)


def test_installing_the_identical_bundle_again_is_a_no_op(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    built = build_bundle(tmp_path, keys)
    first = store.stage(built.path)
    record = store.record("defects", 1)
    again = store.stage(built.path)
    assert again.directory == first.directory
    assert again.bundle_sha256 == first.bundle_sha256
    assert store.record("defects", 1) == record  # not re-written
    assert store.versions("defects") == [1]
    assert files_under(store.root / "staging") == []


def test_same_name_and_version_with_other_content_is_refused(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    store.stage(build_bundle(tmp_path / "a", keys, version=1, seed=3).path)
    installed = files_under(store.root / "bundles")
    other = build_bundle(tmp_path / "b", keys, version=1, seed=4)
    with pytest.raises(BundleRejectedError, match="higher --version"):
        store.stage(other.path)
    assert files_under(store.root / "bundles") == installed
    assert files_under(store.root / "staging") == []


def _assert_nothing_installed(store: BundleStore) -> None:
    assert files_under(store.root / "bundles") == []
    assert files_under(store.root / "staging") == []


def test_a_flipped_byte_inside_a_member_is_refused(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    built = build_bundle(tmp_path, keys)
    tampered = flip_byte(built.path, "model.onnx", tmp_path / "tampered.bundle")
    with pytest.raises(BundleRejectedError, match=r"tampered\.bundle refused"):
        store.stage(tampered)
    _assert_nothing_installed(store)


def test_a_flipped_byte_inside_the_manifest_is_refused(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    built = build_bundle(tmp_path, keys)
    tampered = flip_byte(built.path, MANIFEST_FILE, tmp_path / "tampered.bundle")
    with pytest.raises(BundleRejectedError):
        store.stage(tampered)
    _assert_nothing_installed(store)


def test_a_bundle_signed_by_an_untrusted_key_is_refused(tmp_path: Path, keys: Keys) -> None:
    stranger = make_keys(tmp_path / "stranger-keys", "stranger")
    store = store_for(tmp_path / "store", keys)
    built = build_bundle(tmp_path, stranger)
    with pytest.raises(BundleRejectedError, match="not trusted"):
        store.stage(built.path)
    _assert_nothing_installed(store)


def test_an_unsigned_bundle_is_refused_by_default(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    unsigned = unsigned_copy(build_bundle(tmp_path, keys).path, tmp_path / "unsigned.bundle")
    with pytest.raises(BundleRejectedError, match=r"unsigned\.bundle refused"):
        store.stage(unsigned)
    _assert_nothing_installed(store)


def test_an_unsigned_bundle_is_accepted_with_allow_unsigned(tmp_path: Path, keys: Keys) -> None:
    store = store_for(tmp_path / "store", allow_unsigned=True)  # trusts no key at all
    unsigned = unsigned_copy(build_bundle(tmp_path, keys).path, tmp_path / "unsigned.bundle")
    staged = store.stage(unsigned)
    assert staged.signer_key_id is None
    assert store.record("defects", 1).signer_key_id is None
    assert store.open("defects", 1).manifest.name == "defects"


def test_allow_unsigned_still_checks_a_signature_that_is_present(
    tmp_path: Path, keys: Keys
) -> None:
    stranger = make_keys(tmp_path / "stranger-keys", "stranger")
    store = store_for(tmp_path / "store", keys, allow_unsigned=True)
    with pytest.raises(BundleRejectedError, match="not trusted"):
        store.stage(build_bundle(tmp_path, stranger).path)
    _assert_nothing_installed(store)


def test_open_verifies_the_installed_files_again(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    store.stage(build_bundle(tmp_path, keys).path)
    assert store.open("defects", 1).signer_key_id == keys.key.key_id
    model = store.root / "bundles" / "defects" / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleRejectedError, match=r"model\.onnx"):
        store.open("defects", 1)


def test_open_refuses_an_extra_file_added_after_install(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    store.stage(build_bundle(tmp_path, keys).path)
    (store.root / "bundles" / "defects" / "1" / "extra.py").write_text("print('hi')\n")
    with pytest.raises(BundleRejectedError, match=r"extra\.py"):
        store.open("defects", 1)


def test_open_refuses_a_version_whose_key_was_revoked_since(tmp_path: Path, keys: Keys) -> None:
    store_for(tmp_path / "store", keys).stage(build_bundle(tmp_path, keys).path)
    restarted = BundleStore(tmp_path / "store", trust(keys, revoked=(keys.key.key_id,)))
    with pytest.raises(BundleRejectedError, match="revoked"):
        restarted.open("defects", 1)


def test_open_a_version_that_is_not_installed(store: BundleStore) -> None:
    with pytest.raises(UnknownModelError, match=r"installed versions: \[\]"):
        store.open("defects", 1)


def test_unreadable_install_record(tmp_path: Path, keys: Keys, store: BundleStore) -> None:
    store.stage(build_bundle(tmp_path, keys).path)
    (store.root / "bundles" / "defects" / "1.json").write_text("{not json")
    with pytest.raises(BundleRejectedError, match="install defects@1 again"):
        store.open("defects", 1)


def test_remove_refuses_the_active_version_and_removes_others(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    store.stage(build_bundle(tmp_path, keys, version=1).path)
    store.stage(build_bundle(tmp_path, keys, version=2, seed=4).path)
    store.activate("defects", 2)
    with pytest.raises(ConfigError, match="activate another version first"):
        store.remove("defects", 2)
    store.remove("defects", 1)
    assert store.versions("defects") == [2]
    assert not (store.root / "bundles" / "defects" / "1.json").exists()
    assert store.open("defects", 2).manifest.version == 2


def test_clear_staging_removes_leftovers_of_an_interrupted_install(
    tmp_path: Path, keys: Keys, store: BundleStore
) -> None:
    store.stage(build_bundle(tmp_path, keys).path)
    leftover = store.root / "staging" / "tmp-crashed"
    (leftover / "golden").mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half written")
    store.clear_staging()
    assert files_under(store.root / "staging") == []
    assert store.versions("defects") == [1]


def test_install_record_is_json(tmp_path: Path, keys: Keys, store: BundleStore) -> None:
    staged = store.stage(build_bundle(tmp_path, keys).path)
    record = json.loads((store.root / "bundles" / "defects" / "1.json").read_text())
    assert record["bundle_sha256"] == staged.bundle_sha256
    assert set(record) == {"bundle_sha256", "signer_key_id", "installed_at"}
