"""MQTT benchmark: request/response round trip, the photo path over MQTT vs HTTP, and sustained
events per second before shedding starts — all in one run, against a real Mosquitto and a real
`edge-agent serve` process (the load comes from this process).

    python -m bench.bench_mqtt [--rounds 6] [--per-round 40] [--quick]

Cases:
- broker echo: a QoS 1 publish to a topic this client subscribes to (what the broker alone costs);
- small round trip: a QoS 1 MQTT 5 request (a ~1 KB JPEG) to a tiny model and its reply
  (target p50 <= 3x the broker echo p50 of the same run); the agent's own pipeline time
  (decode, preprocess, infer, postprocess, from the replies' `timings_ms`) is reported beside
  it, since the echo does no work at all;
- photo path: the same phone photo to the demo classifier (real EfficientNet-Lite0, int8) over
  MQTT request/response and over HTTP (raw body, keep-alive), interleaved (target MQTT p50 <= 1.1x
  HTTP p50);
- events: camera events offered at rising rates to an event mapping; the highest rate answered
  completely with nothing shed is the sustained rate.

Floors: the same requests to a bare peer (`bench.bare_peer`, its own process: the agent's MQTT
receiving client and a bare uvicorn app, answering without any work), interleaved with the cases
above, and the outbox commit of one reply alone (`Outbox.put_many` of a reply as the agent
sends it, with its dedupe identity, on the same disk). The echo crosses the broker twice, a
request and its reply four times, so:
- small round trip floor = bare request/reply + the agent's pipeline (its inference, from the
  replies) + the reply's commit, over the broker echo: what any responder doing that inference
  pays when no answer may be lost (also reported without the commit);
- the same with the agent's own work: bare request/reply + the agent's work on the request in
  process (`bench.mqtt_in_process`: the service, handlers and device on the real runtime and
  outbox, from the hand-over of the message to the link's wake with the reply stored; no broker,
  socket or link), over the broker echo; the agent's round trip over it is what the link's
  socket work and its turns of the event loop add;
- photo floor = (HTTP to the agent - HTTP to the bare peer + MQTT to the bare peer) / HTTP to the
  agent: the agent's HTTP answer with only the transport changed to MQTT (the broker takes the
  whole 3.8 MB before it forwards a byte; HTTP reads it while it is sent).
Writes bench/results/mqtt.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.common import (
    Timed,
    flatten,
    format_table,
    interleaved,
    library_versions,
    percentile,
    round_ratios,
    summarize_ms,
    write_json,
)
from bench.mqtt_in_process import InProcessAgent
from edge_agent.mqtt.outbox import Answered, Draft, Outbox
from tests.agent_support import build_bundle, free_port, make_keys, run_agent
from tests.mqtt_support import Broker

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "demo" / "bundle" / "defects-1.bundle"
DEMO_KEY = ROOT / "demo" / "keys" / "demo.pub"
SITE, DEVICE = "bench", "box"
BASE = f"lineside/v1/{SITE}/{DEVICE}"


class Requester:
    """A paho MQTT 5 client that sends requests and waits for their correlated replies."""

    def __init__(self, port: int, reply_topic: str) -> None:
        self.reply_topic = reply_topic
        self._waiting: dict[bytes, threading.Event] = {}
        self._replies: dict[bytes, bytes] = {}
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"bench-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(6, 1, 1)  # TCP_NODELAY
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(reply_topic, 1)
        assert subscribed.wait(10)
        self._counter = 0

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        key = getattr(message.properties, "CorrelationData", None) or message.topic.encode()
        self._replies[key] = message.payload
        event = self._waiting.pop(key, None)
        if event is not None:
            event.set()

    def request(self, topic: str, payload: bytes, timeout: float = 30) -> bytes:
        self._counter += 1
        key = str(self._counter).encode()
        event = threading.Event()
        self._waiting[key] = event
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = self.reply_topic
        properties.CorrelationData = key
        self.client.publish(topic, payload, qos=1, properties=properties)
        if not event.wait(timeout):
            raise TimeoutError(f"no reply on {self.reply_topic} within {timeout}s")
        return self._replies.pop(key)

    def echo(self, payload: bytes) -> None:
        """Publish to the reply topic itself and wait for it to come back (the broker's cost)."""
        self.request(self.reply_topic, payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def phone_photo() -> bytes:
    """A 12-megapixel JPEG that compresses like a phone photo (texture + sensor noise)."""
    rng = np.random.default_rng(12)
    base = cv2.resize(
        rng.integers(60, 200, (300, 400, 3), dtype=np.uint8),
        (4000, 3000),
        interpolation=cv2.INTER_CUBIC,
    )
    noise = rng.normal(0, 6, base.shape)
    image = np.clip(base + noise, 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def small_jpeg() -> bytes:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 60])
    assert ok and len(data) <= 1024, len(data)
    return data.tobytes()


@contextlib.contextmanager
def bare_peer(broker_port: int) -> Iterator[str]:
    """`bench.bare_peer` in its own process; yields its HTTP URL once it answers."""
    http_port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_peer", str(broker_port), str(http_port)],
        stdout=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
        yield f"http://127.0.0.1:{http_port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def install(state: Path, bundle: Path, key: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "edge_agent.app.cli", "install", str(bundle), "--state-dir", str(state),
         "--trusted-key", str(key)],
        check=True, capture_output=True,
    )  # fmt: skip


def event_rates(
    port: int, rates: Sequence[int], seconds: float, image: bytes, agent_url: str
) -> list[dict[str, Any]]:
    """Offer events at each rate; count results, shed replies and the time to the last result."""
    results: list[dict[str, Any]] = []
    consumer = Requester(port, "bench/verdicts/#")
    publisher = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5
    )
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    payload = json.dumps({"frame": base64.b64encode(image).decode()}).encode()
    for rate in rates:
        received: list[float] = []
        consumer.client.on_message = lambda _c, _u, m, sink=received: sink.append(
            time.perf_counter()
        )
        shed_before = _shed(agent_url)
        count = int(rate * seconds)
        start = time.perf_counter()
        for number in range(count):
            target = start + number / rate
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            publisher.publish("bench/camera/1", payload, qos=1)
        offered_s = time.perf_counter() - start
        deadline = time.perf_counter() + 30
        while (
            len(received) < count - (_shed(agent_url) - shed_before)
            and time.perf_counter() < deadline
        ):
            time.sleep(0.05)
        shed = _shed(agent_url) - shed_before
        answered = len(received)
        span = (received[-1] - start) if received else float("nan")
        results.append(
            {
                "offered_per_s": rate,
                "offered_actual_per_s": round(count / offered_s, 1),
                "events": count,
                "results": answered,
                "shed": int(shed),
                "throughput_per_s": round(answered / span, 1) if received else 0.0,
                "drain_s_after_last_event": round(span - offered_s, 3) if received else None,
            }
        )
        print(f"  events at {rate}/s: {answered}/{count} answered, {int(shed)} shed")
        time.sleep(1.0)
    publisher.disconnect()
    publisher.loop_stop()
    consumer.close()
    return results


def _shed(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("lineside_mqtt_shed_total "):
            return float(line.split()[1])
    return 0.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.per_round = 2, 10
    if not DEMO_BUNDLE.is_file():
        print(f"{DEMO_BUNDLE} is missing; run demo/rebuild-bundle first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker").start()
        keys = make_keys(work / "keys")
        tiny = build_bundle(work / "tiny", keys, name="tiny")
        state = work / "state"
        install(state, tiny.path, keys.public)
        install(state, DEMO_BUNDLE, DEMO_KEY)
        env = {
            "EDGE_AGENT_MQTT_ENABLED": "true",
            "EDGE_AGENT_MQTT_PORT": str(broker.port),
            "EDGE_AGENT_SITE": SITE,
            "EDGE_AGENT_DEVICE": DEVICE,
            "EDGE_AGENT_MQTT_RESPONSE_TOPICS": json.dumps(["bench/#"]),
            "EDGE_AGENT_TELEMETRY_INTERVAL_S": "0",
            "EDGE_AGENT_KEEP_REQUESTS_COUNT": "0",
            "EDGE_AGENT_MQTT_EVENTS": json.dumps(
                [
                    {
                        "topic": "bench/camera/+",
                        "model": "defects",
                        "image": "frame",
                        "result_topic": "bench/verdicts/{model}",
                    }
                ]
            ),
        }
        try:
            with run_agent(
                state, "--trusted-key", str(keys.public), "--trusted-key", str(DEMO_KEY), env=env
            ) as agent:
                agent.wait_ready(120)
                inproc = InProcessAgent(work / "inproc", tiny.path, keys, SITE, DEVICE)
                try:
                    with bare_peer(broker.port) as bare_url:
                        time.sleep(1.0)
                        result = measure(
                            agent.url, bare_url, work / "bench-outbox.db", broker.port, inproc, args
                        )
                finally:
                    inproc.close()
        finally:
            broker.stop()
    path = write_json("mqtt", result)
    print(f"wrote {path}")
    return 0


def measure(
    url: str,
    bare_url: str,
    outbox_path: Path,
    port: int,
    inproc: InProcessAgent,
    args: argparse.Namespace,
) -> dict[str, Any]:
    requester = Requester(port, "bench/replies/1")
    small, photo = small_jpeg(), phone_photo()
    http = httpx.Client(base_url=url, timeout=60)
    bare_http = httpx.Client(base_url=bare_url, timeout=60)
    pipelines: list[float] = []

    def over_http() -> None:
        response = http.post(
            "/v1/models/defects/predict", content=photo, headers={"Content-Type": "image/jpeg"}
        )
        assert response.status_code == 200, response.text

    def over_mqtt() -> None:
        assert b'"label"' in requester.request(f"{BASE}/infer/defects", photo)

    def bare_over_http() -> None:
        response = bare_http.post("/", content=photo, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text

    reply = requester.request(f"{BASE}/infer/tiny", small)
    outbox = Outbox(outbox_path, max_bytes=1 << 30, max_messages=1_000_000)

    def commit_reply() -> None:
        key = uuid.uuid4().hex
        draft = Draft("bench/replies/1", reply, "reply", key, {"CorrelationData": key})
        outbox.put_many([draft], answered=Answered(key, key))

    cases = {
        "broker_echo": lambda: requester.echo(small),
        "small_round_trip": lambda: pipelines.append(
            pipeline_ms(requester.request(f"{BASE}/infer/tiny", small))
        ),
        "bare_round_trip": lambda: requester.request("bench/bare/small", small),
        "outbox_commit": commit_reply,
        "agent_in_process": lambda: Timed(
            inproc.request(f"{BASE}/infer/tiny", small, "bench/replies/1")
        ),
    }
    small_samples = interleaved(cases, rounds=args.rounds, per_round=args.per_round * 5, warmup=20)
    photo_samples = interleaved(
        {
            "photo_http": over_http,
            "photo_mqtt": over_mqtt,
            "bare_photo_http": bare_over_http,
            "bare_photo_mqtt": lambda: requester.request("bench/bare/photo", photo),
        },
        rounds=args.rounds,
        per_round=max(5, args.per_round // 2),
        warmup=3,
    )
    rates = (10, 20, 40, 80) if args.quick else (10, 20, 30, 40, 60, 80, 120)
    events = event_rates(port, rates, 2.0 if args.quick else 4.0, photo_for_events(), url)
    requester.close()
    http.close()
    bare_http.close()
    outbox.close()
    summary = {
        name: summarize_ms(flatten(rounds))
        for name, rounds in {**small_samples, **photo_samples}.items()
    }
    ratio = round_ratios(
        photo_samples["photo_mqtt"], photo_samples["photo_http"]
    )  # >1: HTTP faster
    sustained = max(
        (r["offered_per_s"] for r in events if r["shed"] == 0 and r["results"] == r["events"]),
        default=0,
    )
    small_ratio = round_ratios(small_samples["small_round_trip"], small_samples["broker_echo"])
    pipeline_p50 = percentile(pipelines, 50)
    floors = transport_floors(small_samples, photo_samples, pipeline_p50 / 1000)
    checks = {
        "small_round_trip_over_broker_echo_p50<=3": {
            "value": small_ratio["median_of_rounds"],
            "met": small_ratio["median_of_rounds"] <= 3.0,
            "rounds": [small_ratio["min_round"], small_ratio["max_round"]],
            "agent_pipeline_p50_ms": round(pipeline_p50, 3),
            "floor": floors["small_round_trip_floor_over_broker_echo"]["median_of_rounds"],
            "floor_with_agent_work": floors[
                "small_round_trip_floor_with_agent_work_over_broker_echo"
            ]["median_of_rounds"],
        },
        "photo_mqtt_over_http_p50<=1.1": {
            "value": ratio["median_of_rounds"],
            "met": ratio["median_of_rounds"] <= 1.1,
            "floor": floors["photo_mqtt_floor_over_http"]["median_of_rounds"],
        },
        "sustained_events_per_s": {"value": sustained},
    }
    rows = [[name, s["n"], s["p50_ms"], s["p95_ms"]] for name, s in summary.items()]
    print(format_table(["case", "n", "p50 ms", "p95 ms"], rows))
    print(
        f"small round trip / broker echo, p50: {small_ratio['median_of_rounds']}x (rounds "
        f"{small_ratio['min_round']}-{small_ratio['max_round']}); the agent's pipeline p50 "
        f"{pipeline_p50:.3f} ms of it"
    )
    print(
        f"photo over MQTT / over HTTP, p50: {ratio['median_of_rounds']}x (rounds {ratio['min_round']}-{ratio['max_round']})"
    )
    for name, floor in floors.items():
        print(
            f"{name}: {floor['median_of_rounds']}x (rounds {floor['min_round']}-"
            f"{floor['max_round']})"
        )
    print(f"sustained events/s with nothing shed: {sustained}")
    for name, check in checks.items():
        print(f"  {name}: {check}")
    return {
        "summary": summary,
        "small_round_trip_over_broker_echo": small_ratio,
        "photo_mqtt_over_http": ratio,
        "floors": floors,
        "events": events,
        "checks": checks,
        "photo_bytes": len(photo),
        "small_bytes": len(small),
        "pinned": {
            "profile": "generic-x86-64-avx2",
            "qos": 1,
            "mqtt": "5",
            "broker": "mosquitto, set_tcp_nodelay",
        },
        "libraries": library_versions(["paho-mqtt", "onnxruntime", "fastapi", "uvicorn", "httpx"]),
    }


def transport_floors(
    small: dict[str, list[list[float]]], photo: dict[str, list[list[float]]], pipeline_s: float
) -> dict[str, dict[str, float]]:
    """Per round: the small round trip's floor (bare request/reply + the agent's pipeline + the
    reply's commit; and without the commit) over the broker echo, the agent's small round trip over that floor, and the photo's floor
    (the agent over HTTP with the transport changed to MQTT, as the bare peer measures it) over
    the agent over HTTP."""

    def per_round(value: Any, rounds: int) -> dict[str, float]:
        values = sorted(value(number) for number in range(rounds))
        return {
            "median_of_rounds": round(statistics.median(values), 3),
            "min_round": round(values[0], 3),
            "max_round": round(values[-1], 3),
        }

    def p50(samples: dict[str, list[list[float]]], case: str, number: int) -> float:
        return percentile(samples[case][number], 50)

    def floor(number: int) -> float:
        return (
            p50(small, "bare_round_trip", number) + pipeline_s + p50(small, "outbox_commit", number)
        )

    rounds = len(small["broker_echo"])
    return {
        "bare_round_trip_over_broker_echo": per_round(
            lambda n: p50(small, "bare_round_trip", n) / p50(small, "broker_echo", n), rounds
        ),
        "small_round_trip_floor_without_commit_over_broker_echo": per_round(
            lambda n: (
                (p50(small, "bare_round_trip", n) + pipeline_s) / p50(small, "broker_echo", n)
            ),
            rounds,
        ),
        "small_round_trip_floor_over_broker_echo": per_round(
            lambda n: floor(n) / p50(small, "broker_echo", n), rounds
        ),
        "small_round_trip_over_floor": per_round(
            lambda n: p50(small, "small_round_trip", n) / floor(n), rounds
        ),
        "small_round_trip_floor_with_agent_work_over_broker_echo": per_round(
            lambda n: (
                (p50(small, "bare_round_trip", n) + p50(small, "agent_in_process", n))
                / p50(small, "broker_echo", n)
            ),
            rounds,
        ),
        "small_round_trip_over_floor_with_agent_work": per_round(
            lambda n: (
                p50(small, "small_round_trip", n)
                / (p50(small, "bare_round_trip", n) + p50(small, "agent_in_process", n))
            ),
            rounds,
        ),
        "bare_photo_mqtt_over_http": per_round(
            lambda n: p50(photo, "bare_photo_mqtt", n) / p50(photo, "bare_photo_http", n),
            len(photo["photo_http"]),
        ),
        "photo_mqtt_floor_over_http": per_round(
            lambda n: (
                (
                    p50(photo, "photo_http", n)
                    - p50(photo, "bare_photo_http", n)
                    + p50(photo, "bare_photo_mqtt", n)
                )
                / p50(photo, "photo_http", n)
            ),
            len(photo["photo_http"]),
        ),
    }


def pipeline_ms(reply: bytes) -> float:
    """The agent's own work in a reply: decode, preprocess, infer and postprocess, in ms."""
    timings = json.loads(reply)["timings_ms"]
    return float(sum(v for stage, v in timings.items() if stage != "receive"))


def photo_for_events() -> bytes:
    """Events carry a line camera frame (1280x960), not a 12-megapixel phone photo."""
    rng = np.random.default_rng(5)
    base = cv2.resize(
        rng.integers(60, 200, (120, 160, 3), dtype=np.uint8),
        (1280, 960),
        interpolation=cv2.INTER_CUBIC,
    )
    image = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


if __name__ == "__main__":
    sys.exit(main())
