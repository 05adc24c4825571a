"""Test helpers for bundles delivered over MQTT: a chunk server in-process or as a process, and
a small fetcher that speaks the box's side of `edge_bundle.chunks`.

For other tests (agent, simulator), the one to use is

    running_chunk_server(broker_port: int, store_dir: Path, *, group: str = SERVER_GROUP,
                         client_id: str = "test-chunk-server", workers: int = 2)
        -> ContextManager[ChunkServerHandle]

    with running_chunk_server(broker.port, tmp_path / "chunks") as chunks:
        delivery = chunks.publish(bundle_path, chunk_size=64 * 1024)  # -> ChunkedDelivery
        extensions = chunks.extension(delivery)   # {"critical": ["mqtt_chunks"], "mqtt_chunks": ...}
        ...                                       # boxes fetch from the broker on broker.port
        chunks.stats()                            # {"chunks": n, "bytes": n, "refused": n, ...}

`ChunkServerProcess` runs `fleet-controller chunk-server` as a real process (to SIGKILL it), and
`ChunkFetcher` fetches a bundle the way a box does: manifest first, a window of requests in
flight, a timeout and re-request, every chunk checked against the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_bundle.chunk_window import RequestWindow
from edge_bundle.chunks import (
    DEFAULT_CHUNK_SIZE,
    MQTT_CHUNKS_EXTENSION,
    REQUEST_TOPIC,
    SERVER_GROUP,
    ChunkedDelivery,
    ChunkError,
    ChunkReply,
    ChunkRequest,
    reply_topic,
)
from fleet_controller.chunks.server import ChunkServer
from fleet_controller.chunks.store import ChunkStore
from fleet_controller.config import ChunksConfig, MqttConfig

REPO = Path(__file__).resolve().parent.parent


@dataclass
class ChunkServerHandle:
    """A running in-process chunk server and its store."""

    server: ChunkServer
    store: ChunkStore

    def publish(self, bundle: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkedDelivery:
        """Put `bundle` in the store; the `mqtt_chunks` extension a notice carries for it."""
        return self.store.publish(bundle, chunk_size)[1]

    @staticmethod
    def extension(delivery: ChunkedDelivery) -> dict[str, Any]:
        """The notice's `extensions` for MQTT delivery (critical, as a notice without url needs)."""
        return {"critical": [MQTT_CHUNKS_EXTENSION], MQTT_CHUNKS_EXTENSION: delivery.to_json()}

    def stats(self) -> dict[str, int]:
        return self.server.stats.snapshot()


@contextlib.contextmanager
def running_chunk_server(
    broker_port: int,
    store_dir: Path,
    *,
    group: str = SERVER_GROUP,
    client_id: str = "test-chunk-server",
    workers: int = 2,
) -> Iterator[ChunkServerHandle]:
    """An in-process chunk server on the broker at 127.0.0.1:`broker_port`, serving `store_dir`
    (created if missing); connected and subscribed when the block starts, stopped after it."""
    store = ChunkStore(store_dir).ensure()
    config = ChunksConfig(store=store_dir, group=group, client_id=client_id, workers=workers)
    server = ChunkServer(store, MqttConfig(port=broker_port), config)
    server.start()
    try:
        if not server.wait_subscribed(15):
            raise AssertionError(f"the chunk server did not subscribe on 127.0.0.1:{broker_port}")
        yield ChunkServerHandle(server, store)
    finally:
        server.stop()


def write_chunk_config(
    directory: Path, broker_port: int, store_dir: Path, *, client_id: str = "test-chunk-server"
) -> Path:
    """A fleet.toml with what `fleet-controller chunk-server` reads."""
    path = directory / "chunks.toml"
    path.write_text(
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\n\n'
        f'[chunks]\nstore = "{store_dir}"\nclient_id = "{client_id}"\nworkers = 2\n'
    )
    return path


@dataclass
class ChunkServerProcess:
    """`fleet-controller chunk-server --config CONFIG` as a real process."""

    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> ChunkServerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fleet_controller.cli", "chunk-server", "--config",
                 str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "subscribed" in self.log.read_text(errors="replace"):
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"chunk-server exited: {self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"chunk-server did not subscribe: {self.log.read_text()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class ChunkFetcher:
    """Fetches one bundle over MQTT as a box does, into memory (bundles in tests are small).

    `window` requests in flight; a request unanswered after `timeout_s` is sent again; every
    manifest page is checked against the signed digest and every chunk against the manifest.
    `received` counts replies, `refused_chunks` replies whose data failed the check.
    """

    broker_port: int
    bundle: str
    size: int
    delivery: ChunkedDelivery
    site: str = "test-site"
    device: str = "fetcher"
    window: int = 4
    timeout_s: float = 2.0
    received: int = 0
    refused_chunks: int = 0
    #: Requests sent again after `timeout_s` without an answer.
    repeated: int = 0
    refusals: list[ChunkReply] = field(default_factory=list)
    _replies: list[ChunkReply] = field(default_factory=list)
    _condition: threading.Condition = field(default_factory=threading.Condition)

    def fetch(self, deadline_s: float = 60.0, on_chunk: Any = None) -> bytes:
        """The bundle's bytes, verified; `on_chunk(index)` is called after each new chunk."""
        client = self._connect()
        try:
            manifest = self._fetch_all("manifest", self.delivery.manifest_pages, client, deadline_s)
            whole = b"".join(manifest[i] for i in range(self.delivery.manifest_pages))
            self.delivery.check_manifest(whole)
            self._manifest = whole
            chunks = self._fetch_all("chunk", self.delivery.chunks, client, deadline_s, on_chunk)
        finally:
            client.disconnect()
            client.loop_stop()
        data = b"".join(chunks[i] for i in range(self.delivery.chunks))
        assert len(data) == self.size
        assert hashlib.sha256(data).hexdigest() == self.bundle
        return data

    def _connect(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{self.site}-{self.device}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        subscribed = threading.Event()
        client.on_subscribe = lambda *_args: subscribed.set()
        client.on_connect = lambda c, *_a: c.subscribe(reply_topic(self.site, self.device), 1)
        client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 600
        client.connect("127.0.0.1", self.broker_port, clean_start=True, properties=properties)
        client.loop_start()
        assert subscribed.wait(10), "the fetcher's SUBSCRIBE was not acknowledged"
        return client

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            reply = ChunkReply.decode(bytes(message.payload))
        except ChunkError:
            return
        with self._condition:
            self._replies.append(reply)
            self._condition.notify_all()

    def _fetch_all(
        self, part: str, count: int, client: paho.Client, deadline_s: float, on_chunk: Any = None
    ) -> dict[int, bytes]:
        """Every `part` 0..count-1, with the agent's flow control (`RequestWindow`)."""
        done: dict[int, bytes] = {}
        window = RequestWindow(
            range(count), size=self.window, timeout_s=self.timeout_s, max_timeout_s=self.timeout_s
        )
        deadline = time.monotonic() + deadline_s
        while not window.done:
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(
                    f"{part}s {sorted(set(range(count)) - set(done))[:10]} never came"
                )
            resent = window.resent
            for index in window.to_send(now):
                self._ask(client, part, index)
            self.repeated += window.resent - resent
            with self._condition:
                if not self._replies:
                    self._condition.wait(0.1)
                replies, self._replies = self._replies, []
            for reply in replies:
                if reply.part != part or reply.bundle != self.bundle:
                    continue
                if reply.error is not None:
                    self.received += 1
                    self.refusals.append(reply)
                    raise AssertionError(
                        f"the chunk server refused: {reply.error}: {reply.message}"
                    )
                if not window.take(reply.index):
                    continue  # answered already (a request sent twice)
                self.received += 1
                if not self._valid(part, reply):
                    self.refused_chunks += 1
                    window.refused(reply.index)
                    continue
                done[reply.index] = reply.data
                window.stored(reply.index)
                if on_chunk is not None and part == "chunk":
                    on_chunk(reply.index)
        return done

    def _valid(self, part: str, reply: ChunkReply) -> bool:
        if part == "manifest":
            return len(reply.data) == self.delivery.page_length(reply.index)
        return self.delivery.chunk_ok(self._manifest, reply.index, reply.data, self.size)

    def _ask(self, client: paho.Client, part: str, index: int) -> None:
        request = ChunkRequest(
            self.bundle,
            self.delivery.chunk_size,
            part,  # type: ignore[arg-type]
            index,
            reply_topic(self.site, self.device),
        )
        client.publish(REQUEST_TOPIC, request.encode(), qos=1)


def ask_once(
    broker_port: int,
    request: ChunkRequest | bytes,
    site: str = "test-site",
    device: str = "asker",
    wait_s: float = 10.0,
) -> ChunkReply | None:
    """Send one request (or raw bytes) and return the first reply on the box's topic, if any
    comes within `wait_s`."""
    replies: list[ChunkReply] = []
    got = threading.Event()

    def on_message(_c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        replies.append(ChunkReply.decode(bytes(message.payload)))
        got.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_args: subscribed.set()
    client.on_message = on_message
    client.connect("127.0.0.1", broker_port)
    client.subscribe(reply_topic(site, device), 1)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        payload = request.encode() if isinstance(request, ChunkRequest) else request
        client.publish(REQUEST_TOPIC, payload, qos=1).wait_for_publish(10)
        got.wait(wait_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return replies[0] if replies else None
