"""The controller killed with SIGKILL at every kind of step of a rollout, again and again.

A real `fleet-controller serve` process, a real Mosquitto and 30 simulated boxes. The rollout is
created through the CLI; then the controller is restarted with FLEET_CONTROLLER_CRASH_AT set to
die at its Nth step (a stored state, a stored notice, a published one, a stored report), for
N = 1, 2, 3, ... in turn, at least 20 times, and finally left to finish. Every notice re-sent
after a crash must be byte-identical to the first (same sequence), no box may act twice, no box
may be skipped, and the rollout must complete.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_bundle.signing import TrustStore
from fleet_controller.simulator import Behaviour, BoxSpec, Simulator, SimulatorThread
from tests.agent_support import Keys, build_bundle
from tests.fleet_support import fleet_keys, spawn_controller, wait_for, write_config
from tests.mqtt_support import Broker, TestClient, running_broker
from tests.update_support import file_server

pytestmark = pytest.mark.slow
BOXES = 30
KILLS = 20


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "broker") as running:
        yield running


def test_a_rollout_survives_twenty_sigkills(tmp_path: Path, broker: Broker) -> None:
    keys = fleet_keys(tmp_path / "keys")
    files = tmp_path / "files"
    files.mkdir()
    signer = Keys(keys.bundle, keys.bundle_private, keys.bundle_public)
    bundle = build_bundle(files, signer, version=2, seed=3)
    boxes = [
        BoxSpec(
            site=f"plant-{n % 3}",
            device=f"box{n:02d}",
            models={"defects": 1},
            agent_version="0.1.0" if n % 10 == 3 else "0.2.0",
            behaviour=Behaviour(install_s=0.4),
        )
        for n in range(BOXES)
    ]
    releases = TestClient(broker.port, "releases")
    releases.subscribe("lineside/v1/+/+/release")
    trust = TrustStore.from_files([keys.release_public])
    simulator = Simulator("127.0.0.1", broker.port, boxes, trust, telemetry_interval_s=1.0)
    config = write_config(tmp_path / "controller", keys, broker.port)
    with file_server(files) as (url, _log), SimulatorThread(simulator) as sim:
        plan = tmp_path / "plan.toml"
        plan.write_text(
            f'name = "defects-2"\nbundle = "{bundle.path}"\nurl = "{url}/{bundle.path.name}"\n'
            'cohort = { site = ["plant-0", "plant-1", "plant-2"] }\n\n'
            "[waves]\npercent = [10, 40, 100]\nsoak_s = 0.3\ndeadline_s = 120\n"
        )
        first = spawn_controller(config)
        assert first.wait_up(), first.log()
        with first.client() as api:
            wait_for(
                lambda: (
                    api.get("/v1/devices").json()["count"] == BOXES
                    and all(d["agent_version"] for d in api.get("/v1/devices").json()["devices"])
                ),
                60,
                "every box in the registry",
            )
        created = subprocess.run(
            [sys.executable, "-m", "fleet_controller.cli", "rollout", "create", str(plan),
             "--api", config.api, "--token-file", str(config.token_file)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)

        kills, attempt = 1, 0
        while kills < KILLS + 1:
            attempt += 1
            controller = spawn_controller(
                config, env={"FLEET_CONTROLLER_CRASH_AT": f"any:{1 + attempt % 7}"}
            )
            code = controller.process.wait(120)
            assert code == -signal.SIGKILL, f"the controller ended with {code}:\n{controller.log()}"
            kills += 1
        last = spawn_controller(config)
        try:
            assert last.wait_up(), last.log()
            with last.client() as api:
                done = wait_for(
                    lambda: (
                        (s := api.get("/v1/rollouts/defects-2").json())["status"]
                        in ("completed", "halted")
                        and s
                    ),
                    120,
                    "the rollout to finish",
                )
            # No box acted twice, none was skipped: one install each, of its own sequence.
            acted = {ref: list(sim.acted(ref)) for ref in (b.ref for b in boxes)}
        finally:
            last.stop()

    assert kills > KILLS
    assert done["status"] == "completed", done
    states = {box["ref"]: box for box in done["boxes"]}
    assert all(box["state"] == "committed" for box in states.values()), states
    for ref, box in states.items():
        assert acted[ref] == [(box["sequence"], "defects", 2, False)], (ref, acted[ref])
    # Every re-sent notice is byte-identical to the first one of its topic and sequence.
    payloads: dict[str, set[bytes]] = defaultdict(set)
    for message in releases.messages:
        payloads[message.topic].add(bytes(message.payload))
    assert len(payloads) == BOXES
    assert all(len(found) == 1 for found in payloads.values()), {
        topic: len(found) for topic, found in payloads.items() if len(found) > 1
    }
    releases.close()
