"""Topics as validated value objects, and the agent's topic scheme.

lineside/v1/{site}/{device}/status            retained "online"/"offline" (the last will)
lineside/v1/{site}/{device}/telemetry         periodic health and latency figures
lineside/v1/{site}/{device}/infer/{model}     requests (MQTT 5 response topic + correlation
                                              data, or plain JSON for 3.1.1 clients)
lineside/v1/{site}/{device}/results/{model}   results of event mappings and of requests that
                                              name no response topic
lineside/v1/{site}/{device}/errors            error replies that have nowhere else to go
$share/{group}/lineside/v1/{site}/shared/infer/{model}   requests split between the agents
                                              of a group (mqtt_shared_group)
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TOPIC_BYTES = 65535
SHARE_PREFIX = "$share/"


@dataclass(frozen=True)
class Topic:
    """A topic a message is published to: no wildcards, not empty, UTF-8 within MQTT's limit."""

    value: str

    def __post_init__(self) -> None:
        _check_text(self.value, "topic")
        if "+" in self.value or "#" in self.value:
            raise ValueError(f"topic {self.value!r} contains a wildcard; publish to a plain topic")

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TopicFilter:
    """A subscription filter: wildcards only as whole levels, `#` only last, optional $share."""

    value: str

    def __post_init__(self) -> None:
        _check_text(self.value, "topic filter")
        levels = self.topic_part.split("/")
        for index, level in enumerate(levels):
            if ("+" in level and level != "+") or ("#" in level and level != "#"):
                raise ValueError(
                    f"topic filter {self.value!r}: a wildcard must be a whole level ('+' or '#')"
                )
            if level == "#" and index != len(levels) - 1:
                raise ValueError(f"topic filter {self.value!r}: '#' must be the last level")

    @property
    def shared_group(self) -> str | None:
        if not self.value.startswith(SHARE_PREFIX):
            return None
        return self.value[len(SHARE_PREFIX) :].split("/", 1)[0]

    @property
    def topic_part(self) -> str:
        """The filter without its `$share/GROUP/` prefix."""
        if not self.value.startswith(SHARE_PREFIX):
            return self.value
        parts = self.value[len(SHARE_PREFIX) :].split("/", 1)
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"shared subscription {self.value!r} must be $share/GROUP/FILTER")
        return parts[1]

    def matches(self, topic: str) -> bool:
        """Whether a message published to `topic` matches this filter."""
        pattern = self.topic_part.split("/")
        levels = topic.split("/")
        if topic.startswith("$") and pattern[0] in ("+", "#"):
            return False  # MQTT: wildcards at the first level do not match $SYS-style topics
        for index, part in enumerate(pattern):
            if part == "#":
                return True
            if index >= len(levels) or (part != "+" and part != levels[index]):
                return False
        return len(levels) == len(pattern)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TopicScheme:
    """The agent's own topics for one site and device."""

    site: str
    device: str

    @property
    def base(self) -> str:
        return f"lineside/v1/{self.site}/{self.device}"

    def status(self) -> Topic:
        return Topic(f"{self.base}/status")

    def telemetry(self) -> Topic:
        return Topic(f"{self.base}/telemetry")

    def errors(self) -> Topic:
        return Topic(f"{self.base}/errors")

    def results(self, model: str) -> Topic:
        return Topic(f"{self.base}/results/{model}")

    def infer_filter(self) -> TopicFilter:
        return TopicFilter(f"{self.base}/infer/+")

    def shared_infer_filter(self, group: str) -> TopicFilter:
        return TopicFilter(f"$share/{group}/lineside/v1/{self.site}/shared/infer/+")

    def generate_filter(self) -> TopicFilter:
        return TopicFilter(f"{self.base}/generate/+")

    def model_of_generate(self, topic: str) -> str | None:
        """The language model named by a generate topic, or None if it is not one."""
        prefix = f"{self.base}/generate/"
        if not topic.startswith(prefix):
            return None
        model = topic[len(prefix) :]
        return model if model and "/" not in model else None

    def model_of_request(self, topic: str) -> str | None:
        """The model named by a request topic (own or shared), or None if it is not one."""
        levels = topic.split("/")
        is_request = (
            len(levels) == 6
            and levels[:3] == ["lineside", "v1", self.site]
            and levels[3] in (self.device, "shared")
            and levels[4] == "infer"
        )
        return levels[5] or None if is_request else None


def _check_text(value: str, what: str) -> None:
    if not value:
        raise ValueError(f"the {what} is empty")
    if "\x00" in value:
        raise ValueError(f"the {what} {value!r} contains a NUL character")
    if len(value.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise ValueError(f"the {what} is longer than MQTT's {MAX_TOPIC_BYTES} bytes")
