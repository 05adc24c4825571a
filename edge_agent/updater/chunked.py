"""Fetching a bundle in chunks over MQTT (`edge_bundle.chunks`), resumable and checked piece by piece.

The fetch asks for the chunk manifest first (in pages), checks it against the digest the signed
notice carries (a wrong one is fetched again, `MANIFEST_ATTEMPTS` times in all, then the download
is refused), keeps it beside the `.part` file, then asks for the chunks this box does not hold yet,
at most `update_chunk_window` open at once (`edge_bundle.chunk_window.RequestWindow`). Each chunk is checked against
its manifest entry before it is written at its offset; a chunk that fails is counted and asked for
again. Replies nobody asked for, or for chunks already held, are ignored. Requests left unanswered
are sent again, backing off; while the broker is away nothing is sent and nothing times out, and
every open request is sent again once it is back. Chunks are fsynced and recorded in batches
(`chunk_files`), so after a SIGKILL only the chunks not recorded are asked for again. Finally the
whole file is read once: every chunk checked again, and the file's sha256 and size must be the
notice's, as for an HTTP download.

The fetch talks to the broker only through the `ChunkLink` port: the updater never imports the
MQTT transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.device.ports import ChunkLink
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings
from edge_agent.updater.chunk_files import ChunkFiles
from edge_agent.updater.download import DownloadError
from edge_agent.updater.machine import Release
from edge_bundle.chunk_window import RequestWindow
from edge_bundle.chunks import ChunkedDelivery, ChunkError, ChunkReply, ChunkRequest, Part

log = logging.getLogger(__name__)
#: A manifest that does not match the signed digest is fetched this many times in all.
MANIFEST_ATTEMPTS = 3
#: One chunk refused this many times: the server's file is not the notice's bundle.
MAX_REFUSALS = 5
#: Chunks are fsynced and recorded after this many, or this long after the first unrecorded one.
FLUSH_EVERY = 64
FLUSH_S = 1.0
#: Progress is reported each time this share of the chunks more is held, or after this long.
PROGRESS_SHARE = 0.1
PROGRESS_S = 60.0
#: The longest the fetch sleeps before it looks at the connection and its deadlines again.
TICK_S = 0.25

#: (chunks held, chunks in all, bytes held, a note) -> a progress report.
Progress = Callable[[int, int, int, str], Awaitable[None]]


@dataclass(frozen=True)
class FetchOptions:
    window: int = 8
    timeout_s: float = 10.0
    stall_s: float = 300.0

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> FetchOptions:
        return cls(
            settings.update_chunk_window,
            settings.update_chunk_timeout_s,
            settings.update_chunk_stall_s,
        )


class ChunkFetcher:
    """One per updater: fetches one bundle at a time; replies reach it through `on_reply`."""

    def __init__(
        self,
        link: ChunkLink,
        options: FetchOptions,
        metrics: AgentMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link = link
        self.options = options
        self.metrics = metrics
        self.clock = clock
        self._transfer: _Transfer | None = None

    def on_reply(self, payload: bytes) -> None:
        """A message on this box's chunk topic (called on the event loop; cheap)."""
        transfer = self._transfer
        try:
            reply = ChunkReply.decode(payload)
        except ChunkError as exc:
            log.debug("ignoring a malformed chunk reply: %s", exc)
            reply = None
        if transfer is None or reply is None or not transfer.offer(reply):
            self.metrics.update_chunks.labels("ignored").inc()

    async def fetch(
        self,
        release: Release,
        directory: Path,
        *,
        progress: Progress,
        wanted: Callable[[], bool] = lambda: True,
    ) -> None:
        """Fetch `release` into its `.part` file in `directory`; `DownloadError` when it fails
        (`retry` for what trying again can fix). `wanted()` turning False (a newer notice) ends
        the fetch at once, keeping what it has."""
        delivery = release.chunked
        if delivery is None:
            raise DownloadError("the notice offers no chunks over MQTT", retry=False)
        files = ChunkFiles(directory, release, delivery)
        transfer = _Transfer(self, release, delivery, files, progress, wanted)
        self._transfer = transfer
        try:
            await transfer.run()
        finally:
            self._transfer = None
            await asyncio.to_thread(files.close)


class _Transfer:
    """The fetch of one release: its files, its window, the replies waiting to be handled."""

    def __init__(
        self,
        fetcher: ChunkFetcher,
        release: Release,
        delivery: ChunkedDelivery,
        files: ChunkFiles,
        progress: Progress,
        wanted: Callable[[], bool],
    ) -> None:
        self.fetcher = fetcher
        self.link = fetcher.link
        self.options = fetcher.options
        self.counts = fetcher.metrics.update_chunks
        self.clock = fetcher.clock
        self.release = release
        self.delivery = delivery
        self.files = files
        self.progress = progress
        self.wanted = wanted
        self.replies: asyncio.Queue[ChunkReply | None] = asyncio.Queue()
        self.window: RequestWindow | None = None
        self.part: Part = "manifest"
        self.failure: DownloadError | None = None
        self.refusals: Counter[tuple[str, int]] = Counter()
        self._flushed_at = self.clock()
        self._reported = (0, self.clock())

    # ---- replies (event loop, from the link) ---------------------------------------------
    def offer(self, reply: ChunkReply) -> bool:
        """Take a reply if it answers an open request of this fetch; False to ignore it."""
        if reply.bundle != self.release.sha256 or reply.chunk_size != self.delivery.chunk_size:
            return False
        window = self.window
        if reply.part != self.part or window is None or not window.asking(reply.index):
            return False  # not asked for, answered already, or a stale answer from before
        if reply.error is not None:
            if reply.error == "unavailable":
                log.info("chunk server busy for %s %d: asked again later", reply.part, reply.index)
                return True
            self.failure = DownloadError(
                f"the chunk server refused {reply.part} {reply.index} of this bundle "
                f"({reply.error}): {reply.message or 'no message'}",
                retry=True,
            )
            self.replies.put_nowait(None)  # wake the fetch
            return True
        window.take(reply.index)
        self.replies.put_nowait(reply)
        return True

    # ---- the fetch -----------------------------------------------------------------------
    async def run(self) -> None:
        files, delivery = self.files, self.delivery
        manifest = await asyncio.to_thread(files.saved_manifest)
        resumed = manifest is not None
        if manifest is None:
            manifest = await self._manifest()
        held = await asyncio.to_thread(lambda: files.open(resume=resumed))
        if held:
            await self._report(f"resumed with {len(held)} of {delivery.chunks} chunks held")
        for _ in range(2):
            missing = set(range(delivery.chunks)) - files.held
            await self._fetch_chunks(manifest, missing)
            await asyncio.to_thread(files.flush)
            bad, sha256 = await asyncio.to_thread(files.scan, manifest)
            if not bad:
                break
            # Written and recorded, yet wrong on disk now: fetch those again, once.
            log.warning("%d chunks failed the final check; fetching them again", len(bad))
            self.counts.labels("refused").inc(len(bad))
            await asyncio.to_thread(files.forget, bad)
        else:
            raise DownloadError(
                f"{len(bad)} chunks failed the final check twice (the disk of the state "
                "directory may be failing); the download starts over",
                retry=True,
            )
        if sha256 != self.release.sha256:
            raise DownloadError(
                "the assembled bundle's sha256 does not match the release notice, although every "
                "chunk matched the signed chunk manifest: the notice's bundle_sha256 and "
                "mqtt_chunks disagree; publish the notice again",
                retry=False,
            )
        await self._report(f"all {self.delivery.chunks} chunks fetched and checked")

    async def _manifest(self) -> bytes:
        """The chunk manifest, fetched in pages until it matches the signed digest."""
        delivery = self.delivery
        problem = ""
        for attempt in range(1, MANIFEST_ATTEMPTS + 1):
            pages: dict[int, bytes] = {}

            async def page(reply: ChunkReply, pages: dict[int, bytes] = pages) -> bool:
                if len(reply.data) != delivery.page_length(reply.index):
                    return False
                pages[reply.index] = reply.data
                return True

            await self._run_window("manifest", range(delivery.manifest_pages), page)
            manifest = b"".join(pages[index] for index in range(delivery.manifest_pages))
            try:
                delivery.check_manifest(manifest)
            except ChunkError as exc:
                problem = str(exc)
                self.counts.labels("refused").inc(delivery.manifest_pages)
                log.warning("chunk manifest refused (attempt %d): %s", attempt, problem)
                continue
            await asyncio.to_thread(self.files.save_manifest, manifest)
            return manifest
        raise DownloadError(
            f"the chunk manifest was refused {MANIFEST_ATTEMPTS} times: {problem}. The chunk "
            "server does not hold the bundle the notice signed; publish the notice again with "
            "the right mqtt_chunks.manifest_sha256",
            retry=False,
        )

    async def _fetch_chunks(self, manifest: bytes, missing: set[int]) -> None:
        files, delivery, size = self.files, self.delivery, self.release.size

        def check_and_write(index: int, data: bytes) -> bool:
            if not delivery.chunk_ok(manifest, index, data, size):
                return False
            files.write(index, data)
            return True

        async def chunk(reply: ChunkReply) -> bool:
            return await asyncio.to_thread(check_and_write, reply.index, reply.data)

        await self._run_window("chunk", missing, chunk)

    async def _run_window(
        self,
        part: Part,
        indices: Iterable[int],
        handle: Callable[[ChunkReply], Awaitable[bool]],
    ) -> None:
        """Ask for `indices` of `part` with a bounded window until `handle` took each of them."""
        window = RequestWindow(indices, size=self.options.window, timeout_s=self.options.timeout_s)
        self.window, self.part = window, part
        connection = self.link.connection
        last_arrival = self.clock()
        try:
            while not window.done:
                self._check_alive()
                now = self.clock()
                if self.link.connected:
                    if self.link.connection != connection:
                        connection = self.link.connection
                        window.resend_all()  # what was sent on the old connection may be lost
                        last_arrival = now
                    self._send(part, window, now)
                    if now - last_arrival > self.options.stall_s:
                        raise DownloadError(
                            f"no chunk arrived for {self.options.stall_s:.0f} s although the "
                            "broker is connected; is a chunk server running for this bundle?",
                            retry=True,
                        )
                else:
                    last_arrival = now  # a broker outage pauses the fetch; it does not fail it
                reply = await self._next_reply(window, now)
                if reply is not None:
                    await self._handle(part, window, reply, handle)
                    last_arrival = self.clock()
                if part == "chunk":
                    await self._maybe_flush()
            self._check_alive()
        finally:
            self.window = None

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise self.failure
        if not self.wanted():
            raise DownloadError("superseded by a newer notice", retry=False)

    def _send(self, part: Part, window: RequestWindow, now: float) -> None:
        resent_before = window.resent
        for index in window.to_send(now):
            request = ChunkRequest(
                self.release.sha256, self.delivery.chunk_size, part, index, self.link.reply_topic
            )
            self.link.request(request.encode())
            self.counts.labels("requested").inc()
        if window.resent > resent_before:
            self.counts.labels("resent").inc(window.resent - resent_before)

    async def _next_reply(self, window: RequestWindow, now: float) -> ChunkReply | None:
        deadline = window.next_deadline()
        wait = TICK_S if deadline is None else min(TICK_S, max(0.0, deadline - now))
        try:
            # Not asyncio.wait_for: on Python 3.11 it loses a cancellation (a stop) that arrives
            # as the reply does, and the fetch would go on.
            async with asyncio.timeout(max(wait, 0.001)):
                return await self.replies.get()
        except TimeoutError:
            return None

    async def _handle(
        self,
        part: Part,
        window: RequestWindow,
        reply: ChunkReply,
        handle: Callable[[ChunkReply], Awaitable[bool]],
    ) -> None:
        if await handle(reply):
            window.stored(reply.index)
            self.counts.labels("fetched").inc()
            return
        window.refused(reply.index)
        self.counts.labels("refused").inc()
        self.refusals[(part, reply.index)] += 1
        log.warning("%s %d failed its check and is fetched again", part, reply.index)
        if self.refusals[(part, reply.index)] >= MAX_REFUSALS:
            raise DownloadError(
                f"{part} {reply.index} failed its check {MAX_REFUSALS} times: the chunk server's "
                "file is not the bundle the notice signed; fix the server and publish again",
                retry=False,
            )

    async def _maybe_flush(self) -> None:
        files = self.files
        now = self.clock()
        if files.unflushed == 0:
            self._flushed_at = now
            return
        if files.unflushed < FLUSH_EVERY and now - self._flushed_at < FLUSH_S:
            return
        await asyncio.to_thread(files.flush)
        self._flushed_at = self.clock()
        held, reported_at = len(files.held), self._reported[1]
        share = (held - self._reported[0]) / self.delivery.chunks
        if share >= PROGRESS_SHARE or self._flushed_at - reported_at >= PROGRESS_S:
            await self._report(f"{held} of {self.delivery.chunks} chunks fetched over MQTT")

    async def _report(self, note: str) -> None:
        held = self.files.held
        self._reported = (len(held), self.clock())
        size = self.release.size
        held_bytes = sum(self.delivery.chunk_length(index, size) for index in held)
        await self.progress(len(held), self.delivery.chunks, held_bytes, note)
