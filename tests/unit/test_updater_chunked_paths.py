"""Which path a box fetches a bundle by (`update_fetch` and what the notice offers), the release
kept in state.json with its chunked delivery (and an old state.json without it), and whole updates
through the runner over a fake chunk link: committed without HTTP, or refused with a clear reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings
from edge_agent.updater import persist
from edge_agent.updater.machine import (
    NoticeReceived,
    Release,
    UpdateState,
    check_notice,
    fetch_path,
)
from edge_agent.updater.runner import Updater
from edge_bundle.chunks import (
    MQTT_CHUNKS_EXTENSION,
    ChunkedDelivery,
    ChunkReply,
    ChunkRequest,
    build_manifest,
    chunk_count,
    describe,
    manifest_page,
    reply_topic,
)
from edge_bundle.profiles import load_profile
from edge_bundle.signing import TrustStore
from tests.unit.device_fakes import FakePublisher, wait_until
from tests.unit.test_updater_runner import NOTICE_TOPIC, URL, FakeModels, Fleet, fleet
from tests.update_support import signed_notice

__all__ = ["fleet"]  # the fixture, shared with the runner's tests
CHUNK = 4096
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def release(*, url: str | None, chunks: bool) -> Release:
    delivery = ChunkedDelivery(CHUNK, chunk_count(10_000, CHUNK), "b" * 64) if chunks else None
    return Release(
        name="defects",
        version=2,
        sha256="a" * 64,
        size=10_000,
        url=url,
        sequence=5,
        issued_at=NOW,
        expires_at=NOW + timedelta(days=1),
        critical=(MQTT_CHUNKS_EXTENSION,) if chunks else (),
        chunked=delivery,
    )


@pytest.mark.parametrize(
    ("url", "chunks", "setting", "mqtt", "expected"),
    [
        (URL, True, "auto", True, "http"),  # auto: the URL when there is one
        (None, True, "auto", True, "mqtt"),  # ... else MQTT
        (URL, True, "mqtt", True, "mqtt"),  # mqtt: whenever it is offered
        (URL, False, "mqtt", True, "http"),  # ... else the URL
        (None, True, "http", True, None),  # http: never MQTT
        (None, True, "auto", False, None),  # MQTT offered, but this agent has no MQTT
        (None, True, "mqtt", False, None),
        (URL, True, "mqtt", False, "http"),
        (URL, False, "http", True, "http"),
    ],
)
def test_the_fetch_path_follows_the_setting_and_the_notice(
    url: str | None, chunks: bool, setting: Any, mqtt: bool, expected: str | None
) -> None:
    assert fetch_path(release(url=url, chunks=chunks), setting, mqtt) == expected


def test_a_notice_this_box_cannot_fetch_is_refused_with_what_to_do() -> None:
    mqtt_only = release(url=None, chunks=True)
    event = NoticeReceived(mqtt_only, NOW, 1, fetch="http", mqtt_chunks=True)
    reason = check_notice(UpdateState(), event)
    assert reason is not None and "only in chunks over MQTT" in reason
    assert "set update_fetch to 'auto' or 'mqtt'" in reason
    event = NoticeReceived(mqtt_only, NOW, 1, fetch="auto", mqtt_chunks=False)
    reason = check_notice(UpdateState(), event)
    assert reason is not None and "enable MQTT or publish the bundle with a URL" in reason
    assert check_notice(UpdateState(), replace(event, mqtt_chunks=True)) is None


def test_the_chunked_release_survives_state_json_and_an_old_state_json_still_loads(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    state = UpdateState(phase="downloading", release=release(url=None, chunks=True))
    persist.save(path, state)
    assert persist.load(path) == state
    old = state.to_json()
    del old["release"]["chunked"]  # written by agent 0.3.0
    old["release"]["url"] = URL
    path.write_text(json.dumps(old))
    loaded = persist.load(path)
    assert loaded.release is not None
    assert (loaded.release.chunked, loaded.release.url, loaded.phase) == (None, URL, "downloading")


class ServedLink:
    """A `ChunkLink` answering from one bundle file on the event loop."""

    def __init__(self, bundle: Path) -> None:
        self.data = bundle.read_bytes()
        self.manifest = build_manifest(bundle, CHUNK)
        self.connected = True
        self.connection = 1
        self.requests: list[ChunkRequest] = []
        self.handler: Callable[[bytes], None] | None = None

    @property
    def reply_topic(self) -> str:
        return reply_topic("plant", "box1")

    def listen(self, handler: Callable[[bytes], None]) -> None:
        self.handler = handler

    def request(self, payload: bytes) -> None:
        request = ChunkRequest.decode(payload)
        self.requests.append(request)
        if request.part == "manifest":
            data = manifest_page(self.manifest, request.index, CHUNK)
        else:
            data = self.data[request.index * CHUNK : (request.index + 1) * CHUNK]
        reply = ChunkReply(request.bundle, CHUNK, request.part, request.index, data)
        assert self.handler is not None
        asyncio.get_running_loop().call_soon(self.handler, reply.encode())


def chunk_notice(fleet: Fleet, *, url: str | None, sequence: int = 1) -> bytes:
    delivery = describe(fleet.update.path, CHUNK)
    extensions = {"critical": [MQTT_CHUNKS_EXTENSION], MQTT_CHUNKS_EXTENSION: delivery.to_json()}
    return signed_notice(
        fleet.key, fleet.update.path, url, sequence=sequence, extensions=extensions
    )  # type: ignore[arg-type]


def run_update(
    fleet: Fleet, settings: AgentSettings, notice: bytes, link: ServedLink | None, outcome: str
) -> FakePublisher:
    models = FakeModels(settings, fleet.store, load_profile(settings.profile))
    publisher = FakePublisher()
    updater = Updater(
        settings,
        models,  # type: ignore[arg-type]
        publisher,
        AgentMetrics(),
        TrustStore.from_files([settings.release_keys[0]]),
        TrustStore.from_files([]),
        transport=fleet.transport(),
        chunks=link,
    )

    async def run() -> None:
        await updater.start()
        await updater.on_notice(NOTICE_TOPIC, notice)
        await wait_until(
            lambda: any(r["outcome"] == outcome for r in publisher.updates), outcome, 60
        )
        await updater.stop()

    asyncio.run(run())
    return publisher


def test_a_notice_without_url_is_fetched_over_mqtt_and_committed(fleet: Fleet) -> None:
    link = ServedLink(fleet.update.path)
    publisher = run_update(fleet, fleet.settings, chunk_notice(fleet, url=None), link, "committed")
    assert fleet.store.active_version("defects") == 2
    assert fleet.requests == []  # no HTTP at all
    digest = hashlib.sha256(fleet.update.path.read_bytes()).hexdigest()
    assert {r.bundle for r in link.requests} == {digest}
    done = [r for r in publisher.updates if r.get("chunks_total")]
    assert done and done[-1]["chunks"] == done[-1]["chunks_total"]


def test_update_fetch_mqtt_prefers_mqtt_over_a_url(fleet: Fleet) -> None:
    settings = fleet.settings.model_copy(update={"update_fetch": "mqtt"})
    link = ServedLink(fleet.update.path)
    run_update(fleet, settings, chunk_notice(fleet, url=URL), link, "committed")
    assert fleet.requests == [] and link.requests


def test_update_fetch_auto_takes_the_url_when_there_is_one(fleet: Fleet) -> None:
    link = ServedLink(fleet.update.path)
    run_update(fleet, fleet.settings, chunk_notice(fleet, url=URL), link, "committed")
    assert [str(r.url) for r in fleet.requests] == [URL] and link.requests == []


@pytest.mark.parametrize("how", ["http setting", "no mqtt"])
def test_a_notice_offering_only_mqtt_is_refused_where_mqtt_is_not_usable(
    fleet: Fleet, how: str
) -> None:
    settings = fleet.settings
    link: ServedLink | None = ServedLink(fleet.update.path)
    if how == "http setting":
        settings = settings.model_copy(update={"update_fetch": "http"})
    else:
        link = None
    publisher = run_update(fleet, settings, chunk_notice(fleet, url=None), link, "refused")
    refused = [r for r in publisher.updates if r["outcome"] == "refused"]
    assert refused[0]["phase"] == "idle" and "only in chunks over MQTT" in refused[0]["reason"]
    assert fleet.store.active_version("defects") == 1
    assert fleet.requests == [] and (link is None or link.requests == [])


def test_a_transfer_interrupted_by_a_newer_notice_goes_on_with_the_newer_one(
    fleet: Fleet,
) -> None:
    """The old fetch stops at once and the newer release's download starts (no mix-up)."""
    link = ServedLink(fleet.update.path)
    first = chunk_notice(fleet, url=None, sequence=1)
    models = FakeModels(fleet.settings, fleet.store, load_profile(fleet.settings.profile))
    publisher = FakePublisher()
    held: list[bytes] = []
    serve = link.request

    def hold_chunks(payload: bytes) -> None:
        if ChunkRequest.decode(payload).part == "chunk" and not released:
            held.append(payload)
            return
        serve(payload)

    released = False
    link.request = hold_chunks  # type: ignore[method-assign]
    updater = Updater(
        fleet.settings,
        models,  # type: ignore[arg-type]
        publisher,
        AgentMetrics(),
        TrustStore.from_files([fleet.settings.release_keys[0]]),
        TrustStore.from_files([]),
        transport=fleet.transport(),
        chunks=link,
    )

    async def run() -> None:
        nonlocal released
        await updater.start()
        await updater.on_notice(NOTICE_TOPIC, first)
        await wait_until(lambda: bool(held), "chunk requests")
        await updater.on_notice(NOTICE_TOPIC, chunk_notice(fleet, url=None, sequence=2))
        released = True
        for payload in held:
            serve(payload)
        await wait_until(
            lambda: any(r["outcome"] == "committed" for r in publisher.updates), "commit", 60
        )
        await updater.stop()

    asyncio.run(run())
    committed = [r for r in publisher.updates if r["outcome"] == "committed"]
    assert [r["sequence"] for r in committed] == [2]
    superseded = [r for r in publisher.updates if r["outcome"] == "refused"]
    assert [r["sequence"] for r in superseded] == [1]
    assert not any("retrying" in (r["reason"] or "") for r in publisher.updates)
