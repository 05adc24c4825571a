"""The agent over MQTT against a real Mosquitto: request/response, event mappings, shared
subscriptions, TLS, broker and agent outages with nothing lost, and every kind of bad input."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from tests.agent_support import AgentProcess, Keys, build_bundle, jpeg, make_keys, run_agent
from tests.mqtt_support import Broker, TestClient, body, running_broker

SITE, DEVICE = "plant", "box1"
BASE = f"lineside/v1/{SITE}/{DEVICE}"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def state(tmp_path: Path, keys: Keys) -> Path:
    bundle = build_bundle(tmp_path / "dist", keys)
    state = tmp_path / "state"
    result = subprocess.run(
        [".venv/bin/edge-agent", "install", str(bundle.path), "--state-dir", str(state),
         "--trusted-key", str(keys.public)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return state


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "broker") as broker:
        yield broker


def mqtt_env(broker: Broker, **extra: str) -> dict[str, str]:
    env = {
        "EDGE_AGENT_MQTT_ENABLED": "true",
        "EDGE_AGENT_MQTT_PORT": str(broker.port),
        "EDGE_AGENT_SITE": SITE,
        "EDGE_AGENT_DEVICE": DEVICE,
        "EDGE_AGENT_MQTT_RESPONSE_TOPICS": json.dumps(["replies/#"]),
        "EDGE_AGENT_TELEMETRY_INTERVAL_S": "0",
        "EDGE_AGENT_MQTT_RECONNECT_MIN_S": "0.1",
        "EDGE_AGENT_MQTT_RECONNECT_MAX_S": "1",
    }
    env.update(extra)
    return env


def wait_online(port: int, timeout: float = 30) -> None:
    watcher = TestClient(port, f"watch-{time.monotonic_ns()}")
    try:
        watcher.subscribe(f"{BASE}/status")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            online = [m for m in watcher.messages if body(m)["status"] == "online"]
            if online:
                return
            time.sleep(0.05)
        raise AssertionError("the agent never published status online")
    finally:
        watcher.close()


def start(state: Path, keys: Keys, broker: Broker, **extra: str):  # type: ignore[no-untyped-def]
    return run_agent(state, "--trusted-key", str(keys.public), env=mqtt_env(broker, **extra))


def ready(agent: AgentProcess, broker: Broker) -> None:
    agent.wait_ready()
    wait_online(broker.port)


def test_request_response_with_correlation_data(state: Path, keys: Keys, broker: Broker) -> None:
    with start(state, keys, broker) as agent:
        ready(agent, broker)
        client = TestClient(broker.port, "requester")
        client.subscribe("replies/requester")
        photo = jpeg(1, (480, 640))
        client.publish(
            f"{BASE}/infer/defects", photo, response_topic="replies/requester", correlation=b"req-1"
        )
        encoded = json.dumps(
            {"image": base64.b64encode(photo).decode(), "request_id": "r2"}
        ).encode()
        client.publish(
            f"{BASE}/infer/defects",
            encoded,
            response_topic="replies/requester",
            correlation=b"req-2",
        )
        replies = client.wait_for(2)
        client.close()
        assert len(replies) == 2
        by_correlation = {m.properties.CorrelationData: body(m) for m in replies}
        assert set(by_correlation) == {b"req-1", b"req-2"}
        first, second = by_correlation[b"req-1"], by_correlation[b"req-2"]
        assert first["label"] == second["label"] and first["top_k"] == second["top_k"]
        assert first["model"]["name"] == "defects" and first["knowledge"]["title"]
        assert second["client_request_id"] == "r2"
        assert first["message_id"] != second["message_id"]
        # The same answer as over HTTP.
        import httpx

        over_http = httpx.post(
            f"{agent.url}/v1/models/defects/predict",
            content=photo,
            headers={"Content-Type": "image/jpeg"},
        ).json()
        assert over_http["top_k"] == first["top_k"]


def test_mosquitto_rr_round_trip(state: Path, keys: Keys, broker: Broker) -> None:
    # mosquitto_rr 2.0.11 sends an empty payload for -f and -s; -m with JSON works everywhere.
    request = json.dumps({"image": base64.b64encode(jpeg(2)).decode()})
    with start(state, keys, broker) as agent:
        ready(agent, broker)
        result = subprocess.run(
            ["mosquitto_rr", "-p", str(broker.port), "-t", f"{BASE}/infer/defects",
             "-e", "replies/rr", "-m", request, "-W", "20", "-q", "1"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert "label" in answer, answer
        assert answer["label"] in ("ok", "scratch", "dent")


def test_mqtt_311_request_gets_its_result_on_the_results_topic(
    state: Path, keys: Keys, broker: Broker
) -> None:
    with start(state, keys, broker) as agent:
        ready(agent, broker)
        client = TestClient(broker.port, "old-plc", protocol=MQTTProtocolVersion.MQTTv311)
        client.subscribe(f"{BASE}/results/defects")
        payload = json.dumps(
            {"image": base64.b64encode(jpeg(3)).decode(), "request_id": "plc-7"}
        ).encode()
        client.publish(f"{BASE}/infer/defects", payload)
        [reply] = client.wait_for(1)
        client.close()
        assert body(reply)["client_request_id"] == "plc-7"
        assert body(reply)["label"]
