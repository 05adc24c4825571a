"""The device simulator against a real Mosquitto: status with last will, telemetry, signed
notices (v1 and v2), update reports, behaviours (commit, refuse, fail staging / probation,
offline, download), and at most one install per notice."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_bundle.release import ReleaseNotice, Rollout, Target, encode_notice, release_topic
from edge_bundle.signing import SigningKey, TrustStore
from fleet_controller.simulator import Behaviour, BoxSpec, Simulator, SimulatorThread, generate
from tests.fleet_support import wait_for
from tests.mqtt_support import Broker, TestClient, body, running_broker
from tests.update_support import file_server, release_key

SHA = "ab" * 32
FINAL = ("committed", "refused", "rolled_back")
OLD_REFUSAL = "notice schema_version 2 is newer than this code understands (1); upgrade the agent"


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
    client.subscribe("lineside/v1/+/+/telemetry")
    yield client
    client.close()


def notice(
    key: SigningKey,
    *,
    sequence: int,
    device: str | None = None,
    group: str | None = None,
    version: int = 2,
    rollout: str | None = None,
    url: str = "http://files.invalid/defects.bundle",
    sha256: str = SHA,
    size: int = 1000,
) -> tuple[str, bytes]:
    issued = datetime.now(UTC) - timedelta(seconds=5)
    target = Target(group=group) if group else Target(device=device)
    fields: dict[str, Any] = {}
    if rollout is not None:
        fields = {"schema_version": 2, "rollout": Rollout(id=rollout, wave=1)}
    signed = ReleaseNotice(
        name="defects",
        version=version,
        bundle_sha256=sha256,
        bundle_size=size,
        url=url,
        target=target,
        sequence=sequence,
        issued_at=issued,
        expires_at=issued + timedelta(days=1),
        **fields,
    )
    return release_topic(target), encode_notice(signed, key)


def publish(client: TestClient, message: tuple[str, bytes]) -> None:
    client.publish(message[0], message[1], retain=True)


def reports(client: TestClient, ref: str) -> list[dict[str, Any]]:
    topic = f"lineside/v1/{ref}/update"
    return [body(m) for m in list(client.messages) if m.topic == topic]


def final_report(
    client: TestClient, ref: str, sequence: int, timeout: float = 20.0
) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        done = [
            r for r in reports(client, ref) if r["sequence"] == sequence and r["outcome"] in FINAL
        ]
        return done[-1] if done else None

    result: dict[str, Any] = wait_for(found, timeout, f"the final report of {ref} for {sequence}")
    return result


def statuses(client: TestClient, ref: str) -> list[tuple[str, bool]]:
    topic = f"lineside/v1/{ref}/status"
    return [(body(m)["status"], m.retain) for m in list(client.messages) if m.topic == topic]


def retained_status(port: int, ref: str) -> str:
    """What a new subscriber is told about the box: the retained status."""
    client = TestClient(port, f"late-{ref.replace('/', '-')}")
    try:
        client.subscribe(f"lineside/v1/{ref}/status")
        found = client.wait_for(1, timeout=10)
        assert found and found[0].retain, f"no retained status for {ref}"
        status: str = body(found[0])["status"]
        return status
    finally:
        client.close()


def box(ref: str, **behaviour: Any) -> BoxSpec:
    site, device = ref.split("/")
    agent = behaviour.pop("agent_version", "0.2.0")
    return BoxSpec(
        site=site,
        device=device,
        line="line1",
        labels={"camera": "v2"},
        groups=("line1",),
        agent_version=agent,
        models={"defects": 1},
        behaviour=Behaviour(**{"install_s": 0.25, **behaviour}),
    )


def test_two_hundred_boxes_come_online_with_telemetry(
    broker: Broker, watcher: TestClient, key: tuple[SigningKey, TrustStore]
) -> None:
    fleet = generate(
        {
            "count": 200,
            "site": "plant-{site}",
            "sites": 4,
            "groups": ["line1"],
            "line": "l1",
            "old_agents": 0.1,
            "fractions": {"commit": 0.9, "fail_probation": 0.1},
        }
    )
    started = time.monotonic()
    simulator = Simulator("127.0.0.1", broker.port, fleet, key[1], telemetry_interval_s=1.0)
    with SimulatorThread(simulator) as running:

        def seen(kind: str) -> set[str]:
            return {m.topic for m in list(watcher.messages) if m.topic.endswith(kind)}

        wait_for(lambda: len(seen("/status")) == 200, 60, "200 online statuses")
        wait_for(lambda: len(seen("/telemetry")) == 200, 60, "telemetry from 200 boxes")
        elapsed = time.monotonic() - started
        print(f"200 boxes online with telemetry in {elapsed:.2f} s")
        assert running.online_count() == 200
        assert retained_status(broker.port, "plant-3/box-0199") == "online"
        newest = {body(m)["device"]: body(m) for m in watcher.messages if "telemetry" in m.topic}
        new = newest["box-0001"]
        assert (new["agent_version"], new["line"], new["groups"]) == ("0.2.0", "l1", ["line1"])
        model = new["models"][0]
        assert (model["name"], model["version"]) == ("defects", 1)
        assert set(model["latency_ms"]) == {"p50", "p95", "samples"}
        assert set(model["outcomes"]) == {"ok", "error"}
        old = [t for t in newest.values() if t["agent_version"] == "0.1.0"]
        assert len(old) == 20
        assert all("line" not in t and "latency_ms" not in t["models"][0] for t in old)


def test_v2_notice_commits_with_its_rollout_and_old_agents_refuse_it(
    broker: Broker, watcher: TestClient, key: tuple[SigningKey, TrustStore]
) -> None:
    boxes = [box("plant/new1"), box("plant/old1", agent_version="0.1.0")]
    simulator = Simulator("127.0.0.1", broker.port, boxes, key[1], telemetry_interval_s=60)
    with SimulatorThread(simulator) as running:
        wait_for(lambda: running.online_count() == 2, 20, "both boxes online")
        publish(watcher, notice(key[0], sequence=10, device="plant/new1", rollout="r1"))
        done = final_report(watcher, "plant/new1", 10)
        assert done["outcome"] == "committed" and done["rollout"] == {"id": "r1", "wave": 1}
        phases = [r["phase"] for r in reports(watcher, "plant/new1")]
        assert phases == [
            "downloading",
            "verifying",
            "staging",
            "activating",
            "probation",
            "committed",
        ]
        assert all(r["rollout"] == {"id": "r1", "wave": 1} for r in reports(watcher, "plant/new1"))
        assert running.acted("plant/new1") == [(10, "defects", 2, False)]
        assert running.box_state("plant/new1")["active"] == {"defects": 2}

        def telemetry_on_2() -> bool:
            found = [body(m) for m in watcher.messages if m.topic.endswith("new1/telemetry")]
            return bool(found) and found[-1]["models"][0]["version"] == 2

        wait_for(telemetry_on_2, 20, "telemetry reporting version 2 after the commit")

        publish(watcher, notice(key[0], sequence=20, device="plant/old1", rollout="r1"))
        refused = final_report(watcher, "plant/old1", 20)
        assert refused["outcome"] == "refused" and OLD_REFUSAL in refused["reason"]
        assert refused["verified"] is False and "rollout" not in refused
        assert "rollout" not in refused["claimed"]
        assert running.acted("plant/old1") == []
        publish(watcher, notice(key[0], sequence=21, device="plant/old1"))
        done = final_report(watcher, "plant/old1", 21)
        assert done["outcome"] == "committed" and "rollout" not in done
        assert running.acted("plant/old1") == [(21, "defects", 2, False)]


def test_behaviours_refuse_fail_staging_and_fail_probation(
    broker: Broker, watcher: TestClient, key: tuple[SigningKey, TrustStore]
) -> None:
    boxes = [
        box("plant/refuses", outcome="refuse"),
        box("plant/stages", outcome="fail_staging"),
        box("plant/probation", outcome="fail_probation", p95_factor={2: 3.0}),
        box("plant/fine"),
    ]
    simulator = Simulator("127.0.0.1", broker.port, boxes, key[1], telemetry_interval_s=60)
    with SimulatorThread(simulator) as running:
        wait_for(lambda: running.online_count() == 4, 20, "four boxes online")
        publish(watcher, notice(key[0], sequence=100, group="line1", rollout="r2"))
        refused = final_report(watcher, "plant/refuses", 100)
        assert (refused["phase"], refused["outcome"]) == ("verifying", "refused")
        staged = final_report(watcher, "plant/stages", 100)
        assert (staged["phase"], staged["outcome"]) == ("staging", "refused")
        rolled = final_report(watcher, "plant/probation", 100)
        assert (rolled["phase"], rolled["outcome"]) == ("rolled_back", "rolled_back")
        assert rolled["reason"].startswith("p95 latency 120.0 ms on live traffic is over 2.0x")
        assert rolled["rollout"]["id"] == "r2"
        assert final_report(watcher, "plant/fine", 100)["outcome"] == "committed"
        assert running.box_state("plant/probation")["active"] == {"defects": 1}
        assert running.box_state("plant/refuses")["active"] == {"defects": 1}

        # A version that failed staging or probation is never retried; a refused download is.
        publish(watcher, notice(key[0], sequence=101, group="line1"))
        for ref in ("plant/stages", "plant/probation"):
            again = final_report(watcher, ref, 101)
            assert "already failed on this device" in again["reason"]
        assert final_report(watcher, "plant/refuses", 101)["phase"] == "verifying"
        assert [a[0] for a in running.acted("plant/probation")] == [100]


def test_offline_box_leaves_its_will_and_installs_the_retained_notice_on_return(
    broker: Broker, watcher: TestClient, key: tuple[SigningKey, TrustStore]
) -> None:
    boxes = [box("plant/away"), box("plant/blink", offline=((0.5, 1.5),))]
    simulator = Simulator("127.0.0.1", broker.port, boxes, key[1], telemetry_interval_s=60)
    with SimulatorThread(simulator) as running:
        wait_for(lambda: running.online_count() == 2, 20, "both boxes online")
        running.set_online("plant/away", False)
        wait_for(lambda: ("offline", False) in statuses(watcher, "plant/away"), 20, "the last will")
        assert retained_status(broker.port, "plant/away") == "offline"
        # The box with an offline window went away and came back on its own.
        wait_for(
            lambda: (
                statuses(watcher, "plant/blink")[-3:]
                == [("online", False), ("offline", False), ("online", False)]
            ),
            20,
            "the offline window",
        )

        publish(watcher, notice(key[0], sequence=7, device="plant/away", rollout="r3"))
        time.sleep(0.5)
        assert reports(watcher, "plant/away") == [] and running.acted("plant/away") == []
        running.set_online("plant/away", True)
        assert final_report(watcher, "plant/away", 7)["outcome"] == "committed"
        assert retained_status(broker.port, "plant/away") == "online"


def test_a_notice_sent_again_is_acted_on_once(
    broker: Broker, watcher: TestClient, key: tuple[SigningKey, TrustStore]
) -> None:
    simulator = Simulator(
        "127.0.0.1", broker.port, [box("plant/once")], key[1], telemetry_interval_s=60
    )
    with SimulatorThread(simulator) as running:
        wait_for(lambda: running.online_count() == 1, 20, "the box online")
        message = notice(key[0], sequence=55, device="plant/once", rollout="r4")
        publish(watcher, message)
        assert final_report(watcher, "plant/once", 55)["outcome"] == "committed"
        publish(watcher, message)  # a controller re-sending the stored bytes after a crash
        running.set_online("plant/once", False)  # and a reconnect: the retained copy again
        running.set_online("plant/once", True)

        def ignored() -> list[dict[str, Any]]:
            return [r for r in reports(watcher, "plant/once") if r["outcome"] == "ignored"]

        wait_for(lambda: len(ignored()) >= 2, 20, "two ignored copies")
        assert all("not newer than 55" in r["reason"] for r in ignored())
        assert running.acted("plant/once") == [(55, "defects", 2, False)]


def test_download_checks_size_and_sha256(
    broker: Broker, watcher: TestClient, key: tuple[SigningKey, TrustStore], tmp_path: Path
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    data = b"bundle bytes " * 100
    (files / "defects-2.bundle").write_bytes(data)
    boxes = [box("plant/dl1", download=True), box("plant/dl2", download=True)]
    simulator = Simulator("127.0.0.1", broker.port, boxes, key[1], telemetry_interval_s=60)
    with file_server(files) as (base, log), SimulatorThread(simulator) as running:
        wait_for(lambda: running.online_count() == 2, 20, "both boxes online")
        url = f"{base}/defects-2.bundle"
        good = hashlib.sha256(data).hexdigest()
        publish(
            watcher,
            notice(key[0], sequence=5, device="plant/dl1", url=url, sha256=good, size=len(data)),
        )
        publish(watcher, notice(key[0], sequence=6, device="plant/dl2", url=url, size=len(data)))
        assert final_report(watcher, "plant/dl1", 5)["outcome"] == "committed"
        bad = final_report(watcher, "plant/dl2", 6)
        assert (bad["phase"], bad["outcome"]) == ("downloading", "refused")
        assert "sha256 does not match" in bad["reason"]
        assert len(log.ranges) == 2


def test_a_slow_box_is_superseded_while_downloading_and_queues_during_probation(
    broker: Broker, watcher: TestClient, key: tuple[SigningKey, TrustStore]
) -> None:
    slow = box("plant/slow", install_s=2.5)  # half a second per step
    simulator = Simulator("127.0.0.1", broker.port, [slow], key[1], telemetry_interval_s=60)
    with SimulatorThread(simulator) as running:
        wait_for(lambda: running.online_count() == 1, 20, "the box online")

        def phase_of(sequence: int) -> str | None:
            found = [r for r in reports(watcher, "plant/slow") if r["sequence"] == sequence]
            return found[-1]["phase"] if found else None

        publish(watcher, notice(key[0], sequence=30, device="plant/slow", version=2))
        wait_for(lambda: phase_of(30) == "downloading", 20, "the first install downloading")
        publish(watcher, notice(key[0], sequence=31, device="plant/slow", version=3))
        superseded = final_report(watcher, "plant/slow", 30)
        assert superseded["outcome"] == "refused"
        assert superseded["reason"] == "superseded by sequence 31"
        wait_for(lambda: phase_of(31) == "probation", 20, "the second install in probation")
        publish(watcher, notice(key[0], sequence=32, device="plant/slow", version=4))
        queued = wait_for(lambda: phase_of(32), 20, "the third notice's report")
        assert queued == "probation"
        assert final_report(watcher, "plant/slow", 31)["outcome"] == "committed"
        assert final_report(watcher, "plant/slow", 32, timeout=30)["outcome"] == "committed"
        assert [a[0] for a in running.acted("plant/slow")] == [30, 31, 32]
        assert running.box_state("plant/slow")["active"] == {"defects": 4}


def test_the_command_line_runs_a_generated_fleet_and_says_offline_when_stopped(
    broker: Broker, watcher: TestClient, key: tuple[SigningKey, TrustStore], tmp_path: Path
) -> None:
    config = tmp_path / "sim.toml"
    public = tmp_path / "keys" / "release.pub"
    config.write_text(
        f'release_keys = ["{public}"]\ntelemetry_interval_s = 1\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        '[generate]\ncount = 5\nsite = "cli-{site}"\ndevice = "box{n}"\n'
    )
    command = [sys.executable, "-m", "fleet_controller.simulator", "--config", str(config)]
    process = subprocess.Popen(command)
    try:

        def last(status: str) -> bool:
            refs = [f"cli-0/box{n}" for n in range(5)]
            return all(statuses(watcher, ref)[-1:] == [(status, False)] for ref in refs)

        wait_for(lambda: last("online"), 30, "five online boxes")
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        wait_for(lambda: last("offline"), 20, "five boxes saying offline")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
