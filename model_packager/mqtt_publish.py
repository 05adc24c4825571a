"""Publishing one retained message to an MQTT broker, and knowing the broker took it.

The packager publishes signed notices from a workstation or a CI job: connect (MQTT 5, optional
TLS and user name/password), publish retained with QoS 1, wait for the PUBACK and check its reason
code (an ACL refusal arrives as a PUBACK, not as an error), disconnect. The paho client is driven
from the calling thread with `loop()`, so no background thread outlives a failure. paho-mqtt is
imported here only, so the rest of the packager works without it.
"""

from __future__ import annotations

import os
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_packager.errors import PublishError

MQTT_PORT = 1883
MQTTS_PORT = 8883


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to connect; a password never shows in a repr."""

    host: str
    port: int
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0

    @property
    def where(self) -> str:
        return f"{'mqtts' if self.tls_ca else 'mqtt'}://{self.host}:{self.port}"


def parse_address(text: str, *, tls: bool) -> tuple[str, int]:
    """`HOST`, `HOST:PORT` or `[IPv6]:PORT` as (host, port); the port defaults by TLS."""
    default = MQTTS_PORT if tls else MQTT_PORT
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    port = int(port_text) if port_text.isdigit() else -1 if port_text else default
    if not host or not 1 <= port <= 65535:
        raise PublishError(
            f"--broker {text!r} is not HOST[:PORT] (e.g. broker.plant.local:8883, or "
            "[::1]:1883 for IPv6)"
        )
    return host, port


def publish_retained(
    broker: BrokerConfig, topic: str, payload: bytes, *, expiry_s: int | None = None
) -> None:
    """Publish `payload` retained with QoS 1 and return once the broker has acknowledged it.

    `expiry_s` sets MQTT 5's message expiry, so the broker drops the retained message once it
    means nothing any more. Every failure is a `PublishError` saying what to check.
    """
    try:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
    except ImportError as exc:
        raise PublishError(
            "--broker needs paho-mqtt 2.x, which is not installed here: pip install "
            "'paho-mqtt>=2.1,<3', or publish with --out FILE and copy the notice"
        ) from exc

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"model-packager-{os.getpid()}-{secrets.token_hex(4)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.connect_timeout = broker.timeout_s
    events: dict[str, Any] = {}
    client.on_connect = lambda _c, _u, _f, reason, _p: events.setdefault("connack", reason)
    client.on_publish = lambda _c, _u, mid, reason, _p: events.setdefault(f"puback-{mid}", reason)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls_ca is not None:
        client.tls_set(
            ca_certs=str(broker.tls_ca),
            certfile=str(broker.tls_cert) if broker.tls_cert else None,
            keyfile=str(broker.tls_key) if broker.tls_key else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    deadline = time.monotonic() + broker.timeout_s
    try:
        client.connect(broker.host, broker.port, keepalive=60, clean_start=True)
    except (OSError, ValueError) as exc:
        hint = "check --broker and that the broker is running and reachable from here"
        if isinstance(exc, ssl.SSLError):
            hint = "check --tls-ca, the client certificate and the broker's host name"
        raise PublishError(
            f"cannot connect to the MQTT broker at {broker.where} ({exc}); {hint}"
        ) from exc
    try:
        _wait(client, deadline, broker, lambda: "connack" in events, "CONNACK")
        if events["connack"].is_failure:
            raise PublishError(
                f"the broker at {broker.where} refused the connection ({events['connack']}); "
                "check --username/--password-file or the client certificate"
            )
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ContentType = "application/json"
        if expiry_s is not None:
            properties.MessageExpiryInterval = max(1, expiry_s)
        info = client.publish(topic, payload, qos=1, retain=True, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise PublishError(f"publishing to {topic} failed ({paho.error_string(info.rc)})")
        _wait(client, deadline, broker, lambda: f"puback-{info.mid}" in events, "PUBACK")
        reason = events[f"puback-{info.mid}"]
        if reason.is_failure:
            raise PublishError(
                f"the broker at {broker.where} refused the message on {topic} ({reason}); "
                "check that its ACL lets this user write that topic"
            )
    finally:
        client.disconnect()


def _wait(
    client: Any, deadline: float, broker: BrokerConfig, done: Callable[[], bool], what: str
) -> None:
    """Run paho's network loop in this thread until `done()` or the deadline passes."""
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PublishError(
                f"no {what} from the broker at {broker.where} within {broker.timeout_s:g} s; "
                "check that it is an MQTT broker and healthy, or raise --timeout"
            )
        rc = client.loop(timeout=min(remaining, 0.5))
        if rc != 0 and not done():  # 0 is MQTT_ERR_SUCCESS
            import paho.mqtt.client as paho

            raise PublishError(
                f"the broker at {broker.where} closed the connection before its {what} "
                f"({paho.error_string(rc)}); check the user name, password or client "
                "certificate, and the broker's log"
            )
