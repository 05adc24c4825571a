"""The one owner of the paho client, driven on the agent's event loop.

paho-mqtt is not safe to drive from several threads (deadlocks, lost subscriptions, swallowed
exceptions in its own issue tracker), so only the event loop touches it: the loop watches the
socket (`add_reader`, and `add_writer` while a write waits for room), calls paho's `loop_read`,
`loop_write` and `loop_misc`, and runs its callbacks. Other threads hand work through a queue
and `wake`, which schedules one flush on the loop.

Before, a thread of its own owned the client. A small request then crossed threads twice (the
message to the loop, the answer back to the link), and on a VM each crossing wakes an idle vCPU:
about 0.2 ms each, against a broker echo of 0.3 ms. Now a message's callback runs the service's
intake directly, and an answer stored on the loop is published on the loop's next turn. What
blocks stays off the loop: `connect` (name lookup, TCP, TLS handshake) runs in a thread, and a
large PUBLISH is read in non-blocking pieces as they arrive, like an HTTP body.

- Each connection attempt uses a fresh paho client (no stale in-flight state carried over); the
  broker keeps our persistent session (same client id, clean start off, session expiry), so QoS 1
  messages that arrived but were not acknowledged are delivered again.
- Reconnects back off exponentially with full jitter; every connect resubscribes and republishes
  the retained "online" status; the last will publishes "offline".
- TCP_NODELAY is set on the socket: with Nagle's algorithm a QoS 1 round trip took 88 ms here.
- Incoming PUBLISH packets are decoded by `wire.PublishClient`, which copies a payload once
  where paho copies it about twenty times (9 ms of a 3.8 MB photo's receive).
- MQTT 5's Maximum Packet Size (`max_packet_size`) keeps a message far over the payload limit
  at the broker: without it one publish of a few hundred megabytes would be read into memory
  here before the limit could refuse it.
- Incoming QoS 1 messages are acknowledged by the application (`ack`) once their result is in the
  outbox, so a crash before that makes the broker deliver them again. MQTT 5's Receive Maximum
  tells the broker how many may be unacknowledged at once (the service's workers plus its
  queue), so a backlog waits at the broker rather than being shed here.
- The outbox is published in row order with a bounded window of unacknowledged messages; a row is
  deleted when its PUBACK arrives (the PUBACKs of one read of the socket in one statement: a
  backlog's flush is not one SQLite commit per message on the loop). After a reconnect the window starts again from the oldest row,
  so delivery is at least once and in order. While the outbox's thread holds it for a
  checkpoint, publishing and deleting wait for the wake that follows it instead of the loop
  waiting for the outbox's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.mqtt.outbox import Outbox, OutboxError, OutboxMessage
from edge_agent.mqtt.topics import Topic, TopicFilter
from edge_agent.mqtt.wire import PublishClient
from edge_agent.settings import AgentSettings
from edge_bundle.chunks import MAX_CHUNK_SIZE

log = logging.getLogger(__name__)
#: Unacknowledged outbox messages on the wire at once.
PUBLISH_WINDOW = 32
CONNECT_TIMEOUT_S = 10.0
#: Room in a packet beside its payload: the topic, the properties, a chunk reply's header.
PACKET_HEADROOM = 64 * 1024
#: The largest Maximum Packet Size MQTT 5 can state (its Remaining Length limit).
MQTT_PACKET_LIMIT = 268_435_455
#: How often keepalive is looked after (paho's loop_misc).
MISC_INTERVAL_S = 1.0
#: Reads in a row for TLS's buffered bytes before the loop gets a turn.
SSL_READS = 16


@dataclass(frozen=True)
class Inbound:
    """A received message, copied out of paho's object."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int
    retain: bool = False
    dup: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    received_at: float = field(default_factory=time.monotonic)


Command = Callable[[paho.Client, int], None]


class MqttLink:
    """Drives the paho client on the event loop; `wake`, `ack`, `call` and `publish_now` may be
    called from any thread, everything else runs on the loop."""

    def __init__(
        self,
        settings: AgentSettings,
        outbox: Outbox,
        subscriptions: list[TopicFilter],
        status_topic: Topic,
        on_message: Callable[[Inbound], None],
        on_state: Callable[[bool], None] = lambda connected: None,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.subscriptions = subscriptions
        self.status_topic = status_topic
        self.on_message = on_message
        self.on_state = on_state
        self.connected = False
        self.generation = 0
        self.connects = 0
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._runner: asyncio.Task[None] | None = None
        self._signal = asyncio.Event()
        self._stopping = False
        self._client: paho.Client | None = None  # the connection being served, if any
        self._lost = False  # that connection dropped
        self._writing = False  # its socket is watched for room to write
        self._flush_due = False  # a flush is scheduled on the loop
        self._pump_due = True  # the outbox may hold rows not yet published
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._acked: list[int] = []  # outbox rows the broker has acknowledged, to delete
        self._last_sent = 0
        self._v5 = settings.mqtt_protocol == "5"
        outbox.after_checkpoint.append(self.wake)  # publish what waited for the checkpoint
        self.receive_maximum = settings.mqtt_workers + settings.mqtt_inbound_queue

    # ---- any thread ----------------------------------------------------------------------
    def start(self) -> None:
        """Start connecting; must be called on the event loop that is to drive the link."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._runner = self._loop.create_task(self._run(), name="mqtt-link")

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish "offline", disconnect cleanly and end the link."""
        self._stopping = True
        self._signal.set()
        if self._runner is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._runner)
        except TimeoutError:
            log.warning("the MQTT link did not stop within %.1f s; cancelled", timeout)
        self._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner

    def wake(self) -> None:
        """New outbox rows or commands: publish and run them on the loop's next turn."""
        loop = self._loop
        if loop is None:
            return
        self._pump_due = True
        if threading.get_ident() == self._loop_thread:
            self._flush_soon()
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to publish on
                loop.call_soon_threadsafe(self._flush_soon)

    def ack(self, message: Inbound, *, wake: bool = True) -> None:
        """Acknowledge a QoS 1 message (only on the connection it arrived on); `wake` False
        leaves it queued for the caller's next `wake`."""
        if message.qos == 0:
            return

        def command(client: paho.Client, generation: int) -> None:
            if generation == message.generation:
                client.ack(message.mid, message.qos)

        self._commands.put(command)
        if wake:
            self.wake()

    def publish_now(
        self, topic: Topic, payload: bytes, *, qos: int = 0, expiry_s: int | None = None
    ) -> None:
        """A best-effort publish that bypasses the outbox (shed notices, chunk requests); lost
        when not connected. `expiry_s` sets the MQTT 5 message expiry (3.1.1 has none)."""

        def command(client: paho.Client, _generation: int) -> None:
            if self.connected:
                properties = self._json_properties()
                if properties is not None and expiry_s is not None:
                    properties.MessageExpiryInterval = expiry_s
                client.publish(str(topic), payload, qos=qos, properties=properties)

        self.call(command)

    def call(self, command: Command) -> None:
        self._commands.put(command)
        self.wake()

    # ---- connections (event loop) --------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            client = self._new_client()
            try:
                # connect() resolves, connects and shakes hands (TLS) in blocking calls.
                await asyncio.to_thread(self._connect, client)
                attempt = 0 if await self._serve(client) else attempt + 1
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning(
                    "MQTT broker %s:%d unreachable: %s",
                    self.settings.mqtt_host,
                    self.settings.mqtt_port,
                    exc,
                )
                attempt += 1
            finally:
                self._disconnected(client)
            if not self._stopping:
                await self._sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter (no reconnect storms after a broker restart)."""
        cap = min(
            self.settings.mqtt_reconnect_max_s,
            self.settings.mqtt_reconnect_min_s * 2 ** min(attempt, 16),
        )
        return random.uniform(self.settings.mqtt_reconnect_min_s / 2, cap)  # noqa: S311

    def _new_client(self) -> paho.Client:
        settings = self.settings
        self.generation += 1
        generation = self.generation
        client = PublishClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else False,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        if settings.mqtt_username:
            password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
            client.username_pw_set(settings.mqtt_username, password)
        if settings.mqtt_tls_ca is not None:
            client.tls_set(
                ca_certs=str(settings.mqtt_tls_ca),
                certfile=str(settings.mqtt_tls_certfile) if settings.mqtt_tls_certfile else None,
                keyfile=str(settings.mqtt_tls_keyfile) if settings.mqtt_tls_keyfile else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.will_set(str(self.status_topic), self._status("offline"), qos=1, retain=True)
        client.on_socket_open = _no_delay
        client.on_socket_close = lambda _c, _u, sock: self._unwatch(sock)
        client.on_connect = self._on_connect
        client.on_message = lambda _c, _u, message: self._on_message(message, generation)
        client.on_publish = self._on_publish
        return client

    def _connect(self, client: paho.Client) -> None:
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.settings.mqtt_session_expiry_s
            # No more unacknowledged QoS 1 messages at once than the service takes: the rest of a
            # backlog waits at the broker instead of being shed here.
            properties.ReceiveMaximum = min(65535, self.receive_maximum)
            properties.MaximumPacketSize = max_packet_size(self.settings)
        client.connect(
            self.settings.mqtt_host,
            self.settings.mqtt_port,
            keepalive=self.settings.mqtt_keepalive_s,
            clean_start=False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )

    async def _serve(self, client: paho.Client) -> bool:
        """Serve one connection until it drops or we stop; True if it ever connected."""
        sock = client.socket()
        if sock is None:
            return False
        assert self._loop is not None
        connects = self.connects
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        self._client = client
        self._loop.add_reader(sock, self._readable)
        try:
            self._flush()  # commands queued while there was no connection
            while not self._stopping and not self._lost:
                await self._sleep(MISC_INTERVAL_S)
                if self._stopping or self._lost:
                    break
                if self.connects == connects and time.monotonic() > deadline:
                    log.warning(
                        "MQTT broker did not answer CONNECT within %.0f s", CONNECT_TIMEOUT_S
                    )
                    return False
                # keepalive: PINGREQ when due, and a broker that stopped answering is dropped
                if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
                self._flush()  # and whatever a wake did not get out yet
            if self._stopping:
                self._goodbye(client)
            return self.connects > connects
        finally:
            self._client = None

    async def _sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less when we stop or the connection drops."""
        self._signal.clear()
        if self._stopping or self._lost:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._signal.wait()

    # ---- the socket (event loop) ---------------------------------------------------------
    def _readable(self) -> None:
        client = self._client
        if client is None:
            return
        rc = client.loop_read()
        for _ in range(SSL_READS):  # TLS may hold decrypted bytes the socket no longer shows
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not _ssl_pending(client.socket()):
                break
            rc = client.loop_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
            self._drop()  # a refused CONNECT closes the socket and still reads as success
            return
        if _ssl_pending(client.socket()) and self._loop is not None:
            self._loop.call_soon(self._readable)
        self._flush()

    def _writable(self) -> None:
        client = self._client
        if client is not None:
            self._write(client)

    def _flush_soon(self) -> None:
        """Flush once on the loop's next turn, however many wakes came before it."""
        assert self._loop is not None
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Publish from the outbox (answers first: acks and commands can wait that long), run
        the queued commands, and write what is queued."""
        self._flush_due = False
        # While the outbox is held for a checkpoint (~10 ms of fsyncs), its rows wait for the
        # wake that follows it rather than the event loop for the outbox's lock.
        reading = not self.outbox.checkpointing
        if reading:
            self._delete_acked()
        client = self._client
        if client is None:
            return  # between connections: the commands wait for the next one
        if reading and self.connected and self._pump_due:
            self._pump(client)
        self._run_commands(client)
        self._write(client)

    def _write(self, client: paho.Client) -> None:
        if client.want_write() and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._drop()
            return
        sock = client.socket()
        if sock is None or self._loop is None:
            return
        wanted = client.want_write()  # the socket's buffer is full: write when it has room
        if wanted and not self._writing:
            self._loop.add_writer(sock, self._writable)
        elif not wanted and self._writing:
            self._loop.remove_writer(sock)
        self._writing = wanted

    def _unwatch(self, sock: Any) -> None:
        """Stop watching `sock` (paho calls this just before it closes it; off the loop, while
        connecting, it was never watched)."""
        closed = getattr(sock, "fileno", lambda: -1)() < 0  # paho's __del__ closes it again
        if threading.get_ident() == self._loop_thread and self._loop is not None and not closed:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        self._writing = False

    def _drop(self) -> None:
        """The connection failed (paho has closed its socket): end `_serve`."""
        self._lost = True
        self._signal.set()

    def _run_commands(self, client: paho.Client) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command(client, self.generation)
            except Exception:  # a failing command must not end the connection
                log.exception("MQTT command failed")

    def _pump(self, client: paho.Client) -> None:
        room = PUBLISH_WINDOW - len(self._inflight)
        if room <= 0:
            return  # a PUBACK makes room and asks again
        self._pump_due = False
        messages = self.outbox.pending(after_row_id=self._last_sent, limit=room)
        for message in messages:
            info = client.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                properties=self._properties(message),
            )
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._pump_due = True
                return
            self._last_sent = message.row_id
            if message.qos == 0:
                self._acked.append(message.row_id)
            else:
                self._inflight[info.mid] = message.row_id
        if len(messages) == room:
            self._pump_due = True  # there may be more: at once if QoS 0 left the window open,
            if len(self._inflight) < PUBLISH_WINDOW:  # else when a PUBACK makes room
                self._flush_soon()
        self._delete_acked()

    def _delete_acked(self) -> None:
        """Delete the rows acknowledged since the last time, in one statement."""
        if not self._acked:
            return
        rows, self._acked = self._acked, []
        try:
            self.outbox.ack_many(rows)
        except OutboxError as exc:  # e.g. a full disk: the rows are sent again later, deduplicated
            log.warning("could not delete acknowledged outbox rows: %s", exc)

    def _goodbye(self, client: paho.Client) -> None:
        """A clean disconnect: publish "offline" ourselves (the will is not sent then)."""
        if not self.connected:
            return
        client.publish(str(self.status_topic), self._status("offline"), qos=1, retain=True)
        for _ in range(3):
            client.loop_write()
        client.disconnect()
        client.loop_write()

    def _disconnected(self, client: paho.Client) -> None:
        self._delete_acked()
        was = self.connected
        self.connected = False
        self._lost = False
        self._inflight.clear()
        self._last_sent = 0  # resend everything not acknowledged, in order
        self._pump_due = True
        sock = client.socket()
        if sock is not None:
            self._unwatch(sock)
            with contextlib.suppress(OSError):
                sock.close()
        if was:
            log.warning(
                "MQTT connection to %s:%d lost", self.settings.mqtt_host, self.settings.mqtt_port
            )
            self.on_state(False)

    # ---- paho callbacks (event loop, inside loop_read) -----------------------------------
    def _on_connect(
        self, client: paho.Client, _userdata: Any, flags: Any, reason: Any, _properties: Any
    ) -> None:
        if reason.is_failure:
            log.error("MQTT broker refused the connection: %s", reason)
            client.disconnect()
            return
        self.connected = True
        self.connects += 1
        log.info(
            "MQTT connected to %s:%d (session %s)",
            self.settings.mqtt_host,
            self.settings.mqtt_port,
            "resumed" if getattr(flags, "session_present", False) else "new",
        )
        if self.subscriptions:
            if self._v5:
                client.subscribe([(str(f), SubscribeOptions(qos=1)) for f in self.subscriptions])
            else:
                client.subscribe([(str(f), 1) for f in self.subscriptions])
        client.publish(str(self.status_topic), self._status("online"), qos=1, retain=True)
        self.on_state(True)

    def _on_message(self, message: paho.MQTTMessage, generation: int) -> None:
        properties = getattr(message, "properties", None)
        inbound = Inbound(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            mid=message.mid,
            generation=generation,
            retain=bool(message.retain),
            dup=bool(message.dup),
            response_topic=getattr(properties, "ResponseTopic", None),
            correlation_data=getattr(properties, "CorrelationData", None),
            content_type=getattr(properties, "ContentType", None),
            user_properties=tuple(getattr(properties, "UserProperty", ()) or ()),
        )
        try:
            self.on_message(inbound)
        except Exception:  # never let a handler bug end the connection
            log.exception("MQTT message handler failed for %s", message.topic)

    def _on_publish(
        self, _client: paho.Client, _userdata: Any, mid: int, _reason: Any, _properties: Any
    ) -> None:
        row = self._inflight.pop(mid, None)
        if row is not None:  # deleted with the others of this read, after it
            self._acked.append(row)
            self._pump_due = True  # room in the window

    # ---- helpers -------------------------------------------------------------------------
    def _properties(self, message: OutboxMessage) -> Properties | None:
        if not self._v5:
            return None
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        extra = message.properties
        properties.ContentType = str(extra.get("content_type", "application/json"))
        if extra.get("correlation_data"):
            properties.CorrelationData = bytes.fromhex(str(extra["correlation_data"]))
        properties.UserProperty = [("message_id", message.message_id)]
        return properties

    def _json_properties(self) -> Properties | None:
        if not self._v5:
            return None
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ContentType = "application/json"
        return properties

    def _status(self, state: str) -> bytes:
        return json.dumps(
            {"status": state, "client_id": self.settings.client_id, "at": time.time()}
        ).encode()


def max_packet_size(settings: AgentSettings) -> int:
    """What the broker is told never to send (MQTT 5 Maximum Packet Size; 3.1.1 has none: set the
    broker's own message size limit). Twice `mqtt_max_payload_bytes`, so that a message somewhat
    over the limit still reaches the agent and is answered `payload_too_large`, and never less
    than a bundle chunk's reply. The broker drops a larger message for this client unsent, as if
    delivered: it never reaches the agent's memory or its event loop."""
    payload = max(2 * settings.mqtt_max_payload_bytes, MAX_CHUNK_SIZE)
    return min(MQTT_PACKET_LIMIT, payload + PACKET_HEADROOM)


def _no_delay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _ssl_pending(sock: Any) -> bool:
    pending = getattr(sock, "pending", None)
    return bool(pending and pending())
