"""Crash consistency of updates: the agent is SIGKILLed at every step of an update and at random
points inside steps (50 kills in all), and disk writes and fsyncs fail; after every restart it
serves the old version or the new one, with that version's exact outputs — never neither, never
a partial bundle."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent.engine.classifier import load_classifier
from edge_bundle.bundle import open_bundle
from edge_bundle.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from edge_bundle.profiles import load_profile
from edge_bundle.signing import TrustStore
from tests.agent_support import build_bundle, jpeg, make_keys, run_agent, spawn_agent
from tests.mqtt_support import TestClient, running_broker
from tests.update_support import file_server, release_key, signed_notice

SITE, DEVICE = "plant", "box1"
STEP_FAULTS = [
    "update.downloading=kill",
    "download.write=kill",
    "update.verifying=kill",
    "update.staging=kill",
    "update.activating=kill",
    "update.swapped-store=kill",
    "update.probation=kill",
    "update.committed=kill",
    "persist.fsync=kill",
    "persist.rename=kill@3",
    "persist.write=kill@4",
]
IO_FAULTS = ["persist.fsync=enospc@2", "persist.write=eio@3", "download.write=eio"]
RANDOM_KILLS = 50 - len(STEP_FAULTS)


def expected_top_k(bundle: Path, public: Path, work: Path, image: bytes) -> list[list[Any]]:
    verified = open_bundle(bundle, TrustStore.from_files([public]), work / "staging")
    classifier = load_classifier(verified, load_profile("generic-x86-64-avx2"), work / "cache")
    decoded = classifier.decode(image, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES)
    scored = classifier.postprocess(classifier.infer(classifier.prepare(decoded)), 3)
    classifier.close()
    return [[label, round(score, 6)] for label, score in scored.top_k]


@pytest.mark.slow
def test_kills_and_disk_errors_never_leave_the_box_unable_to_serve(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    v1 = build_bundle(tmp_path / "v1", keys, version=1, seed=3)
    v2 = build_bundle(tmp_path / "v2", keys, version=2, seed=9)
    image = jpeg(4)
    expected = {
        1: expected_top_k(v1.path, keys.public, tmp_path / "e1", image),
        2: expected_top_k(v2.path, keys.public, tmp_path / "e2", image),
    }
    assert expected[1] != expected[2]
    pristine = tmp_path / "pristine"
    subprocess.run(
        [".venv/bin/edge-agent", "install", str(v1.path), "--state-dir", str(pristine),
         "--trusted-key", str(keys.public)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    signing, release_pub = release_key(tmp_path / "release")
    files = tmp_path / "files"
    files.mkdir()
    (files / "v2.bundle").write_bytes(v2.path.read_bytes())
    rng = random.Random(7)
    outcomes: list[tuple[str, int]] = []
    with running_broker(tmp_path / "broker") as broker, file_server(files) as (url, _log):
        env = {
            "EDGE_AGENT_MQTT_ENABLED": "true",
            "EDGE_AGENT_MQTT_PORT": str(broker.port),
            "EDGE_AGENT_SITE": SITE,
            "EDGE_AGENT_DEVICE": DEVICE,
            "EDGE_AGENT_TELEMETRY_INTERVAL_S": "0",
            "EDGE_AGENT_MQTT_RECONNECT_MIN_S": "0.1",
            "EDGE_AGENT_RELEASE_KEYS": json.dumps([str(release_pub)]),
            "EDGE_AGENT_PROBATION_S": "1",
        }
        plans = [("fault", f) for f in STEP_FAULTS + IO_FAULTS] + [("random", "")] * RANDOM_KILLS
        for number, (kind, fault) in enumerate(plans):
            state = tmp_path / f"run{number}"
            shutil.copytree(pristine, state, symlinks=True)
            client = TestClient(broker.port, f"central-{number}")
            # A fresh sequence per run, for this device; retained so a restart sees it again.
            notice = signed_notice(signing, v2.path, f"{url}/v2.bundle", sequence=1000 + number)
            client.publish(f"lineside/v1/{SITE}/{DEVICE}/release", notice, retain=True)
            client.close()
            run_env = dict(env)
            if kind == "fault":
                run_env["LINESIDE_FAULTS"] = fault
            agent = spawn_agent(state, "--trusted-key", str(keys.public), env=run_env)
            if kind == "random":
                time.sleep(rng.uniform(0.5, 4.0))
            deadline = time.monotonic() + 30
            while kind == "fault" and agent.process.poll() is None and time.monotonic() < deadline:
                if "=kill" not in fault and _settled(agent.url):
                    break
                time.sleep(0.1)
            killed_by_fault = agent.process.poll() is not None
            agent.process.kill()
            agent.process.wait(10)
            if kind == "fault" and "=kill" in fault:
                assert killed_by_fault, (fault, agent.log()[-2000:])
            # Restart without faults: it must serve v1 or v2 with that version's outputs.
            with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
                agent.wait_ready(60)
                answer = httpx.post(
                    f"{agent.url}/v1/models/defects/predict", content=image,
                    headers={"Content-Type": "image/jpeg"}, timeout=30,
                ).json()  # fmt: skip
                version = answer["model"]["version"]
                got = [[t["label"], t["score"]] for t in answer["top_k"]]
                assert version in (1, 2), (kind, fault, answer)
                assert got == expected[version], (kind, fault, version, got, expected[version])
                # The interrupted update finishes (or is refused cleanly) after the restart.
                deadline = time.monotonic() + 40
                while not _settled(agent.url) and time.monotonic() < deadline:
                    time.sleep(0.2)
                final = httpx.get(f"{agent.url}/v1/updates").json()["state"]["phase"]
                assert final in ("committed", "refused", "rolled_back", "idle"), (
                    kind,
                    fault,
                    final,
                )
                after = httpx.post(
                    f"{agent.url}/v1/models/defects/predict", content=image,
                    headers={"Content-Type": "image/jpeg"}, timeout=30,
                ).json()  # fmt: skip
                assert [[t["label"], t["score"]] for t in after["top_k"]] == expected[
                    after["model"]["version"]
                ]
                if _settled(agent.url):
                    staging = state / "store" / "staging"
                    assert not list(staging.iterdir()), (kind, fault, list(staging.iterdir()))
            outcomes.append((fault or "random", version))
            shutil.rmtree(state, ignore_errors=True)
    kills = sum(1 for kind, fault in plans if kind == "random" or "=kill" in fault)
    assert kills >= 50
    # Both versions were seen after restarts: kills landed before and after the swap.
    assert {v for _, v in outcomes} == {1, 2}, outcomes


def _settled(url: str) -> bool:
    try:
        phase = httpx.get(f"{url}/v1/updates", timeout=5).json()["state"]["phase"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False
    return phase in ("committed", "refused", "rolled_back")
