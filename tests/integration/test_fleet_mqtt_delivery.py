"""A rollout delivered over MQTT alone, end to end: the controller's plan says `delivery = "mqtt"`
and gives no URL, the chunk server serves the controller's chunk store through a real Mosquitto,
and two real `edge-agent serve` processes and 20 simulated boxes fetch the bundle in chunks,
check every chunk against the signed manifest digest, and commit the new version.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_bundle.signing import TrustStore
from fleet_controller.plan import RolloutPlan
from fleet_controller.simulator import Behaviour, BoxSpec, Simulator, SimulatorThread
from tests.agent_support import Keys, build_bundle, install_bundle, jpeg, run_agent
from tests.chunk_support import running_chunk_server
from tests.fleet_support import fleet_keys, in_process, wait_for, wait_for_rollout, write_config
from tests.mqtt_support import running_broker

pytestmark = pytest.mark.slow
AGENTS = ("agent0", "agent1")
SIMULATED = 20
CHUNK_SIZE = 4 * 1024


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A broker, two real agents on defects@1 that reach nothing but the broker, and bundles."""
    keys = fleet_keys(tmp_path / "keys")
    signer = Keys(keys.bundle, keys.bundle_private, keys.bundle_public)
    files = tmp_path / "files"
    files.mkdir()
    bundles = {v: build_bundle(files, signer, version=v, seed=3) for v in (1, 2)}
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(running_broker(tmp_path / "broker"))
        agents = []
        for name in AGENTS:
            state = tmp_path / name
            install_bundle(state, bundles[1].path, keys.bundle_public)
            env = {
                "EDGE_AGENT_MQTT_ENABLED": "true",
                "EDGE_AGENT_MQTT_PORT": str(broker.port),
                "EDGE_AGENT_SITE": "plant-m",
                "EDGE_AGENT_DEVICE": name,
                "EDGE_AGENT_LINE": "line9",
                "EDGE_AGENT_TELEMETRY_INTERVAL_S": "1",
                "EDGE_AGENT_MQTT_RECONNECT_MIN_S": "0.1",
                "EDGE_AGENT_MQTT_RECONNECT_MAX_S": "1",
                "EDGE_AGENT_RELEASE_KEYS": f'["{keys.release_public}"]',
                "EDGE_AGENT_UPDATE_FETCH": "mqtt",
                "EDGE_AGENT_PROBATION_S": "1",
                "EDGE_AGENT_PROBATION_SELFTEST_S": "0.5",
            }
            agents.append(
                stack.enter_context(
                    run_agent(state, "--trusted-key", str(keys.bundle_public), env=env)
                )
            )
        for agent in agents:
            agent.wait_ready()
        yield {"root": tmp_path, "keys": keys, "broker": broker, "agents": agents,
               "paths": {v: b.path for v, b in bundles.items()}}  # fmt: skip


def test_a_rollout_over_mqtt_reaches_real_agents_and_simulated_boxes(
    setup: dict[str, Any],
) -> None:
    keys, broker = setup["keys"], setup["broker"]
    boxes = [
        BoxSpec(
            site="plant-s", device=f"sim{n:02d}", line="line9", models={"defects": 1},
            agent_version="0.4.0",
            behaviour=Behaviour(install_s=0.2, download=True, fetch="mqtt"),
        )
        for n in range(SIMULATED)
    ]  # fmt: skip
    trust = TrustStore.from_files([keys.release_public])
    simulator = Simulator("127.0.0.1", broker.port, boxes, trust, telemetry_interval_s=1.0)
    config = write_config(setup["root"] / "controller", keys, broker.port)
    store = setup["root"] / "controller" / "chunks"  # the [chunks] store's default, "chunks"
    total = SIMULATED + len(AGENTS)
    with (
        running_chunk_server(broker.port, store) as chunks,
        SimulatorThread(simulator),
        in_process(config) as controller,
    ):
        wait_for(
            lambda: sum(d.line == "line9" for d in controller.registry.devices()) == total or None,
            60,
            f"telemetry from {total} boxes",
        )
        plan = RolloutPlan.from_toml(
            f'name = "defects-2"\nbundle = "{setup["paths"][2]}"\ndelivery = "mqtt"\n'
            f'chunk_size = {CHUNK_SIZE}\ncohort = {{ line = "line9" }}\n\n'
            "[waves]\npercent = [10, 100]\nsoak_s = 1\ndeadline_s = 120\n\n[gates]\nmin_boxes = 1\n",
            setup["root"],
        )
        created = controller.rollouts.create(plan, actor="test")
        done = wait_for_rollout(controller, created["id"], 180)
        assert done["status"] == "completed", done
        assert len(done["boxes"]) == total
        assert {b["state"] for b in done["boxes"]} == {"committed"}
        stats = chunks.stats()
    size = setup["paths"][2].stat().st_size
    per_box = -(-size // CHUNK_SIZE)
    # Every box fetched every chunk through the chunk server (re-asks may add a few).
    assert stats["chunks"] >= total * per_box, stats
    assert stats["refused"] == 0, stats
    for agent in setup["agents"]:
        answer = httpx.post(
            f"{agent.url}/v1/models/defects/predict",
            content=jpeg(2),
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        ).json()
        assert answer["model"]["version"] == 2
        updates = httpx.get(f"{agent.url}/v1/updates", timeout=10).json()
        assert any("chunks_total" in str(r) for r in updates["reports"]), updates["reports"]
