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


def event_env(
    broker: Broker, topic: str = "factory/line1/camera/+", **extra: str
) -> dict[str, str]:
    mappings = [
        {
            "topic": topic,
            "model": "defects",
            "image": "frame.jpeg",
            "carry": ["part_id", "station"],
            "result_topic": "factory/line1/verdicts/{model}",
        }
    ]
    return mqtt_env(broker, EDGE_AGENT_MQTT_EVENTS=json.dumps(mappings), **extra)


def event(part: int, seed: int | None = None) -> bytes:
    image = base64.b64encode(jpeg(seed if seed is not None else part % 7, (96, 128))).decode()
    return json.dumps({"part_id": part, "station": "s3", "frame": {"jpeg": image}}).encode()


def test_event_mapping_carries_metadata(state: Path, keys: Keys, broker: Broker) -> None:
    with run_agent(state, "--trusted-key", str(keys.public), env=event_env(broker)) as agent:
        ready(agent, broker)
        plant = TestClient(broker.port, "plant")
        plant.subscribe("factory/line1/verdicts/defects")
        for part in range(5):
            plant.publish("factory/line1/camera/cam2", event(part))
        plant.publish("factory/line1/camera/cam2", b'{"part_id": 99, "frame": {"jpeg": 12}}')
        results = [body(m) for m in plant.wait_for(6)]
        plant.close()
        assert [r["source"]["carry"]["part_id"] for r in results] == [0, 1, 2, 3, 4, 99]
        assert all(r["source"]["topic"] == "factory/line1/camera/cam2" for r in results)
        assert results[0]["source"]["carry"]["station"] == "s3" and results[0]["label"]
        assert results[-1]["error"]["code"] == "bad_request"
        assert "frame.jpeg" in results[-1]["error"]["message"]


def test_shared_subscription_splits_a_stream_between_two_agents(
    tmp_path: Path, state: Path, keys: Keys, broker: Broker
) -> None:
    second = tmp_path / "state2"
    subprocess.run(["cp", "-r", str(state), str(second)], check=True)
    shared = "$share/line1/factory/line1/camera/+"
    env_a = event_env(broker, topic=shared, EDGE_AGENT_DEVICE="box-a")
    env_b = event_env(broker, topic=shared, EDGE_AGENT_DEVICE="box-b")
    with (
        run_agent(state, "--trusted-key", str(keys.public), env=env_a) as agent_a,
        run_agent(second, "--trusted-key", str(keys.public), env=env_b) as agent_b,
    ):
        agent_a.wait_ready()
        agent_b.wait_ready()
        time.sleep(1.0)  # both subscribed
        plant = TestClient(broker.port, "plant-shared")
        plant.subscribe("factory/line1/verdicts/defects")
        for part in range(20):
            plant.publish(f"factory/line1/camera/cam{part % 2}", event(part))
        results = [body(m) for m in plant.wait_for(20)]
        plant.close()
        parts = sorted(r["source"]["carry"]["part_id"] for r in results)
        assert parts == list(range(20)), parts  # every event classified exactly once
        served_a = agent_a.log().count("") and None
        del served_a
        counts = [_predictions(agent.url) for agent in (agent_a, agent_b)]
        assert all(count > 0 for count in counts), counts
        assert sum(counts) == 20


def _predictions(url: str) -> int:
    import httpx

    text = httpx.get(f"{url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("lineside_predictions_total{")
            and 'transport="mqtt"' in line
            and 'outcome="ok"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def test_broker_restart_mid_stream_loses_nothing_and_keeps_order(
    state: Path, keys: Keys, broker: Broker
) -> None:
    with run_agent(state, "--trusted-key", str(keys.public), env=event_env(broker)) as agent:
        ready(agent, broker)
        consumer = TestClient(broker.port, "mes-consumer", clean=False)
        consumer.subscribe("factory/line1/verdicts/defects")
        plant = TestClient(broker.port, "plant-camera", clean=False)
        for part in range(15):
            plant.publish("factory/line1/camera/cam1", event(part))
        broker.stop()
        time.sleep(1.0)
        broker.start()
        deadline = time.monotonic() + 30
        while not plant.client.is_connected():  # paho reconnects on its own
            assert time.monotonic() < deadline, "the test publisher did not reconnect"
            time.sleep(0.05)
        for part in range(15, 30):
            plant.publish("factory/line1/camera/cam1", event(part))
        deadline = time.monotonic() + 60
        while len({body(m)["source"]["carry"]["part_id"] for m in consumer.messages}) < 30:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        plant.close()
        consumer.close()
        parts = [body(m)["source"]["carry"]["part_id"] for m in consumer.messages]
        unique = list(dict.fromkeys(parts))  # at-least-once: drop duplicates, keep first order
        assert unique == list(range(30)), parts


def test_results_in_the_outbox_survive_an_agent_kill(
    tmp_path: Path, state: Path, keys: Keys, broker: Broker
) -> None:
    import httpx

    env = mqtt_env(broker, EDGE_AGENT_MQTT_PUBLISH_HTTP_RESULTS="true")
    consumer = TestClient(broker.port, "mes", clean=False)
    consumer.subscribe(f"{BASE}/results/defects")
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        ready(agent, broker)
        broker.stop()  # results now wait in the outbox
        sent = []
        for seed in range(6):
            answer = httpx.post(
                f"{agent.url}/v1/models/defects/predict",
                content=jpeg(seed),
                headers={"Content-Type": "image/jpeg"},
            ).json()
            sent.append(answer["request_id"])
        agent.process.kill()  # SIGKILL: no clean shutdown
        agent.process.wait(10)
    broker.start()
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        results = consumer.wait_for(6, timeout=60)
    consumer.close()
    received = [body(m)["request_id"] for m in results]
    assert list(dict.fromkeys(received)) == sent


def test_agent_killed_between_publish_and_puback_delivers_everything(
    state: Path, keys: Keys, broker: Broker
) -> None:
    import httpx

    env = mqtt_env(broker, EDGE_AGENT_MQTT_PUBLISH_HTTP_RESULTS="true")
    consumer = TestClient(broker.port, "mes2", clean=False)
    consumer.subscribe(f"{BASE}/results/defects")
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        ready(agent, broker)
        broker.pause()  # the broker reads nothing and acknowledges nothing
        sent = []
        for seed in range(5):
            answer = httpx.post(
                f"{agent.url}/v1/models/defects/predict",
                content=jpeg(seed),
                headers={"Content-Type": "image/jpeg"},
            ).json()
            sent.append(answer["request_id"])
        time.sleep(0.5)  # published into the socket, no PUBACK
        agent.process.kill()
        agent.process.wait(10)
    broker.resume()
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        consumer.wait_for(5, timeout=60)
        time.sleep(1.0)  # let duplicates, if any, arrive too
    consumer.close()
    received = [body(m)["request_id"] for m in consumer.messages]
    assert set(received) == set(sent), (received, sent)
    assert list(dict.fromkeys(received)) == sent
    ids = [body(m)["message_id"] for m in consumer.messages]
    assert len(set(ids)) == len(sent)  # duplicates, if any, carry the same message id


def _pki(directory: Path) -> dict[str, Path]:
    """A CA, a broker certificate for localhost and two client certificates."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    directory.mkdir(parents=True, exist_ok=True)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (directory / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("test plant CA")).issuer_name(name("test plant CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    write("ca", ca_key, ca)
    for stem, common, server in (
        ("broker", "localhost", True),
        ("agent", "box1", False),
        ("client", "mes", False),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        )  # fmt: skip
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        write(stem, key, builder.sign(ca_key, hashes.SHA256()))
    return {p.name: p for p in directory.iterdir()}


def test_tls_with_client_certificates(tmp_path: Path, state: Path, keys: Keys) -> None:
    pki = _pki(tmp_path / "pki")
    config = (
        f"cafile {pki['ca.crt']}\ncertfile {pki['broker.crt']}\nkeyfile {pki['broker.key']}\n"
        "require_certificate true\nuse_identity_as_username true\n"
    )
    with running_broker(tmp_path / "tls-broker", extra_config=config) as broker:
        env = mqtt_env(
            broker,
            EDGE_AGENT_MQTT_HOST="localhost",
            EDGE_AGENT_MQTT_TLS_CA=str(pki["ca.crt"]),
            EDGE_AGENT_MQTT_TLS_CERTFILE=str(pki["agent.crt"]),
            EDGE_AGENT_MQTT_TLS_KEYFILE=str(pki["agent.key"]),
        )
        tls = {
            "ca_certs": str(pki["ca.crt"]),
            "certfile": str(pki["client.crt"]),
            "keyfile": str(pki["client.key"]),
        }
        with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
            agent.wait_ready()
            client = TestClient(broker.port, "mes-tls", tls=tls)
            client.subscribe("replies/tls")
            client.publish(
                f"{BASE}/infer/defects", jpeg(4), response_topic="replies/tls", correlation=b"t"
            )
            [reply] = client.wait_for(1)
            client.close()
            assert body(reply)["label"]
        # Without a client certificate the broker refuses the connection.
        import ssl

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        bare = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5
        )
        bare.tls_set(ca_certs=str(pki["ca.crt"]))
        with pytest.raises((ssl.SSLError, OSError)):
            bare.connect("localhost", broker.port)
            for _ in range(20):
                bare.loop(0.1)
            raise OSError("connected without a client certificate")


def test_bad_inputs_get_error_replies_and_the_agent_keeps_going(
    state: Path, keys: Keys, broker: Broker
) -> None:
    env = mqtt_env(
        broker,
        EDGE_AGENT_MQTT_MAX_PAYLOAD_BYTES="100000",
        EDGE_AGENT_MQTT_MAX_CORRELATION_BYTES="32",
    )
    photo = jpeg(5)
    b64 = base64.b64encode(photo).decode()
    cases: list[tuple[str, bytes, dict[str, object], str]] = [
        ("empty", b"", {}, "invalid_image"),
        ("oversized", b"\xff\xd8\xff" + b"0" * 200_000, {}, "payload_too_large"),
        ("invalid json", b"{not json", {"content_type": "application/json"}, "bad_request"),
        ("wrong type", json.dumps({"image": 5}).encode(), {}, "bad_request"),
        ("top_k type", json.dumps({"image": b64, "top_k": "3"}).encode(), {}, "bad_request"),
        ("bad base64", json.dumps({"image": "%%%"}).encode(), {}, "bad_request"),
        ("bad image", b"%PDF-1.4 not an image", {}, "unsupported_image"),
        ("truncated", photo[: len(photo) // 2], {}, "invalid_image"),
    ]
    with start(
        state, keys, broker, **{k: v for k, v in env.items() if k.startswith("EDGE_AGENT_MQTT_MAX")}
    ) as agent:
        ready(agent, broker)
        client = TestClient(broker.port, "tester")
        client.subscribe("replies/#")
        client.subscribe(f"{BASE}/errors")
        for number, (_name, payload, extra, _code) in enumerate(cases):
            client.publish(
                f"{BASE}/infer/defects", payload, response_topic="replies/bad",
                correlation=f"c{number}".encode(), **extra,  # type: ignore[arg-type]
            )  # fmt: skip
        replies = client.wait_for(len(cases), topic="replies/bad")
        by_correlation = {m.properties.CorrelationData.decode(): body(m) for m in replies}
        for number, (name, _payload, _extra, code) in enumerate(cases):
            reply = by_correlation[f"c{number}"]
            assert reply["error"]["code"] == code, (name, reply)
            assert reply["error"]["message"]
        # An unknown model, a response topic outside the allow-list, oversized correlation data,
        # and correlation data reused for a different request (a genuine redelivery of the same
        # request would get the same answer again; tests/integration/test_mqtt_no_loss.py).
        client.publish(
            f"{BASE}/infer/nope", photo, response_topic="replies/bad", correlation=b"unknown"
        )
        client.publish(
            f"{BASE}/infer/defects", photo, response_topic="elsewhere/x", correlation=b"deny"
        )
        client.publish(
            f"{BASE}/infer/defects", photo, response_topic="replies/bad", correlation=b"x" * 40
        )
        first = json.dumps({"image": b64, "request_id": "same"}).encode()
        reused = json.dumps({"image": b64, "request_id": "same", "top_k": 2}).encode()
        client.publish(
            f"{BASE}/infer/defects", first, response_topic="replies/bad", correlation=b"r1"
        )
        client.publish(
            f"{BASE}/infer/defects", reused, response_topic="replies/bad", correlation=b"r1"
        )
        replies = client.wait_for(len(cases) + 3, topic="replies/bad")
        errors = client.wait_for(2, topic=f"{BASE}/errors")
        got = {m.properties.CorrelationData: body(m) for m in replies}
        assert got[b"unknown"]["error"]["code"] == "unknown_model"
        reuse = [body(m) for m in replies if m.properties.CorrelationData == b"r1"]
        assert len(reuse) == 2 and "label" in reuse[0], reuse
        assert reuse[1]["error"]["code"] == "bad_request"
        assert "already used for a different request" in reuse[1]["error"]["message"]
        messages = " ".join(body(m)["error"]["message"] for m in errors)
        assert "not allowed" in messages and "correlation data" in messages
        # Still serving.
        client.publish(
            f"{BASE}/infer/defects", photo, response_topic="replies/bad", correlation=b"after"
        )
        client.wait_for(len(cases) + 4, topic="replies/bad")
        client.close()
        assert (
            "label"
            in {
                m.properties.CorrelationData: body(m)
                for m in client.messages
                if m.topic == "replies/bad"
            }[b"after"]
        )
        import httpx

        metrics = httpx.get(f"{agent.url}/metrics").text
        assert 'lineside_mqtt_errors_total{code="bad_request"}' in metrics


def test_a_flood_is_shed_not_queued(state: Path, keys: Keys, broker: Broker) -> None:
    env = {"EDGE_AGENT_MQTT_INBOUND_QUEUE": "2", "EDGE_AGENT_MQTT_WORKERS": "1"}
    with start(state, keys, broker, **env) as agent:
        ready(agent, broker)
        client = TestClient(broker.port, "flood")
        client.subscribe("replies/flood")
        photo = jpeg(6, (1200, 1600))
        for number in range(60):
            client.publish(f"{BASE}/infer/defects", photo, qos=0, response_topic="replies/flood",
                           correlation=str(number).encode())  # fmt: skip
        replies = client.wait_for(60, timeout=30)
        client.close()
        codes = [body(m).get("error", {}).get("code", "ok") for m in replies]
        assert "overloaded" in codes and "ok" in codes
        assert len(replies) == 60  # every message got an answer: a result or "overloaded"
        import httpx

        assert httpx.get(f"{agent.url}/healthz").status_code == 200
        metrics = httpx.get(f"{agent.url}/metrics").text
        shed = [
            line for line in metrics.splitlines() if line.startswith("lineside_mqtt_shed_total ")
        ]
        assert float(shed[0].split()[1]) > 0


def test_telemetry_is_published(state: Path, keys: Keys, broker: Broker) -> None:
    with start(state, keys, broker, EDGE_AGENT_TELEMETRY_INTERVAL_S="0.5") as agent:
        ready(agent, broker)
        client = TestClient(broker.port, "ops")
        client.subscribe(f"{BASE}/telemetry")
        import httpx

        httpx.post(
            f"{agent.url}/v1/models/defects/predict",
            content=jpeg(1),
            headers={"Content-Type": "image/jpeg"},
        )
        deadline = time.monotonic() + 20
        figures: dict[str, object] = {}
        while time.monotonic() < deadline:
            seen = [body(m) for m in client.messages]
            if seen and seen[-1].get("latency_ms"):
                figures = seen[-1]
                break
            time.sleep(0.1)
        client.close()
        assert figures["ready"] is True
        assert figures["latency_ms"]["http"]["samples"] >= 1  # type: ignore[index]
        assert figures["outcomes"]["http"]["ok"] >= 1  # type: ignore[index]
        assert figures["models"][0]["version"] == 1  # type: ignore[index]
        assert figures["mqtt"]["connected"] is True  # type: ignore[index]
        assert "process_rss_mb" in figures["system"]  # type: ignore[operator]


def test_example_mosquitto_config_with_tls_and_acls(
    tmp_path: Path, state: Path, keys: Keys
) -> None:
    """deploy/mosquitto runs as shipped (paths and ports swapped) and its ACLs hold."""
    from tests.agent_support import free_port

    pki = _pki(tmp_path / "pki")
    deploy = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
    plain, secure = free_port(), free_port()
    config = (deploy / "lineside.conf").read_text()
    for old, new in {
        "listener 1883 127.0.0.1": f"listener {plain} 127.0.0.1",
        "listener 8883": f"listener {secure} 127.0.0.1",
        "/etc/mosquitto/certs/plant-ca.crt": str(pki["ca.crt"]),
        "/etc/mosquitto/certs/broker.crt": str(pki["broker.crt"]),
        "/etc/mosquitto/certs/broker.key": str(pki["broker.key"]),
        "/etc/mosquitto/lineside.acl": str(deploy / "lineside.acl"),
        "/var/lib/mosquitto/": f"{tmp_path}/",
    }.items():
        assert old in config, old
        config = config.replace(old, new)
    (tmp_path / "broker").mkdir()
    conf = tmp_path / "broker" / "mosquitto.conf"
    import getpass

    conf.write_text(f"user {getpass.getuser()}\n{config}")
    broker_process = subprocess.Popen(["mosquitto", "-c", str(conf)])
    try:
        deadline = time.monotonic() + 10
        import socket

        while True:
            try:
                socket.create_connection(("127.0.0.1", secure), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, (
                    "mosquitto did not start with the example config"
                )
                time.sleep(0.05)
        broker = Broker(tmp_path / "broker", port=secure)
        env = mqtt_env(
            broker,
            EDGE_AGENT_MQTT_HOST="localhost",
            EDGE_AGENT_MQTT_TLS_CA=str(pki["ca.crt"]),
            EDGE_AGENT_MQTT_TLS_CERTFILE=str(pki["agent.crt"]),  # CN box1
            EDGE_AGENT_MQTT_TLS_KEYFILE=str(pki["agent.key"]),
            EDGE_AGENT_MQTT_RESPONSE_TOPICS=json.dumps(["lineside/v1/replies/#"]),
        )
        tls = {
            "ca_certs": str(pki["ca.crt"]),
            "certfile": str(pki["client.crt"]),
            "keyfile": str(pki["client.key"]),
        }
        with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
            agent.wait_ready()
            time.sleep(1.0)
            mes = TestClient(secure, "mes", tls=tls)  # CN mes
            mes.subscribe("lineside/v1/replies/mes/#")
            mes.publish(
                f"{BASE}/infer/defects",
                jpeg(9),
                response_topic="lineside/v1/replies/mes/1",
                correlation=b"acl",
            )
            [reply] = mes.wait_for(1, topic="lineside/v1/replies/mes/1")
            assert body(reply)["label"]
            mes.close()
    finally:
        broker_process.terminate()
        broker_process.wait(10)
