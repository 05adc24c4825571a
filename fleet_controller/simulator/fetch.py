"""Fetching one bundle in chunks over MQTT as a box does: what to ask for, and checking what
arrives. Pure: no I/O, and the caller passes the time.

`ChunkFetch` first fetches the chunk manifest page by page and checks it against the notice's
signed digest (`ChunkedDelivery.check_manifest`; a wrong manifest is dropped and fetched again),
then the chunks, each checked against its manifest entry (`chunk_ok`) as it arrives; a chunk
that fails is refused and asked for again. Its requests are kept by the agent's own flow control,
`edge_bundle.chunk_window.RequestWindow`: at most `window` parts open (asked for, or arrived and
not yet hashed), so a box holds at most `window` chunks beside the manifest; a request unanswered
after `timeout_s` is asked for again, then after twice as long each time (a lost reply, a broker
restart, a chunk server restarting); a reply nobody is waiting for (the answer to a request sent
twice) is dropped. Chunks are hashed in order into a running sha256, so the simulator never
keeps the bundle: the finished size and sha256 are checked against the notice as an HTTP download
is. A manifest that fails its signed digest `MAX_BAD_MANIFESTS` times ends the fetch: the
notice and the chunk server disagree, and asking again will not change that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from edge_bundle.chunk_window import RequestWindow
from edge_bundle.chunks import ChunkedDelivery, ChunkError, ChunkReply, ChunkRequest, Part

MAX_BAD_MANIFESTS = 3


@dataclass(frozen=True)
class FetchSettings:
    """Flow control of one box's chunk fetch."""

    window: int = 4  # requests outstanding at once
    timeout_s: float = 10.0  # a request unanswered this long is sent again

    def __post_init__(self) -> None:
        if self.window < 1 or self.timeout_s <= 0:
            raise ValueError(
                f"chunk fetch needs window >= 1 and timeout_s > 0, not {self.window} and "
                f"{self.timeout_s}"
            )


@dataclass
class FetchCounts:
    """What one fetch sent and received, for the simulator's statistics."""

    requests: int = 0  # every request sent, first and again
    resent: int = 0  # requests sent again after their timeout
    replies: int = 0  # replies that matched a request
    stray: int = 0  # replies for nothing outstanding (duplicates, another bundle)
    refused: int = 0  # chunks that failed their manifest entry
    bad_manifests: int = 0  # manifests that did not match the signed digest
    unavailable: int = 0  # "unavailable" answers from a chunk server


@dataclass
class ChunkFetch:
    """One bundle's fetch; see the module docstring."""

    delivery: ChunkedDelivery
    bundle_sha256: str
    bundle_size: int
    reply: str  # the box's chunk topic, `edge_bundle.chunks.reply_topic`
    settings: FetchSettings = field(default_factory=FetchSettings)
    counts: FetchCounts = field(default_factory=FetchCounts)
    manifest: bytes | None = None
    failure: str | None = None  # why the fetch is refused, once it is
    finished: bool = False
    received: int = 0  # bytes hashed so far
    _pages: dict[int, bytes] = field(default_factory=dict)
    _ahead: dict[int, bytes] = field(default_factory=dict)  # checked, waiting to be hashed
    _next: int = 0  # the next chunk to hash
    _digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    _part: Part = "manifest"  # what is being fetched now

    def __post_init__(self) -> None:
        self._window = self._new_window(range(self.delivery.manifest_pages))

    @property
    def held_bytes(self) -> int:
        """Chunk bytes held in memory (bounded by `window` chunks)."""
        return sum(len(data) for data in self._ahead.values())

    @property
    def done_fraction(self) -> float:
        return self._next / self.delivery.chunks

    def due(self, now: float) -> list[ChunkRequest]:
        """The requests to send now: timed-out ones again, then new ones up to the window.

        Each is counted as outstanding from `now`; the caller sends them all."""
        if self.finished:
            return []
        resent = self._window.resent
        indices = self._window.to_send(now)
        self.counts.resent += self._window.resent - resent
        self.counts.requests += len(indices)
        return [self._request(self._part, index) for index in indices]

    def next_deadline(self) -> float | None:
        """When the oldest outstanding request times out (None: nothing outstanding)."""
        return None if self.finished else self._window.next_deadline()

    def forget_outstanding(self) -> None:
        """The connection was lost: everything outstanding is asked for again at once."""
        self._window.resend_all()

    def receive(self, reply: ChunkReply) -> None:
        """Take one reply from the box's chunk topic."""
        mine = reply.bundle == self.bundle_sha256 and reply.chunk_size == self.delivery.chunk_size
        if (
            self.finished
            or not mine
            or reply.part != self._part
            or not self._window.asking(reply.index)
        ):
            self.counts.stray += 1
            return
        if reply.error is not None:
            self._refusal(reply)
            return
        self._window.take(reply.index)
        self.counts.replies += 1
        if reply.part == "manifest":
            self._page(reply.index, reply.data)
        else:
            self._chunk(reply.index, reply.data)

    # ---- internals -------------------------------------------------------------------------
    def _new_window(self, indices: Iterable[int]) -> RequestWindow:
        return RequestWindow(indices, size=self.settings.window, timeout_s=self.settings.timeout_s)

    def _request(self, part: Part, index: int) -> ChunkRequest:
        return ChunkRequest(self.bundle_sha256, self.delivery.chunk_size, part, index, self.reply)

    def _refusal(self, reply: ChunkReply) -> None:
        if reply.error == "unavailable":
            self.counts.unavailable += 1  # stays outstanding: asked again after the timeout
            return
        self.failure = (
            f"the chunk server refused {reply.part} {reply.index} of bundle "
            f"{self.bundle_sha256[:12]}: {reply.error} ({reply.message}); check that the chunk "
            "server has the bundle the notice names"
        )
        self.finished = True

    def _page(self, page: int, data: bytes) -> None:
        if len(data) != self.delivery.page_length(page):
            self.counts.bad_manifests += 1
            self._window.refused(page)  # asked for again
            return
        self._pages[page] = data
        self._window.stored(page)
        if len(self._pages) < self.delivery.manifest_pages:
            return
        manifest = b"".join(self._pages[p] for p in range(self.delivery.manifest_pages))
        self._pages.clear()
        try:
            self.delivery.check_manifest(manifest)
        except ChunkError as exc:
            self.counts.bad_manifests += 1
            if self.counts.bad_manifests >= MAX_BAD_MANIFESTS:
                self.failure = f"{exc} ({MAX_BAD_MANIFESTS} times; refused)"
                self.finished = True
            else:  # every page is asked for again
                self._window = self._new_window(range(self.delivery.manifest_pages))
            return
        self.manifest = manifest
        self._part = "chunk"
        self._window = self._new_window(range(self.delivery.chunks))

    def _chunk(self, index: int, data: bytes) -> None:
        manifest = self.manifest
        assert manifest is not None  # chunks are asked for only once it is checked
        if not self.delivery.chunk_ok(manifest, index, data, self.bundle_size):
            self.counts.refused += 1
            self._window.refused(index)  # asked for again, first
            return
        self._ahead[index] = data
        while self._next in self._ahead:
            piece = self._ahead.pop(self._next)
            self._digest.update(piece)
            self._window.stored(self._next)
            self.received += len(piece)
            self._next += 1
        if self._next == self.delivery.chunks:
            self._finish()

    def _finish(self) -> None:
        self.finished = True
        if self.received != self.bundle_size:
            self.failure = (
                f"the chunks add up to {self.received:,} bytes, not the {self.bundle_size:,} the "
                "notice declares"
            )
        elif self._digest.hexdigest() != self.bundle_sha256:
            self.failure = (
                "the bundle fetched over MQTT does not match the release notice's sha256 (every "
                "chunk matched the signed manifest, so the notice's digests disagree)"
            )
