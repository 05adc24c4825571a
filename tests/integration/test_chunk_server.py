"""The chunk server against a real Mosquitto: in-process for what it answers, and as a real
`fleet-controller chunk-server` process SIGKILLed in the middle of a transfer and started
again, after which the transfer completes from the requests the broker kept for it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import pytest

from edge_bundle.chunks import ChunkRequest, reply_topic
from fleet_controller.chunks.store import ChunkStore
from tests.chunk_support import (
    ChunkFetcher,
    ChunkServerProcess,
    ask_once,
    running_chunk_server,
    write_chunk_config,
)
from tests.fleet_support import wait_for
from tests.mqtt_support import running_broker

pytestmark = pytest.mark.timeout(180)

CHUNK = 16 * 1024


def random_bundle(path: Path, size: int) -> tuple[Path, str]:
    path.write_bytes(os.urandom(size))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_bundle_is_fetched_and_bad_requests_are_answered_or_dropped(tmp_path: Path) -> None:
    bundle, digest = random_bundle(tmp_path / "model.bundle", 20 * CHUNK + 7)
    with (
        running_broker(tmp_path / "broker") as broker,
        running_chunk_server(broker.port, tmp_path / "chunks") as chunks,
    ):
        delivery = chunks.publish(bundle, CHUNK)
        fetcher = ChunkFetcher(broker.port, digest, bundle.stat().st_size, delivery, window=6)
        assert fetcher.fetch(deadline_s=60) == bundle.read_bytes()
        assert fetcher.refused_chunks == 0
        stats = chunks.stats()
        assert stats["chunks"] >= delivery.chunks and stats["manifest_pages"] >= 1

        reply_to = reply_topic("test-site", "asker")
        unknown = ask_once(broker.port, ChunkRequest("ab" * 32, CHUNK, "chunk", 0, reply_to))
        assert unknown is not None and unknown.error == "unknown_bundle"
        assert unknown.message is not None and "chunks add" in unknown.message
        beyond = ask_once(broker.port, ChunkRequest(digest, CHUNK, "chunk", 21, reply_to))
        assert beyond is not None and beyond.error == "bad_request" and beyond.data == b""
        odd_size = ask_once(broker.port, ChunkRequest(digest, 5000, "manifest", 0, reply_to))
        assert odd_size is not None and odd_size.error == "bad_request"
        assert odd_size.message is not None and "16384" in odd_size.message

        # Garbage, and a request whose reply topic is not a box's chunk topic: no answer, counted.
        assert ask_once(broker.port, b"not json", wait_s=0.5) is None
        elsewhere = json.dumps(
            {"bundle": digest, "chunk_size": CHUNK, "part": "chunk", "index": 0,
             "reply": "lineside/v1/plant/box/release"}
        ).encode()  # fmt: skip
        assert ask_once(broker.port, elsewhere, wait_s=0.5) is None
        wait_for(lambda: chunks.stats()["dropped"] == 2 or None, 30, "two dropped requests")
        assert chunks.stats()["refused"] == 3


def test_two_servers_in_one_group_share_the_requests(tmp_path: Path) -> None:
    bundle, digest = random_bundle(tmp_path / "model.bundle", 40 * CHUNK)
    store = tmp_path / "chunks"
    with (
        running_broker(tmp_path / "broker") as broker,
        running_chunk_server(broker.port, store, client_id="chunks-1") as one,
        running_chunk_server(broker.port, store, client_id="chunks-2") as two,
    ):
        delivery = one.publish(bundle, CHUNK)
        fetcher = ChunkFetcher(broker.port, digest, bundle.stat().st_size, delivery, window=8)
        assert fetcher.fetch(deadline_s=60) == bundle.read_bytes()
        served = one.stats()["chunks"], two.stats()["chunks"]
        assert sum(served) >= delivery.chunks and min(served) > 0, served


def test_a_killed_chunk_server_restarts_and_the_transfer_completes(tmp_path: Path) -> None:
    bundle, digest = random_bundle(tmp_path / "model.bundle", 96 * CHUNK + 100)
    store = ChunkStore(tmp_path / "chunks")
    _, delivery = store.publish(bundle, CHUNK)
    with running_broker(tmp_path / "broker") as broker:
        config = write_chunk_config(tmp_path, broker.port, store.directory)
        server = ChunkServerProcess(config, tmp_path / "chunk-server.log").start()
        halfway = threading.Event()
        fetcher = ChunkFetcher(
            broker.port, digest, bundle.stat().st_size, delivery, window=4,
            # Long: a request lost with the server would show as a repeat; none is expected.
            timeout_s=60.0,
        )  # fmt: skip
        got: list[bytes] = []
        fetched: list[int] = []

        def on_chunk(index: int) -> None:
            fetched.append(index)
            if len(fetched) == 30:
                halfway.set()

        thread = threading.Thread(
            target=lambda: got.append(fetcher.fetch(deadline_s=150, on_chunk=on_chunk))
        )
        thread.start()
        try:
            assert halfway.wait(60), "the transfer did not start"
            server.kill()
            killed_at = len(fetched)
            server.start()
            thread.join(160)
        finally:
            server.stop()
        assert got == [bundle.read_bytes()]
        assert killed_at < delivery.chunks, "the transfer ended before the kill"
        assert fetcher.repeated == 0  # the broker kept every request for the restarted server
        second_run = server.log.read_text().rsplit("chunk server serving", 1)[1]
        served = re.search(r"stopped: \{'chunks': (\d+)", second_run)
        assert served is not None and int(served.group(1)) > 0, second_run
