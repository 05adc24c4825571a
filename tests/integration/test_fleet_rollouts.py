"""Fleet rollouts end to end, with simulated boxes: a real Mosquitto, the controller's real loop
and link (in this process), a real HTTP file server for the bundles, and ~200 simulated boxes
speaking the box's protocol (fleet_controller.simulator).

Real agents are in test_fleet_real_agents.py (happy path and a real p95 gate trip); the
controller killed with SIGKILL again and again is in test_fleet_crashes.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_bundle.signing import TrustStore
from fleet_controller.plan import RolloutPlan, assign_waves, wave_sizes
from fleet_controller.simulator import Behaviour, BoxSpec, Simulator, SimulatorThread
from tests.agent_support import Keys, build_bundle
from tests.fleet_support import FleetKeys, fleet_keys, in_process, wait_for, write_config
from tests.mqtt_support import Broker, TestClient, running_broker
from tests.update_support import file_server

pytestmark = pytest.mark.slow
SITES = ("plant-a", "plant-b", "plant-c")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def keys(tmp_path: Path) -> FleetKeys:
    return fleet_keys(tmp_path / "keys")


@pytest.fixture
def bundles(tmp_path: Path, keys: FleetKeys) -> Iterator[dict[str, Any]]:
    """defects@1 and defects@2, signed with the bundle key, served over HTTP."""
    directory = tmp_path / "files"
    directory.mkdir()
    signer = Keys(keys.bundle, keys.bundle_private, keys.bundle_public)
    built = {v: build_bundle(directory, signer, version=v, seed=3) for v in (1, 2)}
    with file_server(directory) as (url, _log):
        yield {
            "paths": {v: b.path for v, b in built.items()},
            "urls": {v: f"{url}/{b.path.name}" for v, b in built.items()},
        }


@pytest.fixture
def releases(broker: Broker) -> Iterator[TestClient]:
    """Everything published on any box's release topic."""
    client = TestClient(broker.port, f"releases-{time.monotonic_ns()}")
    client.subscribe("lineside/v1/+/+/release")
    yield client
    client.close()


def fleet(count: int, **behaviours: Behaviour) -> list[BoxSpec]:
    """`count` boxes over three sites, on defects@1, quick to install; `behaviours` by ref."""
    boxes = []
    for n in range(count):
        site = SITES[n % len(SITES)]
        ref = f"{site}/box{n:03d}"
        behaviour = behaviours.get(
            ref.replace("/", "_").replace("-", "_"), Behaviour(install_s=0.3)
        )
        boxes.append(
            BoxSpec(
                site=site,
                device=f"box{n:03d}",
                line="line1",
                groups=("line1",),
                models={"defects": 1},
                behaviour=behaviour,
                agent_version="0.1.0" if n % 20 == 7 else "0.2.0",
            )
        )
    return boxes


def plan(bundles: dict[str, Any], tmp: Path, waves: str, gates: str = "") -> RolloutPlan:
    sites = ", ".join(f'"{site}"' for site in SITES)
    text = (
        f'name = "defects-2"\nbundle = "{bundles["paths"][2]}"\nurl = "{bundles["urls"][2]}"\n'
        f"cohort = {{ site = [{sites}] }}\n\n[waves]\n{waves}\n\n[gates]\n{gates}\n\n"
        f'[on_halt]\nrollback = true\nprevious = [{{ bundle = "{bundles["paths"][1]}", '
        f'url = "{bundles["urls"][1]}" }}]\n'
    )
    return RolloutPlan.from_toml(text, tmp)


def simulate(broker: Broker, keys: FleetKeys, boxes: list[BoxSpec]) -> SimulatorThread:
    trust = TrustStore.from_files([keys.release_public])
    return SimulatorThread(
        Simulator("127.0.0.1", broker.port, boxes, trust, telemetry_interval_s=1.0)
    )


def known(controller: Any, count: int) -> bool:
    """Every box has sent telemetry (agent version and models known), not only its status."""
    devices = controller.registry.devices()
    return sum(1 for d in devices if d.agent_version and "defects" in d.models) >= count


def box_state(controller: Any, rollout_id: str, ref: str) -> str:
    status = controller.rollouts.status(rollout_id)
    return str(next(b["state"] for b in status["boxes"] if b["ref"] == ref))


def finished(controller: Any, rollout_id: str, *statuses: str) -> dict[str, Any] | None:
    status: dict[str, Any] = controller.rollouts.status(rollout_id)
    return status if status["status"] in statuses else None


def test_a_good_release_reaches_every_box_old_agents_and_late_boxes_included(
    tmp_path: Path, broker: Broker, keys: FleetKeys, bundles: dict[str, Any], releases: TestClient
) -> None:
    """200 boxes, 3 waves: old agents update through v1 notices, a box offline during its wave
    gets the release when it returns, one that never returns times out without blocking."""
    boxes = fleet(200)
    late, gone = boxes[10].ref, boxes[11].ref
    config = write_config(tmp_path / "controller", keys, broker.port)
    with simulate(broker, keys, boxes) as sim, in_process(config) as controller:
        wait_for(lambda: known(controller, 200), 60, "200 boxes in the registry")
        sim.set_online(late, False)
        sim.set_online(gone, False)
        rollout = plan(bundles, tmp_path, "percent = [5, 30, 100]\nsoak_s = 0.5\ndeadline_s = 20")
        created = controller.rollouts.create(rollout, actor="test")
        assert [w["total"] for w in created["per_wave"]] == [10, 50, 140]
        time.sleep(3)
        sim.set_online(late, True)
        done = wait_for(
            lambda: finished(controller, created["id"], "completed", "halted"), 120, "the end"
        )
        assert done["status"] == "completed", done
        states = {box["ref"]: box for box in done["boxes"]}
        assert states[gone]["state"] == "timed_out"
        # The late box reports when it is back: before its deadline, or after (a late outcome
        # replaces the time-out) on a machine slow enough that it missed it.
        try:
            wait_for(
                lambda: box_state(controller, created["id"], late) == "committed",
                30,
                f"{late} to commit after its return",
            )
        except AssertionError:
            history = [r.to_json() for r in controller.registry.history(*late.split("/"))]
            raise AssertionError(
                f"{late}: box {sim.box_state(late)}; registry "
                f"{controller.registry.device(*late.split('/'))}; history {history}"
            ) from None
        states[late]["state"] = "committed"
        assert sum(1 for b in done["boxes"] if b["state"] == "committed") == 199
        # Old agents got v1 notices, the rest v2; every one of them committed.
        olds = {b.ref for b in boxes if b.agent_version == "0.1.0"}
        assert olds and all(not states[ref]["v2"] for ref in olds)
        assert all(states[b.ref]["v2"] for b in boxes if b.ref not in olds)
        # The registry shows every box that is back on the new version.
        versions = {d.ref: d.models["defects"].version for d in controller.registry.devices()}
        assert all(versions[b.ref] == 2 for b in boxes if b.ref != gone), versions
        assert versions[gone] == 1
        # Each box acted once on exactly one release notice.
        assert all(len(sim.acted(b.ref)) == 1 for b in boxes if b.ref != gone)
        assert controller.rollouts.audit(created["id"])[-1]["what"] == "completed"


def test_a_bad_release_halts_at_the_canary_and_is_rolled_back(
    tmp_path: Path, broker: Broker, keys: FleetKeys, bundles: dict[str, Any], releases: TestClient
) -> None:
    """Half the canary fails probation: the rollout halts after wave 1, no box beyond the canary
    ever receives the release, and the canary's committed boxes are rolled back."""
    boxes = fleet(60)
    rollout = plan(
        bundles, tmp_path, "counts = [4, 20]\nsoak_s = 0.5\ndeadline_s = 30",
        gates="min_installs = 4\nmax_failure_ratio = 0.2",
    )  # fmt: skip
    refs = sorted(b.ref for b in boxes)
    canary = assign_waves(refs, wave_sizes(rollout.waves, len(refs)), rollout.name)[0]
    failing = set(canary[:2])
    boxes = [
        BoxSpec(**{**b.__dict__, "behaviour": Behaviour(install_s=0.3, outcome="fail_probation")})
        if b.ref in failing
        else b
        for b in boxes
    ]
    config = write_config(tmp_path / "controller", keys, broker.port)
    with simulate(broker, keys, boxes) as sim, in_process(config) as controller:
        wait_for(lambda: known(controller, 60), 60, "60 boxes in the registry")
        created = controller.rollouts.create(rollout, actor="test")
        wait_for(lambda: finished(controller, created["id"], "rolled_back", "halted"), 60, "a halt")
        done = wait_for(
            lambda: finished(controller, created["id"], "rolled_back"), 60, "the rollback"
        )
        assert "install" in done["halt_reason"], done["halt_reason"]
        failed_gate = next(g for g in done["gates"] if g["status"] == "fail")
        assert failed_gate["name"] == "install" and failed_gate["value"] == pytest.approx(0.5)
        audit = controller.rollouts.audit(created["id"])
        assert any(entry["actor"] == "rule:install" for entry in audit), audit
        # No box beyond the canary ever received anything.
        touched = {"/".join(m.topic.split("/")[2:4]) for m in releases.messages if m.payload}
        assert touched == set(canary), (touched, canary)
        states = {box["ref"]: box for box in done["boxes"]}
        assert all(states[ref]["state"] == "pending" for ref in refs if ref not in canary)
        # The canary's committed boxes were rolled back and said so; all run version 1 again.
        for ref in canary:
            if ref in failing:
                assert states[ref]["state"] == "rolled_back"
            else:
                assert states[ref]["state"] == "committed"
                assert states[ref]["rollback_state"] == "committed", states[ref]
        wait_for(
            lambda: all(sim.box_state(ref)["active"]["defects"] == 1 for ref in canary),
            30,
            "the canary back on version 1",
        )
