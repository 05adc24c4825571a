"""Bundles fetched in chunks over MQTT by a real agent process through a real Mosquitto.

The happy path runs against the real chunk server (`fleet_controller.chunks`); the fault tests use
a small chunk server written here, which can corrupt a chunk once and hold back its answers after
a number of chunks (so "mid-transfer" never depends on timing): a notice whose signed manifest
digest was altered, a corrupted chunk, the agent SIGKILLed mid-transfer, the broker killed and
restarted mid-transfer. Bundles are small and chunks 4 KiB, so transfers have ~50 chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import paho.mqtt.client as paho
import pytest
from onnx import numpy_helper
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_agent.updater.chunk_files import read_record
from edge_bundle.chunks import (
    MQTT_CHUNKS_EXTENSION,
    REQUEST_TOPIC,
    ChunkedDelivery,
    ChunkReply,
    ChunkRequest,
    build_manifest,
    describe,
    manifest_page,
)
from tests.agent_support import Keys, build_bundle, make_keys, run_agent, tiny_model
from tests.chunk_support import running_chunk_server
from tests.integration.test_updates import Watcher, predict, publish, update_env
from tests.mqtt_support import Broker, running_broker
from tests.update_support import release_key, signed_notice

CHUNK = 4096
PADDING_FLOATS = 48_000  # ~190 KB of incompressible weights: about 50 chunks of 4 KiB


@dataclass
class Fixture:
    tmp: Path
    keys: Keys
    broker: Broker
    state: Path
    bundle: Path
    signing: Any
    release_pub: Path

    def env(self, **extra: str) -> dict[str, str]:
        return update_env(
            self.broker,
            self.release_pub,
            EDGE_AGENT_PROBATION_S="0.5",
            **extra,
        )

    def notice(self, delivery: ChunkedDelivery, sequence: int = 100) -> bytes:
        extensions = {
            "critical": [MQTT_CHUNKS_EXTENSION],
            MQTT_CHUNKS_EXTENSION: delivery.to_json(),
        }
        return signed_notice(
            self.signing, self.bundle, None, sequence=sequence, extensions=extensions
        )  # type: ignore[arg-type]

    @property
    def part(self) -> Path:
        sha = hashlib.sha256(self.bundle.read_bytes()).hexdigest()
        return self.state / "updater" / "downloads" / f"defects-2-{sha[:12]}.part"


def padded_model(path: Path, seed: int) -> Path:
    """The tiny model plus an unused initializer of random weights (a bigger bundle)."""
    tiny_model(path, seed)
    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    padding = rng.standard_normal(PADDING_FLOATS).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(padding, "padding"))
    onnx.save(model, str(path))
    return path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Fixture]:
    keys = make_keys(tmp_path / "keys")
    v1 = build_bundle(tmp_path / "v1", keys)
    state = tmp_path / "state"
    result = subprocess.run(
        [".venv/bin/edge-agent", "install", str(v1.path), "--state-dir", str(state),
         "--trusted-key", str(keys.public)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    v2 = build_bundle(tmp_path / "v2", keys, version=2, seed=9, model_builder=padded_model)
    signing, public = release_key(tmp_path / "release")
    with running_broker(tmp_path / "broker") as broker:
        yield Fixture(tmp_path, keys, broker, state, v2.path, signing, public)


# ---- a chunk server with faults on demand ------------------------------------------------------
@dataclass
class FaultyChunkServer:
    """Answers chunk requests for one bundle; corrupts chosen chunks once; holds back every answer
    after `serve_chunks` chunks until `resume()`. Records every request as it arrives."""

    port: int
    bundle: Path
    corrupt_once: set[int] = field(default_factory=set)
    serve_chunks: int | None = None
    received: list[ChunkRequest] = field(default_factory=list)
    served: int = 0

    def __post_init__(self) -> None:
        self.data = self.bundle.read_bytes()
        self.manifest = build_manifest(self.bundle, CHUNK)
        self.delivery = describe(self.bundle, CHUNK)
        self._queue: queue.Queue[ChunkRequest | None] = queue.Queue()
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"faulty-chunks-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_connect = lambda c, *_: c.subscribe(REQUEST_TOPIC, 1)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert subscribed.wait(10), "the test chunk server did not subscribe"
        self._worker = threading.Thread(target=self._serve, daemon=True)
        self._worker.start()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        request = ChunkRequest.decode(bytes(message.payload))
        with self._lock:
            self.received.append(request)
        self._queue.put(request)

    def _serve(self) -> None:
        while (request := self._queue.get()) is not None:
            if request.part == "chunk":
                with self._lock:
                    if self.serve_chunks is not None and self.served >= self.serve_chunks:
                        self._open.clear()
                self._open.wait()
            self.client.publish(request.reply, self._reply(request), qos=1)

    def _reply(self, request: ChunkRequest) -> bytes:
        if request.part == "manifest":
            data = manifest_page(self.manifest, request.index, CHUNK)
        else:
            data = self.data[request.index * CHUNK : (request.index + 1) * CHUNK]
            with self._lock:
                self.served += 1
                if request.index in self.corrupt_once:
                    self.corrupt_once.discard(request.index)
                    data = bytes(b ^ 0x5A for b in data[:64]) + data[64:]
        return ChunkReply(request.bundle, CHUNK, request.part, request.index, data).encode()

    @property
    def holding(self) -> bool:
        return not self._open.is_set()

    def resume(self) -> None:
        with self._lock:
            self.serve_chunks = None
        self._open.set()

    def asked(self, part: str = "chunk", since: int = 0) -> list[int]:
        with self._lock:
            return [r.index for r in self.received[since:] if r.part == part]

    def close(self) -> None:
        self._open.set()
        self._queue.put(None)
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def faulty_server(port: int, bundle: Path, **hooks: Any) -> Iterator[FaultyChunkServer]:
    server = FaultyChunkServer(port, bundle, **hooks)
    try:
        yield server
    finally:
        server.close()


def wait(probe: Any, what: str, timeout: float = 60) -> None:
    """A hang guard only: the verdict never depends on how long this takes."""
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def chunk_metric(agent: Any, outcome: str) -> float:
    text = httpx.get(f"{agent.url}/metrics", timeout=10).text
    line = f'lineside_update_chunks_total{{outcome="{outcome}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


# ---- the tests -----------------------------------------------------------------------------------
def test_a_bundle_without_url_comes_from_the_real_chunk_server(setup: Fixture) -> None:
    with (
        running_chunk_server(setup.broker.port, setup.tmp / "chunks") as chunks,
        run_agent(setup.state, "--trusted-key", str(setup.keys.public), env=setup.env()) as agent,
    ):
        delivery = chunks.publish(setup.bundle, chunk_size=CHUNK)
        assert delivery.chunks > 30
        agent.wait_ready()
        watcher = Watcher(setup.broker.port)
        publish(setup.broker, setup.notice(delivery))
        committed = watcher.wait("committed", sequence=100)
        progress = [r for r in watcher.reports() if r.get("chunks_total")]
        watcher.close()
        assert committed["version"] == 2
        assert predict(agent).json()["model"]["version"] == 2
        assert progress and progress[-1]["chunks"] == delivery.chunks
        assert progress[-1]["bytes"] == setup.bundle.stat().st_size
        assert chunks.stats()["chunks"] >= delivery.chunks
        assert chunk_metric(agent, "fetched") == delivery.chunks + delivery.manifest_pages
        assert not setup.part.exists()  # the download and its side files are gone after commit


def test_a_notice_whose_manifest_digest_was_altered_is_refused(setup: Fixture) -> None:
    with (
        faulty_server(setup.broker.port, setup.bundle) as server,
        run_agent(setup.state, "--trusted-key", str(setup.keys.public), env=setup.env()) as agent,
    ):
        agent.wait_ready()
        forged = ChunkedDelivery(
            CHUNK, server.delivery.chunks, hashlib.sha256(b"not the manifest").hexdigest()
        )
        watcher = Watcher(setup.broker.port)
        publish(setup.broker, setup.notice(forged))  # signed by a trusted release key
        refused = watcher.wait("refused", sequence=100)
        watcher.close()
        assert refused["phase"] == "downloading"
        assert "manifest" in refused["reason"] and "refused 3 times" in refused["reason"]
        assert server.asked("manifest") == [0, 0, 0] and server.asked("chunk") == []
        assert predict(agent).json()["model"]["version"] == 1


def test_a_corrupted_chunk_is_refused_and_fetched_again(setup: Fixture) -> None:
    with (
        faulty_server(setup.broker.port, setup.bundle, corrupt_once={7}) as server,
        run_agent(setup.state, "--trusted-key", str(setup.keys.public), env=setup.env()) as agent,
    ):
        agent.wait_ready()
        watcher = Watcher(setup.broker.port)
        publish(setup.broker, setup.notice(server.delivery))
        watcher.wait("committed", sequence=100)
        watcher.close()
        assert server.asked().count(7) == 2
        assert chunk_metric(agent, "refused") == 1
        assert predict(agent).json()["model"]["version"] == 2


def test_an_agent_killed_mid_transfer_resumes_from_the_chunks_it_has(setup: Fixture) -> None:
    with faulty_server(setup.broker.port, setup.bundle, serve_chunks=20) as server:
        total = server.delivery.chunks
        with run_agent(
            setup.state, "--trusted-key", str(setup.keys.public), env=setup.env()
        ) as agent:
            agent.wait_ready()
            publish(setup.broker, setup.notice(server.delivery))
            # 20 chunks served, then nothing: wait until the agent recorded all of them.
            wait(lambda: len(read_record(setup.part)) >= 20, "20 chunks recorded")
            agent.process.kill()
            agent.process.wait(10)
        recorded = read_record(setup.part)
        mark = len(server.received)
        server.resume()
        with run_agent(
            setup.state, "--trusted-key", str(setup.keys.public), env=setup.env()
        ) as agent:
            watcher = Watcher(setup.broker.port)
            watcher.wait("committed", sequence=100)
            watcher.close()
            assert predict(agent).json()["model"]["version"] == 2
        after = server.asked(since=mark)
        assert len(recorded) == 20
        assert set(after) <= set(range(total)) - recorded
        assert len(set(after)) == total - 20 < total
        assert server.asked("manifest", since=mark) == []  # kept beside the part file


def test_the_broker_killed_mid_transfer_and_restarted_the_transfer_resumes(
    setup: Fixture,
) -> None:
    with (
        faulty_server(setup.broker.port, setup.bundle, serve_chunks=20) as server,
        run_agent(setup.state, "--trusted-key", str(setup.keys.public), env=setup.env()) as agent,
    ):
        agent.wait_ready()
        publish(setup.broker, setup.notice(server.delivery))
        wait(lambda: len(read_record(setup.part)) >= 20, "20 chunks recorded")
        recorded = read_record(setup.part)
        setup.broker.kill()
        setup.broker.start()
        mark = len(server.received)
        server.resume()
        wait(lambda: updates(agent)["state"]["phase"] == "committed", "the update committed")
        assert predict(agent).json()["model"]["version"] == 2
        # What had arrived before the outage was not asked for again; the rest was.
        after = set(server.asked(since=mark))
        assert after and after.isdisjoint(recorded)
        assert len(after) < server.delivery.chunks


def updates(agent: Any) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{agent.url}/v1/updates", timeout=10).json()
    return answer
