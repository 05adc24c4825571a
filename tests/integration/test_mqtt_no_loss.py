"""No answer lost or given twice (#14), against a real Mosquitto started per test.

- a backlog queued at the broker while the agent is down (stopped, or SIGKILLed) is answered with
  results once the model has loaded, not with `unknown_model`;
- a model that never loads gets `not_ready` answers after `mqtt_model_wait_s`, and the other
  model is still served;
- with the state directory's disk full, no MQTT request is acknowledged and lost: each is answered
  once space returns; readiness says `disk_full`; feedback and bundle installs answer 507;
- a broker SIGKILL mid-stream: every request answered, one message_id per request, and no
  error for a genuine redelivery;
- a burst beyond capacity: every reply carries its request's correlation data and request id.

Figures (drain time of the backlog, duplicates) are printed for the closing note.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.agent_support import (
    Keys,
    build_bundle,
    install_bundle,
    jpeg,
    make_keys,
    run_agent,
    spawn_agent,
)
from tests.mqtt_support import Broker, TestClient, body, running_broker

SITE, DEVICE = "plant", "box1"
BASE = f"lineside/v1/{SITE}/{DEVICE}"
CAMERA = "factory/line1/camera"
RESULTS = f"{BASE}/results/defects"
TOKEN = "no-loss-token-0123456789"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


def install(state: Path, keys: Keys, dist: Path, name: str = "defects") -> Path:
    bundle = build_bundle(dist, keys, name=name)
    install_bundle(state, bundle.path, keys.public)
    return bundle.path


@pytest.fixture
def state(tmp_path: Path, keys: Keys) -> Path:
    state = tmp_path / "state"
    install(state, keys, tmp_path / "dist")
    return state


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "broker") as broker:
        yield broker


def env_for(broker: Broker, **extra: str) -> dict[str, str]:
    env = {
        "EDGE_AGENT_MQTT_ENABLED": "true",
        "EDGE_AGENT_MQTT_PORT": str(broker.port),
        "EDGE_AGENT_SITE": SITE,
        "EDGE_AGENT_DEVICE": DEVICE,
        "EDGE_AGENT_MQTT_RESPONSE_TOPICS": json.dumps(["replies/#"]),
        "EDGE_AGENT_MQTT_EVENTS": json.dumps([{"topic": f"{CAMERA}/+", "model": "defects"}]),
        "EDGE_AGENT_TELEMETRY_INTERVAL_S": "0",
        "EDGE_AGENT_MQTT_RECONNECT_MIN_S": "0.1",
        "EDGE_AGENT_MQTT_RECONNECT_MAX_S": "1",
        "EDGE_AGENT_ADMIN_TOKEN": TOKEN,
    }
    env.update(extra)
    return env


def wait_online(broker: Broker, timeout: float = 30) -> None:
    watcher = TestClient(broker.port, f"watch-{time.monotonic_ns()}")
    try:
        watcher.subscribe(f"{BASE}/status")
        deadline = time.monotonic() + timeout
        while not any(body(m)["status"] == "online" for m in watcher.messages):
            assert time.monotonic() < deadline, "the agent never published status online"
            time.sleep(0.05)
    finally:
        watcher.close()


def subscribe_once(state: Path, keys: Keys, broker: Broker) -> None:
    """Run the agent once, so the broker keeps its persistent session and subscriptions."""
    with run_agent(state, "--trusted-key", str(keys.public), env=env_for(broker)) as agent:
        agent.wait_ready()
        wait_online(broker)


def request(number: int, photo: bytes) -> bytes:
    return json.dumps(
        {"image": base64.b64encode(photo).decode(), "request_id": f"req-{number}"}
    ).encode()


def codes(messages: list[paho.MQTTMessage]) -> Counter[str]:
    return Counter(body(m).get("error", {}).get("code", "ok") for m in messages)


@pytest.mark.parametrize(("how", "each"), [("sigterm", 20), ("sigkill", 50)])
def test_a_backlog_queued_across_a_restart_is_answered_with_results(
    state: Path, keys: Keys, broker: Broker, how: str, each: int
) -> None:
    """`each` requests and `each` events; 50 + 50 is more than the agent takes at once (67):
    the rest waits at the broker (Receive Maximum) instead of being shed."""
    env = env_for(broker)
    listener = TestClient(broker.port, "plant-systems", clean=False)
    listener.subscribe("replies/backlog")
    listener.subscribe(RESULTS)
    agent = spawn_agent(state, "--trusted-key", str(keys.public), env=env)
    try:
        agent.wait_ready()
        wait_online(broker)
    finally:
        if how == "sigkill":
            agent.process.kill()
            agent.process.wait(10)
        else:
            agent.stop()
    plant = TestClient(broker.port, "plant-camera")
    photo = jpeg(2)
    for number in range(each):
        plant.publish(f"{BASE}/infer/defects", request(number, photo),
                      response_topic="replies/backlog", correlation=f"c{number}".encode())  # fmt: skip
        plant.publish(f"{CAMERA}/cam{number % 3}", photo)
    plant.close()
    # The model loads slowly, so the backlog arrives well before it is ready.
    slow = {**env, "LINESIDE_FAULTS": "models.load.defects=delay:2"}
    started = time.monotonic()
    with run_agent(state, "--trusted-key", str(keys.public), env=slow):
        replies = listener.wait_for(each, timeout=60, topic="replies/backlog")
        results = listener.wait_for(each, timeout=60, topic=RESULTS)
        drained = time.monotonic() - started
    listener.close()
    assert codes(replies) == {"ok": each} and codes(results) == {"ok": each}
    assert sorted(m.properties.CorrelationData for m in replies) == sorted(
        f"c{n}".encode() for n in range(each)
    )
    print(f"\n[no-loss] backlog of {2 * each} after {how}: {drained:.1f} s (2 s of it loading)")


def test_a_model_that_never_loads_is_answered_not_ready_and_the_other_still_serves(
    tmp_path: Path, state: Path, keys: Keys, broker: Broker
) -> None:
    install(state, keys, tmp_path / "dist-slow", name="slow")
    subscribe_once(state, keys, broker)
    listener = TestClient(broker.port, "plant-systems", clean=False)
    listener.subscribe("replies/#")
    plant = TestClient(broker.port, "plant-camera")
    photo = jpeg(3)
    for number in range(5):
        for model in ("defects", "slow"):
            plant.publish(f"{BASE}/infer/{model}", request(number, photo),
                          response_topic=f"replies/{model}", correlation=f"{model}{number}".encode())  # fmt: skip
    plant.close()
    env = env_for(
        broker,
        LINESIDE_FAULTS="models.load.slow=delay:30",
        EDGE_AGENT_MQTT_MODEL_WAIT_S="3",
    )
    agent = spawn_agent(state, "--trusted-key", str(keys.public), env=env)
    try:
        served = listener.wait_for(5, timeout=60, topic="replies/defects")
        refused = listener.wait_for(5, timeout=60, topic="replies/slow")
    finally:
        agent.process.kill()  # its loading thread sleeps on
        agent.process.wait(10)
    listener.close()
    assert codes(served) == {"ok": 5}
    assert codes(refused) == {"not_ready": 5}, [body(m) for m in refused]
    assert {body(m)["error"]["request_id"] for m in refused} == {f"req-{n}" for n in range(5)}


@contextlib.contextmanager
def small_disk(directory: Path) -> Iterator[bool]:
    """A 20 MiB tmpfs at `directory` (True), or nothing where it cannot be mounted (False)."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(directory)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def fill(directory: Path) -> Path:
    """Fill the disk under `directory` to the last byte."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (1 << 20, 1 << 16, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(descriptor, b"\0" * block)
    finally:
        os.close(descriptor)
    return filler


def test_a_full_disk_loses_no_mqtt_answer(tmp_path: Path, keys: Keys, broker: Broker) -> None:
    with small_disk(tmp_path / "state") as mounted:
        state = tmp_path / "state"
        bundle = install(state, keys, tmp_path / "dist")
        extra = {"EDGE_AGENT_DISK_RESERVE_MB": "1"}
        if not mounted:  # the outbox refuses 40 stores as a full disk would
            extra["LINESIDE_FAULTS"] = "outbox.put=enospc@1-40"
        env = env_for(broker, **extra)
        listener = TestClient(broker.port, "plant-systems", clean=False)
        listener.subscribe("replies/full")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
            agent.wait_ready()
            wait_online(broker)
            kept = httpx.post(
                f"{agent.url}/v1/models/defects/predict",
                content=jpeg(4),
                headers={"Content-Type": "image/jpeg"},
            ).json()
            time.sleep(0.3)  # the request record is written off the request path
            filler = fill(state) if mounted else None
            plant = TestClient(broker.port, "plant-camera")
            photo = jpeg(5)
            for number in range(8):
                plant.publish(f"{BASE}/infer/defects", request(number, photo),
                              response_topic="replies/full", correlation=f"f{number}".encode())  # fmt: skip
            time.sleep(3)
            if mounted:
                assert listener.messages == []  # nothing answered: nothing could be stored
                ready = httpx.get(f"{agent.url}/readyz")
                assert ready.status_code == 503 and "disk_full" in ready.text, ready.text
                feedback = httpx.post(
                    f"{agent.url}/v1/feedback",
                    headers=auth,
                    json={"request_id": kept["request_id"], "verdict": "confirmed"},
                )
                assert feedback.status_code == 507, feedback.text
                assert feedback.json()["error"]["code"] == "disk_full"
                installed = httpx.post(
                    f"{agent.url}/v1/admin/bundles",
                    headers={**auth, "Content-Type": "application/octet-stream"},
                    content=bundle.read_bytes(),
                )
                assert installed.status_code == 507, installed.text
                metrics = httpx.get(f"{agent.url}/metrics").text
                assert "lineside_disk_full 1.0" in metrics
                assert filler is not None
                filler.unlink()  # space comes back
            replies = listener.wait_for(8, timeout=60)
            plant.close()
            assert httpx.get(f"{agent.url}/readyz").status_code == 200
        listener.close()
    assert codes(replies) == {"ok": 8}, [body(m)["error"] for m in replies if "error" in body(m)]
    by_request = Counter(body(m)["client_request_id"] for m in replies)
    assert by_request == {f"req-{n}": 1 for n in range(8)}


def test_a_broker_killed_mid_stream_answers_every_request_once(
    state: Path, keys: Keys, broker: Broker
) -> None:
    """A broker SIGKILL loses what it had not saved (its own durability gap, up to a second);
    what it delivers again, the agent answers again with the same message_id, never with an
    error. Every request published after the restart is answered."""
    env = env_for(broker)
    listener = TestClient(broker.port, "requester-inbox", clean=False)
    listener.subscribe("replies/stream")
    photo = jpeg(7)
    summary: list[dict[str, int]] = []
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        wait_online(broker)
        requester = TestClient(broker.port, "requester", clean=False)
        time.sleep(1.5)  # the broker saves the sessions (autosave_interval 1)
        for run in range(3):
            before = len(listener.messages)
            for number in range(100):
                key = run * 100 + number
                requester.client.publish(
                    f"{BASE}/infer/defects", request(key, photo), qos=1,
                    properties=reply_properties("replies/stream", f"s{key}".encode()),
                )  # fmt: skip
                time.sleep(0.01)
                if number == 50:
                    broker.kill()
                    broker.start()
                    wait_online(broker)
                    deadline = time.monotonic() + 30
                    while not (requester.client.is_connected() and listener.client.is_connected()):
                        assert time.monotonic() < deadline, "the test clients did not reconnect"
                        time.sleep(0.05)
            after_restart = {f"req-{run * 100 + n}" for n in range(51, 100)}
            deadline = time.monotonic() + 60
            while True:
                got = {body(m).get("client_request_id") for m in listener.messages[before:]}
                if after_restart <= got or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            time.sleep(1.0)  # late duplicates, if any
            mine = {f"req-{run * 100 + n}" for n in range(100)}
            answers = [
                answer
                for answer in (body(m) for m in listener.messages[before:])
                if (answer.get("client_request_id") or answer["error"]["request_id"]) in mine
            ]
            ids: dict[str, set[str]] = defaultdict(set)
            for answer in answers:
                ids[answer.get("client_request_id") or answer["error"]["request_id"]].add(
                    answer["message_id"]
                )
            errors = [a["error"] for a in answers if "error" in a]
            assert errors == [], errors  # no "replay" error for a genuine redelivery
            assert after_restart <= set(ids), sorted(after_restart - set(ids))
            assert all(len(found) == 1 for found in ids.values()), ids  # one answer per request
            summary.append({"published": 100, "answered": len(ids), "deliveries": len(answers)})
        requester.close()
        metrics = httpx.get(f"{agent.url}/metrics").text
    listener.close()
    again = [line for line in metrics.splitlines() if line.startswith("lineside_mqtt_redelivered")]
    print(f"\n[no-loss] broker SIGKILL at message 50 of 100, 3 runs: {summary}; {again}")


def reply_properties(response_topic: str, correlation: bytes) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = response_topic
    properties.CorrelationData = correlation
    return properties


def test_a_burst_beyond_capacity_is_answered_with_matchable_replies(
    state: Path, keys: Keys, broker: Broker
) -> None:
    env = env_for(broker, EDGE_AGENT_MQTT_INBOUND_QUEUE="4", EDGE_AGENT_MQTT_WORKERS="1")
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        wait_online(broker)
        client = TestClient(broker.port, "burst")
        client.subscribe("replies/burst")
        photo = jpeg(8, (480, 640))
        count = 2000
        for number in range(count):
            client.client.publish(
                f"{BASE}/infer/defects", request(number, photo), qos=0,
                properties=reply_properties("replies/burst", f"b{number}".encode()),
            )  # fmt: skip
        replies = client.wait_for(count, timeout=120)
        client.close()
    found = Counter(codes(replies))
    assert len(replies) == count and found["overloaded"] > 0 and found["ok"] > 0, found
    for message in replies:
        answer = body(message)
        request_id = answer.get("client_request_id") or answer["error"]["request_id"]
        assert message.properties.CorrelationData == f"b{request_id[4:]}".encode(), answer
    print(f"\n[no-loss] burst of {count}: {dict(found)}")
