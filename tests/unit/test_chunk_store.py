"""The chunk store (fleet_controller.chunks.store) on a temporary directory: atomic adds under
the sha256, refused digests, the manifest computed once and cached on disk, positioned reads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from edge_bundle.chunks import DIGEST_BYTES, ChunkedDelivery, build_manifest, describe
from fleet_controller import cli
from fleet_controller.chunks.store import ChunkRangeError, ChunkStore, UnknownBundleError
from fleet_controller.errors import FleetError

CHUNK = 4096


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "model.bundle"
    path.write_bytes(os.urandom(3 * CHUNK + 123))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_add_stores_the_bundle_under_its_sha256_and_leaves_no_temporary(
    tmp_path: Path, bundle: Path
) -> None:
    store = ChunkStore(tmp_path / "store")
    stored = store.add(bundle)
    assert stored.sha256 == sha(bundle) and stored.size == bundle.stat().st_size
    assert stored.path == tmp_path / "store" / f"{sha(bundle)}.bundle"
    assert stored.path.read_bytes() == bundle.read_bytes()
    assert store.add(bundle, sha(bundle)) == stored  # already there: a no-op
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [stored.path.name]


def test_a_file_with_another_digest_is_refused_and_nothing_is_stored(
    tmp_path: Path, bundle: Path
) -> None:
    store = ChunkStore(tmp_path / "store")
    with pytest.raises(FleetError, match="not the expected"):
        store.add(bundle, "ab" * 32)
    assert list((tmp_path / "store").iterdir()) == []
    with pytest.raises(UnknownBundleError, match="chunks add"):
        store.get("ab" * 32)


def test_manifest_is_computed_once_cached_beside_the_bundle_and_matches_describe(
    tmp_path: Path, bundle: Path
) -> None:
    store = ChunkStore(tmp_path / "store")
    stored, delivery = store.publish(bundle, CHUNK)
    assert delivery == describe(bundle, CHUNK)
    cached = store.manifest_path(stored.sha256, CHUNK)
    assert cached.read_bytes() == build_manifest(bundle, CHUNK)
    assert store.published_sizes(stored.sha256) == [CHUNK]
    # A new store (a restarted server) reads the cached file: a forged cache of the right
    # length is served as is, which shows the bundle was not read again.
    forged = b"\0" * len(cached.read_bytes())
    cached.write_bytes(forged)
    assert ChunkStore(tmp_path / "store").manifest(stored.sha256, CHUNK) == forged
    # A cache that does not fit the bundle's size is thrown away and computed again.
    cached.write_bytes(b"\0" * DIGEST_BYTES)
    assert ChunkStore(tmp_path / "store").manifest(stored.sha256, CHUNK) == build_manifest(
        bundle, CHUNK
    )


def test_reading_chunks_and_manifest_pages(tmp_path: Path, bundle: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    stored, delivery = store.publish(bundle, CHUNK)
    data = bundle.read_bytes()
    manifest = store.manifest(stored.sha256, CHUNK)
    for index in range(delivery.chunks):
        chunk = store.read_chunk(stored.sha256, CHUNK, index)
        assert chunk == data[index * CHUNK : (index + 1) * CHUNK]
        assert delivery.chunk_ok(manifest, index, chunk, stored.size)
    assert store.read_manifest_page(stored.sha256, CHUNK, 0, create=False) == manifest
    with pytest.raises(ChunkRangeError, match=r"chunks 0\.\.3"):
        store.read_chunk(stored.sha256, CHUNK, 4)
    with pytest.raises(ChunkRangeError, match="pages"):
        store.read_manifest_page(stored.sha256, CHUNK, 1, create=False)


def test_a_request_may_create_a_manifest_only_at_a_power_of_two(
    tmp_path: Path, bundle: Path
) -> None:
    store = ChunkStore(tmp_path / "store")
    stored = store.add(bundle)
    assert len(store.read_manifest_page(stored.sha256, 8192, 0, create=False)) == 2 * DIGEST_BYTES
    with pytest.raises(ChunkRangeError, match="not published in chunks of 5000"):
        store.read_manifest_page(stored.sha256, 5000, 0, create=False)
    store.manifest(stored.sha256, 5000)  # published (chunks add --chunk-size 5000)
    assert store.read_manifest_page(stored.sha256, 5000, 0, create=False)
    with pytest.raises(ChunkRangeError, match="chunk_size must be"):
        store.read_chunk(stored.sha256, 100, 0)


def test_describe_matches_the_notice_extension(tmp_path: Path, bundle: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    stored = store.add(bundle)
    delivery = store.describe(stored.sha256, CHUNK)
    parsed = ChunkedDelivery.parse(delivery.to_json(), bundle_size=stored.size)
    assert parsed == delivery and delivery.chunks == 4


def test_chunks_add_prints_the_notice_extension(
    tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    assert (
        cli.main(["chunks", "add", str(bundle), "--store", str(store), "--chunk-size", "4096"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["bundle_sha256"] == sha(bundle)
    assert printed["extensions"]["critical"] == ["mqtt_chunks"]
    assert ChunkedDelivery.parse(printed["extensions"]["mqtt_chunks"]) == describe(bundle, CHUNK)
    assert ChunkStore(store).has(sha(bundle))
    config = tmp_path / "fleet.toml"
    config.write_text('[chunks]\nstore = "from-config"\n')
    assert cli.main(["chunks", "add", str(bundle), "--config", str(config)]) == 0
    assert ChunkStore(tmp_path / "from-config").published_sizes(sha(bundle)) == [262144]
    assert cli.main(["chunks", "add", str(tmp_path / "nope"), "--store", str(store)]) == 2
    assert "cannot read the bundle" in capsys.readouterr().err
