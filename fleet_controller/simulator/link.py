"""One MQTT 5 connection driven by the running asyncio loop: paho without a thread of its own.

paho's external-loop hooks register its socket with the loop (`add_reader` / `add_writer`), and
a timer calls `loop_misc` for keepalive (every quarter of the keepalive, at least every second:
once a second per connection would be 10,000 wake-ups a second at 10,000 boxes), so thousands of
connections share one event loop and one thread. `drop` ends a connection the way a box losing power or network does: the socket is shut
down without a DISCONNECT packet, so the broker publishes the last will at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)
MIN_MISC_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class LinkEvents:
    """What the owner of a link hears about: connected, a message, a PUBACK, the connection lost."""

    connected: Callable[[], None]
    message: Callable[[str, bytes], None]
    published: Callable[[int], None]
    lost: Callable[[], None]


class AsyncLink:
    """One paho client on the running loop; a new `AsyncLink` for every connection attempt."""

    def __init__(
        self,
        client_id: str,
        will: Will,
        events: LinkEvents,
        *,
        keepalive_s: int = 30,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._events = events
        self._keepalive_s = keepalive_s
        self._misc_interval_s = max(MIN_MISC_INTERVAL_S, keepalive_s / 4)
        self._misc: asyncio.TimerHandle | None = None
        self._closed = False
        self.connected = False
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.will_set(will.topic, will.payload, qos=1, retain=True)
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._client = client

    def connect(self, host: str, port: int) -> None:
        """Open the TCP connection and send CONNECT (blocking only for the TCP handshake).

        Raises OSError when the broker cannot be reached."""
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        self._client.connect(
            host, port, keepalive=self._keepalive_s, clean_start=True, properties=properties
        )
        self._misc = self._loop.call_later(self._misc_interval_s, self._tick)

    def subscribe(self, topics: list[str]) -> None:
        self._client.subscribe([(topic, 1) for topic in topics])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Queue a QoS 1 publish; returns its message id (`LinkEvents.published` on PUBACK)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        return info.mid

    def drop(self) -> None:
        """End the connection without DISCONNECT: the broker publishes the last will."""
        self._closed = True
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._read()  # paho reads the end of the stream and closes its socket
        self._stop_timer()

    def close(self) -> None:
        """A clean DISCONNECT (the broker does not publish the will)."""
        self._closed = True
        self._client.disconnect()
        self._write()
        self._read()
        self._stop_timer()

    # ---- paho's external-loop hooks ----------------------------------------------------------
    def _socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.add_reader(sock, self._read)

    def _socket_close(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _register_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self._loop.add_writer(sock, self._write)

    def _unregister_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _read(self) -> None:
        if self._client.socket() is not None:
            self._client.loop_read()

    def _write(self) -> None:
        if self._client.socket() is not None:
            self._client.loop_write()

    def _tick(self) -> None:
        self._misc = None
        if self._client.socket() is None:
            return
        self._client.loop_misc()
        self._misc = self._loop.call_later(self._misc_interval_s, self._tick)

    def _stop_timer(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    # ---- paho callbacks ----------------------------------------------------------------------
    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("the broker refused the connection: %s", reason)
            return
        self.connected = True
        self._events.connected()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, _reason: Any, _props: Any) -> None:
        self.connected = False
        self._stop_timer()
        if not self._closed:  # lost, or refused before CONNACK: the owner retries either way
            self._events.lost()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        self._events.message(message.topic, bytes(message.payload))

    def _on_publish(self, _c: Any, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
        self._events.published(mid)
