"""No-answer-lost benchmark (#14): draining an MQTT backlog after a restart, and what remembering
answered messages costs the outbox — side by side in one run.

    python -m bench.bench_backlog [--backlog 100] [--rounds 3]

Cases:
- backlog: the agent is SIGKILLed, `--backlog` requests are queued at a real Mosquitto for its
  persistent session, and the agent is started again; time from the start to the last answer
  (and from readiness to the last answer), answers, errors and duplicates. Compared with the
  same burst sent to the agent when it is up and ready (steady), in the same run.
- outbox: storing one reply alone vs storing it with its dedupe identity (one transaction), in
  alternating rounds, in-process.
Writes bench/results/backlog.json. The model is the tests' tiny classifier: the figures are about
the transport, not inference.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.common import flatten, interleaved, percentile, round_ratios, write_json
from edge_agent.mqtt.outbox import Answered, Draft, Outbox
from tests.agent_support import build_bundle, install_bundle, jpeg, make_keys, spawn_agent
from tests.mqtt_support import Broker

SITE, DEVICE = "bench", "box"
BASE = f"lineside/v1/{SITE}/{DEVICE}"
REPLIES = "replies/backlog"


class Inbox:
    """Collects replies on `REPLIES` with the time each arrived."""

    def __init__(self, port: int) -> None:
        self.arrived: list[tuple[float, bytes, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"inbox-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(REPLIES, 1)
        assert subscribed.wait(10)

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.arrived.append(
                (time.monotonic(), message.properties.CorrelationData, json.loads(message.payload))
            )

    def wait(self, keys: set[bytes], timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                seen = {key for _, key, _ in self.arrived}
                if keys <= seen:
                    return max(t for t, key, _ in self.arrived if key in keys)
            time.sleep(0.01)
        raise TimeoutError(f"{len(keys - seen)} of {len(keys)} requests unanswered")

    def summary(self, keys: set[bytes]) -> dict[str, Any]:
        with self._lock:
            mine = [(key, body) for _, key, body in self.arrived if key in keys]
        per_request = Counter(key for key, _ in mine)
        message_ids: dict[bytes, set[str]] = {}
        for key, body in mine:
            message_ids.setdefault(key, set()).add(body["message_id"])
        return {
            "answered": len(per_request),
            "deliveries": len(mine),
            "errors": sum(1 for _, body in mine if "error" in body),
            "error_codes": dict(Counter(b["error"]["code"] for _, b in mine if "error" in b)),
            "requests_with_two_message_ids": sum(1 for ids in message_ids.values() if len(ids) > 1),
        }

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_burst(port: int, count: int, tag: str) -> set[bytes]:
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"plant-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.connect("127.0.0.1", port)
    client.loop_start()
    photo = base64.b64encode(jpeg(3)).decode()
    keys = set()
    infos = []
    for number in range(count):
        key = f"{tag}-{number}".encode()
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = REPLIES
        properties.CorrelationData = key
        payload = json.dumps({"image": photo, "request_id": key.decode()}).encode()
        infos.append(client.publish(f"{BASE}/infer/defects", payload, qos=1, properties=properties))
        keys.add(key)
    for info in infos:
        info.wait_for_publish(30)  # the broker has them all before this client leaves
    client.disconnect()
    client.loop_stop()
    return keys


def env_for(port: int) -> dict[str, str]:
    return {
        "EDGE_AGENT_MQTT_ENABLED": "true",
        "EDGE_AGENT_MQTT_PORT": str(port),
        "EDGE_AGENT_SITE": SITE,
        "EDGE_AGENT_DEVICE": DEVICE,
        "EDGE_AGENT_MQTT_RESPONSE_TOPICS": json.dumps(["replies/#"]),
        "EDGE_AGENT_TELEMETRY_INTERVAL_S": "0",
        "EDGE_AGENT_MQTT_RECONNECT_MIN_S": "0.1",
    }


def wait_ready(url: str, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic()
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise TimeoutError("the agent did not become ready")


def backlog_round(
    work: Path, broker: Broker, state: Path, key: Path, count: int, tag: str
) -> dict[str, Any]:
    inbox = Inbox(broker.port)
    env = env_for(broker.port)
    args = ("--trusted-key", str(key))
    # Steady: the agent up and ready, the same burst.
    agent = spawn_agent(state, *args, env=env)
    wait_ready(agent.url)
    time.sleep(0.5)  # subscribed
    sent_at = time.monotonic()
    steady_keys = publish_burst(broker.port, count, f"{tag}-steady")
    steady_s = inbox.wait(steady_keys) - sent_at
    agent.process.kill()  # no clean shutdown
    agent.process.wait(10)
    # Backlog: queued while the agent is down, answered after it starts again.
    backlog_keys = publish_burst(broker.port, count, f"{tag}-backlog")
    started = time.monotonic()
    agent = spawn_agent(state, *args, env=env)
    ready = wait_ready(agent.url)
    last = inbox.wait(backlog_keys)
    time.sleep(1.0)  # late duplicates, if any
    summary = inbox.summary(backlog_keys)
    agent.stop()
    inbox.close()
    return {
        "steady_s": round(steady_s, 3),
        "backlog_from_start_s": round(last - started, 3),
        "backlog_after_ready_s": round(max(0.0, last - ready), 3),
        "start_to_ready_s": round(ready - started, 3),
        **summary,
    }


def outbox_cost(work: Path, rounds: int) -> dict[str, Any]:
    box = Outbox(work / "outbox.sqlite3", max_bytes=64 << 20, max_messages=100_000)
    payload = json.dumps({"label": "scratch", "score": 0.9, "top_k": [["scratch", 0.9]]}).encode()
    counter = iter(range(10**9))

    def plain() -> None:
        number = next(counter)
        box.put_many(
            [Draft("replies/a", payload, "reply", f"m{number}", {"correlation_data": "01"})]
        )

    def remembered() -> None:
        number = next(counter)
        box.put_many(
            [Draft("replies/a", payload, "reply", f"m{number}", {"correlation_data": "01"})],
            answered=Answered(f"cd|replies/a|{number:08x}", "d" * 32),
        )

    samples = interleaved(
        {"plain": plain, "remembered": remembered}, rounds=rounds, per_round=300, warmup=50
    )
    box.close()
    return {
        "plain_p50_us": round(percentile(flatten(samples["plain"]), 50) * 1e6, 1),
        "remembered_p50_us": round(percentile(flatten(samples["remembered"]), 50) * 1e6, 1),
        "speed_ratio_plain_over_remembered": round_ratios(samples["remembered"], samples["plain"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backlog", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        keys = make_keys(work / "keys")
        bundle = build_bundle(work / "dist", keys)
        state = work / "state"
        install_bundle(state, bundle.path, keys.public)
        broker = Broker(work / "broker").start()
        try:
            rounds = [
                backlog_round(work, broker, state, keys.public, options.backlog, f"r{n}")
                for n in range(options.rounds)
            ]
        finally:
            broker.stop()
        cost = outbox_cost(work, rounds=6)
    result = {
        "backlog": options.backlog,
        "rounds": rounds,
        "median": {
            key: statistics.median(r[key] for r in rounds)
            for key in ("steady_s", "backlog_after_ready_s", "backlog_from_start_s")
        },
        "ratio_backlog_after_ready_over_steady": round(
            statistics.median(r["backlog_after_ready_s"] / r["steady_s"] for r in rounds), 2
        ),
        "outbox": cost,
    }
    path = write_json("backlog", result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
