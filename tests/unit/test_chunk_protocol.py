"""The chunked-delivery protocol: the signed extension, the manifest, requests and replies."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_bundle.chunks import (
    DIGEST_BYTES,
    MIN_CHUNK_SIZE,
    MQTT_CHUNKS_EXTENSION,
    ChunkedDelivery,
    ChunkError,
    ChunkReply,
    ChunkRequest,
    build_manifest,
    chunk_count,
    describe,
    manifest_page,
    reply_topic,
)
from edge_bundle.errors import NoticeError
from edge_bundle.release import ReleaseNotice, Target, decode_notice, encode_notice
from edge_bundle.signing import KeyRole, SigningKey, TrustStore

ISSUED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CHUNK = MIN_CHUNK_SIZE


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "b.bundle"
    path.write_bytes(bytes(range(256)) * 70 + b"tail")  # 17,924 bytes: 5 chunks of 4 KiB
    return path


def notice_fields(path: Path, delivery: ChunkedDelivery, **changes: Any) -> dict[str, Any]:
    data = path.read_bytes()
    fields: dict[str, Any] = {
        "schema_version": 2,
        "sequence": 5,
        "issued_at": ISSUED,
        "expires_at": ISSUED + timedelta(days=7),
        "name": "weld",
        "version": 4,
        "bundle_sha256": hashlib.sha256(data).hexdigest(),
        "bundle_size": len(data),
        "target": Target(group="line3"),
        "extensions": {
            "critical": [MQTT_CHUNKS_EXTENSION],
            MQTT_CHUNKS_EXTENSION: delivery.to_json(),
        },
    }
    return {**fields, **changes}


def test_the_manifest_pins_every_chunk(bundle: Path) -> None:
    delivery = describe(bundle, CHUNK)
    manifest = build_manifest(bundle, CHUNK)
    size = bundle.stat().st_size
    assert delivery.chunks == chunk_count(size, CHUNK) == 5
    assert len(manifest) == 5 * DIGEST_BYTES == delivery.manifest_size
    delivery.check_manifest(manifest)
    data = bundle.read_bytes()
    for index in range(delivery.chunks):
        piece = data[index * CHUNK : (index + 1) * CHUNK]
        assert delivery.chunk_ok(manifest, index, piece, size)
        assert not delivery.chunk_ok(manifest, index, piece[:-1], size)  # short
        assert not delivery.chunk_ok(manifest, index, b"x" + piece[1:], size)  # corrupted
    assert delivery.chunk_length(4, size) == size - 4 * CHUNK
    with pytest.raises(ChunkError, match="out of range"):
        delivery.chunk_length(5, size)


def test_a_manifest_not_signed_is_refused(bundle: Path) -> None:
    delivery = describe(bundle, CHUNK)
    manifest = bytearray(build_manifest(bundle, CHUNK))
    manifest[0] ^= 1
    with pytest.raises(ChunkError, match="does not match the signed notice"):
        delivery.check_manifest(bytes(manifest))
    with pytest.raises(ChunkError, match="bytes, not the"):
        delivery.check_manifest(bytes(manifest[:-1]))


def test_manifest_pages_are_never_larger_than_a_chunk(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"\0" * (CHUNK * 200))  # 200 chunks: a 6,400-byte manifest, 2 pages
    delivery = describe(path, CHUNK)
    manifest = build_manifest(path, CHUNK)
    assert delivery.manifest_pages == 2
    pages = [manifest_page(manifest, p, CHUNK) for p in range(delivery.manifest_pages)]
    assert [len(p) for p in pages] == [delivery.page_length(0), delivery.page_length(1)]
    assert b"".join(pages) == manifest


def test_a_notice_may_leave_out_the_url_only_with_critical_mqtt_delivery(bundle: Path) -> None:
    delivery = describe(bundle, CHUNK)
    notice = ReleaseNotice.create(**notice_fields(bundle, delivery))
    assert notice.url is None and notice.chunked == delivery
    assert b'"url"' not in notice.to_bytes()
    key = SigningKey.generate(KeyRole.RELEASE)
    decoded, _ = decode_notice(encode_notice(notice, key), TrustStore((key.public,)))
    assert isinstance(decoded, ReleaseNotice) and decoded.chunked == delivery
    with pytest.raises(NoticeError, match="url is required"):
        ReleaseNotice.create(
            **notice_fields(
                bundle, delivery, extensions={MQTT_CHUNKS_EXTENSION: delivery.to_json()}
            )
        )
    with pytest.raises(NoticeError, match="url is required"):
        ReleaseNotice.create(**notice_fields(bundle, delivery, extensions=None))
    both = ReleaseNotice.create(
        **notice_fields(
            bundle,
            delivery,
            url="https://files.example/b.bundle",
            extensions={MQTT_CHUNKS_EXTENSION: delivery.to_json()},
        )
    )
    assert both.url and both.chunked == delivery and both.critical == ()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"chunks": 6}, "has 5"),
        ({"chunk_size": 100}, "chunk_size must be an integer"),
        ({"manifest_sha256": "AB" * 32}, "64 lowercase hex"),
        ({"extra": 1}, "must be an object like"),
    ],
)
def test_a_wrong_extension_is_refused(bundle: Path, change: dict[str, Any], reason: str) -> None:
    value = {**describe(bundle, CHUNK).to_json(), **change}
    fields = notice_fields(bundle, describe(bundle, CHUNK))
    fields["extensions"] = {"critical": [MQTT_CHUNKS_EXTENSION], MQTT_CHUNKS_EXTENSION: value}
    with pytest.raises(NoticeError, match=reason):
        ReleaseNotice.create(**fields)


def test_requests_and_replies_round_trip() -> None:
    sha = "ab" * 32
    request = ChunkRequest(sha, CHUNK, "chunk", 3, reply_topic("plant1", "box-7"))
    assert ChunkRequest.decode(request.encode()) == request
    data = b"\n\x00binary\nwith newlines"
    reply = ChunkReply(sha, CHUNK, "chunk", 3, data)
    assert ChunkReply.decode(reply.encode()) == reply
    refusal = ChunkReply.refusal(request, "unknown_bundle", "not in the store: add it")
    decoded = ChunkReply.decode(refusal.encode())
    assert decoded.error == "unknown_bundle" and decoded.data == b""


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not UTF-8 JSON"),
        (b"[]", "JSON object"),
        (b'{"bundle": "x"}', "exactly the fields"),
        (b"{" + b" " * 2000 + b"}", "at most"),
    ],
)
def test_malformed_requests_are_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(ChunkError, match=reason):
        ChunkRequest.decode(payload)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("reply", "lineside/v1/plant/box/release", "not a chunk topic"),
        ("reply", "anything/#", "not a chunk topic"),
        ("bundle", "../etc/passwd", "64 lowercase hex"),
        ("part", "all", "part must be"),
        ("index", -1, "index must be"),
        ("chunk_size", 10**9, "chunk_size must be"),
    ],
)
def test_a_request_cannot_point_anywhere_else(field: str, value: Any, reason: str) -> None:
    good = ChunkRequest("ab" * 32, CHUNK, "chunk", 0, "lineside/v1/plant/box/chunks")
    payload = ChunkRequest(**{**good.__dict__, field: value}).encode()
    with pytest.raises(ChunkError, match=reason):
        ChunkRequest.decode(payload)


def test_a_reply_without_a_header_line_is_refused() -> None:
    with pytest.raises(ChunkError, match="one line of JSON"):
        ChunkReply.decode(b"raw bytes only")
    with pytest.raises(ChunkError, match="unknown chunk error"):
        ChunkReply.decode(
            b'{"bundle":"' + b"ab" * 32 + b'","chunk_size":4096,"part":"chunk","index":0,'
            b'"error":"nope"}\n'
        )
