"""The simulated box's chunk fetch (`fleet_controller.simulator.fetch`), driven without a broker:
the manifest first and checked, chunks checked one by one, a bounded window, lost replies asked
for again, corrupted chunks and forged manifests refused and fetched again."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from edge_bundle.chunks import (
    DIGEST_BYTES,
    ChunkedDelivery,
    ChunkReply,
    ChunkRequest,
    manifest_page,
    reply_topic,
)
from fleet_controller.simulator.fetch import ChunkFetch, FetchSettings

CHUNK = 4096
REPLY = reply_topic("plant", "box1")


def bundle(chunks: int, tail: int = 100) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(CHUNK * (chunks - 1) + tail))


def manifest_of(data: bytes) -> bytes:
    return b"".join(
        hashlib.sha256(data[i : i + CHUNK]).digest() for i in range(0, len(data), CHUNK)
    )


def delivery_of(data: bytes) -> ChunkedDelivery:
    manifest = manifest_of(data)
    return ChunkedDelivery(
        CHUNK, len(manifest) // DIGEST_BYTES, hashlib.sha256(manifest).hexdigest()
    )


def serve(data: bytes, request: ChunkRequest) -> ChunkReply:
    if request.part == "manifest":
        piece = manifest_page(manifest_of(data), request.index, CHUNK)
    else:
        piece = data[request.index * CHUNK : (request.index + 1) * CHUNK]
    return ChunkReply(request.bundle, request.chunk_size, request.part, request.index, piece)


def run(
    fetch: ChunkFetch,
    answer: Callable[[ChunkRequest], ChunkReply | None],
    *,
    step_s: float = 1.0,
    rounds: int = 10_000,
) -> list[ChunkRequest]:
    """Send what is due, answer it (newest first: out of order), advance the clock; all sent."""
    sent: list[ChunkRequest] = []
    now = 0.0
    for _ in range(rounds):
        if fetch.finished:
            return sent
        due = fetch.due(now)
        assert len(due) <= fetch.settings.window
        sent += due
        for request in reversed(due):
            reply = answer(request)
            if reply is not None:
                fetch.receive(reply)
            assert fetch.held_bytes <= fetch.settings.window * CHUNK
        now += step_s
    raise AssertionError("the fetch did not finish")


def test_fetches_manifest_pages_then_every_chunk_and_checks_the_whole_file() -> None:
    data = bundle(300)  # 300 digests: a manifest of three pages
    delivery = delivery_of(data)
    assert delivery.manifest_pages == 3
    fetch = ChunkFetch(delivery, hashlib.sha256(data).hexdigest(), len(data), REPLY)
    sent = run(fetch, lambda r: serve(data, r))
    assert fetch.failure is None and fetch.received == len(data)
    assert [r.index for r in sent if r.part == "manifest"] == [0, 1, 2]
    assert sorted(r.index for r in sent if r.part == "chunk") == list(range(300))
    assert all(r.reply == REPLY for r in sent)
    assert fetch.counts.resent == fetch.counts.refused == fetch.counts.stray == 0


def test_a_corrupted_chunk_is_refused_and_fetched_again() -> None:
    data = bundle(20)
    corrupted: set[int] = set()

    def answer(request: ChunkRequest) -> ChunkReply:
        reply = serve(data, request)
        if request.part == "chunk" and request.index in (3, 19) and request.index not in corrupted:
            corrupted.add(request.index)
            return ChunkReply(
                reply.bundle, reply.chunk_size, "chunk", reply.index, b"x" + reply.data[1:]
            )
        return reply

    fetch = ChunkFetch(delivery_of(data), hashlib.sha256(data).hexdigest(), len(data), REPLY)
    sent = run(fetch, answer)
    assert fetch.failure is None and fetch.counts.refused == 2
    assert [r.index for r in sent if r.part == "chunk"].count(3) == 2


def test_a_forged_manifest_is_refused_and_fetched_again() -> None:
    data = bundle(20)
    forged = [True]

    def answer(request: ChunkRequest) -> ChunkReply:
        reply = serve(data, request)
        if request.part == "manifest" and forged[0]:
            forged[0] = False
            return ChunkReply(
                reply.bundle, reply.chunk_size, "manifest", 0, b"\0" * len(reply.data)
            )
        return reply

    fetch = ChunkFetch(delivery_of(data), hashlib.sha256(data).hexdigest(), len(data), REPLY)
    sent = run(fetch, answer)
    assert fetch.failure is None and fetch.counts.bad_manifests == 1
    assert [r.part for r in sent].count("manifest") == 2


def test_lost_replies_are_asked_for_again_after_the_timeout_and_duplicates_dropped() -> None:
    data = bundle(12)
    lost: set[int] = set()

    def answer(request: ChunkRequest) -> ChunkReply | None:
        if request.part == "chunk" and request.index % 4 == 1 and request.index not in lost:
            lost.add(request.index)
            return None
        return serve(data, request)

    settings = FetchSettings(window=3, timeout_s=5.0)
    fetch = ChunkFetch(
        delivery_of(data), hashlib.sha256(data).hexdigest(), len(data), REPLY, settings
    )
    run(fetch, answer)
    assert fetch.failure is None and fetch.counts.resent == 3
    fetch.receive(serve(data, ChunkRequest(fetch.bundle_sha256, CHUNK, "chunk", 1, REPLY)))
    assert fetch.counts.stray == 1


def test_after_a_lost_connection_everything_outstanding_is_asked_for_at_once() -> None:
    data = bundle(10)
    fetch = ChunkFetch(delivery_of(data), hashlib.sha256(data).hexdigest(), len(data), REPLY)
    first = fetch.due(0.0)
    assert [(r.part, r.index) for r in first] == [("manifest", 0)]
    assert fetch.due(1.0) == [] and fetch.next_deadline() == 10.0
    fetch.forget_outstanding()
    assert [(r.part, r.index) for r in fetch.due(1.5)] == [("manifest", 0)]


def test_the_window_bounds_requests_and_held_chunks() -> None:
    data = bundle(40)
    settings = FetchSettings(window=4)
    fetch = ChunkFetch(
        delivery_of(data), hashlib.sha256(data).hexdigest(), len(data), REPLY, settings
    )
    for request in fetch.due(0.0):
        fetch.receive(serve(data, request))
    chunk_requests = fetch.due(0.0)
    assert [r.index for r in chunk_requests] == [0, 1, 2, 3]
    for request in chunk_requests[1:]:  # chunk 0 is missing: 1..3 wait, nothing new is asked
        fetch.receive(serve(data, request))
    assert fetch.due(0.0) == [] and fetch.held_bytes == 3 * CHUNK and fetch.received == 0
    fetch.receive(serve(data, chunk_requests[0]))
    assert fetch.received == 4 * CHUNK and fetch.held_bytes == 0
    assert [r.index for r in fetch.due(0.0)] == [4, 5, 6, 7]


@pytest.mark.parametrize(("error", "refused"), [("unknown_bundle", True), ("unavailable", False)])
def test_a_server_refusal_ends_the_fetch_but_unavailable_is_retried(
    error: str, refused: bool
) -> None:
    data = bundle(5)
    fetch = ChunkFetch(delivery_of(data), hashlib.sha256(data).hexdigest(), len(data), REPLY)
    (request,) = fetch.due(0.0)
    fetch.receive(ChunkReply.refusal(request, error, "no such bundle here"))
    assert fetch.finished is refused
    if refused:
        assert fetch.failure is not None and "unknown_bundle" in fetch.failure
    else:
        assert fetch.counts.unavailable == 1 and fetch.due(20.0) == [request]


def test_a_notice_whose_sha256_disagrees_with_its_manifest_is_refused_at_the_end() -> None:
    data = bundle(6)
    fetch = ChunkFetch(delivery_of(data), "00" * 32, len(data), REPLY)
    run(fetch, lambda r: serve(data, r))
    assert fetch.failure is not None and "sha256" in fetch.failure


def test_a_manifest_that_never_matches_the_signed_digest_ends_the_fetch() -> None:
    data = bundle(8)
    signed_for_other = delivery_of(bundle(8, tail=99))
    fetch = ChunkFetch(signed_for_other, hashlib.sha256(data).hexdigest(), len(data), REPLY)
    run(fetch, lambda r: serve(data, r))
    assert fetch.counts.bad_manifests == 3
    assert fetch.failure is not None and "does not match the signed notice" in fetch.failure
