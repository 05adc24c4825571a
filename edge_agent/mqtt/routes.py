"""Which topics this agent listens on and where its answers may go, from the settings.

The service subscribes to `subscriptions()`, the handlers route each message by the same filters
(requests, generation, feedback, event mappings, release and trust notices; replies to the
updater's chunk requests go straight to the updater, `chunk_topic`), and both check an
MQTT 5 response topic against the allowed ones with `reply_topic` (the service does too, to send
an `overloaded` notice to a message it sheds).
"""

from __future__ import annotations

from edge_agent.errors import AgentError, BadRequestError
from edge_agent.mqtt.link import Inbound
from edge_agent.mqtt.topics import Topic, TopicFilter, TopicScheme
from edge_agent.settings import AgentSettings, EventMapping
from edge_bundle.chunks import reply_topic as chunk_reply_topic
from edge_bundle.release import TRUST_TOPIC


class Routes:
    """The topic filters and reply rules of one agent."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.scheme = TopicScheme(settings.site, settings.device)
        self.feedback_submit = f"{self.scheme.base}/feedback/submit"
        self.mappings: list[tuple[TopicFilter, EventMapping]] = [
            (TopicFilter(m.topic), m) for m in settings.mqtt_events
        ]
        self.allowed_replies = [TopicFilter(f) for f in settings.mqtt_response_topics]
        self.release_filters: list[TopicFilter] = []
        #: Where this box's chunk replies arrive (bundles fetched over MQTT), when updates are on.
        self.chunk_topic: str | None = None
        if settings.release_keys:
            self.chunk_topic = chunk_reply_topic(settings.site, settings.device)
            self.release_filters = [
                TopicFilter(f"{self.scheme.base}/release"),
                TopicFilter(TRUST_TOPIC),
                *(
                    TopicFilter(f"lineside/v1/fleet/{group}/release")
                    for group in settings.update_groups
                ),
            ]

    def subscriptions(self) -> list[TopicFilter]:
        found = [
            self.scheme.infer_filter(),
            TopicFilter(self.feedback_submit),
            self.scheme.generate_filter(),
            *(f for f, _ in self.mappings),
        ]
        if self.settings.mqtt_shared_group:
            found.append(self.scheme.shared_infer_filter(self.settings.mqtt_shared_group))
        chunks = [TopicFilter(self.chunk_topic)] if self.chunk_topic else []
        return found + self.release_filters + chunks

    def is_notice(self, topic: str) -> bool:
        return any(f.matches(topic) for f in self.release_filters)

    def mapping_for(self, topic: str) -> EventMapping | None:
        for topic_filter, mapping in self.mappings:
            if topic_filter.matches(topic):
                return mapping
        return None

    def reply_topic(self, message: Inbound) -> Topic | AgentError | None:
        """The MQTT 5 response topic if allowed; an error if not; None if there is none."""
        if message.response_topic is None:
            return None
        limit = self.settings.mqtt_max_correlation_bytes
        if message.correlation_data is not None and len(message.correlation_data) > limit:
            return BadRequestError(
                f"the correlation data is {len(message.correlation_data)} bytes, over the limit "
                f"of {limit}"
            )
        try:
            topic = Topic(message.response_topic)
        except ValueError as exc:
            return BadRequestError(f"the response topic is not usable: {exc}")
        if not any(allowed.matches(topic.value) for allowed in self.allowed_replies):
            return BadRequestError(
                f"response topic {topic.value!r} is not allowed; use one matching "
                f"{[str(a) for a in self.allowed_replies]} (setting mqtt_response_topics)"
            )
        return topic
