"""Shadow-gated promotion (issue #17): a rollout whose plan has a `[shadow]` phase activates a
candidate only where it agreed with the active model on the plant's own photos.

1. Simulated boxes (a real Mosquitto, the controller's real loop and link in this process): a
   candidate that disagrees halts the rollout in its first wave with nothing activated anywhere;
   one that agrees goes through every wave; a cohort with agents before 0.3.0 is refused.
2. Real agents: two `edge-agent serve` processes on the tiny demo-like network, real photos sent
   to them while they shadow. A candidate that installs fine but answers with its labels
   permuted (the same network, its output rows rolled: it disagrees on every photo) is never
   activated on any box, the rollout halts with the per-class disagreements in its figures, and
   those figures match the boxes' own `GET /v1/shadow`; the same network as a new version agrees
   and is activated.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import onnx
import pytest
from onnx import numpy_helper

from edge_bundle.signing import TrustStore
from fleet_controller.errors import FleetError
from fleet_controller.plan import RolloutPlan
from fleet_controller.simulator import Behaviour, BoxSpec, Simulator, SimulatorThread
from tests.agent_support import (
    LABELS,
    AgentProcess,
    Keys,
    build_bundle,
    install_bundle,
    jpeg,
    run_agent,
    tiny_model,
)
from tests.fleet_support import FleetKeys, fleet_keys, in_process, wait_for, write_config
from tests.mqtt_support import Broker, running_broker
from tests.update_support import file_server

pytestmark = pytest.mark.slow
ENDED = ("completed", "halted", "rolled_back", "cancelled")


def permuted_labels(path: Path, seed: int) -> Path:
    """The tiny network with its output rows rolled by one: every answer becomes another class."""
    tiny_model(path, seed)
    model = onnx.load(str(path))
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == "w2":
            rolled = numpy_helper.to_array(tensor)[[1, 2, 0]]
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(rolled, "w2"))
    onnx.save(model, str(path))
    return path


def plan_text(bundles: dict[str, Any], version: int, cohort: str, waves: str, shadow: str) -> str:
    return (
        f'name = "defects-{version}"\nbundle = "{bundles["paths"][version]}"\n'
        f'url = "{bundles["urls"][version]}"\ncohort = {cohort}\n\n[waves]\n{waves}\n\n'
        f"[shadow]\n{shadow}\n\n[on_halt]\nrollback = true\n"
    )


def ended(controller: Any, rollout_id: str) -> dict[str, Any] | None:
    status: dict[str, Any] = controller.rollouts.status(rollout_id)
    return status if status["status"] in ENDED else None


def versions(controller: Any) -> dict[str, int | None]:
    return {
        d.ref: (d.models["defects"].version if "defects" in d.models else None)
        for d in controller.registry.devices()
    }


# ---- simulated boxes ----------------------------------------------------------------------
@pytest.fixture
def sim(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A broker, defects@1 and @2 on a file server, the keys."""
    keys = fleet_keys(tmp_path / "keys")
    files = tmp_path / "files"
    files.mkdir()
    signer = Keys(keys.bundle, keys.bundle_private, keys.bundle_public)
    built = {v: build_bundle(files, signer, version=v, seed=3) for v in (1, 2)}
    with running_broker(tmp_path / "broker") as broker, file_server(files) as (url, _log):
        yield {
            "keys": keys, "broker": broker, "root": tmp_path,
            "paths": {v: b.path for v, b in built.items()},
            "urls": {v: f"{url}/{b.path.name}" for v, b in built.items()},
        }  # fmt: skip


def boxes(count: int, behaviour: Behaviour, agent: str = "0.3.0") -> list[BoxSpec]:
    return [
        BoxSpec(
            site=f"plant-{'ab'[n % 2]}", device=f"box{n}", groups=("line1",),
            models={"defects": 1}, behaviour=behaviour,
            agent_version=agent if n else "0.3.0",
        )
        for n in range(count)
    ]  # fmt: skip


@contextlib.contextmanager
def simulated(sim: dict[str, Any], specs: list[BoxSpec]) -> Iterator[Any]:
    keys: FleetKeys = sim["keys"]
    broker: Broker = sim["broker"]
    trust = TrustStore.from_files([keys.release_public])
    simulator = Simulator("127.0.0.1", broker.port, specs, trust, telemetry_interval_s=0.5)
    config = write_config(sim["root"] / "controller", keys, broker.port)
    with SimulatorThread(simulator), in_process(config) as controller:
        wait_for(
            lambda: len([v for v in versions(controller).values() if v]) == len(specs),
            30,
            "telemetry from every simulated box",
        )
        yield controller


SIM_SHADOW = "soak_s = 1\nmin_compared = 40\nmin_agreement = 0.9\nmax_s = 60"


def test_a_disagreeing_candidate_halts_in_its_first_wave_with_nothing_activated(
    sim: dict[str, Any],
) -> None:
    behaviour = Behaviour(install_s=0.3, requests_per_s=40, agreement_by_version={2: 0.6})
    with simulated(sim, boxes(4, behaviour)) as controller:
        plan = RolloutPlan.from_toml(
            plan_text(sim, 2, '{ group = "line1" }', "counts = [2]\ndeadline_s = 60", SIM_SHADOW),
            sim["root"],
        )
        created = controller.rollouts.create(plan, actor="test")
        done = wait_for(lambda: ended(controller, created["id"]), 60, "the rollout to end")
        assert done["status"] in ("halted", "rolled_back"), done
        assert done["wave"] == 1 and "while shadowing" in done["halt_reason"]
        [gate] = done["shadow_gates"]
        assert gate["status"] == "fail" and gate["value"] == pytest.approx(0.6, abs=0.02)
        assert gate["figures"]["disagreements"][0]["active"] == "ok"
        assert gate["figures"]["disagreements"][0]["candidate"] == "scratch"
        assert "ok->scratch" in done["halt_reason"]
        states = {b["ref"]: b for b in done["boxes"]}
        assert {b["state"] for b in states.values()} == {"pending"}  # no activating notice
        assert sorted(b.get("shadow_state") for b in states.values() if b["wave"] == 1) == [
            "shadowing",
            "shadowing",
        ]
        assert not any(b["rollback_state"] for b in states.values())
        assert set(versions(controller).values()) == {1}
        audit = [entry["what"] for entry in controller.rollouts.audit(created["id"])]
        assert "wave-shadowing" in audit and "halted" in audit and "shadow-passed" not in audit


def test_an_agreeing_candidate_shadows_then_activates_wave_after_wave(
    sim: dict[str, Any],
) -> None:
    behaviour = Behaviour(install_s=0.3, requests_per_s=40, agreement=0.98)
    with simulated(sim, boxes(4, behaviour)) as controller:
        plan = RolloutPlan.from_toml(
            plan_text(
                sim, 2, '{ group = "line1" }', "counts = [2]\nsoak_s = 0.5\ndeadline_s = 60",
                SIM_SHADOW,
            ),
            sim["root"],
        )  # fmt: skip
        created = controller.rollouts.create(plan, actor="test")
        done = wait_for(lambda: ended(controller, created["id"]), 90, "the rollout to end")
        assert done["status"] == "completed", done
        assert {b["state"] for b in done["boxes"]} == {"committed"}
        assert {b["shadow_state"] for b in done["boxes"]} == {"shadowing"}
        assert done["shadow_gates"][0]["status"] == "pass"
        audit = [entry["what"] for entry in controller.rollouts.audit(created["id"])]
        assert audit.count("shadow-passed") == 2
        wait_for(lambda: set(versions(controller).values()) == {2}, 30, "every box on 2")


def test_a_shadow_plan_for_a_cohort_with_older_agents_is_refused(sim: dict[str, Any]) -> None:
    with simulated(sim, boxes(3, Behaviour(), agent="0.2.0")) as controller:
        plan = RolloutPlan.from_toml(
            plan_text(sim, 2, '{ group = "line1" }', "counts = [2]", SIM_SHADOW), sim["root"]
        )
        with pytest.raises(FleetError) as caught:
            controller.rollouts.create(plan, actor="test")
        message = caught.value.message
        assert "before 0.3.0" in message and "(agent 0.2.0)" in message
        assert "plant-b/box1" in message and "plant-a/box2" in message
        assert "plant-a/box0" not in message
        assert controller.rollouts.list() == []


# ---- real agents --------------------------------------------------------------------------
AGENTS = ("agent0", "agent1")


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A broker, the bundles on a file server, two real agents on defects@1."""
    root = tmp_path_factory.mktemp("fleet-shadow")
    keys = fleet_keys(root / "keys")
    signer = Keys(keys.bundle, keys.bundle_private, keys.bundle_public)
    files = root / "files"
    files.mkdir()
    built = {
        1: build_bundle(files, signer, version=1, seed=3),
        2: build_bundle(files, signer, version=2, seed=3),  # the same network: agrees
        3: build_bundle(files, signer, version=3, seed=3, model_builder=permuted_labels),
    }
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(running_broker(root / "broker"))
        url, _log = stack.enter_context(file_server(files))
        agents = []
        for name in AGENTS:
            state = root / name
            install_bundle(state, built[1].path, keys.bundle_public)
            env = {
                "EDGE_AGENT_MQTT_ENABLED": "true",
                "EDGE_AGENT_MQTT_PORT": str(broker.port),
                "EDGE_AGENT_SITE": "plant-r",
                "EDGE_AGENT_DEVICE": name,
                "EDGE_AGENT_TELEMETRY_INTERVAL_S": "0.5",
                "EDGE_AGENT_MQTT_RECONNECT_MIN_S": "0.1",
                "EDGE_AGENT_MQTT_RECONNECT_MAX_S": "1",
                "EDGE_AGENT_RELEASE_KEYS": f'["{keys.release_public}"]',
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
        yield {
            "root": root, "keys": keys, "broker": broker, "agents": agents,
            "paths": {v: b.path for v, b in built.items()},
            "urls": {v: f"{url}/{b.path.name}" for v, b in built.items()},
        }  # fmt: skip


@contextlib.contextmanager
def photos(agents: list[AgentProcess]) -> Iterator[None]:
    """Real photos to every agent, with the idle gaps shadow runs need between them."""
    stop = threading.Event()

    def send(agent: AgentProcess) -> None:
        with httpx.Client(base_url=agent.url, timeout=30) as client:
            seed = 0
            while not stop.is_set():
                client.post(
                    "/v1/models/defects/predict",
                    content=jpeg(seed % 50),
                    headers={"Content-Type": "image/jpeg"},
                )
                seed += 1
                stop.wait(0.08)

    threads = [threading.Thread(target=send, args=(a,), daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def served(agent: AgentProcess) -> int:
    models = httpx.get(f"{agent.url}/v1/models", timeout=10).json()
    entries = models["models"] if isinstance(models, dict) else models
    [entry] = [m for m in entries if m["name"] == "defects"]
    return int(entry["version"])


REAL_SHADOW = "soak_s = 4\nmin_compared = 30\nmin_agreement = 0.9\nmax_s = 120"


def test_real_agents_never_activate_a_disagreeing_candidate_and_activate_an_agreeing_one(
    real: dict[str, Any], tmp_path: Path
) -> None:
    agents: list[AgentProcess] = real["agents"]
    config = write_config(tmp_path / "controller", real["keys"], real["broker"].port)
    with photos(agents), in_process(config) as controller:
        wait_for(
            lambda: versions(controller) == {f"plant-r/{a}": 1 for a in AGENTS},
            30,
            "telemetry from both agents",
        )
        cohort, waves = '{ site = "plant-r" }', "counts = [2]\nsoak_s = 1\ndeadline_s = 60"
        bad = RolloutPlan.from_toml(plan_text(real, 3, cohort, waves, REAL_SHADOW), real["root"])
        created = controller.rollouts.create(bad, actor="test")
        done = wait_for(lambda: ended(controller, created["id"]), 60, "the bad rollout to end")
        assert done["status"] in ("halted", "rolled_back"), done
        assert "while shadowing" in done["halt_reason"], done["halt_reason"]
        [gate] = done["shadow_gates"]
        assert gate["status"] == "fail" and gate["value"] < 0.7, gate
        figures = gate["figures"]
        assert figures["compared"] >= 30 and figures["boxes"] == 2
        pairs = {(d["active"], d["candidate"]) for d in figures["disagreements"]}
        assert pairs and all(a in LABELS and c in LABELS and a != c for a, c in pairs)
        assert {b["state"] for b in done["boxes"]} == {"pending"}
        # Never activated: each box still serves version 1, and says so itself.
        assert [served(agent) for agent in agents] == [1, 1]
        # The figures the controller judged match each box's own (a box keeps counting).
        recorded = {entry["ref"]: entry for entry in figures["per_box"]}
        for name, agent in zip(AGENTS, agents, strict=True):
            own = httpx.get(f"{agent.url}/v1/shadow", timeout=10).json()["shadows"]["defects"]
            mine = recorded[f"plant-r/{name}"]
            assert own["candidate"]["version"] == 3
            assert own["compared"] >= mine["compared"] > 0
            assert own["agreement"] == pytest.approx(mine["agreement"], abs=0.05)

        good = RolloutPlan.from_toml(plan_text(real, 2, cohort, waves, REAL_SHADOW), real["root"])
        created = controller.rollouts.create(good, actor="test")
        done = wait_for(lambda: ended(controller, created["id"]), 60, "the good rollout to end")
        assert done["status"] == "completed", done
        assert done["shadow_gates"][0]["status"] == "pass"
        assert done["shadow_gates"][0]["value"] >= 0.9
        assert {b["state"] for b in done["boxes"]} == {"committed"}
        assert [served(agent) for agent in agents] == [2, 2]
