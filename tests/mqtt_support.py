"""A real Mosquitto broker per test (own port, own persistence) and a small paho test client.

The broker can be stopped and started again on the same port (persistence on, so sessions and
queued QoS 1 messages survive, as on a real plant broker), or frozen with SIGSTOP to hold back
acknowledgements.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import shutil
import signal
import socket
import subprocess
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

from tests.agent_support import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass
class Broker:
    """A Mosquitto process on a free port of 127.0.0.1."""

    directory: Path
    port: int = field(default_factory=free_port)
    extra_config: str = ""
    process: subprocess.Popen[bytes] | None = None

    def config(self) -> Path:
        path = self.directory / "mosquitto.conf"
        path.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # Run as whoever runs the tests: as root, mosquitto would switch to its own user and
            # could not write the persistence and log files in the test's directory.
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            f"log_dest file {self.directory}/mosquitto.log\n"
            f"{self.extra_config}"
        )
        return path

    def start(self) -> Broker:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config())])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"mosquitto did not listen on {self.port}: {self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # saves its persistence file
            self.process.wait(10)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: whatever the broker had not saved yet (autosave_interval 1) is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        path = self.directory / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def running_broker(directory: Path, extra_config: str = "") -> Iterator[Broker]:
    broker = Broker(directory, extra_config=extra_config).start()
    try:
        yield broker
    finally:
        if broker.process is not None and broker.process.poll() is None:
            broker.resume()
        broker.stop()


class TestClient:
    """A paho MQTT 5 client that records what it receives."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        port: int,
        client_id: str,
        *,
        clean: bool = True,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
        tls: dict[str, Any] | None = None,
    ) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._condition = threading.Condition()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=None if protocol == MQTTProtocolVersion.MQTTv5 else clean,
        )
        if tls:
            self.client.tls_set(**tls)
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        properties = None
        if protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 0 if clean else 3600
        self.client.connect(
            "127.0.0.1" if not tls else "localhost",
            port,
            clean_start=clean
            if protocol == MQTTProtocolVersion.MQTTv5
            else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        with self._condition:
            self.messages.append(message)
            self._condition.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos)
        assert self._subscribed.wait(10), f"no SUBACK for {topic}"

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        content_type: str | None = None,
        retain: bool = False,
    ) -> None:
        properties = None
        if response_topic or correlation or content_type:
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation:
                properties.CorrelationData = correlation
            if content_type:
                properties.ContentType = content_type
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos:
            info.wait_for_publish(10)

    def wait_for(
        self, count: int, timeout: float = 30, topic: str | None = None
    ) -> list[paho.MQTTMessage]:
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                found = [m for m in self.messages if topic is None or m.topic == topic]
                if len(found) >= count or time.monotonic() > deadline:
                    return found
                self._condition.wait(max(0.01, deadline - time.monotonic()))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def body(message: paho.MQTTMessage) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(message.payload)
    return loaded
