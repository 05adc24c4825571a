"""The chunked MQTT fetch against a fake link and an in-memory chunk server: flow control, lost
requests, corrupted chunks, a forged manifest, resuming after a kill, an outage, a bad notice.

No broker: the fake link answers each request on the event loop, with hooks to drop, corrupt,
hold back or refuse. Timeouts are tiny; no verdict depends on speed (they only bound hangs).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_agent.metrics import AgentMetrics
from edge_agent.updater import chunked
from edge_agent.updater.chunk_files import read_record
from edge_agent.updater.chunked import MANIFEST_ATTEMPTS, ChunkFetcher, FetchOptions
from edge_agent.updater.download import DownloadError, part_path
from edge_agent.updater.machine import Release
from edge_bundle.chunk_window import RequestWindow
from edge_bundle.chunks import (
    ChunkedDelivery,
    ChunkReply,
    ChunkRequest,
    build_manifest,
    describe,
    manifest_page,
    reply_topic,
)

CHUNK = 4096
TOPIC = reply_topic("plant", "box1")
OPTIONS = FetchOptions(window=4, timeout_s=0.05, stall_s=30.0)


@dataclass
class FakeServer:
    """Answers chunk requests from one bundle, with faults on demand."""

    data: bytes
    manifest: bytes
    delivery: ChunkedDelivery
    drop_first: set[int] = field(default_factory=set)  # chunks whose first request is lost
    corrupt_first: set[int] = field(default_factory=set)  # chunks whose first reply is bad
    duplicate: bool = False  # every reply sent twice, plus one nobody asked for
    # Answer only this many distinct chunks (again when asked again: a resend under load), then
    # hold the requests for any other.
    answer_chunks: int | None = None
    error: str | None = None  # refuse every request with this error
    requests: list[ChunkRequest] = field(default_factory=list)
    answered: Counter[str] = field(default_factory=Counter)
    answered_chunks: set[int] = field(default_factory=set)

    def answer(self, request: ChunkRequest) -> list[bytes]:
        key = (request.part, request.index)
        self.requests.append(request)
        asked = sum(1 for r in self.requests if (r.part, r.index) == key)
        if self.error is not None:
            return [ChunkReply.refusal(request, self.error, "no such bundle here").encode()]
        if request.part == "manifest":
            data = manifest_page(self.manifest, request.index, CHUNK)
        else:
            if request.index in self.drop_first and asked == 1:
                return []
            if (
                self.answer_chunks is not None
                and request.index not in self.answered_chunks
                and len(self.answered_chunks) >= self.answer_chunks
            ):
                return []
            self.answered_chunks.add(request.index)
            start = request.index * CHUNK
            data = self.data[start : start + CHUNK]
            if request.index in self.corrupt_first and asked == 1:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.answered[request.part] += 1
        reply = ChunkReply(request.bundle, CHUNK, request.part, request.index, data).encode()
        if not self.duplicate:
            return [reply]
        stray = ChunkReply(request.bundle, CHUNK, "chunk", self.delivery.chunks - 1, b"x")
        return [reply, reply, stray.encode()]

    def asked(self, part: str = "chunk") -> list[int]:
        return [r.index for r in self.requests if r.part == part]


class FakeLink:
    """The `ChunkLink` port: requests go to the fake server, replies come back on the loop."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.connected = True
        self.connection = 1
        self.sent_while_down = 0
        self.handler: Callable[[bytes], None] | None = None
        self.open: set[tuple[str, int]] = set()  # asked for, no answer delivered yet
        self.most_open = 0

    @property
    def reply_topic(self) -> str:
        return TOPIC

    def listen(self, handler: Callable[[bytes], None]) -> None:
        self.handler = handler

    def request(self, payload: bytes) -> None:
        if not self.connected:
            self.sent_while_down += 1
            return
        request = ChunkRequest.decode(payload)
        self.open.add((request.part, request.index))
        self.most_open = max(self.most_open, len(self.open))
        loop = asyncio.get_running_loop()
        for reply in self.server.answer(request):
            loop.call_soon(self._deliver, reply)

    def _deliver(self, payload: bytes) -> None:
        reply = ChunkReply.decode(payload)
        self.open.discard((reply.part, reply.index))
        assert self.handler is not None
        self.handler(payload)


@dataclass
class Setup:
    directory: Path
    release: Release
    server: FakeServer
    metrics: AgentMetrics = field(default_factory=AgentMetrics)
    progress: list[tuple[int, int, int, str]] = field(default_factory=list)

    def fetcher(self, options: FetchOptions = OPTIONS) -> tuple[ChunkFetcher, FakeLink]:
        link = FakeLink(self.server)
        fetcher = ChunkFetcher(link, options, self.metrics)
        link.listen(fetcher.on_reply)
        return fetcher, link

    async def report(self, held: int, total: int, size: int, note: str) -> None:
        self.progress.append((held, total, size, note))

    async def fetch(self, fetcher: ChunkFetcher) -> None:
        await asyncio.wait_for(
            fetcher.fetch(self.release, self.directory, progress=self.report), 60
        )

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "lineside_update_chunks_total", {"outcome": outcome}
        )
        return value or 0.0

    @property
    def part(self) -> Path:
        return part_path(self.directory, self.release)


def make_setup(tmp_path: Path, *, chunks: int = 40, **release: object) -> Setup:
    data = os.urandom(CHUNK * (chunks - 1) + 1000)
    bundle = tmp_path / "bundle.bin"
    bundle.write_bytes(data)
    delivery = describe(bundle, CHUNK)
    manifest = build_manifest(bundle, CHUNK)
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "name": "defects",
        "version": 2,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "url": None,
        "sequence": 1,
        "issued_at": now,
        "expires_at": now + timedelta(days=1),
        "critical": ("mqtt_chunks",),
        "chunked": delivery,
        **release,
    }
    server = FakeServer(data, manifest, delivery)
    return Setup(tmp_path / "downloads", Release(**values), server)  # type: ignore[arg-type]


def test_a_bundle_arrives_whole_with_the_window_never_exceeded(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    fetcher, link = setup.fetcher()
    asyncio.run(setup.fetch(fetcher))
    assert setup.part.read_bytes() == setup.server.data
    assert link.most_open == OPTIONS.window  # used, never exceeded
    assert sorted(setup.server.asked()) == list(range(40))  # each chunk asked for once
    assert setup.server.asked("manifest") == [0]  # 40 digests fit one page
    assert setup.count("fetched") == 41 and setup.count("refused") == 0
    assert setup.progress[-1][:3] == (40, 40, len(setup.server.data))
    assert len(setup.progress) <= 12  # now and then, not per chunk


def test_a_lost_request_is_sent_again_after_its_timeout(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.server.drop_first = {3, 17}
    fetcher, _ = setup.fetcher()
    asyncio.run(setup.fetch(fetcher))
    assert setup.part.read_bytes() == setup.server.data
    asked = Counter(setup.server.asked())
    assert asked[3] == 2 and asked[17] == 2
    assert setup.count("resent") >= 2


def test_a_corrupted_chunk_is_refused_and_fetched_again(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.server.corrupt_first = {5}
    fetcher, _ = setup.fetcher()
    asyncio.run(setup.fetch(fetcher))
    assert setup.part.read_bytes() == setup.server.data
    assert Counter(setup.server.asked())[5] == 2
    assert setup.count("refused") == 1


def test_replies_not_asked_for_or_already_held_are_ignored(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.server.duplicate = True
    fetcher, _ = setup.fetcher()
    asyncio.run(setup.fetch(fetcher))
    assert setup.part.read_bytes() == setup.server.data
    assert setup.count("fetched") == 41
    assert setup.count("ignored") >= 2 * 41


def test_an_altered_manifest_is_refused_after_a_bounded_number_of_tries(tmp_path: Path) -> None:
    real = make_setup(tmp_path)
    forged = ChunkedDelivery(CHUNK, 40, hashlib.sha256(b"another manifest").hexdigest())
    setup = make_setup(tmp_path, chunked=forged)
    setup.server = real.server
    fetcher, _ = setup.fetcher()
    with pytest.raises(DownloadError) as refused:
        asyncio.run(setup.fetch(fetcher))
    assert not refused.value.retry
    assert "manifest" in str(refused.value) and "publish the notice again" in str(refused.value)
    assert setup.server.asked("manifest") == [0] * MANIFEST_ATTEMPTS
    assert setup.server.asked("chunk") == []


def test_a_finished_file_with_the_wrong_sha256_is_refused(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, sha256="0" * 64)
    fetcher, _ = setup.fetcher()
    with pytest.raises(DownloadError) as refused:
        asyncio.run(setup.fetch(fetcher))
    assert not refused.value.retry
    assert "sha256 does not match" in str(refused.value)


def test_an_unknown_bundle_fails_the_step_as_retryable_with_the_servers_message(
    tmp_path: Path,
) -> None:
    setup = make_setup(tmp_path)
    setup.server.error = "unknown_bundle"
    fetcher, _ = setup.fetcher()
    with pytest.raises(DownloadError) as failed:
        asyncio.run(setup.fetch(fetcher))
    assert failed.value.retry
    assert "unknown_bundle" in str(failed.value) and "no such bundle here" in str(failed.value)


def test_after_a_kill_only_the_missing_chunks_are_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunked, "FLUSH_EVERY", 4)
    setup = make_setup(tmp_path)
    setup.server.answer_chunks = 22  # then the server holds every request

    async def first_run() -> None:
        fetcher, _ = setup.fetcher()
        task = asyncio.create_task(
            fetcher.fetch(setup.release, setup.directory, progress=setup.report)
        )
        while len(read_record(setup.part)) < 20:  # 5 batches of 4 fsynced and recorded
            assert not task.done()
            await asyncio.sleep(0.01)
        task.cancel()  # a stop: it records what it wrote (the real SIGKILL is an integration test)
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(first_run())
    recorded = read_record(setup.part)
    assert 20 <= len(recorded) <= 22
    setup.server.answer_chunks = None
    setup.server.requests.clear()
    fetcher, _ = setup.fetcher()
    asyncio.run(setup.fetch(fetcher))
    assert setup.part.read_bytes() == setup.server.data
    assert sorted(setup.server.asked()) == sorted(set(range(40)) - recorded)
    assert setup.server.asked("manifest") == []  # kept beside the part file
    notes = [note for *_, note in setup.progress]
    assert f"resumed with {len(recorded)} of 40 chunks held" in notes


def test_a_broker_outage_pauses_the_fetch_and_open_requests_go_again(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.server.answer_chunks = 10

    async def run() -> None:
        fetcher, link = setup.fetcher(FetchOptions(window=4, timeout_s=30.0, stall_s=0.3))
        task = asyncio.create_task(setup.fetch(fetcher))
        while setup.server.answered["chunk"] < 10:
            await asyncio.sleep(0.01)
        link.connected = False
        asked_before = len(setup.server.requests)
        await asyncio.sleep(0.6)  # longer than stall_s: an outage must not fail the fetch
        assert not task.done()
        assert len(setup.server.requests) == asked_before and link.sent_while_down == 0
        setup.server.answer_chunks = None
        link.connected, link.connection = True, link.connection + 1
        await task  # requests sent on the old connection went again at once (timeout is 30 s)

    asyncio.run(run())
    assert setup.part.read_bytes() == setup.server.data


def test_a_newer_notice_ends_the_fetch_at_once(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.server.answer_chunks = 5
    wanted = True

    async def run() -> None:
        fetcher, _ = setup.fetcher()
        task = asyncio.create_task(
            fetcher.fetch(
                setup.release, setup.directory, progress=setup.report, wanted=lambda: wanted
            )
        )
        while setup.server.answered["chunk"] < 5:
            await asyncio.sleep(0.01)
        nonlocal wanted
        wanted = False
        with pytest.raises(DownloadError, match="superseded"):
            await asyncio.wait_for(task, 30)

    asyncio.run(run())


def test_the_window_backs_off_and_a_reconnect_makes_open_requests_due_at_once() -> None:
    window = RequestWindow(range(5), size=2, timeout_s=1.0, max_timeout_s=3.0)
    assert window.to_send(0.0) == [0, 1]  # the window is full
    assert window.to_send(0.5) == []
    assert window.to_send(1.0) == [0, 1]  # due again after 1 s
    assert window.next_deadline() == 3.0  # ... then after 2 s
    assert window.to_send(3.0) == [0, 1] and window.next_deadline() == 6.0  # capped at 3 s
    assert window.take(0) and not window.take(0)  # a second answer is ignored
    assert window.to_send(3.1) == []  # 0 is being checked: it still holds its place
    window.refused(0)
    assert window.to_send(3.2) == [0]  # refused: asked again first
    window.resend_all()
    assert sorted(window.to_send(3.3)) == [0, 1]
    for index in (0, 1):
        window.take(index)
        window.stored(index)
    assert window.to_send(3.4) == [2, 3] and window.remaining == 3 and not window.done


def test_a_stop_that_arrives_with_a_reply_stops_the_fetch(tmp_path: Path) -> None:
    """Cancelled in the same turn of the event loop as a reply arrives, the fetch stops. (With
    `asyncio.wait_for` around the reply queue, Python 3.11 returned the reply and dropped the
    cancellation: the fetch went on until it stalled.)"""
    setup = make_setup(tmp_path)
    setup.server.answer_chunks = 10  # then the server holds every request: a lost stop stalls

    async def run() -> None:
        fetcher, link = setup.fetcher(FetchOptions(window=4, timeout_s=30.0, stall_s=5.0))
        task = asyncio.create_task(
            fetcher.fetch(setup.release, setup.directory, progress=setup.report)
        )
        deliver = link._deliver

        def deliver_then_stop(payload: bytes) -> None:
            deliver(payload)
            if ChunkReply.decode(payload).index == 5:
                task.cancel()

        link._deliver = deliver_then_stop  # type: ignore[method-assign]
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 10)

    asyncio.run(run())
