"""Fleet rollouts with three real `edge-agent serve` processes (real bundles, real downloads,
real telemetry) beside simulated boxes, against a real Mosquitto and the controller's real loop.

1. A good release goes through three waves to the real agents and 60 simulated boxes; the
   registry shows every box on the new version.
2. A candidate that really is slower (a chain of matmuls in the network) trips the controller's
   p95 gate from the agents' own telemetry, under real traffic: the rollout halts after its
   canary and the canary is rolled back. The agents' own probation is told to tolerate the
   slowdown, so that it is the controller that catches it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent import __version__
from edge_bundle.signing import TrustStore
from fleet_controller.plan import RolloutPlan
from fleet_controller.simulator import Behaviour, BoxSpec, Simulator, SimulatorThread
from tests.agent_support import AgentProcess, Keys, build_bundle, install_bundle, jpeg, run_agent
from tests.fleet_support import (
    FleetKeys,
    fleet_keys,
    in_process,
    wait_for,
    wait_for_rollout,
    write_config,
)
from tests.mqtt_support import Broker, running_broker
from tests.update_support import file_server, slow_model

pytestmark = pytest.mark.slow
AGENTS = ("agent0", "agent1", "agent2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A broker, the bundles on a file server, and three real agents on defects@1."""
    root = tmp_path_factory.mktemp("fleet-real")
    keys = fleet_keys(root / "keys")
    signer = Keys(keys.bundle, keys.bundle_private, keys.bundle_public)
    files = root / "files"
    files.mkdir()
    bundles = {
        1: build_bundle(files, signer, version=1, seed=3),
        2: build_bundle(files, signer, version=2, seed=3),
        # Same answers, far more work per image: a really slower candidate.
        9: build_bundle(
            files, signer, version=9, seed=3, model_builder=functools.partial(slow_model, matmuls=4)
        ),
    }
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(running_broker(root / "broker"))
        url, _log = stack.enter_context(file_server(files))
        agents = []
        for name in AGENTS:
            state = root / name
            install_bundle(state, bundles[1].path, keys.bundle_public)
            env = {
                "EDGE_AGENT_MQTT_ENABLED": "true",
                "EDGE_AGENT_MQTT_PORT": str(broker.port),
                "EDGE_AGENT_SITE": "plant-r",
                "EDGE_AGENT_DEVICE": name,
                "EDGE_AGENT_LINE": "line7",
                "EDGE_AGENT_LABELS": '{"camera": "v2"}',
                "EDGE_AGENT_TELEMETRY_INTERVAL_S": "1",
                "EDGE_AGENT_MQTT_RECONNECT_MIN_S": "0.1",
                "EDGE_AGENT_MQTT_RECONNECT_MAX_S": "1",
                "EDGE_AGENT_RELEASE_KEYS": f'["{keys.release_public}"]',
                "EDGE_AGENT_PROBATION_S": "2",
                "EDGE_AGENT_PROBATION_SELFTEST_S": "0.5",
                # Tolerate the slow candidate on the box: the controller's gate must catch it.
                "EDGE_AGENT_PROBATION_LATENCY_FACTOR": "1000",
            }
            agent = stack.enter_context(
                run_agent(state, "--trusted-key", str(keys.bundle_public), env=env)
            )
            agents.append(agent)
        for agent in agents:
            agent.wait_ready()
        yield {
            "root": root, "keys": keys, "broker": broker, "agents": agents,
            "paths": {v: b.path for v, b in bundles.items()},
            "urls": {v: f"{url}/{b.path.name}" for v, b in bundles.items()},
        }  # fmt: skip


@contextlib.contextmanager
def traffic(agents: list[AgentProcess]) -> Iterator[None]:
    """Real predictions to every agent while the block runs (latency for the telemetry)."""
    stop = threading.Event()

    def load(agent: AgentProcess) -> None:
        with httpx.Client(base_url=agent.url, timeout=30) as client:
            while not stop.is_set():
                client.post(
                    "/v1/models/defects/predict",
                    content=jpeg(1),
                    headers={"Content-Type": "image/jpeg"},
                )
                stop.wait(0.02)

    threads = [threading.Thread(target=load, args=(a,), daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def plan_for(
    setup: dict[str, Any], version: int, cohort: str, waves: str, gates: str
) -> RolloutPlan:
    previous = ", ".join(
        f'{{ bundle = "{setup["paths"][v]}", url = "{setup["urls"][v]}" }}'
        for v in (1, 2)
        if v < version
    )
    text = (
        f'name = "defects-{version}"\nbundle = "{setup["paths"][version]}"\n'
        f'url = "{setup["urls"][version]}"\ncohort = {cohort}\n\n[waves]\n{waves}\n\n'
        f"[gates]\n{gates}\n\n[on_halt]\nrollback = true\nprevious = [{previous}]\n"
    )
    return RolloutPlan.from_toml(text, setup["root"])


def versions(controller: Any) -> dict[str, int | None]:
    return {
        d.ref: (d.models["defects"].version if "defects" in d.models else None)
        for d in controller.registry.devices()
    }


def on_version(controller: Any, version: int, timeout: float) -> None:
    """Wait until the registry shows every box on `version`; name the ones that are not."""
    try:
        wait_for(lambda: set(versions(controller).values()) == {version}, timeout, "versions")
    except AssertionError:
        others = {ref: v for ref, v in versions(controller).items() if v != version}
        raise AssertionError(f"not on version {version} after {timeout} s: {others}") from None


def test_a_good_release_reaches_real_agents_and_simulated_boxes(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    keys: FleetKeys = setup["keys"]
    broker: Broker = setup["broker"]
    boxes = [
        BoxSpec(
            site="plant-s", device=f"sim{n:02d}", line="line7", labels={"camera": "v2"},
            models={"defects": 1}, behaviour=Behaviour(install_s=0.3),
        )
        for n in range(60)
    ]  # fmt: skip
    trust = TrustStore.from_files([keys.release_public])
    simulator = Simulator("127.0.0.1", broker.port, boxes, trust, telemetry_interval_s=1.0)
    config = write_config(tmp_path / "controller", keys, broker.port)
    with SimulatorThread(simulator), in_process(config) as controller:
        wait_for(
            lambda: len(v := versions(controller)) == 63 and None not in v.values(),
            60,
            "telemetry from 63 boxes",
        )
        real = controller.registry.device("plant-r", "agent0")
        assert real.line == "line7" and real.labels == {"camera": "v2"}
        assert real.agent_version == __version__
        rollout = plan_for(
            setup, 2, '{ line = "line7", labels = { camera = "v2" } }',
            "percent = [5, 40, 100]\nsoak_s = 1\ndeadline_s = 120", "min_boxes = 2",
        )  # fmt: skip
        created = controller.rollouts.create(rollout, actor="test")
        done = wait_for_rollout(controller, created["id"], 180)
        assert done["status"] == "completed", done
        assert {b["state"] for b in done["boxes"]} == {"committed"}
        assert all(b["v2"] for b in done["boxes"])
        on_version(controller, 2, 30)
    for agent in setup["agents"]:
        answer = httpx.post(
            f"{agent.url}/v1/models/defects/predict",
            content=jpeg(2),
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        ).json()
        assert answer["model"]["version"] == 2


def test_a_really_slower_candidate_trips_the_p95_gate_on_real_telemetry(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    keys: FleetKeys = setup["keys"]
    agents: list[AgentProcess] = setup["agents"]
    config = write_config(tmp_path / "controller", keys, setup["broker"].port)
    with traffic(agents), in_process(config) as controller:
        refs = [f"plant-r/{name}" for name in AGENTS]

        def baselines() -> bool:
            # Telemetry of the running version with enough answered requests on every agent.
            for ref in refs:
                site, device = ref.split("/")
                found = controller.registry.device(site, device)
                if found is None or "defects" not in found.models:
                    return False
                version = found.models["defects"].version
                if (
                    controller.registry.latest_sample(
                        site, device, "defects", version, min_samples=20
                    )
                    is None
                ):
                    return False
            return True

        wait_for(baselines, 90, "latency baselines from the real agents")
        before = versions(controller)
        rollout = plan_for(
            setup, 9, '{ site = "plant-r" }', "counts = [2]\nsoak_s = 6\ndeadline_s = 120",
            "min_boxes = 2\nmin_samples = 20\nmax_p95_ratio = 1.5",
        )  # fmt: skip
        created = controller.rollouts.create(rollout, actor="test")
        done = wait_for(
            lambda: (
                (s := controller.rollouts.status(created["id"]))["status"]
                in ("completed", "rolled_back")
                and s
            ),
            180,
            "the rollout to end",
        )
        assert done["status"] == "rolled_back", done
        gate = next(g for g in done["gates"] if g["name"] == "p95")
        assert gate["status"] == "fail", done["gates"]
        assert gate["value"] > 1.5 and gate["sample"] >= 2, gate
        states = {b["ref"]: b for b in done["boxes"]}
        canary = [ref for ref, b in states.items() if b["wave"] == 1]
        assert len(canary) == 2
        assert all(states[ref]["state"] == "committed" for ref in canary)
        assert all(states[ref]["rollback_state"] == "committed" for ref in canary), states
        beyond = [ref for ref in refs if ref not in canary]
        assert all(states[ref]["state"] == "pending" for ref in beyond)
        wait_for(lambda: versions(controller) == before, 60, "every agent back where it was")
