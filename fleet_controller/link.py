"""The controller's MQTT link: what boxes publish in, signed notices out.

One paho client with its own network thread, MQTT 5, a persistent session (`clean_start`
false, a long session expiry): while the controller is down the broker queues the boxes' QoS 1
reports, and nothing is acknowledged before the controller has stored it (manual acks: the
consumer calls `ack` after its database write), so a crash at any point loses no report.

Behind a shared subscription (`[mqtt] shared_group`, docs/fleet-scale.md) the link subscribes
to the same topics as `$share/GROUP/TOPIC`: the broker hands each message to one of the group's
instances, each connected under its own client id. Every message is stamped with when it was
received (`Inbound.received_at`), from which the controller measures its ingest lag.

Notices leave retained at QoS 1 and `publish` returns only once the broker has acknowledged
them; a failure raises `PublishError` and the caller tries again later with the same bytes.
`publish_many` sends a batch pipelined (up to `max_inflight` unacknowledged at once) and then
waits for every PUBACK, so a wave of notices costs no broker round trip per box.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleet_controller.config import MqttConfig

log = logging.getLogger(__name__)
# What boxes publish (see docs/fleet.md); release topics are ours and not subscribed.
SUBSCRIPTIONS = (
    "lineside/v1/+/+/status",
    "lineside/v1/+/+/telemetry",
    "lineside/v1/+/+/update",
)
INBOX_LIMIT = 100_000
SHARE_PREFIX = "$share"


def subscriptions(shared_group: str | None) -> tuple[str, ...]:
    """The topic filters the controller subscribes to, shared in `shared_group` when given."""
    if shared_group is None:
        return SUBSCRIPTIONS
    return tuple(f"{SHARE_PREFIX}/{shared_group}/{topic}" for topic in SUBSCRIPTIONS)


class PublishError(Exception):
    """A notice was not acknowledged by the broker in time; publish the same bytes again."""


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float = 0.0  # time.time() when it arrived from the broker (0: unknown)


class Link:
    """Connects, subscribes, queues what arrives in `inbox`, publishes retained notices."""

    def __init__(
        self, config: MqttConfig, *, password: str | None = None, client_id: str | None = None
    ) -> None:
        self.config = config
        self.client_id = client_id or config.client_id
        self.inbox: queue.Queue[Inbound] = queue.Queue(INBOX_LIMIT)
        self.connected = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        if config.username is not None:
            self._client.username_pw_set(config.username, password)
        if config.tls_ca is not None:
            self._client.tls_set(
                ca_certs=str(config.tls_ca),
                certfile=str(config.tls_cert) if config.tls_cert else None,
                keyfile=str(config.tls_key) if config.tls_key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self._client.reconnect_delay_set(1, 30)
        self._client.max_queued_messages_set(0)
        self._client.max_inflight_messages_set(config.max_inflight)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    def start(self) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.config.session_expiry_s
        # connect_async + loop_start: the network thread connects, and reconnects on its own.
        self._client.connect_async(
            self.config.host,
            self.config.port,
            keepalive=self.config.keepalive_s,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish retained at QoS 1 and wait for the broker's PUBACK (`PublishError` if not)."""
        if not self.connected.is_set():
            raise PublishError(f"not connected to the broker; {topic} is published later")
        info = self._client.publish(topic, payload, qos=1, retain=True)
        try:
            info.wait_for_publish(self.config.publish_timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise PublishError(f"publishing {topic} failed: {exc}") from exc
        if not info.is_published():
            raise PublishError(
                f"the broker did not acknowledge {topic} within "
                f"{self.config.publish_timeout_s:g} s; it is published again later"
            )

    def publish_many(self, items: Sequence[tuple[str, bytes]]) -> list[PublishError | None]:
        """Publish every (topic, payload) retained at QoS 1 without waiting in between (paho
        keeps up to `max_inflight` of them in flight), then wait for the PUBACKs, all within one
        `publish_timeout_s`: per item, None once acknowledged or the `PublishError` saying why
        not. Raises `PublishError` at once when not connected."""
        if not self.connected.is_set():
            raise PublishError(f"not connected to the broker; {len(items)} notices go out later")
        sent: list[paho.MQTTMessageInfo | PublishError] = []
        for topic, payload in items:
            try:
                sent.append(self._client.publish(topic, payload, qos=1, retain=True))
            except (RuntimeError, ValueError) as exc:
                sent.append(PublishError(f"publishing {topic} failed: {exc}"))
        deadline = time.monotonic() + self.config.publish_timeout_s
        results: list[PublishError | None] = []
        for (topic, _payload), info in zip(items, sent, strict=True):
            if isinstance(info, PublishError):
                results.append(info)
                continue
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                results.append(PublishError(f"publishing {topic} failed: {exc}"))
                continue
            results.append(
                None
                if info.is_published()
                else PublishError(
                    f"the broker did not acknowledge {topic} within "
                    f"{self.config.publish_timeout_s:g} s; it is published again later"
                )
            )
        return results

    def ack(self, message: Inbound) -> None:
        """Acknowledge a QoS 1 message once what it said is stored."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    # ---- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(
        self,
        client: paho.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("the broker refused the connection: %s", reason)
            return
        # paho does not honour the broker's Receive Maximum (and cannot change its own once
        # connected): past it the broker refuses a publish, which is then published again later.
        receive_maximum = int(getattr(properties, "ReceiveMaximum", None) or 65535)
        if receive_maximum < self.config.max_inflight:
            log.warning(
                "the broker accepts %d unacknowledged publishes, fewer than [mqtt] max_inflight "
                "= %d: lower max_inflight (or raise the broker's max_inflight_messages)",
                receive_maximum,
                self.config.max_inflight,
            )
        client.subscribe([(topic, 1) for topic in subscriptions(self.config.shared_group)])
        self.connected.set()
        log.info("connected to %s:%d", self.config.host, self.config.port)

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self.connected.clear()
        log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        # Blocks the network thread when the consumer is far behind: the broker then holds
        # the rest (flow control), which is what a full inbox should do.
        self.inbox.put(Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos, time.time()))
