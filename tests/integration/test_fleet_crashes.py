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
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_controller.simulator import SimulatorThread
from tests.fleet_support import (
    assert_each_box_acted_once,
    assert_notices_identical,
    fleet_keys,
    mixed_boxes,
    release_watcher,
    signed_bundles,
    simulator,
    spawn_controller,
    wait_for_boxes,
    wait_for_end,
    wave_plan_text,
    write_config,
)
from tests.mqtt_support import Broker, running_broker
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
    bundle = signed_bundles(files, keys, 2)[2]
    boxes = mixed_boxes(BOXES, install_s=0.4)
    releases = release_watcher(broker.port)
    config = write_config(tmp_path / "controller", keys, broker.port)
    with (
        file_server(files) as (url, _log),
        SimulatorThread(simulator(broker.port, keys, boxes)) as sim,
    ):
        plan = tmp_path / "plan.toml"
        plan.write_text(wave_plan_text(bundle, url, soak_s=0.3))
        first = spawn_controller(config)
        assert first.wait_up(), first.log()
        with first.client() as api:
            wait_for_boxes(api, BOXES)
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
                done = wait_for_end(api, "defects-2", "the rollout to finish")
            acted = {box.ref: list(sim.acted(box.ref)) for box in boxes}
        finally:
            last.stop()

    assert kills > KILLS
    # No box acted twice, none was skipped; every re-sent notice is byte-identical to the first.
    assert_each_box_acted_once(done, acted, BOXES)
    assert_notices_identical(releases, BOXES)
    releases.close()
