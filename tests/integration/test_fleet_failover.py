"""Failover on PostgreSQL: the leading controller is SIGKILLed in the middle of a rollout.

Two real `fleet-controller serve` processes share a fresh PostgreSQL database and one MQTT
client_id; a real Mosquitto and 30 simulated boxes. The first to start leads; the other stands
by (its /healthz says so, its writes get 503 naming the leader, its metrics say 0). A rollout is
created through the leader's API, and once its second wave is under way the leader is killed.
The standby must report itself leader within 15 s of the kill (issue #17), and the rollout must
complete with no box skipped, no box acting twice, and every notice re-sent byte-identical to
the first one sent on its topic.

Skipped without LINESIDE_TEST_POSTGRES (`.ci/run` sets it when PostgreSQL answers).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from edge_bundle.signing import TrustStore
from fleet_controller.simulator import Behaviour, BoxSpec, Simulator, SimulatorThread
from tests.agent_support import Keys, build_bundle
from tests.fleet_support import (
    ControllerProcess,
    FleetConfig,
    FleetKeys,
    fleet_keys,
    spawn_controller,
    wait_for,
    write_config,
)
from tests.mqtt_support import Broker, TestClient, running_broker
from tests.update_support import file_server

pytestmark = pytest.mark.slow
LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BOXES = 30
TAKEOVER_S = 15.0  # the bound


@pytest.fixture
def database() -> Iterator[str]:
    """The URL of a fresh PostgreSQL database, dropped afterwards."""
    url = os.environ.get("LINESIDE_TEST_POSTGRES")
    if not url:
        pytest.skip("set LINESIDE_TEST_POSTGRES=1 (or a PostgreSQL URL) to test on PostgreSQL")
    admin = sa.create_engine(LOCAL_POSTGRES if url == "1" else url, isolation_level="AUTOCOMMIT")
    name = f"fleet_failover_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "broker") as running:
        yield running


def shared_config(directory: Path, keys: FleetKeys, broker: Broker, url: str) -> FleetConfig:
    """A config of its own (HTTP port, token) on the shared database and MQTT client_id."""
    config = write_config(directory, keys, broker.port)
    text = config.path.read_text()
    text = re.sub(r'(?m)^url = "sqlite:///.*"$', f'url = "{url}"', text)
    text = re.sub(r'(?m)^client_id = ".*"$', 'client_id = "fleet-controller-ha"', text)
    config.path.write_text(text)
    return config


def health(controller: ControllerProcess) -> dict[str, Any]:
    try:
        answer = httpx.get(f"{controller.config.api}/healthz", timeout=2)
    except httpx.TransportError:
        return {}
    return dict(answer.json()) if answer.status_code == 200 else {}


def leader_gauge(controller: ControllerProcess) -> str:
    text = httpx.get(f"{controller.config.api}/metrics", timeout=10).text
    return next(line for line in text.splitlines() if line.startswith("fleet_leader "))


def test_the_standby_takes_over_a_rollout_when_the_leader_is_killed(
    tmp_path: Path, broker: Broker, database: str
) -> None:
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
            behaviour=Behaviour(install_s=1.0),
        )
        for n in range(BOXES)
    ]
    releases = TestClient(broker.port, "releases")
    releases.subscribe("lineside/v1/+/+/release")
    trust = TrustStore.from_files([keys.release_public])
    simulator = Simulator("127.0.0.1", broker.port, boxes, trust, telemetry_interval_s=1.0)
    first_config = shared_config(tmp_path / "a", keys, broker, database)
    second_config = shared_config(tmp_path / "b", keys, broker, database)
    with file_server(files) as (url, _log), SimulatorThread(simulator) as sim:
        first = spawn_controller(first_config)
        assert first.wait_up(), first.log()
        wait_for(lambda: health(first).get("role") == "leader", 30, "the first to lead")
        second = spawn_controller(second_config)
        try:
            assert second.wait_up(), second.log()
            standby = health(second)
            assert standby["role"] == "standby", standby
            assert standby["leader"]["api"] == first_config.api, standby
            assert leader_gauge(first) == "fleet_leader 1.0"
            assert leader_gauge(second) == "fleet_leader 0.0"

            with first.client() as api:
                wait_for(
                    lambda: (
                        (found := api.get("/v1/devices").json())["count"] == BOXES
                        and all(d["agent_version"] for d in found["devices"])
                    ),
                    60,
                    "every box in the registry",
                )
            plan = {
                "name": "defects-2",
                "bundle": str(bundle.path),
                "url": f"{url}/{bundle.path.name}",
                "cohort": {"site": ["plant-0", "plant-1", "plant-2"]},
                "waves": {"percent": [10, 40, 100], "soak_s": 1.0, "deadline_s": 120},
            }
            with second.client() as api:  # the standby refuses writes, naming the leader
                refused = api.post("/v1/rollouts", json={"plan": plan})
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"] == "not_leader"
                assert first_config.api in refused.json()["detail"]
                assert api.get("/v1/rollouts").json() == {"rollouts": []}  # reads work
            with first.client() as api:
                created = api.post("/v1/rollouts", json={"plan": plan})
                assert created.status_code == 201, created.text
                wait_for(
                    lambda: (
                        (s := api.get("/v1/rollouts/defects-2").json())["wave"] >= 2
                        and s["counts"]["committed"] >= 1
                    ),
                    60,
                    "the second wave to start",
                )
            first.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            first.process.wait(10)
            wait_for(lambda: health(second).get("role") == "leader", TAKEOVER_S + 5, "the takeover")
            takeover_s = time.monotonic() - killed_at
            print(f"the standby led {takeover_s:.2f} s after the leader was killed")
            assert takeover_s <= TAKEOVER_S, f"the takeover took {takeover_s:.1f} s"

            with second.client() as api:
                done = wait_for(
                    lambda: (
                        (s := api.get("/v1/rollouts/defects-2").json())["status"]
                        in ("completed", "halted")
                        and s
                    ),
                    120,
                    "the rollout to finish under the new leader",
                )
            acted = {box.ref: list(sim.acted(box.ref)) for box in boxes}
            assert leader_gauge(second) == "fleet_leader 1.0"
        finally:
            second.stop()
            if first.process.poll() is None:
                first.process.kill()

    assert done["status"] == "completed", done
    states = {box["ref"]: box for box in done["boxes"]}
    assert len(states) == BOXES
    assert all(box["state"] == "committed" for box in states.values()), states
    for ref, box in states.items():  # no box skipped, none acted twice
        assert acted[ref] == [(box["sequence"], "defects", 2, False)], (ref, acted[ref])
    # Every re-sent notice is byte-identical to the first one of its topic.
    payloads: dict[str, set[bytes]] = defaultdict(set)
    for message in releases.messages:
        payloads[message.topic].add(bytes(message.payload))
    assert len(payloads) == BOXES
    assert all(len(found) == 1 for found in payloads.values()), {
        topic: len(found) for topic, found in payloads.items() if len(found) > 1
    }
    releases.close()
