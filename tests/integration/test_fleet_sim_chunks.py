"""The device simulator fetching bundles in chunks over MQTT, against a real Mosquitto and the
real chunk server (`tests.chunk_support.running_chunk_server`), and spread over processes:

- 20 simulated agent-0.4.0 boxes receive a notice without a URL, fetch the bundle in chunks
  (every chunk checked) and commit; older boxes refuse the notice as real agents do;
- a box told to prefer MQTT fetches over MQTT even when the notice also has a URL;
- 2 processes x 50 boxes come online with telemetry and say offline when stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_bundle.chunks import ChunkedDelivery
from edge_bundle.release import ReleaseNotice, Rollout, Target, encode_notice, release_topic
from edge_bundle.signing import SigningKey, TrustStore
from fleet_controller.simulator import Behaviour, BoxSpec, Simulator, SimulatorThread
from fleet_controller.simulator.fetch import FetchSettings
from tests.chunk_support import ChunkServerHandle, running_chunk_server
from tests.fleet_support import wait_for
from tests.mqtt_support import Broker, TestClient, body, running_broker
from tests.update_support import release_key

FINAL = ("committed", "refused", "rolled_back")
CHUNK = 16 * 1024


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def key(tmp_path: Path) -> tuple[SigningKey, TrustStore]:
    signing, public = release_key(tmp_path / "keys")
    return signing, TrustStore.from_files([public])


@pytest.fixture
def watcher(broker: Broker) -> Iterator[TestClient]:
    client = TestClient(broker.port, "watcher")
    client.subscribe("lineside/v1/+/+/update")
    client.subscribe("lineside/v1/+/+/status")
    yield client
    client.close()


def bundle_file(tmp_path: Path, size: int = 300_000) -> Path:
    path = tmp_path / "defects-2.bundle"
    path.write_bytes(bytes((i * 31 + i // 977) % 256 for i in range(size)))
    return path


def chunked_notice(
    key: SigningKey,
    path: Path,
    delivery: ChunkedDelivery,
    *,
    sequence: int,
    group: str,
    url: str | None = None,
) -> tuple[str, bytes]:
    issued = datetime.now(UTC) - timedelta(seconds=5)
    data = path.read_bytes()
    notice = ReleaseNotice(
        schema_version=2,
        name="defects",
        version=2,
        bundle_sha256=hashlib.sha256(data).hexdigest(),
        bundle_size=len(data),
        url=url,
        target=Target(group=group),
        sequence=sequence,
        issued_at=issued,
        expires_at=issued + timedelta(days=1),
        rollout=Rollout(id="mqtt-1", wave=1),
        extensions=ChunkServerHandle.extension(delivery),
    )
    return release_topic(notice.target), encode_notice(notice, key)


def final_reports(client: TestClient, sequence: int) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for message in list(client.messages):
        if message.topic.endswith("/update"):
            report = body(message)
            if report["sequence"] == sequence and report["outcome"] in FINAL:
                found[report["device"]] = report
    return found


def all_final(client: TestClient, sequence: int, count: int) -> dict[str, dict[str, Any]] | None:
    found = final_reports(client, sequence)
    return found if len(found) == count else None


def box(site: str, device: str, agent: str = "0.4.0", group: str = "line1", **kw: Any) -> BoxSpec:
    behaviour = Behaviour(install_s=0.25, download=True, **kw)
    return BoxSpec(
        site=site, device=device, groups=(group,), agent_version=agent, behaviour=behaviour
    )


def test_twenty_boxes_fetch_over_mqtt_through_the_chunk_server_and_commit(
    broker: Broker, watcher: TestClient, key: tuple[SigningKey, TrustStore], tmp_path: Path
) -> None:
    path = bundle_file(tmp_path)
    boxes = [box(f"plant-{n % 2}", f"box{n:02d}") for n in range(20)]
    boxes += [box("plant-0", "old2", agent="0.2.0"), box("plant-0", "old3", agent="0.3.0")]
    # Four requests in flight per box: 80 at once, beyond the chunk server's Receive Maximum (32),
    # so the broker holds the rest (and Mosquitto may overshoot it) without the server stalling.
    simulator = Simulator(
        "127.0.0.1", broker.port, boxes, key[1], telemetry_interval_s=60, fetch=FetchSettings(4)
    )
    with (
        running_chunk_server(broker.port, tmp_path / "chunks") as chunks,
        SimulatorThread(simulator) as running,
    ):
        delivery = chunks.publish(path, chunk_size=CHUNK)
        assert delivery.chunks == 19
        wait_for(lambda: running.online_count() == 22, 30, "22 boxes online")
        topic, payload = chunked_notice(key[0], path, delivery, sequence=40, group="line1")
        watcher.publish(topic, payload, retain=True)
        done = wait_for(lambda: all_final(watcher, 40, 22), 60, "22 final reports")
        new = {ref: r for ref, r in done.items() if ref.split("/")[1].startswith("box")}
        assert all(r["outcome"] == "committed" for r in new.values()), new
        assert all(r["rollout"] == {"id": "mqtt-1", "wave": 1} for r in new.values())
        old2, old3 = done["plant-0/old2"], done["plant-0/old3"]
        assert old2["outcome"] == "refused" and "url is required" in old2["reason"]
        assert old3["outcome"] == "refused" and "'mqtt_chunks' extension" in old3["reason"]
        stats = running.call(simulator.stats)
        # Every box fetched the one manifest page and all 19 chunks, each checked.
        assert stats["chunks"]["replies"] >= 20 * 20 and stats["chunks"]["refused"] == 0
        assert stats["active"]["defects@2"] == 20
        assert chunks.stats()["chunks"] >= 20 * 19


def test_a_box_preferring_mqtt_fetches_over_mqtt_though_the_notice_has_a_url(
    broker: Broker, watcher: TestClient, key: tuple[SigningKey, TrustStore], tmp_path: Path
) -> None:
    path = bundle_file(tmp_path, 50_000)
    boxes = [
        box("plant", "prefers-mqtt", group="g"),
        box("plant", "prefers-http", group="g", fetch="http"),
    ]
    simulator = Simulator("127.0.0.1", broker.port, boxes, key[1], telemetry_interval_s=60)
    with (
        running_chunk_server(broker.port, tmp_path / "chunks") as chunks,
        SimulatorThread(simulator) as running,
    ):
        delivery = chunks.publish(path, chunk_size=CHUNK)
        wait_for(lambda: running.online_count() == 2, 30, "both boxes online")
        unreachable = "http://127.0.0.1:9/defects-2.bundle"  # nothing listens: HTTP keeps failing
        topic, payload = chunked_notice(
            key[0], path, delivery, sequence=7, group="g", url=unreachable
        )
        watcher.publish(topic, payload, retain=True)
        done = wait_for(
            lambda: final_reports(watcher, 7).get("plant/prefers-mqtt"),
            30,
            "the MQTT box's outcome",
        )
        assert done["outcome"] == "committed"
        http_box = running.box_state("plant/prefers-http")
        assert http_box["phase"] == "downloading" and http_box["active"] == {"defects": 1}


def test_two_processes_of_fifty_boxes_come_online_and_stop_cleanly(
    broker: Broker, watcher: TestClient, tmp_path: Path
) -> None:
    _signing, public = release_key(tmp_path / "keys2")
    config = tmp_path / "sim.toml"
    config.write_text(
        f'release_keys = ["{public}"]\ntelemetry_interval_s = 2\nconnect_per_s = 200\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        '[generate]\ncount = 10\nsite = "mp-{site}"\nsites = 2\ndevice = "box{n:03d}"\n'
        'agent_version = "0.4.0"\n'
    )
    stats = tmp_path / "stats"
    command = [
        sys.executable, "-m", "fleet_controller.simulator", "--config", str(config),
        "--boxes", "100", "--processes", "2", "--stats", str(stats / "sim.json"),
    ]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True)
    try:

        def last_status() -> dict[str, str]:
            found: dict[str, str] = {}
            for message in list(watcher.messages):
                if message.topic.endswith("/status"):
                    found[message.topic] = body(message)["status"]
            return found

        wait_for(
            lambda: list(last_status().values()).count("online") == 100, 60, "100 boxes online"
        )

        def figures() -> list[dict[str, Any]]:
            files = sorted(stats.glob("sim-*.json"))
            return [json.loads(f.read_text()) for f in files]

        wait_for(
            lambda: len(found := figures()) == 2 and all(f["online"] == 50 for f in found),
            30,
            "two processes of 50 boxes online in their stats",
        )
        pids = {f["pid"] for f in figures()}
        assert len(pids) == 2 and process.pid not in pids
        assert all(f["fd_limit"] >= 100 for f in figures())
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(30) == 0
        wait_for(
            lambda: list(last_status().values()).count("offline") == 100, 30, "100 boxes offline"
        )
        assert all(f["online"] == 0 and f["sent"] >= 150 for f in figures())
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
