"""A simulated box's bundle downloads: GET over HTTP, or chunks over MQTT, each checked for real.

`fetch_http` streams the notice's URL through the simulator's shared httpx client into a running
sha256. `MqttFetcher` drives a `fetch.ChunkFetch` on the box's connection: it sends the due
requests (QoS 1, to `REQUEST_TOPIC`) while the box is connected, wakes on each reply or timeout,
and hands the replies arriving on the box's chunk topic to the fetch. Either returns None when
the bundle is good, or the refusal the box reports; a problem that trying again may cure raises
`RetryError` (HTTP) or is retried inside (MQTT: every request is re-sent until answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from edge_bundle.chunks import REQUEST_TOPIC, ChunkedDelivery, ChunkError, ChunkReply
from fleet_controller.simulator.fetch import ChunkFetch, FetchCounts, FetchSettings
from fleet_controller.simulator.rules import Release

log = logging.getLogger(__name__)
#: How often a stalled MQTT fetch says so in a progress report (not at every re-request).
STALL_REPORT_S = 30.0
#: How long a fetch waits, at most, before it looks at the connection again.
IDLE_S = 1.0


class RetryError(Exception):
    """A download problem that trying again later may cure."""


async def fetch_http(http: httpx.AsyncClient, release: Release) -> str | None:
    """GET the bundle and check it like the box: None when good, else the refusal."""
    url = release.url
    if url is None:
        return "the notice names no URL and this box was not given chunks over MQTT"
    digest = hashlib.sha256()
    received = 0
    async with http.stream("GET", url) as response:
        if response.status_code >= 500 or response.status_code == 429:
            raise RetryError(f"the server answered {response.status_code}")
        if response.status_code != 200:
            return f"the server answered {response.status_code} for {url}; check the URL in the release notice"
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            if received > release.size:
                return (
                    f"the server sent more than the {release.size:,} bytes the notice "
                    "declares; the download was aborted"
                )
            digest.update(chunk)
    if received < release.size:
        raise RetryError(f"the download stopped at {received:,} of {release.size:,} bytes")
    if digest.hexdigest() != release.sha256:
        return (
            "the downloaded file's sha256 does not match the release notice (a wrong or "
            "tampered file on the server)"
        )
    return None


@dataclass(frozen=True)
class MqttPort:
    """What a fetch needs of its box: whether it is connected, and a QoS 1 publish."""

    connected: Callable[[], bool]
    publish: Callable[[str, bytes], None]
    stalled: Callable[[str], None]  # report a stall (at most every STALL_REPORT_S)


class MqttFetcher:
    """One box's fetches over MQTT, one at a time; replies go to `on_reply`."""

    def __init__(self, reply: str, port: MqttPort, settings: FetchSettings) -> None:
        self.reply = reply
        self.port = port
        self.settings = settings
        self.totals = FetchCounts()
        self._current: ChunkFetch | None = None
        self._wake: asyncio.Event | None = None

    def on_reply(self, payload: bytes) -> None:
        fetch = self._current
        if fetch is None:
            self.totals.stray += 1
            return
        try:
            reply = ChunkReply.decode(payload)
        except ChunkError as exc:
            log.debug("%s: a malformed chunk reply dropped: %s", self.reply, exc)
            fetch.counts.stray += 1
            return
        fetch.receive(reply)
        if self._wake is not None:
            self._wake.set()

    def on_lost(self) -> None:
        """The connection dropped: what was outstanding is asked for again after it is back."""
        if self._current is not None:
            self._current.forget_outstanding()

    async def fetch(self, release: Release, delivery: ChunkedDelivery) -> str | None:
        """Fetch and check the bundle; None when good, else the refusal."""
        fetch = ChunkFetch(delivery, release.sha256, release.size, self.reply, self.settings)
        loop = asyncio.get_running_loop()
        self._current, self._wake = fetch, asyncio.Event()
        last_stall = loop.time()
        try:
            while not fetch.finished:
                now = loop.time()
                connected = self.port.connected()
                if connected:
                    resent = fetch.counts.resent
                    for request in fetch.due(now):
                        self.port.publish(REQUEST_TOPIC, request.encode())
                    if fetch.counts.resent > resent and now - last_stall >= STALL_REPORT_S:
                        last_stall = now
                        self.port.stalled(
                            f"retrying: {fetch.counts.resent} chunk requests unanswered after "
                            f"{self.settings.timeout_s:g} s ({fetch.received:,} of "
                            f"{release.size:,} bytes so far)"
                        )
                deadline = fetch.next_deadline()
                wait = IDLE_S
                if connected and deadline is not None:
                    wait = min(IDLE_S, max(0.0, deadline - now))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            return fetch.failure
        finally:
            self._add(fetch.counts)
            self._current, self._wake = None, None

    def _add(self, counts: FetchCounts) -> None:
        for name in vars(counts):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(counts, name))
