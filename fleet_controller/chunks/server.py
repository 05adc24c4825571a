"""The chunk server: answers boxes' chunk requests over MQTT from a `ChunkStore`.

One paho MQTT 5 client, a persistent session under a fixed client id (`clean_start` false, a
session expiry of an hour by default), subscribed at QoS 1 to `$share/<group>/<REQUEST_TOPIC>`:
several servers in one group share the requests, and requests sent while a server is down wait
at the broker for it. Requests are acknowledged by hand, only once their reply was handed to
paho, so a server killed at any point loses no request: the broker sends the unacknowledged ones
again when it is back (and a box re-asks what it did not get in time anyway).

Flow control, so memory stays bounded whatever the boxes ask:
- the server advertises a Receive Maximum: the broker sends it at most that many requests at a
  time and holds the rest;
- requests wait in a queue for a small pool of worker threads (one positioned read each); the
  queue is not capped, because the network thread must never block on it (it is the thread that
  frees the reply slots below), and Mosquitto may send more than the Receive Maximum
  (eclipse-mosquitto#2301); a request is at most 1 KiB, and the broker sends no more than the
  unacknowledged window it keeps for this client;
- at most `2 x workers` replies are outstanding (handed to paho, not yet acknowledged by the
  broker); a worker waits for a slot before it reads the next chunk.

A request that does not decode is logged, counted and dropped (there is no safe topic to answer
garbage on); a valid one for a bundle or chunk the store does not have is answered with a
refusal saying what to do. Nothing but the store is state: a restarted server carries on.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_bundle.chunks import REQUEST_TOPIC, ChunkError, ChunkReply, ChunkRequest
from fleet_controller.chunks.store import ChunkRangeError, ChunkStore, UnknownBundleError
from fleet_controller.config import ChunksConfig, MqttConfig
from fleet_controller.errors import FleetError

log = logging.getLogger(__name__)
_POLL_S = 0.2


@dataclass
class ChunkStats:
    """What the server did since it started (read them under `lock`)."""

    chunks: int = 0
    manifest_pages: int = 0
    bytes: int = 0
    refused: int = 0
    dropped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                "chunks": self.chunks,
                "manifest_pages": self.manifest_pages,
                "bytes": self.bytes,
                "refused": self.refused,
                "dropped": self.dropped,
            }


@dataclass(frozen=True)
class _Request:
    payload: bytes
    mid: int
    qos: int


class ChunkServer:
    """Start with `start()`, stop with `stop()`; both return promptly, from any thread."""

    def __init__(
        self,
        store: ChunkStore,
        mqtt: MqttConfig,
        chunks: ChunksConfig | None = None,
        *,
        password: str | None = None,
    ) -> None:
        self.store = store
        self.mqtt = mqtt
        self.chunks = chunks or ChunksConfig(store=store.directory)
        self.stats = ChunkStats()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._stopping = threading.Event()
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._outstanding = threading.Semaphore(2 * self.chunks.workers)
        self._workers: list[threading.Thread] = []
        self._client = self._make_client(password)

    @property
    def subscription(self) -> str:
        return f"$share/{self.chunks.group}/{REQUEST_TOPIC}"

    def _make_client(self, password: str | None) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.chunks.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        username = self.chunks.username or self.mqtt.username
        if username is not None:
            client.username_pw_set(username, password)
        if self.mqtt.tls_ca is not None:
            client.tls_set(
                ca_certs=str(self.mqtt.tls_ca),
                certfile=str(self.mqtt.tls_cert) if self.mqtt.tls_cert else None,
                keyfile=str(self.mqtt.tls_key) if self.mqtt.tls_key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.reconnect_delay_set(1, 30)
        client.max_inflight_messages_set(2 * self.chunks.workers)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = _no_delay
        return client

    def start(self) -> None:
        for number in range(self.chunks.workers):
            worker = threading.Thread(target=self._work, name=f"chunk-worker-{number}", daemon=True)
            worker.start()
            self._workers.append(worker)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.chunks.session_expiry_s
        properties.ReceiveMaximum = self.chunks.receive_maximum
        self._client.connect_async(
            self.mqtt.host,
            self.mqtt.port,
            keepalive=self.mqtt.keepalive_s,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """Whether the broker acknowledged the subscription within `timeout` seconds."""
        return self.subscribed.wait(timeout)

    def stop(self) -> None:
        """Stop taking requests, disconnect; what was not acknowledged the broker sends again."""
        self._stopping.set()
        for worker in self._workers:
            worker.join(5)
        self._client.disconnect()
        self._client.loop_stop()

    # ---- the workers ----------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                request = self._requests.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if not self._take_slot():
                return  # stopping: the request stays unacknowledged, the broker resends it
            try:
                handed = self._handle(request)
            except Exception:  # one bad request must not stop a worker
                log.exception("answering a chunk request failed; it is dropped")
                handed = False
            if not handed:
                self._outstanding.release()
            self._client.ack(request.mid, request.qos)

    def _take_slot(self) -> bool:
        while not self._stopping.is_set():
            if self._outstanding.acquire(timeout=_POLL_S):
                return True
        return False

    def _handle(self, message: _Request) -> bool:
        """Answer one request; True when a reply was handed to paho (it holds a slot)."""
        try:
            request = ChunkRequest.decode(message.payload)
        except ChunkError as exc:
            with self.stats.lock:
                self.stats.dropped += 1
            log.warning("dropped a chunk request that does not decode: %s", exc)
            return False
        reply = self._answer(request)
        self._client.publish(request.reply, reply.encode(), qos=1)
        with self.stats.lock:
            if reply.error is not None:
                self.stats.refused += 1
            elif request.part == "chunk":
                self.stats.chunks += 1
            else:
                self.stats.manifest_pages += 1
            self.stats.bytes += len(reply.data)
        return True

    def _answer(self, request: ChunkRequest) -> ChunkReply:
        try:
            if request.part == "manifest":
                data = self.store.read_manifest_page(
                    request.bundle, request.chunk_size, request.index, create=False
                )
            else:
                data = self.store.read_chunk(request.bundle, request.chunk_size, request.index)
        except UnknownBundleError as exc:
            return ChunkReply.refusal(request, "unknown_bundle", exc.message)
        except ChunkRangeError as exc:
            return ChunkReply.refusal(request, "bad_request", exc.message)
        except (OSError, FleetError) as exc:
            log.error("cannot read %s of bundle %s: %s", request.part, request.bundle, exc)
            return ChunkReply.refusal(
                request,
                "unavailable",
                f"the chunk server could not read bundle {request.bundle} ({exc}); ask again "
                "later, and tell central IT if this lasts",
            )
        return ChunkReply(request.bundle, request.chunk_size, request.part, request.index, data)

    # ---- paho callbacks (network thread) ------------------------------------------------------
    def _on_connect(
        self,
        client: paho.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("the broker refused the chunk server's connection: %s", reason)
            return
        client.subscribe(self.subscription, qos=1)
        self.connected.set()
        log.info("chunk server connected to %s:%d", self.mqtt.host, self.mqtt.port)

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if not self._stopping.is_set():
            log.warning("chunk server disconnected from the broker (%s); reconnecting", reason)

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: object,
        _mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if any(reason.is_failure for reason in reasons):
            log.error(
                "the broker refused the subscription %s (%s): allow this user to read it in the "
                "broker's ACL",
                self.subscription,
                ", ".join(str(reason) for reason in reasons),
            )
            return
        self.subscribed.set()
        log.info("chunk server subscribed to %s", self.subscription)

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        # Never blocks: this thread also runs `_on_publish`, which frees the workers' slots.
        self._requests.put(_Request(bytes(msg.payload), msg.mid, msg.qos))

    def _on_publish(
        self,
        _client: paho.Client,
        _userdata: object,
        _mid: int,
        _reason: ReasonCode,
        _properties: Properties,
    ) -> None:
        self._outstanding.release()


def _no_delay(_client: paho.Client, _userdata: object, sock: object) -> None:
    # Nagle's algorithm made a QoS 1 round trip 88 ms here (docs/mqtt.md).
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
