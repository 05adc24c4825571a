"""The MQTT side of bundles fetched in chunks: the `ChunkLink` the updater asks through.

Requests go straight to the broker (`MqttLink.publish_now`, QoS 1, MQTT 5 message expiry
`update_chunk_expiry_s`) and never through the durable outbox: a lost one is cheap to send again,
and one that waits out an outage at the broker is useless by then (hence the expiry, so a chunk
server coming back does not answer a backlog nobody waits for). Replies arrive on this box's chunk
topic, which the service hands over directly (`MqttService.direct`): acknowledged at once, never
answered, never deduplicated.
"""

from __future__ import annotations

from collections.abc import Callable

from edge_agent.mqtt.service import MqttService
from edge_agent.mqtt.topics import Topic
from edge_bundle.chunks import REQUEST_TOPIC
from edge_bundle.chunks import reply_topic as chunk_reply_topic


class MqttChunkLink:
    """Implements `edge_agent.device.ports.ChunkLink` over the agent's MQTT service."""

    def __init__(self, service: MqttService) -> None:
        settings = service.settings
        self.service = service
        self._reply_topic = chunk_reply_topic(settings.site, settings.device)
        self._request_topic = Topic(REQUEST_TOPIC)
        self._expiry_s = settings.update_chunk_expiry_s
        self._connections = 0
        service.on_connected.append(self._connected_again)

    @property
    def reply_topic(self) -> str:
        return self._reply_topic

    @property
    def connected(self) -> bool:
        return bool(self.service.link.connected)

    @property
    def connection(self) -> int:
        return self._connections

    def request(self, payload: bytes) -> None:
        self.service.link.publish_now(self._request_topic, payload, qos=1, expiry_s=self._expiry_s)

    def listen(self, handler: Callable[[bytes], None]) -> None:
        self.service.direct[self._reply_topic] = handler

    def _connected_again(self) -> None:
        self._connections += 1
