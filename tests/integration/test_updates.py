"""Updates end to end: a real Mosquitto, a local HTTP file server, and a real agent process.

Happy path, every refusal, a resumed download, bad bundles refused at staging, bad versions
rolled back in probation, key rotation and revocation by signed trust notices.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_bundle.release import Rollout
from tests.agent_support import AgentProcess, Keys, build_bundle, jpeg, make_keys, run_agent
from tests.mqtt_support import Broker, TestClient, body, running_broker
from tests.unit.agent_fixtures import with_references
from tests.update_support import (
    always_nan_bytes,
    file_server,
    nan_when_bright,
    release_key,
    signed_notice,
    slow_model,
)

SITE, DEVICE = "plant", "box1"
BASE = f"lineside/v1/{SITE}/{DEVICE}"
RELEASE_TOPIC = f"{BASE}/release"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, str, Any]]:
    directory = tmp_path / "files"
    directory.mkdir()
    with file_server(directory) as (url, log):
        yield directory, url, log


@pytest.fixture
def state(tmp_path: Path, keys: Keys) -> Path:
    bundle = build_bundle(tmp_path / "v1", keys)
    state = tmp_path / "state"
    result = subprocess.run(
        [".venv/bin/edge-agent", "install", str(bundle.path), "--state-dir", str(state),
         "--trusted-key", str(keys.public)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return state


def update_env(broker: Broker, release_pub: Path, **extra: str) -> dict[str, str]:
    env = {
        "EDGE_AGENT_MQTT_ENABLED": "true",
        "EDGE_AGENT_MQTT_PORT": str(broker.port),
        "EDGE_AGENT_SITE": SITE,
        "EDGE_AGENT_DEVICE": DEVICE,
        "EDGE_AGENT_TELEMETRY_INTERVAL_S": "0",
        "EDGE_AGENT_MQTT_RECONNECT_MIN_S": "0.1",
        "EDGE_AGENT_MQTT_RECONNECT_MAX_S": "1",
        "EDGE_AGENT_RELEASE_KEYS": json.dumps([str(release_pub)]),
        "EDGE_AGENT_PROBATION_S": "2",
        "EDGE_AGENT_PROBATION_SELFTEST_S": "0.5",
    }
    env.update(extra)
    return env


class Watcher:
    """Collects the agent's update reports."""

    def __init__(self, port: int) -> None:
        self.client = TestClient(port, f"ops-{time.monotonic_ns()}")
        self.client.subscribe(f"{BASE}/update")

    def reports(self) -> list[dict[str, Any]]:
        return [body(m) for m in self.client.messages if m.topic.endswith("/update")]

    def wait(
        self, outcome: str, *, sequence: int | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for report in self.reports():
                if report["outcome"] == outcome and (
                    sequence is None or report["sequence"] == sequence
                ):
                    return report
            time.sleep(0.05)
        raise AssertionError(f"no {outcome!r} report for sequence {sequence}: {self.reports()}")

    def close(self) -> None:
        self.client.close()


def publish(broker: Broker, notice: bytes, topic: str = RELEASE_TOPIC) -> None:
    client = TestClient(broker.port, f"central-{time.monotonic_ns()}")
    client.publish(topic, notice, retain=True)
    client.close()


def predict(agent: AgentProcess, image: bytes | None = None) -> httpx.Response:
    return httpx.post(
        f"{agent.url}/v1/models/defects/predict",
        content=image or jpeg(1),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )


def test_happy_path(tmp_path: Path, state: Path, keys: Keys, broker: Broker, files: Any) -> None:
    directory, url, log = files
    signing, public = release_key(tmp_path / "release")
    v2 = with_references(
        build_bundle(tmp_path / "v2", keys, version=2, seed=9), tmp_path / "defects-2.bundle"
    )
    (directory / "defects-2.bundle").write_bytes(v2.read_bytes())
    env = update_env(broker, public)
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        before = httpx.get(f"{agent.url}/v1/models/defects").json()["reference_check"]
        assert before["status"] == "not-carried"
        watcher = Watcher(broker.port)
        publish(broker, signed_notice(signing, v2, f"{url}/defects-2.bundle", sequence=100))
        committed = watcher.wait("committed", sequence=100)
        phases = [r["phase"] for r in watcher.reports() if r["sequence"] == 100]
        watcher.close()
        assert committed["version"] == 2
        assert phases[:5] == ["downloading", "verifying", "staging", "activating", "probation"]
        assert predict(agent).json()["model"]["version"] == 2
        updates = httpx.get(f"{agent.url}/v1/updates").json()
        assert updates["state"]["phase"] == "committed"
        checked = httpx.get(f"{agent.url}/v1/models/defects").json()["reference_check"]
        assert checked["status"] == "passed"  # checked at staging
        assert checked["figures"]["top1_agreement"]["value"] == 1.0
    assert log.ranges == [None]  # one plain download


def test_a_rollout_is_echoed_and_telemetry_follows_the_outcome(
    tmp_path: Path, state: Path, keys: Keys, broker: Broker, files: Any
) -> None:
    """A schema version 2 notice's rollout comes back in the reports, and a telemetry snapshot
    with the new version follows the commit at once (the period here is an hour)."""
    directory, url, _ = files
    signing, public = release_key(tmp_path / "release")
    v2 = build_bundle(tmp_path / "v2", keys, version=2, seed=9)
    (directory / "defects-2.bundle").write_bytes(v2.path.read_bytes())
    env = update_env(
        broker,
        public,
        EDGE_AGENT_PROBATION_S="1",
        EDGE_AGENT_TELEMETRY_INTERVAL_S="3600",
        EDGE_AGENT_LINE="line3",
        EDGE_AGENT_LABELS=json.dumps({"camera": "v2"}),
    )
    rollout = Rollout(id="defects-2", wave=1)
    notice = signed_notice(
        signing, v2.path, f"{url}/defects-2.bundle", sequence=200, rollout=rollout
    )
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        watcher = Watcher(broker.port)
        watcher.client.subscribe(f"{BASE}/telemetry")
        publish(broker, notice)
        committed = watcher.wait("committed", sequence=200)
        versions = _telemetry_versions(watcher, timeout=60)
        watcher.close()
    assert committed["rollout"] == {"id": "defects-2", "wave": 1}
    assert all(r["rollout"] == committed["rollout"] for r in watcher.reports())
    assert versions == [2]


def _telemetry_versions(watcher: Watcher, *, timeout: float) -> list[int | None]:
    """The model versions in the first telemetry snapshot that shows version 2 (else the last)."""
    deadline = time.monotonic() + timeout
    snapshots: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        messages = watcher.client.messages
        snapshots = [body(m) for m in messages if m.topic.endswith("/telemetry")]
        for snapshot in snapshots:
            assert (snapshot["line"], snapshot["labels"]) == ("line3", {"camera": "v2"})
            versions = [m["version"] for m in snapshot["models"]]
            if versions == [2]:
                return versions
        time.sleep(0.05)
    return [m["version"] for m in snapshots[-1]["models"]] if snapshots else []


def test_refusals(tmp_path: Path, state: Path, keys: Keys, broker: Broker, files: Any) -> None:
    directory, url, _ = files
    signing, public = release_key(tmp_path / "release")
    stranger, _ = release_key(tmp_path / "stranger", "stranger")
    good = build_bundle(tmp_path / "v2", keys, version=2, seed=9)
    (directory / "good.bundle").write_bytes(good.path.read_bytes())
    tampered = bytearray(good.path.read_bytes())
    tampered[len(tampered) // 3] ^= 0x01
    (directory / "tampered.bundle").write_bytes(bytes(tampered))
    other_profile = build_bundle(tmp_path / "rpi", keys, version=3, profiles=("rpi5-arm64",))
    (directory / "rpi.bundle").write_bytes(other_profile.path.read_bytes())
    traversal = _traversal_bundle(tmp_path, good.path)
    (directory / "traversal.bundle").write_bytes(traversal.read_bytes())
    env = update_env(broker, public)
    cases: list[tuple[str, bytes, str]] = [
        ("untrusted key", signed_notice(stranger, good.path, f"{url}/good.bundle", sequence=10), "not trusted"),
        ("older version", signed_notice(signing, good.path, f"{url}/good.bundle", sequence=11, version=1), "already active"),
        ("expired", signed_notice(signing, good.path, f"{url}/good.bundle", sequence=12,
                                  issued_at=datetime.now(UTC) - timedelta(days=3), expires_in=timedelta(days=1)), "expired"),
        ("wrong hash", signed_notice(signing, good.path, f"{url}/good.bundle", sequence=13, sha256="0" * 64), "sha256"),
        ("more bytes than declared", signed_notice(signing, good.path, f"{url}/good.bundle", sequence=14,
                                                   size=good.path.stat().st_size // 2), "more than"),
        ("tampered file", signed_notice(signing, tampered_path := directory / "tampered.bundle",
                                        f"{url}/tampered.bundle", sequence=15), "refused"),
        ("path traversal", signed_notice(signing, traversal, f"{url}/traversal.bundle", sequence=16), "refused"),
        ("incompatible profile", signed_notice(signing, other_profile.path, f"{url}/rpi.bundle", sequence=17,
                                               version=3), "rpi5-arm64"),
        ("replayed sequence", signed_notice(signing, good.path, f"{url}/good.bundle", sequence=12), "not newer"),
    ]  # fmt: skip
    del tampered_path
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        watcher = Watcher(broker.port)
        for name, notice, words in cases:
            publish(broker, notice)
            deadline = time.monotonic() + 60
            found = None
            while found is None and time.monotonic() < deadline:
                for report in watcher.reports():
                    if report["outcome"] in ("refused", "ignored") and words in (
                        report.get("reason") or ""
                    ):
                        found = report
                time.sleep(0.05)
            assert found is not None, (name, watcher.reports()[-3:])
            watcher.client.messages.clear()
            assert predict(agent).json()["model"]["version"] == 1, name
        # Another device's notice is ignored, not acted on.
        publish(
            broker,
            signed_notice(
                signing, good.path, f"{url}/good.bundle", sequence=50, device="plant/box9"
            ),
        )
        watcher.wait("ignored", sequence=50)
        watcher.close()
        assert predict(agent).json()["model"]["version"] == 1
        assert not list((state / "store" / "staging").iterdir())
        assert (state / "store" / "bundles" / "defects").exists()
        assert sorted(
            p.name for p in (state / "store" / "bundles" / "defects").iterdir() if p.is_dir()
        ) == ["1"]


def _traversal_bundle(tmp_path: Path, good: Path) -> Path:
    """A tar with a member that climbs out of the staging directory."""
    import io
    import tarfile

    out = tmp_path / "traversal.bundle"
    with tarfile.open(good) as source, tarfile.open(out, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member)
            target.addfile(member, data)
        evil = tarfile.TarInfo("../../escape.txt")
        payload = b"gotcha"
        evil.size = len(payload)
        target.addfile(evil, io.BytesIO(payload))
    return out


def test_no_disk_space_is_refused(
    tmp_path: Path, state: Path, keys: Keys, broker: Broker, files: Any
) -> None:
    directory, url, _ = files
    signing, public = release_key(tmp_path / "release")
    v2 = build_bundle(tmp_path / "v2", keys, version=2, seed=9)
    (directory / "v2.bundle").write_bytes(v2.path.read_bytes())
    env = update_env(broker, public, EDGE_AGENT_UPDATE_MIN_FREE_MB=str(10**9))
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        watcher = Watcher(broker.port)
        publish(broker, signed_notice(signing, v2.path, f"{url}/v2.bundle", sequence=5))
        report = watcher.wait("refused", sequence=5)
        watcher.close()
        assert "disk space" in report["reason"]
        assert predict(agent).json()["model"]["version"] == 1


def test_interrupted_download_resumes(
    tmp_path: Path, state: Path, keys: Keys, broker: Broker, files: Any
) -> None:
    directory, url, log = files
    signing, public = release_key(tmp_path / "release")
    v2 = build_bundle(tmp_path / "v2", keys, version=2, seed=9)
    (directory / "v2.bundle").write_bytes(v2.path.read_bytes())
    log.cut_after = v2.path.stat().st_size // 2
    with run_agent(
        state, "--trusted-key", str(keys.public), env=update_env(broker, public)
    ) as agent:
        agent.wait_ready()
        watcher = Watcher(broker.port)
        publish(broker, signed_notice(signing, v2.path, f"{url}/v2.bundle", sequence=7))
        watcher.wait("committed", sequence=7)
        watcher.close()
    assert log.ranges[0] is None and log.ranges[1] == f"bytes={v2.path.stat().st_size // 2}-"


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("fails to load", "cannot be loaded"),
        ("outputs NaN", "non-finite"),
        ("fails golden", "golden self-test"),
        ("disagrees with its references", "disagrees with its fp32 reference outputs"),
    ],
)
def test_bad_bundles_are_refused_at_staging(
    tmp_path: Path, state: Path, keys: Keys, broker: Broker, files: Any, kind: str, words: str
) -> None:
    directory, url, _ = files
    signing, public = release_key(tmp_path / "release")
    options: dict[str, Any] = {
        "fails to load": {"model_bytes": b"this is not an onnx model"},
        "outputs NaN": {"model_bytes": always_nan_bytes()},
        "fails golden": {"golden_offset": 0.05},
        "disagrees with its references": {},
    }[kind]
    built = build_bundle(tmp_path / "bad", keys, version=2, **options)
    bad = built.path
    if kind == "disagrees with its references":
        bad = with_references(built, tmp_path / "permuted.bundle", outputs=_rotated)
    (directory / "bad.bundle").write_bytes(bad.read_bytes())
    with run_agent(
        state, "--trusted-key", str(keys.public), env=update_env(broker, public)
    ) as agent:
        agent.wait_ready()
        watcher = Watcher(broker.port)
        publish(broker, signed_notice(signing, bad, f"{url}/bad.bundle", sequence=3))
        report = watcher.wait("refused", sequence=3)
        watcher.close()
        assert report["phase"] == "staging", report
        assert words in report["reason"], report
        assert predict(agent).json()["model"]["version"] == 1
    assert not (state / "store" / "bundles" / "defects" / "2").exists()


def _rotated(probabilities: Any) -> Any:
    """Reference outputs whose every top-1 names another class than the model's."""
    import numpy as np

    return np.roll(probabilities, 1, axis=1)


def traffic(agent: AgentProcess, stop: threading.Event, results: list[int], image: bytes) -> None:
    with httpx.Client(base_url=agent.url, timeout=30) as client:
        while not stop.is_set():
            response = client.post(
                "/v1/models/defects/predict", content=image, headers={"Content-Type": "image/jpeg"}
            )
            results.append(
                response.json().get("model", {}).get("version", 0)
                if response.status_code == 200
                else -response.status_code
            )


@pytest.mark.parametrize("kind", ["nan outside golden", "3x latency"])
def test_probation_rolls_back(
    tmp_path: Path, state: Path, keys: Keys, broker: Broker, files: Any, kind: str
) -> None:
    directory, url, _ = files
    signing, public = release_key(tmp_path / "release")
    builder = nan_when_bright if kind == "nan outside golden" else slow_model
    bad = build_bundle(tmp_path / "bad", keys, version=2, model_builder=builder)
    (directory / "bad.bundle").write_bytes(bad.path.read_bytes())
    white = _white_jpeg()
    env = update_env(
        broker, public, EDGE_AGENT_PROBATION_S="6", EDGE_AGENT_PROBATION_MIN_SAMPLES="10"
    )
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        stop, results = threading.Event(), []
        client = threading.Thread(target=traffic, args=(agent, stop, results, white))
        client.start()
        time.sleep(2.0)  # a latency baseline for version 1
        watcher = Watcher(broker.port)
        publish(broker, signed_notice(signing, bad.path, f"{url}/bad.bundle", sequence=4))
        report = watcher.wait("rolled_back", sequence=4, timeout=90)
        time.sleep(0.5)
        stop.set()
        client.join(30)
        watcher.close()
        expected = "inference failures" if kind == "nan outside golden" else "p95 latency"
        assert expected in report["reason"], report
        assert predict(agent, white).json()["model"]["version"] == 1
        updates = httpx.get(f"{agent.url}/v1/updates").json()["state"]
        assert ["defects", 2] in updates["bad_versions"]


def _white_jpeg() -> bytes:
    import cv2
    import numpy as np

    ok, data = cv2.imencode(".jpg", np.full((120, 160, 3), 252, np.uint8))
    assert ok
    return data.tobytes()


def test_release_keys_rotate_and_revoke_by_signed_trust_notices(
    tmp_path: Path, state: Path, keys: Keys, broker: Broker, files: Any
) -> None:
    from edge_bundle.release import TRUST_TOPIC, PublicKeyEntry, TrustNotice, encode_notice
    from edge_bundle.signing import KeyRole, SigningKey, write_key_files

    directory, url, _ = files
    old_key, old_pub = release_key(tmp_path / "old", "old")
    new_key, _ = release_key(tmp_path / "new", "new")
    root = SigningKey.generate(KeyRole.ROOT)
    _, root_pub = write_key_files(root, tmp_path / "root", "root")
    v2 = build_bundle(tmp_path / "v2", keys, version=2, seed=9)
    v3 = build_bundle(tmp_path / "v3", keys, version=3, seed=11)
    (directory / "v2.bundle").write_bytes(v2.path.read_bytes())
    (directory / "v3.bundle").write_bytes(v3.path.read_bytes())
    now = datetime.now(UTC)
    rotation = TrustNotice(
        sequence=1, issued_at=now - timedelta(seconds=5), expires_at=now + timedelta(days=30),
        add=(PublicKeyEntry.of(new_key.public),), revoke=(old_key.key_id,),
    )  # fmt: skip
    env = update_env(broker, old_pub, EDGE_AGENT_ROOT_KEYS=json.dumps([str(root_pub)]))
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        watcher = Watcher(broker.port)
        publish(broker, encode_notice(rotation, root), TRUST_TOPIC)
        deadline = time.monotonic() + 30
        while not any("release keys updated" in (r.get("reason") or "") for r in watcher.reports()):
            assert time.monotonic() < deadline, watcher.reports()
            time.sleep(0.05)
        publish(broker, signed_notice(old_key, v2.path, f"{url}/v2.bundle", sequence=20))
        refused = watcher.wait("refused")
        assert "revoked" in refused["reason"], refused
        publish(broker, signed_notice(new_key, v2.path, f"{url}/v2.bundle", sequence=21))
        watcher.wait("committed", sequence=21)
        watcher.close()
    # The rotation survives a restart: the revoked key stays revoked.
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        watcher = Watcher(broker.port)
        publish(broker, signed_notice(old_key, v3.path, f"{url}/v3.bundle", sequence=30))
        deadline = time.monotonic() + 30
        while not any("revoked" in (r.get("reason") or "") for r in watcher.reports()):
            assert time.monotonic() < deadline, watcher.reports()
            time.sleep(0.05)
        watcher.close()
        assert predict(agent).json()["model"]["version"] == 2
